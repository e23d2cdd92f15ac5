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

use std::cell::RefCell;
use std::ffi::{CString, OsStr};
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
    env: Vec<CString>,
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
        self.env.push(cstring(&kv, "an environment variable")?);
        Ok(self)
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
    /// given, else in the master's. Returns its pid once it has called `execve`: a failure
    /// before or in `execve` is returned with its stage, the child reaped.
    pub fn spawn(self, cgroup: Option<BorrowedFd<'_>>) -> Result<u32, SpawnError> {
        self.spawn_with(preferred_method(), cgroup)
    }

    fn spawn_with(
        mut self,
        method: Method,
        cgroup: Option<BorrowedFd<'_>>,
    ) -> Result<u32, SpawnError> {
        // Sources first go above every target, so placing one cannot overwrite another.
        let floor = self.fds.iter().map(|(_, t)| *t).max().unwrap_or(2).max(2) + 1;
        for (fd, _) in &mut self.fds {
            if fd.as_raw_fd() < floor {
                let raw = nix::fcntl::fcntl(&*fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(floor))
                    .map_err(|e| SpawnError::failed(Stage::Descriptors, e.into()))?;
                // SAFETY: F_DUPFD_CLOEXEC just returned a new descriptor nothing else owns.
                *fd = unsafe { OwnedFd::from_raw_fd(raw) };
            }
        }
        let placements: Vec<(RawFd, RawFd)> = self
            .fds
            .iter()
            .map(|(fd, target)| (fd.as_raw_fd(), *target))
            .collect();
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
            cwd: self.cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            process_group: self.process_group,
            setup: self.setup,
            reset_handlers: false,
            join_cgroup: -1,
            failure: std::ptr::null_mut(),
        };
        REGION.with(|region| {
            let mut region = region.borrow_mut();
            if region.is_none() {
                *region = Some(Region::map().map_err(|e| SpawnError::failed(Stage::Clone, e))?);
            }
            let Some(region) = region.as_ref() else {
                unreachable!("mapped just above");
            };
            clone_and_wait(plan, region, method, cgroup)
        })
        // `self` (the parent's copies of the placed descriptors, argv, envp) drops here, after
        // the child has called execve or exited.
    }
}

/// How the child is made (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Shared,
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    Copied,
    Legacy,
}

static CLONE3_MISSING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn preferred_method() -> Method {
    if CLONE3_MISSING.load(std::sync::atomic::Ordering::Relaxed) {
        return Method::Legacy;
    }
    #[cfg(target_arch = "x86_64")]
    return Method::Shared;
    #[cfg(not(target_arch = "x86_64"))]
    return Method::Copied;
}

