//! The worker channel: a `SOCK_SEQPACKET` socket pair carrying packets and `SCM_RIGHTS`.
//!
//! Each end is used through a [`tokio::net::UnixDatagram`]: `send(2)` and `recv(2)` on a
//! connected `SOCK_SEQPACKET` socket behave exactly as on a connected datagram socket (one packet
//! per call), and a peer that has gone away reads as a zero-length packet. The protocol never sends
//! an empty packet, so zero bytes means end of stream.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{self, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, sockopt};
use sendfd::SendWithFd;
use tokio::io::Interest;
use tokio::net::UnixDatagram;

/// Creates a connected `SOCK_SEQPACKET` pair. Both ends are close-on-exec and blocking.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// Wraps one end of a channel for use on the tokio runtime (sets it non-blocking).
pub fn into_async(fd: OwnedFd) -> io::Result<UnixDatagram> {
    let std = std::os::unix::net::UnixDatagram::from(fd);
    std.set_nonblocking(true)?;
    UnixDatagram::from_std(std)
}

/// Sends one packet with `fds` attached as `SCM_RIGHTS` (at most `SCM_MAX_FD`, 253).
pub async fn send_with_fds(
    sock: &UnixDatagram,
    packet: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let mut patience = std::time::Duration::from_millis(10);
    // Set when a wait for writability ended without a wakeup: tokio then still believes the
    // socket unwritable and would not even try, so the next try is `sendmsg` itself.
    let mut stale = false;
    loop {
        let sent = if stale {
            send_now(sock, packet, &raw)
        } else {
            sock.send_with_fd(packet, &raw)
        };
        match sent {
            Ok(sent) if sent == packet.len() => return Ok(()),
            Ok(sent) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("packet truncated: sent {sent} of {} bytes", packet.len()),
                ));
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            // Usually the peer's queue is full, and its reading makes the socket writable
            // (sendfd's tokio implementation cleared the readiness, so this waits, not spins).
            // The kernel also says EAGAIN when it is short of memory for the packet, and then
            // no wakeup need come: try again after a while anyway, backing off to a second.
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                stale = tokio::time::timeout(patience, sock.writable())
                    .await
                    .is_err();
                patience = (patience * 2).min(std::time::Duration::from_secs(1));
            }
            Err(err) => return Err(err),
        }
    }
}

/// `sendmsg` on the socket now, whatever tokio believes of its readiness.
fn send_now(sock: &UnixDatagram, packet: &[u8], raw: &[RawFd]) -> io::Result<usize> {
    let iov = [io::IoSlice::new(packet)];
    let rights = [socket::ControlMessage::ScmRights(raw)];
    let cmsgs: &[socket::ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    socket::sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(io::Error::from)
}

/// One received packet.
#[derive(Debug)]
pub struct Received {
    /// Bytes of the packet placed in the buffer; 0 means the peer closed the channel.
    pub len: usize,
    /// Descriptors that arrived with the packet, in order, each close-on-exec.
    pub fds: Vec<OwnedFd>,
    /// The packet was larger than the buffer and was cut (`MSG_TRUNC`).
    pub truncated: bool,
    /// Some descriptors did not fit the control buffer and were dropped by the kernel
    /// (`MSG_CTRUNC`).
    pub fds_truncated: bool,
}

/// [`recv_with_fds`] without a buffer of the caller's: the packet is read into one buffer of
/// `max_len` bytes per thread and returned as a vector of its own length. For a receiver that
/// waits on many sockets at once (the master, one channel per worker): a buffer per socket,
/// held across the wait, would cost `max_len` per worker.
pub async fn recv_packet(
    sock: &UnixDatagram,
    max_len: usize,
    max_fds: usize,
) -> io::Result<(Vec<u8>, Received)> {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut cmsg = vec![0u8; cmsg_space_for(max_fds)];
    sock.async_io(Interest::READABLE, || {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            if scratch.len() < max_len {
                scratch.resize(max_len, 0);
            }
            let received = recv_now(sock.as_fd(), &mut scratch[..max_len], &mut cmsg)?;
            Ok((scratch[..received.len].to_vec(), received))
        })
    })
    .await
}

/// Receives one packet and up to `max_fds` descriptors, waiting until one is available.
///
/// Descriptors are received with `MSG_CMSG_CLOEXEC`, so they never leak into a process the
/// receiver spawns. Truncation is reported, never hidden: callers must treat it as an error.
pub async fn recv_with_fds(
    sock: &UnixDatagram,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<Received> {
    let mut cmsg = vec![0u8; cmsg_space_for(max_fds)];
    sock.async_io(Interest::READABLE, || {
        recv_now(sock.as_fd(), buf, &mut cmsg)
    })
    .await
}

/// Receives one packet now if one is queued (`WouldBlock` if none), closing any descriptor that
/// came with it: for a reader that takes what a peer left before it went.
pub fn try_recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut cmsg = vec![0u8; cmsg_space_for(1)];
    recv_now(sock, buf, &mut cmsg)
}

