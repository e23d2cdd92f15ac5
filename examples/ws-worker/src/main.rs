//! `ws-worker`: the example WebSocket worker, an echo and broadcast server on baton's SDK and
//! tokio-tungstenite whose connections cross reloads (connection handoff, `docs/protocol.md`).
//!
//! Every text message is answered with `echo: MESSAGE` on the same connection; a message
//! `broadcast: TEXT` goes to every connection of this worker as `TEXT`. Each reply carries
//! nothing of the worker, so a client sees a handoff only by what it does not see: no close,
//! no lost or repeated message.
//!
//! On a drain request each connection is taken apart between two messages (the socket read a
//! whole frame at a time through `FrameBounded`, so no frame is half read) and offered, with
//! what its handshake agreed and the bytes of the next frame already read, to a worker of the
//! serving generation, which rebuilds it with `from_raw_socket`. A connection no taker takes is
//! closed with the close code 1012 (Service Restart): the client knows to come back. With
//! `--no-handoff` it offers nothing and takes nothing: every connection closes so on a reload.

use std::sync::Arc;

use anyhow::Context;
use baton_worker::handoff::websocket::{self, Agreed, Ws};
use baton_worker::handoff::{ConnectionKind, Handoff, Turn, WebSocketState};
use baton_worker::{DrainWatch, Listener, Worker};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::{info, warn};

#[derive(clap::Parser)]
#[command(
    about = "Example baton worker: WebSocket echo and broadcast, connections kept across reloads"
)]
struct Args {
    /// Take no part in connection handoff: close every WebSocket with 1012 on a drain.
    #[arg(long)]
    no_handoff: bool,

    /// Spread the closes (1012) of the connections no taker takes over this window
    /// (milliseconds), instead of closing them all at once.
    #[arg(long, default_value_t = 0)]
    close_window_ms: u64,
}

#[derive(Clone)]
struct Ctx {
    worker: Arc<Worker>,
    handoff: Handoff,
    /// `--no-handoff`: offers nothing, takes nothing.
    no_handoff: bool,
    broadcast: broadcast::Sender<String>,
    close_window: std::time::Duration,
    /// Made at the first close after a drain request: the turns of the closes.
    pacer: Arc<std::sync::OnceLock<baton_worker::Pacer>>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use clap::Parser;
    let args = Args::parse();
    baton_worker::log::to_stderr();
    let mut worker = Worker::from_env()
        .await
        .context("receiving listeners from baton")?;
    let listeners = worker.take_all();
    let handoff = worker
        .handoff(!args.no_handoff, !args.no_handoff)
        .await
        .context("joining the handoff")?;
    let ctx = Ctx {
        worker: Arc::new(worker),
        handoff,
        no_handoff: args.no_handoff,
        broadcast: broadcast::channel(1024).0,
        close_window: std::time::Duration::from_millis(args.close_window_ms),
        pacer: Arc::new(std::sync::OnceLock::new()),
    };
    let mut accepting = tokio::task::JoinSet::new();
    for (_, listener) in listeners {
        accepting.spawn(accept_loop(listener, ctx.clone()));
    }
    tokio::spawn(adopt_loop(ctx.clone()));
    ctx.worker.ready().await.context("reporting ready")?;
    let pid = std::process::id();
    info!(
        "ws-worker pid {pid} generation {} ready",
        ctx.worker.generation()
    );
    let reason = ctx.worker.drain_watch().requested().await;
    accepting.join_all().await;
    info!(
        "pid {pid} draining ({reason}): {} connections",
        ctx.worker.connections()
    );
    ctx.worker.idle().await;
    ctx.handoff.report_now().await;
    let c = ctx.handoff.counts();
    info!(
        "pid {pid} handed off {} of {} WebSockets offered; exiting",
        c.adopted, c.offered
    );
    Ok(())
}

