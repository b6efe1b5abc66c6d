//! The `usage` view: tumbling event-time windows over `usage.recorded`.
//!
//! Key (`tenant`, `metric`, `granularity`, `window_start`); `events`, `sum`,
//! `min`, `max`, `last` in exact Decimal128(38, 9) (`last` = the quantity of
//! the greatest event by (`time`, `source`, `id`)), `unique_count` (exact:
//! each window keeps its distinct `unique` values); `is_final` is derived
//! when the view is read. A `sum` beyond Decimal128(38, 9) is NULL: no
//! number in the column could be mistaken for it.
//!
//! Over effective events only: a void takes its target back out of each
//! window (see [`super::ledger`]); a window left with none is written as a
//! tombstone (`_deleted`).
//!
//! Late events are never dropped: an event for an old window updates it.
//! How updated windows reach Parquet: every batch appends one file holding
//! the *new version* of each window it touched, stamped with the batch's
//! last stream sequence (`_seq`); the `usage` view keeps the latest version
//! per key. Compaction replaces the files with a snapshot of the current
//! state (one version per key). Costs: a batch writes only the windows it
//! touched (never a whole view); reads pay a per-key "latest version" pass
//! over at most one compaction interval of versions; the state (one entry
//! per window) lives in memory and is re-folded from the `events` archive
//! at start-up.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, BooleanBuilder, Decimal128Builder, Int64Builder, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use tracing::error;

use super::ledger::UsageRecord;
use super::restatements::Json;
use super::slots::{Recent, Slots};
use super::window::Granularity;
use super::{
    FinalRow, FixedState, Ledger, Operator, OperatorError, SNAPSHOT_CHUNK, SeriesIds, Step,
    Storage, Target, unit_events,
};
use crate::event::decimal::{self, PRECISION, SCALE};
use crate::event::time::format_micros;
use crate::event::{Event, Payload, Text};

pub const VIEW: &str = "usage";

use super::{decimal_type as dec, timestamp_type as ts};

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("tenant", DataType::Utf8, false),
        Field::new("metric", DataType::Utf8, false),
        Field::new("granularity", DataType::Utf8, false),
        Field::new("window_start", ts(), false),
        Field::new("window_end", ts(), false),
        Field::new("events", DataType::Int64, false),
        // NULL once the window's sum no longer fits Decimal128(38, 9).
        Field::new("sum", dec(), true),
        Field::new("min", dec(), false),
        Field::new("max", dec(), false),
        Field::new("last", dec(), false),
        // Distinct `unique` values; NULL when no event of the window has one.
        Field::new("unique_count", DataType::Int64, true),
        // Which event `last` came from, so a later (or late) event can be compared.
        Field::new("last_time", ts(), false),
        Field::new("last_source", DataType::Utf8, false),
        Field::new("last_id", DataType::Utf8, false),
        Field::new("_seq", DataType::UInt64, false),
        // Set when a void took the window's last event: the row is gone.
        Field::new("_deleted", DataType::Boolean, false),
    ]))
});

/// `Agg::sum` of a window whose sum went past Decimal128(38, 9): negative,
/// so never a real sum (quantities are >= 0). A marker value rather than an
/// `Option` keeps every window 16 bytes smaller.
const OVERFLOWED: i128 = i128::MIN;

/// Distinct `unique` values of a window or period, each with the number
/// of its events that carry it (so a void can take one back out). Most
/// hour windows see a single value: it is kept without a map (a map per
/// window would cost an allocation and a hash per event and about four
/// times the memory).
#[derive(Debug, Clone)]
pub enum Uniques {
    One(Text, u32),
    Many(HashMap<Text, u32, FixedState>),
}

impl Uniques {
    fn len(&self) -> usize {
        match self {
            Uniques::One(..) => 1,
            Uniques::Many(m) => m.len(),
        }
    }

    fn count_of(&self, u: &Text) -> u32 {
        match self {
            Uniques::One(v, n) => {
                if v == u {
                    *n
                } else {
                    0
                }
            }
            Uniques::Many(m) => m.get(u).copied().unwrap_or(0),
        }
    }

    fn add(&mut self, u: &Text) {
        match self {
            Uniques::One(v, n) if v == u => *n += 1,
            Uniques::One(v, n) => {
                let mut m = HashMap::with_capacity_and_hasher(4, FixedState);
                m.insert(std::mem::take(v), *n);
                m.insert(u.clone(), 1);
                *self = Uniques::Many(m);
            }
            Uniques::Many(m) => match m.get_mut(u) {
                Some(n) => *n += 1,
                None => {
                    m.insert(u.clone(), 1);
                }
            },
        }
    }

