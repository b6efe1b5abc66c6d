//! The bound on dimension values: a tenant that sends a million distinct
//! values of one dimension (a request id where a model name belongs) would
//! make a million `usage_by_dimension` rows per window and keep them in
//! memory. At most `max_dimension_values` distinct values (default 10,000)
//! of each dimension key per (tenant, metric, calendar month of the event
//! time) are accepted; an event that would add one more is dead-lettered
//! as `too_many_dimension_values`, counted, and moves nothing.
//!
//! The decision is made message by message in stream order, like every
//! accept-or-refuse decision, after validation and before dedup (a re-send
//! of an accepted event carries values already counted, and is then a
//! duplicate). The state holds a 64-bit hash per accepted value, so it is
//! bounded by the setting; it is rebuilt from the `events` archive at
//! start-up like the dedup horizon.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::event::time::{DAY_US, civil_from_days};
use crate::event::validate::MAX_DIMENSIONS;
use crate::event::{DlqReason, Event, Payload, Reject};

/// The keys here are xxh3 hashes already: hashing them again would only
/// cost time. A (slot, value) pair is mixed into one word by a multiply.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Prehash = BuildHasherDefault<Prehashed>;

/// See the module documentation.
#[derive(Debug)]
pub struct DimensionGuard {
    max: usize,
    /// Every accepted (slot, value) hash pair, in one flat set: an event's
    /// value costs one probe whether its slot is new or not, instead of a
    /// probe for the slot and another in that slot's own set.
    seen: HashSet<(u64, u64), Prehash>,
    /// How many distinct values each slot has, read only for a value the
    /// slot has not seen.
    distinct: HashMap<u64, u32, Prehash>,
}

/// An event's dimensions as the guard counts them: (slot, value) hashes,
/// computed once for the check and the record, and which of them the
/// check found new (the record inserts only those).
#[derive(Debug, Clone, Copy)]
pub struct Values {
    len: usize,
    pairs: [(u64, u64); MAX_DIMENSIONS],
    /// Bit `i` set: `pairs[i]` was not in the guard at the check.
    new: u16,
}

impl Values {
    fn iter(&self) -> impl Iterator<Item = &(u64, u64)> {
        self.pairs.iter().take(self.len)
    }
}

/// (year, month) of the instant `t` (µs).
fn month_of(t: i64) -> (i64, i64) {
    let (y, m, _) = civil_from_days(t.div_euclid(DAY_US));
    (y, m)
}

/// The (slot, value) hashes of a usage event's dimensions; `None` for an
/// event without any. A slot is (tenant, metric, key, month of the time).
fn values(e: &Event) -> Option<Values> {
    let Payload::UsageRecorded {
        metric,
        dimensions: Some(dims),
        ..
    } = &e.payload
    else {
        return None;
    };
    let (y, m) = month_of(e.time);
    let mut buf = [0u8; 16];
    buf[..8].copy_from_slice(&y.to_le_bytes());
    buf[8..].copy_from_slice(&m.to_le_bytes());
    let series = xxh3_64_with_seed(
        &buf,
        xxh3_64_with_seed(metric.as_bytes(), xxh3_64(e.tenant.as_bytes())),
    );
    let mut out = Values {
        len: 0,
        pairs: [(0, 0); MAX_DIMENSIONS],
        new: 0,
    };
    for ((k, v), slot) in dims.iter().zip(out.pairs.iter_mut()) {
        *slot = (
            xxh3_64_with_seed(k.as_bytes(), series),
            xxh3_64(v.as_bytes()),
        );
        out.len += 1;
    }
    Some(out)
}

impl DimensionGuard {
    pub fn new(max: usize) -> DimensionGuard {
        DimensionGuard {
            max,
            seen: HashSet::default(),
            distinct: HashMap::default(),
        }
    }

