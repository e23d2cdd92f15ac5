//! `baton top` / `baton status --watch`: through a real pseudo-terminal of 80 columns (the
//! full-screen view draws, `q` quits and restores the terminal, so does SIGTERM), and through a
//! pipe (plain text every interval).

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_integration::{Master, TestConfig, binaries, eventually};

/// `baton <args> -s <socket>` on the slave side of a new 80x24 pseudo-terminal; everything it
/// draws is gathered from the master side.
struct InTerminal {
    child: Child,
    input: std::fs::File,
    screen: Arc<Mutex<Vec<u8>>>,
}

impl InTerminal {
    fn start(master: &Master, args: &[&str]) -> InTerminal {
        let size = nix::pty::Winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&size), None).unwrap();
        let slave = |fd: &OwnedFd| Stdio::from(fd.try_clone().unwrap());
        let child = Command::new(&binaries().baton)
            .args(args)
            .arg("-s")
            .arg(master.socket())
            .env("TERM", "xterm-256color")
            .stdin(slave(&pty.slave))
            .stdout(slave(&pty.slave))
            .stderr(slave(&pty.slave))
            .spawn()
            .unwrap();
        drop(pty.slave);
        let input = std::fs::File::from(pty.master);
        let mut output = input.try_clone().unwrap();
        let screen = Arc::new(Mutex::new(Vec::new()));
        let gathered = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once every slave descriptor is closed (the child exited).
            while let Ok(n) = output.read(&mut buf) {
                if n == 0 {
                    break;
                }
                gathered.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        InTerminal {
            child,
            input,
            screen,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().unwrap()).into_owned()
    }

    /// What an 80x24 terminal shows now, after every byte drawn so far.
    fn screen(&self) -> String {
        let size = |n| std::num::NonZeroU16::new(n).unwrap();
        let mut terminal = vt100::Parser::new(size(24), size(80), 0);
        terminal.process(&self.screen.lock().unwrap());
        terminal.screen().contents()
    }

    fn wait_for(&self, what: &str) {
        eventually(Duration::from_secs(10), what, || {
            self.screen().contains(what).then_some(())
        });
    }

    fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20)); // polling a child, bounded
        }
        let _ = self.child.kill();
        None
    }
}

/// Leaving the alternate screen, the last thing a restored terminal gets.
const ALTERNATE_SCREEN_OFF: &str = "\x1b[?1049l";

#[test]
fn the_live_view_draws_in_an_80_column_terminal_and_q_restores_it() {
    let (port, mut config) = TestConfig::hello_on_a_free_port(2);
    // Kept-alive connections stay open through a drain: generation 1 drains while held.
    config.holding("60s");
    let master = Master::start("top", &config);
    let mut held = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    held.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut answer = [0u8; 256];
    assert!(held.read(&mut answer).unwrap() > 0);
    let mut view = InTerminal::start(&master, &["top"]);
    view.wait_for("workers");
    view.wait_for(&format!("127.0.0.1:{port}"));
    view.wait_for("serving");
    view.wait_for("q: quit");
    // A reload shows up in the next frames: the new generation serving, the old one draining
    // with its progress bar (the held connection left, the time to its deadline).
    assert_eq!(master.reload()["event"], "reload_succeeded");
    view.wait_for("gen 2");
    view.wait_for("gen 1 draining: 1 of 1 connections left");
    let shown = view.screen();
    eprintln!("{shown}");
    assert!(shown.contains("to its deadline"), "{shown}");
    assert!(
        shown.lines().all(|l| l.chars().count() <= 80),
        "the view fits 80 columns"
    );
    let before = view.text().len();
    view.input.write_all(b"q").unwrap();
    assert_eq!(view.exit_code(Duration::from_secs(5)), Some(0), "q quits");
    let screen = view.text();
    assert!(
        screen[before..].contains(ALTERNATE_SCREEN_OFF),
        "the terminal is restored"
    );
    assert!(!screen.contains("panicked"), "{screen}");
    drop(held);
}

#[test]
fn a_signal_ends_the_live_view_with_the_terminal_restored() {
    let (_, master) = Master::hello("top-sig", 1);
    let mut view = InTerminal::start(&master, &["status", "--watch", "--interval", "0.2"]);
    view.wait_for("q: quit");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(view.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(view.exit_code(Duration::from_secs(5)), Some(0));
    assert!(view.text().contains(ALTERNATE_SCREEN_OFF), "restored");
}

#[test]
fn without_a_terminal_the_live_view_prints_plain_text_every_interval() {
    let (port, master) = Master::hello("top-plain", 1);
    let mut child = Command::new(&binaries().baton)
        .args(["status", "--watch", "--interval", "0.2", "-s"])
        .arg(master.socket())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while String::from_utf8_lossy(&text).matches("--- ").count() < 3 {
        assert!(Instant::now() < deadline, "three updates in 10 s");
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "the view ended early");
        text.extend_from_slice(&buf[..n]);
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = String::from_utf8_lossy(&text);
    assert!(
        !text.contains('\x1b'),
        "no escape sequence in plain output: {text:?}"
    );
    assert!(text.contains("listeners"), "{text}");
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
}
