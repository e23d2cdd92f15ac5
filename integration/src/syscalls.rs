//! System calls that fail for real: `strace --inject` attached to a running master (issue 20,
//! part 2). The kernel returns the error to the real binary; nothing in baton is built for it.
//!
//! strace attaches to the master's main thread only (`-p` without `-f`): the thread that runs
//! its event loop, binds, spawns and hands over. Workers, which the master makes with `clone3`,
//! are not traced, so the errors are the master's alone.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::eventually;

/// strace attached to a process, injecting errors until dropped (or [`Injection::detach`]).
#[derive(Debug)]
pub struct Injection {
    strace: Child,
    pid: u32,
}

/// The tracer of `pid` (`TracerPid` in its status), 0 if none.
fn tracer(pid: u32) -> u32 {
    crate::procfs::status_number(pid, "TracerPid").unwrap_or(0) as u32
}

/// Where strace is: a test that needs it fails with what to install, never skips.
pub fn strace() -> &'static str {
    let path = "/usr/bin/strace";
    assert!(
        std::path::Path::new(path).exists(),
        "these tests inject system call errors with strace: apt-get install strace (integration/run-tests.sh does)"
    );
    path
}

impl Injection {
    /// Attaches to `pid` and injects `rule` (strace's `inject=` syntax, e.g.
    /// `socket:error=EMFILE`, `accept4:error=EMFILE:when=1..5`) into the system calls it names.
    /// Returns once strace is attached.
    pub fn attach(pid: u32, rule: &str) -> Injection {
        let calls = rule.split(':').next().unwrap_or(rule);
        let strace = Command::new(strace())
            .args(["-qq", "-o", "/dev/null", "-p", &pid.to_string()])
            .arg(format!("--trace={calls}"))
            .arg(format!("--inject={rule}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting strace");
        let injection = Injection { strace, pid };
        eventually(Duration::from_secs(10), "strace attached", || {
            (tracer(pid) == injection.strace.id()).then_some(())
        });
        injection
    }

    /// Detaches strace (it restores the process as it found it) and waits until it has.
    pub fn detach(mut self) {
        self.stop();
        let pid = self.pid;
        eventually(Duration::from_secs(10), "strace detached", || {
            (tracer(pid) == 0).then_some(())
        });
    }

    fn stop(&mut self) {
        if matches!(self.strace.try_wait(), Ok(None)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.strace.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = self.strace.wait();
        }
    }
}

impl Drop for Injection {
    fn drop(&mut self) {
        self.stop();
    }
}