    /// Takes one event's `u` out; true when no value is left.
    fn remove(&mut self, u: &Text) -> bool {
        match self {
            Uniques::One(v, n) if v == u => {
                *n -= 1;
                *n == 0
            }
            Uniques::One(..) => false,
            Uniques::Many(m) => {
                if let Some(n) = m.get_mut(u) {
                    *n -= 1;
                    if *n == 0 {
                        m.remove(u);
                    }
                }
                m.is_empty()
            }
        }
    }
}

/// The same values with the same counts, however they are held.
impl PartialEq for Uniques {
    fn eq(&self, other: &Uniques) -> bool {
        let all = |a: &Uniques, b: &Uniques| match a {
            Uniques::One(v, n) => b.count_of(v) == *n,
            Uniques::Many(m) => m.iter().all(|(v, n)| b.count_of(v) == *n),
        };
        self.len() == other.len() && all(self, other)
    }
}

impl Eq for Uniques {}

/// Exact aggregate of one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agg {
    pub events: i64,
    /// The exact sum, or [`OVERFLOWED`]: read it through [`Agg::sum`].
    sum: i128,
    pub min: i128,
    pub max: i128,
    pub last: i128,
    /// (`time`, `source`, `id`) of the event `last` came from.
    pub last_key: (i64, Text, Text),
    /// The `unique` values seen; boxed and `None` until an event carries
    /// one, so windows of meters without them stay small.
    uniques: Option<Box<Uniques>>,
}

impl Agg {
    /// A window with no (effective) events: no row.
    pub fn empty() -> Agg {
        Agg {
            events: 0,
            sum: 0,
            min: 0,
            max: 0,
            last: 0,
            last_key: (i64::MIN, Text::default(), Text::default()),
            uniques: None,
        }
    }

    /// The aggregate of `records`; empty if there are none.
    pub fn of<'a>(records: impl Iterator<Item = &'a UsageRecord>) -> Agg {
        let mut agg = Agg::empty();
        for r in records {
            let unique = r.extra.as_ref().and_then(|x| x.unique.as_ref());
            agg.add_parts(r.time, &r.source, &r.id, r.quantity, unique);
        }
        agg
    }

    /// The sum of the quantities; `None` once it went past Decimal128(38, 9)
    /// (it stays `None`: more quantities, all >= 0, cannot bring it back).
    pub fn sum(&self) -> Option<i128> {
        (self.sum != OVERFLOWED).then_some(self.sum)
    }

    /// Distinct `unique` values; `None` when no event carries one.
    pub fn unique_count(&self) -> Option<i64> {
        self.uniques
            .as_ref()
            .filter(|u| u.len() > 0)
            .map(|u| i64::try_from(u.len()).unwrap_or(i64::MAX))
    }

    /// Folds one more usage event (`q` and `unique` from its payload);
    /// true if it took the sum past Decimal128(38, 9). Commutative: any
    /// arrival order gives the same result (with quantities >= 0 the sum
    /// overflows whatever the order).
    pub fn add(&mut self, e: &Event, q: i128, unique: Option<&Text>) -> bool {
        self.add_parts(e.time, &e.source, &e.id, q, unique)
    }

    /// Takes one event back out when that is arithmetic; false (and no
    /// change) when the aggregate must be recomputed from the window's
    /// remaining events: the event held the `min`, `max` or `last`, was
    /// the only one, or the sum had overflowed.
    pub fn remove(&mut self, e: &Event, q: i128, unique: Option<&Text>) -> bool {
        let was_last =
            self.last_key.0 == e.time && self.last_key.1 == e.source && self.last_key.2 == e.id;
        if self.events <= 1 || self.sum == OVERFLOWED || q == self.min || q == self.max || was_last
        {
            return false;
        }
        self.events -= 1;
        self.sum -= q;
        if let (Some(u), Some(set)) = (unique, self.uniques.as_mut())
            && set.remove(u)
        {
            // No event left carries one: as if none ever had.
            self.uniques = None;
        }
        true
    }

    /// [`Agg::add`] from an event's parts (a regrouping, a recompute).
    pub fn add_parts(
        &mut self,
        time: i64,
        source: &Text,
        id: &Text,
        q: i128,
        unique: Option<&Text>,
    ) -> bool {
        if let Some(u) = unique {
            match self.uniques.as_mut() {
                Some(set) => set.add(u),
                None => self.uniques = Some(Box::new(Uniques::One(u.clone(), 1))),
            }
        }
        if self.events == 0 {
            self.events = 1;
            self.sum = q;
            self.min = q;
            self.max = q;
            self.last = q;
            self.last_key = (time, source.clone(), id.clone());
            return false;
        }
        self.events += 1;
        let overflowed = self.sum != OVERFLOWED
            && match self.sum.checked_add(q).filter(|s| *s <= decimal::MAX) {
                Some(sum) => {
                    self.sum = sum;
                    false
                }
                None => {
                    self.sum = OVERFLOWED;
                    true
                }
            };
        self.min = self.min.min(q);
        self.max = self.max.max(q);
        // Time first; the strings only break ties.
        let newer = match time.cmp(&self.last_key.0) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => {
                (source.as_str(), id.as_str())
                    > (self.last_key.1.as_str(), self.last_key.2.as_str())
            }
        };
        if newer {
            self.last = q;
            // Short ids and sources are inline: no allocation per event.
            self.last_key = (time, source.clone(), id.clone());
        }
        overflowed
    }
}

