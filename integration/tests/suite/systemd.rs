//! baton under a real systemd (252 here), booted in private namespaces: the packaged unit,
//! `systemctl start/reload/stop/kill`, the fd store across a crash, and socket activation.

use std::process::Child;
use std::time::Duration;

use baton_integration::systemd::{Systemd, service_unit};
use baton_integration::{binaries, eventually};
use serde_json::Value;

const PORT: u16 = 8080;

fn config(worker_extra: &str) -> String {
    format!(
        "listeners:\n  - name: http\n    address: 127.0.0.1:{PORT}\nworker:\n  command: {}\n  processes: 2\n  ready_timeout: 5s\n  drain_timeout: 20s\n{worker_extra}",
        binaries().hello_worker.display()
    )
}

fn never_ready() -> String {
    format!(
        "listeners:\n  - name: http\n    address: 127.0.0.1:{PORT}\nworker:\n  command: {}\n  env: {{IT_MODE: never-ready}}\n  ready_timeout: 1s\n",
        binaries().it_worker.display()
    )
}

/// The packaged unit, with a watchdog and a stop timeout short enough that the test would fail
/// if baton did not ping the watchdog (WATCHDOG=1) or did not ask for more time to drain
/// (EXTEND_TIMEOUT_USEC).
fn strict_unit(config: &std::path::Path) -> String {
    let unit = service_unit(config);
    assert!(unit.contains("WatchdogSec=30s") && unit.contains("TimeoutStopSec=60"));
    unit.replace("WatchdogSec=30s", "WatchdogSec=2s")
        .replace("TimeoutStopSec=60", "TimeoutStopSec=1")
}

/// The default configuration, written beside the units (in a directory the namespace shares).
fn default_config(name: &str) -> std::path::PathBuf {
    let config_path = Systemd::workdir(name).join("baton.yaml");
    std::fs::write(&config_path, config("")).unwrap();
    config_path
}

fn boot(name: &str, extra_units: &[(&str, String)]) -> (Systemd, std::path::PathBuf) {
    let config_path = default_config(name);
    let mut units = vec![("baton.service", strict_unit(&config_path))];
    units.extend(extra_units.iter().cloned());
    (Systemd::boot(name, &units), config_path)
}

