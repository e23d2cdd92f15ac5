//! QUIC connection IDs that carry this worker's tag (docs/quic.md), for quinn (feature
//! `quinn`): baton steers a packet to the generation whose tag starts its destination
//! connection ID, so a connection's packets keep reaching the process that holds it across
//! reloads.
//!
//! ```ignore
//! let mut endpoint = quinn::EndpointConfig::default();
//! if let Some(tag) = worker.quic_tag() {
//!     endpoint.cid_generator(move || Box::new(TaggedConnectionIds::new(tag)));
//! }
//! ```

use std::time::Duration;

use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};
use rand::Rng;

/// The longest connection ID QUIC allows (RFC 9000, 17.2).
const MAX_CID_SIZE: usize = 20;

/// Connection IDs of a fixed length whose first [`baton_proto::QUIC_TAG_LEN`] bytes are the
/// tag (big-endian) and the rest random.
#[derive(Debug, Clone, Copy)]
pub struct TaggedConnectionIds {
    tag: u16,
    len: usize,
}

impl TaggedConnectionIds {
    /// IDs of 8 bytes (quinn's default length): the tag, then 6 random bytes.
    pub fn new(tag: u16) -> Self {
        Self::with_len(tag, 8)
    }

    /// IDs of `len` bytes, 4 to 20 (the tag and at least 2 random bytes).
    pub fn with_len(tag: u16, len: usize) -> Self {
        Self {
            tag,
            len: len.clamp(baton_proto::QUIC_TAG_LEN + 2, MAX_CID_SIZE),
        }
    }
}

impl ConnectionIdGenerator for TaggedConnectionIds {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut bytes = [0u8; MAX_CID_SIZE];
        bytes[..baton_proto::QUIC_TAG_LEN].copy_from_slice(&self.tag.to_be_bytes());
        rand::rng().fill_bytes(&mut bytes[baton_proto::QUIC_TAG_LEN..self.len]);
        ConnectionId::new(&bytes[..self.len])
    }

    /// A short-header packet for no known connection whose ID lacks the tag was meant for
    /// another generation (or no one): quinn drops it instead of answering a stateless reset.
    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        let ours =
            cid.len() == self.len && cid[..baton_proto::QUIC_TAG_LEN] == self.tag.to_be_bytes();
        if ours { Ok(()) } else { Err(InvalidCid) }
    }

    fn cid_len(&self) -> usize {
        self.len
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_start_with_the_tag_and_differ_after_it() {
        let mut ids = TaggedConnectionIds::new(0xbeef);
        let a = ids.generate_cid();
        let b = ids.generate_cid();
        assert_eq!(a.len(), 8);
        assert_eq!(&a[..2], &[0xbe, 0xef]);
        assert_eq!(&b[..2], &[0xbe, 0xef]);
        assert_ne!(a, b);
        assert!(ids.validate(&a).is_ok());
        let other = TaggedConnectionIds::new(0x0001).generate_cid();
        assert!(ids.validate(&other).is_err());
        assert_eq!(TaggedConnectionIds::with_len(1, 1).cid_len(), 4);
        assert_eq!(TaggedConnectionIds::with_len(1, 99).cid_len(), MAX_CID_SIZE);
    }
}
