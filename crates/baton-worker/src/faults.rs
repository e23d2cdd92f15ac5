//! Fault points of connection handoff, for the fault tests (issue 30).
//!
//! Built in only with the `failpoints` feature (the test suite's build asks for it; an
//! application's build never has it, and then [`check`] is always `None` and costs nothing).
//! A worker configures them from `BATON_WORKER_FAILPOINTS` (`point=actions;...`, the `fail`
//! crate's grammar: `handoff.giver.offered=10*off->return` fires at the eleventh connection
//! offered, a batch's counted one by one), read
//! the first time a point is passed. What `return` does at each point is the point's own
//! ([`Point`]); `sleep(MS)` holds the thread there that long.

/// The steps of a handoff a fault can be injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Point {
    /// A giver sent an offer (with its descriptor) and waits for the answer. `return`: the
    /// worker exits there, the offer in flight.
    GiverOffered,
    /// A giver got `prepared` and is about to commit. `return`: the worker exits there.
    GiverCommit,
    /// A taker got an offer. `return`: it refuses it (`refused by a fault point`).
    TakerOffer,
    /// A taker sent `prepared` and waits for the commit. `return`: the worker exits there.
    TakerPrepared,
}

impl Point {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Point::GiverOffered => "handoff.giver.offered",
            Point::GiverCommit => "handoff.giver.commit",
            Point::TakerOffer => "handoff.taker.offer",
            Point::TakerPrepared => "handoff.taker.prepared",
        }
    }
}

/// Whether a `return` fired at `point` now.
#[cfg(feature = "failpoints")]
pub(crate) fn check(point: Point) -> bool {
    static ARMED: std::sync::Once = std::sync::Once::new();
    ARMED.call_once(|| {
        let spec = std::env::var("BATON_WORKER_FAILPOINTS").unwrap_or_default();
        for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let configured = entry
                .split_once('=')
                .ok_or_else(|| "not `point=actions`".to_string())
                .and_then(|(name, actions)| fail::cfg(name.trim(), actions.trim()));
            if let Err(reason) = configured {
                tracing::warn!("BATON_WORKER_FAILPOINTS: `{entry}`: {reason}");
            }
        }
    });
    let fired = || -> bool {
        fail::fail_point!(point.name(), |_| true);
        false
    };
    fired()
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn check(_: Point) -> bool {
    false
}

/// The worker ends at `point`, as a crash would: it SIGKILLs itself (no destructor, no
/// goodbye to anyone).
pub(crate) fn exit_at(point: Point) {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "fault injected at {}: the worker kills itself",
        point.name()
    );
    let _ = baton_sys::process::signal_process(
        std::process::id(),
        baton_sys::process::SignalNumber::SIGKILL,
    );
}
