//! The recipes of `examples/` for servers operators run (docs/recipes.md), each unmodified under
//! baton: reloads under load, a broken configuration, the drain in `baton status`. The servers
//! come from Debian's packages and PyPI (`integration/run-tests.sh` installs them); a missing one
//! fails the test saying what to install.

use baton_integration::event;
use baton_integration::loopback;
use std::io::{Read, Write};
use std::time::Duration;

use baton_integration::load::Mode;
use baton_integration::load::Report;
use baton_integration::recipes::{
    example, go_hello, go_yaml, gunicorn_yaml, haproxy_yaml, nginx_yaml, uvicorn_yaml,
};
use baton_integration::systemd::{Systemd, service_unit};
use baton_integration::{Master, eventually, free_port};
use serde_json::Value;

#[test]
fn haproxy_under_baton_reloads_every_200ms_under_load_without_losing_a_request() {
    let port = free_port();
    let master = Master::spawn(
        "haproxy-load",
        &haproxy_yaml(&example("haproxy/haproxy.cfg"), port),
    );
    // Every request carried out (not one skipped: HAProxy's own master skips some), and not
    // one failed, fresh or kept alive.
    let (fresh, kept, _) = reload_both_ways(&master, port, "haproxy");
    fresh.assert_lossless("");
    kept.assert_lossless("");
}

