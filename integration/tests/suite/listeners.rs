//! One socket per address across reloads; listeners added and removed by a reload.

use baton_integration::event;
use std::net::SocketAddr;
use std::time::Duration;

use baton_integration::load::requests;
use baton_integration::procfs::{listening_inodes, socket_inodes};
use baton_integration::{Master, TestConfig, eventually, free_port};

#[test]
fn exactly_one_listening_socket_per_address_shared_by_every_worker_across_reloads() {
    let (port, master) = Master::hello("one-socket", 3);
    let original = listening_inodes(port);
    assert_eq!(
        original.len(),
        1,
        "one listening socket on port {port}: {original:?}"
    );
    for round in 0..5 {
        if round > 0 {
            assert_eq!(master.reload()["event"], "reload_succeeded");
        }
        let inodes = listening_inodes(port);
        assert_eq!(
            inodes, original,
            "round {round}: still the very same single socket"
        );
        // Every serving worker holds that socket: the master's, not a copy of its own.
        let workers = eventually(Duration::from_secs(10), "3 serving workers", || {
            let w = master.children();
            (w.len() == 3).then_some(w)
        });
        for pid in workers {
            assert!(
                socket_inodes(pid).contains(&original[0]),
                "round {round}: worker {pid} does not hold the listener"
            );
        }
    }
    assert!(
        socket_inodes(master.pid()).contains(&original[0]),
        "the master holds it too"
    );
}

