//! The `usage_by_dimension` view: the `usage` windows of a metric split by
//! the dimensions its meter groups by.
//!
//! For each metric whose latest `catalog.meter_defined` among the effective
//! events (by `time`, `source`, `id`) has a `group_by`: one row per
//! (`tenant`, `metric`, `granularity`, `window_start`, `group`), where
//! `group` is the JSON object text of the event's values for exactly the
//! `group_by` keys (keys in ascending byte order, a missing dimension as
//! `null`, no whitespace). Columns as in `usage`; summed over `group`,
//! `events` and `sum` equal the `usage` row of the same window.
//!
//! A meter definition that changes a metric's `group_by` (a new one, or a
//! void of one) regroups every window of the metric: the old rows are
//! written as tombstones and the new ones rebuilt from the ledger's usage
//! records (see [`super::ledger`]), which hold every effective usage
//! event's dimensions. Voids take their targets out as in `usage`. The
//! state is re-folded from the `events` archive at start-up.

use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, BooleanBuilder, Decimal128Builder, Int64Builder, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::catalog::Catalog;
use super::ledger::UsageRecord;
use super::slots::Slots;
use super::usage::Agg;
use super::window::Granularity;
use super::{Ledger, Names, Operator, OperatorError, SeriesIds, Step, Storage, Target};
use super::{decimal_type as dec, timestamp_type as ts};
use crate::event::decimal::{PRECISION, SCALE};
use crate::event::payload::Dimensions;
use crate::event::{Event, Payload, Text};

pub const VIEW: &str = "usage_by_dimension";

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("tenant", DataType::Utf8, false),
        Field::new("metric", DataType::Utf8, false),
        Field::new("granularity", DataType::Utf8, false),
        Field::new("window_start", ts(), false),
        Field::new("group", DataType::Utf8, false),
        Field::new("window_end", ts(), false),
        Field::new("events", DataType::Int64, false),
        Field::new("sum", dec(), true),
        Field::new("min", dec(), false),
        Field::new("max", dec(), false),
        Field::new("last", dec(), false),
        Field::new("unique_count", DataType::Int64, true),
        Field::new("_seq", DataType::UInt64, false),
        // Set when the window's group lost its last event (a void, or a
        // regrouping): the row is gone.
        Field::new("_deleted", DataType::Boolean, false),
    ]))
});

/// A window of one group: small ids, not strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    series: u32,
    granularity: Granularity,
    start: i64,
    group: u32,
}

/// What a window needs of one usage event.
#[derive(Clone, Copy)]
struct Use<'a> {
    time: i64,
    source: &'a Text,
    id: &'a Text,
    quantity: i128,
    unique: Option<&'a Text>,
}

/// The `usage_by_dimension` operator.
pub struct DimensionsOperator {
    granularities: Vec<Granularity>,
    /// The meters' definitions (`group_by`), kept whole so a void of one
    /// leaves the one before in force.
    catalog: Catalog,
    /// Window -> (end, aggregate, changed since the last `take_rows`), in
    /// slots that never move: there is a window per event and group at
    /// the finest granularity, and a map holding them inline copied every
    /// one on each doubling, the old table and the new alive at once.
    windows: Slots<Key, (i64, Agg, bool)>,
    /// Slots of the windows changed since the last `take_rows`, each once
    /// (the flag above): no set to hash into for every event.
    dirty: Vec<u32>,
    series: Vec<(Arc<str>, Arc<str>)>,
    series_ids: SeriesIds,
    /// Group texts.
    groups: Names,
    /// Reused for each usage event's group text.
    scratch: String,
    /// Some meter has a `group_by` ([`Catalog::any_grouped`], kept as the
    /// catalog changes): without one a usage event needs no lookup.
    grouped: bool,
}

/// The `group` text of an event's `dimensions` for the keys `group_by`.
pub fn group_text(group_by: &[String], dims: Option<&Dimensions>) -> String {
    let mut out = String::new();
    write_group_text(&mut out, group_by, dims);
    out
}

