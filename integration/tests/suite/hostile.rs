//! Hostile input: each test names its attacker (a worker running as `nobody`, a local user, a
//! network client) and the guarantee it checks (docs/security.md lists them).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use baton_integration::{Master, eventually, free_port, patience};

/// A directory every user may read (scripts a `nobody` worker runs live there).
fn shared_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("baton-hostile-")
        .tempdir()
        .unwrap();
    set_mode(dir.path(), 0o755);
    dir
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

/// Writes an executable script readable by everyone.
fn script(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    set_mode(&path, 0o755);
    path
}

/// Python's side of `sd_notify`, for the workers below.
const NOTIFY_PY: &str = r#"import os, signal, socket, sys, time

def notify(message):
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):
        address = "\0" + address[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(message.encode(), address)
    s.close()

def parent_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])
"#;

/// A worker that announces as its main process, in turn: an unrelated root process (`VICTIM`),
/// the master, the master's parent, the guard, pid 1, pid 0 and a pid that cannot exist; then
/// reports ready and waits for its drain signal.
fn mainpid_games_worker(dir: &Path) -> PathBuf {
    script(
        dir,
        "games.py",
        &format!(
            r#"#!/usr/bin/python3
{NOTIFY_PY}
master = os.getppid()
targets = [int(os.environ["VICTIM"]), master, parent_of(master), 1, 0, 1 << 30]
def guard():
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{{entry}}/cmdline", "rb") as f:
                    command = f.read()
                if parent_of(int(entry)) == master and b"guard" in command:
                    return int(entry)
            except OSError:
                pass
# The guard may still be on its way to its exec.
deadline = time.monotonic() + 10
while guard() is None and time.monotonic() < deadline:
    time.sleep(0.05)
if guard() is not None:
    targets.append(guard())
for target in targets:
    notify(f"MAINPID={{target}}")
notify("READY=1")
signal.pause()
"#
        ),
    )
}

fn yaml(command: &Path, port: u16, extra: &[&str], supervisor: &[&str]) -> String {
    let mut y = format!(
        "listeners:\n  - {{name: http, address: \"127.0.0.1:{port}\"}}\nworker:\n  command: {}\n  protocol: systemd\n  user: nobody\n  processes: 1\n  ready_timeout: 20s\n  drain_timeout: 3s\n",
        command.display()
    );
    for line in extra {
        y += &format!("  {line}\n");
    }
    y += "supervisor:\n  runtime_dir: \"{dir}/run\"\n  control: {socket: \"{dir}/baton.sock\"}\n";
    for line in supervisor {
        y += &format!("  {line}\n");
    }
    y
}

fn alive(pid: u32) -> bool {
    // A zombie is dead for this purpose: `kill(pid, 0)` would still succeed on it.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z'))
}

