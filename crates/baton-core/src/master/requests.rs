//! Control requests (already authorized by the control socket) and the verdicts clients wait
//! for: a `reload` that waits parks its reply in a table keyed by request id, answered when the
//! state machine's [`Verdict`] names that request.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

use baton_proto::control as proto;
use tracing::warn;

use super::Master;
use crate::control::ControlRequest;
use crate::faults::Point;
use crate::supervisor::{Event, Intent, RequestId, Trigger, Verdict};

/// Stderr lines of the worker that failed a reload, in its verdict.
const VERDICT_LINES: usize = 10;

/// Verdicts kept for `Request::Verdict`.
const KEPT_VERDICTS: usize = 1000;

/// Reload verdicts as the master keeps them for its clients.
#[derive(Debug, Default)]
pub(super) struct Verdicts {
    /// Clients waiting for the verdict of a reload request.
    pub(super) waiting: HashMap<RequestId, Vec<tokio::sync::oneshot::Sender<proto::Response>>>,
    /// Recent verdicts by request, for `baton reload --no-wait` followed by a wait (at most
    /// [`KEPT_VERDICTS`]).
    pub(super) kept: BTreeMap<RequestId, proto::ReloadVerdict>,
}

impl Master {
    /// A request from the control socket, already authorized.
    pub(super) fn on_control(
        &mut self,
        req: ControlRequest,
        queue: &mut VecDeque<Event>,
    ) -> Option<i32> {
        let ControlRequest {
            request,
            peer,
            reply,
            client,
        } = req;
        match request {
            proto::Request::Status { brief } => {
                // The kernel's figures are read off the event loop (see `status_job`).
                let job = self.status_job(brief);
                tokio::spawn(async move {
                    if let Ok(status) = tokio::task::spawn_blocking(job).await {
                        let _ = reply.send(proto::Response::Status(status));
                    }
                });
            }
            proto::Request::Metrics => {
                let _ = reply.send(proto::Response::Metrics {
                    text: self.metrics(),
                });
            }
            proto::Request::History => {
                let _ = reply.send(proto::Response::History {
                    reloads: self.history(),
                });
            }
            proto::Request::Reload { wait } => {
                let trigger = Trigger::Other(format!("baton reload from {peer}"));
                let code = self.feed(Event::Intent(Intent::Reload(trigger)), queue);
                let request = self.supervisor.last_request().unwrap_or(RequestId(0));
                if wait {
                    // Its verdict may have come already (a reload refused at once).
                    self.answer_or_wait(request, reply);
                } else {
                    let _ = reply.send(proto::Response::Accepted { request: request.0 });
                }
                return code;
            }
            proto::Request::Verdict { request } => {
                let id = RequestId(request);
                if self.verdicts.kept.contains_key(&id) {
                    self.answer_or_wait(id, reply);
                } else if self
                    .supervisor
                    .last_request()
                    .is_some_and(|last| id <= last)
                    && id.0 > 0
                {
                    self.verdicts.waiting.entry(id).or_default().push(reply);
                } else {
                    let _ = reply.send(proto::Response::Error {
                        kind: proto::ErrorKind::NotFound,
                        message: format!("no reload request #{request} is known"),
                    });
                }
            }
            // Answered by the control socket's client task, which never sends it here.
            proto::Request::Logs { .. } => {
                let _ = reply.send(proto::Response::Error {
                    kind: proto::ErrorKind::BadRequest,
                    message: "logs are answered by the control socket".into(),
                });
            }
            proto::Request::Upgrade { binary } => {
                self.begin_upgrade(binary, reply, client, &peer, false);
            }
            proto::Request::Stop { fast } => {
                let trigger = Trigger::Other(format!("baton stop from {peer}"));
                let _ = reply.send(proto::Response::Stopping { fast });
                let stop = Intent::Stop {
                    graceful: !fast,
                    trigger,
                };
                return self.feed(Event::Intent(stop), queue);
            }
        }
        None
    }

