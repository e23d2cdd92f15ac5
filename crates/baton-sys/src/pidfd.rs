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

impl Process {
    /// The process `pid`, if it runs and started at `start_time` (so it is the one meant, not
    /// another that reuses the number). `Ok(None)`: gone, or another process.
    pub fn find(pid: u32, started: u64) -> io::Result<Option<Process>> {
        let Ok(raw_pid) = libc::pid_t::try_from(pid) else {
            return Ok(None);
        };
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
        // Checked after the pidfd exists: if the start time matches now, the pidfd holds that
        // process, whatever happens to the number later.
        match start_time(pid) {
            Ok(t) if t == started => Ok(Some(Process { pid, fd })),
            _ => Ok(None),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
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
    fn start_time_reads_past_a_name_with_spaces_and_parentheses() {
        assert!(start_time(std::process::id()).unwrap() > 0);
        assert!(start_time(u32::MAX).is_err());
    }
}
