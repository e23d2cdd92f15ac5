//! The control socket, client side: one request, one answer (or, for `logs`, several frames).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_proto::control::{self, FrameError, Request, Response};

use crate::exit::{EX_IOERR, EX_NOPERM, EX_PROTOCOL, EX_UNAVAILABLE};

/// Talking to the master failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("no master at {0}: is baton running? (pass -c CONFIG or -s SOCKET to look elsewhere)")]
    NoMaster(PathBuf),
    #[error(
        "permission denied on {0}: run as root, the master's user, or a member of its control group"
    )]
    Permission(PathBuf),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("the master at {path} answered in a way this baton does not understand: {error}")]
    Protocol { path: PathBuf, error: FrameError },
}

impl ClientError {
    /// sysexits-style status: 69 unavailable, 76 protocol, 77 permission, 74 I/O.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            ClientError::NoMaster(_) => EX_UNAVAILABLE,
            ClientError::Permission(_) => EX_NOPERM,
            ClientError::Io(..) => EX_IOERR,
            ClientError::Protocol { .. } => EX_PROTOCOL,
        }
    }
}

/// Sends `request` to the master at `path` and waits for its answer (at most `timeout`, if given).
pub(crate) fn call(
    path: &Path,
    request: &Request,
    timeout: Option<Duration>,
) -> Result<Response, ClientError> {
    Conversation::open(path, request, timeout)?.next()
}

/// A request sent, and its answer frames to read (`logs` has several).
pub(crate) struct Conversation {
    stream: UnixStream,
    path: PathBuf,
}

impl Conversation {
    pub(crate) fn open(
        path: &Path,
        request: &Request,
        timeout: Option<Duration>,
    ) -> Result<Conversation, ClientError> {
        let mut stream = UnixStream::connect(path).map_err(|e| io_error(path, e))?;
        stream
            .set_read_timeout(timeout)
            .map_err(|e| io_error(path, e))?;
        stream
            .write_all(&control::encode_request(request))
            .map_err(|e| io_error(path, e))?;
        Ok(Conversation {
            stream,
            path: path.into(),
        })
    }

    /// The next answer frame. `Ok(None)`: the master closed the connection between frames.
    pub(crate) fn next_or_end(&mut self) -> Result<Option<Response>, ClientError> {
        let mut header = [0u8; 4];
        match self.stream.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(io_error(&self.path, e)),
        }
        let protocol = |error| ClientError::Protocol {
            path: self.path.clone(),
            error,
        };
        let len = control::frame_len_within(header, control::MAX_ANSWER).map_err(protocol)?;
        let mut body = vec![0u8; len];
        self.stream
            .read_exact(&mut body)
            .map_err(|e| io_error(&self.path, e))?;
        control::decode_body(&body).map(Some).map_err(protocol)
    }

    /// The next answer frame; the connection must not end first.
    pub(crate) fn next(&mut self) -> Result<Response, ClientError> {
        self.next_or_end()?.ok_or_else(|| {
            let eof = std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the master closed the connection without answering",
            );
            io_error(&self.path, eof)
        })
    }
}

fn io_error(path: &Path, e: std::io::Error) -> ClientError {
    match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NoMaster(path.into())
        }
        std::io::ErrorKind::PermissionDenied => ClientError::Permission(path.into()),
        _ => ClientError::Io(path.into(), e),
    }
}
