//! The control protocol: what `baton status`, `baton reload`, ... say to a running master over
//! its control socket (`docs/protocol.md`, "Control socket").
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of JSON: an [`Envelope`]
//! holding a [`Request`] (client to master) or a [`Response`] (master to client). One request,
//! one response, per connection.

use serde::{Deserialize, Serialize};

/// Version of the control protocol spoken by this build.
pub const CONTROL_VERSION: u32 = 1;

/// Largest request the master reads, and the largest answer a client that says nothing of its
/// own limit reads (every baton before issue 28: its answers were one frame of at most this).
pub const MAX_FRAME: usize = 64 * 1024;

/// Largest answer a client of this build reads (it says so in its request's `reads`): `status`
/// of 10 000 listeners and 1000 workers is a few MiB.
pub const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// A versioned frame body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub version: u32,
    pub body: T,
    /// In a request: the largest answer frame the client reads (absent: [`MAX_FRAME`]). A master
    /// before it ignores the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reads: Option<u64>,
}

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// The master and every generation. `brief`: without each listener's socket options read
    /// back from the kernel (a few system calls per listener; `baton status` does not show
    /// them, `status --json` does). Absent: false, so the field is only sent when true, and a
    /// master before it ignores it.
    Status {
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        brief: bool,
    },
    /// Reload now. With `wait`, the answer is the verdict of the reload that covers this request;
    /// without, the answer is immediate and names the request.
    Reload { wait: bool },
    /// The verdict of an earlier request (`wait` after `--no-wait`).
    Verdict { request: u64 },
    /// The last reloads.
    History,
    /// Stop the master: drain everything (`fast: false`) or kill workers now.
    Stop { fast: bool },
    /// Counters and gauges in the Prometheus text exposition format.
    Metrics,
    /// Replace the master's program in place (same pid, sockets and workers): with `binary`, or
    /// the one the master was started from. The answer is [`Response::Upgraded`].
    Upgrade { binary: Option<String> },
    /// The workers' last output lines the master keeps, of the workers that match every filter
    /// given. The answer is one or more [`Response::Logs`] frames, the last with `done`; with
    /// `follow`, frames of new lines go on until the client or the master goes.
    Logs {
        #[serde(default)]
        filter: OutputFilter,
        #[serde(default)]
        follow: bool,
    },
}

/// Which workers' output `logs` asks for: each given field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<u64>,
}

impl OutputFilter {
    pub fn matches(&self, line: &OutputLine) -> bool {
        self.program.as_ref().is_none_or(|p| *p == line.program)
            && self.generation.is_none_or(|g| g == line.generation)
            && self.worker.is_none_or(|w| w == line.worker)
    }
}

/// Which stream of a worker a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    Stdout,
    Stderr,
    /// A stream this build does not know (from a newer master).
    #[serde(other)]
    Unknown,
}

impl OutputStream {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
            OutputStream::Unknown => "unknown",
        }
    }
}

/// One line a worker wrote, with where it came from. `text` is escaped: no control character
/// and no invalid UTF-8 (shown as `\u{1b}`, `\xff`); a line cut at the master's limit ends
/// with a marker saying how much was cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputLine {
    /// Order among every worker's lines since the master started.
    pub seq: u64,
    pub unix_ms: u64,
    pub program: String,
    pub generation: u64,
    pub worker: u64,
    pub slot: u64,
    pub pid: u32,
    pub stream: OutputStream,
    pub text: String,
}

/// What a request asks, in words (for logs): `reload (waiting for the verdict)`.
impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Status { .. } => write!(f, "status"),
            Request::Reload { wait: true } => write!(f, "reload (waiting for the verdict)"),
            Request::Reload { wait: false } => write!(f, "reload"),
            Request::Verdict { request } => write!(f, "the verdict of request #{request}"),
            Request::History => write!(f, "history"),
            Request::Stop { fast: true } => write!(f, "fast stop"),
            Request::Stop { fast: false } => write!(f, "stop"),
            Request::Metrics => write!(f, "metrics"),
            Request::Upgrade { binary: Some(b) } => write!(f, "upgrade to {b:?}"),
            Request::Upgrade { binary: None } => write!(f, "upgrade"),
            Request::Logs { follow: true, .. } => write!(f, "logs (following)"),
            Request::Logs { follow: false, .. } => write!(f, "logs"),
        }
    }
}

