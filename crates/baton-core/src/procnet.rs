//! Counting a worker's connections from the kernel, for workers that do not report them.

use std::collections::{HashMap, HashSet};

/// For each pid, the established TCP connections among its open descriptors whose local port is
/// one of `ports` (the listeners' ports). Only the process's own descriptors count, not its
/// children's. Unix-socket connections are not counted.
pub(crate) fn established_connections(pids: &[u32], ports: &HashSet<u16>) -> HashMap<u32, u64> {
    let mut established = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != "01" {
                continue; // not ESTABLISHED
            }
            let port = cols[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if port.is_some_and(|p| ports.contains(&p)) {
                if let Ok(inode) = cols[9].parse::<u64>() {
                    established.insert(inode);
                }
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