/// [`group_text`] into `out` (cleared first), allocating nothing once
/// `out` is large enough: it runs for every usage event of a grouped
/// metric. `group_by` keys in byte order are written in that order; any
/// other order is sorted first.
fn write_group_text(out: &mut String, group_by: &[String], dims: Option<&Dimensions>) {
    out.clear();
    out.push('{');
    let sorted = group_by
        .windows(2)
        .all(|w| w[0].as_bytes() < w[1].as_bytes());
    let mut owned: Vec<&String>;
    let keys: &mut dyn Iterator<Item = &String> = if sorted {
        &mut group_by.iter()
    } else {
        owned = group_by.iter().collect();
        owned.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        owned.dedup();
        &mut owned.into_iter()
    };
    for (i, k) in keys.enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(out, k);
        out.push(':');
        let value = dims.and_then(|d| d.iter().find(|(dk, _)| dk.as_str() == k.as_str()));
        match value {
            Some((_, v)) => push_json_str(out, v),
            None => out.push_str("null"),
        }
    }
    out.push('}');
}

/// Appends `s` as a JSON string: `"`, `\\` and U+0000-U+001F escaped
/// (as serde_json writes them), the rest as UTF-8.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    // Most values need no escape: one copy, not a push per character.
    if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                use std::fmt::Write;
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

impl DimensionsOperator {
    pub fn new(granularities: &[Granularity]) -> DimensionsOperator {
        let mut g = granularities.to_vec();
        g.sort();
        g.dedup();
        DimensionsOperator {
            granularities: g,
            catalog: Catalog::default(),
            windows: Slots::default(),
            dirty: Vec::new(),
            series: Vec::new(),
            series_ids: SeriesIds::default(),
            groups: Names::default(),
            scratch: String::new(),
            grouped: false,
        }
    }

    fn series_id(&mut self, tenant: &str, metric: &str) -> u32 {
        let (id, new) = self.series_ids.id(tenant, metric);
        if new {
            self.series.push((Arc::from(tenant), Arc::from(metric)));
        }
        id
    }

    fn group_by(&self, metric: &str) -> Option<Vec<String>> {
        self.catalog.meter(metric).and_then(|m| m.group_by.clone())
    }

    /// Adds one usage event of (`tenant`, `metric`) in group `group` to
    /// its windows.
    fn add(&mut self, tenant: &str, metric: &str, group: &str, u: Use<'_>) {
        let series = self.series_id(tenant, metric);
        let group = self.groups.id(group);
        for gi in 0..self.granularities.len() {
            let g = self.granularities[gi];
            let (start, end) = g.window(u.time);
            let key = Key {
                series,
                granularity: g,
                start,
                group,
            };
            let (slot, _) = self.windows.upsert(key, || (end, Agg::empty(), false));
            let Some((_, w)) = self.windows.slot_mut(slot) else {
                continue;
            };
            w.1.add_parts(u.time, u.source, u.id, u.quantity, u.unique);
            if !std::mem::replace(&mut w.2, true) {
                self.dirty.push(slot);
            }
        }
    }

    /// The metric's `group_by` may have changed: every window of the
    /// metric is written again from the ledger as it is after `seq`.
    fn regroup(&mut self, metric: &str, before: Option<Vec<String>>, ledger: &Ledger, seq: u64) {
        let now = self.group_by(metric);
        if now == before {
            return;
        }
        let mut gone = Vec::new();
        for (slot, (k, w)) in self.windows.entries_mut() {
            // A window without events and unchanged is written as gone
            // already (or its slot was freed).
            let held = w.1.events > 0 || w.2;
            if held
                && self
                    .series
                    .get(k.series as usize)
                    .is_some_and(|(_, m)| &**m == metric)
            {
                w.1 = Agg::empty();
                if !std::mem::replace(&mut w.2, true) {
                    gone.push(slot);
                }
            }
        }
        self.dirty.extend(gone);
        let Some(group_by) = now else {
            return;
        };
        let records: Vec<(String, String, UsageRecord)> = ledger
            .metric_usage_after(metric, seq)
            .map(|(t, r)| {
                let dims = r.extra.as_ref().and_then(|x| x.dimensions.as_deref());
                (t.to_owned(), group_text(&group_by, dims), r.clone())
            })
            .collect();
        for (tenant, group, r) in records {
            let unique = r.extra.as_ref().and_then(|x| x.unique.as_ref());
            let u = Use {
                time: r.time,
                source: &r.source,
                id: &r.id,
                quantity: r.quantity,
                unique,
            };
            self.add(&tenant, metric, &group, u);
        }
    }

