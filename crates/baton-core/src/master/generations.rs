//! What a generation holds while it lives: its listeners and programs. `prepare` reads the
//! configuration again (for a reload), binds what is new and moves the metrics endpoint;
//! `release` drops a generation's share when its last worker is gone (a listener no generation
//! uses any more closes then).

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::Master;
use super::service_manager::Notification;
use crate::config::{self, Config, WorkerConfig};
use crate::faults::Point;
use crate::listeners::{BindError, BoundSocket, GenerationListener};
use crate::supervisor::{Generation, GenerationSpec, ProgramSpec};
use crate::{control, metrics_http};
use baton_proto::ListenerAddress;

/// The metrics endpoint (`supervisor.metrics_listen`): the one serving (its address, its
/// task), one bound but not yet serving (at start, until the loop runs), and where its clients
/// ask the event loop for the text (bounded: [`metrics_http::MAX_ASKS`]).
#[derive(Debug)]
pub(super) struct MetricsEndpoint {
    pub(super) serving: Option<(std::net::SocketAddr, tokio::task::AbortHandle)>,
    pub(super) pending: Option<metrics_http::Endpoint>,
    pub(super) asks_tx: tokio::sync::mpsc::Sender<metrics_http::Ask>,
    pub(super) asks: tokio::sync::mpsc::Receiver<metrics_http::Ask>,
}

impl MetricsEndpoint {
    pub(super) fn new(pending: Option<metrics_http::Endpoint>) -> MetricsEndpoint {
        let (asks_tx, asks) = tokio::sync::mpsc::channel(metrics_http::MAX_ASKS);
        MetricsEndpoint {
            serving: None,
            pending,
            asks_tx,
            asks,
        }
    }
}

/// What a generation holds while it lives.
#[derive(Debug)]
pub(super) struct Resources {
    pub(super) listeners: Vec<GenerationListener>,
    pub(super) programs: Vec<Arc<WorkerConfig>>,
    /// The probation of this generation (probes go on that long after readiness).
    pub(super) canary_window: Option<Duration>,
    /// What its reload read but did not apply (settings read only at start), for the verdict.
    pub(super) warnings: Vec<String>,
}

/// Why a reload's generation could not be prepared (the serving one is untouched).
#[derive(Debug, thiserror::Error)]
pub(super) enum PrepareError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The moved metrics endpoint could not be bound (the message names the address).
    #[error("supervisor.metrics_listen: {0}")]
    Metrics(std::io::Error),
}

impl Master {
    /// Serves `endpoint` in place of the current one (if any, it closes); `announce`: log it
    /// (a master resumed after an upgrade serves the same endpoint again, quietly).
    pub(super) fn serve_metrics(
        &mut self,
        endpoint: Option<metrics_http::Endpoint>,
        announce: bool,
    ) {
        if let Some((old, task)) = self.endpoint.serving.take() {
            task.abort();
            if endpoint.as_ref().map(|e| e.address) != Some(old) {
                info!(event = baton_proto::event::METRICS_ENDPOINT_CLOSED, address = %old,
                    "metrics endpoint http://{old}/metrics closed");
            }
        }
        if let Some(endpoint) = endpoint {
            let address = endpoint.address;
            if announce {
                info!(event = baton_proto::event::METRICS_ENDPOINT, address = %address,
                    "metrics at http://{address}/metrics");
            }
            let task = tokio::spawn(metrics_http::serve(endpoint, self.endpoint.asks_tx.clone()));
            self.endpoint.serving = Some((address, task.abort_handle()));
        }
    }

