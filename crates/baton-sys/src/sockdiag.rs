//! Established TCP connections from the kernel's `sock_diag` netlink interface
//! (`NETLINK_SOCK_DIAG`, `SOCK_DIAG_BY_FAMILY`), the interface `ss(8)` uses.
//!
//! The kernel filters by state, so the answer holds established sockets only. Reading
//! `/proc/net/tcp` instead formats every socket of the namespace, `TIME_WAIT` ones included (up
//! to `tcp_max_tw_buckets`), and under connection churn took the master most of a second per
//! `baton status`; the master must not stall its event loop on that.
//!
//! Safe code only: the request and the answers are plain bytes, laid out as in
//! `linux/netlink.h` and `linux/inet_diag.h` (native byte order, ports big-endian).

use std::collections::HashSet;
use std::io;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};
use std::os::fd::{AsRawFd, OwnedFd};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
const TCP_ESTABLISHED: u32 = 1;
const IPPROTO_TCP: u8 = 6;
/// `struct inet_diag_msg`: family, state, timer, retrans, the 48-byte socket id, expires,
/// rqueue, wqueue, uid, inode.
const DIAG_MSG_LEN: usize = 72;
const SPORT_AT: usize = 4;
const INODE_AT: usize = 68;

/// The inodes of the established TCP sockets (IPv4 and IPv6) whose local port is in `ports`.
pub fn established_inodes(ports: &HashSet<u16>) -> io::Result<HashSet<u64>> {
    let mut inodes = HashSet::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        dump(family, ports, &mut inodes)?;
    }
    Ok(inodes)
}

fn request(family: u8) -> Vec<u8> {
    let len = NLMSG_HDRLEN + 56;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel assigns it
    // struct inet_diag_req_v2: family, protocol, ext, pad, states, then a zero socket id (any).
    m.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    m.extend_from_slice(&(1u32 << TCP_ESTABLISHED).to_ne_bytes());
    m.resize(len, 0);
    m
}

/// A `sock_diag` netlink socket that sent `request` to the kernel: read the answer from it.
pub(crate) fn ask(request: &[u8]) -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    let kernel = NetlinkAddr::new(0, 0);
    sendto(fd.as_raw_fd(), request, &kernel, MsgFlags::empty())?;
    Ok(fd)
}

fn dump(family: u8, ports: &HashSet<u16>, inodes: &mut HashSet<u64>) -> io::Result<()> {
    dump_messages(&request(family), |body| {
        if body.len() < DIAG_MSG_LEN {
            return;
        }
        let sport = u16::from_be_bytes([body[SPORT_AT], body[SPORT_AT + 1]]);
        let inode = u32::from_ne_bytes([
            body[INODE_AT],
            body[INODE_AT + 1],
            body[INODE_AT + 2],
            body[INODE_AT + 3],
        ]);
        if ports.contains(&sport) {
            inodes.insert(u64::from(inode));
        }
    })
}

/// Sends a dump `request` and calls `each` with the body of every answer message (after its
/// netlink header), until the kernel says it is done.
pub(crate) fn dump_messages(request: &[u8], mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let fd = ask(request)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if n == 0 {
            return Ok(());
        }
        let mut at = 0;
        while at + NLMSG_HDRLEN <= n {
            let field = |i: usize, w: usize| &buf[at + i..at + i + w];
            let len = u32::from_ne_bytes(field(0, 4).try_into().unwrap_or_default()) as usize;
            let kind = u16::from_ne_bytes(field(4, 2).try_into().unwrap_or_default());
            if len < NLMSG_HDRLEN || at + len > n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "sock_diag: truncated message",
                ));
            }
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno =
                        i32::from_ne_bytes(field(NLMSG_HDRLEN, 4).try_into().unwrap_or_default());
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                SOCK_DIAG_BY_FAMILY => each(&buf[at + NLMSG_HDRLEN..at + len]),
                _ => {}
            }
            at += (len + 3) & !3; // NLMSG_ALIGN
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn inode(fd: &impl AsRawFd) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .ino()
    }

    #[test]
    fn finds_the_established_sockets_on_a_local_port_and_nothing_else() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server, _) = listener.accept().unwrap();
        let v6 = std::net::TcpListener::bind("[::1]:0").ok();
        let found = established_inodes(&HashSet::from([port])).unwrap();
        // The accepted socket has the port as its local port; the client's is the peer's.
        assert!(found.contains(&inode(&server)), "{found:?}");
        assert!(!found.contains(&inode(&client)));
        assert!(
            !found.contains(&inode(&listener)),
            "a listener is not established"
        );
        assert_eq!(found.len(), 1, "{found:?}");
        if let Some(v6) = v6 {
            let port6 = v6.local_addr().unwrap().port();
            let _c = std::net::TcpStream::connect(("::1", port6)).unwrap();
            let (s6, _) = v6.accept().unwrap();
            let found = established_inodes(&HashSet::from([port6])).unwrap();
            assert!(found.contains(&inode(&s6)), "IPv6 too: {found:?}");
        }
        assert!(established_inodes(&HashSet::new()).unwrap().is_empty());
    }
}
