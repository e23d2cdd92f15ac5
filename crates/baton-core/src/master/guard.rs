//! Workers that outlive their master (see [`crate::orphans`]): those a master before this one
//! left (ended at start), the registry of this master's workers, kept current as they start and
//! exit, and the guard process that ends them if the master dies without stopping them.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use tracing::{info, warn};

use super::Master;
use crate::orphans::{self, Entry};

/// This master's workers as recorded for its guard and its successor: the file's writer and
/// what it last wrote, by pid.
#[derive(Debug)]
pub(super) struct Registration {
    pub(super) writer: orphans::RegistryWriter,
    pub(super) entries: BTreeMap<u32, Option<Entry>>,
}

impl Registration {
    pub(super) fn new(writer: orphans::RegistryWriter) -> Registration {
        Registration {
            writer,
            entries: BTreeMap::new(),
        }
    }
}

impl Master {
    /// Rewrites the registry when the set of worker processes changed (a spawn, an exit). Called
    /// after every wake-up of the loop: when nothing changed it only compares pids.
    pub(super) fn update_registry(&mut self) {
        let mut count = 0;
        let same = self.supervisor.processes().all(|(pid, ..)| {
            count += 1;
            self.registry.entries.contains_key(&pid)
        }) && count == self.registry.entries.len();
        if same {
            return;
        }
        let mut current: BTreeMap<u32, Option<Entry>> = BTreeMap::new();
        for (pid, worker, generation, program) in self.supervisor.processes() {
            let entry = match self.registry.entries.get(&pid) {
                Some(known) => known.clone(),
                // None: it ended before its start time could be read (nothing to guard).
                None => {
                    // Known from its spawn, unless the clock crossed a tick then, or it is a
                    // main process it announced (`MAINPID=`): then read from /proc.
                    let spawned = self
                        .links
                        .get(&worker)
                        .filter(|l| l.pid == Some(pid))
                        .and_then(|l| l.start_time);
                    let start_time = spawned.or_else(|| baton_sys::pidfd::start_time(pid).ok());
                    self.resources
                        .get(&generation)
                        .and_then(|r| r.programs.get(program))
                        .zip(start_time)
                        .map(|(p, started)| {
                            Entry::new(pid, started, p.drain_signal, p.drain_timeout)
                        })
                }
            };
            current.insert(pid, entry);
        }
        self.registry.entries = current;
        let entries: Vec<Entry> = self.registry.entries.values().flatten().cloned().collect();
        self.registry.writer.write(entries);
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
            .arg(self.registry.writer.path())
            .stdin(Stdio::null())
            // Not in the master's process group: a Ctrl-C for the master is not for it.
            .process_group(0);
        baton_sys::process::unblock_signals_in_child(&mut cmd);
        match cmd.spawn() {
            Ok(child) => {
                info!(
                    event = baton_proto::event::GUARD_STARTED,
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

/// Ends the workers a master killed before this one left behind (its registry names them): a
/// worker that ignores its drain signal would otherwise serve old code on the shared sockets for
/// good, and hold the ports this master is about to bind.
pub(super) fn end_predecessors_workers(registry: &orphans::Registry) {
    // Those still running: under systemd, say, the unit's stop killed them all already.
    let entries = orphans::alive(&registry.read());
    if entries.is_empty() {
        registry.remove();
        return;
    }
    let pids: Vec<String> = entries.iter().map(|e| e.pid.to_string()).collect();
    warn!(event = baton_proto::event::ORPHANS_FOUND, pids = %pids.join(" "), registry = %registry.path().display(),
        "a master before this one ended without stopping its workers; ending those still running of pids {}",
        pids.join(", "));
    let ended = orphans::end(&entries);
    orphans::report(&ended, "the master before this one");
    registry.remove();
}
