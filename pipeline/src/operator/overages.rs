//! The `overages` view: usage against the plan, per billing period, and
//! the threshold alerts.
//!
//! One row per (`tenant`, `period_start`, `metric`) with at least one
//! effective `usage.recorded` in the period. A tenant's billing periods
//! are calendar months until a subscription brings a `billing_anchor`
//! (see [`super::billing_period`]); when its anchors change, the usage
//! events whose period changed move between rows, read back from the
//! [`Ledger`]. A row depends on the month's usage, the
//! tenant's subscription fold (shared with the MRR views, see
//! [`super::subscription`]) and the catalog, so each is kept whole and a
//! row is recomputed when any of its inputs changes: a usage event marks
//! its key, a subscription event its tenant, a catalog event every key.
//! Changed rows are written as new versions, like `usage`.
//!
//! The state is rebuilt at start-up by re-folding the `events` archive
//! (catalog, subscription and usage events), except which thresholds were
//! already alerted, which is read back from the stored rows.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Decimal128Builder, Float64Builder, Int32Array,
    Int32Builder, Int64Builder, RecordBatch, StringArray, StringBuilder, TimestampMicrosecondArray,
    TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use tracing::error;

use super::FixedState;
use super::billing_period::{Located, Timeline};
use super::catalog::Catalog;
use super::restatements::Json;
use super::slots::{Recent, Slots};
use super::subscription::{Cursor, FoldState, History, SubEvent};
use super::usage::Agg;
use super::window::month_bounds;
use super::{
    FinalRow, Ledger, Operator, OperatorError, SeriesIds, Step, Storage, Target, required_column,
    unit_events,
};
use crate::event::alert::Alert;
use crate::event::decimal::{self, ONE, PRECISION, SCALE};
use crate::event::time::{DAY_US, format_micros};
use crate::event::{Aggregation, Event, Payload, PlanVersion, Text};

pub const VIEW: &str = "overages";
const THRESHOLDS: [i32; 3] = [80, 90, 100];

use super::{decimal_type as dec, timestamp_type as ts};

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("tenant", DataType::Utf8, false),
        Field::new("period", DataType::Date32, false),
        Field::new("metric", DataType::Utf8, false),
        Field::new("plan", DataType::Utf8, true),
        Field::new("aggregation", DataType::Utf8, false),
        // NULL when a `sum` metric's usage went past Decimal128(38, 9); so is
        // everything derived from it.
        Field::new("used", dec(), true),
        Field::new("included", dec(), true),
        Field::new("overage_quantity", dec(), true),
        Field::new("overage_amount", DataType::Int64, true),
        Field::new("currency", DataType::Utf8, true),
        Field::new("pct_used", DataType::Float64, true),
        Field::new("threshold", DataType::Int32, true),
        // The billing period [period_start, period_end): `is_final` =
        // period_end + lateness <= stream clock.
        Field::new("period_start", ts(), false),
        Field::new("period_end", ts(), false),
        // Bit set of the thresholds (80, 90, 100) already alerted: alerts happen once, across restarts.
        Field::new("alerted", DataType::Int32, false),
        Field::new("_seq", DataType::UInt64, false),
        // Set when voids took the period's last usage event: the row is
        // gone (and keeps its `alerted` bits: an alert is never repeated).
        Field::new("_deleted", DataType::Boolean, false),
    ]))
});

/// A computed row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub plan: Option<Text>,
    pub aggregation: Aggregation,
    /// `None` when the usage cannot be represented (a `sum` past
    /// Decimal128(38, 9)).
    pub used: Option<i128>,
    pub included: Option<i128>,
    pub overage_quantity: Option<i128>,
    pub overage_amount: Option<i64>,
    pub currency: Option<String>,
    pub pct_used: Option<f64>,
    pub threshold: Option<i32>,
}

type Key = (Arc<str>, i64, Arc<str>);

/// One row's state: a billing period of a (tenant, metric).
#[derive(Debug, Clone)]
struct Month {
    agg: Agg,
    /// `period_end`: the latest of `ends` (kept when the row empties, for
    /// its tombstone); the key holds `period_start`.
    end: i64,
    /// The ends of its effective events' own periods, with how many events
    /// have each: one value, unless periods of two series with this start
    /// were merged into the row.
    ends: Vec<(i64, u32)>,
    row: Option<Row>,
    /// Bit set of the thresholds (80, 90, 100, bits 0-2) reached so far:
    /// each is decided once, at the message that reaches it.
    alerted: i32,
    /// The bits as last written: a row is written again when they change.
    written: i32,
    /// What `used` is measured against, kept until the tenant's
    /// subscriptions or the catalog change (then `None`).
    limit: Option<Limit>,
    /// Changed since the last `take_rows` (its slot is in `dirty`).
    dirty: bool,
}

impl Month {
    /// Counts one more event whose own period ends at `end`; true when
    /// the row's `period_end` moved.
    fn add_end(&mut self, end: i64) -> bool {
        count_end(&mut self.ends, end);
        self.settle_end()
    }

    /// Takes one such event out; true when `period_end` moved.
    fn remove_end(&mut self, end: i64) -> bool {
        if let Some(i) = self.ends.iter().position(|(e, _)| *e == end)
            && let Some((_, n)) = self.ends.get_mut(i)
        {
            *n -= 1;
            if *n == 0 {
                self.ends.remove(i);
            }
        }
        self.settle_end()
    }

    /// `end` from `ends`; true when it moved (the row is then written
    /// again and its limit decided again: the plan is folded before it).
    fn settle_end(&mut self) -> bool {
        let Some(end) = self.ends.iter().map(|(e, _)| *e).max() else {
            return false;
        };
        if end == self.end {
            return false;
        }
        self.end = end;
        self.row = None;
        self.limit = None;
        true
    }
}

/// Counts one more event whose own period ends at `end` in a row's
/// `ends`.
fn count_end(ends: &mut Vec<(i64, u32)>, end: i64) {
    match ends.iter_mut().find(|(e, _)| *e == end) {
        Some((_, n)) => *n += 1,
        None => ends.push((end, 1)),
    }
}

/// What a month's threshold depends on besides its usage.
#[derive(Debug, Clone, Copy)]
struct Limit {
    aggregation: Aggregation,
    included: Option<i128>,
}

/// Every threshold bit.
const ALL_REACHED: i32 = (1 << THRESHOLDS.len()) - 1;

/// The months, one slot each: a usage event reaches its month through its
/// series' [`Recent`] slot without hashing the key's strings, and dirty
/// months are a list of slots.
type Months = Slots<Key, Month>;

/// A (tenant, metric) pair and the period its last usage event fell in.
struct Series {
    tenant: Arc<str>,
    metric: Arc<str>,
    recent: Recent,
    /// The end of that event's own period: the same for every instant
    /// `recent` covers.
    recent_end: i64,
}

pub struct OveragesOperator {
    lateness_us: i64,
    catalog: Catalog,
    subs: HashMap<Arc<str>, History>,
    months: Months,
    /// Slots of the months a usage event changed since the last `take_rows`.
    dirty: Vec<u32>,
    /// (tenant, metric) -> index into `series`: one string lookup per usage
    /// event, and none for the month when it is the series' last.
    series_ids: SeriesIds,
    series: Vec<Series>,
    dirty_tenants: BTreeSet<Arc<str>>,
    dirty_all: bool,
    /// Each tenant's month slots, to decide its thresholds again when its
    /// subscriptions change.
    tenant_months: HashMap<Arc<str>, Vec<u32>, FixedState>,
    /// Anchor timelines of the tenants that ever had a billing anchor;
    /// every other tenant bills by calendar month.
    timelines: HashMap<Arc<str>, Timeline, FixedState>,
    /// Largest accepted event time seen: the stream clock.
    clock: Option<i64>,
    /// Alerts are published only by a live run, never during restore or replay.
    pub live: bool,
    alerts: Vec<Alert>,
    names: HashMap<String, Arc<str>, FixedState>,
}

fn ceil_div(a: i128, b: i128) -> i128 {
    if b <= 0 {
        return 0;
    }
    a / b + i128::from(a % b != 0)
}

/// The `aggregation` column: the metric's aggregation as catalog events spell it.
fn aggregation_name(a: Aggregation) -> &'static str {
    match a {
        Aggregation::Sum => "sum",
        Aggregation::Count => "count",
        Aggregation::Max => "max",
        Aggregation::Latest => "latest",
        Aggregation::UniqueCount => "unique_count",
    }
}

