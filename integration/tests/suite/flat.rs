//! Flat over time (docs/reliability.md): after 1000 reloads and 100 self-upgrades, the master's
//! descriptors, threads, memory and worker processes are back at their baseline.

use baton_integration::event;
use std::time::Duration;

use baton_integration::{Master, TestConfig, next_baton, procfs};

/// What the master holds: descriptors, threads, resident KiB, worker processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Footprint {
    fds: usize,
    threads: u64,
    rss_kib: u64,
    workers: usize,
}

fn threads(pid: u32) -> u64 {
    procfs::status_number(pid, "Threads").unwrap_or(0)
}

fn footprint(master: &Master) -> Footprint {
    Footprint {
        fds: master.fd_count(),
        threads: threads(master.pid()),
        rss_kib: procfs::rss_kib(master.pid()),
        workers: master.children().len(),
    }
}

/// Waits until the old generations are gone and the descriptors, threads and workers are back
/// where `base` had them (the blocking pool's idle threads end on their own); the footprint
/// then.
fn settled(master: &Master, base: Footprint, what: &str) -> Footprint {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = footprint(master);
        if now.fds == base.fds && now.threads <= base.threads && now.workers == base.workers {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {now:?}, baseline {base:?}; descriptors now: {:?}",
            procfs::fds(master.pid())
        );
        std::thread::sleep(Duration::from_millis(100)); // polling the footprint, bounded
    }
}

#[test]
fn a_thousand_reloads_and_a_hundred_upgrades_leave_the_master_where_it_started() {
    let (_, mut config) = TestConfig::hello_on_a_free_port(2);
    config.max_draining = 16;
    let master = Master::start("flat", &config);
    // A first reload, upgrade and reload pay for what a program makes once (the history's
    // room, the allocator's arenas, the spawner's 64 reserved descriptor slots, made at the
    // first spawn of each program): the baseline is taken after them.
    assert_eq!(master.reload()["event"], "reload_succeeded");
    let next = next_baton().display().to_string();
    let (code, out, err) = master.ctl(&["upgrade", "--binary", &next]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(master.reload()["event"], "reload_succeeded");
    std::thread::sleep(Duration::from_millis(500)); // let the loop go idle before the baseline
    let base = footprint(&master);
    eprintln!("baseline: {base:?}");

    for i in 0..1000 {
        let verdict = master.reload();
        assert_eq!(
            verdict["event"], "reload_succeeded",
            "reload {i}: {verdict}"
        );
    }
    let after_reloads = settled(&master, base, "the footprint after 1000 reloads");
    eprintln!("after 1000 reloads: {after_reloads:?}");

    let builds = [
        next.clone(),
        baton_integration::binaries().baton.display().to_string(),
    ];
    for i in 0..100 {
        let (code, out, err) = master.ctl(&["upgrade", "--binary", &builds[i % 2]]);
        assert_eq!(code, 0, "upgrade {i}: {out}{err}");
    }
    // The last program reserves its slots at its first spawn, as the baseline's did.
    assert_eq!(master.reload()["event"], "reload_succeeded");
    let after_upgrades = settled(&master, base, "the footprint after 100 upgrades");
    eprintln!("after 100 upgrades: {after_upgrades:?}");

    for (what, now) in [("reloads", after_reloads), ("upgrades", after_upgrades)] {
        // Memory: within 25 % or 4 MiB of the baseline, whichever is more (the allocator keeps
        // some pages; a leak of a few KiB per reload would be 10 MiB here).
        let margin = (base.rss_kib / 4).max(4096);
        assert!(
            now.rss_kib <= base.rss_kib + margin,
            "after the {what}: {} KiB resident, baseline {} KiB",
            now.rss_kib,
            base.rss_kib
        );
    }
    // Every request got its verdict, none lost among a thousand.
    assert_eq!(master.events(event::RELOAD_SUCCEEDED).len(), 1003);
}
