//! The YAML configuration: types, loading and validation.
//!
//! Validation lives in `Deserialize` implementations wherever one value is enough to judge
//! (addresses, durations, signals, modes, counts), so a bad value is reported with the file, line
//! and column the YAML parser knows. Checks that need the whole file (duplicate names, the worker
//! command on disk) run after parsing and name the key instead.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_proto::ListenerAddress;
use baton_sys::process::SignalNumber;
use serde::{Deserialize, Serialize};

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
    /// Where the master serves `GET /metrics` over HTTP (the text of `baton metrics`), if
    /// anywhere.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
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
    /// Clients served at once; more wait in the socket's backlog.
    pub max_clients: usize,
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

fn location_prefix(path: &Path, line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("{}:{l}:{c}: ", path.display()),
        (Some(l), None) => format!("{}:{l}: ", path.display()),
        _ => format!("{}: ", path.display()),
    }
}

impl ConfigError {
    fn at(path: &Path, line: Option<usize>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.to_owned(),
            line,
            column: None,
            message: message.into(),
        }
    }
}

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| ConfigError::at(path, None, format!("cannot read: {err}")))?;
    parse(path, &text)
}

/// Validates `text` as if read from `path` (relative paths resolve against its directory).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    parse_all(path, text).map_err(|mut problems| problems.remove(0))
}

/// Reads and validates the configuration file at `path`, reporting every problem found (a YAML
/// syntax or type error stops the reading at its place, so it comes alone). `baton check`.
pub fn check_file(path: &Path) -> Result<Config, Vec<ConfigError>> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| vec![ConfigError::at(path, None, format!("cannot read: {err}"))])?;
    parse_all(path, &text)
}

