//! `baton`: the master (`baton run`) and its tools. Only wiring lives here; the master is
//! `baton-core`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

mod signals;

/// Exit status for bad arguments or configuration (sysexits' EX_USAGE): with
/// `RestartPreventExitStatus=64`, systemd does not restart-loop on a broken config.
const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "baton",
    version,
    about = "Master-worker process supervisor with seamless reload"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    },
    /// Validate a configuration file and exit (0: valid, 64: invalid).
    Check {
        #[arg(short, long, default_value = "/etc/baton/baton.yaml")]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    /// One JSON object per line, event fields at the top level.
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, log_format } => run(&config, log_format),
        Command::Check { config } => check(&config),
    }
}

#[allow(clippy::print_stderr)] // before logging is set up, and the verdict of `check`
fn run(path: &std::path::Path, format: LogFormat) -> ExitCode {
    init_logging(format);
    let config = match baton_core::config::load(path) {
        Ok(config) => config,
        Err(err) => {
            tracing::error!(event = "config_invalid", "invalid configuration: {err}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let master = match baton_core::master::Master::new(config) {
        Ok(master) => master,
        Err(err) => {
            tracing::error!(event = "bind_failed", "cannot start: {err}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match serve(master) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(master: baton_core::master::Master) -> anyhow::Result<i32> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    signals::forward(tx).context("registering signal handlers")?;
    // Orphans of workers (a server that forks and announces MAINPID=) are reparented to the
    // master, which reaps them, instead of to init.
    if let Err(err) = baton_core::become_subreaper() {
        tracing::warn!("cannot become a child subreaper: {err}");
    }
    Ok(runtime.block_on(master.run(rx)))
}

#[allow(clippy::print_stderr, clippy::print_stdout)]
fn check(path: &std::path::Path) -> ExitCode {
    match baton_core::config::load(path) {
        Ok(config) => {
            let programs: Vec<String> = config
                .programs
                .iter()
                .map(|p| format!("{} x {} ({})", p.processes, p.name, p.command.display()))
                .collect();
            println!(
                "{}: ok ({} listeners; workers: {})",
                path.display(),
                config.listeners.len(),
                programs.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("baton: {err}");
            ExitCode::from(EX_USAGE)
        }
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        // Messages are written to stand alone; the structured fields are for the JSON format.
        LogFormat::Text => builder
            .with_target(false)
            .fmt_fields(tracing_subscriber::fmt::format::debug_fn(
                |w, field, value| {
                    if field.name() == "message" {
                        write!(w, "{value:?}")
                    } else {
                        Ok(())
                    }
                },
            ))
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}