#[test]
fn a_listener_added_by_a_reload_serves_every_new_connection_at_once_and_a_removed_one_closes() {
    let (a, b) = (free_port(), free_port());
    let mut config = TestConfig::hello(&format!("127.0.0.1:{a}"), 2);
    let master = Master::start("added", &config);
    let addr_b: SocketAddr = format!("127.0.0.1:{b}").parse().unwrap();
    assert!(
        std::net::TcpStream::connect(addr_b).is_err(),
        "b is not served yet"
    );

    config
        .listeners
        .push(("extra".into(), format!("127.0.0.1:{b}")));
    master.write_config(&config.yaml());
    let verdict = master.reload();
    assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
    let generation = verdict["generation"].as_u64().unwrap();
    // Right after the verdict: 100% of new connections to the new listener are served, and by
    // the new generation (the old one never had it).
    let report = requests(addr_b, 200);
    assert_eq!(report.ok, 200, "{}", report.summary());
    report.assert_served_by(&[generation]);

    // Remove it again: it closes once the last generation that had it is gone.
    remove_the_last_listener(&master, &mut config);
    master.wait_event(event::LISTENER_CLOSED, Duration::from_secs(30), |v| {
        v["listener"] == "extra"
    });
    assert!(
        listening_inodes(b).is_empty(),
        "no listening socket left on {b}"
    );
    // `baton status` shows it removed, with when; the kept one open, held by both generations
    // until the older one is gone.
    let (code, out, err) = master.ctl(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let listeners = status["listeners"].as_array().unwrap();
    let named = |name: &str| {
        listeners
            .iter()
            .find(|l| l["name"] == name)
            .unwrap()
            .clone()
    };
    let (kept, removed) = (named("http"), named("extra"));
    assert_eq!(kept["state"], "open", "{kept}");
    assert_eq!(kept["address"], format!("127.0.0.1:{a}"), "{kept}");
    assert!(kept["queue"]["max"].as_u64() > Some(0), "{kept}");
    assert_eq!(removed["state"], "removed", "{removed}");
    assert!(removed["closed_unix_ms"].as_u64() > Some(0), "{removed}");
    assert_eq!(removed["generations"], serde_json::json!([]), "{removed}");
    assert!(removed.get("queue").is_none(), "{removed}");
    let (_, text, _) = master.ctl(&["status"]);
    assert!(
        text.contains("extra") && text.contains("removed"),
        "the listeners' table: {text}"
    );
    let refused = std::net::TcpStream::connect(addr_b);
    assert!(
        refused.is_err(),
        "connections to a removed listener are refused"
    );
    let report = requests(format!("127.0.0.1:{a}").parse().unwrap(), 20);
    assert_eq!(
        report.ok,
        20,
        "the kept listener still serves: {}",
        report.summary()
    );
}

/// A listener a reload removes stops listening as soon as the new generation serves: while the
/// old generation drains (here it holds a connection for up to 30 s), a new client is refused at
/// once instead of waiting in a queue nobody accepts from; what was accepted finishes.
#[test]
fn a_removed_listener_refuses_new_clients_at_once_while_the_old_generation_drains() {
    use baton_integration::load::{Load, Mode};
    use std::io::{Read, Write};
    let (kept, gone) = (free_port(), free_port());
    let mut config = TestConfig::hello(&format!("127.0.0.1:{kept}"), 2);
    config
        .listeners
        .push(("admin".into(), format!("127.0.0.1:{gone}")));
    config.holding("30s");
    let master = Master::start("removed", &config);
    let (addr_kept, addr_gone): (SocketAddr, SocketAddr) = (
        format!("127.0.0.1:{kept}").parse().unwrap(),
        format!("127.0.0.1:{gone}").parse().unwrap(),
    );
    // A kept-alive client of the listener to be removed: it holds generation 1 open.
    let mut held = std::net::TcpStream::connect(addr_gone).unwrap();
    let ask = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
    held.write_all(ask).unwrap();
    let mut buf = [0u8; 512];
    assert!(held.read(&mut buf).unwrap() > 0);
    let on_kept = Load::until_finished(addr_kept, Mode::Fresh, 2);
    let on_gone = Load::until_finished(addr_gone, Mode::Fresh, 2);

    remove_the_last_listener(&master, &mut config);
    master.wait_event(event::LISTENER_REMOVED, Duration::from_secs(5), |v| {
        v["listener"] == "admin"
    });
    // Only the draining generation 1 holds it now: `baton status` says so.
    let (code, out, err) = master.ctl(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let admin = status["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "admin")
        .unwrap()
        .clone();
    assert_eq!(admin["state"], "draining", "{admin}");
    assert_eq!(admin["generations"], serde_json::json!([1]), "{admin}");
    // New clients of the removed address: refused at once, not queued.
    let started = std::time::Instant::now();
    let refused = std::net::TcpStream::connect_timeout(&addr_gone, Duration::from_secs(3));
    assert_eq!(
        refused.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionRefused)
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    // The removed address's clients stop once refused (a refused client retries at once: no
    // need to burn the CPU for long); the kept one goes on through the old generation's drain.
    let on_gone = on_gone.finish();
    std::thread::sleep(Duration::from_millis(500)); // the window measured on the kept listener
    let on_kept = on_kept.finish();
    eprintln!("kept: {}", on_kept.summary());
    eprintln!("removed: {}", on_gone.summary());
    on_kept.assert_lossless("");
    // On the removed address: served before, refused after; nobody waits for an answer.
    assert!(on_gone.ok > 0, "{}", on_gone.summary());
    for kind in on_gone.failures.keys() {
        assert!(
            kind == "refused" || kind == "reset",
            "a client of the removed listener was left waiting or cut: {}",
            on_gone.summary()
        );
    }
    // The connection accepted before the removal is still served by generation 1.
    held.write_all(ask).unwrap();
    let n = held.read(&mut buf).unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("generation 1"), "{answer}");
}

/// A Unix listener no program accepts on (a configuration that forgot it): its clients wait in
/// the queue. When a reload removes it, they are refused, not left waiting until it closes.
#[test]
fn clients_queued_on_a_removed_unix_listener_are_refused_not_left_waiting() {
    use std::io::Read;
    let (port, mut config) = TestConfig::hello_on_a_free_port(1);
    config.holding("30s");
    config.worker_extra = vec!["listeners: [http]".into()];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("side.sock");
    let with_side = config.yaml().replacen(
        "listeners:\n",
        &format!("listeners:\n  - name: side\n    path: {}\n", path.display()),
        1,
    );
    let master = Master::spawn("removed-unix", &with_side);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    // Keep generation 1 draining for a while after the reload: a held HTTP connection.
    let mut held = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut held, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut buf = [0u8; 512];
    assert!(held.read(&mut buf).unwrap() > 0);
    // A client of the side socket: connected, queued, never accepted.
    let mut queued = std::os::unix::net::UnixStream::connect(&path).unwrap();
    queued
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    master.write_config(&config.yaml());
    let verdict = master.reload();
    assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
    master.wait_event(event::LISTENER_REMOVED, Duration::from_secs(5), |v| {
        v["listener"] == "side"
    });
    let started = std::time::Instant::now();
    let read = queued.read(&mut buf);
    assert!(
        matches!(read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "{read:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused, not left waiting"
    );
    // New clients are refused at once.
    let refused = std::os::unix::net::UnixStream::connect(&path);
    assert!(refused.is_err(), "{refused:?}");
    drop(held);
}

/// Removes the configuration's last listener and reloads: the reload succeeds.
fn remove_the_last_listener(master: &Master, config: &mut TestConfig) {
    config.listeners.pop();
    master.write_config(&config.yaml());
    let verdict = master.reload();
    assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
}