    /// The slots of the windows with events, in key order (tenant, metric,
    /// granularity, start, group): the strings by their ranks, computed
    /// once, so that sorting compares integers, not strings for every pair
    /// of windows.
    fn sorted_slots(&self) -> Vec<u32> {
        let series = super::ids::ranks(&self.series);
        let groups = self.groups.ranks();
        let rank = |ranks: &[u32], i: u32| ranks.get(i as usize).copied().unwrap_or(u32::MAX);
        let mut slots: Vec<(u32, Granularity, i64, u32, u32)> = self
            .windows
            .entries()
            .enumerate()
            .filter(|(_, (_, w))| w.1.events > 0)
            .map(|(i, (k, _))| {
                (
                    rank(&series, k.series),
                    k.granularity,
                    k.start,
                    rank(&groups, k.group),
                    u32::try_from(i).unwrap_or(u32::MAX),
                )
            })
            .collect();
        slots.sort_unstable();
        slots.into_iter().map(|(.., i)| i).collect()
    }

    fn rows(&self, slots: &[u32], seq: u64) -> Result<RecordBatch, OperatorError> {
        let err = |source| OperatorError::Arrow { view: VIEW, source };
        let decb = || Decimal128Builder::new().with_precision_and_scale(PRECISION, SCALE as i8);
        let mut tenant = StringBuilder::new();
        let mut metric = StringBuilder::new();
        let mut gran = StringBuilder::new();
        let mut start = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let mut group = StringBuilder::new();
        let mut end = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let mut events = Int64Builder::new();
        let (mut sum, mut min, mut max, mut last) = (
            decb().map_err(err)?,
            decb().map_err(err)?,
            decb().map_err(err)?,
            decb().map_err(err)?,
        );
        let mut unique = Int64Builder::new();
        let mut seqs = UInt64Builder::new();
        let mut deleted = BooleanBuilder::new();
        for slot in slots {
            let Some((k, (e, a, _))) = self.windows.slot(*slot) else {
                continue;
            };
            let Some((t, m)) = self.series.get(k.series as usize) else {
                continue;
            };
            tenant.append_value(t);
            metric.append_value(m);
            gran.append_value(k.granularity.as_str());
            start.append_value(k.start);
            group.append_value(self.groups.name(k.group));
            end.append_value(*e);
            events.append_value(a.events);
            sum.append_option(a.sum());
            min.append_value(a.min);
            max.append_value(a.max);
            last.append_value(a.last);
            unique.append_option(a.unique_count());
            seqs.append_value(seq);
            deleted.append_value(a.events == 0);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(tenant.finish()),
            Arc::new(metric.finish()),
            Arc::new(gran.finish()),
            Arc::new(start.finish()),
            Arc::new(group.finish()),
            Arc::new(end.finish()),
            Arc::new(events.finish()),
            Arc::new(sum.finish()),
            Arc::new(min.finish()),
            Arc::new(max.finish()),
            Arc::new(last.finish()),
            Arc::new(unique.finish()),
            Arc::new(seqs.finish()),
            Arc::new(deleted.finish()),
        ];
        RecordBatch::try_new(Arc::clone(&SCHEMA), columns).map_err(err)
    }
}

