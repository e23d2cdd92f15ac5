//! What each subcommand does. Each returns the process exit status.

#![allow(clippy::print_stdout, clippy::print_stderr)] // a CLI prints

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use baton_core::config::OwnFiles;
use baton_core::master::{Inherited, Master, ResumeError, STATE_FD_ENV};
use baton_proto::control::{ErrorKind, OutputFilter, Request, Response};

use crate::client::{self, ClientError};
use crate::exit::{EX_NOPERM, EX_PROTOCOL, EX_UNAVAILABLE, EX_USAGE};
use crate::{LogFormat, Target, render, signals};

/// Writes to stdout. A reader that went away (`baton status --json | head`) ends the command
/// quietly with status 0, as it would a shell tool, instead of a panic on the broken pipe.
macro_rules! out {
    ($($arg:tt)*) => {
        write_stdout(format_args!($($arg)*))
    };
}

/// [`out!`] with a newline.
macro_rules! outln {
    ($($arg:tt)*) => {
        write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

fn write_stdout(text: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => {
            #[allow(clippy::exit)] // nobody reads any more: the command has nothing left to do
            std::process::exit(0)
        }
        Err(err) => {
            eprintln!("baton: writing to stdout: {err}");
        }
    }
}

pub(crate) fn run(
    path: &Path,
    format: LogFormat,
    log_file: Option<&Path>,
    pid_file: Option<&Path>,
) -> u8 {
    let inherited = inherited_state();
    // The configuration first, for the master's own files (`supervisor.log_file`, `pid_file`);
    // not after a self-upgrade, where the command line carries them (see below).
    let config = inherited.is_none().then(|| baton_core::config::load(path));
    let configured = match &config {
        Some(Ok(config)) => config.supervisor.own_files(),
        _ => OwnFiles::default(),
    };
    let files = OwnFiles {
        log_file: log_file.map(Path::to_path_buf).or(configured.log_file),
        pid_file: pid_file.map(Path::to_path_buf).or(configured.pid_file),
    };
    if let Some(log_file) = &files.log_file {
        if let Err(err) = crate::logfile::use_file(log_file) {
            eprintln!("baton: log file {}: {err}", log_file.display());
            return EX_USAGE;
        }
    }
    crate::logging::init(format);
    // The test suite's fault points (issue 20); a build without them refuses `FAILPOINTS`.
    match baton_core::faults::arm(std::env::var("FAILPOINTS").ok().as_deref()) {
        Ok(armed) if armed.is_empty() => {}
        Ok(armed) => {
            let names: Vec<_> = armed.iter().map(|p| p.name()).collect();
            tracing::warn!(event = baton_proto::event::FAULTS_ARMED, points = %names.join(","),
                "fault points armed for a test: {}", names.join(", "));
        }
        Err(err) => {
            tracing::error!(event = baton_proto::event::FAULTS_REFUSED, "{err}");
            return EX_USAGE;
        }
    }
    // One descriptor per listener, duplicated for each handoff; workers inherit the limit.
    match baton_sys::process::raise_fd_limit() {
        Ok(limit) => tracing::debug!("open file limit: {limit}"),
        Err(err) => tracing::warn!("cannot raise the open file limit: {err}"),
    }
    // Every thread started from here on inherits these signals blocked: only the signal
    // adapter's thread takes them, so that they can be held across a self-upgrade.
    if let Err(err) = signals::block_in_this_thread() {
        tracing::error!("cannot block signals: {err}");
        return 1;
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let gate = match signals::forward(tx) {
        Ok(gate) => gate,
        Err(err) => {
            tracing::error!("registering signal handlers: {err}");
            return 1;
        }
    };
    let mut options = crate::systemd::options();
    options.signals = Some(Box::new(gate));
    // `baton upgrade` execs the new program with these arguments: files the configuration
    // named go on its command line, so it keeps them (it does not read the configuration).
    for (flag, (given, file)) in [
        ("--log-file", (log_file, &files.log_file)),
        ("--pid-file", (pid_file, &files.pid_file)),
    ] {
        if let (None, Some(file)) = (given, file) {
            options
                .argv
                .extend([flag.into(), file.clone().into_os_string()]);
        }
    }
    options.files = files.clone();
    options.guard = options.binary.clone().map(|program| {
        let format = match format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        (
            program,
            vec!["guard".into(), "--log-format".into(), format.into()],
        )
    });
    // The runtime exists before the master is made: whatever the master adopts or binds may
    // register with it (a resumed master's notify sockets once panicked for want of one).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(
                event = baton_proto::event::START_FAILED,
                "cannot build the event loop: {err}"
            );
            return 1;
        }
    };
    let entered = runtime.enter();
    let master = match inherited {
        // A self-upgrade: this program takes over from the one that exec'd it.
        Some(inherited) => {
            options.inherited.clear();
            match inherited.and_then(|state| Master::resume(state, options)) {
                Ok(master) => master,
                Err(err) => {
                    // Nothing to go back to: the old program is gone. This process ends, its
                    // guard ends the workers, and the listening sockets close with it, unless
                    // a service manager holds them in its fd store (systemd restarts the unit
                    // on them). The preflight ran this same resume before the exec
                    // (`Master::rehearse`), so only what changed in between can fail here.
                    tracing::error!(
                        event = baton_proto::event::UPGRADE_RESUME_FAILED,
                        "cannot take over after the upgrade: {err}; exiting (the workers end with this master; its listeners stay open only in a service manager's fd store)"
                    );
                    return 1;
                }
            }
        }
        None => {
            let config = match config.unwrap_or_else(|| baton_core::config::load(path)) {
                Ok(config) => config,
                Err(err) => {
                    tracing::error!(
                        event = baton_proto::event::CONFIG_INVALID,
                        "invalid configuration: {err}"
                    );
                    return EX_USAGE;
                }
            };
            match Master::new(config, options) {
                Ok(master) => master,
                Err(err) => {
                    tracing::error!(
                        event = baton_proto::event::START_FAILED,
                        "cannot start: {err}"
                    );
                    return EX_USAGE;
                }
            }
        }
    };
    // Removed when it goes out of scope, after the master has stopped.
    let _pid_file = match files
        .pid_file
        .as_deref()
        .map(crate::logfile::PidFile::write)
        .transpose()
    {
        Ok(file) => file,
        Err(err) => {
            tracing::error!(
                event = baton_proto::event::START_FAILED,
                "cannot write the pid file: {err}"
            );
            return EX_USAGE;
        }
    };
    drop(entered);
    serve(&runtime, master, rx).clamp(0, 255) as u8
}

