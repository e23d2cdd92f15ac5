//! Readiness probes: a worker is ready when a TCP (or Unix) connection succeeds, or an HTTP
//! `GET` answers `2xx`. Every attempt is bounded in time, attempts are spaced by the probe's
//! interval, and the client reads at most 1 KiB: a backend that answers garbage costs one short
//! attempt per interval.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::debug;

use super::readiness::{Condition, News};
use crate::config::Probe;
use crate::supervisor::{Event, WorkerId};

/// Probes a starting worker until the probe succeeds (then reports it ready) or the task is
/// dropped (the worker left `Starting`). Each attempt is bounded by the probe's timeout, and
/// attempts are `interval` apart: a backend that answers garbage or half-closes costs one short
/// attempt per interval, never a spin.
///
/// With a canary window, probing goes on for that long after readiness: a failure then is
/// reported ([`Event::ProbeFailed`]), and rolls the reload back. After the window, it stops.
pub(super) async fn probe_task(
    worker: WorkerId,
    probe: Probe,
    address: String,
    probation: Option<Duration>,
    events: mpsc::UnboundedSender<News>,
) {
    let attempt = || attempt(&probe, &address);
    let mut last_error = String::new();
    loop {
        match attempt().await {
            Ok(()) => {
                debug!(
                    worker = worker.0,
                    "readiness probe of worker {worker} at {address} succeeded"
                );
                let _ = events.send(News::Ready(worker, Condition::Probe));
                break;
            }
            Err(err) => {
                let err = err.to_string();
                if err != last_error {
                    debug!(
                        worker = worker.0,
                        "readiness probe of worker {worker} at {address}: {err}"
                    );
                    last_error = err.clone();
                }
                // Every failed attempt (one per interval, while the worker starts): the last
                // one is what the verdict says if the worker times out.
                let cause = format!("its readiness probe at {address} failed: {err}");
                let _ = events.send(News::Event(Event::NotReadyBecause { worker, cause }));
            }
        }
        tokio::time::sleep(probe.interval).await;
    }
    let Some(probation) = probation else { return };
    let until = tokio::time::Instant::now() + probation;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(probe.interval).await;
        if let Err(err) = attempt().await {
            let reason = err.to_string();
            let _ = events.send(News::Event(Event::ProbeFailed { worker, reason }));
            return;
        }
    }
}

/// One attempt of `probe` at `address`, within the probe's timeout.
pub(super) async fn attempt(probe: &Probe, address: &str) -> Result<(), ProbeError> {
    tokio::time::timeout(
        probe.timeout,
        probe_once(address, probe.http_path.as_deref()),
    )
    .await
    .unwrap_or(Err(ProbeError::Timeout(probe.timeout)))
}

/// Why one probe attempt failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum ProbeError {
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("write: {0}")]
    Write(std::io::Error),
    #[error("read: {0}")]
    Read(std::io::Error),
    #[error("HTTP status {0}")]
    Status(u16),
    /// The first 40 characters of what came back.
    #[error("not an HTTP response: {0:?}")]
    NotHttp(String),
}

/// One probe attempt: connect (TCP `host:port`, or a Unix socket path), and for HTTP send a GET
/// and require a `2xx` status line.
async fn probe_once(address: &str, http_path: Option<&str>) -> Result<(), ProbeError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        mut stream: S,
        path: Option<&str>,
    ) -> Result<(), ProbeError> {
        let Some(path) = path else { return Ok(()) };
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: baton-probe\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(ProbeError::Write)?;
        // Read until the status line is complete, at most 1 KiB: enough to judge.
        let mut head = Vec::with_capacity(128);
        let mut chunk = [0u8; 256];
        while !head.contains(&b'\n') && head.len() < 1024 {
            let n = stream.read(&mut chunk).await.map_err(ProbeError::Read)?;
            if n == 0 {
                break; // closed (or half-closed): judge what arrived
            }
            head.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&head);
        let line = line.lines().next().unwrap_or("");
        let mut words = line.split_whitespace();
        match (
            words.next(),
            words.next().and_then(|c| c.parse::<u16>().ok()),
        ) {
            (Some(v), Some(code)) if v.starts_with("HTTP/") && (200..300).contains(&code) => Ok(()),
            (Some(v), Some(code)) if v.starts_with("HTTP/") => Err(ProbeError::Status(code)),
            _ => Err(ProbeError::NotHttp(line.chars().take(40).collect())),
        }
    }
    if address.contains('/') {
        let stream = tokio::net::UnixStream::connect(address)
            .await
            .map_err(ProbeError::Connect)?;
        exchange(stream, http_path).await
    } else {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(ProbeError::Connect)?;
        exchange(stream, http_path).await
    }
}

/// A worker's probe addresses that are Unix socket files (a path: it holds a `/`), which the
/// worker bound and nobody else removes.
pub(super) fn socket_files<'a>(addresses: impl IntoIterator<Item = &'a str>) -> Vec<PathBuf> {
    addresses
        .into_iter()
        .filter(|a| a.contains('/'))
        .map(PathBuf::from)
        .collect()
}

/// Removes the probe socket files of a worker that is gone (a server such as HAProxy leaves
/// its Unix sockets behind: one per worker would pile up, a reload after another). Only
/// sockets: a path that is something else now is left alone.
pub(super) fn remove_socket_files(files: &[PathBuf]) {
    use std::os::unix::fs::FileTypeExt;
    for file in files {
        if std::fs::symlink_metadata(file).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(file);
        }
    }
}
