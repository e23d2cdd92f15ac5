//! The systemd path: listeners from socket activation (`LISTEN_FDS`, parsed once for baton in
//! [`baton_sys::activation`]), readiness and status through `NOTIFY_SOCKET`, SIGTERM to drain.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use baton_proto::{ListenerAddress, ListenerInfo};
use baton_sys::{activation, channel};
use tokio::sync::{Notify, watch};

use crate::drain::watch_signals;
use crate::listener::adopt;
use crate::{Control, Shared, Worker, WorkerError};

/// `WATCHDOG_USEC` (and `WATCHDOG_PID`, if set, naming this process): how often systemd, or
/// baton, expects `WATCHDOG=1`.
fn watchdog_window() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    match std::env::var("WATCHDOG_PID") {
        Ok(pid) if pid.parse::<u32>().ok() != Some(std::process::id()) => None,
        _ => (usec > 0).then(|| std::time::Duration::from_micros(usec)),
    }
}

/// Sends `WATCHDOG=1` three times per window, from this task of the worker's runtime.
async fn watchdog(window: std::time::Duration) {
    let mut tick = tokio::time::interval(window / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        if sd_notify::notify(&[sd_notify::NotifyState::Watchdog]).is_err() {
            return;
        }
    }
}

impl Worker {
    /// Takes listeners passed the systemd way (`LISTEN_FDS` at fds 3.., `LISTEN_PID`,
    /// `LISTEN_FDNAMES`). Fails with [`WorkerError::NotUnderBaton`] if `LISTEN_FDS` is unset.
    pub fn from_systemd_env() -> Result<Worker, WorkerError> {
        let passed = activation::listen_fds(&activation::ActivationEnv::from_process())?
            .ok_or(WorkerError::NotUnderBaton)?;
        let mut listeners = Vec::with_capacity(passed.len());
        for activation::Passed { name, fd, .. } in passed {
            let fd = fd.map_err(|source| WorkerError::Adopt {
                name: name.clone(),
                source,
            })?;
            let datagram = channel::socket_kind(fd.as_fd())
                .is_ok_and(|k| k.sock_type == channel::SockType::Datagram);
            let address = match (channel::local_address(fd.as_fd()), datagram) {
                (Ok(channel::LocalAddress::Inet(address)), false) => {
                    ListenerAddress::Tcp { address }
                }
                (Ok(channel::LocalAddress::Inet(address)), true) => {
                    ListenerAddress::Udp { address }
                }
                (Ok(channel::LocalAddress::Unix(path)), false) => ListenerAddress::Unix {
                    path: path.unwrap_or_default(),
                },
                (Ok(channel::LocalAddress::Unix(path)), true) => ListenerAddress::UnixDatagram {
                    path: path.unwrap_or_default(),
                },
                (Err(source), _) => return Err(WorkerError::Adopt { name, source }),
            };
            // The tag, if this is a QUIC listener, comes from the environment.
            let quic_tag = matches!(address, ListenerAddress::Udp { .. })
                .then(|| {
                    std::env::var(baton_proto::QUIC_TAG_ENV)
                        .ok()
                        .and_then(|t| u16::from_str_radix(&t, 16).ok())
                })
                .flatten();
            let info = ListenerInfo {
                name,
                address,
                quic_tag,
            };
            let listener = adopt(&info, fd)?;
            listeners.push((info, Some(listener)));
        }
        let generation = std::env::var(baton_proto::GENERATION_ENV)
            .ok()
            .and_then(|g| g.parse().ok());
        let worker_id = std::env::var(baton_proto::WORKER_ID_ENV)
            .ok()
            .and_then(|w| w.parse().ok());
        let (drain, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            control: Control::Systemd,
            accepting: watch::channel(true).0,
            connections: AtomicU64::new(0),
            counted: Notify::new(),
            emptied: Notify::new(),
            drain,
            handoff: Default::default(),
        });
        watch_signals(shared.clone());
        if let Some(window) = watchdog_window() {
            tokio::spawn(watchdog(window));
        }
        Ok(Worker {
            shared,
            generation: generation.unwrap_or(0),
            worker_id: worker_id.unwrap_or(0),
            listeners,
        })
    }
}