/// The state left by a master that exec'd this program (`baton upgrade`), if any.
fn inherited_state() -> Option<Result<Inherited, ResumeError>> {
    let value = std::env::var(STATE_FD_ENV).ok()?;
    Some(Inherited::take(&value))
}

/// `baton guard`: ends the workers of a master that died without stopping them.
pub(crate) fn guard(master: u32, started: u64, registry: &Path, format: LogFormat) -> u8 {
    crate::logging::init(format);
    let registry = baton_core::orphans::Registry::at(registry);
    match baton_core::orphans::guard(master, started, &registry) {
        Ok(_) => 0,
        Err(err) => {
            tracing::error!("guard of master pid {master}: {err}");
            1
        }
    }
}

/// `baton upgrade-check`: can this program take over the state it is given?
pub(crate) fn upgrade_check() -> u8 {
    // A test's fault points reach the rehearsal (`upgrade.resume`); a build without them runs
    // the check without (it only ever answers for this program).
    let _ = baton_core::faults::arm(std::env::var("FAILPOINTS").ok().as_deref());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let rehearsed = |inherited: Inherited| {
        let answer = inherited.check_answer();
        let runtime = runtime.map_err(|err| ResumeError::Runtime(err.to_string()))?;
        let _entered = runtime.enter();
        Master::rehearse(inherited)?;
        // The runtime holds what the rehearsal registered, forgotten: not dropped either.
        std::mem::forget(runtime);
        Ok::<_, ResumeError>(answer)
    };
    match inherited_state().map(|i| i.and_then(rehearsed)) {
        Some(Ok(answer)) => {
            outln!("{answer}");
            0
        }
        Some(Err(err)) => {
            eprintln!(
                "baton {}: {}",
                baton_core::version(),
                render::safe(&err.to_string())
            );
            1
        }
        None => {
            eprintln!(
                "upgrade-check is run by a master during `baton upgrade`, with its state in ${}",
                STATE_FD_ENV
            );
            EX_USAGE
        }
    }
}