impl Operator for DimensionsOperator {
    fn view(&self) -> &'static str {
        VIEW
    }

    fn schema(&self) -> SchemaRef {
        Arc::clone(&SCHEMA)
    }

    fn storage(&self) -> Storage {
        Storage::Versioned {
            key: &["tenant", "metric", "granularity", "window_start", "group"],
            internal: &[],
            final_column: Some("window_end"),
            deleted_column: Some("_deleted"),
        }
    }

    fn rebuilds_from_archive(&self) -> bool {
        true
    }

    fn step(&mut self, step: &Step<'_>, ledger: &Ledger) {
        match *step {
            Step::Apply { event, .. } => self.apply_from(event, ledger),
            Step::Voided { .. } => {}
            Step::Retract { void, targets, .. } => self.retract(void, targets, ledger),
        }
    }

    fn apply(&mut self, e: &Event) {
        // Without a ledger a new `group_by` cannot regroup: only
        // `step` is used by the processor.
        self.apply_from(e, &Ledger::new());
    }

    fn retract(&mut self, void: &Event, targets: &[Target], ledger: &Ledger) {
        let mut recompute: Vec<(Key, String, String, i64)> = Vec::new();
        for target in targets {
            let e = &target.event;
            if let Payload::MeterDefined { metric, .. } = &e.payload {
                let before = self.group_by(metric);
                self.catalog.remove(e);
                self.grouped = self.catalog.any_grouped();
                self.regroup(metric, before, ledger, void.stream_seq);
                continue;
            }
            let Payload::UsageRecorded {
                metric,
                quantity,
                unique,
                dimensions,
            } = &e.payload
            else {
                continue;
            };
            let Some(group_by) = self.group_by(metric) else {
                continue;
            };
            let group = group_text(&group_by, dimensions.as_deref());
            let (Some(series), Some(gid)) = (
                self.series_ids.get(&e.tenant, metric),
                self.groups.get(&group),
            ) else {
                continue;
            };
            for g in self.granularities.clone() {
                let (start, _) = g.window(e.time);
                let key = Key {
                    series,
                    granularity: g,
                    start,
                    group: gid,
                };
                if recompute.iter().any(|(k, ..)| *k == key) {
                    continue;
                }
                let Some(slot) = self.windows.slot_of(&key) else {
                    continue;
                };
                let Some((_, w)) = self.windows.slot_mut(slot) else {
                    continue;
                };
                if !w.1.remove(e, *quantity, unique.as_ref()) {
                    recompute.push((key, e.tenant.to_string(), group.clone(), e.time));
                }
                if !std::mem::replace(&mut w.2, true) {
                    self.dirty.push(slot);
                }
            }
        }
        for (key, tenant, group, time) in recompute {
            let Some((_, metric)) = self.series.get(key.series as usize).cloned() else {
                continue;
            };
            let Some(group_by) = self.group_by(&metric) else {
                continue;
            };
            let (start, end) = key.granularity.window(time);
            let agg = Agg::of(
                ledger
                    .usage_after(&tenant, &metric, time, void.stream_seq)
                    .filter(|r| r.time >= start && r.time < end)
                    .filter(|r| {
                        let dims = r.extra.as_ref().and_then(|x| x.dimensions.as_deref());
                        group_text(&group_by, dims) == group
                    }),
            );
            if let Some(w) = self.windows.get_mut(&key) {
                w.1 = agg;
            }
        }
    }

    fn take_rows(&mut self, seq: u64) -> Result<Option<RecordBatch>, OperatorError> {
        if self.dirty.is_empty() {
            return Ok(None);
        }
        let slots: Vec<u32> = std::mem::take(&mut self.dirty);
        let rows = self.rows(&slots, seq).map(Some);
        // A tombstone is written once; the state forgets the window and
        // its slot goes to a later window. Only the windows just written
        // can have become empty.
        for slot in &slots {
            let Some((k, w)) = self.windows.slot_mut(*slot) else {
                continue;
            };
            w.2 = false;
            if w.1.events == 0 {
                let k = *k;
                // Only while the key still owns this slot.
                if self.windows.slot_of(&k) == Some(*slot) {
                    self.windows.remove(&k);
                }
            }
        }
        rows
    }

    fn snapshot_chunks<'a>(
        &'a self,
        seq: u64,
    ) -> Box<dyn Iterator<Item = Result<RecordBatch, OperatorError>> + 'a> {
        super::in_chunks(self.sorted_slots(), move |slots| self.rows(slots, seq))
    }

    fn state_rows(&self) -> usize {
        self.windows.held()
    }
}

