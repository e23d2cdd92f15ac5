//! `NOTIFY_SOCKET`s for systemd-style workers: datagram sockets owned by the master, one per
//! worker, whose datagrams carry the sender's credentials (`SO_PASSCRED`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    self, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, sockopt,
};
use tokio::io::Interest;
use tokio::net::UnixDatagram;

/// A notify socket bound at a path, removed when dropped.
#[derive(Debug)]
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    /// Binds a datagram socket at `path` (replacing a stale file), with `SO_PASSCRED` on and
    /// mode `0666`: any process may send, and the receiver checks who did from the credentials.
    /// A path (not the abstract namespace) because not every client library supports `@` names.
    pub fn bind(path: &Path) -> io::Result<NotifySocket> {
        let fd: OwnedFd = socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        socket::setsockopt(&fd, sockopt::PassCred, &true)?;
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        let socket = UnixDatagram::from_std(std::os::unix::net::UnixDatagram::from(fd))?;
        Ok(NotifySocket {
            socket,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A close-on-exec duplicate of the socket (a master keeps one to hand to its successor).
    pub fn duplicate(&self) -> io::Result<OwnedFd> {
        use std::os::fd::AsFd;
        self.socket.as_fd().try_clone_to_owned()
    }

    /// Takes over a notify socket bound at `path` by a predecessor (a master before its
    /// self-upgrade).
    pub fn adopt(fd: OwnedFd, path: PathBuf) -> io::Result<NotifySocket> {
        let std = std::os::unix::net::UnixDatagram::from(fd);
        std.set_nonblocking(true)?;
        Ok(NotifySocket {
            socket: UnixDatagram::from_std(std)?,
            path,
        })
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
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
pub async fn recv(sock: &NotifySocket, buf: &mut [u8]) -> io::Result<Datagram> {
    let sock = &sock.socket;
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

    #[tokio::test(flavor = "current_thread")]
    async fn notifications_carry_the_senders_pid_and_truncation_is_reported() {
        let dir = std::env::temp_dir().join(format!("baton-notify-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.sock");
        let sock = NotifySocket::bind(&path).unwrap();
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        client.send_to(b"READY=1\nSTATUS=hi", &path).unwrap();
        let mut buf = [0u8; 64];
        let got = recv(&sock, &mut buf).await.unwrap();
        assert_eq!(&buf[..got.len], b"READY=1\nSTATUS=hi");
        assert_eq!(got.pid, Some(std::process::id()));
        assert!(!got.truncated);
        client.send_to(&[b'x'; 100], &path).unwrap();
        let got = recv(&sock, &mut buf).await.unwrap();
        assert!(got.truncated);
        drop(sock);
        assert!(!path.exists(), "removed with the socket");
        let _ = std::fs::remove_dir(&dir);
    }
}
