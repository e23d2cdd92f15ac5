//! `it-worker`: an instrumented or misbehaving worker for tests, chosen by `IT_MODE`:
//!
//! - `exit:<code>`: receive the listeners, then exit with `<code>` without reporting ready.
//! - `never-ready`: receive the listeners and never report ready (nor accept); exit on drain.
//! - `crash-after:<ms>`: report ready, then exit with status 1 after `<ms>` (a crash loop). With
//!   `IT_CRASHES=<n>` and `IT_CRASHES_FILE=<path>` (a line per start), only the first `<n>`
//!   starts crash; later ones serve until drained (a crash loop that ends).
//! - `ready-after:<ms>`: report ready only after `<ms>` (a slow start); exit on drain. With
//!   `IT_STATUS_HEX`, then report that status line (hex, so it may hold any control character).
//! - `report-fds:<path>`: first thing in `main`, before any runtime exists, write this process's
//!   open descriptors (`<fd> <target>` lines) and a few environment variables (`env NAME=value`)
//!   to `<path>`; then serve like `ready-after:0`.
//! - `report-sockopts:<path>`: report ready, then write as JSON the options of its TCP listener
//!   `http` as the kernel reports them to this process, accept one connection (after its first
//!   byte, for `defer_accept`) and add the options that connection inherited (and `v6only` of a
//!   listener `v6`, if it has one); then serve like `ready-after:0`.
//! - `notify-abuse`: (systemd-style) report ready, then for `IT_ABUSE_MS` (default 2000) send
//!   garbage, oversized and as many datagrams as the notify socket takes; then wait for the drain.
//! - `stubborn`: report ready, then ignore every drain request and signal it can (SIGTERM
//!   included): only SIGKILL ends it.
//! - `garbage`: speak the protocol by hand (no SDK): take the handoff, send `ready`, then 50
//!   packets that are not messages, then half-close the channel, then idle until killed.
//! - `udp-echo`: read every datagram listener (UDP, Unix datagram) and answer each datagram
//!   with itself followed by ` g<generation> p<pid>`; report ready once reading; on a drain
//!   request stop reading (what is in the socket is left to the next generation) and exit.
//! - `quic-echo`: the same, each answer followed by ` t<tag>` (its QUIC tag in hex, `t-` without
//!   one), and on a drain request it goes on answering for `IT_LINGER_MS` (default 1000), as a
//!   QUIC server finishes its connections, before it exits.
//!
//! Output, in any mode (first thing in `main`):
//! - `IT_STDOUT_HEX`, `IT_STDERR_HEX`: bytes (hex) written to stdout or stderr in one `write`.
//! - `IT_PIECES=1`: write `piece-a ` to stdout, wait `IT_PIECES_MS` (default 300), then
//!   `piece-b` and the newline: one line in two writes, far apart.
//! - `IT_FLOOD_BYTES=<n>`: a thread writes `<n>` bytes of numbered 100-byte lines to stdout as
//!   fast as the pipe takes them, then `flood done` on stderr; with `IT_FLOOD_ONCE=<path>`, only
//!   the first worker that creates `<path>` does.
//! - `IT_CHATTER_MS=<ms>`: a thread writes `chatter <n>` to stderr every `<ms>`.
//!
//! Orphans, in any mode: `IT_ORPHAN_MS=<ms>` leaves a process behind whose parent exits at once
//! and which exits after `<ms>` (see `orphan`).
//!
//! Memory, in any mode: `IT_HOLD_MIB=<n>`: before anything else, `<n>` MiB allocated and every
//! page written, held until exit (a worker with a large heap, for the memory benchmark).

#![allow(clippy::print_stderr)] // a test worker reports what it did on stderr

use std::process::ExitCode;

use baton_integration::worker_mode::WorkerMode;
use std::time::Duration;

