//! Memory (issue 15, item 6): each worker's memory (its process tree) in `baton status` and the
//! metrics, each generation's total; `recycle: {max_rss: ...}` replaces a worker that stays
//! above its budget (its successor ready first), one at a time, logged with the figure.

use baton_integration::event;
use baton_integration::executable;
use std::time::Duration;

use baton_integration::{Master, TestConfig, eventually, free_port, http, procfs};
use serde_json::Value;

/// A systemd-style HTTP worker (Python): `GET /alloc` makes it hold 120 MiB more (touched, so
/// resident), anything else answers `ok`. A child process (`sleep`) counts toward its memory.
const ALLOCATING: &str = r#"#!/usr/bin/env python3
import os, socket, subprocess
child = subprocess.Popen(["sleep", "3600"])
server = socket.socket(fileno=3)
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.connect(os.environ["NOTIFY_SOCKET"])
    s.sendall(b"READY=1")
held = []
while True:
    conn, _ = server.accept()
    request = conn.recv(1024)
    if request.startswith(b"GET /alloc"):
        held.append(bytearray(b"x") * (120 << 20))
    body = b"pid %d holds %d\n" % (os.getpid(), len(held))
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    conn.close()
"#;

fn allocating(dir: &std::path::Path, port: u16, extra: &[&str]) -> TestConfig {
    let script = executable(dir, "alloc.py", ALLOCATING);
    let mut config = TestConfig::hello(&format!("127.0.0.1:{port}"), 2);
    config.command = script;
    config.worker_extra = vec!["protocol: systemd".into()];
    config
        .worker_extra
        .extend(extra.iter().map(|s| s.to_string()));
    config
}

fn status(master: &Master) -> Value {
    let (_, out, err) = master.ctl(&["status", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}{err}"))
}

#[test]
fn status_and_metrics_show_each_workers_memory_and_the_generations_total() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start("memory-status", &allocating(dir.path(), free_port(), &[]));
    let s = status(&master);
    let g = &s["generations"][0];
    let workers = g["workers"].as_array().unwrap();
    let mut sum = 0;
    for w in workers {
        let m = &w["memory"];
        let (rss, pss) = (
            m["rss_kib"].as_u64().unwrap(),
            m["pss_kib"].as_u64().unwrap(),
        );
        assert!(rss > 1024 && pss > 0 && pss <= rss, "{w}");
        assert_eq!(m["processes"], 2, "the worker and its child: {w}");
        sum += rss;
    }
    assert_eq!(g["memory"]["rss_kib"].as_u64().unwrap(), sum, "{g}");
    let (_, table, _) = master.ctl(&["status"]);
    assert!(
        table.contains("RSS") && table.contains(" MiB RSS, "),
        "{table}"
    );
    let (_, metrics, _) = master.ctl(&["metrics"]);
    assert!(
        metrics.contains(
            "baton_worker_memory_bytes{program=\"worker\",slot=\"0\",generation=\"1\",kind=\"rss\"}"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("baton_generation_memory_bytes{generation=\"1\",kind=\"rss\"}"));
}

#[test]
fn a_worker_above_max_rss_is_recycled_successor_first_and_the_other_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = allocating(
        dir.path(),
        port,
        &["recycle: {max_rss: 100MiB, check_every: 200ms, above_for: 1s}"],
    );
    let master = Master::start("memory-recycle", &config);
    let pids = master.children();
    // One request allocates in whichever worker takes it.
    let (code, _, body) = http(port, "GET", "/alloc");
    assert_eq!(code, 200, "{body}");
    let fat: u32 = body
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap();
    assert!(pids.contains(&fat), "{body} {pids:?}");
    let (_, v) = master.wait_event(event::WORKER_RECYCLED, Duration::from_secs(20), |_| true);
    assert_eq!(v["pid"], fat, "{v}");
    let reason = v["reason"].as_str().unwrap();
    assert!(reason.contains("above max_rss 100.0 MiB, for 1 s"), "{v}");
    assert!(
        reason.contains("its memory (RSS of its processes) was 1"),
        "the figure: {v}"
    );
    // Its successor is ready before it drains, and it is gone after; the other one stays.
    let successor = v["successor"].as_u64().unwrap();
    let (ready_at, _) = master.wait_event(event::WORKER_READY, Duration::from_secs(10), |r| {
        r["worker"] == successor
    });
    let (gone_at, _) = master.wait_event(event::WORKER_EXITED, Duration::from_secs(20), |e| {
        e["pid"] == fat
    });
    assert!(ready_at <= gone_at);
    eventually(Duration::from_secs(10), "the fat worker gone", || {
        (!procfs::alive(fat)).then_some(())
    });
    let other = *pids.iter().find(|&&p| p != fat).unwrap();
    assert!(procfs::alive(other));
    assert_eq!(master.events(event::WORKER_RECYCLED).len(), 1);
    let (_, metrics, _) = master.ctl(&["metrics"]);
    assert!(
        metrics.contains("baton_worker_replacements_total{cause=\"memory\"} 1"),
        "{metrics}"
    );
}
