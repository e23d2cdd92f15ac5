//! The YAML configuration: types, loading and validation.
//!
//! Validation lives in `Deserialize` implementations wherever one value is enough to judge
//! (addresses, durations, signals, modes, counts), so a bad value is reported with the file, line
//! and column the YAML parser knows. Checks that need the whole file (duplicate names, the worker
//! command on disk) run after parsing and name the key instead.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_proto::ListenerAddress;
use baton_sys::process::SignalNumber;
use serde::{Deserialize, Serialize};

mod listener;
mod locate;
mod program;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

use locate::location_prefix;

/// The whole configuration of one master.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// The file this was read from; reloads read it again.
    pub source: PathBuf,
    pub listeners: Vec<ListenerConfig>,
    /// The worker programs: every generation runs all of them.
    pub programs: Vec<WorkerConfig>,
    pub supervisor: SupervisorConfig,
}

/// One listening socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerConfig {
    pub name: String,
    pub address: ListenerAddress,
    /// `listen(2)` backlog.
    pub backlog: u32,
    /// Permission bits of a Unix socket's file.
    pub mode: Option<u32>,
    /// Socket options, applied at bind (those a bound socket can take again at each reload).
    #[serde(default)]
    pub options: ListenerOptions,
}

/// A listener's socket options (docs/configuration.md): TCP ones, then the Unix file's owner.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ListenerOptions {
    /// `TCP_DEFER_ACCEPT`: queue a connection for `accept` only once data arrived.
    pub defer_accept: Option<Duration>,
    /// `TCP_FASTOPEN`: the queue of connections whose SYN carried data.
    pub fastopen: Option<u32>,
    /// `IPV6_V6ONLY` (IPv6 addresses; baton's default: true, only IPv6).
    pub v6only: Option<bool>,
    /// `IP_FREEBIND`: bind an address not (yet) on this machine.
    pub freebind: bool,
    /// `IP_TRANSPARENT`: accept connections to any address routed here (needs CAP_NET_ADMIN).
    pub transparent: bool,
    /// `SO_BINDTODEVICE`: only connections that arrive on this interface.
    pub interface: Option<String>,
    /// `TCP_NODELAY` on every accepted socket (they inherit it from the listener).
    pub nodelay: bool,
    /// `SO_KEEPALIVE` (and its timings) on every accepted socket.
    pub keepalive: Option<Keepalive>,
    /// `SO_MARK` (needs CAP_NET_ADMIN).
    pub mark: Option<u32>,
    /// A Unix socket file's owner and group.
    pub owner: Option<u32>,
    pub group: Option<u32>,
    /// `SO_RCVBUF` and `SO_SNDBUF` in bytes (a datagram server's burst room); `None`: the
    /// host's default.
    #[serde(default)]
    pub recv_buffer: Option<u64>,
    #[serde(default)]
    pub send_buffer: Option<u64>,
    /// `quic: true` (UDP): a socket per generation, steered by connection ID (docs/quic.md).
    #[serde(default)]
    pub quic: bool,
    /// `O_NONBLOCK` on the socket handed over (any kind), like systemd's `NonBlocking=`: set,
    /// cleared, or (`None`) left as the socket is. It belongs to the socket, shared by every
    /// process that holds it.
    #[serde(default)]
    pub nonblocking: Option<bool>,
}

/// TCP keep-alive of accepted sockets; `None`: the host's default (`net.ipv4.tcp_keepalive_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keepalive {
    pub idle: Option<Duration>,
    pub interval: Option<Duration>,
    pub count: Option<u32>,
}

