//! The metrics endpoint (`supervisor.metrics_listen`): `GET /metrics` over HTTP/1.1, answering
//! the text of `baton metrics` (Prometheus text format 0.0.4), for a scraper that cannot run a
//! command; and two probes for an orchestrator (kubelet): `GET /healthz`, 200 while a
//! generation serves and no stop has begun, else 503; `GET /livez`, 200 when the master's event
//! loop answers (within [`ANSWER_TIMEOUT`]), else 503.
//!
//! It reads only: the text comes from the master's event loop through a channel, like a
//! control request, and nothing a client sends can change anything. A client is bounded in
//! time (its request head within [`HEAD_TIMEOUT`]), in number ([`MAX_CLIENTS`] at once; more
//! wait in the backlog) and gets one answer per connection.

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

use crate::accept::accept_bounded;

/// How long a client may take to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Clients served at once.
pub const MAX_CLIENTS: usize = 16;
/// How long the event loop may take to produce the text before the answer is 503.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

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
            warn!(event = "metrics_unavailable", address = %endpoint.address, error = %e,
                "metrics endpoint {}: {e}", endpoint.address);
            return;
        }
    };
    let what = format!("metrics endpoint {}", endpoint.address);
    accept_bounded(&listener, &what, MAX_CLIENTS, |stream| {
        let ask = ask.clone();
        async move {
            let service = service_fn(move |req| answer(req, ask.clone()));
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
    .await;
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
