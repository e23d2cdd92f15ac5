//! A randomized torture run (issue 20, part 3), seeded and reproducible: reloads by signal and
//! by `baton reload`, configuration changes (listeners added and removed, the number of workers
//! changed), workers crashed and hung, slow drains (a worker that ignores its drain request is
//! always there), rude clients, control clients that hang up mid-request or send half a frame,
//! and `baton upgrade` to another build, all under load.
//!
//! Checked at every step: the master runs (the same pid: upgrades keep it) and its processes
//! stay bounded. At the end: back to the first configuration, the next reload succeeds, the
//! master holds its first descriptors and workers and no zombie, every reload request was
//! covered once and every reload had exactly one verdict, and the load lost only requests that
//! crashed or hung workers held.
//!
//! The suite runs it for 20 s. The long run, by hand:
//!
//! ```text
//! BATON_TORTURE_SECONDS=600 cargo test -p baton-integration --test suite torture -- --nocapture
//! ```
//!
//! Every run prints its seed; a failure prints the seed and the steps up to it. Replay with
//! `BATON_TORTURE_SEED=<seed>`, and `BATON_TORTURE_STEPS=<n>` to stop after step `n`.

use baton_integration::event;
use baton_integration::loopback;
use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use baton_integration::load::Mixed;
use baton_integration::procfs::{self, zombies};
use baton_integration::{Master, binaries, eventually, free_port, next_baton};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const CLIENTS: usize = 3;
const MAX_WEB: usize = 4;
const MAX_DRAINING: usize = 2;

/// splitmix64: small, good enough, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone)]
enum Step {
    /// SIGUSR2.
    Signal,
    /// `baton reload`, waiting for its verdict.
    Reload,
    /// `web` gets this many workers, then a reload.
    Processes(usize),
    /// The listener `extra` is added (or removed), then a reload.
    Extra(bool),
    /// A web worker SIGKILLed.
    Crash,
    /// A web worker stopped (SIGSTOP) for this long.
    Hang(Duration),
    /// A client sends half a request and hangs up.
    RudeClient,
    /// `baton reload` killed before its verdict.
    ControlHangup,
    /// Half a control frame, then hang up.
    ControlGarbage,
    /// `baton upgrade` to the other build.
    Upgrade,
}

#[derive(Debug, Clone, Copy)]
struct Shape {
    web: usize,
    extra: Option<u16>,
}

fn config(port: u16, shape: Shape) -> String {
    baton_integration::web_and_stubborn_yaml(
        port,
        shape.extra,
        shape.web,
        ("10s", "3s"),
        &format!("  max_draining: {MAX_DRAINING}\n"),
    )
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The run so far, for the report of a failure.
struct Journal {
    seed: u64,
    started: Instant,
    steps: Vec<(Duration, Step)>,
}

impl Journal {
    fn fail(&self, what: &str) -> ! {
        let mut report = format!(
            "torture run failed: {what}\nseed {} (replay: BATON_TORTURE_SEED={} BATON_TORTURE_STEPS={}); the steps:\n",
            self.seed,
            self.seed,
            self.steps.len()
        );
        for (i, (at, step)) in self.steps.iter().enumerate() {
            report += &format!("  {:>4} {:>8.3} s  {step:?}\n", i + 1, at.as_secs_f64());
        }
        panic!("{report}");
    }

    fn check(&self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.fail(&what());
        }
    }
}

fn pick(rng: &mut Rng, shape: Shape) -> Step {
    match rng.below(100) {
        0..=24 => Step::Signal,
        25..=34 => Step::Reload,
        35..=44 => Step::Processes(1 + rng.below(MAX_WEB as u64) as usize),
        45..=52 => Step::Extra(shape.extra.is_none()),
        53..=62 => Step::Crash,
        63..=69 => Step::Hang(Duration::from_millis(200 + rng.below(1300))),
        70..=79 => Step::RudeClient,
        80..=85 => Step::ControlHangup,
        86..=91 => Step::ControlGarbage,
        _ => Step::Upgrade,
    }
}

