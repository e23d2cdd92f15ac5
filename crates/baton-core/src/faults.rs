//! Fault points on the reload and upgrade paths, for the reliability tests (issue 20).
//!
//! Each [`Point`] names one step of a reload or a self-upgrade. In a build with the
//! `failpoints` feature (the test suite's build: `baton-integration` asks for it; a release
//! build and the Debian package never have it) a master started with `FAILPOINTS` set
//! configures them through the `fail` crate, whose grammar gives counts, probabilities and
//! chains: `FAILPOINTS='worker.spawn=2*off->1*return(error)'` makes the third spawn fail.
//! What each action does at a point:
//!
//! - `return(error)` (or `return`): the step fails as its system call would, with an error
//!   naming the point (`fault injected at worker.spawn`); the caller handles it like any other
//!   failure of that step;
//! - `return(kill)`: the master SIGKILLs itself right there;
//! - `return(panic)`: the task passing the point panics (`control.accept`: the control socket's
//!   task, which the master then serves again);
//! - `sleep(MS)`: the step takes that long. The master runs on one thread, so the whole loop
//!   waits, as it would behind a slow system call (a fork under memory pressure, a file on a
//!   hung disk): deadlines that expired meanwhile are acted on when the step returns.
//!
//! Every injection is logged (`event = baton_proto::event::FAULT_INJECTED`) so a test can tell that its fault
//! fired. In a build without the feature, [`Point::check`] is always `Ok` and costs nothing,
//! and a master started with `FAILPOINTS` set refuses to start ([`arm`]) instead of silently
//! running without the faults a test asked for.

use std::fmt;

/// The steps a fault can be injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// A reload reads its configuration file.
    ConfigRead,
    /// A reload binds a listener it adds.
    ListenerBind,
    /// A worker's process is made (clone and exec).
    WorkerSpawn,
    /// The listeners are sent to a baton-protocol worker (`SCM_RIGHTS`).
    HandoffSend,
    /// A worker's readiness reaches the state machine.
    WorkerReady,
    /// A new generation becomes the serving one (its verdict is carried out).
    Promotion,
    /// An old worker is asked to drain (its drain packet and its drain signal).
    DrainRequest,
    /// A worker past its drain deadline is killed.
    DrainKill,
    /// A verdict goes to the control clients waiting for it.
    VerdictDelivery,
    /// The listeners are handed to the service manager's fd store.
    FdStoreUpdate,
    /// A self-upgrade writes the master's state.
    StateWrite,
    /// A self-upgrade execs the new program.
    Exec,
    /// The control socket accepts a client (`return(panic)`: its task panics).
    ControlAccept,
    /// The new program takes over after the exec ([`crate::master::Master::resume`]). The old
    /// program's faults end with it (the exec drops `FAILPOINTS`): a test arms this one with
    /// `FAILPOINTS_AFTER_UPGRADE`, which the exec passes on as the new program's `FAILPOINTS`.
    Resume,
}

/// The variable whose value a self-upgrade passes to the new program as `FAILPOINTS`.
pub const AFTER_UPGRADE_ENV: &str = "FAILPOINTS_AFTER_UPGRADE";

impl Point {
    /// Every point, in the order of a reload and then an upgrade.
    pub const ALL: [Point; 14] = [
        Point::ConfigRead,
        Point::ListenerBind,
        Point::WorkerSpawn,
        Point::HandoffSend,
        Point::WorkerReady,
        Point::Promotion,
        Point::DrainRequest,
        Point::DrainKill,
        Point::VerdictDelivery,
        Point::FdStoreUpdate,
        Point::StateWrite,
        Point::Exec,
        Point::Resume,
        Point::ControlAccept,
    ];

