//! A listening socket's options (`ListenerOptions`): set at bind, set again at each reload for
//! those a bound socket can take (the rest change only when the socket is bound anew, and a
//! reload that changes one says so), and read back from the kernel for `baton status`.
//!
//! Accepted sockets inherit `TCP_NODELAY` and keep-alive from the listening socket (Linux copies
//! the listener's socket into each connection it accepts), so setting them here reaches every
//! worker's connections without the worker's help.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use baton_proto::control::{KeepaliveNow, ListenerOptionsNow};
use socket2::{Socket, TcpKeepalive};

use crate::config::ListenerOptions;

/// Sets every option of a TCP socket not yet bound (`v6` for an IPv6 address).
pub(crate) fn before_bind(socket: &Socket, v6: bool, options: &ListenerOptions) -> io::Result<()> {
    // SO_REUSEADDR only lets us bind over TIME_WAIT leftovers; no SO_REUSEPORT: one socket per
    // address is the whole point.
    socket.set_reuse_address(true)?;
    ip_before_bind(socket, v6, options)?;
    changeable(socket, options)
}

/// Sets every option of a UDP socket not yet bound. No SO_REUSEADDR: on UDP it would let
/// another socket bind the same address and take a share of the datagrams.
pub(crate) fn udp_before_bind(
    socket: &Socket,
    v6: bool,
    options: &ListenerOptions,
) -> io::Result<()> {
    ip_before_bind(socket, v6, options)?;
    udp_changeable(socket, options)
}

/// The options a bound UDP socket can take: at bind, and again at each reload.
pub(crate) fn udp_changeable(socket: &Socket, options: &ListenerOptions) -> io::Result<()> {
    ip_changeable(socket, options)?;
    any_kind(socket, options)
}

/// What every kind of socket takes, where the file sets it: `SO_RCVBUF`, `SO_SNDBUF`, and
/// `O_NONBLOCK`.
///
/// `O_NONBLOCK` is a flag of the open socket, which the master and every worker share (a
/// descriptor passed over `SCM_RIGHTS` or `dup2`'d for `LISTEN_FDS` is the same open socket):
/// setting it here sets it for all of them. Servers that inherit their listeners from
/// themselves (nginx's `NGINX` variable) assume it is set; a blocking `accept` after a wake-up
/// another process won then parks the server's event loop until the next connection.
pub(crate) fn any_kind(socket: &Socket, options: &ListenerOptions) -> io::Result<()> {
    use baton_sys::sockopt::{Buffer, set_buffer};
    if let Some(bytes) = options.recv_buffer {
        set_buffer(socket.as_fd(), Buffer::Receive, bytes)?;
    }
    if let Some(bytes) = options.send_buffer {
        set_buffer(socket.as_fd(), Buffer::Send, bytes)?;
    }
    if let Some(nonblocking) = options.nonblocking {
        socket.set_nonblocking(nonblocking)?;
    }
    Ok(())
}

/// `IPV6_V6ONLY`, `IP_FREEBIND`, `IP_TRANSPARENT`: TCP and UDP, before the bind.
fn ip_before_bind(socket: &Socket, v6: bool, options: &ListenerOptions) -> io::Result<()> {
    if v6 {
        socket.set_only_v6(options.v6only.unwrap_or(true))?;
    }
    if options.freebind {
        if v6 {
            socket.set_freebind_v6(true)?;
        } else {
            socket.set_freebind_v4(true)?;
        }
    }
    if options.transparent {
        if v6 {
            socket.set_ip_transparent_v6(true)?;
        } else {
            socket.set_ip_transparent_v4(true)?;
        }
    }
    Ok(())
}

/// `SO_BINDTODEVICE` and `SO_MARK`: TCP and UDP, at bind and at each reload.
fn ip_changeable(socket: &Socket, options: &ListenerOptions) -> io::Result<()> {
    socket.bind_device(options.interface.as_deref().map(str::as_bytes))?;
    match options.mark {
        Some(mark) => socket.set_mark(mark)?,
        None if socket.mark().unwrap_or(0) != 0 => socket.set_mark(0)?,
        None => {}
    }
    Ok(())
}

