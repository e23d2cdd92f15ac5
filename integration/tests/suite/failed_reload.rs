//! Failed reloads: the new generation is killed, the old one keeps serving, nothing is lost.

use std::net::SocketAddr;
use std::time::Duration;

use baton_integration::load::{Load, Mode};
use baton_integration::{Master, TestConfig, binaries, eventually, free_port};

#[test]
fn failed_reloads_leave_the_old_generation_serving_without_losing_a_request() {
    let port = free_port();
    let good = TestConfig::hello(&format!("127.0.0.1:{port}"), 2);
    let master = Master::start("failed", &good);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let load = Load::until_finished(addr, Mode::Fresh, 4);

    let it = |mode: &str, ready_timeout: &'static str| {
        let mut c = good.clone();
        c.command = binaries().it_worker.clone();
        c.env = vec![("IT_MODE".into(), mode.into())];
        c.ready_timeout = ready_timeout;
        c.yaml()
    };
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut with_busy_port = good.clone();
    with_busy_port
        .listeners
        .push(("busy".into(), busy.local_addr().unwrap().to_string()));
    let mut missing_binary = good.clone();
    missing_binary.command = "/nonexistent/worker".into();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "worker exits at start",
            it("exit:3", "20s"),
            "exited with status 3 before it was ready",
        ),
        (
            "worker never ready",
            it("never-ready", "1s"),
            "was not ready after 1000 ms",
        ),
        ("invalid config", good.yaml() + "bogus: 1\n", "baton.yaml:"),
        (
            "missing worker binary",
            missing_binary.yaml(),
            "/nonexistent/worker does not exist",
        ),
        (
            "port in use",
            with_busy_port.yaml(),
            "address already in use",
        ),
    ];
    for (what, yaml, expected) in cases {
        master.write_config(&yaml);
        let verdict = master.reload();
        assert_eq!(verdict["event"], "reload_failed", "{what}: {verdict}");
        let reason = verdict["reason"].as_str().unwrap();
        assert!(
            reason.contains(expected),
            "{what}: {reason:?} should contain {expected:?}"
        );
        assert!(
            verdict["message"]
                .as_str()
                .unwrap()
                .contains("generation 1 keeps serving")
        );
        // The failed generation's processes are gone; generation 1's two workers remain.
        eventually(
            Duration::from_secs(10),
            "only generation 1's workers",
            || (master.children().len() == 2).then_some(()),
        );
    }
    master.write_config(&good.yaml());
    let verdict = master.reload();
    assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
    let report = load.finish();
    eprintln!("under failed reloads: {}", report.summary());
    assert_eq!(report.failed(), 0, "{}", report.summary());
    assert!(report.ok > 100, "{}", report.summary());
    assert!(report.generations.contains_key(&1));
}
