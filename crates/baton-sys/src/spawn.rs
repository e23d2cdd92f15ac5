//! Starting a worker process without copying the master.
//!
//! `fork()` copies the master's page tables, and the master then takes a copy-on-write fault on
//! every heap page it touches next; the child throws all of it away at `execve`. With a reload of
//! 128 workers that was most of the master's part of the reload. [`Spawn`] instead starts the
//! child with `clone3(CLONE_VM | CLONE_VFORK)`, the way `posix_spawn` does: the child runs on a
//! small stack of its own inside the master's memory, the calling thread waits until the child
//! has called `execve` (or died trying), and nothing is copied. `CLONE_INTO_CGROUP` makes the
//! child in its cgroup (the master never moves), `CLONE_CLEAR_SIGHAND` resets the master's signal
//! handlers in it.
//!
//! Everything the child needs (argv, envp, the descriptor plan, a buffer for its own pid) is
//! prepared here in the parent. Between clone and exec the child only makes system calls
//! (never through a glibc function that keeps process-wide state: its `setuid` would signal the
//! master's threads): it allocates nothing, takes no lock, and writes only into the buffer for
//! its pid and the shared slot where it reports a failure.
//!
//! Three ways, chosen in this order:
//! - *shared* (x86-64): `clone3` with `CLONE_VM`, through a few lines of assembly, since the
//!   child must start on its own stack;
//! - *copied* (other architectures): `clone3` without `CLONE_VM`: page tables are copied as by
//!   `fork`, but the child is still made in its cgroup;
//! - *legacy* (no `clone3`: a kernel before 5.7 or a seccomp filter that refuses it): `clone`
//!   with `CLONE_VFORK` alone; the child resets signal handlers one by one and joins its cgroup
//!   by writing to `cgroup.procs`.

use std::borrow::Cow;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::sys::signal::Signal;

/// What a worker process is set up with between clone and exec, besides its descriptors.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChildSetup {
    /// The user and group it runs as (supplementary groups cleared when the master is root),
    /// set after the limits, which may need the master's privileges.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// File mode creation mask.
    pub umask: Option<u32>,
    /// Signal the worker gets if the master dies (`PR_SET_PDEATHSIG`).
    pub parent_death_signal: Option<Signal>,
    /// Limit on open descriptors (`RLIMIT_NOFILE`, soft and hard).
    pub max_open_files: Option<u64>,
    /// Limit on the core dump size (`RLIMIT_CORE`, soft and hard).
    pub max_core_size: Option<u64>,
}

/// The step of starting a process that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Clone,
    ResetSignals,
    ProcessGroup,
    JoinCgroup,
    Descriptors,
    Limits,
    Groups,
    Group,
    User,
    Directory,
    ParentDeathSignal,
    Execute,
}

impl Stage {
    const ALL: [Stage; 12] = [
        Stage::Clone,
        Stage::ResetSignals,
        Stage::ProcessGroup,
        Stage::JoinCgroup,
        Stage::Descriptors,
        Stage::Limits,
        Stage::Groups,
        Stage::Group,
        Stage::User,
        Stage::Directory,
        Stage::ParentDeathSignal,
        Stage::Execute,
    ];

    /// The number the child writes in the shared slot (0: no failure).
    fn code(self) -> u32 {
        Stage::ALL.iter().position(|&s| s == self).unwrap_or(0) as u32 + 1
    }

    fn from_code(code: u32) -> Option<Stage> {
        Stage::ALL.get((code as usize).checked_sub(1)?).copied()
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Clone => "creating the process",
            Stage::ResetSignals => "resetting signal handlers",
            Stage::ProcessGroup => "making its process group",
            Stage::JoinCgroup => "joining its cgroup",
            Stage::Descriptors => "placing its descriptors",
            Stage::Limits => "setting its limits",
            Stage::Groups => "clearing supplementary groups",
            Stage::Group => "setting its group",
            Stage::User => "setting its user",
            Stage::Directory => "changing to its directory",
            Stage::ParentDeathSignal => "setting its parent-death signal",
            Stage::Execute => "executing the program",
        })
    }
}

/// A process started.
#[derive(Debug)]
pub struct Started {
    pub pid: u32,
    /// When it started, in clock ticks since boot (as [`crate::pidfd::start_time`] reads it
    /// from `/proc`), known without reading `/proc` when the boot-time clock stayed within one
    /// tick across its clone (nearly always: a tick is 10 ms).
    pub start_time: Option<u64>,
    /// A pidfd made with the process (`CLONE_PIDFD`): the only way the master signals it.
    pub pidfd: OwnedFd,
}

