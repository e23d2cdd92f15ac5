//! The file's shape: the serde types the YAML is read into, and the validated newtypes whose
//! `Deserialize` judges one value (an address, a duration, a signal, a mode, a count), so that a
//! bad value is reported with the line and column the parser knows.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use baton_sys::process::SignalNumber;
use serde::Deserialize;

use super::listener::RawListener;
use super::{
    Liveness, LivenessCheck, NotifyAccess, Output, Probe, Protocol, Readiness, Recycle, Rlimits,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) listeners: Vec<RawListener>,
    #[serde(default)]
    pub(super) worker: Option<RawWorker>,
    #[serde(default)]
    pub(super) workers: Option<Vec<RawWorker>>,
    #[serde(default)]
    pub(super) supervisor: RawSupervisor,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorker {
    #[serde(default)]
    pub(super) name: Option<ProgramName>,
    pub(super) command: String,
    #[serde(default)]
    pub(super) args: Vec<String>,
    #[serde(default)]
    pub(super) env: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) cwd: Option<PathBuf>,
    #[serde(default)]
    pub(super) processes: Processes,
    #[serde(default = "default_ready_timeout")]
    pub(super) ready_timeout: Timeout,
    #[serde(default = "default_drain_timeout")]
    pub(super) drain_timeout: Timeout,
    #[serde(default)]
    pub(super) failed_stop_timeout: Option<Timeout>,
    #[serde(default)]
    pub(super) drain_signal: DrainSignal,
    #[serde(default = "default_backoff")]
    pub(super) restart_backoff: Timeout,
    #[serde(default = "default_backoff_max")]
    pub(super) restart_backoff_max: Timeout,
    #[serde(default)]
    pub(super) protocol: Option<Protocol>,
    #[serde(default)]
    pub(super) ready: Option<ReadySpec>,
    #[serde(default)]
    pub(super) notify_access: NotifyAccess,
    /// Names of the listeners this program gets; default: all.
    #[serde(default)]
    pub(super) listeners: Option<Vec<String>>,
    #[serde(default)]
    pub(super) user: Option<UserId>,
    #[serde(default)]
    pub(super) group: Option<GroupId>,
    #[serde(default)]
    pub(super) umask: Option<Mode>,
    #[serde(default)]
    pub(super) rlimits: Rlimits,
    #[serde(default)]
    pub(super) output: Output,
    #[serde(default)]
    pub(super) liveness: Option<LivenessSpec>,
    #[serde(default)]
    pub(super) recycle: Option<RecycleSpec>,
    #[serde(default)]
    pub(super) reload: Option<RawReload>,
    #[serde(default)]
    pub(super) handoff_rate: HandoffRate,
}

/// `reload: {strategy: rolling, batch: 2}` (or `batch: "25%"`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReload {
    #[serde(default)]
    pub(super) strategy: StrategyName,
    #[serde(default)]
    pub(super) batch: Option<Batch>,
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub(super) enum StrategyName {
    #[default]
    #[serde(alias = "all_at_once")]
    AllAtOnce,
    Rolling,
}

/// A batch: a number of processes (`2`) or a share of them (`"25%"`, rounded up).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Batch {
    Count(u64),
    Percent(u64),
}

impl<'de> Deserialize<'de> for Batch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Count(u64),
            Text(String),
        }
        match Either::deserialize(d)? {
            Either::Count(n) => Ok(Batch::Count(n)),
            Either::Text(text) => text
                .trim()
                .strip_suffix('%')
                .and_then(|n| n.trim().parse().ok())
                .map(Batch::Percent)
                .ok_or_else(|| {
                    D::Error::custom(format!(
                        "invalid batch \"{text}\": a number of processes (2) or a percentage (\"25%\")"
                    ))
                }),
        }
    }
}

/// `recycle: {max_rss: 512MiB, check_every: 10s, above_for: 30s}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RecycleSpec {
    max_rss: Size,
    #[serde(default)]
    check_every: Option<RecycleCheck>,
    #[serde(default)]
    above_for: Option<Timeout>,
}

