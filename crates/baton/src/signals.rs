//! The signal adapter: the one place that registers signal handlers. Signals become
//! [`Input`]s; the core never sees a signal number.
//!
//! | signal        | becomes                              |
//! |---------------|--------------------------------------|
//! | SIGUSR2, SIGHUP | `Intent::Reload`                   |
//! | SIGTERM, SIGINT | `Intent::Stop { graceful: true }`  |
//! | SIGQUIT       | `Intent::Stop { graceful: false }`   |
//! | SIGUSR1       | `Intent::ReopenLogs` (never fatal)   |
//! | SIGCHLD       | `Input::ChildExited` (reap)          |
//!
//! SIGPIPE stays ignored, as the Rust runtime sets it before `main`: a worker or client that goes
//! away mid-write is an error to handle, never a reason to die.

use baton_core::master::Input;
use baton_core::supervisor::{Intent, Trigger};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::SignalsInfo;
use signal_hook::iterator::exfiltrator::WithOrigin;
use tokio::sync::mpsc::UnboundedSender;

/// Registers the handlers and forwards signals to `tx` from a dedicated thread, which blocks on
/// signal-hook's self-pipe: no polling.
pub(crate) fn forward(tx: UnboundedSender<Input>) -> std::io::Result<()> {
    let mut signals = SignalsInfo::<WithOrigin>::new([
        SIGUSR2, SIGHUP, SIGTERM, SIGINT, SIGQUIT, SIGUSR1, SIGCHLD,
    ])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for origin in signals.forever() {
                let sender_pid = origin.process.map(|p| p.pid as u32);
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
                    SIGUSR1 => Input::Intent(Intent::ReopenLogs(trigger("SIGUSR1"))),
                    SIGCHLD => Input::ChildExited,
                    _ => continue,
                };
                if tx.send(input).is_err() {
                    break;
                }
            }
        })?;
    Ok(())
}
