//! The packaged unit's hardening against every worker the project runs (issue 20, part 6): one
//! booted systemd runs the packaged `baton.service` once per worker (the Rust example, Python,
//! Node, gunicorn, uvicorn, HAProxy, nginx, Go); each must start, serve, reload with a verdict
//! and stop. Then the same with the strict drop-in (`packaging/systemd/baton-strict.conf`):
//! the workers it allows must do the same, and the ones it breaks fail to start for the
//! reason docs/reliability.md gives. And the scores, measured under the booted systemd.

use std::path::Path;

use baton_integration::recipes::{
    example, go_hello, go_yaml, gunicorn_yaml, haproxy_yaml, nginx_yaml, node_yaml, python_yaml,
    uvicorn_yaml,
};
use baton_integration::systemd::{Systemd, service_unit};
use baton_integration::{TestConfig, binaries};

const KINDS: [&str; 8] = [
    "rust", "python", "node", "gunicorn", "uvicorn", "haproxy", "nginx", "go",
];

fn strict_dropin() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/systemd/baton-strict.conf"
    ))
    .unwrap()
}

/// The configuration of `kind` on `port`, its files in `dir`.
fn yaml(kind: &str, dir: &Path, port: u16) -> String {
    match kind {
        "rust" => TestConfig::hello(&format!("127.0.0.1:{port}"), 2).yaml(),
        // Copies in `dir`: the namespace of a build under /tmp shows its target directory only.
        "python" => python_yaml(port).replace(
            &example("python-worker/server.py").display().to_string(),
            &copy(dir, "python-worker/server.py"),
        ),
        "node" => node_yaml(port).replace(
            &example("node-worker/server.js").display().to_string(),
            &copy(dir, "node-worker/server.js"),
        ),
        "gunicorn" => gunicorn_yaml(dir, port),
        "uvicorn" => uvicorn_yaml(dir, port),
        "haproxy" => {
            let cfg = dir.join("haproxy.cfg");
            let text = std::fs::read_to_string(example("haproxy/haproxy.cfg")).unwrap();
            std::fs::write(&cfg, text).unwrap();
            haproxy_yaml(&cfg, port)
        }
        "nginx" => nginx_yaml(dir, port),
        "go" => go_yaml(&go_hello(dir), port),
        other => panic!("{other}"),
    }
    .replace("{dir}", &dir.display().to_string())
}

/// `examples/FILE` copied into `dir` (executable); its path.
fn copy(dir: &Path, file: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let to = dir.join(Path::new(file).file_name().unwrap());
    std::fs::copy(example(file), &to).unwrap();
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
    to.display().to_string()
}

