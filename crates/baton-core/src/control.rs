//! The control socket: where `baton status`, `baton reload`, ... reach the master.
//!
//! One task accepts connections; each client gets a task of its own, at most
//! [`ControlConfig::max_clients`] at once. A client has [`ControlConfig::timeout`] to send its
//! one request and to take the answer; a client that stalls, sends garbage, an oversized or
//! truncated frame, or a wrong version gets an error (or just a closed connection) and costs the
//! master nothing more. Requests are authorized from the peer's credentials (`SO_PEERCRED`) and
//! then handed to the event loop, which answers without ever waiting on a client; `logs` is
//! answered here, from the workers' kept lines, without the event loop (a follower keeps its
//! connection, and its place among the clients, until it leaves).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use baton_proto::control::{self, ErrorKind, FrameError, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tracing::{debug, warn};

use crate::config::ControlConfig;
use crate::output::Hub;

mod logs;

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<u32>,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "uid {} (pid {pid})", self.uid),
            None => write!(f, "uid {}", self.uid),
        }
    }
}

/// An authorized request, on its way to the event loop.
#[derive(Debug)]
pub struct ControlRequest {
    pub request: Request,
    pub peer: Peer,
    pub reply: oneshot::Sender<Response>,
    /// For `upgrade`: the client's connection, which the master's successor answers on.
    pub client: Option<std::os::fd::OwnedFd>,
}

/// Binds the control socket: a stale file of a dead master is replaced, a live master's is not.
pub fn bind(config: &ControlConfig) -> io::Result<std::os::unix::net::UnixListener> {
    let path = &config.socket;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use: is another baton running?", path.display()),
                ));
            }
            Err(_) => std::fs::remove_file(path)?,
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    if let Some(gid) = config.read_group {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.mode))?;
    Ok(listener)
}

/// A warning when the control socket's directory may be written by other users than the
/// master's: they could put files beside it (its worker registry, the files a write goes
/// through). `None`: only the master's user (or root) may write there.
pub fn directory_warning(socket: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dir = match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let meta = std::fs::metadata(dir).ok()?;
    let owner = nix::unistd::geteuid().as_raw();
    let mode = meta.mode() & 0o7777;
    let who = if mode & 0o002 != 0 {
        "every user".to_string()
    } else if mode & 0o020 != 0 && meta.gid() != 0 {
        format!("group {}", meta.gid())
    } else if meta.uid() != owner && meta.uid() != 0 {
        format!("its owner, uid {}", meta.uid())
    } else {
        return None;
    };
    Some(format!(
        "the control socket's directory {} may be written by {who} (mode {mode:04o}): other users could put files beside the socket; give it a directory of its own (as supervisor.runtime_dir is)",
        dir.display()
    ))
}

