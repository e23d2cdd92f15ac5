//! `supervisor.watch: [config]`: the configuration file watched with inotify, a change made a
//! reload (with a verdict, like SIGUSR2). What a config-reloader sidecar does in Kubernetes,
//! without one.
//!
//! A ConfigMap mounted as a volume changes by the kubelet swapping a symlink: `baton.yaml ->
//! ..data/baton.yaml`, `..data -> ..2026_11_28_...`, and an update makes a new timestamped
//! directory and renames a new `..data` over the old one. So the watch covers every directory
//! entry the path goes through ([`chain`]): the file, each symlink on the way and what it
//! points at, each in its directory; an editor that writes in place, or writes a copy and
//! renames it, is seen the same way. The chain is resolved again after every change.
//!
//! Changes closer together than [`SETTLE`] make one reload. Nothing runs while nothing changes:
//! the task waits on the inotify descriptor, and a timer runs only after a change.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_sys::inotify::{AddWatchFlags, Inotify, WatchDescriptor};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::Master;
use super::readiness::News;
use crate::supervisor::{Event, Intent, Trigger};

/// Changes closer together than this make one reload (an editor's write, rename and chmod; the
/// kubelet's new directory, symlink and rename).
const SETTLE: Duration = Duration::from_millis(200);
/// Symlinks followed at most (more: a loop).
const MAX_LINKS: usize = 16;

impl Master {
    /// Starts or stops the watch as the serving generation's configuration asks.
    pub(super) fn update_config_watch(&mut self) {
        let wanted = self.supervisor.watches_config();
        match (&self.config_watch, wanted) {
            (None, true) => {
                info!(event = baton_proto::event::CONFIG_WATCH, path = %self.config_path.display(),
                    "watching {} for changes: a change reloads (supervisor.watch)",
                    self.config_path.display());
                let task = tokio::spawn(watch(self.config_path.clone(), self.events_tx.clone()));
                self.config_watch = Some(task.abort_handle());
            }
            (Some(task), false) => {
                task.abort();
                self.config_watch = None;
                info!(
                    event = baton_proto::event::CONFIG_WATCH_STOPPED,
                    "no longer watching the configuration file"
                );
            }
            _ => {}
        }
    }
}

/// Every directory entry `path` goes through, as (directory, name): the file itself, each
/// symlink on the way (a symlinked directory included) and what it points at.
pub(super) fn chain(path: &Path) -> Vec<(PathBuf, OsString)> {
    let mut out = Vec::new();
    let mut next = vec![path.to_path_buf()];
    let mut links = 0;
    while let Some(p) = next.pop() {
        let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
            continue;
        };
        let entry = (dir.to_path_buf(), name.to_os_string());
        if out.contains(&entry) {
            continue;
        }
        out.push(entry);
        // The directory may be a symlink too (`..data`): its own entry and target.
        if dir.is_symlink() {
            next.push(dir.to_path_buf());
        }
        if p.is_symlink() && links < MAX_LINKS {
            links += 1;
            if let Ok(target) = std::fs::read_link(&p) {
                next.push(dir.join(target));
            }
        }
    }
    out
}

/// What each watch is for: the names in its directory that matter.
type Watches = HashMap<WatchDescriptor, Vec<OsString>>;

fn arm(inotify: &Inotify, path: &Path, old: Watches) -> Watches {
    for wd in old.into_keys() {
        inotify.remove(wd);
    }
    let mask = AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ONLYDIR;
    let mut watches = Watches::new();
    for (dir, name) in chain(path) {
        match inotify.add(&dir, mask) {
            Ok(wd) => watches.entry(wd).or_default().push(name),
            Err(err) => warn!("watching {}: {err}", dir.display()),
        }
    }
    watches
}

/// Waits for a change to an entry of the chain.
async fn changed(inotify: &Inotify, watches: &Watches) -> std::io::Result<()> {
    loop {
        let events = inotify.events().await?;
        let relevant = events.iter().any(|e| {
            e.name
                .as_ref()
                .is_some_and(|name| watches.get(&e.wd).is_some_and(|names| names.contains(name)))
        });
        if relevant {
            return Ok(());
        }
    }
}

/// Watches `path` until aborted; each settled change becomes a reload request.
async fn watch(path: PathBuf, news: mpsc::UnboundedSender<News>) {
    let inotify = match Inotify::new() {
        Ok(inotify) => inotify,
        Err(err) => {
            warn!(
                event = baton_proto::event::CONFIG_WATCH_FAILED,
                "cannot watch {}: inotify: {err}",
                path.display()
            );
            return;
        }
    };
    let mut watches = arm(&inotify, &path, Watches::new());
    loop {
        if let Err(err) = changed(&inotify, &watches).await {
            warn!(
                event = baton_proto::event::CONFIG_WATCH_FAILED,
                "watching {}: {err}",
                path.display()
            );
            return;
        }
        // A symlink swap changes the chain: follow it at once, then let the changes settle.
        watches = arm(&inotify, &path, watches);
        while let Ok(result) = tokio::time::timeout(SETTLE, changed(&inotify, &watches)).await {
            if result.is_err() {
                break;
            }
            watches = arm(&inotify, &path, watches);
        }
        let trigger = Trigger::Other(format!("{} changed (supervisor.watch)", path.display()));
        if news
            .send(News::Event(Event::Intent(Intent::Reload(trigger))))
            .is_err()
        {
            return;
        }
    }
}
