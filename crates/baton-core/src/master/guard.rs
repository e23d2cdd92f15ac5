//! Workers that outlive their master (see [`crate::orphans`]): the registry of this master's
//! workers, kept current as they start and exit, and the guard process that ends them if the
//! master dies without stopping them.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Instant;

use tracing::{info, warn};

use super::Master;
use crate::orphans::Entry;

impl Master {
    /// Rewrites the registry when the set of worker processes changed (a spawn, an exit).
    pub(super) fn update_registry(&mut self) {
        let snap = self.supervisor.snapshot(Instant::now());
        let mut current: BTreeMap<u32, Option<Entry>> = BTreeMap::new();
        for g in &snap.generations {
            let programs = self.resources.get(&g.generation).map(|r| &r.programs);
            for w in &g.workers {
                let Some(pid) = w.pid else { continue };
                let entry = self.registered.get(&pid).cloned().or_else(|| {
                    let program = programs.and_then(|p| p.get(w.program))?;
                    Entry::of(pid, program.drain_signal, program.drain_timeout)
                });
                current.insert(pid, entry);
            }
        }
        let same = current.len() == self.registered.len()
            && current.keys().all(|pid| self.registered.contains_key(pid));
        if same {
            return;
        }
        self.registered = current
            .into_iter()
            .filter_map(|(pid, entry)| Some((pid, entry?)))
            .collect();
        let entries: Vec<Entry> = self.registered.values().cloned().collect();
        if let Err(err) = self.registry.write(&entries) {
            warn!(registry = %self.registry.path().display(),
                "cannot record the workers in {}: {err}", self.registry.path().display());
        }
    }

    /// Starts the guard: the binary's `baton guard`, told this master's pid and start time and
    /// where the registry is. It is no child to keep alive: if it fails, the master goes on.
    pub(super) fn start_guard(&mut self) {
        let Some((program, args)) = self.options.guard.clone() else {
            return;
        };
        let pid = std::process::id();
        let Ok(started) = baton_sys::pidfd::start_time(pid) else {
            return;
        };
        let mut cmd = Command::new(&program);
        cmd.args(args)
            .arg("--master")
            .arg(pid.to_string())
            .arg("--started")
            .arg(started.to_string())
            .arg("--registry")
            .arg(self.registry.path())
            .stdin(Stdio::null())
            // Not in the master's process group: a Ctrl-C for the master is not for it.
            .process_group(0);
        baton_sys::process::unblock_signals_in_child(&mut cmd);
        match cmd.spawn() {
            Ok(child) => {
                info!(
                    event = "guard_started",
                    pid = child.id(),
                    "guard pid {} ends the workers if this master dies without stopping them",
                    child.id()
                );
            }
            Err(err) => warn!(
                "cannot start the guard ({}): workers that ignore their drain signal could outlive a killed master: {err}",
                program.display()
            ),
        }
    }
}