/// How to run one worker program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerConfig {
    /// The program's name (`worker` when the file has a single `worker:` section).
    pub name: String,
    /// Absolute or `PATH`-resolved program.
    pub command: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    /// Processes per generation.
    pub processes: usize,
    /// How long a new worker may take to report ready.
    pub ready_timeout: Duration,
    /// How long a retired generation may drain before it is killed.
    pub drain_timeout: Duration,
    /// How long a worker of a failed generation (never ready, or a sibling failed) may finish
    /// what it accepted, after its drain request, before it is killed.
    #[serde(default = "default_failed_stop_timeout")]
    pub failed_stop_timeout: Duration,
    /// Signal sent to each worker of a retired generation, besides the channel's drain message.
    #[serde(with = "crate::codec::signal_opt")]
    pub drain_signal: Option<SignalNumber>,
    /// First delay before a crashed worker is restarted; doubles on each crash in a row.
    pub restart_backoff: Duration,
    /// Upper bound of that delay. A worker that ran this long resets the sequence.
    pub restart_backoff_max: Duration,
    /// How the worker receives its listeners.
    pub protocol: Protocol,
    /// How the master learns the worker is ready.
    pub ready: Readiness,
    /// Who may send notifications on a systemd-style worker's `NOTIFY_SOCKET`.
    pub notify_access: NotifyAccess,
    /// Indices into [`Config::listeners`] of the listeners this program gets, in order.
    pub listeners: Vec<usize>,
    /// Run the workers as this user and group (supplementary groups cleared). `None`: as the
    /// master.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// File mode creation mask of the workers.
    pub umask: Option<u32>,
    /// Resource limits of the workers.
    pub rlimits: Rlimits,
    /// Where the workers' standard output and error go.
    #[serde(default)]
    pub output: Output,
    /// How a ready worker is judged alive, if it is (`liveness:`).
    #[serde(default)]
    pub liveness: Option<Liveness>,
    /// When a worker that uses too much memory is replaced (`recycle:`).
    #[serde(default)]
    pub recycle: Option<Recycle>,
    /// How a reload replaces this program's workers (`reload:`), its batch resolved.
    #[serde(default)]
    pub reload: crate::supervisor::Strategy,
    /// The most connections a draining worker of this program offers per second, over all
    /// its handoff links (`handoff_rate:`).
    #[serde(default = "default_handoff_rate")]
    pub handoff_rate: u32,
}

/// Default `handoff_rate` (also for states written before the setting existed).
pub const DEFAULT_HANDOFF_RATE: u32 = 10_000;

fn default_handoff_rate() -> u32 {
    DEFAULT_HANDOFF_RATE
}

/// `recycle:`: a ready worker whose process tree stays above `max_rss` for `above_for` is
/// replaced: a new worker starts, and once it is ready the old one drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recycle {
    pub max_rss_kib: u64,
    /// How often the master reads the workers' memory.
    pub check_every: Duration,
    /// How long a worker must stay above `max_rss` (every check in a row).
    pub above_for: Duration,
}

/// Resource limits set in each worker before it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimits {
    /// `RLIMIT_NOFILE`.
    #[serde(default)]
    pub nofile: Option<u64>,
    /// `RLIMIT_CORE`, in bytes (0: no core dumps).
    #[serde(default)]
    pub core: Option<u64>,
}

/// How a worker receives its listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// baton's channel at fd 3 (`docs/protocol.md`).
    Baton,
    /// systemd socket activation: listeners at fds 3.., `LISTEN_FDS`, `LISTEN_FDNAMES`,
    /// `LISTEN_PID`, and a `NOTIFY_SOCKET` of its own.
    Systemd,
}

/// How the master learns a new worker is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Readiness {
    /// A `ready` packet on the baton channel.
    Channel,
    /// `READY=1` on the worker's `NOTIFY_SOCKET`.
    Notify,
    /// Ready this long after it started.
    Delay(Duration),
    /// A probe that succeeds: a TCP connect or an HTTP GET answered with a 2xx status.
    Probe(Probe),
    /// Every one of these (`ready: {all: [notify, {http: ...}]}`): at most one probe and one
    /// delay, no `all` inside.
    All(Vec<Readiness>),
}

impl Readiness {
    /// The probe among the conditions, if any.
    pub fn probe(&self) -> Option<&Probe> {
        match self {
            Readiness::Probe(probe) => Some(probe),
            Readiness::All(all) => all.iter().find_map(Readiness::probe),
            _ => None,
        }
    }

