//! Making the child: the way (`clone3` sharing memory, fork-like `clone3`, legacy `clone`), its
//! stack and failure slot, the signal mask around it, and the wait for its `exec`.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::child::{Failure, Plan, child_main, errno};
use super::{SpawnError, Stage, Started};

/// How the child is made (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Method {
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Shared,
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    Copied,
    Legacy,
}

static CLONE3_MISSING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub(super) fn preferred_method() -> Method {
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
const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

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
) -> Result<Started, SpawnError> {
    let failure = region.failure();
    // SAFETY: the slot is inside the region, which no child uses now (this thread's last spawn
    // returned after its child left it).
    unsafe { failure.write_volatile(Failure { stage: 0, errno: 0 }) };
    plan.failure = failure;
    let before = boot_ticks();
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
    let (pid, pidfd) = made
        .map_err(|errno| SpawnError::failed(Stage::Clone, io::Error::from_raw_os_error(errno)))?;
    // SAFETY: the child has exec'd or exited (CLONE_VFORK), so it no longer writes the slot.
    let Failure { stage, errno } = unsafe { failure.read_volatile() };
    match Stage::from_code(stage) {
        None => Ok(Started {
            pid: pid as u32,
            // The kernel stamps the child's start (in the boot-time clock) during the clone.
            start_time: before.filter(|&ticks| boot_ticks() == Some(ticks)),
            pidfd,
        }),
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
/// then) and a pidfd for it, or the errno of the clone.
///
/// The pidfd comes from the clone itself (`CLONE_PIDFD`) with `clone3`. The legacy way opens it
/// right after (`pidfd_open`): the child is this process's and not reaped yet (only the thread
/// that spawns, the master's event loop, reaps), so its number names it alone.
fn clone_once(
    plan: &mut Plan,
    region: &Region,
    method: Method,
    cgroup: Option<BorrowedFd<'_>>,
) -> Result<(i32, OwnedFd), i32> {
    let mut pidfd: libc::c_int = -1;
    let mut args = CloneArgs {
        flags: libc::CLONE_VFORK as u64 | CLONE_CLEAR_SIGHAND | CLONE_PIDFD,
        exit_signal: libc::SIGCHLD as u64,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        ..CloneArgs::default()
    };
    if let Some(fd) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = fd.as_raw_fd() as u64;
    }
    // The legacy way resets handlers and joins the cgroup in the child, and copies the whole
    // table of descriptors (the join opens one).
    plan.unshare_below = match method {
        Method::Legacy => 0,
        _ => plan.slots_below,
    };
    if plan.unshare_below > 0 {
        args.flags |= libc::CLONE_FILES as u64;
    }
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
    let pid = rc as i32;
    if method == Method::Legacy {
        // SAFETY: pidfd_open takes a pid and a flags word and returns a new descriptor or -1.
        pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
    }
    if pidfd < 0 {
        // No pidfd (a kernel before 5.3): the child runs, but baton signals only processes it
        // holds a pidfd for. Reap it (it is ours and unknown to anyone else) and fail.
        let err = errno();
        // SAFETY: plain system calls on this process's own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        return Err(err);
    }
    // SAFETY: the kernel just wrote a new descriptor (close-on-exec, as every pidfd) that nobody
    // else owns.
    Ok((pid, unsafe { OwnedFd::from_raw_fd(pidfd) }))
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

/// The boot-time clock in clock ticks (`/proc`'s unit for a process's start time).
fn boot_ticks() -> Option<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    let nanos = now.tv_sec() as u128 * 1_000_000_000 + now.tv_nsec() as u128;
    Some((nanos * hz as u128 / 1_000_000_000) as u64)
}

/// Makes the child `method`'s way (or the legacy way, where `clone3` is refused) on this
/// thread's region, and waits until it has called execve or exited.
pub(super) fn start(
    plan: Plan,
    method: Method,
    cgroup: Option<BorrowedFd<'_>>,
) -> Result<Started, SpawnError> {
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
}