fn report(child: Child) -> Value {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "loadgen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// One client for a second: the port serves, and nothing failed.
fn serves(sd: &Systemd) -> bool {
    let r = report(sd.loadgen(&[&format!("127.0.0.1:{PORT}"), "fresh", "1", "1"]));
    r["ok"].as_u64().unwrap_or(0) > 0 && r["failed"] == 0
}

/// `kill -9 PID` inside the namespace.
fn kill9(sd: &Systemd, pid: &str) {
    assert!(ok(&sd.command("kill").args(["-9", pid]).output().unwrap()));
}

/// Waits for the restart window after a master kill (its workers have drained and exited, and
/// systemd waits `RestartSec` before starting it again) in which `also` holds.
fn restart_window(sd: &Systemd, also: impl Fn() -> bool) {
    eventually(
        Duration::from_secs(10),
        "the old workers gone, the restart pending",
        || {
            let workers = sd
                .command("pgrep")
                .args(["-f", "hello-worker"])
                .output()
                .ok()?;
            let state = sd.show("baton.service", "ActiveState");
            (workers.stdout.is_empty() && state != "active" && also()).then_some(())
        },
    );
}

fn ok(out: &std::process::Output) -> bool {
    out.status.success()
}

#[test]
fn the_packaged_unit_starts_reloads_with_a_verdict_survives_usr1_and_stops_by_draining() {
    // The booted system must not touch the host: a file in the host's /tmp survives it.
    let canary =
        std::path::PathBuf::from(format!("/tmp/baton-systemd-canary-{}", std::process::id()));
    std::fs::write(&canary, "still here").unwrap();
    let (sd, config_path) = boot("lifecycle", &[]);
    // start returns once the first generation serves (Type=notify, READY=1).
    sd.systemctl_ok(&["start", "baton.service"]);
    assert_eq!(sd.show("baton.service", "ActiveState"), "active");
    let main_pid = sd.show("baton.service", "MainPID");
    let comm = sd
        .command("cat")
        .arg(format!("/proc/{main_pid}/comm"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&comm.stdout).trim(),
        "baton",
        "MainPID is the master"
    );
    let status = sd.show("baton.service", "StatusText");
    assert!(
        status.contains("gen 1 serving 2 workers"),
        "StatusText: {status:?}"
    );
    assert!(serves(&sd));

    // Workers' lines reach the journal in its native protocol, with their origin as fields.
    let entries = eventually(
        Duration::from_secs(10),
        "workers' lines in the journal",
        || {
            let entries: Vec<Value> = sd
                .journal_entries("baton.service", &["BATON_PROGRAM=worker"])
                .into_iter()
                .filter(|e| {
                    e["MESSAGE"]
                        .as_str()
                        .is_some_and(|m| m.contains("ready on http"))
                })
                .collect();
            (entries.len() >= 2).then_some(entries)
        },
    );
    for e in &entries {
        assert_eq!(e["SYSLOG_IDENTIFIER"], "worker", "{e}");
        assert_eq!(e["BATON_GENERATION"], "1", "{e}");
        assert_eq!(e["BATON_STREAM"], "stderr", "{e}");
        assert_eq!(e["PRIORITY"], "6", "{e}");
        assert_eq!(e["OBJECT_PID"], e["BATON_PID"], "{e}");
        assert!(e["BATON_SLOT"] == "0" || e["BATON_SLOT"] == "1", "{e}");
    }
    // The master's own events too: `journalctl BATON_EVENT=...` finds them.
    let started = sd.journal_entries("baton.service", &["BATON_EVENT=started"]);
    let started = started.first().expect("the started event in the journal");
    assert_eq!(started["SYSLOG_IDENTIFIER"], "baton", "{started}");
    assert_eq!(started["BATON_PID"], main_pid, "{started}");

    // reload under load: returns only when the new generation serves; nothing lost.
    let load = sd.loadgen(&[&format!("127.0.0.1:{PORT}"), "fresh", "4", "6"]);
    for generation in 2..=4 {
        sd.systemctl_ok(&["reload", "baton.service"]);
        let status = sd.show("baton.service", "StatusText");
        assert!(
            status.starts_with(&format!("gen {generation} serving")),
            "right after reload: {status:?}"
        );
        assert_eq!(sd.show("baton.service", "MainPID"), main_pid, "same master");
    }
    let r = report(load);
    eprintln!("systemctl reload x3 under load: {}", r["summary"]);
    assert_eq!(r["failed"], 0, "{r}");
    assert!(r["ok"].as_u64().unwrap() > 100, "{r}");

    // A reload that fails makes `systemctl reload` fail; the unit and the old generation stay.
    for (what, yaml) in [
        ("broken config", config("bogus_key: 1\n")),
        ("never ready", never_ready()),
    ] {
        std::fs::write(&config_path, yaml).unwrap();
        let reload = sd.systemctl(&["reload", "baton.service"]);
        assert!(!ok(&reload), "{what}: systemctl reload must fail");
        assert_eq!(sd.show("baton.service", "ActiveState"), "active", "{what}");
        assert_eq!(sd.show("baton.service", "MainPID"), main_pid, "{what}");
        assert!(serves(&sd), "{what}: the old generation serves");
    }
    std::fs::write(&config_path, config("")).unwrap();
    sd.systemctl_ok(&["reload", "baton.service"]);

    // The logrotate case: USR1 to every process of the unit.
    sd.systemctl_ok(&["kill", "-s", "USR1", "baton.service"]);
    // Every process got it and handled it: the master and both workers said so.
    eventually(
        Duration::from_secs(5),
        "USR1 handled by the master and its workers",
        || {
            let journal = sd.journal("baton.service");
            (journal.contains("SIGUSR1 from pid")
                && journal.matches("SIGUSR1: nothing to reopen").count() >= 2)
                .then_some(())
        },
    );
    assert_eq!(sd.show("baton.service", "ActiveState"), "active");
    assert_eq!(sd.show("baton.service", "MainPID"), main_pid);
    assert!(serves(&sd));

    // stop drains: a request in flight completes, then nothing of the unit is left.
    let slow = sd.loadgen(&[
        &format!("127.0.0.1:{PORT}"),
        "fresh",
        "1",
        "10",
        "/?delay_ms=2500",
        "1",
    ]);
    // In flight: a worker reports the open connection (`baton status` inside the namespace).
    eventually(
        Duration::from_secs(5),
        "the slow request to be in flight",
        || {
            let out = sd
                .command(&binaries().baton.display().to_string())
                .args(["status", "--json"])
                .output()
                .ok()?;
            let status: Value = serde_json::from_slice(&out.stdout).ok()?;
            let open: u64 = status["generations"][0]["workers"]
                .as_array()?
                .iter()
                .filter_map(|w| w["connections"].as_u64())
                .sum();
            (open >= 1).then_some(())
        },
    );
    // TimeoutStopSec=1, the request needs 2.5 s: only EXTEND_TIMEOUT_USEC lets it finish.
    let stop = sd.systemctl(&["stop", "baton.service"]);
    assert!(ok(&stop));
    let r = report(slow);
    assert_eq!(
        r["failed"],
        0,
        "the in-flight request completed: {r}\n{}",
        sd.journal("baton")
    );
    assert!(
        !sd.journal("baton.service").contains("watchdog timeout"),
        "{}",
        sd.journal("baton")
    );
    assert_eq!(
        sd.show("baton.service", "Result"),
        "success",
        "stopped cleanly, not killed"
    );
    assert_eq!(r["ok"], 1, "{r}");
    assert_eq!(sd.show("baton.service", "ActiveState"), "inactive");
    let left = sd
        .command("pgrep")
        .args(["-f", "hello-worker|baton run"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "left: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    drop(sd);
    assert_eq!(
        std::fs::read_to_string(&canary).ok().as_deref(),
        Some("still here"),
        "the host's /tmp was touched"
    );
    let _ = std::fs::remove_file(&canary);
}

#[test]
fn a_killed_master_is_restarted_with_its_listener_from_the_fd_store_and_clients_wait_instead_of_being_refused()
 {
    let (sd, _) = boot("fdstore", &[]);
    sd.systemctl_ok(&["start", "baton.service"]);
    let before = sd.listening_inodes(PORT);
    assert_eq!(before.len(), 1, "{before:?}");
    let main_pid = sd.show("baton.service", "MainPID");
    kill9(&sd, &main_pid);
    // The restart window: the master is dead, its workers have drained and exited, and systemd
    // waits RestartSec before starting it again. The socket lives on in the fd store.
    restart_window(&sd, || true);
    assert_eq!(
        sd.listening_inodes(PORT),
        before,
        "still listening while no master runs"
    );
    let during = report(sd.loadgen(&[&format!("127.0.0.1:{PORT}"), "fresh", "1", "20", "/", "1"]));
    eprintln!(
        "a request sent during the restart window: {}",
        during["summary"]
    );
    assert_eq!(during["ok"], 1, "served, not refused: {during}");
    assert_eq!(during["failed"], 0, "{during}");
    // The new master's workers may serve a moment before systemd has processed its READY=1.
    sd.wait_active("baton.service", Duration::from_secs(10));
    assert_eq!(sd.show("baton.service", "NRestarts"), "1");
    assert_ne!(sd.show("baton.service", "MainPID"), main_pid);
    assert_eq!(
        sd.listening_inodes(PORT),
        before,
        "the same socket, from the fd store"
    );
    assert!(
        sd.journal("baton.service")
            .contains("inherited socket `http`")
    );
}

/// The fault point `fdstore.update` (docs/reliability.md): when handing the listener to the fd
/// store fails, the master says so and serves on; killed, it is restarted all the same, but its
/// socket died with it: a client in the restart window is refused, where the fd store would
/// have kept it waiting (the test above).
#[test]
fn a_failed_fd_store_update_is_logged_and_a_killed_master_then_costs_refused_connections() {
    let config_path = default_config("fdstore-fault");
    let unit = strict_unit(&config_path).replacen(
        "[Service]\n",
        "[Service]\nEnvironment=FAILPOINTS=fdstore.update=return(error)\n",
        1,
    );
    assert!(unit.contains("FAILPOINTS"), "{unit}");
    let sd = Systemd::boot("fdstore-fault", &[("baton.service", unit)]);
    sd.systemctl_ok(&["start", "baton.service"]);
    let journal = sd.journal("baton.service");
    assert!(
        journal.contains(
            "sd_notify: storing the listeners in the fd store: fault injected at fdstore.update"
        ),
        "{journal}"
    );
    assert!(serves(&sd), "it serves all the same");
    let before = sd.listening_inodes(PORT);
    let main_pid = sd.show("baton.service", "MainPID");
    kill9(&sd, &main_pid);
    // The socket died with its master.
    restart_window(&sd, || sd.listening_inodes(PORT).is_empty());
    let during = report(sd.loadgen(&[&format!("127.0.0.1:{PORT}"), "fresh", "1", "20", "/", "1"]));
    eprintln!(
        "a request sent during the restart window without the fd store: {}",
        during["summary"]
    );
    assert_eq!(during["ok"], 0, "refused: {during}");
    sd.wait_active("baton.service", Duration::from_secs(10));
    assert_eq!(sd.show("baton.service", "NRestarts"), "1");
    assert!(serves(&sd), "the restarted master serves");
    assert_ne!(
        sd.listening_inodes(PORT),
        before,
        "a new socket, bound again"
    );
}

#[test]
fn with_a_socket_unit_baton_adopts_systemds_socket() {
    let socket = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/systemd/baton.socket"
    ))
    .unwrap()
    .replace(
        "ListenStream=0.0.0.0:80",
        &format!("ListenStream=127.0.0.1:{PORT}"),
    );
    assert!(socket.contains(&format!("ListenStream=127.0.0.1:{PORT}")));
    let (sd, _) = boot("socket", &[("baton.socket", socket)]);
    sd.systemctl_ok(&["start", "baton.socket"]);
    let systemds = sd.listening_inodes(PORT);
    assert_eq!(systemds.len(), 1, "systemd listens: {systemds:?}");
    sd.systemctl_ok(&["start", "baton.service"]);
    assert!(
        sd.journal("baton.service")
            .contains("inherited socket `http`"),
        "{}",
        sd.journal("baton.service")
    );
    assert_eq!(
        sd.listening_inodes(PORT),
        systemds,
        "baton serves on systemd's very socket"
    );
    assert!(serves(&sd));
    sd.systemctl_ok(&["reload", "baton.service"]);
    assert_eq!(sd.listening_inodes(PORT), systemds);
}

#[test]
fn baton_upgrade_under_systemd_keeps_the_main_pid_and_the_unit_active_and_reload_still_works() {
    let (sd, config_path) = boot("upgrade", &[]);
    std::fs::write(
        &config_path,
        config("supervisor:\n  upgrade_signal: SIGURG\n"),
    )
    .unwrap();
    sd.systemctl_ok(&["start", "baton.service"]);
    let main_pid = sd.show("baton.service", "MainPID");
    let inodes = sd.listening_inodes(PORT);
    let stored = sd.show("baton.service", "NFileDescriptorStore");
    assert_eq!(stored, "1", "the listener is in the fd store");
    let load = sd.loadgen(&[&format!("127.0.0.1:{PORT}"), "fresh", "4", "4"]);
    let next = baton_integration::next_baton().display().to_string();
    let upgrade = sd
        .command(&binaries().baton.display().to_string())
        .args(["upgrade", "--binary", &next])
        .output()
        .unwrap();
    assert!(
        ok(&upgrade),
        "upgrade: {}{}\n{}",
        String::from_utf8_lossy(&upgrade.stdout),
        String::from_utf8_lossy(&upgrade.stderr),
        sd.journal("baton")
    );
    eprintln!("{}", String::from_utf8_lossy(&upgrade.stdout).trim());
    assert_eq!(
        sd.show("baton.service", "MainPID"),
        main_pid,
        "same MainPID"
    );
    assert_eq!(sd.show("baton.service", "ActiveState"), "active");
    assert_eq!(sd.show("baton.service", "NFileDescriptorStore"), stored);
    assert_eq!(sd.listening_inodes(PORT), inodes);
    // The upgraded master still has a real reload path.
    sd.systemctl_ok(&["reload", "baton.service"]);
    let status = sd.show("baton.service", "StatusText");
    assert!(status.starts_with("gen 2 serving"), "{status:?}");
    assert_eq!(sd.show("baton.service", "MainPID"), main_pid);
    // The upgrade signal, sent by systemd to the master only, upgrades again: to the program
    // the unit started (the `--binary` of the first upgrade was for that upgrade only).
    let baton_status = || -> Value {
        let out = sd
            .command(&binaries().baton.display().to_string())
            .args(["status", "--json"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let first_version = baton_status()["master"]["upgrades"][0]["from_version"].clone();
    sd.systemctl_ok(&["kill", "--kill-whom=main", "-s", "URG", "baton.service"]);
    let after_signal = eventually(
        Duration::from_secs(20),
        "the second upgrade (by SIGURG)",
        || {
            let s = baton_status();
            (s["master"]["upgrades"].as_array().map(Vec::len) == Some(2)).then_some(s)
        },
    );
    assert_eq!(after_signal["master"]["version"], first_version);
    assert_eq!(sd.show("baton.service", "MainPID"), main_pid);
    assert_eq!(sd.show("baton.service", "ActiveState"), "active");
    let r = report(load);
    eprintln!(
        "upgrade and reload under systemd, under load: {}",
        r["summary"]
    );
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(
        after_signal["master"]["upgrades"][0]["to_version"],
        format!("{}+next", first_version.as_str().unwrap()),
        "{after_signal}"
    );
    // The fd store still serves a restart after the upgrade: kill -9, the socket comes back.
    kill9(&sd, &main_pid);
    eventually(
        Duration::from_secs(20),
        "the unit to be active again",
        || {
            (sd.show("baton.service", "ActiveState") == "active"
                && sd.show("baton.service", "MainPID") != main_pid)
                .then_some(())
        },
    );
    assert_eq!(
        sd.listening_inodes(PORT),
        inodes,
        "the same socket, from the fd store"
    );
}

/// The packaged unit and a worker that ignores SIGTERM (drain timeout 2 s): when the master is
/// SIGKILLed, the worker does not outlive it by more than its drain timeout (systemd's
/// `KillMode=mixed` ends what is left of the unit at once; baton's guard would at 2 s), and the
/// restarted master starts cleanly over the registry its predecessor left.
#[test]
fn under_systemd_a_killed_master_s_stubborn_worker_does_not_outlive_it() {
    let config_path = Systemd::workdir("orphans").join("baton.yaml");
    std::fs::write(
        &config_path,
        format!(
            "listeners:\n  - name: http\n    address: 127.0.0.1:{PORT}\nworker:\n  command: {}\n  env: {{IT_MODE: stubborn}}\n  drain_timeout: 2s\n",
            binaries().it_worker.display()
        ),
    )
    .unwrap();
    let unit = service_unit(&config_path);
    assert!(unit.contains("TimeoutStopSec=60") && unit.contains("KillMode=mixed"));
    let sd = Systemd::boot("orphans", &[("baton.service", unit)]);
    sd.systemctl_ok(&["start", "baton.service"]);
    let workers = || {
        let out = sd
            .command("pgrep")
            .args(["-f", "it-worker"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let worker = eventually(Duration::from_secs(10), "the worker", || {
        Some(workers()).filter(|w| !w.is_empty())
    });
    let main_pid = sd.show("baton.service", "MainPID");
    kill9(&sd, &main_pid);
    let killed = std::time::Instant::now();
    eventually(Duration::from_secs(20), "the stubborn worker gone", || {
        (!workers().split_whitespace().any(|w| w == worker)).then_some(())
    });
    let lived = killed.elapsed();
    eprintln!(
        "under systemd the worker outlived its master by {lived:?} (drain timeout 2 s, stop timeout 60 s)"
    );
    assert!(lived < Duration::from_secs(10), "{lived:?}");
    sd.wait_active("baton.service", Duration::from_secs(30));
    assert_eq!(sd.show("baton.service", "NRestarts"), "1");
    let journal = sd.journal("baton.service");
    assert!(journal.contains("guard pid"), "{journal}");
    assert!(
        !journal.contains("ending those still running"),
        "nothing left to end: {journal}"
    );
    // The new master bound the port again: no predecessor's worker held it.
    assert_eq!(sd.listening_inodes(PORT).len(), 1);
}

/// The packaged unit (`Delegate=yes`): each generation's workers run in a cgroup of their own
/// under the unit's, and a child a worker started in a session of its own ends with its
/// generation at the drain deadline.
#[test]
fn under_systemd_a_workers_escaped_child_ends_with_it_in_its_delegated_cgroup() {
    let workdir = Systemd::workdir("tree");
    let config_path = workdir.join("baton.yaml");
    std::fs::write(
        &config_path,
        format!(
            "listeners:\n  - name: http\n    address: 127.0.0.1:{PORT}\nworker:\n  command: /bin/sh\n  args: [-c, \"setsid sleep 3600 & echo $! > {dir}/escaped-$BATON_WORKER_ID; exec {it}\"]\n  env: {{IT_MODE: stubborn}}\n  drain_timeout: 1s\n",
            dir = workdir.display(),
            it = binaries().it_worker.display()
        ),
    )
    .unwrap();
    let unit = service_unit(&config_path);
    assert!(unit.contains("Delegate=yes"));
    let sd = Systemd::boot("tree", &[("baton.service", unit)]);
    sd.systemctl_ok(&["start", "baton.service"]);
    let child = eventually(Duration::from_secs(10), "the escaped child's pid", || {
        let text = std::fs::read_to_string(workdir.join("escaped-1")).ok()?;
        Some(text.trim().to_string()).filter(|t| !t.is_empty())
    });
    let cgroup = sd
        .command("cat")
        .arg(format!("/proc/{child}/cgroup"))
        .output()
        .unwrap();
    let cgroup = String::from_utf8_lossy(&cgroup.stdout).into_owned();
    assert!(
        cgroup.contains("/baton.service/baton-") && cgroup.contains("/g1-p0\n"),
        "{cgroup}"
    );
    let containment = sd.journal_entries("baton.service", &["BATON_EVENT=containment"]);
    assert_eq!(
        containment.first().map(|e| e["BATON_MODE"].clone()),
        Some(serde_json::json!("cgroup")),
        "{containment:?}"
    );
    // A reload retires the worker, which ignores its drain request: killed at the deadline, and
    // the escaped child with it, while the unit runs on.
    sd.systemctl_ok(&["reload", "baton.service"]);
    let alive = || {
        sd.command("kill")
            .args(["-0", &child])
            .output()
            .unwrap()
            .status
            .success()
    };
    eventually(Duration::from_secs(15), "the escaped child gone", || {
        (!alive()).then_some(())
    });
    assert_eq!(sd.show("baton.service", "ActiveState"), "active");
}

/// A self-upgrade whose resume fails after the exec (the fault `upgrade.resume`, armed for the
/// new program only) under the packaged unit: the master exits 1, systemd restarts the unit,
/// and the new master serves on the same listening socket, which the fd store kept; a request
/// sent meanwhile waits in its queue and is served.
#[test]
fn an_upgrade_that_fails_after_the_exec_restarts_on_the_fd_stores_sockets() {
    let config_path = default_config("upgrade-resume");
    let unit = strict_unit(&config_path).replace(
        "[Service]\n",
        "[Service]\nEnvironment=FAILPOINTS_AFTER_UPGRADE=upgrade.resume=return\n",
    );
    assert!(unit.contains("FAILPOINTS_AFTER_UPGRADE"));
    let sd = Systemd::boot("upgrade-resume", &[("baton.service", unit)]);
    sd.systemctl_ok(&["start", "baton.service"]);
    let before = sd.listening_inodes(PORT);
    assert_eq!(before.len(), 1, "{before:?}");
    let main_pid = sd.show("baton.service", "MainPID");
    let load = sd.loadgen(&[&format!("127.0.0.1:{PORT}"), "fresh", "2", "8"]);
    let upgrade = sd
        .command(&binaries().baton.display().to_string())
        .args([
            "upgrade",
            "--binary",
            &binaries().baton.display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(!ok(&upgrade), "the upgrade failed after the exec");
    eventually(
        Duration::from_secs(20),
        "the unit restarted and active",
        || {
            (sd.show("baton.service", "NRestarts") == "1"
                && sd.show("baton.service", "ActiveState") == "active")
                .then_some(())
        },
    );
    assert_ne!(sd.show("baton.service", "MainPID"), main_pid);
    let journal = sd.journal("baton.service");
    assert!(
        journal.contains("cannot take over after the upgrade: fault injected at upgrade.resume"),
        "{journal}"
    );
    assert_eq!(
        sd.listening_inodes(PORT),
        before,
        "the same socket, from the fd store"
    );
    assert!(serves(&sd), "the restarted master serves");
    let during = report(load);
    eprintln!("load across the failed upgrade: {}", during["summary"]);
    assert!(during["ok"].as_u64().unwrap_or(0) > 0, "{during}");
}