    /// The resources of `generation`: the first one's were bound by [`Master::new`]; a reload's
    /// configuration is read again and its new listeners bound. Nothing changes on an error.
    pub(super) fn prepare(
        &mut self,
        generation: Generation,
    ) -> Result<GenerationSpec, PrepareError> {
        let (config, prepared) = match self.initial.take() {
            Some(initial) => initial,
            None => {
                Point::ConfigRead.check().map_err(|err| {
                    config::ConfigError::at(&self.config_path, None, format!("cannot read: {err}"))
                })?;
                let config = config::load(&self.config_path)?;
                // A moved metrics endpoint is bound first, and replaces the old one only if the
                // listeners can be prepared too.
                let wanted = config.supervisor.metrics_listen;
                // `Some(new endpoint, or none)` when the setting changed.
                let moved = if wanted == self.endpoint.serving.as_ref().map(|m| m.0) {
                    None
                } else {
                    let bound = wanted.map(metrics_http::bind).transpose();
                    Some(bound.map_err(PrepareError::Metrics)?)
                };
                let prepared = self.table.prepare(&config.listeners)?;
                if let Some(endpoint) = moved {
                    self.serve_metrics(endpoint, true);
                }
                let bound: Vec<GenerationListener> = prepared
                    .listeners
                    .iter()
                    .filter(|l| prepared.bound.contains(&l.config.name))
                    .cloned()
                    .collect();
                self.store_fds(&bound);
                for l in &prepared.listeners {
                    if prepared.bound.contains(&l.config.name) {
                        info!(event = baton_proto::event::LISTENING, listener = %l.config.name,
                            address = %l.socket.local(), generation = generation.0,
                            "listener {} listening on {} (new in generation {generation})",
                            l.config.name, l.socket.local());
                    }
                }
                (config, prepared)
            }
        };
        let spec = GenerationSpec::from_config(&config);
        self.queues
            .set_interval(config.supervisor.queue_watch, std::time::Instant::now());
        let mut warnings = self.start_only_changes(generation, &config);
        warnings.extend(prepared.warnings.iter().cloned());
        self.resources.insert(
            generation,
            Resources {
                listeners: prepared.listeners,
                programs: config.programs.into_iter().map(Arc::new).collect(),
                canary_window: config.supervisor.canary_window,
                warnings,
            },
        );
        Ok(spec)
    }

    /// Settings of `config` read only at start that differ from this master's: each is logged
    /// and goes into the verdict. A control socket moved in the file gets a link at its new path
    /// to the socket in use, so that `baton ... -c FILE` still finds this master.
    fn start_only_changes(&mut self, generation: Generation, config: &Config) -> Vec<String> {
        let wanted = &config.supervisor.control.socket;
        let mut warnings = config::start_only_changes(
            &self.start_settings,
            &config::start_only_settings(
                &config.supervisor.control,
                &config.supervisor.runtime_dir,
                &config.supervisor.own_files(),
            ),
        );
        for warning in &warnings {
            warn!(
                event = baton_proto::event::START_ONLY_SETTING,
                generation = generation.0,
                "reload of generation {generation}: {warning}"
            );
        }
        // A link made by an earlier reload for another path goes away.
        self.control_aliases.retain(|alias| &alias.0 == wanted);
        let Some((_, control)) = &self.control_fd else {
            return warnings;
        };
        let current = control.socket.clone();
        if *wanted == current || self.control_aliases.iter().any(|a| &a.0 == wanted) {
            return warnings;
        }
        match std::os::unix::fs::symlink(&current, wanted) {
            Ok(()) => {
                info!(event = baton_proto::event::CONTROL_ALIAS, path = %wanted.display(),
                    "control socket also at {} (a link to {}) until the next start",
                    wanted.display(), current.display());
                warnings.push(format!(
                    "{} links to {} until the next start, so that commands given this file find this master",
                    wanted.display(),
                    current.display()
                ));
                self.control_aliases
                    .push(control::SocketFile(wanted.clone()));
            }
            Err(err) => warnings.push(format!(
                "no link to {} could be made at {}: {err}; use -s {} to reach this master",
                current.display(),
                wanted.display(),
                current.display()
            )),
        }
        warnings
    }

