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

/// One worker's part in connection handoff.
#[derive(Debug, Clone, Default)]
pub(super) struct Part {
    /// It offers its connections when it drains.
    pub(super) offers: bool,
    /// It takes those of a draining generation.
    pub(super) adopts: bool,
    /// Links it holds as a taker (to spread givers over takers).
    pub(super) links: usize,
    /// As a giver: its generation and the one it hands to (set when its links are made).
    gives: Option<(u64, u64)>,
    /// What it reported handing off, as a giver.
    pub(super) reported: Reported,
}

impl Part {
    /// What the upgrade state keeps of it (`None`: it takes no part).
    pub(super) fn state(&self) -> Option<crate::upgrade::HandoffState> {
        let state = crate::upgrade::HandoffState {
            offers: self.offers,
            adopts: self.adopts,
            links: self.links,
            gives: self.gives,
            reported: self.reported.get(),
        };
        (state != crate::upgrade::HandoffState::default()).then_some(state)
    }

    /// The part a resumed master gives back to a worker.
    pub(super) fn resumed(state: crate::upgrade::HandoffState) -> Part {
        let part = Part {
            offers: state.offers,
            adopts: state.adopts,
            links: state.links,
            gives: state.gives,
            reported: Reported::default(),
        };
        part.reported.note(state.reported);
        part
    }
}

/// A giver's counts as its channel's task read them last, shared with that task: the master
/// sees them at once, and a worker's exit, which can reach the loop before the task's news,
/// never finds them stale.
#[derive(Debug, Clone, Default)]
pub(super) struct Reported(std::sync::Arc<std::sync::Mutex<HandoffCounts>>);

impl Reported {
    /// A report read from the worker (cumulative counts).
    pub(super) fn note(&self, counts: HandoffCounts) {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *last = most(*last, counts);
    }

