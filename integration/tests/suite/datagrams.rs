//! Datagram listeners (`kind: udp`, `kind: unix-datagram`): one socket bound by the master and
//! read by every generation. The old generation stops reading only after the new one reads (its
//! drain comes once the new one is ready), so a datagram waits in the shared socket for whoever
//! reads next: none is lost across reloads, none is answered twice, none after a drain deadline.

use baton_integration::event;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use baton_integration::datagrams::udp_clients;
use baton_integration::worker_mode::WorkerMode;
use baton_integration::{Master, TestConfig, binaries, eventually, free_port};
use nix::sys::signal::Signal;
use serde_json::Value;

fn echo_config(protocol: &str) -> TestConfig {
    let mut config = TestConfig::hello("127.0.0.1:1", 2);
    config.it_worker(WorkerMode::UdpEcho);
    config.drain_timeout = "2s";
    config.max_draining = 16;
    config.worker_extra.push(format!("protocol: {protocol}"));
    config
}

/// The configuration with its `listeners:` section replaced by `listeners` (YAML lines).
fn with_listeners(config: &TestConfig, listeners: &str) -> String {
    let yaml = config.yaml();
    let start = yaml.find("worker:").unwrap();
    format!("listeners:\n{listeners}{}", &yaml[start..])
}

/// SIGUSR2 every `every` until `stop`; each one once the master took the one before.
fn reloads_every(master: &Master, every: Duration, run: Duration) -> u64 {
    let before = master.events(event::RELOAD_REQUESTED).len() as u64;
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < run {
        master.signal(Signal::SIGUSR2);
        sent += 1;
        eventually(
            Duration::from_secs(10),
            "the master to take the signal",
            || (master.events(event::RELOAD_REQUESTED).len() as u64 >= before + sent).then_some(()),
        );
        std::thread::sleep(every); // the reload cadence under test
    }
    sent
}

#[test]
fn udp_echo_across_reloads_every_100ms_loses_and_duplicates_nothing_in_both_protocols() {
    for protocol in ["baton", "systemd"] {
        let port = free_port();
        let config = echo_config(protocol);
        let yaml = with_listeners(
            &config,
            &format!(
                "  - name: dns\n    address: \"127.0.0.1:{port}\"\n    kind: udp\n    recv_buffer: 1MiB\n"
            ),
        );
        let master = Master::spawn(&format!("udp-{protocol}"), &yaml);
        master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
        let stop = Arc::new(AtomicBool::new(false));
        let clients = {
            let stop = stop.clone();
            std::thread::spawn(move || udp_clients(port, 4, Duration::from_millis(1), stop))
        };
        let listener_drops = baton_integration::procfs::udp_drops(port);
        let signals = reloads_every(&master, Duration::from_millis(100), Duration::from_secs(5));
        master.verdict_of(signals);
        stop.store(true, Ordering::Relaxed);
        let seen = clients.join().unwrap();
        // The kernel's drops, at the listener (its 1 MiB buffer full: every worker starved of
        // CPU, as on a machine at load 18) or at the clients' sockets: counted apart from
        // baton's losses, which must be none.
        let kernel =
            baton_integration::procfs::udp_drops(port) - listener_drops + seen.client_drops;
        let answered = seen.answers.len() as u64;
        let duplicated = seen.duplicated();
        let generations: BTreeSet<u64> = seen.by_generation.iter().map(|(g, _)| *g).collect();
        eprintln!(
            "{protocol}: {} datagrams sent, {answered} answered, {duplicated} twice, {} generations answered, {signals} SIGUSR2",
            seen.sent,
            generations.len()
        );
        assert!(seen.sent > 5_000, "real load: {}", seen.sent);
        let lost = seen.sent - answered;
        eprintln!(
            "{protocol}: {lost} unanswered, {kernel} dropped by the kernel at a full receive buffer"
        );
        assert!(
            lost <= kernel,
            "{protocol}: {lost} lost, of which the kernel's receive buffers dropped only {kernel}: baton lost {}",
            lost - kernel
        );
        assert_eq!(duplicated, 0, "{protocol}: none answered twice");
        assert!(
            generations.len() > 5,
            "answered across reloads: {generations:?}"
        );
        // None answered by a generation after its drain deadline (drain start + 2 s).
        for (g, at) in &seen.by_generation {
            if let Some((began, _)) = master
                .events_where(event::GENERATION_DRAINING, |v| v["generation"] == *g)
                .first()
            {
                assert!(
                    *at <= *began + Duration::from_secs(2),
                    "generation {g} answered after its drain deadline"
                );
            }
        }
        master.assert_every_request_accounted_for(signals);
        // `baton status` shows the datagram listener with its kind and buffer.
        let (_, out, _) = master.ctl(&["status", "--json"]);
        let status: Value = serde_json::from_str(&out).unwrap();
        let dns = &status["listeners"][0];
        assert_eq!(dns["kind"], "udp", "{dns}");
        assert_eq!(dns["name"], "dns", "{dns}");
        assert!(
            dns["options"]["recv_buffer"].as_u64().unwrap_or(0) >= 1 << 20,
            "{dns}"
        );
    }
}

