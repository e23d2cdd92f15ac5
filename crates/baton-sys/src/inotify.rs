//! inotify for the event loop: an inotify instance registered with tokio's reactor, so that a
//! task can wait for file system events without a thread or a timer.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

pub use nix::sys::inotify::{AddWatchFlags, InotifyEvent, WatchDescriptor};
use nix::sys::inotify::{InitFlags, Inotify as Instance};
use tokio::io::unix::AsyncFd;

/// The inotify descriptor, owned, for the reactor.
struct Owned(Instance);

impl AsRawFd for Owned {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// An inotify instance the event loop waits on.
pub struct Inotify {
    fd: AsyncFd<Owned>,
}

impl std::fmt::Debug for Inotify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inotify")
            .field("fd", &self.fd.as_raw_fd())
            .finish()
    }
}

impl Inotify {
    /// A new instance (non-blocking, close-on-exec), registered with the current runtime.
    pub fn new() -> io::Result<Inotify> {
        let instance = Instance::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // SAFETY: the descriptor is owned by the `Owned` moved into the `AsyncFd`: it stays
        // open for as long as it is registered, and closes only when the `AsyncFd` (which
        // deregisters it first) is dropped.
        let fd = unsafe { AsyncFd::register(Owned(instance)) }.map_err(|e| e.into_parts().1)?;
        Ok(Inotify { fd })
    }

    /// Watches `path` (a directory, symlinks followed) for `mask`.
    pub fn add(&self, path: &Path, mask: AddWatchFlags) -> io::Result<WatchDescriptor> {
        Ok(self.fd.get_ref().0.add_watch(path, mask)?)
    }

    /// Stops a watch (gone already: fine).
    pub fn remove(&self, wd: WatchDescriptor) {
        let _ = self.fd.get_ref().0.rm_watch(wd);
    }

    /// Waits for events and returns them (at least one).
    pub async fn events(&self) -> io::Result<Vec<InotifyEvent>> {
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.try_io(|inner| inner.get_ref().0.read_events().map_err(io::Error::from)) {
                Ok(Ok(events)) if !events.is_empty() => return Ok(events),
                Ok(Ok(_)) => {}
                Ok(Err(err)) if err.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => {}
            }
        }
    }
}