    pub(super) fn get(&self) -> HandoffCounts {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Generations whose handoff counts are kept once their givers are gone (as many as
/// `baton history` shows reloads).
const GENERATIONS_KEPT: usize = 64;

/// The master's own handoff records.
#[derive(Debug, Default)]
pub(super) struct Handoffs {
    next_link: u64,
    /// The counts of the givers that are gone, summed.
    gone: HandoffCounts,
    /// The same by the givers' generation, and by the generation they handed to.
    gone_from: std::collections::BTreeMap<u64, HandoffCounts>,
    gone_to: std::collections::BTreeMap<u64, HandoffCounts>,
}

/// `b` added to `a`.
/// Saturating: the counts are the workers' word, and a worker may report any number.
fn add(a: &mut HandoffCounts, b: HandoffCounts) {
    a.offered = a.offered.saturating_add(b.offered);
    a.adopted = a.adopted.saturating_add(b.adopted);
    a.kept = a.kept.saturating_add(b.kept);
}

/// Each count the larger of the two (counts only grow: a report that shrinks one is the
/// worker's mistake, and changes nothing).
fn most(a: HandoffCounts, b: HandoffCounts) -> HandoffCounts {
    HandoffCounts {
        offered: a.offered.max(b.offered),
        adopted: a.adopted.max(b.adopted),
        kept: a.kept.max(b.kept),
    }
}

/// `counts` added to `generation`'s in `kept`, which holds the last [`GENERATIONS_KEPT`].
fn add_to(
    kept: &mut std::collections::BTreeMap<u64, HandoffCounts>,
    generation: u64,
    counts: HandoffCounts,
) {
    add(kept.entry(generation).or_default(), counts);
    while kept.len() > GENERATIONS_KEPT {
        kept.pop_first();
    }
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

    /// Every giver's counts, summed: those gone and those alive.
    pub(super) fn handed_off(&self) -> HandoffCounts {
        let mut total = self.handoffs.gone;
        for link in self.links.values() {
            add(&mut total, link.handoff.reported.get());
        }
        total
    }

    /// What the givers of each generation handed off so far (those alive and those gone).
    pub(super) fn handed_off_by_generation(&self) -> std::collections::HashMap<u64, HandoffCounts> {
        let mut by: std::collections::HashMap<u64, HandoffCounts> = self
            .handoffs
            .gone_from
            .iter()
            .map(|(g, c)| (*g, *c))
            .collect();
        for link in self.links.values() {
            if let Some((from, _)) = link.handoff.gives {
                add(by.entry(from).or_default(), link.handoff.reported.get());
            }
        }
        by
    }

    /// What was handed to the workers of `generation` (by givers alive and gone).
    pub(super) fn handed_to(&self, generation: u64) -> Option<HandoffCounts> {
        let mut total = self.handoffs.gone_to.get(&generation).copied();
        for link in self.links.values() {
            if link.handoff.gives.is_some_and(|(_, to)| to == generation) {
                add(total.get_or_insert_default(), link.handoff.reported.get());
            }
        }
        total
    }

    /// Before `giver` is asked to drain: if it offers its connections, links to the least
    /// loaded takers of the serving generation, each end sent to its worker. Returns how many.
    pub(super) fn introduce(&mut self, giver: WorkerId, deadline_ms: u64) -> usize {
        if !self.links.get(&giver).is_some_and(|l| l.handoff.offers) {
            return 0;
        }
        let Some((giver_generation, program, _)) = self.supervisor.placement(giver) else {
            return 0;
        };
        let rate = self
            .resources
            .get(&giver_generation)
            .and_then(|r| r.programs.get(program))
            .map_or(crate::config::DEFAULT_HANDOFF_RATE, |p| p.handoff_rate);
        let mut takers: Vec<(usize, u64, WorkerId)> = self
            .supervisor
            .serving_workers()
            .into_iter()
            .filter(|(id, _)| *id != giver)
            .filter_map(|(id, connections)| {
                let link = self.links.get(&id)?;
                let part = &link.handoff;
                (part.adopts && link.commands.is_some()).then_some((
                    part.links,
                    connections.unwrap_or(0),
                    id,
                ))
            })
            .collect();
        takers.sort();
        takers.truncate(MAX_PEERS);
        // The program's rate is the giver's, spread over its links.
        let per_link = rate.div_ceil(takers.len().max(1) as u32).max(1);
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
                    max_per_second: per_link,
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
                // Every taker serves: they are of one generation.
                if let Some(l) = self.links.get_mut(&giver) {
                    l.handoff.gives = Some((giver_generation.0, taker_generation.0));
                }
            }
        }
        if made > 0 {
            info!(
                event = baton_proto::event::HANDOFF_LINKS,
                worker = giver.0,
                generation = giver_generation.0,
                takers = made,
                per_second = per_link,
                "worker {giver} of generation {giver_generation} hands its connections to {made} workers of the serving generation, at most {per_link} a second to each"
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
        if let (Some(counts), Some(link)) = (last, self.links.get(&worker)) {
            link.handoff.reported.note(counts);
        }
    }

    /// `worker` is gone: what it handed off, in the log and the sums.
    pub(super) fn handoff_done(&mut self, worker: WorkerId, part: &Part) {
        let counts = part.reported.get();
        let handoffs = &mut self.handoffs;
        add(&mut handoffs.gone, counts);
        if let Some((from, to)) = part.gives {
            add_to(&mut handoffs.gone_from, from, counts);
            add_to(&mut handoffs.gone_to, to, counts);
        }
        let HandoffCounts {
            offered,
            adopted,
            kept,
        } = counts;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker that reports the largest counts there are cannot make the master's sums
    /// overflow (a panic in a debug build, nonsense in a release one).
    #[test]
    fn sums_of_hostile_counts_saturate() {
        let huge = HandoffCounts {
            offered: u64::MAX,
            adopted: u64::MAX,
            kept: u64::MAX,
        };
        let mut total = HandoffCounts {
            offered: 1,
            adopted: 1,
            kept: 1,
        };
        add(&mut total, huge);
        add(&mut total, huge);
        assert_eq!(total, huge);
        let mut kept = std::collections::BTreeMap::new();
        for generation in 0..(GENERATIONS_KEPT as u64 + 10) {
            add_to(&mut kept, generation, huge);
            add_to(&mut kept, generation, huge);
        }
        assert_eq!(kept.len(), GENERATIONS_KEPT);
        assert_eq!(kept.values().next(), Some(&huge));
    }
}
