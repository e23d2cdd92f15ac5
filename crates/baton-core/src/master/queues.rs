//! The kernel's side of the listeners: what waits in each accept queue before any worker sees
//! it. Read now for `baton status` and the metrics; sampled every 10 ms while a reload runs,
//! whose receipt then tells the fullest each queue was and what the kernel's drop counters
//! (`/proc/net/netstat`, for the master's network namespace) did from its start to its verdict;
//! and, with `supervisor.queue_watch`, sampled between reloads too, with a warning when a queue
//! stays nearly full or the kernel drops connections. Without a reload or `queue_watch` nothing
//! here wakes the master.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use baton_proto::ListenerAddress;
use baton_proto::control as proto;
use tracing::{info, warn};

use super::Master;
use crate::listeners::BoundSocket;
use crate::procnet::{self, ListenCounters};
use crate::supervisor::{Generation, Verdict};

/// How often the queues are sampled while a reload runs.
const DURING_RELOAD: Duration = Duration::from_millis(10);
/// A queue at or above this share of its limit at two samples in a row is nearly full.
const NEARLY_FULL_PERCENT: u64 = 80;
/// At most one warning per listener, and one about the drop counters, this often.
const WARN_EVERY: Duration = Duration::from_secs(30);
/// Receipts kept, by reload (as many as `baton history` shows).
const KEPT_RECEIPTS: usize = 100;
/// Removed listeners `baton status` still shows.
const KEPT_REMOVED: usize = 8;

/// A metric: name, type, help, samples (labels, value).
pub(super) type Metric = (
    &'static str,
    &'static str,
    &'static str,
    Vec<(String, String)>,
);

/// The accept queues' watch, receipts and removed listeners.
#[derive(Debug, Default)]
pub(super) struct QueueWatch {
    /// The reload being watched.
    reload: Option<Watching>,
    receipts: BTreeMap<u64, proto::ReloadReceipt>,
    /// The drops of every receipt so far (a metric).
    reload_drops: u64,
    removed: VecDeque<proto::ListenerStatus>,
    /// `supervisor.queue_watch`, and when it samples next.
    interval: Option<Duration>,
    watch_at: Option<Instant>,
    /// When the reload's queues are sampled next.
    reload_at: Option<Instant>,
    /// The counters at the last sample between reloads.
    last_counters: Option<ListenCounters>,
    /// Samples in a row each listener was nearly full, by name.
    nearly_full: HashMap<String, u32>,
    /// When each warning (by listener name, `""` for the counters) was last logged.
    warned: HashMap<String, Instant>,
}

/// A reload being watched: the counters at its start and each listener's fullest queue.
#[derive(Debug)]
struct Watching {
    before: Option<ListenCounters>,
    peaks: BTreeMap<String, proto::QueueNow>,
}

/// One listening socket the master holds, for this room: its name (the newest generation's),
/// configured backlog, the generations that hold it.
struct Held {
    name: String,
    backlog: u32,
    socket: Rc<BoundSocket>,
    generations: Vec<u64>,
}

impl QueueWatch {
    /// `queue_watch`: sample that often between reloads (`None`: only during reloads).
    pub(super) fn set_interval(&mut self, interval: Option<Duration>, now: Instant) {
        if self.interval != interval {
            self.interval = interval;
            self.last_counters = interval.and_then(|_| procnet::listen_counters());
            self.watch_at = interval.map(|i| now + i);
        }
    }

    /// When to sample next: every 10 ms while a reload runs, and at the watch's interval.
    pub(super) fn next_sample(&self) -> Option<Instant> {
        [self.reload_at, self.watch_at].into_iter().flatten().min()
    }

    fn warn_now(&mut self, key: &str, now: Instant) -> bool {
        match self.warned.get(key) {
            Some(&at) if now.duration_since(at) < WARN_EVERY => false,
            _ => {
                self.warned.insert(key.to_string(), now);
                true
            }
        }
    }
}