/// A window: a small fixed-size key, so the three lookups per event hash
/// 16 bytes instead of two strings each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    /// Index into `series`: one (tenant, metric) pair.
    series: u32,
    granularity: Granularity,
    start: i64,
}

type Window = (i64, Agg, bool);

/// The windows, one slot each.
type Windows = Slots<Key, Window>;

/// The `usage` operator.
pub struct UsageOperator {
    granularities: Vec<Granularity>,
    /// Window -> (window end, aggregate, changed since the last `take_rows`).
    windows: Windows,
    /// Slots of the windows changed since the last `take_rows`, in
    /// first-change order (slots, not keys: no lookups to cut the rows).
    dirty: Vec<u32>,
    /// (tenant, metric) of each series id.
    series: Vec<(Arc<str>, Arc<str>)>,
    /// (tenant, metric) -> series id.
    series_ids: SeriesIds,
    /// Per series id and granularity, the window its last event fell in.
    /// A series' events mostly arrive in time order, so most events hit
    /// the same windows as the one before and skip both the window
    /// arithmetic and the index lookup.
    recent: Vec<[Recent; Granularity::COUNT]>,
}

impl UsageOperator {
    pub fn new(granularities: &[Granularity]) -> UsageOperator {
        let mut g = granularities.to_vec();
        g.sort();
        g.dedup();
        UsageOperator {
            granularities: g,
            windows: Windows::default(),
            dirty: Vec::new(),
            series: Vec::new(),
            series_ids: SeriesIds::default(),
            recent: Vec::new(),
        }
    }

    /// The series id of (`tenant`, `metric`), created on first sight.
    fn series_id(&mut self, tenant: &str, metric: &str) -> u32 {
        let (id, new) = self.series_ids.id(tenant, metric);
        if new {
            self.series.push((Arc::from(tenant), Arc::from(metric)));
            self.recent.push([Recent::NONE; Granularity::COUNT]);
        }
        id
    }

