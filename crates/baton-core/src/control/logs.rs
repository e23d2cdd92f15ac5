//! `baton logs`: answered by the client's own task from the workers' kept lines, never by the
//! event loop. The kept lines go out in frames under [`MAX_FRAME`]; with `follow`, new lines
//! go on in frames until the client leaves or the master stops. A follower that reads slower
//! than the workers write misses lines, and the next frame says how many (`skipped`): a slow
//! reader never holds up a worker or the master. A follower that hangs up is let go at once.

use baton_proto::control::{MAX_FRAME, OutputFilter, OutputLine, Response};
use tokio::net::UnixStream;
use tokio::sync::broadcast::error::RecvError;

use super::respond;
use crate::config::ControlConfig;
use crate::output::Hub;

/// Room kept in a frame for everything but the lines' text.
const FRAME_SLACK: usize = 4 * 1024;

/// A line's size in a frame at most: its text may double when JSON escapes its backslashes.
fn weight(line: &OutputLine) -> usize {
    2 * (line.text.len() + line.program.len()) + 200
}

pub(super) async fn serve_logs(
    stream: &mut UnixStream,
    config: &ControlConfig,
    hub: &Hub,
    filter: OutputFilter,
    follow: bool,
) {
    // Subscribed before the kept lines are read: a line logged in between is in both, and the
    // follow part skips what the kept part had (by sequence number).
    let mut news = follow.then(|| hub.subscribe());
    let kept = hub.lines(&filter);
    let last = kept.last().map_or(0, |line| line.seq);
    if send_frames(stream, config, kept, 0, !follow).await.is_err() {
        return;
    }
    let Some(news) = news.as_mut() else {
        return;
    };
    loop {
        let mut skipped = 0;
        let mut batch = Vec::new();
        // Wait for one line, then take what else is there without waiting. A follower sends
        // nothing after its request: its socket turning readable means it hung up (or sends
        // what it should not), and it is let go at once, not at the next line.
        let first = tokio::select! {
            line = news.recv() => line,
            _ = stream.readable() => {
                let mut byte = [0u8; 1];
                match stream.try_read(&mut byte) {
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
                    _ => return,
                }
            }
        };
        let mut next = Some(first);
        while let Some(received) = next.take() {
            match received {
                Ok(line) if line.seq > last && filter.matches(&line) => batch.push(line),
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => skipped += n,
                Err(RecvError::Closed) => {
                    let _ = send_frames(stream, config, batch, skipped, true).await;
                    return;
                }
            }
            if batch.iter().map(weight).sum::<usize>() < MAX_FRAME / 2 {
                next = match news.try_recv() {
                    Ok(line) => Some(Ok(line)),
                    Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => {
                        Some(Err(RecvError::Lagged(n)))
                    }
                    Err(_) => None,
                };
            }
        }
        if (batch.is_empty() && skipped == 0)
            || send_frames(stream, config, batch, skipped, false)
                .await
                .is_ok()
        {
            continue;
        }
        return;
    }
}

/// Sends `lines` in as many frames as they need; the last one carries `done`.
async fn send_frames(
    stream: &mut UnixStream,
    config: &ControlConfig,
    lines: Vec<OutputLine>,
    skipped: u64,
    done: bool,
) -> std::io::Result<()> {
    let mut frame = Vec::new();
    let mut size = 0;
    let mut skipped = skipped;
    for line in lines {
        if size + weight(&line) > MAX_FRAME - FRAME_SLACK && !frame.is_empty() {
            let lines = std::mem::take(&mut frame);
            respond(
                stream,
                config,
                logs(lines, std::mem::take(&mut skipped), false),
            )
            .await?;
            size = 0;
        }
        size += weight(&line);
        frame.push(line);
    }
    respond(stream, config, logs(frame, skipped, done)).await
}

fn logs(lines: Vec<OutputLine>, skipped: u64, done: bool) -> Response {
    Response::Logs {
        lines,
        skipped,
        done,
    }
}
