//! What the master tells its service manager (systemd's `sd_notify`): readiness, reloading,
//! stopping, a status line, the watchdog, and the listening sockets for its fd store. The core
//! does not talk to systemd itself: the binary passes a function that does
//! ([`super::Options::notify`]).

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use tracing::warn;

use super::Master;
use super::report::status_line;
use crate::faults::Point;
use crate::listeners::GenerationListener;
use crate::supervisor::Phase;

/// What the master tells its service manager (systemd's `sd_notify`). The core does not talk to
/// systemd itself: the binary passes a function that does (see [`super::Options::notify`]).
#[derive(Debug)]
pub enum Notification {
    /// The first generation serves; or a reload ended (either way: not reloading any more).
    Ready,
    /// A reload started.
    Reloading,
    /// A one-line summary, for `systemctl status`.
    Status(String),
    /// The master is stopping.
    Stopping,
    /// The event loop is alive (sent at half of the watchdog interval).
    Watchdog,
    /// A stop needs this much more time than systemd would otherwise give it.
    ExtendTimeout(Duration),
    /// Keep these listening sockets for the next start (`FDSTORE=1`, `FDNAME=`).
    StoreFds(Vec<(String, OwnedFd)>),
    /// Forget the stored socket with this name (`FDSTOREREMOVE=1`).
    RemoveFd(String),
}

#[derive(Debug, Default)]
pub(super) struct Told {
    pub(super) ready: bool,
    pub(super) stopping: bool,
    pub(super) status: String,
}

impl Master {
    pub(super) fn notify(&mut self, notification: Notification) {
        if let Some(notify) = self.options.notify.as_mut() {
            notify(notification);
        }
    }

    /// Hands `listeners` to the service manager's fd store.
    pub(super) fn store_fds(&mut self, listeners: &[GenerationListener]) {
        if self.options.notify.is_none() || listeners.is_empty() {
            return;
        }
        if let Err(err) = Point::FdStoreUpdate.check() {
            warn!("sd_notify: storing the listeners in the fd store: {err}");
            return;
        }
        let fds = listeners
            .iter()
            .filter_map(|l| Some((l.config.name.clone(), l.socket.duplicate().ok()?)))
            .collect();
        self.notify(Notification::StoreFds(fds));
    }

    /// Tells the service manager what changed since last time: readiness, stop, status line.
    pub(super) fn report(&mut self) {
        if self.options.notify.is_none() {
            return;
        }
        let snap = self.supervisor.snapshot(Instant::now());
        if !self.told.ready && snap.generations.iter().any(|g| g.phase == Phase::Serving) {
            self.told.ready = true;
            self.notify(Notification::Ready);
        }
        if snap.stopping && !self.told.stopping {
            self.told.stopping = true;
            self.notify(Notification::Stopping);
        }
        let programs = self
            .resources
            .iter()
            .map(|(g, r)| (*g, r.programs.iter().map(|p| p.name.clone()).collect()))
            .collect();
        let status = status_line(&snap, self.supervisor.history().last(), &programs);
        if status != self.told.status {
            if snap.stopping {
                let left = snap
                    .generations
                    .iter()
                    .filter_map(|g| g.time_left)
                    .max()
                    .unwrap_or_default()
                    + snap.stop_delay_left.unwrap_or_default();
                self.notify(Notification::ExtendTimeout(left + Duration::from_secs(5)));
            }
            self.told.status = status.clone();
            self.notify(Notification::Status(status));
        }
    }
}
