//! The listening sockets: bound once by the master, never accepted on, shared by generations.
//!
//! Identity is the address (TCP `ip:port`, Unix path), not the name: a reload that keeps an
//! address keeps *the same socket* (one kernel accept queue, so nothing waiting in it is lost),
//! even if the listener was renamed. A socket lives as long as some generation holds it: the
//! table only keeps weak references, and each generation holds strong ones, so a listener removed
//! from the configuration closes exactly when the last generation that used it is gone.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};

use baton_proto::ListenerAddress;
use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::{ListenerConfig, ListenerOptions};
use crate::faults::Point;
use crate::listener_options;

mod quic;
pub use quic::QuicGroup;

/// A bound, listening socket. Closed (and a Unix socket's file removed) on drop.
#[derive(Debug)]
pub struct BoundSocket {
    address: ListenerAddress,
    /// The address the kernel chose (differs from `address` for port 0).
    local: String,
    socket: Socket,
    /// For Unix sockets: the file we created, identified by device and inode so we never remove
    /// a file someone else put at the same path.
    unix_file: Option<(PathBuf, u64, u64)>,
    /// It no longer listens ([`BoundSocket::stop_listening`]).
    stopped: std::cell::Cell<bool>,
    /// The options it was bound with (those that change only with a new bind); unknown for a
    /// socket a predecessor bound (`baton upgrade`).
    bound_with: Option<ListenerOptions>,
}

impl BoundSocket {
    pub fn address(&self) -> &ListenerAddress {
        &self.address
    }
    /// Where it listens, as the kernel reports it (`127.0.0.1:41234`, `/run/app.sock`).
    pub fn local(&self) -> &str {
        &self.local
    }
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
    /// What a successor needs to take this socket over (its descriptor travels separately).
    pub fn state(&self, fd: i32) -> crate::upgrade::SocketState {
        crate::upgrade::SocketState {
            address: self.address.clone(),
            local: self.local.clone(),
            fd,
            unix_file: self.unix_file.clone(),
        }
    }

    /// Stops listening, for every process that holds this socket: a new connection is refused
    /// at once (TCP: a reset to the SYN; Unix: `ECONNREFUSED`), connections already accepted are
    /// untouched, and connections still waiting in the queue are refused (TCP: reset by the
    /// kernel; Unix: taken and closed here) rather than left waiting for an accept that will not
    /// come. For a listener no serving generation has.
    /// `Ok(false)`: it had stopped already.
    ///
    /// A datagram socket has nothing to refuse and nothing queued for anyone else: it is left
    /// as it is, read by the draining workers that hold it until the last one exits and it
    /// closes (then the kernel answers a UDP datagram with "port unreachable").
    pub fn stop_listening(&self) -> io::Result<bool> {
        if self.stopped.replace(true) {
            return Ok(false);
        }
        if self.address.is_datagram() {
            return Ok(true);
        }
        self.socket.shutdown(std::net::Shutdown::Read)?;
        // A Unix socket keeps its queue: those clients are refused too (closed unaccepted).
        baton_sys::channel::refuse_queued(self.fd())?;
        Ok(true)
    }

    /// Its options as the kernel reports them.
    pub fn options_now(&self) -> baton_proto::control::ListenerOptionsNow {
        match &self.address {
            ListenerAddress::Tcp { address } => {
                listener_options::tcp_now(&self.socket, address.is_ipv6())
            }
            ListenerAddress::Udp { address } => {
                listener_options::udp_now(&self.socket, address.is_ipv6())
            }
            ListenerAddress::Unix { path } | ListenerAddress::UnixDatagram { path }
                if !is_abstract(path) =>
            {
                let any = listener_options::any_kind_now(&self.socket);
                baton_proto::control::ListenerOptionsNow {
                    recv_buffer: any.recv_buffer,
                    send_buffer: any.send_buffer,
                    nonblocking: any.nonblocking,
                    ..listener_options::unix_now(path)
                }
            }
            ListenerAddress::Unix { .. } | ListenerAddress::UnixDatagram { .. } => {
                listener_options::any_kind_now(&self.socket)
            }
        }
    }

    /// It stopped listening: only draining generations hold it.
    pub fn stopped(&self) -> bool {
        self.stopped.get()
    }

