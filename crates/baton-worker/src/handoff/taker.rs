//! A taker's end of a handoff link: offers prepared, then committed or aborted; when the link
//! ends, every connection prepared and not aborted is served (the giver served none of them
//! since). It says first that it takes batches (`takes_batches`): a giver of this SDK then sends
//! its offers several to a packet (`offers`), answered by one `answers`.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use baton_proto::MAX_MESSAGE_SIZE;
use baton_proto::handoff::{ConnectionKind, LinkMessage, MAX_BATCH, MAX_STATE_BYTES, Refusal};
use baton_sys::channel;
use tokio::net::UnixDatagram;
use tokio::sync::mpsc;
use tracing::warn;

use super::{Adopted, Busy};
use crate::Shared;
use crate::faults::{self, Point};

/// Connections a taker holds prepared (not committed) on one link at most: past it, it refuses.
/// A giver paced at `max_per_second` has about that many times the round trip in flight.
pub(super) const MAX_PREPARED: usize = 4096;

/// A prepared connection, with its place in the application's queue
/// ([`super::ADOPTED_WAITING`]).
struct Prepared {
    socket: OwnedFd,
    kind: ConnectionKind,
    state: Vec<u8>,
    place: mpsc::OwnedPermit<Adopted>,
}

/// What a taker's link holds.
struct Link {
    socket: UnixDatagram,
    from: u64,
    shared: Arc<Shared>,
    adopted: mpsc::Sender<Adopted>,
    prepared: HashMap<u64, Prepared>,
    /// The giver is gone (its end closed): no answer is sent, what it sent is still read.
    giver_gone: bool,
}

/// Serves a taker's link until it ends.
pub(super) async fn serve(socket: UnixDatagram, from: u64, shared: Arc<Shared>, open: Busy) {
    let mut link = Link {
        socket,
        from,
        adopted: shared.handoff.adopted_tx.clone(),
        shared,
        prepared: HashMap::new(),
        giver_gone: false,
    };
    link.answer(&LinkMessage::TakesBatches { most: MAX_BATCH })
        .await;
    let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
    let ended_cleanly = loop {
        let got = match channel::recv_with_fds(&link.socket, &mut buf, MAX_BATCH).await {
            Ok(got) if got.len == 0 => break true,
            Ok(got) => got,
            // A giver that dies with answers of ours unread resets the link, and the kernel
            // reports that before the packets it had sent: read on (the offers in flight, with
            // their descriptors, are still to come), then its end.
            Err(err) if err.kind() == io::ErrorKind::ConnectionReset && !link.giver_gone => {
                link.giver_gone = true;
                continue;
            }
            Err(err) if err.kind() == io::ErrorKind::ConnectionReset => break true,
            Err(err) => {
                warn!("handoff link from worker {from}: {err}");
                break false;
            }
        };
        let whole = !got.truncated && !got.fds_truncated;
        let mut fds = got.fds;
        match baton_proto::decode::<LinkMessage>(&buf[..got.len]) {
            Ok(LinkMessage::Offer { id, kind, state }) => {
                let socket = (whole && fds.len() == 1).then(|| fds.remove(0));
                let reply = match link.prepare(id, kind, state, socket).await {
                    None => LinkMessage::Prepared { id },
                    Some(reason) => LinkMessage::Refused { id, reason },
                };
                let prepares = matches!(reply, LinkMessage::Prepared { .. });
                link.answer(&reply).await;
                if prepares && faults::check(Point::TakerPrepared) {
                    faults::exit_at(Point::TakerPrepared);
                }
            }
            Ok(LinkMessage::Offers { offers }) => {
                let each = whole && fds.len() == offers.len() && offers.len() <= MAX_BATCH;
                let mut sockets = fds.into_iter();
                let (mut prepared, mut refused) = (Vec::new(), Vec::new());
                for offer in offers {
                    let socket = if each { sockets.next() } else { None };
                    match link
                        .prepare(offer.id, offer.kind, offer.state, socket)
                        .await
                    {
                        None => prepared.push(offer.id),
                        Some(reason) => refused.push(Refusal {
                            id: offer.id,
                            reason,
                        }),
                    }
                }
                let prepares = prepared.len();
                link.answer(&LinkMessage::Answers { prepared, refused })
                    .await;
                // Once per connection prepared, as if each had been answered alone.
                for _ in 0..prepares {
                    if faults::check(Point::TakerPrepared) {
                        faults::exit_at(Point::TakerPrepared);
                    }
                }
            }
            Ok(LinkMessage::Commit { id }) => link.deliver(id),
            Ok(LinkMessage::Commits { ids }) => ids.into_iter().for_each(|id| link.deliver(id)),
            Ok(LinkMessage::Abort { id }) => {
                link.prepared.remove(&id);
            }
            // Anything else (a descriptor on another packet is closed as it drops).
            _ => {}
        }
    };
    if ended_cleanly {
        let ids: Vec<u64> = link.prepared.keys().copied().collect();
        ids.into_iter().for_each(|id| link.deliver(id));
    } else if !link.prepared.is_empty() {
        // The link broke without its end: whether the giver kept them is unknown. Closing our
        // copies leaves them to the giver, which reads this link's end and serves them on.
        warn!(
            "handoff link from worker {from} broke: {} prepared connections left to it",
            link.prepared.len()
        );
    }
    drop(open);
}

