//! The baton master as a library.
//!
//! It owns the configuration ([`config`]), the listening sockets ([`listeners`]), the supervision
//! state machine ([`supervisor`]), the event loop that drives it ([`master`]), and the state that
//! crosses a self-upgrade ([`upgrade`]). `docs/ARCHITECTURE.md` has the code map.
//!
//! It must not register signal handlers, read the environment for its own behaviour, or exit the
//! process: signals arrive as [`intent::Intent`]s through [`master::Input`], what the binary
//! knows of its environment arrives in [`master::Options`], and [`master::Master::run`] returns
//! the exit code. That is what lets tests run a whole master inside a test process.

#![forbid(unsafe_code)]

pub mod cgroups;
mod codec;
pub mod config;
pub mod control;
pub mod faults;
pub mod histogram;
pub mod intent;
mod listener_options;
pub mod listeners;
pub mod master;
pub mod metrics_http;
pub mod orphans;
pub mod output;
mod procmem;
mod procnet;
pub mod supervisor;
pub mod upgrade;

/// Makes this process the reaper of its workers' orphans (`PR_SET_CHILD_SUBREAPER`). A
/// process-wide setting, so the binary calls it, not [`master::Master::run`].
pub fn become_subreaper() -> std::io::Result<()> {
    baton_sys::process::become_subreaper()
}

/// The running program's version: the package version, plus `+TAG` when built with
/// `BATON_BUILD_TAG=TAG` (tests build a second baton that way to upgrade to).
pub fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| match option_env!("BATON_BUILD_TAG") {
        Some(tag) if !tag.is_empty() => format!("{}+{tag}", env!("CARGO_PKG_VERSION")),
        _ => env!("CARGO_PKG_VERSION").to_string(),
    })
}

/// Default `worker.failed_stop_timeout`: how long a worker of a failed generation may finish.
pub(crate) const DEFAULT_FAILED_STOP_TIMEOUT: std::time::Duration =
    std::time::Duration::from_secs(5);

/// Default `supervisor.upgrade_timeout`: how long a new program may take to check the state.
pub(crate) const DEFAULT_UPGRADE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
