//! The kernel's network figures the master reads: a worker's connections, for workers that do
//! not report them (the established TCP sockets on a listener's port, from `sock_diag`, among
//! the worker's own descriptors), and the counters of connections the kernel dropped before any
//! `accept` (`/proc/net/netstat`).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use baton_sys::sockdiag::Ports;

/// How far a worker's number of open descriptors may move from its last count, as a fraction
/// of it, before its connections are counted one by one again (see [`ConnectionCensus`]).
const RECOUNT_AFTER: u64 = 100; // 1 %

/// How long a worker whose last count proved that following its descriptors is exact may be
/// followed however far its descriptors move, before it is counted one by one again.
const RECHECK_AFTER: Duration = Duration::from_secs(5);

/// The connections of workers that do not report theirs, counted from the kernel and kept
/// between calls so that a `baton status` at tens of thousands of connections costs the
/// master little.
///
/// Counting one by one means asking the kernel for the connections on the listeners' ports
/// (`sock_diag`, which walks every TCP socket of the namespace) and reading each of the
/// worker's descriptors in `/proc` (a directory entry each, and a `readlink` for a descriptor
/// not seen on a connection before): about 2 µs a descriptor, 100 ms at 50 000. Between such
/// counts a worker's count follows the number of its open descriptors (the size the kernel
/// gives `/proc/PID/fd`, one `stat`, since Linux 6.2): a worker that opened or closed N
/// descriptors since it was counted holds N connections more or fewer. That is exact for a
/// server that holds one descriptor per connection and nothing else that changes (a drain,
/// idle connections), and off for one that also opens other descriptors (a proxy's upstream
/// connections). So a worker is counted one by one again when its descriptors moved by more
/// than 1 % since its last count, unless that count proved following exact (what following
/// would have said was what it found, over at least 1 % of movement); then it is followed
/// for up to 5 s before the proof is made again.
///
/// A descriptor is taken to still hold the socket it held at the last count while that socket
/// is a connection (a worker that moves a connection to another descriptor number and reuses
/// the old number within one call is miscounted by one until its next count).
#[derive(Debug, Default)]
pub(crate) struct ConnectionCensus {
    workers: HashMap<u32, Counted>,
}

/// A worker as last counted one by one.
#[derive(Debug)]
struct Counted {
    /// Its open descriptors then.
    descriptors: u64,
    /// The connections among them, by descriptor number: the socket's inode.
    connections: HashMap<u32, u64>,
    /// When.
    at: Instant,
    /// Whether this count proved following its descriptors exact.
    follows: bool,
}

impl Counted {
    /// What following the descriptors says of the connections at `open` descriptors.
    fn followed(&self, open: u64) -> u64 {
        let counted = self.connections.len() as u64;
        (counted + open).saturating_sub(self.descriptors).min(open)
    }

    /// The connections now, from its number of open descriptors now, if this count may be
    /// followed that far.
    fn follow(&self, open: u64, now: Instant) -> Option<u64> {
        let near = open.abs_diff(self.descriptors) <= self.descriptors / RECOUNT_AFTER;
        let proven = self.follows && now.saturating_duration_since(self.at) < RECHECK_AFTER;
        (near || proven).then(|| self.followed(open))
    }

    /// Whether following `before` to this count's descriptors would have found its
    /// connections, over more movement than the 1 % followed anyway.
    fn proves(&self, before: &Counted) -> bool {
        let moved = self.descriptors.abs_diff(before.descriptors);
        moved > before.descriptors / RECOUNT_AFTER
            && before.followed(self.descriptors) == self.connections.len() as u64
    }
}

