//! The listeners a worker receives ([`Listener`]), the connections it accepts ([`Stream`]), and
//! the check that turns a received descriptor into a listener: a listening stream socket or a
//! datagram socket, as the manifest says, bound where it says.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use baton_proto::{ListenerAddress, ListenerInfo};
use baton_sys::channel;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UdpSocket, UnixDatagram, UnixListener, UnixStream};

use crate::WorkerError;

/// A socket handed over by the master: a listening stream socket, or a datagram socket that
/// every generation reads (`kind: udp`, `kind: unix-datagram`).
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
    Udp(UdpSocket),
    UnixDatagram(UnixDatagram),
}

impl Listener {
    /// Accepts one connection. A datagram socket has none to accept: it fails with
    /// `ErrorKind::Unsupported` (read it with `recv_from` instead).
    pub async fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l) => l.accept().await.map(|(s, _)| Stream::Unix(s)),
            Listener::Udp(_) | Listener::UnixDatagram(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a datagram socket has no connections to accept: read it with recv_from",
            )),
        }
    }
}

/// An accepted connection of either kind.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl std::os::fd::AsFd for Stream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl Stream {
    /// The connection's descriptor, out of the runtime (to offer it in a handoff).
    pub fn into_owned_fd(self) -> std::io::Result<std::os::fd::OwnedFd> {
        Ok(match self {
            Stream::Tcp(s) => s.into_std()?.into(),
            Stream::Unix(s) => s.into_std()?.into(),
        })
    }

    /// A connection from its descriptor (an adopted one), registered with the runtime.
    pub fn from_owned_fd(fd: std::os::fd::OwnedFd) -> std::io::Result<Stream> {
        use std::os::fd::AsFd;
        let unix = matches!(
            baton_sys::channel::local_address(fd.as_fd())?,
            baton_sys::channel::LocalAddress::Unix(_)
        );
        Ok(if unix {
            let s = std::os::unix::net::UnixStream::from(fd);
            s.set_nonblocking(true)?;
            Stream::Unix(UnixStream::from_std(s)?)
        } else {
            let s = std::net::TcpStream::from(fd);
            s.set_nonblocking(true)?;
            Stream::Tcp(TcpStream::from_std(s)?)
        })
    }
}

macro_rules! delegate {
    ($self:ident, $method:ident($($arg:ident),*)) => {
        match $self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).$method($($arg),*),
            Stream::Unix(s) => Pin::new(s).$method($($arg),*),
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, poll_shutdown(cx))
    }
}

/// A received descriptor as the listener `info` announces, or why it is not that.
pub(crate) fn adopt(info: &ListenerInfo, fd: OwnedFd) -> Result<Listener, WorkerError> {
    let not_a_listener = || WorkerError::NotAListener {
        name: info.name.clone(),
    };
    let datagram = info.address.is_datagram();
    match channel::socket_kind(fd.as_fd()) {
        Ok(kind) if datagram && kind.sock_type == channel::SockType::Datagram => {}
        Ok(kind) if !datagram && kind.listening && kind.sock_type == channel::SockType::Stream => {}
        _ => return Err(not_a_listener()),
    }
    // The descriptor must be bound where the manifest says: a mixed-up handoff is refused.
    let local = channel::local_address(fd.as_fd()).map_err(|source| WorkerError::Adopt {
        name: info.name.clone(),
        source,
    })?;
    let matches = match (&info.address, &local) {
        (
            ListenerAddress::Tcp { address } | ListenerAddress::Udp { address },
            channel::LocalAddress::Inet(got),
        ) => got.ip() == address.ip() && (address.port() == 0 || got.port() == address.port()),
        (
            ListenerAddress::Unix { path } | ListenerAddress::UnixDatagram { path },
            channel::LocalAddress::Unix(got),
        ) => got.as_deref() == Some(path.as_path()),
        _ => false,
    };
    if !matches {
        return Err(WorkerError::WrongSocket {
            name: info.name.clone(),
            address: info.address.to_string(),
            actual: format!("{local:?}"),
        });
    }
    let adopt_err = |source| WorkerError::Adopt {
        name: info.name.clone(),
        source,
    };
    // Non-blocking for tokio (O_NONBLOCK is the descriptor's, whatever the socket's kind).
    baton_sys::pipe::set_nonblocking(fd.as_fd()).map_err(adopt_err)?;
    match info.address {
        ListenerAddress::Tcp { .. } => TcpListener::from_std(fd.into()).map(Listener::Tcp),
        ListenerAddress::Unix { .. } => UnixListener::from_std(fd.into()).map(Listener::Unix),
        ListenerAddress::Udp { .. } => UdpSocket::from_std(fd.into()).map(Listener::Udp),
        ListenerAddress::UnixDatagram { .. } => {
            UnixDatagram::from_std(fd.into()).map(Listener::UnixDatagram)
        }
    }
    .map_err(adopt_err)
}
