//! Connection handoff for hyper's HTTP/1.1 server (feature `hyper`): a kept-alive connection
//! taken apart between requests, and rebuilt where it stopped.
//!
//! A giver wraps its service in [`tracked`], serves the connection as usual, and when it drains
//! hands the connection to [`take_apart`]: that waits for a moment with no request in flight,
//! stops hyper there and gives back the socket and the bytes read and not consumed (the start
//! of the next request, if any), what [`Handoff::offer`](super::Handoff::offer) needs with
//! [`ConnectionKind::Http1`](super::ConnectionKind::Http1). A taker, and a giver whose offer came
//! back, serve the socket again with [`rebuilt`]: hyper reads those bytes first.
//!
//! ```ignore
//! let (service, flight) = http1::tracked(service_fn(respond));
//! let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
//! // ... at the drain:
//! if let Some((socket, unread)) = http1::take_apart(conn, flight).await {
//!     match handoff.offer(socket, ConnectionKind::Http1, unread.clone()).await {
//!         Ok(()) => {}                                            // the taker serves it
//!         Err(kept) => serve(http1::rebuilt(unread, kept.socket)?), // still ours
//!     }
//! }
//! ```

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Poll;

use hyper::body::{Body, Incoming};
use hyper::server::conn::http1::Connection;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::Notify;

use super::Rewind;
use crate::Stream;

/// The stream a handed-off HTTP/1.1 connection is served on: the socket, after the bytes
/// already read.
pub type Io = TokioIo<Rewind<Stream>>;

/// One connection's requests in flight, and whether one came while it was being taken apart.
#[derive(Debug, Default)]
pub struct Flight {
    busy: AtomicUsize,
    idle: Notify,
    taking_apart: AtomicBool,
    answered_late: AtomicBool,
}

/// A service that keeps its connection's [`Flight`].
#[derive(Debug, Clone)]
pub struct Tracked<S> {
    inner: S,
    flight: Arc<Flight>,
}

/// `service`, counting its requests in flight (for [`take_apart`]).
pub fn tracked<S>(service: S) -> (Tracked<S>, Arc<Flight>) {
    let flight = Arc::new(Flight::default());
    let tracked = Tracked {
        inner: service,
        flight: flight.clone(),
    };
    (tracked, flight)
}

impl<S> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = InFlight<S::Future>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let flight = self.flight.clone();
        flight.busy.fetch_add(1, Ordering::AcqRel);
        if flight.taking_apart.load(Ordering::Acquire) {
            flight.answered_late.store(true, Ordering::Release);
        }
        InFlight {
            answer: Box::pin(self.inner.call(request)),
            flight: Some(flight),
        }
    }
}

/// A request being answered: counted in its connection's [`Flight`] until it is answered or
/// dropped (its connection gone).
#[derive(Debug)]
pub struct InFlight<F> {
    answer: Pin<Box<F>>,
    flight: Option<Arc<Flight>>,
}

impl<F> InFlight<F> {
    fn done(&mut self) {
        if let Some(flight) = self.flight.take() {
            flight.busy.fetch_sub(1, Ordering::AcqRel);
            flight.idle.notify_waiters();
        }
    }
}

impl<F: Future> Future for InFlight<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<F::Output> {
        let answer = self.answer.as_mut().poll(cx);
        if answer.is_ready() {
            self.done();
        }
        answer
    }
}

impl<F> Drop for InFlight<F> {
    fn drop(&mut self) {
        self.done();
    }
}

/// Waits for a moment with no request in flight on `conn`, stops hyper there, and returns the
/// socket and the bytes read and not consumed. `None`: the connection ended meanwhile, or a
/// request came as hyper stopped (its answer said `Connection: close`: the client will close
/// it, it is not one to hand off).
pub async fn take_apart<S, B>(
    mut conn: Connection<Io, Tracked<S>>,
    flight: Arc<Flight>,
) -> Option<(OwnedFd, Vec<u8>)>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let idle = flight.idle.notified();
        if flight.busy.load(Ordering::Acquire) == 0 {
            break;
        }
        tokio::select! {
            _ = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => return None,
            () = idle => {}
        }
    }
    flight.taking_apart.store(true, Ordering::Release);
    Pin::new(&mut conn).graceful_shutdown();
    let stopped = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)).await;
    if stopped.is_err() || flight.answered_late.load(Ordering::Acquire) {
        return None;
    }
    let parts = conn.into_parts();
    let (mut unread, stream) = parts.io.into_inner().into_parts();
    unread.extend_from_slice(&parts.read_buf);
    let socket = stream.into_owned_fd().ok()?;
    Some((socket, unread))
}

/// A connection to serve again from where it stopped: `socket`, after `unread` (an adopted
/// connection's state, or what [`take_apart`] returned with a socket whose offer came back).
pub fn rebuilt(unread: Vec<u8>, socket: OwnedFd) -> io::Result<Io> {
    Ok(TokioIo::new(Rewind::new(
        unread,
        Stream::from_owned_fd(socket)?,
    )))
}
