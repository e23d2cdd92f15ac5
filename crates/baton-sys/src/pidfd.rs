//! A process named by more than its number: a pidfd (`pidfd_open(2)`) refers to one process for
//! as long as it is held, even after the number is reused, and becomes readable when that
//! process exits. With the process's start time (`/proc/PID/stat`), it proves that the process
//! found now is the one recorded earlier, which a pid alone cannot.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// When a process started, in clock ticks since boot (field 22 of `/proc/PID/stat`): with the
/// pid, it names one process for the machine's uptime.
pub fn start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces and parentheses: the
    // fields after it start after the last `)`.
    let rest = stat
        .rfind(')')
        .map(|at| &stat[at + 1..])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no `)` in /proc stat"))?;
    // `rest` starts at field 3 (state): the start time is field 22, the 20th from here.
    rest.split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no start time in /proc stat"))
}

/// One process, held by a pidfd.
#[derive(Debug)]
pub struct Process {
    pid: u32,
    fd: OwnedFd,
}

/// A duplicate pidfd, owned, for the reactor.
struct Watched(OwnedFd);

impl AsRawFd for Watched {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for Process {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Process {
    /// The process `pid`, if it runs and started at `start_time` (so it is the one meant, not
    /// another that reuses the number). `Ok(None)`: gone, or another process.
    pub fn find(pid: u32, started: u64) -> io::Result<Option<Process>> {
        let Some(process) = Process::open(pid)? else {
            return Ok(None);
        };
        // Checked after the pidfd exists: if the start time matches now, the pidfd holds that
        // process, whatever happens to the number later.
        match start_time(pid) {
            Ok(t) if t == started => Ok(Some(process)),
            _ => Ok(None),
        }
    }

    /// The process `pid` as its pidfd names it now, whoever it is: the caller proves it is the
    /// one meant (its parent chain, its cgroup) and then that it has not exited since
    /// ([`Process::has_exited`]): checks made while the pidfd was held and the process still
    /// ran were about this very process. `Ok(None)`: no such process.
    pub fn open(pid: u32) -> io::Result<Option<Process>> {
        let Ok(raw_pid) = libc::pid_t::try_from(pid) else {
            return Ok(None);
        };
        if raw_pid <= 0 {
            return Ok(None);
        }
        // SAFETY: pidfd_open takes a pid and a flags word and returns a new descriptor or -1; it
        // touches no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid, 0) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ESRCH) => Ok(None),
                _ => Err(err),
            };
        }
        // SAFETY: the kernel just returned `fd` as a new descriptor (close-on-exec, as every
        // pidfd), owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Some(Process { pid, fd }))
    }

