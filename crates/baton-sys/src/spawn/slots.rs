//! The slots: low descriptor numbers where the sources of a child's descriptors wait while it
//! starts, so that it copies no other descriptor of the master.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Low descriptor numbers kept for the sources of a child's descriptors.
///
/// A child made with `CLONE_FILES` shares the master's table of descriptors, so nothing is
/// copied; its first step, `close_range(bound, ~0, CLOSE_RANGE_UNSHARE)`, gives it a table of
/// its own holding only the numbers below `bound`. With its sources in these slots (numbers 64
/// and up, reserved early, while low numbers are free), the master's other descriptors (several
/// per worker, over a thousand during a reload of 128) are never copied into the child, nor
/// closed one by one by its exec: that was 5 ms of a 128-worker reload per thousand.
///
/// Each slot holds `/dev/null` when not lent; lending puts a source there (`dup3`), taking
/// back puts `/dev/null` back. One thread at a time (the mutex); another thread takes the
/// ordinary way meanwhile.
pub(super) struct Slots {
    pub(super) numbers: Vec<OwnedFd>,
    null: OwnedFd,
}

/// The first slot's number and how many there are: a systemd-style worker with up to 60
/// listeners fits (its targets must stay below the slots).
const SLOT_BASE: RawFd = 64;
const SLOT_COUNT: usize = 64;

/// `None`: not reserved yet; `Some(None)`: could not be.
pub(super) static SLOTS: std::sync::Mutex<Option<Option<Slots>>> = std::sync::Mutex::new(None);

/// Slots lent for one spawn (the first `count`): their numbers, and the number after the
/// highest.
pub(super) struct Lent {
    count: usize,
    pub(super) numbers: Vec<RawFd>,
    pub(super) bound: RawFd,
}

impl Slots {
    pub(super) fn reserve() -> Option<Slots> {
        let null = std::fs::File::open("/dev/null").ok()?;
        let mut numbers = Vec::with_capacity(SLOT_COUNT);
        for _ in 0..SLOT_COUNT {
            let raw =
                nix::fcntl::fcntl(&null, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(SLOT_BASE)).ok()?;
            // SAFETY: F_DUPFD_CLOEXEC just returned a new descriptor nothing else owns.
            numbers.push(unsafe { OwnedFd::from_raw_fd(raw) });
        }
        Some(Slots {
            numbers,
            null: null.into(),
        })
    }

    /// `count` sources fit, above every target (below `floor`).
    pub(super) fn fit(&self, count: usize, floor: RawFd) -> bool {
        count <= self.numbers.len() && self.numbers.iter().all(|n| n.as_raw_fd() >= floor)
    }

    /// Puts each source in a slot, in order.
    pub(super) fn lend(&mut self, sources: &[(OwnedFd, RawFd)]) -> io::Result<Lent> {
        let mut lent = Lent {
            count: 0,
            numbers: Vec::with_capacity(sources.len()),
            bound: 0,
        };
        for ((source, _), slot) in sources.iter().zip(&mut self.numbers) {
            if let Err(err) = nix::unistd::dup3(source, slot, nix::fcntl::OFlag::O_CLOEXEC) {
                self.take_back(lent);
                return Err(err.into());
            }
            lent.count += 1;
            lent.numbers.push(slot.as_raw_fd());
            lent.bound = lent.bound.max(slot.as_raw_fd() + 1);
        }
        Ok(lent)
    }

    /// `/dev/null` in the lent slots again (closing the master's extra reference to each
    /// source).
    pub(super) fn take_back(&mut self, lent: Lent) {
        for slot in self.numbers.iter_mut().take(lent.count) {
            let _ = nix::unistd::dup3(&self.null, slot, nix::fcntl::OFlag::O_CLOEXEC);
        }
    }
}
