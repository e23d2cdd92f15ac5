//! The upgrade state's formats: each one written before is still read.

use super::*;
use crate::supervisor::Phase;

/// A state written by the first format (a real master: two reloads, generation 2 draining
/// with a client, generation 3 serving). Every later baton must still read it.
const STATE_V1: &str = include_str!("../../tests/fixtures/state-v1.json");

#[test]
fn a_format_1_state_still_decodes_with_its_generations_workers_and_history() {
    let (state, supervisor) = decode(STATE_V1.as_bytes()).unwrap();
    assert_eq!(state.format, 1);
    assert_eq!(state.from_version, "0.1.0");
    assert_eq!(state.sockets.len(), 1);
    assert_eq!(state.generations.len(), 2);
    assert_eq!(state.links.len(), 3);
    assert_eq!(
        phases(&supervisor),
        vec![(2, Phase::Draining, 1), (3, Phase::Serving, 2)]
    );
    assert_eq!(supervisor.history().count(), 2);
    assert!(supervisor.next_deadline().is_some(), "the drain deadline");
}

/// Where two JSON values differ: a list of paths. Integers that are monotonic times may
/// differ by less than a millisecond (an `Instant` read back is re-anchored to now).
fn differences(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for key in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
                let (x, y) = (&a.get(key), &b.get(key));
                match (x, y) {
                    (Some(x), Some(y)) => differences(&format!("{path}.{key}"), x, y, out),
                    _ => out.push(format!("{path}.{key}: {x:?} vs {y:?}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                differences(&format!("{path}[{i}]"), x, y, out);
            }
        }
        (Value::Number(x), Value::Number(y)) if x != y => {
            let near = match (x.as_i64(), y.as_i64()) {
                (Some(x), Some(y)) => x > 1_000_000_000 && (x - y).abs() < 1_000_000,
                _ => false,
            };
            if !near {
                out.push(format!("{path}: {x} vs {y}"));
            }
        }
        (a, b) if a != b => out.push(format!("{path}: {a} vs {b}")),
        _ => {}
    }
}

#[test]
fn a_format_1_state_encodes_back_to_the_same_json_but_for_the_histograms_and_the_run() {
    let (again, _) = reencoded(STATE_V1);
    let mut diff = differences_from(STATE_V1, &again);
    // Fields added to format 1 after the fixture was written: absent there, their default
    // here. Every other byte is the same.
    let added = [
        "upgrade_signal: None",
        "upgrade_timeout: None",
        "metrics_listen: None",
        "stop_delay: None",
        "stop_delayed_until: None",
        "failed_stop_timeout: None",
        "failed_at: None",
        "not_ready: None",
        "last_worker: None",
        "stable_at: None",
        "liveness: None",
        "replace: None",
        "replaced: None",
        "successor: None",
        "recycle: None",
        "cgroups: None",
        // A listener's options came later (all off by default).
        "options: None",
        // So did a rolling reload (`rollout`, none running).
        "rollout: None",
    ];
    diff.retain(|d| {
        !added.iter().any(|a| {
            d.ends_with(&format!("{a} vs Some(Null)"))
                || d.contains(&format!(".{a} vs Some(Object"))
        })
    });
    // And `supervisor.watch` (default: no watch).
    diff.retain(|d| !d.ends_with(".spec.watch_config: None vs Some(Bool(false))"));
    // And the control socket's followers' own places (default 8).
    diff.retain(|d| d != ".control.config.max_followers: None vs Some(Number(8))");
    // And the pidfds held across the exec (none in a state from before them).
    diff.retain(|d| d != ".processes: None vs Some(Array [])");
    // And whether a worker replaces one that failed its liveness check (issue 28).
    diff.retain(|d| !d.ends_with(".replacement: None vs Some(Bool(false))"));
    // So did `cgroups` (default `auto`).
    diff.retain(|d| d != ".cgroups: None vs Some(String(\"auto\"))");
    // `output:` came later too; its default is `capture`.
    diff.retain(|d| !d.ends_with(".output: None vs Some(String(\"capture\"))"));
    // And the reload strategy (default all at once) and a program's name in the state
    // machine's copy (empty: a rolling reload then pairs programs by position).
    diff.retain(|d| {
        !d.ends_with(".reload: None vs Some(String(\"AllAtOnce\"))")
            && !d.ends_with(".strategy: None vs Some(String(\"AllAtOnce\"))")
            && !d.ends_with(".name: None vs Some(String(\"\"))")
    });
    diff.retain(|d| {
        d != ".supervisor.counters.replaced_unhealthy: None vs Some(Number(0))"
            && d != ".supervisor.counters.replaced_memory: None vs Some(Number(0))"
    });
    // And a program's `handoff_rate` (issue 30; its default).
    diff.retain(|d| !d.ends_with(&handoff_rate_added()));
    // Format 2: the durations are histograms now, with what the lists held.
    let counters = &again["supervisor"]["counters"];
    assert_eq!(counters["reload_durations"]["count"], 2, "{counters}");
    assert_eq!(counters["reload_durations"]["counts"][0], 2, "{counters}");
    assert_eq!(counters["drain_durations"]["count"], 1, "{counters}");
    diff.retain(|d| {
        !d.starts_with(".supervisor.counters.reload_durations: [")
            && !d.starts_with(".supervisor.counters.drain_durations: [")
    });
    // Format 3: the reload running is one record (none ran: idle).
    assert_eq!(again["format"], 3);
    assert_eq!(again["supervisor"]["run"], "Idle");
    assert_differences_are(
        diff,
        &[
            ".format: 1 vs 3",
            ".supervisor.reload: Some(Null) vs None",
            ".supervisor.canary: Some(Null) vs None",
            ".supervisor.run: None vs Some(String(\"Idle\"))",
        ],
    );
}