    /// The process a pidfd names (made with it by `clone3(CLONE_PIDFD)`, or inherited across a
    /// self-upgrade).
    pub fn from_pidfd(pid: u32, fd: OwnedFd) -> Process {
        Process { pid, fd }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A future that completes when the process ends (its pidfd becomes readable), whoever
    /// reaps it. Registered with the current tokio runtime through a duplicate of the pidfd, so
    /// this `Process` keeps its own.
    pub fn ended(&self) -> io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
        let dup = Watched(self.fd.try_clone()?);
        // SAFETY: the duplicate is owned by the `Watched` moved into the `AsyncFd`: it stays open
        // while registered, and closes only when the `AsyncFd` (which deregisters it first) is
        // dropped.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(dup, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        Ok(async move {
            // A pidfd stays readable once its process ended: the first readiness is the end.
            let _ = fd.readable().await;
        })
    }

    /// Whether it has exited (seen through the pidfd, whoever reaps it).
    pub fn has_exited(&self) -> io::Result<bool> {
        self.wait(Duration::ZERO)
    }

    /// Reaps it if it is this process's child and has exited: `Ok(Some(how))`. `Ok(None)`: it
    /// runs, or another process is its parent (so its status is that parent's to read).
    pub fn try_reap(&self) -> io::Result<Option<crate::process::ExitKind>> {
        // SAFETY: an all-zero siginfo_t is valid (a plain C struct); waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid with P_PIDFD reads the descriptor and writes `info`, which lives on
        // this frame.
        let rc = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.fd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ECHILD) => Ok(None),
                _ => Err(err),
            };
        }
        // SAFETY: waitid succeeded; si_pid is 0 when no child had exited (WNOHANG), else the
        // kernel filled the child fields of the union.
        let (pid, code, status) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        Ok(Some(match code {
            libc::CLD_EXITED => crate::process::ExitKind::Exited(status),
            _ => Signal::try_from(status)
                .map(crate::process::ExitKind::Signaled)
                .unwrap_or(crate::process::ExitKind::Exited(status)),
        }))
    }

    /// Sends `signal` to this very process (never to another that got its number).
    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        // SAFETY: pidfd_send_signal takes the pidfd, a signal number, a null siginfo (the
        // kernel fills in ours) and flags 0; no memory is passed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ESRCH) {
                return Ok(()); // it exited meanwhile
            }
            return Err(err);
        }
        Ok(())
    }

    /// SIGKILL to this process's group, which it leads (a worker is started as the leader of
    /// its own group): checked alive first, so the group id is still its own.
    pub fn kill_group(&self) -> io::Result<()> {
        if !self.wait(Duration::ZERO)? {
            let _ = crate::process::signal_group(self.pid, Signal::SIGKILL);
        }
        self.signal(Signal::SIGKILL)
    }

    /// Waits at most `timeout` for the process to exit; `true` if it did.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Rounded up: poll's milliseconds must not end the wait before the deadline.
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            let mut fds = [nix::poll::PollFd::new(
                self.fd.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(
                &mut fds,
                nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX),
            ) {
                Ok(0) if Instant::now() >= deadline => return Ok(false),
                Ok(0) => continue,
                Ok(_) => return Ok(true),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(err) => return Err(err.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_found_by_pid_and_start_time_and_its_exit_is_seen() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let started = start_time(pid).unwrap();
        assert!(
            Process::find(pid, started + 1).unwrap().is_none(),
            "another start time"
        );
        let process = Process::find(pid, started).unwrap().expect("found");
        assert!(!process.wait(Duration::from_millis(10)).unwrap());
        process.signal(Signal::SIGKILL).unwrap();
        assert!(process.wait(Duration::from_secs(10)).unwrap());
        child.wait().unwrap();
        assert!(Process::find(pid, started).unwrap().is_none(), "gone");
    }

    #[test]
    fn a_spawned_process_comes_with_its_pidfd_which_sees_its_end_and_reaps_it() {
        let mut spawn = crate::spawn::Spawn::new(std::path::Path::new("/bin/sleep")).unwrap();
        spawn.arg("30").unwrap();
        let started = spawn.spawn(None).unwrap();
        let process = started.into_process();
        assert!(!process.has_exited().unwrap());
        assert_eq!(process.try_reap().unwrap(), None, "it runs");
        process.signal(Signal::SIGTERM).unwrap();
        assert!(process.wait(Duration::from_secs(10)).unwrap());
        assert_eq!(
            process.try_reap().unwrap(),
            Some(crate::process::ExitKind::Signaled(Signal::SIGTERM))
        );
    }

    #[test]
    fn a_grandchild_reaped_by_its_own_parent_is_seen_to_end_but_not_reaped_here() {
        // sh forks sleep, prints its pid and waits for it: the sleep is not our child.
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(sh.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let pid: u32 = line.trim().parse().unwrap();
        let process = Process::open(pid).unwrap().expect("runs");
        assert_eq!(crate::process::parent_of(pid).unwrap(), sh.id());
        process.signal(Signal::SIGKILL).unwrap();
        assert!(process.wait(Duration::from_secs(10)).unwrap());
        assert!(process.has_exited().unwrap());
        assert_eq!(process.try_reap().unwrap(), None, "sh's child, not ours");
        sh.wait().unwrap();
        assert!(Process::open(0).unwrap().is_none());
        assert!(Process::open(u32::MAX).unwrap().is_none());
    }

    #[tokio::test]
    async fn the_end_of_a_process_is_awaited_without_reaping_it() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let process = Process::open(child.id()).unwrap().expect("runs");
        let ended = process.ended().unwrap();
        let waiting = tokio::spawn(ended);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        process.signal(Signal::SIGKILL).unwrap();
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("seen to end")
            .unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn start_time_reads_past_a_name_with_spaces_and_parentheses() {
        assert!(start_time(std::process::id()).unwrap() > 0);
        assert!(start_time(u32::MAX).is_err());
    }
}
