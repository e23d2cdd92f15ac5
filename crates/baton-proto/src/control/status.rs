//! What `baton status` reports (`Response::Status`): the master, its listeners with their
//! queues and options, its generations and workers, a rollout in progress, memory and crash
//! loops. Re-exported by `control`.

use serde::{Deserialize, Serialize};

use super::{ReloadReceipt, UpgradeInfo};

/// One listening socket, as `baton status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    pub kind: ListenerKind,
    /// Where it listens (the kernel's address: the port chosen for port 0).
    pub address: String,
    /// The configured backlog (the kernel caps it at `net.core.somaxconn`: see `queue.max`).
    pub backlog: u32,
    /// The generations that hold it, oldest first.
    pub generations: Vec<u64>,
    pub state: ListenerState,
    /// Removed: when it closed (Unix time, ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_unix_ms: Option<u64>,
    /// Its accept queue now, read from the kernel (none once closed, or if it cannot be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueNow>,
    /// Its options as the kernel reports them (none once closed, nor in a brief status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<ListenerOptionsNow>,
}

/// A listening socket's options, read back from the kernel (`getsockopt`; a Unix socket's file
/// from the file system). Each is absent where it does not apply or could not be read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerOptionsNow {
    /// `TCP_DEFER_ACCEPT`, in seconds (the kernel rounds up to whole SYN-ACK retransmissions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defer_accept_s: Option<u32>,
    /// `TCP_FASTOPEN` queue length (0: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fastopen: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v6only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freebind: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transparent: Option<bool>,
    /// `SO_BINDTODEVICE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// `TCP_NODELAY`, which accepted sockets inherit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodelay: Option<bool>,
    /// `SO_KEEPALIVE` and its timings, which accepted sockets inherit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<KeepaliveNow>,
    /// `SO_MARK`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mark: Option<u32>,
    /// A Unix socket file's permission bits, owner and group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u32>,
    /// `SO_RCVBUF` and `SO_SNDBUF`, in bytes, as the kernel reports them (twice what was asked:
    /// the kernel counts its bookkeeping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recv_buffer: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_buffer: Option<u64>,
    /// `O_NONBLOCK` of the socket, which every process holding it shares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonblocking: Option<bool>,
}

/// TCP keep-alive as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepaliveNow {
    pub on: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
}

/// A listener's accept queue now: connections waiting for an `accept`, and how many may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueNow {
    pub length: u32,
    pub max: u32,
}

pub(super) fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One reload, for `baton history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadRecord {
    pub reload: u64,
    pub generation: u64,
    /// The requests it covered, with who asked: `#3 SIGUSR2 from pid 12`.
    pub requests: Vec<String>,
    pub started_unix_ms: u64,
    pub duration_ms: u64,
    pub ok: bool,
    pub reason: Option<String>,
    /// What the kernel did with connections during it (not kept across `baton upgrade`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<ReloadReceipt>,
    /// Connections the draining generation handed to this reload's generation (connection
    /// handoff, as the givers report; it goes on after the verdict, while they drain; not
    /// kept across `baton upgrade`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<crate::handoff::HandoffCounts>,
}

/// Everything `baton status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusSnapshot {
    pub master: MasterStatus,
    pub generations: Vec<GenerationStatus>,
    /// Every listening socket (and the last ones removed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<ListenerStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MasterStatus {
    pub pid: u32,
    pub version: String,
    pub uptime_ms: u64,
    pub config: String,
    pub state: MasterState,
    /// The reload running now.
    pub reload: Option<RunningReload>,
    /// Requests queued behind it.
    pub queued_requests: Vec<u64>,
    /// Stopping, still serving for this long (`supervisor.stop_delay`) before it drains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_delay_left_ms: Option<u64>,
    /// Self-upgrades of this master (same pid), oldest first.
    #[serde(default)]
    pub upgrades: Vec<UpgradeInfo>,
    /// A rolling reload in progress (forward, or rolling back after a failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// The settings read only at start, as this master uses them (`supervisor.control.socket`,
    /// `supervisor.runtime_dir`, ...): `baton check` compares a file with them.
    #[serde(default)]
    pub start_settings: std::collections::BTreeMap<String, String>,
}

/// A rolling reload: which generation replaces which, and each program's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStatus {
    pub reload: u64,
    /// The generation being replaced and the one replacing it (rolling back: the other way).
    pub from_generation: u64,
    pub to_generation: u64,
    /// Rolling back: why the reload failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling_back: Option<String>,
    pub programs: Vec<RolloutProgram>,
}