/// Removes the socket file when the master is done.
#[derive(Debug)]
pub struct SocketFile(pub std::path::PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Places kept, beyond `max_clients`, for peers that may change the master (root, its user,
/// `allow_users`/`allow_groups`): however many read-only clients hold the others, a `reload`,
/// `stop` or `upgrade` from them is served.
pub const RESERVED_FOR_CHANGES: usize = 4;

/// The places clients are served in: `max_clients` for anyone allowed to connect, a few more for
/// peers that may change the master, and `max_followers` apart for `logs --follow` clients, who
/// stay. A client holds one of the first two while it sends its request and waits for the
/// answer; a follower moves to the third.
#[derive(Debug, Clone)]
struct Places {
    general: Arc<Semaphore>,
    reserved: Arc<Semaphore>,
    followers: Arc<Semaphore>,
}

/// Accepts clients until the task is dropped.
pub async fn serve(
    listener: std::os::unix::net::UnixListener,
    config: ControlConfig,
    requests: mpsc::Sender<ControlRequest>,
    hub: Hub,
) {
    let listener = match UnixListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => {
            warn!("control socket unusable: {err}");
            return;
        }
    };
    let places = Places {
        general: Arc::new(Semaphore::new(config.max_clients)),
        reserved: Arc::new(Semaphore::new(RESERVED_FOR_CHANGES)),
        followers: Arc::new(Semaphore::new(config.max_followers)),
    };
    let config = Arc::new(config);
    let owner = nix::unistd::geteuid().as_raw();
    let refusals = Arc::new(Refusals::default());
    loop {
        // A place of either kind first, so that excess clients wait in the kernel's backlog, not
        // in memory. Which one a client may have is known only once its credentials are read.
        let place = tokio::select! {
            biased;
            Ok(p) = places.general.clone().acquire_owned() => p,
            Ok(p) = places.reserved.clone().acquire_owned() => p,
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                warn!("control socket: accept failed: {err}");
                drop(place);
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        // A test's fault: `return(panic)` makes this task panic (the master serves the socket
        // again, `serve_control_again`).
        crate::faults::Point::ControlAccept.pass();
        let Some(peer) = peer_of(&stream) else {
            continue;
        };
        let reserved = Arc::ptr_eq(place.semaphore(), &places.reserved);
        if reserved && !may_change(&peer, &config, owner) {
            // The last places are kept for those who may change the master.
            refusals.busy.note(|count| {
                warn!(event = baton_proto::event::CONTROL_BUSY, uid = peer.uid, refused = count,
                    "control client {peer} refused: every place for read-only clients is taken ({} at most); {count} refused so far",
                    config.max_clients)
            });
            drop(place);
            let config = config.clone();
            tokio::spawn(async move {
                let mut stream = stream;
                refuse(
                    &mut stream,
                    &config,
                    ErrorKind::Unavailable,
                    format!(
                        "the master serves {} clients already: try again",
                        config.max_clients
                    ),
                )
                .await;
                // What the client sends meanwhile is read and dropped for a moment, so that its
                // request's write does not fail (a closed peer) before it reads the answer.
                let _ = tokio::time::timeout(
                    std::time::Duration::from_millis(500),
                    drain_request(&mut stream),
                )
                .await;
            });
            continue;
        }
        let (config, requests, hub, places, refusals) = (
            config.clone(),
            requests.clone(),
            hub.clone(),
            places.clone(),
            refusals.clone(),
        );
        tokio::spawn(async move {
            let context = Context {
                config: &config,
                owner,
                hub: &hub,
                places: &places,
                refusals: &refusals,
            };
            client(stream, peer, place, &context, requests).await;
        });
    }
}

fn peer_of(stream: &UnixStream) -> Option<Peer> {
    match stream.peer_cred() {
        Ok(cred) => Some(Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid().and_then(|p| u32::try_from(p).ok()),
        }),
        Err(err) => {
            debug!("control socket: no peer credentials: {err}");
            None
        }
    }
}

/// What every client's task shares.
struct Context<'a> {
    config: &'a ControlConfig,
    owner: u32,
    hub: &'a Hub,
    places: &'a Places,
    refusals: &'a Refusals,
}

/// Each kind of refusal, throttled apart.
#[derive(Debug, Default)]
struct Refusals {
    busy: Throttle,
    bad_request: Throttle,
    hung_up: Throttle,
    denied: Throttle,
}

/// Refusals of clients, logged at most [`LOG_BURST`] times a second, each line with how many
/// there were so far: a flood of clients costs the log a few lines a second, not a line each.
#[derive(Debug, Default)]
struct Throttle {
    state: std::sync::Mutex<ThrottleState>,
}

/// Lines a second one kind of refusal may log.
const LOG_BURST: u32 = 5;

#[derive(Debug, Default)]
struct ThrottleState {
    window: Option<std::time::Instant>,
    logged: u32,
    count: u64,
}

