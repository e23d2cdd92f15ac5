//! The system-call edge of baton: the only crate with `unsafe` code.
//!
//! It owns: moving descriptors over the worker channel (`SCM_RIGHTS` over a `SOCK_SEQPACKET`
//! socket pair), placing descriptors at fixed numbers in a child between `fork` and `exec`, the
//! process syscalls the master needs (signals, reaping), the self-upgrade's memfd and `execve`,
//! and the kernel's count of established connections (`sock_diag` netlink).
//!
//! Its public API speaks [`OwnedFd`] and [`BorrowedFd`]; a raw descriptor never leaves a function
//! body here. It must not know about configuration, generations or the protocol's JSON: callers
//! hand it bytes and descriptors.
//!
//! [`OwnedFd`]: std::os::fd::OwnedFd
//! [`BorrowedFd`]: std::os::fd::BorrowedFd

#![allow(unsafe_code)] // This crate is where unsafe lives; each block carries a SAFETY proof.

pub mod activation;
pub mod channel;
pub mod notify;
pub mod process;
pub mod sockdiag;
pub mod upgrade;