/// One request on `stream` (kept alive): the answer's head.
fn ask(stream: &mut std::net::TcpStream) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn a_broken_haproxy_cfg_fails_the_reload_with_haproxys_words_and_the_old_one_serves() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("haproxy.cfg");
    let good = std::fs::read_to_string(example("haproxy/haproxy.cfg")).unwrap();
    std::fs::write(&cfg, &good).unwrap();
    let port = free_port();
    let master = Master::spawn("haproxy-broken", &haproxy_yaml(&cfg, port));
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);

    std::fs::write(&cfg, good.replace("bind fd@3", "bind fd@3 no-such-keyword")).unwrap();
    let (code, out, err) = master.ctl(&["reload", "--json"]);
    eprintln!("{out}{err}");
    assert_eq!(code, 1, "the reload fails: {out} {err}");
    let verdict: Value = serde_json::from_str(&out).unwrap();
    let said = verdict["output"].to_string();
    assert!(
        said.contains("no-such-keyword"),
        "HAProxy's own error lines in the verdict: {verdict}"
    );
    // The old HAProxy serves on.
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let answer = ask(&mut client);
    assert!(answer.contains("x-baton-generation: 1"), "{answer}");

    // Fixed: a reload while this client is kept alive; `baton status` shows the old HAProxy
    // draining with the connection it still holds.
    std::fs::write(&cfg, &good).unwrap();
    let verdict = master.reload();
    assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
    let draining = eventually(Duration::from_secs(5), "generation 1 draining", || {
        let (_, out, _) = master.ctl(&["status", "--json"]);
        let status: Value = serde_json::from_str(&out).ok()?;
        let g = status["generations"]
            .as_array()?
            .iter()
            .find(|g| g["generation"] == 1 && g["state"] == "draining")?
            .clone();
        let held: u64 = g["workers"]
            .as_array()?
            .iter()
            .filter_map(|w| w["connections"].as_u64())
            .sum();
        (held == 1).then_some(g)
    });
    eprintln!("draining: {draining}");
    let (_, text, _) = master.ctl(&["drain-status"]);
    assert!(text.contains("1 connection open (kernel)"), "{text}");
    // Its next answer closes it (option idle-close-on-response), and the old HAProxy exits.
    let answer = ask(&mut client);
    assert!(answer.contains("x-baton-generation: 1"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    master.wait_event(event::GENERATION_EXITED, Duration::from_secs(10), |v| {
        v["generation"] == 1
    });
}

#[test]
fn nginx_under_baton_reloads_every_200ms_and_loses_only_what_its_graceful_stop_closes() {
    let files = tempfile::tempdir().unwrap();
    let port = free_port();
    let master = Master::spawn("nginx-load", &nginx_yaml(files.path(), port));
    let (fresh, kept, signals) = reload_both_ways(&master, port, "nginx");
    // A fresh connection is never closed, refused or left unanswered. (Before the listener was
    // handed over non-blocking, nginx, which assumes so of an inherited socket, parked a worker
    // in accept() after another process won the connection: its clients' requests waited
    // until the next connection arrived, 3 to 7 timeouts in half the runs.)
    fresh.assert_lossless("");
    // nginx's graceful stop closes idle kept-alive connections at once: a client whose next
    // request crosses the close loses it, closed or reset; none is left unanswered.
    assert_only_graceful_closes(&kept, signals, &["closed", "reset"]);
}

/// A server whose graceful stop closes idle kept-alive connections at once loses the requests
/// that cross the close: about one per client per reload, as under the server's own reload.
/// Nothing else may fail (no refused connection, no bad answer), and no more than that.
fn assert_only_graceful_closes(kept: &Report, signals: u64, kinds: &[&str]) {
    for kind in kept.failures.keys() {
        assert!(
            kinds.contains(&kind.as_str()),
            "only connections the server closed: {}",
            kept.summary()
        );
    }
    assert!(
        kept.failed() <= 2 * 8 * signals,
        "at most about one per client per reload: {}",
        kept.summary()
    );
}

#[test]
fn a_broken_nginx_conf_fails_the_reload_with_nginxs_words_and_the_old_one_serves() {
    let files = tempfile::tempdir().unwrap();
    let port = free_port();
    let master = Master::spawn("nginx-broken", &nginx_yaml(files.path(), port));
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let template = files.path().join("nginx.conf.in");
    let good = std::fs::read_to_string(&template).unwrap();
    std::fs::write(&template, good.replace("access_log off;", "acces_log off;")).unwrap();
    let (code, out, err) = master.ctl(&["reload", "--json"]);
    assert_eq!(code, 1, "the reload fails: {out} {err}");
    let verdict: Value = serde_json::from_str(&out).unwrap();
    let said = verdict["output"].to_string();
    assert!(
        said.contains("[emerg]") && said.contains("acces_log"),
        "nginx's own error line in the verdict: {verdict}"
    );
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let answer = ask(&mut client);
    assert!(answer.contains("x-baton-generation: 1"), "{answer}");
}

/// Reloads every 200 ms for 6 s under 8 clients with fresh connections, then 8 kept-alive
/// clients: both reports and the number of reload requests sent.
fn reload_both_ways(master: &Master, port: u16, server: &str) -> (Report, Report, u64) {
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let addr = loopback(port);
    let mut runs = Vec::new();
    let mut signals = 0;
    for mode in [Mode::Fresh, Mode::KeepAlive] {
        let (report, sent) = master.reload_under_load(
            addr,
            mode,
            8,
            Duration::from_secs(6),
            Duration::from_millis(200),
        );
        eprintln!("{server}, {mode:?}: {} ({sent} SIGUSR2)", report.summary());
        assert!(report.ok > 500, "{mode:?}: real load: {}", report.summary());
        // The load followed the reloads. How many generations a kept-alive client meets
        // depends on the server closing its connections: CI saw exactly 5 for gunicorn.
        assert!(report.generations.len() >= 3, "{}", report.summary());
        signals += sent;
        runs.push(report);
    }
    master.verdict_of(signals);
    let reloads = master.assert_every_request_accounted_for(signals);
    eprintln!("{server}: {signals} requests carried out by {reloads} reloads");
    assert!(
        reloads > 5,
        "the reloads ran: {reloads} for {signals} requests"
    );
    let kept = runs.pop().unwrap();
    (runs.pop().unwrap(), kept, signals)
}

#[test]
fn uvicorn_under_baton_reloads_every_200ms_and_loses_only_what_its_shutdown_closes() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let master = Master::spawn("uvicorn-load", &uvicorn_yaml(dir.path(), port));
    let (fresh, kept, signals) = reload_both_ways(&master, port, "uvicorn");
    // uvicorn's shutdown (its server.py, `Server.shutdown`) closes every connection whose
    // request it has not read yet: idle kept-alive ones, as nginx's graceful stop does, and a
    // fresh one accepted in the last turn of its event loop: a reset if its request was in the
    // socket already, a plain close if not (CI saw both). That is uvicorn's, under any
    // supervisor: a few per reload at most.
    assert_only_graceful_closes(&fresh, signals, &["closed", "reset"]);
    assert_only_graceful_closes(&kept, signals, &["closed", "reset"]);
}