/// Like [`parse`], with every problem.
pub fn parse_all(path: &Path, text: &str) -> Result<Config, Vec<ConfigError>> {
    let raw: RawConfig = serde_yaml::from_str(text).map_err(|err| {
        let location = err.location();
        let mut message = err.to_string();
        // The parser appends " at line L column C"; we print the location first instead.
        if let Some(cut) = message.rfind(" at line ") {
            message.truncate(cut);
        }
        let mut line = location.as_ref().map(|l| l.line());
        let mut column = location.as_ref().map(|l| l.column());
        if let Some((l, c, key)) = line.and_then(|from| locate_value(text, from, &message)) {
            (line, column) = (Some(l), Some(c));
            message = qualify(&message, &key);
        }
        vec![ConfigError {
            path: path.to_owned(),
            line,
            column,
            message,
        }]
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let line_of = |needle: &str| find_line(text, needle);
    let mut problems: Vec<ConfigError> = Vec::new();

    let mut names = BTreeMap::new();
    let mut addresses = std::collections::HashMap::new();
    for (i, l) in raw.listeners.iter().enumerate() {
        if let Some(first) = names.insert(l.name.clone(), i) {
            problems.push(ConfigError::at(
                path,
                line_of(&format!("name: {}", l.name)),
                format!(
                    "listeners[{i}]: name `{}` is already used by listeners[{first}]",
                    l.name
                ),
            ));
        }
        if let Some(first) = addresses.insert(l.address.clone(), i) {
            problems.push(ConfigError::at(
                path,
                None,
                format!(
                    "listeners[{i}] (`{}`): {} is already used by listeners[{first}]",
                    l.name, l.address
                ),
            ));
        }
    }
    let listeners: Vec<ListenerConfig> = raw
        .listeners
        .into_iter()
        .map(|l| ListenerConfig {
            address: match l.address {
                ListenerAddress::Unix { path: p } if p.is_relative() => {
                    ListenerAddress::Unix { path: base.join(p) }
                }
                other => other,
            },
            name: l.name,
            backlog: l.backlog,
            mode: l.mode.map(|m| m.0),
        })
        .collect();

    let single = raw.worker.is_some();
    let raws = match (raw.worker, raw.workers) {
        (Some(w), None) => vec![w],
        (None, Some(ws)) if !ws.is_empty() => ws,
        (None, Some(_)) => {
            problems.push(ConfigError::at(
                path,
                line_of("workers:"),
                "workers: list at least one program",
            ));
            return Err(problems);
        }
        (Some(_), Some(_)) => {
            problems.push(ConfigError::at(
                path,
                line_of("workers:"),
                "give either `worker` or `workers`, not both",
            ));
            return Err(problems);
        }
        (None, None) => {
            problems.push(ConfigError::at(
                path,
                None,
                "missing `worker` (or `workers`): what should baton run?",
            ));
            return Err(problems);
        }
    };
    let mut programs: Vec<WorkerConfig> = Vec::with_capacity(raws.len());
    for (i, w) in raws.into_iter().enumerate() {
        let key = if single {
            "worker".to_string()
        } else {
            format!("workers[{i}]")
        };
        let name = match w.name {
            Some(n) => n.0,
            None if single => "worker".to_string(),
            None => {
                problems.push(ConfigError::at(
                    path,
                    line_of("workers:"),
                    format!("{key}: needs a `name`"),
                ));
                continue;
            }
        };
        if programs.iter().any(|p| p.name == name) {
            problems.push(ConfigError::at(
                path,
                line_of(&format!("name: {name}")),
                format!("{key}: program name `{name}` is used twice"),
            ));
        }
        let command = match resolve_command(base, &w.command) {
            Ok(command) => command,
            Err(message) => {
                problems.push(ConfigError::at(
                    path,
                    line_of(&format!("command: {}", w.command)),
                    format!("{key}.command: {message}"),
                ));
                PathBuf::from(&w.command)
            }
        };
        let listeners = match &w.listeners {
            None => (0..listeners.len()).collect(),
            Some(wanted) => {
                let mut idx = Vec::with_capacity(wanted.len());
                for want in wanted {
                    let found = listeners
                        .iter()
                        .position(|l: &ListenerConfig| &l.name == want);
                    match found {
                        Some(i) => idx.push(i),
                        None => problems.push(ConfigError::at(
                            path,
                            line_of("listeners: ["),
                            format!("{key}.listeners: no listener is named `{want}`"),
                        )),
                    }
                }
                idx
            }
        };
        let protocol = w.protocol.unwrap_or(Protocol::Baton);
        let ready = match (w.ready.map(|r| r.0), protocol) {
            (None, Protocol::Baton) => Readiness::Channel,
            (None, Protocol::Systemd) => Readiness::Notify,
            (Some(Readiness::Channel), Protocol::Systemd) => {
                problems.push(ConfigError::at(
                    path,
                    line_of("ready:"),
                    format!(
                        "{key}.ready: `channel` needs `protocol: baton`; a systemd-style worker reports with `notify` or a probe"
                    ),
                ));
                Readiness::Notify
            }
            (Some(Readiness::Notify), Protocol::Baton) => {
                problems.push(ConfigError::at(
                    path,
                    line_of("ready:"),
                    format!(
                        "{key}.ready: `notify` needs `protocol: systemd`; a baton worker reports on its channel"
                    ),
                ));
                Readiness::Channel
            }
            // A relative Unix socket path of a probe is relative to this file, like every path.
            (Some(Readiness::Probe(mut probe)), _) => {
                if probe.address.contains('/') && !probe.address.starts_with('/') {
                    probe.address = base.join(&probe.address).display().to_string();
                }
                Readiness::Probe(probe)
            }
            (Some(r), _) => r,
        };
        let uid = w.user.as_ref().map(|u| u.0);
        // A user without a group runs with the user's primary group.
        let gid = w.group.as_ref().map(|g| g.0).or_else(|| {
            let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid?)).ok()??;
            Some(user.gid.as_raw())
        });
        let worker = WorkerConfig {
            name,
            command,
            args: w.args,
            env: w.env,
            cwd: w.cwd.map(|c| base.join(c)),
            processes: w.processes.0,
            ready_timeout: w.ready_timeout.0,
            drain_timeout: w.drain_timeout.0,
            drain_signal: w.drain_signal.0,
            restart_backoff: w.restart_backoff.0,
            restart_backoff_max: w.restart_backoff_max.0.max(w.restart_backoff.0),
            protocol,
            ready,
            notify_access: w.notify_access,
            listeners,
            uid,
            gid,
            umask: w.umask.map(|m| m.0),
            rlimits: w.rlimits,
        };
        if let Some(cwd) = &worker.cwd {
            if !cwd.is_dir() {
                problems.push(ConfigError::at(
                    path,
                    line_of("cwd:"),
                    format!("{key}.cwd: {} is not a directory", cwd.display()),
                ));
            }
        }
        if let Readiness::Probe(probe) = &worker.ready {
            if probe.timeout >= worker.ready_timeout || probe.interval >= worker.ready_timeout {
                problems.push(ConfigError::at(
                    path,
                    line_of("ready:"),
                    format!(
                        "{key}.ready: the probe's timeout ({} ms) and interval ({} ms) must be shorter than ready_timeout ({} ms), or it never gets a second try",
                        probe.timeout.as_millis(),
                        probe.interval.as_millis(),
                        worker.ready_timeout.as_millis()
                    ),
                ));
            }
        }
        programs.push(worker);
    }
    for (i, l) in listeners.iter().enumerate() {
        if let Some(problem) = address_problem(&l.address) {
            problems.push(ConfigError::at(
                path,
                None,
                format!("listeners[{i}] (`{}`): {} {problem}", l.name, l.address),
            ));
        }
    }
    if let Some(metrics) = raw.supervisor.metrics_listen.as_ref().map(|a| a.0) {
        let at = line_of("metrics_listen:");
        let tcp = ListenerAddress::Tcp { address: metrics };
        if let Some(problem) = address_problem(&tcp) {
            problems.push(ConfigError::at(
                path,
                at,
                format!("supervisor.metrics_listen: {metrics} {problem}"),
            ));
        }
        // The same port on the same address, or on a wildcard one, would not bind.
        let clash = listeners.iter().find(|l| match l.address {
            ListenerAddress::Tcp { address } => {
                address.port() == metrics.port()
                    && (address.ip() == metrics.ip()
                        || address.ip().is_unspecified()
                        || metrics.ip().is_unspecified())
            }
            ListenerAddress::Unix { .. } => false,
        });
        if let Some(l) = clash {
            problems.push(ConfigError::at(
                path,
                at,
                format!(
                    "supervisor.metrics_listen: {metrics} clashes with listener `{}` ({})",
                    l.name, l.address
                ),
            ));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let s = raw.supervisor;
    Ok(Config {
        source: path.to_owned(),
        listeners,
        programs,
        supervisor: SupervisorConfig {
            max_draining: s.max_draining.0,
            forward_usr1: s.forward_usr1,
            control: ControlConfig {
                socket: s
                    .control
                    .socket
                    .map_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET), |p| base.join(p)),
                mode: s.control.mode.map_or(0o600, |m| m.0),
                read_group: s.control.read_group.map(|g| g.0),
                allow_uids: s.control.allow_users.iter().map(|u| u.0).collect(),
                allow_gids: s.control.allow_groups.iter().map(|g| g.0).collect(),
                timeout: s.control.timeout.map_or(Duration::from_secs(5), |t| t.0),
                max_clients: s.control.max_clients.map_or(16, |m| m.0),
            },
            canary_window: s.canary_window.map(|t| t.0),
            upgrade_signal: s.upgrade_signal.and_then(|u| u.0),
            upgrade_timeout: s
                .upgrade_timeout
                .map_or_else(default_upgrade_timeout, |t| t.0),
            metrics_listen: s.metrics_listen.map(|a| a.0),
            runtime_dir: s
                .runtime_dir
                .map_or_else(|| PathBuf::from(DEFAULT_RUNTIME_DIR), |d| base.join(d)),
        },
    })
}

