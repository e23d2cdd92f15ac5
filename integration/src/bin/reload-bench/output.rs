//! How fast the master forwards workers' output (`output: capture`): one worker writes 50 MB of
//! 100-byte lines as fast as its pipe takes them; the master logs each line with its origin.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use baton_integration::{binaries, procfs};

/// Bytes the flooding worker writes.
pub(crate) const FLOOD: u64 = 50_000_000;

/// One run's figures.
pub(crate) struct Forwarded {
    pub(crate) lines: u64,
    pub(crate) bytes: u64,
    pub(crate) took: Duration,
    pub(crate) master_cpu: Duration,
    pub(crate) rss_kib: u64,
}

/// Runs a master whose one worker floods, its log in `--log-format format` to `log`, until the
/// master has forwarded every byte (its `baton_output_bytes_total`).
pub(crate) fn forward(format: &str, log: &Path) -> Forwarded {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.yaml");
    let socket = dir.path().join("baton.sock");
    std::fs::write(
        &config,
        format!(
            "listeners: []\nworker:\n  command: {}\n  env: {{IT_MODE: \"ready-after:0\", IT_FLOOD_BYTES: \"{FLOOD}\"}}\nsupervisor:\n  control:\n    socket: {}\n",
            binaries().it_worker.display(),
            socket.display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    // (The log goes to the file: stderr stays quiet.)
    let mut master =
        baton_integration::baton_run(&config, format, &["--log-file".as_ref(), log.as_os_str()]);
    // The master's own counters say when every byte went through.
    let deadline = started + Duration::from_secs(300);
    let (lines, bytes) = loop {
        assert!(Instant::now() < deadline, "the flood did not end in 300 s");
        let out = Command::new(&binaries().baton)
            .args(["metrics", "-s"])
            .arg(&socket)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let counter = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
                .unwrap_or(0)
        };
        let bytes = counter("baton_output_bytes_total ");
        if bytes >= FLOOD {
            break (counter("baton_output_lines_total "), bytes);
        }
        std::thread::sleep(Duration::from_millis(20)); // sampling, bounded by the deadline
    };
    let took = started.elapsed();
    let master_cpu = Duration::from_nanos(procfs::cpu_ns(master.id()));
    let rss_kib = procfs::rss_kib(master.id());
    let _ = master.kill();
    let _ = master.wait();
    Forwarded {
        lines,
        bytes,
        took,
        master_cpu,
        rss_kib,
    }
}

pub(crate) fn report() {
    println!(
        "## Workers' output: one worker writes {} MB of 100-byte lines as fast as it can\n",
        FLOOD / 1_000_000
    );
    println!(
        "| master's log | lines/s | MB/s | master CPU per MB | master CPU share | master RSS at the end |"
    );
    println!("|---|---|---|---|---|---|");
    let file = tempfile::NamedTempFile::new().unwrap();
    for (format, log, name) in [
        ("text", Path::new("/dev/null"), "text, to /dev/null"),
        ("json", Path::new("/dev/null"), "JSON, to /dev/null"),
        ("text", file.path(), "text, to a file"),
    ] {
        eprintln!("output: {name} ...");
        let f = forward(format, log);
        let secs = f.took.as_secs_f64();
        let mb = f.bytes as f64 / 1e6;
        println!(
            "| {name} | {:.0} | {:.1} | {:.1} ms | {:.0} % | {:.1} MiB |",
            f.lines as f64 / secs,
            mb / secs,
            f.master_cpu.as_secs_f64() * 1000.0 / mb,
            100.0 * f.master_cpu.as_secs_f64() / secs,
            f.rss_kib as f64 / 1024.0
        );
    }
    println!();
}
