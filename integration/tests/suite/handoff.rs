//! Connection handoff (issue 30, `docs/protocol.md`): a draining worker hands its kept-alive
//! connections to the serving generation, which answers the next request on the same
//! connection. Against the same load without handoff, where each reload closes them.

use std::time::Duration;

use baton_integration::load::{Mode, Report};
use baton_integration::loopback;
use baton_integration::wsclient::WsLoad;
use baton_integration::{Master, TestConfig, event, eventually};

const CLIENTS: usize = 8;
const RUN: Duration = Duration::from_secs(6);
const RELOAD_EVERY: Duration = Duration::from_millis(300);

/// `processes` ws-workers (with `args`) on a free port, and the port.
fn ws_config(processes: usize, args: &[&str]) -> (u16, TestConfig) {
    let (port, mut config) = TestConfig::hello_on_a_free_port(processes);
    config.command = baton_integration::binaries().ws_worker.clone();
    config.args = args.iter().map(|a| a.to_string()).collect();
    (port, config)
}

/// A master of `processes` ws-workers (with `args`) and `clients` WebSocket clients on it,
/// every one connected.
fn ws_master(name: &str, processes: usize, args: &[&str], clients: usize) -> (Master, WsLoad) {
    let (port, config) = ws_config(processes, args);
    let master = Master::start(name, &config);
    (master, WsLoad::connected_clients(loopback(port), clients))
}

/// A reload that succeeds, and the end of generation 1 (its drain, its handoff) after it.
fn reload_until_generation_1_is_gone(master: &Master) {
    let verdict = master.reload();
    assert_eq!(verdict["event"], event::RELOAD_SUCCEEDED, "{verdict}");
    master.wait_event(event::GENERATION_EXITED, Duration::from_secs(30), |e| {
        e["generation"] == 1
    });
}

/// The SDK's handoff fault points armed in a worker (`crates/baton-worker/src/faults.rs`).
fn faults(spec: &str) -> Vec<(String, String)> {
    vec![("BATON_WORKER_FAILPOINTS".into(), spec.into())]
}

/// One ws-worker with `old_faults` serving `clients` WebSockets, reloaded to one with
/// `new_faults` (the SDK's fault points of each generation's worker); returns once the old one is gone (the clients still running).
fn handoff_with_faults(
    name: &str,
    (old_faults, new_faults): (&str, &str),
    clients: usize,
    worker_extra: &[&str],
) -> (Master, WsLoad) {
    let (port, mut config) = ws_config(1, &[]);
    config
        .worker_extra
        .extend(worker_extra.iter().map(|l| l.to_string()));
    config.env = faults(old_faults);
    let master = Master::start(name, &config);
    let load = WsLoad::connected_clients(loopback(port), clients);
    config.env = faults(new_faults);
    master.write_config(&config.yaml());
    reload_until_generation_1_is_gone(&master);
    (master, load)
}

/// What the old generation's worker reported handing off (its `handoff_done`).
fn old_worker_handoff(master: &Master) -> serde_json::Value {
    master
        .wait_event(event::HANDOFF_DONE, Duration::from_secs(10), |e| {
            e["worker"] == 1
        })
        .1
}

fn keep_alive_under_reloads(name: &str, handoff: bool) -> (Master, Report) {
    let (port, mut config) = TestConfig::hello_on_a_free_port(2);
    if handoff {
        config.args = vec!["--handoff".into()];
    }
    let master = Master::start(name, &config);
    let addr = loopback(port);
    let (report, _) = master.reload_under_load(addr, Mode::KeepAlive, CLIENTS, RUN, RELOAD_EVERY);
    (master, report)
}

/// The value of one sample of the master's metrics.
fn metric(master: &Master, sample: &str) -> u64 {
    let (code, out, err) = master.ctl(&["metrics"]);
    assert_eq!(code, 0, "{err}");
    out.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {sample} in the metrics:\n{out}"))
}