/// Each generation's number, phase and live workers.
fn phases(supervisor: &Supervisor) -> Vec<(u64, Phase, usize)> {
    supervisor
        .generations()
        .into_iter()
        .map(|(g, p, n)| (g.0, p, n))
        .collect()
}

/// `fixture` read, then written again as this master writes it (as JSON), and the state
/// machine it holds.
fn reencoded(fixture: &str) -> (serde_json::Value, Supervisor) {
    let (state, supervisor) = decode(fixture.as_bytes()).unwrap();
    let again = serde_json::from_slice(&encode_again(state, &supervisor)).unwrap();
    (again, supervisor)
}

/// `diff` holds nothing but `expected`.
#[track_caller]
fn assert_differences_are(mut diff: Vec<String>, expected: &[&str]) {
    diff.retain(|d| !expected.contains(&d.as_str()));
    assert!(diff.is_empty(), "{diff:#?}");
}

/// Where `again` differs from `fixture`.
fn differences_from(fixture: &str, again: &serde_json::Value) -> Vec<String> {
    let fixture: serde_json::Value = serde_json::from_str(fixture).unwrap();
    let mut diff = Vec::new();
    differences("", &fixture, again, &mut diff);
    diff
}

/// The state as the master writes it, with this state machine.
fn encode_again(state: State<()>, supervisor: &Supervisor) -> Vec<u8> {
    let (mut state, ()) = state.replace_machine(machine(supervisor));
    state.format = STATE_FORMAT;
    encode(&state).unwrap()
}

#[test]
fn a_newer_format_is_refused_by_name_and_garbage_is_invalid() {
    let newer = STATE_V1.replacen("\"format\": 1", "\"format\": 99", 1);
    assert!(matches!(
        decode(newer.as_bytes()),
        Err(StateError::TooNew { found: 99 })
    ));
    let message = decode(newer.as_bytes()).unwrap_err().to_string();
    assert!(message.contains("format 99 is newer"), "{message}");
    assert!(matches!(
        decode(b"{\"format\": 1}"),
        Err(StateError::Invalid(_))
    ));
    assert!(matches!(
        decode(b"\x00garbage"),
        Err(StateError::Invalid(_))
    ));
}

/// A state written by format 2 (a real master at 7511f66: a rolling reload, then one all at
/// once; generation 2 draining two workers that hold clients, generation 3 serving).
const STATE_V2: &str = include_str!("../../tests/fixtures/state-v2.json");

#[test]
fn a_format_2_state_still_decodes_with_its_generations_workers_and_history() {
    let (state, supervisor) = decode(STATE_V2.as_bytes()).unwrap();
    assert_eq!(state.format, 2);
    assert_eq!(
        phases(&supervisor),
        vec![(2, Phase::Draining, 2), (3, Phase::Serving, 3)]
    );
    assert_eq!(supervisor.history().count(), 2);
    let counters = supervisor.counters();
    assert_eq!(
        (counters.reloads_ok, counters.killed_at_deadline),
        (2, 1),
        "{counters:?}"
    );
    assert_eq!(counters.reload_durations.count(), 2);
    assert!(supervisor.next_deadline().is_some(), "the drain deadline");
    assert!(!supervisor.reloading());
}

