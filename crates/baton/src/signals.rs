//! The signal adapter: the one place that registers signal handlers. Signals become
//! [`Input`]s: intents, which carry no signal number, except for the upgrade signals, which reach
//! the core by name (`Input::UpgradeSignal`) because only the serving configuration
//! (`supervisor.upgrade_signal`) says whether SIGURG or SIGWINCH means "upgrade".
//!
//! | signal        | becomes                              |
//! |---------------|--------------------------------------|
//! | SIGUSR2, SIGHUP | `Intent::Reload`                   |
//! | SIGTERM, SIGINT | `Intent::Stop { graceful: true }`  |
//! | SIGQUIT       | `Intent::Stop { graceful: false }`   |
//! | SIGUSR1       | reopens `--log-file`, then `Intent::ReopenLogs` (never fatal) |
//! | SIGCHLD       | `Input::ChildExited` (reap)          |
//! | SIGURG, SIGWINCH | `Input::UpgradeSignal`: an upgrade if `supervisor.upgrade_signal` names it, else ignored (their default) |
//!
//! These signals are blocked in every thread but the adapter's own (the master blocks them
//! before it starts any thread), so the adapter can hold them: during a self-upgrade it blocks
//! them too, and new ones wait in the kernel, across the `execve`, for the next program.
//!
//! SIGPIPE stays ignored, as the Rust runtime sets it before `main`: a worker or client that goes
//! away mid-write is an error to handle, never a reason to die.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use baton_core::intent::{Intent, Trigger};
use baton_core::master::{Input, SignalGate};
use baton_sys::process::SignalNumber as Signal;
use signal_hook::consts::{
    SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGURG, SIGUSR1, SIGUSR2, SIGWINCH,
};
use signal_hook::iterator::SignalsInfo;
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::low_level::siginfo::Origin;
use tokio::sync::mpsc::UnboundedSender;

const HANDLED: [Signal; 9] = [
    Signal::SIGUSR2,
    Signal::SIGHUP,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGCHLD,
    Signal::SIGURG,
    Signal::SIGWINCH,
];

/// Blocks the handled signals in the calling thread (and so in every thread it starts).
pub(crate) fn block_in_this_thread() -> std::io::Result<()> {
    baton_sys::upgrade::block_signals(&HANDLED)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GateState {
    Open,
    HoldAsked,
    Held,
    ReleaseAsked,
}

/// The master's handle on the adapter (see [`SignalGate`]).
pub(crate) struct Gate {
    shared: Arc<(Mutex<GateState>, Condvar)>,
}

/// Registers the handlers and forwards signals to `tx` from a dedicated thread, which blocks on
/// signal-hook's self-pipe: no polling.
pub(crate) fn forward(tx: UnboundedSender<Input>) -> std::io::Result<Gate> {
    let mut signals = SignalsInfo::<WithOrigin>::new(HANDLED.map(|s| s as i32))?;
    let shared = Arc::new((Mutex::new(GateState::Open), Condvar::new()));
    let gate = shared.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let (state, changed) = &*gate;
            // Signals that waited (blocked) until now, also from before an exec, arrive here.
            let _ = baton_sys::upgrade::unblock_signals(&HANDLED);
            loop {
                for origin in signals.wait() {
                    if !send(&tx, &origin) {
                        return;
                    }
                }
                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                if *s != GateState::HoldAsked {
                    continue;
                }
                // Hold: block, then forward what the handlers recorded before the block.
                let _ = baton_sys::upgrade::block_signals(&HANDLED);
                for origin in signals.pending() {
                    send(&tx, &origin);
                }
                *s = GateState::Held;
                changed.notify_all();
                while *s != GateState::ReleaseAsked {
                    s = changed.wait(s).unwrap_or_else(|e| e.into_inner());
                }
                *s = GateState::Open;
                changed.notify_all();
                let _ = baton_sys::upgrade::unblock_signals(&HANDLED);
            }
        })?;
    Ok(Gate { shared })
}

fn send(tx: &UnboundedSender<Input>, origin: &Origin) -> bool {
    let sender_pid = origin.process.as_ref().map(|p| p.pid as u32);
    let trigger = |name| Trigger::Signal { name, sender_pid };
    let input = match origin.signal {
        SIGUSR2 => Input::Intent(Intent::Reload(trigger("SIGUSR2"))),
        SIGHUP => Input::Intent(Intent::Reload(trigger("SIGHUP"))),
        SIGTERM => Input::Intent(Intent::Stop {
            graceful: true,
            trigger: trigger("SIGTERM"),
        }),
        SIGINT => Input::Intent(Intent::Stop {
            graceful: true,
            trigger: trigger("SIGINT"),
        }),
        SIGQUIT => Input::Intent(Intent::Stop {
            graceful: false,
            trigger: trigger("SIGQUIT"),
        }),
        SIGUSR1 => {
            // The master's own log first (logrotate renamed it), then the core's part:
            // forwarding to workers if configured.
            if let Err(err) = crate::logfile::reopen() {
                tracing::warn!("SIGUSR1: cannot reopen the log file: {err}");
            }
            Input::Intent(Intent::ReopenLogs(trigger("SIGUSR1")))
        }
        SIGCHLD => Input::ChildExited,
        SIGURG => Input::UpgradeSignal {
            signal: Signal::SIGURG,
            trigger: trigger("SIGURG"),
        },
        SIGWINCH => Input::UpgradeSignal {
            signal: Signal::SIGWINCH,
            trigger: trigger("SIGWINCH"),
        },
        _ => return true,
    };
    tx.send(input).is_ok()
}

impl SignalGate for Gate {
    fn hold(&mut self) {
        let (state, changed) = &*self.shared;
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        *s = GateState::HoldAsked;
        // Wake the adapter: a SIGCHLD to the process reaches its thread, the only one that
        // takes it (it only costs a reap).
        let _ = baton_sys::process::signal_process(std::process::id(), Signal::SIGCHLD);
        let (guard, _) = changed
            .wait_timeout_while(s, Duration::from_secs(5), |s| *s != GateState::Held)
            .unwrap_or_else(|e| e.into_inner());
        if *guard != GateState::Held {
            tracing::warn!("the signal thread did not hold signals within 5 s");
        }
    }

    fn release(&mut self) {
        let (state, changed) = &*self.shared;
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        if *s == GateState::Held {
            *s = GateState::ReleaseAsked;
        } else {
            *s = GateState::Open;
        }
        changed.notify_all();
    }
}
