//! Containment of workers' whole process trees in cgroups (cgroup v2), so that a worker's
//! children and grandchildren end with its generation, even one that left its process group
//! with `setsid()`.
//!
//! Where: under the master's own cgroup, in `baton-<id>/` (the id is derived from the control
//! socket's path, so the next master of the same configuration finds it), one `g<generation>-p
//! <program>/` per program of each generation. A worker is made in its cgroup
//! (`clone3(CLONE_INTO_CGROUP)`, [`baton_sys::spawn`]): no process is ever migrated (a migration
//! costs the kernel a grace period, ~2 ms each), the master never leaves its own cgroup.
//! When the generation's last worker is gone (drained, or
//! killed at the deadline) `cgroup.kill` ends whatever is left in its cgroups (or, before Linux
//! 5.14, SIGKILL to each process listed, until none is), and the empty cgroups are removed.
//!
//! When: the cgroup2 filesystem is mounted (alone, or as the `unified` hierarchy beside v1
//! controllers) and the master may write it: as root outside systemd, or under systemd with
//! `Delegate=yes` (a service's cgroup belongs to systemd otherwise). Else (and with
//! `supervisor.cgroups: off`) the fallback is the process group and the subreaper: a worker's
//! group is killed with it, a process that left the group lives on until it exits by itself
//! (and is then reaped by the master).

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

/// Most rounds of "SIGKILL whatever is listed" without `cgroup.kill` (a fork bomb outruns one).
const KILL_ROUNDS: usize = 100;

/// The cgroup the master keeps its workers' cgroups in.
#[derive(Debug, Clone)]
pub struct Containment {
    dir: PathBuf,
    /// `cgroup.kill` exists (Linux 5.14 and later).
    kill_file: bool,
}

/// Why workers are not contained in cgroups.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("turned off (supervisor.cgroups: off)")]
    Off,
    #[error("no cgroup2 filesystem is mounted")]
    NotMounted,
    #[error("this process's cgroup is not known ({0})")]
    Unknown(String),
    #[error(
        "the cgroup {} is systemd's, not delegated to this service (add Delegate=yes to the unit)",
        .0.display()
    )]
    NotDelegated(PathBuf),
    #[error("cannot create {}: {source}", dir.display())]
    Create { dir: PathBuf, source: io::Error },
}

impl Containment {
    /// The container for the master whose control socket is `socket`; created if it must be.
    pub fn open(socket: &Path) -> Result<Containment, Unavailable> {
        let mount = cgroup2_mount().ok_or(Unavailable::NotMounted)?;
        let own = own_cgroup().map_err(Unavailable::Unknown)?;
        let base = mount.join(own.trim_start_matches('/'));
        // A unit's cgroup is systemd's unless it delegated it.
        let under_systemd = own.ends_with(".service") || own.ends_with(".scope");
        if under_systemd && !baton_sys::cgroup::delegated(&base) {
            return Err(Unavailable::NotDelegated(base));
        }
        let dir = base.join(format!(
            "baton-{:016x}",
            fnv1a(socket.as_os_str().as_encoded_bytes())
        ));
        std::fs::create_dir_all(&dir).map_err(|source| Unavailable::Create {
            dir: dir.clone(),
            source,
        })?;
        let kill_file = dir.join("cgroup.kill").exists();
        Ok(Containment { dir, kill_file })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn group_dir(&self, generation: u64, program: usize) -> PathBuf {
        self.dir.join(format!("g{generation}-p{program}"))
    }

    /// The cgroup of `program` of `generation` (created if need be), open, to make its workers
    /// in.
    pub fn open_group(&self, generation: u64, program: usize) -> io::Result<OwnedFd> {
        let dir = self.group_dir(generation, program);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        Ok(std::fs::File::open(&dir)?.into())
    }

    /// Ends every process in the cgroup of `program` of `generation`.
    pub fn kill(&self, generation: u64, program: usize) {
        kill_dir(&self.group_dir(generation, program), self.kill_file);
    }

    /// Removes that cgroup; `false` while processes remain in it (dying ones, not reaped yet):
    /// try again later.
    pub fn remove(&self, generation: u64, program: usize) -> bool {
        remove_dir(&self.group_dir(generation, program))
    }

    /// At start: ends whatever a master before this one left in its workers' cgroups (the
    /// processes that escaped its workers' process groups), and removes them. Returns how many
    /// processes it found.
    pub fn end_leftovers(&self) -> usize {
        let mut found = 0;
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let dir = entry.path();
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let pids = procs(&dir);
            if !pids.is_empty() {
                found += pids.len();
                warn!(event = baton_proto::event::ORPHANS_FOUND, cgroup = %dir.display(),
                    "processes a master before this one left in {}: pids {:?}; ending them",
                    dir.display(), pids);
                kill_dir(&dir, self.kill_file);
            }
            // Removed once empty (the killed ones are reaped: this master is their subreaper
            // only if it started them; others are reaped by init).
            for _ in 0..50 {
                if remove_dir(&dir) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10)); // bounded: 0.5 s
            }
        }
        found
    }

    /// The master is done: its container goes (if empty).
    pub fn close(&self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The pids listed in a cgroup's `cgroup.procs`.
pub(crate) fn procs_of(dir: &Path) -> Vec<u32> {
    procs(dir)
}

fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn kill_dir(dir: &Path, kill_file: bool) {
    if kill_file {
        match std::fs::write(dir.join("cgroup.kill"), "1") {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => debug!("cgroup.kill in {}: {e}", dir.display()),
        }
    }
    for _ in 0..KILL_ROUNDS {
        let pids = procs(dir);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            // Through a pidfd, and only if the process it names is still in the cgroup: the
            // number may have been reused since `cgroup.procs` was read.
            if let Ok(Some(process)) = baton_sys::pidfd::Process::open(pid)
                && procs(dir).contains(&pid)
            {
                let _ = process.signal(baton_sys::process::SignalNumber::SIGKILL);
            }
        }
    }
}

fn remove_dir(dir: &Path) -> bool {
    match std::fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(_) => false,
    }
}

/// Where the cgroup2 filesystem is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a
/// hybrid hierarchy), from `/proc/self/mountinfo`.
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        (fs.split_whitespace().next() == Some("cgroup2"))
            .then(|| mount.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// This process's cgroup v2 path (`0::/system.slice/baton.service`).
fn own_cgroup() -> Result<String, String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
        .ok_or_else(|| "no cgroup v2 entry in /proc/self/cgroup".into())
}

/// FNV-1a: a name that stays the same for the same socket path, across builds.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Logs how workers are contained (once, at start).
pub fn announce(containment: &Result<Containment, Unavailable>) {
    match containment {
        Ok(c) => {
            info!(event = baton_proto::event::CONTAINMENT, mode = "cgroup", cgroup = %c.dir().display(),
            "workers are contained in cgroups under {}: their whole process trees end with them",
            c.dir().display())
        }
        Err(why) => {
            info!(event = baton_proto::event::CONTAINMENT, mode = "process_group", reason = %why,
            "workers are contained by process group only: {why}; a worker's child that calls setsid() outlives it")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(fnv1a(b"/run/a.sock"), fnv1a(b"/run/b.sock"));
    }
}