impl RecycleSpec {
    pub(super) fn recycle(&self) -> Recycle {
        Recycle {
            max_rss_kib: self.max_rss.0 / 1024,
            check_every: self
                .check_every
                .as_ref()
                .map_or(Duration::from_secs(10), |t| t.0),
            above_for: self
                .above_for
                .as_ref()
                .map_or(Duration::from_secs(30), |t| t.0),
        }
    }
}

/// A size in bytes: `512MiB`, `2GiB`, `800KiB` (binary units; at least 1 MiB).
pub(super) struct Size(pub(super) u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let text = String::deserialize(d)?;
        let t = text.trim();
        let (number, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
        let factor: u64 = match unit.trim() {
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => {
                return Err(D::Error::custom(format!(
                    "invalid size \"{text}\": a number and KiB, MiB or GiB (512MiB)"
                )));
            }
        };
        let bytes = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(factor))
            .filter(|&b| b >= 1 << 20)
            .ok_or_else(|| D::Error::custom(format!("invalid size \"{text}\": at least 1MiB")))?;
        Ok(Size(bytes))
    }
}

/// `liveness:` is a map: `{http: ADDRESS, path: /healthz}` or `{tcp: ADDRESS}` with optional
/// `interval`, `timeout`, `threshold`, or `{watchdog: 10s}`; and `max_replacing`, `kill_after`.
pub(super) struct LivenessSpec(pub(super) Liveness);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LivenessFields {
    #[serde(default)]
    http: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    tcp: Option<String>,
    #[serde(default)]
    watchdog: Option<Timeout>,
    #[serde(default)]
    interval: Option<Timeout>,
    #[serde(default)]
    timeout: Option<Timeout>,
    #[serde(default)]
    threshold: Option<u32>,
    #[serde(default)]
    max_replacing: Option<String>,
    #[serde(default)]
    kill_after: Option<Timeout>,
}

impl<'de> Deserialize<'de> for LivenessSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let f = LivenessFields::deserialize(d)?;
        let threshold = f.threshold.unwrap_or(3);
        if !(1..=100).contains(&threshold) {
            return Err(D::Error::custom(format!(
                "invalid liveness threshold {threshold}: failures in a row, 1 to 100"
            )));
        }
        let share = f.max_replacing.as_deref().unwrap_or("50%");
        let max_replacing_percent = share
            .strip_suffix('%')
            .and_then(|p| p.trim().parse::<u32>().ok())
            .filter(|p| (1..=100).contains(p))
            .ok_or_else(|| {
                D::Error::custom(format!(
                    "invalid liveness max_replacing \"{share}\": a percentage of a generation's workers, 1% to 100%"
                ))
            })?;
        let kill_after = f.kill_after.map_or(Duration::from_secs(2), |t| t.0);
        let probe_timing = f.interval.is_some() || f.timeout.is_some();
        let interval = f.interval.map_or(Duration::from_secs(5), |t| t.0);
        let timeout = f.timeout.map_or(Duration::from_secs(1), |t| t.0);
        if interval < Duration::from_millis(100) {
            return Err(D::Error::custom(
                "invalid liveness interval: at least 100ms (a probe per worker per interval)",
            ));
        }
        let probe = |address: String, http_path| {
            if address.is_empty() {
                return Err(D::Error::custom(
                    "invalid liveness address \"\": give host:port or a Unix socket path",
                ));
            }
            Ok(LivenessCheck::Probe(Probe {
                address,
                http_path,
                timeout,
                interval,
            }))
        };
        let check = match (f.http, f.tcp, f.watchdog) {
            (Some(a), None, None) => {
                let path = f.path.unwrap_or_else(|| "/".into());
                if !path.starts_with('/') {
                    return Err(D::Error::custom(format!(
                        "invalid liveness path \"{path}\": it must start with /"
                    )));
                }
                probe(a, Some(path))?
            }
            (None, Some(a), None) if f.path.is_none() => probe(a, None)?,
            (None, None, Some(w)) if f.path.is_none() && !probe_timing => {
                if w.0 < Duration::from_millis(100) {
                    return Err(D::Error::custom(
                        "invalid liveness watchdog: at least 100ms",
                    ));
                }
                LivenessCheck::Watchdog(w.0)
            }
            _ => {
                return Err(D::Error::custom(
                    "invalid liveness: give exactly one of `http` (with `path`), `tcp` (each with `interval`, `timeout`, `threshold`), or `watchdog: WINDOW`",
                ));
            }
        };
        Ok(LivenessSpec(Liveness {
            check,
            threshold,
            max_replacing_percent,
            kill_after,
        }))
    }
}

