//! The master's state as it crosses a self-upgrade (`baton upgrade`): what the old program writes
//! into a sealed memory file before it execs the new one in place, and what the new one reads.
//!
//! The format is JSON with a `format` number. A master reads every format up to its own
//! ([`STATE_FORMAT`]) and refuses newer ones with a clear error; the old master asks the new
//! binary to decode the state (`baton upgrade-check`) before the exec, so a refusal leaves the
//! old master running. Fields added later must default, so that older states still decode; the
//! fixture `tests/fixtures/state-v1.json` keeps format 1 readable.
//!
//! Format 2 differs from format 1 in one place: the state machine's reload and drain durations
//! are fixed-bucket histograms ([`crate::histogram`]) instead of ever-growing lists, and a list
//! from format 1 is read into buckets.
//!
//! This state is baton's second boundary between programs, beside `baton-proto`: the
//! configuration types, the state machine and its private records cross it as they are
//! serialized here. Renaming a field of any of them changes this format.
//!
//! Times cross as absolute `CLOCK_MONOTONIC` nanoseconds (`codec::mono`), so deadlines
//! fire at the same moment after the upgrade as before it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use baton_proto::control::{ReloadVerdict, UpgradeInfo};
use serde::{Deserialize, Serialize};

use crate::config::{ControlConfig, ListenerConfig, NotifyAccess, WorkerConfig};
use crate::supervisor::{Generation, Intent, Supervisor, WorkerId};

/// The state format this master writes (and the newest it reads).
pub const STATE_FORMAT: u32 = 2;

/// Where the new master finds its state: the number of an inherited descriptor.
pub const STATE_FD_ENV: &str = "BATON_UPGRADE_STATE_FD";

/// The first words of `baton upgrade-check`'s answer; then `format=N version=V`.
pub const CHECK_OK: &str = "baton-upgrade-check ok";

