//! Why setting up a worker failed: each error names the descriptor, listener or variable.

use std::io;

use baton_proto::{CHANNEL_FD_ENV, PROTOCOL_VERSION};

/// Setting up the worker failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{CHANNEL_FD_ENV} is not set: this process was not started by baton")]
    NotUnderBaton,
    #[error("{CHANNEL_FD_ENV}={0:?} is not a descriptor number")]
    BadChannelFd(String),
    #[error("channel descriptor {fd} is unusable")]
    Channel {
        fd: i32,
        #[source]
        source: io::Error,
    },
    #[error("channel descriptor {0} is not a SOCK_SEQPACKET socket")]
    NotSeqPacket(i32),
    #[error("reading the handoff from the master")]
    Receive(#[source] io::Error),
    #[error("the master closed the channel during the handoff")]
    Closed,
    #[error("handoff protocol error: {0}")]
    Protocol(String),
    #[error("master speaks protocol version {0}; this worker speaks {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("manifest lists {expected} listeners but {received} descriptors arrived")]
    CountMismatch { expected: usize, received: usize },
    #[error("descriptors were truncated in transit (MSG_CTRUNC): expected {expected}")]
    Truncated { expected: usize },
    #[error("listener `{name}`: the descriptor is not a listening stream socket")]
    NotAListener { name: String },
    #[error("no listener named `{0}` in the manifest")]
    UnknownListener(String),
    #[error("listener `{0}` was already taken")]
    AlreadyTaken(String),
    #[error("listener `{name}`: {source}")]
    Adopt {
        name: String,
        #[source]
        source: io::Error,
    },
    /// Socket activation's variables are wrong: `LISTEN_PID` names another process, or a
    /// variable does not parse (the text is baton-sys's, written once for the master and here).
    #[error(transparent)]
    Activation(#[from] baton_sys::activation::ActivationError),
    #[error(
        "listener `{name}`: the manifest says {address}, but the descriptor is bound to {actual}"
    )]
    WrongSocket {
        name: String,
        address: String,
        actual: String,
    },
}
