//! `baton`: the master (`baton run`) and the tools that talk to it. Only wiring lives here; the
//! master is `baton-core`, the wire types are `baton-proto`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

mod client;
mod commands;
mod exit;
mod journal;
mod logfile;
mod logging;
mod render;
mod signals;
mod systemd;
mod watch;

use exit::{EX_IOERR, EX_USAGE};

#[derive(Parser)]
#[command(
    name = "baton",
    version = baton_core::version(),
    about = "Master-worker process supervisor with seamless reload"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the running master's control socket is.
#[derive(Args, Clone)]
struct Target {
    /// Find the control socket in this configuration file.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// The control socket (default: $BATON_SOCKET, or /run/baton/baton.sock).
    #[arg(short, long, conflicts_with = "config")]
    socket: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the master in the foreground.
    Run {
        /// Configuration file.
        #[arg(short, long, default_value = "/etc/baton/baton.yaml")]
        config: PathBuf,
        /// Log format on stderr.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// Write the log to this file instead of stderr (appending); SIGUSR1 reopens it, for
        /// logrotate's `create` mode. Workers' captured lines go there too (`output: inherit`
        /// workers write to stderr).
        #[arg(long)]
        log_file: Option<PathBuf>,
        /// Write the master's pid to this file (whole, at start), removed when it exits.
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
    /// Validate a configuration file without touching a running master (0: valid, 64: not).
    Check {
        #[arg(short, long, default_value = "/etc/baton/baton.yaml")]
        config: PathBuf,
    },
    /// The master and every generation, with its workers, and the listeners.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print the protocol's status type as JSON.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Redraw it in place (a terminal: q or Ctrl-C quits; otherwise the text every
        /// interval).
        #[arg(long)]
        watch: bool,
        /// With `--watch`: seconds between updates.
        #[arg(long, default_value_t = 1.0, requires = "watch")]
        interval: f64,
    },
    /// The live view: `baton status --watch`.
    Top {
        #[command(flatten)]
        target: Target,
        /// Seconds between updates.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// The draining generations and what keeps each alive.
    DrainStatus {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
        /// Wait until no generation is draining (exit 1 if `--timeout` passes first).
        #[arg(long)]
        wait: bool,
        /// With `--wait`: give up after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Reload: start a new generation and wait for its verdict (exit 0: serving, 1: failed).
    Reload {
        #[command(flatten)]
        target: Target,
        /// Return at once with the request id instead of waiting.
        #[arg(long)]
        no_wait: bool,
        /// Wait for the verdict of an earlier request instead of making a new one.
        #[arg(long, conflicts_with = "no_wait")]
        request: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Stop the master: drain every generation, then exit.
    Stop {
        #[command(flatten)]
        target: Target,
        /// Kill the workers now instead of draining them.
        #[arg(long)]
        fast: bool,
    },
    /// Counters and gauges in the Prometheus text format (for node_exporter's textfile
    /// collector, or any scraper that runs a command).
    Metrics {
        #[command(flatten)]
        target: Target,
    },
    /// Replace the running master's program in place (same pid, sockets and workers) with the
    /// binary it was started from, or `--binary`; wait for the verdict (exit 0: the new program
    /// runs, 1: the upgrade failed and the old program goes on).
    Upgrade {
        #[command(flatten)]
        target: Target,
        /// The program to run instead (absolute path; only root and the master's user may).
        #[arg(long)]
        binary: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// (Used by `baton upgrade`: decode a master's state from the descriptor in
    /// $BATON_UPGRADE_STATE_FD and say whether this program can take it over.)
    #[command(hide = true)]
    UpgradeCheck,
    /// (Started by `baton run`: wait for the master to end, then end the workers it left
    /// behind, as its registry names them.)
    #[command(hide = true)]
    Guard {
        #[arg(long)]
        master: u32,
        #[arg(long)]
        started: u64,
        #[arg(long)]
        registry: PathBuf,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// The workers' last output lines the master keeps (40 per worker, and those of the last 64
    /// workers gone), oldest first; with `--follow`, new lines as they come.
    Logs {
        #[command(flatten)]
        target: Target,
        /// Only this program's workers.
        #[arg(long)]
        program: Option<String>,
        /// Only this generation's workers.
        #[arg(long)]
        generation: Option<u64>,
        /// Only this worker (its id, as `baton status` shows it).
        #[arg(long)]
        worker: Option<u64>,
        /// Go on printing new lines until interrupted (or the master stops).
        #[arg(short, long)]
        follow: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Print shell completions (for packaging: bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff), generated from these definitions.
    Man,
    /// The last reloads: id, trigger, start, duration, verdict.
    History {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    /// One JSON object per line, event fields at the top level.
    Json,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version are answers (0); anything else is a usage error, 64 like a bad
        // configuration (docs/cli.md).
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() { EX_USAGE } else { 0 });
        }
    };
    let code = match cli.command {
        Command::Run {
            config,
            log_format,
            log_file,
            pid_file,
        } => commands::run(
            &config,
            log_format,
            log_file.as_deref(),
            pid_file.as_deref(),
        ),
        Command::Check { config } => commands::check(&config),
        Command::Status {
            target,
            watch: true,
            interval,
            ..
        }
        | Command::Top { target, interval } => commands::watch(&target, seconds(interval)),
        Command::Status { target, json, .. } => commands::status(&target, json),
        Command::DrainStatus {
            target,
            json,
            wait,
            timeout,
        } => commands::drain_status(&target, json, wait, timeout.map(Duration::from_secs)),
        Command::Reload {
            target,
            no_wait,
            request,
            json,
        } => commands::reload(&target, no_wait, request, json),
        Command::Stop { target, fast } => commands::stop(&target, fast),
        Command::History { target, json } => commands::history(&target, json),
        Command::Logs {
            target,
            program,
            generation,
            worker,
            follow,
            json,
        } => commands::logs(
            &target,
            baton_proto::control::OutputFilter {
                program,
                generation,
                worker,
            },
            follow,
            json,
        ),
        Command::Metrics { target } => commands::metrics(&target),
        Command::Upgrade {
            target,
            binary,
            json,
        } => commands::upgrade(&target, binary.as_deref(), json),
        Command::UpgradeCheck => commands::upgrade_check(),
        Command::Guard {
            master,
            started,
            registry,
            log_format,
        } => commands::guard(master, started, &registry, log_format),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "baton", &mut std::io::stdout());
            0
        }
        Command::Man => {
            let page = clap_mangen::Man::new(Cli::command());
            match page.render(&mut std::io::stdout()) {
                Ok(()) => 0,
                Err(_) => EX_IOERR,
            }
        }
    };
    ExitCode::from(code)
}

/// An interval in seconds from the command line: at least 0.1 s (the master must not be asked
/// more often), at most a day.
fn seconds(value: f64) -> std::time::Duration {
    std::time::Duration::from_secs_f64(if value.is_finite() {
        value.clamp(0.1, 86_400.0)
    } else {
        1.0
    })
}
