//! What a master needs to replace its own program in place (`execve(2)` keeps the pid): its
//! state in a sealed memory file, descriptors that survive the exec, the exec itself, and the
//! signal mask that keeps signals pending across it.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::{FcntlArg, FdFlag, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};

/// A memory file holding `bytes`, sealed: nobody (not even a confused successor) can change,
/// grow or shrink it. Close-on-exec until [`set_inheritable`] says otherwise.
pub fn sealed_memfd(name: &str, bytes: &[u8]) -> io::Result<OwnedFd> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
    let mut written = 0;
    while written < bytes.len() {
        written += nix::unistd::write(&fd, &bytes[written..])?;
    }
    fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(fd)
}

/// Everything in the file, from offset 0 (whatever the file position).
pub fn read_all(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = nix::sys::uio::pread(fd, &mut buf, out.len() as i64)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// Whether `fd` survives `execve` (clears or sets `FD_CLOEXEC`).
pub fn set_inheritable(fd: BorrowedFd<'_>, inheritable: bool) -> io::Result<()> {
    let flags = if inheritable {
        FdFlag::empty()
    } else {
        FdFlag::FD_CLOEXEC
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// The descriptor number, to write into the state the successor reads.
pub fn number(fd: impl AsFd) -> i32 {
    use std::os::fd::AsRawFd;
    fd.as_fd().as_raw_fd()
}

/// Replaces this process's program with `path`, keeping the pid. Returns only on failure (the
/// process is unchanged then).
pub fn exec_in_place(path: &Path, argv: &[OsString], env: &[(OsString, OsString)]) -> io::Error {
    let cstr = |s: &OsStr| CString::new(s.as_bytes());
    let converted = (|| {
        let path = cstr(path.as_os_str())?;
        let argv = argv
            .iter()
            .map(|a| cstr(a))
            .collect::<Result<Vec<_>, _>>()?;
        let env = env
            .iter()
            .map(|(k, v)| {
                let mut kv = k.clone();
                kv.push("=");
                kv.push(v);
                cstr(&kv)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok::<_, std::ffi::NulError>((path, argv, env))
    })();
    match converted {
        Ok((path, argv, env)) => match nix::unistd::execve(&path, &argv, &env) {
            Err(errno) => errno.into(),
        },
        Err(_) => io::Error::new(
            io::ErrorKind::InvalidInput,
            "NUL byte in path, argument or environment",
        ),
    }
}

/// Blocks `signals` in the calling thread (they stay pending, also across `execve`).
pub fn block_signals(signals: &[Signal]) -> io::Result<()> {
    mask(SigmaskHow::SIG_BLOCK, signals)
}

/// Unblocks `signals` in the calling thread: pending ones are delivered.
pub fn unblock_signals(signals: &[Signal]) -> io::Result<()> {
    mask(SigmaskHow::SIG_UNBLOCK, signals)
}

fn mask(how: SigmaskHow, signals: &[Signal]) -> io::Result<()> {
    let mut set = SigSet::empty();
    for &s in signals {
        set.add(s);
    }
    pthread_sigmask(how, Some(&set), None)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_memfd_reads_back_and_refuses_writes() {
        let fd = sealed_memfd("test", b"state").unwrap();
        assert_eq!(read_all(fd.as_fd()).unwrap(), b"state");
        assert!(
            nix::unistd::write(&fd, b"more").is_err(),
            "sealed against writes"
        );
        set_inheritable(fd.as_fd(), true).unwrap();
        let flags = fcntl(&fd, FcntlArg::F_GETFD).unwrap();
        assert_eq!(flags & libc::FD_CLOEXEC, 0);
        set_inheritable(fd.as_fd(), false).unwrap();
        let flags = fcntl(&fd, FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn exec_of_a_missing_program_fails_and_returns() {
        let err = exec_in_place(Path::new("/nonexistent/baton"), &["x".into()], &[]);
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
