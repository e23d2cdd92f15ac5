//! Process syscalls of the master: descriptor placement in a child, signals, reaping.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::signal::{self, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

pub use nix::sys::signal::Signal as SignalNumber;

/// Arranges for `cmd`'s child to find each `(fd, target)` descriptor at number `target`, inherited
/// (not close-on-exec). Every other descriptor of the master stays close-on-exec.
///
/// Sources are first duplicated above the highest target (close-on-exec), so placing one cannot
/// overwrite another; between `fork` and `exec` the child only calls `dup2`, which is
/// async-signal-safe and clears `FD_CLOEXEC` on the new number, and then marks every number above the
/// targets close-on-exec. That last step matters: the master may itself have inherited descriptors without
/// close-on-exec from whoever started it (a shell, cargo's jobserver, a service manager), and those
/// must not reach a worker either.
pub fn place_fds(cmd: &mut Command, placements: Vec<(OwnedFd, RawFd)>) -> io::Result<()> {
    let floor = placements.iter().map(|(_, t)| *t).max().unwrap_or(2) + 1;
    let mut moved: Vec<(OwnedFd, RawFd)> = Vec::with_capacity(placements.len());
    for (fd, target) in placements {
        let raw = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(floor))?;
        // SAFETY: F_DUPFD_CLOEXEC just returned a new descriptor that nothing else owns.
        let high = unsafe { OwnedFd::from_raw_fd(raw) };
        moved.push((high, target));
        // `fd` (the original) is dropped here: only the parent's own copies remain open.
    }
    let plan: Vec<(RawFd, RawFd)> = moved.iter().map(|(fd, t)| (fd.as_raw_fd(), *t)).collect();
    let first_closed = floor as libc::c_uint;
    // SAFETY: the hook runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed: it calls dup2, close_range and fcntl (plain system calls) alone,
    // allocates nothing, and takes no lock. `plan` is read-only; its source numbers stay open in
    // the child because `moved` is owned by the closure (dropped in the parent with the Command,
    // after spawn). Marking numbers at or above `floor` close-on-exec cannot touch a target.
    unsafe {
        cmd.pre_exec(move || {
            let _keep_open = &moved;
            for &(src, target) in &plan {
                if libc::dup2(src, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            close_from(first_closed);
            Ok(())
        });
    }
    Ok(())
}

/// Closes every descriptor numbered `first` or above, except those close-on-exec ones the exec
/// itself will close: `CLOSE_RANGE_CLOEXEC` marks them instead of closing, which keeps std's
/// exec-error pipe working so a failed `exec` is still reported with its errno.
///
/// # Safety
/// Called only between fork and exec, in a single-threaded child.
unsafe fn close_from(first: libc::c_uint) {
    // SAFETY: close_range takes plain integers and touches no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc != 0 {
        // Kernels before 5.11 lack CLOSE_RANGE_CLOEXEC: mark each number by hand.
        for fd in first..4096 {
            // SAFETY: F_SETFD on a number that may not be open fails harmlessly with EBADF.
            unsafe { libc::fcntl(fd as RawFd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    Exited(i32),
    Signaled(Signal),
    /// It ended, seen through its pidfd, and another process (its own parent) reaped it, so
    /// how is that parent's to know.
    Unseen,
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitKind::Exited(code) => write!(f, "exited with status {code}"),
            ExitKind::Signaled(sig) => write!(f, "was killed by {}", sig.as_str()),
            ExitKind::Unseen => write!(f, "ended (reaped by its own parent)"),
        }
    }
}

/// Reaps one exited child of this process without blocking. `Ok(None)`: none is waiting.
pub fn reap_one() -> io::Result<Option<(u32, ExitKind)>> {
    loop {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => {
                return Ok(Some((pid.as_raw() as u32, ExitKind::Exited(code))));
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                return Ok(Some((pid.as_raw() as u32, ExitKind::Signaled(sig))));
            }
            Ok(WaitStatus::StillAlive) => return Ok(None),
            // Stopped/continued children are not exits; look for the next one.
            Ok(_) => continue,
            Err(nix::errno::Errno::ECHILD) => return Ok(None),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => return Err(err.into()),
        }
    }
}

/// The next exited child of this process, left a zombie (`WNOWAIT`): while it is one its pid,
/// and the process group it leads, cannot name another process, so the group can still be
/// signalled safely. [`reap`] it next. `Ok(None)`: none has exited.
pub fn peek_exit() -> io::Result<Option<(u32, ExitKind)>> {
    loop {
        // SAFETY: an all-zero siginfo_t is valid (a plain C struct); waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes `info`, which lives on this frame.
        let rc = unsafe {
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ECHILD) => Ok(None),
                Some(libc::EINTR) => continue,
                _ => Err(err),
            };
        }
        // SAFETY: waitid succeeded: si_pid is 0 when no child has exited (WNOHANG), else the
        // kernel filled the child fields of the union.
        let (pid, code, status) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
        if pid <= 0 {
            return Ok(None);
        }
        let how = match code {
            libc::CLD_EXITED => ExitKind::Exited(status),
            _ => Signal::try_from(status)
                .map(ExitKind::Signaled)
                .unwrap_or(ExitKind::Exited(status)),
        };
        return Ok(Some((pid as u32, how)));
    }
}

