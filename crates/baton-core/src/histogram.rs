//! A histogram of durations with fixed buckets: what the metrics expose, in constant memory.
//! The state machine keeps one for reload durations and one for drain durations; they cross a
//! self-upgrade with it (state formats 2 and 3), and a format-1 state's list of durations is
//! read into buckets.

use std::marker::PhantomData;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The upper bounds of a histogram's buckets, in seconds (the `le` labels), ascending.
pub trait Buckets {
    const BOUNDS: &'static [f64];
}

/// Reload durations, request to verdict: from a few milliseconds (one worker) to a minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReloadBuckets;

impl Buckets for ReloadBuckets {
    const BOUNDS: &'static [f64] = &[
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
}

/// Drain durations: from a tenth of a second to five minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DrainBuckets;

impl Buckets for DrainBuckets {
    const BOUNDS: &'static [f64] = &[0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0];
}

/// Counts of observed durations per bucket (not cumulative; the last counts those above every
/// bound), their sum and their number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram<B> {
    counts: Vec<u64>,
    sum: Duration,
    count: u64,
    buckets: PhantomData<B>,
}

impl<B: Buckets> Default for Histogram<B> {
    fn default() -> Self {
        Histogram {
            counts: vec![0; B::BOUNDS.len() + 1],
            sum: Duration::ZERO,
            count: 0,
            buckets: PhantomData,
        }
    }
}

impl<B: Buckets> Histogram<B> {
    pub fn observe(&mut self, value: Duration) {
        let secs = value.as_secs_f64();
        let bucket = B::BOUNDS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(B::BOUNDS.len());
        self.counts[bucket] += 1;
        self.sum = self.sum.saturating_add(value);
        self.count += 1;
    }

    /// `(upper bound, observations at or below it)` for every bound, cumulative, as Prometheus
    /// exposes them; `None` is `+Inf`.
    pub fn cumulative(&self) -> Vec<(Option<f64>, u64)> {
        let mut total = 0;
        self.counts
            .iter()
            .enumerate()
            .map(|(i, n)| {
                total += n;
                (B::BOUNDS.get(i).copied(), total)
            })
            .collect()
    }

    pub fn sum(&self) -> Duration {
        self.sum
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// The serialized form (state formats 2 and 3).
#[derive(Serialize, Deserialize)]
struct Fixed {
    counts: Vec<u64>,
    sum: Duration,
    count: u64,
}

impl<B> Serialize for Histogram<B> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Fixed {
            counts: self.counts.clone(),
            sum: self.sum,
            count: self.count,
        }
        .serialize(s)
    }
}

impl<'de, B: Buckets> Deserialize<'de> for Histogram<B> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Fixed(Fixed),
            /// State format 1: every duration observed.
            Durations(Vec<Duration>),
        }
        match Form::deserialize(d)? {
            Form::Fixed(f) if f.counts.len() == B::BOUNDS.len() + 1 => Ok(Histogram {
                counts: f.counts,
                sum: f.sum,
                count: f.count,
                buckets: PhantomData,
            }),
            Form::Fixed(f) => Err(serde::de::Error::custom(format!(
                "histogram of {} buckets, expected {}",
                f.counts.len(),
                B::BOUNDS.len() + 1
            ))),
            Form::Durations(values) => {
                let mut h = Histogram::default();
                for value in values {
                    h.observe(value);
                }
                Ok(h)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them_and_add_up() {
        let mut h = Histogram::<DrainBuckets>::default();
        for ms in [50, 100, 101, 400_000] {
            h.observe(Duration::from_millis(ms));
        }
        let cumulative = h.cumulative();
        assert_eq!(cumulative.len(), DrainBuckets::BOUNDS.len() + 1);
        assert_eq!(cumulative[0], (Some(0.1), 2), "50 ms and exactly 100 ms");
        assert_eq!(cumulative[1], (Some(0.5), 3));
        assert_eq!(cumulative[7], (Some(300.0), 3));
        assert_eq!(cumulative[8], (None, 4), "400 s is above every bound");
        assert_eq!(h.count(), 4);
        assert_eq!(h.sum(), Duration::from_millis(400_251));
    }

    #[test]
    fn a_format_1_list_of_durations_reads_into_the_same_buckets() {
        let listed: Histogram<ReloadBuckets> =
            serde_json::from_str(r#"[{"secs":0,"nanos":4911041},{"secs":2,"nanos":0}]"#).unwrap();
        let mut observed = Histogram::<ReloadBuckets>::default();
        observed.observe(Duration::from_nanos(4_911_041));
        observed.observe(Duration::from_secs(2));
        assert_eq!(listed, observed);
        let again: Histogram<ReloadBuckets> =
            serde_json::from_str(&serde_json::to_string(&observed).unwrap()).unwrap();
        assert_eq!(again, observed);
    }

    #[test]
    fn buckets_of_another_histogram_are_refused() {
        let drain = serde_json::to_string(&Histogram::<DrainBuckets>::default()).unwrap();
        let err = serde_json::from_str::<Histogram<ReloadBuckets>>(&drain).unwrap_err();
        assert!(err.to_string().contains("expected 14"), "{err}");
    }
}
