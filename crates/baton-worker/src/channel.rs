//! baton's channel, the worker's side: the handoff ([`Worker::handshake`]: the manifest, then the
//! descriptors in chunks, each checked), then the master's packets (drain, pause, resume) and
//! the connection count reported at most every [`REPORT_INTERVAL`].

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use baton_proto::{
    Hello, MAX_FDS_PER_MESSAGE, MAX_MESSAGE_SIZE, MasterMessage, PROTOCOL_VERSION, WorkerMessage,
};
use baton_sys::channel;
use tokio::net::UnixDatagram;
use tokio::sync::{Notify, watch};

use crate::drain::{DrainReason, watch_signals};
use crate::listener::adopt;
use crate::{Control, Shared, Worker, WorkerError};

/// Shortest time between two connection-count reports: the master is not in the data path, so a
/// busy worker must not send it a packet per connection.
pub(crate) const REPORT_INTERVAL: Duration = Duration::from_millis(200);

impl Worker {
    /// Runs the handoff on an already connected channel (what `from_env` does after adopting it).
    pub async fn handshake(channel: UnixDatagram) -> Result<Worker, WorkerError> {
        let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
        let hello = match recv(&channel, &mut buf, 0).await? {
            (MasterMessage::Hello(hello), fds) if fds.is_empty() => hello,
            (other, _) => {
                return Err(WorkerError::Protocol(format!(
                    "expected hello, got {other:?}"
                )));
            }
        };
        let Hello {
            version,
            generation,
            worker_id,
            listeners,
            watchdog_ms,
        } = hello;
        if version != PROTOCOL_VERSION {
            return Err(WorkerError::Version(version));
        }
        let mut fds: Vec<OwnedFd> = Vec::with_capacity(listeners.len());
        while fds.len() < listeners.len() {
            let (message, chunk) = recv(&channel, &mut buf, MAX_FDS_PER_MESSAGE).await?;
            match message {
                MasterMessage::Fds { first, count }
                    if first == fds.len() && count == chunk.len() =>
                {
                    fds.extend(chunk);
                }
                MasterMessage::Fds { count, .. } => {
                    return Err(WorkerError::CountMismatch {
                        expected: listeners.len(),
                        received: fds.len() + chunk.len().min(count),
                    });
                }
                other => {
                    return Err(WorkerError::Protocol(format!(
                        "expected descriptors, got {other:?}"
                    )));
                }
            }
        }
        let mut adopted = Vec::with_capacity(listeners.len());
        for (info, fd) in listeners.into_iter().zip(fds) {
            let listener = adopt(&info, fd)?;
            adopted.push((info, Some(listener)));
        }
        let (drain, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            control: Control::Channel(channel),
            accepting: watch::channel(true).0,
            connections: AtomicU64::new(0),
            counted: Notify::new(),
            emptied: Notify::new(),
            drain,
            handoff: Default::default(),
        });
        tokio::spawn(listen_to_master(shared.clone()));
        watch_signals(shared.clone());
        tokio::spawn(report_connections(shared.clone()));
        if let Some(ms) = watchdog_ms {
            tokio::spawn(heartbeat(shared.clone(), Duration::from_millis(ms)));
        }
        Ok(Worker {
            shared,
            generation,
            worker_id,
            listeners: adopted,
        })
    }
}

pub(crate) async fn recv(
    channel: &UnixDatagram,
    buf: &mut [u8],
    max_fds: usize,
) -> Result<(MasterMessage, Vec<OwnedFd>), WorkerError> {
    let got = channel::recv_with_fds(channel, buf, max_fds.max(1))
        .await
        .map_err(WorkerError::Receive)?;
    if got.len == 0 {
        return Err(WorkerError::Closed);
    }
    if got.fds_truncated {
        return Err(WorkerError::Truncated { expected: max_fds });
    }
    if got.truncated {
        return Err(WorkerError::Protocol(
            "packet larger than the protocol's limit".into(),
        ));
    }
    let message =
        baton_proto::decode(&buf[..got.len]).map_err(|e| WorkerError::Protocol(e.to_string()))?;
    Ok((message, got.fds))
}

/// Reads the master's packets: `drain` and end of stream both request a drain.
pub(crate) async fn listen_to_master(shared: Arc<Shared>) {
    let Control::Channel(channel) = &shared.control else {
        return;
    };
    let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
    loop {
        match channel::recv_with_fds(channel, &mut buf, 1).await {
            Ok(got) if got.len == 0 => {
                shared.handoff.settle();
                shared.drain.send_if_modified(|d| {
                    d.get_or_insert(DrainReason::MasterGone) == &DrainReason::MasterGone
                });
                return;
            }
            Ok(mut got) => match baton_proto::decode(&buf[..got.len]) {
                Ok(MasterMessage::HandoffLink(link)) if got.fds.len() == 1 => {
                    crate::handoff::on_link(&shared, link, got.fds.remove(0));
                }
                Ok(MasterMessage::Drain { deadline_ms }) => {
                    shared.handoff.settle();
                    let reason = DrainReason::Master {
                        deadline: Duration::from_millis(deadline_ms),
                    };
                    shared
                        .drain
                        .send_if_modified(|d| d.replace(reason).is_none());
                }
                Ok(MasterMessage::Pause) => {
                    shared.accepting.send_replace(false);
                }
                Ok(MasterMessage::Resume) => {
                    shared.accepting.send_replace(true);
                }
                // Other packets (unknown types from a newer master) are ignored.
                _ => {}
            },
            Err(_) => {
                shared.handoff.settle();
                shared.drain.send_if_modified(|d| {
                    d.get_or_insert(DrainReason::MasterGone) == &DrainReason::MasterGone
                });
                return;
            }
        }
    }
}

/// Proves the worker alive to the master (`liveness: {watchdog: WINDOW}`): a heartbeat packet
/// three times per window, from this task of the worker's runtime, so a worker whose runtime
/// hangs (or that is stopped) goes silent.
pub(crate) async fn heartbeat(shared: Arc<Shared>, window: Duration) {
    let Control::Channel(channel) = &shared.control else {
        return;
    };
    let packet = baton_proto::encode(&WorkerMessage::Heartbeat);
    let mut tick = tokio::time::interval(window / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        if channel.send(&packet).await.is_err() {
            return;
        }
    }
}

/// Reports the connection count when it changes, at most every [`REPORT_INTERVAL`].
pub(crate) async fn report_connections(shared: Arc<Shared>) {
    let Control::Channel(channel) = &shared.control else {
        return;
    };
    let mut last = None;
    loop {
        let notified = shared.counted.notified();
        let now = shared.connections.load(Ordering::Acquire);
        if last != Some(now) {
            let message = WorkerMessage::Status {
                connections: Some(now),
                text: None,
            };
            if channel.send(&baton_proto::encode(&message)).await.is_err() {
                return;
            }
            last = Some(now);
            tokio::time::sleep(REPORT_INTERVAL).await;
            continue;
        }
        notified.await;
    }
}
