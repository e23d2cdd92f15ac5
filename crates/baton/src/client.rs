//! The control socket, client side: one request, one answer.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_proto::control::{self, FrameError, Request, Response};

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
            ClientError::NoMaster(_) => 69,
            ClientError::Permission(_) => 77,
            ClientError::Io(..) => 74,
            ClientError::Protocol { .. } => 76,
        }
    }
}

/// Sends `request` to the master at `path` and waits for its answer (at most `timeout`, if given).
pub(crate) fn call(
    path: &Path,
    request: &Request,
    timeout: Option<Duration>,
) -> Result<Response, ClientError> {
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NoMaster(path.into())
        }
        std::io::ErrorKind::PermissionDenied => ClientError::Permission(path.into()),
        _ => ClientError::Io(path.into(), e),
    };
    let mut stream = UnixStream::connect(path).map_err(io)?;
    stream.set_read_timeout(timeout).map_err(io)?;
    stream
        .write_all(&control::encode_frame(request))
        .map_err(io)?;
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).map_err(io)?;
    let protocol = |error| ClientError::Protocol {
        path: path.into(),
        error,
    };
    let len = control::frame_len(header).map_err(protocol)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).map_err(io)?;
    control::decode_body(&body).map_err(protocol)
}
