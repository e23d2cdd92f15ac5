//! A worker's output on its way to the master's log: the pipes set up before it starts, the
//! tasks reading them, and the last read when it exits (see [`crate::output`]).

use baton_sys::spawn::Spawn;
use std::fs::File;
use std::sync::Arc;

use baton_proto::control::OutputStream;
use tracing::warn;

use super::Master;
use crate::config::{Output, WorkerConfig};
use crate::output::{Capture, Origin, capture_task};
use crate::supervisor::{Generation, WorkerId};

/// How much an exited worker's pipes are read before its exit is acted on: what it wrote last
/// (the reason it failed) is in its tail when the verdict is given. The rest, if it wrote more,
/// comes through its capture task as usual.
const DRAIN_AT_EXIT: usize = 1 << 20;

/// The read ends of the pipes given to a worker as its stdout and stderr (none with
/// `output: inherit`).
pub(super) fn output_pipes(
    config: &WorkerConfig,
    spawn: &mut Spawn,
) -> std::io::Result<Vec<(OutputStream, File)>> {
    if config.output == Output::Inherit {
        return Ok(Vec::new());
    }
    let (stdout, stdout_w) = baton_sys::pipe::output_pipe()?;
    let (stderr, stderr_w) = baton_sys::pipe::output_pipe()?;
    // The write ends live in the spawn until the worker runs: then only the worker (and
    // whatever it starts) holds them, and the pipe ends when they are all gone.
    spawn.fd(stdout_w, 1).fd(stderr_w, 2);
    Ok(vec![
        (OutputStream::Stdout, stdout),
        (OutputStream::Stderr, stderr),
    ])
}

/// Who a worker is, for its lines.
pub(super) struct Who<'a> {
    pub(super) program: &'a str,
    pub(super) worker: WorkerId,
    pub(super) generation: Generation,
    pub(super) slot: usize,
    pub(super) pid: u32,
}

impl Master {
    /// Starts reading a worker's output pipes; returns the captures (kept in its link).
    pub(super) fn start_capture(
        &self,
        who: Who<'_>,
        pipes: Vec<(OutputStream, File)>,
    ) -> Vec<Arc<Capture>> {
        if pipes.is_empty() {
            return Vec::new();
        }
        let origin = Arc::new(Origin {
            program: who.program.into(),
            generation: who.generation.0,
            worker: who.worker.0,
            slot: who.slot as u64,
            pid: who.pid,
        });
        pipes
            .into_iter()
            .filter_map(|(stream, pipe)| {
                match Capture::new(pipe, origin.clone(), stream, self.output.clone()) {
                    Ok(capture) => {
                        // Not one of the link's tasks: it outlives the worker's exit until the
                        // pipe ends (a child of the worker may still hold it and write).
                        tokio::spawn(capture_task(capture.clone()));
                        Some(capture)
                    }
                    Err(err) => {
                        // The worker then blocks once its pipe is full: say why.
                        warn!(
                            worker = who.worker.0,
                            "cannot read worker {}'s {}: {err}",
                            who.worker,
                            stream.as_str()
                        );
                        None
                    }
                }
            })
            .collect()
    }

    /// A child exited: if it was a worker's process, what it left in its pipes is logged (and
    /// kept) before the exit is acted on.
    pub(super) fn drain_output(&self, pid: u32) {
        if let Some(link) = self.links.values().find(|link| link.pid == Some(pid)) {
            for capture in &link.output {
                capture.drain(DRAIN_AT_EXIT);
            }
        }
    }
}
