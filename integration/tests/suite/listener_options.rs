//! Listener options, read back from the kernel: by the master (`baton status`) and by a worker
//! that received the socket (`getsockopt` in the it-worker), and on a connection the worker
//! accepted (`TCP_NODELAY` and keep-alive are inherited); Unix sockets' owner, group and mode,
//! an abstract socket; a reload that changes what a bound socket cannot take says so.

use baton_integration::event;
use std::io::Write;
use std::time::Duration;

use baton_integration::{Master, binaries, eventually, free_port};
use serde_json::Value;

fn config(dir: &std::path::Path, port: u16, nodelay: bool, freebind: bool) -> String {
    format!(
        "listeners:
  - name: v6
    address: \"[::]:0\"
    v6only: false
  - name: http
    address: \"127.0.0.1:{port}\"
    defer_accept: 2s
    fastopen: 16
    freebind: {freebind}
    transparent: true
    interface: lo
    nodelay: {nodelay}
    keepalive: {{idle: 30s, interval: 5s, count: 3}}
    mark: 7
  - name: local
    path: \"{dir}/app.sock\"
    mode: \"0660\"
    owner: \"65534\"
    group: \"65534\"
  - name: hidden
    path: \"@baton-test-{port}\"
worker:
  command: {}
  env:
    IT_MODE: \"report-sockopts:{dir}/report.json\"
  processes: 1
  drain_timeout: 2s
supervisor:
  runtime_dir: \"{{dir}}/run\"
  control:
    socket: \"{{dir}}/baton.sock\"
",
        binaries().it_worker.display(),
        dir = dir.display(),
    )
}

