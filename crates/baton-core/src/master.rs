//! The master's event loop: gathers events, feeds the [`Supervisor`], carries out its actions.
//!
//! One task on a single-threaded runtime selects over three sources: operator input (intents and
//! "a child exited" from the binary's signal adapter), packets from worker channels (one small
//! task per worker reads its channel), and the state machine's next deadline. Nothing polls: with
//! no event and no deadline the loop sleeps in `epoll_wait`.
//!
//! Architecture invariant: the master never accepts on a listener and never reads or writes
//! client data. It hands listeners over and then only exchanges small control packets.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use baton_proto::{
    CHANNEL_FD_ENV, GENERATION_ENV, Hello, ListenerInfo, MAX_FDS_PER_MESSAGE, MAX_MESSAGE_SIZE,
    MasterMessage, PROTOCOL_VERSION, WORKER_ID_ENV, WorkerMessage,
};
use baton_sys::channel;
use baton_sys::process::{self, SignalNumber};
use tokio::net::UnixDatagram;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::config::{self, Config, WorkerConfig};
use crate::listeners::{BindError, GenerationListener, ListenerTable, Prepared};
use crate::supervisor::{Action, Event, Generation, GenerationSpec, Intent, Supervisor, WorkerId};

/// Input from outside the core: what the binary's signal adapter (or a test) sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Intent(Intent),
    /// SIGCHLD arrived: reap every exited child.
    ChildExited,
}

/// The number at which every worker finds its end of the channel.
const CHANNEL_FD: i32 = 3;

/// Invalid packets a worker may send before the master stops listening to it.
const MAX_INVALID_PACKETS: u32 = 100;

/// Environment variables of the master that describe *its* environment under systemd and must
/// not leak into a worker, where they would be wrong.
const MASTER_ONLY_ENV: [&str; 5] = [
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
];

/// What a generation holds while it lives.
#[derive(Debug)]
struct Resources {
    listeners: Vec<GenerationListener>,
    worker: Arc<WorkerConfig>,
}

#[derive(Debug)]
struct Link {
    commands: mpsc::UnboundedSender<MasterMessage>,
    task: tokio::task::AbortHandle,
}

/// The master: listeners, workers and the state machine.
#[derive(Debug)]
pub struct Master {
    config_path: PathBuf,
    /// The first generation's configuration and sockets, bound before the loop starts so that a
    /// busy port fails the start with a clear error.
    initial: Option<(Config, Prepared)>,
    table: ListenerTable,
    resources: HashMap<Generation, Resources>,
    links: HashMap<WorkerId, Link>,
    supervisor: Supervisor,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
}

impl Master {
    /// Binds the configured listeners. Nothing is spawned until [`Master::run`].
    pub fn new(config: Config) -> Result<Master, BindError> {
        let mut table = ListenerTable::default();
        let prepared = table.prepare(&config.listeners)?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Ok(Master {
            config_path: config.source.clone(),
            initial: Some((config, prepared)),
            table,
            resources: HashMap::new(),
            links: HashMap::new(),
            supervisor: Supervisor::new(),
            events_tx,
            events_rx,
        })
    }

    /// Where each listener of the first generation listens: `(name, address)`.
    pub fn listening(&self) -> Vec<(String, String)> {
        self.initial
            .iter()
            .flat_map(|(_, p)| &p.listeners)
            .map(|l| (l.config.name.clone(), l.socket.local().to_string()))
            .collect()
    }

    /// Runs until every worker is gone after a stop; returns the process exit code.
    ///
    /// Must run inside a tokio runtime (the binary uses a current-thread one). If `inputs`
    /// closes, the master stops gracefully.
    pub async fn run(mut self, mut inputs: mpsc::UnboundedReceiver<Input>) -> i32 {
        info!(event = "started", pid = std::process::id(), config = %self.config_path.display(),
            "baton {} master started (pid {})", env!("CARGO_PKG_VERSION"), std::process::id());
        for (name, address) in self.listening() {
            info!(event = "listening", listener = %name, address = %address,
                "listener {name} listening on {address}");
        }
        let mut queue = VecDeque::new();
        let actions = self.supervisor.start(Instant::now());
        if let Some(code) = self.apply(actions, &mut queue) {
            return code;
        }
        let mut inputs_open = true;
        loop {
            while let Some(event) = queue.pop_front() {
                let actions = self.supervisor.handle(Instant::now(), event);
                if let Some(code) = self.apply(actions, &mut queue) {
                    return code;
                }
            }
            let deadline = self.supervisor.next_deadline();
            tokio::select! {
                input = inputs.recv(), if inputs_open => match input {
                    Some(Input::Intent(intent)) => queue.push_back(Event::Intent(intent)),
                    Some(Input::ChildExited) => reap(&mut queue),
                    None => {
                        inputs_open = false;
                        let trigger = crate::supervisor::Trigger::Other("input closed".into());
                        queue.push_back(Event::Intent(Intent::Stop { graceful: true, trigger }));
                    }
                },
                Some(event) = self.events_rx.recv() => queue.push_back(event),
                () = sleep_until(deadline), if deadline.is_some() => queue.push_back(Event::Tick),
            }
        }
    }