async fn accept_loop(listener: Listener, ctx: Ctx) {
    let mut drain = ctx.worker.drain_watch();
    loop {
        tokio::select! {
            biased;
            _ = drain.requested() => return,
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    let ctx = ctx.clone();
                    let guard = ctx.worker.track();
                    tokio::spawn(async move {
                        if let Ok((ws, agreed)) = websocket::accept(stream).await {
                            serve(ws, agreed, ctx).await;
                        }
                        drop(guard);
                    });
                }
                Err(err) => {
                    warn!("accept failed: {err}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Serves the WebSockets handed to this worker, from where they were.
async fn adopt_loop(ctx: Ctx) {
    while let Some(adopted) = ctx.handoff.adopted().await {
        if adopted.kind != ConnectionKind::WebSocket {
            continue;
        }
        let Ok(state) = WebSocketState::decode(&adopted.state) else {
            continue;
        };
        let ctx = ctx.clone();
        // Counted before the adopted connection (the rest of `adopted`, dropped at the end of
        // this turn) lets go of the worker (see `Adopted`).
        let guard = ctx.worker.track();
        let socket = adopted.socket;
        tokio::spawn(async move {
            let Ok(ws) = websocket::rebuilt(socket, &state).await else {
                return;
            };
            let agreed = Agreed {
                path: state.path,
                subprotocol: state.subprotocol,
            };
            serve(ws, agreed, ctx).await;
            drop(guard);
        });
    }
}

/// How long a connection whose turn came waits for a quiet moment before it goes anyway.
const QUIET_WITHIN: std::time::Duration = std::time::Duration::from_millis(250);

async fn serve(mut ws: Ws, agreed: Agreed, ctx: Ctx) {
    let mut broadcasts = ctx.broadcast.subscribe();
    // Taking part: this connection's place in line for its turn to be offered, woken once, at
    // its turn (not with every other connection when the drain comes). Not: the drain closes it.
    let mut ticket = (!ctx.no_handoff).then(|| ctx.handoff.ticket());
    let mut drain: Option<DrainWatch> = ctx.no_handoff.then(|| ctx.worker.drain_watch());
    // Its turn came: it goes right after its next answer (its client, which has what it
    // asked for, is the least likely to be sending: the handoff's pause then delays nothing),
    // or when this runs out.
    let mut due: Option<(Turn, std::pin::Pin<Box<tokio::time::Sleep>>)> = None;
    loop {
        tokio::select! {
            _ = async { drain.as_mut().unwrap().requested().await }, if drain.is_some() => {
                return leave(ws, &agreed, &ctx, None).await;
            }
            at = async { ticket.as_mut().unwrap().turn().await }, if ticket.is_some() => {
                ticket = None;
                match at {
                    Some(at) => due = Some((at, Box::pin(tokio::time::sleep(QUIET_WITHIN)))),
                    None => return leave(ws, &agreed, &ctx, None).await,
                }
            }
            () = async { due.as_mut().unwrap().1.as_mut().await }, if due.is_some() => {
                let at = due.take().map(|(at, _)| at);
                return leave(ws, &agreed, &ctx, at).await;
            }
            // Waiting here for the next message is the safe point (whole frames only, so
            // nothing of the next one is inside tungstenite).
            message = ws.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    let reply = match text.strip_prefix("broadcast: ") {
                        Some(all) => { let _ = ctx.broadcast.send(all.to_string()); continue; }
                        None => format!("echo: {text}"),
                    };
                    if ws.send(Message::text(reply)).await.is_err() {
                        return;
                    }
                    if let Some((at, _)) = due.take() {
                        return leave(ws, &agreed, &ctx, Some(at)).await;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            Ok(all) = broadcasts.recv() => {
                if ws.send(Message::text(all)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A draining connection at its turn: offered to a taker (`at`), and if none takes it, served
/// until its turn to close (`--close-window-ms`), then closed with 1012: the client knows to
/// come back.
async fn leave(mut ws: Ws, agreed: &Agreed, ctx: &Ctx, at: Option<Turn>) {
    if let Some(at) = at {
        match hand_off(ws, agreed, ctx, at).await {
            None => return,
            Some(kept) => ws = kept,
        }
    }
    let pacer = ctx
        .pacer
        .get_or_init(|| baton_worker::Pacer::new(ctx.close_window, ctx.worker.connections()));
    let turn = pacer.turn();
    tokio::pin!(turn);
    loop {
        tokio::select! {
            () = &mut turn => break,
            message = ws.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    if ws.send(Message::text(format!("echo: {text}"))).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
    let close = CloseFrame {
        code: CloseCode::Restart,
        reason: "service restart".into(),
    };
    let _ = ws.close(Some(close)).await;
    // Until the client's answer to the close (or its end).
    while let Some(Ok(message)) = ws.next().await {
        if matches!(message, Message::Close(_)) {
            break;
        }
    }
}

/// Offers the connection to a taker at its turn. `None`: taken (or gone); `Some`: still ours.
async fn hand_off(ws: Ws, agreed: &Agreed, ctx: &Ctx, turn: Turn) -> Option<Ws> {
    let (socket, state) = websocket::take_apart(ws, agreed, Vec::new()).ok()?;
    let offered = ctx
        .handoff
        .offer_at(turn, socket, ConnectionKind::WebSocket, state.encode())
        .await;
    match offered {
        Ok(()) => None,
        Err(kept) => {
            info!("WebSocket kept: {}", kept.why);
            websocket::rebuilt(kept.socket, &state).await.ok()
        }
    }
}
