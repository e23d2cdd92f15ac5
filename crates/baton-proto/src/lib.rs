//! Wire types shared by the baton master and its workers.
//!
//! This crate owns the *worker channel* protocol (see `docs/protocol.md`): the messages that
//! travel over the `SOCK_SEQPACKET` socket pair between the master and each worker, one JSON
//! object per packet; and the *control* protocol ([`control`]) between the CLI and the master.
//! It is the only crate whose types are serialised for IPC.
//!
//! It must not do I/O: no sockets, no fds, no processes. Moving bytes and descriptors is the job
//! of `baton-sys`; deciding what to send is the job of `baton-core` and `baton-worker`.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub mod control;
pub mod event;
pub mod handoff;
pub mod text;

/// Version of the worker channel protocol spoken by this build. Sent in [`Hello::version`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Environment variable that holds the number of the worker's end of the channel (always `3`).
pub const CHANNEL_FD_ENV: &str = "BATON_CHANNEL_FD";
/// Environment variable that holds the worker's generation number.
pub const GENERATION_ENV: &str = "BATON_GENERATION";
/// Environment variable that holds the worker's id (unique for the master's lifetime).
pub const WORKER_ID_ENV: &str = "BATON_WORKER_ID";

/// Descriptors per `SCM_RIGHTS` message: the kernel's `SCM_MAX_FD`.
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// Largest packet either side sends. Receivers must accept packets of this size.
pub const MAX_MESSAGE_SIZE: usize = 128 * 1024;

/// A packet from the master to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MasterMessage {
    /// First packet: who the worker is and which listeners follow.
    Hello(Hello),
    /// Carries `count` listener descriptors as `SCM_RIGHTS`, for manifest entries
    /// `first .. first + count`.
    Fds { first: usize, count: usize },
    /// The worker's generation is retired: stop accepting, finish in-flight work, exit.
    /// `deadline_ms` is how long the master waits before it sends `SIGKILL`.
    Drain { deadline_ms: u64 },
    /// Stop accepting for now, but stay ready: a new generation is on probation
    /// (`canary_window`) and this one may have to take over again.
    Pause,
    /// Accept again: the new generation failed its probation and this one serves again.
    Resume,
    /// Carries one descriptor: this worker's end of a handoff link ([`handoff`]) to worker
    /// `peer`. A giver gets it just before its `drain`; a taker when a giver is introduced.
    HandoffLink(HandoffLink),
    /// A message type this build does not know. Receivers ignore it (forward compatibility).
    #[serde(other)]
    Unknown,
}

/// One end of a handoff link, and what it is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffLink {
    /// The link's number (unique for the master's lifetime): the same at both ends.
    pub link: u64,
    /// Which end this is.
    pub role: HandoffRole,
    /// The worker at the other end, and its generation.
    pub peer: u64,
    pub peer_generation: u64,
    /// A giver's time to finish its handoff (offers after it are not made); it then drains
    /// what it kept as before. A taker ignores it.
    pub deadline_ms: u64,
    /// The most connections a giver offers per second on this link (0: no limit).
    #[serde(default)]
    pub max_per_second: u32,
}

/// The end of a handoff link a worker holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandoffRole {
    /// A draining worker: it offers.
    Giver,
    /// A serving worker: it takes.
    Taker,
}

/// The manifest sent first to every worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub generation: u64,
    pub worker_id: u64,
    /// The listeners, in configuration order; descriptors follow in this order.
    pub listeners: Vec<ListenerInfo>,
    /// `liveness: {watchdog: WINDOW}`: the worker must send [`WorkerMessage::Heartbeat`] at
    /// least once per this many milliseconds once it is ready, or it is replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog_ms: Option<u64>,
}

/// One listener of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerInfo {
    pub name: String,
    #[serde(flatten)]
    pub address: ListenerAddress,
    /// A QUIC listener (`quic: true`): the tag this worker's connection IDs must start with
    /// (big-endian, [`QUIC_TAG_LEN`] bytes), so that their packets keep reaching it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic_tag: Option<u16>,
}

/// Bytes at the start of a QUIC connection ID that carry its generation's tag (docs/quic.md).
pub const QUIC_TAG_LEN: usize = 2;

/// The environment variable that gives a worker with a QUIC listener its tag (4 hex digits).
pub const QUIC_TAG_ENV: &str = "BATON_QUIC_TAG";

/// The tag of generation `generation`'s QUIC connection IDs: never 0, and the same for 65535
/// generations in a row only once.
pub fn quic_tag(generation: u64) -> u16 {
    (generation % 0xffff) as u16 + 1
}

/// What kind of socket a listener is and where it listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ListenerAddress {
    Tcp {
        address: SocketAddr,
    },
    Unix {
        path: PathBuf,
    },
    /// A bound UDP socket (not connected): every generation reads the same one.
    Udp {
        address: SocketAddr,
    },
    /// A bound Unix datagram socket (`@name`: abstract).
    UnixDatagram {
        path: PathBuf,
    },
}

impl ListenerAddress {
    /// A datagram socket (no `listen`, no `accept`: the workers read it).
    pub fn is_datagram(&self) -> bool {
        matches!(
            self,
            ListenerAddress::Udp { .. } | ListenerAddress::UnixDatagram { .. }
        )
    }
}

impl std::fmt::Display for ListenerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenerAddress::Tcp { address } => write!(f, "tcp://{address}"),
            ListenerAddress::Unix { path } => write!(f, "unix:{}", path.display()),
            ListenerAddress::Udp { address } => write!(f, "udp://{address}"),
            ListenerAddress::UnixDatagram { path } => write!(f, "unixgram:{}", path.display()),
        }
    }
}

