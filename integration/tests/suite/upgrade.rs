//! `baton upgrade`: the master replaces its own program in place, under load, while a
//! generation drains, and refuses binaries that cannot take over.

use baton_integration::event;
use baton_integration::executable;
use baton_integration::loopback;
use std::time::{Duration, Instant};

use baton_integration::load::{Load, Mode};
use baton_integration::procfs::{alive, listening_inodes};
use baton_integration::worker_mode::WorkerMode;
use baton_integration::{
    Master, TestConfig, binaries, eventually, free_port, held_connection, http, next_baton,
};
use serde_json::Value;

fn status(master: &Master) -> Value {
    let (code, out, err) = master.ctl(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn upgrade(master: &Master, binary: &str) -> (i32, String, String) {
    master.ctl(&["upgrade", "--binary", binary])
}

#[test]
fn upgrade_under_load_keeps_the_pid_the_sockets_the_workers_and_the_history() {
    let next = next_baton();
    let port = free_port();
    let metrics = free_port();
    let mut config = TestConfig::hello(&format!("127.0.0.1:{port}"), 2);
    config
        .supervisor_extra
        .push(format!("metrics_listen: 127.0.0.1:{metrics}"));
    let master = Master::start("upgrade", &config);
    for _ in 0..2 {
        assert_eq!(master.reload()["event"], "reload_succeeded");
    }
    let before = status(&master);
    let old_version = before["master"]["version"].as_str().unwrap().to_string();
    assert!(http(metrics, "GET", "/metrics").2.contains(&format!(
        "baton_build_info{{version=\"{old_version}\"}} 1\n"
    )));
    let inodes = listening_inodes(port);
    let workers = master.children();
    assert_eq!(workers.len(), 2, "{workers:?}");
    let load = Load::until_finished(loopback(port), Mode::Fresh, 8);
    // The load runs against the old program: some requests of ours complete meanwhile.
    let served = || {
        for _ in 0..20 {
            drop(held_connection(port));
        }
    };
    served();
    let (code, out, err) = upgrade(&master, &next.display().to_string());
    assert_eq!(code, 0, "upgrade failed: {out}{err}");
    assert!(
        out.contains(&format!("{old_version} -> {old_version}+next")),
        "{out}"
    );
    let upgraded = master
        .wait_event(event::UPGRADED, Duration::from_secs(10), |_| true)
        .1;
    served();
    let report = load.finish();
    eprintln!("upgrade under load: {upgraded}; {}", report.summary());
    report.assert_lossless("");

    let after = status(&master);
    assert_eq!(
        after["master"]["pid"], before["master"]["pid"],
        "same master pid"
    );
    assert_eq!(after["master"]["version"], format!("{old_version}+next"));
    // The metrics endpoint is bound again by the new program, which it describes.
    let (code, _, text) = http(metrics, "GET", "/metrics");
    assert_eq!(code, 200);
    assert!(
        text.contains(&format!(
            "baton_build_info{{version=\"{old_version}+next\"}} 1\n"
        )),
        "{text}"
    );
    assert_eq!(after["master"]["upgrades"][0]["from_version"], old_version);
    let (_, text, _) = master.ctl(&["status"]);
    assert!(
        text.contains(&format!(
            "upgraded in place 1 time(s), last from {old_version} to {old_version}+next"
        )),
        "{text}"
    );
    assert_eq!(listening_inodes(port), inodes, "the same listening sockets");
    assert_eq!(
        master.children(),
        workers,
        "the same workers, still children"
    );
    assert!(workers.iter().all(|&w| alive(w)));
    assert_eq!(after["generations"][0]["generation"], 3);
    let (code, history, _) = master.ctl(&["history", "--json"]);
    assert_eq!(code, 0);
    let history: Value = serde_json::from_str(&history).unwrap();
    assert_eq!(
        history.as_array().unwrap().len(),
        2,
        "both reloads: {history}"
    );

    // The new program reloads, accounting for the requests of both programs.
    assert_eq!(master.reload()["event"], "reload_succeeded");
    master.assert_logged_requests_accounted_for();
    assert_eq!(
        status(&master)["master"]["version"],
        format!("{old_version}+next")
    );
}

#[test]
fn a_generation_draining_through_an_upgrade_is_killed_at_its_deadline_by_the_new_program() {
    let next = next_baton();
    let (port, mut c) = TestConfig::hello_on_a_free_port(1);
    c.holding("3s");
    let master = Master::start("upgrade-drain", &c);
    let old = master.events(event::WORKER_READY)[0]["pid"]
        .as_u64()
        .unwrap() as u32;
    let _held = held_connection(port);
    assert_eq!(master.reload()["event"], "reload_succeeded");
    let (draining_at, _) =
        master.wait_event(event::GENERATION_DRAINING, Duration::from_secs(5), |v| {
            v["generation"] == 1
        });
    let (code, out, err) = upgrade(&master, &next.display().to_string());
    assert_eq!(code, 0, "{out}{err}");
    let (upgraded_at, _) = master.wait_event(event::UPGRADED, Duration::from_secs(10), |_| true);
    assert!(alive(old), "the draining worker survives the upgrade");
    let (exited_at, exited) =
        master.wait_event(event::GENERATION_EXITED, Duration::from_secs(10), |v| {
            v["generation"] == 1
        });
    assert_eq!(exited["killed"], true, "killed at the deadline: {exited}");
    let at = exited_at.duration_since(draining_at);
    eprintln!(
        "drain began, upgrade after {:?}, killed {at:?} after the drain began",
        upgraded_at.duration_since(draining_at)
    );
    assert!(
        upgraded_at < exited_at,
        "the new program enforced the deadline"
    );
    assert!(
        at >= Duration::from_millis(2900) && at < Duration::from_secs(5),
        "deadline 3 s after the drain began, enforced at {at:?}"
    );
    assert!(!alive(old));
}

#[test]
fn an_upgrade_to_a_binary_that_cannot_take_over_fails_and_the_old_master_serves_on() {
    let (port, mut config) = TestConfig::hello_on_a_free_port(2);
    config.supervisor_extra = vec!["upgrade_timeout: 1s".into()];
    let master = Master::start("upgrade-broken", &config);
    let dir = tempfile::tempdir().unwrap();
    let hangs = dir.path().join("hangs");
    std::fs::write(&hangs, "#!/bin/sh\nexec sleep 60\n").unwrap();
    let script = dir.path().join("crashes");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'segfault, as it were' >&2\nexit 139\n",
    )
    .unwrap();
    // A real baton given a state newer than it understands (as an older baton would be): the
    // script rewrites the format and hands the copy to `baton upgrade-check`.
    let too_new = dir.path().join("older-baton");
    std::fs::write(
        &too_new,
        format!(
            "#!/bin/sh\nsed 's/\"format\":[0-9]*,/\"format\":999,/' /proc/self/fd/$BATON_UPGRADE_STATE_FD > {state}\nexec 9< {state}\nBATON_UPGRADE_STATE_FD=9 exec {baton} \"$@\"\n",
            state = dir.path().join("state-newer.json").display(),
            baton = binaries().baton.display(),
        ),
    )
    .unwrap();
    let not_executable = dir.path().join("not-executable");
    std::fs::copy(&binaries().baton, &not_executable).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for file in [&script, &too_new, &hangs] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&not_executable, std::fs::Permissions::from_mode(0o644)).unwrap();
    let before = status(&master);
    let workers = master.children();
    let load = Load::until_finished(loopback(port), Mode::Fresh, 4);
    for (binary, why) in [
        ("/nonexistent/baton".to_string(), "No such file"),
        (script.display().to_string(), "segfault, as it were"),
        ("/bin/true".to_string(), "no answer to upgrade-check"),
        (
            too_new.display().to_string(),
            "state format 999 is newer than this baton understands",
        ),
        (not_executable.display().to_string(), "ermission denied"),
        (
            hangs.display().to_string(),
            "did not answer upgrade-check within 1000 ms (supervisor.upgrade_timeout)",
        ),
    ] {
        let started = Instant::now();
        let (code, out, err) = upgrade(&master, &binary);
        assert_eq!(code, 1, "{binary}: {out}{err}");
        assert!(err.contains(why), "{binary}: {err}");
        assert!(err.contains("goes on serving"), "{err}");
        eprintln!(
            "{binary}: refused in {:?}: {}",
            started.elapsed(),
            err.trim()
        );
        assert_eq!(
            status(&master)["master"]["version"],
            before["master"]["version"]
        );
    }
    let (code, _, err) = master.ctl(&["upgrade", "--binary", "relative/baton"]);
    assert_eq!(code, 64, "{err}");
    // No upgrade signal is configured: SIGURG upgrades nothing, and the log says why.
    ignored_with(
        &master,
        nix::sys::signal::Signal::SIGURG,
        "supervisor.upgrade_signal is not set",
    );
    let report = load.finish();
    report.assert_lossless("");
    assert!(report.ok > 0);
    let after = status(&master);
    assert_eq!(after["master"]["pid"], before["master"]["pid"]);
    assert_eq!(master.children(), workers);
    // Each verdict is in the log too (its line may trail the client's answer).
    eventually(Duration::from_secs(10), "six upgrade_failed lines", || {
        (master.events(event::UPGRADE_FAILED).len() == 6).then_some(())
    });
    // And the old master still does its job.
    assert_eq!(master.reload()["event"], "reload_succeeded");
}

