//! `it-worker`: an instrumented or misbehaving worker for tests, chosen by `IT_MODE`:
//!
//! - `exit:<code>`: receive the listeners, then exit with `<code>` without reporting ready.
//! - `never-ready`: receive the listeners and never report ready (nor accept); exit on drain.
//! - `crash-after:<ms>`: report ready, then exit with status 1 after `<ms>` (a crash loop).
//! - `ready-after:<ms>`: report ready only after `<ms>` (a slow start); exit on drain.
//! - `report-fds:<path>`: first thing in `main`, before any runtime exists, write this process's
//!   open descriptors (`<fd> <target>` lines) to `<path>`; then serve like `ready-after:0`.

use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let mode = std::env::var("IT_MODE").unwrap_or_default();
    if let Some(path) = mode.strip_prefix("report-fds:") {
        let mut lines = String::new();
        for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let target = std::fs::read_link(entry.path()).unwrap_or_default();
            lines += &format!(
                "{} {}\n",
                entry.file_name().to_string_lossy(),
                target.display()
            );
        }
        std::fs::write(path, lines).unwrap();
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(&mode))
}

async fn run(mode: &str) -> ExitCode {
    let worker = match baton_worker::Worker::from_env().await {
        Ok(worker) => worker,
        Err(_) => return ExitCode::from(2),
    };
    if let Some(code) = mode.strip_prefix("exit:") {
        return ExitCode::from(code.parse::<u8>().unwrap_or(1));
    }
    if let Some(ms) = mode.strip_prefix("crash-after:") {
        if worker.ready().await.is_err() {
            return ExitCode::from(2);
        }
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        return ExitCode::from(1);
    }
    let delay = match mode.split_once(':') {
        Some(("ready-after", ms)) => Some(ms.parse().unwrap_or(0)),
        Some(("report-fds", _)) => Some(0),
        _ => None,
    };
    if let Some(ms) = delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        if worker.ready().await.is_err() {
            return ExitCode::from(2);
        }
    } else if mode != "never-ready" {
        return ExitCode::from(2);
    }
    worker.drain_watch().requested().await;
    ExitCode::SUCCESS
}
