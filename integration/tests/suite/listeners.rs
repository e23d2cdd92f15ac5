//! One socket per address across reloads; listeners added and removed by a reload.

use std::net::SocketAddr;
use std::time::Duration;

use baton_integration::load::requests;
use baton_integration::procfs::{listening_inodes, socket_inodes};
use baton_integration::{Master, TestConfig, eventually, free_port};

#[test]
fn exactly_one_listening_socket_per_address_shared_by_every_worker_across_reloads() {
    let port = free_port();
    let master = Master::start(
        "one-socket",
        &TestConfig::hello(&format!("127.0.0.1:{port}"), 3),
    );
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
    assert_eq!(
        report.generations.keys().copied().collect::<Vec<_>>(),
        vec![generation]
    );

    // Remove it again: it closes once the last generation that had it is gone.
    config.listeners.pop();
    master.write_config(&config.yaml());
    let verdict = master.reload();
    assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
    master.wait_event("listener_closed", Duration::from_secs(30), |v| {
        v["listener"] == "extra"
    });
    assert!(
        listening_inodes(b).is_empty(),
        "no listening socket left on {b}"
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