impl Request {
    /// Whether the request changes anything (needs the mutating permission).
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            Request::Reload { .. } | Request::Stop { .. } | Request::Upgrade { .. }
        )
    }
}

/// What the master answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Status(StatusSnapshot),
    /// A reload request was registered (the answer to `reload` without `wait`).
    Accepted {
        request: u64,
    },
    /// How the reload covering `request` ended.
    Verdict(ReloadVerdict),
    History {
        reloads: Vec<ReloadRecord>,
    },
    /// The answer to `metrics`: Prometheus text exposition format (version 0.0.4).
    Metrics {
        text: String,
    },
    /// The stop was accepted.
    Stopping {
        fast: bool,
    },
    /// The verdict of an upgrade: given by the new program on success, by the old one (still
    /// running) on failure.
    Upgraded(UpgradeVerdict),
    /// Workers' output lines, oldest first. `skipped`: lines a follower missed because it read
    /// slower than the workers wrote. `done`: no frame follows.
    Logs {
        lines: Vec<OutputLine>,
        #[serde(default, skip_serializing_if = "is_zero")]
        skipped: u64,
        done: bool,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// How a master self-upgrade ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeVerdict {
    pub ok: bool,
    pub pid: u32,
    pub from_version: String,
    /// The version now running (the old one when the upgrade failed).
    pub version: String,
    pub binary: String,
    pub reason: Option<String>,
    pub duration_ms: u64,
}

/// One self-upgrade in a master's life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeInfo {
    pub from_version: String,
    pub to_version: String,
    pub at_unix_ms: u64,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The frame could not be read or decoded.
    BadRequest,
    /// The envelope's version is not [`CONTROL_VERSION`].
    Version,
    /// The peer may not do this.
    PermissionDenied,
    /// The master cannot do it now (it is stopping, or another upgrade runs).
    Unavailable,
    /// What the request names does not exist (a reload request id never handed out).
    NotFound,
    /// A kind this build does not know (from a newer master).
    #[serde(other)]
    Unknown,
}

/// The verdict of one reload request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadVerdict {
    pub request: u64,
    /// The reload that covered it (none if it was rejected before one started).
    pub reload: Option<u64>,
    /// The generation it started.
    pub generation: Option<u64>,
    pub ok: bool,
    /// Why it failed (`ok: false`).
    pub reason: Option<String>,
    pub duration_ms: Option<u64>,
    /// What the reload read but did not apply: settings that take effect only at the next start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// When a worker failed it: the last lines it wrote on stderr (escaped), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output: Vec<String>,
    /// What the kernel did with connections during the reload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<ReloadReceipt>,
}

/// What the kernel did with connections before any worker saw them, during one reload: its
/// drop counters (of the master's network namespace: every listener there moves them, baton's
/// or not) from the reload's start to its verdict, and the fullest each listener's accept queue
/// was when sampled (every 10 ms).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReceipt {
    /// `ListenOverflows`: handshakes completed into a full accept queue.
    pub listen_overflows: u64,
    /// `ListenDrops`: connections dropped at a listener, overflows included.
    pub listen_drops: u64,
    /// `SyncookiesSent`: SYNs answered with a cookie because the SYN queue was full.
    pub syncookies_sent: u64,
    pub queues: Vec<QueuePeak>,
}

/// The fullest a listener's accept queue was during a reload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePeak {
    pub listener: String,
    pub peak: u32,
    pub max: u32,
}