#[test]
fn an_upgrade_during_a_reload_is_refused_with_the_reason() {
    let (_, mut c) = TestConfig::hello_on_a_free_port(1);
    // A worker that is slow to become ready keeps the reload running.
    c.it_worker(WorkerMode::ReadyAfter(1500));
    let master = Master::start("upgrade-busy", &c);
    master.signal(nix::sys::signal::Signal::SIGUSR2);
    master.wait_event(event::RELOAD_STARTED, Duration::from_secs(10), |_| true);
    let (code, _, err) = upgrade(&master, &binaries().baton.display().to_string());
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("cannot upgrade now: reload"), "{err}");
}

/// Sends `signal` and waits for the master to log that it ignored it, saying `why`.
fn ignored_with(master: &Master, signal: nix::sys::signal::Signal, why: &str) {
    master.signal(signal);
    let ignored = master
        .wait_event(
            event::UPGRADE_SIGNAL_IGNORED,
            Duration::from_secs(10),
            |v| v["signal"] == signal.as_str(),
        )
        .1;
    let message = ignored["message"].as_str().unwrap();
    assert!(message.contains(why), "{ignored}");
}

/// Replaces `path` the way a package manager does: a new file renamed over the old one (the
/// running program keeps its inode).
fn replace_program(path: &std::path::Path, with: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("dpkg-new");
    std::fs::write(&tmp, with).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn the_upgrade_signal_execs_the_replaced_program_file_and_other_signals_are_ignored() {
    use nix::sys::signal::Signal::{SIGURG, SIGWINCH};
    let next = next_baton();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("baton");
    std::fs::copy(&binaries().baton, &program).unwrap();
    let mut config = TestConfig::hello(&format!("127.0.0.1:{port}"), 2);
    config.supervisor_extra = vec!["upgrade_signal: SIGURG".into()];
    let master = Master::start_program("upgrade-signal", &config, &program);
    let before = status(&master);
    let old_version = before["master"]["version"].as_str().unwrap().to_string();
    let workers = master.children();

    // Not the configured signal: nothing happens, and the log says why.
    ignored_with(&master, SIGWINCH, "supervisor.upgrade_signal is SIGURG");

    let load = Load::until_finished(loopback(port), Mode::Fresh, 8);
    // The file is replaced by something that is not baton: the upgrade fails, the master goes on.
    replace_program(&program, b"#!/bin/sh\necho 'not a baton' >&2\nexit 3\n");
    master.signal(SIGURG);
    let failed = master
        .wait_event(event::UPGRADE_FAILED, Duration::from_secs(20), |_| true)
        .1;
    assert!(
        failed["reason"].as_str().unwrap().contains("not a baton"),
        "{failed}"
    );
    assert_eq!(status(&master)["master"]["version"], old_version);
    // Then by the next version, as a package update does: the same signal upgrades to it.
    replace_program(&program, &std::fs::read(next).unwrap());
    master.signal(SIGURG);
    let upgraded = master
        .wait_event(event::UPGRADED, Duration::from_secs(20), |_| true)
        .1;
    let report = load.finish();
    report.assert_lossless_with(&format!("upgrade by SIGURG under load: {upgraded}"), 1);

    let after = status(&master);
    assert_eq!(after["master"]["pid"], before["master"]["pid"]);
    assert_eq!(after["master"]["version"], format!("{old_version}+next"));
    assert_eq!(master.children(), workers, "the same workers");
    assert_eq!(master.events(event::UPGRADE_REQUESTED).len(), 2);
    // The new program keeps the setting and the program path.
    master.signal(SIGWINCH);
    eventually(
        Duration::from_secs(10),
        "the new program ignores SIGWINCH too",
        || (master.events(event::UPGRADE_SIGNAL_IGNORED).len() == 2).then_some(()),
    );
    assert_eq!(master.reload()["event"], "reload_succeeded");
}

#[test]
fn an_upgrade_signal_during_an_upgrade_is_refused_and_the_first_upgrade_keeps_its_verdict() {
    let (_, mut config) = TestConfig::hello_on_a_free_port(1);
    config.supervisor_extra = vec!["upgrade_signal: SIGURG".into()];
    let master = Master::start("upgrade-twice", &config);
    let dir = tempfile::tempdir().unwrap();
    // A program whose check takes a while (and then fails): the first upgrade is under way
    // for that long.
    let slow = executable(
        dir.path(),
        "slow",
        "#!/bin/sh\nsleep 2\necho 'slow and broken' >&2\nexit 1\n",
    );
    let first = master.ctl_spawn(&["upgrade", "--binary", &slow.display().to_string()]);
    master.wait_event(event::UPGRADE_REQUESTED, Duration::from_secs(10), |_| true);
    master.signal(nix::sys::signal::Signal::SIGURG);
    let refused = master
        .wait_event(event::UPGRADE_REFUSED, Duration::from_secs(10), |_| true)
        .1;
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("another upgrade is under way"),
        "{refused}"
    );
    let out = first.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("slow and broken"), "{err}");
    let requested = master.events(event::UPGRADE_REQUESTED);
    assert_eq!(requested.len(), 2, "{requested:?}");
    assert!(
        requested[1]["message"]
            .as_str()
            .unwrap()
            .contains("requested by SIGURG from pid"),
        "{requested:?}"
    );
    // The log line may trail the client's answer.
    master.wait_event(event::UPGRADE_FAILED, Duration::from_secs(10), |_| true);
    assert_eq!(master.events(event::UPGRADE_FAILED).len(), 1);
}

