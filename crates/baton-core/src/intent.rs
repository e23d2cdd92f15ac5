//! What an operator wants ([`Intent`]) and who asked ([`Trigger`]): the input vocabulary of the
//! core, whatever channel it came through (a signal, a control request, a closed input). The
//! binary's signal adapter builds these without knowing the state machine.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Who asked for something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    Signal {
        name: &'static str,
        sender_pid: Option<u32>,
    },
    Other(String),
}

/// A trigger crosses a master upgrade as its text (what the log and history show anyway).
impl Serialize for Trigger {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Trigger {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Trigger::Other(String::deserialize(d)?))
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::Signal {
                name,
                sender_pid: Some(pid),
            } => write!(f, "{name} from pid {pid}"),
            Trigger::Signal {
                name,
                sender_pid: None,
            } => write!(f, "{name}"),
            Trigger::Other(what) => write!(f, "{what}"),
        }
    }
}

/// What an operator wants, whatever the channel it came through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intent {
    Reload(Trigger),
    /// Graceful: drain every generation within its deadline, then exit 0. Fast: kill workers now.
    Stop {
        graceful: bool,
        trigger: Trigger,
    },
    /// SIGUSR1: never fatal; forwarded to workers only if configured.
    ReopenLogs(Trigger),
}
