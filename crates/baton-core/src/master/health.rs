//! The metrics endpoint's pages as the event loop answers them: the metrics text
//! ([`Master::metrics`], in `report`) and the probes of an orchestrator: `/healthz` (ready: a
//! generation serves and no stop has begun) and `/livez` (alive: the loop answered).

use std::time::Instant;

use super::Master;
use crate::metrics_http;
use crate::supervisor::Phase;

impl Master {
    /// A page of the metrics endpoint: the metrics, or a probe's answer (`/healthz`: a
    /// generation serves and no stop has begun; `/livez`: this loop turns, since it answers).
    pub(super) fn page(&self, page: metrics_http::Page) -> metrics_http::Answer {
        use metrics_http::{Answer, Page};
        match page {
            Page::Metrics => Answer {
                ok: true,
                text: self.metrics(),
            },
            Page::Live => Answer {
                ok: true,
                text: "live: the master's event loop answers\n".into(),
            },
            Page::Health => {
                let snap = self.supervisor.snapshot(Instant::now());
                let serving = snap.generations.iter().find(|g| g.phase == Phase::Serving);
                match (serving, snap.stopping) {
                    (_, true) => Answer {
                        ok: false,
                        text: "not ready: stopping\n".into(),
                    },
                    (Some(g), false) => Answer {
                        ok: true,
                        text: format!("ready: generation {} serves\n", g.generation.0),
                    },
                    (None, false) => Answer {
                        ok: false,
                        text: "not ready: no generation serves\n".into(),
                    },
                }
            }
        }
    }
}
