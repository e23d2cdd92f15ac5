//! The master's side of systemd: what the environment says (`NOTIFY_SOCKET`, `WATCHDOG_USEC`,
//! `LISTEN_FDS`), and notifications through the sd-notify crate. The core only sees
//! [`Options`]; this is the one place that reads those variables.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use baton_core::master::{Notification, Options};
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
        notify,
        watchdog,
        inherited: inherited(),
        signals: None,
    }
}

/// Listening sockets passed with `LISTEN_FDS` (a `.socket` unit, or the fd store after a
/// restart), if `LISTEN_PID` says they are ours.
fn inherited() -> Vec<(String, OwnedFd)> {
    let count: usize = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        == Some(std::process::id());
    // After a self-upgrade every socket is in the state, and LISTEN_PID (the same pid) is stale.
    let upgrading = std::env::var_os(baton_core::upgrade::STATE_FD_ENV).is_some();
    if count == 0 || !pid_ok || upgrading {
        return Vec::new();
    }
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(String::from).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for i in 0..count {
        let raw = 3 + i as i32;
        let name = names.get(i).cloned().unwrap_or_else(|| format!("fd{raw}"));
        match baton_sys::channel::adopt_inherited(raw) {
            Ok(fd) => {
                tracing::info!(event = "inherited_socket", name = %name, "inherited socket `{name}` (fd {raw}) from the service manager");
                out.push((name, fd));
            }
            Err(err) => tracing::warn!("LISTEN_FDS: fd {raw} ({name}) unusable: {err}"),
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
