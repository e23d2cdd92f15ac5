//! TCP connections from the kernel's `sock_diag` netlink interface (`NETLINK_SOCK_DIAG`,
//! `SOCK_DIAG_BY_FAMILY`), the interface `ss(8)` uses.
//!
//! The kernel filters by state and port, so the answer holds the wanted connections only. Reading
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

// Netlink's and sock_diag's numbers (`linux/netlink.h`, `linux/sock_diag.h`), for this room
// and `acceptq`'s Unix-socket requests.
pub(crate) const SOCK_DIAG_BY_FAMILY: u16 = 20;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub(crate) const NLMSG_HDRLEN: usize = 16;
/// The TCP states of a connection a process may still hold: established, or closing with the
/// process's end still open (`FIN_WAIT1`, `FIN_WAIT2`, `CLOSE_WAIT`, `LAST_ACK`, `CLOSING`).
/// Not `TIME_WAIT` (no process holds it; there may be many), `LISTEN`, nor a handshake.
const CONNECTION_STATES: u32 = 1 << 1 | 1 << 4 | 1 << 5 | 1 << 8 | 1 << 9 | 1 << 11;
const IPPROTO_TCP: u8 = 6;
/// `struct inet_diag_msg`: family, state, timer, retrans, the 48-byte socket id, expires,
/// rqueue, wqueue, uid, inode.
const DIAG_MSG_LEN: usize = 72;
const SPORT_AT: usize = 4;
const INODE_AT: usize = 68;

/// Ports per address family: the local ports of the listeners whose connections are wanted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ports {
    pub v4: HashSet<u16>,
    pub v6: HashSet<u16>,
}

/// Most ports tested one by one in the kernel; above this the kernel filters by the range from
/// the lowest to the highest, and the rest is filtered here.
const PORTS_TESTED_ONE_BY_ONE: usize = 64;

/// The inodes of the TCP connections (established, or closing with a process's end still
/// open) whose local port is one of `ports` (of its address family). The kernel walks every
/// TCP socket of the namespace for each family asked (a family without ports is not asked)
/// and sends only the connections whose port passes the filter (see [`port_filter`]), so the
/// cost is the walk, not the answer.
pub fn connection_inodes(ports: &Ports) -> io::Result<HashSet<u64>> {
    let mut inodes = HashSet::new();
    for (family, ports) in [
        (libc::AF_INET as u8, &ports.v4),
        (libc::AF_INET6 as u8, &ports.v6),
    ] {
        if !ports.is_empty() {
            dump(family, ports, &mut inodes)?;
        }
    }
    Ok(inodes)
}

/// `INET_DIAG_REQ_BYTECODE`: the request's attribute that holds a filter program.
const INET_DIAG_REQ_BYTECODE: u16 = 1;
/// The filter's operations (`linux/inet_diag.h`).
const BC_JMP: u8 = 1;
const BC_S_GE: u8 = 2;
const BC_S_LE: u8 = 3;
const BC_S_EQ: u8 = 11;

/// One `struct inet_diag_bc_op`: a code, the jump when the test holds, the jump when it fails
/// (both in bytes from this operation). A port comparison is followed by a second operation
/// whose `no` field holds the port (host byte order).
fn op(code: u8, yes: u8, no: u16) -> [u8; 4] {
    let [a, b] = no.to_ne_bytes();
    [code, yes, a, b]
}

/// The kernel's filter program for "the local port is one of `ports`". The kernel runs it on
/// each socket: a socket passes if the program ends exactly at its last byte, and fails if a
/// jump goes past it. Up to [`PORTS_TESTED_ONE_BY_ONE`] ports, one test per port, each
/// followed by a jump to the end when it holds, the whole ended by a jump past the end (no
/// port matched); more ports, the range from the lowest to the highest. The kernel checks a
/// program before it runs it (`inet_diag_bc_audit`): every jump a multiple of 4, at least one
/// operation long, landing on an operation or at the end (or 4 past it, to fail).
fn port_filter(ports: &HashSet<u16>) -> Vec<u8> {
    let mut sorted: Vec<u16> = ports.iter().copied().collect();
    sorted.sort_unstable();
    let mut bc = Vec::new();
    if sorted.len() > PORTS_TESTED_ONE_BY_ONE {
        let (low, high) = (sorted[0], sorted[sorted.len() - 1]);
        // At or above `low`: go on, else fail (4 past the end of the 16 bytes).
        bc.extend(op(BC_S_GE, 8, 20));
        bc.extend(op(0, 0, low));
        // At or below `high`: the end (pass), else fail.
        bc.extend(op(BC_S_LE, 8, 12));
        bc.extend(op(0, 0, high));
        return bc;
    }
    // Each port: 12 bytes (the test, its port, the jump to the end); then one failing jump.
    let len = sorted.len() * 12 + 4;
    for (i, port) in sorted.iter().enumerate() {
        let at = i * 12;
        bc.extend(op(BC_S_EQ, 8, 12));
        bc.extend(op(0, 0, *port));
        // The jump's `no` is taken: from this operation to the end.
        bc.extend(op(BC_JMP, 4, (len - (at + 8)) as u16));
    }
    // Reached when no port matched: 8 bytes on from the last 4 is past the end, a failure.
    bc.extend(op(BC_JMP, 4, 8));
    bc
}