#[test]
fn kept_alive_connections_cross_every_reload_on_the_same_connection() {
    let (master, report) = keep_alive_under_reloads("handoff-keepalive", true);
    report.assert_lossless_with("keep-alive with handoff", 500);
    assert!(
        report.generations.len() > 5,
        "the same connections were served by many generations: {}",
        report.summary()
    );
    // Not one client had to reconnect: each kept its one connection through every reload.
    assert_eq!(report.connections, CLIENTS as u64, "{}", report.summary());
    assert_eq!(report.close_notices, 0, "{}", report.summary());
    let links = master.events(event::HANDOFF_LINKS);
    assert!(!links.is_empty(), "no handoff links were made");
    // What the givers reported: every connection offered was taken (the last giver may still
    // be at it as the load ends).
    let sample = |outcome: &str| {
        metric(
            &master,
            &format!("baton_connections_handed_off_total{{outcome=\"{outcome}\"}}"),
        )
    };
    let (offered, adopted) = eventually(
        Duration::from_secs(10),
        "every connection offered taken, in the metrics",
        || {
            let (offered, adopted, kept) = (sample("offered"), sample("adopted"), sample("kept"));
            (offered > 0 && offered == adopted && kept == 0).then_some((offered, adopted))
        },
    );
    eprintln!("handed off: {adopted} of {offered} connections offered");
}

#[test]
fn without_handoff_the_same_clients_reconnect_at_each_reload() {
    let (master, report) = keep_alive_under_reloads("no-handoff-keepalive", false);
    eprintln!("keep-alive without handoff: {}", report.summary());
    report.assert_lossless("");
    assert!(
        report.connections > CLIENTS as u64,
        "drains close kept-alive connections (politely): {}",
        report.summary()
    );
    assert!(report.close_notices > 0, "{}", report.summary());
    assert!(master.events(event::HANDOFF_LINKS).is_empty());
}

/// WebSocket clients, each sending a numbered message every 100 ms and checking its echo,
/// while the master reloads every second: none is disconnected, none loses, repeats or
/// reorders a message. (The benchmark runs 10 000 of them: `reload-bench --only websockets`.)
#[test]
fn websockets_cross_every_reload_with_every_message_echoed_once_in_order() {
    const CLIENTS: usize = 200;
    let (master, load) = ws_master("handoff-websockets", 2, &[], CLIENTS);
    for _ in 0..6 {
        let verdict = master.reload();
        assert_eq!(verdict["event"], event::RELOAD_SUCCEEDED, "{verdict}");
        std::thread::sleep(Duration::from_secs(1)); // the reload cadence under test
    }
    let report = load.stop_and_report();
    assert_eq!(report.connected, CLIENTS, "{}", report.summary());
    report.assert_unbroken("WebSockets with handoff");
    assert!(report.sent > CLIENTS as u64 * 30, "{}", report.summary());
    let adopted = master.events(event::HANDOFF_DONE);
    assert!(!adopted.is_empty(), "no giver reported a handoff");
}

/// `handoff_rate` is a draining worker's, shared among its links: with two new workers each
/// link gets half (the master says so in `handoff_links`), and every client is served on.
#[test]
fn the_handoff_rate_is_shared_among_a_giver_s_links() {
    const CLIENTS: usize = 40;
    let (port, mut config) = ws_config(2, &[]);
    config.worker_extra.push("handoff_rate: 101".into());
    let master = Master::start("handoff-rate", &config);
    let load = WsLoad::connected_clients(loopback(port), CLIENTS);
    reload_until_generation_1_is_gone(&master);
    let links = master.events(event::HANDOFF_LINKS);
    assert_eq!(links.len(), 2, "{links:?}");
    for link in &links {
        assert_eq!(link["takers"], 2, "{link}");
        // 101 over 2 links: 51 each (rounded up, so the giver's rate is never below it).
        assert_eq!(link["per_second"], 51, "{link}");
    }
    load.stop_and_report()
        .assert_unbroken("WebSockets handed off at handoff_rate 101");
    let done = master.events(event::HANDOFF_DONE);
    let adopted: u64 = done.iter().map(|e| e["adopted"].as_u64().unwrap()).sum();
    assert_eq!(adopted, CLIENTS as u64, "{done:?}");
}

/// A worker drained by a bare SIGTERM (an operator's `kill`, not the master's drain: no
/// handoff link will come) does not wait for links for ever: 2 s after the signal it takes
/// the links it has (none), closes its WebSockets with 1012 and exits.
#[test]
fn a_worker_drained_by_a_bare_sigterm_closes_its_websockets_with_1012() {
    const CLIENTS: usize = 10;
    let (master, load) = ws_master("handoff-bare-sigterm", 1, &[], CLIENTS);
    let worker = master
        .children()
        .into_iter()
        .find(|p| Some(*p) != master.guard())
        .expect("the worker");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    eventually(Duration::from_secs(30), "every client closed", || {
        (load.ended() == CLIENTS).then_some(())
    });
    eventually(Duration::from_secs(30), "the worker gone", || {
        (!baton_integration::procfs::alive(worker)).then_some(())
    });
    load.stop_and_report()
        .assert_all_closed_with_1012("a worker drained by a bare SIGTERM");
}

