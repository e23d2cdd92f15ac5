//! The kernel's network figures the master reads: a worker's connections, for workers that do
//! not report them (the established TCP sockets on a listener's port, from `sock_diag`, among
//! the worker's own descriptors), and the counters of connections the kernel dropped before any
//! `accept` (`/proc/net/netstat`).

use std::collections::{HashMap, HashSet};

/// For each pid, the established TCP connections among its open descriptors whose local port is
/// one of `ports` (the listeners' ports). Only the process's own descriptors count, not its
/// children's. Unix-socket connections are not counted.
pub(crate) fn established_connections(pids: &[u32], ports: &HashSet<u16>) -> HashMap<u32, u64> {
    if pids.is_empty() {
        return HashMap::new();
    }
    // From sock_diag, which filters by state in the kernel: `/proc/net/tcp` lists every socket
    // of the namespace, TIME_WAIT ones too, and reading it stalled the event loop under churn.
    let established = match baton_sys::sockdiag::established_inodes(ports) {
        Ok(inodes) => inodes,
        Err(e) => {
            tracing::debug!("connections not counted: sock_diag: {e}");
            return HashMap::new();
        }
    };
    pids.iter()
        .map(|&pid| {
            let count = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|t| {
                    let t = t.to_string_lossy().into_owned();
                    t.strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse::<u64>()
                        .ok()
                })
                .filter(|inode| established.contains(inode))
                .count();
            (pid, count as u64)
        })
        .collect()
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

    #[test]
    fn counts_this_processs_established_connections_on_a_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _c1 = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _c2 = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_s1, _) = listener.accept().unwrap();
        let (_s2, _) = listener.accept().unwrap();
        let me = std::process::id();
        let counts = established_connections(&[me], &HashSet::from([port]));
        // Both server-side sockets have the listener's port as local port.
        assert_eq!(counts[&me], 2);
        assert_eq!(established_connections(&[me], &HashSet::from([1]))[&me], 0);
    }
}