    /// Refuses `e` if one of its dimension values would be past the bound;
    /// else what [`DimensionGuard::record_values`] counts if it is accepted.
    pub fn check(&self, e: &Event) -> Result<Option<Values>, Reject> {
        let Some(mut vals) = values(e) else {
            return Ok(None);
        };
        for i in 0..vals.len {
            let pair = vals.pairs[i];
            if self.seen.contains(&pair) {
                continue;
            }
            vals.new |= 1 << i;
            let distinct = self.distinct.get(&pair.0).copied().unwrap_or(0);
            if distinct as usize >= self.max {
                let (y, m) = month_of(e.time);
                let (metric, key) = match &e.payload {
                    Payload::UsageRecorded {
                        metric,
                        dimensions: Some(dims),
                        ..
                    } => (metric.as_str(), dims.get(i).map_or("", |(k, _)| k.as_str())),
                    _ => ("", ""),
                };
                return Err(Reject::new(
                    DlqReason::TooManyDimensionValues,
                    format!(
                        "tenant {} already has {} distinct values of dimension `{key}` for metric `{metric}` in {y:04}-{m:02} (setting max_dimension_values); put identifiers such as request ids in `unique` or leave them out of `dimensions`",
                        e.tenant, self.max
                    ),
                ));
            }
        }
        Ok(Some(vals))
    }

    /// Counts the values of an accepted event that the check found new.
    /// Nothing is recorded between an event's check and its record, so
    /// what was new then is new now.
    pub fn record_values(&mut self, vals: &Values) {
        for (i, pair) in vals.iter().enumerate() {
            if vals.new & (1 << i) != 0 && self.seen.insert(*pair) {
                *self.distinct.entry(pair.0).or_default() += 1;
            }
        }
    }

    /// Counts the values of an accepted event (one read back from the
    /// archive).
    pub fn record(&mut self, e: &Event) {
        if let Some(mut vals) = values(e) {
            vals.new = u16::MAX;
            self.record_values(&vals);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A validated usage event (as `tally run` would accept it).
    fn usage(id: &str, time: &str, region: &str) -> Event {
        let line = format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"s","type":"usage.recorded","time":"{time}","tenant":"acme","data":{{"metric":"calls","quantity":1,"dimensions":{{"region":"{region}","model":"m"}}}}}}"#
        );
        crate::event::validate_payload(line.as_bytes(), &crate::event::Limits::default()).unwrap()
    }

    #[test]
    fn bounds_distinct_values_per_key_and_month() {
        let mut g = DimensionGuard::new(2);
        for (i, r) in ["a", "b", "a"].iter().enumerate() {
            let v = g
                .check(&usage(&format!("u{i}"), "2026-01-05T00:00:00Z", r))
                .unwrap();
            g.record_values(&v.unwrap());
        }
        let err = g
            .check(&usage("u9", "2026-01-06T00:00:00Z", "c"))
            .unwrap_err();
        assert_eq!(err.reason, DlqReason::TooManyDimensionValues);
        assert!(err.detail.contains("dimension `region`"), "{}", err.detail);
        // A value already seen, another month, another key's values: fine.
        assert!(g.check(&usage("u10", "2026-01-07T00:00:00Z", "b")).is_ok());
        assert!(g.check(&usage("u11", "2026-02-01T00:00:00Z", "c")).is_ok());
        // Not recorded: checking alone counts nothing.
        assert!(g.check(&usage("u12", "2026-01-07T00:00:00Z", "b")).is_ok());
    }

    #[test]
    fn an_archived_event_counts_as_a_checked_one() {
        // Read back from the archive: recorded without a check.
        let mut g = DimensionGuard::new(2);
        g.record(&usage("u1", "2026-01-05T00:00:00Z", "a"));
        g.record(&usage("u2", "2026-01-05T00:00:00Z", "b"));
        g.record(&usage("u3", "2026-01-05T00:00:00Z", "b"));
        assert!(g.check(&usage("u4", "2026-01-05T00:00:00Z", "c")).is_err());
        // `model` is "m" in every event: one value of its own slot.
        let v = g
            .check(&usage("u5", "2026-01-06T00:00:00Z", "a"))
            .unwrap()
            .unwrap();
        assert_eq!(v.new, 0, "both values already seen");
        assert_eq!(g.distinct.len(), 2);
        assert_eq!(g.seen.len(), 3);
    }
}