/// Attacker: a worker running as `nobody` (systemd protocol) that announces `MAINPID=` for
/// processes that are not its own. Guarantee: none of them is accepted, so no reload, drain
/// deadline or stop sends them a signal; each refusal is logged (rate-limited, with a count)
/// and shown in `baton status` for that worker. Both proofs are tried: the worker's cgroup
/// (`cgroups: auto`) and its parent chain (`cgroups: off`).
#[test]
fn a_worker_as_nobody_cannot_make_the_master_signal_a_process_not_its_own() {
    let scripts = shared_dir();
    let worker = mainpid_games_worker(scripts.path());
    for cgroups in ["auto", "off"] {
        let mut victim = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let port = free_port();
        let yaml = yaml(
            &worker,
            port,
            &[&format!("env: {{VICTIM: \"{}\"}}", victim.id())],
            &[&format!("cgroups: {cgroups}")],
        );
        let mut master = Master::spawn(&format!("mainpid-games-{cgroups}"), &yaml);
        master.wait_event("serving", Duration::from_secs(30), |_| true);
        let guard = master.guard();
        // Every announcement is refused: the first is logged, the rest counted.
        let (_, refused) = master.wait_event("main_pid_refused", Duration::from_secs(10), |_| true);
        let status = eventually(Duration::from_secs(10), "every refusal counted", || {
            let (code, out, _) = master.ctl(&["status", "--json"]);
            assert_eq!(code, 0, "{out}");
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let refused = v["generations"][0]["workers"][0]["refused"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let expected = if guard.is_some() { 7 } else { 6 };
            refused
                .contains(&format!("({expected} refused)"))
                .then_some(refused)
        });
        assert!(master.events("worker_main_pid").is_empty(), "none accepted");
        assert!(
            master.events("main_pid_refused").len() < 3,
            "rate-limited: {:?}",
            master.events("main_pid_refused")
        );
        eprintln!("[{cgroups}] first refusal: {refused}; status: {status}");
        let (_, text, _) = master.ctl(&["status"]);
        assert!(text.contains("refused MAINPID"), "{text}");
        // A reload drains the worker (its drain signal, then its deadline), and a stop ends the
        // next one: had any announcement been taken, its process would get both.
        let verdict = master.reload();
        assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
        master.wait_event("generation_exited", Duration::from_secs(15), |_| true);
        let (code, out, err) = master.ctl(&["stop"]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(master.wait_exit(Duration::from_secs(20)).success());
        assert!(
            alive(victim.id()),
            "the unrelated process was not signalled"
        );
        if let Some(guard) = guard {
            // The guard outlives a stop only briefly (it exits with the master); it was never
            // killed by a signal of the master's: its exit is its own.
            eprintln!(
                "[{cgroups}] guard {guard} alive after stop: {}",
                alive(guard)
            );
        }
        victim.kill().unwrap();
        victim.wait().unwrap();
    }
}

/// A launcher that forks the server, announces it (`MAINPID=`) and reaps it itself, then exits
/// with its status: the master is never the server's parent.
fn launcher_worker(dir: &Path) -> PathBuf {
    script(
        dir,
        "launcher.py",
        &format!(
            r#"#!/usr/bin/python3
{NOTIFY_PY}
server = os.fork()
if server == 0:
    if os.environ.get("IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    listener = socket.socket(fileno=3)
    while True:
        client, _ = listener.accept()
        client.recv(4096)
        client.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        client.close()
signal.signal(signal.SIGTERM, signal.SIG_IGN)
notify(f"MAINPID={{server}}")
notify("READY=1")
_, status = os.waitpid(server, 0)
sys.exit(os.waitstatus_to_exitcode(status) & 0xff)
"#
        ),
    )
}

/// Attacker: a worker (as `nobody`) whose main process the master cannot reap: a launcher
/// forks the server, announces it and reaps it itself. Guarantee: the server's end is seen
/// through its pidfd, so its generation ends within `drain_timeout` + 1 s of the drain (at once
/// when it honours its drain signal, at the deadline's kill when it ignores it), `baton stop`
/// exits, and no signal is ever sent to the pid again after (the old master sent SIGKILL to it
/// every second, for ever).
#[test]
fn a_main_process_reaped_by_its_own_launcher_ends_its_generation_and_the_stop() {
    let scripts = shared_dir();
    let launcher = launcher_worker(scripts.path());
    for ignore_term in [false, true] {
        let port = free_port();
        let env = if ignore_term {
            "env: {IGNORE_TERM: \"1\"}"
        } else {
            "env: {}"
        };
        let yaml = yaml(&launcher, port, &[env], &[]);
        let name = format!(
            "launcher-{}",
            if ignore_term { "stubborn" } else { "polite" }
        );
        let mut master = Master::spawn(&name, &yaml);
        master.wait_event("serving", Duration::from_secs(30), |_| true);
        let (_, announced) =
            master.wait_event("worker_main_pid", Duration::from_secs(10), |_| true);
        let server = announced["pid"].as_u64().unwrap() as u32;
        let (code, answer, _) = baton_integration::http(port, "GET", "/");
        assert_eq!(code, 200, "{answer}");
        let drained_at = Instant::now();
        let verdict = master.reload();
        assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
        let (ended, _) = master.wait_event("generation_exited", Duration::from_secs(15), |v| {
            v["generation"] == 1
        });
        let took = ended.saturating_duration_since(drained_at);
        eprintln!("[{name}] generation 1 ended {took:?} after the reload began");
        assert!(
            took <= Duration::from_secs(3) + patience(Duration::from_secs(1)),
            "drain_timeout 3 s + 1 s: took {took:?}"
        );
        assert!(!alive(server), "the server of generation 1 is gone");
        assert!(
            master.events("worker_killed_again").is_empty(),
            "nothing signalled again"
        );
        let stop = Instant::now();
        let (code, out, err) = master.ctl(&["stop"]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(master.wait_exit(Duration::from_secs(10)).success());
        let took = stop.elapsed();
        assert!(
            took <= Duration::from_secs(3) + patience(Duration::from_secs(1)),
            "the stop took {took:?}"
        );
    }
}
