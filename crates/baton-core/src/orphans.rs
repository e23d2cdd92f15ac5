//! Workers must not outlive their master. A master killed with SIGKILL cannot drain its workers;
//! `PR_SET_PDEATHSIG` sends each its drain signal, which a worker may ignore. So the master keeps
//! a registry of its workers next to its control socket (`<socket>.workers`: pid, start time,
//! drain signal and timeout of each), and:
//!
//! - a guard process it starts (`baton guard`) waits for the master's end (a pidfd, not a
//!   poll), then ends every worker still in the registry: the drain signal, then SIGKILL to its
//!   process group once its drain timeout has passed;
//! - a master that starts finds its predecessor's registry, and ends the workers still alive the
//!   same way before it binds anything, naming each in the log, so that it never fails on a
//!   port they hold.
//!
//! A process is recognised by its pid **and** its start time, held through a pidfd, never by
//! its name: a number reused since belongs to someone else and is left alone.

use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use baton_sys::pidfd::{Process, start_time};
use baton_sys::process::SignalNumber;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// The drain timeout used for an entry that names none.
const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

/// One worker as the registry records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub pid: u32,
    /// Its start time (clock ticks since boot): with the pid, it names this one process.
    pub started: u64,
    /// Its drain signal by name (`SIGTERM`), if it has one.
    pub drain_signal: Option<String>,
    pub drain_timeout_ms: u64,
}

impl Entry {
    /// The entry for worker process `pid` that started at `started` (clock ticks since boot).
    pub fn new(
        pid: u32,
        started: u64,
        drain_signal: Option<SignalNumber>,
        drain_timeout: Duration,
    ) -> Entry {
        Entry {
            pid,
            started,
            drain_signal: drain_signal.map(|s| s.as_str().to_string()),
            drain_timeout_ms: drain_timeout.as_millis() as u64,
        }
    }

    /// The entry for worker process `pid`, if it still runs (its start time read from /proc).
    pub fn of(
        pid: u32,
        drain_signal: Option<SignalNumber>,
        drain_timeout: Duration,
    ) -> Option<Entry> {
        let started = start_time(pid).ok()?;
        Some(Entry::new(pid, started, drain_signal, drain_timeout))
    }
}

/// The largest registry read (about 20 000 workers).
const MAX_REGISTRY_BYTES: u64 = 4 * 1024 * 1024;

/// The workers of one master, in a file beside its control socket.
#[derive(Debug, Clone)]
pub struct Registry {
    path: PathBuf,
}

impl Registry {
    /// The registry of the master whose control socket is `socket`.
    pub fn beside(socket: &Path) -> Registry {
        let mut path = socket.as_os_str().to_owned();
        path.push(".workers");
        Registry { path: path.into() }
    }

