//! The accept queue of a listening socket, as the kernel keeps it: how many connections wait
//! for an `accept()` now, and how many may (the backlog the kernel applied, which `listen(2)`
//! caps at `net.core.somaxconn`).
//!
//! TCP: `getsockopt(TCP_INFO)` on the listening socket, whose `tcpi_unacked` and `tcpi_sacked`
//! are the queue's length and limit for a socket in `LISTEN` (what `ss -lt` shows as Recv-Q and
//! Send-Q). Unix stream: the `sock_diag` netlink interface asked for that one socket by inode,
//! with `UDIAG_SHOW_RQLEN` (the same two numbers). Both cost a system call or two: cheap enough
//! to ask on every `baton status` and every few milliseconds during a reload.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::sys::socket::{AddressFamily, MsgFlags, SockaddrLike, SockaddrStorage, getsockname, recv};

use crate::sockdiag::{NLM_F_DUMP, NLM_F_REQUEST, NLMSG_ERROR, NLMSG_HDRLEN, SOCK_DIAG_BY_FAMILY};

/// A listening socket's accept queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptQueue {
    /// Connections waiting to be accepted.
    pub length: u32,
    /// How many may wait; more are dropped (TCP: the SYN or the final ACK is ignored, and
    /// counted in `ListenOverflows`) or refused (Unix: `EAGAIN` to the client).
    pub max: u32,
}

/// The accept queue of the listening socket `fd` (TCP over IPv4 or IPv6, or Unix stream).
pub fn accept_queue(fd: BorrowedFd<'_>) -> io::Result<AcceptQueue> {
    let address: SockaddrStorage = getsockname(fd.as_raw_fd())?;
    match address.family() {
        Some(AddressFamily::Inet | AddressFamily::Inet6) => tcp_queue(fd),
        Some(AddressFamily::Unix) => {
            let inode = nix::sys::stat::fstat(fd)?.st_ino;
            unix_queue(inode)
        }
        _ => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "not a TCP or Unix socket",
        )),
    }
}

fn tcp_queue(fd: BorrowedFd<'_>) -> io::Result<AcceptQueue> {
    // SAFETY: `tcp_info` is plain integers, so all zeros is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is that large, and
    // stores the length it wrote in `len`; `fd` is a valid descriptor for the call's duration.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if info.tcpi_state != TCP_LISTEN {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not listening"));
    }
    Ok(AcceptQueue {
        length: info.tcpi_unacked,
        max: info.tcpi_sacked,
    })
}

const TCP_LISTEN: u8 = 10;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_RQLEN: u16 = 4;
/// `struct unix_diag_msg`: family, type, state, pad, inode, cookie[2].
const UNIX_DIAG_MSG_LEN: usize = 16;

/// `SOCK_DIAG_BY_FAMILY` for the one Unix socket with inode `inode` (any cookie).
fn unix_request(inode: u32) -> Vec<u8> {
    let len = NLMSG_HDRLEN + 24;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel assigns it
    // struct unix_diag_req: family, protocol, pad, states, inode, show, cookie (none).
    m.extend_from_slice(&[libc::AF_UNIX as u8, 0, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    m.extend_from_slice(&inode.to_ne_bytes());
    m.extend_from_slice(&UDIAG_SHOW_RQLEN.to_ne_bytes());
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    m
}

fn unix_queue(inode: u64) -> io::Result<AcceptQueue> {
    let inode = u32::try_from(inode)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "socket inode above 32 bits"))?;
    let fd = crate::sockdiag::ask(&unix_request(inode))?;
    let mut buf = [0u8; 512];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
    parse_unix_answer(&buf[..n])
}

