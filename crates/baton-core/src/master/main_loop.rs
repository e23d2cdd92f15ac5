//! The master's loop, in the shape of rust-analyzer's main loop: it asks what woke it
//! ([`Master::next_wake`], which only waits and returns a closed [`Wake`]) and acts on the
//! answer in one place ([`Master::on_wake`]). Every event reaches the state machine through one
//! door, [`Master::feed`], which runs the per-event hooks around `Supervisor::handle` and
//! carries out its actions: the loop, the control requests and the upgrade's quiet point all go
//! through it, so no event skips a hook (a worker that became ready during an upgrade's quiet
//! point used to get no liveness check, one that exited then had its last output unread before
//! its verdict).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinHandle};

use super::readiness::News;
use super::service_manager::Notification;
use super::{Input, Master, sleep_until, upgrade};
use crate::control::ControlRequest;
use crate::metrics_http;
use crate::supervisor::Event;

/// What the loop holds besides the master: its inputs (signals and intents), the control
/// socket's task and the channel its requests come by, the service manager's watchdog timer,
/// and the events waiting for the state machine.
pub(super) struct Loop {
    pub(super) inputs: mpsc::UnboundedReceiver<Input>,
    /// Until the inputs close (then the master stops gracefully).
    pub(super) inputs_open: bool,
    pub(super) control_tx: mpsc::Sender<ControlRequest>,
    pub(super) control_rx: mpsc::Receiver<ControlRequest>,
    pub(super) control_task: Option<JoinHandle<()>>,
    pub(super) watchdog: Option<tokio::time::Interval>,
    pub(super) queue: VecDeque<Event>,
}

/// What woke the master: one of these, and nothing else.
pub(super) enum Wake {
    /// Time to tell the service manager this master is alive (`WATCHDOG=1`).
    Watchdog,
    /// Once a second while something drains: the status line's time left.
    Refresh,
    /// A signal or an intent from outside; `None` once the inputs closed.
    Input(Option<Input>),
    /// A worker's news (an exit, a message, a notification, a readiness result).
    News(News),
    /// The metrics endpoint asks for a page.
    Metrics(metrics_http::Ask),
    /// The control socket's task ended (a panic): serve the socket again.
    ControlEnded(Result<(), JoinError>),
    /// A request from the control socket, already authorized.
    Control(ControlRequest),
    /// An upgrade's preflight reported.
    Preflight(upgrade::Preflight),
    /// An upgrade's preflight did not report in time.
    PreflightExpired,
    /// The state machine's next deadline passed.
    Deadline,
    /// Time to sample (the `recycle:` memory check, the accept queues).
    Sample,
}

impl Master {
    /// Runs the loop until the state machine asks to exit: the exit code.
    pub(super) async fn run_loop(&mut self, mut lp: Loop) -> i32 {
        loop {
            while let Some(event) = lp.queue.pop_front() {
                if let Some(code) = self.feed(event, &mut lp.queue) {
                    return code;
                }
            }
            self.after_turn();
            let wake = self.next_wake(&mut lp).await;
            if let Some(code) = self.on_wake(wake, &mut lp).await {
                return code;
            }
        }
    }

    /// The one door into the state machine: `event` handled, with the hooks each event needs
    /// (a dead worker's last output read before its exit is judged; a worker that became ready
    /// gets its liveness check), and the actions carried out; events they produce at once go
    /// to `queue`. The exit code when the state machine asks to exit.
    pub(super) fn feed(&mut self, event: Event, queue: &mut VecDeque<Event>) -> Option<i32> {
        if let Event::Exited { pid, .. } = event {
            self.drain_output(pid);
        }
        let ready = match &event {
            Event::Message {
                worker,
                message: baton_proto::WorkerMessage::Ready,
            } => Some(*worker),
            _ => None,
        };
        let actions = self.supervisor.handle(Instant::now(), event);
        if let Some(worker) = ready {
            self.start_liveness(worker);
        }
        self.apply(actions, queue)
    }

    /// What each turn of the loop ends with, once the events are handled: the service
    /// manager's status line, the registry of workers, QUIC steering, the configuration watch.
    fn after_turn(&mut self) {
        self.report();
        self.update_registry();
        self.steer();
        self.update_config_watch();
    }

    /// Waits for the next thing that needs the master, and says what it is.
    async fn next_wake(&mut self, lp: &mut Loop) -> Wake {
        let deadline = self.supervisor.next_deadline();
        let sampling = [self.next_memory_check(), self.queues.next_sample()]
            .into_iter()
            .flatten()
            .min();
        // While something drains, refresh the status line (time left) once a second.
        let refresh = (self.options.notify.is_some() && self.supervisor.draining())
            .then(|| Instant::now() + Duration::from_secs(1));
        let preflight_deadline = self.upgrades.pending.as_ref().map(|u| u.deadline);
        let (timer, task) = (lp.watchdog.as_mut(), lp.control_task.as_mut());
        let watchdog = async {
            match timer {
                Some(timer) => timer.tick().await,
                None => std::future::pending().await,
            }
        };
        let control_ended = async {
            match task {
                Some(task) => task.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = watchdog => Wake::Watchdog,
            () = sleep_until(refresh), if refresh.is_some() => Wake::Refresh,
            input = lp.inputs.recv(), if lp.inputs_open => Wake::Input(input),
            Some(news) = self.events_rx.recv() => Wake::News(news),
            Some(ask) = self.endpoint.asks.recv() => Wake::Metrics(ask),
            ended = control_ended => Wake::ControlEnded(ended),
            Some(request) = lp.control_rx.recv() => Wake::Control(request),
            Some(preflight) = self.upgrades.rx.recv() => Wake::Preflight(preflight),
            () = sleep_until(preflight_deadline), if preflight_deadline.is_some() => {
                Wake::PreflightExpired
            }
            () = sleep_until(deadline), if deadline.is_some() => Wake::Deadline,
            () = sleep_until(sampling), if sampling.is_some() => Wake::Sample,
        }
    }

    /// Acts on what woke the master. The exit code when that ends it.
    async fn on_wake(&mut self, wake: Wake, lp: &mut Loop) -> Option<i32> {
        match wake {
            Wake::Watchdog => self.notify(Notification::Watchdog),
            Wake::Refresh => {}
            Wake::Input(input) => lp.inputs_open = self.on_input(input, &mut lp.queue),
            Wake::News(news) => self.on_news(news, &mut lp.queue),
            Wake::Metrics(ask) => {
                let _ = ask.reply.send(self.page(ask.page));
            }
            Wake::ControlEnded(ended) => {
                lp.control_task = self.serve_control_again(ended, &lp.control_tx);
            }
            Wake::Control(request) => return self.on_control(request, &mut lp.queue),
            Wake::Preflight(preflight) => {
                return self.on_preflight(preflight, &mut lp.inputs, &mut lp.queue);
            }
            Wake::PreflightExpired => self.preflight_expired(),
            Wake::Deadline => {
                let open = lp.inputs_open;
                lp.inputs_open = self
                    .judge_deadline(&mut lp.inputs, open, &mut lp.queue)
                    .await;
            }
            Wake::Sample => {
                self.check_memory(&mut lp.queue);
                self.sample_queues();
            }
        }
        None
    }
}