/// One program of a [`RolloutStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutProgram {
    pub program: String,
    /// Workers of the generation being filled that are ready, of how many.
    pub replaced: u64,
    pub processes: u64,
    /// Workers started at a time; the batch in flight (1-based) and the number of batches.
    pub batch_size: u64,
    pub batch: u64,
    pub batches: u64,
    pub step: RolloutStep,
    /// Time in this step.
    pub step_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningReload {
    pub reload: u64,
    pub generation: u64,
    pub covers: Vec<u64>,
    pub running_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationStatus {
    pub generation: u64,
    pub state: GenerationState,
    /// Draining: how long so far, and the time left before the last worker is killed.
    pub draining_ms: Option<u64>,
    pub time_left_ms: Option<u64>,
    /// When the last worker is killed (Unix time, ms).
    pub deadline_unix_ms: Option<u64>,
    pub workers: Vec<WorkerStatus>,
    /// Programs whose workers keep crashing (3 crashes in a row of one slot): the generation
    /// is degraded while this is not empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<CrashLoopStatus>,
    /// The sum of its workers' memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStatus>,
    /// What its workers handed off so far as they drained (connection handoff, as they
    /// report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<crate::handoff::HandoffCounts>,
}

/// Memory of a worker (its process and every descendant), or the sum over a generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStatus {
    /// Resident set: pages in memory (a page shared by two processes counts in both).
    pub rss_kib: u64,
    /// Proportional set: a shared page divided among its sharers.
    pub pss_kib: u64,
    /// Processes counted.
    pub processes: u32,
}

/// A crash-looping program of a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrashLoopStatus {
    pub program: String,
    /// The most crashes in a row of one of its slots.
    pub crashes: u32,
    /// How that slot's last worker ended.
    pub last_exit: Option<String>,
    /// The soonest restart of one of its slots waiting out its backoff.
    pub restart_in_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub worker: u64,
    pub program: String,
    pub slot: usize,
    pub pid: Option<u32>,
    pub state: WorkerState,
    pub started_unix_ms: u64,
    pub ready_after_ms: Option<u64>,
    /// Restarts of this slot (crash replacements) so far.
    pub restarts: u32,
    /// How the previous process of this slot ended.
    pub last_exit: Option<String>,
    /// Open connections: reported by the worker, or counted from the kernel.
    pub connections: Option<u64>,
    pub connections_source: Option<ConnectionsSource>,
    /// The last status line the worker sent.
    pub status: Option<String>,
    /// `backoff`: when the slot's next worker starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_in_ms: Option<u64>,
    /// Its memory, read from `/proc` when the status was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStatus>,
    /// What the master last refused from it (a `MAINPID=` naming a process not its own), with
    /// how many times so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// Defines a state enum serialized as its name, each name written once.
macro_rules! state_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$doc])*
        ///
        /// A name this build does not know (from a newer master) reads as `Unknown`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant,)+
            /// A state this build does not know; never produced by this build's master.
            #[serde(other, rename = "unknown")]
            Unknown,
        }

        impl $name {
            /// Every state this build produces, in lifecycle order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The name, as serialized.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                    $name::Unknown => "unknown",
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

state_enum!(
    /// What a listening socket is.
    ListenerKind {
        Tcp = "tcp",
        Unix = "unix",
        Udp = "udp",
        UnixDatagram = "unix-datagram",
    }
);

state_enum!(
    /// Where a listening socket is in its life.
    ListenerState {
        /// The serving generation has it: it accepts new connections.
        Open = "open",
        /// Only draining generations hold it: it refuses new connections while they finish.
        Draining = "draining",
        /// Closed: no generation holds it any more.
        Removed = "removed",
    }
);

state_enum!(
    /// What the master is doing.
    MasterState {
        Idle = "idle",
        /// A reload runs.
        Reloading = "reloading",
        /// A reload's new generation serves on probation (`canary_window`).
        Probation = "probation",
        Stopping = "stopping",
    }
);

state_enum!(
    /// The phase of a generation.
    GenerationState {
        /// Its configuration is read and its listeners bound.
        Preparing = "preparing",
        /// Its workers start; not yet serving.
        Starting = "starting",
        /// Its workers replace the serving generation's a batch at a time (a rolling reload);
        /// those ready serve.
        Rolling = "rolling",
        Serving = "serving",
        /// Replaced by a generation on probation: paused, ready to serve again.
        Standby = "standby",
        Draining = "draining",
        /// Its reload failed; its workers are being killed.
        Failed = "failed",
    }
);

state_enum!(
    /// Where one program of a rolling reload is.
    RolloutStep {
        /// A batch of new workers starts; the step ends when each is ready.
        Starting = "starting",
        /// The first batch serves on probation (`canary_window`) beside every old worker.
        Probation = "probation",
        /// As many old workers drain; the next batch starts once they are gone.
        Retiring = "retiring",
        /// The next batch waits for room: workers of earlier generations still drain.
        Waiting = "waiting",
        /// Every worker of the program is replaced.
        Done = "done",
    }
);

state_enum!(
    /// The state of one worker process.
    WorkerState {
        /// Asked to spawn; no pid yet.
        Spawning = "spawning",
        /// Running, not yet ready.
        Starting = "starting",
        Ready = "ready",
        Draining = "draining",
        /// SIGKILL sent; waiting to be reaped.
        Killed = "killed",
        /// Crashed; its slot waits out the restart backoff (`restart_in_ms`).
        Backoff = "backoff",
    }
);

state_enum!(
    /// Where a worker's connection count comes from.
    ConnectionsSource {
        /// The worker reported it (baton protocol status packets).
        Reported = "reported",
        /// Counted from the kernel's established sockets of its pid.
        Kernel = "kernel",
    }
);