/// Everything a master needs to carry on where its predecessor stopped. Descriptors are numbers
/// of descriptors inherited across the exec.
#[derive(Debug, Serialize, Deserialize)]
pub struct State {
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
    /// The state machine ([`Supervisor`]), decoded by [`decode`].
    pub supervisor: serde_json::Value,
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

/// Decodes a state of any format up to [`STATE_FORMAT`], with its state machine.
pub fn decode(bytes: &[u8]) -> Result<(State, Supervisor), StateError> {
    #[derive(Deserialize)]
    struct Header {
        format: u32,
    }
    let header: Header =
        serde_json::from_slice(bytes).map_err(|e| StateError::Invalid(e.to_string()))?;
    if header.format > STATE_FORMAT {
        return Err(StateError::TooNew {
            found: header.format,
        });
    }
    // Format 1 reads as format 2: its duration lists become histograms as they decode.
    let mut state: State =
        serde_json::from_slice(bytes).map_err(|e| StateError::Invalid(e.to_string()))?;
    let supervisor = serde_json::from_value(state.supervisor.take())
        .map_err(|e| StateError::Invalid(format!("supervisor: {e}")))?;
    Ok((state, supervisor))
}

/// The state machine as it goes into a [`State`].
pub fn supervisor_value(supervisor: &Supervisor) -> Result<serde_json::Value, StateError> {
    serde_json::to_value(supervisor).map_err(|e| StateError::Unwritable(format!("supervisor: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::Phase;

    /// A state written by the first format (a real master: two reloads, generation 2 draining
    /// with a client, generation 3 serving). Every later baton must still read it.
    const STATE_V1: &str = include_str!("../tests/fixtures/state-v1.json");

    #[test]
    fn a_format_1_state_still_decodes_with_its_generations_workers_and_history() {
        let (state, supervisor) = decode(STATE_V1.as_bytes()).unwrap();
        assert_eq!(state.format, 1);
        assert_eq!(state.from_version, "0.1.0");
        assert_eq!(state.sockets.len(), 1);
        assert_eq!(state.generations.len(), 2);
        assert_eq!(state.links.len(), 3);
        let phases: Vec<(u64, Phase, usize)> = supervisor
            .generations()
            .into_iter()
            .map(|(g, p, n)| (g.0, p, n))
            .collect();
        assert_eq!(
            phases,
            vec![(2, Phase::Draining, 1), (3, Phase::Serving, 2)]
        );
        assert_eq!(supervisor.history().count(), 2);
        assert!(supervisor.next_deadline().is_some(), "the drain deadline");
    }

    /// Where two JSON values differ: a list of paths. Integers that are monotonic times may
    /// differ by less than a millisecond (an `Instant` read back is re-anchored to now).
    fn differences(
        path: &str,
        a: &serde_json::Value,
        b: &serde_json::Value,
        out: &mut Vec<String>,
    ) {
        use serde_json::Value;
        match (a, b) {
            (Value::Object(a), Value::Object(b)) => {
                for key in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
                    let (x, y) = (&a.get(key), &b.get(key));
                    match (x, y) {
                        (Some(x), Some(y)) => differences(&format!("{path}.{key}"), x, y, out),
                        _ => out.push(format!("{path}.{key}: {x:?} vs {y:?}")),
                    }
                }
            }
            (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    differences(&format!("{path}[{i}]"), x, y, out);
                }
            }
            (Value::Number(x), Value::Number(y)) if x != y => {
                let near = match (x.as_i64(), y.as_i64()) {
                    (Some(x), Some(y)) => x > 1_000_000_000 && (x - y).abs() < 1_000_000,
                    _ => false,
                };
                if !near {
                    out.push(format!("{path}: {x} vs {y}"));
                }
            }
            (a, b) if a != b => out.push(format!("{path}: {a} vs {b}")),
            _ => {}
        }
    }

    #[test]
    fn a_format_1_state_encodes_back_to_the_same_json_but_for_the_histograms() {
        let (mut state, supervisor) = decode(STATE_V1.as_bytes()).unwrap();
        state.supervisor = supervisor_value(&supervisor).unwrap();
        let again: serde_json::Value = serde_json::from_slice(&encode(&state).unwrap()).unwrap();
        let fixture: serde_json::Value = serde_json::from_str(STATE_V1).unwrap();
        let mut diff = Vec::new();
        differences("", &fixture, &again, &mut diff);
        // Fields added to format 1 after the fixture was written: absent there, their default
        // here. Every other byte is the same.
        let added = [
            "upgrade_signal: None",
            "upgrade_timeout: None",
            "metrics_listen: None",
            "stop_delay: None",
            "stop_delayed_until: None",
            "failed_stop_timeout: None",
            "failed_at: None",
            "not_ready: None",
            "last_worker: None",
            "stable_at: None",
            "liveness: None",
            "replace: None",
            "replaced: None",
            "successor: None",
            "recycle: None",
            "cgroups: None",
            // A listener's options came later (all off by default).
            "options: None",
            // So did a rolling reload (`rollout`, none running).
            "rollout: None",
        ];
        diff.retain(|d| {
            !added.iter().any(|a| {
                d.ends_with(&format!("{a} vs Some(Null)"))
                    || d.contains(&format!(".{a} vs Some(Object"))
            })
        });
        // And `supervisor.watch` (default: no watch).
        diff.retain(|d| !d.ends_with(".spec.watch_config: None vs Some(Bool(false))"));
        // And the control socket's followers' own places (default 8).
        diff.retain(|d| d != ".control.config.max_followers: None vs Some(Number(8))");
        // And the pidfds held across the exec (none in a state from before them).
        diff.retain(|d| d != ".processes: None vs Some(Array [])");
        // And whether a worker replaces one that failed its liveness check (issue 28).
        diff.retain(|d| !d.ends_with(".replacement: None vs Some(Bool(false))"));
        // So did `cgroups` (default `auto`).
        diff.retain(|d| d != ".cgroups: None vs Some(String(\"auto\"))");
        // `output:` came later too; its default is `capture`.
        diff.retain(|d| !d.ends_with(".output: None vs Some(String(\"capture\"))"));
        // And the reload strategy (default all at once) and a program's name in the state
        // machine's copy (empty: a rolling reload then pairs programs by position).
        diff.retain(|d| {
            !d.ends_with(".reload: None vs Some(String(\"AllAtOnce\"))")
                && !d.ends_with(".strategy: None vs Some(String(\"AllAtOnce\"))")
                && !d.ends_with(".name: None vs Some(String(\"\"))")
        });
        diff.retain(|d| {
            d != ".supervisor.counters.replaced_unhealthy: None vs Some(Number(0))"
                && d != ".supervisor.counters.replaced_memory: None vs Some(Number(0))"
        });
        // Format 2: the durations are histograms now, with what the lists held.
        let counters = &again["supervisor"]["counters"];
        assert_eq!(counters["reload_durations"]["count"], 2, "{counters}");
        assert_eq!(counters["reload_durations"]["counts"][0], 2, "{counters}");
        assert_eq!(counters["drain_durations"]["count"], 1, "{counters}");
        diff.retain(|d| {
            !d.starts_with(".supervisor.counters.reload_durations: [")
                && !d.starts_with(".supervisor.counters.drain_durations: [")
        });
        assert!(diff.is_empty(), "{diff:#?}");
    }

    #[test]
    fn a_newer_format_is_refused_by_name_and_garbage_is_invalid() {
        let newer = STATE_V1.replacen("\"format\": 1", "\"format\": 99", 1);
        assert!(matches!(
            decode(newer.as_bytes()),
            Err(StateError::TooNew { found: 99 })
        ));
        let message = decode(newer.as_bytes()).unwrap_err().to_string();
        assert!(message.contains("format 99 is newer"), "{message}");
        assert!(matches!(
            decode(b"{\"format\": 1}"),
            Err(StateError::Invalid(_))
        ));
        assert!(matches!(
            decode(b"\x00garbage"),
            Err(StateError::Invalid(_))
        ));
    }
}