/// The parser places a value's validation error at the mapping that holds it. Our messages quote
/// the offending value, so look for the first `key: value` line at or below that place whose value
/// is the quoted one, and return its line, column and key.
fn locate_value(text: &str, from: usize, message: &str) -> Option<(usize, usize, String)> {
    let start = message.find('"')? + 1;
    let len = message[start..].find('"')?;
    let raw = &message[start..start + len];
    for (i, line) in text.lines().enumerate().skip(from.saturating_sub(1)) {
        let Some(colon) = line.find(": ") else {
            continue;
        };
        let value = line[colon + 1..].trim();
        let unquoted = value.trim_matches(|c| c == '"' || c == '\'');
        if unquoted == raw {
            let key = line[..colon].trim().trim_start_matches("- ").to_string();
            let column = line.len() - line[colon + 1..].trim_start().len() + 1;
            return Some((i + 1, column, key));
        }
    }
    None
}

/// `worker: invalid duration ...` becomes `worker.ready_timeout: invalid duration ...`.
fn qualify(message: &str, key: &str) -> String {
    match message.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') => format!("{path}.{key}: {rest}"),
        _ => format!("{key}: {message}"),
    }
}

/// Whether a listener's address can be bound here, judged without binding it: the IP must be
/// one of this machine's (bind it with port 0), a Unix socket's directory must exist.
fn address_problem(address: &ListenerAddress) -> Option<String> {
    match address {
        ListenerAddress::Tcp { address } => {
            let probe = std::net::SocketAddr::new(address.ip(), 0);
            match std::net::TcpListener::bind(probe) {
                Err(e) if e.raw_os_error() == Some(nix::libc::EADDRNOTAVAIL) => {
                    Some("is not an address of this machine".into())
                }
                _ => None,
            }
        }
        ListenerAddress::Unix { path } => match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => Some(format!(
                "cannot be created: {} is not a directory",
                dir.display()
            )),
            _ => None,
        },
    }
}

/// The first line that holds `needle` outside a comment.
fn find_line(text: &str, needle: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            l.split(" #")
                .next()
                .is_some_and(|code| code.contains(needle))
                && !l.trim_start().starts_with('#')
        })
        .map(|i| i + 1)
}

/// Resolves the worker program: a name with a `/` is a path (relative to the config file's
/// directory), a bare name is looked up in `PATH`, like a shell would.
fn resolve_command(base: &Path, command: &str) -> Result<PathBuf, String> {
    if command.is_empty() {
        return Err("must not be empty".into());
    }
    let candidates: Vec<PathBuf> = if command.contains('/') {
        vec![base.join(command)]
    } else {
        std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|dir| dir.join(command))
                    .collect()
            })
            .unwrap_or_default()
    };
    for candidate in &candidates {
        if let Ok(meta) = std::fs::metadata(candidate) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate.clone());
            }
            if command.contains('/') {
                return Err(format!("{} is not an executable file", candidate.display()));
            }
        }
    }
    match candidates.first() {
        Some(path) if command.contains('/') => Err(format!("{} does not exist", path.display())),
        _ => Err(format!("`{command}` was not found in PATH")),
    }
}

// ---- the file's shape ----------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listeners: Vec<RawListener>,
    #[serde(default)]
    worker: Option<RawWorker>,
    #[serde(default)]
    workers: Option<Vec<RawWorker>>,
    #[serde(default)]
    supervisor: RawSupervisor,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, try_from = "ListenerFields")]
