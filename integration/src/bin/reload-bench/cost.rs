//! The master's own cost per worker: its memory with 8, 64 and 256 workers (output captured),
//! and the time to start a generation of 128 workers, against the same 128 started alone (by
//! baton's own spawner, the cheapest way, and by std's fork and exec).

use baton_integration::event;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baton_integration::{Master, TestConfig, binaries, free_port, procfs};
use baton_sys::process::SignalNumber;
use baton_sys::spawn::Spawn;

/// The master's RSS (KiB) with `n` workers: once the first generation serves, and after three
/// reloads (each waits for the one before).
fn rss_with(n: usize) -> (u64, u64) {
    let mut config = TestConfig::hello(&format!("127.0.0.1:{}", free_port()), n);
    config.ready_timeout = "120s";
    let master = Master::spawn(&format!("bench-rss-{n}"), &config.yaml());
    master.wait_event(event::SERVING, Duration::from_secs(180), |_| true);
    let first = procfs::rss_kib(master.pid());
    for _ in 0..3 {
        let verdict = master.reload();
        assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
    }
    // The retired generations are gone (their workers drained at once).
    let deadline = Instant::now() + Duration::from_secs(60);
    while master.children().len() > n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50)); // sampling, bounded
    }
    (first, procfs::rss_kib(master.pid()))
}

/// Milliseconds from SIGUSR2 to a new generation of `n` workers serving, as the master measures
/// it (`took_ms`), best of `rounds`.
fn reload_ms(n: usize, rounds: usize, cgroups: bool) -> u64 {
    let mut config = TestConfig::hello(&format!("127.0.0.1:{}", free_port()), n);
    config.ready_timeout = "120s";
    if !cgroups {
        config.supervisor_extra.push("cgroups: off".into());
    }
    let master = Master::spawn("bench-spawn", &config.yaml());
    master.wait_event(event::SERVING, Duration::from_secs(180), |_| true);
    (0..rounds)
        .map(|_| master.reload()["took_ms"].as_u64().unwrap_or(u64::MAX))
        .min()
        .unwrap_or(0)
}

/// How the bench itself starts workers alone.
#[derive(Clone, Copy)]
enum Starter {
    /// std's `Command` (fork and exec), as most service managers do.
    Fork,
    /// baton's own spawner (`clone3` sharing memory): the cheapest start there is, so the
    /// strictest baseline.
    Spawn,
}

/// Milliseconds to start `n` hello-workers alone, the systemd way (the listener at fd 3,
/// `NOTIFY_SOCKET`), until every one sent `READY=1`; best of `rounds`.
fn alone_ms(n: usize, rounds: usize, starter: Starter) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (0..rounds)
        .map(|round| {
            let path = dir.path().join(format!("notify-{round}.sock"));
            let notify = UnixDatagram::bind(&path).unwrap();
            notify
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            let started = Instant::now();
            let env: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os()
                .filter(|(k, _)| !k.to_string_lossy().starts_with("LISTEN_"))
                .chain([
                    ("LISTEN_FDS".into(), "1".into()),
                    ("LISTEN_FDNAMES".into(), "http".into()),
                    ("NOTIFY_SOCKET".into(), path.clone().into()),
                ])
                .collect();
            let program = binaries().hello_worker.clone();
            let children: Vec<u32> = (0..n)
                .map(|_| {
                    let fd: std::os::fd::OwnedFd = listener.try_clone().unwrap().into();
                    match starter {
                        Starter::Fork => {
                            let mut cmd = Command::new(&program);
                            cmd.stdin(Stdio::null()).stderr(Stdio::null());
                            baton_sys::process::place_fds(&mut cmd, vec![(fd, 3)]).unwrap();
                            baton_sys::process::exec_with_own_pid(
                                &mut cmd,
                                &program,
                                &[],
                                &env,
                                "LISTEN_PID",
                            )
                            .unwrap();
                            // Reaped below by pid, with the others.
                            #[allow(clippy::zombie_processes)]
                            let child: Child = cmd.spawn().unwrap();
                            child.id()
                        }
                        Starter::Spawn => {
                            let mut spawn = Spawn::new(&program).unwrap();
                            for (k, v) in &env {
                                spawn.env(k, v).unwrap();
                            }
                            spawn.env_own_pid("LISTEN_PID").unwrap();
                            let null = std::fs::File::open("/dev/null").unwrap();
                            let err = std::fs::OpenOptions::new()
                                .write(true)
                                .open("/dev/null")
                                .unwrap();
                            spawn.fd(null.into(), 0).fd(err.into(), 2).fd(fd, 3);
                            spawn.spawn(None).unwrap().pid
                        }
                    }
                })
                .collect();
            let mut ready = 0;
            let mut buf = [0u8; 4096];
            while ready < n {
                let got = notify
                    .recv(&mut buf)
                    .expect("READY=1 from every worker in 60 s");
                if String::from_utf8_lossy(&buf[..got])
                    .lines()
                    .any(|l| l == "READY=1")
                {
                    ready += 1;
                }
            }
            let took = started.elapsed().as_millis() as u64;
            for &pid in &children {
                let _ = baton_sys::process::signal_process(pid, SignalNumber::SIGKILL);
            }
            for &pid in &children {
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
            }
            took
        })
        .min()
        .unwrap_or(0)
}

pub(crate) fn report() {
    println!("## The master's cost per worker (hello-worker, output captured)\n");
    println!("| workers | master RSS, serving | after 3 reloads |");
    println!("|---|---|---|");
    let mut points = Vec::new();
    for n in [8, 64, 256] {
        eprintln!("master RSS with {n} workers ...");
        let (first, after) = rss_with(n);
        println!(
            "| {n} | {:.1} MiB | {:.1} MiB |",
            first as f64 / 1024.0,
            after as f64 / 1024.0
        );
        points.push((n as u64, after));
    }
    let ((n0, r0), (n1, r1)) = (points[0], points[2]);
    println!(
        "\nPer worker (after reloads, 8 to 256 workers): {:.1} KiB.\n",
        r1.saturating_sub(r0) as f64 / (n1 - n0) as f64
    );
    eprintln!("128 workers: reload vs alone ...");
    let forked = alone_ms(128, 5, Starter::Fork);
    let alone = alone_ms(128, 5, Starter::Spawn);
    let reload = reload_ms(128, 5, true);
    let without = reload_ms(128, 5, false);
    println!("| 128 workers ready | best of 5 | ratio to alone |");
    println!("|---|---|---|");
    println!(
        "| started alone (socket activation, READY=1), by baton's spawner (`clone3`, memory shared) | {alone} ms | 1 |"
    );
    for (name, ms) in [
        (
            "started alone the same way, by std's `Command` (fork and exec)",
            forked,
        ),
        (
            "a reload under baton, the generation in its cgroup (SIGUSR2 to serving)",
            reload,
        ),
        ("the same with `supervisor.cgroups: off`", without),
    ] {
        println!(
            "| {name} | {ms} ms | {:.2} |",
            ms as f64 / alone.max(1) as f64
        );
    }
    println!();
}