/// `used` of a month: its usage under the metric's aggregation; `None`
/// when a `sum` went past Decimal128(38, 9), and then nothing is derived
/// from it (no overage quantity or amount unless unlimited, no percentage,
/// no threshold and so no alert).
fn used(agg: &Agg, aggregation: Aggregation) -> Option<i128> {
    match aggregation {
        Aggregation::Sum => agg.sum(),
        Aggregation::Count => Some(i128::from(agg.events).saturating_mul(ONE)),
        Aggregation::Max => Some(agg.max),
        Aggregation::Latest => Some(agg.last),
        // Events without a `unique` do not count: 0 when none has one.
        Aggregation::UniqueCount => Some(i128::from(agg.unique_count().unwrap_or(0)) * ONE),
    }
}

fn pct_used(used: Option<i128>, included: Option<i128>) -> Option<f64> {
    used.zip(included.filter(|inc| *inc > 0))
        .map(|(u, inc)| 100.0 * (u as f64) / (inc as f64))
}

/// The largest threshold `used` reaches against `included`, decided with
/// exact integers (`used * 100 >= included * t`); 100 when nothing is
/// included and something is used.
fn threshold(used: Option<i128>, included: Option<i128>) -> Option<i32> {
    match (used, included) {
        (Some(u), Some(0)) if u > 0 => Some(100),
        (Some(u), Some(inc)) if inc > 0 => THRESHOLDS.iter().rev().copied().find(|t| {
            match (u.checked_mul(100), inc.checked_mul(i128::from(*t))) {
                (Some(a), Some(b)) => a >= b,
                _ => pct_used(used, included).is_some_and(|p| p >= f64::from(*t)),
            }
        }),
        _ => None,
    }
}

/// Days since the epoch as `YYYY-MM-DD`.
fn date_text(start_us: i64) -> String {
    format_micros(start_us)
        .get(..10)
        .unwrap_or_default()
        .to_owned()
}

/// [`locate`] over instants that mostly fall in the period of the one
/// before: the last answer holds for its whole valid range, so only the
/// first instant of each range pays for the calendar arithmetic.
struct Locator<'a> {
    timeline: Option<&'a Timeline>,
    last: Option<Located>,
}

impl<'a> Locator<'a> {
    fn new(timeline: Option<&'a Timeline>) -> Locator<'a> {
        Locator {
            timeline,
            last: None,
        }
    }

    fn at(&mut self, t: i64) -> Located {
        match self.last {
            Some(l) if l.valid_from <= t && t < l.valid_to => l,
            _ => {
                let l = locate(self.timeline, t);
                self.last = Some(l);
                l
            }
        }
    }
}

/// Tenants' subscriptions folded at a sequence of instants: one cursor per
/// tenant, moved forward while the instants grow, started again when the
/// tenant changes or an instant goes back.
struct Folds<'a> {
    subs: &'a HashMap<Arc<str>, History>,
    tenant: Option<Arc<str>>,
    cursor: Option<Cursor<'a>>,
    at: i64,
}

impl<'a> Folds<'a> {
    fn new(subs: &'a HashMap<Arc<str>, History>) -> Folds<'a> {
        Folds {
            subs,
            tenant: None,
            cursor: None,
            at: i64::MIN,
        }
    }

    /// `tenant`'s subscriptions folded strictly before `t`.
    fn at(&mut self, tenant: &Arc<str>, t: i64) -> FoldState<'a> {
        if self.tenant.as_ref() != Some(tenant) || t < self.at {
            self.tenant = Some(Arc::clone(tenant));
            self.cursor = self.subs.get(tenant).map(History::cursor);
        }
        self.at = t;
        match &mut self.cursor {
            Some(c) => *c.advance_to(t),
            None => FoldState::default(),
        }
    }
}

/// The billing period `t` belongs to under `timeline`; calendar months
/// without one.
fn locate(timeline: Option<&Timeline>, t: i64) -> Located {
    match timeline {
        Some(tl) => tl.locate(t),
        None => {
            let (start, end) = month_bounds(t);
            Located {
                start,
                end,
                valid_from: start,
                valid_to: end,
            }
        }
    }
}

impl OveragesOperator {
    pub fn new(lateness_us: i64) -> OveragesOperator {
        OveragesOperator {
            lateness_us,
            catalog: Catalog::default(),
            subs: HashMap::new(),
            months: Months::default(),
            dirty: Vec::new(),
            series_ids: SeriesIds::default(),
            series: Vec::new(),
            dirty_tenants: BTreeSet::new(),
            dirty_all: false,
            tenant_months: HashMap::with_hasher(FixedState),
            timelines: HashMap::with_hasher(FixedState),
            clock: None,
            live: true,
            alerts: Vec::new(),
            names: HashMap::with_hasher(FixedState),
        }
    }