struct RawListener {
    name: String,
    address: ListenerAddress,
    backlog: u32,
    mode: Option<Mode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerFields {
    name: ListenerName,
    /// TCP: `host:port`, IPv6 as `[::1]:port`.
    address: Option<TcpAddress>,
    /// Unix stream socket path.
    path: Option<PathBuf>,
    #[serde(default)]
    backlog: Option<Backlog>,
    #[serde(default)]
    mode: Option<Mode>,
}

impl TryFrom<ListenerFields> for RawListener {
    type Error = String;
    fn try_from(f: ListenerFields) -> Result<Self, String> {
        let name = f.name.0;
        let address = match (f.address, f.path) {
            (Some(a), None) => ListenerAddress::Tcp { address: a.0 },
            (None, Some(p)) => ListenerAddress::Unix { path: p },
            (Some(_), Some(_)) => {
                return Err(format!(
                    "listener `{name}`: give either `address` or `path`, not both"
                ));
            }
            (None, None) => {
                return Err(format!(
                    "listener `{name}`: needs `address` (TCP host:port) or `path` (Unix socket)"
                ));
            }
        };
        if f.mode.is_some() && matches!(address, ListenerAddress::Tcp { .. }) {
            return Err(format!(
                "listener `{name}`: `mode` applies to Unix sockets only"
            ));
        }
        Ok(RawListener {
            name,
            address,
            backlog: f.backlog.map_or(DEFAULT_BACKLOG, |b| b.0),
            mode: f.mode,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    #[serde(default)]
    name: Option<ListenerName>,
    command: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<PathBuf>,
    #[serde(default)]
    processes: Processes,
    #[serde(default = "default_ready_timeout")]
    ready_timeout: Timeout,
    #[serde(default = "default_drain_timeout")]
    drain_timeout: Timeout,
    #[serde(default)]
    drain_signal: DrainSignal,
    #[serde(default = "default_backoff")]
    restart_backoff: Timeout,
    #[serde(default = "default_backoff_max")]
    restart_backoff_max: Timeout,
    #[serde(default)]
    protocol: Option<Protocol>,
    #[serde(default)]
    ready: Option<ReadySpec>,
    #[serde(default)]
    notify_access: NotifyAccess,
    /// Names of the listeners this program gets; default: all.
    #[serde(default)]
    listeners: Option<Vec<String>>,
    #[serde(default)]
    user: Option<UserId>,
    #[serde(default)]
    group: Option<GroupId>,
    #[serde(default)]
    umask: Option<Mode>,
    #[serde(default)]
    rlimits: Rlimits,
}

/// `ready:` is a word (`channel`, `notify`) or a map (`{delay: 2s}`, `{tcp: ADDRESS}`,
/// `{http: ADDRESS, path: /healthz}`, with optional `timeout` and `interval`).
struct ReadySpec(Readiness);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadyFields {
    #[serde(default)]
    delay: Option<Timeout>,
    #[serde(default)]
    tcp: Option<String>,
    #[serde(default)]
    http: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    timeout: Option<Timeout>,
    #[serde(default)]
    interval: Option<Timeout>,
}

impl<'de> Deserialize<'de> for ReadySpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ReadySpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`channel`, `notify`, or a map with one of `delay`, `tcp`, `http`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ReadySpec, E> {
                match v {
                    "channel" => Ok(ReadySpec(Readiness::Channel)),
                    "notify" => Ok(ReadySpec(Readiness::Notify)),
                    other => Err(E::custom(format!(
                        "invalid readiness \"{other}\": use channel, notify, {{delay: 2s}}, {{tcp: ADDRESS}} or {{http: ADDRESS, path: /healthz}}"
                    ))),
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ReadySpec, A::Error> {
                use serde::de::Error;
                let f =
                    ReadyFields::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                let timeout = f.timeout.map_or(Duration::from_secs(1), |t| t.0);
                let interval = f.interval.map_or(Duration::from_millis(250), |t| t.0);
                let probe = |address: String, http_path| {
                    if address.is_empty() {
                        return Err(A::Error::custom(
                            "invalid probe address \"\": give host:port or a Unix socket path",
                        ));
                    }
                    Ok(ReadySpec(Readiness::Probe(Probe {
                        address,
                        http_path,
                        timeout,
                        interval,
                    })))
                };
                match (f.delay, f.tcp, f.http) {
                    (Some(d), None, None) if f.path.is_none() => {
                        Ok(ReadySpec(Readiness::Delay(d.0)))
                    }
                    (None, Some(a), None) if f.path.is_none() => probe(a, None),
                    (None, None, Some(a)) => {
                        let path = f.path.unwrap_or_else(|| "/".into());
                        if !path.starts_with('/') {
                            return Err(A::Error::custom(format!(
                                "invalid probe path \"{path}\": it must start with /"
                            )));
                        }
                        probe(a, Some(path))
                    }
                    _ => Err(A::Error::custom(
                        "invalid readiness: give exactly one of `delay`, `tcp`, `http` (`path` goes with `http`)",
                    )),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Default `supervisor.upgrade_timeout`.
fn default_upgrade_timeout() -> Duration {
    crate::DEFAULT_UPGRADE_TIMEOUT
}

fn default_ready_timeout() -> Timeout {
    Timeout(Duration::from_secs(10))
}
fn default_drain_timeout() -> Timeout {
    Timeout(Duration::from_secs(30))
}
fn default_backoff() -> Timeout {
    Timeout(Duration::from_millis(100))
}
fn default_backoff_max() -> Timeout {
    Timeout(Duration::from_secs(10))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSupervisor {
    #[serde(default)]
    max_draining: MaxDraining,
    #[serde(default)]
    forward_usr1: bool,
    #[serde(default)]
    runtime_dir: Option<PathBuf>,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    canary_window: Option<Timeout>,
    #[serde(default)]
    upgrade_signal: Option<UpgradeSignal>,
    #[serde(default)]
    upgrade_timeout: Option<UpgradeTimeout>,
    #[serde(default)]
    metrics_listen: Option<TcpAddress>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawControl {
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default)]
    read_group: Option<GroupId>,
    #[serde(default)]
    allow_users: Vec<UserId>,
    #[serde(default)]
    allow_groups: Vec<GroupId>,
    #[serde(default)]
    timeout: Option<Timeout>,
    #[serde(default)]
    max_clients: Option<Processes>,
}

/// Declares a newtype whose `Deserialize` validates through a parse function, so a bad value is
/// reported at its own line and column.
macro_rules! validated {
    ($name:ident($inner:ty) from $raw:ty, $expecting:literal, $parse:expr) => {
        struct $name($inner);
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = <$raw>::deserialize(d)?;
                let parse: fn($raw) -> Result<$inner, String> = $parse;
                parse(raw).map($name).map_err(serde::de::Error::custom)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", $expecting, self.0)
            }
        }
    };
}

validated!(ListenerName(String) from String, "listener name", |s| {
    let ok = !s.is_empty()
        && s.len() <= 255
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(s)
    } else {
        // The name travels in LISTEN_FDNAMES, where ':' separates names.
        Err(format!("invalid listener name {s:?}: use 1-255 of A-Z a-z 0-9 - _ ."))
    }
});

validated!(TcpAddress(SocketAddr) from String, "TCP address", |s| {
    s.parse::<SocketAddr>().map_err(|_| {
        format!("invalid TCP address {s:?}: expected IP:port, e.g. 127.0.0.1:8080 or [::1]:8080")
    })
});

validated!(Backlog(u32) from u64, "backlog", |n| {
    if (1..=65535).contains(&n) {
        Ok(n as u32)
    } else {
        Err(format!("backlog \"{n}\" is out of range 1..=65535"))
    }
});

validated!(Mode(u32) from String, "mode", |s| {
    let digits = s.strip_prefix("0o").unwrap_or(&s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
        _ => Err(format!("invalid mode {s:?}: write octal digits such as 0660")),
    }
});

validated!(Processes(usize) from u64, "processes", |n| {
    if (1..=1024).contains(&n) {
        Ok(n as usize)
    } else {
        Err(format!("processes \"{n}\" is out of range: use 1 to 1024"))
    }
});

impl Default for Processes {
    fn default() -> Self {
        Processes(1)
    }
}

validated!(MaxDraining(usize) from u64, "max_draining", |n| {
    if (1..=1000).contains(&n) {
        Ok(n as usize)
    } else {
        Err(format!("max_draining \"{n}\" is out of range: use 1 to 1000"))
    }
});

impl Default for MaxDraining {
    fn default() -> Self {
        MaxDraining(8)
    }
}

validated!(Timeout(Duration) from String, "duration", |s| {
    let d = parse_duration(&s)?;
    if d.is_zero() {
        return Err(format!("duration {s:?} must be greater than zero"));
    }
    if d > Duration::from_secs(7 * 24 * 3600) {
        return Err(format!("duration {s:?} is longer than a week"));
    }
    Ok(d)
});

validated!(DrainSignal(Option<SignalNumber>) from String, "signal", |s| {
    if s.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    match baton_sys::process::parse_signal(&s) {
        Some(SignalNumber::SIGKILL) | Some(SignalNumber::SIGSTOP) => Err(format!(
            "drain_signal {s:?} cannot be handled by a worker: use SIGTERM, SIGQUIT, ... or none"
        )),
        Some(sig) => Ok(Some(sig)),
        None => Err(format!("unknown signal {s:?}: use a name such as SIGTERM, or none")),
    }
});

validated!(UpgradeSignal(Option<SignalNumber>) from String, "signal", |s| {
    if s.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    match baton_sys::process::parse_signal(&s) {
        Some(sig @ (SignalNumber::SIGURG | SignalNumber::SIGWINCH)) => Ok(Some(sig)),
        Some(sig) => Err(format!(
            "upgrade_signal {s:?}: {} cannot be the upgrade signal: use SIGURG, SIGWINCH or none \
             ({})",
            sig.as_str(),
            match sig {
                SignalNumber::SIGUSR2 | SignalNumber::SIGHUP => "it means reload",
                SignalNumber::SIGTERM | SignalNumber::SIGINT | SignalNumber::SIGQUIT => {
                    "it means stop"
                }
                SignalNumber::SIGUSR1 => "it means reopen logs",
                SignalNumber::SIGCHLD => "it reports exited workers",
                SignalNumber::SIGCONT => "shells and the kernel send it on resume",
                SignalNumber::SIGKILL | SignalNumber::SIGSTOP => "it cannot be handled",
                _ => "its default action would kill a baton that does not handle it",
            }
        )),
        None => Err(format!("unknown signal {s:?}: use SIGURG, SIGWINCH or none")),
    }
});

/// Longest `supervisor.upgrade_timeout`: `baton upgrade` waits a minute for the verdict.
const MAX_UPGRADE_TIMEOUT: Duration = Duration::from_secs(50);

validated!(UpgradeTimeout(Duration) from String, "duration", |s| {
    let d = parse_duration(&s)?;
    if d.is_zero() || d > MAX_UPGRADE_TIMEOUT {
        return Err(format!(
            "upgrade_timeout {s:?} must be more than 0 and at most {} s (`baton upgrade` waits a \
             minute for the verdict)",
            MAX_UPGRADE_TIMEOUT.as_secs()
        ));
    }
    Ok(d)
});

impl Default for DrainSignal {
    fn default() -> Self {
        DrainSignal(Some(SignalNumber::SIGTERM))
    }
}

validated!(UserId(u32) from String, "user", |s| {
    if let Ok(uid) = s.parse::<u32>() {
        return Ok(uid);
    }
    match nix::unistd::User::from_name(&s) {
        Ok(Some(user)) => Ok(user.uid.as_raw()),
        _ => Err(format!("unknown user \"{s}\"")),
    }
});

validated!(GroupId(u32) from String, "group", |s| {
    if let Ok(gid) = s.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(&s) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        _ => Err(format!("unknown group \"{s}\"")),
    }
});

/// Parses `500ms`, `10s`, `2m`, `1h`, or a sum such as `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}: use a number with a unit, e.g. 500ms, 10s, 2m");
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => return Err(bad()),
        };
        total = total.saturating_add(unit);
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("/etc/baton/test.yaml"), text)
    }