impl std::fmt::Display for ReloadReceipt {
    /// `0 connections dropped by the kernel, queue peak 37 of 1024 on http`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} connections dropped by the kernel", self.listen_drops)?;
        if self.syncookies_sent > 0 {
            write!(f, ", {} SYN cookies sent", self.syncookies_sent)?;
        }
        // Every listener up to a few; beyond, the fullest (a verdict of 10 000 listeners must
        // stay a line). The whole list is in the JSON.
        const SHOWN: usize = 5;
        let mut shown: Vec<&QueuePeak> = self.queues.iter().collect();
        if shown.len() > SHOWN {
            shown.sort_by(|a, b| {
                let share = |q: &QueuePeak| u64::from(q.peak) * 1_000_000 / u64::from(q.max.max(1));
                share(b).cmp(&share(a)).then(b.peak.cmp(&a.peak))
            });
            shown.truncate(SHOWN);
        }
        for (i, q) in shown.iter().enumerate() {
            let lead = if i == 0 { ", queue peak" } else { "," };
            write!(f, "{lead} {} of {} on {}", q.peak, q.max, q.listener)?;
        }
        if self.queues.len() > shown.len() {
            write!(
                f,
                " (the fullest {} of {} listeners)",
                shown.len(),
                self.queues.len()
            )?;
        }
        Ok(())
    }
}

mod status;
use status::is_zero;
pub use status::*;

/// Encodes one frame.
pub fn encode_frame<T: Serialize>(body: T) -> Vec<u8> {
    encode_envelope(&Envelope {
        version: CONTROL_VERSION,
        body,
        reads: None,
    })
}

/// Encodes a request of this build's clients: it reads answers up to [`MAX_ANSWER`].
pub fn encode_request(request: &Request) -> Vec<u8> {
    encode_envelope(&Envelope {
        version: CONTROL_VERSION,
        body: request,
        reads: Some(MAX_ANSWER as u64),
    })
}

fn encode_envelope<T: Serialize>(envelope: &Envelope<T>) -> Vec<u8> {
    let json = serde_json::to_vec(envelope).unwrap_or_default();
    let mut frame = (json.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&json);
    frame
}

/// A frame that could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes is larger than the {limit}-byte limit")]
    TooLarge { len: usize, limit: usize },
    #[error("frame truncated: {got} of {want} bytes")]
    Truncated { got: usize, want: usize },
    #[error("unsupported control protocol version {0}; this build speaks {CONTROL_VERSION}")]
    Version(u32),
    #[error("invalid frame: {0}")]
    Invalid(String),
}

/// The length announced by a frame's 4-byte header, checked against [`MAX_FRAME`].
pub fn frame_len(header: [u8; 4]) -> Result<usize, FrameError> {
    frame_len_within(header, MAX_FRAME)
}

/// The length announced by a frame's 4-byte header, checked against `limit`.
pub fn frame_len_within(header: [u8; 4], limit: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > limit {
        Err(FrameError::TooLarge { len, limit })
    } else {
        Ok(len)
    }
}

/// Decodes a whole frame (header and body) into `T`, checking size, completeness and version.
pub fn decode_frame<T: for<'de> Deserialize<'de>>(frame: &[u8]) -> Result<T, FrameError> {
    let Some(header) = frame.get(..4) else {
        return Err(FrameError::Truncated {
            got: frame.len(),
            want: 4,
        });
    };
    let len = frame_len(header.try_into().unwrap_or_default())?;
    let body = &frame[4..];
    if body.len() < len {
        return Err(FrameError::Truncated {
            got: body.len(),
            want: len,
        });
    }
    decode_body(&body[..len])
}

/// Decodes a frame's body (after the length header).
pub fn decode_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FrameError> {
    decode_envelope(body).map(|e| e.body)
}