/// Sets the options a bound, listening TCP socket can take: at bind, and again at each reload.
pub(crate) fn changeable(socket: &Socket, options: &ListenerOptions) -> io::Result<()> {
    ip_changeable(socket, options)?;
    any_kind(socket, options)?;
    socket.set_tcp_nodelay(options.nodelay)?;
    socket.set_keepalive(options.keepalive.is_some())?;
    if let Some(k) = &options.keepalive {
        let mut params = TcpKeepalive::new();
        if let Some(idle) = k.idle {
            params = params.with_time(idle);
        }
        if let Some(interval) = k.interval {
            params = params.with_interval(interval);
        }
        if let Some(count) = k.count {
            params = params.with_retries(count);
        }
        socket.set_tcp_keepalive(&params)?;
    }
    let defer = options.defer_accept.map_or(0, whole_seconds);
    baton_sys::sockopt::set_defer_accept(socket.as_fd(), defer)?;
    match options.fastopen {
        Some(queue) => baton_sys::sockopt::set_fastopen(socket.as_fd(), queue)?,
        // Off again only if it was on (an unset option is never touched).
        None if baton_sys::sockopt::fastopen(socket.as_fd()).unwrap_or(0) > 0 => {
            baton_sys::sockopt::set_fastopen(socket.as_fd(), 0)?
        }
        None => {}
    }
    Ok(())
}

fn whole_seconds(d: Duration) -> u32 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0)) as u32
}

/// A Unix socket file's permission bits, owner and group.
pub(crate) fn unix_file(
    path: &Path,
    mode: Option<u32>,
    options: &ListenerOptions,
) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(mode) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    if options.owner.is_some() || options.group.is_some() {
        std::os::unix::fs::lchown(path, options.owner, options.group)?;
    }
    Ok(())
}

/// What a reload asks that a bound socket cannot take: each as a sentence for its verdict.
pub(crate) fn unchangeable(
    name: &str,
    bound: &ListenerOptions,
    wanted: &ListenerOptions,
) -> Vec<String> {
    let mut changed = Vec::new();
    if bound.v6only != wanted.v6only {
        changed.push("v6only");
    }
    if bound.freebind != wanted.freebind {
        changed.push("freebind");
    }
    if bound.transparent != wanted.transparent {
        changed.push("transparent");
    }
    changed
        .into_iter()
        .map(|option| {
            format!(
                "listener `{name}`: `{option}` changed, but it applies only when the socket is bound, and the socket is kept (clients waiting in its queue are not lost): it takes effect at the next start, or give the listener a new address"
            )
        })
        .collect()
}

/// The options of a TCP listening socket as the kernel reports them.
pub(crate) fn tcp_now(socket: &Socket, v6: bool) -> ListenerOptionsNow {
    let fd = socket.as_fd();
    let keepalive = socket.keepalive().ok().map(|on| KeepaliveNow {
        on,
        idle_s: socket.tcp_keepalive_time().ok().map(|d| d.as_secs()),
        interval_s: socket.tcp_keepalive_interval().ok().map(|d| d.as_secs()),
        count: socket.tcp_keepalive_retries().ok(),
    });
    ListenerOptionsNow {
        defer_accept_s: baton_sys::sockopt::defer_accept(fd).ok(),
        fastopen: baton_sys::sockopt::fastopen(fd).ok(),
        v6only: if v6 { socket.only_v6().ok() } else { None },
        freebind: if v6 {
            socket.freebind_v6().ok()
        } else {
            socket.freebind_v4().ok()
        },
        transparent: if v6 {
            socket.ip_transparent_v6().ok()
        } else {
            socket.ip_transparent_v4().ok()
        },
        interface: socket
            .device()
            .ok()
            .flatten()
            .map(|d| String::from_utf8_lossy(&d).into_owned()),
        nodelay: socket.tcp_nodelay().ok(),
        keepalive,
        mark: socket.mark().ok(),
        ..any_kind_now(socket)
    }
}

/// The options of a UDP socket as the kernel reports them.
pub(crate) fn udp_now(socket: &Socket, v6: bool) -> ListenerOptionsNow {
    ListenerOptionsNow {
        v6only: if v6 { socket.only_v6().ok() } else { None },
        freebind: if v6 {
            socket.freebind_v6().ok()
        } else {
            socket.freebind_v4().ok()
        },
        interface: socket
            .device()
            .ok()
            .flatten()
            .map(|d| String::from_utf8_lossy(&d).into_owned()),
        mark: socket.mark().ok(),
        ..any_kind_now(socket)
    }
}

/// What every kind of socket has, as the kernel reports it: buffer sizes and `O_NONBLOCK`.
pub(crate) fn any_kind_now(socket: &Socket) -> ListenerOptionsNow {
    ListenerOptionsNow {
        recv_buffer: socket.recv_buffer_size().ok().map(|b| b as u64),
        send_buffer: socket.send_buffer_size().ok().map(|b| b as u64),
        nonblocking: socket.nonblocking().ok(),
        ..ListenerOptionsNow::default()
    }
}

/// A Unix socket file's permission bits, owner and group, from the file system.
pub(crate) fn unix_now(path: &Path) -> ListenerOptionsNow {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => ListenerOptionsNow {
            mode: Some(meta.mode() & 0o7777),
            owner: Some(meta.uid()),
            group: Some(meta.gid()),
            ..ListenerOptionsNow::default()
        },
        Err(_) => ListenerOptionsNow::default(),
    }
}
