//! Black-box tests of baton: the real `baton` binary, real workers, real signals, real load on
//! loopback. One test binary; each test has its own temp dir and ports.
//!
//! Tests print what they measured (counts, timings) to stderr: visible with `--nocapture`.

#![allow(clippy::print_stderr)]

mod suite {
    mod bad_input;
    mod canary;
    mod chaos;
    mod config_watch;
    mod container;
    mod control;
    mod cpu;
    mod crash;
    mod datagrams;
    mod degraded;
    mod drain;
    mod failed_reload;
    mod faults;
    mod flat;
    mod handoff;
    mod hardening;
    mod hostile;
    mod kinds;
    mod kubernetes;
    mod listener_options;
    mod listeners;
    mod live_view;
    mod liveness;
    mod master_log;
    mod matrix;
    mod memory;
    mod orphans;
    mod output;
    mod process_tree;
    mod queues;
    mod quic;
    mod readiness;
    mod recipes;
    mod rolling;
    mod scale;
    mod signals;
    mod stalls;
    mod syscalls;
    mod systemd;
    mod systemd_workers;
    mod torture;
    mod unit_hardening;
    mod upgrade;
    mod zero_loss;
}