#[test]
fn a_broken_uvicorn_app_fails_the_reload_with_pythons_words_and_the_old_one_serves() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let master = Master::spawn("uvicorn-broken", &uvicorn_yaml(dir.path(), port));
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let app = dir.path().join("app.py");
    let good = std::fs::read_to_string(&app).unwrap();
    std::fs::write(
        &app,
        good.replace("import asyncio", "import asyncio_no_such_module"),
    )
    .unwrap();
    let (code, out, err) = master.ctl(&["reload", "--json"]);
    assert_eq!(code, 1, "the reload fails: {out} {err}");
    let verdict: Value = serde_json::from_str(&out).unwrap();
    assert!(
        verdict["output"]
            .to_string()
            .contains("No module named 'asyncio_no_such_module'"),
        "Python's own error in the verdict: {verdict}"
    );
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let answer = ask(&mut client);
    assert!(answer.contains("x-baton-generation: 1"), "{answer}");
}

#[test]
fn a_go_server_with_only_the_standard_library_reloads_every_200ms_without_losing_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let binary = go_hello(dir.path());
    let port = free_port();
    let master = Master::spawn("go-load", &go_yaml(&binary, port));
    let (fresh, kept, _) = reload_both_ways(&master, port, "go");
    // Its drain closes the listener, says `Connection: close` on every later answer and
    // closes idle connections only after a quiet grace: nothing lost, kept-alive or not.
    fresh.assert_lossless("");
    kept.assert_lossless("");
    assert!(
        kept.close_notices > 0,
        "the drain told clients: {}",
        kept.summary()
    );
}

#[test]
fn gunicorn_under_baton_is_ready_when_a_worker_has_loaded_the_app_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let master = Master::spawn("gunicorn-load", &gunicorn_yaml(dir.path(), port));
    let (fresh, kept, _) = reload_both_ways(&master, port, "gunicorn");
    fresh.assert_lossless("");
    // Its sync workers answer `Connection: close`: a kept-alive client reconnects each time.
    kept.assert_lossless("");

    // gunicorn's READY=1 comes as its arbiter boots, before a worker has loaded the app: an app
    // that takes 1.5 s to load is ready (and the old generation retired) only after that.
    let app = dir.path().join("app.py");
    let text = std::fs::read_to_string(&app).unwrap();
    std::fs::write(&app, format!("import time\ntime.sleep(1.5)\n{text}")).unwrap();
    let verdict = master.reload();
    assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
    let took = verdict["took_ms"].as_u64().unwrap();
    assert!(took >= 1500, "ready only once the app is loaded: {verdict}");
}

/// Under a real systemd with the packaged unit: `systemctl reload` of a broken `haproxy.cfg`
/// fails, HAProxy's own words in the unit's journal, and the old HAProxy serves on.
#[test]
fn under_systemd_a_broken_haproxy_cfg_fails_systemctl_reload_and_the_old_one_serves() {
    let name = "haproxy-unit";
    let dir = Systemd::workdir(name);
    let cfg = dir.join("haproxy.cfg");
    let good = std::fs::read_to_string(example("haproxy/haproxy.cfg")).unwrap();
    std::fs::write(&cfg, &good).unwrap();
    let config = dir.join("baton.yaml");
    let yaml = haproxy_yaml(&cfg, 8080).replace("{dir}", &dir.display().to_string());
    std::fs::write(&config, yaml).unwrap();
    let sd = Systemd::boot(name, &[("baton.service", service_unit(&config))]);
    sd.systemctl_ok(&["start", "baton.service"]);
    let serves = |generation: &str| {
        let out = sd
            .net_command(std::path::Path::new("/bin/bash"))
            .args([
                "-c",
                "exec 3<>/dev/tcp/127.0.0.1/8080; printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3; timeout 5 cat <&3",
            ])
            .output()
            .unwrap();
        let answer = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            answer.contains(&format!("x-baton-generation: {generation}")),
            "generation {generation} serves: {answer}"
        );
    };
    serves("1");

    std::fs::write(&cfg, good.replace("bind fd@3", "bind fd@3 no-such-keyword")).unwrap();
    let reload = sd.systemctl(&["reload", "baton.service"]);
    assert!(!reload.status.success(), "systemctl reload must fail");
    // `baton reload` (the unit's ExecReload) prints the verdict with the worker's last lines,
    // each after `| `; the journal has them.
    let journal = sd.journal("baton.service");
    assert!(
        journal
            .lines()
            .any(|l| l.contains("| [ALERT]") && l.contains("unknown keyword 'no-such-keyword'")),
        "HAProxy's own error lines in the reload's verdict: {journal}"
    );
    assert_eq!(sd.show("baton.service", "ActiveState"), "active");
    serves("1");

    std::fs::write(&cfg, &good).unwrap();
    sd.systemctl_ok(&["reload", "baton.service"]);
    serves("3");
}
