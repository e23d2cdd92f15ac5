//! serde codecs shared by the types that cross a self-upgrade (the state machine, the
//! configuration, the upgrade state): an [`Instant`] as absolute `CLOCK_MONOTONIC` nanoseconds,
//! and a signal by name. A leaf: it imports nothing of the crate, so a `#[serde(with = ...)]`
//! path to it closes no cycle.
//!
//! Times: an [`Instant`] is `CLOCK_MONOTONIC`, and `execve` keeps the boot, so a deadline crosses
//! as absolute monotonic nanoseconds and fires at the same moment after the upgrade as before it.

use std::time::{Duration, Instant};

/// `CLOCK_MONOTONIC` now, in nanoseconds.
fn monotonic_ns() -> i128 {
    // CLOCK_MONOTONIC cannot fail on Linux (EINVAL is for unknown clocks, EFAULT for a bad
    // pointer); were it to, 0 would only shift a crossing deadline, never panic the upgrade.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |now| {
        now.tv_sec() as i128 * 1_000_000_000 + now.tv_nsec() as i128
    })
}

pub(crate) fn to_monotonic(instant: Instant) -> i128 {
    let (now, mono) = (Instant::now(), monotonic_ns());
    match instant.checked_duration_since(now) {
        Some(ahead) => mono + ahead.as_nanos() as i128,
        None => mono - now.duration_since(instant).as_nanos() as i128,
    }
}

pub(crate) fn from_monotonic(ns: i128) -> Instant {
    let (now, mono) = (Instant::now(), monotonic_ns());
    let delta = ns - mono;
    if delta >= 0 {
        now + Duration::from_nanos(delta as u64)
    } else {
        now.checked_sub(Duration::from_nanos((-delta) as u64))
            .unwrap_or(now)
    }
}

/// An [`Instant`] as absolute `CLOCK_MONOTONIC` nanoseconds.
pub(crate) mod mono {
    use std::time::Instant;

    use serde::{Deserialize, Deserializer, Serializer};

    use super::{from_monotonic, to_monotonic};

    pub(crate) fn serialize<S: Serializer>(instant: &Instant, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i128(to_monotonic(*instant))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Instant, D::Error> {
        Ok(from_monotonic(i128::deserialize(d)?))
    }
}

/// An optional [`Instant`], as [`mono`].
pub(crate) mod mono_opt {
    use std::time::Instant;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{from_monotonic, to_monotonic};

    pub(crate) fn serialize<S: Serializer>(
        instant: &Option<Instant>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        instant.map(to_monotonic).serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Instant>, D::Error> {
        Ok(Option::<i128>::deserialize(d)?.map(from_monotonic))
    }
}

/// An optional signal, by name (`SIGTERM`).
pub(crate) mod signal_opt {
    use baton_sys::process::SignalNumber;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::str::FromStr;

    pub(crate) fn serialize<S: Serializer>(
        signal: &Option<SignalNumber>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        signal.map(|sig| sig.as_str()).serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SignalNumber>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|name| SignalNumber::from_str(&name).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instant_crosses_as_the_same_monotonic_time() {
        let now = Instant::now();
        for instant in [
            now,
            now + Duration::from_secs(30),
            now - Duration::from_millis(5),
        ] {
            let back = from_monotonic(to_monotonic(instant));
            let error = if back > instant {
                back - instant
            } else {
                instant - back
            };
            assert!(error < Duration::from_millis(1), "{error:?}");
        }
    }
}
