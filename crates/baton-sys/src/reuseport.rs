//! Steering QUIC packets within a `SO_REUSEPORT` group of UDP sockets (docs/quic.md).
//!
//! The master binds one UDP socket per generation to the same address, each with
//! `SO_REUSEPORT` before its bind, so they form one group; the kernel numbers the group's
//! sockets in the order they joined (an index that changes only when one leaves). A classic BPF
//! program attached to the group (`SO_ATTACH_REUSEPORT_CBPF`) runs for every datagram with the
//! UDP payload at offset 0 and returns the index of the socket that gets it.
//!
//! [`quic_program`] reads the first [`TAG_LEN`] bytes of the QUIC destination connection ID
//! (offset 1 in a short header; offset 6, after the version and the length byte, in a long
//! header) and returns the index its tag routes to, or the default index (the newest serving
//! generation) for an unknown tag or a packet too short to carry one. It never returns an index
//! the group does not have (the kernel would then hash the packet to any socket).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Bytes of the destination connection ID that carry the tag: its first two.
pub const TAG_LEN: usize = 2;

/// The most tagged routes a program holds (a jump offset is 8 bits).
pub const MAX_ROUTES: usize = 200;

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic value; libc exports it for Android only).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Where packets go: the group index for each tag, and the index for the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicRoutes {
    pub tagged: Vec<(u16, u16)>,
    pub default: u16,
}

