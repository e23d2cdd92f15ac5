//! What `it-worker` does, chosen by `IT_MODE` (its doc comment says each in full): an enum, so a
//! test names a mode the worker has, and the worker parses what the harness writes.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerMode {
    /// Receive the listeners, then exit with this code without reporting ready.
    Exit(u8),
    /// Receive the listeners and never report ready; exit on drain.
    NeverReady,
    /// Report ready, then exit with status 1 after this many ms (`IT_CRASHES` bounds it).
    CrashAfter(u64),
    /// Report ready after this many ms; exit on drain.
    ReadyAfter(u64),
    /// Write its open descriptors and some environment to this file, then serve.
    ReportFds(PathBuf),
    /// Report ready, then write its listener's socket options to this file, then serve.
    ReportSockopts(PathBuf),
    /// (systemd-style) Report ready, then abuse the notify socket for `IT_ABUSE_MS`.
    NotifyAbuse,
    /// Report ready, then ignore every drain request and signal it can.
    Stubborn,
    /// Speak the protocol by hand and send packets that are not messages.
    Garbage,
    /// Answer every datagram of every datagram listener.
    UdpEcho,
    /// The same, with its QUIC tag, lingering `IT_LINGER_MS` after its drain request.
    QuicEcho,
}

impl WorkerMode {
    /// `("IT_MODE", mode)`, for a worker's environment.
    pub fn env(&self) -> (String, String) {
        ("IT_MODE".to_string(), self.to_string())
    }

    /// The mode `IT_MODE` names (`None`: no such mode).
    pub fn parse(text: &str) -> Option<WorkerMode> {
        Some(match text.split_once(':') {
            Some(("exit", code)) => WorkerMode::Exit(code.parse().ok()?),
            Some(("crash-after", ms)) => WorkerMode::CrashAfter(ms.parse().ok()?),
            Some(("ready-after", ms)) => WorkerMode::ReadyAfter(ms.parse().ok()?),
            Some(("report-fds", path)) => WorkerMode::ReportFds(path.into()),
            Some(("report-sockopts", path)) => WorkerMode::ReportSockopts(path.into()),
            Some(_) => return None,
            None => match text {
                "never-ready" => WorkerMode::NeverReady,
                "notify-abuse" => WorkerMode::NotifyAbuse,
                "stubborn" => WorkerMode::Stubborn,
                "garbage" => WorkerMode::Garbage,
                "udp-echo" => WorkerMode::UdpEcho,
                "quic-echo" => WorkerMode::QuicEcho,
                _ => return None,
            },
        })
    }
}

impl fmt::Display for WorkerMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkerMode::Exit(code) => write!(f, "exit:{code}"),
            WorkerMode::NeverReady => f.write_str("never-ready"),
            WorkerMode::CrashAfter(ms) => write!(f, "crash-after:{ms}"),
            WorkerMode::ReadyAfter(ms) => write!(f, "ready-after:{ms}"),
            WorkerMode::ReportFds(path) => write!(f, "report-fds:{}", path.display()),
            WorkerMode::ReportSockopts(path) => write!(f, "report-sockopts:{}", path.display()),
            WorkerMode::NotifyAbuse => f.write_str("notify-abuse"),
            WorkerMode::Stubborn => f.write_str("stubborn"),
            WorkerMode::Garbage => f.write_str("garbage"),
            WorkerMode::UdpEcho => f.write_str("udp-echo"),
            WorkerMode::QuicEcho => f.write_str("quic-echo"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_reads_back_as_itself() {
        for mode in [
            WorkerMode::Exit(3),
            WorkerMode::NeverReady,
            WorkerMode::CrashAfter(200),
            WorkerMode::ReadyAfter(0),
            WorkerMode::ReportFds("/tmp/x".into()),
            WorkerMode::ReportSockopts("/tmp/y".into()),
            WorkerMode::NotifyAbuse,
            WorkerMode::Stubborn,
            WorkerMode::Garbage,
            WorkerMode::UdpEcho,
            WorkerMode::QuicEcho,
        ] {
            assert_eq!(WorkerMode::parse(&mode.to_string()), Some(mode));
        }
        assert_eq!(WorkerMode::parse("ready-after:soon"), None);
        assert_eq!(WorkerMode::parse("dance"), None);
    }
}