/// The same clients against the same server taking no part in handoff: at the reload, every
/// connection is closed with 1012 (Service Restart), counted by each client.
#[test]
fn without_handoff_every_websocket_is_closed_with_1012_at_a_reload() {
    const CLIENTS: usize = 50;
    let (master, load) = ws_master("no-handoff-websockets", 2, &["--no-handoff"], CLIENTS);
    reload_until_generation_1_is_gone(&master);
    let report = load.stop_and_report();
    report.assert_all_closed_with_1012("WebSockets without handoff");
}

/// Without handoff, `--close-window-ms` spreads the 1012 closes over the window (the SDK's
/// `Pacer`), so the clients do not all come back in the same instant: against all closed at
/// once, the most closes within any 200 ms falls by more than half.
#[test]
fn a_paced_drain_spreads_the_closes_over_its_window() {
    const CLIENTS: usize = 60;
    let closes = |name: &str, window_ms: &str| {
        let (master, load) = ws_master(
            name,
            1,
            &["--no-handoff", "--close-window-ms", window_ms],
            CLIENTS,
        );
        master.reload();
        master.wait_event(event::GENERATION_EXITED, Duration::from_secs(30), |e| {
            e["generation"] == 1
        });
        let report = load.stop_and_report();
        report.assert_all_closed_with_1012(name);
        report
    };
    let at_once = closes("closes-at-once", "0");
    let paced = closes("closes-paced", "3000");
    let window = Duration::from_millis(200);
    let (burst, spread) = (at_once.peak_ends(window), paced.peak_ends(window));
    let span =
        |r: &baton_integration::wsclient::WsReport| *r.ended_at.last().unwrap() - r.ended_at[0];
    eprintln!(
        "1012 closes: at once, {burst} within 200 ms (over {:?}); paced over 3 s, at most {spread} within 200 ms (over {:?})",
        span(&at_once),
        span(&paced)
    );
    assert!(spread * 2 < burst, "paced {spread}, at once {burst}");
    assert!(
        span(&paced) >= Duration::from_millis(2000),
        "{:?}",
        span(&paced)
    );
}

/// A storm: a reload every 150 ms while WebSockets are being handed over (reloads queue and
/// coalesce, generations hand over to generations that are themselves about to drain): still
/// no client disconnected, no message lost, repeated or out of order.
#[test]
fn a_storm_of_reloads_during_handoffs_disconnects_nobody() {
    const CLIENTS: usize = 100;
    let (master, load) = ws_master("handoff-storm", 2, &[], CLIENTS);
    let start = std::time::Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_secs(5) {
        master.signal(nix::sys::signal::Signal::SIGUSR2);
        sent += 1;
        // Each signal once the master took the one before (standard signals do not queue).
        eventually(
            Duration::from_secs(10),
            "the master to take the signal",
            || (master.events(event::RELOAD_REQUESTED).len() >= sent).then_some(()),
        );
        std::thread::sleep(Duration::from_millis(150)); // the storm's cadence, not a wait
    }
    master.verdict_of(sent as u64);
    let report = load.stop_and_report();
    report.assert_unbroken(&format!(
        "WebSockets through {sent} reload requests 150 ms apart"
    ));
}

/// The master SIGKILLed while its workers hand WebSockets over: nothing depends on it (the
/// links are between workers), each connection ends served or closed with 1012 by the worker
/// that holds it when the workers drain for the master's death: none is cut without a close.
#[test]
fn a_master_killed_mid_handoff_leaves_every_websocket_served_or_closed_with_1012() {
    const CLIENTS: usize = 100;
    let (master, load) = ws_master("handoff-master-killed", 2, &[], CLIENTS);
    master.signal(nix::sys::signal::Signal::SIGUSR2);
    // The handoff begins once generation 2 serves: the master dies then.
    master.wait_event(event::HANDOFF_LINKS, Duration::from_secs(30), |_| true);
    master.signal(nix::sys::signal::Signal::SIGKILL);
    // Every worker drains for the master's death; the clients see the end of each connection.
    eventually(Duration::from_secs(60), "every connection ended", || {
        (load.ended() == CLIENTS).then_some(())
    });
    let report = load.stop_and_report();
    // Ended, each with a close frame: 1012 from the worker that held it.
    report.assert_all_closed_with_1012("WebSockets, master killed mid-handoff");
}

