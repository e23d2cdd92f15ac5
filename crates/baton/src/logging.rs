//! The master's log: where it goes (stderr, `--log-file`, the journal) and how each line looks.
//!
//! Workers' lines (target `baton::output`, see `baton_core::output`) carry where they came from:
//! a prefix in the text format (`web[4242] g3 w12 s0 stderr: ...`), fields in JSON
//! (`program`, `generation`, `worker`, `slot`, `pid`, `stream`), journal fields under systemd.
//! Every line is formatted whole and written in one call under the sink's lock, so a worker's
//! line and the master's never interleave.

use std::fmt;
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::LogFormat;

/// The target of workers' lines.
const OUTPUT_TARGET: &str = "baton::output";

pub(crate) fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Under systemd (stderr is the journal), fields go to the journal as fields.
    if matches!(format, LogFormat::Text)
        && !crate::logfile::in_use()
        && crate::journal::stderr_is_journal()
    {
        if let Ok(journal) = crate::journal::Journal::new() {
            tracing_subscriber::registry()
                .with(filter)
                .with(journal)
                .init();
            return;
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::logfile::Sink)
        .with_ansi(std::io::stderr().is_terminal() && !crate::logfile::in_use());
    match format {
        // Messages are written to stand alone; the structured fields are for the JSON format.
        LogFormat::Text => {
            let master = tracing_subscriber::fmt::format()
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal() && !crate::logfile::in_use());
            builder
                .fmt_fields(tracing_subscriber::fmt::format::debug_fn(
                    |w, field, value| {
                        if field.name() == "message" {
                            // Paths and keys from the configuration, names and words from
                            // workers and clients: escaped, so a line is one line and shows
                            // what it holds.
                            let text = format!("{value:?}");
                            w.write_str(&baton_proto::text::printable_but(&text, |c| c == '\t'))
                        } else {
                            Ok(())
                        }
                    },
                ))
                .event_format(Text { master })
                .init();
        }
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

/// The text format: the master's events as tracing formats them (time, level, message), a
/// worker's line with its origin in front of its text.
struct Text<F> {
    master: F,
}

impl<S, N, F> FormatEvent<S, N> for Text<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        if event.metadata().target() != OUTPUT_TARGET {
            return self.master.format_event(ctx, writer, event);
        }
        let mut line = Origin::default();
        event.record(&mut line);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        // The master's own lines: `2026-11-27T15:24:16.380524Z  INFO message`.
        let ms = crate::render::clock(now.as_millis() as u64);
        writeln!(
            writer,
            "{}{:03}Z  INFO {}[{}] g{} w{} s{} {}: {}",
            ms.trim_end_matches('Z'),
            now.subsec_micros() % 1000,
            line.program,
            line.pid,
            line.generation,
            line.worker,
            line.slot,
            line.stream,
            line.message
        )
    }
}

/// A worker's line as recorded by `baton_core::output` (its text already escaped).
#[derive(Default)]
struct Origin {
    program: String,
    generation: String,
    worker: String,
    slot: String,
    pid: String,
    stream: String,
    message: String,
}

impl Visit for Origin {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record_debug(field, &format_args!("{value}"));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let slot = match field.name() {
            "program" => &mut self.program,
            "generation" => &mut self.generation,
            "worker" => &mut self.worker,
            "slot" => &mut self.slot,
            "pid" => &mut self.pid,
            "stream" => &mut self.stream,
            "message" => &mut self.message,
            _ => return,
        };
        *slot = baton_proto::text::printable_but(&format!("{value:?}"), |c| c == '\t').into_owned();
    }
}
