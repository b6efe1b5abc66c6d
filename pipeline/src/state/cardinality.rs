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

use xxhash_rust::xxh3::xxh3_64;

use crate::event::time::{DAY_US, civil_from_days};
use crate::event::{DlqReason, Event, Payload, Reject};

/// See the module documentation.
#[derive(Debug)]
pub struct DimensionGuard {
    max: usize,
    /// Hash of (tenant, metric, key, month) -> hashes of its values.
    seen: HashMap<u64, HashSet<u64>>,
}

/// (year, month) of the instant `t` (µs).
fn month_of(t: i64) -> (i64, i64) {
    let (y, m, _) = civil_from_days(t.div_euclid(DAY_US));
    (y, m)
}

fn slot(e: &Event, metric: &str, key: &str) -> u64 {
    let (y, m) = month_of(e.time);
    let mut buf = Vec::with_capacity(e.tenant.len() + metric.len() + key.len() + 16);
    for part in [e.tenant.as_bytes(), metric.as_bytes(), key.as_bytes()] {
        buf.extend_from_slice(part);
        buf.push(0xFF);
    }
    buf.extend_from_slice(&y.to_le_bytes());
    buf.extend_from_slice(&m.to_le_bytes());
    xxh3_64(&buf)
}

impl DimensionGuard {
    pub fn new(max: usize) -> DimensionGuard {
        DimensionGuard {
            max,
            seen: HashMap::new(),
        }
    }

    /// Refuses `e` if one of its dimension values would be past the bound.
    pub fn check(&self, e: &Event) -> Result<(), Reject> {
        let Payload::UsageRecorded {
            metric,
            dimensions: Some(dims),
            ..
        } = &e.payload
        else {
            return Ok(());
        };
        for (k, v) in dims.iter() {
            let Some(values) = self.seen.get(&slot(e, metric, k)) else {
                continue;
            };
            if values.len() >= self.max && !values.contains(&xxh3_64(v.as_bytes())) {
                let (y, m) = month_of(e.time);
                return Err(Reject::new(
                    DlqReason::TooManyDimensionValues,
                    format!(
                        "tenant {} already has {} distinct values of dimension `{k}` for metric `{metric}` in {y:04}-{m:02} (setting max_dimension_values); put identifiers such as request ids in `unique` or leave them out of `dimensions`",
                        e.tenant, self.max
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Counts the values of an accepted event.
    pub fn record(&mut self, e: &Event) {
        let Payload::UsageRecorded {
            metric,
            dimensions: Some(dims),
            ..
        } = &e.payload
        else {
            return;
        };
        for (k, v) in dims.iter() {
            self.seen
                .entry(slot(e, metric, k))
                .or_default()
                .insert(xxh3_64(v.as_bytes()));
        }
    }
}
