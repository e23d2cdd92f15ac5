//! A systemd-style worker's `NOTIFY_SOCKET`, read by the master: `READY=1`, `STATUS=`,
//! `STOPPING=1` and `MAINPID=` become [`Event`]s (a main pid once proven the worker's). The sender is checked (the worker, or its
//! process group with `notify_access: all`) and reading is rate-limited, so a flood costs the
//! master nothing but a warning.

use std::path::PathBuf;
use std::time::Duration;

use baton_proto::WorkerMessage;
use baton_sys::{notify, process};
use tokio::sync::mpsc;
use tracing::warn;

use super::main_pid::{Refusal, vouch};
use super::readiness::{Condition, News};
use crate::config::NotifyAccess;
use crate::supervisor::{Event, WorkerId};

/// Notifications read per worker per second at most; a flood waits in the socket (and then
/// blocks its sender) instead of costing the master CPU.
const NOTIFY_BUDGET: u32 = 64;

/// Largest notification read; longer ones are discarded (systemd's own limit is similar).
const NOTIFY_MAX: usize = 4096;

/// Who may notify for a worker, and how an announced main process is proven its own.
#[derive(Debug, Clone)]
pub(super) struct Notifier {
    pub(super) worker: WorkerId,
    /// The process the master started for it, and its main process as known now.
    pub(super) spawned: u32,
    pub(super) main: u32,
    pub(super) access: NotifyAccess,
    /// Its cgroup's directory, where workers are contained.
    pub(super) cgroup: Option<PathBuf>,
    /// Its readiness waits for `READY=1`, not sent yet: until it is, each notification it
    /// sends becomes the cause its verdict quotes if it is never ready.
    pub(super) awaits_ready: bool,
}

/// A worker's verdict when `READY=1` never came and nothing else did either.
const SAID_NOTHING: &str = "it sent nothing on its notify socket (NOTIFY_SOCKET): with `ready: notify` a worker is ready when it sends READY=1 (sd_notify); a server that never calls sd_notify is never ready: give it `ready: {http: ...}`, `{tcp: ...}` or `{delay: ...}` instead";

/// What a worker sent instead of `READY=1`, quoted (printable, at most this many characters).
const QUOTED: usize = 200;

/// A systemd-style worker's `NOTIFY_SOCKET`: turns `READY=1`, `STATUS=`, `STOPPING=1` and
/// `MAINPID=` into events. Only the worker may notify: its pid or announced main pid, or with
/// `notify_access: all` any process of its process group. At most [`NOTIFY_BUDGET`] datagrams a
/// second are read. A `MAINPID=` goes to the loop only once [`vouch`] proved the process the
/// worker's; a refusal is logged at most once per [`REFUSAL_LOG_EVERY`] with a count.
pub(super) async fn notify_task(
    socket: notify::NotifySocket,
    notifier: Notifier,
    events: mpsc::UnboundedSender<News>,
) {
    let Notifier {
        worker,
        spawned,
        mut main,
        access,
        cgroup,
        mut awaits_ready,
    } = notifier;
    if awaits_ready {
        let cause = SAID_NOTHING.to_string();
        let _ = events.send(News::Event(Event::NotReadyBecause { worker, cause }));
    }
    let mut buf = vec![0u8; NOTIFY_MAX];
    let mut window = tokio::time::Instant::now();
    let mut read = 0u32;
    let (mut warned_flood, mut warned_sender, mut warned_size) = (false, false, false);
    let mut refusals = RefusalLog::default();
    loop {
        if read >= NOTIFY_BUDGET {
            if !warned_flood {
                warn!(
                    event = baton_proto::event::WORKER_PROTOCOL_ERROR,
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
                    event = baton_proto::event::WORKER_PROTOCOL_ERROR,
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
                    event = baton_proto::event::WORKER_PROTOCOL_ERROR,
                    worker = worker.0,
                    "worker {worker} sent a notification over {NOTIFY_MAX} bytes: ignored"
                );
                warned_size = true;
            }
            continue;
        }
        if awaits_ready {
            let said = &buf[..datagram.len];
            if notices(said).iter().any(|n| matches!(n, Notice::Ready)) {
                awaits_ready = false;
            } else {
                let text = String::from_utf8_lossy(said);
                let quoted: String = baton_proto::text::printable(text.trim())
                    .chars()
                    .take(QUOTED)
                    .collect();
                let cause = format!(
                    "it never sent READY=1 on its notify socket; the last it sent: \"{quoted}\""
                );
                let _ = events.send(News::Event(Event::NotReadyBecause { worker, cause }));
            }
        }
        for notice in notices(&buf[..datagram.len]) {
            let event = match notice {
                Notice::Ready => News::Ready(worker, Condition::Notify),
                Notice::Watchdog => News::Heartbeat(worker),
                Notice::WatchdogTrigger => News::Event(Event::Unhealthy {
                    worker,
                    reason: "it asked to be replaced (WATCHDOG=trigger)".into(),
                }),
                Notice::Stopping => News::Event(Event::Message {
                    worker,
                    message: WorkerMessage::Draining,
                }),
                Notice::Status(text) => News::Event(Event::Message {
                    worker,
                    message: WorkerMessage::Status {
                        connections: None,
                        text: Some(text),
                    },
                }),
                Notice::MainPid(pid) => match vouch(pid, spawned, cgroup.as_deref()) {
                    Ok(process) => {
                        main = pid;
                        News::MainPid { worker, process }
                    }
                    Err(refusal) => {
                        refusals.refused(worker, &refusal);
                        News::MainPidRefused { worker, refusal }
                    }
                },
            };
            if events.send(event).is_err() {
                return;
            }
        }
    }
}