fn request(family: u8, filter: &[u8]) -> Vec<u8> {
    let attribute = if filter.is_empty() {
        0
    } else {
        4 + filter.len()
    };
    let len = NLMSG_HDRLEN + 56 + attribute;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel assigns it
    // struct inet_diag_req_v2: family, protocol, ext, pad, states, then a zero socket id (any).
    m.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    m.extend_from_slice(&CONNECTION_STATES.to_ne_bytes());
    m.resize(NLMSG_HDRLEN + 56, 0);
    if !filter.is_empty() {
        // struct nlattr: its length (header included), its type; then the program.
        m.extend_from_slice(&(attribute as u16).to_ne_bytes());
        m.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        m.extend_from_slice(filter);
    }
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
    dump_messages(&request(family, &port_filter(ports)), |body| {
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

    fn v4(ports: impl IntoIterator<Item = u16>) -> Ports {
        Ports {
            v4: ports.into_iter().collect(),
            v6: HashSet::new(),
        }
    }

    /// A listener and one connection accepted on it: (listener, client side, server side).
    fn connected(
        at: &str,
    ) -> (
        std::net::TcpListener,
        std::net::TcpStream,
        std::net::TcpStream,
    ) {
        let listener = std::net::TcpListener::bind(at).unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (listener, client, server)
    }

    #[test]
    fn finds_the_connections_on_a_local_port_and_nothing_else() {
        let (listener, client, server) = connected("127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        let found = connection_inodes(&v4([port])).unwrap();
        // The accepted socket has the port as its local port; the client's is the peer's.
        assert!(found.contains(&inode(&server)), "{found:?}");
        assert!(!found.contains(&inode(&client)));
        assert!(
            !found.contains(&inode(&listener)),
            "a listener is not a connection"
        );
        // (Other sockets of this machine may have the port as theirs too: a client's source
        // port on another address. Only this test's sockets are asserted on.)
        if let Ok((v6, _c, s6)) = std::panic::catch_unwind(|| connected("[::1]:0")) {
            let port6 = v6.local_addr().unwrap().port();
            let only_v6 = Ports {
                v4: HashSet::new(),
                v6: HashSet::from([port6]),
            };
            let found = connection_inodes(&only_v6).unwrap();
            assert!(found.contains(&inode(&s6)), "IPv6 too");
            // The same port number asked as IPv4 does not find it: the family is in the ask.
            assert!(
                !connection_inodes(&v4([port6]))
                    .unwrap()
                    .contains(&inode(&s6))
            );
        }
        assert!(connection_inodes(&Ports::default()).unwrap().is_empty());
        // The client closes (its FIN crosses loopback at once): the server's end is in
        // CLOSE_WAIT, still the server's to close, and still found.
        drop(client);
        assert!(
            connection_inodes(&v4([port]))
                .unwrap()
                .contains(&inode(&server))
        );
    }

    /// The kernel runs the port filter, and refuses a malformed one (EINVAL), so a filter that
    /// passes this test is one the kernel accepted and applied: a port between two asked ports,
    /// or beside them, is not found, with few ports (one test each) and many (a range).
    #[test]
    fn the_kernels_port_filter_passes_the_asked_ports_only() {
        let sockets: Vec<_> = (0..3).map(|_| connected("127.0.0.1:0")).collect();
        let port = |i: usize| sockets[i].0.local_addr().unwrap().port();
        let server = |i: usize| inode(&sockets[i].2);
        let found = connection_inodes(&v4([port(0), port(2)])).unwrap();
        let mine = |found: &HashSet<u64>| -> Vec<bool> {
            (0..3).map(|i| found.contains(&server(i))).collect()
        };
        assert_eq!(mine(&found), [true, false, true], "{found:?}");
        // What the kernel sent, before baton's own check of the port: the filter ran there.
        let mut sent = HashSet::new();
        let filter = port_filter(&HashSet::from([port(0), port(2)]));
        dump_messages(&request(libc::AF_INET as u8, &filter), |body| {
            sent.insert(u64::from(u32::from_ne_bytes(
                body[INODE_AT..INODE_AT + 4].try_into().unwrap(),
            )));
        })
        .unwrap();
        assert_eq!(mine(&sent), [true, false, true], "{sent:?}");
        // More ports than are tested one by one: the kernel filters by range, baton the rest.
        let mut many: HashSet<u16> = (1..=PORTS_TESTED_ONE_BY_ONE as u16 + 1).collect();
        many.insert(port(1));
        assert_eq!(port_filter(&many).len(), 16, "a range: two comparisons");
        let found = connection_inodes(&v4(many)).unwrap();
        assert_eq!(mine(&found), [false, true, false], "{found:?}");
    }
}