fn main() -> ExitCode {
    let named = std::env::var("IT_MODE").unwrap_or_default();
    let Some(mode) = WorkerMode::parse(&named) else {
        eprintln!("it-worker: no mode {named:?} (IT_MODE)");
        return ExitCode::from(64);
    };
    if let WorkerMode::ReportFds(path) = &mode {
        let mut lines = String::new();
        for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let target = std::fs::read_link(entry.path()).unwrap_or_default();
            lines += &format!(
                "{} {}\n",
                entry.file_name().to_string_lossy(),
                target.display()
            );
        }
        // Optionally, whether this worker can reach a socket it should not (the master's
        // control socket): `connect <path> ok|<error kind>`.
        if let Ok(target) = std::env::var("IT_TRY_CONNECT") {
            let result = match std::os::unix::net::UnixStream::connect(&target) {
                Ok(_) => "ok".to_string(),
                Err(e) => format!("{:?}", e.kind()),
            };
            lines += &format!("connect {target} {result}\n");
        }
        for var in [
            "NOTIFY_SOCKET",
            "LISTEN_FDS",
            "LISTEN_PID",
            "BATON_CHANNEL_FD",
            "WATCHDOG_USEC",
        ] {
            lines += &format!("env {var}={}\n", std::env::var(var).unwrap_or_default());
        }
        std::fs::write(path, lines).unwrap();
    }
    write_output();
    if let Some(code) = orphan() {
        return code;
    }
    let _held = hold_memory();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(mode))
}

/// `IT_ORPHAN_MS=<ms>` (any mode): leave an orphan behind, a process that lives `<ms>` and
/// exits, its parent gone at once: it is reparented to the nearest subreaper (baton), or to PID
/// 1 (baton as a container's init), which must reap it. `IT_ORPHAN_STAGE` marks the helpers.
fn orphan() -> Option<ExitCode> {
    let ms = std::env::var("IT_ORPHAN_MS").ok()?;
    let me = std::env::current_exe().unwrap();
    match std::env::var("IT_ORPHAN_STAGE").as_deref() {
        // The orphan: lives, then exits.
        Ok("orphan") => {
            std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(500)));
            Some(ExitCode::SUCCESS)
        }
        // Its parent: starts it and exits without waiting.
        Ok("parent") => {
            let _ = std::process::Command::new(&me)
                .env("IT_ORPHAN_STAGE", "orphan")
                .spawn();
            Some(ExitCode::SUCCESS)
        }
        _ => {
            if let Ok(mut parent) = std::process::Command::new(&me)
                .env("IT_ORPHAN_STAGE", "parent")
                .spawn()
            {
                let _ = parent.wait();
            }
            None
        }
    }
}

async fn run(mode: WorkerMode) -> ExitCode {
    if mode == WorkerMode::Garbage {
        return garbage().await;
    }
    let mut worker = match baton_worker::Worker::from_env().await {
        Ok(worker) => worker,
        Err(_) => return ExitCode::from(2),
    };
    let delay = match mode {
        WorkerMode::UdpEcho | WorkerMode::QuicEcho => {
            return udp_echo(&mut worker, mode == WorkerMode::QuicEcho).await;
        }
        WorkerMode::ReportSockopts(path) => {
            let Ok(baton_worker::Listener::Tcp(listener)) = worker.take("http") else {
                return ExitCode::from(2);
            };
            if worker.ready().await.is_err() {
                return ExitCode::from(2);
            }
            let mut report =
                serde_json::json!({ "listener": sockopts(&socket2::SockRef::from(&listener)) });
            if let Ok(baton_worker::Listener::Tcp(v6)) = worker.take("v6") {
                report["v6only"] = socket2::SockRef::from(&v6).only_v6().ok().into();
            }
            if let Ok((stream, _)) = listener.accept().await {
                report["accepted"] = sockopts(&socket2::SockRef::from(&stream));
            }
            std::fs::write(path, report.to_string()).unwrap();
            worker.drain_watch().requested().await;
            return ExitCode::SUCCESS;
        }
        WorkerMode::Exit(code) => return ExitCode::from(code),
        WorkerMode::NotifyAbuse => {
            if worker.ready().await.is_err() {
                return ExitCode::from(2);
            }
            let ms = std::env::var("IT_ABUSE_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2000);
            let sent = abuse_notify_socket(Duration::from_millis(ms)).await;
            eprintln!("it-worker: sent {sent} abusive notifications");
            worker.drain_watch().requested().await;
            return ExitCode::SUCCESS;
        }
        WorkerMode::Stubborn => {
            if worker.ready().await.is_err() {
                return ExitCode::from(2);
            }
            // The SDK turns SIGTERM into a drain request, which this worker ignores.
            std::future::pending::<()>().await;
            return ExitCode::SUCCESS;
        }
        WorkerMode::CrashAfter(ms) => {
            if worker.ready().await.is_err() {
                return ExitCode::from(2);
            }
            if !crashed_enough() {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                return ExitCode::from(1);
            }
            worker.drain_watch().requested().await;
            return ExitCode::SUCCESS;
        }
        WorkerMode::ReadyAfter(ms) => Some(ms),
        WorkerMode::ReportFds(_) => Some(0),
        WorkerMode::NeverReady | WorkerMode::Garbage => None,
    };
    if let Some(ms) = delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        if worker.ready().await.is_err() {
            return ExitCode::from(2);
        }
        if let Ok(hex) = std::env::var("IT_STATUS_HEX") {
            let bytes: Vec<u8> = (0..hex.len() / 2)
                .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
                .collect();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if worker.status(text).await.is_err() {
                return ExitCode::from(2);
            }
        }
    }
    worker.drain_watch().requested().await;
    if let Some(flood) = FLOOD.lock().unwrap().take() {
        let _ = flood.join();
    }
    ExitCode::SUCCESS
}

