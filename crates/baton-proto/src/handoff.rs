//! Connection handoff (`docs/protocol.md`, "Connection handoff"): the packets of a *handoff
//! link*, a `SOCK_SEQPACKET` pair the master makes between one worker of a draining generation
//! (the giver) and one of the serving generation (the taker), and gives each its end. Client
//! connections travel on the link, from worker to worker: never through the master, which
//! brokers the introduction, sets the limits and counts what the giver reports.
//!
//! The exchange, per connection (`id` is the giver's, unique on its links):
//!
//! ```text
//! giver                                   taker
//!   |-- offer {id, kind, state} + 1 fd -->  |   the giver stopped reading it, keeps its copy
//!   |  <-- prepared {id} / refused {id} --  |   the taker holds its copy, does not read it
//!   |-- commit {id} ---------------------> |   the giver closes its copy: the taker serves
//!   |-- abort {id} ----------------------> |   (instead) the taker closes its copy: the giver
//!                                               serves on
//! ```
//!
//! At every moment one process serves the connection: the giver until it sends `commit`, the
//! taker from then on. A link's packets arrive in order and end in end-of-stream when either
//! side goes, which decides every case without the master: a taker whose link ends serves each
//! connection it prepared and was not told to abort (the giver sent nothing after, so it
//! served nothing since its offer); a giver whose link ends before `commit` serves on every
//! connection it offered there.

use serde::{Deserialize, Serialize};

/// The most bytes of state a giver sends with one connection (before base64).
pub const MAX_STATE_BYTES: usize = 64 * 1024;

/// The most handoff links a giver gets at a drain: the takers it spreads its connections over.
pub const MAX_PEERS: usize = 4;

/// How a taker rebuilds a connection: its protocol, at a point where it can be taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionKind {
    /// An HTTP/1.1 connection between requests (kept alive). The state is the bytes read and
    /// not consumed (the start of the next request, if any).
    Http1,
    /// A WebSocket between messages. The state is a [`WebSocketState`] as JSON.
    #[serde(rename = "websocket")]
    WebSocket,
    /// A kind this build does not know: the taker refuses it.
    #[serde(other)]
    Unknown,
}

/// What a WebSocket taker needs besides the socket: what was negotiated, and what was read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebSocketState {
    /// The subprotocol the handshake chose (`Sec-WebSocket-Protocol`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subprotocol: Option<String>,
    /// The extensions the handshake agreed on (`Sec-WebSocket-Extensions`), as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<String>,
    /// The request path the connection was opened on.
    #[serde(default)]
    pub path: String,
    /// Bytes read from the socket and not consumed (the start of the next frame).
    #[serde(default, with = "base64_bytes")]
    pub unread: Vec<u8>,
    /// The application's own session state, opaque to baton.
    #[serde(default, with = "base64_bytes")]
    pub session: Vec<u8>,
}

impl WebSocketState {
    /// The state as an offer carries it (JSON).
    pub fn encode(&self) -> Vec<u8> {
        crate::encode(self)
    }

    /// An offer's state, read back.
    pub fn decode(state: &[u8]) -> Result<WebSocketState, crate::DecodeError> {
        crate::decode(state)
    }
}

/// Offers in one `offers` packet at most (a taker says how many it takes, up to this).
pub const MAX_BATCH: usize = 64;

/// One connection of an `offers` packet: what `offer` says of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offered {
    pub id: u64,
    pub kind: ConnectionKind,
    #[serde(default, with = "base64_bytes")]
    pub state: Vec<u8>,
}

/// An offer a taker refuses, in an `answers` packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub id: u64,
    pub reason: String,
}