    /// Sort key of a window: (tenant, metric, granularity, start).
    /// The snapshot in chunks of `rows` windows (see
    /// [`Operator::snapshot_chunks`]).
    fn chunks_of<'a>(
        &'a self,
        seq: u64,
        rows: usize,
    ) -> Box<dyn Iterator<Item = Result<RecordBatch, OperatorError>> + 'a> {
        let windows = self.sorted_windows();
        let (n, rows) = (windows.len(), rows.max(1));
        Box::new((0..n.div_ceil(rows)).map(move |i| {
            let part = windows
                .get(i * rows..n.min((i + 1) * rows))
                .unwrap_or_default();
            self.rows(part.iter().copied(), Some(seq))
        }))
    }

    /// The windows with events, in key order: (tenant, metric) by rank,
    /// then granularity and start, so that the strings are compared once
    /// per series, not per pair of windows. Windows whose events were all
    /// voided are left out.
    fn sorted_windows(&self) -> Vec<&(Key, Window)> {
        let rank = super::ids::ranks(&self.series);
        // The sort key is computed once per window and sorted with it, so
        // that comparisons read two integers next to each other instead of
        // following a pointer into the windows and the ranks each time.
        let mut keyed: Vec<(u32, Granularity, i64, &(Key, Window))> = self
            .windows
            .entries()
            .filter(|(_, w)| w.1.events > 0)
            .map(|kw| {
                let k = &kw.0;
                let r = rank.get(k.series as usize).copied().unwrap_or(u32::MAX);
                (r, k.granularity, k.start, kw)
            })
            .collect();
        keyed.sort_unstable_by_key(|(r, g, start, _)| (*r, *g, *start));
        keyed.into_iter().map(|(.., kw)| kw).collect()
    }

    fn rows<'a>(
        &self,
        windows: impl Iterator<Item = &'a (Key, Window)>,
        seq: Option<u64>,
    ) -> Result<RecordBatch, OperatorError> {
        let mut tenant = StringBuilder::new();
        let mut metric = StringBuilder::new();
        let mut gran = StringBuilder::new();
        let mut start = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let mut end = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let mut events = Int64Builder::new();
        let dec = || Decimal128Builder::new().with_precision_and_scale(PRECISION, SCALE as i8);
        let err = |source| OperatorError::Arrow { view: VIEW, source };
        let (mut sum, mut min, mut max, mut last) = (
            dec().map_err(err)?,
            dec().map_err(err)?,
            dec().map_err(err)?,
            dec().map_err(err)?,
        );
        let mut unique_count = Int64Builder::new();
        let mut last_time = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let mut last_source = StringBuilder::new();
        let mut last_id = StringBuilder::new();
        let mut seqs = UInt64Builder::new();
        let mut deleted = BooleanBuilder::new();
        for (k, (window_end, a, _)) in windows {
            let Some((t, m)) = self.series.get(k.series as usize) else {
                continue;
            };
            tenant.append_value(t);
            metric.append_value(m);
            gran.append_value(k.granularity.as_str());
            start.append_value(k.start);
            end.append_value(*window_end);
            events.append_value(a.events);
            sum.append_option(a.sum());
            min.append_value(a.min);
            max.append_value(a.max);
            last.append_value(a.last);
            unique_count.append_option(a.unique_count());
            last_time.append_value(a.last_key.0);
            last_source.append_value(a.last_key.1.as_str());
            last_id.append_value(a.last_key.2.as_str());
            seqs.append_value(seq.unwrap_or(0));
            deleted.append_value(a.events == 0);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(tenant.finish()),
            Arc::new(metric.finish()),
            Arc::new(gran.finish()),
            Arc::new(start.finish()),
            Arc::new(end.finish()),
            Arc::new(events.finish()),
            Arc::new(sum.finish()),
            Arc::new(min.finish()),
            Arc::new(max.finish()),
            Arc::new(last.finish()),
            Arc::new(unique_count.finish()),
            Arc::new(last_time.finish()),
            Arc::new(last_source.finish()),
            Arc::new(last_id.finish()),
            Arc::new(seqs.finish()),
            Arc::new(deleted.finish()),
        ];
        RecordBatch::try_new(Arc::clone(&SCHEMA), columns).map_err(err)
    }
}

