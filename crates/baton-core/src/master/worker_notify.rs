//! A systemd-style worker's `NOTIFY_SOCKET`, read by the master: `READY=1`, `STATUS=`,
//! `STOPPING=1` and `MAINPID=` become [`Event`]s. The sender is checked (the worker, or its
//! process group with `notify_access: all`) and reading is rate-limited, so a flood costs the
//! master nothing but a warning.

use std::time::Duration;

use baton_proto::WorkerMessage;
use baton_sys::{notify, process};
use tokio::sync::mpsc;
use tracing::warn;

use super::readiness::{Condition, News};
use crate::config::NotifyAccess;
use crate::supervisor::{Event, WorkerId};

/// Notifications read per worker per second at most; a flood waits in the socket (and then
/// blocks its sender) instead of costing the master CPU.
const NOTIFY_BUDGET: u32 = 64;

/// Largest notification read; longer ones are discarded (systemd's own limit is similar).
const NOTIFY_MAX: usize = 4096;

/// A systemd-style worker's `NOTIFY_SOCKET`: turns `READY=1`, `STATUS=`, `STOPPING=1` and
/// `MAINPID=` into events. Only the worker may notify: its pid or announced main pid, or with
/// `notify_access: all` any process of its process group. At most [`NOTIFY_BUDGET`] datagrams a
/// second are read.
pub(super) async fn notify_task(
    worker: WorkerId,
    socket: notify::NotifySocket,
    spawned: u32,
    access: NotifyAccess,
    events: mpsc::UnboundedSender<News>,
) {
    let mut buf = vec![0u8; NOTIFY_MAX];
    let mut main = spawned;
    let mut window = tokio::time::Instant::now();
    let mut read = 0u32;
    let (mut warned_flood, mut warned_sender, mut warned_size) = (false, false, false);
    loop {
        if read >= NOTIFY_BUDGET {
            if !warned_flood {
                warn!(
                    event = "worker_protocol_error",
                    worker = worker.0,
                    "worker {worker} floods its notify socket: reading at most {NOTIFY_BUDGET} notifications a second"
                );
                warned_flood = true;
            }
            tokio::time::sleep_until(window + Duration::from_secs(1)).await;
        }
        if window.elapsed() >= Duration::from_secs(1) {
            (window, read) = (tokio::time::Instant::now(), 0);
        }
        let datagram = match notify::recv(&socket, &mut buf).await {
            Ok(d) => d,
            Err(err) => {
                warn!(worker = worker.0, "notify socket of worker {worker}: {err}");
                return;
            }
        };
        read += 1;
        let allowed = datagram.pid.is_some_and(|pid| {
            pid == main
                || pid == spawned
                || (access == NotifyAccess::All
                    && process::process_group(pid).is_ok_and(|g| g == spawned))
        });
        if !allowed {
            if !warned_sender {
                warn!(
                    event = "worker_protocol_error",
                    worker = worker.0,
                    "notification for worker {worker} from {} refused (not the worker; see notify_access)",
                    datagram
                        .pid
                        .map_or_else(|| "an unknown sender".to_string(), |p| format!("pid {p}"))
                );
                warned_sender = true;
                let cause = format!(
                    "a notification from {} was refused (not the worker; see notify_access)",
                    datagram
                        .pid
                        .map_or_else(|| "an unknown sender".to_string(), |p| format!("pid {p}"))
                );
                let _ = events.send(News::Event(Event::NotReadyBecause { worker, cause }));
            }
            continue;
        }
        if datagram.truncated {
            if !warned_size {
                warn!(
                    event = "worker_protocol_error",
                    worker = worker.0,
                    "worker {worker} sent a notification over {NOTIFY_MAX} bytes: ignored"
                );
                warned_size = true;
            }
            continue;
        }
        let text = String::from_utf8_lossy(&buf[..datagram.len]);
        for line in text.lines() {
            let event = match line.split_once('=') {
                Some(("READY", "1")) => News::Ready(worker, Condition::Notify),
                Some(("WATCHDOG", "1")) => News::Heartbeat(worker),
                Some(("WATCHDOG", "trigger")) => News::Event(Event::Unhealthy {
                    worker,
                    reason: "it asked to be replaced (WATCHDOG=trigger)".into(),
                }),
                Some(("STOPPING", "1")) => News::Event(Event::Message {
                    worker,
                    message: WorkerMessage::Draining,
                }),
                Some(("STATUS", status)) => News::Event(Event::Message {
                    worker,
                    message: WorkerMessage::Status {
                        connections: None,
                        text: Some(status.to_string()),
                    },
                }),
                Some(("MAINPID", pid)) => match pid.parse::<u32>() {
                    Ok(pid) if pid > 1 => {
                        main = pid;
                        News::Event(Event::MainPid { worker, pid })
                    }
                    _ => continue,
                },
                _ => continue,
            };
            if events.send(event).is_err() {
                return;
            }
        }
    }
}
