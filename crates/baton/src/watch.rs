//! `baton status --watch` (and `baton top`): the status, redrawn in place once a second.
//!
//! On a terminal: a full-screen view drawn with ratatui (crossterm underneath: raw mode, the
//! alternate screen, restored on `q`, Esc, Ctrl-C, on an error and on a panic) with the master's
//! state and the reload in progress, each generation (a draining one with a progress bar:
//! connections left of the most seen since it began draining, and the time to its deadline),
//! the workers and the listeners with their accept queues. Elsewhere (a pipe, a file): the plain
//! `baton status` text every interval, under a line with the time. It only reads: a user with
//! read permission on the control socket can watch.

#![allow(clippy::print_stderr)] // a CLI reports on stderr

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use baton_proto::control::{
    GenerationState, GenerationStatus, ListenerStatus, Request, Response, StatusSnapshot,
};
use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Gauge, Paragraph, Row, Table};

use crate::client;
use crate::render::{self, safe};

/// What the view keeps between frames.
#[derive(Default)]
struct View {
    last: Option<StatusSnapshot>,
    /// Why the last request failed (shown; the view keeps asking).
    error: Option<String>,
    /// The most connections seen for each draining generation (its drain's starting point).
    drain_peak: HashMap<u64, u64>,
    updated: Option<std::time::SystemTime>,
}

impl View {
    fn refresh(&mut self, socket: &Path) {
        match client::call(
            socket,
            &Request::Status { brief: true },
            Some(Duration::from_secs(5)),
        ) {
            Ok(Response::Status(s)) => {
                for g in &s.generations {
                    if g.state == GenerationState::Draining {
                        let now = connections(g);
                        let peak = self.drain_peak.entry(g.generation).or_insert(now);
                        *peak = (*peak).max(now);
                    }
                }
                self.drain_peak
                    .retain(|g, _| s.generations.iter().any(|x| x.generation == *g));
                self.last = Some(s);
                self.error = None;
            }
            Ok(Response::Error { message, .. }) => {
                self.error = Some(format!("the master refused: {}", safe(&message)))
            }
            Ok(_) => self.error = Some("unexpected answer".into()),
            Err(err) => self.error = Some(safe(&err.to_string())),
        }
        self.updated = Some(std::time::SystemTime::now());
    }
}

fn connections(g: &GenerationStatus) -> u64 {
    g.workers.iter().filter_map(|w| w.connections).sum()
}

/// Runs the view on `socket` until the user quits (a terminal) or a request fails (plain).
pub(crate) fn watch(socket: PathBuf, interval: Duration) -> u8 {
    if std::io::stdout().is_terminal() {
        full_screen(&socket, interval)
    } else {
        plain(&socket, interval)
    }
}

fn plain(socket: &Path, interval: Duration) -> u8 {
    loop {
        match client::call(
            socket,
            &Request::Status { brief: true },
            Some(Duration::from_secs(5)),
        ) {
            Ok(Response::Status(s)) => {
                let now = render::clock(unix_ms_now());
                crate::commands::print(&format!("--- {now}\n{}", render::status(&s)));
            }
            Ok(other) => return crate::commands::unexpected(&other),
            Err(err) => {
                eprintln!("baton: {err}");
                return err.exit_code();
            }
        }
        std::thread::sleep(interval);
    }
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How often a full-screen view checks for a signal between key presses.
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

fn full_screen(socket: &Path, interval: Duration) -> u8 {
    // SIGTERM, SIGHUP and SIGINT (Ctrl-C is a key in raw mode; these come from `kill` or a
    // closed terminal) end the view like `q` does, so the terminal is always restored.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
        let _ = signal_hook::flag::register(signal, stop.clone());
    }
    // Raw mode and the alternate screen, undone by `restore` (and by ratatui's panic hook).
    let mut terminal = ratatui::init();
    let mut view = View::default();
    let mut next = Instant::now();
    let result = loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break Ok(());
        }
        if Instant::now() >= next {
            view.refresh(socket);
            next = Instant::now() + interval;
        }
        if let Err(err) = terminal.draw(|frame| draw(frame, &view)) {
            break Err(err);
        }
        let wait = next
            .saturating_duration_since(Instant::now())
            .min(SIGNAL_CHECK);
        match event::poll(wait) {
            Ok(true) => match event::read() {
                Ok(Event::Key(key)) if key.kind == KeyEventKind::Press => {
                    let ctrl_c = key.code == KeyCode::Char('c')
                        && key.modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(key.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc) {
                        break Ok(());
                    }
                }
                Ok(_) => {} // a resize redraws at the next turn
                Err(err) => break Err(err),
            },
            Ok(false) => {}
            Err(err) => break Err(err),
        }
    };
    ratatui::restore();
    match result {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("baton: the terminal: {err}");
            1
        }
    }
}

