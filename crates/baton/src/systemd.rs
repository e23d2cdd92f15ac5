//! The master's side of systemd: what the environment says (`NOTIFY_SOCKET`, `WATCHDOG_USEC`,
//! `LISTEN_FDS`), and notifications through the sd-notify crate. The core only sees
//! [`Options`]; this is the one place that reads those variables.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use baton_core::master::{Notification, Options};
use baton_sys::activation;
use sd_notify::NotifyState;

/// Options for a master started by systemd (or anything speaking its conventions).
pub(crate) fn options() -> Options {
    let ours = |var: &str| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id())
    };
    let notify: Option<Box<dyn FnMut(Notification)>> =
        std::env::var_os("NOTIFY_SOCKET").map(|_| Box::new(notify) as Box<dyn FnMut(Notification)>);
    let watchdog = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|_| ours("WATCHDOG_PID"))
        .map(Duration::from_micros);
    Options {
        files: Default::default(),
        notify,
        watchdog,
        inherited: inherited(),
        signals: None,
        argv: std::env::args_os().collect(),
        binary: std::env::current_exe().ok(),
        guard: None,
    }
}

/// Listening sockets passed with `LISTEN_FDS` (a `.socket` unit, or the fd store after a
/// restart), if `LISTEN_PID` says they are ours.
fn inherited() -> Vec<(String, OwnedFd)> {
    // After a self-upgrade every socket is in the state, and LISTEN_PID (the same pid) is stale.
    if std::env::var_os(baton_core::master::STATE_FD_ENV).is_some() {
        return Vec::new();
    }
    let passed = match activation::listen_fds(&activation::ActivationEnv::from_process()) {
        Ok(Some(passed)) => passed,
        Ok(None) => return Vec::new(),
        Err(err @ activation::ActivationError::NotOurs { .. }) => {
            tracing::debug!("LISTEN_FDS ignored: {err}");
            return Vec::new();
        }
        Err(err) => {
            tracing::warn!("LISTEN_FDS ignored: {err}");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for activation::Passed { name, number, fd } in passed {
        match fd {
            Ok(fd) => {
                tracing::info!(event = baton_proto::event::INHERITED_SOCKET, name = %name, "inherited socket `{name}` (fd {number}) from the service manager");
                out.push((name, fd));
            }
            Err(err) => tracing::warn!("LISTEN_FDS: fd {number} ({name}) unusable: {err}"),
        }
    }
    out
}

fn notify(notification: Notification) {
    let result = match notification {
        Notification::Ready => sd_notify::notify(&[NotifyState::Ready]),
        Notification::Reloading => match NotifyState::monotonic_usec_now() {
            Ok(now) => sd_notify::notify(&[NotifyState::Reloading, now]),
            Err(err) => Err(err),
        },
        Notification::Status(line) => sd_notify::notify(&[NotifyState::Status(&line)]),
        Notification::Stopping => sd_notify::notify(&[NotifyState::Stopping]),
        Notification::Watchdog => sd_notify::notify(&[NotifyState::Watchdog]),
        Notification::ExtendTimeout(by) => {
            let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
            sd_notify::notify(&[NotifyState::ExtendTimeoutUsec(usec)])
        }
        Notification::StoreFds(fds) => fds.iter().try_for_each(|(name, fd)| {
            // One message per socket: FDNAME names every descriptor of its message.
            sd_notify::notify_with_fds(
                &[NotifyState::FdStore, NotifyState::FdName(name)],
                &[fd.as_fd()],
            )
        }),
        Notification::RemoveFd(name) => {
            sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(&name)])
        }
    };
    if let Err(err) = result {
        tracing::warn!("sd_notify: {err}");
    }
}