    /// Answers `reply` with the verdict of `request` if it came, else when it comes.
    fn answer_or_wait(
        &mut self,
        request: RequestId,
        reply: tokio::sync::oneshot::Sender<proto::Response>,
    ) {
        match self.verdicts.kept.get(&request) {
            Some(verdict) => {
                let _ = reply.send(proto::Response::Verdict(verdict.clone()));
            }
            None => self
                .verdicts
                .waiting
                .entry(request)
                .or_default()
                .push(reply),
        }
    }

    /// A reload's verdict: the promotion's side effects (QUIC steering, systemd's READY=1,
    /// removed listeners closed, the kernel's receipt), then the answers.
    pub(super) fn carry_out_verdict(&mut self, verdict: Verdict) {
        if verdict.result.is_ok() {
            Point::Promotion.pass();
        }
        // New QUIC connections go to the new generation before anyone is told.
        self.steer();
        if self.told.ready && self.supervisor.snapshot(Instant::now()).reload.is_none() {
            self.notify(super::Notification::Ready);
        }
        if let (Ok(()), Some(generation)) = (&verdict.result, verdict.generation) {
            self.stop_removed_listeners(generation);
        }
        let receipt = self.receipt(&verdict);
        self.on_verdict(verdict, receipt);
    }

    pub(super) fn on_verdict(&mut self, verdict: Verdict, receipt: Option<proto::ReloadReceipt>) {
        for &request in &verdict.requests {
            let answer = proto::ReloadVerdict {
                request: request.0,
                reload: verdict.reload.map(|r| r.0),
                generation: verdict.generation.map(|g| g.0),
                ok: verdict.result.is_ok(),
                reason: verdict.result.clone().err(),
                duration_ms: Some(verdict.duration.as_millis() as u64),
                warnings: match (&verdict.result, verdict.generation) {
                    (Ok(()), Some(g)) => self
                        .resources
                        .get(&g)
                        .map(|r| r.warnings.clone())
                        .unwrap_or_default(),
                    _ => Vec::new(),
                },
                output: verdict
                    .culprit
                    .map(|worker| self.output.last_errors(worker.0, VERDICT_LINES))
                    .unwrap_or_default(),
                receipt: receipt.clone(),
            };
            let waiters = self.verdicts.waiting.remove(&request).unwrap_or_default();
            match Point::VerdictDelivery.check() {
                Ok(()) => {
                    for waiter in waiters {
                        let _ = waiter.send(proto::Response::Verdict(answer.clone()));
                    }
                }
                // As if their connections broke: the clients see them close; the verdict is
                // kept below for a later `baton reload --request`.
                Err(err) => warn!(
                    request = request.0,
                    "verdict of request {} not delivered: {err}", request.0
                ),
            }
            self.verdicts.kept.insert(request, answer);
            while self.verdicts.kept.len() > KEPT_VERDICTS {
                self.verdicts.kept.pop_first();
            }
        }
    }
}

impl Master {
    /// The control socket's task ended: it never returns, so it panicked (a bug, or a system
    /// call failing in a way the runtime does not expect). Its listener went with it; the
    /// socket is served again from the master's own copy, so the operator is not locked out
    /// (CI twice saw a `baton reload` reset after a test injected EINTR into the loop).
    /// Returns the new task.
    pub(super) fn serve_control_again(
        &mut self,
        ended: Result<(), tokio::task::JoinError>,
        requests: &tokio::sync::mpsc::Sender<ControlRequest>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let why = match ended {
            Ok(()) => "it returned".to_string(),
            Err(err) if err.is_panic() => {
                let payload = err.into_panic();
                let text = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                format!("it panicked: {text}")
            }
            Err(err) => err.to_string(),
        };
        let (fd, config) = self.control_fd.as_ref()?;
        let listener = match fd.try_clone() {
            Ok(fd) => std::os::unix::net::UnixListener::from(fd),
            Err(err) => {
                tracing::error!(
                    event = baton_proto::event::CONTROL_LOST,
                    "the control socket's task ended ({why}) and cannot be started again: {err}"
                );
                return None;
            }
        };
        tracing::error!(
            event = baton_proto::event::CONTROL_RESTARTED,
            "the control socket's task ended ({why}): serving the socket again"
        );
        Some(tokio::spawn(crate::control::serve(
            listener,
            config.clone(),
            requests.clone(),
            self.output.clone(),
        )))
    }
}