impl Started {
    /// The process as a [`crate::pidfd::Process`], for signals that cannot reach another.
    pub fn into_process(self) -> crate::pidfd::Process {
        crate::pidfd::Process::from_pidfd(self.pid, self.pidfd)
    }
}

/// Why a process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("NUL byte in {0}")]
    Nul(&'static str),
    #[error("{stage}: {source}")]
    Failed { stage: Stage, source: io::Error },
}

impl SpawnError {
    fn failed(stage: Stage, source: io::Error) -> Self {
        SpawnError::Failed { stage, source }
    }
}

/// A process to start: program, arguments, exactly this environment, descriptors at fixed
/// numbers (every other descriptor of the master is closed at exec), and its setup.
#[derive(Debug)]
pub struct Spawn {
    program: CString,
    argv: Vec<CString>,
    env: Vec<Cow<'static, CStr>>,
    /// `NAME=` and room for 10 digits and a NUL, filled by the child with its own pid.
    own_pid: Option<(Vec<u8>, usize)>,
    fds: Vec<(OwnedFd, RawFd)>,
    cwd: Option<CString>,
    process_group: bool,
    setup: ChildSetup,
}

fn cstring(bytes: &[u8], what: &'static str) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| SpawnError::Nul(what))
}

impl Spawn {
    /// `program` is executed as given (no `PATH` search); it is also `argv[0]`.
    pub fn new(program: &Path) -> Result<Self, SpawnError> {
        let program = cstring(program.as_os_str().as_bytes(), "the program")?;
        Ok(Spawn {
            argv: vec![program.clone()],
            program,
            env: Vec::new(),
            own_pid: None,
            fds: Vec::new(),
            cwd: None,
            process_group: false,
            setup: ChildSetup::default(),
        })
    }

    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> Result<&mut Self, SpawnError> {
        self.argv
            .push(cstring(arg.as_ref().as_bytes(), "an argument")?);
        Ok(self)
    }

    /// Adds `key=value` to the environment, which starts empty.
    pub fn env(
        &mut self,
        key: impl AsRef<OsStr>,
        value: impl AsRef<OsStr>,
    ) -> Result<&mut Self, SpawnError> {
        let mut kv = key.as_ref().as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(value.as_ref().as_bytes());
        self.env
            .push(Cow::Owned(cstring(&kv, "an environment variable")?));
        Ok(self)
    }

    /// Adds a `key=value` entry that lives as long as the process (the master's own
    /// environment, read once): shared, not copied.
    pub fn env_entry(&mut self, entry: &'static CStr) -> &mut Self {
        self.env.push(Cow::Borrowed(entry));
        self
    }

    /// Sets `name=<the child's own pid>` (systemd's `LISTEN_PID`, only known after clone).
    pub fn env_own_pid(&mut self, name: &str) -> Result<&mut Self, SpawnError> {
        if name.as_bytes().contains(&0) {
            return Err(SpawnError::Nul("an environment variable"));
        }
        let mut entry = format!("{name}=").into_bytes();
        let prefix = entry.len();
        entry.resize(prefix + 11, 0);
        self.own_pid = Some((entry, prefix));
        Ok(self)
    }

    /// The child finds `fd` at number `target`, inherited. The parent's copy is closed once
    /// the child runs.
    pub fn fd(&mut self, fd: OwnedFd, target: RawFd) -> &mut Self {
        self.fds.push((fd, target));
        self
    }

    pub fn cwd(&mut self, dir: &Path) -> Result<&mut Self, SpawnError> {
        self.cwd = Some(cstring(dir.as_os_str().as_bytes(), "the directory")?);
        Ok(self)
    }

    /// The child leads a new process group (its pid is the group's id).
    pub fn new_process_group(&mut self) -> &mut Self {
        self.process_group = true;
        self
    }

    pub fn setup(&mut self, setup: ChildSetup) -> &mut Self {
        self.setup = setup;
        self
    }