    /// `generation` serves for good (its reload succeeded): each listener only older generations
    /// still hold stops listening now, so that new clients are refused at once instead of
    /// waiting in a queue nobody accepts from while those generations drain.
    pub(super) fn stop_removed_listeners(&mut self, generation: Generation) {
        let Some(serving) = self.resources.get(&generation) else {
            return;
        };
        let kept: Vec<Rc<BoundSocket>> =
            serving.listeners.iter().map(|l| l.socket.clone()).collect();
        // Each generation has a QUIC socket of its own in one group per address: an older
        // generation's is not a removed listener while the serving one has that address (it
        // goes back to the group when its generation ends).
        let quic_kept: Vec<&ListenerAddress> = serving
            .listeners
            .iter()
            .filter(|l| l.config.options.quic)
            .map(|l| &l.config.address)
            .collect();
        let mut removed: Vec<(String, Rc<BoundSocket>, Generation)> = Vec::new();
        for (&g, r) in &self.resources {
            for l in &r.listeners {
                let quic_group_kept =
                    l.config.options.quic && quic_kept.contains(&&l.config.address);
                let gone = !quic_group_kept
                    && !kept.iter().any(|k| Rc::ptr_eq(k, &l.socket))
                    && !removed.iter().any(|(_, s, _)| Rc::ptr_eq(s, &l.socket));
                if gone {
                    removed.push((l.config.name.clone(), l.socket.clone(), g));
                }
            }
        }
        for (name, socket, held_by) in removed {
            let address = socket.local().to_string();
            match socket.stop_listening() {
                Ok(false) => continue,
                Ok(true) => {
                    info!(event = baton_proto::event::LISTENER_REMOVED, listener = %name, address = %address,
                        generation = generation.0,
                        "listener {name} ({address}) removed: generation {generation} does not have it; new connections are refused, generation {held_by} finishes those it accepted");
                }
                Err(err) => {
                    warn!(listener = %name, "listener {name} ({address}) removed, but it still listens until generation {held_by} exits: {err}");
                }
            }
            self.notify(Notification::RemoveFd(name));
        }
    }

    pub(super) fn release(&mut self, generation: Generation) {
        let Some(resources) = self.resources.remove(&generation) else {
            return;
        };
        let mut closed = Vec::new();
        for l in resources.listeners {
            // This generation held the last reference: dropping it closes the socket. Log only
            // after the close, so that whoever reads the line finds the port closed.
            if Rc::strong_count(&l.socket) == 1 {
                self.listener_closed(&l.config.name, &l.socket, l.config.backlog);
                closed.push((l.config.name.clone(), l.socket.local().to_string()));
            }
        }
        for (name, address) in closed {
            info!(event = baton_proto::event::LISTENER_CLOSED, listener = %name, address = %address,
                "listener {name} ({address}) closed: no generation uses it any more");
            self.notify(Notification::RemoveFd(name));
        }
    }
}

impl GenerationSpec {
    /// What the state machine needs of a configuration.
    pub(super) fn from_config(config: &Config) -> Self {
        let programs = config
            .programs
            .iter()
            .map(|w| ProgramSpec {
                processes: w.processes,
                ready_timeout: w.ready_timeout,
                drain_timeout: w.drain_timeout,
                failed_stop_timeout: w.failed_stop_timeout,
                drain_signal: w.drain_signal,
                restart_backoff: w.restart_backoff,
                restart_backoff_max: w.restart_backoff_max,
                replace: w.liveness.as_ref().map(|l| crate::supervisor::ReplaceSpec {
                    max_replacing_percent: l.max_replacing_percent,
                    kill_after: l.kill_after,
                }),
                name: w.name.clone(),
                strategy: w.reload,
            })
            .collect();
        GenerationSpec {
            programs,
            max_draining: config.supervisor.max_draining,
            forward_usr1: config.supervisor.forward_usr1,
            canary_window: config.supervisor.canary_window,
            upgrade_signal: config.supervisor.upgrade_signal,
            upgrade_timeout: config.supervisor.upgrade_timeout,
            stop_delay: config.supervisor.stop_delay,
            watch_config: config.supervisor.watch_config,
        }
    }
}
