//! Test harness for black-box tests of baton: the real `baton` binary, real workers, real load
//! on loopback.
//!
//! - [`binaries`] builds `baton`, `hello-worker` and `it-worker` once per test process.
//! - [`Master`] runs `baton run` with JSON logs in its own temp dir and lets tests wait for log
//!   events (with a deadline, never a bare sleep).
//! - [`load`] is a bounded HTTP/1.1 load generator (fresh connection per request, or keep-alive).
//! - [`procfs`] reads `/proc` to count listening sockets, worker fds and live children.

#![allow(clippy::print_stderr)] // tests report what they measure

mod builder;
pub use baton_proto::event;
pub use builder::MasterBuilder;
pub mod datagrams;
pub mod h3client;
pub mod load;
pub mod procfs;
pub mod recipes;
pub mod storm;
pub mod syscalls;
pub mod systemd;
pub mod worker_mode;
pub mod wsclient;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Paths of the binaries under test.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub baton: PathBuf,
    pub hello_worker: PathBuf,
    pub it_worker: PathBuf,
    pub loadgen: PathBuf,
    pub h3_worker: PathBuf,
    pub ws_worker: PathBuf,
}

/// Builds the binaries once (the escargot approach: ask cargo, do not guess `target/debug`).
pub fn binaries() -> &'static Binaries {
    static BINS: OnceLock<Binaries> = OnceLock::new();
    BINS.get_or_init(|| {
        // Test binaries live in <target>/<profile>/deps/, the benchmark in <target>/<profile>/.
        let exe = std::env::current_exe().expect("current_exe");
        let mut profile_dir = exe.parent().expect("exe dir").to_owned();
        if profile_dir.file_name().is_some_and(|n| n == "deps") {
            profile_dir = profile_dir.parent().expect("target profile dir").to_owned();
        }
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "baton",
            "-p",
            "baton-example-worker",
            "-p",
            "baton-example-h3",
            "-p",
            "baton-example-ws",
            "-p",
            "baton-integration",
            "--bins",
        ]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        cmd.env(
            "CARGO_TARGET_DIR",
            profile_dir.parent().expect("target dir"),
        );
        let status = cmd.status().expect("running cargo build");
        assert!(
            status.success(),
            "cargo build of the binaries under test failed"
        );
        Binaries {
            baton: profile_dir.join("baton"),
            hello_worker: profile_dir.join("hello-worker"),
            it_worker: profile_dir.join("it-worker"),
            loadgen: profile_dir.join("loadgen"),
            h3_worker: profile_dir.join("h3-worker"),
            ws_worker: profile_dir.join("ws-worker"),
        }
    })
}

/// Opens a keep-alive connection and completes one request on it; returns it open.
pub fn held_connection(port: u16) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut buf = [0u8; 1024];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("generation") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before the response");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    s
}

/// A second build of `baton`, different from [`binaries`]'s: built with `BATON_BUILD_TAG=next`,
/// so it reports version `<version>+next` (the target of `baton upgrade` in tests). It lives in
/// its own target directory, built once per test run.
pub fn next_baton() -> &'static PathBuf {
    static NEXT: OnceLock<PathBuf> = OnceLock::new();
    NEXT.get_or_init(|| {
        let baton = &binaries().baton;
        let profile_dir = baton.parent().expect("profile dir");
        let profile = profile_dir.file_name().expect("profile name").to_owned();
        let target = profile_dir
            .parent()
            .expect("target dir")
            .join("upgrade-next");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "-p", "baton", "--bin", "baton"]);
        if profile == "release" {
            cmd.arg("--release");
        }
        cmd.env("CARGO_TARGET_DIR", &target)
            .env("BATON_BUILD_TAG", "next");
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "cargo build of the next baton failed");
        target.join(profile).join("baton")
    })
}

