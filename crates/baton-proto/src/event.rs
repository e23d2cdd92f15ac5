//! The names of the master's log events (the `event` field of each JSON log line), written
//! once: the master logs them through these constants and the test harness reads its log by
//! them (it refuses a name that is not here: a misspelt name fails at once instead of waiting
//! out a deadline). They are a tested interface: operators' tools match them too
//! ([docs/operations.md](../../../docs/operations.md)), so a name is never changed, only added.

pub const CANARY: &str = "canary";
pub const CONFIG_INVALID: &str = "config_invalid";
pub const CONFIG_WATCH: &str = "config_watch";
pub const CONFIG_WATCH_FAILED: &str = "config_watch_failed";
pub const CONFIG_WATCH_STOPPED: &str = "config_watch_stopped";
pub const CONTAINMENT: &str = "containment";
pub const CONTROL_ALIAS: &str = "control_alias";
pub const CONTROL_BAD_REQUEST: &str = "control_bad_request";
pub const CONTROL_BUSY: &str = "control_busy";
pub const CONTROL_DENIED: &str = "control_denied";
pub const CONTROL_DIRECTORY_SHARED: &str = "control_directory_shared";
pub const CONTROL_HUNG_UP: &str = "control_hung_up";
pub const CONTROL_LOST: &str = "control_lost";
pub const CONTROL_RESTARTED: &str = "control_restarted";
pub const CONTROL_SOCKET: &str = "control_socket";
pub const EXITING: &str = "exiting";
pub const FAULT_INJECTED: &str = "fault_injected";
pub const FAULTS_ARMED: &str = "faults_armed";
pub const FAULTS_REFUSED: &str = "faults_refused";
pub const GENERATION_DEGRADED: &str = "generation_degraded";
pub const GENERATION_DRAINING: &str = "generation_draining";
pub const GENERATION_EXITED: &str = "generation_exited";
pub const GENERATION_RECOVERED: &str = "generation_recovered";
pub const GUARD_STARTED: &str = "guard_started";
pub const HANDOFF_DONE: &str = "handoff_done";
pub const HANDOFF_LINKS: &str = "handoff_links";
pub const INHERITED_SOCKET: &str = "inherited_socket";
pub const KERNEL_DROPS: &str = "kernel_drops";
pub const LISTENER_CLOSED: &str = "listener_closed";
pub const LISTENER_REMOVED: &str = "listener_removed";
pub const LISTENING: &str = "listening";
pub const MAIN_PID_REFUSED: &str = "main_pid_refused";
pub const MASTER_GONE: &str = "master_gone";
pub const METRICS_BUSY: &str = "metrics_busy";
pub const METRICS_ENDPOINT: &str = "metrics_endpoint";
pub const METRICS_ENDPOINT_CLOSED: &str = "metrics_endpoint_closed";
pub const METRICS_UNAVAILABLE: &str = "metrics_unavailable";
pub const ORPHAN_ENDED: &str = "orphan_ended";
pub const ORPHANS_FOUND: &str = "orphans_found";
pub const OUTPUT: &str = "output";
pub const QUEUE_NEARLY_FULL: &str = "queue_nearly_full";
pub const QUIC_STEERED: &str = "quic_steered";
pub const REGISTRY_REFUSED: &str = "registry_refused";
pub const RELOAD_FAILED: &str = "reload_failed";
pub const RELOAD_QUEUED: &str = "reload_queued";
pub const RELOAD_RECEIPT: &str = "reload_receipt";
pub const RELOAD_REJECTED: &str = "reload_rejected";
pub const RELOAD_REQUESTED: &str = "reload_requested";
pub const RELOAD_STARTED: &str = "reload_started";
pub const RELOAD_SUCCEEDED: &str = "reload_succeeded";
pub const REOPEN_LOGS: &str = "reopen_logs";
pub const ROLLOUT_BATCH: &str = "rollout_batch";
pub const ROLLOUT_CANARY: &str = "rollout_canary";
pub const ROLLOUT_RETIRING: &str = "rollout_retiring";
pub const ROLLOUT_ROLLED_BACK: &str = "rollout_rolled_back";
pub const ROLLOUT_STARTED: &str = "rollout_started";
pub const SERVING: &str = "serving";
pub const SIGNAL_REFUSED: &str = "signal_refused";
pub const START_FAILED: &str = "start_failed";
pub const START_ONLY_SETTING: &str = "start_only_setting";
pub const STARTED: &str = "started";
pub const STOP_DELAY_ENDED: &str = "stop_delay_ended";
pub const STOP_DELAYED: &str = "stop_delayed";
pub const STOPPING: &str = "stopping";
pub const UPGRADE_EXEC: &str = "upgrade_exec";
pub const UPGRADE_FAILED: &str = "upgrade_failed";
pub const UPGRADE_REFUSED: &str = "upgrade_refused";
pub const UPGRADE_REQUESTED: &str = "upgrade_requested";
pub const UPGRADE_RESUME_DEGRADED: &str = "upgrade_resume_degraded";
pub const UPGRADE_RESUME_FAILED: &str = "upgrade_resume_failed";
pub const UPGRADE_SIGNAL_IGNORED: &str = "upgrade_signal_ignored";
pub const UPGRADED: &str = "upgraded";
pub const WORKER_CRASHED: &str = "worker_crashed";
pub const WORKER_EXITED: &str = "worker_exited";
pub const WORKER_KILLED: &str = "worker_killed";
pub const WORKER_KILLED_AGAIN: &str = "worker_killed_again";
pub const WORKER_MAIN_PID: &str = "worker_main_pid";
pub const WORKER_NOT_READY: &str = "worker_not_ready";
pub const WORKER_PROTOCOL_ERROR: &str = "worker_protocol_error";
pub const WORKER_READY: &str = "worker_ready";
pub const WORKER_RECYCLE_FAILED: &str = "worker_recycle_failed";
pub const WORKER_RECYCLED: &str = "worker_recycled";
pub const WORKER_SPAWNED: &str = "worker_spawned";
pub const WORKER_STATUS: &str = "worker_status";
pub const WORKER_UNHEALTHY: &str = "worker_unhealthy";

