//! `listeners:` in the file: a listener's address (TCP `address`, Unix `path`, an abstract Unix
//! name as `path: "@name"`), its kind (stream by default; `kind: udp` or `kind: unix-datagram`
//! for datagrams), backlog, and options. An option that does not apply to the listener's kind is
//! an error that names both, so a typo never goes unnoticed.

use std::path::PathBuf;
use std::time::Duration;

use baton_proto::ListenerAddress;
use serde::Deserialize;

use super::raw::{Backlog, GroupId, ListenerName, Mode, TcpAddress, Timeout, UserId};
use super::{DEFAULT_BACKLOG, Keepalive, ListenerOptions};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, try_from = "ListenerFields")]
pub(super) struct RawListener {
    pub(super) name: String,
    pub(super) address: ListenerAddress,
    pub(super) backlog: u32,
    pub(super) mode: Option<Mode>,
    pub(super) options: ListenerOptions,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListenerFields {
    name: ListenerName,
    /// TCP: `host:port`, IPv6 as `[::1]:port`.
    address: Option<TcpAddress>,
    /// Unix stream socket path, or `@name` for an abstract socket.
    path: Option<PathBuf>,
    #[serde(default)]
    backlog: Option<Backlog>,
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default)]
    defer_accept: Option<Timeout>,
    #[serde(default)]
    fastopen: Option<u32>,
    #[serde(default)]
    v6only: Option<bool>,
    #[serde(default)]
    freebind: Option<bool>,
    #[serde(default)]
    transparent: Option<bool>,
    #[serde(default)]
    interface: Option<String>,
    #[serde(default)]
    nodelay: Option<bool>,
    #[serde(default)]
    keepalive: Option<RawKeepalive>,
    #[serde(default)]
    mark: Option<u32>,
    #[serde(default)]
    owner: Option<UserId>,
    #[serde(default)]
    group: Option<GroupId>,
    /// `tcp` (default with `address`), `udp`, `unix` (default with `path`), `unix-datagram`.
    #[serde(default)]
    kind: Option<Kind>,
    #[serde(default)]
    recv_buffer: Option<BufferSize>,
    #[serde(default)]
    send_buffer: Option<BufferSize>,
    /// UDP only: steer QUIC connections to the generation that holds them.
    #[serde(default)]
    quic: Option<bool>,
    /// Any kind: `O_NONBLOCK` on the socket handed over.
    #[serde(default)]
    nonblocking: Option<bool>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    Tcp,
    Udp,
    Unix,
    UnixDatagram,
}

/// A socket buffer size: bytes (`262144`) or `256KiB`, `4MiB`; 4 KiB to 1 GiB.
struct BufferSize(u64);

impl<'de> Deserialize<'de> for BufferSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Bytes(u64),
            Text(String),
        }
        let (bytes, text) = match Either::deserialize(d)? {
            Either::Bytes(n) => (Some(n), n.to_string()),
            Either::Text(text) => {
                let t = text.trim();
                let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
                let (number, unit) = t.split_at(split);
                let factor: Option<u64> = match unit.trim() {
                    "" | "B" => Some(1),
                    "KiB" => Some(1 << 10),
                    "MiB" => Some(1 << 20),
                    "GiB" => Some(1 << 30),
                    _ => None,
                };
                let bytes = factor.and_then(|f| number.parse::<u64>().ok()?.checked_mul(f));
                (bytes, text)
            }
        };
        match bytes {
            Some(n) if (4096..=1 << 30).contains(&n) => Ok(BufferSize(n)),
            _ => Err(D::Error::custom(format!(
                "invalid buffer size \"{text}\": bytes, KiB or MiB (256KiB, 4MiB), 4 KiB to 1 GiB"
            ))),
        }
    }
}

/// `keepalive: true`, or its settings (each optional: the host's default where absent).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawKeepalive {
    On(bool),
    Settings(KeepaliveFields),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeepaliveFields {
    #[serde(default)]
    idle: Option<Timeout>,
    #[serde(default)]
    interval: Option<Timeout>,
    #[serde(default)]
    count: Option<u32>,
}

/// The kernel's limits: `TCP_KEEPIDLE`/`TCP_KEEPINTVL` up to 32767 s, `TCP_KEEPCNT` up to 127.
const MAX_KEEPALIVE_SECONDS: u64 = 32767;
const MAX_KEEPALIVE_COUNT: u32 = 127;

fn keepalive(name: &str, raw: RawKeepalive) -> Result<Option<Keepalive>, String> {
    let fields = match raw {
        RawKeepalive::On(false) => return Ok(None),
        RawKeepalive::On(true) => KeepaliveFields {
            idle: None,
            interval: None,
            count: None,
        },
        RawKeepalive::Settings(fields) => fields,
    };
    let seconds = |what: &str, t: Option<Timeout>| -> Result<Option<Duration>, String> {
        match t {
            Some(Timeout(d)) if d.as_secs() < 1 || d.as_secs() > MAX_KEEPALIVE_SECONDS => {
                Err(format!(
                    "listener `{name}`: `keepalive` {what} {d:?} is out of range: 1s to {MAX_KEEPALIVE_SECONDS}s"
                ))
            }
            other => Ok(other.map(|t| t.0)),
        }
    };
    let count = match fields.count {
        Some(n) if n == 0 || n > MAX_KEEPALIVE_COUNT => {
            return Err(format!(
                "listener `{name}`: `keepalive` count {n} is out of range: 1 to {MAX_KEEPALIVE_COUNT}"
            ));
        }
        other => other,
    };
    Ok(Some(Keepalive {
        idle: seconds("idle", fields.idle)?,
        interval: seconds("interval", fields.interval)?,
        count,
    }))
}

