//! The system-call edge of baton: the only crate with `unsafe` code.
//!
//! It owns: moving descriptors over the worker channel (`SCM_RIGHTS` over a `SOCK_SEQPACKET`
//! socket pair), adopting descriptors inherited across `execve` (socket activation in
//! [`activation`], the channel, a self-upgrade's state), placing descriptors at fixed numbers in a
//! child between `clone` and `exec`, the process syscalls the master needs (signals, reaping), the
//! self-upgrade's memfd and `execve`, the kernel's count of established connections
//! (`sock_diag` netlink), and the classic BPF program that steers QUIC packets within a
//! `SO_REUSEPORT` group ([`reuseport`]).
//!
//! Its public API speaks [`OwnedFd`] and [`BorrowedFd`]. Raw numbers appear only where a
//! descriptor crosses `execve` on purpose: [`upgrade::number`] names one in a self-upgrade's
//! state, and [`channel::adopt_inherited`] takes one back, refusing any number this process
//! might own. No safe function here has an unsafe contract. It must not know about
//! configuration, generations or the protocol's JSON: callers hand it bytes and descriptors.
//!
//! Workers are started by [`spawn`] (`clone3` with `CLONE_VM | CLONE_VFORK`, made in their
//! cgroup); [`process`] keeps the hooks for `std::process::Command`, used for the rare
//! processes where a copy of the master does not matter (a self-upgrade, the guard).
//!
//! [`OwnedFd`]: std::os::fd::OwnedFd
//! [`BorrowedFd`]: std::os::fd::BorrowedFd

#![allow(unsafe_code)] // This crate is where unsafe lives; each block carries a SAFETY proof.

pub mod acceptq;
pub mod activation;
pub mod cgroup;
pub mod channel;
pub mod inotify;
pub mod notify;
pub mod pidfd;
pub mod pipe;
pub mod process;
pub mod reuseport;
pub mod sockdiag;
pub mod sockopt;
pub mod spawn;
pub mod upgrade;
