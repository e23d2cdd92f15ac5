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
use serde::Deserialize;

/// The whole configuration of one master.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from; reloads read it again.
    pub source: PathBuf,
    pub listeners: Vec<ListenerConfig>,
    pub worker: WorkerConfig,
    pub supervisor: SupervisorConfig,
}

/// One listening socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub name: String,
    pub address: ListenerAddress,
    /// `listen(2)` backlog.
    pub backlog: u32,
    /// Permission bits of a Unix socket's file.
    pub mode: Option<u32>,
}

/// How to run the worker program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
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
    pub drain_signal: Option<SignalNumber>,
    /// First delay before a crashed worker is restarted; doubles on each crash in a row.
    pub restart_backoff: Duration,
    /// Upper bound of that delay. A worker that ran this long resets the sequence.
    pub restart_backoff_max: Duration,
}

/// Settings of the master itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorConfig {
    /// Most generations allowed to drain at once; the oldest is killed to make room.
    pub max_draining: usize,
    /// Forward SIGUSR1 to workers (for workers that reopen their logs on it).
    pub forward_usr1: bool,
}

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
        ConfigError {
            path: path.to_owned(),
            line,
            column,
            message,
        }
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let line_of = |needle: &str| find_line(text, needle);

    let mut names = BTreeMap::new();
    let mut addresses = std::collections::HashMap::new();
    for (i, l) in raw.listeners.iter().enumerate() {
        if let Some(first) = names.insert(l.name.clone(), i) {
            return Err(ConfigError::at(
                path,
                line_of(&format!("name: {}", l.name)),
                format!(
                    "listeners[{i}]: name `{}` is already used by listeners[{first}]",
                    l.name
                ),
            ));
        }
        if let Some(first) = addresses.insert(l.address.clone(), i) {
            return Err(ConfigError::at(
                path,
                None,
                format!(
                    "listeners[{i}] (`{}`): {} is already used by listeners[{first}]",
                    l.name, l.address
                ),
            ));
        }
    }
    let listeners = raw
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

    let w = raw.worker;
    let command = resolve_command(base, &w.command).map_err(|message| {
        ConfigError::at(
            path,
            line_of("command:"),
            format!("worker.command: {message}"),
        )
    })?;
    let worker = WorkerConfig {
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
    };
    if let Some(cwd) = &worker.cwd {
        if !cwd.is_dir() {
            return Err(ConfigError::at(
                path,
                line_of("cwd:"),
                format!("worker.cwd: {} is not a directory", cwd.display()),
            ));
        }
    }
    let s = raw.supervisor;
    Ok(Config {
        source: path.to_owned(),
        listeners,
        worker,
        supervisor: SupervisorConfig {
            max_draining: s.max_draining.0,
            forward_usr1: s.forward_usr1,
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

fn find_line(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
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
    worker: RawWorker,
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

impl Default for DrainSignal {
    fn default() -> Self {
        DrainSignal(Some(SignalNumber::SIGTERM))
    }
}

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
        assert_eq!(c.worker.command, PathBuf::from("/bin/sh"));
        assert_eq!(c.worker.processes, 3);
        assert_eq!(c.worker.drain_timeout, Duration::from_secs(90));
        assert_eq!(c.worker.drain_signal, Some(SignalNumber::SIGQUIT));
        assert_eq!(c.worker.env["GREETING"], "hi");
        assert_eq!(c.supervisor.max_draining, 2);
    }

    #[test]
    fn defaults_apply() {
        let c = parse_str("listeners: []\nworker: {command: sh}\n").unwrap();
        assert_eq!(c.worker.processes, 1);
        assert_eq!(c.worker.ready_timeout, Duration::from_secs(10));
        assert_eq!(c.worker.drain_signal, Some(SignalNumber::SIGTERM));
        assert!(c.worker.command.is_absolute(), "resolved from PATH");
        assert_eq!(c.supervisor.max_draining, 8);
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
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1h2m3s").unwrap(), Duration::from_secs(3723));
        for bad in ["", "5", "s", "5 s", "-1s", "1.5s", "3d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
