//! The Kubernetes example (`packaging/container/kubernetes.yaml`), checked offline (issue 21,
//! part 2): against Kubernetes' own API schemas (`kubernetes-validate` from PyPI, which ships
//! them; `integration/run-tests.sh` installs it), and its termination arithmetic against the
//! container's configuration: `terminationGracePeriodSeconds` >= `supervisor.stop_delay` + the
//! longest `drain_timeout` + a margin, and probes where baton answers them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use baton_integration::binaries;
use baton_integration::recipes::program;
use serde_yaml::Value;

/// Between the end of the drain and the kubelet's SIGKILL: the master's own exit, and clock
/// skew between the kubelet's timer and the pod's.
const MARGIN: Duration = Duration::from_secs(5);

fn repository(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join(file)
}

fn validate(manifest: &Path) -> (bool, String) {
    let out = Command::new(program(
        "kubernetes-validate",
        "kubernetes-validate from PyPI",
    ))
    .arg("--strict")
    .arg(manifest)
    .output()
    .expect("running kubernetes-validate");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_kubernetes_manifest_validates_against_the_api_schemas() {
    let manifest = repository("packaging/container/kubernetes.yaml");
    let (ok, said) = validate(&manifest);
    assert!(ok, "{said}");
    assert!(
        said.contains("passed for resource deployment/baton"),
        "{said}"
    );
    // The check can fail: a misspelt field is refused.
    let text = std::fs::read_to_string(&manifest).unwrap();
    let broken = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        broken.path(),
        text.replacen("periodSeconds:", "periodSecondz:", 1),
    )
    .unwrap();
    let (ok, said) = validate(broken.path());
    assert!(
        !ok && said.contains("'periodSecondz' was unexpected"),
        "{said}"
    );
}

#[test]
fn the_kubernetes_termination_arithmetic_and_probes_match_the_container_configuration() {
    let manifest: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repository("packaging/container/kubernetes.yaml")).unwrap(),
    )
    .unwrap();
    let pod = &manifest["spec"]["template"]["spec"];
    let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap());
    let container = &pod["containers"][0];

    // The container's configuration, as baton reads it (its worker's path is the image's).
    let text = std::fs::read_to_string(repository("packaging/container/baton.yaml")).unwrap();
    let text = text.replace(
        "/usr/bin/hello-worker",
        &binaries().hello_worker.display().to_string(),
    );
    let config = baton_core::config::parse(Path::new("/etc/baton/baton.yaml"), &text).unwrap();
    let drain = config
        .programs
        .iter()
        .map(|p| p.drain_timeout)
        .max()
        .unwrap();
    let stop_delay = config.supervisor.stop_delay;
    eprintln!(
        "terminationGracePeriodSeconds {} s >= stop_delay {} s + drain_timeout {} s + margin {} s",
        grace.as_secs(),
        stop_delay.as_secs(),
        drain.as_secs(),
        MARGIN.as_secs()
    );
    assert!(
        grace >= stop_delay + drain + MARGIN,
        "the kubelet would SIGKILL baton before its stop delay and drain end"
    );
    assert!(
        !stop_delay.is_zero(),
        "endpoints go asynchronously: serve on a moment after SIGTERM"
    );
    // No preStop sleep: the stop delay does that (and the image has no `sleep`).
    assert!(container["lifecycle"].is_null(), "{container:?}");

    // The probes go where baton answers them.
    let metrics = config
        .supervisor
        .metrics_listen
        .expect("metrics_listen for the probes");
    for (probe, path) in [("readinessProbe", "/healthz"), ("livenessProbe", "/livez")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(
            get["port"].as_u64(),
            Some(u64::from(metrics.port())),
            "{probe}"
        );
    }
    assert!(
        container["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|p| p["containerPort"].as_u64() == Some(u64::from(metrics.port()))),
        "the metrics port is declared"
    );
}