/// The old worker dies in the middle of its handoff (the SDK's fault point: SIGKILLed right
/// after the packet that carries its 6th offer went out, before any answer to it; offers go in
/// batches, so they are spaced here, 20 ms apart, for most not to be out): what it had
/// offered is the taker's, which serves it on (the offers in flight included: the taker
/// prepared them and the link's end, with no abort on it, commits them); the connections it had
/// not offered die with it, as a crash's do, each end seen by its client. None is served twice,
/// none is lost silently: every message of a client that goes on is echoed once, in order, and
/// a client that ended lost only the one message it was waiting for.
#[test]
fn an_old_worker_dying_mid_offer_leaves_what_it_offered_to_the_taker() {
    const CLIENTS: usize = 40;
    let faults = ("handoff.giver.offered=5*off->return", "");
    let (master, load) = handoff_with_faults(
        "handoff-giver-dies",
        faults,
        CLIENTS,
        // 20 ms apart: the offers go in packets of one or a few, not all in one.
        &["handoff_rate: 50"],
    );
    let killed = master.events(event::WORKER_EXITED);
    assert!(
        killed
            .iter()
            .any(|e| e["generation"] == 1 && e["status"].to_string().contains("SIGKILL")),
        "the old worker died at its fault point: {killed:?}"
    );
    eventually(
        Duration::from_secs(30),
        "the first connection ended",
        || (load.ended() > 0).then_some(()),
    );
    // The connections handed off go on: ten more messages each, echoed by the taker.
    std::thread::sleep(Duration::from_secs(1)); // the survivors' time to show it, not a wait
    let report = load.stop_and_report();
    eprintln!("the giver killed after its 6th offer: {}", report.summary());
    let ended = report.disconnects();
    let survivors = CLIENTS as u64 - ended;
    assert!(
        (6..CLIENTS as u64).contains(&survivors),
        "the 6 offered (at least) survive, the rest end: {}",
        report.summary()
    );
    assert_eq!(report.wrong, 0, "{}", report.summary());
    assert_eq!(
        report.echoed,
        report.sent - ended,
        "each ended client lost only its last message: {}",
        report.summary()
    );
}

/// The new worker dies between `prepared` and `commit` (SIGKILLed right after its first
/// `prepared`; the giver holds its commit back 500 ms): the commit cannot be sent, so that
/// connection stays with the old worker, as does every other (the taker is gone); the old
/// worker closes them all with 1012 as it drains. Its report counts them kept.
#[test]
fn a_new_worker_dying_between_prepared_and_commit_leaves_the_connection_with_the_old_one() {
    const CLIENTS: usize = 30;
    let faults = (
        "handoff.giver.commit=1*sleep(500)",
        "handoff.taker.prepared=return",
    );
    let (master, load) = handoff_with_faults("handoff-taker-dies", faults, CLIENTS, &[]);
    let report = load.stop_and_report();
    report.assert_all_closed_with_1012("the taker killed after its first prepared");
    let done = old_worker_handoff(&master);
    assert_eq!(done["adopted"], 0, "{done}");
    assert_eq!(done["kept"], done["offered"], "{done}");
    assert!(done["offered"].as_u64().unwrap() >= 1, "{done}");
    let history = history_of(&master);
    assert_eq!(history[&2], done_counts(&done), "{history:?}");
}

/// A new worker refuses every offer (the SDK's fault point): each connection stays with the
/// old worker, which closes it with 1012 as it drains; its report counts them all kept.
#[test]
fn offers_a_new_worker_refuses_stay_with_the_old_worker() {
    const CLIENTS: usize = 30;
    let faults = ("", "handoff.taker.offer=return");
    let (master, load) = handoff_with_faults("handoff-refused", faults, CLIENTS, &[]);
    let report = load.stop_and_report();
    report.assert_all_closed_with_1012("every offer refused");
    let done = old_worker_handoff(&master);
    assert_eq!(done["offered"], CLIENTS as u64, "{done}");
    assert_eq!(done["kept"], CLIENTS as u64, "{done}");
    assert_eq!(done["adopted"], 0, "{done}");
    let history = history_of(&master);
    assert_eq!(history[&2], done_counts(&done), "{history:?}");
}

