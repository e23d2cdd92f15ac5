//! One bounded accept loop, shared by the control socket and the metrics endpoint: at most
//! `max` clients at once (the rest wait in the kernel's backlog, not in memory), each served by a
//! task of its own, and a failing accept backs off instead of spinning.

use std::future::Future;
use std::io;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tracing::warn;

/// A listener [`accept_bounded`] accepts on.
pub(crate) trait Accept {
    type Stream: Send + 'static;
    fn accept_one(&self) -> impl Future<Output = io::Result<Self::Stream>>;
}

impl Accept for UnixListener {
    type Stream = UnixStream;
    async fn accept_one(&self) -> io::Result<UnixStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    async fn accept_one(&self) -> io::Result<TcpStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Accepts connections forever, each served by a task of its own, at most `max` at once. A slot
/// is taken before accepting, so excess clients wait in the backlog, not in memory; a failing
/// accept (out of descriptors and the like) backs off instead of spinning.
pub(crate) async fn accept_bounded<L: Accept, F>(
    listener: &L,
    what: &str,
    max: usize,
    handle: impl Fn(L::Stream) -> F,
) where
    F: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept_one().await {
            Ok(stream) => {
                let served = handle(stream);
                tokio::spawn(async move {
                    served.await;
                    drop(slot);
                });
            }
            Err(err) => {
                warn!("{what}: accept failed: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