    const GOOD: &str = "\
listeners:
  - name: http
    address: 127.0.0.1:8080
    backlog: 512
  - name: v6
    address: \"[::1]:8080\"
  - name: local
    path: /tmp/baton-test.sock
    mode: \"0660\"
worker:
  command: /bin/sh
  args: [-c, 'exec sleep 1000']
  env: {GREETING: hi}
  processes: 3
  ready_timeout: 2s
  drain_timeout: 1m30s
  drain_signal: SIGQUIT
supervisor:
  max_draining: 2
";

    #[test]
    fn a_full_config_parses() {
        let c = parse_str(GOOD).unwrap();
        assert_eq!(c.listeners.len(), 3);
        assert_eq!(c.listeners[0].backlog, 512);
        assert_eq!(c.listeners[1].backlog, DEFAULT_BACKLOG);
        assert_eq!(
            c.listeners[1].address,
            ListenerAddress::Tcp {
                address: "[::1]:8080".parse().unwrap()
            }
        );
        assert_eq!(c.listeners[2].mode, Some(0o660));
        // Unquoted, YAML would read 0660 as a number; the file's digits are what is meant.
        let unquoted = GOOD.replace("mode: \"0660\"", "mode: 0640");
        assert_eq!(parse_str(&unquoted).unwrap().listeners[2].mode, Some(0o640));
        assert_eq!(c.programs[0].command, PathBuf::from("/bin/sh"));
        assert_eq!(c.programs[0].processes, 3);
        assert_eq!(c.programs[0].drain_timeout, Duration::from_secs(90));
        assert_eq!(c.programs[0].drain_signal, Some(SignalNumber::SIGQUIT));
        assert_eq!(c.programs[0].env["GREETING"], "hi");
        assert_eq!(c.supervisor.max_draining, 2);
    }

