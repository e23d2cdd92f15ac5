//! systemd socket activation, read once for baton's master and its worker SDK alike: the
//! descriptors a service manager passed from [`LISTEN_FDS_START`] on (`LISTEN_FDS`), meant for
//! this process only (`LISTEN_PID`), with their names (`LISTEN_FDNAMES`, `:`-separated; a
//! missing name is `fd<number>`, as `sd_listen_fds_with_names` does).

use std::os::fd::{OwnedFd, RawFd};

/// The first descriptor of socket activation (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// More descriptors than any service manager passes: a larger `LISTEN_FDS` is refused.
pub const MAX_LISTEN_FDS: usize = 65_536;

/// Why the activation variables cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivationError {
    #[error(
        "LISTEN_PID={listen_pid} is not this process (pid {pid}): the descriptors are not ours"
    )]
    NotOurs { listen_pid: String, pid: u32 },
    #[error("invalid {var}={value:?}")]
    Invalid { var: &'static str, value: String },
}

/// The activation variables as found in an environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActivationEnv {
    pub listen_fds: Option<String>,
    pub listen_pid: Option<String>,
    pub listen_fdnames: Option<String>,
}

impl ActivationEnv {
    /// This process's variables.
    pub fn from_process() -> Self {
        let var = |name| std::env::var(name).ok();
        ActivationEnv {
            listen_fds: var("LISTEN_FDS"),
            listen_pid: var("LISTEN_PID"),
            listen_fdnames: var("LISTEN_FDNAMES"),
        }
    }

    /// The names and numbers the variables announce to process `pid`: `None` if `LISTEN_FDS`
    /// is unset (nothing was passed).
    fn announced(&self, pid: u32) -> Result<Option<Vec<(String, RawFd)>>, ActivationError> {
        let Some(count) = &self.listen_fds else {
            return Ok(None);
        };
        let listen_pid = self.listen_pid.clone().unwrap_or_default();
        if listen_pid.parse::<u32>().ok() != Some(pid) {
            return Err(ActivationError::NotOurs { listen_pid, pid });
        }
        let count: usize = count
            .parse()
            .ok()
            .filter(|&n| n <= MAX_LISTEN_FDS)
            .ok_or_else(|| ActivationError::Invalid {
                var: "LISTEN_FDS",
                value: count.clone(),
            })?;
        let names: Vec<&str> = self
            .listen_fdnames
            .as_deref()
            .map(|n| n.split(':').collect())
            .unwrap_or_default();
        Ok(Some(
            (0..count)
                .map(|i| {
                    let raw = LISTEN_FDS_START + i as RawFd;
                    let name = names
                        .get(i)
                        .filter(|n| !n.is_empty())
                        .map_or_else(|| format!("fd{raw}"), |n| n.to_string());
                    (name, raw)
                })
                .collect(),
        ))
    }
}

/// One passed descriptor: its name, its number, and the descriptor (or why it is unusable:
/// closed, or not inherited; see [`crate::channel::adopt_inherited`]).
#[derive(Debug)]
pub struct Passed {
    pub name: String,
    pub number: RawFd,
    pub fd: std::io::Result<OwnedFd>,
}

/// Takes the descriptors `env` passes to this process. `Ok(None)`: nothing was passed.
/// Each descriptor is adopted (at most once per process: a second call finds them taken).
pub fn listen_fds(env: &ActivationEnv) -> Result<Option<Vec<Passed>>, ActivationError> {
    let Some(announced) = env.announced(std::process::id())? else {
        return Ok(None);
    };
    Ok(Some(
        announced
            .into_iter()
            .map(|(name, number)| Passed {
                name,
                number,
                fd: crate::channel::adopt_inherited(number),
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(fds: Option<&str>, pid: Option<&str>, names: Option<&str>) -> ActivationEnv {
        ActivationEnv {
            listen_fds: fds.map(String::from),
            listen_pid: pid.map(String::from),
            listen_fdnames: names.map(String::from),
        }
    }

    #[test]
    fn nothing_passed_without_listen_fds() {
        assert_eq!(env(None, Some("7"), Some("http")).announced(7), Ok(None));
    }

    #[test]
    fn descriptors_are_numbered_from_3_and_named_or_defaulted() {
        let got = env(Some("3"), Some("7"), Some("http::admin")).announced(7);
        assert_eq!(
            got,
            Ok(Some(vec![
                ("http".into(), 3),
                ("fd4".into(), 4),
                ("admin".into(), 5)
            ]))
        );
        let unnamed = env(Some("2"), Some("7"), None).announced(7);
        assert_eq!(
            unnamed,
            Ok(Some(vec![("fd3".into(), 3), ("fd4".into(), 4)]))
        );
        assert_eq!(
            env(Some("0"), Some("7"), None).announced(7),
            Ok(Some(vec![]))
        );
    }

    #[test]
    fn another_process_s_descriptors_are_refused_by_name() {
        for pid in [Some("8"), None, Some("x")] {
            let err = env(Some("1"), pid, None).announced(7).unwrap_err();
            assert!(
                matches!(err, ActivationError::NotOurs { pid: 7, .. }),
                "{err}"
            );
            assert!(
                err.to_string().contains("not this process (pid 7)"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_bad_or_huge_count_is_invalid() {
        for count in ["", "-1", "three", "65537", "99999999999999999999"] {
            let err = env(Some(count), Some("7"), None).announced(7).unwrap_err();
            assert_eq!(
                err,
                ActivationError::Invalid {
                    var: "LISTEN_FDS",
                    value: count.into()
                }
            );
        }
        assert!(env(Some("65536"), Some("7"), None).announced(7).is_ok());
    }
}
