//! A program's checks (`worker:` or each of `workers:`): its command on disk, the listeners it
//! names, readiness that fits its protocol, its reload strategy, paths relative to the file.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::raw::{Batch, RawReload, RawWorker, StrategyName};
use super::validate::{Base, Check};
use super::{ConfigError, ListenerConfig, Protocol, Readiness, WorkerConfig};
use crate::supervisor::Strategy;

impl Check<'_> {
    /// `worker:` or `workers:`, each program checked. A file without a usable program list
    /// stops here (nothing else can be judged without it).
    pub(super) fn programs(
        &mut self,
        worker: Option<RawWorker>,
        workers: Option<Vec<RawWorker>>,
        listeners: &[ListenerConfig],
    ) -> Result<Vec<WorkerConfig>, Vec<ConfigError>> {
        let single = worker.is_some();
        let raws = match (worker, workers) {
            (Some(w), None) => vec![w],
            (None, Some(ws)) if !ws.is_empty() => ws,
            (None, Some(_)) => {
                self.problem(Some("workers:"), "workers: list at least one program");
                return Err(self.stop());
            }
            (Some(_), Some(_)) => {
                self.problem(
                    Some("workers:"),
                    "give either `worker` or `workers`, not both",
                );
                return Err(self.stop());
            }
            (None, None) => {
                self.problem(
                    None,
                    "missing `worker` (or `workers`): what should baton run?",
                );
                return Err(self.stop());
            }
        };
        let mut programs: Vec<WorkerConfig> = Vec::with_capacity(raws.len());
        for (i, w) in raws.into_iter().enumerate() {
            let key = if single {
                "worker".to_string()
            } else {
                format!("workers[{i}]")
            };
            let name = match &w.name {
                Some(n) => n.0.clone(),
                None if single => "worker".to_string(),
                None => {
                    self.problem(Some("workers:"), format!("{key}: needs a `name`"));
                    continue;
                }
            };
            if programs.iter().any(|p| p.name == name) {
                self.problem(
                    Some(&format!("name: {name}")),
                    format!("{key}: program name `{name}` is used twice"),
                );
            }
            programs.push(self.program(&key, name, w, listeners));
        }
        Ok(programs)
    }

    /// One program, as `key` (`worker` or `workers[i]`) names it.
    fn program(
        &mut self,
        key: &str,
        name: String,
        w: RawWorker,
        listeners: &[ListenerConfig],
    ) -> WorkerConfig {
        let command = match resolve_command(&self.base, &w.command) {
            Ok(command) => command,
            Err(message) => {
                self.problem(
                    Some(&format!("command: {}", w.command)),
                    format!("{key}.command: {message}"),
                );
                PathBuf::from(&w.command)
            }
        };
        let wanted_listeners = match &w.listeners {
            None => (0..listeners.len()).collect(),
            Some(wanted) => {
                let mut idx = Vec::with_capacity(wanted.len());
                for want in wanted {
                    match listeners.iter().position(|l| &l.name == want) {
                        Some(i) => idx.push(i),
                        None => self.problem(
                            Some("listeners: ["),
                            format!("{key}.listeners: no listener is named `{want}`"),
                        ),
                    }
                }
                idx
            }
        };
        let protocol = w.protocol.unwrap_or(Protocol::Baton);
        let ready = self.readiness(key, w.ready.map(|r| r.0), protocol);
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
            cwd: w.cwd.map(|c| self.base.join(&c)),
            processes: w.processes.0,
            ready_timeout: w.ready_timeout.0,
            drain_timeout: w.drain_timeout.0,
            failed_stop_timeout: w
                .failed_stop_timeout
                .map_or(crate::DEFAULT_FAILED_STOP_TIMEOUT, |t| t.0),
            drain_signal: w.drain_signal.0,
            restart_backoff: w.restart_backoff.0,
            restart_backoff_max: w.restart_backoff_max.0.max(w.restart_backoff.0),
            protocol,
            ready,
            notify_access: w.notify_access,
            listeners: wanted_listeners,
            uid,
            gid,
            umask: w.umask.map(|m| m.0),
            rlimits: w.rlimits,
            output: w.output,
            handoff_rate: w.handoff_rate.0,
            liveness: w.liveness.map(|l| self.liveness(l.0)),
            recycle: w.recycle.as_ref().map(|r| r.recycle()),
            reload: Strategy::AllAtOnce,
        };
        let worker = WorkerConfig {
            reload: self.strategy(key, w.reload.as_ref(), worker.processes),
            ..worker
        };
        if let Some(nofile) = worker.rlimits.nofile {
            // Above what this process may give, a worker would fail to start with a bare
            // "Operation not permitted": refused here, with the limit.
            if let Ok(ceiling) = baton_sys::process::nofile_ceiling() {
                if nofile > ceiling {
                    self.problem(
                        Some("nofile:"),
                        format!(
                            "{key}.rlimits.nofile: {nofile} is above {ceiling}, the most baton may give a worker here (its hard limit: raise LimitNOFILE= in its unit, or ulimit -Hn)"
                        ),
                    );
                }
            }
        }
        if let Some(cwd) = &worker.cwd {
            if !cwd.is_dir() {
                self.problem(
                    Some("cwd:"),
                    format!("{key}.cwd: {} is not a directory", cwd.display()),
                );
            }
        }
        let quic: Vec<&str> = worker
            .listeners
            .iter()
            .filter_map(|&i| listeners.get(i))
            .filter(|l| l.options.quic)
            .map(|l| l.name.as_str())
            .collect();
        if let (Some(first), true) = (quic.first(), worker.processes > 1) {
            self.problem(
                Some("processes:"),
                format!(
                    "{key}.processes: {} processes would share QUIC listener `{first}`: a generation's QUIC socket is steered to as a whole, so a program with a QUIC listener runs one (multi-threaded) process per generation (docs/quic.md)",
                    worker.processes
                ),
            );
        }
        if let Some(probe) = worker.ready.probe() {
            if probe.timeout >= worker.ready_timeout || probe.interval >= worker.ready_timeout {
                self.problem(
                    Some("ready:"),
                    format!(
                        "{key}.ready: the probe's timeout ({} ms) and interval ({} ms) must be shorter than ready_timeout ({} ms), or it never gets a second try",
                        probe.timeout.as_millis(),
                        probe.interval.as_millis(),
                        worker.ready_timeout.as_millis()
                    ),
                );
            }
        }
        worker
    }

    /// `reload:` with its batch resolved against `processes`.
    fn strategy(&mut self, key: &str, reload: Option<&RawReload>, processes: usize) -> Strategy {
        let Some(reload) = reload else {
            return Strategy::AllAtOnce;
        };
        match (reload.strategy, reload.batch) {
            (StrategyName::AllAtOnce, None) => Strategy::AllAtOnce,
            (StrategyName::AllAtOnce, Some(_)) => {
                self.problem(
                    Some("batch:"),
                    format!("{key}.reload.batch: a batch applies to `strategy: rolling` only"),
                );
                Strategy::AllAtOnce
            }
            (StrategyName::Rolling, batch) => {
                let batch = match batch.unwrap_or(Batch::Count(1)) {
                    Batch::Count(0) | Batch::Percent(0) => {
                        self.problem(
                            Some("batch:"),
                            format!("{key}.reload.batch: must be at least 1 (or 1%)"),
                        );
                        1
                    }
                    Batch::Percent(p) if p > 100 => {
                        self.problem(
                            Some("batch:"),
                            format!("{key}.reload.batch: {p}% is more than every process"),
                        );
                        processes
                    }
                    Batch::Percent(p) => (processes as u64 * p).div_ceil(100).max(1) as usize,
                    Batch::Count(n) if n > processes as u64 => {
                        self.problem(
                            Some("batch:"),
                            format!(
                                "{key}.reload.batch: {n} is more than the program's {processes} processes"
                            ),
                        );
                        processes
                    }
                    Batch::Count(n) => n as usize,
                };
                Strategy::Rolling { batch }
            }
        }
    }

    /// `ready:` as the protocol allows it (by default: what the protocol reports with).
    fn readiness(&mut self, key: &str, ready: Option<Readiness>, protocol: Protocol) -> Readiness {
        match (ready, protocol) {
            (None, Protocol::Baton) => Readiness::Channel,
            (None, Protocol::Systemd) => Readiness::Notify,
            (Some(Readiness::All(all)), _) => {
                let kinds = |f: fn(&Readiness) -> bool| all.iter().filter(|r| f(r)).count();
                if all.is_empty() {
                    self.problem(
                        Some("ready:"),
                        format!("{key}.ready: `all` lists no condition"),
                    );
                }
                if kinds(|r| matches!(r, Readiness::All(_))) > 0 {
                    self.problem(
                        Some("ready:"),
                        format!("{key}.ready: `all` inside `all` says nothing more: list the conditions once"),
                    );
                }
                if kinds(|r| matches!(r, Readiness::Probe(_))) > 1
                    || kinds(|r| matches!(r, Readiness::Delay(_))) > 1
                {
                    self.problem(
                        Some("ready:"),
                        format!("{key}.ready: `all` takes at most one probe and one delay"),
                    );
                }
                Readiness::All(
                    all.into_iter()
                        .map(|r| self.condition(key, r, protocol))
                        .collect(),
                )
            }
            (Some(r), _) => self.condition(key, r, protocol),
        }
    }

    /// A liveness check's Unix socket path, relative to this file like every path.
    fn liveness(&self, mut liveness: crate::config::Liveness) -> crate::config::Liveness {
        if let crate::config::LivenessCheck::Probe(probe) = &mut liveness.check {
            self.anchor_probe(probe);
        }
        liveness
    }

    /// A probe's relative Unix socket path is relative to this file, like every path.
    fn anchor_probe(&self, probe: &mut crate::config::Probe) {
        if probe.address.contains('/') && !probe.address.starts_with('/') {
            probe.address = self
                .base
                .join(Path::new(&probe.address))
                .display()
                .to_string();
        }
    }

    /// One readiness condition, checked against the protocol.
    fn condition(&mut self, key: &str, ready: Readiness, protocol: Protocol) -> Readiness {
        match (ready, protocol) {
            (Readiness::Channel, Protocol::Systemd) => {
                self.problem(
                    Some("ready:"),
                    format!(
                        "{key}.ready: `channel` needs `protocol: baton`; a systemd-style worker reports with `notify` or a probe"
                    ),
                );
                Readiness::Notify
            }
            (Readiness::Notify, Protocol::Baton) => {
                self.problem(
                    Some("ready:"),
                    format!(
                        "{key}.ready: `notify` needs `protocol: systemd`; a baton worker reports on its channel"
                    ),
                );
                Readiness::Channel
            }
            (Readiness::Probe(mut probe), _) => {
                self.anchor_probe(&mut probe);
                Readiness::Probe(probe)
            }
            (r, _) => r,
        }
    }
}

/// Why a worker's command cannot be run.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    #[error("must not be empty")]
    Empty,
    #[error("{} is not an executable file", .0.display())]
    NotExecutable(PathBuf),
    #[error("{} does not exist", .0.display())]
    Missing(PathBuf),
    #[error("`{0}` was not found in PATH")]
    NotInPath(String),
}

/// Resolves the worker program: a name with a `/` is a path (relative to the config file's
/// directory), a bare name is looked up in `PATH`, like a shell would.
fn resolve_command(base: &Base, command: &str) -> Result<PathBuf, CommandError> {
    if command.is_empty() {
        return Err(CommandError::Empty);
    }
    let candidates: Vec<PathBuf> = if command.contains('/') {
        vec![base.join(Path::new(command))]
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
                return Err(CommandError::NotExecutable(candidate.clone()));
            }
        }
    }
    match candidates.first() {
        Some(path) if command.contains('/') => Err(CommandError::Missing(path.clone())),
        _ => Err(CommandError::NotInPath(command.to_string())),
    }
}