/// Reaps the exited child `pid` ([`peek_exit`] found it).
pub fn reap(pid: u32) -> io::Result<()> {
    loop {
        match waitpid(to_pid(pid)?, Some(WaitPidFlag::WNOHANG)) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => return Err(err.into()),
            Ok(_) => return Ok(()),
        }
    }
}

/// Sends `sig` to one process.
pub fn signal_process(pid: u32, sig: Signal) -> io::Result<()> {
    Ok(signal::kill(to_pid(pid)?, sig)?)
}

/// Sends `sig` to a process group (a worker and everything it started).
pub fn signal_group(pgid: u32, sig: Signal) -> io::Result<()> {
    Ok(signal::killpg(to_pid(pgid)?, sig)?)
}

fn to_pid(pid: u32) -> io::Result<Pid> {
    // 0 and negative numbers address groups or every process: never what a caller means.
    match i32::try_from(pid) {
        Ok(p) if p > 0 => Ok(Pid::from_raw(p)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid pid {pid}"),
        )),
    }
}

/// Parses a signal name such as `SIGTERM` or `TERM`.
pub fn parse_signal(name: &str) -> Option<Signal> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse().ok()
}

/// Makes `cmd`'s child `execve` `program` itself, from the `pre_exec` hook, with exactly `env`
/// plus `pid_var=<the child's own pid>`.
///
/// systemd's socket-activation convention wants `LISTEN_PID` to be the pid of the process that
/// receives the descriptors, which is only known after `fork`; `Command` builds the environment
/// before. So argv and envp are prepared here in the parent, with room for the digits, and the
/// child only writes `getpid()` into that room and calls `execve`: no allocation, no lock.
///
/// Register this after [`place_fds`]: hooks run in order, and this one does not return on
/// success. `Command`'s own program, arguments and environment are then not used.
pub fn exec_with_own_pid(
    cmd: &mut Command,
    program: &std::path::Path,
    args: &[std::ffi::OsString],
    env: &[(std::ffi::OsString, std::ffi::OsString)],
    pid_var: &str,
) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let cstring = |bytes: &[u8]| {
        CString::new(bytes).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "NUL byte in an argument or variable",
            )
        })
    };
    let program = cstring(program.as_os_str().as_bytes())?;
    let mut argv = vec![program.clone()];
    for arg in args {
        argv.push(cstring(arg.as_bytes())?);
    }
    let mut envs = Vec::with_capacity(env.len());
    for (k, v) in env {
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        envs.push(cstring(&kv)?);
    }
    let mut pid_entry = format!("{pid_var}=").into_bytes();
    let prefix = pid_entry.len();
    pid_entry.resize(prefix + 11, 0); // up to 10 digits and the terminating NUL
    let mut state = ExecState {
        program,
        argv,
        envs,
        pid_entry,
        prefix,
        argv_ptrs: Vec::new(),
        env_ptrs: Vec::new(),
    };
    state.argv_ptrs = state
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    state.env_ptrs = state
        .envs
        .iter()
        .map(|e| e.as_ptr())
        .chain([state.pid_entry.as_ptr().cast(), std::ptr::null()])
        .collect();
    // SAFETY: the hook runs in the child between fork and exec: it only writes into a buffer it
    // owns (allocated in the parent, so no allocation here), calls getpid and execve (both
    // async-signal-safe), and returns an error only if execve failed.
    unsafe {
        cmd.pre_exec(move || state.exec());
    }
    Ok(())
}