pub(crate) fn upgrade(target: &Target, binary: Option<&Path>, json: bool) -> u8 {
    let binary = match binary {
        Some(b) if !b.is_absolute() => {
            eprintln!(
                "baton upgrade: --binary must be an absolute path: {}",
                b.display()
            );
            return EX_USAGE;
        }
        b => b.map(|b| b.display().to_string()),
    };
    match call(
        target,
        Request::Upgrade { binary },
        Some(Duration::from_secs(60)),
    ) {
        Ok(Response::Upgraded(v)) => {
            if json {
                print_json(&v);
            } else if v.ok {
                outln!(
                    "master upgraded in place: {} -> {} (pid {}, {} ms, {})",
                    v.from_version,
                    v.version,
                    v.pid,
                    v.duration_ms,
                    render::safe(&v.binary)
                );
            } else {
                eprintln!(
                    "master upgrade to {} failed: {}; baton {} (pid {}) goes on serving",
                    render::safe(&v.binary),
                    render::safe(v.reason.as_deref().unwrap_or("unknown reason")),
                    v.version,
                    v.pid
                );
            }
            if v.ok { 0 } else { 1 }
        }
        Ok(other) => unexpected(&other),
        Err(code) => code,
    }
}

fn serve(
    runtime: &tokio::runtime::Runtime,
    master: baton_core::master::Master,
    rx: tokio::sync::mpsc::UnboundedReceiver<baton_core::master::Input>,
) -> i32 {
    // Orphans of workers (a server that forks and announces MAINPID=) are reparented to the
    // master, which reaps them, instead of to init.
    if let Err(err) = baton_core::become_subreaper() {
        tracing::warn!("cannot become a child subreaper: {err}");
    }
    runtime.block_on(master.run(rx))
}

pub(crate) fn check(path: &Path) -> u8 {
    match baton_core::config::check_file(path) {
        Ok(config) => {
            let programs: Vec<String> = config
                .programs
                .iter()
                .map(|p| format!("{} x {} ({})", p.processes, p.name, p.command.display()))
                .collect();
            outln!(
                "{}",
                render::safe(&format!(
                    "{}: ok ({} listeners; workers: {})",
                    path.display(),
                    config.listeners.len(),
                    programs.join(", ")
                ))
            );
            // A master running with this file's socket: what a reload would not apply.
            let socket = &config.supervisor.control.socket;
            if let Some(warning) = baton_core::control::directory_warning(socket) {
                eprintln!("baton: warning: {}", render::safe(&warning));
            }
            let brief = Request::Status { brief: true };
            let asked = client::call(socket, &brief, Some(Duration::from_secs(2)));
            if let Ok(Response::Status(status)) = asked {
                let file = baton_core::config::start_only_settings(
                    &config.supervisor.control,
                    &config.supervisor.runtime_dir,
                    &config.supervisor.own_files(),
                );
                let changes =
                    baton_core::config::start_only_changes(&status.master.start_settings, &file);
                for change in changes {
                    eprintln!("baton: warning: {}", render::safe(&change));
                }
            }
            0
        }
        Err(problems) => {
            for problem in &problems {
                eprintln!("baton: {}", render::safe(&problem.to_string()));
            }
            eprintln!(
                "baton: {}: {} problem(s)",
                render::safe(&path.display().to_string()),
                problems.len()
            );
            EX_USAGE
        }
    }
}

