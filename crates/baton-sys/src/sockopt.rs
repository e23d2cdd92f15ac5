//! Socket options of listening sockets that neither std, socket2 nor nix set: `TCP_DEFER_ACCEPT`
//! (wake the accepting process only once data arrived), the server side of `TCP_FASTOPEN`
//! (the length of the queue of connections whose SYN carried data), and buffer sizes beyond
//! the host's `net.core.rmem_max` for a privileged master (`SO_RCVBUFFORCE`). Each is an
//! integer option.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// A TCP option that is a count (clamped to what a C int holds).
fn set_tcp_count(fd: BorrowedFd<'_>, option: libc::c_int, value: u32) -> io::Result<()> {
    let value = value.min(i32::MAX as u32) as libc::c_int;
    set_int_at(fd, libc::IPPROTO_TCP, option, value)
}

fn set_int_at(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `&value`, which is that large
    // and lives for the call; `fd` is a valid descriptor for its duration.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A TCP option that is a count (a negative reading is 0).
fn tcp_count(fd: BorrowedFd<'_>, option: libc::c_int) -> io::Result<u32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which is that large, and the
    // length written into `len`; `fd` is a valid descriptor for the call's duration.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value.max(0) as u32)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `TCP_DEFER_ACCEPT`: a connection is queued for `accept` only once its first data arrived,
/// waiting at most about `seconds` (0: off). The kernel keeps it as a number of SYN-ACK
/// retransmissions, so reading it back gives the seconds those take (5 reads back as 7).
pub fn set_defer_accept(fd: BorrowedFd<'_>, seconds: u32) -> io::Result<()> {
    set_tcp_count(fd, libc::TCP_DEFER_ACCEPT, seconds)
}

pub fn defer_accept(fd: BorrowedFd<'_>) -> io::Result<u32> {
    tcp_count(fd, libc::TCP_DEFER_ACCEPT)
}

/// `TCP_FASTOPEN` on a listening socket: how many connections whose SYN carried data may wait
/// for their handshake to complete (0: off). Whether clients may use it at all is the host's
/// `net.ipv4.tcp_fastopen` (bit 2 for servers).
pub fn set_fastopen(fd: BorrowedFd<'_>, queue: u32) -> io::Result<()> {
    set_tcp_count(fd, libc::TCP_FASTOPEN, queue)
}

pub fn fastopen(fd: BorrowedFd<'_>) -> io::Result<u32> {
    tcp_count(fd, libc::TCP_FASTOPEN)
}

/// A socket's receive or send buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    Receive,
    Send,
}

/// Sets a socket buffer to `bytes` (the kernel doubles it for its bookkeeping): with
/// `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` where the process may (CAP_NET_ADMIN), so that the host's
/// `net.core.rmem_max`/`wmem_max` do not cap it silently; else with `SO_RCVBUF`/`SO_SNDBUF`,
/// which the kernel caps there.
pub fn set_buffer(fd: BorrowedFd<'_>, buffer: Buffer, bytes: u64) -> io::Result<()> {
    let value = bytes.min(i32::MAX as u64 / 2) as libc::c_int;
    let (force, plain) = match buffer {
        Buffer::Receive => (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        Buffer::Send => (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    };
    match set_int_at(fd, libc::SOL_SOCKET, force, value) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            set_int_at(fd, libc::SOL_SOCKET, plain, value)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn defer_accept_and_fastopen_read_back() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(defer_accept(listener.as_fd()).unwrap(), 0);
        set_defer_accept(listener.as_fd(), 5).unwrap();
        // Rounded up to whole retransmissions.
        assert!(defer_accept(listener.as_fd()).unwrap() >= 5);
        set_fastopen(listener.as_fd(), 64).unwrap();
        assert_eq!(fastopen(listener.as_fd()).unwrap(), 64);
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(set_fastopen(udp.as_fd(), 1).is_err());
    }
}