    /// The registry at `path` itself (what [`Registry::path`] gives).
    pub fn at(path: &Path) -> Registry {
        Registry {
            path: path.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the registry with `entries` (written aside, then renamed: never half a file).
    /// The file aside is made anew (`O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600): a symlink or a
    /// file another user put there is removed, never written through; the registry itself is
    /// replaced only if it is this master's own ([`Registry::trusted`]) or absent.
    pub fn write(&self, entries: &[Entry]) -> io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut aside = self.path.as_os_str().to_owned();
        aside.push(".new");
        let aside = PathBuf::from(aside);
        if let Err(why) = self.trusted() {
            if why.kind() != io::ErrorKind::NotFound {
                return Err(why);
            }
        }
        let text = serde_json::to_vec(entries).map_err(io::Error::other)?;
        let create = || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&aside)
        };
        let mut file = match create() {
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                // Left by a write that died, or put there by someone else (a symlink, say):
                // removed (the link itself, not what it names), then made anew.
                std::fs::remove_file(&aside)?;
                create()?
            }
            other => other?,
        };
        file.write_all(&text)?;
        drop(file);
        std::fs::rename(&aside, &self.path)
    }

    /// Whether the registry file may be believed: a regular file (not a symlink) owned by this
    /// process's user and writable by nobody else. The error says why not (`NotFound`: there is
    /// none).
    pub fn trusted(&self) -> io::Result<std::fs::File> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
            .open(&self.path)
            .map_err(|err| match err.raw_os_error() {
                Some(nix::libc::ELOOP) => io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is a symlink", self.path.display()),
                ),
                _ => err,
            })?;
        let meta = file.metadata()?;
        let owner = nix::unistd::geteuid().as_raw();
        let refuse = |why: String| {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} {why}", self.path.display()),
            ))
        };
        if !meta.file_type().is_file() {
            return refuse("is not a regular file".into());
        }
        if meta.uid() != owner {
            return refuse(format!(
                "belongs to uid {}, not to this master's (uid {owner})",
                meta.uid()
            ));
        }
        if meta.mode() & 0o022 != 0 {
            return refuse(format!(
                "may be written by others (mode {:04o})",
                meta.mode() & 0o7777
            ));
        }
        if meta.len() > MAX_REGISTRY_BYTES {
            return refuse(format!(
                "is {} bytes (at most {MAX_REGISTRY_BYTES})",
                meta.len()
            ));
        }
        Ok(file)
    }

    /// The entries recorded, none if there is no registry, or it cannot be read, or it is not to
    /// be believed ([`Registry::trusted`]: then a warning says why): nothing is known to end.
    pub fn read(&self) -> Vec<Entry> {
        use std::io::Read;
        let file = match self.trusted() {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Vec::new(),
            Err(err) => {
                tracing::warn!(event = baton_proto::event::REGISTRY_REFUSED, registry = %self.path.display(),
                    "worker registry ignored, and no process it names is signalled: {err}");
                return Vec::new();
            }
        };
        let mut bytes = Vec::new();
        let _ = file.take(MAX_REGISTRY_BYTES).read_to_end(&mut bytes);
        serde_json::from_slice(&bytes).unwrap_or_default()
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A master's registry, written by a thread of its own: replacing the file by a rename waits,
/// on a disk file system, for the old file's write-back (ext4 flushes on replace-via-rename), and
/// done on the event loop that held the master for seconds while many workers came and went.
/// The newest set of workers wins: a write still queued when a newer one comes is skipped.
#[derive(Debug)]
pub struct RegistryWriter {
    registry: Registry,
    jobs: Option<std::sync::mpsc::Sender<Vec<Entry>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RegistryWriter {
    pub fn new(registry: Registry) -> RegistryWriter {
        let (jobs, queue) = std::sync::mpsc::channel::<Vec<Entry>>();
        let target = registry.clone();
        let thread = std::thread::Builder::new()
            .name("registry".into())
            .spawn(move || {
                while let Ok(mut entries) = queue.recv() {
                    while let Ok(newer) = queue.try_recv() {
                        entries = newer;
                    }
                    if let Err(err) = target.write(&entries) {
                        tracing::warn!(registry = %target.path().display(),
                            "cannot record the workers in {}: {err}", target.path().display());
                    }
                }
            })
            .ok();
        RegistryWriter {
            registry,
            jobs: thread.is_some().then_some(jobs),
            thread,
        }
    }

    pub fn path(&self) -> &Path {
        self.registry.path()
    }

    /// Records `entries` soon (at once if the thread could not be started).
    pub fn write(&self, entries: Vec<Entry>) {
        let unsent = match &self.jobs {
            Some(jobs) => jobs.send(entries).err().map(|e| e.0),
            None => Some(entries),
        };
        if let Some(entries) = unsent {
            if let Err(err) = self.registry.write(&entries) {
                tracing::warn!(registry = %self.path().display(),
                    "cannot record the workers in {}: {err}", self.path().display());
            }
        }
    }

    /// The master ends: the writes still queued are done, then the registry is removed.
    pub fn remove(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.registry.remove();
    }
}

/// The entries whose process still runs: same pid, same start time.
pub fn alive(entries: &[Entry]) -> Vec<Entry> {
    entries
        .iter()
        .filter(|e| matches!(Process::find(e.pid, e.started), Ok(Some(_))))
        .cloned()
        .collect()
}

/// What became of the workers of a registry.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Ended {
    /// Exited within their drain timeout.
    pub drained: Vec<u32>,
    /// Killed at its end.
    pub killed: Vec<u32>,
}

/// Ends every process of `entries` that still runs (same pid, same start time): its drain
/// signal now, SIGKILL to its process group once its drain timeout has passed. Returns when all
/// are gone. Entries whose process is gone, or whose pid is someone else's now, are skipped.
pub fn end(entries: &[Entry]) -> Ended {
    let begun = Instant::now();
    let mut alive: Vec<(Process, Duration)> = Vec::new();
    for entry in entries {
        match Process::find(entry.pid, entry.started) {
            Ok(Some(process)) => {
                if let Some(signal) = entry
                    .drain_signal
                    .as_deref()
                    .and_then(|name| SignalNumber::from_str(name).ok())
                {
                    let _ = process.signal(signal);
                }
                let timeout = if entry.drain_timeout_ms == 0 {
                    DEFAULT_DRAIN
                } else {
                    Duration::from_millis(entry.drain_timeout_ms)
                };
                alive.push((process, timeout));
            }
            Ok(None) => {}
            Err(err) => warn!(pid = entry.pid, "cannot look at pid {}: {err}", entry.pid),
        }
    }
    let mut ended = Ended::default();
    // Soonest deadline first: each wait is bounded by what is left of that worker's timeout.
    alive.sort_by_key(|(_, timeout)| *timeout);
    for (process, timeout) in alive {
        let left = (begun + timeout).saturating_duration_since(Instant::now());
        match process.wait(left) {
            Ok(true) => ended.drained.push(process.pid()),
            _ => {
                let _ = process.kill_group();
                let _ = process.wait(Duration::from_secs(5));
                ended.killed.push(process.pid());
            }
        }
    }
    ended
}

/// `baton guard`: waits for the master (`pid`, started at `started`) to end, then ends what its
/// registry still names. A master that stops normally removes its registry first, so then
/// nothing is left to do.
pub fn guard(master: u32, started: u64, registry: &Registry) -> io::Result<Ended> {
    if let Some(process) = Process::find(master, started)? {
        while !process.wait(Duration::from_secs(3600))? {}
    }
    let entries = alive(&registry.read());
    if entries.is_empty() {
        registry.remove();
        return Ok(Ended::default());
    }
    warn!(
        event = baton_proto::event::MASTER_GONE,
        master,
        "master pid {master} ended without stopping its workers: ending {} of them",
        entries.len()
    );
    let ended = end(&entries);
    report(&ended, "the master's end");
    registry.remove();
    Ok(ended)
}

/// Logs what `end` did.
pub fn report(ended: &Ended, after: &str) {
    for pid in &ended.drained {
        info!(
            event = baton_proto::event::ORPHAN_ENDED,
            pid = *pid,
            killed = false,
            "worker pid {pid}, left behind by {after}, exited after its drain signal"
        );
    }
    for pid in &ended.killed {
        warn!(
            event = baton_proto::event::ORPHAN_ENDED,
            pid = *pid,
            killed = true,
            "worker pid {pid}, left behind by {after}, was killed at its drain timeout"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_round_trips_and_a_missing_one_names_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::beside(&dir.path().join("baton.sock"));
        assert_eq!(registry.path(), dir.path().join("baton.sock.workers"));
        assert!(registry.read().is_empty());
        let entries = vec![Entry {
            pid: 7,
            started: 99,
            drain_signal: Some("SIGTERM".into()),
            drain_timeout_ms: 1500,
        }];
        registry.write(&entries).unwrap();
        assert_eq!(registry.read(), entries);
        registry.remove();
        assert!(registry.read().is_empty());
    }

    #[test]
    fn a_worker_that_ignores_its_drain_signal_is_killed_at_its_timeout_and_others_are_left_alone() {
        // Ignores SIGTERM; leads its own process group, as a worker does. It says when its trap
        // is set.
        let mut stubborn = std::process::Command::new("sh");
        stubborn
            .args(["-c", "trap '' TERM; echo trapped; exec sleep 30"])
            .stdout(std::process::Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut stubborn, 0);
        let mut stubborn = stubborn.spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(stubborn.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line, "trapped\n");
        let mut polite = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let entry = |pid, ms| {
            Entry::of(pid, Some(SignalNumber::SIGTERM), Duration::from_millis(ms)).unwrap()
        };
        let reused = Entry {
            started: entry(std::process::id(), 1).started + 1,
            ..entry(std::process::id(), 1)
        };
        let begun = Instant::now();
        let ended = end(&[entry(stubborn.id(), 300), entry(polite.id(), 300), reused]);
        assert!(
            begun.elapsed() >= Duration::from_millis(300),
            "waited for the timeout: {ended:?}"
        );
        assert_eq!(ended.drained, vec![polite.id()]);
        assert_eq!(ended.killed, vec![stubborn.id()]);
        stubborn.wait().unwrap();
        polite.wait().unwrap();
    }
}
