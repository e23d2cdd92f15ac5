//! Workers' cgroups as the event loop uses them ([`crate::cgroups`]): killed with the worker's
//! process group, removed once empty (a killed process is gone only once reaped, so removal is
//! tried again after each reap), and the container removed when the master ends.

use std::path::Path;

use super::Master;
use crate::cgroups::{Containment, Unavailable};
use crate::config::Cgroups;
use crate::supervisor::WorkerId;

/// The container for a master with control socket `socket`, as `policy` allows.
pub(super) fn open(policy: Cgroups, socket: &Path) -> Result<Containment, Unavailable> {
    match policy {
        Cgroups::Off => Err(Unavailable::Off),
        Cgroups::Auto => Containment::open(socket),
    }
}

impl Master {
    /// Ends everything in `worker`'s cgroup (with its process group, at a kill).
    pub(super) fn kill_cgroup(&self, worker: WorkerId) {
        if let Ok(containment) = &self.containment {
            containment.kill(worker.0);
        }
    }

    /// `worker` is gone: its cgroup goes once empty.
    pub(super) fn forget_cgroup(&mut self, worker: WorkerId) {
        if self.containment.is_ok() {
            self.cgroups_to_remove.push(worker);
            self.remove_cgroups();
        }
    }

    /// Removes the cgroups of gone workers that are empty now.
    pub(super) fn remove_cgroups(&mut self) {
        if let Ok(containment) = &self.containment {
            self.cgroups_to_remove
                .retain(|worker| !containment.remove(worker.0));
        }
    }

    /// The master ends: what is empty goes, the container too.
    pub(super) fn close_containment(&mut self) {
        self.remove_cgroups();
        if let Ok(containment) = &self.containment {
            containment.close();
        }
    }
}
