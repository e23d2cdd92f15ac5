//! The child between clone and exec: what it reads (the plan), and its steps, all raw system
//! calls.

use std::io;
use std::os::fd::RawFd;

use super::{ChildSetup, Stage};

/// What the child reads between clone and exec. Every pointer points into buffers owned by the
/// [`Spawn`](super::Spawn) being started (or the region), alive until the child has called execve or exited.
pub(super) struct Plan {
    pub(super) program: *const libc::c_char,
    pub(super) argv: *const *const libc::c_char,
    pub(super) envp: *const *const libc::c_char,
    /// The `NAME=` entry with room for the digits (null: none).
    pub(super) pid_slot: *mut u8,
    pub(super) pid_digits: usize,
    pub(super) placements: *const (RawFd, RawFd),
    pub(super) placements_len: usize,
    pub(super) close_from: libc::c_uint,
    /// Where the slots end, if the sources are in them (0: they are not).
    pub(super) slots_below: libc::c_uint,
    /// The child shares the master's descriptor table (`CLONE_FILES`) and keeps a copy of the
    /// numbers below this one only (0: it has a copy of the whole table already).
    pub(super) unshare_below: libc::c_uint,
    pub(super) cwd: *const libc::c_char,
    pub(super) process_group: bool,
    pub(super) setup: ChildSetup,
    pub(super) reset_handlers: bool,
    /// A cgroup directory to join by writing to its `cgroup.procs` (legacy way only; -1: none).
    pub(super) join_cgroup: RawFd,
    /// Where the child reports a failure (in the region, shared with the parent in every way).
    pub(super) failure: *mut Failure,
}

/// A failure of the child: its stage's code (0: none) and errno.
#[repr(C)]
pub(super) struct Failure {
    pub(super) stage: u32,
    pub(super) errno: i32,
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

/// The child, between clone and exec: it only makes system calls, then `execve`s. On a failure
/// it writes the stage and errno into the shared slot and exits with 127.
///
/// # Safety
/// Runs only in a child made by `clone::clone_and_wait`, with `plan` valid.
pub(super) unsafe extern "C" fn child_main(plan: *const Plan) -> ! {
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

pub(super) fn errno() -> i32 {
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
        // First, a table of descriptors of its own: until then it is the master's
        // (CLONE_FILES). Only the numbers below the slots are copied (Linux 5.9), or, failing
        // that, all.
        if plan.unshare_below > 0
            && libc::syscall(
                libc::SYS_close_range,
                plan.unshare_below,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_UNSHARE,
            ) != 0
        {
            check!(
                Stage::Descriptors,
                libc::syscall(libc::SYS_unshare, libc::CLONE_FILES)
            );
        }
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
