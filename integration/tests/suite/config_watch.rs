//! `supervisor.watch: [config]` (issue 21, part 3): the master watches its configuration file,
//! and a change is a reload with a verdict, like SIGUSR2. Tested with a ConfigMap's layout and
//! update exactly as the kubelet does them (a timestamped directory, `..data` swapped by a
//! rename), with a broken file, with an editor that writes in place, and for the CPU it costs
//! while nothing changes.

use baton_integration::event;
use baton_integration::loopback;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_integration::{Master, TestConfig, eventually, free_port};
use serde_json::Value;

fn yaml(port: u16, processes: usize) -> String {
    let mut config = TestConfig::hello(&format!("127.0.0.1:{port}"), processes);
    config.supervisor_extra.push("watch: [config]".into());
    config.drain_timeout = "5s";
    config.yaml()
}

/// The kubelet's update of a ConfigMap volume: the new files in a new timestamped directory, a
/// new `..data` symlink renamed over the old one, the old directory removed.
fn kubelet_update(volume: &Path, version: u32, text: &str) {
    let new = volume.join(format!("..2026_11_28_00_00_0{version}.{version}"));
    std::fs::create_dir(&new).unwrap();
    std::fs::write(new.join("baton.yaml"), text).unwrap();
    let old = std::fs::read_link(volume.join("..data")).ok();
    let _ = std::fs::remove_file(volume.join("..data_tmp"));
    symlink(new.file_name().unwrap(), volume.join("..data_tmp")).unwrap();
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
    if let Some(old) = old {
        std::fs::remove_dir_all(volume.join(old)).unwrap();
    }
}

/// The reload requests the watch made so far.
fn watch_requests(master: &Master) -> Vec<Value> {
    master
        .events_where(event::RELOAD_REQUESTED, |v| {
            v["trigger"]
                .as_str()
                .is_some_and(|t| t.ends_with("changed (supervisor.watch)"))
        })
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

/// Waits for the verdict of the `n`th request the watch made; no other request came meanwhile.
fn verdict_of_change(master: &Master, n: usize) -> Value {
    let request = eventually(
        Duration::from_secs(10),
        "a reload request from the watch",
        || {
            watch_requests(master)
                .get(n - 1)
                .and_then(|v| v["request"].as_u64())
        },
    );
    let verdict = master.verdict_of(request);
    assert_eq!(
        watch_requests(master).len(),
        n,
        "one reload per change: {:?}",
        watch_requests(master)
    );
    verdict
}

#[test]
fn a_configmap_update_and_an_in_place_edit_each_reload_once_and_a_broken_file_fails_its_reload() {
    let port = free_port();
    let mut volume = PathBuf::new();
    let master = Master::spawn_laid_out("config-watch", |dir| {
        // A ConfigMap volume as the kubelet lays it out.
        volume = dir.join("volume");
        std::fs::create_dir(&volume).unwrap();
        let text = yaml(port, 2).replace("{dir}", &dir.display().to_string());
        kubelet_update(&volume, 1, &text);
        symlink("..data/baton.yaml", volume.join("baton.yaml")).unwrap();
        volume.join("baton.yaml")
    });
    let dir = volume.parent().unwrap().to_path_buf();
    let text = |processes| yaml(port, processes).replace("{dir}", &dir.display().to_string());
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    master.wait_event(event::CONFIG_WATCH, Duration::from_secs(10), |_| true);

    // Nothing changes: the watch costs no CPU (it waits on inotify; no timer runs).
    let (ticks, ()) = master.cpu_during(|| std::thread::sleep(Duration::from_secs(3)));
    eprintln!("the idle master with a config watch used {ticks} CPU ticks (10 ms) in 3 s");
    assert!(ticks <= 3, "{ticks} ticks while nothing changed");
    assert!(watch_requests(&master).is_empty());

    // The kubelet's swap: a reload, with a verdict, with the new configuration.
    kubelet_update(&volume, 2, &text(3));
    let verdict = verdict_of_change(&master, 1);
    assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
    eventually(Duration::from_secs(20), "3 workers", || {
        (master.children().len() == 3).then_some(())
    });

    // A broken file: that reload fails, saying where; the serving generation serves on.
    kubelet_update(&volume, 3, "workers: [\n");
    let verdict = verdict_of_change(&master, 2);
    assert_eq!(verdict["event"], "reload_failed", "{verdict}");
    assert!(
        verdict["reason"].as_str().unwrap().contains("baton.yaml"),
        "{verdict}"
    );
    let addr = loopback(port);
    assert_eq!(baton_integration::load::requests(addr, 10).ok, 10);

    // An editor that writes the file in place (through the symlinks).
    std::fs::write(volume.join("baton.yaml"), text(2)).unwrap();
    let verdict = verdict_of_change(&master, 3);
    assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
    eventually(Duration::from_secs(20), "2 workers", || {
        (master.children().len() == 2).then_some(())
    });
}