/// Issue 28: the upgrade killed the master whenever a `protocol: systemd` worker ran (the new
/// program adopted the notify sockets before its event loop existed, and panicked). Both
/// protocols at once, under load: the same pid, sockets and workers, nothing lost, and the
/// systemd-style workers' heartbeats still read by the new program (a lost notify socket would
/// have them judged dead within their 1 s window).
#[test]
fn an_upgrade_with_systemd_protocol_workers_keeps_every_worker_and_loses_nothing() {
    let next = next_baton();
    let port = free_port();
    let yaml = format!(
        "listeners:\n  - {{name: http, address: \"127.0.0.1:{port}\"}}\nworkers:\n  - name: sdk\n    command: {hello}\n    processes: 2\n  - name: plain\n    command: {hello}\n    protocol: systemd\n    ready: notify\n    processes: 2\n    liveness: {{watchdog: 1s, kill_after: 1s}}\nsupervisor:\n  runtime_dir: \"{{dir}}/run\"\n  control: {{socket: \"{{dir}}/baton.sock\"}}\n",
        hello = binaries().hello_worker.display()
    );
    let master = Master::spawn("upgrade-systemd", &yaml);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let before = status(&master);
    let inodes = listening_inodes(port);
    let workers = master.children();
    assert_eq!(workers.len(), 4, "{workers:?}");
    let load = Load::until_finished(loopback(port), Mode::Fresh, 8);
    let (code, out, err) = upgrade(&master, &next.display().to_string());
    assert_eq!(code, 0, "upgrade failed: {out}{err}");
    master.wait_event(event::UPGRADED, Duration::from_secs(10), |_| true);
    // Three heartbeat windows after the upgrade: each worker must have been heard meanwhile.
    let heard = Instant::now();
    eventually(Duration::from_secs(10), "3 s of heartbeats", || {
        (heard.elapsed() >= Duration::from_secs(3)).then_some(())
    });
    let report = load.finish();
    report.assert_lossless_with("upgrade with systemd workers under load", 100);
    let after = status(&master);
    assert_eq!(after["master"]["pid"], before["master"]["pid"]);
    assert!(
        after["master"]["version"]
            .as_str()
            .unwrap()
            .ends_with("+next"),
        "{after}"
    );
    assert_eq!(listening_inodes(port), inodes, "the same listening sockets");
    assert_eq!(master.children(), workers, "the same workers");
    assert!(
        master.events(event::WORKER_UNHEALTHY).is_empty(),
        "every heartbeat was read after the upgrade: {:?}",
        master.events(event::WORKER_UNHEALTHY)
    );
    // The new program reloads both programs, systemd-style readiness included.
    assert_eq!(master.reload()["event"], "reload_succeeded");
    master.assert_logged_requests_accounted_for();
}