impl ConnectionCensus {
    /// For each pid, the established TCP connections among its own open descriptors (not its
    /// children's) whose local port is one of `ports`. Unix-socket connections are not
    /// counted. A pid whose count could not be made is left out.
    pub(crate) fn count(&mut self, pids: &[u32], ports: &Ports) -> HashMap<u32, u64> {
        self.workers.retain(|pid, _| pids.contains(pid));
        let mut counts = HashMap::new();
        let mut recount = Vec::new();
        let now = Instant::now();
        for &pid in pids {
            let followed = open_descriptors(pid)
                .zip(self.workers.get(&pid))
                .and_then(|(open, counted)| counted.follow(open, now));
            match followed {
                Some(connections) => {
                    counts.insert(pid, connections);
                }
                None => recount.push(pid),
            }
        }
        if recount.is_empty() {
            return counts;
        }
        // From sock_diag, which filters by state and port in the kernel: `/proc/net/tcp` lists
        // every socket of the namespace, TIME_WAIT ones too, and reading it stalled the event
        // loop under churn.
        let established = match baton_sys::sockdiag::connection_inodes(ports) {
            Ok(inodes) => inodes,
            Err(e) => {
                tracing::debug!("connections not counted: sock_diag: {e}");
                return counts;
            }
        };
        for pid in recount {
            let before = self.workers.remove(&pid);
            let Some(mut counted) = count_one_by_one(pid, before.as_ref(), &established) else {
                continue;
            };
            counted.follows = before.is_some_and(|b| counted.proves(&b));
            counts.insert(pid, counted.connections.len() as u64);
            self.workers.insert(pid, counted);
        }
        counts
    }
}

/// The number of `pid`'s open descriptors, from the size of `/proc/PID/fd` (Linux 6.2 and
/// later; `None` before, where it is 0, or if the process is gone).
fn open_descriptors(pid: u32) -> Option<u64> {
    let size = std::fs::metadata(format!("/proc/{pid}/fd")).ok()?.len();
    (size > 0).then_some(size)
}

/// `pid`'s descriptors read one by one: those whose socket is in `established`. A descriptor
/// that held an established socket at the last count (`before`) and still does is not read
/// again.
fn count_one_by_one(
    pid: u32,
    before: Option<&Counted>,
    established: &HashSet<u64>,
) -> Option<Counted> {
    let mut counted = Counted {
        descriptors: 0,
        connections: HashMap::new(),
        at: Instant::now(),
        follows: false,
    };
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        counted.descriptors += 1;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let inode = match before.and_then(|b| b.connections.get(&fd)) {
            Some(inode) if established.contains(inode) => Some(*inode),
            _ => socket_inode(&entry.path()),
        };
        if let Some(inode) = inode.filter(|i| established.contains(i)) {
            counted.connections.insert(fd, inode);
        }
    }
    Some(counted)
}

/// The inode of the socket a `/proc/PID/fd/N` link names (`socket:[INODE]`).
fn socket_inode(link: &std::path::Path) -> Option<u64> {
    let target = std::fs::read_link(link).ok()?;
    target
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The kernel's counters of connections lost before an `accept`, for the master's network
/// namespace as a whole (not per socket: any listener in the namespace, baton's or not, moves
/// them), from `/proc/net/netstat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ListenCounters {
    /// `ListenOverflows`: a connection completed its handshake while the accept queue was full.
    pub(crate) overflows: u64,
    /// `ListenDrops`: every connection dropped at a listener (overflows included).
    pub(crate) drops: u64,
    /// `SyncookiesSent`: SYN cookies answered while the SYN queue was full (a flood, or a very
    /// slow accept).
    pub(crate) syncookies_sent: u64,
}

impl ListenCounters {
    /// What rose from `before` to `self` (0 where a counter went back, as after a reset).
    pub(crate) fn since(self, before: ListenCounters) -> ListenCounters {
        ListenCounters {
            overflows: self.overflows.saturating_sub(before.overflows),
            drops: self.drops.saturating_sub(before.drops),
            syncookies_sent: self.syncookies_sent.saturating_sub(before.syncookies_sent),
        }
    }
}

/// The counters now, or `None` if `/proc/net/netstat` cannot be read.
pub(crate) fn listen_counters() -> Option<ListenCounters> {
    parse_netstat(&std::fs::read_to_string("/proc/net/netstat").ok()?)
}

