//! The container image (issue 21, part 1): built offline with podman
//! (`packaging/container/build-image.sh`: FROM scratch, baton, the example worker and the
//! libraries they load) and run with baton as PID 1, on the host's network (podman's options
//! for these machines: the vfs storage driver, cgroupfs, runc, explicit ulimits;
//! `../shared/DESIGN.md`). A machine that cannot run containers fails these tests, saying why.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use baton_integration::load::Mixed;
use baton_integration::loopback;
use baton_integration::procfs::{children, zombies};
use baton_integration::{binaries, eventually, free_port, http};

const PODMAN_OPTS: [&str; 6] = [
    "--storage-driver",
    "vfs",
    "--cgroup-manager",
    "cgroupfs",
    "--runtime",
    "runc",
];
const IMAGE: &str = "localhost/baton:test";

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(PODMAN_OPTS)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("podman: {e}: these tests need podman and runc (apt-get install podman runc; integration/run-tests.sh does)")
        })
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Builds the image once per test process; its size in bytes.
fn image() -> u64 {
    static SIZE: OnceLock<u64> = OnceLock::new();
    *SIZE.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .join("packaging/container/build-image.sh");
        let out = Command::new("bash")
            .arg(script)
            .arg(IMAGE)
            .env("PODMAN_OPTS", PODMAN_OPTS.join(" "))
            .output()
            .unwrap();
        assert!(out.status.success(), "building the image: {}", said(&out));
        let size = podman(&["image", "inspect", "--format", "{{.Size}}", IMAGE]);
        String::from_utf8_lossy(&size.stdout)
            .trim()
            .parse()
            .unwrap()
    })
}

/// A container of the image on the host's network, its configuration from `yaml` (mounted
/// over /etc/baton/baton.yaml); removed on drop.
struct Container(String);

impl Container {
    fn run(name: &str, yaml: &str) -> Container {
        let dir = tempfile::tempdir().unwrap().keep();
        let config = dir.join("baton.yaml");
        std::fs::write(&config, yaml).unwrap();
        let name = format!("baton-test-{name}-{}", std::process::id());
        let _ = podman(&["rm", "-f", &name]);
        // podman would raise the limits, which is not permitted here: descriptors as we have
        // them; processes 4096 (raising or even keeping this machine's 96 365 is refused).
        let (soft, hard) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        let nofile = format!("nofile={soft}:{hard}");
        let nproc = "nproc=4096:4096".to_string();
        let out = podman(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "host",
            "--ulimit",
            &nofile,
            "--ulimit",
            &nproc,
            "-v",
            &format!("{}:/etc/baton/baton.yaml:ro", config.display()),
            "-v",
            &format!("{}:/usr/bin/it-worker:ro", binaries().it_worker.display()),
            IMAGE,
        ]);
        assert!(out.status.success(), "podman run: {}", said(&out));
        Container(name)
    }

    fn logs(&self) -> String {
        said(&podman(&["logs", &self.0]))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.0]);
    }
}

fn yaml(port: u16, metrics: u16) -> String {
    format!(
        r#"listeners:
  - name: http
    address: 127.0.0.1:{port}
workers:
  - name: web
    command: /usr/bin/hello-worker
    processes: 2
    drain_timeout: 10s
    user: nobody
  # A worker that leaves an orphan behind (reparented to PID 1, baton, which must reap it).
  - name: orphans
    command: /usr/bin/it-worker
    env: {{IT_MODE: "ready-after:0", IT_ORPHAN_MS: "1500"}}
    processes: 1
    drain_timeout: 10s
supervisor:
  stop_delay: 1s
  metrics_listen: 127.0.0.1:{metrics}
  runtime_dir: /run/baton
  control:
    socket: /run/baton/baton.sock
"#
    )
}

fn reloads_ok(metrics: u16) -> u64 {
    let (_, _, body) = http(metrics, "GET", "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix("baton_reloads_total{verdict=\"ok\"} "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn baton_as_pid_1_of_a_container_reloads_by_signal_under_load_and_stops_by_draining() {
    let size = image();
    eprintln!("the image: {:.1} MB", size as f64 / 1e6);
    let (port, metrics) = (free_port(), free_port());
    let container = Container::run("pid1", &yaml(port, metrics));
    eventually(
        Duration::from_secs(30),
        "the container's baton serving",
        || {
            std::net::TcpStream::connect(("127.0.0.1", metrics))
                .ok()
                .and_then(|_| (http(metrics, "GET", "/healthz").0 == 200).then_some(()))
        },
    );

    // The orphan a worker left is baton's (PID 1's) child, and reaped when it exits.
    let inspect = podman(&["inspect", "--format", "{{.State.Pid}}", &container.0]);
    let pid1: u32 = String::from_utf8_lossy(&inspect.stdout)
        .trim()
        .parse()
        .unwrap();
    let orphan = |pid: &u32| {
        std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
            env.split(|b| *b == 0)
                .any(|v| v == b"IT_ORPHAN_STAGE=orphan")
        })
    };
    eventually(
        Duration::from_secs(10),
        "the orphan, reparented to PID 1",
        || children(pid1).iter().any(orphan).then_some(()),
    );
    eventually(Duration::from_secs(10), "the orphan gone, reaped", || {
        (!children(pid1).iter().any(orphan) && zombies(pid1).is_empty()).then_some(())
    });

    // Reloads by `podman kill -s USR2` (the signal goes to PID 1: baton), under load.
    let addr = loopback(port);
    let load = Mixed::start(addr, 3);
    for i in 1..=10 {
        let out = podman(&["kill", "-s", "USR2", &container.0]);
        assert!(out.status.success(), "{}", said(&out));
        eventually(Duration::from_secs(20), "the reload's verdict", || {
            (reloads_ok(metrics) >= i).then_some(())
        });
    }
    // `baton status` inside the container.
    let out = podman(&["exec", &container.0, "/usr/bin/baton", "status"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(said(&out).contains("serving"), "{}", said(&out));
    let (fresh, kept) = load.finish();
    eprintln!(
        "10 reloads in the container: fresh {} / kept-alive {}",
        fresh.summary(),
        kept.summary()
    );
    fresh.assert_lossless("");
    kept.assert_lossless("");

    // `podman stop`: SIGTERM, the stop delay, the drain, exit 0, within the grace period.
    let started = Instant::now();
    let out = podman(&["stop", "-t", "30", &container.0]);
    assert!(out.status.success(), "{}", said(&out));
    let took = started.elapsed();
    let code = podman(&["inspect", "--format", "{{.State.ExitCode}}", &container.0]);
    assert_eq!(
        String::from_utf8_lossy(&code.stdout).trim(),
        "0",
        "{}",
        container.logs()
    );
    eprintln!("podman stop took {took:?} (stop_delay 1 s, then the drain)");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(30),
        "{took:?}"
    );
    assert!(
        container.logs().contains("supervisor.stop_delay"),
        "{}",
        container.logs()
    );
}