/// Every name above.
pub const ALL: &[&str] = &[
    CANARY,
    CONFIG_INVALID,
    CONFIG_WATCH,
    CONFIG_WATCH_FAILED,
    CONFIG_WATCH_STOPPED,
    CONTAINMENT,
    CONTROL_ALIAS,
    CONTROL_BAD_REQUEST,
    CONTROL_BUSY,
    CONTROL_DENIED,
    CONTROL_DIRECTORY_SHARED,
    CONTROL_HUNG_UP,
    CONTROL_LOST,
    CONTROL_RESTARTED,
    CONTROL_SOCKET,
    EXITING,
    FAULT_INJECTED,
    FAULTS_ARMED,
    FAULTS_REFUSED,
    GENERATION_DEGRADED,
    GENERATION_DRAINING,
    GENERATION_EXITED,
    GENERATION_RECOVERED,
    GUARD_STARTED,
    HANDOFF_DONE,
    HANDOFF_LINKS,
    INHERITED_SOCKET,
    KERNEL_DROPS,
    LISTENER_CLOSED,
    LISTENER_REMOVED,
    LISTENING,
    MAIN_PID_REFUSED,
    MASTER_GONE,
    METRICS_BUSY,
    METRICS_ENDPOINT,
    METRICS_ENDPOINT_CLOSED,
    METRICS_UNAVAILABLE,
    ORPHAN_ENDED,
    ORPHANS_FOUND,
    OUTPUT,
    QUEUE_NEARLY_FULL,
    QUIC_STEERED,
    REGISTRY_REFUSED,
    RELOAD_FAILED,
    RELOAD_QUEUED,
    RELOAD_RECEIPT,
    RELOAD_REJECTED,
    RELOAD_REQUESTED,
    RELOAD_STARTED,
    RELOAD_SUCCEEDED,
    REOPEN_LOGS,
    ROLLOUT_BATCH,
    ROLLOUT_CANARY,
    ROLLOUT_RETIRING,
    ROLLOUT_ROLLED_BACK,
    ROLLOUT_STARTED,
    SERVING,
    SIGNAL_REFUSED,
    START_FAILED,
    START_ONLY_SETTING,
    STARTED,
    STOP_DELAY_ENDED,
    STOP_DELAYED,
    STOPPING,
    UPGRADE_EXEC,
    UPGRADE_FAILED,
    UPGRADE_REFUSED,
    UPGRADE_REQUESTED,
    UPGRADE_RESUME_DEGRADED,
    UPGRADE_RESUME_FAILED,
    UPGRADE_SIGNAL_IGNORED,
    UPGRADED,
    WORKER_CRASHED,
    WORKER_EXITED,
    WORKER_KILLED,
    WORKER_KILLED_AGAIN,
    WORKER_MAIN_PID,
    WORKER_NOT_READY,
    WORKER_PROTOCOL_ERROR,
    WORKER_READY,
    WORKER_RECYCLE_FAILED,
    WORKER_RECYCLED,
    WORKER_SPAWNED,
    WORKER_STATUS,
    WORKER_UNHEALTHY,
];

#[cfg(test)]
mod tests {
    #[test]
    fn every_name_is_listed_once_in_snake_case() {
        let mut seen = std::collections::BTreeSet::new();
        for name in super::ALL {
            assert!(seen.insert(*name), "{name} twice");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()),
                "{name}"
            );
        }
        assert!(seen.len() > 80);
    }
}