fn op(code: u32, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// The classic BPF program for `routes` (at most [`MAX_ROUTES`] tags; more are left out and
/// their packets take the default).
pub fn quic_program(routes: &QuicRoutes) -> Vec<libc::sock_filter> {
    use libc::{BPF_ABS, BPF_B, BPF_H, BPF_JA, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_JSET, BPF_K};
    use libc::{BPF_LD, BPF_LEN, BPF_RET, BPF_W};
    let tagged = &routes.tagged[..routes.tagged.len().min(MAX_ROUTES)];
    let t = tagged.len() as u8;
    let len = BPF_LD | BPF_W | BPF_LEN;
    let byte_at = BPF_LD | BPF_B | BPF_ABS;
    let half_at = BPF_LD | BPF_H | BPF_ABS;
    let jge = BPF_JMP | BPF_JGE | BPF_K;
    // Jump offsets count from the next instruction; DEFAULT is at 11 + t.
    let mut p = vec![
        op(len, 0, 0, 0),                           // 0: A = payload length
        op(jge, 0, 9 + t, 1 + TAG_LEN as u32),      // 1: too short for a tag: DEFAULT
        op(byte_at, 0, 0, 0),                       // 2: A = first byte
        op(BPF_JMP | BPF_JSET | BPF_K, 0, 6, 0x80), // 3: short header (bit 7 clear): SHORT
        op(len, 0, 0, 0),                           // 4: long header
        op(jge, 0, 5 + t, 6 + TAG_LEN as u32),      // 5: too short: DEFAULT
        op(byte_at, 0, 0, 5),                       // 6: A = destination connection ID length
        op(jge, 0, 3 + t, TAG_LEN as u32),          // 7: shorter than a tag: DEFAULT
        op(half_at, 0, 0, 6),                       // 8: A = its first two bytes
        op(BPF_JMP | BPF_JA, 0, 0, 1),              // 9: to MATCH
        op(half_at, 0, 0, 1),                       // 10: SHORT: A = the ID's first two bytes
    ];
    // 11 + i: MATCH, one test per tag, each to its RET at 12 + t + i.
    for (tag, _) in tagged {
        p.push(op(BPF_JMP | BPF_JEQ | BPF_K, t, 0, u32::from(*tag)));
    }
    p.push(op(BPF_RET | BPF_K, 0, 0, u32::from(routes.default))); // DEFAULT
    for (_, index) in tagged {
        p.push(op(BPF_RET | BPF_K, 0, 0, u32::from(*index)));
    }
    p
}

/// Attaches `program` to the reuseport group `fd` belongs to (replacing the one it had).
pub fn attach(fd: BorrowedFd<'_>, program: &[libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: program.len() as libc::c_ushort,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: setsockopt reads a `sock_fprog` from `&prog`, which lives for the call, and the
    // kernel copies `prog.len` instructions from `prog.filter`, which points at `program`'s
    // `len` elements (it only reads them, despite the `*mut`); `fd` is valid for the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::os::fd::AsFd;
    use std::time::Duration;

    use socket2::{Domain, Socket, Type};

    use super::*;

    /// `n` UDP sockets in one reuseport group on a loopback port.
    fn group(n: usize) -> (Vec<UdpSocket>, std::net::SocketAddr) {
        let mut sockets = Vec::new();
        let mut addr: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        for _ in 0..n {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
            s.set_reuse_port(true).unwrap();
            s.bind(&addr.into()).unwrap();
            addr = s.local_addr().unwrap().as_socket().unwrap();
            let s: UdpSocket = s.into();
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            sockets.push(s);
        }
        (sockets, addr)
    }

    /// Which socket of the group a datagram reached.
    fn lands(sockets: &[UdpSocket], to: std::net::SocketAddr, payload: &[u8]) -> usize {
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(payload, to).unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..50 {
            for (i, s) in sockets.iter().enumerate() {
                if s.recv(&mut buf).is_ok() {
                    return i;
                }
            }
        }
        panic!("the datagram reached no socket");
    }

    fn short(tag: u16) -> Vec<u8> {
        let mut p = vec![0x40];
        p.extend_from_slice(&tag.to_be_bytes());
        p.extend_from_slice(&[7; 20]);
        p
    }

    fn long(dcid: &[u8]) -> Vec<u8> {
        let mut p = vec![0xc0, 0, 0, 0, 1, dcid.len() as u8];
        p.extend_from_slice(dcid);
        p.extend_from_slice(&[0, 9, 9, 9]);
        p
    }

    #[test]
    fn tagged_packets_reach_their_socket_and_the_rest_the_default_one() {
        let (sockets, addr) = group(3);
        let routes = QuicRoutes {
            tagged: vec![(0x1111, 1), (0x2222, 2)],
            default: 0,
        };
        attach(sockets[0].as_fd(), &quic_program(&routes)).unwrap();
        for _ in 0..5 {
            assert_eq!(lands(&sockets, addr, &short(0x1111)), 1);
            assert_eq!(lands(&sockets, addr, &short(0x2222)), 2);
            assert_eq!(lands(&sockets, addr, &short(0x3333)), 0, "unknown tag");
            assert_eq!(
                lands(&sockets, addr, &long(&[0x22, 0x22, 1, 2, 3, 4, 5, 6])),
                2
            );
            assert_eq!(
                lands(&sockets, addr, &long(&[9; 8])),
                0,
                "a client's own ID"
            );
            assert_eq!(
                lands(&sockets, addr, &long(&[0x11])),
                0,
                "an ID shorter than a tag"
            );
            assert_eq!(lands(&sockets, addr, &[0x40, 0x11]), 0, "too short");
            assert_eq!(
                lands(&sockets, addr, &[0xc0, 0, 0, 0]),
                0,
                "a truncated header"
            );
        }
        // Another program for the same group replaces it.
        let routes = QuicRoutes {
            tagged: vec![(0x1111, 2)],
            default: 1,
        };
        attach(sockets[2].as_fd(), &quic_program(&routes)).unwrap();
        assert_eq!(lands(&sockets, addr, &short(0x1111)), 2);
        assert_eq!(lands(&sockets, addr, &short(0x2222)), 1);
    }

    #[test]
    fn a_program_is_bounded_and_well_formed() {
        let routes = QuicRoutes {
            tagged: (0..500).map(|i| (i as u16, 1)).collect(),
            default: 0,
        };
        let p = quic_program(&routes);
        assert_eq!(p.len(), 12 + 2 * MAX_ROUTES);
        // Every return names an index the routes gave.
        let rets: Vec<u32> = p.iter().filter(|i| i.code == 0x06).map(|i| i.k).collect();
        assert!(rets.iter().all(|&k| k <= 1), "{rets:?}");
    }
}
