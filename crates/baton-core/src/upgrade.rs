//! The master's state as it crosses a self-upgrade (`baton upgrade`): what the old program writes
//! into a sealed memory file before it execs the new one in place, and what the new one reads.
//!
//! The format is JSON with a `format` number. A master reads every format up to its own
//! ([`STATE_FORMAT`]) and refuses newer ones with a clear error; the old master asks the new
//! binary to decode the state (`baton upgrade-check`) before the exec, so a refusal leaves the
//! old master running.
//!
//! The state machine crosses in types of its own, one file per format: [`v3`] is written (and
//! converted from and to the supervisor's records, there alone), [`v2`] reads formats 1 and 2
//! into format 3. The envelope around it ([`State`]: descriptors, sockets, links) is the same
//! in every format. The fixtures `tests/fixtures/state-v1.json` and `state-v2.json` keep the
//! older formats readable (`upgrade/tests.rs`).
//!
//! This state is baton's second boundary between programs, beside `baton-proto`. The envelope
//! still carries configuration types as they serialize ([`ListenerConfig`], [`WorkerConfig`],
//! [`ControlConfig`]): renaming one of their fields changes this format, which the fixtures
//! catch.
//!
//! Times cross as absolute `CLOCK_MONOTONIC` nanoseconds (`codec::mono`), so deadlines
//! fire at the same moment after the upgrade as before it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use baton_proto::control::{ReloadVerdict, UpgradeInfo};
use serde::{Deserialize, Serialize};

use crate::config::{ControlConfig, ListenerConfig, NotifyAccess, WorkerConfig};
use crate::supervisor::{Generation, Intent, Supervisor, WorkerId};

mod v2;
pub mod v3;

/// The state format this master writes (and the newest it reads).
pub const STATE_FORMAT: u32 = 3;

/// Where the new master finds its state: the number of an inherited descriptor.
pub const STATE_FD_ENV: &str = "BATON_UPGRADE_STATE_FD";

/// The first words of `baton upgrade-check`'s answer; then `format=N version=V`.
pub const CHECK_OK: &str = "baton-upgrade-check ok";

/// Everything a master needs to carry on where its predecessor stopped. Descriptors are numbers
/// of descriptors inherited across the exec. `M`: the state machine, in the format written
/// ([`v3::Machine`]) or read; `()` once it is taken out.
#[derive(Debug, Serialize, Deserialize)]
pub struct State<M = v3::Machine> {
    pub format: u32,
    /// The version of the master that wrote this.
    pub from_version: String,
    /// Earlier self-upgrades of this master, oldest first.
    #[serde(default)]
    pub upgrades: Vec<UpgradeInfo>,
    pub config_path: PathBuf,
    pub runtime_dir: PathBuf,
    /// Whether the workers are contained in cgroups (`supervisor.cgroups`, as read at start).
    #[serde(default)]
    pub cgroups: crate::config::Cgroups,
    /// The argument vector and binary the master was started with.
    pub argv: Vec<String>,
    pub binary: PathBuf,
    #[serde(with = "crate::codec::mono")]
    pub started: Instant,
    pub started_unix_ms: u64,
    /// When the old master began the upgrade (for the verdict's duration).
    #[serde(default, with = "crate::codec::mono_opt")]
    pub upgrade_began: Option<Instant>,
    /// The state machine ([`Supervisor`]), taken out by [`decode`].
    pub supervisor: M,
    pub control: ControlState,
    /// Every listening socket some generation uses.
    pub sockets: Vec<SocketState>,
    pub generations: Vec<GenerationState>,
    pub links: Vec<LinkState>,
    /// Recent verdicts, for `baton reload --request N`.
    pub verdicts: Vec<ReloadVerdict>,
    /// Operator intents (signals) that arrived while the upgrade was under way: the new master
    /// acts on them first.
    #[serde(default)]
    pub intents: Vec<Intent>,
    /// Whether the service manager was told READY=1.
    pub told_ready: bool,
    /// Where the metrics endpoint listens: the new master binds it again (its socket does not
    /// survive the exec; scrapes during the exec are refused).
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The processes the master holds by pidfd (the only ones it signals), their pidfds kept
    /// across the exec. A state from a master before pidfds were kept has none: the new master
    /// opens pidfds for the workers' pids then (its children cannot have been reused, being
    /// unreaped; an announced main process is taken on trust that once).
    #[serde(default)]
    pub processes: Vec<ProcessState>,
}

/// One process held by a pidfd.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProcessState {
    pub worker: WorkerId,
    pub pid: u32,
    pub fd: i32,
    /// Announced by the worker (`MAINPID=`) and proven its own, not started by the master.
    pub announced: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ControlState {
    pub config: ControlConfig,
    /// The listening control socket.
    pub fd: i32,
    /// The connection of the client that asked for the upgrade: the new master answers on it.
    pub client: Option<i32>,
}

/// One listening socket.
#[derive(Debug, Serialize, Deserialize)]
pub struct SocketState {
    pub address: baton_proto::ListenerAddress,
    pub local: String,
    pub fd: i32,
    /// A Unix socket's file the master created (path, device, inode), removed when it closes.
    pub unix_file: Option<(PathBuf, u64, u64)>,
}