/// Decodes a frame's body into its whole envelope (a request's `reads` with it).
pub fn decode_envelope<T: for<'de> Deserialize<'de>>(
    body: &[u8],
) -> Result<Envelope<T>, FrameError> {
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let version: Version =
        serde_json::from_slice(body).map_err(|e| FrameError::Invalid(e.to_string()))?;
    if version.version != CONTROL_VERSION {
        return Err(FrameError::Version(version.version));
    }
    serde_json::from_slice(body).map_err(|e| FrameError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_state_serializes_as_its_name_and_an_unknown_name_reads_as_unknown() {
        fn check<T>(all: &[T], name: fn(T) -> &'static str)
        where
            T: Copy + std::fmt::Debug + PartialEq + Serialize + for<'de> Deserialize<'de>,
        {
            for &state in all {
                let json = serde_json::to_string(&state).unwrap();
                assert_eq!(json, format!("\"{}\"", name(state)));
                assert_eq!(serde_json::from_str::<T>(&json).unwrap(), state);
            }
        }
        check(MasterState::ALL, MasterState::as_str);
        check(GenerationState::ALL, GenerationState::as_str);
        check(WorkerState::ALL, WorkerState::as_str);
        check(ConnectionsSource::ALL, ConnectionsSource::as_str);
        let names: Vec<&str> = GenerationState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "preparing",
                "starting",
                "rolling",
                "serving",
                "standby",
                "draining",
                "failed"
            ]
        );
        assert_eq!(
            serde_json::from_str::<WorkerState>("\"hibernating\"").unwrap(),
            WorkerState::Unknown
        );
        assert_eq!(MasterState::Unknown.to_string(), "unknown");
    }

    #[test]
    fn requests_round_trip_in_their_documented_shape() {
        let frame = encode_frame(Request::Reload { wait: true });
        assert_eq!(&frame[..4], &(frame.len() as u32 - 4).to_be_bytes());
        let json: serde_json::Value = serde_json::from_slice(&frame[4..]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"version": 1, "body": {"type": "reload", "wait": true}})
        );
        // A full status is sent as before the `brief` field; a master before it takes a brief
        // one as a full one (an internally tagged unit variant ignores other fields).
        let full = serde_json::to_value(Request::Status { brief: false }).unwrap();
        assert_eq!(full, serde_json::json!({"type": "status"}));
        #[derive(Debug, PartialEq, Deserialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        enum Before {
            Status,
        }
        let brief = serde_json::to_value(Request::Status { brief: true }).unwrap();
        assert_eq!(
            serde_json::from_value::<Before>(brief).unwrap(),
            Before::Status
        );
        for r in [
            Request::Status { brief: false },
            Request::Status { brief: true },
            Request::History,
            Request::Stop { fast: true },
            Request::Verdict { request: 3 },
        ] {
            assert_eq!(
                decode_frame::<Request>(&encode_frame(r.clone())).unwrap(),
                r
            );
        }
    }

    #[test]
    fn bad_frames_are_typed_errors() {
        assert!(matches!(
            decode_frame::<Request>(b"\x00\x00"),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            decode_frame::<Request>(b"\x00\x10\x00\x00{}"),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            decode_frame::<Request>(b"\x00\x00\x00\x10{}"),
            Err(FrameError::Truncated { .. })
        ));
        let v9 = br#"{"version":9,"body":{"type":"status"}}"#;
        let mut frame = (v9.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(v9);
        assert_eq!(decode_frame::<Request>(&frame), Err(FrameError::Version(9)));
        let unknown = br#"{"version":1,"body":{"type":"format_disk"}}"#;
        let mut frame = (unknown.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(unknown);
        assert!(matches!(
            decode_frame::<Request>(&frame),
            Err(FrameError::Invalid(_))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Whatever bytes arrive, the decoder answers with a request or a typed error: it never
        /// panics, and never accepts a frame larger than the limit.
        #[test]
        fn the_request_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            match decode_frame::<Request>(&bytes) {
                Ok(_) => prop_assert!(bytes.len() >= 4),
                Err(FrameError::TooLarge { len, .. }) => prop_assert!(len > MAX_FRAME),
                Err(_) => {}
            }
        }

        /// Valid JSON of the wrong shape is refused, never misread.
        #[test]
        fn json_noise_is_refused_or_a_known_request(key in "[a-z_]{1,12}", value in any::<i64>(), version in 0u32..3) {
            let body = format!(r#"{{"version":{version},"body":{{"type":"{key}","wait":{value}}}}}"#);
            let mut frame = (body.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(body.as_bytes());
            if let Ok(request) = decode_frame::<Request>(&frame) {
                prop_assert_eq!(version, CONTROL_VERSION);
                let reads = matches!(request, Request::Status { .. } | Request::History);
                prop_assert!(reads);
            }
        }
    }
}