    /// The delay among the conditions, if any.
    pub fn delay(&self) -> Option<Duration> {
        match self {
            Readiness::Delay(delay) => Some(*delay),
            Readiness::All(all) => all.iter().find_map(Readiness::delay),
            _ => None,
        }
    }
}

/// A readiness probe of one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// `{worker}`, `{slot}` and `{generation}` are replaced per worker; the result is also given
    /// to the worker as `BATON_PROBE_ADDRESS`.
    pub address: String,
    /// `Some(path)`: HTTP GET; `None`: a TCP (or Unix stream) connect.
    pub http_path: Option<String>,
    /// One attempt's limit.
    pub timeout: Duration,
    /// Pause between attempts.
    pub interval: Duration,
}

impl Probe {
    /// The probe address of one worker.
    pub fn address_for(&self, worker: u64, slot: usize, generation: u64) -> String {
        self.address
            .replace("{worker}", &worker.to_string())
            .replace("{slot}", &slot.to_string())
            .replace("{generation}", &generation.to_string())
    }

    /// Whether each worker has an address of its own (the address names the worker, or its
    /// generation and slot): then what is found there before it starts is a leftover.
    pub fn is_per_worker(&self) -> bool {
        self.address.contains("{worker}")
            || (self.address.contains("{generation}") && self.address.contains("{slot}"))
    }
}

/// How a ready worker is judged alive (`liveness:`): a failing one is replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Liveness {
    pub check: LivenessCheck,
    /// Probe failures in a row that condemn a worker (a watchdog condemns at its first silent
    /// window).
    pub threshold: u32,
    /// At most this percentage of a generation's workers are being replaced for failing at once
    /// (at least one): a machine that stalls does not lose every worker.
    pub max_replacing_percent: u32,
    /// A condemned worker gets its drain request and signal, and SIGKILL this much later.
    pub kill_after: Duration,
}

/// What a liveness check is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LivenessCheck {
    /// A TCP connect or an HTTP GET answered `2xx`, every `interval`, each within `timeout`.
    Probe(Probe),
    /// The worker proves it is alive at least once per this window: a `heartbeat` packet (the
    /// Rust SDK sends them by itself) or `WATCHDOG=1` on its notify socket (`WATCHDOG_USEC` is
    /// set for it).
    Watchdog(Duration),
}

/// Where a program's standard output and error go (`output:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    /// Through a pipe per stream to the master, which logs each line with its program,
    /// generation, worker, slot, pid and stream, and keeps the last ones for `baton logs`.
    #[default]
    Capture,
    /// The master's own standard output and error, shared as they are (lines unattributed, a
    /// worker's half-written line can meet the master's).
    Inherit,
}

/// Who may notify for a systemd-style worker (like systemd's `NotifyAccess=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyAccess {
    /// The worker process, or the pid it announced with `MAINPID=`.
    #[default]
    Main,
    /// Also any process of the worker's process group (its children).
    All,
}

/// Settings of the master itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorConfig {
    /// Most generations allowed to drain at once; the oldest is killed to make room.
    pub max_draining: usize,
    /// Forward SIGUSR1 to workers (for workers that reopen their logs on it).
    pub forward_usr1: bool,
    /// Where the master keeps its runtime files (systemd-style workers' notify sockets).
    pub runtime_dir: PathBuf,
    pub control: ControlConfig,
    /// After a reload, how long the new generation is on probation while the old one stands by
    /// (paused, ready to take over). `None`: no probation, the old generation drains at once.
    pub canary_window: Option<Duration>,
    /// A signal that upgrades the master in place, as `baton upgrade` does (SIGURG or SIGWINCH:
    /// both are ignored by default, so one sent to a baton without this setting is harmless).
    /// `None`: only `baton upgrade` does.
    #[serde(default, with = "crate::codec::signal_opt")]
    pub upgrade_signal: Option<SignalNumber>,
    /// How long the new program may take to check the state during an upgrade.
    #[serde(default = "default_upgrade_timeout")]
    pub upgrade_timeout: Duration,
    /// On a graceful stop, how long to go on serving (and accepting) before draining: the time
    /// a load balancer (Kubernetes' endpoints) takes to stop sending new connections. Zero:
    /// drain at once.
    #[serde(default)]
    pub stop_delay: Duration,
    /// `supervisor.watch: [config]`: a change of the configuration file (inotify, its symlink
    /// chain included) reloads.
    #[serde(default)]
    pub watch_config: bool,
    /// Where the master serves `GET /metrics` over HTTP (the text of `baton metrics`), if
    /// anywhere.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// The master's log file and pid file (`--log-file` and `--pid-file` win over them).
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
    /// Whether workers are contained in cgroups where the master can create them.
    #[serde(default)]
    pub cgroups: Cgroups,
    /// How often to sample the listeners' accept queues and the kernel's drop counters between
    /// reloads, warning when a queue stays nearly full or drops rise. `None` (the default): the
    /// master does not wake up for it.
    #[serde(default)]
    pub queue_watch: Option<Duration>,
}