    #[test]
    fn defaults_apply() {
        let c = parse_str("listeners: []\nworker: {command: sh}\n").unwrap();
        assert_eq!(c.programs[0].processes, 1);
        assert_eq!(c.programs[0].ready_timeout, Duration::from_secs(10));
        assert_eq!(c.programs[0].drain_signal, Some(SignalNumber::SIGTERM));
        assert!(c.programs[0].command.is_absolute(), "resolved from PATH");
        assert_eq!(c.supervisor.max_draining, 8);
        assert_eq!(c.supervisor.upgrade_signal, None);
        assert_eq!(c.supervisor.upgrade_timeout, Duration::from_secs(10));
        let c =
            parse_str("listeners: []\nworker: {command: sh}\nsupervisor: {upgrade_timeout: 2s}\n")
                .unwrap();
        assert_eq!(c.supervisor.upgrade_timeout, Duration::from_secs(2));
    }

    #[test]
    fn the_upgrade_signal_is_sigurg_sigwinch_or_none() {
        for (word, expected) in [
            ("SIGURG", Some(SignalNumber::SIGURG)),
            ("winch", Some(SignalNumber::SIGWINCH)),
            ("none", None),
        ] {
            let text = format!(
                "listeners: []\nworker: {{command: sh}}\nsupervisor: {{upgrade_signal: {word}}}\n"
            );
            assert_eq!(
                parse_str(&text).unwrap().supervisor.upgrade_signal,
                expected
            );
        }
    }