/// argv and envp for [`exec_with_own_pid`]. The pointer arrays point into the heap buffers of
/// the other fields, which never move or change length after construction.
struct ExecState {
    program: std::ffi::CString,
    argv: Vec<std::ffi::CString>,
    envs: Vec<std::ffi::CString>,
    pid_entry: Vec<u8>,
    prefix: usize,
    argv_ptrs: Vec<*const libc::c_char>,
    env_ptrs: Vec<*const libc::c_char>,
}

// SAFETY: the raw pointers only point into buffers owned by the same value, and are only read by
// `exec`, which runs in the single-threaded child after fork. `Command` merely needs to hold the
// hook; no other thread ever dereferences them.
unsafe impl Send for ExecState {}
// SAFETY: as above: shared references never read through the pointers.
unsafe impl Sync for ExecState {}

impl ExecState {
    fn exec(&mut self) -> io::Result<()> {
        let _ = (&self.argv, &self.envs);
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() } as u32;
        let (digits, n) = decimal(pid);
        self.pid_entry[self.prefix..self.prefix + n].copy_from_slice(&digits[..n]);
        self.pid_entry[self.prefix + n] = 0;
        // SAFETY: every pointer of both arrays points into a NUL-terminated buffer owned by
        // `self` (the pid entry was just terminated above), and both arrays end with a null
        // pointer, as execve requires. execve only returns on failure.
        unsafe {
            libc::execve(
                self.program.as_ptr(),
                self.argv_ptrs.as_ptr(),
                self.env_ptrs.as_ptr(),
            )
        };
        Err(io::Error::last_os_error())
    }
}

/// The decimal digits of `n` (most significant first) and how many there are: allocates
/// nothing, for a child between clone and exec.
pub(crate) fn decimal(mut n: u32) -> ([u8; 10], usize) {
    let mut reversed = [0u8; 10];
    let mut len = 0;
    while len < reversed.len() {
        reversed[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut digits = [0u8; 10];
    for i in 0..len {
        digits[i] = reversed[len - 1 - i];
    }
    (digits, len)
}

/// Makes this process the reaper of its descendants' orphans (`PR_SET_CHILD_SUBREAPER`), so a
/// worker's grandchildren (a server that forks, `MAINPID=`) are reparented to it, not to init.
pub fn become_subreaper() -> io::Result<()> {
    Ok(nix::sys::prctl::set_child_subreaper(true)?)
}

/// The parent of `pid` (field 4 of `/proc/PID/stat`); 0 for a process whose parent is outside
/// this PID namespace.
pub fn parent_of(pid: u32) -> io::Result<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses: fields after it start after
    // the last `)`; field 3 is the state, field 4 the parent.
    stat.rfind(')')
        .and_then(|at| stat[at + 1..].split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no parent in /proc stat"))
}

/// The cgroup (v2) of `pid`, as `/proc/PID/cgroup` names it (`/baton/...`).
pub fn cgroup_of(pid: u32) -> io::Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no cgroup2 line"))
}

/// The process group of `pid`.
pub fn process_group(pid: u32) -> io::Result<u32> {
    Ok(nix::unistd::getpgid(Some(to_pid(pid)?))?.as_raw() as u32)
}

/// Raises this process's soft limit on open descriptors to its hard limit: a master holds one
/// descriptor per listener and duplicates them for each handoff, and workers inherit the limit.
/// Returns the new soft limit.
pub fn raise_fd_limit() -> io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

/// The highest `RLIMIT_NOFILE` this process can give a child: its hard limit, or the kernel's
/// ceiling (`fs.nr_open`) when it holds `CAP_SYS_RESOURCE` and may raise hard limits.
pub fn nofile_ceiling() -> io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    const CAP_SYS_RESOURCE: u32 = 24;
    let status = std::fs::read_to_string("/proc/self/status")?;
    let may_raise = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0);
    if !may_raise {
        return Ok(hard);
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")?;
    Ok(nr_open.trim().parse().unwrap_or(hard).max(hard))
}