impl Operator for UsageOperator {
    fn view(&self) -> &'static str {
        VIEW
    }

    fn schema(&self) -> SchemaRef {
        Arc::clone(&SCHEMA)
    }

    fn storage(&self) -> Storage {
        Storage::Versioned {
            key: &["tenant", "metric", "granularity", "window_start"],
            internal: &["last_time", "last_source", "last_id"],
            final_column: Some("window_end"),
            deleted_column: Some("_deleted"),
        }
    }

    fn apply(&mut self, e: &Event) {
        let Payload::UsageRecorded {
            metric,
            quantity,
            unique,
            ..
        } = &e.payload
        else {
            return;
        };
        let unique = unique.as_ref();
        let series = self.series_id(&e.tenant, metric);
        for gi in 0..self.granularities.len() {
            let hit = self
                .recent
                .get(series as usize)
                .and_then(|r| r.get(gi))
                .and_then(|r| r.slot_at(e.time));
            let i = match hit {
                Some(i) => i,
                None => {
                    let g = self.granularities[gi];
                    let (start, end) = g.window(e.time);
                    let key = Key {
                        series,
                        granularity: g,
                        start,
                    };
                    let (i, made) = self.windows.upsert(key, || (end, Agg::empty(), true));
                    if let Some(r) = self
                        .recent
                        .get_mut(series as usize)
                        .and_then(|r| r.get_mut(gi))
                    {
                        *r = Recent {
                            start,
                            end,
                            slot: i,
                        };
                    }
                    if made {
                        self.dirty.push(i);
                    }
                    i
                }
            };
            if let Some((key, (end, agg, dirty))) = self.windows.slot_mut(i) {
                if agg.add(e, *quantity, unique) {
                    // Once per window: later events find the sum already NULL.
                    error!(
                        tenant = %e.tenant,
                        metric = %metric,
                        granularity = key.granularity.as_str(),
                        window_start = %format_micros(key.start),
                        window_end = %format_micros(*end),
                        "usage sum exceeds Decimal128(38, 9); the window's sum is NULL from now on"
                    );
                }
                if !std::mem::replace(dirty, true) {
                    self.dirty.push(i);
                }
            }
        }
    }

    /// A void's usage targets leave their windows: arithmetic when it can
    /// be, else the window is recomputed from its events in the ledger (as
    /// they are right after the void; once per window).
    fn retract(&mut self, void: &Event, targets: &[Target], ledger: &Ledger) {
        let mut recompute: Vec<(u32, i64, i64, i64)> = Vec::new();
        for target in targets {
            let e = &target.event;
            let Payload::UsageRecorded {
                metric,
                quantity,
                unique,
                ..
            } = &e.payload
            else {
                continue;
            };
            let series = self.series_id(&e.tenant, metric);
            for g in self.granularities.clone() {
                let (start, end) = g.window(e.time);
                let key = Key {
                    series,
                    granularity: g,
                    start,
                };
                let Some(i) = self.windows.slot_of(&key) else {
                    continue;
                };
                if recompute.iter().any(|(slot, ..)| *slot == i) {
                    continue;
                }
                let Some((_, (_, agg, dirty))) = self.windows.slot_mut(i) else {
                    continue;
                };
                if !agg.remove(e, *quantity, unique.as_ref()) {
                    recompute.push((i, start, end, e.time));
                }
                if !std::mem::replace(dirty, true) {
                    self.dirty.push(i);
                }
            }
        }
        for (i, start, end, time) in recompute {
            let Some((key, _)) = self.windows.slot(i) else {
                continue;
            };
            let Some((tenant, metric)) = self.series.get(key.series as usize) else {
                continue;
            };
            let agg = Agg::of(
                ledger
                    .usage_after(tenant, metric, time, void.stream_seq)
                    .filter(|r| r.time >= start && r.time < end),
            );
            if let Some((_, w)) = self.windows.slot_mut(i) {
                w.1 = agg;
            }
        }
    }

    /// Month windows are restated (metrics.md): the final month windows of
    /// the message's usage events.
    fn final_rows(&self, unit: &[Step<'_>], final_before: i64, _ledger: &Ledger) -> Vec<FinalRow> {
        let mut out = Vec::new();
        if !self.granularities.contains(&Granularity::Month) {
            return out;
        }
        for e in unit_events(unit) {
            let Payload::UsageRecorded { metric, .. } = &e.payload else {
                continue;
            };
            let (start, end) = Granularity::Month.window(e.time);
            if end > final_before {
                continue;
            }
            let Some(series) = self.series_ids.get(&e.tenant, metric) else {
                continue;
            };
            let key = Key {
                series,
                granularity: Granularity::Month,
                start,
            };
            let Some((_, agg, _)) = self.windows.get(&key).filter(|w| w.1.events > 0) else {
                continue;
            };
            out.push((
                Arc::from(e.tenant.as_str()),
                Json::new()
                    .str("granularity", Some("month"))
                    .str("metric", Some(metric))
                    .ts("window_start", Some(start))
                    .finish(),
                Json::new()
                    .ts("window_end", Some(end))
                    .int("events", Some(agg.events))
                    .dec("sum", agg.sum())
                    .dec("min", Some(agg.min))
                    .dec("max", Some(agg.max))
                    .dec("last", Some(agg.last))
                    .int("unique_count", agg.unique_count())
                    .finish(),
                true,
            ));
        }
        out
    }

    fn take_rows(&mut self, seq: u64) -> Result<Option<RecordBatch>, OperatorError> {
        if self.dirty.is_empty() {
            return Ok(None);
        }
        // In first-change order: row order inside a file carries no meaning,
        // and sorting string keys is a large share of the ingest time.
        let mut dirty = std::mem::take(&mut self.dirty);
        for i in &dirty {
            if let Some((_, w)) = self.windows.slot_mut(*i) {
                w.2 = false;
            }
        }
        let windows = &self.windows;
        let rows = self
            .rows(dirty.iter().filter_map(|i| windows.slot(*i)), Some(seq))
            .map(Some);
        dirty.clear();
        self.dirty = dirty;
        rows
    }

    fn snapshot_chunks<'a>(
        &'a self,
        seq: u64,
    ) -> Box<dyn Iterator<Item = Result<RecordBatch, OperatorError>> + 'a> {
        self.chunks_of(seq, SNAPSHOT_CHUNK)
    }

    fn state_rows(&self) -> usize {
        self.windows.len()
    }

    /// The windows are re-folded from the archive at start-up: their
    /// `unique` sets and the ledger a void recomputes from are not in the
    /// stored rows.
    fn rebuilds_from_archive(&self) -> bool {
        true
    }
}