fn listeners(master: &Master) -> Vec<Value> {
    let (code, out, err) = master.ctl(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    status["listeners"].as_array().unwrap().clone()
}

#[test]
fn options_read_back_the_same_in_the_master_a_worker_and_its_connections() {
    let dir = tempfile::tempdir().unwrap();
    // Two ports in a row: `port` and `port + 1` for the IPv6 listener.
    let port = eventually(Duration::from_secs(10), "two free ports in a row", || {
        let port = free_port();
        std::net::TcpListener::bind(("::1", port + 1))
            .ok()
            .map(|_| port)
    });
    let master = Master::spawn("options", &config(dir.path(), port, true, true));
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let all = listeners(&master);
    let http = all.iter().find(|l| l["name"] == "http").unwrap()["options"].clone();
    eprintln!("master: {http}");
    assert_eq!(http["nodelay"], true);
    assert_eq!(http["keepalive"]["on"], true);
    assert_eq!(http["keepalive"]["idle_s"], 30);
    assert_eq!(http["keepalive"]["interval_s"], 5);
    assert_eq!(http["keepalive"]["count"], 3);
    assert_eq!(http["mark"], 7);
    assert_eq!(http["interface"], "lo");
    assert_eq!(http["freebind"], true);
    assert_eq!(http["transparent"], true);
    assert_eq!(http["fastopen"], 16);
    assert!(http["defer_accept_s"].as_u64() >= Some(2), "{http}");

    // The worker's view of the same socket, and of a connection it accepted.
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    client.write_all(b"x").unwrap(); // data: past TCP_DEFER_ACCEPT
    let report_path = dir.path().join("report.json");
    let report: Value = eventually(Duration::from_secs(10), "the worker's report", || {
        serde_json::from_str(&std::fs::read_to_string(&report_path).ok()?).ok()
    });
    eprintln!("worker: {report}");
    let worker = &report["listener"];
    for (ours, theirs) in [
        ("nodelay", "nodelay"),
        ("mark", "mark"),
        ("interface", "interface"),
        ("freebind", "freebind"),
        ("transparent", "transparent"),
        ("fastopen", "fastopen"),
        ("defer_accept_s", "defer_accept_s"),
    ] {
        assert_eq!(
            http[ours], worker[theirs],
            "{ours}: master {http}, worker {worker}"
        );
    }
    assert_eq!(http["keepalive"]["idle_s"], worker["keepalive_idle_s"]);
    assert_eq!(
        http["keepalive"]["interval_s"],
        worker["keepalive_interval_s"]
    );
    assert_eq!(http["keepalive"]["count"], worker["keepalive_count"]);
    let accepted = &report["accepted"];
    assert_eq!(accepted["nodelay"], true, "inherited: {accepted}");
    assert_eq!(accepted["keepalive"], true, "inherited: {accepted}");
    assert_eq!(accepted["keepalive_idle_s"], 30, "inherited: {accepted}");

    // A Unix socket's file, and an abstract socket (no file, reachable by name).
    let v6 = all.iter().find(|l| l["name"] == "v6").unwrap();
    assert_eq!(v6["options"]["v6only"], false, "{v6}");
    assert_eq!(report["v6only"], false, "the worker's view: {report}");
    // It takes IPv4 connections too (its port: the kernel's choice, `[::]:0`).
    let v6_port: u16 = v6["address"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    std::net::TcpStream::connect(("127.0.0.1", v6_port)).unwrap();
    let local = all.iter().find(|l| l["name"] == "local").unwrap();
    assert_eq!(local["options"]["mode"], 0o660, "{local}");
    assert_eq!(local["options"]["owner"], 65534, "{local}");
    assert_eq!(local["options"]["group"], 65534, "{local}");
    let meta = std::fs::metadata(dir.path().join("app.sock")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 65534);
    let hidden = all.iter().find(|l| l["name"] == "hidden").unwrap();
    assert_eq!(hidden["kind"], "unix", "{hidden}");
    assert_eq!(hidden["address"], format!("@baton-test-{port}"), "{hidden}");
    use std::os::linux::net::SocketAddrExt;
    let name = format!("baton-test-{port}");
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let _reached = std::os::unix::net::UnixStream::connect_addr(&address).unwrap();
    eventually(
        Duration::from_secs(5),
        "the abstract socket's queue",
        || {
            let all = listeners(&master);
            let hidden = all.iter().find(|l| l["name"] == "hidden")?;
            (hidden["queue"]["length"] == 1).then_some(())
        },
    );

    // A reload: nodelay can change on a bound socket, freebind cannot (and says so).
    master.write_config(&config(dir.path(), port, false, false));
    let (code, out, err) = master.ctl(&["reload", "--json"]);
    assert_eq!(code, 0, "{out} {err}");
    let verdict: Value = serde_json::from_str(&out).unwrap();
    let warnings = verdict["warnings"].as_array().unwrap();
    assert!(
        warnings.iter().any(|w| w
            .as_str()
            .unwrap()
            .contains("listener `http`: `freebind` changed")),
        "{verdict}"
    );
    let all = listeners(&master);
    let http = &all.iter().find(|l| l["name"] == "http").unwrap()["options"];
    assert_eq!(http["nodelay"], false, "{http}");
    assert_eq!(http["freebind"], true, "kept as bound: {http}");
    drop(client);
}

/// `O_NONBLOCK` of descriptor 3 of a worker, from `/proc/PID/fdinfo/3`.
fn fd3_nonblocking(pid: u64) -> bool {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/3")).unwrap();
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .unwrap_or_else(|| panic!("no flags in {info}"));
    flags & nix::fcntl::OFlag::O_NONBLOCK.bits() as u32 != 0
}

/// A worker that never touches its socket (`sleep`, systemd-style) receives it as the file
/// says: non-blocking with `nonblocking: true` (nginx assumes so of an inherited listener), and
/// blocking again after a reload that says `false`, as systemd's `NonBlocking=` does.
#[test]
fn nonblocking_is_what_a_worker_that_never_touches_its_socket_receives() {
    let port = free_port();
    let yaml = |nonblocking: bool| {
        format!(
            "listeners:
  - name: http
    address: \"127.0.0.1:{port}\"
    nonblocking: {nonblocking}
worker:
  command: sleep
  args: [\"600\"]
  protocol: systemd
  ready: {{delay: 50ms}}
  drain_timeout: 2s
supervisor:
  runtime_dir: \"{{dir}}/run\"
  control:
    socket: \"{{dir}}/baton.sock\"
"
        )
    };
    let master = Master::spawn("nonblocking", &yaml(true));
    let (_, ready) = master.wait_event(event::WORKER_READY, Duration::from_secs(10), |_| true);
    assert!(fd3_nonblocking(ready["pid"].as_u64().unwrap()), "{ready}");
    let http = &listeners(&master)[0]["options"];
    assert_eq!(http["nonblocking"], true, "{http}");

    master.write_config(&yaml(false));
    let verdict = master.reload();
    assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
    let (_, ready) = master.wait_event(event::WORKER_READY, Duration::from_secs(10), |v| {
        v["generation"] == 2
    });
    assert!(!fd3_nonblocking(ready["pid"].as_u64().unwrap()), "{ready}");
    let http = &listeners(&master)[0]["options"];
    assert_eq!(http["nonblocking"], false, "{http}");
}