/// Size of a control buffer that holds `n` descriptors (`CMSG_SPACE`).
fn cmsg_space_for(n: usize) -> usize {
    let bytes = (n.max(1) * std::mem::size_of::<RawFd>()) as u32;
    // SAFETY: CMSG_SPACE is a pure arithmetic macro over its argument; it reads no memory.
    unsafe { libc::CMSG_SPACE(bytes) as usize }
}

#[allow(clippy::ptr_arg)] // nix::recvmsg takes the control buffer as &mut Vec<u8>
fn recv_now(fd: BorrowedFd<'_>, buf: &mut [u8], cmsg: &mut Vec<u8>) -> io::Result<Received> {
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )?;
    let mut fds = Vec::new();
    // ENOBUFS here means the control data itself was malformed; treat it like truncation.
    let mut fds_truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    match msg.cmsgs() {
        Ok(cmsgs) => {
            for cmsg in cmsgs {
                if let ControlMessageOwned::ScmRights(raws) = cmsg {
                    for raw in raws {
                        // SAFETY: `raw` was just installed in this process's fd table by
                        // recvmsg(SCM_RIGHTS); nothing else refers to it, and it is wrapped
                        // exactly once here, so OwnedFd's close-on-drop is sound.
                        fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                    }
                }
            }
        }
        Err(_) => fds_truncated = true,
    }
    Ok(Received {
        len: msg.bytes,
        fds,
        truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
        fds_truncated,
    })
}

/// Takes ownership of a descriptor this process inherited across `execve` at a number announced
/// out of band (`BATON_CHANNEL_FD`, `LISTEN_FDS`, a self-upgrade's state), and marks it
/// close-on-exec so the process's own children do not inherit it.
///
/// A safe function, because it refuses every number it cannot prove unowned: standard input,
/// output and error; a closed number; and a descriptor that is close-on-exec. Everything this
/// process creates is close-on-exec (std, tokio, nix and this crate all create so), and an
/// inherited descriptor cannot be (the exec would have closed it); adopting one sets the flag,
/// under a lock, so the same number is never adopted twice. The one place baton clears the flag
/// on a descriptor it owns is [`crate::upgrade::set_inheritable`], just before its own `execve`.
pub fn adopt_inherited(raw: RawFd) -> io::Result<OwnedFd> {
    static ADOPTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if raw < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {raw} is not one a process inherits for baton (3 or more)"),
        ));
    }
    let _adopting = ADOPTING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // SAFETY: F_GETFD reads the descriptor flags of `raw` and touches no memory; on a closed
    // number it fails with EBADF, which we report instead of adopting a dangling number.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::FD_CLOEXEC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("descriptor {raw} is close-on-exec: not inherited, or adopted already"),
        ));
    }
    // SAFETY: `raw` is open (checked above), at least 3, and not close-on-exec: it was
    // inherited, nothing in this process created it and nothing adopted it before (adopting
    // sets close-on-exec, below, while this lock is held). So no other owner exists.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    Ok(fd)
}

pub use nix::sys::socket::SockType;

/// What kind of socket a descriptor is, for validating received listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketKind {
    /// `SOCK_STREAM`, `SOCK_SEQPACKET`, ...
    pub sock_type: SockType,
    /// The socket is listening (`SO_ACCEPTCONN`).
    pub listening: bool,
}

/// Takes every connection waiting in `listener`'s queue and closes it at once, so that its
/// client learns it is refused instead of waiting for an accept that will not come: for a
/// listener that stopped listening (`shutdown`), whose queue a Unix socket keeps. The socket's
/// file description is made non-blocking first (it is shared with the workers holding it, none
/// of which accepts on it any more), so this never waits. Returns how many were refused.
pub fn refuse_queued(listener: BorrowedFd<'_>) -> io::Result<usize> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(listener, FcntlArg::F_GETFL)?);
    fcntl(listener, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    let mut refused = 0;
    loop {
        match nix::sys::socket::accept4(
            listener.as_raw_fd(),
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        ) {
            Ok(raw) => {
                // SAFETY: accept4 just returned `raw` as a new descriptor that nothing else
                // owns; it is closed right here, once.
                drop(unsafe { OwnedFd::from_raw_fd(raw) });
                refused += 1;
            }
            Err(nix::errno::Errno::EINTR) => continue,
            // Empty (EAGAIN), or a TCP listener that stopped listening (EINVAL): done.
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINVAL) => return Ok(refused),
            Err(err) => return Err(err.into()),
        }
    }
}

/// Reads `SO_TYPE` and `SO_ACCEPTCONN`; fails if `fd` is not a socket.
pub fn socket_kind(fd: BorrowedFd<'_>) -> io::Result<SocketKind> {
    Ok(SocketKind {
        sock_type: socket::getsockopt(&fd, sockopt::SockType)?,
        listening: socket::getsockopt(&fd, sockopt::AcceptConn)?,
    })
}

/// Where a socket is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalAddress {
    Inet(std::net::SocketAddr),
    /// A Unix socket's path, an abstract name as `@name` (`None`: unnamed).
    Unix(Option<std::path::PathBuf>),
}

