//! UDP clients for the datagram tests and benchmarks: numbered datagrams at a steady rate to
//! an echo worker (`it-worker` in `udp-echo` mode), every answer matched to its request.

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What the clients saw: per client, the sequence numbers answered and how often, and every
/// answer's generation with the time it arrived.
#[derive(Debug, Default)]
pub struct Seen {
    pub sent: u64,
    pub answers: BTreeMap<(u32, u64), u32>,
    pub by_generation: Vec<(u64, Instant)>,
    /// Answers the kernel dropped at the clients' own sockets, their receive buffers full
    /// (`SO_RXQ_OVFL`): a client starved of CPU, not a loss of baton's.
    pub client_drops: u64,
}

/// `clients` UDP clients, each sending a numbered datagram every `every` to `port` until `stop`,
/// and reading the answers; then reading stragglers for a second.
pub fn udp_clients(port: u16, clients: u32, every: Duration, stop: Arc<AtomicBool>) -> Seen {
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
                socket.connect(("127.0.0.1", port)).unwrap();
                let reader = socket.try_clone().unwrap();
                reader
                    .set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                // Each read then says how many datagrams the kernel dropped at this socket.
                nix::sys::socket::setsockopt(&reader, nix::sys::socket::sockopt::RxqOvfl, &1)
                    .unwrap();
                let done = Arc::new(AtomicBool::new(false));
                let reading = {
                    let done = done.clone();
                    std::thread::spawn(move || {
                        let mut got = Vec::new();
                        let mut drops = 0u64;
                        let mut buf = [0u8; 512];
                        let mut quiet_since: Option<Instant> = None;
                        loop {
                            match recv_counting_drops(&reader, &mut buf) {
                                Ok((n, dropped)) => {
                                    quiet_since = None;
                                    drops = drops.max(dropped);
                                    got.push((
                                        String::from_utf8_lossy(&buf[..n]).into_owned(),
                                        Instant::now(),
                                    ));
                                }
                                Err(_) if done.load(Ordering::Relaxed) => {
                                    // A second of silence after the last send: all answered.
                                    let since = *quiet_since.get_or_insert_with(Instant::now);
                                    if since.elapsed() > Duration::from_secs(1) {
                                        return (got, drops);
                                    }
                                }
                                Err(_) => {}
                            }
                        }
                    })
                };
                let mut sent = 0u64;
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    socket.send(format!("c{c} n{sent}").as_bytes()).unwrap();
                    sent += 1;
                    next += every;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait); // the sending rate under test
                    }
                }
                done.store(true, Ordering::Relaxed);
                (c, sent, reading.join().unwrap())
            })
        })
        .collect();
    let mut seen = Seen::default();
    for t in threads {
        let (c, sent, (got, drops)) = t.join().unwrap();
        seen.sent += sent;
        seen.client_drops += drops;
        for (text, at) in got {
            // "c<client> n<seq> g<generation> p<pid>"
            let mut words = text.split(' ');
            let client: u32 = words.next().unwrap()[1..].parse().unwrap();
            let seq: u64 = words.next().unwrap()[1..].parse().unwrap();
            let generation: u64 = words.next().unwrap()[1..].parse().unwrap();
            assert_eq!(client, c, "{text}");
            *seen.answers.entry((client, seq)).or_default() += 1;
            seen.by_generation.push((generation, at));
        }
    }
    seen
}

/// One datagram, and the socket's count of datagrams the kernel dropped so far (`SO_RXQ_OVFL`;
/// 0 until the first drop).
fn recv_counting_drops(socket: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, u64)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::AsRawFd;
    let mut cmsg = nix::cmsg_space!(u32);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )?;
    let mut dropped = 0;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::RxqOvfl(n) = c {
            dropped = u64::from(n);
        }
    }
    Ok((msg.bytes, dropped))
}

impl Seen {
    /// Datagrams never answered.
    pub fn lost(&self) -> u64 {
        self.sent - self.answers.len() as u64
    }

    /// Answers beyond the first to a datagram.
    pub fn duplicated(&self) -> u64 {
        self.answers.values().map(|n| u64::from(n - 1)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counts the UDP test relies on to tell the kernel's drops from baton's losses do
    /// count: a socket flooded while nobody reads it.
    #[test]
    fn the_kernels_drops_are_counted_at_the_listener_and_at_a_client() {
        let flooded = UdpSocket::bind("127.0.0.1:0").unwrap();
        nix::sys::socket::setsockopt(&flooded, nix::sys::socket::sockopt::RcvBuf, &4096).unwrap();
        nix::sys::socket::setsockopt(&flooded, nix::sys::socket::sockopt::RxqOvfl, &1).unwrap();
        let port = flooded.local_addr().unwrap().port();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..200 {
            sender.send_to(&[7u8; 1000], ("127.0.0.1", port)).unwrap();
        }
        assert!(crate::procfs::udp_drops(port) > 0, "the table's drops");
        // A datagram carries the count of drops before it was queued: read what was queued,
        // then one sent after the drops.
        flooded.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 2048];
        while recv_counting_drops(&flooded, &mut buf).is_ok() {}
        sender.send_to(b"after", ("127.0.0.1", port)).unwrap();
        flooded.set_nonblocking(false).unwrap();
        let (_, dropped) = recv_counting_drops(&flooded, &mut buf).unwrap();
        assert!(dropped > 0, "SO_RXQ_OVFL's count");
    }
}