    /// The options a bound socket can take, set again from `config` (a reload).
    fn apply_again(&self, config: &ListenerConfig) -> io::Result<()> {
        match &self.address {
            ListenerAddress::Tcp { .. } => {
                listener_options::changeable(&self.socket, &config.options)
            }
            ListenerAddress::Udp { .. } => {
                listener_options::udp_changeable(&self.socket, &config.options)
            }
            ListenerAddress::Unix { path } | ListenerAddress::UnixDatagram { path } => {
                listener_options::any_kind(&self.socket, &config.options)?;
                match &self.unix_file {
                    Some(_) => listener_options::unix_file(path, config.mode, &config.options),
                    None => Ok(()),
                }
            }
        }
    }

    /// A close-on-exec duplicate to hand over.
    pub fn duplicate(&self) -> io::Result<OwnedFd> {
        self.socket.as_fd().try_clone_to_owned()
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if let Some((path, dev, ino)) = &self.unix_file {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if meta.dev() == *dev && meta.ino() == *ino {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

/// A listener of one generation: its configured name and the shared socket.
#[derive(Debug, Clone)]
pub struct GenerationListener {
    pub config: ListenerConfig,
    pub socket: Rc<BoundSocket>,
}

/// Binding a listener failed.
#[derive(Debug, thiserror::Error)]
#[error("listener `{name}` ({address}): {reason}")]
pub struct BindError {
    pub name: String,
    pub address: ListenerAddress,
    pub reason: String,
}

/// Every socket some generation still uses, by address.
#[derive(Debug, Default)]
pub struct ListenerTable {
    live: HashMap<ListenerAddress, Weak<BoundSocket>>,
    /// QUIC listeners: a socket per generation, in one steered group per address.
    quic: HashMap<ListenerAddress, QuicGroup>,
    /// Sockets handed to the master at start (systemd socket activation, the fd store), held
    /// until the first generation takes them.
    adopted: Vec<Rc<BoundSocket>>,
}

/// What [`ListenerTable::prepare`] did, for the log.
#[derive(Debug, Default)]
pub struct Prepared {
    pub listeners: Vec<GenerationListener>,
    /// Names of listeners that were bound now (the others are kept sockets).
    pub bound: Vec<String>,
    /// Options asked of kept sockets that only a new bind could apply (for the verdict).
    pub warnings: Vec<String>,
}

impl ListenerTable {
    /// Returns the sockets for `configs`, in order: existing ones by address, new ones bound now.
    /// On error nothing changes: sockets bound by this call are closed again.
    pub fn prepare(&mut self, configs: &[ListenerConfig]) -> Result<Prepared, BindError> {
        self.live.retain(|_, weak| weak.strong_count() > 0);
        let mut out = Prepared::default();
        for config in configs {
            if config.options.quic {
                let group = self.quic.entry(config.address.clone()).or_default();
                let socket = group.socket(config).map_err(|e| bind_error(config, e))?;
                out.listeners.push(GenerationListener {
                    config: config.clone(),
                    socket,
                });
                continue;
            }
            let existing = self.live.get(&config.address).and_then(Weak::upgrade);
            let socket = match existing {
                Some(socket) => {
                    // listen(2) on a listening socket only updates its backlog (a datagram
                    // socket has none); the options a bound socket can take are set again, the
                    // others reported.
                    if !config.address.is_datagram() {
                        socket
                            .socket
                            .listen(config.backlog as i32)
                            .map_err(|e| bind_error(config, e))?;
                    }
                    socket
                        .apply_again(config)
                        .map_err(|e| bind_error(config, e))?;
                    if let Some(bound_with) = &socket.bound_with {
                        out.warnings.extend(listener_options::unchangeable(
                            &config.name,
                            bound_with,
                            &config.options,
                        ));
                    }
                    socket
                }
                None => {
                    Point::ListenerBind
                        .check()
                        .map_err(|e| bind_error(config, e))?;
                    let socket = Rc::new(bind(config).map_err(|e| bind_error(config, e))?);
                    out.bound.push(config.name.clone());
                    socket
                }
            };
            out.listeners.push(GenerationListener {
                config: config.clone(),
                socket,
            });
        }
        for l in out.listeners.iter().filter(|l| !l.config.options.quic) {
            self.live
                .insert(l.config.address.clone(), Rc::downgrade(&l.socket));
        }
        // A QUIC address no generation uses and the configuration no longer has: its group
        // closes (every socket at once: no index is left to shift).
        self.quic.retain(|address, group| {
            !group.idle()
                || configs
                    .iter()
                    .any(|c| c.options.quic && &c.address == address)
        });
        // Inherited sockets are now held by the generation that uses them (or closed).
        self.adopted.clear();
        Ok(out)
    }

    /// The QUIC groups, by address (the master steers them).
    pub fn quic_groups(&mut self) -> impl Iterator<Item = (&ListenerAddress, &mut QuicGroup)> {
        self.quic.iter_mut()
    }

    /// Takes listening sockets the master inherited (`LISTEN_FDS`), matched to the configured
    /// listeners by name: the next [`prepare`](Self::prepare) uses them instead of binding.
    /// Returns the names of inherited sockets no listener wants (they are closed).
    pub fn adopt(
        &mut self,
        configs: &[ListenerConfig],
        inherited: Vec<(String, OwnedFd)>,
    ) -> Result<Vec<String>, BindError> {
        let mut unused = Vec::new();
        for (name, fd) in inherited {
            let Some(config) = configs.iter().find(|c| c.name == name) else {
                unused.push(name);
                continue;
            };
            let socket = Socket::from(fd);
            let refuse = |reason: String| BindError {
                name: config.name.clone(),
                address: config.address.clone(),
                reason,
            };
            let datagram = config.address.is_datagram();
            let usable = if datagram {
                socket.r#type().is_ok_and(|t| t == Type::DGRAM)
            } else {
                socket.is_listener().unwrap_or(false)
            };
            if !usable {
                return Err(refuse(if datagram {
                    "the inherited descriptor is not a datagram socket".into()
                } else {
                    "the inherited descriptor is not a listening socket".into()
                }));
            }
            let local = socket.local_addr().map_err(|e| refuse(e.to_string()))?;
            let matches = match (&config.address, local.as_socket(), local.as_pathname()) {
                (
                    ListenerAddress::Tcp { address } | ListenerAddress::Udp { address },
                    Some(got),
                    _,
                ) => {
                    got.ip() == address.ip()
                        && (address.port() == 0 || got.port() == address.port())
                }
                (
                    ListenerAddress::Unix { path } | ListenerAddress::UnixDatagram { path },
                    _,
                    Some(got),
                ) => got == path.as_path(),
                _ => false,
            };
            let shown = local
                .as_socket()
                .map(|a| a.to_string())
                .or_else(|| local.as_pathname().map(|p| p.display().to_string()))
                .unwrap_or_else(|| "?".into());
            if !matches {
                return Err(refuse(format!(
                    "the inherited socket listens on {shown}, not on the configured address"
                )));
            }
            let bound = Rc::new(BoundSocket {
                address: config.address.clone(),
                local: shown,
                socket,
                // The service manager made it; the service manager removes its file.
                unix_file: None,
                stopped: std::cell::Cell::new(false),
                bound_with: Some(config.options.clone()),
            });
            self.live
                .insert(config.address.clone(), Rc::downgrade(&bound));
            self.adopted.push(bound);
        }
        Ok(unused)
    }

    /// Sockets of a master that upgraded itself: they listen already, as `states` say.
    pub fn restore(
        &mut self,
        states: Vec<(crate::upgrade::SocketState, OwnedFd)>,
    ) -> Vec<Rc<BoundSocket>> {
        let mut out = Vec::new();
        for (state, fd) in states {
            let bound = Rc::new(BoundSocket {
                address: state.address.clone(),
                local: state.local,
                socket: Socket::from(fd),
                unix_file: state.unix_file,
                stopped: std::cell::Cell::new(false),
                bound_with: None,
            });
            self.live.insert(state.address, Rc::downgrade(&bound));
            out.push(bound);
        }
        out
    }

    /// Number of sockets that are still open.
    pub fn open_count(&self) -> usize {
        self.live.values().filter(|w| w.strong_count() > 0).count()
    }
}

fn bind_error(config: &ListenerConfig, err: io::Error) -> BindError {
    let reason = match err.raw_os_error() {
        Some(libc_eaddrinuse) if libc_eaddrinuse == nix::libc::EADDRINUSE => {
            "address already in use (is another server or baton running?)".to_string()
        }
        Some(code) if code == nix::libc::EACCES => {
            "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)".to_string()
        }
        Some(code) if code == nix::libc::EADDRNOTAVAIL => {
            "address not available on this machine".to_string()
        }
        _ => err.to_string(),
    };
    BindError {
        name: config.name.clone(),
        address: config.address.clone(),
        reason,
    }
}

fn bind(config: &ListenerConfig) -> io::Result<BoundSocket> {
    let bound = |socket: Socket, local: String, unix_file| BoundSocket {
        address: config.address.clone(),
        local,
        socket,
        unix_file,
        stopped: std::cell::Cell::new(false),
        bound_with: Some(config.options.clone()),
    };
    match &config.address {
        ListenerAddress::Tcp { address } | ListenerAddress::Udp { address } => {
            let udp = matches!(config.address, ListenerAddress::Udp { .. });
            // socket2 creates sockets close-on-exec.
            let socket = if udp {
                let socket = Socket::new(Domain::for_address(*address), Type::DGRAM, None)?;
                listener_options::udp_before_bind(&socket, address.is_ipv6(), &config.options)?;
                socket
            } else {
                let socket = Socket::new(Domain::for_address(*address), Type::STREAM, None)?;
                listener_options::before_bind(&socket, address.is_ipv6(), &config.options)?;
                socket
            };
            socket.bind(&(*address).into())?;
            if !udp {
                socket.listen(config.backlog as i32)?;
            }
            let local = socket
                .local_addr()?
                .as_socket()
                .map_or_else(|| address.to_string(), |a| a.to_string());
            Ok(bound(socket, local, None))
        }
        ListenerAddress::Unix { path } | ListenerAddress::UnixDatagram { path } => {
            let datagram = config.address.is_datagram();
            let kind = if datagram { Type::DGRAM } else { Type::STREAM };
            let socket = Socket::new(Domain::UNIX, kind, None)?;
            listener_options::any_kind(&socket, &config.options)?;
            let unix_file = if is_abstract(path) {
                // `@name`: Linux's abstract namespace (a leading NUL byte), no file.
                let mut name = vec![0u8];
                name.extend_from_slice(&path.as_os_str().as_encoded_bytes()[1..]);
                socket.bind(&SockAddr::unix(
                    <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&name),
                )?)?;
                None
            } else {
                remove_stale_socket(path, datagram)?;
                socket.bind(&SockAddr::unix(path)?)?;
                let meta = std::fs::symlink_metadata(path)?;
                Some((path.clone(), meta.dev(), meta.ino()))
            };
            // Built before the file's options are set, so that a failure removes the file.
            let made = bound(socket, path.display().to_string(), unix_file);
            if made.unix_file.is_some() {
                listener_options::unix_file(path, config.mode, &config.options)?;
            }
            if !datagram {
                made.socket.listen(config.backlog as i32)?;
            }
            Ok(made)
        }
    }
}

/// `@name`: an abstract Unix socket.
fn is_abstract(path: &Path) -> bool {
    path.as_os_str().as_encoded_bytes().starts_with(b"@")
}

/// A Unix socket file left by a dead process is removed; a live one is an error, and so is a
/// path that is not a socket.
fn remove_stale_socket(path: &Path, datagram: bool) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "path exists and is not a socket; refusing to replace it",
        ));
    }
    let alive = if datagram {
        std::os::unix::net::UnixDatagram::unbound().and_then(|d| d.connect(path))
    } else {
        std::os::unix::net::UnixStream::connect(path).map(drop)
    };
    match alive {
        Ok(()) => Err(io::Error::from_raw_os_error(nix::libc::EADDRINUSE)),
        Err(e) if e.raw_os_error() == Some(nix::libc::ECONNREFUSED) => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn tcp(name: &str, addr: &str) -> ListenerConfig {
        ListenerConfig {
            name: name.into(),
            address: ListenerAddress::Tcp {
                address: addr.parse().unwrap(),
            },
            backlog: 16,
            mode: None,
            options: ListenerOptions::default(),
        }
    }

    #[test]
    fn options_are_set_at_bind_set_again_at_a_reload_and_read_back_from_the_kernel() {
        use crate::config::Keepalive;
        use std::time::Duration;
        let mut config = tcp("opts", "127.0.0.1:0");
        config.options = ListenerOptions {
            defer_accept: Some(Duration::from_secs(5)),
            fastopen: Some(32),
            freebind: true,
            transparent: true,
            interface: Some("lo".into()),
            nodelay: true,
            keepalive: Some(Keepalive {
                idle: Some(Duration::from_secs(60)),
                interval: Some(Duration::from_secs(10)),
                count: Some(4),
            }),
            mark: Some(42),
            ..ListenerOptions::default()
        };
        let mut table = ListenerTable::default();
        let first = table.prepare(std::slice::from_ref(&config)).unwrap();
        let socket = first.listeners[0].socket.clone();
        let now = socket.options_now();
        assert!(now.defer_accept_s >= Some(5), "{now:?}");
        assert_eq!(now.fastopen, Some(32));
        assert_eq!((now.freebind, now.transparent), (Some(true), Some(true)));
        assert_eq!(now.interface.as_deref(), Some("lo"));
        assert_eq!(now.nodelay, Some(true));
        let keepalive = now.keepalive.unwrap();
        assert!(keepalive.on);
        assert_eq!(
            (keepalive.idle_s, keepalive.interval_s, keepalive.count),
            (Some(60), Some(10), Some(4))
        );
        assert_eq!(now.mark, Some(42));
        // An accepted connection inherits TCP_NODELAY and keep-alive.
        let address = socket.socket.local_addr().unwrap().as_socket().unwrap();
        let _client = std::net::TcpStream::connect(address).unwrap();
        std::io::Write::write_all(&mut &_client, b"x").unwrap(); // past TCP_DEFER_ACCEPT
        let (accepted, _) = socket.socket.accept().unwrap();
        assert!(accepted.tcp_nodelay().unwrap());
        assert!(accepted.keepalive().unwrap());
        assert_eq!(
            accepted.tcp_keepalive_time().unwrap(),
            Duration::from_secs(60)
        );

        // A reload: what a bound socket can take is applied, the rest reported.
        let kept_address = address.to_string();
        let mut again = tcp("opts", &kept_address);
        again.options = ListenerOptions {
            nodelay: false,
            freebind: false,
            ..config.options.clone()
        };
        again.address = config.address.clone();
        let second = table.prepare(std::slice::from_ref(&again)).unwrap();
        assert!(
            Rc::ptr_eq(&second.listeners[0].socket, &socket),
            "the same socket"
        );
        assert_eq!(socket.options_now().nodelay, Some(false));
        assert_eq!(second.warnings.len(), 1, "{:?}", second.warnings);
        assert!(
            second.warnings[0].contains("`freebind` changed"),
            "{:?}",
            second.warnings
        );
    }

    #[test]
    fn nonblocking_is_set_or_cleared_as_the_file_says_and_left_alone_when_it_says_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let with = |config: &ListenerConfig, nonblocking| {
            let mut config = config.clone();
            config.options.nonblocking = nonblocking;
            config
        };
        let configs = [
            tcp("stream", "127.0.0.1:0"),
            ListenerConfig {
                address: ListenerAddress::Udp {
                    address: "127.0.0.1:0".parse().unwrap(),
                },
                ..tcp("datagram", "127.0.0.1:0")
            },
            ListenerConfig {
                address: ListenerAddress::Unix {
                    path: dir.path().join("app.sock"),
                },
                ..tcp("unix", "127.0.0.1:0")
            },
        ];
        for config in configs {
            let mut table = ListenerTable::default();
            // Bound as the file says: non-blocking.
            let first = table.prepare(&[with(&config, Some(true))]).unwrap();
            let socket = first.listeners[0].socket.clone();
            assert_eq!(socket.options_now().nonblocking, Some(true), "{config:?}");
            // A reload that clears it: the same socket, blocking.
            table.prepare(&[with(&config, Some(false))]).unwrap();
            assert_eq!(socket.options_now().nonblocking, Some(false), "{config:?}");
            // Said nothing: what a worker set is left as it is.
            socket.socket.set_nonblocking(true).unwrap();
            let kept = table.prepare(&[with(&config, None)]).unwrap();
            assert!(Rc::ptr_eq(&kept.listeners[0].socket, &socket));
            assert_eq!(socket.options_now().nonblocking, Some(true), "{config:?}");
            // A duplicate (what a worker gets) is the same open socket: it sees the flag.
            let dup = socket2::Socket::from(socket.duplicate().unwrap());
            assert!(dup.nonblocking().unwrap(), "{config:?}");
            drop(kept);
            drop(first);
        }
    }

    #[test]
    fn an_abstract_unix_socket_has_no_file() {
        let name = format!("@baton-test-{}", std::process::id());
        let config = ListenerConfig {
            name: "abstract".into(),
            address: ListenerAddress::Unix {
                path: PathBuf::from(&name),
            },
            backlog: 4,
            mode: None,
            options: ListenerOptions::default(),
        };
        let mut table = ListenerTable::default();
        let prepared = table.prepare(std::slice::from_ref(&config)).unwrap();
        let socket = prepared.listeners[0].socket.clone();
        assert_eq!(socket.local(), name);
        assert!(!Path::new(&name).exists());
        let mut address = vec![0u8];
        address.extend_from_slice(&name.as_bytes()[1..]);
        let client = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        client
            .connect(
                &SockAddr::unix(
                    <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&address),
                )
                .unwrap(),
            )
            .unwrap();
        assert_eq!(
            baton_sys::acceptq::accept_queue(socket.fd())
                .unwrap()
                .length,
            1
        );
    }

    fn inode(fd: BorrowedFd<'_>) -> u64 {
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        std::fs::metadata(format!("/proc/self/fd/{raw}"))
            .unwrap()
            .ino()
    }

    #[test]
    fn kept_addresses_keep_their_socket_and_removed_ones_close_with_their_last_user() {
        let mut table = ListenerTable::default();
        let port = free_port();
        let a = format!("127.0.0.1:{port}");
        let gen1 = table.prepare(&[tcp("http", &a)]).unwrap();
        assert_eq!(gen1.bound, ["http"]);
        // Renamed, same address: the same socket.
        let gen2 = table.prepare(&[tcp("web", &a)]).unwrap();
        assert!(gen2.bound.is_empty());
        assert_eq!(
            inode(gen1.listeners[0].socket.fd()),
            inode(gen2.listeners[0].socket.fd())
        );
        // Removed from gen3; still open while gen1/gen2 hold it.
        let gen3 = table.prepare(&[]).unwrap();
        assert!(gen3.listeners.is_empty());
        assert_eq!(table.open_count(), 1);
        drop(gen1);
        std::net::TcpStream::connect(&a).expect("still listening while gen2 lives");
        drop(gen2);
        assert_eq!(table.open_count(), 0);
        assert!(
            std::net::TcpStream::connect(&a).is_err(),
            "closed with its last generation"
        );
    }

    #[test]
    fn a_failed_prepare_closes_what_it_bound() {
        let mut table = ListenerTable::default();
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fresh = format!("127.0.0.1:{}", free_port());
        let err = table
            .prepare(&[
                tcp("new", &fresh),
                tcp("busy", &busy.local_addr().unwrap().to_string()),
            ])
            .unwrap_err();
        assert_eq!(err.name, "busy");
        assert!(err.to_string().contains("address already in use"), "{err}");
        assert_eq!(table.open_count(), 0);
        std::net::TcpListener::bind(&fresh)
            .expect("the socket bound before the failure was closed");
    }

    #[test]
    fn unix_sockets_replace_stale_files_refuse_live_ones_and_clean_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.sock");
        let config = ListenerConfig {
            name: "local".into(),
            address: ListenerAddress::Unix { path: path.clone() },
            backlog: 8,
            mode: Some(0o600),
            options: ListenerOptions {
                owner: Some(65534),
                group: Some(65534),
                ..ListenerOptions::default()
            },
        };
        // A stale socket file from a dead process.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let mut table = ListenerTable::default();
        let entry = table.prepare(std::slice::from_ref(&config)).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let now = entry.listeners[0].socket.options_now();
        assert_eq!(
            (now.mode, now.owner, now.group),
            (Some(0o600), Some(65534), Some(65534))
        );
        // A second master would find it live.
        let err = ListenerTable::default()
            .prepare(std::slice::from_ref(&config))
            .unwrap_err();
        assert!(err.to_string().contains("already in use"), "{err}");
        drop(entry);
        assert!(!path.exists(), "socket file removed when closed");
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}
