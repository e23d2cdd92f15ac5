//! Workers' cgroups as the event loop uses them ([`crate::cgroups`]): each program's cgroup is
//! opened once, at its first worker, and its workers are made in it; when a generation is released (its last worker gone) its cgroups are killed (what escaped
//! the workers' process groups) and removed once empty (a killed process is gone only once
//! reaped, so removal is tried again after each reap); the container goes when the master ends.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use super::Master;
use crate::cgroups::{Containment, Unavailable};
use crate::config::Cgroups;
use crate::faults::Point;
use crate::supervisor::Generation;

/// The container for a master with control socket `socket`, as `policy` allows.
pub(super) fn open(policy: Cgroups, socket: &Path) -> Result<Containment, Unavailable> {
    match policy {
        Cgroups::Off => Err(Unavailable::Off),
        Cgroups::Auto => Containment::open(socket),
    }
}

/// The cgroups the master uses: by (generation, program), those open to make workers in, and
/// those of gone generations still to remove (their last processes not reaped yet).
#[derive(Debug, Default)]
pub(super) struct OpenCgroups {
    pub(super) open: HashMap<(Generation, usize), OwnedFd>,
    pub(super) to_remove: Vec<(Generation, usize)>,
}

impl Master {
    /// The cgroup to make a worker of `program` of `generation` in (`None`: not contained).
    pub(super) fn cgroup_for(
        &mut self,
        generation: Generation,
        program: usize,
    ) -> std::io::Result<Option<BorrowedFd<'_>>> {
        let Ok(containment) = &self.containment else {
            return Ok(None);
        };
        let fd: &OwnedFd = match self.cgroups.open.entry((generation, program)) {
            Entry::Occupied(open) => open.into_mut(),
            Entry::Vacant(slot) => slot.insert(containment.open_group(generation.0, program)?),
        };
        Ok(Some(fd.as_fd()))
    }

    /// The directory of the cgroup workers of `program` of `generation` are made in (`None`:
    /// workers are not contained).
    pub(super) fn cgroup_dir(
        &self,
        generation: Generation,
        program: usize,
    ) -> Option<std::path::PathBuf> {
        let containment = self.containment.as_ref().ok()?;
        Some(containment.group_dir(generation.0, program))
    }

    /// `generation` is gone: what is left in its cgroups ends, and they go once empty.
    pub(super) fn release_cgroups(&mut self, generation: Generation, programs: usize) {
        let Ok(containment) = &self.containment else {
            return;
        };
        for program in 0..programs {
            self.cgroups.open.remove(&(generation, program));
            containment.kill(generation.0, program);
            self.cgroups.to_remove.push((generation, program));
        }
        self.remove_cgroups();
    }

    /// Removes the cgroups of gone generations that are empty now.
    pub(super) fn remove_cgroups(&mut self) {
        if let Ok(containment) = &self.containment {
            self.cgroups
                .to_remove
                .retain(|(g, program)| !containment.remove(g.0, *program));
        }
    }

    /// The master ends: what is empty goes, the container too.
    pub(super) fn close_containment(&mut self) {
        self.cgroups.open.clear();
        self.remove_cgroups();
        if let Ok(containment) = &self.containment {
            containment.close();
        }
    }
}

impl Master {
    /// SIGKILLs a worker: its process group (it leads one: its children go with it) while the
    /// master holds the group's leader, and its main process through its pidfd, in case it left
    /// the group. What left the group too goes with the generation's cgroup, when the
    /// generation is released.
    pub(super) fn kill(&self, pid: u32, pgid: u32) {
        if let Err(err) = Point::DrainKill.check() {
            tracing::warn!(pid, "cannot kill pid {pid}: {err}");
            return;
        }
        self.processes.kill_group(pgid);
        self.processes
            .signal(pid, baton_sys::process::SignalNumber::SIGKILL);
    }
}
