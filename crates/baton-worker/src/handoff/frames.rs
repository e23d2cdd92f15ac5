//! [`FrameBounded`]: a WebSocket's socket, read a whole frame at a time, so that a WebSocket
//! library on top of it never holds part of a frame between two messages: what was read past
//! the last whole frame stays here, where a handoff can take it ([`FrameBounded::into_parts`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest frame it holds whole (bigger ones are refused: the connection fails).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// A stream whose reader gets WebSocket frames only once each is whole, and never bytes of the
/// next one with them. Writes go straight through.
#[derive(Debug)]
pub struct FrameBounded<S> {
    inner: S,
    /// Bytes read from `inner` and not given to the reader yet.
    buf: Vec<u8>,
    /// Bytes of the frame being given to the reader (at the front of `buf`) still to give.
    giving: usize,
    /// Reading frames (else passing bytes through: during the HTTP handshake).
    framing: bool,
}

impl<S> FrameBounded<S> {
    /// `inner`, with `unread` (bytes read from it before: a handoff's state) in front, read a
    /// frame at a time: an adopted WebSocket.
    pub fn new(unread: Vec<u8>, inner: S) -> Self {
        FrameBounded {
            inner,
            buf: unread,
            giving: 0,
            framing: true,
        }
    }

    /// `inner` for a WebSocket not open yet: bytes pass through (the HTTP handshake) until
    /// [`FrameBounded::start_framing`].
    pub fn handshaking(inner: S) -> Self {
        FrameBounded {
            inner,
            buf: Vec::new(),
            giving: 0,
            framing: false,
        }
    }

    /// The handshake is over: from now on the reader gets whole frames.
    pub fn start_framing(&mut self) {
        self.framing = true;
    }

    /// The stream and the bytes read from it that the reader has not had: at a message boundary
    /// (the reader waiting for the next message), the start of the next frame, if any.
    pub fn into_parts(self) -> (Vec<u8>, S) {
        (self.buf, self.inner)
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Bytes read and not yet given to the reader.
    pub fn unread(&self) -> &[u8] {
        &self.buf
    }
}

/// The length of the frame at the start of `buf` (header and payload), once its header is
/// there. RFC 6455, section 5.2.
pub fn frame_len(buf: &[u8]) -> io::Result<Option<usize>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let masked = buf[1] & 0x80 != 0;
    let (header, payload) = match buf[1] & 0x7f {
        126 if buf.len() < 4 => return Ok(None),
        126 => (4, u16::from_be_bytes([buf[2], buf[3]]) as u64),
        127 if buf.len() < 10 => return Ok(None),
        127 => {
            let mut len = [0u8; 8];
            len.copy_from_slice(&buf[2..10]);
            (10, u64::from_be_bytes(len))
        }
        n => (2, n as u64),
    };
    let total = header as u64 + if masked { 4 } else { 0 } + payload;
    if total > MAX_FRAME as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a WebSocket frame of {total} bytes, more than {MAX_FRAME}"),
        ));
    }
    Ok(Some(total as usize))
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameBounded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.framing && this.buf.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, out);
        }
        loop {
            if this.giving == 0
                && let Some(len) = frame_len(&this.buf)?
                && this.buf.len() >= len
            {
                this.giving = len;
            }
            if this.giving > 0 {
                let n = this.giving.min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.buf.drain(..n);
                this.giving -= n;
                return Poll::Ready(Ok(()));
            }
            // Not a whole frame yet: read more.
            // Not zeroed: the socket writes what it gives (each read would clear 16 KiB).
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); 16 * 1024];
            let mut read = ReadBuf::uninit(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // End of stream: what is left (a cut frame) goes to the reader, which fails
                // on it as it would have without this wrapper.
                let n = this.buf.len().min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.buf.drain(..n);
                return Poll::Ready(Ok(()));
            }
            this.buf.extend_from_slice(read.filled());
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameBounded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A masked client frame of `payload` bytes.
    fn frame(payload: usize) -> Vec<u8> {
        let mut f = vec![0x82];
        match payload {
            0..=125 => f.push(0x80 | payload as u8),
            126..=65535 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(payload as u16).to_be_bytes());
            }
            _ => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(payload as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend(std::iter::repeat_n(7u8, payload));
        f
    }

    #[test]
    fn frame_lengths_of_each_header_form() {
        for payload in [0, 5, 125, 126, 300, 65535, 65536, 100_000] {
            let f = frame(payload);
            assert_eq!(frame_len(&f).unwrap(), Some(f.len()), "payload {payload}");
            assert_eq!(frame_len(&f[..1]).unwrap(), None);
        }
        assert_eq!(frame_len(&frame(300)[..3]).unwrap(), None);
        let huge = [0x82, 127, 0, 0, 0, 1, 0, 0, 0, 0];
        assert!(frame_len(&huge).is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_reader_gets_whole_frames_and_the_rest_stays_for_a_handoff() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut bounded = FrameBounded::new(Vec::new(), server);
        let (a, b) = (frame(10), frame(70_000));
        // The first frame, and the first bytes of the second, arrive together; the rest of the
        // second later.
        let mut first = a.clone();
        first.extend_from_slice(&b[..5]);
        client.write_all(&first).await.unwrap();
        let mut got = vec![0u8; a.len()];
        bounded.read_exact(&mut got).await.unwrap();
        assert_eq!(got, a);
        // Between messages: the reader has nothing of the second frame; the wrapper has 5 bytes.
        assert_eq!(bounded.unread(), &b[..5]);
        let (unread, server) = bounded.into_parts();
        // The taker's side: the same stream with those bytes in front reads the second frame.
        let mut taken = FrameBounded::new(unread, server);
        client.write_all(&b[5..]).await.unwrap();
        let mut got = vec![0u8; b.len()];
        taken.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b);
    }
}