    /// Each bad config gives one error naming the file, the line, and what is wrong.
    #[test]
    fn bad_configs_name_file_line_and_problem() {
        let cases: &[(&str, &str, Option<usize>)] = &[
            (
                "listeners: []\nworker: {command: sh}\nbogus: 1\n",
                "unknown field `bogus`",
                Some(3),
            ),
            (
                "listeners:\n  - name: a\n    address: 127.0.0.1:1\n    colour: red\nworker: {command: sh}\n",
                "listeners[0]: unknown field `colour`",
                Some(4),
            ),
            (
                "listeners:\n  - name: a\n    address: 300.0.0.1:80\nworker: {command: sh}\n",
                "test.yaml:3:14: listeners[0].address: invalid TCP address \"300.0.0.1:80\"",
                Some(3),
            ),
            (
                "listeners: []\nworker:\n  command: sh\n  ready_timeout: 10\n",
                "test.yaml:4:18: worker.ready_timeout: invalid duration \"10\"",
                Some(4),
            ),
            (
                "listeners: []\nworker:\n  command: sh\n  processes: 0\n",
                "worker.processes: processes \"0\" is out of range",
                Some(4),
            ),
            (
                "listeners: []\nworker:\n  command: sh\n  drain_signal: SIGKILL\n",
                "cannot be handled",
                Some(4),
            ),
            (
                "listeners: []\nworker: {command: sh}\nsupervisor:\n  upgrade_signal: SIGUSR2\n",
                "test.yaml:4:19: supervisor.upgrade_signal: upgrade_signal \"SIGUSR2\": SIGUSR2 cannot be the upgrade signal: use SIGURG, SIGWINCH or none (it means reload)",
                Some(4),
            ),
            (
                "listeners: []\nworker: {command: sh}\nsupervisor:\n  upgrade_signal: SIGPWR\n",
                "would kill a baton that does not handle it",
                Some(4),
            ),
            (
                "listeners: []\nworker: {command: sh}\nsupervisor:\n  upgrade_timeout: 2m\n",
                "upgrade_timeout \"2m\" must be more than 0 and at most 50 s",
                Some(4),
            ),
            (
                "listeners: []\nworker: {command: sh}\nsupervisor:\n  metrics_listen: localhost\n",
                "supervisor.metrics_listen: invalid TCP address \"localhost\": expected IP:port",
                Some(4),
            ),
            (
                "listeners:\n  - name: web\n    address: 0.0.0.0:8080\nworker: {command: sh}\nsupervisor:\n  metrics_listen: 127.0.0.1:8080\n",
                "supervisor.metrics_listen: 127.0.0.1:8080 clashes with listener `web` (tcp://0.0.0.0:8080)",
                Some(6),
            ),
            (
                "listeners: []\nworker: {command: sh}\nsupervisor:\n  metrics_listen: 192.0.2.1:9273\n",
                "supervisor.metrics_listen: 192.0.2.1:9273 is not an address of this machine",
                Some(4),
            ),
            ("listeners: [\n", "did not find expected node", Some(2)),
            (
                "listeners:\n  - name: a\n    address: 127.0.0.1:1\n  - name: a\n    address: 127.0.0.1:2\nworker: {command: sh}\n",
                "name `a` is already used",
                Some(2),
            ),
            (
                "listeners: []\nworker:\n  command: ./no-such-worker\n",
                "/etc/baton/./no-such-worker does not exist",
                Some(3),
            ),
            (
                "listeners: []\nworker:\n  command: no-such-program-xyz\n",
                "not found in PATH",
                Some(3),
            ),
            (
                "listeners:\n  - name: a\nworker: {command: sh}\n",
                "needs `address`",
                Some(2),
            ),
            (
                "listeners:\n  - name: a\n    path: /tmp/x\n    mode: rw-rw----\nworker: {command: sh}\n",
                "listeners[0].mode: invalid mode \"rw-rw----\": write octal digits such as 0660",
                Some(4),
            ),
        ];
        for (text, expected, line) in cases {
            let err = parse_str(text).expect_err(text);
            let shown = err.to_string();
            assert!(shown.starts_with("/etc/baton/test.yaml:"), "{shown}");
            assert!(
                shown.contains(expected),
                "{shown:?} should contain {expected:?}"
            );
            assert_eq!(err.line, *line, "line of {shown:?}");
            assert!(!shown.contains('\n'), "one line: {shown:?}");
        }
    }

    #[test]
    fn several_programs_each_with_its_protocol_readiness_and_listeners() {
        let c = parse_str(
            "listeners:
  - {name: web, address: 127.0.0.1:8080}
  - {name: api, address: 127.0.0.1:8081}
workers:
  - name: rust
    command: sh
  - name: python
    command: sh
    protocol: systemd
    listeners: [api]
    notify_access: all
  - name: node
    command: sh
    protocol: systemd
    ready: {http: \"/tmp/health-{worker}.sock\", path: /healthz, timeout: 2s}
  - name: slow
    command: sh
    ready: {delay: 1500ms}
",
        )
        .unwrap();
        let names: Vec<&str> = c.programs.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["rust", "python", "node", "slow"]);
        assert_eq!(c.programs[0].protocol, Protocol::Baton);
        assert_eq!(c.programs[0].ready, Readiness::Channel);
        assert_eq!(c.programs[0].listeners, [0, 1]);
        assert_eq!(c.programs[1].ready, Readiness::Notify);
        assert_eq!(c.programs[1].listeners, [1]);
        assert_eq!(c.programs[1].notify_access, NotifyAccess::All);
        let Readiness::Probe(probe) = &c.programs[2].ready else {
            panic!("{:?}", c.programs[2].ready)
        };
        assert_eq!(probe.http_path.as_deref(), Some("/healthz"));
        assert_eq!(probe.timeout, Duration::from_secs(2));
        assert_eq!(probe.address_for(7, 1, 3), "/tmp/health-7.sock");
        assert_eq!(
            c.programs[3].ready,
            Readiness::Delay(Duration::from_millis(1500))
        );
    }