impl Master {
    /// Every socket the master holds, once each, with the generations that hold it.
    fn held_listeners(&self) -> Vec<Held> {
        let mut generations: Vec<&Generation> = self.resources.keys().collect();
        generations.sort();
        let mut held: Vec<Held> = Vec::new();
        // Each socket's place in `held`, by its address in memory (10 000 listeners: a search
        // of the list for each took most of the time of a `baton status`).
        let mut places: HashMap<*const BoundSocket, usize> = HashMap::new();
        for g in generations {
            for l in &self.resources[g].listeners {
                let place = places.get(&Rc::as_ptr(&l.socket)).copied();
                match place.and_then(|i| held.get_mut(i)) {
                    Some(h) => {
                        h.name = l.config.name.clone();
                        h.backlog = l.config.backlog;
                        h.generations.push(g.0);
                    }
                    None => {
                        places.insert(Rc::as_ptr(&l.socket), held.len());
                        held.push(Held {
                            name: l.config.name.clone(),
                            backlog: l.config.backlog,
                            socket: l.socket.clone(),
                            generations: vec![g.0],
                        });
                    }
                }
            }
        }
        held
    }

    /// The listeners for `baton status`: those held, with their queue now, then the last ones
    /// removed.
    /// Every listener held, with (`options`) or without its socket options read back from the
    /// kernel (a few system calls per listener: most of a status at 10 000 listeners).
    pub(super) fn listener_statuses(&self, options: bool) -> Vec<proto::ListenerStatus> {
        let held = self.held_listeners();
        let queues = Queues::of(&held);
        let mut out: Vec<proto::ListenerStatus> = held
            .into_iter()
            .map(|h| proto::ListenerStatus {
                kind: kind_of(h.socket.address()),
                address: h.socket.local().to_string(),
                backlog: h.backlog,
                generations: h.generations,
                state: if h.socket.stopped() {
                    proto::ListenerState::Draining
                } else {
                    proto::ListenerState::Open
                },
                closed_unix_ms: None,
                queue: queues.of_socket(&h.socket),
                options: options.then(|| h.socket.options_now()),
                name: h.name,
            })
            .collect();
        out.extend(self.queues.removed.iter().cloned());
        out
    }

    /// A listener closed (its last generation is gone): `baton status` shows it a while.
    pub(super) fn listener_closed(&mut self, name: &str, socket: &BoundSocket, backlog: u32) {
        let status = proto::ListenerStatus {
            name: name.to_string(),
            kind: kind_of(socket.address()),
            address: socket.local().to_string(),
            backlog,
            generations: Vec::new(),
            state: proto::ListenerState::Removed,
            closed_unix_ms: Some(self.unix_ms_ago(Duration::ZERO)),
            queue: None,
            options: None,
        };
        self.queues.removed.push_front(status);
        self.queues.removed.truncate(KEPT_REMOVED);
    }

    /// A reload starts (its generation is being prepared): note the counters, sample from now
    /// until its verdict.
    pub(super) fn watch_reload(&mut self) {
        let now = Instant::now();
        self.queues.reload = Some(Watching {
            before: procnet::listen_counters(),
            peaks: BTreeMap::new(),
        });
        self.sample_reload();
        self.queues.reload_at = Some(now + DURING_RELOAD);
    }

    fn sample_reload(&mut self) {
        let held = self.held_listeners();
        let Some(watching) = &mut self.queues.reload else {
            return;
        };
        let queues = Queues::of(&held);
        for h in held {
            if let Some(queue) = queues.of_socket(&h.socket) {
                let peak = watching.peaks.entry(h.name).or_insert(queue);
                peak.length = peak.length.max(queue.length);
                peak.max = queue.max;
            }
        }
    }