/// The child starts with no signal blocked, whatever the spawning thread blocks (the master
/// blocks its handled signals in every thread but its signal thread, and a blocked mask survives
/// `execve`: a worker would never see its drain signal or `PDEATHSIG`).
pub fn unblock_signals_in_child(cmd: &mut Command) {
    // SAFETY: the hook runs in the child between fork and exec; sigemptyset and sigprocmask are
    // async-signal-safe, `set` lives on this stack frame, nothing is allocated or locked.
    unsafe {
        cmd.pre_exec(|| {
            let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(set.as_mut_ptr());
            if libc::sigprocmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_child_starts_with_no_signal_blocked_whatever_its_parent_thread_blocks() {
        let child = std::thread::spawn(|| {
            crate::upgrade::block_signals(&[SignalNumber::SIGTERM, SignalNumber::SIGUSR2]).unwrap();
            // A systemd-style worker is exec'd from a pre-exec hook (for LISTEN_PID), before std
            // resets the mask: without the reset, the blocked signals leak into it.
            let blocked = |reset: bool| {
                let mut cmd = Command::new("sh");
                if reset {
                    unblock_signals_in_child(&mut cmd);
                }
                cmd.stdout(std::process::Stdio::piped());
                let args = ["SigBlk".into(), "/proc/self/status".into()];
                exec_with_own_pid(&mut cmd, std::path::Path::new("/bin/grep"), &args, &[], "X")
                    .unwrap();
                let out = cmd.output().unwrap();
                String::from_utf8_lossy(&out.stdout).trim().to_string()
            };
            (blocked(false), blocked(true))
        });
        let (plain, cleaned) = child.join().unwrap();
        assert_ne!(
            plain, "SigBlk:\t0000000000000000",
            "without the reset the mask leaks"
        );
        assert_eq!(cleaned, "SigBlk:\t0000000000000000");
    }

    #[test]
    fn placed_fds_are_inherited_at_their_numbers_and_nothing_else_leaks() {
        let (a, _b) = crate::channel::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dup = listener.as_fd().try_clone_to_owned().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "ls /proc/self/fd"]);
        cmd.stdout(std::process::Stdio::piped());
        // Targets 3 and 4 in swapped order to prove placement cannot clobber a source.
        place_fds(&mut cmd, vec![(dup, 4), (a, 3)]).unwrap();
        let out = cmd.output().unwrap();
        let mut fds: Vec<i32> = String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .map(|s| s.parse().unwrap())
            .collect();
        fds.sort();
        // 0-2, the two placed fds, and the fd `ls` opens to read the directory.
        assert_eq!(&fds[..5], &[0, 1, 2, 3, 4]);
        assert_eq!(fds.len(), 6, "unexpected inherited fds: {fds:?}");
    }

    #[test]
    fn signal_names_parse_with_or_without_prefix() {
        assert_eq!(parse_signal("SIGTERM"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("quit"), Some(Signal::SIGQUIT));
        assert_eq!(parse_signal("SIGNOPE"), None);
    }

    #[test]
    fn pid_zero_is_refused() {
        assert!(signal_process(0, Signal::SIGTERM).is_err());
    }

    #[test]
    fn the_child_sees_its_own_pid_and_exactly_the_given_environment() {
        let mut cmd = Command::new("/bin/sh");
        cmd.stdout(std::process::Stdio::piped());
        let args = [
            "-c".into(),
            "echo $LISTEN_PID $$ $GREETING ${HOME:-no-home}".into(),
        ];
        let env = [
            ("GREETING".into(), "hi".into()),
            ("PATH".into(), "/usr/bin:/bin".into()),
        ];
        exec_with_own_pid(
            &mut cmd,
            std::path::Path::new("/bin/sh"),
            &args,
            &env,
            "LISTEN_PID",
        )
        .unwrap();
        let out = String::from_utf8(cmd.output().unwrap().stdout).unwrap();
        let words: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(words.len(), 4, "{out:?}");
        assert_eq!(
            words[0], words[1],
            "LISTEN_PID must be the process's own pid: {out:?}"
        );
        assert_eq!(
            &words[2..],
            ["hi", "no-home"],
            "only the given environment: {out:?}"
        );
    }

    #[test]
    fn an_exec_failure_is_reported_as_a_spawn_error() {
        let mut cmd = Command::new("/nonexistent");
        exec_with_own_pid(
            &mut cmd,
            std::path::Path::new("/nonexistent"),
            &[],
            &[],
            "LISTEN_PID",
        )
        .unwrap();
        assert_eq!(
            cmd.spawn().unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
    }
}