    /// Carries out actions; events they produce at once go to `queue`. Returns the exit code
    /// when the state machine asks to exit.
    fn apply(&mut self, actions: Vec<Action>, queue: &mut VecDeque<Event>) -> Option<i32> {
        for action in actions {
            match action {
                Action::Prepare { generation } => {
                    let result = self.prepare(generation);
                    queue.push_back(Event::Prepared { generation, result });
                }
                Action::Spawn { worker, generation } => {
                    let result = self.spawn(worker, generation);
                    queue.push_back(Event::Spawned { worker, result });
                }
                Action::Send { worker, message } => {
                    if let Some(link) = self.links.get(&worker) {
                        let _ = link.commands.send(message);
                    }
                }
                Action::Signal { pid, signal } => {
                    if let Err(err) = process::signal_process(pid, signal) {
                        debug!(pid, "cannot send {} to pid {pid}: {err}", signal.as_str());
                    }
                }
                Action::Kill { pid } => {
                    // The worker leads its own process group: take its children with it. Signal
                    // the pid too, in case the worker moved itself to another group.
                    let _ = process::signal_group(pid, SignalNumber::SIGKILL);
                    let _ = process::signal_process(pid, SignalNumber::SIGKILL);
                }
                Action::Forget { worker } => {
                    if let Some(link) = self.links.remove(&worker) {
                        link.task.abort();
                    }
                }
                Action::Release { generation } => self.release(generation),
                Action::Exit { code } => return Some(code),
            }
        }
        None
    }

    fn prepare(&mut self, generation: Generation) -> Result<GenerationSpec, String> {
        let (config, prepared) = match self.initial.take() {
            Some(initial) => initial,
            None => {
                let config = config::load(&self.config_path).map_err(|e| e.to_string())?;
                let prepared = self
                    .table
                    .prepare(&config.listeners)
                    .map_err(|e| e.to_string())?;
                for l in &prepared.listeners {
                    if prepared.bound.contains(&l.config.name) {
                        info!(event = "listening", listener = %l.config.name,
                            address = %l.socket.local(), generation = generation.0,
                            "listener {} listening on {} (new in generation {generation})",
                            l.config.name, l.socket.local());
                    }
                }
                (config, prepared)
            }
        };
        let spec = GenerationSpec::from_config(&config);
        self.resources.insert(
            generation,
            Resources {
                listeners: prepared.listeners,
                worker: Arc::new(config.worker),
            },
        );
        Ok(spec)
    }

    fn spawn(&mut self, worker: WorkerId, generation: Generation) -> Result<u32, String> {
        let resources = self
            .resources
            .get(&generation)
            .ok_or_else(|| format!("generation {generation} has no resources"))?;
        let config = &resources.worker;
        let (ours, theirs) = channel::pair().map_err(|e| format!("socketpair: {e}"))?;
        let mut cmd = Command::new(&config.command);
        cmd.args(&config.args).stdin(Stdio::null()).process_group(0);
        for key in MASTER_ONLY_ENV {
            cmd.env_remove(key);
        }
        cmd.envs(&config.env)
            .env(CHANNEL_FD_ENV, CHANNEL_FD.to_string())
            .env(GENERATION_ENV, generation.to_string())
            .env(WORKER_ID_ENV, worker.to_string());
        if let Some(cwd) = &config.cwd {
            cmd.current_dir(cwd);
        }
        process::place_fds(&mut cmd, vec![(theirs, CHANNEL_FD)])
            .map_err(|e| format!("placing the channel: {e}"))?;
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot execute {}: {e}", config.command.display()))?;
        // Dropping a std Child neither waits nor kills: the master reaps by pid on SIGCHLD.
        let pid = child.id();
        drop(cmd);

        let hello = Hello {
            version: PROTOCOL_VERSION,
            generation: generation.0,
            worker_id: worker.0,
            listeners: resources
                .listeners
                .iter()
                .map(|l| ListenerInfo {
                    name: l.config.name.clone(),
                    address: l.config.address.clone(),
                })
                .collect(),
        };
        let fds = resources
            .listeners
            .iter()
            .map(|l| l.socket.duplicate())
            .collect::<Result<Vec<OwnedFd>, _>>();
        let channel = channel::into_async(ours);
        let (fds, channel) = match (fds, channel) {
            (Ok(fds), Ok(channel)) => (fds, channel),
            (Err(e), _) | (_, Err(e)) => {
                // The process runs but cannot get its listeners: it will fail its ready timeout.
                warn!(
                    worker = worker.0,
                    pid, "cannot hand over listeners to worker {worker}: {e}"
                );
                return Ok(pid);
            }
        };
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(link(
            worker,
            channel,
            hello,
            fds,
            commands_rx,
            self.events_tx.clone(),
        ));
        self.links.insert(
            worker,
            Link {
                commands,
                task: task.abort_handle(),
            },
        );
        Ok(pid)
    }