impl Throttle {
    /// Counts one refusal; calls `log` with the count so far unless this second's lines are
    /// spent.
    fn note(&self, log: impl FnOnce(u64)) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.count += 1;
        let now = std::time::Instant::now();
        if state
            .window
            .is_none_or(|at| now.duration_since(at) >= std::time::Duration::from_secs(1))
        {
            state.window = Some(now);
            state.logged = 0;
        }
        if state.logged < LOG_BURST {
            state.logged += 1;
            log(state.count);
        }
    }
}

async fn client(
    mut stream: UnixStream,
    peer: Peer,
    place: OwnedSemaphorePermit,
    context: &Context<'_>,
    requests: mpsc::Sender<ControlRequest>,
) {
    let config = context.config;
    let (request, reads) = match tokio::time::timeout(config.timeout, read_request(&mut stream))
        .await
    {
        Ok(Ok(envelope)) => (envelope.body, answer_limit(envelope.reads)),
        Ok(Err(err)) => {
            let kind = if matches!(err, FrameError::Version(_)) {
                ErrorKind::Version
            } else {
                ErrorKind::BadRequest
            };
            context.refusals.bad_request.note(|count| {
                warn!(
                    event = baton_proto::event::CONTROL_BAD_REQUEST,
                    uid = peer.uid,
                    refused = count,
                    "control request from {peer} refused: {err} ({count} refused so far)"
                )
            });
            refuse(&mut stream, config, kind, err.to_string()).await;
            return;
        }
        Err(_) => {
            context.refusals.bad_request.note(|count| {
                warn!(event = baton_proto::event::CONTROL_BAD_REQUEST, uid = peer.uid, refused = count,
                    "control client {peer} sent no request within {} ms: closed ({count} refused so far)",
                    config.timeout.as_millis())
            });
            return;
        }
    };
    if hung_up(&stream) {
        // Its request was in the socket, but nobody waits for the answer: a `reload` whose
        // client was killed while it queued is not carried out later.
        context.refusals.hung_up.note(|count| {
            warn!(event = baton_proto::event::CONTROL_HUNG_UP, uid = peer.uid, refused = count,
                "control request {request} from {peer} dropped: the client hung up before it was read ({count} refused so far)")
        });
        return;
    }
    if let Err(message) = authorize(&request, &peer, config, context.owner) {
        context.refusals.denied.note(|count| {
            warn!(
                event = baton_proto::event::CONTROL_DENIED,
                uid = peer.uid,
                refused = count,
                "control request {request} from {peer} denied: {message} ({count} refused so far)"
            )
        });
        refuse(
            &mut stream,
            config,
            ErrorKind::PermissionDenied,
            message.to_string(),
        )
        .await;
        return;
    }
    if let Request::Logs { filter, follow } = request {
        let follower = if follow {
            match context.places.followers.clone().try_acquire_owned() {
                // A follower stays: it gives its place back and holds one of its own.
                Ok(permit) => Some(permit),
                Err(_) => {
                    context.refusals.busy.note(|count| {
                        warn!(event = baton_proto::event::CONTROL_BUSY, uid = peer.uid, refused = count,
                            "logs --follow from {peer} refused: {} followers already ({count} refused so far)",
                            config.max_followers)
                    });
                    refuse(&mut stream, config, ErrorKind::Unavailable, format!(
                                "{} clients follow the logs already (supervisor.control.max_followers): try again later",
                                config.max_followers
                            )).await;
                    return;
                }
            }
        } else {
            None
        };
        if follower.is_some() {
            drop(place);
        }
        logs::serve_logs(&mut stream, config, context.hub, filter, follow).await;
        return;
    }
    let (reply, answer) = oneshot::channel();
    let client = match request {
        Request::Upgrade { .. } => {
            use std::os::fd::AsFd;
            stream.as_fd().try_clone_to_owned().ok()
        }
        _ => None,
    };
    if requests
        .send(ControlRequest {
            request,
            peer,
            reply,
            client,
        })
        .await
        .is_err()
    {
        return;
    }
    // The answer may take as long as a reload does (`reload` waits for its verdict); the master
    // answers on its own schedule and this task only waits.
    if let Ok(response) = answer.await {
        let _ = respond_within(&mut stream, config, response, reads).await;
    }
}