/// The master's web workers now (its children but the stubborn one and the guard).
fn web_workers(master: &Master) -> Vec<u32> {
    master
        .children()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.starts_with(binaries().hello_worker.as_os_str().as_encoded_bytes())
            })
        })
        .collect()
}

/// Whether `pid` runs (exists and is not a zombie).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("State:"))
            .is_some_and(|state| !state.trim_start().starts_with('Z'))
    })
}

#[test]
fn torture() {
    let seed = env_u64("BATON_TORTURE_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let seconds = env_u64("BATON_TORTURE_SECONDS").unwrap_or(20);
    let max_steps = env_u64("BATON_TORTURE_STEPS").unwrap_or(u64::MAX);
    eprintln!("torture: seed {seed}, {seconds} s");
    let mut rng = Rng(seed);
    let builds = [
        next_baton().display().to_string(),
        binaries().baton.display().to_string(),
    ];
    let port = free_port();
    let first = Shape {
        web: 2,
        extra: None,
    };
    let master = Master::spawn("torture", &config(port, first));
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let pid = master.pid();
    // What a first reload and upgrade make once, paid before the baseline (see flat.rs).
    for args in [
        vec!["reload"],
        vec!["upgrade", "--binary", &builds[0]],
        vec!["reload"],
    ] {
        let (code, out, err) = master.ctl(&args);
        assert_eq!(code, 0, "{args:?}: {out}{err}");
    }
    let settled = |journal: &Journal, fds: Option<usize>| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = (
                master.children().len(),
                zombies(pid).len(),
                master.fd_count(),
            );
            if now.0 == first.web + 1 && now.1 == 0 && fds.is_none_or(|f| f == now.2) {
                return now.2;
            }
            journal.check(Instant::now() < deadline, || {
                format!(
                    "not settled: (workers, zombies, descriptors) {now:?}, want ({}, 0, {fds:?}); descriptors: {:?}",
                    first.web + 1,
                    procfs::fds(pid)
                )
            });
            std::thread::sleep(Duration::from_millis(100)); // polling a condition, bounded
        }
    };
    let mut journal = Journal {
        seed,
        started: Instant::now(),
        steps: Vec::new(),
    };
    let baseline = settled(&journal, None);
    let addr = loopback(port);
    let load = Mixed::start(addr, CLIENTS);
    let mut shape = first;
    let mut upgrades = 0;
    let (mut crashes, mut hangs) = (0u64, 0u64);
    let mut continues = Vec::new();
    let bound = (MAX_WEB + 1) * (MAX_DRAINING + 2) + 2;
    while journal.started.elapsed() < Duration::from_secs(seconds)
        && (journal.steps.len() as u64) < max_steps
    {
        let step = pick(&mut rng, shape);
        journal
            .steps
            .push((journal.started.elapsed(), step.clone()));
        match step {
            Step::Signal => master.signal(Signal::SIGUSR2),
            Step::Reload => {
                let (code, out, err) = master.ctl(&["reload"]);
                // A crash or a hang in the new generation may fail it: a verdict either way.
                journal.check(code == 0 || code == 1, || {
                    format!("baton reload: {code}: {out}{err}")
                });
            }
            Step::Processes(n) => {
                shape.web = n;
                master.write_config(&config(port, shape));
                master.signal(Signal::SIGUSR2);
            }
            Step::Extra(add) => {
                shape.extra = add.then(free_port);
                master.write_config(&config(port, shape));
                master.signal(Signal::SIGUSR2);
            }
            Step::Crash | Step::Hang(_) => {
                let web = web_workers(&master);
                if !web.is_empty() {
                    let victim = Pid::from_raw(web[rng.below(web.len() as u64) as usize] as i32);
                    if let Step::Hang(d) = step {
                        if kill(victim, Signal::SIGSTOP).is_ok() {
                            hangs += 1;
                            continues.push(std::thread::spawn(move || {
                                std::thread::sleep(d); // the hang's length: a duration, not a wait
                                let _ = kill(victim, Signal::SIGCONT);
                            }));
                        }
                    } else if kill(victim, Signal::SIGKILL).is_ok() {
                        crashes += 1;
                    }
                }
            }
            Step::RudeClient => {
                if let Ok(mut c) = TcpStream::connect(addr) {
                    let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: tor");
                }
            }
            Step::ControlHangup => {
                let mut client = master.ctl_spawn(&["reload"]);
                std::thread::sleep(Duration::from_millis(rng.below(50))); // how soon it hangs up
                let _ = client.kill();
                let _ = client.wait();
            }
            Step::ControlGarbage => {
                if let Ok(mut c) = std::os::unix::net::UnixStream::connect(master.socket()) {
                    let _ = c.write_all(&[0, 0, 1]);
                }
            }
            Step::Upgrade => {
                upgrades += 1;
                let (code, out, err) = master.ctl(&["upgrade", "--binary", &builds[upgrades % 2]]);
                // Refused while a reload runs ("cannot upgrade now"), or done.
                journal.check(code == 0 || err.contains("cannot upgrade now"), || {
                    format!("baton upgrade: {code}: {out}{err}")
                });
            }
        }
        journal.check(running(pid), || "the master is gone".into());
        let live = master.children().len();
        journal.check(live <= bound, || {
            format!("{live} processes, more than {bound}")
        });
        std::thread::sleep(Duration::from_millis(50 + rng.below(200))); // the cadence: a duration
    }
    for c in continues {
        c.join().unwrap();
    }
    // Back to the first configuration: the next reload succeeds and the master is where it was.
    master.write_config(&config(port, first));
    let (code, out, err) = master.ctl(&["reload"]);
    journal.check(code == 0, || format!("the last reload: {out}{err}"));
    settled(&journal, Some(baseline));
    let (fresh, kept) = load.finish();
    let steps = journal.steps.len();
    eprintln!(
        "torture: seed {seed}: {steps} steps in {:?} ({crashes} crashes, {hangs} hangs, {upgrades} upgrades); fresh {} / kept-alive {}",
        journal.started.elapsed(),
        fresh.summary(),
        kept.summary()
    );
    let requested = master.events(event::RELOAD_REQUESTED).len();
    eventually(
        Duration::from_secs(30),
        "every reload request covered",
        || {
            let covered: usize = master
                .events(event::RELOAD_STARTED)
                .iter()
                .map(|v| v["covers"].as_str().unwrap_or("").split(", ").count())
                .sum::<usize>()
                + master.events(event::RELOAD_REJECTED).len();
            (covered >= requested).then_some(())
        },
    );
    let mut covered = BTreeSet::new();
    let mut started = BTreeSet::new();
    for v in master.events(event::RELOAD_STARTED) {
        started.insert(v["reload"].as_u64().unwrap());
        for r in v["covers"].as_str().unwrap().split(", ") {
            journal.check(covered.insert(r.to_string()), || {
                format!("request {r} covered twice")
            });
        }
    }
    let failed = master.assert_one_verdict_per_reload(&started);
    eprintln!(
        "torture: {requested} reload requests, {} reloads, {failed} failed",
        started.len()
    );
    // A crashed worker loses what it held; a hung one may be retired and killed while stopped.
    let allowed = (crashes + hangs) * 2 * CLIENTS as u64;
    journal.check(fresh.failed() + kept.failed() <= allowed, || {
        format!(
            "{} requests failed, more than {allowed} for {crashes} crashes and {hangs} hangs: {} / {}",
            fresh.failed() + kept.failed(),
            fresh.summary(),
            kept.summary()
        )
    });
    journal.check(fresh.ok > 0 && kept.ok > 0, || "the load ran".into());
}