/// `ready:` is a word (`channel`, `notify`) or a map (`{delay: 2s}`, `{tcp: ADDRESS}`,
/// `{http: ADDRESS, path: /healthz}`, with optional `timeout` and `interval`).
pub(super) struct ReadySpec(pub(super) Readiness);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReadyFields {
    #[serde(default)]
    all: Option<Vec<ReadySpec>>,
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
                f.write_str(
                    "`channel`, `notify`, or a map with one of `delay`, `tcp`, `http`, `all`",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ReadySpec, E> {
                match v {
                    "channel" => Ok(ReadySpec(Readiness::Channel)),
                    "notify" => Ok(ReadySpec(Readiness::Notify)),
                    other => Err(E::custom(format!(
                        "invalid readiness \"{other}\": use channel, notify, {{delay: 2s}}, {{tcp: ADDRESS}}, {{http: ADDRESS, path: /healthz}} or {{all: [...]}}"
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
                if let Some(all) = f.all {
                    let alone = f.delay.is_none()
                        && f.tcp.is_none()
                        && f.http.is_none()
                        && f.path.is_none()
                        && f.timeout.is_none()
                        && f.interval.is_none();
                    if !alone {
                        return Err(A::Error::custom(
                            "invalid readiness: `all` takes a list and nothing beside it",
                        ));
                    }
                    return Ok(ReadySpec(Readiness::All(
                        all.into_iter().map(|r| r.0).collect(),
                    )));
                }
                let timeout = f.timeout.map_or(Duration::from_secs(1), |t| t.0);
                let interval = f.interval.map_or(Duration::from_millis(250), |t| t.0);
                if interval < MIN_PROBE_INTERVAL {
                    return Err(A::Error::custom(format!(
                        "invalid readiness interval: at least {} ms (a probe per starting worker per interval)",
                        MIN_PROBE_INTERVAL.as_millis()
                    )));
                }
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

pub(super) fn default_ready_timeout() -> Timeout {
    Timeout(Duration::from_secs(10))
}
pub(super) fn default_drain_timeout() -> Timeout {
    Timeout(Duration::from_secs(30))
}
pub(super) fn default_backoff() -> Timeout {
    Timeout(Duration::from_millis(100))
}
pub(super) fn default_backoff_max() -> Timeout {
    Timeout(Duration::from_secs(10))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSupervisor {
    #[serde(default)]
    pub(super) max_draining: MaxDraining,
    #[serde(default)]
    pub(super) forward_usr1: bool,
    #[serde(default)]
    pub(super) runtime_dir: Option<PathBuf>,
    #[serde(default)]
    pub(super) control: RawControl,
    #[serde(default)]
    pub(super) canary_window: Option<Timeout>,
    #[serde(default)]
    pub(super) upgrade_signal: Option<UpgradeSignal>,
    #[serde(default)]
    pub(super) upgrade_timeout: Option<UpgradeTimeout>,
    #[serde(default)]
    pub(super) metrics_listen: Option<TcpAddress>,
    #[serde(default)]
    pub(super) log_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) pid_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) cgroups: crate::config::Cgroups,
    #[serde(default)]
    pub(super) queue_watch: Option<QueueWatch>,
    #[serde(default)]
    pub(super) stop_delay: Option<StopDelay>,
    #[serde(default)]
    pub(super) watch: Vec<WatchTarget>,
}

/// What `supervisor.watch` can name.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum WatchTarget {
    /// The configuration file: a change reloads.
    Config,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawControl {
    #[serde(default)]
    pub(super) socket: Option<PathBuf>,
    #[serde(default)]
    pub(super) mode: Option<Mode>,
    #[serde(default)]
    pub(super) read_group: Option<GroupId>,
    #[serde(default)]
    pub(super) allow_users: Vec<UserId>,
    #[serde(default)]
    pub(super) allow_groups: Vec<GroupId>,
    #[serde(default)]
    pub(super) timeout: Option<Timeout>,
    #[serde(default)]
    pub(super) max_clients: Option<Processes>,
    #[serde(default)]
    pub(super) max_followers: Option<Processes>,
}

/// Declares a newtype whose `Deserialize` validates through a parse function, so a bad value is
/// reported at its own line and column.
macro_rules! validated {
    ($name:ident($inner:ty) from $raw:ty, $expecting:literal, $parse:expr) => {
        pub(super) struct $name(pub(super) $inner);
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

/// A name of 1 to 255 of `A-Z a-z 0-9 - _ .`: a listener's travels in `LISTEN_FDNAMES`, where
/// ':' separates names; a program's is in paths and log fields.
fn valid_name(what: &str, s: String) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(s)
    } else {
        Err(format!(
            "invalid {what} name {s:?}: use 1-255 of A-Z a-z 0-9 - _ ."
        ))
    }
}

validated!(ListenerName(String) from String, "listener name", |s| valid_name("listener", s));

validated!(ProgramName(String) from String, "program name", |s| valid_name("program", s));

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

validated!(HandoffRate(u32) from u64, "handoff_rate", |n| {
    if (1..=1_000_000).contains(&n) {
        Ok(n as u32)
    } else {
        Err(format!(
            "handoff_rate \"{n}\" is out of range: use 1 to 1000000 connections per second"
        ))
    }
});

impl Default for HandoffRate {
    fn default() -> Self {
        HandoffRate(crate::config::DEFAULT_HANDOFF_RATE)
    }
}

/// A duration above zero and at most a week.
fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("duration {s:?} must be greater than zero"));
    }
    if d > Duration::from_secs(7 * 24 * 3600) {
        return Err(format!("duration {s:?} is longer than a week"));
    }
    Ok(d)
}

validated!(Timeout(Duration) from String, "duration", |s| positive_duration(&s));

/// Shortest `recycle.check_every`: each check reads every worker's memory from `/proc`.
pub(crate) const MIN_RECYCLE_CHECK: Duration = Duration::from_millis(100);

validated!(RecycleCheck(Duration) from String, "duration", |s| {
    let d = positive_duration(&s)?;
    if d < MIN_RECYCLE_CHECK {
        return Err(format!(
            "check_every {s:?} is shorter than {} ms: each check reads every worker's memory, and a master that checks that often spins",
            MIN_RECYCLE_CHECK.as_millis()
        ));
    }
    Ok(d)
});

/// Shortest `supervisor.queue_watch`: each sample reads every listener's accept queue.
pub(crate) const MIN_QUEUE_WATCH: Duration = Duration::from_millis(100);

validated!(QueueWatch(Duration) from String, "duration", |s| {
    let d = positive_duration(&s)?;
    if d < MIN_QUEUE_WATCH {
        return Err(format!(
            "queue_watch {s:?} is shorter than {} ms: a master that samples that often spins",
            MIN_QUEUE_WATCH.as_millis()
        ));
    }
    Ok(d)
});

/// Shortest readiness probe interval: a probe per starting worker per interval.
pub(crate) const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(10);

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

/// Longest `supervisor.stop_delay`: load balancers take a pod out in seconds, not hours.
const MAX_STOP_DELAY: Duration = Duration::from_secs(600);

validated!(StopDelay(Duration) from String, "duration", |s| {
    let d = parse_duration(&s)?;
    if d > MAX_STOP_DELAY {
        return Err(format!(
            "stop_delay {s:?} is longer than {} s: a stop that waits longer is not a stop",
            MAX_STOP_DELAY.as_secs()
        ));
    }
    Ok(d)
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
pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
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
