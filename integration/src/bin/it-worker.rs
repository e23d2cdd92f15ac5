//! `it-worker`: a misbehaving worker for failure tests, chosen by `IT_MODE`:
//!
//! - `exit:<code>`: receive the listeners, then exit with `<code>` without reporting ready.
//! - `never-ready`: receive the listeners and never report ready (nor accept); exit on drain.
//! - `crash-after:<ms>`: report ready, then exit with status 1 after `<ms>` (a crash loop).

use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mode = std::env::var("IT_MODE").unwrap_or_default();
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
        let ms = ms.parse().unwrap_or(0);
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        return ExitCode::from(1);
    }
    if mode == "never-ready" {
        worker.drain_watch().requested().await;
        return ExitCode::SUCCESS;
    }
    ExitCode::from(2)
}