    /// The sampling timer fired: the reload's peaks, and the watch's warnings when it is due.
    pub(super) fn sample_queues(&mut self) {
        let now = Instant::now();
        if self.queues.reload.is_some() && !self.supervisor.reloading() {
            // A reload that ended without a verdict to take a receipt at: stop sampling.
            self.queues.reload = None;
            self.queues.reload_at = None;
        }
        if self.queues.reload_at.is_some_and(|at| at <= now) {
            self.sample_reload();
            self.queues.reload_at = Some(now + DURING_RELOAD);
        }
        if let (Some(at), Some(interval)) = (self.queues.watch_at, self.queues.interval) {
            if at <= now {
                self.watch_between_reloads(now);
                self.queues.watch_at = Some(now + interval);
            }
        }
    }

    fn watch_between_reloads(&mut self, now: Instant) {
        let held = self.held_listeners();
        let queues = Queues::of(&held);
        for h in held {
            let Some(queue) = queues.of_socket(&h.socket) else {
                continue;
            };
            let full = queue.max > 0
                && u64::from(queue.length) * 100 >= u64::from(queue.max) * NEARLY_FULL_PERCENT;
            let streak = self.queues.nearly_full.entry(h.name.clone()).or_default();
            *streak = if full { *streak + 1 } else { 0 };
            if *streak >= 2 && self.queues.warn_now(&h.name, now) {
                let how = if queue.length >= queue.max {
                    "full: the kernel drops new connections"
                } else {
                    "nearly full: once full, the kernel drops new connections"
                };
                warn!(event = baton_proto::event::QUEUE_NEARLY_FULL, listener = %h.name, length = queue.length,
                    max = queue.max,
                    "listener {}: accept queue {} of {} at two samples in a row, {how}; the workers do not accept fast enough, or a flood",
                    h.name, queue.length, queue.max);
            }
        }
        let Some(counters) = procnet::listen_counters() else {
            return;
        };
        let rose = self
            .queues
            .last_counters
            .map(|before| counters.since(before))
            .unwrap_or_default();
        self.queues.last_counters = Some(counters);
        if (rose.drops > 0 || rose.syncookies_sent > 0) && self.queues.warn_now("", now) {
            warn!(
                event = baton_proto::event::KERNEL_DROPS,
                drops = rose.drops,
                overflows = rose.overflows,
                syncookies_sent = rose.syncookies_sent,
                "the kernel dropped {} connections at listeners ({} into a full accept queue) and sent {} SYN cookies since the last sample; these counters cover the whole network namespace",
                rose.drops,
                rose.overflows,
                rose.syncookies_sent
            );
        }
    }

    /// The receipt of the reload `verdict` ends (if it was watched), logged and kept.
    pub(super) fn receipt(&mut self, verdict: &Verdict) -> Option<proto::ReloadReceipt> {
        let reload = verdict.reload?;
        self.queues.reload.as_ref()?;
        self.sample_reload();
        let watching = self.queues.reload.take()?;
        self.queues.reload_at = None;
        let rose = match (watching.before, procnet::listen_counters()) {
            (Some(before), Some(after)) => after.since(before),
            _ => ListenCounters::default(),
        };
        let receipt = proto::ReloadReceipt {
            listen_overflows: rose.overflows,
            listen_drops: rose.drops,
            syncookies_sent: rose.syncookies_sent,
            queues: watching
                .peaks
                .into_iter()
                .map(|(listener, q)| proto::QueuePeak {
                    listener,
                    peak: q.length,
                    max: q.max,
                })
                .collect(),
        };
        info!(
            event = baton_proto::event::RELOAD_RECEIPT,
            reload = reload.0,
            drops = rose.drops,
            overflows = rose.overflows,
            syncookies_sent = rose.syncookies_sent,
            "reload {}: {receipt}",
            reload.0
        );
        self.queues.reload_drops += rose.drops;
        self.queues.receipts.insert(reload.0, receipt.clone());
        while self.queues.receipts.len() > KEPT_RECEIPTS {
            self.queues.receipts.pop_first();
        }
        Some(receipt)
    }