/// What a failed `clone3` says about it: absent (ENOSYS: a kernel before 5.3, or a seccomp
/// filter such as Docker's; E2BIG: no `CLONE_INTO_CGROUP` before 5.7), so never try it again;
/// perhaps absent (EINVAL: no `CLONE_CLEAR_SIGHAND` before 5.5; EPERM: an older seccomp
/// filter), so take the legacy way this time; or a real error.
fn clone3_verdict(errno: i32) -> Clone3 {
    match errno {
        libc::ENOSYS | libc::E2BIG => Clone3::Absent,
        libc::EINVAL | libc::EPERM => Clone3::Refused,
        _ => Clone3::Failed,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clone3 {
    Absent,
    Refused,
    Failed,
}

/// The kernel's `struct clone_args` up to `cgroup` (`CLONE_ARGS_SIZE_VER2`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_CLEAR_SIGHAND: u64 = 0x1_0000_0000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// What the child reads between clone and exec. Every pointer points into buffers owned by the
/// [`Spawn`] being started (or the region), alive until the child has called execve or exited.
struct Plan {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// The `NAME=` entry with room for the digits (null: none).
    pid_slot: *mut u8,
    pid_digits: usize,
    placements: *const (RawFd, RawFd),
    placements_len: usize,
    close_from: libc::c_uint,
    cwd: *const libc::c_char,
    process_group: bool,
    setup: ChildSetup,
    reset_handlers: bool,
    /// A cgroup directory to join by writing to its `cgroup.procs` (legacy way only; -1: none).
    join_cgroup: RawFd,
    /// Where the child reports a failure (in the region, shared with the parent in every way).
    failure: *mut Failure,
}

/// A failure of the child: its stage's code (0: none) and errno.
#[repr(C)]
struct Failure {
    stage: u32,
    errno: i32,
}

// The calls with 32-bit ids (`setuid` takes 16-bit ones on 32-bit x86 and ARM).
#[cfg(any(target_arch = "x86", target_arch = "arm"))]
const SYS_SETUID: libc::c_long = libc::SYS_setuid32;
#[cfg(any(target_arch = "x86", target_arch = "arm"))]
const SYS_SETGID: libc::c_long = libc::SYS_setgid32;
#[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
const SYS_SETUID: libc::c_long = libc::SYS_setuid;
#[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
const SYS_SETGID: libc::c_long = libc::SYS_setgid;

const STACK_SIZE: usize = 64 * 1024;

/// The child's stack and failure slot: one anonymous shared mapping per thread that spawns,
/// reused (a spawn returns only once its child has left it), with a guard page below the stack.
struct Region {
    base: *mut u8,
    len: usize,
}

thread_local! {
    static REGION: RefCell<Option<Region>> = const { RefCell::new(None) };
}

impl Region {
    fn map() -> io::Result<Region> {
        let page = 4096;
        let len = page + page + STACK_SIZE; // guard, failure slot, stack
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let region = Region {
            base: base.cast(),
            len,
        };
        // SAFETY: the first page of the mapping just made, which nothing uses.
        if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error()); // `region` unmaps on drop
        }
        Ok(region)
    }

    fn failure(&self) -> *mut Failure {
        // SAFETY: the second page is inside the mapping.
        unsafe { self.base.add(4096).cast() }
    }

    fn stack(&self) -> (*mut u8, usize) {
        // SAFETY: the stack starts after the guard and failure pages, inside the mapping.
        (unsafe { self.base.add(8192) }, STACK_SIZE)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly the mapping made in `map`, used by no child now.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Blocks every signal in the calling thread while it lives (the child inherits the mask, so
/// no handler of the master can run in it before it has reset them), restoring the old mask.
struct AllSignalsBlocked(libc::sigset_t);

impl AllSignalsBlocked {
    fn new() -> io::Result<Self> {
        let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: both sets live on this frame; sigfillset initialises `all`, and
        // pthread_sigmask initialises `old` when it succeeds.
        unsafe {
            libc::sigfillset(all.as_mut_ptr());
            let rc = libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            Ok(AllSignalsBlocked(old.assume_init()))
        }
    }
}

impl Drop for AllSignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`, a valid set.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

fn clone_and_wait(
    mut plan: Plan,
    region: &Region,
    method: Method,
    cgroup: Option<BorrowedFd<'_>>,
) -> Result<u32, SpawnError> {
    let failure = region.failure();
    // SAFETY: the slot is inside the region, which no child uses now (this thread's last spawn
    // returned after its child left it).
    unsafe { failure.write_volatile(Failure { stage: 0, errno: 0 }) };
    plan.failure = failure;
    let mut made = clone_once(&mut plan, region, method, cgroup);
    if let Err(errno) = made {
        let verdict = clone3_verdict(errno);
        if method != Method::Legacy && verdict != Clone3::Failed {
            if verdict == Clone3::Absent {
                CLONE3_MISSING.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            made = clone_once(&mut plan, region, Method::Legacy, cgroup);
        }
    }
    let pid = made
        .map_err(|errno| SpawnError::failed(Stage::Clone, io::Error::from_raw_os_error(errno)))?;
    // SAFETY: the child has exec'd or exited (CLONE_VFORK), so it no longer writes the slot.
    let Failure { stage, errno } = unsafe { failure.read_volatile() };
    match Stage::from_code(stage) {
        None => Ok(pid as u32),
        Some(stage) => {
            // Reap it here (it exited with 127): no one else knows its pid yet.
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            Err(SpawnError::failed(
                stage,
                io::Error::from_raw_os_error(errno),
            ))
        }
    }
}

/// One attempt to make the child `method`'s way; returns its pid (it has exec'd or exited by
/// then) or the errno of the clone.
fn clone_once(
    plan: &mut Plan,
    region: &Region,
    method: Method,
    cgroup: Option<BorrowedFd<'_>>,
) -> Result<i32, i32> {
    let mut args = CloneArgs {
        flags: libc::CLONE_VFORK as u64 | CLONE_CLEAR_SIGHAND,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    if let Some(fd) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = fd.as_raw_fd() as u64;
    }
    // The legacy way resets handlers and joins the cgroup in the child.
    plan.reset_handlers = method == Method::Legacy;
    plan.join_cgroup = match (method, cgroup) {
        (Method::Legacy, Some(fd)) => fd.as_raw_fd(),
        _ => -1,
    };
    let plan: &Plan = plan;
    let _blocked = AllSignalsBlocked::new().map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
    let rc: libc::c_long = match method {
        #[cfg(target_arch = "x86_64")]
        Method::Shared => {
            let (stack, size) = region.stack();
            args.flags |= libc::CLONE_VM as u64;
            args.stack = stack as u64;
            args.stack_size = size as u64;
            // SAFETY: `args` describes a child that shares this memory and runs `child_main`
            // on the region's stack, which nothing else uses; CLONE_VFORK keeps this thread
            // (and so `plan` and everything it points to) still until the child has exec'd or
            // exited. See `clone3_shared`.
            let rc = unsafe { clone3_shared(&args, plan) };
            // The kernel's -errno, made the libc way.
            if rc < 0 {
                return Err(-rc as i32);
            }
            rc
        }
        #[cfg(not(target_arch = "x86_64"))]
        Method::Shared => {
            let _ = region;
            return Err(libc::ENOSYS);
        }
        Method::Copied => {
            // SAFETY: without CLONE_VM the child gets a copy of this memory, as with fork, and
            // returns here with 0; it then only runs `child_main`, which never returns.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_clone3,
                    &args as *const CloneArgs,
                    std::mem::size_of::<CloneArgs>(),
                )
            };
            if rc == 0 {
                // SAFETY: in the child; `plan` is this process's copy.
                unsafe { child_main(plan) }
            }
            rc
        }
        Method::Legacy => {
            // SAFETY: as above, with clone's fork-like form: no new stack, so every other
            // argument is 0 whatever their order on this architecture.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    (libc::CLONE_VFORK | libc::SIGCHLD) as libc::c_ulong,
                    0usize,
                    0usize,
                    0usize,
                    0usize,
                )
            };
            if rc == 0 {
                // SAFETY: in the child, as above.
                unsafe { child_main(plan) }
            }
            rc
        }
    };
    if rc < 0 {
        return Err(errno());
    }
    Ok(rc as i32)
}

/// `clone3` with `CLONE_VM`: the child starts on the stack given in `args` and calls
/// `child_main(plan)`, which never returns. Returns the child's pid, or `-errno`.
///
/// # Safety
/// `args` must set `CLONE_VM | CLONE_VFORK` and a stack that nothing else uses, and `plan`
/// must stay valid until this returns (which, with `CLONE_VFORK`, is after the child has
/// called execve or exited).
#[cfg(target_arch = "x86_64")]
unsafe fn clone3_shared(args: &CloneArgs, plan: &Plan) -> libc::c_long {
    let entry: unsafe extern "C" fn(*const Plan) -> ! = child_main;
    let rc: libc::c_long;
    // SAFETY: the caller's contract. The syscall instruction clobbers rcx and r11 only; the
    // child comes back with rax = 0 and rsp at the top of its stack (16-byte aligned: the
    // region's end is page aligned), with r12 and r13 as the parent left them, and calls the
    // entry, which never returns (ud2 would trap). The parent comes back with the pid or
    // -errno in rax and its own stack untouched (nostack holds for it).
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => rc,
            in("rdi") args as *const CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") plan as *const Plan,
            in("r13") entry,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    rc
}

/// The child, between clone and exec: it only makes system calls, then `execve`s. On a failure
/// it writes the stage and errno into the shared slot and exits with 127.
///
/// # Safety
/// Runs only in a child made by [`clone_and_wait`], with `plan` valid.
unsafe extern "C" fn child_main(plan: *const Plan) -> ! {
    // SAFETY: the caller's contract.
    let plan = unsafe { &*plan };
    // SAFETY: as above; `child_steps` returns only on a failure.
    let (stage, errno) = unsafe { child_steps(plan) };
    // SAFETY: the slot is in the region, valid and not read by the parent before this exits.
    unsafe {
        plan.failure.write_volatile(Failure {
            stage: stage.code(),
            errno,
        });
        libc::syscall(libc::SYS_exit_group, 127);
    }
    loop {
        // exit_group does not return; never fall back into the parent's frames.
        std::hint::spin_loop();
    }
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// The child's steps, in order; returns only on a failure, with its stage and errno.
///
/// # Safety
/// As [`child_main`].
unsafe fn child_steps(plan: &Plan) -> (Stage, i32) {
    macro_rules! check {
        ($stage:expr, $rc:expr) => {
            if $rc < 0 {
                return ($stage, errno());
            }
        };
    }
    // SAFETY: (the whole body) plain system calls on integers and on buffers the plan owns,
    // which stay valid (see `Plan`); no allocation, no lock, no glibc state beyond errno (the
    // parent thread's, which waits).
    unsafe {
        // Signals: the handlers are default (CLONE_CLEAR_SIGHAND, or one by one here) before
        // the mask, inherited full from the parent, is emptied. SIGPIPE, which Rust ignores,
        // is the default again, as std does for its children.
        if plan.reset_handlers {
            for sig in 1..65 {
                if sig == libc::SIGKILL || sig == libc::SIGSTOP || sig == 32 || sig == 33 {
                    continue; // cannot be caught, or glibc's own (refused by sigaction)
                }
                let mut old = std::mem::zeroed::<libc::sigaction>();
                if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                    && old.sa_sigaction != libc::SIG_DFL
                    && old.sa_sigaction != libc::SIG_IGN
                {
                    let mut default = std::mem::zeroed::<libc::sigaction>();
                    default.sa_sigaction = libc::SIG_DFL;
                    check!(
                        Stage::ResetSignals,
                        libc::sigaction(sig, &default, std::ptr::null_mut())
                    );
                }
            }
        }
        let mut default = std::mem::zeroed::<libc::sigaction>();
        default.sa_sigaction = libc::SIG_DFL;
        check!(
            Stage::ResetSignals,
            libc::sigaction(libc::SIGPIPE, &default, std::ptr::null_mut())
        );
        let mut empty = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut empty);
        check!(
            Stage::ResetSignals,
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &empty as *const libc::sigset_t,
                std::ptr::null_mut::<libc::sigset_t>(),
                8usize
            )
        );
        if plan.process_group {
            check!(Stage::ProcessGroup, libc::syscall(libc::SYS_setpgid, 0, 0));
        }
        if plan.join_cgroup >= 0 {
            let procs = libc::syscall(
                libc::SYS_openat,
                plan.join_cgroup,
                c"cgroup.procs".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            check!(Stage::JoinCgroup, procs);
            check!(
                Stage::JoinCgroup,
                libc::syscall(libc::SYS_write, procs, c"0".as_ptr(), 1usize)
            );
            libc::syscall(libc::SYS_close, procs);
        }
        for i in 0..plan.placements_len {
            let (source, target) = *plan.placements.add(i);
            // dup2 clears close-on-exec on the new number.
            check!(
                Stage::Descriptors,
                libc::syscall(libc::SYS_dup3, source, target, 0)
            );
        }
        // Every number above the targets is closed at exec (marked, not closed: whatever the
        // master inherited without close-on-exec must not reach a worker either).
        if libc::syscall(
            libc::SYS_close_range,
            plan.close_from,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            // Kernels before 5.11 lack CLOSE_RANGE_CLOEXEC: mark each number by hand.
            for fd in plan.close_from..4096 {
                libc::syscall(libc::SYS_fcntl, fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        let setup = &plan.setup;
        if let Some(mask) = setup.umask {
            libc::syscall(libc::SYS_umask, mask);
        }
        for (resource, limit) in [
            (libc::RLIMIT_NOFILE, setup.max_open_files),
            (libc::RLIMIT_CORE, setup.max_core_size),
        ] {
            if let Some(limit) = limit {
                let value = libc::rlimit64 {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                check!(
                    Stage::Limits,
                    libc::syscall(
                        libc::SYS_prlimit64,
                        0,
                        resource,
                        &value as *const libc::rlimit64,
                        std::ptr::null_mut::<libc::rlimit64>()
                    )
                );
            }
        }
        // Raw calls: glibc's setuid/setgid/setgroups would make every thread of the master
        // change its credentials too (they share its thread list with this child).
        let root = libc::syscall(libc::SYS_geteuid) == 0;
        if (setup.gid.is_some() || setup.uid.is_some()) && root {
            check!(
                Stage::Groups,
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>())
            );
        }
        if let Some(gid) = setup.gid {
            check!(Stage::Group, libc::syscall(SYS_SETGID, gid));
        }
        if let Some(uid) = setup.uid {
            check!(Stage::User, libc::syscall(SYS_SETUID, uid));
        }
        // After the user change, as the worker's user, like std.
        if !plan.cwd.is_null() {
            check!(Stage::Directory, libc::syscall(libc::SYS_chdir, plan.cwd));
        }
        // After the user change, which clears it.
        if let Some(signal) = setup.parent_death_signal {
            check!(
                Stage::ParentDeathSignal,
                libc::syscall(
                    libc::SYS_prctl,
                    libc::PR_SET_PDEATHSIG,
                    signal as libc::c_ulong,
                    0,
                    0,
                    0
                )
            );
        }
        if !plan.pid_slot.is_null() {
            let (digits, n) = crate::process::decimal(libc::syscall(libc::SYS_getpid) as u32);
            for (i, digit) in digits.iter().take(n).enumerate() {
                *plan.pid_slot.add(plan.pid_digits + i) = *digit;
            }
            *plan.pid_slot.add(plan.pid_digits + n) = 0;
        }
        libc::syscall(libc::SYS_execve, plan.program, plan.argv, plan.envp);
        (Stage::Execute, errno())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Every way this machine can take (the shared one only on x86-64).
    fn methods() -> Vec<Method> {
        let mut all = vec![Method::Copied, Method::Legacy];
        if cfg!(target_arch = "x86_64") {
            all.insert(0, Method::Shared);
        }
        all
    }

    /// Starts `spawn` `method`'s way with its stdout on a pipe; returns its pid, everything it
    /// wrote and its exit code.
    fn run(method: Method, mut spawn: Spawn, cgroup: Option<BorrowedFd<'_>>) -> (u32, String, i32) {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        spawn.fd(write, 1);
        let pid = spawn.spawn_with(method, cgroup).unwrap();
        let mut out = String::new();
        std::fs::File::from(read).read_to_string(&mut out).unwrap();
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
        let code = match status.unwrap() {
            nix::sys::wait::WaitStatus::Exited(_, code) => code,
            other => panic!("{method:?}: {other:?}"),
        };
        (pid, out, code)
    }

    fn shell(script: &str) -> Spawn {
        let mut spawn = Spawn::new(Path::new("/bin/sh")).unwrap();
        spawn.arg("-c").unwrap().arg(script).unwrap();
        spawn.env("PATH", "/usr/bin:/bin").unwrap();
        spawn
    }

    #[test]
    fn the_child_gets_its_arguments_exactly_its_environment_and_its_own_pid() {
        for method in methods() {
            let mut spawn = shell("echo $LISTEN_PID $$ $GREETING ${HOME:-no-home} \"$0\"");
            spawn.arg("zero with spaces").unwrap();
            spawn.env("GREETING", "hi").unwrap();
            spawn.env_own_pid("LISTEN_PID").unwrap();
            let (pid, out, code) = run(method, spawn, None);
            assert_eq!(code, 0, "{method:?}");
            assert_eq!(
                out.trim(),
                format!("{pid} {pid} hi no-home zero with spaces"),
                "{method:?}"
            );
        }
    }

    #[test]
    fn placed_descriptors_are_inherited_at_their_numbers_and_nothing_else_leaks() {
        for method in methods() {
            let (a, _b) = crate::channel::pair().unwrap();
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let mut spawn = shell("ls /proc/self/fd; readlink /proc/self/fd/4");
            // Targets 4 and 3 in swapped order: placing one cannot clobber a source.
            spawn.fd(OwnedFd::from(listener), 4).fd(a, 3);
            let (_, out, code) = run(method, spawn, None);
            assert_eq!(code, 0, "{method:?}");
            let lines: Vec<&str> = out.lines().collect();
            let (link, numbers) = lines.split_last().unwrap();
            let mut fds: Vec<i32> = numbers.iter().map(|s| s.parse().unwrap()).collect();
            fds.sort();
            // 0-2, the two placed, and the one `ls` opens to read the directory.
            assert_eq!(&fds[..5], &[0, 1, 2, 3, 4], "{method:?}: {out}");
            assert_eq!(fds.len(), 6, "{method:?}: inherited {fds:?}");
            assert!(link.starts_with("socket:"), "{method:?}: fd 4 is {link}");
        }
    }

    #[test]
    fn the_child_starts_with_no_signal_blocked_and_sigpipe_default() {
        let ignored = |status: &str| {
            let line = status.lines().find(|l| l.starts_with("SigIgn:")).unwrap();
            u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
        };
        let parent = ignored(&std::fs::read_to_string("/proc/self/status").unwrap());
        let sigpipe = 1u64 << (libc::SIGPIPE - 1);
        assert_ne!(parent & sigpipe, 0, "Rust ignores SIGPIPE in this process");
        std::thread::spawn(move || {
            // This thread blocks some signals, as the master's threads do.
            crate::upgrade::block_signals(&[Signal::SIGTERM, Signal::SIGUSR2]).unwrap();
            for method in methods() {
                // cat itself, not a shell (which may reset the mask).
                let mut cat = Spawn::new(Path::new("/bin/cat")).unwrap();
                cat.arg("/proc/self/status").unwrap();
                let (_, out, code) = run(method, cat, None);
                assert_eq!(code, 0, "{method:?}");
                let blocked = out.lines().find(|l| l.starts_with("SigBlk:")).unwrap();
                assert_eq!(blocked, "SigBlk:\t0000000000000000", "{method:?}");
                // Whatever this process inherited ignored stays so (a shell's `&` ignores
                // SIGINT), except SIGPIPE.
                assert_eq!(ignored(&out), parent & !sigpipe, "{method:?}");
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_failure_names_its_stage_and_leaves_no_child() {
        for method in methods() {
            let spawn = Spawn::new(Path::new("/nonexistent/program")).unwrap();
            match spawn.spawn_with(method, None) {
                Err(SpawnError::Failed { stage, source }) => {
                    assert_eq!(stage, Stage::Execute, "{method:?}");
                    assert_eq!(source.raw_os_error(), Some(libc::ENOENT), "{method:?}");
                }
                other => panic!("{method:?}: {other:?}"),
            }
            let mut spawn = shell("true");
            spawn.cwd(Path::new("/nonexistent/dir")).unwrap();
            let err = spawn.spawn_with(method, None).unwrap_err();
            assert_eq!(
                err.to_string(),
                "changing to its directory: No such file or directory (os error 2)",
                "{method:?}"
            );
        }
        assert!(matches!(
            Spawn::new(Path::new("/bin/sh")).unwrap().arg("a\0b"),
            Err(SpawnError::Nul("an argument"))
        ));
    }

    #[test]
    fn directory_process_group_and_limits_are_set() {
        for method in methods() {
            let mut spawn = shell("pwd; ps -o pgid= -p $$; ulimit -n; ulimit -c; umask");
            spawn
                .cwd(Path::new("/tmp"))
                .unwrap()
                .new_process_group()
                .setup(ChildSetup {
                    umask: Some(0o027),
                    max_open_files: Some(777),
                    max_core_size: Some(0),
                    ..ChildSetup::default()
                });
            let (pid, out, code) = run(method, spawn, None);
            assert_eq!(code, 0, "{method:?}: {out}");
            let words: Vec<&str> = out.split_whitespace().collect();
            assert_eq!(
                words,
                ["/tmp", &pid.to_string(), "777", "0", "0027"],
                "{method:?}"
            );
        }
    }

    #[test]
    fn a_user_change_touches_the_child_alone() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "a user change needs root, as the test suite runs"
        );
        for method in methods() {
            let mut spawn = shell("id -u; id -g; id -G");
            spawn.setup(ChildSetup {
                uid: Some(65534),
                gid: Some(65534),
                ..ChildSetup::default()
            });
            let (_, out, code) = run(method, spawn, None);
            assert_eq!(code, 0, "{method:?}");
            assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["65534"; 3]);
            // glibc's setuid would have changed every thread of this process too.
            for task in std::fs::read_dir("/proc/self/task").unwrap() {
                let status = std::fs::read_to_string(task.unwrap().path().join("status"));
                let Ok(status) = status else { continue }; // a thread that just ended
                let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
                assert_eq!(
                    uid.split_whitespace().nth(2),
                    Some("0"),
                    "{method:?}: {uid}"
                );
            }
        }
    }

    #[test]
    fn the_child_is_made_in_the_given_cgroup() {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mount = mountinfo.lines().find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            (fs.starts_with("cgroup2 ")).then(|| mount.split_whitespace().nth(4).unwrap())
        });
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let own = own.lines().find_map(|l| l.strip_prefix("0::"));
        // The test suite runs as root where cgroup2 is mounted (alone or as `unified`).
        let (Some(mount), Some(own)) = (mount, own) else {
            panic!("no cgroup2 mount or no cgroup v2 entry for this process");
        };
        for method in methods() {
            let name = format!("baton-sys-spawn-{}-{method:?}", std::process::id());
            let dir = Path::new(mount)
                .join(own.trim_start_matches('/'))
                .join(&name);
            std::fs::create_dir(&dir).unwrap();
            let group = std::fs::File::open(&dir).unwrap();
            let (_, out, code) = run(
                method,
                shell("cat /proc/self/cgroup"),
                Some(std::os::fd::AsFd::as_fd(&group)),
            );
            std::fs::remove_dir(&dir).unwrap();
            assert_eq!(code, 0, "{method:?}");
            let line = out.lines().find(|l| l.starts_with("0::")).unwrap();
            assert!(line.ends_with(&format!("/{name}")), "{method:?}: {line}");
        }
    }

    #[test]
    fn threads_spawning_at_once_each_get_their_own_children() {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let method = methods()[i % methods().len()];
                        let (_, out, code) = run(method, shell(&format!("echo {t}.{i}")), None);
                        assert_eq!((out.trim(), code), (format!("{t}.{i}").as_str(), 0));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
    }
}
