//! The listeners' accept queues, from the kernel: in `baton status`, in each reload's receipt
//! (the namespace's drop counters before and after, the queue's peak), and the `queue_watch`
//! warnings. The master runs in a network namespace of its own (`unshare --net`), so the
//! counters move only with this test's connections; the test's client threads enter it.

use baton_integration::event;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use baton_integration::{Master, binaries, eventually};
use serde_json::Value;

const PORT: u16 = 8080;
const BACKLOG: u32 = 8;

/// The configuration: one listener with a small backlog, one worker of `command` in `mode`
/// (`IT_MODE` of the it-worker), the queues watched every 200 ms.
fn config(command: &std::path::Path, mode: &str) -> String {
    format!(
        "listeners:
  - name: http
    address: \"127.0.0.1:{PORT}\"
    backlog: {BACKLOG}
worker:
  command: {}
  env:
    IT_MODE: \"{mode}\"
  processes: 1
  ready_timeout: 20s
  drain_timeout: 1s
supervisor:
  queue_watch: 200ms
  runtime_dir: \"{{dir}}/run\"
  control:
    socket: \"{{dir}}/baton.sock\"
",
        command.display()
    )
}

/// Runs `f` on a thread that entered the network namespace of process `pid`.
fn in_namespace_of<T: Send + 'static>(pid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// Connection attempts for `run` (each gives up after 50 ms): the connections made, kept open.
fn connect_for(run: Duration) -> Vec<TcpStream> {
    let address = SocketAddr::from(([127, 0, 0, 1], PORT));
    let deadline = Instant::now() + run;
    let mut made = Vec::new();
    while Instant::now() < deadline && made.len() < 200 {
        if let Ok(stream) = TcpStream::connect_timeout(&address, Duration::from_millis(50)) {
            made.push(stream);
        }
    }
    made
}

/// One client making requests for `run`, one at a time (never more than one connection waits in
/// the queue): how many were answered.
fn requests_for(run: Duration) -> usize {
    use std::io::{Read, Write};
    let deadline = Instant::now() + run;
    let mut answered = 0;
    while Instant::now() < deadline && answered < 10_000 {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", PORT)) else {
            continue;
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut answer = Vec::new();
        if stream
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .and_then(|()| stream.read_to_end(&mut answer))
            .is_ok()
            && answer.starts_with(b"HTTP/1.1 200")
        {
            answered += 1;
        }
    }
    answered
}

/// The receipt of the reload that covers the next SIGUSR2, from the master's log.
fn reload_receipt(master: &Master) -> Value {
    let verdict = master.reload();
    assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
    let reload = verdict["reload"].as_u64().unwrap();
    master
        .wait_event(event::RELOAD_RECEIPT, Duration::from_secs(10), |v| {
            v["reload"] == reload
        })
        .1
}

fn listener(master: &Master) -> Value {
    let (code, out, err) = master.ctl(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    status["listeners"][0].clone()
}

#[test]
fn a_full_accept_queue_shows_in_status_warnings_and_the_next_receipt() {
    let wrapper = [
        "unshare",
        "--net",
        "--",
        "sh",
        "-c",
        "ip link set lo up && exec \"$@\"",
        "sh",
    ];
    let hello = binaries().hello_worker.clone();
    let it = binaries().it_worker.clone();
    let master = Master::spawn_wrapped("queues", &config(&hello, ""), &wrapper);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let pid = master.pid();

    // Accepting workers: a reload under a little load costs the kernel nothing.
    let load = std::thread::spawn(move || {
        in_namespace_of(pid, || requests_for(Duration::from_millis(500)))
    });
    let receipt = reload_receipt(&master);
    assert!(load.join().unwrap() > 0);
    assert_eq!(receipt["drops"], 0, "{receipt}");
    assert_eq!(receipt["overflows"], 0, "{receipt}");

    // Workers that never accept: the queue fills, the kernel drops the rest.
    master.write_config(&config(&it, "ready-after:0"));
    reload_receipt(&master);
    let held = in_namespace_of(pid, || connect_for(Duration::from_millis(1500)));
    assert!(
        held.len() as u32 > BACKLOG / 2,
        "{} connections",
        held.len()
    );
    let (_, warning) = master.wait_event(event::QUEUE_NEARLY_FULL, Duration::from_secs(10), |v| {
        v["listener"] == "http"
    });
    eprintln!("warning: {warning}");
    master.wait_event(event::KERNEL_DROPS, Duration::from_secs(10), |v| {
        v["drops"].as_u64() > Some(0)
    });
    let now = listener(&master);
    eprintln!("listener: {now}");
    assert_eq!(now["state"], "open", "{now}");
    assert_eq!(now["queue"]["max"], BACKLOG, "{now}");
    assert!(
        now["queue"]["length"].as_u64() >= Some(u64::from(BACKLOG)),
        "the queue is full: {now}"
    );

    // A reload while clients keep knocking on the full queue: its receipt counts the drops.
    master.write_config(&config(&it, "ready-after:500"));
    let knocking = std::thread::spawn(move || {
        in_namespace_of(pid, || connect_for(Duration::from_millis(800)))
    });
    let receipt = reload_receipt(&master);
    drop(knocking.join().unwrap());
    eprintln!("receipt: {receipt}");
    assert!(receipt["drops"].as_u64() > Some(0), "{receipt}");
    assert!(receipt["overflows"].as_u64() > Some(0), "{receipt}");
    let (code, out, _) = master.ctl(&["history", "--json"]);
    assert_eq!(code, 0);
    let history: Value = serde_json::from_str(&out).unwrap();
    let last = history.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["receipt"]["listen_drops"], receipt["drops"], "{last}");
    assert_eq!(last["receipt"]["queues"][0]["max"], BACKLOG, "{last}");
    assert!(
        last["receipt"]["queues"][0]["peak"].as_u64() >= Some(u64::from(BACKLOG)),
        "{last}"
    );
    drop(held);

    // Accepting workers again: the queue empties and the next reload drops nothing.
    master.write_config(&config(&hello, ""));
    reload_receipt(&master);
    eventually(Duration::from_secs(10), "the queue emptied", || {
        (listener(&master)["queue"]["length"] == 0).then_some(())
    });
    let load = std::thread::spawn(move || {
        in_namespace_of(pid, || requests_for(Duration::from_millis(500)))
    });
    let receipt = reload_receipt(&master);
    assert!(load.join().unwrap() > 0);
    assert_eq!(receipt["drops"], 0, "{receipt}");
}