    fn release(&mut self, generation: Generation) {
        let Some(resources) = self.resources.remove(&generation) else {
            return;
        };
        for l in resources.listeners {
            // This generation held the last reference: the socket closes now.
            if Rc::strong_count(&l.socket) == 1 {
                info!(event = "listener_closed", listener = %l.config.name,
                    address = %l.socket.local(),
                    "listener {} ({}) closed: no generation uses it any more",
                    l.config.name, l.socket.local());
            }
        }
    }
}

fn reap(queue: &mut VecDeque<Event>) {
    loop {
        match process::reap_one() {
            Ok(Some((pid, status))) => queue.push_back(Event::Exited { pid, status }),
            Ok(None) => break,
            Err(err) => {
                warn!("waitpid failed: {err}");
                break;
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// One worker's channel: hands over the listeners, then forwards the worker's packets as events
/// and the master's commands as packets, until either side closes.
async fn link(
    worker: WorkerId,
    channel: UnixDatagram,
    hello: Hello,
    fds: Vec<OwnedFd>,
    mut commands: mpsc::UnboundedReceiver<MasterMessage>,
    events: mpsc::UnboundedSender<Event>,
) {
    if let Err(err) = handoff(&channel, hello, &fds).await {
        warn!(
            worker = worker.0,
            "handing listeners to worker {worker} failed: {err}"
        );
        return;
    }
    drop(fds);
    let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
    let mut invalid = 0u32;
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(message) => {
                    if let Err(err) = channel.send(&baton_proto::encode(&message)).await {
                        debug!(worker = worker.0, "cannot send to worker {worker}: {err}");
                    }
                }
                None => return,
            },
            received = channel::recv_with_fds(&channel, &mut buf, 1) => {
                let packet = match received {
                    // End of stream: the worker closed its end (or exited). Stop reading, or a
                    // closed socket would wake this loop forever.
                    Ok(r) if r.len == 0 => {
                        debug!(worker = worker.0, "worker {worker} closed its channel");
                        return;
                    }
                    Ok(r) if r.truncated || !r.fds.is_empty() || r.fds_truncated => Err(
                        "oversized packet or unexpected descriptors".to_string(),
                    ),
                    Ok(r) => baton_proto::decode::<WorkerMessage>(&buf[..r.len])
                        .map_err(|e| format!("{e:#}")),
                    // A SEQPACKET peer that exits with unread packets resets instead of closing.
                    Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {
                        debug!(worker = worker.0, "worker {worker} closed its channel (reset)");
                        return;
                    }
                    Err(err) => {
                        warn!(worker = worker.0, "reading the channel of worker {worker}: {err}");
                        return;
                    }
                };
                match packet {
                    Ok(message) => {
                        if events.send(Event::Message { worker, message }).is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        invalid += 1;
                        if invalid == 1 {
                            warn!(event = "worker_protocol_error", worker = worker.0,
                                "worker {worker} sent an invalid packet: {err}");
                        }
                        if invalid >= MAX_INVALID_PACKETS {
                            warn!(event = "worker_protocol_error", worker = worker.0,
                                "worker {worker} sent {invalid} invalid packets: no longer listening to it");
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// Sends the manifest, then the descriptors in chunks of at most `SCM_MAX_FD`.
async fn handoff(channel: &UnixDatagram, hello: Hello, fds: &[OwnedFd]) -> std::io::Result<()> {
    let hello = baton_proto::encode(&MasterMessage::Hello(hello));
    channel::send_with_fds(channel, &hello, &[]).await?;
    for (i, chunk) in fds.chunks(MAX_FDS_PER_MESSAGE).enumerate() {
        let header = MasterMessage::Fds {
            first: i * MAX_FDS_PER_MESSAGE,
            count: chunk.len(),
        };
        let borrowed: Vec<_> = chunk.iter().map(|fd| fd.as_fd()).collect();
        channel::send_with_fds(channel, &baton_proto::encode(&header), &borrowed).await?;
    }
    Ok(())
}
