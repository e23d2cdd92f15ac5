//! Draining generations: held connections keep them alive until closed or until the deadline;
//! the cap on draining generations bounds the process count.

use baton_integration::event;
use baton_integration::loopback;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use baton_integration::procfs::{alive, zombies};
use baton_integration::{Master, TestConfig, eventually, free_port, held_connection};

fn config(port: u16, drain_timeout: &'static str) -> TestConfig {
    let mut c = TestConfig::hello(&format!("127.0.0.1:{port}"), 1);
    c.holding(drain_timeout);
    c
}

/// A master whose only worker holds a client's idle connection as its generation is reloaded:
/// the master, the old worker's pid, the connection.
fn held_through_a_reload(
    name: &str,
    drain_timeout: &'static str,
) -> (Master, u32, std::net::TcpStream) {
    let port = free_port();
    let master = Master::start(name, &config(port, drain_timeout));
    let old = first_worker(&master);
    let conn = held_connection(port);
    assert_eq!(master.reload()["event"], "reload_succeeded");
    (master, old, conn)
}

fn first_worker(master: &Master) -> u32 {
    master.events(event::WORKER_READY)[0]["pid"]
        .as_u64()
        .unwrap() as u32
}

#[test]
fn a_held_connection_keeps_its_generation_draining_until_it_closes_then_it_exits_at_once() {
    let (master, old, conn) = held_through_a_reload("linger", "60s");
    master.wait_event(event::GENERATION_DRAINING, Duration::from_secs(5), |v| {
        v["generation"] == 1
    });
    // While the client holds its connection, generation 1 stays (for a whole second here).
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        assert!(alive(old), "the old worker must wait for its client");
        assert!(master.events(event::GENERATION_EXITED).is_empty());
        std::thread::sleep(Duration::from_millis(20));
    }
    let closed = Instant::now();
    drop(conn);
    let (at, exited) = master.wait_event(event::GENERATION_EXITED, Duration::from_secs(5), |v| {
        v["generation"] == 1
    });
    assert_eq!(exited["killed"], false, "it drained, it was not killed");
    let after = at.duration_since(closed);
    eprintln!("generation 1 exited {after:?} after its last client closed");
    assert!(
        after < Duration::from_secs(2),
        "exit must follow the close at once, took {after:?}"
    );
    assert!(!alive(old));
}

#[test]
fn a_generation_that_does_not_drain_is_killed_at_its_deadline_not_later_than_one_second_after() {
    let (master, old, _conn) = held_through_a_reload("deadline", "2s");
    let (began, _) = master.wait_event(event::GENERATION_DRAINING, Duration::from_secs(5), |v| {
        v["generation"] == 1
    });
    let (killed_at, kill) = master.wait_event(event::WORKER_KILLED, Duration::from_secs(10), |v| {
        v["generation"] == 1
    });
    let (gone_at, exited) =
        master.wait_event(event::GENERATION_EXITED, Duration::from_secs(10), |v| {
            v["generation"] == 1
        });
    assert_eq!(
        kill["pid"].as_u64().unwrap() as u32,
        old,
        "the log names the pid"
    );
    let message = kill["message"].as_str().unwrap();
    assert!(message.contains("drain deadline"), "{message}");
    assert!(
        message.contains("connections: 1"),
        "the SDK reported its open connection: {message}"
    );
    assert_eq!(exited["killed"], true);
    let waited = killed_at.duration_since(began);
    let gone = gone_at.duration_since(began);
    eprintln!("killed {waited:?} after the drain began (deadline 2 s), reaped at {gone:?}");
    assert!(
        waited >= Duration::from_millis(1900),
        "killed before its deadline: {waited:?}"
    );
    assert!(
        gone <= Duration::from_secs(3),
        "deadline + 1 s exceeded: {gone:?}"
    );
    assert!(!alive(old), "killed and reaped: no zombie");
}

#[test]
fn fifty_reloads_with_long_lived_clients_keep_the_process_count_bounded() {
    const CAP: usize = 3;
    let port = free_port();
    let mut c = config(port, "3s");
    c.max_draining = CAP;
    let master = Arc::new(Master::start("many", &c));
    // Sample the master's live children all through the run.
    let stop = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (master, stop, most) = (master.clone(), stop.clone(), most.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                most.fetch_max(master.children().len(), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let mut clients = Vec::new();
    for _ in 0..50 {
        // Each generation gets a client that never lets go.
        clients.push(held_connection(port));
        assert_eq!(master.reload()["event"], "reload_succeeded");
    }
    // Every old generation ends: by the cap (oldest first) or at its deadline.
    eventually(
        Duration::from_secs(20),
        "all 50 old generations gone",
        || (master.events(event::GENERATION_EXITED).len() == 50).then_some(()),
    );
    eventually(
        Duration::from_secs(5),
        "only the serving worker left",
        || (master.children().len() == 1).then_some(()),
    );
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    assert!(
        zombies(master.pid()).is_empty(),
        "every killed worker was reaped"
    );
    let most = most.load(Ordering::SeqCst);
    let by_cap = master
        .events(event::WORKER_KILLED)
        .iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .unwrap()
                .contains("more than 3 generations besides the serving one")
        })
        .count();
    eprintln!("most live workers seen: {most}; {by_cap} generations killed by the cap");
    // At most CAP generations besides the serving one, a starting one included (1 process each).
    assert!(most <= CAP + 1, "{most} live workers exceeds the cap");
    assert!(
        by_cap >= 40,
        "the cap must have forced the oldest out: {by_cap}"
    );
    drop(clients);
}

/// `supervisor.stop_delay` (a lame duck, for load balancers that remove an endpoint a few
/// seconds after its stop began): after SIGTERM the master serves new connections for the
/// delay, says so, then drains and exits 0.
#[test]
fn with_a_stop_delay_sigterm_serves_new_connections_for_the_delay_then_drains() {
    let (port, mut config) = TestConfig::hello_on_a_free_port(2);
    config.supervisor_extra.push("stop_delay: 2s".into());
    let mut master = Master::start("stop-delay", &config);
    let addr: std::net::SocketAddr = loopback(port);
    let sent = std::time::Instant::now();
    master.signal(nix::sys::signal::Signal::SIGTERM);
    master.wait_event(event::STOP_DELAYED, Duration::from_secs(10), |v| {
        v["delay_ms"] == 2000
    });
    // New connections during the delay: served, by the generation that serves.
    let during = baton_integration::load::requests(addr, 20);
    assert_eq!(during.ok, 20, "{}", during.summary());
    let (_, out, _) = master.ctl(&["status"]);
    assert!(
        out.contains("still serving for") && out.contains("supervisor.stop_delay"),
        "{out}"
    );
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "checked within the delay"
    );
    assert!(
        master.events(event::GENERATION_DRAINING).is_empty(),
        "not draining yet"
    );
    let status = master.wait_exit(Duration::from_secs(20));
    let took = sent.elapsed();
    eprintln!("stop_delay 2 s: the master exited {took:?} after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(took >= Duration::from_secs(2), "{took:?}");
}
