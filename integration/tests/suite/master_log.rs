//! The master's own log in a file that logrotate can rotate (`create` mode: rename, then
//! SIGUSR1), and its pid file.

use std::time::Duration;

use baton_integration::{TestConfig, baton_run, ctl, eventually, free_port};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[test]
fn the_log_file_is_reopened_on_sigusr1_and_the_pid_file_removed_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.yaml");
    let yaml = hello_yaml(dir.path());
    std::fs::write(&config, yaml).unwrap();
    let (log, pid_file) = (dir.path().join("baton.log"), dir.path().join("baton.pid"));
    let master = baton_run(
        &config,
        "json",
        &[
            "--log-file".as_ref(),
            log.as_ref(),
            "--pid-file".as_ref(),
            pid_file.as_ref(),
        ],
    );
    let read = |path: &std::path::Path| std::fs::read_to_string(path).unwrap_or_default();
    eventually(Duration::from_secs(30), "serving, in the log file", || {
        read(&log).contains("\"event\":\"serving\"").then_some(())
    });
    assert_eq!(read(&pid_file).trim(), master.id().to_string());
    // logrotate, `create` mode: rename, then SIGUSR1.
    let rotated = dir.path().join("baton.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    kill(Pid::from_raw(master.id() as i32), Signal::SIGUSR1).unwrap();
    eventually(Duration::from_secs(10), "a new log file", || {
        log.exists().then_some(())
    });
    let (code, _, err) = ctl(&dir.path().join("baton.sock"), &["reload"], None);
    assert_eq!(code, 0, "{err}");
    eventually(
        Duration::from_secs(10),
        "the reload in the new file",
        || {
            read(&log)
                .contains("\"event\":\"reload_succeeded\"")
                .then_some(())
        },
    );
    assert!(!read(&rotated).contains("reload_succeeded"));
    assert!(read(&rotated).contains("\"event\":\"started\""));
    kill(Pid::from_raw(master.id() as i32), Signal::SIGTERM).unwrap();
    let out = master.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The master's lines, and the workers' captured ones, went to the file, not to stderr.
    assert!(!String::from_utf8_lossy(&out.stderr).contains("\"event\":"));
    assert!(read(&log).contains("\"event\":\"output\""));
    assert!(!pid_file.exists(), "removed at exit");
}

/// `supervisor.log_file` and `supervisor.pid_file` do what the flags do, relative to the
/// configuration's directory; they are start-only settings; an upgrade keeps them.
#[test]
fn the_configuration_names_the_log_file_and_the_pid_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.yaml");
    let yaml = hello_yaml(dir.path()).replace(
        "supervisor:\n",
        "supervisor:\n  log_file: logs/baton.log\n  pid_file: baton.pid\n",
    );
    std::fs::create_dir(dir.path().join("logs")).unwrap();
    std::fs::write(&config, &yaml).unwrap();
    let (log, pid_file) = (
        dir.path().join("logs/baton.log"),
        dir.path().join("baton.pid"),
    );
    let mut master = baton_run(&config, "json", &[]);
    let read = |path: &std::path::Path| std::fs::read_to_string(path).unwrap_or_default();
    eventually(Duration::from_secs(30), "serving, in the log file", || {
        read(&log).contains("\"event\":\"serving\"").then_some(())
    });
    assert_eq!(read(&pid_file).trim(), master.id().to_string());
    let socket = dir.path().join("baton.sock");
    let (_, status, _) = ctl(&socket, &["status", "--json"], None);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let settings = &status["master"]["start_settings"];
    assert_eq!(
        settings["supervisor.log_file"],
        log.display().to_string(),
        "{settings}"
    );
    assert_eq!(
        settings["supervisor.pid_file"],
        pid_file.display().to_string()
    );
    // Start-only: a reload that finds them changed says so and keeps the files in use.
    std::fs::write(&config, yaml.replace("logs/baton.log", "other.log")).unwrap();
    let (code, out, err) = ctl(&socket, &["reload"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("warning: supervisor.log_file: "), "{out}");
    // A self-upgrade keeps the files (the new program does not read the configuration).
    let next = baton_integration::next_baton();
    let (code, out, err) = ctl(
        &socket,
        &["upgrade", "--binary", next.to_str().unwrap()],
        None,
    );
    assert_eq!(code, 0, "{out}{err}");
    eventually(
        Duration::from_secs(20),
        "the upgraded master's line in the log file",
        || read(&log).contains("\"event\":\"upgraded\"").then_some(()),
    );
    assert!(!dir.path().join("other.log").exists());
    kill(Pid::from_raw(master.id() as i32), Signal::SIGTERM).unwrap();
    assert!(master.wait().unwrap().success());
    assert!(!pid_file.exists(), "removed at exit");
}

/// One hello worker on a free port, the master's files in `dir`.
fn hello_yaml(dir: &std::path::Path) -> String {
    TestConfig::hello(&format!("127.0.0.1:{}", free_port()), 1)
        .yaml()
        .replace("{dir}", dir.to_str().unwrap())
}