/// `getsockname` of a socket.
pub fn local_address(fd: BorrowedFd<'_>) -> io::Result<LocalAddress> {
    use nix::sys::socket::{SockaddrLike, SockaddrStorage};
    let addr: SockaddrStorage = socket::getsockname(fd.as_raw_fd())?;
    match addr.family() {
        Some(AddressFamily::Inet) => {
            let a = addr
                .as_sockaddr_in()
                .ok_or_else(|| io::Error::other("bad AF_INET address"))?;
            Ok(LocalAddress::Inet(std::net::SocketAddr::V4((*a).into())))
        }
        Some(AddressFamily::Inet6) => {
            let a = addr
                .as_sockaddr_in6()
                .ok_or_else(|| io::Error::other("bad AF_INET6 address"))?;
            Ok(LocalAddress::Inet(std::net::SocketAddr::V6((*a).into())))
        }
        Some(AddressFamily::Unix) => {
            let unix = addr.as_unix_addr();
            // An abstract name reads as `@name`, as baton's configuration writes it.
            let path = unix
                .and_then(|u| u.path())
                .map(|p| p.to_owned())
                .or_else(|| {
                    let name = unix?.as_abstract()?;
                    let mut at = b"@".to_vec();
                    at.extend_from_slice(name);
                    Some(std::path::PathBuf::from(
                        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&at),
                    ))
                });
            Ok(LocalAddress::Unix(path))
        }
        other => Err(io::Error::other(format!(
            "unsupported address family {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[tokio::test(flavor = "current_thread")]
    async fn packets_and_fds_cross_and_arrive_close_on_exec() {
        let (a, b) = pair().unwrap();
        let (a, b) = (into_async(a).unwrap(), into_async(b).unwrap());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        send_with_fds(&a, b"hello", &[listener.as_fd(), listener.as_fd()])
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let got = recv_with_fds(&b, &mut buf, 4).await.unwrap();
        assert_eq!(&buf[..got.len], b"hello");
        assert_eq!(got.fds.len(), 2);
        assert!(!got.truncated && !got.fds_truncated);
        for fd in &got.fds {
            let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(
                flags & libc::FD_CLOEXEC,
                0,
                "received fd must be close-on-exec"
            );
            let kind = socket_kind(fd.as_fd()).unwrap();
            assert_eq!(
                kind,
                SocketKind {
                    sock_type: SockType::Stream,
                    listening: true
                }
            );
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn truncation_is_reported_and_eof_reads_as_zero() {
        let (a, b) = pair().unwrap();
        let (a, b) = (into_async(a).unwrap(), into_async(b).unwrap());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fds = [l.as_fd(), l.as_fd(), l.as_fd()];
        send_with_fds(&a, b"0123456789", &fds).await.unwrap();
        let mut small = [0u8; 4];
        // Room for one descriptor only: the kernel drops the others and says so.
        let got = recv_with_fds(&b, &mut small, 1).await.unwrap();
        assert!(got.truncated, "a cut packet must be reported");
        assert!(got.fds_truncated, "dropped descriptors must be reported");
        assert!(
            got.fds.len() <= 1 + 1,
            "CMSG_SPACE rounding may fit at most one extra"
        );
        drop(a);
        let eof = recv_with_fds(&b, &mut small, 1).await.unwrap();
        assert_eq!(eof.len, 0);
    }

    #[test]
    fn adopt_rejects_closed_numbers() {
        assert!(adopt_inherited(-1).is_err());
        assert!(adopt_inherited(1_000_000).is_err());
    }

    #[test]
    fn adopt_takes_an_inheritable_number_once_and_nothing_this_process_owns() {
        use std::os::fd::{AsRawFd, IntoRawFd};
        // Standard streams are inheritable but never adopted.
        assert_eq!(
            adopt_inherited(0).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        // What this process creates is close-on-exec: owned by someone here, refused.
        let (owned, other) = pair().unwrap();
        let err = adopt_inherited(owned.as_raw_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        // An inheritable descriptor nobody owns (as after an exec) is adopted, once.
        crate::upgrade::set_inheritable(other.as_fd(), true).unwrap();
        let raw = other.into_raw_fd();
        let adopted = adopt_inherited(raw).unwrap();
        assert_eq!(adopted.as_raw_fd(), raw);
        let again = adopt_inherited(raw).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists, "{again}");
        drop(owned);
    }
}

/// Whether the peer of a connected Unix stream socket closed its end entirely (it exited, or
/// closed the socket), not only shut down its writing half: the kernel then reports `POLLHUP`
/// (a half-close, `shutdown(SHUT_WR)`, reports only `POLLRDHUP`). Asks without waiting.
pub fn peer_closed(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::empty())];
    matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLHUP))
}

#[cfg(test)]
mod peer_tests {
    use std::os::fd::AsFd;

    #[test]
    fn a_closed_peer_is_told_from_a_half_closed_one() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!super::peer_closed(a.as_fd()), "connected");
        b.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(
            !super::peer_closed(a.as_fd()),
            "half-closed: it still reads"
        );
        drop(b);
        assert!(super::peer_closed(a.as_fd()), "gone");
    }
}
