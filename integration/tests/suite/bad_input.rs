//! Bad input at startup: one clear line naming the problem, exit 64, no panic.

use std::process::Command;

use baton_integration::{TestConfig, binaries};

fn run(args: &[&str], yaml: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(&binaries().baton)
        .args(args)
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn each_bad_config_gets_one_line_naming_the_problem_and_exit_64() {
    let good = TestConfig::hello("127.0.0.1:1", 1);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_config = TestConfig::hello(&busy.local_addr().unwrap().to_string(), 1);
    let busy_metrics = format!("metrics endpoint {}: ", busy.local_addr().unwrap());
    let mut missing = good.clone();
    missing.command = "./no-such-worker".into();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "malformed YAML",
            "listeners: [\n".into(),
            "baton.yaml:2:1: did not find expected node content",
        ),
        (
            "unknown key",
            good.yaml() + "colour: blue\n",
            "unknown field `colour`",
        ),
        (
            "bad address",
            good.yaml().replace("127.0.0.1:1", "300.0.0.1:80"),
            "invalid TCP address \"300.0.0.1:80\"",
        ),
        ("port in use", busy_config.yaml(), "address already in use"),
        (
            "metrics port in use",
            format!(
                "{}  metrics_listen: {}\n",
                good.yaml(),
                busy.local_addr().unwrap()
            ),
            &busy_metrics,
        ),
        (
            "missing worker",
            missing.yaml(),
            "no-such-worker does not exist",
        ),
    ];
    for (what, yaml, expected) in cases {
        let (code, stderr) = run(&["run", "-c"], &yaml);
        eprintln!("{what}: {}", stderr.trim_end());
        assert_eq!(code, Some(64), "{what}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{what}: one line: {stderr}"
        );
        assert!(
            stderr.contains(expected),
            "{what}: {stderr:?} should contain {expected:?}"
        );
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    }
}

#[test]
fn the_readme_example_config_is_valid() {
    binaries(); // the config names the built hello-worker
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/baton.yaml");
    let out = Command::new(&binaries().baton)
        .args(["check", "-c", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The README's second command is the script CI runs, and the script installs what the tests
/// need (a fresh machine has no Node.js, and may lack a systemd binary) before it runs them.
#[test]
fn the_readme_test_command_installs_what_the_tests_need_and_is_what_ci_runs() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let first_screen: Vec<&str> = readme.lines().take(45).collect();
    let commands: Vec<&str> = first_screen
        .windows(2)
        .filter(|w| w[0] == "```sh")
        .map(|w| w[1])
        .collect();
    assert_eq!(
        commands,
        [
            "cargo build && ./target/debug/baton run -c examples/baton.yaml",
            "bash integration/run-tests.sh"
        ],
        "exactly two set-up commands on the first screen"
    );
    let ci = std::fs::read_to_string(format!("{root}/.ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l == "bash integration/run-tests.sh"),
        "{ci}"
    );
    let script = std::fs::read_to_string(format!("{root}/integration/run-tests.sh")).unwrap();
    let packages = [
        "python3",
        "nodejs",
        "util-linux",
        "systemd",
        "iproute2",
        "haproxy",
        "nginx-light",
        "golang-go",
        "python3-venv",
    ]
    .map(|package| format!("missing+=({package})"));
    let requirements = [
        "examples/uvicorn/requirements.txt",
        "examples/gunicorn/requirements.txt",
    ]
    .map(|requirements| format!("-r {requirements}"));
    for needed in packages.iter().chain(&requirements) {
        assert!(script.contains(needed.as_str()), "{needed}");
    }
    assert!(script.contains("apt-get install"));
    assert!(script.contains("cargo test --workspace --locked"));
}

#[test]
fn check_validates_without_running() {
    let good = TestConfig::hello("127.0.0.1:1", 1);
    let (code, _) = run(&["check", "-c"], &good.yaml());
    assert_eq!(code, Some(0));
    let (code, stderr) = run(&["check", "-c"], &(good.yaml() + "extra: 1\n"));
    assert_eq!(code, Some(64));
    assert!(stderr.contains("unknown field `extra`"), "{stderr}");
    // Every problem, not just the first.
    let mut bad = good.clone();
    bad.command = "./nowhere".into();
    bad.listeners.push(("far".into(), "192.0.2.7:80".into()));
    bad.worker_extra = vec!["ready: notify".into()];
    let (code, stderr) = run(&["check", "-c"], &bad.yaml());
    assert_eq!(code, Some(64));
    for expected in [
        "nowhere does not exist",
        "`notify` needs `protocol: systemd`",
        "not an address of this machine",
        "3 problem(s)",
    ] {
        assert!(
            stderr.contains(expected),
            "{expected:?} missing from {stderr}"
        );
    }
}

/// `integration/bad-configs/`: each file says on its first line (`# expect: ...`) what the error
/// must contain. `baton check` and `baton run` both refuse it with exit 64, naming the file.
#[test]
fn the_bad_config_corpus_is_refused_with_located_messages() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/bad-configs");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    assert!(files.len() >= 20, "the corpus is there: {files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let expected = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .expect("# expect: line");
        for args in [["check", "-c"], ["run", "-c"]] {
            let out = Command::new(&binaries().baton)
                .args(args)
                .arg(&file)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            let name = file.file_name().unwrap().to_string_lossy();
            assert_eq!(out.status.code(), Some(64), "{name} ({args:?}): {stderr}");
            assert!(
                stderr.contains(expected),
                "{name} ({args:?}): {stderr:?} should contain {expected:?}"
            );
            assert!(
                stderr.contains(&*name),
                "{name}: the message names the file: {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        }
    }
}

#[test]
fn the_man_page_and_completions_come_from_the_command_definitions() {
    let out = Command::new(&binaries().baton).arg("man").output().unwrap();
    assert!(out.status.success());
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(
        man.starts_with(".ie") && man.contains(".TH baton 1"),
        "{man}"
    );
    for sub in [
        "run",
        "check",
        "status",
        "drain\\-status",
        "reload",
        "stop",
        "history",
        "metrics",
    ] {
        assert!(
            man.contains(&format!("baton\\-{sub}")) || man.contains(sub),
            "{sub} missing from the man page"
        );
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(&binaries().baton)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        // fish spells long options without their dashes (`-l no-wait`).
        for word in ["drain-status", "reload", "no-wait"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
}

/// The configurations shipped in packaging/ are valid (their worker paths, which exist only where
/// they are installed, substituted).
#[test]
fn the_packaged_configurations_are_valid() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    for (file, command) in [
        ("packaging/baton.example.yaml", "/usr/local/bin/my-server"),
        ("packaging/container/baton.yaml", "/usr/bin/hello-worker"),
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        assert!(text.contains(command), "{file} runs {command}");
        let text = text.replace(command, &binaries().hello_worker.display().to_string());
        let (code, stderr) = run(&["check", "-c"], &text);
        assert_eq!(code, Some(0), "{file}: {stderr}");
    }
}
