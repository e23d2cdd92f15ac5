//! Counting a worker's connections from the kernel, for workers that do not report them: the
//! established TCP sockets on a listener's port (from `sock_diag`), among the worker's own
//! descriptors.

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
