//! Hardening: large handoffs, privilege drop, orphans reaped (as subreaper and as PID 1).

use baton_integration::event;
use baton_integration::loopback;
use std::time::Duration;

use baton_integration::load::requests;
use baton_integration::procfs::{self, zombies};
use baton_integration::worker_mode::WorkerMode;
use baton_integration::{Master, TestConfig, binaries, eventually, free_port};

#[test]
fn a_thousand_listeners_are_handed_over_in_chunks_and_all_serve() {
    // Distinct free ports: hold every probe socket until all are chosen.
    let held: Vec<std::net::TcpListener> = (0..1000)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let ports: Vec<u16> = held
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    drop(held);
    let mut c = TestConfig::hello(&format!("127.0.0.1:{}", ports[0]), 1);
    c.listeners = ports
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("l{i}"), format!("127.0.0.1:{p}")))
        .collect();
    c.ready_timeout = "60s";
    let master = Master::start("thousand", &c);
    let worker = master.events(event::WORKER_READY)[0]["pid"]
        .as_u64()
        .unwrap() as u32;
    let inherited = procfs::socket_inodes(worker);
    let listening: Vec<u64> = ports
        .iter()
        .flat_map(|&p| procfs::listening_inodes(p))
        .collect();
    assert_eq!(listening.len(), 1000, "one listening socket per port");
    assert!(
        listening.iter().all(|i| inherited.contains(i)),
        "the worker holds all 1000 listeners"
    );
    for &p in [ports[0], ports[252], ports[253], ports[506], ports[999]].iter() {
        let r = requests(format!("127.0.0.1:{p}").parse().unwrap(), 3);
        assert_eq!(r.ok, 3, "port {p}: {}", r.summary());
    }
    // And again on a reload: the same 1000 sockets to a new worker.
    assert_eq!(master.reload()["event"], "reload_succeeded");
    let r = requests(format!("127.0.0.1:{}", ports[999]).parse().unwrap(), 3);
    assert_eq!(r.ok, 3);
}

#[test]
fn workers_run_as_the_configured_user_without_the_masters_groups_or_its_control_socket() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "dropping privileges needs root (CI runs as root)"
    );
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let report = dir.path().join("report.txt");
    let mut c = TestConfig::hello(&format!("127.0.0.1:{port}"), 1);
    c.command = binaries().it_worker.clone();
    c.env = vec![
        WorkerMode::ReportFds(report.clone()).env(),
        ("IT_TRY_CONNECT".into(), "{dir}/baton.sock".into()),
    ];
    c.worker_extra = vec![
        "user: nobody".into(),
        "umask: \"0027\"".into(),
        "rlimits: {nofile: 4321, core: 0}".into(),
    ];
    let master = Master::start("nobody", &c);
    let pid = master.events(event::WORKER_READY)[0]["pid"]
        .as_u64()
        .unwrap() as u32;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .to_string()
    };
    assert_eq!(
        field("Uid:").split_whitespace().skip(1).collect::<Vec<_>>(),
        ["65534"; 4],
        "{status}"
    );
    assert_eq!(
        field("Gid:").split_whitespace().skip(1).collect::<Vec<_>>(),
        ["65534"; 4],
        "{status}"
    );
    assert_eq!(
        field("Groups:").trim(),
        "Groups:",
        "no supplementary groups: {status}"
    );
    assert_eq!(field("Umask:").split_whitespace().nth(1), Some("0027"));
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..]
            .split_whitespace()
            .take(2)
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(limit("Max open files"), ["4321", "4321"], "{limits}");
    assert_eq!(limit("Max core file size"), ["0", "0"], "{limits}");
    let text = std::fs::read_to_string(&report).unwrap();
    let line = text.lines().find(|l| l.starts_with("connect ")).unwrap();
    assert!(
        line.ends_with("PermissionDenied"),
        "the worker must not reach the control socket: {line}"
    );
    drop(master);
}