/// The accept queue of every listening Unix stream socket of the namespace, by inode: one
/// `sock_diag` dump. Asking for each socket by inode costs the kernel a walk of every Unix
/// socket per question (`unix_lookup_by_ino`): for 10 000 listeners, most of a second.
pub fn unix_queues() -> io::Result<std::collections::HashMap<u64, AcceptQueue>> {
    let mut queues = std::collections::HashMap::new();
    let mut request = unix_request(0);
    // A dump of the sockets in TCP_LISTEN state (Unix sockets use the same state numbers).
    request[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request[NLMSG_HDRLEN + 4..NLMSG_HDRLEN + 8]
        .copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    crate::sockdiag::dump_messages(&request, |body| {
        if body.len() < UNIX_DIAG_MSG_LEN {
            return;
        }
        let inode = u32::from_ne_bytes([body[4], body[5], body[6], body[7]]);
        if let Some(queue) = rqlen_attribute(&body[UNIX_DIAG_MSG_LEN..]) {
            queues.insert(u64::from(inode), queue);
        }
    })?;
    Ok(queues)
}

/// The `UNIX_DIAG_RQLEN` attribute among `attributes` (length, type, value; 4-byte aligned).
fn rqlen_attribute(attributes: &[u8]) -> Option<AcceptQueue> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(
            attributes.get(at..at + 4)?.try_into().ok()?,
        ))
    };
    let half = |at: usize| -> Option<u16> {
        Some(u16::from_ne_bytes(
            attributes.get(at..at + 2)?.try_into().ok()?,
        ))
    };
    let mut at = 0;
    while at + 4 <= attributes.len() {
        let len = half(at)? as usize;
        if len < 4 {
            return None;
        }
        if half(at + 2)? == UNIX_DIAG_RQLEN {
            return Some(AcceptQueue {
                length: word(at + 4)?,
                max: word(at + 8)?,
            });
        }
        at += (len + 3) & !3;
    }
    None
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("unix_diag: {what}"))
}

fn parse_unix_answer(buf: &[u8]) -> io::Result<AcceptQueue> {
    let word = |at: usize| -> io::Result<u32> {
        let bytes = buf.get(at..at + 4).ok_or_else(|| invalid("truncated"))?;
        Ok(u32::from_ne_bytes(
            bytes.try_into().map_err(|_| invalid("truncated"))?,
        ))
    };
    let half = |at: usize| -> io::Result<u16> {
        let bytes = buf.get(at..at + 2).ok_or_else(|| invalid("truncated"))?;
        Ok(u16::from_ne_bytes(
            bytes.try_into().map_err(|_| invalid("truncated"))?,
        ))
    };
    let len = (word(0)? as usize).min(buf.len());
    match half(4)? {
        NLMSG_ERROR => {
            let errno = word(NLMSG_HDRLEN)? as i32;
            return Err(io::Error::from_raw_os_error(-errno));
        }
        SOCK_DIAG_BY_FAMILY => {}
        other => return Err(invalid(&format!("message type {other}"))),
    }
    // The attributes follow the message.
    buf.get(NLMSG_HDRLEN + UNIX_DIAG_MSG_LEN..len)
        .and_then(rqlen_attribute)
        .ok_or_else(|| invalid("no queue length in the answer"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_tcp_listeners_queue_counts_connections_not_yet_accepted() {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None);
        let socket = socket.unwrap();
        socket
            .bind(
                &"127.0.0.1:0"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
        socket.listen(7).unwrap();
        let address = socket.local_addr().unwrap().as_socket().unwrap();
        assert_eq!(
            accept_queue(socket.as_fd()).unwrap(),
            AcceptQueue { length: 0, max: 7 }
        );
        let clients: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(address).unwrap())
            .collect();
        // The handshake completes in the kernel; the queue fills as the final ACKs arrive.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while accept_queue(socket.as_fd()).unwrap().length < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "queue never reached 3"
            );
            std::thread::yield_now();
        }
        let _ = socket.accept().unwrap();
        assert_eq!(accept_queue(socket.as_fd()).unwrap().length, 2);
        drop(clients);
    }

    #[test]
    fn a_unix_listeners_queue_too() {
        let dir = std::env::temp_dir().join(format!("baton-acceptq-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None);
        let socket = socket.unwrap();
        socket
            .bind(&socket2::SockAddr::unix(&dir).unwrap())
            .unwrap();
        socket.listen(5).unwrap();
        let _a = std::os::unix::net::UnixStream::connect(&dir).unwrap();
        let _b = std::os::unix::net::UnixStream::connect(&dir).unwrap();
        let queue = accept_queue(socket.as_fd());
        // The dump of every listening Unix socket says the same of it.
        let inode = nix::sys::stat::fstat(socket.as_fd()).unwrap().st_ino;
        let dumped = unix_queues().unwrap().get(&inode).copied();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(queue.unwrap(), AcceptQueue { length: 2, max: 5 });
        assert_eq!(dumped, Some(AcceptQueue { length: 2, max: 5 }));
    }

    #[test]
    fn a_socket_that_does_not_listen_is_refused() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(accept_queue(udp.as_fd()).is_err());
    }

    #[test]
    fn an_error_answer_carries_its_errno() {
        let mut answer = vec![0u8; 36];
        answer[0..4].copy_from_slice(&36u32.to_ne_bytes());
        answer[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        answer[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        let err = parse_unix_answer(&answer).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        assert!(parse_unix_answer(&answer[..10]).is_err());
    }
}
