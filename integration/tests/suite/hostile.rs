//! Hostile input: each test names its attacker (a worker running as `nobody`, a local user, a
//! network client) and the guarantee it checks (docs/security.md lists them).

use baton_integration::event;
use baton_integration::executable;
use baton_integration::loopback;
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

/// A Python worker: `body` after [`NOTIFY_PY`].
fn notify_worker(dir: &Path, name: &str, body: &str) -> PathBuf {
    executable(
        dir,
        name,
        &format!("#!/usr/bin/python3\n{NOTIFY_PY}\n{body}"),
    )
}

/// A worker that announces as its main process, in turn: an unrelated root process (`VICTIM`),
/// the master, the master's parent, the guard, pid 1, pid 0 and a pid that cannot exist; then
/// reports ready and waits for its drain signal.
fn mainpid_games_worker(dir: &Path) -> PathBuf {
    notify_worker(
        dir,
        "games.py",
        r#"master = os.getppid()
targets = [int(os.environ["VICTIM"]), master, parent_of(master), 1, 0, 1 << 30]
def guard():
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
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
    notify(f"MAINPID={target}")
notify("READY=1")
signal.pause()
"#,
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
        master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
        let guard = master.guard();
        // Every announcement is refused: the first is logged, the rest counted.
        let (_, refused) =
            master.wait_event(event::MAIN_PID_REFUSED, Duration::from_secs(10), |_| true);
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
        assert!(
            master.events(event::WORKER_MAIN_PID).is_empty(),
            "none accepted"
        );
        assert!(
            master.events(event::MAIN_PID_REFUSED).len() < 3,
            "rate-limited: {:?}",
            master.events(event::MAIN_PID_REFUSED)
        );
        eprintln!("[{cgroups}] first refusal: {refused}; status: {status}");
        let (_, text, _) = master.ctl(&["status"]);
        assert!(text.contains("refused MAINPID"), "{text}");
        // A reload drains the worker (its drain signal, then its deadline), and a stop ends the
        // next one: had any announcement been taken, its process would get both.
        let verdict = master.reload();
        assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
        master.wait_event(event::GENERATION_EXITED, Duration::from_secs(15), |_| true);
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
    notify_worker(
        dir,
        "launcher.py",
        r#"server = os.fork()
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
notify(f"MAINPID={server}")
notify("READY=1")
_, status = os.waitpid(server, 0)
sys.exit(os.waitstatus_to_exitcode(status) & 0xff)
"#,
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
        master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
        let (_, announced) =
            master.wait_event(event::WORKER_MAIN_PID, Duration::from_secs(10), |_| true);
        let server = announced["pid"].as_u64().unwrap() as u32;
        let served = baton_integration::load::requests(loopback(port), 3);
        assert_eq!(served.ok, 3, "{}", served.summary());
        let drained_at = Instant::now();
        let verdict = master.reload();
        assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
        let (ended, _) =
            master.wait_event(event::GENERATION_EXITED, Duration::from_secs(15), |v| {
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
            master.events(event::WORKER_KILLED_AGAIN).is_empty(),
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

/// A master on hello-workers whose control socket any local user reaches (mode 0666), with
/// `nobody`'s group as the read group and a long client timeout (stalled clients hold places).
fn open_master(name: &str) -> Master {
    let port = free_port();
    let mut yaml = baton_integration::TestConfig::hello(&format!("127.0.0.1:{port}"), 1).yaml();
    yaml = yaml.replace(
        "    socket: \"{dir}/baton.sock\"\n",
        "    socket: \"{dir}/baton.sock\"\n    mode: \"0666\"\n    read_group: 65534\n    timeout: 60s\n",
    );
    let master = Master::spawn(name, &yaml);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    // Let other users reach the socket inside the (0700) temp dir.
    set_mode(master.dir.path(), 0o755);
    master
}

const NOBODY: u32 = 65534;

/// `baton logs --follow`, as `uid`.
fn follower(master: &Master, uid: u32) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(&baton_integration::binaries().baton);
    cmd.args(["logs", "--follow", "-s"])
        .arg(master.socket())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if uid != 0 {
        cmd.uid(uid).gid(uid);
    }
    cmd.spawn().unwrap()
}

/// `baton status` as root, timed.
fn timed_status(master: &Master) -> Duration {
    let began = Instant::now();
    let (code, out, err) = master.ctl(&["status"]);
    assert_eq!(code, 0, "{out}{err}");
    began.elapsed()
}

/// A process (as `nobody`) holding `n` control connections that never send a request, until
/// its standard input closes.
fn stalled_clients(dir: &Path, socket: &Path, n: usize) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let hold = executable(
        dir,
        "hold.py",
        "#!/usr/bin/python3\nimport socket, sys\nheld = []\nfor _ in range(int(sys.argv[2])):\n    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n    s.connect(sys.argv[1])\n    held.append(s)\nprint('held', flush=True)\nsys.stdin.read()\n",
    );
    let mut child = std::process::Command::new(hold)
        .arg(socket)
        .arg(n.to_string())
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "held");
    child
}

/// Attackers: 16 `logs --follow` clients as root and 16 as a member of the read group (the
/// default `max_clients` is 16), then 16 clients as `nobody` that connect and never send a
/// request. Guarantees: followers have places of their own (`max_followers`, 8), so `status`
/// answers within 1 s while they follow and after they are killed; a killed follower's place is
/// free at once (no worker line needed); a `reload` from root always finds a place (some are kept
/// for those who may change the master); refusals are logged a few lines a second at most, each
/// with its count.
#[test]
fn log_followers_and_stalled_clients_never_lock_the_operator_out() {
    assert!(nix::unistd::geteuid().is_root(), "clients run as nobody");
    let scripts = shared_dir();
    let master = open_master("followers");
    // The master's descriptors with no client: each follower held adds one.
    let base = master.fd_count();
    let mut followers: Vec<_> = (0..16)
        .flat_map(|_| [follower(&master, 0), follower(&master, NOBODY)])
        .collect();
    // At most 8 stay; the others are refused at once (a read-only one that comes while every
    // ordinary place is taken by followers not yet moved to theirs is refused as busy).
    let refused = eventually(Duration::from_secs(15), "24 followers refused", || {
        let exited = followers
            .iter_mut()
            .map(|f| f.try_wait().unwrap().is_some())
            .filter(|&done| done)
            .count();
        (exited >= 24).then_some(exited)
    });
    eprintln!("{refused} of 32 followers refused");
    for _ in 0..3 {
        let took = timed_status(&master);
        assert!(
            took < Duration::from_secs(1),
            "status took {took:?} beside 8 followers"
        );
    }
    let (code, out, err) = baton_integration::ctl(&master.socket(), &["status"], Some(NOBODY));
    assert_eq!(code, 0, "the read group reads: {out}{err}");
    assert_eq!(master.reload()["event"], "reload_succeeded");
    // Killed: their places are free at once, though no worker writes a line.
    for f in &mut followers {
        let _ = f.kill();
        let _ = f.wait();
    }
    // Counted from the master's descriptors: once the reload's old generation is gone (its
    // pipes and channel close) and the killed followers' connections are closed, they are back
    // where they were and change only with the clients.
    master.wait_event(event::GENERATION_EXITED, Duration::from_secs(20), |v| {
        v["generation"] == 1
    });
    eventually(
        Duration::from_secs(5),
        "the killed followers let go",
        || (master.fd_count() <= base).then_some(()),
    );
    let mut again: Vec<_> = (0..8).map(|_| follower(&master, NOBODY)).collect();
    let took = timed_status(&master);
    assert!(
        took < Duration::from_secs(1),
        "status took {took:?} after the followers left"
    );
    eventually(Duration::from_secs(5), "8 new followers held", || {
        let alive = again
            .iter_mut()
            .all(|f: &mut std::process::Child| f.try_wait().unwrap().is_none());
        (alive && master.fd_count() >= base + 8).then_some(())
    });
    for mut f in again {
        let _ = f.kill();
        let _ = f.wait();
    }
    eventually(Duration::from_secs(5), "the followers' places free", || {
        (master.fd_count() <= base).then_some(())
    });
    // Every read-only place taken by clients that never speak: root still reads and reloads.
    let mut stalled = stalled_clients(scripts.path(), &master.socket(), 16);
    eventually(Duration::from_secs(5), "16 stalled clients held", || {
        (master.fd_count() >= base + 16).then_some(())
    });
    let took = timed_status(&master);
    assert!(
        took < Duration::from_secs(1),
        "status took {took:?} beside 16 stalled clients"
    );
    let (code, out, err) = baton_integration::ctl(&master.socket(), &["status"], Some(NOBODY));
    assert_ne!(code, 0, "no place left for a read-only user: {out}{err}");
    assert!(err.contains("try again"), "{err}");
    assert_eq!(master.reload()["event"], "reload_succeeded");
    // Refused again until a line says how many there were: refusals beyond a few a second are
    // counted, not logged, and the next line logged carries the count.
    let began = Instant::now();
    let counted = eventually(
        Duration::from_secs(10),
        "a line counting 25 refusals",
        || {
            let _ = baton_integration::ctl(&master.socket(), &["status"], Some(NOBODY));
            master
                .events(event::CONTROL_BUSY)
                .iter()
                .filter_map(|b| b["refused"].as_u64())
                .find(|&n| n >= 25)
        },
    );
    let busy = master.events(event::CONTROL_BUSY);
    let seconds = began.elapsed().as_secs() + 2;
    eprintln!("{counted} refusals counted in {} lines", busy.len());
    assert!(
        busy.len() as u64 <= 5 * (seconds + 1) + 5,
        "at most 5 lines a second: {} lines",
        busy.len()
    );
    drop(stalled.stdin.take());
    stalled.wait().unwrap();
}

/// Attacker: a local user's `baton reload` queued behind busy places and killed before the
/// master read it (an operator's Ctrl-C). Guarantee: the request is dropped, not carried out
/// when a place frees, and the log says so.
#[test]
fn a_request_whose_client_hung_up_before_it_was_read_is_not_carried_out() {
    assert!(nix::unistd::geteuid().is_root(), "clients run as nobody");
    let scripts = shared_dir();
    let master = open_master("hung-up");
    // 16 read-only places taken by nobody; the 4 kept for changes taken by root.
    let mut stalled = stalled_clients(scripts.path(), &master.socket(), 16);
    let root_held: Vec<_> = (0..4)
        .map(|_| std::os::unix::net::UnixStream::connect(master.socket()).unwrap())
        .collect();
    // The client connects (into the socket's backlog), writes its request, and gives up.
    let mut reload = std::os::unix::net::UnixStream::connect(master.socket()).unwrap();
    std::io::Write::write_all(
        &mut reload,
        &baton_proto::control::encode_frame(baton_proto::control::Request::Reload { wait: true }),
    )
    .unwrap();
    drop(reload);
    drop(root_held);
    master.wait_event(event::CONTROL_HUNG_UP, Duration::from_secs(10), |_| true);
    assert!(
        master.events(event::RELOAD_REQUESTED).is_empty(),
        "the killed client's reload was not carried out"
    );
    drop(stalled.stdin.take());
    stalled.wait().unwrap();
}

/// The master's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Attacker: whoever can put a file where the configuration is read (a ConfigMap's author, a
/// user who may write its directory): a FIFO in its place, a symlink to `/dev/zero`, a 50 MB
/// valid YAML. Guarantee: the master never blocks or balloons: that reload fails with the
/// reason (the file named), the master answers at once, the serving generation serves on, and
/// its memory stays near where it was.
#[test]
fn a_configuration_that_is_a_fifo_a_device_or_huge_fails_its_reload_and_nothing_else() {
    let port = free_port();
    let c = baton_integration::TestConfig::hello(&format!("127.0.0.1:{port}"), 1);
    let master = Master::start("bad-files", &c);
    let config = master.config_path.clone();
    let good = std::fs::read_to_string(&config).unwrap();
    let rss_before = rss_kib(master.pid());
    let aside = master.dir.path().join("aside");
    type Plant = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Plant, &str)> = vec![
        (
            "fifo",
            Box::new(|at: &Path| {
                nix::unistd::mkfifo(at, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap()
            }),
            "a FIFO, not a regular file",
        ),
        (
            "/dev/zero",
            Box::new(|at: &Path| std::os::unix::fs::symlink("/dev/zero", at).unwrap()),
            "a character device, not a regular file",
        ),
        (
            "50 MB",
            Box::new(move |at: &Path| {
                let mut text = std::fs::read_to_string(config_of(at)).unwrap();
                text += "# ";
                text += &"x".repeat(50 * 1024 * 1024);
                text += "\n";
                std::fs::write(at, text).unwrap()
            }),
            "more than the 1048576 a configuration may have",
        ),
    ];
    fn config_of(aside: &Path) -> PathBuf {
        aside.with_file_name("baton.yaml")
    }
    for (name, plant, why) in cases {
        let _ = std::fs::remove_file(&aside);
        plant(&aside);
        // Swapped in at once, as a ConfigMap update is.
        std::fs::rename(&aside, &config).unwrap();
        let began = Instant::now();
        let (code, out, err) = master.ctl(&["reload"]);
        let took = began.elapsed();
        eprintln!(
            "[{name}] reload: exit {code} in {took:?}: {}{}",
            out.trim(),
            err.trim()
        );
        assert_ne!(code, 0, "[{name}] the reload fails");
        assert!(
            format!("{out}{err}").contains(why),
            "[{name}] says why: {out}{err}"
        );
        assert!(
            took < Duration::from_secs(2),
            "[{name}] answered at once: {took:?}"
        );
        let took = timed_status(&master);
        assert!(
            took < Duration::from_secs(1),
            "[{name}] status took {took:?}"
        );
        let served = baton_integration::load::requests(loopback(port), 3);
        assert_eq!(served.ok, 3, "[{name}] still serving: {}", served.summary());
        std::fs::remove_file(&config).unwrap();
        std::fs::write(&config, &good).unwrap();
    }
    let rss_after = rss_kib(master.pid());
    eprintln!("master RSS {rss_before} KiB before, {rss_after} KiB after");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "memory stays near the steady state: {rss_before} -> {rss_after} KiB"
    );
    assert_eq!(
        master.reload()["event"],
        "reload_succeeded",
        "the good file again"
    );
}

/// Attacker: a local user (`nobody`) who may write to the directory of the control socket (a
/// mode-1777 one): it plants a worker registry naming an unrelated root process, and a symlink
/// where the registry is written aside, pointing to a root-only file. Guarantee: the registry is
/// refused (not the master's, logged) and nothing it names is signalled; the write goes through
/// no symlink and the root-only file is untouched; `baton check` warns about the directory.
#[test]
fn a_registry_or_a_symlink_planted_by_another_user_is_not_believed_nor_written_through() {
    use std::os::unix::fs::MetadataExt;
    assert!(
        nix::unistd::geteuid().is_root(),
        "the attacker runs as nobody"
    );
    let shared = tempfile::Builder::new()
        .prefix("baton-1777-")
        .tempdir()
        .unwrap();
    set_mode(shared.path(), 0o1777);
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("secret");
    std::fs::write(&secret, "root only\n").unwrap();
    set_mode(&secret, 0o600);
    let mut victim = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let started = baton_sys::pidfd::start_time(victim.id()).unwrap();
    let socket = shared.path().join("baton.sock");
    let registry = shared.path().join("baton.sock.workers");
    let forged = serde_json::to_string(&[baton_core::orphans::Entry::new(
        victim.id(),
        started,
        Some(nix::sys::signal::Signal::SIGTERM),
        Duration::from_millis(100),
    )])
    .unwrap();
    // Planted as nobody: the forged registry and the symlink.
    let plant = executable(
        shared.path(),
        "plant.py",
        "#!/usr/bin/python3\nimport os, sys\nopen(sys.argv[1], 'w').write(sys.argv[2])\nos.symlink(sys.argv[3], sys.argv[1] + '.new')\n",
    );
    let status = {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(&plant)
            .arg(&registry)
            .arg(&forged)
            .arg(&secret)
            .uid(NOBODY)
            .gid(NOBODY)
            .status()
            .unwrap()
    };
    assert!(status.success());
    assert_eq!(std::fs::metadata(&registry).unwrap().uid(), NOBODY);
    let port = free_port();
    let yaml = baton_integration::TestConfig::hello(&format!("127.0.0.1:{port}"), 1)
        .yaml()
        .replace(
            "    socket: \"{dir}/baton.sock\"\n",
            &format!("    socket: \"{}\"\n", socket.display()),
        );
    let master = Master::spawn("planted", &yaml);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let (_, refused) = master.wait_event(event::REGISTRY_REFUSED, Duration::from_secs(5), |_| true);
    eprintln!("{refused}");
    assert!(
        refused["message"].as_str().unwrap().contains("uid 65534"),
        "{refused}"
    );
    master.wait_event(
        event::CONTROL_DIRECTORY_SHARED,
        Duration::from_secs(5),
        |_| true,
    );
    // The master writes its own registry: made anew, through no symlink.
    let own = eventually(Duration::from_secs(10), "the master's own registry", || {
        let meta = std::fs::symlink_metadata(&registry).ok()?;
        (meta.uid() == 0 && meta.file_type().is_file()).then_some(meta)
    });
    assert_eq!(own.mode() & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root only\n");
    assert!(std::fs::symlink_metadata(registry.with_extension("workers.new")).is_err());
    assert!(
        alive(victim.id()),
        "nothing the forged registry named was signalled"
    );
    let (code, _, err) = baton_integration::ctl(&socket, &["status"], None);
    assert_eq!(code, 0, "{err}");
    let check = std::process::Command::new(&baton_integration::binaries().baton)
        .args(["check", "-c"])
        .arg(&master.config_path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stderr);
    assert!(
        said.contains("may be written by every user"),
        "baton check warns: {said}"
    );
    drop(master);
    victim.kill().unwrap();
    victim.wait().unwrap();
}

/// Attacker: whoever writes the configuration, asking for timers that would make the master
/// spin (`recycle.check_every: 1ms` made 893 recycles in 9 s at 14 % CPU; `queue_watch: 1ms`
/// cost 5 % idle). Guarantee: each interval below its floor fails that reload with
/// `file:line` and the floor; the serving generation serves on.
#[test]
fn intervals_that_would_make_the_master_spin_are_refused_at_reload_with_their_line() {
    let port = free_port();
    let c = baton_integration::TestConfig::hello(&format!("127.0.0.1:{port}"), 1);
    let master = Master::start("spin", &c);
    let good = std::fs::read_to_string(&master.config_path).unwrap();
    let cases = [
        (
            good.replace(
                "  processes: 1\n",
                "  processes: 1\n  recycle: {max_rss: 512MiB, check_every: 1ms}\n",
            ),
            "worker.recycle: check_every \"1ms\" is shorter than 100 ms",
        ),
        (
            good.clone() + "  queue_watch: 1ms\n",
            "supervisor.queue_watch: queue_watch \"1ms\" is shorter than 100 ms",
        ),
        (
            good.replace(
                "  processes: 1\n",
                "  processes: 1\n  ready: {all: [channel, {tcp: \"127.0.0.1:9\", interval: 1ms}]}\n",
            ),
            "invalid readiness interval: at least 10 ms",
        ),
    ];
    for (yaml, why) in cases {
        master.write_config(&yaml);
        let line = yaml
            .lines()
            .position(|l| l.contains("1ms"))
            .map(|i| i + 1)
            .unwrap();
        let (code, out, err) = master.ctl(&["reload"]);
        let said = format!("{out}{err}");
        assert_ne!(code, 0, "{said}");
        assert!(said.contains(why), "{said}");
        assert!(
            said.contains(&format!("baton.yaml:{line}:")),
            "line {line}: {said}"
        );
    }
    master.write_config(&good);
    assert_eq!(master.reload()["event"], "reload_succeeded");
}

/// Whether `text` holds a character a terminal would act on or hide (beside line ends).
fn raw_unsafe(text: &str) -> Option<char> {
    text.chars()
        .find(|&c| c != '\n' && c != '\t' && baton_proto::text::is_unsafe(c))
}

/// Attackers: whoever names the configuration file or writes its keys (an escape sequence that
/// clears the screen, a right-to-left override that shows `evil.yaml` as `lmay.live`), and a
/// worker that writes bidirectional overrides and zero-width characters. Guarantee: `check`,
/// `reload`, `logs` and the master's text log show each as an escape; JSON keeps the text.
#[test]
fn control_bytes_and_deceptive_characters_never_reach_a_terminal_raw() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("evil\u{1b}[2J\u{202e}lmay.yaml");
    let good = format!(
        "listeners:\n  - {{name: http, address: \"127.0.0.1:{port}\"}}\nworker:\n  command: /bin/sh\n  args: [\"-c\", \"printf 'to \\\\342\\\\200\\\\256the left\\\\342\\\\200\\\\213 \\\\033[31mred\\\\n' >&2; exec sleep 600\"]\n  protocol: systemd\n  ready: {{delay: 100ms}}\nsupervisor:\n  runtime_dir: \"{d}/run\"\n  control: {{socket: \"{d}/baton.sock\"}}\n",
        d = dir.path().display()
    );
    let bad = good.replace(
        "  protocol:",
        "  \"sneaky\\e[2J\\u202ekey\": 1\n  protocol:",
    );
    std::fs::write(&config, &bad).unwrap();
    let check = std::process::Command::new(&baton_integration::binaries().baton)
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stderr).into_owned();
    assert_eq!(check.status.code(), Some(64), "{said}");
    assert!(
        said.contains("\\u{1b}[2J") && said.contains("\\u{202e}"),
        "{said:?}"
    );
    assert_eq!(raw_unsafe(&said), None, "check: {said:?}");
    std::fs::write(&config, &good).unwrap();
    let mut master = baton_integration::baton_run(&config, "text", &[]);
    let mut stderr = master.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let socket = dir.path().join("baton.sock");
    eventually(Duration::from_secs(20), "the master serving", || {
        let (code, out, _) = baton_integration::ctl(&socket, &["status"], None);
        (code == 0 && out.contains("ready")).then_some(())
    });
    std::fs::write(&config, &bad).unwrap();
    let (code, out, err) = baton_integration::ctl(&socket, &["reload"], None);
    assert_ne!(code, 0);
    assert!(err.contains("\\u{1b}[2J"), "{err:?}");
    assert_eq!(raw_unsafe(&format!("{out}{err}")), None, "reload: {err:?}");
    let (code, lines, _) = eventually(Duration::from_secs(10), "the worker's line", || {
        let answer = baton_integration::ctl(&socket, &["logs"], None);
        answer.1.contains("the left").then_some(answer)
    });
    assert_eq!(code, 0);
    assert!(lines.contains("\\u{202e}the left\\u{200b}"), "{lines:?}");
    assert_eq!(raw_unsafe(&lines), None, "logs: {lines:?}");
    let (_, json, _) = baton_integration::ctl(&socket, &["logs", "--json"], None);
    assert!(json.contains("the left"), "{json}");
    let (code, _, _) = baton_integration::ctl(&socket, &["stop"], None);
    assert_eq!(code, 0);
    master.wait().unwrap();
    let log = log.join().unwrap();
    assert!(log.contains("\\u{202e}lmay.yaml"), "{log}");
    assert!(log.contains("the left"), "{log}");
    assert_eq!(raw_unsafe(&log), None, "the text log: {log:?}");
}

