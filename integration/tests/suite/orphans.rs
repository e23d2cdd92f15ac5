//! Workers never outlive their master by more than their drain timeout, whatever signals they
//! ignore; a master that starts ends what its killed predecessor left behind.

use baton_integration::event;
use std::time::{Duration, Instant};

use baton_integration::worker_mode::WorkerMode;
use baton_integration::{Master, TestConfig, eventually, free_port};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn alive(pid: u32) -> bool {
    // A zombie is not alive: it only waits for its parent (here init) to reap it.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn stubborn(port: u16) -> TestConfig {
    let mut c = TestConfig::hello(&format!("127.0.0.1:{port}"), 1);
    c.it_worker(WorkerMode::Stubborn);
    c.drain_timeout = "2s";
    c
}

/// A master with one stubborn worker, once its registry names it: (master, worker pid, guard
/// pid, registry path, port).
fn started_with_a_stubborn_worker(name: &str) -> (Master, u32, u32, std::path::PathBuf, u16) {
    let port = free_port();
    let master = Master::start(name, &stubborn(port));
    let (_, ready) = master.wait_event(event::WORKER_READY, Duration::from_secs(30), |_| true);
    let worker = ready["pid"].as_u64().unwrap() as u32;
    let (_, guard) = master.wait_event(event::GUARD_STARTED, Duration::from_secs(10), |_| true);
    let guard = guard["pid"].as_u64().unwrap() as u32;
    let registry = master.dir.path().join("baton.sock.workers");
    eventually(
        Duration::from_secs(10),
        "the worker in the registry",
        || {
            std::fs::read_to_string(&registry)
                .ok()
                .filter(|r| r.contains(&format!("\"pid\":{worker}")))
        },
    );
    (master, worker, guard, registry, port)
}

#[test]
fn a_killed_master_s_workers_are_ended_by_its_guard_at_their_drain_timeout() {
    let (master, worker, guard, registry, _) = started_with_a_stubborn_worker("orphan-guard");
    kill(Pid::from_raw(master.pid() as i32), Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    // The worker ignores the drain signal its parent's death sent it...
    std::thread::sleep(Duration::from_millis(500));
    assert!(alive(worker), "it ignores its drain signal");
    // ...and is ended at its drain timeout, not later.
    eventually(Duration::from_secs(10), "the stubborn worker gone", || {
        (!alive(worker)).then_some(())
    });
    let lived = killed.elapsed();
    eprintln!("the worker outlived its master by {lived:?} (drain timeout 2 s)");
    assert!(lived >= Duration::from_millis(1500), "{lived:?}");
    assert!(lived < Duration::from_secs(6), "{lived:?}");
    eventually(Duration::from_secs(10), "the guard gone", || {
        (!alive(guard)).then_some(())
    });
    assert!(
        !registry.exists(),
        "the guard removes the registry it acted on"
    );
}

#[test]
fn a_new_master_ends_what_its_killed_predecessor_left_behind_and_serves() {
    let (mut first, orphan, guard, _, port) = started_with_a_stubborn_worker("orphan-successor");
    // No guard either: the orphan would serve old code on the port for good.
    kill(Pid::from_raw(guard as i32), Signal::SIGKILL).unwrap();
    kill(Pid::from_raw(first.pid() as i32), Signal::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(orphan));
    let started = Instant::now();
    let second = first.successor("orphan-successor-2");
    let (_, found) = second.wait_event(event::ORPHANS_FOUND, Duration::from_secs(10), |_| true);
    assert!(
        found["message"]
            .as_str()
            .unwrap()
            .contains(&orphan.to_string()),
        "{found}"
    );
    second.wait_event(event::ORPHAN_ENDED, Duration::from_secs(10), |v| {
        v["pid"] == orphan
    });
    assert!(!alive(orphan));
    second.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let took = started.elapsed();
    eprintln!("the successor served {took:?} after it started (the orphan's drain timeout: 2 s)");
    assert!(took < Duration::from_secs(8), "{took:?}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
}
