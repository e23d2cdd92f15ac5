//! Workers' cgroups as the event loop uses them ([`crate::cgroups`]): the master enters a
//! program's cgroup to start its workers and leaves once the batch of actions is carried out;
//! when a generation is released (its last worker gone) its cgroups are killed (what escaped
//! the workers' process groups) and removed once empty (a killed process is gone only once
//! reaped, so removal is tried again after each reap); the container goes when the master ends.

use std::path::Path;

use tracing::warn;

use super::Master;
use crate::cgroups::{Containment, Unavailable};
use crate::config::Cgroups;
use crate::supervisor::Generation;

/// The container for a master with control socket `socket`, as `policy` allows.
pub(super) fn open(policy: Cgroups, socket: &Path) -> Result<Containment, Unavailable> {
    match policy {
        Cgroups::Off => Err(Unavailable::Off),
        Cgroups::Auto => Containment::open(socket),
    }
}

impl Master {
    /// Puts the master in the cgroup of `program` of `generation`, to start workers there.
    pub(super) fn enter_cgroup(
        &mut self,
        generation: Generation,
        program: usize,
    ) -> std::io::Result<()> {
        let Ok(containment) = &self.containment else {
            return Ok(());
        };
        if self.inside == Some((generation, program)) {
            return Ok(());
        }
        containment.enter(generation.0, program)?;
        self.inside = Some((generation, program));
        Ok(())
    }

    /// Back to the master's own cgroup (after a batch of spawns).
    pub(super) fn leave_cgroup(&mut self) {
        if self.inside.take().is_none() {
            return;
        }
        if let Ok(containment) = &self.containment {
            if let Err(err) = containment.leave() {
                warn!("cannot leave the workers' cgroup: {err}");
            }
        }
    }

    /// `generation` is gone: what is left in its cgroups ends, and they go once empty.
    pub(super) fn release_cgroups(&mut self, generation: Generation, programs: usize) {
        let Ok(containment) = &self.containment else {
            return;
        };
        for program in 0..programs {
            containment.kill(generation.0, program);
            self.cgroups_to_remove.push((generation, program));
        }
        self.remove_cgroups();
    }

    /// Removes the cgroups of gone generations that are empty now.
    pub(super) fn remove_cgroups(&mut self) {
        if let Ok(containment) = &self.containment {
            self.cgroups_to_remove
                .retain(|(g, program)| !containment.remove(g.0, *program));
        }
    }

    /// The master ends: what is empty goes, the container too.
    pub(super) fn close_containment(&mut self) {
        self.leave_cgroup();
        self.remove_cgroups();
        if let Ok(containment) = &self.containment {
            containment.close();
        }
    }
}