    /// The receipt of reload `reload`, if it was kept.
    pub(super) fn receipt_of(&self, reload: u64) -> Option<proto::ReloadReceipt> {
        self.queues.receipts.get(&reload).cloned()
    }

    /// The metrics of this room: each listener's queue, the namespace's counters, the drops
    /// during reloads.
    pub(super) fn queue_metrics(&self) -> Vec<Metric> {
        let mut length = Vec::new();
        let mut max = Vec::new();
        let mut backlog = Vec::new();
        let held = self.held_listeners();
        let queues = Queues::of(&held);
        for h in held {
            let labels = format!("{{listener=\"{}\"}}", h.name);
            if let Some(q) = queues.of_socket(&h.socket) {
                length.push((labels.clone(), q.length.to_string()));
                max.push((labels.clone(), q.max.to_string()));
            }
            backlog.push((labels, h.backlog.to_string()));
        }
        let counters = procnet::listen_counters().unwrap_or_default();
        let one = |v: u64| vec![(String::new(), v.to_string())];
        vec![
            (
                "baton_listener_queue_length",
                "gauge",
                "Connections waiting in a listener's accept queue now.",
                length,
            ),
            (
                "baton_listener_queue_max",
                "gauge",
                "How many connections a listener's accept queue holds (the backlog the kernel applied).",
                max,
            ),
            (
                "baton_listener_backlog",
                "gauge",
                "A listener's configured backlog.",
                backlog,
            ),
            (
                "baton_kernel_listen_overflows_total",
                "counter",
                "ListenOverflows of the master's network namespace: handshakes completed into a full accept queue.",
                one(counters.overflows),
            ),
            (
                "baton_kernel_listen_drops_total",
                "counter",
                "ListenDrops of the master's network namespace: connections dropped at a listener.",
                one(counters.drops),
            ),
            (
                "baton_kernel_syncookies_sent_total",
                "counter",
                "SyncookiesSent of the master's network namespace.",
                one(counters.syncookies_sent),
            ),
            (
                "baton_reload_kernel_drops_total",
                "counter",
                "ListenDrops that rose during reloads (the sum of their receipts).",
                one(self.queues.reload_drops),
            ),
        ]
    }
}

fn kind_of(address: &ListenerAddress) -> proto::ListenerKind {
    match address {
        ListenerAddress::Tcp { .. } => proto::ListenerKind::Tcp,
        ListenerAddress::Unix { .. } => proto::ListenerKind::Unix,
        ListenerAddress::Udp { .. } => proto::ListenerKind::Udp,
        ListenerAddress::UnixDatagram { .. } => proto::ListenerKind::UnixDatagram,
    }
}

/// Reads the accept queues of many sockets at once: a TCP socket's with a system call of its
/// own, every Unix socket's from one dump of the namespace's listening Unix sockets (asked by
/// inode, one at a time, the kernel walks every Unix socket for each).
struct Queues {
    unix: Option<HashMap<u64, baton_sys::acceptq::AcceptQueue>>,
}

impl Queues {
    fn of(held: &[Held]) -> Queues {
        let unix = held
            .iter()
            .any(|h| matches!(h.socket.address(), ListenerAddress::Unix { .. }))
            .then(|| baton_sys::acceptq::unix_queues().ok())
            .flatten();
        Queues { unix }
    }

    fn of_socket(&self, socket: &BoundSocket) -> Option<proto::QueueNow> {
        let q = match socket.address() {
            ListenerAddress::Tcp { .. } => baton_sys::acceptq::accept_queue(socket.fd()).ok()?,
            ListenerAddress::Unix { .. } => {
                let inode = nix::sys::stat::fstat(socket.fd()).ok()?.st_ino;
                *self.unix.as_ref()?.get(&inode)?
            }
            // No queue of connections.
            ListenerAddress::Udp { .. } | ListenerAddress::UnixDatagram { .. } => return None,
        };
        Some(proto::QueueNow {
            length: q.length,
            max: q.max,
        })
    }
}