/// Reads and drops what a refused client sends, up to a frame's size, until it closes.
async fn drain_request(stream: &mut UnixStream) {
    let mut sink = [0u8; 4096];
    let mut left = control::MAX_FRAME + 4;
    while left > 0 {
        match stream.read(&mut sink).await {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// Whether the client closed its end entirely (it exited, or was killed): no one waits for the
/// answer. A client that only shut down its writing half after its request still reads.
fn hung_up(stream: &UnixStream) -> bool {
    use std::os::fd::AsFd;
    baton_sys::channel::peer_closed(stream.as_fd())
}

/// The largest answer a client reads: what it said (up to this build's own limit), or one
/// frame of [`control::MAX_FRAME`] for a client that said nothing (one before issue 28).
fn answer_limit(reads: Option<u64>) -> usize {
    reads.map_or(control::MAX_FRAME, |r| {
        usize::try_from(r).map_or(control::MAX_ANSWER, |r| {
            r.clamp(control::MAX_FRAME, control::MAX_ANSWER)
        })
    })
}

/// Reads one frame, refusing oversized ones before reading their body.
async fn read_request(stream: &mut UnixStream) -> Result<control::Envelope<Request>, FrameError> {
    let mut header = [0u8; 4];
    stream
        .read_exact(&mut header)
        .await
        .map_err(|e| FrameError::Invalid(format!("reading the frame header: {e}")))?;
    let len = control::frame_len(header)?;
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match stream.read(&mut body[got..]).await {
            Ok(0) | Err(_) => return Err(FrameError::Truncated { got, want: len }),
            Ok(n) => got += n,
        }
    }
    control::decode_envelope(&body)
}

/// Refuses a request: an error answer of `kind`, saying why. What the client does then is its
/// own affair (a write error here changes nothing).
async fn refuse(stream: &mut UnixStream, config: &ControlConfig, kind: ErrorKind, message: String) {
    let _ = respond(stream, config, Response::Error { kind, message }).await;
}

/// Sends a small answer (an error, a frame of log lines): any client reads it.
async fn respond(
    stream: &mut UnixStream,
    config: &ControlConfig,
    response: Response,
) -> io::Result<()> {
    respond_within(stream, config, response, control::MAX_FRAME).await
}

/// Sends an answer of any size to a client that reads up to `reads` bytes; one larger than
/// that is replaced by an error that says so (a client before issue 28 then prints it, instead
/// of failing to read the frame and blaming the protocol).
async fn respond_within(
    stream: &mut UnixStream,
    config: &ControlConfig,
    response: Response,
    reads: usize,
) -> io::Result<()> {
    let mut frame = control::encode_frame(response);
    if frame.len() - 4 > reads {
        frame = control::encode_frame(Response::Error {
            kind: ErrorKind::Unavailable,
            message: format!(
                "the answer is {} bytes, more than the {reads} this client reads: ask with baton {} or newer, whose clients read answers of up to {} MiB",
                frame.len() - 4,
                crate::version(),
                control::MAX_ANSWER >> 20
            ),
        });
    }
    tokio::time::timeout(config.timeout, stream.write_all(&frame))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client does not read"))?
}

/// Why a control client may not do what it asked.
#[derive(Debug, thiserror::Error)]
enum Denied {
    #[error(
        "{peer} may not choose the program the master runs ({binary}): only root and uid {owner} may"
    )]
    Program {
        peer: Peer,
        binary: String,
        owner: u32,
    },
    #[error(
        "{peer} may not change the master (allowed: root, uid {owner}, supervisor.control.allow_users/allow_groups)"
    )]
    Change { peer: Peer, owner: u32 },
    #[error("{peer} may not read the master's status (not in supervisor.control.read_group)")]
    Read { peer: Peer },
}