#[test]
fn a_unix_datagram_listener_is_handed_over_and_answered_across_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.sock");
    let config = echo_config("baton");
    let yaml = with_listeners(
        &config,
        &format!(
            "  - name: log\n    path: \"{}\"\n    kind: unix-datagram\n    mode: \"0600\"\n",
            path.display()
        ),
    );
    let master = Master::spawn("unixgram", &yaml);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let client_path = dir.path().join("client.sock");
    let client = std::os::unix::net::UnixDatagram::bind(&client_path).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut generations = BTreeSet::new();
    let mut buf = [0u8; 256];
    for round in 0..4u64 {
        for n in 0..50u64 {
            client
                .send_to(format!("c0 n{}", round * 50 + n).as_bytes(), &path)
                .unwrap();
            let got = client.recv(&mut buf).unwrap();
            let text = String::from_utf8_lossy(&buf[..got]).into_owned();
            assert!(
                text.starts_with(&format!("c0 n{} g", round * 50 + n)),
                "{text}"
            );
            generations.insert(text.split(' ').nth(2).unwrap().to_string());
        }
        assert_eq!(master.reload()["event"], "reload_succeeded");
    }
    assert_eq!(generations.len(), 4, "{generations:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn datagram_and_quic_listeners_refuse_what_does_not_apply_by_name() {
    let udp = "  - name: dns\n    address: 127.0.0.1:53\n    kind: udp\n";
    for (listener, worker, problem) in [
        (
            format!("{udp}    backlog: 10\n"),
            "",
            "`backlog` applies to stream listeners only",
        ),
        (
            format!("{udp}    nodelay: true\n"),
            "",
            "`nodelay` applies to TCP listeners only",
        ),
        (
            "  - name: dns\n    address: 127.0.0.1:53\n    kind: unix-datagram\n".to_string(),
            "",
            "an `address` is `kind: tcp` (the default) or `kind: udp`",
        ),
        (
            format!("{udp}    recv_buffer: 12\n"),
            "",
            "invalid buffer size \"12\"",
        ),
        (
            "  - name: h3\n    address: 127.0.0.1:443\n    quic: true\n".to_string(),
            "",
            "`quic` applies to UDP listeners only",
        ),
        (
            format!("{udp}    quic: true\n"),
            "  processes: 2\n",
            "2 processes would share QUIC listener `dns`",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("baton.yaml");
        std::fs::write(
            &file,
            format!("listeners:\n{listener}worker:\n  command: /bin/true\n{worker}"),
        )
        .unwrap();
        let out = std::process::Command::new(&binaries().baton)
            .args(["check", "-c"])
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{err}");
        assert!(err.contains(problem), "{problem}: {err}");
        assert!(err.contains("baton.yaml:"), "where: {err}");
    }
}