    /// Starts the process, in the cgroup `cgroup` (a directory of the cgroup v2 hierarchy) if
    /// given, else in the master's. Returns once it has called `execve`: a failure before or
    /// in `execve` is returned with its stage, the child reaped.
    pub fn spawn(self, cgroup: Option<BorrowedFd<'_>>) -> Result<Started, SpawnError> {
        self.spawn_with(preferred_method(), cgroup)
    }

    fn spawn_with(
        self,
        method: Method,
        cgroup: Option<BorrowedFd<'_>>,
    ) -> Result<Started, SpawnError> {
        // The slots, if this thread may use them now (another thread takes the ordinary way).
        let mut shared = SLOTS.try_lock().ok();
        let slots = match shared.as_deref_mut() {
            Some(reserved) if method != Method::Legacy => {
                reserved.get_or_insert_with(Slots::reserve).as_mut()
            }
            _ => None,
        };
        self.spawn_placed(method, cgroup, slots)
    }

    /// Places the sources above every target, so placing one cannot overwrite another: in
    /// `slots` if given and they fit, else anywhere above; then makes the child.
    fn spawn_placed(
        mut self,
        method: Method,
        cgroup: Option<BorrowedFd<'_>>,
        slots: Option<&mut Slots>,
    ) -> Result<Started, SpawnError> {
        let floor = self.fds.iter().map(|(_, t)| *t).max().unwrap_or(2).max(2) + 1;
        let slotted = slots.filter(|s| s.fit(self.fds.len(), floor));
        if let Some(slots) = slotted {
            let lent = slots
                .lend(&self.fds)
                .map_err(|e| SpawnError::failed(Stage::Descriptors, e))?;
            let placements: Vec<(RawFd, RawFd)> = (lent.numbers.iter().copied())
                .zip(self.fds.iter().map(|(_, target)| *target))
                .collect();
            let result = self.clone_with(method, cgroup, &placements, floor, lent.bound);
            slots.take_back(lent);
            return result;
        }
        let mut placements: Vec<(RawFd, RawFd)> = Vec::with_capacity(self.fds.len());
        for (fd, target) in &mut self.fds {
            if fd.as_raw_fd() < floor {
                let raw = nix::fcntl::fcntl(&*fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(floor))
                    .map_err(|e| SpawnError::failed(Stage::Descriptors, e.into()))?;
                // SAFETY: F_DUPFD_CLOEXEC just returned a new descriptor nothing else owns.
                *fd = unsafe { OwnedFd::from_raw_fd(raw) };
            }
            placements.push((fd.as_raw_fd(), *target));
        }
        self.clone_with(method, cgroup, &placements, floor, 0)
    }

    /// Prepares argv and envp, then makes the child with the descriptors `placements` (source,
    /// target) and waits for its exec.
    fn clone_with(
        &mut self,
        method: Method,
        cgroup: Option<BorrowedFd<'_>>,
        placements: &[(RawFd, RawFd)],
        floor: RawFd,
        unshare_below: RawFd,
    ) -> Result<Started, SpawnError> {
        let argv: Vec<*const libc::c_char> = self
            .argv
            .iter()
            .map(|a| a.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        let (pid_slot, pid_digits) = match &mut self.own_pid {
            Some((entry, prefix)) => (entry.as_mut_ptr(), *prefix),
            None => (std::ptr::null_mut(), 0),
        };
        let envp: Vec<*const libc::c_char> = self
            .env
            .iter()
            .map(|e| e.as_ptr())
            .chain((!pid_slot.is_null()).then_some(pid_slot.cast_const().cast()))
            .chain([std::ptr::null()])
            .collect();
        let plan = Plan {
            program: self.program.as_ptr(),
            argv: argv.as_ptr(),
            envp: envp.as_ptr(),
            pid_slot,
            pid_digits,
            placements: placements.as_ptr(),
            placements_len: placements.len(),
            close_from: floor as libc::c_uint,
            slots_below: unshare_below as libc::c_uint,
            unshare_below: 0,
            cwd: self.cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            process_group: self.process_group,
            setup: self.setup,
            reset_handlers: false,
            join_cgroup: -1,
            failure: std::ptr::null_mut(),
        };
        clone::start(plan, method, cgroup)
        // `self` (the parent's copies of the placed descriptors, argv, envp) drops after this
        // returns, once the child has called execve or exited.
    }
}

mod child;
mod clone;
mod slots;

use child::Plan;
use clone::{Method, preferred_method};
use slots::{SLOTS, Slots};
#[cfg(test)]
mod tests;