/// A resume that would fail after the exec fails in the preflight instead: the new program
/// rehearses the whole resume on the master's own descriptors before the old one execs it
/// (here a fault at `upgrade.resume`, armed for the preflight), and the old master serves on.
#[test]
fn a_resume_that_would_fail_after_the_exec_fails_in_the_preflight_and_nothing_changes() {
    let (port, mut config) = TestConfig::hello_on_a_free_port(2);
    config.worker_extra = vec!["protocol: systemd".into(), "ready: notify".into()];
    let master = Master::spawn_with_env(
        "upgrade-rehearsal",
        &config.yaml(),
        &[("FAILPOINTS", "upgrade.resume=return")],
    );
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let workers = master.children();
    let inodes = listening_inodes(port);
    let baton = binaries().baton.display().to_string();
    let (code, out, err) = upgrade(&master, &baton);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("fault injected at upgrade.resume"),
        "the refusal quotes the preflight: {out}{err}"
    );
    assert!(master.events(event::UPGRADE_EXEC).is_empty(), "no exec");
    assert_eq!(status(&master)["master"]["upgrades"], Value::Array(vec![]));
    assert_eq!(master.children(), workers);
    assert_eq!(listening_inodes(port), inodes);
    assert_eq!(master.reload()["event"], "reload_succeeded");
}

