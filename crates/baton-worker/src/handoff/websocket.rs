//! Connection handoff for tokio-tungstenite's WebSockets (feature `tungstenite`): a WebSocket
//! taken apart between messages, and rebuilt where it stopped with what its handshake agreed.
//!
//! A server accepts with [`accept`] (the handshake, then whole frames only: between two
//! messages nothing of the next one is inside tungstenite, so the socket and
//! [`FrameBounded`]'s unread bytes are all of the connection). When it drains, at a moment it
//! waits for the next message, [`take_apart`] gives the socket and the state to offer with
//! [`ConnectionKind::WebSocket`](super::ConnectionKind::WebSocket); a taker, and a giver whose
//! offer came back, serve the WebSocket again with [`rebuilt`].
//!
//! ```ignore
//! let (mut ws, agreed) = websocket::accept(stream).await?;
//! // ... at the drain, waiting for the next message:
//! let (socket, state) = websocket::take_apart(ws, &agreed, session)?;
//! match handoff.offer(socket, ConnectionKind::WebSocket, state.encode()).await {
//!     Ok(()) => {}                                                  // the taker serves it
//!     Err(kept) => ws = websocket::rebuilt(kept.socket, &state).await?, // still ours
//! }
//! // A taker:
//! let state = WebSocketState::decode(&adopted.state)?;
//! let ws = websocket::rebuilt(adopted.socket, &state).await?;
//! ```

use std::io;
use std::os::fd::OwnedFd;

use baton_proto::handoff::WebSocketState;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::FrameBounded;
use crate::Stream;

/// The read buffer of each WebSocket. tungstenite's default, 128 KiB, is zeroed before each
/// read from the socket: at thousands of connections a message, that cost more than the rest of
/// the echo (and 128 KiB a connection). Frames larger than this still arrive whole: the buffer
/// grows for them.
pub const READ_BUFFER: usize = 4096;

/// The configuration of the WebSockets [`accept`] and [`rebuilt`] make: tungstenite's defaults
/// but the read buffer ([`READ_BUFFER`]).
pub fn config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(READ_BUFFER)
}

/// A WebSocket served so that it can be handed off.
pub type Ws = WebSocketStream<FrameBounded<Stream>>;

/// What a WebSocket's handshake agreed on, kept for its handoff.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Agreed {
    /// The request path it was opened on.
    pub path: String,
    /// The subprotocol chosen (`Sec-WebSocket-Protocol`): the first the client offered.
    pub subprotocol: Option<String>,
}

/// The server's handshake on `stream`: the path is kept and the first subprotocol the client
/// offers is chosen (no extension is agreed); then whole frames only.
pub async fn accept(stream: Stream) -> Result<(Ws, Agreed), tokio_tungstenite::tungstenite::Error> {
    let mut agreed = Agreed::default();
    let seen = &mut agreed;
    // tungstenite's callback type: its error is an HTTP response, large by nature.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, mut response: Response| {
        seen.path = request.uri().path().to_string();
        let offered = request
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(|p| p.trim().to_string());
        if let Some(p) = &offered
            && let Ok(value) = p.parse()
        {
            response
                .headers_mut()
                .insert("sec-websocket-protocol", value);
        }
        seen.subprotocol = offered;
        Ok(response)
    };
    let mut ws = tokio_tungstenite::accept_hdr_async_with_config(
        FrameBounded::handshaking(stream),
        callback,
        Some(config()),
    )
    .await?;
    // From the first message on, whole frames only (the client waits for the handshake's
    // answer before its first frame, so none is inside tungstenite now).
    ws.get_mut().start_framing();
    Ok((ws, agreed))
}

/// `ws`, stopped between two messages (nothing being written, the next one not begun: call it
/// while waiting for the next message), taken apart: its socket (out of the runtime, not
/// closed) and the state a taker rebuilds it from, `session` being the application's own.
pub fn take_apart(
    ws: Ws,
    agreed: &Agreed,
    session: Vec<u8>,
) -> io::Result<(OwnedFd, WebSocketState)> {
    let (unread, stream) = ws.into_inner().into_parts();
    let state = WebSocketState {
        subprotocol: agreed.subprotocol.clone(),
        extensions: None,
        path: agreed.path.clone(),
        unread,
        session,
    };
    Ok((stream.into_owned_fd()?, state))
}

/// A WebSocket served again from where it stopped: an adopted one (its state decoded with
/// [`WebSocketState::decode`]), or one whose offer came back.
pub async fn rebuilt(socket: OwnedFd, state: &WebSocketState) -> io::Result<Ws> {
    let stream = Stream::from_owned_fd(socket)?;
    let socket = FrameBounded::new(state.unread.clone(), stream);
    Ok(WebSocketStream::from_raw_socket(socket, Role::Server, Some(config())).await)
}
