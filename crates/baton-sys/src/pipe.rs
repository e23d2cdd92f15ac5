//! The pipes that carry a worker's standard output and error to the master.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;

use nix::fcntl::{FcntlArg, OFlag, fcntl};

/// A pipe for one output stream of a worker: `(read end, write end)`, both close-on-exec (the
/// write end becomes the child's descriptor 1 or 2 through `dup2`, which clears the flag on the
/// copy). The read end is non-blocking, for the master's event loop; the write end stays
/// blocking, so a worker that writes faster than the master reads waits on its pipe, as it would
/// writing to a terminal or to journald, instead of losing lines.
pub fn output_pipe() -> io::Result<(File, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let flags = OFlag::from_bits_truncate(fcntl(&read, FcntlArg::F_GETFL)?);
    fcntl(&read, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok((File::from(read), write))
}

/// Reads what a non-blocking pipe holds now (`WouldBlock` if nothing, 0 at its end), whatever a
/// reactor watching it believes: for the last read after its writer exited, before the reactor
/// has seen the news.
pub fn read_now(fd: std::os::fd::BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    Ok(nix::unistd::read(fd, buf)?)
}

/// Makes `fd` non-blocking (any descriptor: a read end adopted across a self-upgrade, a
/// listening socket a worker adopts).
pub fn set_nonblocking(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn read_end_never_blocks_and_write_end_does_not_lose() {
        let (mut read, write) = output_pipe().unwrap();
        let mut buf = [0u8; 16];
        let err = read.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        let mut write = File::from(write);
        write.write_all(b"line\n").unwrap();
        assert_eq!(read.read(&mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"line\n");
        drop(write);
        assert_eq!(
            read.read(&mut buf).unwrap(),
            0,
            "end of file once the writer is gone"
        );
    }
}