/// What one live generation holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct GenerationState {
    pub generation: Generation,
    /// Its listeners, in order, each with the index of its socket in [`State::sockets`].
    pub listeners: Vec<(ListenerConfig, usize)>,
    pub programs: Vec<WorkerConfig>,
    pub canary_window: Option<Duration>,
}

/// The master's side of one worker.
#[derive(Debug, Serialize, Deserialize)]
pub struct LinkState {
    pub worker: WorkerId,
    /// A baton-protocol worker's channel (past its handoff).
    pub channel: Option<i32>,
    /// A systemd-style worker's notify socket.
    pub notify: Option<NotifyLink>,
    /// Its captured output (`output: capture`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputState>,
    /// Its part in connection handoff (written since handoff exists; absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<HandoffState>,
}

/// A worker's part in connection handoff: whether it offers and takes connections, the links it
/// holds as a taker, the generations it hands from and to, what it reported handing off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffState {
    pub offers: bool,
    pub adopts: bool,
    #[serde(default)]
    pub links: usize,
    #[serde(default)]
    pub gives: Option<(u64, u64)>,
    #[serde(default)]
    pub reported: baton_proto::handoff::HandoffCounts,
}

/// A worker's captured output: who it is, and each stream's pipe with the line it had begun.
#[derive(Debug, Serialize, Deserialize)]
pub struct OutputState {
    pub program: String,
    pub generation: u64,
    pub slot: u64,
    pub pid: u32,
    pub streams: Vec<StreamState>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StreamState {
    pub stream: baton_proto::control::OutputStream,
    pub fd: i32,
    /// The bytes of a line not finished when the old program stopped reading.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partial: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NotifyLink {
    pub fd: i32,
    pub path: PathBuf,
    pub pid: u32,
    pub access: NotifyAccess,
}

/// Why a state cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state format {found} is newer than this baton understands (at most {STATE_FORMAT})")]
    TooNew { found: u32 },
    #[error("state unreadable: {0}")]
    Invalid(String),
    /// The state could not be written (a map with a non-text key, say): the upgrade fails and
    /// the master goes on.
    #[error("state not writable: {0}")]
    Unwritable(String),
}

/// The state as bytes, for the memory file.
pub fn encode(state: &State) -> Result<Vec<u8>, StateError> {
    serde_json::to_vec(state).map_err(|e| StateError::Unwritable(e.to_string()))
}

/// The state machine as it goes into a [`State`].
pub fn machine(supervisor: &Supervisor) -> v3::Machine {
    supervisor.parts().into()
}

/// Decodes a state of any format up to [`STATE_FORMAT`], with its state machine, checked whole
/// (a state machine whose records contradict each other is refused, by the first invariant
/// they break).
pub fn decode(bytes: &[u8]) -> Result<(State<()>, Supervisor), StateError> {
    #[derive(Deserialize)]
    struct Header {
        format: u32,
    }
    let invalid = |e: serde_json::Error| StateError::Invalid(e.to_string());
    let header: Header = serde_json::from_slice(bytes).map_err(invalid)?;
    let (state, machine) = match header.format {
        0 => return Err(StateError::Invalid("state format 0 does not exist".into())),
        1 | 2 => {
            let (state, old) = serde_json::from_slice::<State<v2::Machine>>(bytes)
                .map_err(invalid)?
                .take_machine();
            let machine = v3::Machine::try_from(old).map_err(|e| {
                StateError::Invalid(format!("supervisor (format {}): {e}", header.format))
            })?;
            (state, machine)
        }
        STATE_FORMAT => serde_json::from_slice::<State>(bytes)
            .map_err(invalid)?
            .take_machine(),
        found => return Err(StateError::TooNew { found }),
    };
    let supervisor = Supervisor::from_parts(machine.into())
        .map_err(|e| StateError::Invalid(format!("supervisor: {e}")))?;
    Ok((state, supervisor))
}

impl<M> State<M> {
    /// The state machine, and the rest of the state without it.
    fn take_machine(self) -> (State<()>, M) {
        self.replace_machine(())
    }

    /// The same state with `machine` in place of its state machine, which is returned.
    pub fn replace_machine<N>(self, machine: N) -> (State<N>, M) {
        let State {
            format,
            from_version,
            upgrades,
            config_path,
            runtime_dir,
            cgroups,
            argv,
            binary,
            started,
            started_unix_ms,
            upgrade_began,
            supervisor,
            control,
            sockets,
            generations,
            links,
            verdicts,
            intents,
            told_ready,
            metrics_listen,
            processes,
        } = self;
        let rest = State {
            format,
            from_version,
            upgrades,
            config_path,
            runtime_dir,
            cgroups,
            argv,
            binary,
            started,
            started_unix_ms,
            upgrade_began,
            supervisor: machine,
            control,
            sockets,
            generations,
            links,
            verdicts,
            intents,
            told_ready,
            metrics_listen,
            processes,
        };
        (rest, supervisor)
    }
}

#[cfg(test)]
mod tests;