fn draw(frame: &mut Frame<'_>, view: &View) {
    let area = frame.area();
    let Some(s) = &view.last else {
        let text = view.error.as_deref().unwrap_or("asking the master ...");
        frame.render_widget(Paragraph::new(text.to_string()), area);
        return;
    };
    let draining: Vec<&GenerationStatus> = s
        .generations
        .iter()
        .filter(|g| g.state == GenerationState::Draining)
        .collect();
    let workers: usize = s.generations.iter().map(|g| g.workers.len()).sum();
    let [head, gens, drains, table, listeners, foot] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(s.generations.len() as u16 + 1),
        Constraint::Length(draining.len() as u16),
        Constraint::Min(workers.min(3) as u16 + 2),
        Constraint::Length(s.listeners.len() as u16 + 2),
        Constraint::Length(1),
    ])
    .areas(area);
    frame.render_widget(header(s, view), head);
    frame.render_widget(generations(s), gens);
    for (i, g) in draining.iter().enumerate() {
        let row = Rect {
            y: drains.y + i as u16,
            height: 1,
            ..drains
        };
        frame.render_widget(drain_gauge(g, view.drain_peak.get(&g.generation)), row);
    }
    frame.render_widget(workers_table(s), table);
    frame.render_widget(listeners_table(&s.listeners), listeners);
    let updated = view
        .updated
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or_else(String::new, |d| render::clock(d.as_millis() as u64));
    let foot_text = format!("q: quit   updated {updated}");
    frame.render_widget(Paragraph::new(foot_text).dim(), foot);
}

fn header(s: &StatusSnapshot, view: &View) -> Paragraph<'static> {
    let m = &s.master;
    let state = match &m.reload {
        Some(r) => format!(
            "reloading: reload {} -> generation {}, for {}",
            r.reload,
            r.generation,
            render::duration(r.running_ms)
        ),
        None => m.state.to_string(),
    };
    let first = Line::from(vec![
        Span::styled(format!("baton {}", m.version), Style::new().bold()),
        Span::raw(format!(
            "  pid {}  up {}  {}",
            m.pid,
            render::duration(m.uptime_ms),
            safe(&m.config)
        )),
    ]);
    let mut second = vec![
        Span::raw("state: "),
        Span::styled(state, Style::new().bold()),
    ];
    if let Some(err) = &view.error {
        second.push(Span::raw(format!("  (last request failed: {err})")).red());
    }
    Paragraph::new(vec![first, Line::from(second)])
}

fn generations(s: &StatusSnapshot) -> Table<'static> {
    let rows = s.generations.iter().map(|g| {
        let ready = g
            .workers
            .iter()
            .filter(|w| w.state == baton_proto::control::WorkerState::Ready)
            .count();
        let memory = g.memory.map_or_else(String::new, |m| {
            format!("{:.1} MiB", m.rss_kib as f64 / 1024.0)
        });
        Row::new(vec![
            format!("gen {}", g.generation),
            g.state.to_string(),
            format!("{ready}/{} ready", g.workers.len()),
            format!("{} conns", connections(g)),
            memory,
        ])
    });
    Table::new(
        rows,
        [
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Length(12),
            Constraint::Length(12),
            Constraint::Min(10),
        ],
    )
    .header(
        Row::new(vec![
            "GENERATION",
            "STATE",
            "WORKERS",
            "CONNECTIONS",
            "MEMORY",
        ])
        .bold(),
    )
}

/// `gen 2 draining: 12 of 40 connections left, 18 s to its deadline`, as a bar of what is done.
fn drain_gauge(g: &GenerationStatus, peak: Option<&u64>) -> Gauge<'static> {
    let left = connections(g);
    let start = peak.copied().unwrap_or(left).max(left);
    let done = if start == 0 {
        1.0
    } else {
        (start - left) as f64 / start as f64
    };
    let deadline = g.time_left_ms.map_or_else(String::new, |ms| {
        format!(", {} to its deadline", render::duration(ms))
    });
    Gauge::default()
        .ratio(done.clamp(0.0, 1.0))
        .label(format!(
            "gen {} draining: {left} of {start} connections left{deadline}",
            g.generation
        ))
        .gauge_style(Style::new().add_modifier(Modifier::REVERSED))
}

fn workers_table(s: &StatusSnapshot) -> Table<'static> {
    let rows = s.generations.iter().flat_map(|g| {
        g.workers.iter().map(move |w| {
            Row::new(vec![
                w.worker.to_string(),
                g.generation.to_string(),
                safe(&w.program),
                w.pid.map_or("-".into(), |p| p.to_string()),
                w.state.to_string(),
                w.connections.map_or("-".into(), |c| c.to_string()),
                w.memory.map_or_else(
                    || "-".into(),
                    |m| format!("{:.1}M", m.rss_kib as f64 / 1024.0),
                ),
                w.status.as_deref().map_or_else(|| "-".into(), safe),
            ])
        })
    });
    Table::new(
        rows,
        [
            Constraint::Length(6),
            Constraint::Length(4),
            Constraint::Length(10),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Length(6),
            Constraint::Length(7),
            Constraint::Min(8),
        ],
    )
    .header(
        Row::new(vec![
            "WORKER", "GEN", "PROGRAM", "PID", "STATE", "CONNS", "RSS", "STATUS",
        ])
        .bold(),
    )
    .block(Block::new().title("workers"))
}

fn listeners_table(all: &[ListenerStatus]) -> Table<'static> {
    let rows = all.iter().map(|l| {
        let queue = l
            .queue
            .map_or_else(|| "-".into(), |q| format!("{} of {}", q.length, q.max));
        Row::new(vec![
            safe(&l.name),
            l.kind.to_string(),
            safe(&l.address),
            l.state.to_string(),
            queue,
        ])
    });
    Table::new(
        rows,
        [
            Constraint::Length(10),
            Constraint::Length(5),
            Constraint::Min(16),
            Constraint::Length(9),
            Constraint::Length(13),
        ],
    )
    .header(Row::new(vec!["LISTENER", "KIND", "ADDRESS", "STATE", "QUEUE"]).bold())
    .block(Block::new().title("listeners"))
}