/// What a resume that fails after the exec costs without a service manager (the preflight
/// makes it rare; it cannot make it impossible): the old program is gone, so the master exits
/// 1 naming the cause; its guard ends the workers (none is left behind) and the listening
/// sockets close with it. Under systemd the fd store keeps them and the unit restarts on them
/// (`systemd.rs`).
#[test]
fn a_resume_that_fails_after_the_exec_exits_and_leaves_no_worker_behind() {
    let (port, mut config) = TestConfig::hello_on_a_free_port(2);
    config.worker_extra = vec!["protocol: systemd".into(), "ready: notify".into()];
    let mut master = Master::spawn_with_env(
        "upgrade-resume-fails",
        &config.yaml(),
        &[("FAILPOINTS_AFTER_UPGRADE", "upgrade.resume=return")],
    );
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let workers = master.children();
    assert!(master.guard().is_some(), "a guard watches the master");
    let baton = binaries().baton.display().to_string();
    let (code, out, err) = upgrade(&master, &baton);
    assert_ne!(code, 0, "the client learns it failed: {out}{err}");
    let status = master.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{status}");
    let failed = master.events(event::UPGRADE_RESUME_FAILED);
    assert_eq!(failed.len(), 1, "{}", master.raw_lines().join("\n"));
    assert!(
        failed[0]["message"]
            .as_str()
            .unwrap()
            .contains("fault injected at upgrade.resume"),
        "{failed:?}"
    );
    eventually(Duration::from_secs(20), "the workers ended", || {
        workers.iter().all(|&w| !alive(w)).then_some(())
    });
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the listening socket closed with the master"
    );
}