/// Refused `MAINPID=`s are logged at most this often per worker, with how many were refused
/// since the last line.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// A worker's refused announcements, logged at most once per [`REFUSAL_LOG_EVERY`].
#[derive(Debug, Default)]
struct RefusalLog {
    logged: Option<tokio::time::Instant>,
    unlogged: u64,
}

impl RefusalLog {
    fn refused(&mut self, worker: WorkerId, refusal: &Refusal) {
        let now = tokio::time::Instant::now();
        if self.logged.is_some_and(|at| now < at + REFUSAL_LOG_EVERY) {
            self.unlogged += 1;
            return;
        }
        let more = std::mem::take(&mut self.unlogged);
        warn!(
            event = baton_proto::event::MAIN_PID_REFUSED,
            worker = worker.0,
            refused_since = more,
            "worker {worker} announced a main process baton refuses: {refusal}{}",
            if more > 0 {
                format!(" ({more} more refused since the last line)")
            } else {
                String::new()
            }
        );
        self.logged = Some(now);
    }
}

/// What one line of an `sd_notify(3)` datagram says, of what baton acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Ready,
    Stopping,
    Status(String),
    /// `MAINPID=` with a number (which [`vouch`] then checks).
    MainPid(u32),
    Watchdog,
    WatchdogTrigger,
}

/// The notices of one datagram (any bytes, from any process: invalid UTF-8 is replaced, lines
/// baton does not act on are skipped), in order.
pub fn notices(datagram: &[u8]) -> Vec<Notice> {
    String::from_utf8_lossy(datagram)
        .lines()
        .filter_map(|line| match line.split_once('=')? {
            ("READY", "1") => Some(Notice::Ready),
            ("WATCHDOG", "1") => Some(Notice::Watchdog),
            ("WATCHDOG", "trigger") => Some(Notice::WatchdogTrigger),
            ("STOPPING", "1") => Some(Notice::Stopping),
            ("STATUS", status) => Some(Notice::Status(status.to_string())),
            ("MAINPID", pid) => pid.parse::<u32>().ok().map(Notice::MainPid),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{Notice, notices};

    #[test]
    fn a_datagram_says_what_its_lines_say_and_nothing_else() {
        assert_eq!(
            notices(b"READY=1\nSTATUS=serving 3\nMAINPID=4242\nWATCHDOG=1\nX=1\nSTOPPING=1"),
            vec![
                Notice::Ready,
                Notice::Status("serving 3".into()),
                Notice::MainPid(4242),
                Notice::Watchdog,
                Notice::Stopping,
            ]
        );
        // Numbers go on to be checked (and refused there: 0, 1); what is no number is dropped.
        assert_eq!(
            notices(b"MAINPID=1\nMAINPID=0\nMAINPID=-3\nMAINPID=x\nREADY=0"),
            vec![Notice::MainPid(1), Notice::MainPid(0)]
        );
        assert_eq!(notices(b"WATCHDOG=trigger"), vec![Notice::WatchdogTrigger]);
        assert_eq!(
            notices(b"STATUS=\xff\xfe"),
            vec![Notice::Status("\u{fffd}\u{fffd}".into())]
        );
    }
}
