//! The metrics endpoint (`supervisor.metrics_listen`): `GET /metrics` over HTTP/1.1, answering
//! the text of `baton metrics` (Prometheus text format 0.0.4), for a scraper that cannot run a
//! command; and two probes for an orchestrator (kubelet): `GET /healthz`, 200 while a
//! generation serves and no stop has begun, else 503; `GET /livez`, 200 when the master's event
//! loop answers (within [`ANSWER_TIMEOUT`]), else 503.
//!
//! It reads only: the text comes from the master's event loop through a channel, like a
//! control request, and nothing a client sends can change anything. A client is bounded in
//! time (its request head within [`HEAD_TIMEOUT`], its whole connection within
//! [`CONNECTION_TIMEOUT`]) and gets one answer per connection. Connections are accepted at once,
//! never left waiting behind slow ones: at most [`MAX_PER_SOURCE`] from one address and
//! [`MAX_CONNECTIONS`] in all are held, and one more is closed as soon as it is accepted, so slow
//! or idle clients (a slowloris) cannot keep a kubelet's probe from being read.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// How long a client may take to send its request head (a probe sends it at once).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(1);
/// Connections held at once from one address, and in all.
pub const MAX_PER_SOURCE: usize = 128;
pub const MAX_CONNECTIONS: usize = 2048;
/// Requests waiting for the event loop's answer at once (their clients wait, bounded in number).
pub const MAX_ASKS: usize = 16;
/// How long the event loop may take to produce the text before the answer is 503.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection lives at most: its head, the answer, and the answer's sending.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// What a client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Metrics,
    Health,
    Live,
}

/// A page's answer from the event loop: whether it is good news (200, else 503), and the text.
#[derive(Debug)]
pub struct Answer {
    pub ok: bool,
    pub text: String,
}

/// A request for a page, answered by the master's event loop.
#[derive(Debug)]
pub struct Ask {
    pub page: Page,
    pub reply: oneshot::Sender<Answer>,
}

/// A bound endpoint, not yet serving.
#[derive(Debug)]
pub struct Endpoint {
    pub address: SocketAddr,
    listener: std::net::TcpListener,
}

/// Binds `address` (the error names it).
pub fn bind(address: SocketAddr) -> std::io::Result<Endpoint> {
    let listener = std::net::TcpListener::bind(address)
        .map_err(|e| std::io::Error::new(e.kind(), format!("metrics endpoint {address}: {e}")))?;
    listener.set_nonblocking(true)?;
    Ok(Endpoint { address, listener })
}

/// Serves until the task is aborted (which closes the socket). Must run inside tokio.
pub async fn serve(endpoint: Endpoint, ask: mpsc::Sender<Ask>) {
    let listener = match TcpListener::from_std(endpoint.listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(event = baton_proto::event::METRICS_UNAVAILABLE, address = %endpoint.address, error = %e,
                "metrics endpoint {}: {e}", endpoint.address);
            return;
        }
    };
    let what = format!("metrics endpoint {}", endpoint.address);
    let held = std::sync::Arc::new(std::sync::Mutex::new(Held::default()));
    let mut refused = Refusals::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of descriptors and the like: back off instead of spinning.
                warn!("{what}: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let source = peer.ip();
        let Some(place) = Held::take(&held, source) else {
            refused.note(&what, source);
            drop(stream);
            continue;
        };
        let ask = ask.clone();
        tokio::spawn(async move {
            let _place = place;
            let service = service_fn(move |req| answer(req, ask.clone()));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
        });
    }
}

/// The connections held, by source address.
#[derive(Debug, Default)]
struct Held {
    total: usize,
    by_source: std::collections::HashMap<std::net::IpAddr, usize>,
}

impl Held {
    /// A place for a connection from `source`, if it is under both caps; given back on drop.
    fn take(
        held: &std::sync::Arc<std::sync::Mutex<Held>>,
        source: std::net::IpAddr,
    ) -> Option<Place> {
        let mut h = held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let from_source = h.by_source.get(&source).copied().unwrap_or(0);
        if h.total >= MAX_CONNECTIONS || from_source >= MAX_PER_SOURCE {
            return None;
        }
        h.total += 1;
        h.by_source.insert(source, from_source + 1);
        Some(Place {
            held: held.clone(),
            source,
        })
    }
}

/// One held connection's place.
#[derive(Debug)]
struct Place {
    held: std::sync::Arc<std::sync::Mutex<Held>>,
    source: std::net::IpAddr,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut h = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        h.total -= 1;
        if let std::collections::hash_map::Entry::Occupied(mut n) = h.by_source.entry(self.source) {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
    }
}

/// Connections closed at once for being over a cap: logged at most once a second, with a count.
#[derive(Debug, Default)]
struct Refusals {
    logged: Option<std::time::Instant>,
    count: u64,
}

impl Refusals {
    fn note(&mut self, what: &str, source: std::net::IpAddr) {
        self.count += 1;
        let now = std::time::Instant::now();
        if self
            .logged
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
        {
            self.logged = Some(now);
            warn!(event = baton_proto::event::METRICS_BUSY, source = %source, refused = self.count,
                "{what}: a connection from {source} closed at once: at most {MAX_PER_SOURCE} from one address and {MAX_CONNECTIONS} in all are held ({} refused so far)",
                self.count);
        }
    }
}

async fn answer(
    req: Request<Incoming>,
    ask: mpsc::Sender<Ask>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, text: String| {
        let mut response = Response::new(Full::new(Bytes::from(text)));
        *response.status_mut() = status;
        response
    };
    let page = match req.uri().path() {
        "/metrics" => Page::Metrics,
        "/healthz" => Page::Health,
        "/livez" => Page::Live,
        _ => {
            return Ok(reply(
                StatusCode::NOT_FOUND,
                "baton serves GET /metrics, /healthz and /livez only\n".into(),
            ));
        }
    };
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut response = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET or HEAD only: the metrics endpoint reads, it changes nothing\n".into(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    let (tx, rx) = oneshot::channel();
    let answer = match ask.send(Ask { page, reply: tx }).await {
        Ok(()) => tokio::time::timeout(ANSWER_TIMEOUT, rx)
            .await
            .ok()
            .and_then(Result::ok),
        Err(_) => None,
    };
    let Some(answer) = answer else {
        return Ok(reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "the master did not answer (stopping, or its event loop is stuck)\n".into(),
        ));
    };
    let status = if answer.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = reply(status, answer.text);
    let content_type = match page {
        Page::Metrics => "text/plain; version=0.0.4; charset=utf-8",
        Page::Health | Page::Live => "text/plain; charset=utf-8",
    };
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(response)
}
