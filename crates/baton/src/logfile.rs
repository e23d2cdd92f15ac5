//! Where the master's own log goes: stderr, or a file given with `--log-file`, which SIGUSR1
//! reopens (logrotate's default `create` mode: the old file is renamed, the master writes a new
//! one, no `copytruncate` and no line lost between copy and truncate). And the optional pid
//! file, written whole (aside, then renamed) and removed at exit.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

/// The log file, once `--log-file` named one.
static LOG_FILE: OnceLock<LogFile> = OnceLock::new();

#[derive(Debug)]
struct LogFile {
    path: PathBuf,
    file: Mutex<File>,
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Sends the log to `path` from now on (appending). Once per process.
pub(crate) fn use_file(path: &Path) -> io::Result<()> {
    let file = open(path)?;
    let _ = LOG_FILE.set(LogFile {
        path: path.to_owned(),
        file: Mutex::new(file),
    });
    Ok(())
}

/// Whether the log goes to a file.
pub(crate) fn in_use() -> bool {
    LOG_FILE.get().is_some()
}

/// Opens the log file again at its path (SIGUSR1): after logrotate renamed it, lines go to a new
/// file. Nothing to do when the log goes to stderr.
pub(crate) fn reopen() -> io::Result<()> {
    let Some(log) = LOG_FILE.get() else {
        return Ok(());
    };
    let file = open(&log.path)?;
    *log.file.lock().unwrap_or_else(PoisonError::into_inner) = file;
    Ok(())
}

/// The writer tracing formats each line into: the log file, or stderr.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sink;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Sink {
    type Writer = Sink;
    fn make_writer(&'a self) -> Sink {
        Sink
    }
}

impl Write for Sink {
    /// One formatted line arrives in one call; it is written whole under the lock, so a reopen
    /// never splits a line between two files.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match LOG_FILE.get() {
            Some(log) => {
                let mut file = log.file.lock().unwrap_or_else(PoisonError::into_inner);
                file.write_all(buf)?;
                Ok(buf.len())
            }
            None => io::stderr().write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match LOG_FILE.get() {
            Some(log) => log
                .file
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .flush(),
            None => io::stderr().flush(),
        }
    }
}

/// The pid file: written whole at start, removed when the master exits.
#[derive(Debug)]
pub(crate) struct PidFile(PathBuf);

impl PidFile {
    pub(crate) fn write(path: &Path) -> io::Result<PidFile> {
        let mut aside = path.as_os_str().to_owned();
        aside.push(".new");
        std::fs::write(&aside, format!("{}\n", std::process::id()))?;
        std::fs::rename(&aside, path)?;
        Ok(PidFile(path.to_owned()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Only if it still names this process (another master may have taken the path).
        let ours = std::fs::read_to_string(&self.0)
            .is_ok_and(|text| text.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