/// A packet from a worker to the master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    /// The worker serves its listeners. Sent once.
    Ready,
    /// Optional progress report: open connections and a free-form status line.
    Status {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connections: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
    },
    /// The worker has stopped accepting and is finishing its connections.
    Draining,
    /// The worker is alive (for `Hello::watchdog_ms`; the Rust SDK sends it by itself).
    Heartbeat,
    /// What the worker does with connection handoff ([`handoff`]): it offers its connections
    /// when it drains, and/or it takes those of a draining generation. Sent once, before
    /// `ready`; a worker that never sends it drains as before.
    Handoff {
        #[serde(default)]
        offers: bool,
        #[serde(default)]
        adopts: bool,
    },
    /// A giver's counts so far (cumulative): shown in `status`, summed into the reload's
    /// history and the metrics.
    HandoffReport(handoff::HandoffCounts),
    /// A message type this build does not know. The master logs and ignores it.
    #[serde(other)]
    Unknown,
}

/// A packet that could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("packet of {0} bytes is larger than the {MAX_MESSAGE_SIZE}-byte limit")]
    TooLarge(usize),
    #[error("packet is not a valid message")]
    Invalid(#[source] serde_json::Error),
}

/// Encodes a message as one packet.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Serialising these plain enums cannot fail: every map key is a string.
    serde_json::to_vec(message).unwrap_or_default()
}

/// Decodes one packet.
pub fn decode<'a, T: Deserialize<'a>>(packet: &'a [u8]) -> Result<T, DecodeError> {
    if packet.len() > MAX_MESSAGE_SIZE {
        return Err(DecodeError::TooLarge(packet.len()));
    }
    serde_json::from_slice(packet).map_err(DecodeError::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_has_the_documented_shape() {
        let hello = MasterMessage::Hello(Hello {
            version: PROTOCOL_VERSION,
            watchdog_ms: None,
            generation: 2,
            worker_id: 7,
            listeners: vec![
                ListenerInfo {
                    name: "http".into(),
                    address: ListenerAddress::Tcp {
                        address: "127.0.0.1:8080".parse().unwrap(),
                    },
                    quic_tag: None,
                },
                ListenerInfo {
                    name: "admin".into(),
                    address: ListenerAddress::Unix {
                        path: "/run/a.sock".into(),
                    },
                    quic_tag: None,
                },
                ListenerInfo {
                    name: "h3".into(),
                    address: ListenerAddress::Udp {
                        address: "127.0.0.1:8443".parse().unwrap(),
                    },
                    quic_tag: Some(0x0003),
                },
                ListenerInfo {
                    name: "log".into(),
                    address: ListenerAddress::UnixDatagram {
                        path: "@log".into(),
                    },
                    quic_tag: None,
                },
            ],
        });
        let json: serde_json::Value = serde_json::from_slice(&encode(&hello)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "type": "hello", "version": 1, "generation": 2, "worker_id": 7,
                "listeners": [
                    {"name": "http", "kind": "tcp", "address": "127.0.0.1:8080"},
                    {"name": "admin", "kind": "unix", "path": "/run/a.sock"},
                    {"name": "h3", "kind": "udp", "address": "127.0.0.1:8443", "quic_tag": 3},
                    {"name": "log", "kind": "unix_datagram", "path": "@log"},
                ]
            })
        );
        assert_eq!(decode::<MasterMessage>(&encode(&hello)).unwrap(), hello);
    }

    #[test]
    fn worker_messages_round_trip_and_unknown_types_are_tolerated() {
        for msg in [
            WorkerMessage::Ready,
            WorkerMessage::Draining,
            WorkerMessage::Status {
                connections: Some(3),
                text: None,
            },
        ] {
            assert_eq!(decode::<WorkerMessage>(&encode(&msg)).unwrap(), msg);
        }
        assert_eq!(
            decode::<WorkerMessage>(br#"{"type":"ready"}"#).unwrap(),
            WorkerMessage::Ready
        );
        assert_eq!(
            decode::<WorkerMessage>(br#"{"type":"from_the_future","x":1}"#).unwrap(),
            WorkerMessage::Unknown
        );
        assert!(decode::<WorkerMessage>(b"\x00garbage").is_err());
        assert!(decode::<WorkerMessage>(br#"{"no_type":1}"#).is_err());
        assert!(matches!(
            decode::<WorkerMessage>(&vec![b' '; MAX_MESSAGE_SIZE + 1]),
            Err(DecodeError::TooLarge(_))
        ));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        /// The handoff decoders (master packets on the worker's side, worker packets on the
        /// master's) answer every byte string with a message or an error, never a panic.
        #[test]
        fn packet_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode::<MasterMessage>(&bytes);
            let _ = decode::<WorkerMessage>(&bytes);
        }

    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Manifests of any shape survive a round trip unchanged.
        #[test]
        fn manifests_round_trip(names in proptest::collection::vec("[a-z0-9_.-]{1,20}", 0..300), port in 1u16.., generation: u64) {
            let hello = MasterMessage::Hello(Hello {
                version: PROTOCOL_VERSION,
                watchdog_ms: None,
                generation,
                worker_id: 1,
                listeners: names.iter().map(|n| ListenerInfo {
                    name: n.clone(),
                    address: ListenerAddress::Tcp { address: SocketAddr::from(([127, 0, 0, 1], port)) },
                    quic_tag: None,
                }).collect(),
            });
            prop_assert_eq!(decode::<MasterMessage>(&encode(&hello)).unwrap(), hello);
        }
    }
}
