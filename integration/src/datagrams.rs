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
                let done = Arc::new(AtomicBool::new(false));
                let reading = {
                    let done = done.clone();
                    std::thread::spawn(move || {
                        let mut got = Vec::new();
                        let mut buf = [0u8; 512];
                        let mut quiet_since: Option<Instant> = None;
                        loop {
                            match reader.recv(&mut buf) {
                                Ok(n) => {
                                    quiet_since = None;
                                    got.push((
                                        String::from_utf8_lossy(&buf[..n]).into_owned(),
                                        Instant::now(),
                                    ));
                                }
                                Err(_) if done.load(Ordering::Relaxed) => {
                                    // A second of silence after the last send: all answered.
                                    let since = *quiet_since.get_or_insert_with(Instant::now);
                                    if since.elapsed() > Duration::from_secs(1) {
                                        return got;
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
        let (c, sent, got) = t.join().unwrap();
        seen.sent += sent;
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
