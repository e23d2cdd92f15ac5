//! `hello-worker`: the example baton worker, an HTTP/1.1 server on hyper.
//!
//! It answers every request with `200 hello from pid P, generation G`, and drains without losing
//! a request, including on kept-alive connections:
//!
//! 1. On a drain request it stops accepting (closing its copy of each listener: connections
//!    waiting in the kernel queue stay there for the new generation, since the socket is shared).
//! 2. Requests in flight finish normally.
//! 3. The next response on every kept-alive connection carries `Connection: close`, and the
//!    connection closes right after it: the client learns it must reconnect, and loses nothing.
//! 4. A connection that stays idle is closed only after `--idle-grace`. Closing an idle
//!    connection at once races with a client that is just sending its next request: that is how
//!    nginx loses about one request per kept-alive client on every reload.
//! 5. When the last connection is gone, it exits 0.
//!
//! `GET /?delay_ms=N` waits N ms (at most 60000) before answering, to hold a request in flight.
//! With `--tag T` the body ends in `, tag T`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use baton_worker::{DrainWatch, Listener, Worker};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::task::JoinSet;
use tracing::{info, warn};

#[derive(Parser)]
#[command(about = "Example baton worker: HTTP/1.1 hello server that drains without loss")]
struct Args {
    /// After a drain request, how long an idle kept-alive connection stays open before it is
    /// closed (milliseconds).
    #[arg(long, default_value_t = 2000)]
    idle_grace_ms: u64,

    /// A word appended to every response body (`..., tag T`): benchmarks put a fresh one in the
    /// configuration before each reload to see when the new configuration serves.
    #[arg(long)]
    tag: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let idle_grace = Duration::from_millis(args.idle_grace_ms);
    let tag: Arc<str> = args
        .tag
        .map_or_else(String::new, |t| format!(", tag {t}"))
        .into();

    let mut worker = Worker::from_env()
        .await
        .context("receiving listeners from baton")?;
    let listeners = worker.take_all();
    let worker = Arc::new(worker);
    let names: Vec<String> = listeners.iter().map(|(name, _)| name.clone()).collect();

    let mut accepting = JoinSet::new();
    for (_, listener) in listeners {
        accepting.spawn(accept_loop(
            listener,
            worker.clone(),
            idle_grace,
            tag.clone(),
        ));
    }
    worker.ready().await.context("reporting ready")?;
    let pid = std::process::id();
    let generation = worker.generation();
    info!(
        "hello-worker pid {pid} generation {generation} ready on {}",
        names.join(", ")
    );

    let reason = worker.drain_watch().requested().await;
    accepting.join_all().await;
    let _ = worker.draining().await;
    info!(
        "pid {pid} draining ({reason}): {} connections open",
        worker.connections()
    );
    worker.idle().await;
    info!("pid {pid} drained: exiting");
    Ok(())
}

/// Accepts until a drain is requested, then drops the listener. While the generation stands by
/// (a newer one is on probation), it does not accept, but keeps the listener to resume.
async fn accept_loop(listener: Listener, worker: Arc<Worker>, idle_grace: Duration, tag: Arc<str>) {
    let mut drain = worker.drain_watch();
    let mut gate = worker.accept_gate();
    loop {
        if !gate.is_open() {
            tokio::select! {
                _ = drain.requested() => return,
                () = gate.changed() => continue,
            }
        }
        tokio::select! {
            biased;
            _ = drain.requested() => return,
            () = gate.changed() => {}
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    let guard = worker.track();
                    let ctx = Ctx { drain: worker.drain_watch(), generation: worker.generation(), tag: tag.clone() };
                    tokio::spawn(async move {
                        serve(stream, ctx, idle_grace).await;
                        drop(guard);
                    });
                }
                Err(err) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    warn!("accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

#[derive(Clone)]
struct Ctx {
    drain: DrainWatch,
    generation: u64,
    tag: Arc<str>,
}

async fn serve(stream: baton_worker::Stream, ctx: Ctx, idle_grace: Duration) {
    let mut drain = ctx.drain.clone();
    let service = service_fn(move |req| respond(req, ctx.clone()));
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = drain.requested() => {}
    }
    // Draining: the next response says `Connection: close` (see `respond`), which ends a busy
    // connection. Only one that stays idle through the grace period is closed by us.
    tokio::select! {
        _ = conn.as_mut() => {}
        () = tokio::time::sleep(idle_grace) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

async fn respond(req: Request<Incoming>, ctx: Ctx) -> Result<Response<Full<Bytes>>, Infallible> {
    let delay = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("delay_ms=")))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        .min(60_000);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let pid = std::process::id();
    let body = format!(
        "hello from pid {pid}, generation {}{}\n",
        ctx.generation, ctx.tag
    );
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert("x-baton-pid", HeaderValue::from(pid));
    headers.insert("x-baton-generation", HeaderValue::from(ctx.generation));
    if ctx.drain.is_requested() {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response)
}