impl DimensionsOperator {
    fn apply_from(&mut self, e: &Event, ledger: &Ledger) {
        match &e.payload {
            Payload::MeterDefined { metric, .. } => {
                let before = self.group_by(metric);
                self.catalog.apply(e);
                self.grouped = self.catalog.any_grouped();
                self.regroup(metric, before, ledger, e.stream_seq);
            }
            Payload::UsageRecorded {
                metric,
                quantity,
                unique,
                dimensions,
            } => {
                if !self.grouped {
                    return;
                }
                // Borrowed, not cloned: this runs for every usage event.
                let Some(group_by) = self
                    .catalog
                    .meter(metric)
                    .and_then(|m| m.group_by.as_deref())
                else {
                    return;
                };
                let mut group = std::mem::take(&mut self.scratch);
                write_group_text(&mut group, group_by, dimensions.as_deref());
                let u = Use {
                    time: e.time,
                    source: &e.source,
                    id: &e.id,
                    quantity: *quantity,
                    unique: unique.as_ref(),
                };
                self.add(&e.tenant, metric, &group, u);
                self.scratch = group;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::operator::testing::{Fed, ev, rows_text, void};

    /// (granularity, group, events, sum) of every month row, sorted.
    fn months(op: &DimensionsOperator) -> Vec<(String, i64, String)> {
        let mut out: Vec<(String, i64, String)> = op
            .windows
            .entries()
            .filter(|(k, w)| k.granularity == Granularity::Month && w.1.events > 0)
            .map(|(k, w)| {
                (
                    op.groups.name(k.group).to_owned(),
                    w.1.events,
                    crate::event::decimal::to_string(w.1.sum().unwrap()),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// The `tokens` meter, summed, grouped by `by` (JSON).
    fn meter(id: &str, time: &str, by: &str) -> Event {
        ev(
            id,
            "_system",
            "catalog.meter_defined",
            time,
            &format!(r#"{{"metric":"tokens","aggregation":"sum","group_by":{by}}}"#),
        )
    }

    #[test]
    fn groups_follow_the_latest_meter_and_voids() {
        let usage = |id: &str, q: u32, dims: &str| {
            ev(
                id,
                "acme",
                "usage.recorded",
                "2025-01-05T10:00:00Z",
                &format!(r#"{{"metric":"tokens","quantity":{q},"dimensions":{dims}}}"#),
            )
        };
        let mut fed = Fed::default();
        let mut op = DimensionsOperator::new(&[Granularity::Hour, Granularity::Month]);
        // Usage before any meter: no rows until a group_by arrives.
        fed.feed(&mut op, &usage("u1", 10, r#"{"region":"eu","model":"a"}"#));
        assert!(months(&op).is_empty());
        fed.feed(
            &mut op,
            &meter("m1", "2025-01-01T00:00:00Z", r#"["region"]"#),
        );
        fed.feed(&mut op, &usage("u2", 5, r#"{"region":"us"}"#));
        fed.feed(&mut op, &usage("u3", 1, "{}"));
        assert_eq!(
            months(&op),
            [
                (r#"{"region":"eu"}"#.to_owned(), 1, "10".to_owned()),
                (r#"{"region":"us"}"#.to_owned(), 1, "5".to_owned()),
                (r#"{"region":null}"#.to_owned(), 1, "1".to_owned()),
            ]
        );
        // A later definition regroups the whole history.
        fed.feed(
            &mut op,
            &meter("m2", "2025-01-02T00:00:00Z", r#"["model"]"#),
        );
        assert_eq!(
            months(&op),
            [
                (r#"{"model":"a"}"#.to_owned(), 1, "10".to_owned()),
                (r#"{"model":null}"#.to_owned(), 2, "6".to_owned()),
            ]
        );
        // An older one changes nothing; a void of the newer brings the older back.
        fed.feed(&mut op, &meter("m0", "2024-12-01T00:00:00Z", "null"));
        assert_eq!(months(&op).len(), 2);
        fed.feed(
            &mut op,
            &void("v1", "_system", "2025-01-06T00:00:00Z", "s", "m2"),
        );
        assert_eq!(months(&op).len(), 3);
        // A void of usage takes it out of its group.
        fed.feed(
            &mut op,
            &void("v2", "acme", "2025-01-06T00:00:00Z", "s", "u2"),
        );
        assert_eq!(
            months(&op),
            [
                (r#"{"region":"eu"}"#.to_owned(), 1, "10".to_owned()),
                (r#"{"region":null}"#.to_owned(), 1, "1".to_owned()),
            ]
        );
        let rows = op.take_rows(9).unwrap().unwrap();
        assert!(rows.num_rows() >= 4, "tombstones are written too");
    }

    /// Folds `events` with `take_rows` after every `every` of them: the
    /// latest row per key (deleted ones dropped), and whether a batch ever
    /// wrote a key twice.
    fn latest_rows(events: &[Event], every: usize) -> (Vec<Vec<String>>, usize) {
        let mut fed = Fed::default();
        let mut op = DimensionsOperator::new(&[Granularity::Hour, Granularity::Month]);
        let mut latest: std::collections::BTreeMap<Vec<String>, Option<Vec<String>>> =
            Default::default();
        let mut seq = 0;
        for chunk in events.chunks(every) {
            for e in chunk {
                fed.feed(&mut op, e);
            }
            seq += 1;
            let Some(b) = op.take_rows(seq).unwrap() else {
                continue;
            };
            let mut keys = std::collections::HashSet::new();
            for v in rows_text(&b) {
                let key = v[..5].to_vec();
                assert!(keys.insert(key.clone()), "{key:?} twice in one batch");
                let row = (v[13] == "false").then(|| v[5..12].to_vec());
                latest.insert(key, row);
            }
        }
        let rows: Vec<Vec<String>> = latest
            .into_iter()
            .filter_map(|(mut k, v)| {
                k.extend(v?);
                Some(k)
            })
            .collect();
        assert_eq!(op.state_rows(), rows.len(), "windows held, every {every}");
        (rows, op.state_rows())
    }

    #[test]
    fn emptied_windows_give_their_slots_to_new_ones_in_any_batching() {
        let usage = |id: &str, time: &str, dims: &str| {
            ev(
                id,
                "acme",
                "usage.recorded",
                time,
                &format!(r#"{{"metric":"tokens","quantity":3,"dimensions":{dims}}}"#),
            )
        };
        let events = vec![
            meter("m1", "2025-01-01T00:00:00Z", r#"["region"]"#),
            usage(
                "u1",
                "2025-01-05T10:00:00Z",
                r#"{"region":"eu","model":"a"}"#,
            ),
            // Empties both eu windows: written as gone, their slots freed.
            void("v1", "acme", "2025-01-05T11:00:00Z", "s", "u1"),
            // New windows take the freed slots.
            usage(
                "u2",
                "2025-01-05T12:00:00Z",
                r#"{"region":"us","model":"b"}"#,
            ),
            usage(
                "u3",
                "2025-01-06T12:00:00Z",
                r#"{"region":"eu","model":"a"}"#,
            ),
            // Regrouping skips the freed slots and rebuilds the rest.
            meter("m2", "2025-01-02T00:00:00Z", r#"["model"]"#),
            void("v2", "acme", "2025-01-06T13:00:00Z", "s", "u3"),
            usage("u4", "2025-01-07T12:00:00Z", r#"{"model":"c"}"#),
            void("v3", "_system", "2025-01-07T13:00:00Z", "s", "m2"),
        ];
        let (all_at_once, held) = latest_rows(&events, events.len());
        assert_eq!(held, 4, "{all_at_once:?}");
        for every in [1, 2, 3] {
            assert_eq!(latest_rows(&events, every).0, all_at_once, "every {every}");
        }
    }

    #[test]
    fn group_texts_are_canonical() {
        let dims: Vec<(Text, Text)> = vec![
            (Text::from("model"), Text::from("gpt-5")),
            (Text::from("region"), Text::from("eu \"west\"")),
            (Text::from("tier"), Text::from("東京")),
        ];
        let by = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        assert_eq!(
            group_text(&by(&["region", "model", "zone"]), Some(&dims[..])),
            r#"{"model":"gpt-5","region":"eu \"west\"","zone":null}"#
        );
        assert_eq!(
            group_text(&by(&["tier"]), Some(&dims[..])),
            r#"{"tier":"東京"}"#
        );
        assert_eq!(group_text(&by(&["model"]), None), r#"{"model":null}"#);
    }

    #[test]
    fn group_texts_escape_as_serde_json_does() {
        for s in [
            "plain",
            "q\"uote",
            "back\\slash",
            "nl\n\r\t",
            "\u{1}\u{8}\u{c}\u{1f}",
            "東京 🚀",
            "\u{7f}",
        ] {
            let mut out = String::new();
            push_json_str(&mut out, s);
            assert_eq!(out, serde_json::to_string(s).unwrap());
        }
    }
}