/// What `f` logs, at every level, as text lines; with its result.
#[cfg(test)]
pub(crate) fn captured_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    use std::sync::Mutex;
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    (out, text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::testing::{Fed, rows_text, test_event, void};
    use arrow::array::{Array, Decimal128Array};
    use arrow::util::pretty::pretty_format_batches;

    fn usage(id: &str, source: &str, tenant: &str, metric: &str, time: &str, q: &str) -> Event {
        test_event(
            id,
            source,
            tenant,
            "usage.recorded",
            time,
            &format!(r#"{{"metric":"{metric}","quantity":{q}}}"#),
        )
    }

    fn grans(g: &[&str]) -> Vec<Granularity> {
        g.iter().filter_map(|s| Granularity::parse(s)).collect()
    }

    /// The state as sorted text rows, without the version column.
    fn table(op: &UsageOperator) -> String {
        let b = op.snapshot(0).unwrap().unwrap();
        let b = b
            .project(&(0..b.num_columns() - 2).collect::<Vec<_>>())
            .unwrap();
        pretty_format_batches(&[b]).unwrap().to_string()
    }

    /// The view that stored versions give: the latest row per key, without
    /// tombstones, in key order, as text lines.
    fn stored(versions: &[RecordBatch]) -> Vec<String> {
        let mut latest = std::collections::BTreeMap::new();
        for b in versions {
            let deleted = b.schema().index_of("_deleted").unwrap();
            for v in rows_text(b) {
                let key: Vec<String> = v[..4].to_vec();
                let row = v[..v.len() - 2].join("|");
                latest.insert(key, (v[deleted] == "false").then_some(row));
            }
        }
        latest.into_values().flatten().collect()
    }

    #[test]
    fn aggregates_exactly_per_window() {
        let mut op = UsageOperator::new(&grans(&["hour", "month"]));
        op.apply(&usage(
            "a",
            "s",
            "acme",
            "api_calls",
            "2026-01-05T10:15:00Z",
            "\"0.1\"",
        ));
        op.apply(&usage(
            "b",
            "s",
            "acme",
            "api_calls",
            "2026-01-05T10:45:00Z",
            "0.2",
        ));
        op.apply(&usage(
            "c",
            "s",
            "acme",
            "api_calls",
            "2026-01-05T11:00:00Z",
            "\"12.5\"",
        ));
        let hour = &op
            .windows
            .entries()
            .find(|(k, _)| {
                k.granularity == Granularity::Hour
                    && k.start % (3600 * 1_000_000) == 0
                    && k.start
                        == crate::event::time::parse_rfc3339_micros("2026-01-05T10:00:00Z").unwrap()
            })
            .unwrap()
            .1;
        assert_eq!(hour.1.events, 2);
        assert_eq!(hour.1.sum, 300_000_000, "0.1 + 0.2 is exactly 0.3");
        assert_eq!(hour.1.min, 100_000_000);
        assert_eq!(hour.1.max, 200_000_000);
        assert_eq!(hour.1.last, 200_000_000);
        let month = &op
            .windows
            .entries()
            .find(|(k, _)| k.granularity == Granularity::Month)
            .unwrap()
            .1;
        assert_eq!(
            (month.1.events, month.1.sum, month.1.last),
            (3, 12_800_000_000, 12_500_000_000)
        );
        assert_eq!(op.windows.len(), 3);
    }

    /// The largest whole quantity: 29 nines.
    const NINES: &str = "\"99999999999999999999999999999\"";

    #[test]
    fn a_sum_past_decimal128_is_null_for_good_and_logged_once() {
        let mut op = UsageOperator::new(&grans(&["hour", "month"]));
        let u = |id: &str, time: &str, q: &str| usage(id, "s", "acme", "api_calls", time, q);
        let ((), logs) = captured_logs(|| {
            op.apply(&u("a", "2026-01-05T10:15:00Z", NINES));
            op.apply(&u("b", "2026-01-05T10:45:00Z", NINES));
            op.apply(&u("c", "2026-01-05T10:50:00Z", "1"));
            op.apply(&u("d", "2026-01-05T11:00:00Z", "2"));
        });
        // One line per window that overflowed (10:00 and the month), not per event.
        assert_eq!(logs.matches("usage sum exceeds").count(), 2, "{logs}");
        for field in [
            "ERROR",
            "tenant=acme",
            "metric=api_calls",
            "granularity=\"hour\"",
            "window_start=2026-01-05T10:00:00Z",
            "window_end=2026-01-05T11:00:00Z",
            "granularity=\"month\"",
        ] {
            assert!(logs.contains(field), "{field}: {logs}");
        }
        let agg = |g: Granularity, start: &str| {
            let start = crate::event::time::parse_rfc3339_micros(start).unwrap();
            op.windows
                .entries()
                .find(|(k, _)| k.granularity == g && k.start == start)
                .map(|(_, w)| w.1.clone())
                .unwrap()
        };
        let hour = agg(Granularity::Hour, "2026-01-05T10:00:00Z");
        let nines = decimal::parse_decimal_string("99999999999999999999999999999").unwrap();
        assert_eq!(hour.sum(), None);
        assert_eq!(
            (hour.events, hour.min, hour.max, hour.last),
            (3, decimal::ONE, nines, decimal::ONE),
            "the other aggregates stay exact"
        );
        assert_eq!(agg(Granularity::Month, "2026-01-01T00:00:00Z").sum(), None);
        assert_eq!(
            agg(Granularity::Hour, "2026-01-05T11:00:00Z").sum(),
            Some(2 * decimal::ONE)
        );
        let rows = op.take_rows(1).unwrap().unwrap();
        let sums = rows
            .column_by_name("sum")
            .unwrap()
            .as_any()
            .downcast_ref::<Decimal128Array>()
            .unwrap();
        assert_eq!((sums.len(), sums.null_count()), (3, 2));

        // Voids of the events that overflowed bring the exact sum back.
        let mut fed = Fed::default();
        let mut voided = UsageOperator::new(&grans(&["hour", "month"]));
        for e in [
            u("a", "2026-01-05T10:15:00Z", NINES),
            u("b", "2026-01-05T10:45:00Z", NINES),
            u("c", "2026-01-05T10:50:00Z", "1"),
            u("d", "2026-01-05T11:00:00Z", "2"),
            void("v1", "acme", "2026-01-05T11:00:00Z", "s", "b"),
        ] {
            fed.feed(&mut voided, &e);
        }
        let window = |op: &UsageOperator, g: Granularity| {
            op.windows
                .entries()
                .find(|(k, _)| k.granularity == g)
                .map(|(_, w)| w.1.clone())
                .unwrap()
        };
        // The largest quantity plus 3 still does not fit.
        assert_eq!(window(&voided, Granularity::Month).sum(), None);
        assert_eq!(window(&voided, Granularity::Month).events, 3);
        assert_eq!(window(&voided, Granularity::Hour).events, 2);
        fed.feed(
            &mut voided,
            &void("v2", "acme", "2026-01-05T11:00:00Z", "s", "a"),
        );
        let month = window(&voided, Granularity::Month);
        assert_eq!(
            (month.events, month.sum(), month.min, month.max, month.last),
            (
                2,
                Some(3 * decimal::ONE),
                decimal::ONE,
                2 * decimal::ONE,
                2 * decimal::ONE
            )
        );
    }

    #[test]
    fn last_breaks_time_ties_by_source_then_id() {
        let mut op = UsageOperator::new(&grans(&["day"]));
        op.apply(&usage(
            "z",
            "b-src",
            "acme",
            "seats",
            "2026-01-05T10:00:00Z",
            "7",
        ));
        op.apply(&usage(
            "a",
            "b-src",
            "acme",
            "seats",
            "2026-01-05T10:00:00Z",
            "5",
        ));
        op.apply(&usage(
            "m",
            "a-src",
            "acme",
            "seats",
            "2026-01-05T10:00:00Z",
            "9",
        ));
        let (_, (_, agg, _)) = op.windows.entries().next().unwrap();
        assert_eq!(
            agg.last, 7_000_000_000,
            "greatest (time, source, id) is (t, b-src, z)"
        );
    }

    #[test]
    fn a_late_event_updates_its_old_window_and_is_written_again() {
        let mut op = UsageOperator::new(&grans(&["hour"]));
        op.apply(&usage(
            "a",
            "s",
            "acme",
            "api_calls",
            "2026-01-05T10:00:00Z",
            "1",
        ));
        let first = op.take_rows(10).unwrap().unwrap();
        assert_eq!(first.num_rows(), 1);
        op.apply(&usage(
            "b",
            "s",
            "acme",
            "api_calls",
            "2026-01-07T00:00:00Z",
            "1",
        ));
        op.take_rows(20).unwrap().unwrap();
        op.apply(&usage(
            "late",
            "s",
            "acme",
            "api_calls",
            "2026-01-05T10:30:00Z",
            "4",
        ));
        let again = op.take_rows(30).unwrap().unwrap();
        assert_eq!(again.num_rows(), 1, "only the touched window is rewritten");
        let sum = again
            .column_by_name("sum")
            .unwrap()
            .as_any()
            .downcast_ref::<Decimal128Array>()
            .unwrap()
            .value(0);
        assert_eq!(sum, 5_000_000_000);
        assert!(op.take_rows(40).unwrap().is_none());
    }

    /// Tiny deterministic PRNG for the property test.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) as usize) % n
        }
    }

    #[test]
    fn any_arrival_order_and_batching_gives_the_same_view() {
        let mut events = Vec::new();
        for i in 0..300 {
            let tenant = ["acme", "beta", "gamma"][i % 3];
            let metric = ["api_calls", "seats"][i % 2];
            // Many equal times, to exercise the (time, source, id) tie-break.
            let minute = (i * 7) % 90;
            let time = format!(
                "2026-01-{:02}T{:02}:{:02}:00Z",
                1 + i % 3,
                minute / 60,
                minute % 60
            );
            let q = format!("\"{}.{}\"", i % 17, i % 1000);
            events.push(usage(
                &format!("e{i}"),
                ["s1", "s2"][i % 2],
                tenant,
                metric,
                &time,
                &q,
            ));
        }
        let g = grans(&["minute", "hour", "day", "month"]);
        let mut reference = UsageOperator::new(&g);
        for e in &events {
            reference.apply(e);
        }
        // The snapshot in chunks is the snapshot, whatever the chunk size.
        let whole = reference.snapshot(9).unwrap().unwrap();
        assert!(whole.num_rows() > 100, "{}", whole.num_rows());
        for rows in [1, 7, whole.num_rows(), 10 * whole.num_rows()] {
            let chunks: Vec<RecordBatch> = reference
                .chunks_of(9, rows)
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(chunks.len(), whole.num_rows().div_ceil(rows));
            let joined = arrow::compute::concat_batches(&whole.schema(), &chunks).unwrap();
            assert_eq!(joined, whole, "chunks of {rows}");
        }
        let expected = table(&reference);
        let mut rng = Lcg(42);
        for round in 0..20 {
            let mut shuffled = events.clone();
            for i in (1..shuffled.len()).rev() {
                shuffled.swap(i, rng.next(i + 1));
            }
            // Random batch boundaries; the stored view is the latest version per key.
            let mut op = UsageOperator::new(&g);
            let mut versions = Vec::new();
            let mut seq = 0;
            for e in &shuffled {
                op.apply(e);
                if rng.next(10) == 0 {
                    seq += 1;
                    versions.extend(op.take_rows(seq).unwrap());
                }
            }
            seq += 1;
            versions.extend(op.take_rows(seq).unwrap());
            assert_eq!(table(&op), expected, "round {round}: state differs");
            assert_eq!(
                stored(&versions),
                stored(&[reference.snapshot(0).unwrap().unwrap()]),
                "round {round}: stored versions differ"
            );
        }
    }
}