/// Boots a systemd with one `baton-KIND.service` per kind (the packaged unit, plus `extra`
/// lines in its `[Service]` section), each on its own port, and `baton-score.service`, the
/// same unit never started, whose exposure is measured.
fn boot(name: &str, extra: &str) -> (Systemd, Vec<(&'static str, u16)>) {
    let root = Systemd::workdir(name);
    let extra = extra.replace("{dir}", &root.display().to_string());
    let mut units = vec![(
        "baton-score.service".to_string(),
        format!(
            "{}\n[Service]\n{extra}",
            service_unit(&root.join("none.yaml"))
        ),
    )];
    // A build under /tmp lives, inside the namespace, on a bind mount of its target directory
    // in the namespace's /tmp: a service's PrivateTmp would hide the very programs it runs.
    // (A private /tmp is writable: so is the shared one then.)
    let running = if root.starts_with("/tmp") {
        format!(
            "{extra}\n# The build lives under /tmp: see unit_hardening.rs.\nPrivateTmp=no\nReadWritePaths=/tmp\n"
        )
    } else {
        extra
    };
    let mut kinds = Vec::new();
    for (i, kind) in KINDS.into_iter().enumerate() {
        let dir = root.join(kind);
        std::fs::create_dir_all(dir.join("run")).unwrap();
        let port = 8081 + i as u16;
        let config = dir.join("baton.yaml");
        std::fs::write(&config, yaml(kind, &dir, port)).unwrap();
        // Several units of one systemd: each with a runtime directory of its own. systemd
        // removes a unit's runtime directory when it stops (or fails and restarts); a sandboxed
        // unit sharing it then cannot run its next program (226/NAMESPACE: the directory its
        // ReadWritePaths= names is gone). docs/operations.md says so to operators.
        let unit = format!(
            "{}\n[Service]\nRuntimeDirectory=\nRuntimeDirectory=baton-{kind}\n{running}",
            service_unit(&config)
        );
        units.push((format!("baton-{kind}.service"), unit));
        kinds.push((kind, port));
    }
    let units: Vec<(&str, String)> = units.iter().map(|(n, u)| (n.as_str(), u.clone())).collect();
    (Systemd::boot(name, &units), kinds)
}

/// One HTTP request inside the namespace; the answer's text.
fn get(sd: &Systemd, port: u16) -> String {
    let out = sd
        .net_command(Path::new("/bin/bash"))
        .args([
            "-c",
            &format!(
                "exec 3<>/dev/tcp/127.0.0.1/{port}; printf 'GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n' >&3; timeout 5 cat <&3"
            ),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts, asks, reloads, asks and stops `baton-KIND.service`; `Err` with the journal's end if
/// a step fails.
fn lifecycle(sd: &Systemd, kind: &str, port: u16) -> Result<(), String> {
    let unit = format!("baton-{kind}.service");
    let tail = |what: &str| {
        let journal = sd.journal(&unit);
        let lines: Vec<&str> = journal.lines().collect();
        let status = sd.systemctl(&["status", "--no-pager", "--lines=0", &unit]);
        // The master's verdict wherever it is in the journal: a worker's long last words (a
        // V8 stack trace) can push it out of the last lines.
        let verdicts: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.contains("failed to start") || l.contains("reload failed"))
            .collect();
        format!(
            "{kind}: {what}\n{}\n{}\nverdicts:\n{}",
            String::from_utf8_lossy(&status.stdout),
            lines[lines.len().saturating_sub(15)..].join("\n"),
            verdicts.join("\n")
        )
    };
    if !sd.systemctl(&["start", &unit]).status.success() {
        let failed = tail("start failed");
        // Restart=on-failure would start it again every second, beside the next kinds' tests.
        let _ = sd.systemctl(&["stop", &unit]);
        return Err(failed);
    }
    if !get(sd, port).contains(" 200 ") {
        return Err(tail("no answer"));
    }
    if !sd.systemctl(&["reload", &unit]).status.success() {
        return Err(tail("reload failed"));
    }
    if !get(sd, port).contains(" 200 ") {
        return Err(tail("no answer after the reload"));
    }
    if !sd.systemctl(&["stop", &unit]).status.success()
        || sd.show(&unit, "ActiveState") != "inactive"
    {
        return Err(tail("stop failed"));
    }
    Ok(())
}

/// `systemd-analyze security` of `unit` under the booted systemd.
fn exposure(sd: &Systemd, unit: &str) -> f64 {
    let out = sd
        .command("systemd-analyze")
        .args(["security", "--no-pager", unit])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| {
            l.split(&format!("Overall exposure level for {unit}:"))
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"))
}

#[test]
fn every_worker_runs_under_the_hardened_packaged_unit() {
    let _ = binaries();
    let (sd, kinds) = boot("hardened", "");
    let score = exposure(&sd, "baton-score.service");
    eprintln!("systemd-analyze security, the packaged unit: {score}");
    let failed: Vec<String> = kinds
        .iter()
        .filter_map(|(kind, port)| lifecycle(&sd, kind, *port).err())
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
    assert!(score <= 5.0, "the packaged unit's exposure: {score}");
}

#[test]
fn the_strict_dropin_runs_the_workers_it_allows_and_refuses_the_others_for_their_reason() {
    let _ = binaries();
    // Its files are the operator's to allow (the drop-in says so): here, the test's directory.
    let (sd, kinds) = boot(
        "strict",
        &format!("{}\nReadWritePaths={{dir}}\n", strict_dropin()),
    );
    let score = exposure(&sd, "baton-score.service");
    eprintln!("systemd-analyze security, with the strict drop-in: {score}");
    let mut outcome = Vec::new();
    for (kind, port) in &kinds {
        let result = lifecycle(&sd, kind, *port);
        eprintln!(
            "strict, {kind}: {}",
            result.as_ref().map_or_else(|e| e.clone(), |()| "ok".into())
        );
        // The reason, in the verdict of the failed start.
        let reason = match *kind {
            "node" => Some("killed by SIGTRAP before it was ready"),
            "gunicorn" | "uvicorn" => Some("executing the program: Permission denied"),
            _ => None,
        };
        if let (Err(err), Some(reason)) = (&result, reason) {
            assert!(err.contains(reason), "{kind} fails for its reason: {err}");
        }
        outcome.push((*kind, result.is_ok()));
    }
    // What the drop-in costs (docs/reliability.md): Node's JIT needs memory both writable and
    // executable; gunicorn and uvicorn run from a virtual environment whose Python is under
    // /root (pyenv), which ProtectHome=yes hides.
    let expected: Vec<(&str, bool)> = KINDS
        .iter()
        .map(|k| (*k, !matches!(*k, "node" | "gunicorn" | "uvicorn")))
        .collect();
    assert_eq!(outcome, expected, "which workers the strict drop-in allows");
    assert!(score <= 3.0, "the strict drop-in's exposure: {score}");
}
