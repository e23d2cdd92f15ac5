//! Connection handoff, the master's part (`docs/protocol.md`, "Connection handoff"). Workers say
//! whether they offer their connections when they drain and whether they take those of a
//! draining generation. When a worker that offers is asked to drain, the master introduces it
//! to the least loaded takers of the serving generation (at most [`MAX_PEERS`]): one
//! `SOCK_SEQPACKET` link per pair, an end to each, sent before the drain. The connections go
//! from worker to worker on those links; none enters the master, which keeps only what the
//! giver reports (shown in `status`, summed in the metrics, logged when the giver is gone).

use std::os::fd::{AsFd, OwnedFd};

use baton_proto::handoff::{HandoffCounts, MAX_PEERS};
use baton_proto::{HandoffLink, HandoffRole, MasterMessage, WorkerMessage};
use tracing::{debug, info, warn};

use super::Master;
use super::link::Command;
use crate::supervisor::WorkerId;

/// A giver offers at most this many connections per second on each link.
const MAX_PER_SECOND: u32 = 2000;

/// One worker's part in connection handoff.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Part {
    /// It offers its connections when it drains.
    pub(super) offers: bool,
    /// It takes those of a draining generation.
    pub(super) adopts: bool,
    /// Links it holds as a taker (to spread givers over takers).
    pub(super) links: usize,
    /// What it reported handing off, as a giver.
    pub(super) counts: HandoffCounts,
}

/// The master's own handoff records.
#[derive(Debug, Default)]
pub(super) struct Handoffs {
    next_link: u64,
    /// Every giver's counts, summed (for the metrics): a report adds what grew.
    pub(super) total: HandoffCounts,
}

impl Master {
    /// What `worker` said it does with connection handoff.
    pub(super) fn handoff_ability(&mut self, worker: WorkerId, offers: bool, adopts: bool) {
        if let Some(link) = self.links.get_mut(&worker) {
            link.handoff.offers = offers;
            link.handoff.adopts = adopts;
            debug!(
                worker = worker.0,
                offers, adopts, "worker {worker} takes part in connection handoff"
            );
        }
    }

    /// A giver's counts so far. Counts only grow: a report that shrinks one is the worker's
    /// mistake, and changes none of the sums.
    pub(super) fn handoff_report(&mut self, worker: WorkerId, counts: HandoffCounts) {
        let Some(link) = self.links.get_mut(&worker) else {
            return;
        };
        let before = link.handoff.counts;
        let grew = |now: u64, was: u64| now.saturating_sub(was);
        self.handoffs.total.offered += grew(counts.offered, before.offered);
        self.handoffs.total.adopted += grew(counts.adopted, before.adopted);
        self.handoffs.total.kept += grew(counts.kept, before.kept);
        link.handoff.counts = HandoffCounts {
            offered: counts.offered.max(before.offered),
            adopted: counts.adopted.max(before.adopted),
            kept: counts.kept.max(before.kept),
        };
    }

    /// Before `giver` is asked to drain: if it offers its connections, links to the least
    /// loaded takers of the serving generation, each end sent to its worker. Returns how many.
    pub(super) fn introduce(&mut self, giver: WorkerId, deadline_ms: u64) -> usize {
        if !self.links.get(&giver).is_some_and(|l| l.handoff.offers) {
            return 0;
        }
        let Some((giver_generation, ..)) = self.supervisor.placement(giver) else {
            return 0;
        };
        let mut takers: Vec<(usize, u64, WorkerId)> = self
            .supervisor
            .serving_workers()
            .into_iter()
            .filter(|(id, _)| *id != giver)
            .filter_map(|(id, connections)| {
                let link = self.links.get(&id)?;
                let part = link.handoff;
                (part.adopts && link.commands.is_some()).then_some((
                    part.links,
                    connections.unwrap_or(0),
                    id,
                ))
            })
            .collect();
        takers.sort();
        takers.truncate(MAX_PEERS);
        let mut made = 0;
        for (_, _, taker) in takers {
            let Some((taker_generation, ..)) = self.supervisor.placement(taker) else {
                continue;
            };
            let (giver_end, taker_end) = match baton_sys::channel::pair() {
                Ok(pair) => pair,
                Err(err) => {
                    warn!(
                        worker = giver.0,
                        "no handoff link for worker {giver}: {err}; it drains its connections"
                    );
                    break;
                }
            };
            self.handoffs.next_link += 1;
            let link = self.handoffs.next_link;
            let end = |role, peer: WorkerId, peer_generation: u64, fd: OwnedFd| Command {
                message: MasterMessage::HandoffLink(HandoffLink {
                    link,
                    role,
                    peer: peer.0,
                    peer_generation,
                    deadline_ms,
                    max_per_second: MAX_PER_SECOND,
                }),
                fd: Some(fd),
            };
            let sent = [
                (
                    taker,
                    end(HandoffRole::Taker, giver, giver_generation.0, taker_end),
                ),
                (
                    giver,
                    end(HandoffRole::Giver, taker, taker_generation.0, giver_end),
                ),
            ]
            .into_iter()
            .all(|(to, command)| {
                self.links
                    .get(&to)
                    .and_then(|l| l.commands.as_ref())
                    .is_some_and(|commands| commands.send(command).is_ok())
            });
            if sent {
                made += 1;
                if let Some(l) = self.links.get_mut(&taker) {
                    l.handoff.links += 1;
                }
            }
        }
        if made > 0 {
            info!(
                event = baton_proto::event::HANDOFF_LINKS,
                worker = giver.0,
                generation = giver_generation.0,
                takers = made,
                "worker {giver} of generation {giver_generation} hands its connections to {made} workers of the serving generation"
            );
        }
        made
    }

    /// `worker` is gone: the handoff reports it sent last and the channel's task did not read
    /// (its exit can be seen first), taken from the channel's queue. At most a few: the worker
    /// is gone, and the queue holds what it left.
    pub(super) fn last_reports(&mut self, worker: WorkerId) {
        let Some(channel) = self.links.get(&worker).and_then(|l| l.channel.as_ref()) else {
            return;
        };
        let Ok(channel) = channel.try_clone() else {
            return;
        };
        let mut buf = vec![0u8; baton_proto::MAX_MESSAGE_SIZE];
        let mut last = None;
        for _ in 0..64 {
            match baton_sys::channel::try_recv(channel.as_fd(), &mut buf) {
                Ok(got) if got.len > 0 && !got.truncated => {
                    if let Ok(WorkerMessage::HandoffReport(counts)) =
                        baton_proto::decode(&buf[..got.len])
                    {
                        last = Some(counts);
                    }
                }
                _ => break,
            }
        }
        if let Some(counts) = last {
            self.handoff_report(worker, counts);
        }
    }

    /// `worker` is gone: what it handed off, in the log.
    pub(super) fn handoff_done(&self, worker: WorkerId, part: &Part) {
        let HandoffCounts {
            offered,
            adopted,
            kept,
        } = part.counts;
        if offered > 0 {
            info!(
                event = baton_proto::event::HANDOFF_DONE,
                worker = worker.0,
                offered,
                adopted,
                kept,
                "worker {worker} handed off {adopted} of the {offered} connections it offered (kept {kept})"
            );
        }
    }
}