impl Link {
    /// Prepares offer `id` (`socket`: its one descriptor, `None` if the packet did not carry
    /// exactly that), or says why not. A place in the application's queue is waited for when
    /// it is full: the answer waits with it, and so does the giver's next offer.
    async fn prepare(
        &mut self,
        id: u64,
        kind: ConnectionKind,
        state: Vec<u8>,
        socket: Option<OwnedFd>,
    ) -> Option<String> {
        let refusal = if faults::check(Point::TakerOffer) {
            Some("refused by a fault point".to_string())
        } else if socket.is_none() {
            Some("an offer carries exactly one descriptor per connection".to_string())
        } else if kind == ConnectionKind::Unknown {
            Some("a kind of connection this worker does not know".into())
        } else if state.len() > MAX_STATE_BYTES {
            Some(format!("state larger than {MAX_STATE_BYTES} bytes"))
        } else if self.prepared.contains_key(&id) {
            Some(format!("offer {id} is prepared already"))
        } else if self.prepared.len() >= MAX_PREPARED {
            Some("too many connections in flight".into())
        } else if self.adopted.is_closed() {
            Some("this worker no longer adopts".into())
        } else if !socket.as_ref().is_some_and(is_connected_stream) {
            Some("the descriptor is not a connected stream socket".into())
        } else {
            None
        };
        if let Some(reason) = refusal {
            return Some(reason);
        }
        let Ok(place) = self.adopted.clone().reserve_owned().await else {
            return Some("this worker no longer adopts".into());
        };
        let socket = socket?;
        self.prepared.insert(
            id,
            Prepared {
                socket,
                kind,
                state,
                place,
            },
        );
        None
    }

    /// Sends an answer to the giver, unless it is gone.
    async fn answer(&mut self, message: &LinkMessage) {
        if !self.giver_gone
            && self
                .socket
                .send(&baton_proto::encode(message))
                .await
                .is_err()
        {
            self.giver_gone = true;
        }
    }

    /// Connection `id`, prepared, is this worker's: to the application.
    fn deliver(&mut self, id: u64) {
        if let Some(p) = self.prepared.remove(&id) {
            p.place.send(Adopted {
                socket: p.socket,
                kind: p.kind,
                state: p.state,
                from_worker: self.from,
                _held: Busy::new(&self.shared),
            });
        }
    }
}

/// Whether `fd` is a connected stream socket (TCP or Unix).
fn is_connected_stream(fd: &OwnedFd) -> bool {
    baton_sys::channel::socket_kind(fd.as_fd())
        .is_ok_and(|k| k.sock_type == baton_sys::channel::SockType::Stream && !k.listening)
}