/// The control socket to talk to: `-s`, the one `-c` configures, `$BATON_SOCKET`, or the default.
/// With `-c`, a file with problems still gives its socket for `lenient` requests (those that
/// read, and `stop`): the running master answers them whatever the file now says.
pub(crate) fn socket(target: &Target, lenient: bool) -> Result<PathBuf, u8> {
    if let Some(socket) = &target.socket {
        return Ok(socket.clone());
    }
    if let Some(path) = &target.config {
        return match baton_core::config::load(path) {
            Ok(config) => Ok(config.supervisor.control.socket),
            Err(err) if lenient => match baton_core::config::control_socket(path) {
                Ok(socket) => {
                    eprintln!("baton: warning: {}", render::safe(&err.to_string()));
                    eprintln!(
                        "baton: asking the master at {} (the file's control socket) anyway",
                        socket.display()
                    );
                    Ok(socket)
                }
                Err(_) => {
                    eprintln!("baton: {}", render::safe(&err.to_string()));
                    Err(EX_USAGE)
                }
            },
            Err(err) => {
                eprintln!("baton: {}", render::safe(&err.to_string()));
                Err(EX_USAGE)
            }
        };
    }
    Ok(std::env::var_os("BATON_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(baton_core::config::DEFAULT_CONTROL_SOCKET)))
}

/// Sends one request; on failure prints why and returns the exit status.
fn call(target: &Target, request: Request, timeout: Option<Duration>) -> Result<Response, u8> {
    let lenient = !request.mutates() || matches!(request, Request::Stop { .. });
    // A request that reads asks the master at the file's socket while the file is checked
    // beside it (a file of 10 000 listeners takes longer to check than the master to answer);
    // the file's problems are told before the answer.
    let (path, check) = match (&target.socket, &target.config) {
        (None, Some(file)) if lenient => match baton_core::config::control_socket(file) {
            Ok(path) => {
                let file = file.clone();
                let check = std::thread::spawn(move || baton_core::config::load(&file).err());
                (path, Some(check))
            }
            Err(_) => (socket(target, lenient)?, None),
        },
        _ => (socket(target, lenient)?, None),
    };
    let answer = client::call(&path, &request, timeout);
    if let Some(err) = check.and_then(|c| c.join().ok().flatten()) {
        eprintln!("baton: warning: {}", render::safe(&err.to_string()));
        eprintln!(
            "baton: asking the master at {} (the file's control socket) anyway",
            path.display()
        );
    }
    match answer {
        Ok(Response::Error { kind, message }) => Err(refused(kind, &message)),
        Ok(response) => Ok(response),
        Err(err @ ClientError::Io(..)) if matches!(request, Request::Stop { .. }) => {
            // The master may exit before the answer is read: that is what was asked for.
            eprintln!(
                "baton: {} (the master is stopping)",
                render::safe(&err.to_string())
            );
            Ok(Response::Stopping { fast: false })
        }
        Err(err) => {
            eprintln!("baton: {}", render::safe(&err.to_string()));
            match &request {
                Request::Reload { wait: true } | Request::Verdict { .. } => eprintln!(
                    "baton: no verdict came: if the master runs (baton status), baton history has it"
                ),
                Request::Upgrade { .. } => eprintln!(
                    "baton: no verdict came: baton status shows which program runs the master"
                ),
                _ => {}
            }
            Err(err.exit_code())
        }
    }
}

/// The master refused a request: says why, returns the exit status.
fn refused(kind: ErrorKind, message: &str) -> u8 {
    eprintln!("baton: the master refused: {}", render::safe(message));
    match kind {
        ErrorKind::PermissionDenied => EX_NOPERM,
        ErrorKind::Version => EX_PROTOCOL,
        ErrorKind::BadRequest => EX_USAGE,
        ErrorKind::Unavailable => EX_UNAVAILABLE,
        ErrorKind::NotFound => EX_USAGE,
        ErrorKind::Unknown => EX_PROTOCOL,
    }
}

/// `baton logs`: the workers' last lines the master keeps; with `follow`, new ones as they
/// come, until interrupted or the master goes.
pub(crate) fn logs(target: &Target, filter: OutputFilter, follow: bool, json: bool) -> u8 {
    let path = match socket(target, true) {
        Ok(path) => path,
        Err(code) => return code,
    };
    // A program the master does not run: say which it runs (its kept lines of a program a
    // reload removed are still shown).
    let unknown = filter
        .program
        .as_deref()
        .and_then(|name| programs_without(&path, name));
    if let (Some(programs), true) = (&unknown, follow) {
        return no_such_program(filter.program.as_deref().unwrap_or_default(), programs);
    }
    let mut printed = 0usize;
    let request = Request::Logs { filter, follow };
    let timeout = (!follow).then(|| Duration::from_secs(10));
    let mut conversation = match client::Conversation::open(&path, &request, timeout) {
        Ok(conversation) => conversation,
        Err(err) => {
            eprintln!("baton: {}", render::safe(&err.to_string()));
            return err.exit_code();
        }
    };
    loop {
        match conversation.next_or_end() {
            Ok(Some(Response::Logs {
                lines,
                skipped,
                done,
            })) => {
                if skipped > 0 {
                    eprintln!("baton: {skipped} lines skipped: this reader fell behind");
                }
                printed += lines.len();
                for line in &lines {
                    if json {
                        outln!("{}", serde_json::to_string(line).unwrap_or_default());
                    } else {
                        out!("{}", render::output_line(line));
                    }
                }
                if done {
                    return match (&unknown, &request) {
                        (Some(programs), Request::Logs { filter, .. }) if printed == 0 => {
                            no_such_program(filter.program.as_deref().unwrap_or_default(), programs)
                        }
                        _ => 0,
                    };
                }
            }
            Ok(Some(Response::Error { kind, message })) => return refused(kind, &message),
            Ok(Some(other)) => return unexpected(&other),
            Ok(None) if follow => {
                eprintln!("baton: the master closed the connection (it stopped)");
                return 0;
            }
            Ok(None) => {
                eprintln!("baton: the master closed the connection before the last lines");
                return EX_PROTOCOL;
            }
            Err(err) => {
                eprintln!("baton: {}", render::safe(&err.to_string()));
                return err.exit_code();
            }
        }
    }
}

/// The programs the master at `path` runs, if `name` is not one of them.
fn programs_without(path: &Path, name: &str) -> Option<Vec<String>> {
    let Ok(Response::Status(status)) = client::call(
        path,
        &Request::Status { brief: true },
        Some(Duration::from_secs(10)),
    ) else {
        return None;
    };
    let mut programs: Vec<String> = status
        .generations
        .iter()
        .flat_map(|g| g.workers.iter().map(|w| w.program.clone()))
        .collect();
    programs.sort();
    programs.dedup();
    (!programs.iter().any(|p| p == name)).then_some(programs)
}

fn no_such_program(name: &str, programs: &[String]) -> u8 {
    eprintln!(
        "baton: no program `{}`: the master runs {}",
        render::safe(name),
        match programs {
            [] => "no worker now".to_string(),
            _ => render::safe(&programs.join(", ")),
        }
    );
    EX_USAGE
}

pub(crate) fn unexpected(response: &Response) -> u8 {
    eprintln!(
        "baton: unexpected answer from the master: {}",
        render::safe(&format!("{response:?}"))
    );
    EX_PROTOCOL
}

/// Writes `text` to stdout (exits 0 once nobody reads it).
pub(crate) fn print(text: &str) {
    out!("{text}");
}

/// `baton status --watch`, `baton top`: the live view ([`crate::watch`]).
pub(crate) fn watch(target: &Target, interval: Duration) -> u8 {
    match socket(target, true) {
        Ok(path) => crate::watch::watch(path, interval),
        Err(code) => code,
    }
}

fn print_json<T: serde::Serialize>(value: &T) {
    outln!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// `baton status`'s exit status for scripts and monitoring (Nagios-style): 0 a generation
/// serves and none is degraded, 1 a serving generation is degraded (a program crash-loops),
/// 2 no generation serves (starting, stopping, or every reload failed since the start).
fn status_code(s: &baton_proto::control::StatusSnapshot) -> u8 {
    use baton_proto::control::GenerationState;
    let serving: Vec<_> = s
        .generations
        .iter()
        .filter(|g| g.state == GenerationState::Serving)
        .collect();
    if serving.is_empty() {
        2
    } else if serving.iter().any(|g| !g.degraded.is_empty()) {
        1
    } else {
        0
    }
}

pub(crate) fn status(target: &Target, json: bool) -> u8 {
    // The text does not show the listeners' socket options: not read for it.
    let brief = !json;
    match call(
        target,
        Request::Status { brief },
        Some(Duration::from_secs(10)),
    ) {
        Ok(Response::Status(s)) if json => {
            print_json(&s);
            status_code(&s)
        }
        Ok(Response::Status(s)) => {
            out!("{}", render::status(&s));
            status_code(&s)
        }
        Ok(other) => unexpected(&other),
        Err(code) => code,
    }
}

pub(crate) fn drain_status(
    target: &Target,
    json: bool,
    wait: bool,
    timeout: Option<Duration>,
) -> u8 {
    let started = Instant::now();
    let terminal = std::io::stdout().is_terminal();
    let mut last_line = String::new();
    loop {
        let asked = Request::Status { brief: true };
        let snapshot = match call(target, asked, Some(Duration::from_secs(10))) {
            Ok(Response::Status(s)) => s,
            Ok(other) => return unexpected(&other),
            Err(code) => return code,
        };
        let draining = snapshot
            .generations
            .iter()
            .any(|g| g.state == baton_proto::control::GenerationState::Draining);
        if !wait {
            if json {
                let draining: Vec<_> = snapshot
                    .generations
                    .iter()
                    .filter(|g| g.state == baton_proto::control::GenerationState::Draining)
                    .collect();
                print_json(&draining);
            } else {
                out!("{}", render::drain_status(&snapshot));
            }
            return 0;
        }
        if !draining {
            if terminal {
                outln!("");
            }
            outln!("no generation is draining");
            return 0;
        }
        let line = render::drain_progress(&snapshot);
        if terminal {
            out!("\r\x1b[K{line}");
            let _ = std::io::stdout().flush();
        } else if line != last_line {
            outln!("{line}");
        }
        last_line = line;
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            eprintln!(
                "\nbaton: still draining after {} s",
                started.elapsed().as_secs()
            );
            return 1;
        }
        // The client polls (a few cheap status requests a second); the master never does.
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub(crate) fn reload(target: &Target, no_wait: bool, request: Option<u64>, json: bool) -> u8 {
    let ask = match request {
        Some(request) => Request::Verdict { request },
        None => Request::Reload { wait: !no_wait },
    };
    match call(target, ask, None) {
        Ok(Response::Accepted { request }) => {
            if json {
                print_json(&serde_json::json!({ "request": request }));
            } else {
                outln!(
                    "reload request #{request} accepted (wait for it: baton reload --request {request})"
                );
            }
            0
        }
        Ok(Response::Verdict(v)) => {
            if json {
                print_json(&v);
            } else if v.ok {
                out!("{}", render::verdict(&v));
            } else {
                eprint!("{}", render::verdict(&v));
            }
            if v.ok { 0 } else { 1 }
        }
        Ok(other) => unexpected(&other),
        Err(code) => code,
    }
}

pub(crate) fn stop(target: &Target, fast: bool) -> u8 {
    match call(
        target,
        Request::Stop { fast },
        Some(Duration::from_secs(10)),
    ) {
        Ok(Response::Stopping { .. }) => {
            outln!(
                "the master is stopping ({})",
                if fast {
                    "fast"
                } else {
                    "draining every generation"
                }
            );
            0
        }
        Ok(other) => unexpected(&other),
        Err(code) => code,
    }
}

pub(crate) fn metrics(target: &Target) -> u8 {
    match call(target, Request::Metrics, Some(Duration::from_secs(10))) {
        Ok(Response::Metrics { text }) => {
            out!("{text}");
            0
        }
        Ok(other) => unexpected(&other),
        Err(code) => code,
    }
}

pub(crate) fn history(target: &Target, json: bool) -> u8 {
    match call(target, Request::History, Some(Duration::from_secs(10))) {
        Ok(Response::History { reloads }) if json => {
            print_json(&reloads);
            0
        }
        Ok(Response::History { reloads }) => {
            out!("{}", render::history(&reloads));
            0
        }
        Ok(other) => unexpected(&other),
        Err(code) => code,
    }
}