/// How a program's `handoff_rate`, absent from a state written before it, differs: its
/// default.
fn handoff_rate_added() -> String {
    format!(
        ".handoff_rate: None vs Some(Number({}))",
        crate::config::DEFAULT_HANDOFF_RATE
    )
}

#[test]
fn a_format_2_state_becomes_format_3_with_every_record_but_the_run_unchanged() {
    let (again, supervisor) = reencoded(STATE_V2);
    let mut diff = differences_from(STATE_V2, &again);
    diff.retain(|d| !d.ends_with(&handoff_rate_added()));
    assert_differences_are(
        diff,
        &[
            ".format: 2 vs 3",
            ".supervisor.reload: Some(Null) vs None",
            ".supervisor.canary: Some(Null) vs None",
            ".supervisor.rollout: Some(Null) vs None",
            ".supervisor.run: None vs Some(String(\"Idle\"))",
        ],
    );
    // And format 3 reads back what it wrote.
    let (state, resumed) = decode(&serde_json::to_vec(&again).unwrap()).unwrap();
    assert_eq!(state.format, STATE_FORMAT);
    assert_eq!(resumed.generations(), supervisor.generations());
}

/// The fixture with its state machine changed by `change`.
fn changed(fixture: &str, change: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut state: serde_json::Value = serde_json::from_str(fixture).unwrap();
    change(&mut state["supervisor"]);
    serde_json::to_vec(&state).unwrap()
}

#[test]
fn a_format_2_reload_in_no_phase_a_master_could_be_in_is_refused_by_name() {
    // A reload that starts while a rolling reload rolls back: two reloads at once.
    let bytes = changed(STATE_V2, |m| {
        m["reload"] = serde_json::json!({"id": 3, "generation": 3, "covers": [], "triggers": [],
            "started": 32173003194284u64, "initial": false});
        m["rollout"] = serde_json::json!({"reload": 2, "old": 2, "new": 3, "lanes": [],
            "canary": null, "back": "failed at batch 1"});
    });
    let message = decode(&bytes).unwrap_err().to_string();
    assert!(
        message.contains("supervisor (format 2): the reload running is inconsistent"),
        "{message}"
    );
}

#[test]
fn a_state_whose_records_contradict_each_other_is_refused_by_the_invariant_they_break() {
    let bytes = changed(STATE_V2, |m| m["workers"]["7"]["generation"] = 9.into());
    let message = decode(&bytes).unwrap_err().to_string();
    assert!(
        message.contains("worker 7 belongs to generation 9, which does not exist"),
        "{message}"
    );
    // The same in format 3: a generation on probation that does not serve.
    let (mut v3, _) = reencoded(STATE_V2);
    v3["supervisor"]["run"] = serde_json::json!({"OnProbation": {"reload": {"id": 2,
        "generation": 2, "covers": [], "triggers": [], "started": 32173003194284u64,
        "initial": false}, "old": [3], "new": 2, "until": 32173003194284u64}});
    let message = decode(&serde_json::to_vec(&v3).unwrap())
        .unwrap_err()
        .to_string();
    assert!(message.contains("generation 2 is"), "{message}");
    assert!(message.contains("not serving"), "{message}");
}

#[test]
fn a_format_2_retirement_written_as_text_is_read_as_its_kind() {
    let cases = [
        (
            "retired by reload 1, batch 2",
            "Rolled { reload: ReloadId(1), batch: 2 }",
        ),
        ("recycled: RSS 300 MiB", "Recycled(\"RSS 300 MiB\")"),
        (
            "stopped: failed at batch 1 of 3 of web",
            "RolledBack(\"failed at batch 1 of 3 of web\")",
        ),
        ("GET /health: 503", "Unhealthy(\"GET /health: 503\")"),
        // Not quite the rolling form: read as the liveness check's words, whole.
        (
            "retired by reload x, batch 2",
            "Unhealthy(\"retired by reload x, batch 2\")",
        ),
    ];
    for (text, kind) in cases {
        let bytes = changed(STATE_V2, |m| {
            m["workers"]["4"]["replaced"] =
                serde_json::json!({"reason": text, "kill_at": 32173003194284u64});
        });
        let (_, supervisor) = decode(&bytes).unwrap();
        let worker = format!("{:?}", machine(&supervisor).workers[&WorkerId(4)].replaced);
        assert!(worker.contains(kind), "{text}: {worker}");
    }
}