/// `supervisor.cgroups`: contain workers' process trees in cgroups (one per program of each
/// generation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cgroups {
    /// Where the master can write the cgroup2 hierarchy (root, or `Delegate=yes`).
    #[default]
    Auto,
    /// Process groups only.
    Off,
}

impl SupervisorConfig {
    /// The files this configuration names for the master.
    pub fn own_files(&self) -> OwnFiles {
        OwnFiles {
            log_file: self.log_file.clone(),
            pid_file: self.pid_file.clone(),
        }
    }
}

/// The master's own files, as it uses them (the command line's, or the configuration's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnFiles {
    pub log_file: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
}

/// The control socket (`baton status`, `baton reload`, ...). Bound once, at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlConfig {
    pub socket: PathBuf,
    /// Permission bits of the socket file (0600: only the owner can even connect).
    pub mode: u32,
    /// A group whose members may use read-only commands (`status`, `history`); the socket file
    /// is given to this group.
    pub read_group: Option<u32>,
    /// Users and groups (besides root and the master's own user) allowed to change things.
    pub allow_uids: Vec<u32>,
    pub allow_gids: Vec<u32>,
    /// How long a client may take to send its request (and to read the answer).
    pub timeout: Duration,
    /// Clients served at once; more wait in the socket's backlog. A few more places are kept
    /// for users who may change the master ([`crate::control::RESERVED_FOR_CHANGES`]).
    pub max_clients: usize,
    /// `baton logs --follow` clients at once, apart from `max_clients` (a follower stays).
    #[serde(default = "default_max_followers")]
    pub max_followers: usize,
}

fn default_max_followers() -> usize {
    8
}

