//! The baton master as a library.
//!
//! It owns the configuration ([`config`]), the listening sockets ([`listeners`]), the supervision
//! state machine ([`supervisor`]) and the event loop that drives it ([`master`]).
//!
//! It must not register signal handlers, read the environment for its own behaviour, or exit the
//! process: signals arrive as [`supervisor::Intent`]s through [`master::Input`], and [`master::run`]
//! returns the exit code. That is what lets tests run a whole master inside a test process.

#![forbid(unsafe_code)]

pub mod config;
pub mod listeners;
pub mod master;
pub mod supervisor;
