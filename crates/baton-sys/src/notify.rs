//! `NOTIFY_SOCKET`s for systemd-style workers: datagram sockets owned by the master, one per
//! worker, whose datagrams carry the sender's credentials (`SO_PASSCRED`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::socket::{
    self, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, sockopt,
};
use tokio::io::Interest;
use tokio::net::UnixDatagram;

/// Binds a datagram socket in the abstract namespace at `@name`, with `SO_PASSCRED` on.
/// The value of `NOTIFY_SOCKET` for it is `@name`.
pub fn bind_abstract(name: &str) -> io::Result<UnixDatagram> {
    let fd: OwnedFd = socket::socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::PassCred, &true)?;
    socket::bind(fd.as_raw_fd(), &UnixAddr::new_abstract(name.as_bytes())?)?;
    UnixDatagram::from_std(std::os::unix::net::UnixDatagram::from(fd))
}

/// One received notification.
#[derive(Debug)]
pub struct Datagram {
    pub len: usize,
    /// The sender's pid, as the kernel vouches for it.
    pub pid: Option<u32>,
    /// Larger than the buffer: the rest was discarded.
    pub truncated: bool,
}

/// Receives one datagram with its sender's credentials. Descriptors a sender attaches are closed.
pub async fn recv(sock: &UnixDatagram, buf: &mut [u8]) -> io::Result<Datagram> {
    let mut cmsg = nix::cmsg_space!(libc::ucred, [std::os::fd::RawFd; 8]);
    sock.async_io(Interest::READABLE, || {
        let mut iov = [io::IoSliceMut::new(buf)];
        let msg = socket::recvmsg::<()>(
            sock.as_fd().as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        )?;
        let mut pid = None;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                match c {
                    ControlMessageOwned::ScmCredentials(cred) => pid = Some(cred.pid() as u32),
                    ControlMessageOwned::ScmRights(fds) => {
                        for raw in fds {
                            // SAFETY: recvmsg just installed `raw` in our table and nothing else
                            // owns it; wrapping it once and dropping it closes it.
                            drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) });
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(Datagram {
            len: msg.bytes,
            pid,
            truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::linux::net::SocketAddrExt;

    #[tokio::test(flavor = "current_thread")]
    async fn notifications_carry_the_senders_pid_and_truncation_is_reported() {
        let name = format!("baton-test-notify/{}", std::process::id());
        let sock = bind_abstract(&name).unwrap();
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        client.send_to_addr(b"READY=1\nSTATUS=hi", &addr).unwrap();
        let mut buf = [0u8; 64];
        let got = recv(&sock, &mut buf).await.unwrap();
        assert_eq!(&buf[..got.len], b"READY=1\nSTATUS=hi");
        assert_eq!(got.pid, Some(std::process::id()));
        assert!(!got.truncated);
        client.send_to_addr(&[b'x'; 100], &addr).unwrap();
        let got = recv(&sock, &mut buf).await.unwrap();
        assert!(got.truncated);
    }
}