/// Slow clients of the metrics endpoint, spread over `sources` loopback addresses (127.0.0.2,
/// ...): each connects, sends half a request head, waits until the master closes the
/// connection, and connects again, until `stop` is set. Returns how many connections were made.
fn slowloris(
    port: u16,
    clients: usize,
    sources: u8,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let tasks: Vec<_> = (0..clients)
                .map(|i| {
                    let stop = stop.clone();
                    let source =
                        std::net::Ipv4Addr::new(127, 0, 0, 2 + (i % sources as usize) as u8);
                    tokio::spawn(async move {
                        let mut made = 0u64;
                        // Bounded: until told to stop, and at most 10 000 connections each.
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) && made < 10_000 {
                            let socket = tokio::net::TcpSocket::new_v4().unwrap();
                            socket.bind((source, 0).into()).unwrap();
                            let Ok(mut stream) =
                                socket.connect(([127, 0, 0, 1], port).into()).await
                            else {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            };
                            made += 1;
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let _ = stream
                                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                                .await;
                            let mut sink = [0u8; 256];
                            let _ = tokio::time::timeout(
                                Duration::from_secs(30),
                                stream.read(&mut sink),
                            )
                            .await;
                        }
                        made
                    })
                })
                .collect();
            let mut made = 0;
            for task in tasks {
                made += task.await.unwrap();
            }
            made
        })
    })
}