/// `udp-echo` and `quic-echo`: one task per datagram listener, each answering until the drain
/// request (`quic`: and for `IT_LINGER_MS` after it).
async fn udp_echo(worker: &mut baton_worker::Worker, quic: bool) -> ExitCode {
    let mut tag = format!(
        " g{} p{}",
        std::env::var(baton_proto::GENERATION_ENV).unwrap_or_default(),
        std::process::id()
    );
    let mut linger = Duration::ZERO;
    if quic {
        let quic_tag = worker
            .quic_tag()
            .map_or_else(|| "-".to_string(), |t| format!("{t:04x}"));
        tag = format!("{tag} t{quic_tag}");
        linger = Duration::from_millis(
            std::env::var("IT_LINGER_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000),
        );
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (_, listener) in worker.take_all() {
        let (drain, tag) = (worker.drain_watch(), tag.clone());
        match listener {
            baton_worker::Listener::Udp(socket) => {
                tasks.spawn(echo(socket, drain, tag, linger));
            }
            baton_worker::Listener::UnixDatagram(socket) => {
                tasks.spawn(echo(socket, drain, tag, linger));
            }
            _ => {}
        }
    }
    if worker.ready().await.is_err() {
        return ExitCode::from(2);
    }
    while tasks.join_next().await.is_some() {}
    ExitCode::SUCCESS
}

/// A datagram socket `udp-echo` answers on.
trait Datagrams {
    type Peer;
    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<(usize, Self::Peer)>;
    async fn reply(&self, answer: &[u8], to: &Self::Peer) -> std::io::Result<usize>;
}

impl Datagrams for tokio::net::UdpSocket {
    type Peer = std::net::SocketAddr;
    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<(usize, Self::Peer)> {
        self.recv_from(buf).await
    }
    async fn reply(&self, answer: &[u8], to: &Self::Peer) -> std::io::Result<usize> {
        self.send_to(answer, to).await
    }
}

impl Datagrams for tokio::net::UnixDatagram {
    type Peer = tokio::net::unix::SocketAddr;
    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<(usize, Self::Peer)> {
        self.recv_from(buf).await
    }
    async fn reply(&self, answer: &[u8], to: &Self::Peer) -> std::io::Result<usize> {
        match to.as_pathname() {
            Some(path) => self.send_to(answer, path).await,
            None => Ok(0), // an unbound client cannot be answered
        }
    }
}

/// Answers every datagram on `socket` until the drain request and `linger` after it; then
/// stops reading at once.
async fn echo<S: Datagrams>(
    socket: S,
    mut drain: baton_worker::DrainWatch,
    tag: String,
    linger: Duration,
) {
    let mut buf = vec![0u8; 65536];
    let mut until: Option<tokio::time::Instant> = None;
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
    loop {
        tokio::select! {
            biased;
            _ = drain.requested(), if until.is_none() => {
                if linger.is_zero() {
                    return;
                }
                until = Some(tokio::time::Instant::now() + linger);
            }
            _ = tokio::time::sleep_until(until.unwrap_or(far)), if until.is_some() => return,
            got = socket.recv(&mut buf) => {
                let Ok((n, from)) = got else { continue };
                let mut answer = buf[..n].to_vec();
                answer.extend_from_slice(tag.as_bytes());
                let _ = socket.reply(&answer, &from).await;
            }
        }
    }
}

/// `IT_HOLD_MIB` MiB, each page written so that it is resident.
fn hold_memory() -> Vec<u8> {
    let mib: usize = std::env::var("IT_HOLD_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut heap = vec![0u8; mib << 20];
    for page in heap.chunks_mut(4096) {
        page[0] = 1;
    }
    std::hint::black_box(heap)
}

/// A TCP socket's options as the kernel reports them to this process.
fn sockopts(socket: &socket2::SockRef<'_>) -> serde_json::Value {
    use std::os::fd::AsFd;
    serde_json::json!({
        "nodelay": socket.tcp_nodelay().ok(),
        "keepalive": socket.keepalive().ok(),
        "keepalive_idle_s": socket.tcp_keepalive_time().ok().map(|d| d.as_secs()),
        "keepalive_interval_s": socket.tcp_keepalive_interval().ok().map(|d| d.as_secs()),
        "keepalive_count": socket.tcp_keepalive_retries().ok(),
        "mark": socket.mark().ok(),
        "interface": socket.device().ok().flatten().map(|d| String::from_utf8_lossy(&d).into_owned()),
        "freebind": socket.freebind_v4().ok(),
        "transparent": socket.ip_transparent_v4().ok(),
        "defer_accept_s": baton_sys::sockopt::defer_accept(socket.as_fd()).ok(),
        "fastopen": baton_sys::sockopt::fastopen(socket.as_fd()).ok(),
    })
}

/// `IT_CRASHES`/`IT_CRASHES_FILE`: notes this start; whether the crashes asked for are done.
fn crashed_enough() -> bool {
    use std::io::Write;
    let (Some(n), Ok(path)) = (
        std::env::var("IT_CRASHES")
            .ok()
            .and_then(|v| v.parse::<usize>().ok()),
        std::env::var("IT_CRASHES_FILE"),
    ) else {
        return false;
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let _ = writeln!(file, "start");
    let starts = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .count();
    starts > n
}

fn hex_env(var: &str) -> Option<Vec<u8>> {
    let hex = std::env::var(var).ok()?;
    Some(
        (0..hex.len() / 2)
            .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
            .collect(),
    )
}

/// The output `IT_STDOUT_HEX`, `IT_STDERR_HEX`, `IT_PIECES`, `IT_FLOOD_BYTES` and
/// `IT_CHATTER_MS` ask for.
fn write_output() {
    use std::io::Write;
    if let Some(bytes) = hex_env("IT_STDOUT_HEX") {
        let _ = std::io::stdout().lock().write_all(&bytes);
        let _ = std::io::stdout().flush();
    }
    if let Some(bytes) = hex_env("IT_STDERR_HEX") {
        let _ = std::io::stderr().lock().write_all(&bytes);
    }
    if std::env::var_os("IT_PIECES").is_some() {
        let ms = std::env::var("IT_PIECES_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300);
        std::thread::spawn(move || {
            let mut out = std::io::stdout();
            let _ = out.write_all(b"piece-a ").and_then(|()| out.flush());
            std::thread::sleep(Duration::from_millis(ms));
            let _ = out.write_all(b"piece-b").and_then(|()| out.flush());
            let _ = out.write_all(b"\n").and_then(|()| out.flush());
        });
    }
    if let Some(bytes) = std::env::var("IT_FLOOD_BYTES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        let first = match std::env::var("IT_FLOOD_ONCE") {
            Ok(path) => std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .is_ok(),
            Err(_) => true,
        };
        if first {
            let thread = std::thread::spawn(move || flood(bytes));
            *FLOOD.lock().unwrap() = Some(thread);
        }
    }
    if let Some(ms) = std::env::var("IT_CHATTER_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::spawn(move || {
            for n in 0u64.. {
                eprintln!("chatter {n}");
                std::thread::sleep(Duration::from_millis(ms));
            }
        });
    }
}

/// The flood under way: a drained worker finishes it before it exits.
static FLOOD: std::sync::Mutex<Option<std::thread::JoinHandle<()>>> = std::sync::Mutex::new(None);

/// Writes `bytes` bytes of 100-byte lines (`flood 000000001 xxx...`) to stdout, 64 KiB per
/// write, as fast as the pipe takes them.
fn flood(bytes: u64) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let mut written = 0u64;
    let mut n = 0u64;
    let mut chunk = Vec::with_capacity(65_536 + 100);
    while written < bytes {
        chunk.clear();
        while chunk.len() < 65_536 {
            n += 1;
            let line = format!("flood {n:09} ");
            chunk.extend_from_slice(line.as_bytes());
            chunk.resize(chunk.len() + 99 - line.len(), b'x');
            chunk.push(b'\n');
        }
        if out.write_all(&chunk).is_err() {
            return;
        }
        written += chunk.len() as u64;
    }
    let _ = out.flush();
    eprintln!("flood done: {n} lines, {written} bytes");
}

/// A worker written from `docs/protocol.md` alone, which then misbehaves.
async fn garbage() -> ExitCode {
    use baton_proto::{MasterMessage, WorkerMessage};
    use baton_sys::channel;
    let Ok(fd) = channel::adopt_inherited(3) else {
        return ExitCode::from(2);
    };
    let Ok(chan) = channel::into_async(fd) else {
        return ExitCode::from(2);
    };
    let mut buf = vec![0u8; baton_proto::MAX_MESSAGE_SIZE];
    let Ok(got) = channel::recv_with_fds(&chan, &mut buf, 1).await else {
        return ExitCode::from(2);
    };
    let Ok(MasterMessage::Hello(hello)) = baton_proto::decode(&buf[..got.len]) else {
        return ExitCode::from(2);
    };
    let mut received = 0;
    let mut listeners = Vec::new();
    while received < hello.listeners.len() {
        let Ok(got) = channel::recv_with_fds(&chan, &mut buf, 253).await else {
            return ExitCode::from(2);
        };
        received += got.fds.len();
        listeners.extend(got.fds);
    }
    let _ = chan.send(&baton_proto::encode(&WorkerMessage::Ready)).await;
    // Fewer than the master's cutoff (100), so the half-close below is what it sees last.
    for i in 0..50u32 {
        let _ = chan.send(format!("\x00not json {i}").as_bytes()).await;
    }
    let _ = nix::sys::socket::shutdown(
        std::os::fd::AsRawFd::as_raw_fd(&chan),
        nix::sys::socket::Shutdown::Write,
    );
    std::future::pending::<()>().await;
    drop(listeners);
    ExitCode::SUCCESS
}

/// Floods `NOTIFY_SOCKET` for `period` (bounded), mixing garbage and oversized datagrams.
async fn abuse_notify_socket(period: Duration) -> u64 {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return 0;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return 0;
    };
    if sock.connect(&path).is_err() || sock.set_nonblocking(true).is_err() {
        return 0;
    }
    let big = vec![b'X'; 16 * 1024];
    let end = std::time::Instant::now() + period;
    let mut sent = 0u64;
    while std::time::Instant::now() < end {
        let packet: &[u8] = match sent % 3 {
            0 => b"\xff\xfe not a notification \x00",
            1 => &big,
            _ => b"STATUS=flood",
        };
        match sock.send(packet) {
            Ok(_) => sent += 1,
            // The socket is full: the master reads slowly on purpose. Wait a little.
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    sent
}