/// The settings a master reads only when it starts, by name, as text: a reload that changes
/// them in the file says so ([`start_only_changes`]) instead of ignoring them silently.
pub fn start_only_settings(
    control: &ControlConfig,
    runtime_dir: &Path,
    files: &OwnFiles,
) -> BTreeMap<String, String> {
    let file = |path: &Option<PathBuf>| {
        path.as_ref()
            .map_or_else(|| "none".into(), |p| p.display().to_string())
    };
    let list = |ids: &[u32]| {
        ids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    [
        (
            "supervisor.control.socket",
            control.socket.display().to_string(),
        ),
        ("supervisor.control.mode", format!("{:04o}", control.mode)),
        (
            "supervisor.control.read_group",
            control
                .read_group
                .map_or_else(|| "none".into(), |g| g.to_string()),
        ),
        ("supervisor.control.allow_users", list(&control.allow_uids)),
        ("supervisor.control.allow_groups", list(&control.allow_gids)),
        (
            "supervisor.control.timeout",
            format!("{} ms", control.timeout.as_millis()),
        ),
        (
            "supervisor.control.max_clients",
            control.max_clients.to_string(),
        ),
        (
            "supervisor.control.max_followers",
            control.max_followers.to_string(),
        ),
        ("supervisor.runtime_dir", runtime_dir.display().to_string()),
        ("supervisor.log_file", file(&files.log_file)),
        ("supervisor.pid_file", file(&files.pid_file)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// What differs between the settings a master started with and those of a file, in words:
/// `supervisor.control.socket: /b.sock in the file, /a.sock in the running master (takes effect
/// at the next start)`.
pub fn start_only_changes(
    running: &BTreeMap<String, String>,
    file: &BTreeMap<String, String>,
) -> Vec<String> {
    file.iter()
        .filter_map(|(name, wanted)| {
            let now = running.get(name)?;
            (now != wanted).then(|| {
                format!(
                    "{name}: {wanted} in the file, {now} in the running master (takes effect at the next start)"
                )
            })
        })
        .collect()
}

/// Default control socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/baton/baton.sock";

/// Default `supervisor.runtime_dir`: what systemd's `RuntimeDirectory=baton` creates.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/baton";

/// Default `listen(2)` backlog: the kernel caps it at `net.core.somaxconn` anyway.
pub const DEFAULT_BACKLOG: u32 = 1024;

/// A configuration that cannot be used. Its message names the file, and where known the line,
/// column and key.
#[derive(Debug, thiserror::Error)]
#[error("{}{message}", location_prefix(path, *line, *column))]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn at(path: &Path, line: Option<usize>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.to_owned(),
            line,
            column: None,
            message: message.into(),
        }
    }
}

/// The largest configuration file read: a larger one is refused before it is read.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Reads the configuration file at `path` the way an untrusting program does: opened without
/// blocking (`O_NONBLOCK`: a FIFO put in its place answers at once instead of freezing the
/// master), only a regular file (not a FIFO, a device such as `/dev/zero`, a directory or a
/// socket), at most [`MAX_CONFIG_BYTES`] (checked before reading, and again while reading a file
/// that grows), UTF-8. Each refusal names the file and why.
pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let fail = |message: String| ConfigError::at(path, None, message);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
        .map_err(|err| fail(format!("cannot read: {err}")))?;
    let meta = file
        .metadata()
        .map_err(|err| fail(format!("cannot read: {err}")))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        return Err(fail(format!(
            "cannot read: it is {what}, not a regular file"
        )));
    }
    let too_big = |size: u64| {
        fail(format!(
            "cannot read: it is {size} bytes, more than the {MAX_CONFIG_BYTES} a configuration may have"
        ))
    };
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(too_big(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|err| fail(format!("cannot read: {err}")))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_big(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|err| {
        fail(format!(
            "cannot read: not UTF-8 (byte {})",
            err.utf8_error().valid_up_to()
        ))
    })
}

/// Reads ([`read_text`]) and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = read_text(path)?;
    parse(path, &text)
}

/// Validates `text` as if read from `path` (relative paths resolve against its directory).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    parse_all(path, text).map_err(|mut problems| problems.remove(0))
}

/// Reads and validates the configuration file at `path`, reporting every problem found (a YAML
/// syntax or type error stops the reading at its place, so it comes alone). `baton check`.
pub fn check_file(path: &Path) -> Result<Config, Vec<ConfigError>> {
    let text = read_text(path).map_err(|err| vec![err])?;
    parse_all(path, &text)
}

/// The control socket the file at `path` names, found even when the rest of the file is invalid
/// (the running master must stay reachable while its file is being edited). Fails only when the
/// file cannot be read or is not YAML.
pub fn control_socket(path: &Path) -> Result<PathBuf, ConfigError> {
    let text = read_text(path)?;
    validate::control_socket(path, &text).ok_or_else(|| match parse(path, &text) {
        Err(err) => err,
        Ok(_) => ConfigError::at(path, None, "not YAML"),
    })
}

/// Like [`parse`], with every problem.
pub fn parse_all(path: &Path, text: &str) -> Result<Config, Vec<ConfigError>> {
    validate::parse_all(path, text)
}

/// Default `worker.failed_stop_timeout` (also for states written before the setting existed).
fn default_failed_stop_timeout() -> Duration {
    crate::DEFAULT_FAILED_STOP_TIMEOUT
}

/// Default `supervisor.upgrade_timeout` (also for states written before the setting existed).
fn default_upgrade_timeout() -> Duration {
    crate::DEFAULT_UPGRADE_TIMEOUT
}