    /// The point's name in `FAILPOINTS` and in the log.
    pub fn name(self) -> &'static str {
        match self {
            Point::ConfigRead => "config.read",
            Point::ListenerBind => "listener.bind",
            Point::WorkerSpawn => "worker.spawn",
            Point::HandoffSend => "handoff.send",
            Point::WorkerReady => "worker.ready",
            Point::Promotion => "promotion",
            Point::DrainRequest => "drain.request",
            Point::DrainKill => "drain.kill",
            Point::VerdictDelivery => "verdict.delivery",
            Point::FdStoreUpdate => "fdstore.update",
            Point::StateWrite => "upgrade.state_write",
            Point::Exec => "upgrade.exec",
            Point::Resume => "upgrade.resume",
            Point::ControlAccept => "control.accept",
        }
    }

    fn named(name: &str) -> Option<Point> {
        Point::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Passes the point: `Err` when a fault configured there says so (the error names the
    /// point); `return(kill)` ends the master here. Always `Ok` in a build without the
    /// `failpoints` feature.
    pub fn check(self) -> std::io::Result<()> {
        #[cfg(feature = "failpoints")]
        {
            let started = std::time::Instant::now();
            let fired = fired(self.name());
            let held = started.elapsed();
            if held >= std::time::Duration::from_millis(10) {
                tracing::warn!(
                    event = baton_proto::event::FAULT_INJECTED,
                    point = self.name(),
                    fault = "delay",
                    ms = held.as_millis() as u64,
                    "fault injected at {self}: the step took {} ms",
                    held.as_millis()
                );
            }
            match fired.as_deref() {
                None => {}
                Some("panic") => {
                    tracing::warn!(
                        event = baton_proto::event::FAULT_INJECTED,
                        point = self.name(),
                        fault = "panic",
                        "fault injected at {self}: the task panics"
                    );
                    #[allow(clippy::panic)] // the fault asked for
                    {
                        panic!("fault injected at {self}");
                    }
                }
                Some("kill") => {
                    tracing::warn!(
                        event = baton_proto::event::FAULT_INJECTED,
                        point = self.name(),
                        fault = "kill",
                        "fault injected at {self}: the master kills itself"
                    );
                    let _ = baton_sys::process::signal_process(
                        std::process::id(),
                        baton_sys::process::SignalNumber::SIGKILL,
                    );
                }
                Some(_) => {
                    tracing::warn!(
                        event = baton_proto::event::FAULT_INJECTED,
                        point = self.name(),
                        fault = "error",
                        "fault injected at {self}: the step fails"
                    );
                    return Err(std::io::Error::other(format!("fault injected at {self}")));
                }
            }
        }
        Ok(())
    }
}

impl Point {
    /// Passes a point at a step that cannot fail (a decision already taken in memory): a delay
    /// or a kill configured there applies; an error is logged and changes nothing.
    pub fn pass(self) {
        if let Err(err) = self.check() {
            tracing::warn!(
                point = self.name(),
                "{err}: nothing at this step can fail, ignored"
            );
        }
    }
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The argument of the `return` action configured at `name`, if it fired now (`""` for a
/// bare `return`).
#[cfg(feature = "failpoints")]
fn fired(name: &str) -> Option<String> {
    let eval = || -> Option<String> {
        fail::fail_point!(name, |arg: Option<String>| Some(arg.unwrap_or_default()));
        None
    };
    eval()
}

/// Why `FAILPOINTS` was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArmError {
    #[error(
        "FAILPOINTS is set but this baton was built without fault points (the `failpoints` feature of baton-core; only the test suite's build has it)"
    )]
    NotBuiltIn,
    #[error("FAILPOINTS: `{0}` is not `point=actions`")]
    Syntax(String),
    #[error("FAILPOINTS: no fault point `{name}` (there are: {known})")]
    UnknownPoint { name: String, known: String },
    #[error("FAILPOINTS: fault point `{name}`: {reason}")]
    Actions { name: String, reason: String },
}

/// Configures the fault points from `FAILPOINTS` (`point=actions;...`, the `fail` crate's
/// grammar), if it is set. Returns the points armed.
pub fn arm(failpoints: Option<&str>) -> Result<Vec<Point>, ArmError> {
    let Some(spec) = failpoints.filter(|s| !s.trim().is_empty()) else {
        return Ok(Vec::new());
    };
    let mut armed = Vec::new();
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, actions) = entry
            .split_once('=')
            .ok_or_else(|| ArmError::Syntax(entry.to_string()))?;
        let point = Point::named(name.trim()).ok_or_else(|| ArmError::UnknownPoint {
            name: name.trim().to_string(),
            known: Point::ALL.map(Point::name).join(", "),
        })?;
        configure(point, actions.trim())?;
        armed.push(point);
    }
    Ok(armed)
}

#[cfg(feature = "failpoints")]
fn configure(point: Point, actions: &str) -> Result<(), ArmError> {
    fail::cfg(point.name(), actions).map_err(|reason| ArmError::Actions {
        name: point.name().to_string(),
        reason,
    })
}

#[cfg(not(feature = "failpoints"))]
fn configure(_: Point, _: &str) -> Result<(), ArmError> {
    Err(ArmError::NotBuiltIn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        for p in Point::ALL {
            assert_eq!(Point::named(p.name()), Some(p));
        }
        let mut names = Point::ALL.map(Point::name).to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Point::ALL.len());
    }

    #[test]
    fn nothing_set_arms_nothing() {
        assert_eq!(arm(None), Ok(vec![]));
        assert_eq!(arm(Some("  ")), Ok(vec![]));
    }

    #[test]
    fn a_bad_spec_is_named() {
        assert_eq!(
            arm(Some("worker.spawn")),
            Err(ArmError::Syntax("worker.spawn".into()))
        );
        let err = arm(Some("worker.spwan=return")).unwrap_err();
        assert!(
            err.to_string().contains("no fault point `worker.spwan`")
                && err.to_string().contains("worker.spawn"),
            "{err}"
        );
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn an_armed_error_fails_the_step_once_then_passes() {
        // A point no other unit test passes: the registry is global to the test process.
        assert_eq!(
            arm(Some("upgrade.state_write=1*return(error)")),
            Ok(vec![Point::StateWrite])
        );
        let err = Point::StateWrite.check().unwrap_err();
        assert_eq!(err.to_string(), "fault injected at upgrade.state_write");
        assert!(Point::StateWrite.check().is_ok());
        assert!(Point::Exec.check().is_ok());
        let err = arm(Some("upgrade.exec=nonsense(")).unwrap_err();
        assert!(matches!(err, ArmError::Actions { .. }), "{err}");
    }

    #[cfg(not(feature = "failpoints"))]
    #[test]
    fn a_build_without_fault_points_refuses_them() {
        assert_eq!(arm(Some("worker.spawn=return")), Err(ArmError::NotBuiltIn));
        assert!(Point::WorkerSpawn.check().is_ok());
    }
}
