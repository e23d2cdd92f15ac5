//! The configuration's tests: files that load, files that fail with file:line and the key, and
//! arbitrary YAML that never panics the parser.

use std::path::Path;
use std::time::Duration;

use super::raw::parse_duration;
use super::*;

mod unit {
    use super::*;

    fn parse_str(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("/etc/baton/test.yaml"), text)
    }

    const GOOD: &str = "\
listeners:
  - name: http
    address: 127.0.0.1:8080
    backlog: 512
  - name: v6
    address: \"[::1]:8080\"
  - name: local
    path: /tmp/baton-test.sock
    mode: \"0660\"
    nonblocking: true
worker:
  command: /bin/sh
  args: [-c, 'exec sleep 1000']
  env: {GREETING: hi}
  processes: 3
  ready_timeout: 2s
  drain_timeout: 1m30s
  drain_signal: SIGQUIT
supervisor:
  max_draining: 2
";

    /// Every problem `parse_all` finds in `text` (as `/etc/baton/test.yaml`), shown; asserts each
    /// of `expected` is among them.
    #[track_caller]
    fn problems_of(text: &str, expected: &[&str]) -> Vec<String> {
        let problems = parse_all(Path::new("/etc/baton/test.yaml"), text).unwrap_err();
        let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        for expected in expected {
            assert!(
                shown.iter().any(|s| s.contains(expected)),
                "{expected:?} missing from {shown:#?}"
            );
        }
        shown
    }

    #[test]
    fn readiness_can_combine_conditions_the_protocol_allows() {
        let config = |protocol: &str, ready: &str| {
            format!(
                "listeners: []\nworker:\n  command: /bin/sh\n  protocol: {protocol}\n  ready: {ready}\n"
            )
        };
        let c = parse_str(&config(
            "systemd",
            "{all: [notify, {http: 127.0.0.1:9000, path: /up}, {delay: 1s}]}",
        ))
        .unwrap();
        let ready = &c.programs[0].ready;
        assert!(
            matches!(ready, Readiness::All(all) if all.len() == 3),
            "{ready:?}"
        );
        assert_eq!(ready.probe().unwrap().http_path.as_deref(), Some("/up"));
        assert_eq!(ready.delay(), Some(Duration::from_secs(1)));
        for (protocol, ready, problem) in [
            (
                "systemd",
                "{all: [channel]}",
                "`channel` needs `protocol: baton`",
            ),
            (
                "baton",
                "{all: [notify, {delay: 1s}]}",
                "`notify` needs `protocol: systemd`",
            ),
            ("systemd", "{all: []}", "`all` lists no condition"),
            (
                "systemd",
                "{all: [notify, {all: [notify]}]}",
                "`all` inside `all`",
            ),
            (
                "systemd",
                "{all: [{tcp: 127.0.0.1:1}, {tcp: 127.0.0.1:2}]}",
                "at most one probe and one delay",
            ),
            ("systemd", "{all: [notify], delay: 1s}", "nothing beside it"),
        ] {
            let err = parse_str(&config(protocol, ready)).unwrap_err().to_string();
            assert!(err.contains(problem), "{ready}: {err}");
        }
    }

    #[test]
    fn a_full_config_parses() {
        let c = parse_str(GOOD).unwrap();
        assert_eq!(c.listeners.len(), 3);
        assert_eq!(c.listeners[0].backlog, 512);
        assert_eq!(c.listeners[1].backlog, DEFAULT_BACKLOG);
        assert_eq!(
            c.listeners[1].address,
            ListenerAddress::Tcp {
                address: "[::1]:8080".parse().unwrap()
            }
        );
        assert_eq!(c.listeners[2].mode, Some(0o660));
        // Said for one listener only: the others' sockets are left as they are.
        assert_eq!(c.listeners[2].options.nonblocking, Some(true));
        assert_eq!(c.listeners[0].options.nonblocking, None);
        // Unquoted, YAML would read 0660 as a number; the file's digits are what is meant.
        let unquoted = GOOD.replace("mode: \"0660\"", "mode: 0640");
        assert_eq!(parse_str(&unquoted).unwrap().listeners[2].mode, Some(0o640));
        assert_eq!(c.programs[0].command, PathBuf::from("/bin/sh"));
        assert_eq!(c.programs[0].processes, 3);
        assert_eq!(c.programs[0].drain_timeout, Duration::from_secs(90));
        assert_eq!(c.programs[0].drain_signal, Some(SignalNumber::SIGQUIT));
        assert_eq!(c.programs[0].env["GREETING"], "hi");
        assert_eq!(c.supervisor.max_draining, 2);
    }

    #[test]
    fn defaults_apply() {
        let c = parse_str("listeners: []\nworker: {command: sh}\n").unwrap();
        assert_eq!(c.programs[0].processes, 1);
        assert_eq!(c.programs[0].ready_timeout, Duration::from_secs(10));
        assert_eq!(c.programs[0].drain_signal, Some(SignalNumber::SIGTERM));
        assert!(c.programs[0].command.is_absolute(), "resolved from PATH");
        assert_eq!(c.supervisor.max_draining, 8);
        assert_eq!(c.supervisor.upgrade_signal, None);
        assert_eq!(c.supervisor.upgrade_timeout, Duration::from_secs(10));
        let c =
            parse_str("listeners: []\nworker: {command: sh}\nsupervisor: {upgrade_timeout: 2s}\n")
                .unwrap();
        assert_eq!(c.supervisor.upgrade_timeout, Duration::from_secs(2));
    }

    #[test]
    fn the_upgrade_signal_is_sigurg_sigwinch_or_none() {
        for (word, expected) in [
            ("SIGURG", Some(SignalNumber::SIGURG)),
            ("winch", Some(SignalNumber::SIGWINCH)),
            ("none", None),
        ] {
            let text = format!(
                "listeners: []\nworker: {{command: sh}}\nsupervisor: {{upgrade_signal: {word}}}\n"
            );
            assert_eq!(
                parse_str(&text).unwrap().supervisor.upgrade_signal,
                expected
            );
        }
    }

    /// Each bad config gives one error naming the file, the line, and what is wrong.
    #[test]
    fn bad_configs_name_file_line_and_problem() {
        let cases: &[(&str, &str, Option<usize>)] = &[
            (
                "listeners: []\nworker: {command: sh}\nbogus: 1\n",
                "unknown field `bogus`",
                Some(3),
            ),
            (
                "listeners:\n  - name: a\n    address: 127.0.0.1:1\n    colour: red\nworker: {command: sh}\n",
                "listeners[0]: unknown field `colour`",
                Some(4),
            ),
            (
                "listeners:\n  - name: a\n    address: 300.0.0.1:80\nworker: {command: sh}\n",
                "test.yaml:3:14: listeners[0].address: invalid TCP address \"300.0.0.1:80\"",
                Some(3),
            ),
            (
                "listeners: []\nworker:\n  command: sh\n  ready_timeout: 10\n",
                "test.yaml:4:18: worker.ready_timeout: invalid duration \"10\"",
                Some(4),
            ),
            (
                "listeners: []\nworker:\n  command: sh\n  processes: 0\n",
                "worker.processes: processes \"0\" is out of range",
                Some(4),
            ),
            (
                "listeners: []\nworker:\n  command: sh\n  handoff_rate: 0\n",
                "test.yaml:4:17: worker.handoff_rate: handoff_rate \"0\" is out of range: use 1 to 1000000",
                Some(4),
            ),
            (
                "listeners: []\nworker:\n  command: sh\n  drain_signal: SIGKILL\n",
                "cannot be handled",
                Some(4),
            ),
            (
                "listeners: []\nworker: {command: sh}\nsupervisor:\n  upgrade_signal: SIGUSR2\n",
                "test.yaml:4:19: supervisor.upgrade_signal: upgrade_signal \"SIGUSR2\": SIGUSR2 cannot be the upgrade signal: use SIGURG, SIGWINCH or none (it means reload)",
                Some(4),
            ),
            (
                "listeners: []\nworker: {command: sh}\nsupervisor:\n  upgrade_signal: SIGPWR\n",
                "would kill a baton that does not handle it",
                Some(4),
            ),
            (
                "listeners: []\nworker: {command: sh}\nsupervisor:\n  upgrade_timeout: 2m\n",
                "upgrade_timeout \"2m\" must be more than 0 and at most 50 s",
                Some(4),
            ),
            (
                "listeners: []\nworker: {command: sh}\nsupervisor:\n  metrics_listen: localhost\n",
                "supervisor.metrics_listen: invalid TCP address \"localhost\": expected IP:port",
                Some(4),
            ),
            (
                "listeners:\n  - name: web\n    address: 0.0.0.0:8080\nworker: {command: sh}\nsupervisor:\n  metrics_listen: 127.0.0.1:8080\n",
                "supervisor.metrics_listen: 127.0.0.1:8080 clashes with listener `web` (tcp://0.0.0.0:8080)",
                Some(6),
            ),
            (
                "listeners: []\nworker: {command: sh}\nsupervisor:\n  metrics_listen: 192.0.2.1:9273\n",
                "supervisor.metrics_listen: 192.0.2.1:9273 is not an address of this machine",
                Some(4),
            ),
            ("listeners: [\n", "did not find expected node", Some(2)),
            (
                "listeners:\n  - name: local\n    path: /tmp/x.sock\n    nodelay: true\nworker: {command: sh}\n",
                "test.yaml:4:5: listeners.nodelay: listener `local`: `nodelay` applies to TCP listeners only",
                Some(4),
            ),
            (
                "listeners:\n  - name: web\n    address: 127.0.0.1:1\n    v6only: true\nworker: {command: sh}\n",
                "listener `web`: `v6only` applies to IPv6 addresses only",
                Some(4),
            ),
            (
                "listeners:\n  - name: web\n    address: 127.0.0.1:1\n    owner: root\nworker: {command: sh}\n",
                "listener `web`: `owner` applies to Unix sockets only",
                Some(4),
            ),
            (
                "listeners:\n  - name: ab\n    path: \"@app\"\n    mode: \"0600\"\nworker: {command: sh}\n",
                "listener `ab`: `mode` does not apply to an abstract socket",
                Some(4),
            ),
            (
                "listeners:\n  - name: web\n    address: 127.0.0.1:1\n    fastopen: 0\nworker: {command: sh}\n",
                "listener `web`: fastopen \"0\" is out of range",
                Some(4),
            ),
            (
                "listeners:\n  - name: web\n    address: 127.0.0.1:1\n    keepalive: {idle: 60s, count: 500}\nworker: {command: sh}\n",
                "listener `web`: `keepalive` count 500 is out of range: 1 to 127",
                Some(4),
            ),
            (
                "listeners:\n  - name: web\n    address: 127.0.0.1:1\n    interface: \"a/b\"\nworker: {command: sh}\n",
                "listener `web`: invalid interface \"a/b\"",
                Some(4),
            ),
            (
                "listeners:\n  - name: a\n    address: 127.0.0.1:1\n  - name: a\n    address: 127.0.0.1:2\nworker: {command: sh}\n",
                "name `a` is already used",
                Some(4),
            ),
            (
                "listeners: []\nworker:\n  command: ./no-such-worker\n",
                "/etc/baton/no-such-worker does not exist",
                Some(3),
            ),
            (
                "listeners: []\nworker:\n  command: no-such-program-xyz\n",
                "not found in PATH",
                Some(3),
            ),
            (
                "listeners:\n  - name: a\nworker: {command: sh}\n",
                "needs `address`",
                Some(2),
            ),
            (
                "listeners:\n  - name: a\n    path: /tmp/x\n    mode: rw-rw----\nworker: {command: sh}\n",
                "listeners[0].mode: invalid mode \"rw-rw----\": write octal digits such as 0660",
                Some(4),
            ),
        ];
        for (text, expected, line) in cases {
            let err = parse_str(text).expect_err(text);
            let shown = err.to_string();
            assert!(shown.starts_with("/etc/baton/test.yaml:"), "{shown}");
            assert!(
                shown.contains(expected),
                "{shown:?} should contain {expected:?}"
            );
            assert_eq!(err.line, *line, "line of {shown:?}");
            assert!(!shown.contains('\n'), "one line: {shown:?}");
        }
    }

    #[test]
    fn several_programs_each_with_its_protocol_readiness_and_listeners() {
        let c = parse_str(
            "listeners:
  - {name: web, address: 127.0.0.1:8080}
  - {name: api, address: 127.0.0.1:8081}
workers:
  - name: rust
    command: sh
  - name: python
    command: sh
    protocol: systemd
    listeners: [api]
    notify_access: all
  - name: node
    command: sh
    protocol: systemd
    ready: {http: \"/tmp/health-{worker}.sock\", path: /healthz, timeout: 2s}
  - name: slow
    command: sh
    ready: {delay: 1500ms}
",
        )
        .unwrap();
        let names: Vec<&str> = c.programs.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["rust", "python", "node", "slow"]);
        assert_eq!(c.programs[0].protocol, Protocol::Baton);
        assert_eq!(c.programs[0].ready, Readiness::Channel);
        assert_eq!(c.programs[0].listeners, [0, 1]);
        assert_eq!(c.programs[1].ready, Readiness::Notify);
        assert_eq!(c.programs[1].listeners, [1]);
        assert_eq!(c.programs[1].notify_access, NotifyAccess::All);
        let Readiness::Probe(probe) = &c.programs[2].ready else {
            panic!("{:?}", c.programs[2].ready)
        };
        assert_eq!(probe.http_path.as_deref(), Some("/healthz"));
        assert_eq!(probe.timeout, Duration::from_secs(2));
        assert_eq!(probe.address_for(7, 1, 3), "/tmp/health-7.sock");
        assert_eq!(
            c.programs[3].ready,
            Readiness::Delay(Duration::from_millis(1500))
        );
    }

    #[test]
    fn liveness_recycle_and_output_read_as_written() {
        let c = parse_str(
            "listeners: []\nworkers:\n  - name: a\n    command: sh\n    liveness: {http: \"run/health-{worker}.sock\", path: /h, interval: 2s, threshold: 5, max_replacing: 25%, kill_after: 3s}\n    recycle: {max_rss: 512MiB, check_every: 5s, above_for: 20s}\n    output: inherit\n  - name: b\n    command: sh\n    liveness: {watchdog: 10s}\n",
        )
        .unwrap();
        let a = &c.programs[0];
        let live = a.liveness.as_ref().unwrap();
        assert_eq!((live.threshold, live.max_replacing_percent), (5, 25));
        assert_eq!(live.kill_after, Duration::from_secs(3));
        let LivenessCheck::Probe(probe) = &live.check else {
            panic!("{live:?}")
        };
        assert_eq!(
            probe.address, "/etc/baton/run/health-{worker}.sock",
            "relative to the file"
        );
        assert_eq!(
            (probe.interval, probe.timeout),
            (Duration::from_secs(2), Duration::from_secs(1))
        );
        let recycle = a.recycle.unwrap();
        assert_eq!(recycle.max_rss_kib, 512 * 1024);
        assert_eq!(
            (recycle.check_every, recycle.above_for),
            (Duration::from_secs(5), Duration::from_secs(20))
        );
        assert_eq!(a.output, Output::Inherit);
        let b = &c.programs[1];
        assert_eq!(
            b.liveness.as_ref().unwrap().check,
            LivenessCheck::Watchdog(Duration::from_secs(10))
        );
        assert_eq!(b.liveness.as_ref().unwrap().max_replacing_percent, 50);
        assert_eq!(b.output, Output::Capture);
    }

    #[test]
    fn a_reload_strategy_reads_as_written_with_its_batch_resolved() {
        use crate::supervisor::Strategy as Reload;
        let strategy = |reload: &str| {
            let text =
                format!("listeners: []\nworker: {{command: sh, processes: 8, reload: {reload}}}\n");
            parse_str(&text).map(|c| c.programs[0].reload)
        };
        for (reload, expected) in [
            ("{strategy: rolling}", Reload::Rolling { batch: 1 }),
            (
                "{strategy: rolling, batch: 3}",
                Reload::Rolling { batch: 3 },
            ),
            (
                "{strategy: rolling, batch: \"25%\"}",
                Reload::Rolling { batch: 2 },
            ),
            (
                "{strategy: rolling, batch: \"10%\"}",
                Reload::Rolling { batch: 1 },
            ),
            ("{strategy: all-at-once}", Reload::AllAtOnce),
        ] {
            assert_eq!(strategy(reload).unwrap(), expected, "{reload}");
        }
        assert_eq!(
            parse_str("listeners: []\nworker: {command: sh}\n")
                .unwrap()
                .programs[0]
                .reload,
            Reload::AllAtOnce
        );
        for (reload, problem) in [
            (
                "{strategy: rolling, batch: 9}",
                "worker.reload.batch: 9 is more than the program's 8 processes",
            ),
            (
                "{strategy: rolling, batch: 0}",
                "worker.reload.batch: must be at least 1",
            ),
            (
                "{strategy: rolling, batch: \"150%\"}",
                "worker.reload.batch: 150% is more than every process",
            ),
            ("{strategy: rolling, batch: lots}", "invalid batch \"lots\""),
            (
                "{strategy: all-at-once, batch: 2}",
                "a batch applies to `strategy: rolling` only",
            ),
            ("{strategy: phased}", "unknown variant `phased`"),
        ] {
            let err = strategy(reload).unwrap_err().to_string();
            assert!(err.contains(problem), "{reload}: {err}");
            assert!(err.contains("test.yaml:2"), "{reload}: where: {err}");
        }
    }

    #[test]
    fn program_errors_are_named() {
        let cases: &[(&str, &str)] = &[
            (
                "listeners: []\nworker: {command: sh, protocol: systemd, ready: channel}\n",
                "`channel` needs `protocol: baton`",
            ),
            (
                "listeners: []\nworker: {command: sh, ready: notify}\n",
                "`notify` needs `protocol: systemd`",
            ),
            (
                "listeners: []\nworker: {command: sh, ready: sometimes}\n",
                "invalid readiness \"sometimes\"",
            ),
            (
                "listeners: []\nworker: {command: sh, ready: {tcp: a, delay: 1s}}\n",
                "exactly one of",
            ),
            (
                "listeners: []\nworker: {command: sh, ready: {http: /x, path: health}}\n",
                "must start with /",
            ),
            (
                "listeners: []\nworker: {command: sh, protocol: inetd}\n",
                "unknown variant `inetd`",
            ),
            (
                "listeners: []\nworker: {command: sh, liveness: {watchdog: 5s, threshold: 0}}\n",
                "invalid liveness threshold 0: failures in a row, 1 to 100",
            ),
            (
                "listeners: []\nworker: {command: sh, liveness: {watchdog: 5s, interval: 1s}}\n",
                "invalid liveness: give exactly one of `http` (with `path`), `tcp`",
            ),
            (
                "listeners: []\nworker: {command: sh, liveness: {tcp: a, max_replacing: 150%}}\n",
                "invalid liveness max_replacing \"150%\"",
            ),
            (
                "listeners: []\nworker: {command: sh, recycle: {max_rss: 512MB}}\n",
                "invalid size \"512MB\": a number and KiB, MiB or GiB (512MiB)",
            ),
            (
                "listeners: []\nworker: {command: sh, output: tee}\n",
                "unknown variant `tee`",
            ),
            (
                "listeners: []\nworker: {command: sh, listeners: [nope]}\n",
                "no listener is named `nope`",
            ),
            (
                "listeners: []\nworkers:\n  - {command: sh}\n",
                "workers[0]: needs a `name`",
            ),
            (
                "listeners: []\nworkers:\n  - {name: a, command: sh}\n  - {name: a, command: sh}\n",
                "`a` is used twice",
            ),
            ("listeners: []\n", "missing `worker`"),
            (
                "listeners: []\nworker: {command: sh}\nworkers: []\n",
                "either `worker` or `workers`",
            ),
        ];
        for (text, expected) in cases {
            let shown = parse_str(text).expect_err(text).to_string();
            assert!(
                shown.contains(expected),
                "{shown:?} should contain {expected:?}"
            );
        }
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let text = "listeners:
  - {name: web, address: 192.0.2.1:80}
  - {name: sock, path: /nonexistent-dir/x.sock}
workers:
  - name: a
    command: ./missing
    listeners: [nope]
  - name: b
    command: sh
    protocol: systemd
    ready_timeout: 1s
    ready: {http: /tmp/h.sock, timeout: 2s}
";
        let shown = problems_of(
            text,
            &[
                "workers[0].command: /etc/baton/missing does not exist",
                "workers[0].listeners: no listener is named `nope`",
                "workers[1].ready: the probe's timeout (2000 ms)",
                "tcp://192.0.2.1:80 is not an address of this machine",
                "/nonexistent-dir is not a directory",
            ],
        );
        assert_eq!(shown.len(), 5, "{shown:#?}");
        // `parse` (used by run and reload) reports the first.
        assert_eq!(parse_str(text).unwrap_err().to_string(), shown[0]);
    }

    #[test]
    fn check_lists_every_problem_each_at_its_own_line() {
        let text = "\
listeners:
  - name: web
    address: 127.0.0.1:8080
  - name: web
    address: 127.0.0.1:8081
worker:
  command: /bin/sh
  colour: blue
  ready_timeout: 10
  processes: 0
supervisor:
  max_draining: 2
supervisor:
  max_draining: 3
";
        let shown = problems_of(
            text,
            &[
                "test.yaml:8:3: worker: unknown field `colour`",
                "test.yaml:9:18: worker.ready_timeout: invalid duration \"10\"",
                "test.yaml:10:14: worker.processes:",
                "test.yaml:13:1: duplicate field `supervisor`",
            ],
        );
        // The whole-file checks run on what could be read, at the second occurrence.
        assert!(
            shown
                .iter()
                .any(|s| s.contains("test.yaml:4: listeners[1]: name `web` is already used")),
            "{shown:#?}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1h2m3s").unwrap(), Duration::from_secs(3723));
        for bad in ["", "5", "s", "5 s", "-1s", "1.5s", "3d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn yaml_noise() -> impl Strategy<Value = String> {
        let keys = prop::sample::select(vec![
            "listeners",
            "worker",
            "workers",
            "name",
            "address",
            "path",
            "mode",
            "backlog",
            "command",
            "args",
            "env",
            "processes",
            "ready_timeout",
            "drain_timeout",
            "drain_signal",
            "ready",
            "protocol",
            "supervisor",
            "control",
            "socket",
            "max_draining",
            "user",
            "umask",
            "bogus",
        ]);
        let values = prop::sample::select(vec![
            "sh",
            "1",
            "0",
            "-1",
            "99999999999",
            "1s",
            "10",
            "[]",
            "{}",
            "\"[::1]:80\"",
            "127.0.0.1:0",
            "notify",
            "{delay: 2s}",
            "{http: /x}",
            "systemd",
            "SIGTERM",
            "\"0660\"",
            "~",
            "'",
            "[",
            "\"\\u0000\"",
            "nobody",
            "*a",
            "&a x",
            "!tag x",
        ]);
        prop::collection::vec((0usize..4, keys, values, any::<bool>()), 0..24).prop_map(|lines| {
            lines
                .into_iter()
                .map(|(indent, k, v, dash)| {
                    format!(
                        "{}{}{k}: {v}\n",
                        "  ".repeat(indent),
                        if dash { "- " } else { "" }
                    )
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        /// Whatever the file says, loading it gives a configuration or errors that name the
        /// file, on one line each: it never panics.
        #[test]
        fn the_config_loader_never_panics_on_yaml_shaped_noise(text in yaml_noise()) {
            if let Err(problems) = parse_all(Path::new("/etc/baton/fuzz.yaml"), &text) {
                prop_assert!(!problems.is_empty());
                for p in problems {
                    let shown = p.to_string();
                    prop_assert!(shown.starts_with("/etc/baton/fuzz.yaml"), "{}", shown);
                    prop_assert!(!shown.contains('\n'), "{}", shown);
                }
            }
        }

        #[test]
        fn the_config_loader_never_panics_on_bytes(text in "\\PC{0,300}") {
            let _ = parse_all(Path::new("/x.yaml"), &text);
        }
    }
}

#[test]
fn a_file_that_is_not_yaml_any_more_still_names_its_control_socket() {
    use std::path::{Path, PathBuf};
    let file = Path::new("/etc/baton/baton.yaml");
    let socket = |text: &str| super::validate::control_socket(file, text);
    // A half-written edit: an unclosed quote further down.
    let broken = "listeners:\n  - name: http\n    address: \"127.0.0.1:8080\nsupervisor:\n  control:\n    socket: /run/app/baton.sock   # for baton status\n";
    assert!(serde_yaml::from_str::<serde_yaml::Value>(broken).is_err());
    assert_eq!(socket(broken), Some(PathBuf::from("/run/app/baton.sock")));
    let flow =
        "worker: {command: [\nsupervisor: {control: {socket: \"/run/x.sock\", mode: \"0600\"}}\n";
    assert_eq!(socket(flow), Some(PathBuf::from("/run/x.sock")));
    // Two candidates, or none: nothing is guessed.
    assert_eq!(socket("a: [\nsocket: /a\nsocket: /b\n"), None);
    assert_eq!(socket("a: [\nwebsocket: /a\n"), None);
}

/// `baton status -c` reads the `supervisor:` block alone where it can be told, and finds what
/// reading the whole file finds; where it cannot (no such block, two, an anchor from
/// elsewhere), the whole file is read.
#[test]
fn the_control_socket_is_read_from_the_supervisor_block_as_from_the_whole_file() {
    use std::path::{Path, PathBuf};
    let file = Path::new("/etc/baton/baton.yaml");
    let socket = |text: &str| super::validate::control_socket(file, text);
    let whole = |text: &str| {
        let v: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
        v["supervisor"]["control"]["socket"]
            .as_str()
            .map(PathBuf::from)
    };
    let mut big = String::from("listeners:\n");
    for i in 0..2000 {
        big += &format!("  - {{name: l{i}, path: /run/l{i}.sock}}\n");
    }
    for (text, expected) in [
        (
            format!(
                "{big}supervisor:\n  # the control socket\n  control:\n    socket: /run/a.sock\n# a comment\n  max_draining: 2\nworker: {{command: x}}\n"
            ),
            "/run/a.sock",
        ),
        (
            format!("supervisor: {{control: {{socket: \"/run/b.sock\"}}}}\r\n{big}"),
            "/run/b.sock",
        ),
        // An anchor defined before the block: it does not parse alone; the whole file is read.
        (
            format!(
                "x-common: &sock /run/c.sock\n{big}supervisor:\n  control:\n    socket: *sock\n"
            ),
            "/run/c.sock",
        ),
    ] {
        assert_eq!(whole(&text), Some(PathBuf::from(expected)));
        assert_eq!(socket(&text), Some(PathBuf::from(expected)), "{expected}");
    }
    let block = |text: &str| super::validate::supervisor_block(text).map(str::to_string);
    assert_eq!(
        block("a: 1\nsupervisor:\n  control: {socket: /s}\n\n# c\nworker: 2\n").as_deref(),
        Some("supervisor:\n  control: {socket: /s}\n\n# c\n")
    );
    assert_eq!(block("supervisor_x: 1\n"), None, "another key");
    assert_eq!(
        block("a: 1\n  supervisor: 1\n"),
        None,
        "not at the top level"
    );
    assert_eq!(block("supervisor: 1\nsupervisor: 2\n"), None, "two");
    // No block: the whole file says there is no socket named (the default).
    assert_eq!(
        socket("listeners: []\n"),
        Some(PathBuf::from(super::DEFAULT_CONTROL_SOCKET))
    );
}

#[test]
fn an_open_files_limit_above_what_baton_may_give_is_refused_with_the_limit() {
    let ceiling = baton_sys::process::nofile_ceiling().unwrap();
    let text = format!(
        "listeners: []\nworker:\n  command: sh\n  rlimits: {{nofile: {}}}\n",
        ceiling + 1
    );
    let err = parse(Path::new("/etc/baton/baton.yaml"), &text)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "worker.rlimits.nofile: {} is above {ceiling}",
            ceiling + 1
        )),
        "{err}"
    );
    assert!(err.contains(":4:"), "at the key's line: {err}");
    let ok = format!("listeners: []\nworker:\n  command: sh\n  rlimits: {{nofile: {ceiling}}}\n");
    assert!(parse(Path::new("/etc/baton/baton.yaml"), &ok).is_ok());
}