/// Whether `peer` may change the master: root, its own user, or an allowed user or group.
fn may_change(peer: &Peer, config: &ControlConfig, owner: u32) -> bool {
    peer.uid == 0
        || peer.uid == owner
        || config.allow_uids.contains(&peer.uid)
        || peer_groups(peer)
            .iter()
            .any(|g| config.allow_gids.contains(g))
}

/// Mutating requests: root, the master's own user, or an allowed user or group. Read-only
/// requests: also the read group.
fn authorize(
    request: &Request,
    peer: &Peer,
    config: &ControlConfig,
    owner: u32,
) -> Result<(), Denied> {
    let groups = peer_groups(peer);
    let may_mutate = may_change(peer, config, owner);
    if let Request::Upgrade {
        binary: Some(binary),
    } = request
    {
        // Running a program of the client's choice as the master: only for who could anyway.
        if peer.uid != 0 && peer.uid != owner {
            return Err(Denied::Program {
                peer: peer.clone(),
                binary: binary.clone(),
                owner,
            });
        }
    }
    if may_mutate {
        return Ok(());
    }
    if request.mutates() {
        return Err(Denied::Change {
            peer: peer.clone(),
            owner,
        });
    }
    match config.read_group {
        Some(gid) if groups.contains(&gid) => Ok(()),
        _ => Err(Denied::Read { peer: peer.clone() }),
    }
}

/// The peer's primary and supplementary groups (the latter from `/proc/<pid>/status`).
fn peer_groups(peer: &Peer) -> Vec<u32> {
    let mut groups = vec![peer.gid];
    if let Some(pid) = peer.pid {
        if let Ok(status) =
            std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status"))
        {
            if let Some(line) = status.lines().find(|l| l.starts_with("Groups:")) {
                groups.extend(
                    line.split_whitespace()
                        .skip(1)
                        .filter_map(|g| g.parse::<u32>().ok()),
                );
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config() -> ControlConfig {
        ControlConfig {
            socket: "/unused".into(),
            mode: 0o600,
            read_group: Some(4242),
            allow_uids: vec![1000],
            allow_gids: vec![5000],
            timeout: Duration::from_secs(1),
            max_clients: 4,
            max_followers: 2,
        }
    }

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            uid,
            gid,
            pid: None,
        }
    }

    #[test]
    fn authorization_follows_the_configuration() {
        let c = config();
        let reload = Request::Reload { wait: true };
        assert!(authorize(&reload, &peer(0, 0), &c, 77).is_ok(), "root");
        assert!(
            authorize(&reload, &peer(77, 77), &c, 77).is_ok(),
            "the master's own user"
        );
        assert!(
            authorize(&reload, &peer(1000, 1), &c, 77).is_ok(),
            "allowed user"
        );
        assert!(
            authorize(&reload, &peer(9, 5000), &c, 77).is_ok(),
            "allowed group"
        );
        let denied = authorize(&reload, &peer(9, 4242), &c, 77)
            .unwrap_err()
            .to_string();
        assert!(denied.contains("uid 9 may not change"), "{denied}");
        assert!(
            authorize(&Request::Status { brief: false }, &peer(9, 4242), &c, 77).is_ok(),
            "read group reads"
        );
        assert!(
            authorize(&Request::Status { brief: false }, &peer(9, 9), &c, 77).is_err(),
            "others do not"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn frames_are_read_with_limits_over_a_socket_pair() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&control::encode_frame(Request::Status { brief: false }))
            .await
            .unwrap();
        assert_eq!(
            read_request(&mut b).await.unwrap().body,
            Request::Status { brief: false }
        );
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(matches!(
            read_request(&mut b).await,
            Err(FrameError::TooLarge { .. })
        ));
        a.write_all(&[0, 0, 0, 10, b'{']).await.unwrap();
        drop(a);
        assert!(matches!(
            read_request(&mut b).await,
            Err(FrameError::Truncated { .. })
        ));
    }
}