    /// The index of (`tenant`, `metric`) in `series`, created on first sight.
    fn series_id(&mut self, tenant: &str, metric: &str) -> usize {
        let (id, new) = self.series_ids.id(tenant, metric);
        if new {
            let series = Series {
                tenant: self.intern(tenant),
                metric: self.intern(metric),
                recent: Recent::NONE,
                recent_end: 0,
            };
            self.series.push(series);
        }
        id as usize
    }

    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.names.get(s) {
            return Arc::clone(a);
        }
        let a: Arc<str> = Arc::from(s);
        self.names.insert(s.to_owned(), Arc::clone(&a));
        a
    }

    /// The billing period of `tenant` that `t` belongs to.
    fn locate(&self, tenant: &str, t: i64) -> Located {
        locate(self.timelines.get(tenant), t)
    }

    /// The plan of `tenant` for the period [`s`, `e`), and its catalog version.
    fn plan(&self, tenant: &str, s: i64, e: i64) -> (Option<Text>, Option<&PlanVersion>) {
        let fold = self
            .subs
            .get(tenant)
            .map(|h| h.fold_before(e))
            .unwrap_or_default();
        self.plan_with(&fold, s, e)
    }

    /// [`Self::plan`] from the tenant's subscriptions folded to `e`.
    fn plan_with(
        &self,
        fold: &FoldState<'_>,
        s: i64,
        e: i64,
    ) -> (Option<Text>, Option<&PlanVersion>) {
        let plan = match (&fold.current, &fold.last_cancel) {
            (Some(cur), _) => Some(cur.terms.plan.clone()),
            (None, Some((cancelled, at))) if *at >= s => Some(cancelled.terms.plan.clone()),
            _ => None,
        };
        let version = plan
            .as_deref()
            .and_then(|p| self.catalog.plan_version(p, e));
        (plan, version)
    }

    fn limit(&self, tenant: &str, s: i64, e: i64, metric: &str) -> Limit {
        let (_, version) = self.plan(tenant, s, e);
        Limit {
            aggregation: self.catalog.aggregation(metric),
            included: version.and_then(|v| v.limits.get(metric)).copied(),
        }
    }

    /// [`Self::compute`] from the tenant's subscriptions folded to `e`.
    fn compute_with(&self, fold: &FoldState<'_>, s: i64, e: i64, metric: &str, agg: &Agg) -> Row {
        let (plan, version) = self.plan_with(fold, s, e);
        let aggregation = self.catalog.aggregation(metric);
        let used = used(agg, aggregation);
        let included = version.and_then(|v| v.limits.get(metric)).copied();
        let overage_quantity = match included {
            None => Some(0),
            Some(inc) => used.map(|u| (u - inc).max(0)),
        };
        let overage_amount = match version {
            None => None,
            Some(v) => match included {
                None => Some(0),
                Some(_) => v
                    .overage
                    .get(metric)
                    .zip(overage_quantity)
                    .map(|(p, over)| {
                        let packages = ceil_div(over, i128::from(p.per).saturating_mul(ONE));
                        i64::try_from(packages.saturating_mul(i128::from(p.unit_price)))
                            .unwrap_or(i64::MAX)
                    }),
            },
        };
        Row {
            plan,
            aggregation,
            used,
            included,
            overage_quantity,
            overage_amount,
            currency: version.map(|v| v.currency.clone()),
            pct_used: pct_used(used, included),
            threshold: threshold(used, included),
        }
    }

    /// Decides the thresholds of the month in `slot` after the message just
    /// applied: each one `used` now meets for the first time is reached
    /// here, and alerted if the period is not final by the stream clock
    /// after this message (metrics.md), so which alerts exist depends on
    /// the stream alone, never on batching.
    fn reach(&mut self, slot: u32) {
        let cached = match self.months.slot(slot) {
            Some((_, m)) if m.alerted == ALL_REACHED => return,
            Some((_, m)) => m.limit,
            None => return,
        };
        let limit = match cached {
            Some(l) => l,
            None => {
                let Some((k, m)) = self.months.slot(slot) else {
                    return;
                };
                self.limit(&k.0, k.1, m.end, &k.2)
            }
        };
        let Some((key, m)) = self.months.slot_mut(slot) else {
            return;
        };
        m.limit = Some(limit);
        let used = used(&m.agg, limit.aggregation);
        // A threshold is reached only by a known `used`.
        let (Some(reached), Some(used)) = (threshold(used, limit.included), used) else {
            return;
        };
        let mut newly = 0;
        for (bit, t) in THRESHOLDS.iter().enumerate() {
            if reached >= *t && m.alerted & (1 << bit) == 0 {
                newly |= 1 << bit;
            }
        }
        if newly == 0 {
            return;
        }
        m.alerted |= newly;
        if !std::mem::replace(&mut m.dirty, true) {
            self.dirty.push(slot);
        }
        let open = self
            .clock
            .is_none_or(|c| m.end.saturating_add(self.lateness_us) > c);
        if !(self.live && open) {
            return;
        }
        for (bit, t) in THRESHOLDS.iter().enumerate() {
            if newly & (1 << bit) != 0 {
                self.alerts.push(Alert {
                    tenant: key.0.to_string(),
                    period: date_text(key.1),
                    period_start: key.1,
                    metric: key.2.to_string(),
                    threshold: *t,
                    used: decimal::to_string(used),
                    included: limit.included.map(decimal::to_string),
                    time: self.clock.unwrap_or(0),
                });
            }
        }
    }

    /// Forgets the cached limits of `slots` and decides their thresholds
    /// again (their tenant's subscriptions or the catalog changed).
    fn reach_again(&mut self, slots: &[u32]) {
        for &slot in slots {
            if let Some((_, m)) = self.months.slot_mut(slot) {
                m.limit = None;
            }
            self.reach(slot);
        }
    }

    /// Folds one effective event; `ledger` (with the event's stream
    /// sequence) lets a change of anchors move usage between periods.
    fn fold(&mut self, e: &Event, sub: Option<&Arc<SubEvent>>, ledger: Option<&Ledger>) {
        self.clock = Some(self.clock.map_or(e.time, |c| c.max(e.time)));
        if self.catalog.apply(e) {
            self.dirty_all = true;
            let slots: Vec<u32> = self.tenant_months.values().flatten().copied().collect();
            self.reach_again(&slots);
            return;
        }
        if let Some(sub) = sub {
            let t = self.intern(&e.tenant);
            self.subs
                .entry(Arc::clone(&t))
                .or_default()
                .insert(Arc::clone(sub));
            self.subscriptions_changed(&t, ledger.map(|l| (l, e.stream_seq)));
            return;
        }
        if let Payload::UsageRecorded {
            metric,
            quantity,
            unique,
            ..
        } = &e.payload
        {
            let sid = self.series_id(&e.tenant, metric);
            let Some(series) = self.series.get(sid) else {
                return;
            };
            let (slot, own_end) = match series.recent.slot_at(e.time) {
                Some(slot) => (slot, series.recent_end),
                None => {
                    let (tenant, metric) = (Arc::clone(&series.tenant), Arc::clone(&series.metric));
                    let at = locate(self.timelines.get(&tenant), e.time);
                    let slot = self.month_slot(&tenant, at.start, at.end, &metric);
                    if let Some(series) = self.series.get_mut(sid) {
                        series.recent = Recent {
                            start: at.valid_from,
                            end: at.valid_to,
                            slot,
                        };
                        series.recent_end = at.end;
                    }
                    (slot, at.end)
                }
            };
            if let Some((_, m)) = self.months.slot_mut(slot) {
                m.agg.add(e, *quantity, unique.as_ref());
                m.add_end(own_end);
                if !std::mem::replace(&mut m.dirty, true) {
                    self.dirty.push(slot);
                }
            }
            self.reach(slot);
        }
    }

    /// The slot of row (`tenant`, `start`, `metric`), made (empty, ending
    /// at `end`) if there is none.
    fn month_slot(&mut self, tenant: &Arc<str>, start: i64, end: i64, metric: &Arc<str>) -> u32 {
        let key = (Arc::clone(tenant), start, Arc::clone(metric));
        let (slot, made) = self.months.upsert(key, || Month {
            agg: Agg::empty(),
            end,
            ends: Vec::new(),
            row: None,
            alerted: 0,
            written: 0,
            limit: None,
            dirty: true,
        });
        if made {
            self.tenant_months
                .entry(Arc::clone(tenant))
                .or_default()
                .push(slot);
            self.dirty.push(slot);
        }
        slot
    }

    /// `tenant`'s subscription history changed: its rows are recomputed,
    /// and if its anchors changed, the usage whose billing period changed
    /// moves (read from `ledger` as it is right after the message at the
    /// given sequence) and every row's `period_end` is decided again.
    fn subscriptions_changed(&mut self, tenant: &Arc<str>, ledger: Option<(&Ledger, u64)>) {
        let new = self.subs.get(tenant).map(Timeline::of).unwrap_or_default();
        let old = self.timelines.get(tenant).cloned().unwrap_or_default();
        if let Some((from, until)) = old.differing_span(&new) {
            if new.is_calendar() {
                self.timelines.remove(tenant);
            } else {
                self.timelines.insert(Arc::clone(tenant), new);
            }
            let slots = self.tenant_months.get(tenant).cloned().unwrap_or_default();
            for slot in &slots {
                if let Some((key, _)) = self.months.slot(*slot)
                    && let Some(sid) = self.series_ids.get(&key.0, &key.2)
                    && let Some(series) = self.series.get_mut(sid as usize)
                {
                    series.recent = Recent::NONE;
                }
            }
            if let Some((ledger, seq)) = ledger {
                self.move_usage(tenant, &old, (from, until), ledger, seq, &slots);
            }
        }
        let slots = self.tenant_months.get(tenant).cloned().unwrap_or_default();
        self.dirty_tenants.insert(Arc::clone(tenant));
        self.reach_again(&slots);
    }

    /// Moves `tenant`'s usage in [`from`, `until`) (where the old timeline
    /// and the new one differ; outside it every instant keeps its period)
    /// whose period under the old timeline differs from its period now:
    /// each row that loses or gains an event is recomputed from the
    /// ledger. The events are found through the rows (`slots`) that held
    /// them, which all end after `from`.
    fn move_usage(
        &mut self,
        tenant: &Arc<str>,
        old: &Timeline,
        (from, until): (i64, i64),
        ledger: &Ledger,
        seq: u64,
        slots: &[u32],
    ) {
        let mut months: BTreeSet<(Arc<str>, i64)> = BTreeSet::new();
        for slot in slots {
            let Some((key, m)) = self.months.slot(*slot) else {
                continue;
            };
            if m.end <= from {
                continue;
            }
            let mut month = month_bounds(key.1.max(from)).0;
            while month < m.end && month < until {
                months.insert((Arc::clone(&key.2), month));
                month = month_bounds(month).1;
            }
        }
        let (mut was_at, mut is_at) = (
            Locator::new(Some(old)),
            Locator::new(self.timelines.get(tenant)),
        );
        let mut rows: BTreeSet<(Arc<str>, i64)> = BTreeSet::new();
        for (metric, month) in &months {
            for r in ledger.usage_after(tenant, metric, *month, seq) {
                if r.time < from || r.time >= until {
                    continue;
                }
                let (was, is) = (was_at.at(r.time), is_at.at(r.time));
                // Another row, or the same start in another series (its
                // own end changed).
                if (was.start, was.end) != (is.start, is.end) {
                    rows.insert((Arc::clone(metric), was.start));
                    rows.insert((Arc::clone(metric), is.start));
                }
            }
        }
        for (metric, start) in rows {
            let (agg, ends) = self.period_state(ledger, tenant, &metric, start, seq);
            let key = (Arc::clone(tenant), start, Arc::clone(&metric));
            let slot = match self.months.slot_of(&key) {
                Some(slot) => slot,
                None if agg.events == 0 => continue,
                None => {
                    let end = ends.iter().map(|(e, _)| *e).max().unwrap_or(start);
                    self.month_slot(tenant, start, end, &metric)
                }
            };
            if let Some((_, m)) = self.months.slot_mut(slot) {
                m.agg = agg;
                m.ends = ends;
                m.settle_end();
                if !std::mem::replace(&mut m.dirty, true) {
                    self.dirty.push(slot);
                }
            }
        }
    }

    /// The aggregate and the own period ends of row (`tenant`, `start`,
    /// `metric`) right after the message at `seq`, from the ledger.
    fn period_state(
        &self,
        ledger: &Ledger,
        tenant: &str,
        metric: &str,
        start: i64,
        seq: u64,
    ) -> (Agg, Vec<(i64, u32)>) {
        let mut at = Locator::new(self.timelines.get(tenant));
        let mut ends: Vec<(i64, u32)> = Vec::new();
        let agg = Agg::of(
            self.period_usage(ledger, tenant, metric, start, seq)
                .inspect(|r| count_end(&mut ends, at.at(r.time).end)),
        );
        (agg, ends)
    }

    /// The effective usage records of row (`tenant`, `start`, `metric`)
    /// right after the message at `seq`. A period is at most 31 days: its
    /// records are in the calendar month of `start` or the next.
    fn period_usage<'a>(
        &'a self,
        ledger: &'a Ledger,
        tenant: &'a str,
        metric: &'a str,
        start: i64,
        seq: u64,
    ) -> impl Iterator<Item = &'a crate::operator::ledger::UsageRecord> + 'a {
        let next = month_bounds(start).1;
        let mut at = Locator::new(self.timelines.get(tenant));
        ledger
            .usage_after(tenant, metric, start, seq)
            .chain(ledger.usage_after(tenant, metric, next, seq))
            .filter(move |r| r.time >= start && at.at(r.time).start == start)
    }

    /// Alerts decided since the last call.
    pub fn take_alerts(&mut self) -> Vec<Alert> {
        std::mem::take(&mut self.alerts)
    }

    fn recompute(&mut self) -> Vec<Key> {
        // Slots, sorted and deduplicated as numbers: the keys' strings are
        // compared only to order the rows written.
        let mut slots: Vec<u32> = std::mem::take(&mut self.dirty);
        for i in &slots {
            if let Some((_, m)) = self.months.slot_mut(*i) {
                m.dirty = false;
            }
        }
        if self.dirty_all {
            slots = (0..u32::try_from(self.months.len()).unwrap_or(u32::MAX)).collect();
        } else {
            for t in std::mem::take(&mut self.dirty_tenants) {
                slots.extend(self.tenant_months.get(&t).into_iter().flatten());
            }
        }
        self.dirty_all = false;
        self.dirty_tenants.clear();
        slots.sort_unstable();
        slots.dedup();
        let mut keys: Vec<Key> = slots
            .iter()
            .filter_map(|i| self.months.slot(*i).map(|(k, _)| k.clone()))
            .collect();
        keys.sort_unstable();
        let mut changed = Vec::new();
        // In key order a tenant's period ends mostly grow: one pass over its
        // subscriptions serves all its rows.
        let mut folds = Folds::new(&self.subs);
        for key in keys {
            let Some(month) = self.months.get(&key) else {
                continue;
            };
            let fold = folds.at(&key.0, month.end);
            let row = self.compute_with(&fold, key.1, month.end, &key.2, &month.agg);
            if month.row.as_ref() == Some(&row) && month.written == month.alerted {
                continue;
            }
            // Once, when `used` becomes unknown (restore and replay, not live,
            // only re-derive what a live run already reported).
            if self.live
                && row.used.is_none()
                && month.row.as_ref().is_none_or(|r| r.used.is_some())
            {
                error!(
                    tenant = %key.0,
                    metric = %key.2,
                    period = %date_text(key.1),
                    "usage sum exceeds Decimal128(38, 9); overages.used is NULL for the period, and no overage, percentage or threshold is derived from it"
                );
            }
            if let Some(m) = self.months.get_mut(&key) {
                m.row = Some(row);
                m.written = m.alerted;
            }
            changed.push(key);
        }
        changed
    }

    /// The keys of the periods with a row, sorted.
    fn sorted_keys(&self) -> Vec<Key> {
        let mut keys: Vec<Key> = self
            .months
            .entries()
            .filter(|(_, m)| m.row.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        keys
    }

    fn rows(&self, keys: &[Key], seq: u64) -> Result<RecordBatch, OperatorError> {
        let err = |source| OperatorError::Arrow { view: VIEW, source };
        let dec = || Decimal128Builder::new().with_precision_and_scale(PRECISION, SCALE as i8);
        let mut tenant = StringBuilder::new();
        let mut period = Date32Builder::new();
        let mut metric = StringBuilder::new();
        let mut plan = StringBuilder::new();
        let mut aggregation = StringBuilder::new();
        let (mut used, mut included, mut oq) = (
            dec().map_err(err)?,
            dec().map_err(err)?,
            dec().map_err(err)?,
        );
        let mut amount = Int64Builder::new();
        let mut currency = StringBuilder::new();
        let mut pct = Float64Builder::new();
        let mut threshold = Int32Builder::new();
        let mut period_start = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let mut period_end = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let mut alerted = Int32Builder::new();
        let mut seqs = UInt64Builder::new();
        let mut deleted = BooleanBuilder::new();
        for key in keys {
            let Some(m) = self.months.get(key) else {
                continue;
            };
            let Some(r) = &m.row else { continue };
            tenant.append_value(&key.0);
            period.append_value(i32::try_from(key.1.div_euclid(DAY_US)).unwrap_or(i32::MAX));
            metric.append_value(&key.2);
            plan.append_option(r.plan.as_deref());
            aggregation.append_value(aggregation_name(r.aggregation));
            used.append_option(r.used);
            included.append_option(r.included);
            oq.append_option(r.overage_quantity);
            amount.append_option(r.overage_amount);
            currency.append_option(r.currency.as_deref());
            pct.append_option(r.pct_used);
            threshold.append_option(r.threshold);
            period_start.append_value(key.1);
            period_end.append_value(m.end);
            alerted.append_value(m.alerted);
            seqs.append_value(seq);
            deleted.append_value(m.agg.events == 0);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(tenant.finish()),
            Arc::new(period.finish()),
            Arc::new(metric.finish()),
            Arc::new(plan.finish()),
            Arc::new(aggregation.finish()),
            Arc::new(used.finish()),
            Arc::new(included.finish()),
            Arc::new(oq.finish()),
            Arc::new(amount.finish()),
            Arc::new(currency.finish()),
            Arc::new(pct.finish()),
            Arc::new(threshold.finish()),
            Arc::new(period_start.finish()),
            Arc::new(period_end.finish()),
            Arc::new(alerted.finish()),
            Arc::new(seqs.finish()),
            Arc::new(deleted.finish()),
        ];
        RecordBatch::try_new(Arc::clone(&SCHEMA), columns).map_err(err)
    }
}