impl TryFrom<ListenerFields> for RawListener {
    type Error = String;
    fn try_from(f: ListenerFields) -> Result<Self, String> {
        let name = f.name.0;
        let address = match (f.address, f.path, f.kind) {
            (Some(a), None, None | Some(Kind::Tcp)) => ListenerAddress::Tcp { address: a.0 },
            (Some(a), None, Some(Kind::Udp)) => ListenerAddress::Udp { address: a.0 },
            (None, Some(p), None | Some(Kind::Unix)) => ListenerAddress::Unix { path: p },
            (None, Some(p), Some(Kind::UnixDatagram)) => ListenerAddress::UnixDatagram { path: p },
            (Some(_), None, Some(_)) => {
                return Err(format!(
                    "listener `{name}`: an `address` is `kind: tcp` (the default) or `kind: udp`"
                ));
            }
            (None, Some(_), Some(_)) => {
                return Err(format!(
                    "listener `{name}`: a `path` is `kind: unix` (the default) or `kind: unix-datagram`"
                ));
            }
            (Some(_), Some(_), _) => {
                return Err(format!(
                    "listener `{name}`: give either `address` or `path`, not both"
                ));
            }
            (None, None, _) => {
                return Err(format!(
                    "listener `{name}`: needs `address` (TCP or UDP host:port) or `path` (Unix socket)"
                ));
            }
        };
        let tcp_only = [
            ("defer_accept", f.defer_accept.is_some()),
            ("fastopen", f.fastopen.is_some()),
            ("nodelay", f.nodelay.is_some()),
            ("keepalive", f.keepalive.is_some()),
        ];
        let ip_only = [
            ("v6only", f.v6only.is_some()),
            ("freebind", f.freebind.is_some()),
            ("transparent", f.transparent.is_some()),
            ("interface", f.interface.is_some()),
            ("mark", f.mark.is_some()),
        ];
        let unix_only = [
            ("mode", f.mode.is_some()),
            ("owner", f.owner.is_some()),
            ("group", f.group.is_some()),
        ];
        if !matches!(address, ListenerAddress::Tcp { .. }) {
            if let Some((option, _)) = tcp_only.iter().find(|(_, set)| *set) {
                return Err(format!(
                    "listener `{name}`: `{option}` applies to TCP listeners only"
                ));
            }
        }
        if f.quic.is_some() && !matches!(address, ListenerAddress::Udp { .. }) {
            return Err(format!(
                "listener `{name}`: `quic` applies to UDP listeners only (`kind: udp`)"
            ));
        }
        if address.is_datagram() && f.backlog.is_some() {
            return Err(format!(
                "listener `{name}`: `backlog` applies to stream listeners only: a datagram socket has no queue of connections"
            ));
        }
        match &address {
            ListenerAddress::Tcp { address } | ListenerAddress::Udp { address } => {
                if let Some((option, _)) = unix_only.iter().find(|(_, set)| *set) {
                    return Err(format!(
                        "listener `{name}`: `{option}` applies to Unix sockets only"
                    ));
                }
                if f.v6only.is_some() && address.is_ipv4() {
                    return Err(format!(
                        "listener `{name}`: `v6only` applies to IPv6 addresses only"
                    ));
                }
            }
            ListenerAddress::Unix { path } | ListenerAddress::UnixDatagram { path } => {
                if let Some((option, _)) = ip_only.iter().find(|(_, set)| *set) {
                    return Err(format!(
                        "listener `{name}`: `{option}` applies to TCP and UDP listeners only"
                    ));
                }
                let abstract_name = path.as_os_str().as_encoded_bytes().starts_with(b"@");
                if let Some((option, _)) = unix_only.iter().find(|(_, set)| *set) {
                    if abstract_name {
                        return Err(format!(
                            "listener `{name}`: `{option}` does not apply to an abstract socket (`@...`: it has no file)"
                        ));
                    }
                }
                if abstract_name && path.as_os_str().len() < 2 {
                    return Err(format!(
                        "listener `{name}`: an abstract socket needs a name after `@`"
                    ));
                }
            }
        }
        if let Some(queue) = f.fastopen {
            if !(1..=65535).contains(&queue) {
                return Err(format!(
                    "listener `{name}`: fastopen \"{queue}\" is out of range: a queue of 1 to 65535"
                ));
            }
        }
        if let Some(interface) = &f.interface {
            // IFNAMSIZ is 16 with the terminating NUL.
            let valid =
                (1..16).contains(&interface.len()) && !interface.contains(['/', ' ', '\t', '\0']);
            if !valid {
                return Err(format!(
                    "listener `{name}`: invalid interface {interface:?}: a device name of 1 to 15 characters, such as eth0"
                ));
            }
        }
        let keepalive = f.keepalive.map(|k| keepalive(&name, k)).transpose()?;
        Ok(RawListener {
            options: ListenerOptions {
                defer_accept: f.defer_accept.map(|t| t.0),
                fastopen: f.fastopen,
                v6only: f.v6only,
                freebind: f.freebind.unwrap_or(false),
                transparent: f.transparent.unwrap_or(false),
                interface: f.interface,
                nodelay: f.nodelay.unwrap_or(false),
                keepalive: keepalive.flatten(),
                mark: f.mark,
                owner: f.owner.map(|u| u.0),
                group: f.group.map(|g| g.0),
                recv_buffer: f.recv_buffer.map(|b| b.0),
                send_buffer: f.send_buffer.map(|b| b.0),
                quic: f.quic.unwrap_or(false),
                nonblocking: f.nonblocking,
            },
            name,
            address,
            backlog: f.backlog.map_or(DEFAULT_BACKLOG, |b| b.0),
            mode: f.mode,
        })
    }
}