/// A reload fails while the previous one's handoff runs (its commits slowed by a fault point:
/// the link's thread sends them one after another, 10 ms each, so it lasts about a second): the failed generation never takes part, the handoff goes on,
/// and no client is disconnected or loses, repeats or reorders a message.
#[test]
fn a_reload_failing_mid_handoff_disturbs_no_connection() {
    const CLIENTS: usize = 100;
    let (port, mut config) = ws_config(2, &[]);
    config.env = faults("handoff.giver.commit=sleep(10)");
    let master = Master::start("handoff-failed-reload", &config);
    let load = WsLoad::connected_clients(loopback(port), CLIENTS);
    config.env.clear();
    master.write_config(&config.yaml());
    master.signal(nix::sys::signal::Signal::SIGUSR2);
    master.wait_event(event::HANDOFF_LINKS, Duration::from_secs(30), |_| true);
    // The next generation cannot start: its workers exit at once (an unknown flag).
    config.args = vec!["--no-such-flag".into()];
    master.write_config(&config.yaml());
    let (code, out, err) = master.ctl(&["reload", "--json"]);
    assert_ne!(code, 0, "the reload fails: {out}{err}");
    let failed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(failed["ok"], false, "{failed}");
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("before it was ready"),
        "{failed}"
    );
    let handing_off = master.events(event::HANDOFF_DONE).len() < 2;
    // `baton status` shows the draining generation's handoff as it goes.
    let progress = eventually(Duration::from_secs(10), "the handoff in the status", || {
        let (_, out, _) = master.ctl(&["status", "--json"]);
        let status: serde_json::Value = serde_json::from_str(&out).ok()?;
        let draining = status["generations"]
            .as_array()?
            .iter()
            .find(|g| g["generation"] == 1)?
            .clone();
        (draining["handoff"]["adopted"].as_u64()? > 0).then_some(draining)
    });
    eprintln!("status while handing off: {}", progress["handoff"]);
    master.wait_event(event::GENERATION_EXITED, Duration::from_secs(30), |e| {
        e["generation"] == 1
    });
    let report = load.stop_and_report();
    report.assert_unbroken("a reload failing mid-handoff");
    assert!(
        handing_off,
        "the failed reload came while the handoff still ran"
    );
    let done = master.events(event::HANDOFF_DONE);
    let adopted: u64 = done.iter().map(|e| e["adopted"].as_u64().unwrap()).sum();
    assert_eq!(adopted, CLIENTS as u64, "{done:?}");
    // `baton history`: the reload that started generation 2 moved them all; the failed one none.
    let history = history_of(&master);
    assert_eq!(history[&2]["adopted"], CLIENTS as u64, "{history:?}");
    assert!(history[&3].is_null(), "{history:?}");
}

/// The counts of a `handoff_done` event, as `baton history --json` shows them.
fn done_counts(done: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "offered": done["offered"],
        "adopted": done["adopted"],
        "kept": done["kept"],
    })
}

/// Each reload's handoff in `baton history --json`, by the generation it started.
fn history_of(master: &Master) -> std::collections::BTreeMap<u64, serde_json::Value> {
    let (code, out, err) = master.ctl(&["history", "--json"]);
    assert_eq!(code, 0, "{err}");
    let records: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    records
        .into_iter()
        .map(|r| (r["generation"].as_u64().unwrap(), r["handoff"].clone()))
        .collect()
}

/// `baton upgrade` keeps each worker's part in handoff (the upgrade state carries it): the
/// next reload hands every WebSocket over as one before the upgrade would, and `baton history`
/// counts them.
#[test]
fn after_an_upgrade_the_next_reload_still_hands_every_websocket_over() {
    const CLIENTS: usize = 50;
    let (master, load) = ws_master("handoff-upgrade", 2, &[], CLIENTS);
    let baton = baton_integration::binaries().baton.display().to_string();
    let (code, out, err) = master.ctl(&["upgrade", "--binary", &baton]);
    assert_eq!(code, 0, "the upgrade: {out}{err}");
    reload_until_generation_1_is_gone(&master);
    let report = load.stop_and_report();
    report.assert_unbroken("a reload after an upgrade");
    assert_eq!(history_of(&master)[&2]["adopted"], CLIENTS as u64);
}