impl Operator for OveragesOperator {
    fn view(&self) -> &'static str {
        VIEW
    }

    fn schema(&self) -> SchemaRef {
        Arc::clone(&SCHEMA)
    }

    fn storage(&self) -> Storage {
        Storage::Versioned {
            key: &["tenant", "period_start", "metric"],
            internal: &["alerted"],
            final_column: Some("period_end"),
            deleted_column: Some("_deleted"),
        }
    }

    fn rebuilds_from_archive(&self) -> bool {
        true
    }

    fn apply(&mut self, e: &Event) {
        let sub = SubEvent::from_event(e).map(Arc::new);
        self.apply_with(e, sub.as_ref());
    }

    /// Without a ledger, a subscription event that moves the tenant's
    /// anchors cannot move usage already folded: the processor folds
    /// through [`Operator::step`].
    fn apply_with(&mut self, e: &Event, sub: Option<&Arc<SubEvent>>) {
        self.fold(e, sub, None);
    }

    fn step(&mut self, step: &Step<'_>, ledger: &Ledger) {
        match *step {
            Step::Apply { event, sub } => self.fold(event, sub, Some(ledger)),
            Step::Voided { event, .. } => self.observe_voided(event),
            Step::Retract { void, targets, .. } => self.retract(void, targets, ledger),
        }
    }

    fn observe_voided(&mut self, e: &Event) {
        self.clock = Some(self.clock.map_or(e.time, |c| c.max(e.time)));
    }

    /// A void's targets leave the catalog, a subscription history or a
    /// period's usage (arithmetic when it can be, else the period is
    /// recomputed from the ledger); thresholds are decided again after it,
    /// since `used` of a `latest` meter can rise.
    fn retract(&mut self, void: &Event, targets: &[Target], ledger: &Ledger) {
        let mut recompute: Vec<u32> = Vec::new();
        let mut touched: Vec<u32> = Vec::new();
        let mut catalog = false;
        for target in targets {
            let e = &target.event;
            if self.catalog.remove(e) {
                catalog = true;
                continue;
            }
            if let Some(sub) = SubEvent::from_event(e) {
                let t = self.intern(&e.tenant);
                if let Some(h) = self.subs.get_mut(&t) {
                    h.remove(&sub);
                }
                self.subscriptions_changed(&t, Some((ledger, void.stream_seq)));
                continue;
            }
            let Payload::UsageRecorded {
                metric,
                quantity,
                unique,
                ..
            } = &e.payload
            else {
                continue;
            };
            let at = self.locate(&e.tenant, e.time);
            let key = (self.intern(&e.tenant), at.start, self.intern(metric));
            let Some(slot) = self.months.slot_of(&key) else {
                continue;
            };
            if !touched.contains(&slot) {
                touched.push(slot);
            }
            if recompute.contains(&slot) {
                continue;
            }
            if let Some((_, m)) = self.months.slot_mut(slot) {
                if m.agg.remove(e, *quantity, unique.as_ref()) {
                    m.remove_end(at.end);
                } else {
                    recompute.push(slot);
                }
                if !std::mem::replace(&mut m.dirty, true) {
                    self.dirty.push(slot);
                }
            }
        }
        for slot in recompute {
            let Some((key, _)) = self.months.slot(slot) else {
                continue;
            };
            let (agg, ends) = self.period_state(ledger, &key.0, &key.2, key.1, void.stream_seq);
            if let Some((_, m)) = self.months.slot_mut(slot) {
                m.agg = agg;
                m.ends = ends;
                m.settle_end();
            }
        }
        for slot in touched {
            self.reach(slot);
        }
        if catalog {
            self.dirty_all = true;
            let slots: Vec<u32> = self.tenant_months.values().flatten().copied().collect();
            self.reach_again(&slots);
        }
    }

    /// The final periods the message may change: its usage events'
    /// periods, every period of a tenant whose subscriptions it changes,
    /// every period for a catalog event.
    fn final_rows(&self, unit: &[Step<'_>], final_before: i64, _ledger: &Ledger) -> Vec<FinalRow> {
        let mut slots: Vec<u32> = Vec::new();
        let mut all = false;
        for e in unit_events(unit) {
            match &e.payload {
                Payload::PlanPublished(_) | Payload::MeterDefined { .. } => all = true,
                Payload::UsageRecorded { metric, .. } => {
                    let (Some(t), Some(m)) = (
                        self.names.get(e.tenant.as_str()),
                        self.names.get(metric.as_str()),
                    ) else {
                        continue;
                    };
                    let key = (Arc::clone(t), self.locate(t, e.time).start, Arc::clone(m));
                    slots.extend(self.months.slot_of(&key));
                }
                _ => {
                    if SubEvent::from_event(e).is_some() {
                        slots.extend(
                            self.tenant_months
                                .get(e.tenant.as_str())
                                .into_iter()
                                .flatten(),
                        );
                    }
                }
            }
        }
        if all {
            slots = self.tenant_months.values().flatten().copied().collect();
        }
        slots.sort_unstable();
        slots.dedup();
        // By tenant and period end: one pass over a tenant's subscriptions.
        let mut rows: Vec<(&Key, &Month)> = slots
            .into_iter()
            .filter_map(|slot| self.months.slot(slot))
            .map(|(k, m)| (k, m))
            .filter(|(_, m)| m.agg.events != 0)
            .collect();
        rows.sort_unstable_by(|a, b| (&a.0.0, a.1.end).cmp(&(&b.0.0, b.1.end)));
        let mut folds = Folds::new(&self.subs);
        let mut out = Vec::new();
        for (key, m) in rows {
            let (start, end) = (key.1, m.end);
            let fold = folds.at(&key.0, end);
            let r = self.compute_with(&fold, start, end, &key.2, &m.agg);
            out.push((
                Arc::clone(&key.0),
                Json::new()
                    .str("metric", Some(&key.2))
                    .ts("period_start", Some(start))
                    .finish(),
                Json::new()
                    .date("period", Some(start))
                    .ts("period_end", Some(end))
                    .str("plan", r.plan.as_deref())
                    .str("aggregation", Some(aggregation_name(r.aggregation)))
                    .dec("used", r.used)
                    .dec("included", r.included)
                    .dec("overage_quantity", r.overage_quantity)
                    .int("overage_amount", r.overage_amount)
                    .str("currency", r.currency.as_deref())
                    .float("pct_used", r.pct_used)
                    .int("threshold", r.threshold.map(i64::from))
                    .finish(),
                end <= final_before,
            ));
        }
        out
    }

    fn take_rows(&mut self, seq: u64) -> Result<Option<RecordBatch>, OperatorError> {
        let changed = self.recompute();
        if changed.is_empty() {
            return Ok(None);
        }
        self.rows(&changed, seq).map(Some)
    }

    fn take_alerts(&mut self) -> Vec<Alert> {
        OveragesOperator::take_alerts(self)
    }

    fn set_live(&mut self, live: bool) {
        self.live = live;
    }

    fn state_rows(&self) -> usize {
        self.months.len()
    }

    fn snapshot_chunks<'a>(
        &'a self,
        seq: u64,
    ) -> Box<dyn Iterator<Item = Result<RecordBatch, OperatorError>> + 'a> {
        super::in_chunks(self.sorted_keys(), move |keys| self.rows(keys, seq))
    }

    /// Stored rows give back only the alerted bits; everything else is
    /// re-folded from the archive.
    fn restore(&mut self, b: &RecordBatch) -> Result<(), OperatorError> {
        let tenant = required_column::<StringArray>(b, VIEW, "tenant")?;
        let start = required_column::<TimestampMicrosecondArray>(b, VIEW, "period_start")?;
        let metric = required_column::<StringArray>(b, VIEW, "metric")?;
        let alerted = required_column::<Int32Array>(b, VIEW, "alerted")?;
        for i in 0..b.num_rows() {
            let key = (
                self.intern(tenant.value(i)),
                start.value(i),
                self.intern(metric.value(i)),
            );
            if let Some(m) = self.months.get_mut(&key) {
                m.alerted |= alerted.value(i);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::time::MICROS;
    use crate::operator::testing::ev;
    use std::collections::BTreeMap;

    fn plan(id: &str, time: &str, plan: &str, limits: &str, overage: &str) -> Event {
        ev(
            id,
            "_system",
            "catalog.plan_published",
            time,
            &format!(
                r#"{{"plan":"{plan}","currency":"USD","limits":{limits},"overage":{overage}}}"#
            ),
        )
    }

    fn start(id: &str, tenant: &str, time: &str, sub: &str, plan: &str) -> Event {
        ev(
            id,
            tenant,
            "subscription.started",
            time,
            &format!(
                r#"{{"subscription_id":"{sub}","plan":"{plan}","billing_cycle":"monthly","price":1000,"currency":"USD"}}"#
            ),
        )
    }

    fn use_(id: &str, tenant: &str, time: &str, metric: &str, q: &str) -> Event {
        ev(
            id,
            tenant,
            "usage.recorded",
            time,
            &format!(r#"{{"metric":"{metric}","quantity":{q}}}"#),
        )
    }

    /// Applies the events, and returns the rows by (tenant, month "YYYY-MM", metric).
    fn run(events: &[Event]) -> (OveragesOperator, BTreeMap<(String, String, String), Row>) {
        let mut op = OveragesOperator::new(300 * MICROS);
        for e in events {
            op.apply(e);
        }
        op.take_rows(1).unwrap();
        let rows = op
            .months
            .entries()
            .map(|(k, m)| {
                (
                    (
                        k.0.to_string(),
                        date_text(k.1)[..7].to_string(),
                        k.2.to_string(),
                    ),
                    m.row.clone().unwrap(),
                )
            })
            .collect();
        (op, rows)
    }

    fn q(s: &str) -> i128 {
        decimal::parse_decimal_string(s).unwrap()
    }

    fn base() -> Vec<Event> {
        vec![
            plan(
                "p1",
                "2025-12-01T00:00:00Z",
                "starter",
                r#"{"api_calls":1000,"storage_gb":"10.5","seats":5}"#,
                r#"{"api_calls":{"unit_price":100,"per":1000}}"#,
            ),
            start("s1", "acme", "2026-01-01T00:00:00Z", "sub1", "starter"),
        ]
    }

    #[test]
    fn package_priced_overage_rounds_up_to_whole_packages() {
        let mut e = base();
        e.push(use_(
            "u1",
            "acme",
            "2026-01-10T00:00:00Z",
            "api_calls",
            "1500",
        ));
        e.push(use_(
            "u2",
            "acme",
            "2026-01-11T00:00:00Z",
            "api_calls",
            "\"0.5\"",
        ));
        let (_, rows) = run(&e);
        let r = &rows[&("acme".into(), "2026-01".into(), "api_calls".into())];
        assert_eq!(r.plan.as_deref(), Some("starter"));
        assert_eq!(r.used, Some(q("1500.5")));
        assert_eq!(r.included, Some(q("1000")));
        assert_eq!(r.overage_quantity, Some(q("500.5")));
        assert_eq!(
            r.overage_amount,
            Some(100),
            "ceil(500.5 / 1000) = 1 package"
        );
        assert_eq!(r.currency.as_deref(), Some("USD"));
        assert_eq!(r.pct_used, Some(150.05));
        assert_eq!(r.threshold, Some(100));
    }

    #[test]
    fn limit_without_overage_price_is_null_and_unlimited_is_zero() {
        let mut e = base();
        e.push(use_(
            "u1",
            "acme",
            "2026-01-10T00:00:00Z",
            "storage_gb",
            "\"11\"",
        ));
        e.push(use_("u2", "acme", "2026-01-10T00:00:00Z", "reports", "3"));
        let (_, rows) = run(&e);
        let storage = &rows[&("acme".into(), "2026-01".into(), "storage_gb".into())];
        assert_eq!(storage.overage_quantity, Some(q("0.5")));
        assert_eq!(storage.overage_amount, None, "a limit but no overage price");
        let reports = &rows[&("acme".into(), "2026-01".into(), "reports".into())];
        assert_eq!(
            (
                reports.included,
                reports.overage_quantity,
                reports.overage_amount
            ),
            (None, Some(0), Some(0))
        );
        assert_eq!((reports.pct_used, reports.threshold), (None, None));
    }

    #[test]
    fn every_aggregation() {
        let mut e = base();
        for (i, (m, a)) in [
            ("api_calls", "count"),
            ("storage_gb", "max"),
            ("seats", "latest"),
        ]
        .iter()
        .enumerate()
        {
            e.push(ev(
                &format!("m{i}"),
                "_system",
                "catalog.meter_defined",
                "2025-12-01T00:00:00Z",
                &format!(r#"{{"metric":"{m}","aggregation":"{a}"}}"#),
            ));
        }
        for (i, (t, v)) in [
            ("2026-01-03T00:00:00Z", "4"),
            ("2026-01-02T00:00:00Z", "9"),
            ("2026-01-01T12:00:00Z", "2"),
        ]
        .iter()
        .enumerate()
        {
            for m in ["api_calls", "storage_gb", "seats", "reports"] {
                e.push(use_(&format!("{m}{i}"), "acme", t, m, v));
            }
        }
        let (_, rows) = run(&e);
        let used = |m: &str| {
            rows[&("acme".to_string(), "2026-01".to_string(), m.to_string())]
                .used
                .unwrap()
        };
        assert_eq!(used("api_calls"), q("3"), "count");
        assert_eq!(used("storage_gb"), q("9"), "max");
        assert_eq!(used("seats"), q("4"), "latest by time, not arrival");
        assert_eq!(used("reports"), q("15"), "sum is the default");
    }

    #[test]
    fn catalog_version_published_mid_stream_applies_from_its_period() {
        let mut e = base();
        e.push(use_(
            "u1",
            "acme",
            "2026-01-10T00:00:00Z",
            "api_calls",
            "1500",
        ));
        e.push(use_(
            "u2",
            "acme",
            "2026-02-10T00:00:00Z",
            "api_calls",
            "1500",
        ));
        e.push(plan(
            "p2",
            "2026-01-15T00:00:00Z",
            "starter",
            r#"{"api_calls":2000}"#,
            "{}",
        ));
        let (_, rows) = run(&e);
        // January ends after p2 was published: the latest version before the end applies.
        assert_eq!(
            rows[&("acme".into(), "2026-01".into(), "api_calls".into())].included,
            Some(q("2000"))
        );
        assert_eq!(
            rows[&("acme".into(), "2026-02".into(), "api_calls".into())].included,
            Some(q("2000"))
        );
        // A version published only after the period ends does not apply to it.
        let mut e2 = base();
        e2.push(use_(
            "u1",
            "acme",
            "2026-01-10T00:00:00Z",
            "api_calls",
            "1500",
        ));
        e2.push(plan(
            "p2",
            "2026-02-15T00:00:00Z",
            "starter",
            r#"{"api_calls":2000}"#,
            "{}",
        ));
        let (_, rows) = run(&e2);
        assert_eq!(
            rows[&("acme".into(), "2026-01".into(), "api_calls".into())].included,
            Some(q("1000"))
        );
    }

    #[test]
    fn cancelled_inside_the_period_still_bills_against_the_plan() {
        let mut e = base();
        e.push(use_(
            "u1",
            "acme",
            "2026-01-10T00:00:00Z",
            "api_calls",
            "1200",
        ));
        e.push(ev(
            "c1",
            "acme",
            "subscription.cancelled",
            "2026-01-20T00:00:00Z",
            r#"{"subscription_id":"sub1"}"#,
        ));
        e.push(use_(
            "u2",
            "acme",
            "2026-02-10T00:00:00Z",
            "api_calls",
            "10",
        ));
        let (_, rows) = run(&e);
        assert_eq!(
            rows[&("acme".into(), "2026-01".into(), "api_calls".into())]
                .plan
                .as_deref(),
            Some("starter")
        );
        let feb = &rows[&("acme".into(), "2026-02".into(), "api_calls".into())];
        assert_eq!(
            (
                feb.plan.as_deref(),
                feb.included,
                feb.overage_amount,
                feb.currency.as_deref()
            ),
            (None, None, None, None)
        );
    }

    #[test]
    fn unknown_plan_and_no_subscription_give_nulls() {
        let mut e = base();
        e.push(start(
            "s2",
            "beta",
            "2026-01-01T00:00:00Z",
            "sub2",
            "mystery",
        ));
        e.push(use_("u1", "beta", "2026-01-10T00:00:00Z", "api_calls", "5"));
        e.push(use_(
            "u2",
            "gamma",
            "2026-01-10T00:00:00Z",
            "api_calls",
            "5",
        ));
        let (_, rows) = run(&e);
        let beta = &rows[&("beta".into(), "2026-01".into(), "api_calls".into())];
        assert_eq!(
            (
                beta.plan.as_deref(),
                beta.included,
                beta.overage_amount,
                beta.currency.clone()
            ),
            (Some("mystery"), None, None, None)
        );
        let gamma = &rows[&("gamma".into(), "2026-01".into(), "api_calls".into())];
        assert_eq!(
            (
                gamma.plan.clone(),
                gamma.overage_quantity,
                gamma.overage_amount
            ),
            (None, Some(0), None)
        );
    }

    #[test]
    fn an_overflowed_sum_gives_no_used_and_nothing_derived_from_it() {
        const NINES: &str = "\"99999999999999999999999999999\"";
        let mut e = base();
        e.push(ev(
            "m1",
            "_system",
            "catalog.meter_defined",
            "2025-12-01T00:00:00Z",
            r#"{"metric":"seats","aggregation":"max"}"#,
        ));
        for (i, m) in ["api_calls", "reports", "seats"].iter().enumerate() {
            for j in 0..2 {
                e.push(use_(
                    &format!("u{i}{j}"),
                    "acme",
                    "2026-01-10T00:00:00Z",
                    m,
                    NINES,
                ));
            }
        }
        let ((mut op, rows), logs) = crate::operator::usage::captured_logs(|| run(&e));
        let row = |m: &str| &rows[&("acme".into(), "2026-01".into(), m.into())];
        // Limited and priced: no overage, percentage or threshold from a bogus number.
        let api = row("api_calls");
        assert_eq!(
            (
                api.used,
                api.included,
                api.overage_quantity,
                api.overage_amount
            ),
            (None, Some(q("1000")), None, None)
        );
        assert_eq!((api.pct_used, api.threshold), (None, None));
        assert_eq!(api.plan.as_deref(), Some("starter"));
        // Alerts are decided message by message: the first quantity
        // already reached every threshold of `api_calls` with a known
        // `used`; the overflowing second one derives nothing.
        let alerted: Vec<(String, i32, String)> = op
            .take_alerts()
            .into_iter()
            .map(|a| (a.metric, a.threshold, a.used))
            .collect();
        let nines = NINES.trim_matches('"').to_string();
        for t in [80, 90, 100] {
            assert!(
                alerted.contains(&("api_calls".into(), t, nines.clone())),
                "{alerted:?}"
            );
        }
        assert!(
            alerted
                .iter()
                .all(|(m, _, used)| m != "api_calls" || *used == nines),
            "{alerted:?}"
        );
        // Unlimited: no overage whatever the usage.
        let reports = row("reports");
        assert_eq!(
            (
                reports.used,
                reports.overage_quantity,
                reports.overage_amount
            ),
            (None, Some(0), Some(0))
        );
        // Another aggregation of the same quantities is exact.
        assert_eq!(row("seats").used, Some(q("99999999999999999999999999999")));
        assert_eq!(logs.matches("overages.used is NULL").count(), 2, "{logs}");
        assert!(
            logs.contains("ERROR")
                && logs.contains("metric=api_calls")
                && logs.contains("period=2026-01-01"),
            "{logs}"
        );
        // Written as NULLs; a later event changes nothing and logs nothing more.
        let batch = op.snapshot(1).unwrap().unwrap();
        assert_eq!(batch.column_by_name("used").unwrap().null_count(), 2);
        assert_eq!(
            batch
                .column_by_name("overage_quantity")
                .unwrap()
                .null_count(),
            1
        );
        let (_, again) = crate::operator::usage::captured_logs(|| {
            op.apply(&use_(
                "u9",
                "acme",
                "2026-01-11T00:00:00Z",
                "api_calls",
                "1",
            ));
            op.take_rows(2).unwrap()
        });
        assert_eq!(again, "");
    }

    #[test]
    fn zero_limit_counts_as_one_hundred_percent() {
        let mut e = vec![plan(
            "p1",
            "2025-12-01T00:00:00Z",
            "free",
            r#"{"api_calls":0}"#,
            "{}",
        )];
        e.push(start("s1", "acme", "2026-01-01T00:00:00Z", "sub1", "free"));
        e.push(use_(
            "u1",
            "acme",
            "2026-01-10T00:00:00Z",
            "api_calls",
            "\"0.000000001\"",
        ));
        let (_, rows) = run(&e);
        let r = &rows[&("acme".into(), "2026-01".into(), "api_calls".into())];
        assert_eq!((r.pct_used, r.threshold), (None, Some(100)));
    }

    #[test]
    fn thresholds_alert_once_each_and_not_for_final_periods() {
        let mut op = OveragesOperator::new(300 * MICROS);
        for e in base() {
            op.apply(&e);
        }
        op.apply(&use_(
            "u1",
            "acme",
            "2026-01-10T00:00:00Z",
            "api_calls",
            "850",
        ));
        op.take_rows(1).unwrap();
        assert_eq!(
            op.take_alerts()
                .iter()
                .map(|a| a.threshold)
                .collect::<Vec<_>>(),
            vec![80]
        );
        // One batch crossing two thresholds gives two alerts.
        op.apply(&use_(
            "u2",
            "acme",
            "2026-01-11T00:00:00Z",
            "api_calls",
            "200",
        ));
        op.take_rows(2).unwrap();
        let alerts = op.take_alerts();
        assert_eq!(
            alerts.iter().map(|a| a.threshold).collect::<Vec<_>>(),
            vec![90, 100]
        );
        assert_eq!(
            alerts[1].id(),
            "threshold:acme:2026-01-01T00:00:00Z:api_calls:100"
        );
        assert!(alerts[1].to_json().contains(r#""used":"1050""#));
        op.apply(&use_(
            "u3",
            "acme",
            "2026-01-12T00:00:00Z",
            "api_calls",
            "1",
        ));
        op.take_rows(3).unwrap();
        assert!(op.take_alerts().is_empty(), "each threshold once");
        // A late event in a final period: no alert.
        op.apply(&use_(
            "u4",
            "acme",
            "2026-03-01T00:05:00Z",
            "api_calls",
            "1",
        ));
        op.apply(&use_(
            "u5",
            "acme",
            "2026-02-10T00:00:00Z",
            "api_calls",
            "2000",
        ));
        op.take_rows(4).unwrap();
        assert!(
            op.take_alerts().is_empty(),
            "February is final once the clock reaches March 1 + lateness"
        );
    }

    /// metrics.md: which alerts exist is a pure function of the stream. A
    /// generated SaaS (usage over and under limits, plan changes, catalog
    /// versions) as one batch, per event, and in batches of 97 gives the
    /// same alerts, with the same times.
    #[test]
    fn alerts_do_not_depend_on_batching() {
        let events = crate::operator::testing::generated_events(25, 6, 9, 2025, true);
        let alerts = |batch: usize| {
            let mut op = OveragesOperator::new(300 * MICROS);
            let mut out = Vec::new();
            for chunk in events.chunks(batch) {
                for e in chunk {
                    op.apply(e);
                }
                op.take_rows(1).unwrap();
                out.extend(op.take_alerts());
            }
            out.iter()
                .map(|a| (a.id(), a.time, a.used.clone()))
                .collect::<Vec<_>>()
        };
        let whole = alerts(events.len());
        assert!(whole.len() > 20, "{} alerts", whole.len());
        assert_eq!(alerts(1), whole);
        assert_eq!(alerts(97), whole);
    }

    #[test]
    fn any_arrival_order_gives_the_same_rows() {
        let mut e = base();
        e.push(plan(
            "p2",
            "2026-02-15T00:00:00Z",
            "starter",
            r#"{"api_calls":2000}"#,
            r#"{"api_calls":{"unit_price":7,"per":3}}"#,
        ));
        e.push(ev("pc", "acme", "subscription.plan_changed", "2026-02-01T00:00:00Z", r#"{"subscription_id":"sub1","plan":"pro","billing_cycle":"monthly","price":5000,"currency":"USD"}"#));
        e.push(plan(
            "p3",
            "2025-12-01T00:00:00Z",
            "pro",
            r#"{"api_calls":10}"#,
            r#"{"api_calls":{"unit_price":3,"per":1}}"#,
        ));
        e.push(ev(
            "c1",
            "acme",
            "subscription.cancelled",
            "2026-02-20T00:00:00Z",
            r#"{"subscription_id":"sub1","effective_at":"2026-03-31T00:00:00Z"}"#,
        ));
        for i in 0..40 {
            let t = format!("2026-{:02}-{:02}T00:00:00Z", 1 + i % 4, 1 + i % 28);
            e.push(use_(
                &format!("u{i}"),
                ["acme", "beta"][i % 2],
                &t,
                ["api_calls", "seats"][i % 2],
                &format!("\"{}.{}\"", i * 37, i),
            ));
        }
        let (_, expected) = run(&e);
        let mut seed = 7u64;
        for _ in 0..20 {
            let mut shuffled = e.clone();
            for i in (1..shuffled.len()).rev() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                shuffled.swap(i, (seed >> 33) as usize % (i + 1));
            }
            assert_eq!(run(&shuffled).1, expected);
        }
    }

    /// A subscription with `billing_anchor`.
    fn anchored(
        id: &str,
        tenant: &str,
        ty: &str,
        time: &str,
        sub: &str,
        plan: &str,
        anchor: &str,
    ) -> Event {
        let anchor = if anchor.is_empty() {
            String::new()
        } else {
            format!(r#","billing_anchor":"{anchor}""#)
        };
        ev(
            id,
            tenant,
            ty,
            time,
            &format!(
                r#"{{"subscription_id":"{sub}","plan":"{plan}","billing_cycle":"monthly","price":1000,"currency":"USD"{anchor}}}"#
            ),
        )
    }

    /// (tenant, period_start, metric) of a row, as text.
    type RowKey = (String, String, String);
    /// (period_end, plan, used) of a row.
    type RowSeen = (String, Option<String>, i128);

    /// Folds through a ledger as the processor does; the non-empty rows
    /// by (tenant, period_start, metric) -> (period_end, plan, used).
    fn fed(events: &[Event]) -> BTreeMap<RowKey, RowSeen> {
        let mut op = OveragesOperator::new(300 * MICROS);
        let mut fed = crate::operator::testing::Fed::default();
        for e in events {
            fed.feed(&mut op, e);
        }
        op.take_rows(1).unwrap();
        op.months
            .entries()
            .filter(|(_, m)| m.agg.events > 0)
            .map(|(k, m)| {
                let r = m.row.clone().unwrap();
                (
                    (k.0.to_string(), format_micros(k.1), k.2.to_string()),
                    (
                        format_micros(m.end),
                        r.plan.map(String::from),
                        r.used.unwrap() / ONE,
                    ),
                )
            })
            .collect()
    }

    fn row(start: &str, end: &str, used: i128) -> (RowKey, RowSeen) {
        (
            ("acme".into(), start.into(), "api_calls".into()),
            (end.into(), Some("starter".into()), used),
        )
    }

    #[test]
    fn anchored_periods_bill_from_the_anchor_whatever_the_arrival() {
        let mut e = base();
        e[1] = anchored(
            "s1",
            "acme",
            "subscription.started",
            "2026-01-01T00:00:00Z",
            "sub1",
            "starter",
            "2026-01-31T10:00:00Z",
        );
        for (i, t) in [
            "2026-01-31T09:59:59Z",
            "2026-01-31T10:00:00Z",
            "2026-02-28T09:00:00Z",
            "2026-02-28T10:00:00Z",
            "2026-03-31T09:00:00Z",
        ]
        .iter()
        .enumerate()
        {
            e.push(use_(&format!("u{i}"), "acme", t, "api_calls", "1"));
        }
        let expected: BTreeMap<_, _> = [
            row("2025-12-31T10:00:00Z", "2026-01-31T10:00:00Z", 1),
            row("2026-01-31T10:00:00Z", "2026-02-28T10:00:00Z", 2),
            row("2026-02-28T10:00:00Z", "2026-03-31T10:00:00Z", 2),
        ]
        .into_iter()
        .collect();
        assert_eq!(fed(&e), expected);
        // The anchor arriving after the usage moves it out of the calendar months.
        let mut late = e.clone();
        let start = late.remove(1);
        late.push(start);
        assert_eq!(fed(&late), expected);
        // Voiding the anchored start takes the tenant back to calendar months.
        let mut voided = e.clone();
        voided.push(crate::operator::testing::void(
            "v1",
            "acme",
            "2026-04-01T00:00:00Z",
            "s",
            "s1",
        ));
        let calendar = fed(&voided);
        assert_eq!(
            calendar.keys().map(|k| k.1.as_str()).collect::<Vec<_>>(),
            [
                "2026-01-01T00:00:00Z",
                "2026-02-01T00:00:00Z",
                "2026-03-01T00:00:00Z"
            ]
        );
        assert!(
            calendar.values().all(|v| v.1.is_none()),
            "no subscription left: no plan"
        );
    }

    #[test]
    fn a_new_anchor_starts_a_series_that_overlaps_the_old_one() {
        let mut e = base();
        e[1] = anchored(
            "s1",
            "acme",
            "subscription.started",
            "2026-01-15T00:00:00Z",
            "sub1",
            "starter",
            "2026-01-15T00:00:00Z",
        );
        e.push(anchored(
            "pc",
            "acme",
            "subscription.plan_changed",
            "2026-02-20T00:00:00Z",
            "sub1",
            "starter",
            "2026-02-20T00:00:00Z",
        ));
        // Cancelled: the last anchor keeps holding.
        e.push(ev(
            "c1",
            "acme",
            "subscription.cancelled",
            "2026-03-01T00:00:00Z",
            r#"{"subscription_id":"sub1"}"#,
        ));
        for (i, t) in [
            "2026-02-19T00:00:00Z",
            "2026-02-21T00:00:00Z",
            "2026-03-25T00:00:00Z",
        ]
        .iter()
        .enumerate()
        {
            e.push(use_(&format!("u{i}"), "acme", t, "api_calls", "5"));
        }
        let got = fed(&e);
        let mut want: BTreeMap<_, _> = [
            row("2026-02-15T00:00:00Z", "2026-03-15T00:00:00Z", 5),
            row("2026-02-20T00:00:00Z", "2026-03-20T00:00:00Z", 5),
        ]
        .into_iter()
        .collect();
        // After the cancellation on 1 March, the 20th's series goes on with no plan.
        want.insert(
            (
                "acme".into(),
                "2026-03-20T00:00:00Z".into(),
                "api_calls".into(),
            ),
            ("2026-04-20T00:00:00Z".into(), None, 5),
        );
        assert_eq!(got, want);
        // Every arrival order gives the same rows.
        let mut seed = 11u64;
        for _ in 0..30 {
            let mut shuffled = e.clone();
            for i in (1..shuffled.len()).rev() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                shuffled.swap(i, (seed >> 33) as usize % (i + 1));
            }
            assert_eq!(fed(&shuffled), want);
        }
    }

    #[test]
    fn two_series_starting_together_are_one_row_with_the_later_end() {
        let mut e = base();
        e[1] = anchored(
            "s1",
            "acme",
            "subscription.started",
            "2026-01-01T00:00:00Z",
            "sub1",
            "starter",
            "2026-01-31T00:00:00Z",
        );
        e.push(anchored(
            "pc",
            "acme",
            "subscription.plan_changed",
            "2026-03-05T00:00:00Z",
            "sub1",
            "starter",
            "2026-01-30T00:00:00Z",
        ));
        e.push(use_("u1", "acme", "2026-03-01T00:00:00Z", "api_calls", "1"));
        e.push(use_("u2", "acme", "2026-03-10T00:00:00Z", "api_calls", "2"));
        e.push(use_("u3", "acme", "2026-03-30T00:00:00Z", "api_calls", "4"));
        let want: BTreeMap<_, _> = [
            row("2026-02-28T00:00:00Z", "2026-03-31T00:00:00Z", 3),
            row("2026-03-30T00:00:00Z", "2026-04-30T00:00:00Z", 4),
        ]
        .into_iter()
        .collect();
        assert_eq!(fed(&e), want);
        let mut late = e.clone();
        let change = late.remove(2);
        late.push(change);
        assert_eq!(fed(&late), want);
        // The row's end is its events' latest: with the 31st series' event
        // voided, only the 30th's period is left.
        let mut voided = e.clone();
        voided.push(crate::operator::testing::void(
            "v1",
            "acme",
            "2026-04-01T00:00:00Z",
            "s",
            "u1",
        ));
        assert_eq!(
            fed(&voided)[&(
                "acme".into(),
                "2026-02-28T00:00:00Z".into(),
                "api_calls".into()
            )],
            ("2026-03-30T00:00:00Z".into(), Some("starter".into()), 2)
        );
    }

    #[test]
    fn alerts_are_keyed_by_period_start() {
        let mut e = base();
        e[1] = anchored(
            "s1",
            "acme",
            "subscription.started",
            "2026-01-01T00:00:00Z",
            "sub1",
            "starter",
            "2026-01-15T08:30:00Z",
        );
        e.push(use_(
            "u1",
            "acme",
            "2026-01-20T00:00:00Z",
            "api_calls",
            "900",
        ));
        let mut op = OveragesOperator::new(300 * MICROS);
        let mut fed = crate::operator::testing::Fed::default();
        for x in &e {
            fed.feed(&mut op, x);
        }
        op.take_rows(1).unwrap();
        let alerts = op.take_alerts();
        assert_eq!(
            alerts.iter().map(Alert::id).collect::<Vec<_>>(),
            [
                "threshold:acme:2026-01-15T08:30:00Z:api_calls:80",
                "threshold:acme:2026-01-15T08:30:00Z:api_calls:90"
            ]
        );
        assert_eq!(alerts[0].period, "2026-01-15");
    }
}
