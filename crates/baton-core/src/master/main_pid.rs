//! `MAINPID=`: a systemd-style worker names its main process (a launcher that forks the server).
//! The master signals that process from then on, so a worker that could name any pid could make
//! the master (root) kill any process. [`vouch`] accepts only the worker itself or a process
//! proven to be its own: in the worker's cgroup where workers are contained, else a descendant of
//! the worker by its parent chain (or an orphan the master inherited that is still in the
//! worker's process group), read while a pidfd holds the process and checked again after
//! (so the proof is about the process the pidfd names, whatever happens to the number). Never
//! pid 0 or 1, the master, or an ancestor of the master. systemd's own rules (its
//! `TEST-20-MAINPIDGAMES`) are the model; baton is stricter: a worker is never privileged for
//! this, whatever its uid.

use std::path::Path;

use baton_sys::pidfd::Process;
use baton_sys::process;

/// Parent links followed at most from an announced process up to the worker.
const MAX_DEPTH: usize = 64;

/// Why an announced main process was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("pid {0} names no single process")]
    Invalid(u32),
    #[error("pid 1 is the init process")]
    Init,
    #[error("pid {0} is the master itself")]
    Master(u32),
    #[error("pid {0} is an ancestor of the master")]
    Ancestor(u32),
    #[error("no process has pid {0}")]
    NotFound(u32),
    #[error("pid {pid} is not in the worker's cgroup ({cgroup})")]
    OutsideCgroup { pid: u32, cgroup: String },
    #[error("pid {pid} does not descend from the worker (pid {worker}); its parents: {chain}")]
    NotDescendant {
        pid: u32,
        worker: u32,
        chain: String,
    },
    #[error("pid {0} ended while it was being checked")]
    Ended(u32),
    #[error("pid {pid} is worker {owner}'s process")]
    Taken { pid: u32, owner: u64 },
    #[error("pid {pid} could not be checked: {reason}")]
    Unreadable { pid: u32, reason: String },
}

/// Proves `pid` is the worker's own (the worker started as `worker`; contained in the cgroup
/// directory `cgroup` if workers are contained) and returns it held by a pidfd.
pub(super) fn vouch(pid: u32, worker: u32, cgroup: Option<&Path>) -> Result<Process, Refusal> {
    let master = std::process::id();
    match pid {
        0 => return Err(Refusal::Invalid(pid)),
        1 => return Err(Refusal::Init),
        p if p == master => return Err(Refusal::Master(pid)),
        p if i32::try_from(p).is_err() => return Err(Refusal::Invalid(pid)),
        _ => {}
    }
    if ancestors(master).contains(&pid) {
        return Err(Refusal::Ancestor(pid));
    }
    let unreadable = |e: std::io::Error| Refusal::Unreadable {
        pid,
        reason: e.to_string(),
    };
    let held = Process::open(pid)
        .map_err(unreadable)?
        .ok_or(Refusal::NotFound(pid))?;
    if pid != worker {
        match cgroup {
            Some(dir) => {
                if !crate::cgroups::procs_of(dir).contains(&pid) {
                    let cgroup = process::cgroup_of(pid).unwrap_or_else(|e| e.to_string());
                    return Err(Refusal::OutsideCgroup { pid, cgroup });
                }
            }
            None => descends(pid, worker)?,
        }
    }
    // Checked while the pidfd held it: if it still runs now, the checks were about it.
    match held.has_exited() {
        Ok(false) => Ok(held),
        Ok(true) => Err(Refusal::Ended(pid)),
        Err(e) => Err(unreadable(e)),
    }
}

/// Whether `pid`'s parent chain reaches `worker` (within [`MAX_DEPTH`] links). An orphan the
/// master inherited (it is the workers' subreaper: a daemon whose launcher exited) counts when it
/// is still in the worker's process group: only a worker's descendants can be there.
fn descends(pid: u32, worker: u32) -> Result<(), Refusal> {
    let master = std::process::id();
    let mut chain = Vec::new();
    let mut at = pid;
    for _ in 0..MAX_DEPTH {
        let parent = process::parent_of(at).map_err(|_| Refusal::Ended(pid))?;
        chain.push(parent);
        if parent == worker {
            return Ok(());
        }
        if parent == master && process::process_group(pid).is_ok_and(|g| g == worker) {
            return Ok(());
        }
        if parent <= 1 || parent == master {
            break;
        }
        at = parent;
    }
    let chain = chain
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(" -> ");
    Err(Refusal::NotDescendant { pid, worker, chain })
}

/// The master's ancestors, up to pid 1 (or the edge of its PID namespace).
fn ancestors(of: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut at = of;
    while let Ok(parent) = process::parent_of(at) {
        if parent == 0 || out.contains(&parent) || out.len() >= MAX_DEPTH {
            break;
        }
        out.push(parent);
        at = parent;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    /// `sh` that starts a `sleep` and prints its pid, then waits.
    fn sh_with_child() -> (std::process::Child, u32) {
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(sh.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        (sh, line.trim().parse().unwrap())
    }

    #[test]
    fn the_games_of_systemds_mainpid_test_are_refused_or_accepted_as_there() {
        let (mut sh, child) = sh_with_child();
        let (mut other, unrelated) = sh_with_child();
        let worker = sh.id();
        // Its own pid, and a process it started: accepted.
        assert_eq!(vouch(worker, worker, None).unwrap().pid(), worker);
        assert_eq!(vouch(child, worker, None).unwrap().pid(), child);
        // Pid 1, 0, the master, its parent, a pid that cannot exist: refused.
        assert_eq!(vouch(1, worker, None).unwrap_err(), Refusal::Init);
        assert_eq!(vouch(0, worker, None).unwrap_err(), Refusal::Invalid(0));
        let me = std::process::id();
        assert_eq!(vouch(me, worker, None).unwrap_err(), Refusal::Master(me));
        let parent = process::parent_of(me).unwrap();
        if parent > 1 {
            assert_eq!(
                vouch(parent, worker, None).unwrap_err(),
                Refusal::Ancestor(parent)
            );
        }
        assert_eq!(
            vouch(1 << 30, worker, None).unwrap_err(),
            Refusal::NotFound(1 << 30)
        );
        assert_eq!(
            vouch(u32::MAX, worker, None).unwrap_err(),
            Refusal::Invalid(u32::MAX)
        );
        // A process outside the worker's tree (another shell's child): refused, with its chain.
        let err = vouch(unrelated, worker, None).unwrap_err();
        assert!(
            matches!(err, Refusal::NotDescendant { pid, .. } if pid == unrelated),
            "{err}"
        );
        assert!(err.to_string().contains(&other.id().to_string()), "{err}");
        for p in [&mut sh, &mut other] {
            p.kill().unwrap();
            p.wait().unwrap();
        }
    }
}