/// The worker: a shell that leaves an orphan (a subshell starts `sleep` and exits), then execs
/// the real worker.
fn orphaning(port: u16) -> TestConfig {
    let mut c = TestConfig::hello(&format!("127.0.0.1:{port}"), 1);
    c.command = "/bin/sh".into();
    c.args = vec![
        "-c".into(),
        format!("(sleep 0.5 &); exec {}", binaries().hello_worker.display()),
    ];
    c
}

fn has_child_named(pid: u32, name: &str) -> bool {
    procfs::children(pid).iter().any(|c| {
        std::fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|comm| comm.trim() == name)
    })
}

#[test]
fn as_a_subreaper_the_master_adopts_and_reaps_its_workers_orphans() {
    let port = free_port();
    let master = Master::start("subreaper", &orphaning(port));
    eventually(
        Duration::from_secs(5),
        "the orphan to be reparented to the master",
        || has_child_named(master.pid(), "sleep").then_some(()),
    );
    eventually(
        Duration::from_secs(5),
        "the orphan to exit and be reaped",
        || {
            (!has_child_named(master.pid(), "sleep") && zombies(master.pid()).is_empty())
                .then_some(())
        },
    );
    assert_eq!(requests(loopback(port), 5).ok, 5);
}

#[test]
fn as_pid_1_of_a_pid_namespace_the_master_reaps_orphans_and_stops_on_sigterm() {
    assert!(nix::unistd::geteuid().is_root(), "unshare --pid needs root");
    let port = free_port();
    let mut master = Master::spawn_wrapped(
        "pid1",
        &orphaning(port).yaml(),
        &["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"],
    );
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let unshare = master.pid();
    let baton = eventually(Duration::from_secs(5), "baton under unshare", || {
        procfs::children(unshare).first().copied()
    })
    .to_owned();
    let ns_pid = std::fs::read_to_string(format!("/proc/{baton}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("NSpid:"))
        .map(|l| l.split_whitespace().last().unwrap().to_string())
        .unwrap();
    assert_eq!(ns_pid, "1", "baton is PID 1 of its namespace");
    eventually(
        Duration::from_secs(5),
        "the orphan reparented to PID 1",
        || has_child_named(baton, "sleep").then_some(()),
    );
    eventually(Duration::from_secs(5), "the orphan reaped", || {
        (!has_child_named(baton, "sleep") && zombies(baton).is_empty()).then_some(())
    });
    assert_eq!(requests(loopback(port), 5).ok, 5);
    // PID 1 ignores signals it has no handler for; baton handles SIGTERM: drain and exit 0.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(baton as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    master.wait_event(event::EXITING, Duration::from_secs(10), |v| v["code"] == 0);
    let status = master.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert!(!procfs::alive(baton));
}

#[test]
fn when_the_master_dies_its_workers_drain_and_exit_instead_of_lingering() {
    let port = free_port();
    // Both kinds: an SDK worker (learns it from its channel) and a systemd-style one (learns it
    // from PR_SET_PDEATHSIG: the drain signal).
    let yaml = format!(
        "listeners:\n  - {{name: http, address: \"127.0.0.1:{port}\"}}\nworkers:\n  - name: sdk\n    command: {hello}\n  - name: plain\n    command: {hello}\n    protocol: systemd\nsupervisor:\n  runtime_dir: \"{{dir}}/run\"\n  control: {{socket: \"{{dir}}/baton.sock\"}}\n",
        hello = binaries().hello_worker.display()
    );
    let mut master = Master::spawn("master-death", &yaml);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let workers = master.children();
    assert_eq!(workers.len(), 2);
    master.signal(nix::sys::signal::Signal::SIGKILL);
    master.wait_exit(Duration::from_secs(5));
    eventually(
        Duration::from_secs(10),
        "both workers to drain and exit",
        || workers.iter().all(|&w| !procfs::alive(w)).then_some(()),
    );
}