/// A packet on a handoff link. One JSON object per packet, as on the worker channel; `offer`
/// carries exactly one descriptor (`SCM_RIGHTS`), `offers` one per connection in its order,
/// every other packet none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LinkMessage {
    /// Taker to giver, first on the link: it takes `offers` of up to `most` connections (and
    /// answers them with `answers`). A giver that never reads it sends single `offer`s.
    TakesBatches { most: usize },
    /// Giver to taker: take these connections (the descriptors attached, one per offer, in
    /// order), as many `offer`s in one packet. Answered by one `answers`.
    Offers { offers: Vec<Offered> },
    /// Taker to giver: its answer to an `offers`, each connection prepared or refused.
    Answers {
        #[serde(default)]
        prepared: Vec<u64>,
        #[serde(default)]
        refused: Vec<Refusal>,
    },
    /// Giver to taker: serve these from now on (`commit` for each, in one packet).
    Commits { ids: Vec<u64> },
    /// Giver to taker: take this connection (the descriptor attached), rebuilt from `state`.
    Offer {
        id: u64,
        kind: ConnectionKind,
        /// At most [`MAX_STATE_BYTES`], base64 on the wire.
        #[serde(default, with = "base64_bytes")]
        state: Vec<u8>,
    },
    /// Taker to giver: it holds the connection and waits for `commit`.
    Prepared { id: u64 },
    /// Taker to giver: it will not take it (its copy is closed); the giver serves on.
    Refused { id: u64, reason: String },
    /// Giver to taker: serve it from now on (the giver closed its copy).
    Commit { id: u64 },
    /// Giver to taker: close your copy; the giver serves on.
    Abort { id: u64 },
    /// A type this build does not know: ignored.
    #[serde(other)]
    Unknown,
}

/// What a giver tells the master of its handoff so far (cumulative counts, its own word: the
/// master shows and sums them, and decides nothing on them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffCounts {
    /// Connections offered to a taker.
    #[serde(default)]
    pub offered: u64,
    /// Committed: the taker serves them.
    #[serde(default)]
    pub adopted: u64,
    /// Kept by the giver after all: refused, aborted at the deadline, or the taker went.
    #[serde(default)]
    pub kept: u64,
}

/// Base64 (standard alphabet, padded) for byte fields of JSON packets.
mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode};

    #[test]
    fn link_packets_have_the_documented_shape_and_round_trip() {
        let offer = LinkMessage::Offer {
            id: 7,
            kind: ConnectionKind::Http1,
            state: b"GET / HT".to_vec(),
        };
        let json: serde_json::Value = serde_json::from_slice(&encode(&offer)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "offer", "id": 7, "kind": "http1", "state": "R0VUIC8gSFQ="})
        );
        let batch = LinkMessage::Offers {
            offers: vec![Offered {
                id: 8,
                kind: ConnectionKind::WebSocket,
                state: b"{}".to_vec(),
            }],
        };
        let json: serde_json::Value = serde_json::from_slice(&encode(&batch)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "offers", "offers": [{"id": 8, "kind": "websocket", "state": "e30="}]})
        );
        let answers = LinkMessage::Answers {
            prepared: vec![8],
            refused: vec![Refusal {
                id: 9,
                reason: "full".into(),
            }],
        };
        let json: serde_json::Value = serde_json::from_slice(&encode(&answers)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "answers", "prepared": [8], "refused": [{"id": 9, "reason": "full"}]})
        );
        for message in [
            offer,
            batch,
            answers,
            LinkMessage::TakesBatches { most: 64 },
            LinkMessage::Commits { ids: vec![8, 10] },
            LinkMessage::Prepared { id: 7 },
            LinkMessage::Refused {
                id: 7,
                reason: "full".into(),
            },
            LinkMessage::Commit { id: 7 },
            LinkMessage::Abort { id: 7 },
        ] {
            assert_eq!(decode::<LinkMessage>(&encode(&message)).unwrap(), message);
        }
        assert_eq!(
            decode::<LinkMessage>(br#"{"type":"teleport","id":1}"#).unwrap(),
            LinkMessage::Unknown
        );
    }

    #[test]
    fn a_websocket_state_carries_its_negotiation_and_its_unread_bytes() {
        let state = WebSocketState {
            subprotocol: Some("chat".into()),
            extensions: None,
            path: "/ws".into(),
            unread: vec![0x81, 0x85],
            session: b"user=7".to_vec(),
        };
        let json = serde_json::to_value(&state).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"subprotocol": "chat", "path": "/ws", "unread": "gYU=",
                "session": "dXNlcj03"})
        );
        assert_eq!(
            serde_json::from_value::<WebSocketState>(json).unwrap(),
            state
        );
        assert_eq!(
            serde_json::from_str::<ConnectionKind>("\"spdy\"").unwrap(),
            ConnectionKind::Unknown
        );
    }

    #[test]
    fn state_that_is_not_base64_is_refused() {
        assert!(
            decode::<LinkMessage>(br#"{"type":"offer","id":1,"kind":"http1","state":"%%%"}"#)
                .is_err()
        );
    }
}
