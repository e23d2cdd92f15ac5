//! Steering QUIC listeners (docs/quic.md): after every turn of the loop, each QUIC group's
//! program is made to match the generations: each generation's tag to its socket, everything
//! else to the newest serving generation's. The program is attached only when that changes (a
//! generation prepared, promoted, or released), never on a timer.

use baton_proto::quic_tag;
use baton_sys::reuseport::QuicRoutes;
use tracing::{error, info};

use super::Master;
use crate::supervisor::Phase;

impl Master {
    pub(super) fn steer(&mut self) {
        let phases = self.supervisor.generations();
        let mut generations: Vec<_> = self.resources.iter().collect();
        generations.sort_by_key(|(g, _)| **g);
        for (address, group) in self.table.quic_groups() {
            let mut tagged = Vec::new();
            let (mut serving, mut newest) = (None, None);
            for (g, resources) in &generations {
                let quic = resources
                    .listeners
                    .iter()
                    .filter(|l| l.config.options.quic && &l.config.address == address);
                for l in quic {
                    let Some(index) = group.index_of(&l.socket) else {
                        continue;
                    };
                    tagged.push((quic_tag(g.0), index));
                    newest = Some(index);
                    if phases
                        .iter()
                        .any(|(n, p, _)| n == *g && *p == Phase::Serving)
                    {
                        serving = Some((**g, index));
                    }
                }
            }
            let default = serving.map(|(_, i)| i).or(newest).unwrap_or(0);
            let routes = QuicRoutes { tagged, default };
            match group.steer(routes.clone()) {
                Ok(true) => info!(event = baton_proto::event::QUIC_STEERED, listener = %address,
                    generation = serving.map_or(0, |(g, _)| g.0), tags = routes.tagged.len(),
                    "QUIC on {address}: new connections to generation {}, {} generations' connections steered by tag",
                    serving.map_or_else(|| "?".to_string(), |(g, _)| g.to_string()),
                    routes.tagged.len()),
                Ok(false) => {}
                Err(e) => error!(listener = %address,
                    "QUIC on {address}: the steering program could not be attached: {e}"),
            }
        }
    }
}
