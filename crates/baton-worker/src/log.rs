//! A worker's log to stderr, which the master captures (`output` events, docs/workers.md).

use std::io::IsTerminal;

/// Sends `tracing` events to stderr: without their target, coloured only on a terminal, and
/// without tracing-subscriber's report of a failed write. That report is an `eprintln!`, which
/// panics when stderr is broken: when the master dies, stderr's reader goes with it, and a
/// worker that reported so would die in the middle of its drain, with the connections it
/// holds.
pub fn to_stderr() {
    tracing_subscriber::fmt()
        .log_internal_errors(false)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
