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
//! With `--handoff` (connection handoff, `docs/protocol.md`) it hands its kept-alive connections
//! to the serving generation instead: on a drain request, each connection waits for a moment
//! with no request in flight, is taken apart (hyper's parts: the socket and the bytes read of
//! the next request) and offered; the new worker rebuilds it and answers the next request on
//! the same connection. A connection no taker takes drains as above. It also takes the
//! connections of a draining generation.
//!
//! `GET /?delay_ms=N` waits N ms (at most 60000) before answering, to hold a request in flight.
//! With `--tag T` the body ends in `, tag T`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use std::time::Duration;

use anyhow::Context;
use baton_worker::handoff::{ConnectionKind, Handoff, Rewind, http1};
use baton_worker::{DrainWatch, Listener, Worker};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1 as hyper_http1;
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

    /// Connection handoff: hand kept-alive connections to the serving generation when
    /// draining, and take those of a draining generation.
    #[arg(long)]
    handoff: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    baton_worker::log::to_stderr();
    let idle_grace = Duration::from_millis(args.idle_grace_ms);
    let tag: Arc<str> = args
        .tag
        .map_or_else(String::new, |t| format!(", tag {t}"))
        .into();

    let mut worker = Worker::from_env()
        .await
        .context("receiving listeners from baton")?;
    let listeners = worker.take_all();
    let handoff = match args.handoff {
        true => Some(
            worker
                .handoff(true, true)
                .await
                .context("joining the handoff")?,
        ),
        false => None,
    };
    let worker = Arc::new(worker);
    let names: Vec<String> = listeners.iter().map(|(name, _)| name.clone()).collect();

    let mut accepting = JoinSet::new();
    for (_, listener) in listeners {
        accepting.spawn(accept_loop(
            listener,
            worker.clone(),
            idle_grace,
            tag.clone(),
            handoff.clone(),
        ));
    }
    if let Some(handoff) = handoff.clone() {
        tokio::spawn(adopt_loop(handoff, worker.clone(), idle_grace, tag.clone()));
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
    if let Some(handoff) = &handoff {
        handoff.report_now().await;
        let c = handoff.counts();
        info!(
            "pid {pid} handed off {} of {} connections offered",
            c.adopted, c.offered
        );
    }
    info!("pid {pid} drained: exiting");
    Ok(())
}

/// Accepts until a drain is requested, then drops the listener. While the generation stands by
/// (a newer one is on probation), it does not accept, but keeps the listener to resume.
async fn accept_loop(
    listener: Listener,
    worker: Arc<Worker>,
    idle_grace: Duration,
    tag: Arc<str>,
    handoff: Option<Handoff>,
) {
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
                    let ctx = Ctx { drain: worker.drain_watch(), generation: worker.generation(), tag: tag.clone(), handoff: handoff.clone() };
                    tokio::spawn(async move {
                        serve(TokioIo::new(Rewind::new(Vec::new(), stream)), ctx, idle_grace).await;
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

/// Serves the connections handed to this worker by a draining one, from where they were.
async fn adopt_loop(handoff: Handoff, worker: Arc<Worker>, idle_grace: Duration, tag: Arc<str>) {
    while let Some(adopted) = handoff.adopted().await {
        if adopted.kind != ConnectionKind::Http1 {
            continue;
        }
        let io = match http1::rebuilt(adopted.state, adopted.socket) {
            Ok(io) => io,
            Err(err) => {
                warn!("an adopted connection is unusable: {err}");
                continue;
            }
        };
        let guard = worker.track();
        let ctx = Ctx {
            drain: worker.drain_watch(),
            generation: worker.generation(),
            tag: tag.clone(),
            handoff: Some(handoff.clone()),
        };
        tokio::spawn(async move {
            serve(io, ctx, idle_grace).await;
            drop(guard);
        });
    }
}

#[derive(Clone)]
struct Ctx {
    drain: DrainWatch,
    generation: u64,
    tag: Arc<str>,
    /// Connection handoff (`--handoff`); `None` for a connection no taker took.
    handoff: Option<Handoff>,
}

impl Ctx {
    /// Whether a draining connection may be handed off (so it is kept alive meanwhile): until
    /// the worker knows its takers, it may.
    fn hands_off(&self) -> bool {
        self.handoff
            .as_ref()
            .is_some_and(|h| !h.is_settled() || h.takers() > 0)
    }
}

type Reply = Result<Response<Full<Bytes>>, Infallible>;

async fn serve(io: http1::Io, ctx: Ctx, idle_grace: Duration) {
    let mut drain = ctx.drain.clone();
    let service = {
        let ctx = ctx.clone();
        service_fn(move |req| {
            Box::pin(respond(req, ctx.clone())) as Pin<Box<dyn Future<Output = Reply> + Send>>
        })
    };
    // Its requests in flight counted, for a handoff between two of them.
    let (service, flight) = http1::tracked(service);
    let mut conn = hyper_http1::Builder::new().serve_connection(io, service);
    tokio::select! {
        _ = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => return,
        _ = drain.requested() => {}
    }
    if let Some(handoff) = &ctx.handoff {
        // The drain signal can come before the master's packets: wait for the takers.
        let settled = handoff.settled();
        tokio::select! {
            _ = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => return,
            () = settled => {}
        }
    }
    let Some(handoff) = ctx.handoff.clone().filter(|_| ctx.hands_off()) else {
        return drain_connection(conn, idle_grace).await;
    };
    // A moment with no request in flight, then hyper stops at it and gives the parts back.
    let Some((socket, unread)) = http1::take_apart(conn, flight).await else {
        return;
    };
    let offered = handoff
        .offer(socket, ConnectionKind::Http1, unread.clone())
        .await;
    if let Err(kept) = offered {
        info!("connection kept: {}", kept.why);
        let Ok(io) = http1::rebuilt(unread, kept.socket) else {
            return;
        };
        // Served on as draining connections are: the next answer says `Connection: close`.
        let ctx = Ctx {
            handoff: None,
            ..ctx
        };
        let service = service_fn(move |req| respond(req, ctx.clone()));
        let conn = hyper_http1::Builder::new().serve_connection(io, service);
        drain_connection(conn, idle_grace).await;
    }
}

/// A draining connection: the next response says `Connection: close` (see `respond`), which
/// ends a busy connection. Only one that stays idle through the grace period is closed by us.
async fn drain_connection<C>(conn: C, idle_grace: Duration)
where
    C: Future + GracefulShutdown,
{
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = tokio::time::sleep(idle_grace) => {
            conn.as_mut().shutdown_gracefully();
            let _ = conn.await;
        }
    }
}

/// hyper's connections, whatever their service: a graceful shutdown.
trait GracefulShutdown {
    fn shutdown_gracefully(self: Pin<&mut Self>);
}

impl<I, S> GracefulShutdown for hyper_http1::Connection<I, S>
where
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S::ResBody: hyper::body::Body + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shutdown_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
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
    if ctx.drain.is_requested() && !ctx.hands_off() {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response)
}
