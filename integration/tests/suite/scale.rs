//! Answers of any size (issue 28, part 4): every answer used to be one frame of at most 64 KiB,
//! so `status` failed at 400 listeners, `metrics` at 1000, and at 9000 `history` failed and
//! `reload` printed "no verdict came" though the reload ran. Here 10 000 listeners (Unix
//! sockets: no ports to find) and 1000 workers, and every command that reads the master.

use baton_integration::event;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use baton_integration::{Master, binaries, eventually};
use serde_json::Value;

const LISTENERS: usize = 10_000;
const IDLE_WORKERS: usize = 1000;

fn yaml(idle: usize) -> String {
    let mut y = String::from("listeners:\n");
    for i in 0..LISTENERS {
        y += &format!("  - {{name: l{i}, path: \"{{dir}}/s/l{i}.sock\"}}\n");
    }
    // The web worker takes one listener; the idle ones (systemd protocol, ready 10 ms after
    // they start) one too: 10 000 descriptors handed to each would pass this machine's limit.
    y += &format!(
        "workers:\n  - name: web\n    command: {}\n    listeners: [l0]\n  - name: idle\n    command: /bin/sleep\n    args: [infinity]\n    protocol: systemd\n    ready: {{delay: 10ms}}\n    processes: {idle}\n    listeners: [l1]\n    ready_timeout: 60s\n    drain_timeout: 2s\nsupervisor:\n  runtime_dir: \"{{dir}}/run\"\n  control: {{socket: \"{{dir}}/baton.sock\"}}\n",
        binaries().hello_worker.display()
    );
    y
}

fn timed(master: &Master, args: &[&str]) -> (String, Duration) {
    let started = Instant::now();
    let (code, out, err) = master.ctl(args);
    let took = started.elapsed();
    let head: String = out.chars().take(2000).collect();
    assert_eq!(code, 0, "baton {}: {err}{head}", args.join(" "));
    assert!(err.is_empty(), "baton {}: {err}", args.join(" "));
    (out, took)
}

#[test]
fn ten_thousand_listeners_and_a_thousand_workers_get_whole_answers() {
    let master = Master::spawn_laid_out("scale", |dir| {
        std::fs::create_dir_all(dir.join("s")).unwrap();
        let path = dir.join("baton.yaml");
        std::fs::write(
            &path,
            yaml(IDLE_WORKERS).replace("{dir}", &dir.display().to_string()),
        )
        .unwrap();
        path
    });
    master.wait_event(event::SERVING, Duration::from_secs(120), |_| true);
    let (json, took) = timed(&master, &["status", "--json"]);
    let status: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(status["listeners"].as_array().unwrap().len(), LISTENERS);
    let workers: usize = status["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["workers"].as_array().unwrap().len())
        .sum();
    assert_eq!(workers, IDLE_WORKERS + 1);
    eprintln!("status --json: {} bytes in {took:?}", json.len());
    let (text, took) = timed(&master, &["status"]);
    assert!(text.contains("l9999"), "every listener shown");
    eprintln!("status: {} bytes in {took:?}", text.len());
    let (metrics, took) = timed(&master, &["metrics"]);
    assert!(metrics.contains("baton_listener_backlog{listener=\"l9999\"}"));
    eprintln!("metrics: {} bytes in {took:?}", metrics.len());
    let (drain, _) = timed(&master, &["drain-status", "--json"]);
    serde_json::from_str::<Value>(&drain).unwrap();
    // A reload's verdict, and the history that keeps it. With fewer workers: two generations
    // of 1000 (five descriptors each in the master) and 10 000 listeners would pass this
    // machine's 20 000 open files.
    master.write_config(&yaml(200));
    let (verdict, took) = timed(&master, &["reload", "--json"]);
    let verdict: Value = serde_json::from_str(&verdict).unwrap();
    assert_eq!(verdict["ok"], true, "{verdict}");
    eprintln!("reload of {LISTENERS} listeners: {took:?}");
    let (text, _) = timed(&master, &["reload"]);
    assert!(
        text.contains(&format!("(the fullest 5 of {LISTENERS} listeners)")),
        "the verdict's kernel line stays a line: {}",
        text.lines().last().unwrap_or_default().len()
    );
    let (history, _) = timed(&master, &["history", "--json"]);
    let history: Value = serde_json::from_str(&history).unwrap();
    assert_eq!(history.as_array().unwrap().len(), 2);
    eventually(Duration::from_secs(60), "the old generations gone", || {
        let (_, out, _) = master.ctl(&["status", "--json"]);
        let s: Value = serde_json::from_str(&out).ok()?;
        (s["generations"].as_array()?.len() == 1).then_some(())
    });
}

/// A client from before issue 28 says nothing of how much it reads: it is answered in one
/// frame of at most 64 KiB, and an answer larger than that is an error that says why, not a
/// frame it cannot read ("answered in a way this baton does not understand").
#[test]
fn a_client_that_reads_one_small_frame_gets_an_error_naming_the_size() {
    let master = Master::spawn_laid_out("scale-old-client", |dir| {
        std::fs::create_dir_all(dir.join("s")).unwrap();
        let mut y = String::from("listeners:\n");
        for i in 0..1000 {
            y += &format!(
                "  - {{name: l{i}, path: \"{}/s/l{i}.sock\"}}\n",
                dir.display()
            );
        }
        y += &format!(
            "worker:\n  command: {}\n  listeners: [l0]\nsupervisor:\n  runtime_dir: \"{d}/run\"\n  control: {{socket: \"{d}/baton.sock\"}}\n",
            binaries().hello_worker.display(),
            d = dir.display()
        );
        let path = dir.join("baton.yaml");
        std::fs::write(&path, y).unwrap();
        path
    });
    master.wait_event(event::SERVING, Duration::from_secs(60), |_| true);
    let mut stream = std::os::unix::net::UnixStream::connect(master.socket()).unwrap();
    let body = br#"{"version":1,"body":{"type":"status"}}"#;
    stream
        .write_all(&(body.len() as u32).to_be_bytes())
        .unwrap();
    stream.write_all(body).unwrap();
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).unwrap();
    let len = u32::from_be_bytes(header) as usize;
    assert!(len <= 64 * 1024, "one frame an old client reads: {len}");
    let mut answer = vec![0u8; len];
    stream.read_exact(&mut answer).unwrap();
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["body"]["type"], "error", "{answer}");
    let message = answer["body"]["message"].as_str().unwrap();
    assert!(
        message.contains("more than the 65536 this client reads"),
        "{message}"
    );
    // This build's client reads it whole.
    let (code, out, err) = master.ctl(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.len() > 64 * 1024);
}