/// Issue 28: one root cause, one message, at the key's own line, in the configuration's words
/// (no Rust type names, no key named twice, no "missing `worker`" after a bad program name).
#[test]
fn config_errors_are_said_once_in_plain_words_at_the_key() {
    let path = Path::new("/etc/baton/baton.yaml");
    let problems = |text: &str| -> Vec<String> {
        super::parse_all(path, text)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    assert_eq!(
        problems("listeners: []\nworker:\n  command: sh\n  processes: two\n"),
        vec![
            "/etc/baton/baton.yaml:4:14: worker.processes: expected a whole number (0 or more), not the text \"two\""
        ]
    );
    assert_eq!(
        problems(
            "listeners:\n  - name: a\n    address: 127.0.0.1:80\n    backlog: big\nworker:\n  command: sh\n"
        ),
        vec![
            "/etc/baton/baton.yaml:4:14: listeners[0].backlog: expected a whole number (0 or more), not the text \"big\""
        ]
    );
    assert_eq!(
        problems("listeners: []\nworkers:\n  - name: \"bad name!\"\n    command: sh\n"),
        vec![
            "/etc/baton/baton.yaml:3:11: workers[0].name: invalid program name \"bad name!\": use 1-255 of A-Z a-z 0-9 - _ ."
        ]
    );
    let list = problems("listeners: []\nworker:\n  command: sh\n  ready_timeout: [1]\n");
    assert_eq!(list.len(), 1, "{list:?}");
    assert!(
        list[0].ends_with("worker.ready_timeout: expected a string, not a list"),
        "{list:?}"
    );
}
