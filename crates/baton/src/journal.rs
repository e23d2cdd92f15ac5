//! Logging to journald in its native protocol (`systemd.journal-fields(7)`), used when stderr is
//! the journal (`$JOURNAL_STREAM` names it). Each event is one datagram of `KEY=value` fields,
//! so the structure survives: `journalctl -u baton BATON_EVENT=reload_failed`, and a worker's
//! line with `SYSLOG_IDENTIFIER=` its program (`journalctl -t web`), `BATON_GENERATION=`,
//! `BATON_WORKER=`, `BATON_SLOT=`, `BATON_STREAM=`, and `OBJECT_PID=` its pid, for which journald
//! (when baton runs as root) adds that process's own `OBJECT_*` fields. A datagram the journal
//! does not take is written to stderr as a `<N>`-prefixed line instead, so nothing is lost.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

/// Where journald takes native messages.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Whether stderr is the journal's stream (`$JOURNAL_STREAM` is `DEVICE:INODE` of it): the way
/// `sd_journal_stream_fd(3)` programs are told to switch to the native protocol.
pub(crate) fn stderr_is_journal() -> bool {
    let Some(wanted) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    wanted.to_str() == Some(&format!("{}:{}", meta.dev(), meta.ino()))
}

/// The layer that sends each event to the journal.
pub(crate) struct Journal {
    socket: UnixDatagram,
    path: &'static Path,
}

impl Journal {
    pub(crate) fn new() -> std::io::Result<Journal> {
        Journal::at(Path::new(JOURNAL_SOCKET))
    }

    fn at(path: &Path) -> std::io::Result<Journal> {
        Ok(Journal {
            socket: UnixDatagram::unbound()?,
            path: Box::leak(path.to_path_buf().into_boxed_path()),
        })
    }
}

/// An event's fields as journal fields.
#[derive(Default)]
struct Fields {
    message: String,
    /// `(KEY, value)`, keys already journal-shaped (`BATON_GENERATION`).
    others: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record(field, format!("{value:?}"));
    }
}

impl Fields {
    fn record(&mut self, field: &Field, value: String) {
        if field.name() == "message" {
            self.message = value;
        } else {
            self.others.push((journal_key(field.name()), value));
        }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.others
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// `generation` -> `BATON_GENERATION`: upper case, `[A-Z0-9_]` only, as journald requires of
/// fields an application sets.
fn journal_key(name: &str) -> String {
    let mut key = String::from("BATON_");
    key.extend(name.chars().map(|c| match c {
        'a'..='z' => c.to_ascii_uppercase(),
        'A'..='Z' | '0'..='9' => c,
        _ => '_',
    }));
    key
}

/// Appends one field: `KEY=value\n`, or the length-prefixed form for a value with a newline.
fn put(datagram: &mut Vec<u8>, key: &str, value: &str) {
    datagram.extend_from_slice(key.as_bytes());
    if value.contains('\n') {
        datagram.push(b'\n');
        datagram.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        datagram.push(b'=');
    }
    datagram.extend_from_slice(value.as_bytes());
    datagram.push(b'\n');
}

fn priority(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        _ => 7,
    }
}

/// The datagram for one event: a worker's line (target `baton::output`) or the master's own.
fn datagram(metadata: &tracing::Metadata<'_>, fields: &Fields) -> Vec<u8> {
    let mut d = Vec::with_capacity(fields.message.len() + 256);
    put(&mut d, "MESSAGE", &fields.message);
    let output = metadata.target() == "baton::output";
    // A worker's line keeps the priority it would get on a journal stream: informational.
    put(&mut d, "PRIORITY", &priority(*metadata.level()).to_string());
    let identifier = match fields.get("BATON_PROGRAM") {
        Some(program) if output => program,
        _ => "baton",
    };
    put(&mut d, "SYSLOG_IDENTIFIER", identifier);
    if output {
        if let Some(pid) = fields.get("BATON_PID") {
            put(&mut d, "OBJECT_PID", pid);
            put(&mut d, "SYSLOG_PID", pid);
        }
    }
    for (key, value) in &fields.others {
        put(&mut d, key, value);
    }
    d
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Journal {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let datagram = datagram(event.metadata(), &fields);
        if self.socket.send_to(&datagram, self.path).is_err() {
            // Too large, or no journal at that path: the stream still takes it.
            let mut line = String::new();
            let _ = writeln!(
                line,
                "<{}>{}",
                priority(*event.metadata().level()),
                fields.message.replace('\n', " ")
            );
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// The fields of one native-protocol datagram (simple `KEY=value` form only).
    fn parse(datagram: &[u8]) -> Vec<(String, String)> {
        String::from_utf8_lossy(datagram)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_workers_line_reaches_a_real_socket_with_its_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.sock");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let subscriber = tracing_subscriber::registry().with(Journal::at(&path).unwrap());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "baton::output", event = baton_proto::event::OUTPUT, program = "web",
                generation = 3u64, worker = 12u64, slot = 0u64, pid = 4242u32,
                stream = "stderr", "{}", "listening on :8080");
            tracing::warn!(
                event = baton_proto::event::RELOAD_FAILED,
                generation = 4u64,
                "reload 2 failed:\nwhy"
            );
        });
        let mut buf = vec![0u8; 65536];
        let n = receiver.recv(&mut buf).unwrap();
        let fields = parse(&buf[..n]);
        let has = |k: &str, v: &str| fields.iter().any(|(fk, fv)| fk == k && fv == v);
        assert!(has("MESSAGE", "listening on :8080"), "{fields:?}");
        assert!(has("SYSLOG_IDENTIFIER", "web"));
        assert!(has("PRIORITY", "6"));
        assert!(has("OBJECT_PID", "4242"));
        assert!(has("BATON_PROGRAM", "web"));
        assert!(has("BATON_GENERATION", "3"));
        assert!(has("BATON_WORKER", "12"));
        assert!(has("BATON_SLOT", "0"));
        assert!(has("BATON_STREAM", "stderr"));
        let n = receiver.recv(&mut buf).unwrap();
        let second = &buf[..n];
        // A message with a newline takes the length-prefixed form.
        let mut expected = b"MESSAGE\n".to_vec();
        expected.extend_from_slice(&(20u64).to_le_bytes());
        expected.extend_from_slice(b"reload 2 failed:\nwhy\n");
        assert!(second.starts_with(&expected), "{second:?}");
        let fields = parse(second);
        assert!(fields.contains(&("SYSLOG_IDENTIFIER".into(), "baton".into())));
        assert!(fields.contains(&("PRIORITY".into(), "4".into())));
        assert!(fields.contains(&("BATON_EVENT".into(), "reload_failed".into())));
    }

    #[test]
    fn keys_are_journal_shaped() {
        assert_eq!(journal_key("restart_in_ms"), "BATON_RESTART_IN_MS");
        assert_eq!(journal_key("a.b-c"), "BATON_A_B_C");
    }
}