    #[test]
    fn program_errors_are_named() {
        let cases: &[(&str, &str)] = &[
            (
                "listeners: []\nworker: {command: sh, protocol: systemd, ready: channel}\n",
                "`channel` needs `protocol: baton`",
            ),
            (
                "listeners: []\nworker: {command: sh, ready: notify}\n",
                "`notify` needs `protocol: systemd`",
            ),
            (
                "listeners: []\nworker: {command: sh, ready: sometimes}\n",
                "invalid readiness \"sometimes\"",
            ),
            (
                "listeners: []\nworker: {command: sh, ready: {tcp: a, delay: 1s}}\n",
                "exactly one of",
            ),
            (
                "listeners: []\nworker: {command: sh, ready: {http: /x, path: health}}\n",
                "must start with /",
            ),
            (
                "listeners: []\nworker: {command: sh, protocol: inetd}\n",
                "unknown variant `inetd`",
            ),
            (
                "listeners: []\nworker: {command: sh, listeners: [nope]}\n",
                "no listener is named `nope`",
            ),
            (
                "listeners: []\nworkers:\n  - {command: sh}\n",
                "workers[0]: needs a `name`",
            ),
            (
                "listeners: []\nworkers:\n  - {name: a, command: sh}\n  - {name: a, command: sh}\n",
                "`a` is used twice",
            ),
            ("listeners: []\n", "missing `worker`"),
            (
                "listeners: []\nworker: {command: sh}\nworkers: []\n",
                "either `worker` or `workers`",
            ),
        ];
        for (text, expected) in cases {
            let shown = parse_str(text).expect_err(text).to_string();
            assert!(
                shown.contains(expected),
                "{shown:?} should contain {expected:?}"
            );
        }
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let text = "listeners:
  - {name: web, address: 192.0.2.1:80}
  - {name: sock, path: /nonexistent-dir/x.sock}
workers:
  - name: a
    command: ./missing
    listeners: [nope]
  - name: b
    command: sh
    protocol: systemd
    ready_timeout: 1s
    ready: {http: /tmp/h.sock, timeout: 2s}
";
        let problems = parse_all(Path::new("/etc/baton/test.yaml"), text).unwrap_err();
        let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        for expected in [
            "workers[0].command: /etc/baton/./missing does not exist",
            "workers[0].listeners: no listener is named `nope`",
            "workers[1].ready: the probe's timeout (2000 ms)",
            "tcp://192.0.2.1:80 is not an address of this machine",
            "/nonexistent-dir is not a directory",
        ] {
            assert!(
                shown.iter().any(|s| s.contains(expected)),
                "{expected:?} missing from {shown:#?}"
            );
        }
        assert_eq!(shown.len(), 5, "{shown:#?}");
        // `parse` (used by run and reload) reports the first.
        assert_eq!(parse_str(text).unwrap_err().to_string(), shown[0]);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1h2m3s").unwrap(), Duration::from_secs(3723));
        for bad in ["", "5", "s", "5 s", "-1s", "1.5s", "3d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn yaml_noise() -> impl Strategy<Value = String> {
        let keys = prop::sample::select(vec![
            "listeners",
            "worker",
            "workers",
            "name",
            "address",
            "path",
            "mode",
            "backlog",
            "command",
            "args",
            "env",
            "processes",
            "ready_timeout",
            "drain_timeout",
            "drain_signal",
            "ready",
            "protocol",
            "supervisor",
            "control",
            "socket",
            "max_draining",
            "user",
            "umask",
            "bogus",
        ]);
        let values = prop::sample::select(vec![
            "sh",
            "1",
            "0",
            "-1",
            "99999999999",
            "1s",
            "10",
            "[]",
            "{}",
            "\"[::1]:80\"",
            "127.0.0.1:0",
            "notify",
            "{delay: 2s}",
            "{http: /x}",
            "systemd",
            "SIGTERM",
            "\"0660\"",
            "~",
            "'",
            "[",
            "\"\\u0000\"",
            "nobody",
            "*a",
            "&a x",
            "!tag x",
        ]);
        prop::collection::vec((0usize..4, keys, values, any::<bool>()), 0..24).prop_map(|lines| {
            lines
                .into_iter()
                .map(|(indent, k, v, dash)| {
                    format!(
                        "{}{}{k}: {v}\n",
                        "  ".repeat(indent),
                        if dash { "- " } else { "" }
                    )
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        /// Whatever the file says, loading it gives a configuration or errors that name the
        /// file, on one line each: it never panics.
        #[test]
        fn the_config_loader_never_panics_on_yaml_shaped_noise(text in yaml_noise()) {
            if let Err(problems) = parse_all(Path::new("/etc/baton/fuzz.yaml"), &text) {
                prop_assert!(!problems.is_empty());
                for p in problems {
                    let shown = p.to_string();
                    prop_assert!(shown.starts_with("/etc/baton/fuzz.yaml"), "{}", shown);
                    prop_assert!(!shown.contains('\n'), "{}", shown);
                }
            }
        }

        #[test]
        fn the_config_loader_never_panics_on_bytes(text in "\\PC{0,300}") {
            let _ = parse_all(Path::new("/x.yaml"), &text);
        }
    }
}
