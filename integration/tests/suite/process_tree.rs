//! The whole process tree (issue 15, item 5): a worker's child that left its process group
//! (`setsid`) ends with the worker's generation at its drain deadline, because the generation's
//! workers run in a cgroup of their own; a crashed master's leftovers are found there by the next one; with
//! `supervisor.cgroups: off`, the documented fallback (process groups) lets such a child live.
//! These run as root outside systemd; `systemd.rs` runs the same under the booted systemd with
//! the packaged unit (`Delegate=yes`).

use baton_integration::event;
use std::time::Duration;

use baton_integration::worker_mode::WorkerMode;
use baton_integration::{Master, TestConfig, binaries, eventually, free_port, procfs};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A worker (`sh`, exec'ing a stubborn it-worker) that first starts `sleep` in a session of its
/// own and writes its pid to `<dir>/escaped-<worker id>`.
pub(crate) fn escaping(dir: &std::path::Path, port: u16) -> TestConfig {
    let mut config = TestConfig::hello(&format!("127.0.0.1:{port}"), 1);
    config.command = "/bin/sh".into();
    config.args = vec![
        "-c".into(),
        format!(
            "setsid sleep 3600 & echo $! > {}/escaped-$BATON_WORKER_ID; exec {}",
            dir.display(),
            binaries().it_worker.display()
        ),
    ];
    config.env = vec![WorkerMode::Stubborn.env()];
    config.drain_timeout = "1s";
    config
}

/// The pid the worker's escaped child wrote.
pub(crate) fn escaped(dir: &std::path::Path, worker: u64) -> u32 {
    eventually(Duration::from_secs(10), "the escaped child's pid", || {
        std::fs::read_to_string(dir.join(format!("escaped-{worker}")))
            .ok()?
            .trim()
            .parse()
            .ok()
    })
}

fn first_worker(master: &Master) -> u64 {
    master.events(event::WORKER_READY)[0]["worker"]
        .as_u64()
        .unwrap()
}

#[test]
fn a_child_that_left_the_process_group_ends_with_its_worker_at_the_drain_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let master = Master::start("tree-cgroup", &escaping(dir.path(), free_port()));
    let (_, how) = master.wait_event(event::CONTAINMENT, Duration::from_secs(5), |_| true);
    assert_eq!(how["mode"], "cgroup", "{how}");
    let worker = first_worker(&master);
    let child = escaped(dir.path(), worker);
    let cgroup = std::fs::read_to_string(format!("/proc/{child}/cgroup")).unwrap();
    assert!(
        cgroup.contains("/baton-") && cgroup.contains("/g1-p0\n"),
        "{cgroup}"
    );
    // A reload retires the worker; it ignores its drain request and is killed at the deadline;
    // its generation is then gone, and its cgroup, with the escaped child, is killed.
    let verdict = master.reload();
    assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
    master.wait_event(event::WORKER_KILLED, Duration::from_secs(10), |v| {
        v["worker"] == worker
    });
    eventually(Duration::from_secs(10), "the escaped child killed", || {
        (!procfs::alive(child)).then_some(())
    });
    // And the generation's cgroup is removed once empty.
    let dir_of = |line: &str| {
        let path = line.trim().strip_prefix("0::").unwrap().to_string();
        let base = if std::path::Path::new("/sys/fs/cgroup/unified").exists() {
            "/sys/fs/cgroup/unified"
        } else {
            "/sys/fs/cgroup"
        };
        std::path::PathBuf::from(format!("{base}{path}"))
    };
    let cg = dir_of(cgroup.lines().find(|l| l.starts_with("0::")).unwrap());
    eventually(
        Duration::from_secs(10),
        "the worker's cgroup removed",
        || (!cg.exists()).then_some(()),
    );
}

#[test]
fn the_next_master_ends_what_a_crashed_one_left_in_its_cgroups() {
    let dir = tempfile::tempdir().unwrap();
    let mut master = Master::start("tree-crash", &escaping(dir.path(), free_port()));
    let child = escaped(dir.path(), first_worker(&master));
    master.signal(Signal::SIGKILL);
    let next = master.successor("tree-crash-next");
    next.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    eventually(Duration::from_secs(10), "the escaped child ended", || {
        (!procfs::alive(child)).then_some(())
    });
    // Not in the crashed master's registry (it left its worker's process group): found in the
    // worker's cgroup.
    let found = next.events_where(event::ORPHANS_FOUND, |v| v.get("cgroup").is_some());
    assert_eq!(found.len(), 1, "{found:?}");
}

#[test]
fn with_cgroups_off_a_child_that_left_the_group_outlives_its_worker() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = escaping(dir.path(), free_port());
    config.supervisor_extra.push("cgroups: off".into());
    let master = Master::start("tree-off", &config);
    let (_, how) = master.wait_event(event::CONTAINMENT, Duration::from_secs(5), |_| true);
    assert_eq!(how["mode"], "process_group", "{how}");
    let worker = first_worker(&master);
    let child = escaped(dir.path(), worker);
    let verdict = master.reload();
    assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
    master.wait_event(event::WORKER_EXITED, Duration::from_secs(10), |v| {
        v["worker"] == worker
    });
    assert!(
        procfs::alive(child),
        "the documented limit of process groups"
    );
    kill(Pid::from_raw(child as i32), Signal::SIGKILL).unwrap();
}