/// How long to wait for anything: generous, since CI machines are loaded. Scaled by
/// `BATON_TEST_PATIENCE` (a factor).
pub fn patience(base: Duration) -> Duration {
    let factor: f64 = std::env::var("BATON_TEST_PATIENCE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    base.mul_f64(factor.max(0.1))
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + patience(timeout);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A configuration for a test master.
#[derive(Debug, Clone)]
pub struct TestConfig {
    pub listeners: Vec<(String, String)>,
    pub command: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub processes: usize,
    pub ready_timeout: &'static str,
    pub drain_timeout: &'static str,
    pub max_draining: usize,
    /// More lines under `worker:`, e.g. `protocol: systemd`.
    pub worker_extra: Vec<String>,
    /// More lines under `supervisor:`, e.g. `canary_window: 3s`.
    pub supervisor_extra: Vec<String>,
}

impl TestConfig {
    /// `processes` hello-workers on one TCP listener `http` at a free port of 127.0.0.1, and
    /// the port.
    pub fn hello_on_a_free_port(processes: usize) -> (u16, Self) {
        let port = free_port();
        (port, Self::hello(&format!("127.0.0.1:{port}"), processes))
    }

    /// `processes` hello-workers on one TCP listener `http` at `address`.
    pub fn hello(address: &str, processes: usize) -> Self {
        TestConfig {
            listeners: vec![("http".into(), address.into())],
            command: binaries().hello_worker.clone(),
            args: Vec::new(),
            env: Vec::new(),
            processes,
            ready_timeout: "20s",
            drain_timeout: "20s",
            max_draining: 8,
            worker_extra: Vec::new(),
            supervisor_extra: Vec::new(),
        }
    }

    /// The test worker (`it-worker`) in `mode` in place of the hello worker.
    pub fn it_worker(&mut self, mode: worker_mode::WorkerMode) -> &mut Self {
        self.command = binaries().it_worker.clone();
        self.env = vec![mode.env()];
        self
    }

    /// Hello workers that keep idle kept-alive connections open through a drain (only the
    /// client or the deadline `drain_timeout` ends them).
    pub fn holding(&mut self, drain_timeout: &'static str) -> &mut Self {
        self.args = vec!["--idle-grace-ms".into(), "600000".into()];
        self.drain_timeout = drain_timeout;
        self
    }

    /// This configuration with the test worker in `mode` and `ready_timeout`, as YAML.
    pub fn it_worker_yaml(
        &self,
        mode: worker_mode::WorkerMode,
        ready_timeout: &'static str,
    ) -> String {
        let mut c = self.clone();
        c.it_worker(mode).ready_timeout = ready_timeout;
        c.yaml()
    }

    pub fn yaml(&self) -> String {
        let mut y = String::from("listeners:\n");
        for (name, address) in &self.listeners {
            y += &format!("  - name: {name}\n    address: \"{address}\"\n");
        }
        if self.listeners.is_empty() {
            y = "listeners: []\n".into();
        }
        y += &format!("worker:\n  command: {}\n", self.command.display());
        y += &format!("  args: {}\n", serde_json::to_string(&self.args).unwrap());
        y += "  env:\n";
        for (k, v) in &self.env {
            y += &format!("    {k}: \"{v}\"\n");
        }
        if self.env.is_empty() {
            y = y.replace("  env:\n", "  env: {}\n");
        }
        y += &format!(
            "  processes: {}\n  ready_timeout: {}\n  drain_timeout: {}\n",
            self.processes, self.ready_timeout, self.drain_timeout
        );
        for line in &self.worker_extra {
            y += &format!("  {line}\n");
        }
        y += &format!(
            "supervisor:\n  max_draining: {}\n  runtime_dir: \"{{dir}}/run\"\n  control:\n    socket: \"{{dir}}/baton.sock\"\n",
            self.max_draining
        );
        for line in &self.supervisor_extra {
            y += &format!("  {line}\n");
        }
        y
    }
}

/// `web` hello-workers and one `stubborn` it-worker (it ignores its drain request: only its drain
/// deadline, 1 s, ends it, so every reload kills one worker) on listener `http` at `port` (and
/// `extra` at `extra`), the web workers with these timeouts; `supervisor` adds lines under
/// `supervisor:` (indented).
pub fn web_and_stubborn_yaml(
    port: u16,
    extra: Option<u16>,
    web: usize,
    (ready_timeout, drain_timeout): (&str, &str),
    supervisor: &str,
) -> String {
    let extra = extra.map_or_else(String::new, |p| {
        format!("  - name: extra\n    address: \"127.0.0.1:{p}\"\n")
    });
    format!(
        r#"listeners:
  - name: http
    address: "127.0.0.1:{port}"
{extra}workers:
  - name: web
    command: {hello}
    processes: {web}
    ready_timeout: {ready_timeout}
    drain_timeout: {drain_timeout}
  - name: stubborn
    command: {it}
    env: {{IT_MODE: stubborn}}
    processes: 1
    ready_timeout: {ready_timeout}
    drain_timeout: 1s
supervisor:
{supervisor}  runtime_dir: "{{dir}}/run"
  control:
    socket: "{{dir}}/baton.sock"
"#,
        hello = binaries().hello_worker.display(),
        it = binaries().it_worker.display(),
    )
}

/// Runs `baton <args> -s <socket>`, optionally as another user (`uid`, same gid), and returns
/// its exit code, stdout and stderr.
pub fn ctl(socket: &std::path::Path, args: &[&str], uid: Option<u32>) -> (i32, String, String) {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(&binaries().baton);
    cmd.args(args).arg("-s").arg(socket);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let out = cmd.output().expect("running baton");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `program` the systemd way by hand (no baton): `listener` at fd 3, LISTEN_FDS=1,
/// LISTEN_FDNAMES=http, and LISTEN_PID either the child's own pid or `wrong_pid`.
pub fn start_socket_activated(
    program: &std::path::Path,
    listener: &std::net::TcpListener,
    wrong_pid: Option<u32>,
) -> std::process::Child {
    let fd = listener.try_clone().unwrap();
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null()).stderr(Stdio::piped());
    baton_sys::process::place_fds(&mut cmd, vec![(fd.into(), 3)]).unwrap();
    let mut env: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os()
        .filter(|(k, _)| {
            !k.to_string_lossy().starts_with("LISTEN_")
                && k != "NOTIFY_SOCKET"
                && k != "BATON_CHANNEL_FD"
        })
        .collect();
    env.push(("LISTEN_FDS".into(), "1".into()));
    env.push(("LISTEN_FDNAMES".into(), "http".into()));
    match wrong_pid {
        Some(pid) => {
            env.push(("LISTEN_PID".into(), pid.to_string().into()));
            cmd.env_clear().envs(env);
        }
        None => baton_sys::process::exec_with_own_pid(&mut cmd, program, &[], &env, "LISTEN_PID")
            .unwrap(),
    }
    cmd.spawn().unwrap()
}

/// `baton run --log-format FORMAT ARGS... -c CONFIG`, stdin and stdout on /dev/null, stderr piped
/// (read it, or a full pipe stalls the master): for tests that need the process itself rather
/// than a [`Master`].
pub fn baton_run(config: &std::path::Path, format: &str, args: &[&std::ffi::OsStr]) -> Child {
    Command::new(&binaries().baton)
        .args(["run", "--log-format", format])
        .args(args)
        .arg("-c")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning baton run")
}

/// One HTTP/1.1 request on a new connection: `(status, head, body)`.
pub fn http(port: u16, method: &str, path: &str) -> (u16, String, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    (status, head.to_string(), body.to_string())
}

/// Writes `text` to `dir/name`, executable (a script a test runs as a worker or a program).
pub fn executable(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A directory that outlives the run (a benchmark's files, kept for a look afterwards).
pub fn kept_dir(prefix: &str) -> PathBuf {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap()
        .keep()
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

/// Asserts `verdict` is a failed reload whose reason says `text`.
#[track_caller]
pub fn assert_reload_failed_saying(verdict: &Value, text: &str) {
    assert_eq!(verdict["event"], event::RELOAD_FAILED, "{verdict}");
    let reason = verdict["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(text), "{text:?} not in {verdict}");
}

/// A free loopback port (bound and released; the master binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Debug, Default)]
struct Log {
    /// JSON events of the master (workers' captured lines are `output` events, the first
    /// [`KEPT_OUTPUT`] of them kept); other lines (output: inherit) as `{"raw": line}`.
    lines: Mutex<Lines>,
    /// Every `output` event seen, kept or not (stdout lines past the first [`KEPT_OUTPUT`] are
    /// counted only).
    output_seen: std::sync::atomic::AtomicU64,
    grew: Condvar,
}

/// The lines read so far: all of them (for dumps), and by event name, so that a test waiting
/// for one event scans only those (the lock is short: the reader thread must never wait long
/// for it, or the master, whose stderr it reads, would wait on a full pipe).
#[derive(Debug, Default)]
struct Lines {
    all: Vec<(Instant, Arc<Value>)>,
    by_event: std::collections::HashMap<String, Vec<(Instant, Arc<Value>)>>,
}

impl Lines {
    fn push(&mut self, at: Instant, v: Value) {
        let v = Arc::new(v);
        let event = v["event"].as_str().unwrap_or_default().to_string();
        self.by_event
            .entry(event)
            .or_default()
            .push((at, v.clone()));
        self.all.push((at, v));
    }

    fn named(&self, name: &str) -> &[(Instant, Arc<Value>)] {
        self.by_event.get(name).map_or(&[], Vec::as_slice)
    }
}

/// `name`, if it is one of the master's log event names ([`event::ALL`]), or `""` (the lines
/// that carry no event name: warnings and the like); a name that is not fails the test at once
/// (misspelt, it would wait out its deadline for an event that never comes).
fn known(name: &str) -> &str {
    assert!(
        name.is_empty() || event::ALL.contains(&name),
        "no log event is named {name:?} (see baton_proto::event)"
    );
    name
}

/// Workers' output lines a test's log keeps (a flood test reads millions, and counts them).
const KEPT_OUTPUT: u64 = 20_000;

/// One line of the master's stderr as events. Workers share that stderr and a worker may write a
/// line in pieces (CPython's `print` writes the text and the newline in two `write`s), so a
/// master's JSON line, always written whole, can land after a worker's unfinished text: the
/// worker's part becomes `{"raw": ...}` and the master's object is still read.
pub fn parse_log_line(line: &str) -> Vec<Value> {
    if let Ok(value) = serde_json::from_str::<Value>(line) {
        return vec![value];
    }
    let glued = line.match_indices("{\"").find_map(|(at, _)| {
        let value = serde_json::from_str::<Value>(&line[at..]).ok()?;
        value.get("event").is_some().then_some((at, value))
    });
    match glued {
        Some((at, value)) => vec![serde_json::json!({ "raw": &line[..at] }), value],
        None => vec![serde_json::json!({ "raw": line })],
    }
}

/// A running `baton run`.
#[derive(Debug)]
pub struct Master {
    child: Child,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    log: Arc<Log>,
    name: String,
}

impl Master {
    /// A master to declare (see [`MasterBuilder`]).
    pub fn builder<'a>(name: &str) -> MasterBuilder<'a> {
        MasterBuilder::new(name)
    }

    /// Starts a master on `config` and waits until its first generation serves.
    pub fn start(name: &str, config: &TestConfig) -> Master {
        Master::builder(name).config(config).serving()
    }

    /// Starts a master of `processes` hello workers on a free loopback port and waits until
    /// its first generation serves.
    pub fn hello(name: &str, processes: usize) -> (u16, Master) {
        let port = free_port();
        let config = TestConfig::hello(&format!("127.0.0.1:{port}"), processes);
        (port, Master::start(name, &config))
    }

    /// Starts a master without waiting for anything.
    pub fn spawn(name: &str, yaml: &str) -> Master {
        Master::builder(name).yaml(yaml).spawn()
    }

    /// Starts a master with extra environment variables (as a service manager would set them).
    pub fn spawn_with_env(name: &str, yaml: &str, env: &[(&str, &str)]) -> Master {
        env.iter()
            .fold(Master::builder(name).yaml(yaml), |b, (k, v)| b.env(k, v))
            .spawn()
    }

    /// Starts `program run ...`, `program` being a baton at another path (one a test replaces,
    /// as a package update does), and waits until it serves.
    pub fn start_program(name: &str, config: &TestConfig, program: &std::path::Path) -> Master {
        Master::builder(name)
            .config(config)
            .program(program)
            .serving()
    }

    /// Starts `wrapper... baton run ...` (e.g. `unshare --pid --fork`): [`Master::pid`] is then
    /// the wrapper's.
    pub fn spawn_wrapped(name: &str, yaml: &str, wrapper: &[&str]) -> Master {
        Master::builder(name).yaml(yaml).wrapper(wrapper).spawn()
    }

    /// A new master in this one's directory, on its configuration (this one has ended: killed,
    /// say). The directory now belongs to the new one.
    pub fn successor(&mut self, name: &str) -> Master {
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        Master::spawn_in(name, dir, &[], &[], &binaries().baton)
    }

    /// Starts a master on the configuration file `layout` makes in the test's directory (a
    /// symlink chain, say) and returns the path of, without waiting for anything.
    pub fn spawn_laid_out(name: &str, layout: impl FnOnce(&std::path::Path) -> PathBuf) -> Master {
        Master::builder(name).laid_out(layout).spawn()
    }

    fn spawn_in(
        name: &str,
        dir: tempfile::TempDir,
        env: &[(&str, &str)],
        wrapper: &[&str],
        program: &std::path::Path,
    ) -> Master {
        let config_path = dir.path().join("baton.yaml");
        Master::spawn_at(name, dir, config_path, env, wrapper, program)
    }

    pub(crate) fn spawn_at(
        name: &str,
        dir: tempfile::TempDir,
        config_path: PathBuf,
        env: &[(&str, &str)],
        wrapper: &[&str],
        program: &std::path::Path,
    ) -> Master {
        let mut command = match wrapper.split_first() {
            Some((outer, args)) => {
                let mut c = Command::new(outer);
                c.args(args).arg(program);
                c
            }
            None => Command::new(program),
        };
        let mut child = command
            .args(["run", "--log-format", "json", "-c"])
            .arg(&config_path)
            .env("BATON_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning baton");
        let log = Arc::new(Log::default());
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        let tag = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("BATON_TEST_VERBOSE").is_some() {
                    eprintln!("[{tag}] {line}");
                }
                // A worker's stdout line past the first KEPT_OUTPUT is counted, not parsed: a
                // flood test sends millions. Its stderr lines (few) are always kept.
                if line.starts_with('{')
                    && line.contains("\"event\":\"output\"")
                    && line.contains("\"stream\":\"stdout\"")
                    && sink.output_seen.load(std::sync::atomic::Ordering::Relaxed) >= KEPT_OUTPUT
                {
                    sink.output_seen
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                let parsed = parse_log_line(&line);
                let at = Instant::now();
                let mut lines = sink.lines.lock().unwrap();
                for v in parsed {
                    if v["event"] == "output" {
                        sink.output_seen
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    lines.push(at, v);
                }
                drop(lines);
                sink.grew.notify_all();
            }
        });
        Master {
            child,
            dir,
            config_path,
            log,
            name: name.into(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal).unwrap();
    }

    pub fn write_config(&self, yaml: &str) {
        // Write then rename: a reload never reads a half-written file.
        let tmp = self.dir.path().join("baton.yaml.new");
        let yaml = yaml.replace("{dir}", &self.dir.path().display().to_string());
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    /// Every logged event called `name` that matches `pred`, with the time it was read.
    pub fn events_where(&self, name: &str, pred: impl Fn(&Value) -> bool) -> Vec<(Instant, Value)> {
        let name = known(name);
        self.log
            .lines
            .lock()
            .unwrap()
            .named(name)
            .iter()
            .filter(|(_, v)| pred(v))
            .map(|(at, v)| (*at, Value::clone(v)))
            .collect()
    }

    /// Workers' captured lines (`output` events: `program`, `generation`, `worker`, `slot`,
    /// `pid`, `stream`, `message`): every stderr line, the first 20,000 stdout lines.
    pub fn output_lines(&self) -> Vec<Value> {
        self.events(event::OUTPUT)
    }

    /// How many `output` events the master logged so far, kept or not.
    pub fn output_seen(&self) -> u64 {
        self.log
            .output_seen
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The lines of stderr that are not the master's JSON events (workers' output with
    /// `output: inherit`).
    pub fn raw_lines(&self) -> Vec<String> {
        let lines = self.log.lines.lock().unwrap();
        lines
            .named("")
            .iter()
            .filter_map(|(_, v)| v["raw"].as_str().map(str::to_string))
            .collect()
    }

    pub fn events(&self, name: &str) -> Vec<Value> {
        self.events_where(name, |_| true)
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    /// Waits for the first event `name` matching `pred` (including ones already logged). `pred`
    /// runs under the log lock: it must not call back into this `Master`.
    pub fn wait_event(
        &self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> (Instant, Value) {
        let name = known(name);
        let deadline = Instant::now() + patience(timeout);
        let mut lines = self.log.lines.lock().unwrap();
        // Each event is judged once: a wake-up scans only what came since.
        let mut checked = 0;
        loop {
            let named = lines.named(name);
            if let Some((at, v)) = named[checked..].iter().find(|(_, v)| pred(v)) {
                return (*at, Value::clone(v));
            }
            checked = named.len();
            let now = Instant::now();
            if now >= deadline {
                let dump: Vec<String> = lines.all.iter().map(|(_, v)| v.to_string()).collect();
                panic!(
                    "[{}] timed out waiting for event {name}; log:\n{}",
                    self.name,
                    dump.join("\n")
                );
            }
            lines = self.log.grew.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    /// Sends SIGUSR2 and waits for the verdict of the reload that covers it.
    pub fn reload(&self) -> Value {
        let before = self.events(event::RELOAD_REQUESTED).len();
        self.signal(nix::sys::signal::Signal::SIGUSR2);
        let request = eventually(Duration::from_secs(10), "the reload request", || {
            self.events(event::RELOAD_REQUESTED)
                .get(before)
                .map(|v| v["request"].as_u64().unwrap())
        });
        self.verdict_of(request)
    }

    /// Waits for the verdict (succeeded or failed event) of the reload covering `request`.
    pub fn verdict_of(&self, request: u64) -> Value {
        let covers = |v: &Value| {
            v["covers"]
                .as_str()
                .is_some_and(|c| c.split(", ").any(|r| r == format!("#{request}")))
        };
        eventually(
            Duration::from_secs(30),
            &format!("verdict of reload request #{request}"),
            || {
                self.events_where(event::RELOAD_SUCCEEDED, covers)
                    .into_iter()
                    .chain(self.events_where(event::RELOAD_FAILED, covers))
                    .map(|(_, v)| v)
                    .next()
            },
        )
    }

    /// Live direct children of the master (its workers).
    /// The master's worker processes: its children but its guard (`baton guard`).
    pub fn children(&self) -> Vec<u32> {
        procfs::children(self.pid())
            .into_iter()
            .filter(|pid| !is_guard(*pid))
            .collect()
    }

    /// The master's guard process, if it runs.
    pub fn guard(&self) -> Option<u32> {
        procfs::children(self.pid())
            .into_iter()
            .find(|pid| is_guard(*pid))
    }

    /// Waits for the master to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + patience(timeout);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "[{}] master did not exit within {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Master {
    /// Runs `mode` load against `addr` for `run` while sending SIGUSR2 every `every`, waits for
    /// the verdict of the last request, and returns the load report and the number of signals.
    pub fn reload_under_load(
        &self,
        addr: std::net::SocketAddr,
        mode: load::Mode,
        clients: usize,
        run: Duration,
        every: Duration,
    ) -> (load::Report, u64) {
        let bounds = load::Bounds {
            clients,
            duration: run + Duration::from_secs(30),
            max_requests_per_client: 1_000_000,
        };
        let load = load::Load::start(addr, mode, bounds);
        let start = Instant::now();
        let mut sent = 0u64;
        let before = self.events(event::RELOAD_REQUESTED).len() as u64;
        while start.elapsed() < run {
            self.signal(nix::sys::signal::Signal::SIGUSR2);
            sent += 1;
            // Standard signals do not queue: a second SIGUSR2 sent while the first is still
            // pending (the master not scheduled, on a loaded machine) merges with it. Each is
            // sent once the master has taken the one before (well under a millisecond).
            eventually(
                Duration::from_secs(10),
                "the master to take the signal",
                || {
                    (self.events(event::RELOAD_REQUESTED).len() as u64 >= before + sent)
                        .then_some(())
                },
            );
            std::thread::sleep(every); // the reload cadence under test, not a wait for a condition
        }
        // Let the last reload conclude before the load stops, so it runs across all of them.
        self.verdict_of(sent);
        (load.finish(), sent)
    }

    /// The master's directory (`{dir}` in its configuration).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The master's control socket (as `TestConfig` configures it).
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("baton.sock")
    }

    /// Runs `baton <args> -s <socket>` and returns its exit code, stdout and stderr.
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        ctl(&self.socket(), args, None)
    }

    /// Starts `baton <args> -s <socket>` without waiting for it.
    pub fn ctl_spawn(&self, args: &[&str]) -> std::process::Child {
        Command::new(&binaries().baton)
            .args(args)
            .arg("-s")
            .arg(self.socket())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning baton")
    }

    /// Open descriptors of the master.
    pub fn fd_count(&self) -> usize {
        procfs::fds(self.pid()).len()
    }

    /// CPU ticks (10 ms) the master uses while `during` runs, and what `during` returned.
    pub fn cpu_during<T>(&self, during: impl FnOnce() -> T) -> (u64, T) {
        let before = procfs::cpu_ticks(self.pid());
        let result = during();
        (procfs::cpu_ticks(self.pid()) - before, result)
    }

    /// Every reload request is logged once and covered by exactly one reload (or rejected), and
    /// every reload that started has a verdict, none of them a failure. Returns the reload count.
    pub fn assert_every_request_accounted_for(&self, sent: u64) -> usize {
        let logged: Vec<u64> = self
            .events(event::RELOAD_REQUESTED)
            .iter()
            .filter_map(|v| v["request"].as_u64())
            .collect();
        assert_eq!(
            logged.len() as u64,
            sent,
            "one log line per signal; requests logged: {logged:?}; other output:\n{}",
            self.raw_lines().join("\n")
        );
        self.assert_logged_requests_accounted_for()
    }

    /// Like [`Master::assert_every_request_accounted_for`], for as many requests as the master
    /// logged (the kernel merges identical signals that are pending at once).
    pub fn assert_logged_requests_accounted_for(&self) -> usize {
        let (started, failed) = self.assert_every_request_has_one_verdict();
        assert_eq!(failed, 0, "{:?}", self.events(event::RELOAD_FAILED));
        started
    }

    /// Every reload request the master logged is covered by exactly one reload (or rejected),
    /// and every reload has exactly one verdict, succeeded or failed. Returns how many reloads
    /// ran and how many failed.
    pub fn assert_every_request_has_one_verdict(&self) -> (usize, usize) {
        use std::collections::BTreeSet;
        let requested: Vec<u64> = self
            .events(event::RELOAD_REQUESTED)
            .iter()
            .map(|v| v["request"].as_u64().unwrap())
            .collect();
        let sent = requested.len() as u64;
        assert_eq!(
            requested,
            (1..=sent).collect::<Vec<_>>(),
            "requests numbered in order"
        );
        let mut covered = BTreeSet::new();
        let mut started = BTreeSet::new();
        for v in self.events(event::RELOAD_STARTED) {
            started.insert(v["reload"].as_u64().unwrap());
            for r in v["covers"].as_str().unwrap().split(", ") {
                let r: u64 = r.trim_start_matches('#').parse().unwrap();
                assert!(covered.insert(r), "request #{r} covered twice");
            }
        }
        for v in self.events(event::RELOAD_REJECTED) {
            assert!(covered.insert(v["request"].as_u64().unwrap()));
        }
        assert_eq!(
            covered,
            (1..=sent).collect::<BTreeSet<_>>(),
            "every request covered once"
        );
        let failed = self.assert_one_verdict_per_reload(&started);
        (started.len(), failed)
    }

    /// Every reload in `started` has exactly one verdict (succeeded or failed), and no other
    /// reload has one. Returns how many failed.
    pub fn assert_one_verdict_per_reload(
        &self,
        started: &std::collections::BTreeSet<u64>,
    ) -> usize {
        let mut verdicts = std::collections::BTreeMap::<u64, usize>::new();
        let mut failed = 0;
        for (name, v) in [event::RELOAD_SUCCEEDED, event::RELOAD_FAILED]
            .into_iter()
            .flat_map(|name| self.events(name).into_iter().map(move |v| (name, v)))
        {
            *verdicts.entry(v["reload"].as_u64().unwrap()).or_default() += 1;
            failed += usize::from(name == event::RELOAD_FAILED);
        }
        let twice: Vec<_> = verdicts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "reloads with more than one verdict: {twice:?}"
        );
        assert_eq!(
            verdicts
                .keys()
                .copied()
                .collect::<std::collections::BTreeSet<_>>(),
            *started,
            "every reload has a verdict"
        );
        failed
    }
}

/// Whether `pid` runs `baton guard` (its second argument).
fn is_guard(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| cmdline.split(|b| *b == 0).nth(1) == Some(b"guard".as_slice()))
        .unwrap_or(false)
}

impl Drop for Master {
    fn drop(&mut self) {
        let workers = self.children();
        if let Some(guard) = self.guard() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(guard as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in workers {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_log_line;

    #[test]
    fn a_master_line_glued_to_a_workers_unfinished_line_is_still_read() {
        let event = r#"{"timestamp":"t","event":"reload_requested","request":80}"#;
        assert_eq!(parse_log_line(event).len(), 1);
        let glued = format!("python worker pid 7 generation 3 ready on http{event}");
        let values = parse_log_line(&glued);
        assert_eq!(values.len(), 2, "{values:?}");
        assert_eq!(
            values[0]["raw"],
            "python worker pid 7 generation 3 ready on http"
        );
        assert_eq!(values[1]["event"], "reload_requested");
        assert_eq!(values[1]["request"], 80);
    }

    #[test]
    fn other_lines_stay_raw() {
        for line in [
            "",
            "plain text",
            "a {\"brace\" that is not json",
            r#"x{"no":"event"}"#,
        ] {
            let values = parse_log_line(line);
            assert_eq!(values.len(), 1, "{line}");
            assert_eq!(values[0]["raw"], line);
        }
    }
}