/// One probe of `path` from 127.0.0.1, as a kubelet sends it: its status and how long it took.
fn probe(port: u16, path: &str) -> (u16, Duration) {
    let began = Instant::now();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n");
    std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut stream, &mut answer);
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, began.elapsed())
}

/// Attacker: network clients of the metrics port that hold connections with half a request
/// (a slowloris), reconnecting when closed: 64 from one address, then 1000 from ten.
/// Guarantee: a kubelet's `/livez` and `/healthz` probes are answered within 100 ms meanwhile,
/// and the control socket and the data path are unaffected.
#[test]
fn slow_clients_of_the_metrics_port_never_delay_a_probe() {
    let port = free_port();
    let metrics = free_port();
    let mut c = baton_integration::TestConfig::hello(&format!("127.0.0.1:{port}"), 1);
    c.supervisor_extra = vec![format!("metrics_listen: \"127.0.0.1:{metrics}\"")];
    let master = Master::start("slowloris", &c);
    for (clients, sources) in [(64, 1), (1000, 10)] {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let attack = slowloris(metrics, clients, sources, stop.clone());
        // Wait until the attackers hold their connections (the master's descriptors grow).
        let before = master.fd_count();
        eventually(
            Duration::from_secs(30),
            "the slow clients connected",
            || (master.fd_count() >= before + clients * 9 / 10).then_some(()),
        );
        let mut slowest = Duration::ZERO;
        for round in 0..20 {
            let path = if round % 2 == 0 { "/livez" } else { "/healthz" };
            let (status, took) = probe(metrics, path);
            assert_eq!(status, 200, "{path} with {clients} slow clients");
            slowest = slowest.max(took);
        }
        let took = timed_status(&master);
        let served = baton_integration::load::requests(loopback(port), 5);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let made = attack.join().unwrap();
        eprintln!(
            "{clients} slow clients from {sources} addresses ({made} connections): slowest probe {slowest:?}, status {took:?}"
        );
        assert!(
            slowest < Duration::from_millis(100),
            "probes within 100 ms: slowest {slowest:?}"
        );
        assert!(took < Duration::from_secs(1), "status took {took:?}");
        assert_eq!(served.ok, 5, "{}", served.summary());
    }
}