/// The `TcpExt:` header line names the fields of the value line after it.
fn parse_netstat(text: &str) -> Option<ListenCounters> {
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = lines.next()?.split_whitespace().skip(1);
    let values = lines.next()?.split_whitespace().skip(1);
    let mut counters = ListenCounters::default();
    let mut found = 0;
    for (name, value) in names.zip(values) {
        let slot = match name {
            "ListenOverflows" => &mut counters.overflows,
            "ListenDrops" => &mut counters.drops,
            "SyncookiesSent" => &mut counters.syncookies_sent,
            _ => continue,
        };
        *slot = value.parse().ok()?;
        found += 1;
    }
    (found == 3).then_some(counters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listen_counters_are_found_by_name() {
        let text = "TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops\n\
                    TcpExt: 4 0 17 19\n\
                    IpExt: InNoRoutes\nIpExt: 0\n";
        let counters = parse_netstat(text).unwrap();
        assert_eq!(
            counters,
            ListenCounters {
                overflows: 17,
                drops: 19,
                syncookies_sent: 4
            }
        );
        let later = ListenCounters {
            overflows: 20,
            drops: 18,
            syncookies_sent: 4,
        };
        assert_eq!(
            later.since(counters),
            ListenCounters {
                overflows: 3,
                drops: 0,
                syncookies_sent: 0
            }
        );
        assert_eq!(parse_netstat("TcpExt: ListenDrops\nTcpExt: 1\n"), None);
        assert!(
            listen_counters().is_some(),
            "this machine's /proc/net/netstat"
        );
    }

    fn ports(port: u16) -> Ports {
        Ports {
            v4: HashSet::from([port]),
            v6: HashSet::new(),
        }
    }

    #[test]
    fn counts_a_processs_established_connections_on_a_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _c1 = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _c2 = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_s1, _) = listener.accept().unwrap();
        let (_s2, _) = listener.accept().unwrap();
        let me = std::process::id();
        let counts = ConnectionCensus::default().count(&[me], &ports(port));
        // Both server-side sockets have the listener's port as local port.
        assert_eq!(counts[&me], 2);
        assert_eq!(ConnectionCensus::default().count(&[me], &ports(1))[&me], 0);
        assert!(
            ConnectionCensus::default()
                .count(&[u32::MAX], &ports(port))
                .is_empty(),
            "no such process"
        );
    }

    /// A worker as its census sees it: `descriptors` open, `connections` of them counted, at
    /// `at`, proven or not.
    fn counted(descriptors: u64, connections: u32, at: Instant, follows: bool) -> Counted {
        Counted {
            descriptors,
            connections: (0..connections).map(|fd| (fd, u64::from(fd))).collect(),
            at,
            follows,
        }
    }

    #[test]
    fn between_counts_a_worker_follows_its_descriptors_within_one_percent() {
        let now = Instant::now();
        let c = counted(10_000, 9_990, now, false);
        assert_eq!(c.follow(10_000, now), Some(9_990));
        // 100 closed (a drain): 100 connections fewer.
        assert_eq!(c.follow(9_900, now), Some(9_890));
        assert_eq!(c.follow(10_100, now), Some(10_090));
        // More than 1 % moved: counted one by one again.
        assert_eq!(c.follow(9_899, now), None);
        assert_eq!(c.follow(10_101, now), None);
        // A small worker is counted again at any change.
        let small = counted(12, 2, now, false);
        assert_eq!(small.follow(12, now), Some(2));
        assert_eq!(small.follow(11, now), None);
        // Never more connections than descriptors, never fewer than none.
        assert_eq!(counted(200, 0, now, false).follow(198, now), Some(0));
        assert_eq!(counted(200, 200, now, false).follow(202, now), Some(202));
    }

    #[test]
    fn a_count_that_proved_following_exact_is_followed_further_for_a_while() {
        let then = Instant::now();
        let before = counted(10_000, 9_990, then, false);
        // 3000 closed, and 3000 connections fewer: following was exact.
        let exact = counted(7_000, 6_990, then, false);
        assert!(exact.proves(&before));
        // Not when the connections did not move as the descriptors did (a proxy's upstream
        // connections), nor when they moved less than 1 % (followed anyway: no proof).
        assert!(!counted(7_000, 8_490, then, false).proves(&before));
        assert!(!counted(9_990, 9_980, then, false).proves(&before));
        let proven = counted(7_000, 6_990, then, true);
        assert_eq!(proven.follow(4_000, then), Some(3_990));
        assert_eq!(
            proven.follow(4_000, then + RECHECK_AFTER),
            None,
            "proved again"
        );
        assert_eq!(exact.follow(4_000, then), None, "not proven");
    }

    /// Run in a process of its own by the census test (the variable set): a server on a port
    /// of its own that takes orders on stdin (`accept N`, `close N`) and answers each with a
    /// `holder` line, so that its descriptors are what the test makes them.
    #[test]
    #[ignore = "a helper process of the_census_follows_a_servers_connections"]
    fn connection_holder() {
        use std::io::{BufRead, Write};
        if std::env::var_os("BATON_TEST_HOLDER").is_none() {
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut out = std::io::stdout();
        writeln!(out, "holder {port}").unwrap();
        let mut held = Vec::new();
        for line in std::io::stdin().lock().lines() {
            let line = line.unwrap();
            let (order, n) = line.split_once(' ').unwrap();
            let n: usize = n.parse().unwrap();
            match order {
                "accept" => held.extend((0..n).map(|_| listener.accept().unwrap().0)),
                "close" => held.truncate(held.len() - n),
                _ => panic!("{line}"),
            }
            writeln!(out, "holder {}", held.len()).unwrap();
        }
    }

    /// A server process (the holder) whose connections open and close between counts: each
    /// count is right, whether the census followed the number of its descriptors (a change of
    /// 1 % or less) or counted them one by one again (more). A connection its client closed
    /// is the server's until it closes its own end. A process gone leaves the census.
    #[test]
    fn the_census_follows_a_servers_connections() {
        use std::io::{BufRead, Write};
        let mut holder = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "procnet::tests::connection_holder"])
            .args(["--nocapture", "--test-threads=1"])
            .env("BATON_TEST_HOLDER", "1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut orders = holder.stdin.take().unwrap();
        let mut answers = std::io::BufReader::new(holder.stdout.take().unwrap()).lines();
        let mut answer = || -> u64 {
            answers
                .by_ref()
                .map_while(Result::ok)
                .find_map(|l| l.rsplit_once("holder ")?.1.parse().ok())
                .expect("the holder answers")
        };
        let port = answer() as u16;
        let pid = holder.id();
        let mut census = ConnectionCensus::default();
        let mut clients = Vec::new();
        let mut order = |clients: &mut Vec<std::net::TcpStream>, order: &str, n: usize| {
            // The order first: the holder accepts while the clients connect (a listener's
            // queue holds 128).
            writeln!(orders, "{order} {n}").unwrap();
            if order == "accept" {
                let connect = || std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                clients.extend((0..n).map(|_| connect()));
            }
            answer()
        };
        let count = |census: &mut ConnectionCensus| census.count(&[pid], &ports(port))[&pid];
        assert_eq!(order(&mut clients, "accept", 400), 400);
        assert_eq!(count(&mut census), 400, "counted one by one");
        // The clients close 50: their servers' ends stay open, the server holds them.
        clients.truncate(350);
        assert_eq!(count(&mut census), 400);
        // The server closes 3 (under 1 % of its descriptors): followed.
        assert_eq!(order(&mut clients, "close", 3), 397);
        assert_eq!(count(&mut census), 397);
        assert_eq!(
            census.workers[&pid].connections.len(),
            400,
            "not counted again"
        );
        // It closes 40 and accepts 10 more: counted again.
        assert_eq!(order(&mut clients, "close", 40), 357);
        assert_eq!(order(&mut clients, "accept", 10), 367);
        assert_eq!(count(&mut census), 367);
        assert_eq!(census.workers[&pid].connections.len(), 367, "counted again");
        // That count proved following exact (33 descriptors fewer, 33 connections): 100
        // more closed are followed, not counted again.
        assert!(census.workers[&pid].follows);
        assert_eq!(order(&mut clients, "close", 100), 267);
        assert_eq!(count(&mut census), 267);
        assert_eq!(census.workers[&pid].connections.len(), 367, "followed");
        assert_eq!(order(&mut clients, "close", 267), 0);
        assert_eq!(count(&mut census), 0);
        drop(orders);
        assert!(holder.wait().unwrap().success());
        assert!(
            census.count(&[pid], &ports(port)).is_empty(),
            "the process is gone"
        );
        assert!(census.workers.is_empty(), "and forgotten");
    }
}
