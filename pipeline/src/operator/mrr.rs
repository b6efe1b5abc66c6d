//! The `mrr` view: monthly recurring revenue and its movements.
//!
//! One row per (`month`, `tenant`, `currency`) where MRR at the month's
//! start or end is positive, for every month from the tenant's first
//! `subscription.started` up to the month holding the stream clock (a
//! steady payer has a `flat` row every month, with or without events).
//!
//! State is the per-tenant subscription history (the fold shared with
//! `overages`, [`super::subscription`]) and the rows last written for the
//! tenant. A tenant is recomputed whole — one forward pass over its months
//! with an incremental fold — when a subscription event of it arrives (late
//! or out of order events included, so arrival order never matters); when
//! the stream clock enters a new month, a tenant that can still have MRR
//! gets the new months' rows.
//! Only rows that differ from the last written ones are written, as new
//! versions; a row that no longer exists (a late cancellation took its MRR
//! away) is written as a tombstone (`_deleted`), which the query layer
//! hides. The state is re-folded from the `events` archive at start-up.
//!
//! Cost: a recompute is O(months + subscription events) of one tenant. A
//! new month only adds the new months' rows to every tenant that still has
//! a subscription (a month's row depends on the history and the months
//! before it, never on the clock), so a steady payer costs O(1) a month.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Int64Builder, RecordBatch, StringBuilder,
    UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::FixedState;
use super::restatements::Json;
use super::subscription::{Change, History, SubEvent};
use super::window::{month_bounds, month_date32};
use super::{FinalRow, Ledger, Names, Operator, OperatorError, Step, Storage, Target, unit_events};
use crate::event::Event;

pub const VIEW: &str = "mrr";

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("month", DataType::Date32, false),
        Field::new("tenant", DataType::Utf8, false),
        Field::new("currency", DataType::Utf8, false),
        Field::new("mrr_start", DataType::Int64, false),
        Field::new("mrr_end", DataType::Int64, false),
        Field::new("new_mrr", DataType::Int64, false),
        Field::new("expansion_mrr", DataType::Int64, false),
        Field::new("contraction_mrr", DataType::Int64, false),
        Field::new("churned_mrr", DataType::Int64, false),
        Field::new("reactivation_mrr", DataType::Int64, false),
        Field::new("movement", DataType::Utf8, false),
        // A row that stopped existing (both ends became 0): hidden by the view.
        Field::new("_deleted", DataType::Boolean, false),
        Field::new("_seq", DataType::UInt64, false),
    ]))
});

/// The movement of one month, per the table in metrics.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Movement {
    New,
    Reactivation,
    Churn,
    Expansion,
    Contraction,
    Flat,
}

impl Movement {
    pub fn as_str(self) -> &'static str {
        match self {
            Movement::New => "new",
            Movement::Reactivation => "reactivation",
            Movement::Churn => "churn",
            Movement::Expansion => "expansion",
            Movement::Contraction => "contraction",
            Movement::Flat => "flat",
        }
    }

    /// The movement from `start` to `end` (not both 0); `seen_before`:
    /// the tenant had a positive month end in this currency earlier.
    pub fn of(start: i64, end: i64, seen_before: bool) -> Movement {
        match (start, end) {
            (0, _) if seen_before => Movement::Reactivation,
            (0, _) => Movement::New,
            (_, 0) => Movement::Churn,
            (s, e) if e > s => Movement::Expansion,
            (s, e) if e < s => Movement::Contraction,
            _ => Movement::Flat,
        }
    }
}

/// One computed row; the amount columns follow from `start`, `end` and `movement`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// First instant of the month, µs.
    pub month: i64,
    /// Index into the operator's currency table (rows are many, currencies few).
    pub currency: u16,
    pub start: i64,
    pub end: i64,
    pub movement: Movement,
}

impl Row {
    /// (`new`, `expansion`, `contraction`, `churned`, `reactivation`).
    pub fn amounts(&self) -> [i64; 5] {
        let (s, e) = (self.start, self.end);
        match self.movement {
            Movement::New => [e, 0, 0, 0, 0],
            Movement::Expansion => [0, e - s, 0, 0, 0],
            Movement::Contraction => [0, 0, s - e, 0, 0],
            Movement::Churn => [0, 0, 0, s, 0],
            Movement::Reactivation => [0, 0, 0, 0, e],
            Movement::Flat => [0; 5],
        }
    }
}

#[derive(Debug, Default)]
struct Tenant {
    history: History,
    /// The rows last written, sorted by (month, currency).
    rows: Vec<Row>,
    /// Whether months after the clock's may still have MRR (a subscription
    /// is current after every event, or an event is effective later).
    open: bool,
    /// Start of the earliest month whose row may have changed since the
    /// last `take_rows` (the month of the earliest new effective time, or
    /// the first new month of the clock); `None` when nothing changed.
    from: Option<i64>,
    /// Ids of the currencies this history was ever priced in.
    currencies: Vec<u16>,
    /// Effective time of the first `started`, kept here so a recompute
    /// need not walk the shared (scattered) history to find it.
    first_start: Option<i64>,
    /// Has new events since the last `take_rows`: a flag, not a set of
    /// names, so marking and finding dirty tenants hashes no string.
    dirty: bool,
}

pub struct MrrOperator {
    tenants: HashMap<Arc<str>, Tenant, FixedState>,
    /// The tenants whose flag `dirty` was set since the last `take_rows`,
    /// each once: a batch that touches a few tenants recomputes those
    /// without a pass over every tenant.
    dirty: Vec<Arc<str>>,
    /// Rows held across tenants (kept, not summed: asked for every batch).
    rows_total: usize,
    currencies: Names,
    /// Largest accepted event time: the stream clock.
    clock: Option<i64>,
    /// Start of the clock's month as of the last `take_rows`.
    clock_month: Option<i64>,
}

impl Default for MrrOperator {
    fn default() -> Self {
        MrrOperator::new()
    }
}

impl MrrOperator {
    pub fn new() -> MrrOperator {
        MrrOperator {
            tenants: HashMap::with_hasher(FixedState),
            dirty: Vec::new(),
            rows_total: 0,
            currencies: Names::default(),
            clock: None,
            clock_month: None,
        }
    }

    /// Recomputes the dirty tenants: (tenant, row, deleted) to write.
    fn recompute(&mut self) -> Vec<(Arc<str>, Row, bool)> {
        let Some(clock) = self.clock else {
            return Vec::new();
        };
        let (clock_month, _) = month_bounds(clock);
        let next = self
            .clock_month
            .filter(|m| *m < clock_month)
            .map(|old| month_bounds(old).1);
        self.clock_month = Some(clock_month);
        let mut out = Vec::new();
        if let Some(next) = next {
            // A new month: every tenant that may still pay gets its new
            // months' rows.
            for (name, t) in self.tenants.iter_mut().filter(|(_, t)| t.open) {
                t.from = Some(t.from.map_or(next, |f| f.min(next)));
                if !std::mem::replace(&mut t.dirty, true) {
                    self.dirty.push(Arc::clone(name));
                }
            }
        }
        let dirty = std::mem::take(&mut self.dirty);
        if dirty.len() > self.tenants.len() / 4 {
            // Most tenants changed (large batches at scale): one pass over
            // them in place rather than a lookup per name.
            for (name, t) in self.tenants.iter_mut() {
                let total = &mut self.rows_total;
                recompute_if_dirty(name, t, &self.currencies, clock_month, total, &mut out);
            }
        } else {
            for name in &dirty {
                if let Some(t) = self.tenants.get_mut(name) {
                    let total = &mut self.rows_total;
                    recompute_if_dirty(name, t, &self.currencies, clock_month, total, &mut out);
                }
            }
        }
        self.dirty = dirty;
        self.dirty.clear();
        out
    }

    /// Every tenant's rows, by tenant (then month, as each tenant keeps
    /// them), by reference: a snapshot of 100,000 tenants x 24 months
    /// holds 16 bytes a row here instead of a copy of each row.
    fn sorted_rows(&self) -> Vec<(&str, &Row)> {
        let mut names: Vec<(&Arc<str>, &Tenant)> = self.tenants.iter().collect();
        names.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut rows = Vec::with_capacity(self.rows_total);
        for (name, t) in names {
            rows.extend(t.rows.iter().map(|r| (&**name, r)));
        }
        rows
    }

    fn rows(&self, rows: &[(Arc<str>, Row, bool)], seq: u64) -> Result<RecordBatch, OperatorError> {
        self.batch(rows.len(), rows.iter().map(|(n, r, d)| (&**n, r, *d)), seq)
    }

    /// The `mrr` rows of `n` (tenant, row, deleted) as a record batch.
    fn batch<'r>(
        &self,
        n: usize,
        rows: impl Iterator<Item = (&'r str, &'r Row, bool)>,
        seq: u64,
    ) -> Result<RecordBatch, OperatorError> {
        let mut month = Date32Builder::with_capacity(n);
        let mut tenant = StringBuilder::new();
        let mut currency = StringBuilder::new();
        let mut amounts: Vec<Int64Builder> =
            (0..7).map(|_| Int64Builder::with_capacity(n)).collect();
        let mut movement = StringBuilder::new();
        let mut deleted = BooleanBuilder::with_capacity(n);
        let mut seqs = UInt64Builder::with_capacity(n);
        for (name, row, del) in rows {
            month.append_value(month_date32(row.month));
            tenant.append_value(name);
            currency.append_value(self.currencies.name(u32::from(row.currency)));
            let values = [row.start, row.end];
            for (b, v) in amounts
                .iter_mut()
                .zip(values.iter().chain(row.amounts().iter()))
            {
                b.append_value(*v);
            }
            movement.append_value(row.movement.as_str());
            deleted.append_value(del);
            seqs.append_value(seq);
        }
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(month.finish()),
            Arc::new(tenant.finish()),
            Arc::new(currency.finish()),
        ];
        for mut b in amounts {
            columns.push(Arc::new(b.finish()));
        }
        columns.push(Arc::new(movement.finish()));
        columns.push(Arc::new(deleted.finish()));
        columns.push(Arc::new(seqs.finish()));
        RecordBatch::try_new(Arc::clone(&SCHEMA), columns)
            .map_err(|source| OperatorError::Arrow { view: VIEW, source })
    }
}

/// If tenant `name` is dirty: recomputes it from the earliest month its
/// changes touch, appends the rows that changed to `out`, clears its flag
/// and keeps `rows_total` (the rows held across tenants) up to date.
fn recompute_if_dirty(
    name: &Arc<str>,
    t: &mut Tenant,
    currency_names: &Names,
    clock_month: i64,
    rows_total: &mut usize,
    out: &mut Vec<(Arc<str>, Row, bool)>,
) {
    if !std::mem::replace(&mut t.dirty, false) {
        return;
    }
    let held_before = t.rows.len();
    let from = t.from.take().unwrap_or(i64::MIN);
    let currencies: Vec<(u16, &str)> = t
        .currencies
        .iter()
        .map(|id| (*id, currency_names.name(u32::from(*id))))
        .collect();
    let (rows, open) = compute(
        &t.history,
        t.first_start,
        &currencies,
        &t.rows,
        from,
        clock_month,
    );
    let keep = t.rows.partition_point(|r| r.month < from);
    diff(&t.rows[keep..], &rows, |row, deleted| {
        out.push((Arc::clone(name), row, deleted));
    });
    t.rows.truncate(keep);
    // A tenant gains a row a month: these rows are most of this operator's
    // memory.
    super::reserve_by_half(&mut t.rows, rows.len());
    t.rows.extend(rows);
    t.open = open;
    *rows_total = *rows_total - held_before + t.rows.len();
}

/// The rows of `history` for the months from the one starting `from` up to
/// the one starting `clock_month`, and whether later months may still have
/// rows. `first_start` is the effective time of the history's first
/// `started` (MRR is 0 before it). `prior` holds the rows of the months
/// before `from` (sorted). A month's row depends only on the history
/// effective before its end and on the months before it, so events
/// effective in month F leave every row before F as it was: a tenant is
/// recomputed from the earliest month its new events touch, and a new
/// clock month only adds rows.
fn compute(
    history: &History,
    first_start: Option<i64>,
    currencies: &[(u16, &str)],
    prior: &[Row],
    from: i64,
    clock_month: i64,
) -> (Vec<Row>, bool) {
    let mut rows = Vec::new();
    let Some(first) = first_start else {
        return (rows, false);
    };
    let mut cursor = history.cursor();
    let mut s = month_bounds(first).0.max(from);
    // MRR at the start of month `s` (the end of the month before), and
    // whether a currency ever had MRR before it (new vs reactivation),
    // from the rows before `from` only: those from `from` on are the ones
    // being recomputed. When a void took the first `started` away, months
    // from `from` up to the new first one had rows that no longer exist,
    // and must not count as MRR seen before.
    let mut at_start: Vec<i64> = vec![0; currencies.len()];
    let mut seen = vec![false; currencies.len()];
    for r in &prior[..prior.partition_point(|r| r.month < s.min(from))] {
        if let Some(i) = currencies.iter().position(|(id, _)| *id == r.currency) {
            seen[i] |= r.end > 0;
            at_start[i] = r.end;
        }
    }
    while s <= clock_month {
        let (_, e) = month_bounds(s);
        let state = cursor.advance_to(e);
        for (i, (idx, c)) in currencies.iter().enumerate() {
            let start = at_start[i];
            let end = state.mrr_at(e, c);
            at_start[i] = end;
            if start > 0 || end > 0 {
                rows.push(Row {
                    month: s,
                    currency: *idx,
                    start,
                    end,
                    movement: Movement::of(start, end, seen[i]),
                });
            }
            seen[i] |= end > 0;
        }
        s = e;
    }
    rows.sort_by_key(|r| (r.month, r.currency));
    let (_, clock_month_end) = month_bounds(clock_month);
    let open = cursor.advance_to(i64::MAX).current.is_some()
        || history.next_effective_after(clock_month_end - 1).is_some();
    (rows, open)
}

/// Calls `emit` for every row of `new` that differs from `old` and, as a
/// tombstone, every row of `old` missing from `new` (both sorted by key).
fn diff(old: &[Row], new: &[Row], mut emit: impl FnMut(Row, bool)) {
    let key = |r: &Row| (r.month, r.currency);
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(o), Some(n)) if key(o) == key(n) => {
                if o != n {
                    emit(*n, false);
                }
                i += 1;
                j += 1;
            }
            (Some(o), Some(n)) if key(o) < key(n) => {
                emit(*o, true);
                i += 1;
            }
            (Some(o), None) => {
                emit(*o, true);
                i += 1;
            }
            (_, Some(n)) => {
                emit(*n, false);
                j += 1;
            }
            (None, None) => break,
        }
    }
}

impl Operator for MrrOperator {
    fn view(&self) -> &'static str {
        VIEW
    }

    fn schema(&self) -> SchemaRef {
        Arc::clone(&SCHEMA)
    }

    fn storage(&self) -> Storage {
        Storage::Versioned {
            key: &["month", "tenant", "currency"],
            internal: &[],
            final_column: None,
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

    fn apply_with(&mut self, e: &Event, sub: Option<&Arc<SubEvent>>) {
        self.clock = Some(self.clock.map_or(e.time, |c| c.max(e.time)));
        if let Some(sub) = sub {
            let name: Arc<str> = match self.tenants.get_key_value(e.tenant.as_str()) {
                Some((k, _)) => Arc::clone(k),
                None => Arc::from(e.tenant.as_str()),
            };
            let t = self.tenants.entry(Arc::clone(&name)).or_default();
            t.history.insert(Arc::clone(sub));
            let (month, _) = month_bounds(sub.effective);
            t.from = Some(t.from.map_or(month, |f| f.min(month)));
            if let Change::Started(_) = &sub.change {
                t.first_start = Some(
                    t.first_start
                        .map_or(sub.effective, |f| f.min(sub.effective)),
                );
            }
            if let Change::Started(terms) | Change::PlanChanged(terms) = &sub.change {
                let id = u16::try_from(self.currencies.id(&terms.currency)).unwrap_or(u16::MAX);
                if !t.currencies.contains(&id) {
                    t.currencies.push(id);
                }
            }
            if !std::mem::replace(&mut t.dirty, true) {
                self.dirty.push(name);
            }
        }
    }

    fn observe_voided(&mut self, e: &Event) {
        self.clock = Some(self.clock.map_or(e.time, |c| c.max(e.time)));
    }

    fn retract(&mut self, _void: &Event, targets: &[Target], _ledger: &Ledger) {
        for target in targets {
            let Some(sub) = SubEvent::from_event(&target.event) else {
                continue;
            };
            let Some((name, t)) = self.tenants.get_key_value(target.event.tenant.as_str()) else {
                continue;
            };
            let (name, was_dirty) = (Arc::clone(name), t.dirty);
            let Some(t) = self.tenants.get_mut(&name) else {
                continue;
            };
            if !t.history.remove(&sub) {
                continue;
            }
            let (month, _) = month_bounds(sub.effective);
            t.from = Some(t.from.map_or(month, |f| f.min(month)));
            t.first_start = t
                .history
                .events()
                .filter(|e| matches!(e.change, Change::Started(_)))
                .map(|e| e.effective)
                .min();
            t.dirty = true;
            if !was_dirty {
                self.dirty.push(name);
            }
        }
    }

    /// The final months of the tenants whose subscriptions the message
    /// changes, computed from their whole history.
    fn final_rows(&self, unit: &[Step<'_>], final_before: i64, _ledger: &Ledger) -> Vec<FinalRow> {
        let Some(clock) = self.clock else {
            return Vec::new();
        };
        let mut tenants: Vec<&str> = unit_events(unit)
            .filter(|e| SubEvent::from_event(e).is_some())
            .map(|e| e.tenant.as_str())
            .collect();
        tenants.sort_unstable();
        tenants.dedup();
        let mut out = Vec::new();
        for name in tenants {
            let Some((key, t)) = self.tenants.get_key_value(name) else {
                continue;
            };
            let currencies: Vec<(u16, &str)> = t
                .currencies
                .iter()
                .map(|id| (*id, self.currencies.name(u32::from(*id))))
                .collect();
            let (rows, _) = compute(
                &t.history,
                t.first_start,
                &currencies,
                &[],
                i64::MIN,
                month_bounds(clock).0,
            );
            for r in rows {
                if month_bounds(r.month).1 > final_before {
                    continue;
                }
                let [new, expansion, contraction, churned, reactivation] = r.amounts();
                out.push((
                    Arc::clone(key),
                    Json::new()
                        .str(
                            "currency",
                            Some(self.currencies.name(u32::from(r.currency))),
                        )
                        .date("month", Some(r.month))
                        .finish(),
                    Json::new()
                        .int("mrr_start", Some(r.start))
                        .int("mrr_end", Some(r.end))
                        .int("new_mrr", Some(new))
                        .int("expansion_mrr", Some(expansion))
                        .int("contraction_mrr", Some(contraction))
                        .int("churned_mrr", Some(churned))
                        .int("reactivation_mrr", Some(reactivation))
                        .str("movement", Some(r.movement.as_str()))
                        .finish(),
                    true,
                ));
            }
        }
        out
    }

    fn take_rows(&mut self, seq: u64) -> Result<Option<RecordBatch>, OperatorError> {
        let rows = self.recompute();
        if rows.is_empty() {
            return Ok(None);
        }
        self.rows(&rows, seq).map(Some)
    }

    fn state_rows(&self) -> usize {
        self.rows_total
    }

    fn snapshot_chunks<'a>(
        &'a self,
        seq: u64,
    ) -> Box<dyn Iterator<Item = Result<RecordBatch, OperatorError>> + 'a> {
        super::in_chunks(self.sorted_rows(), move |rows| {
            self.batch(rows.len(), rows.iter().map(|(n, r)| (*n, *r, false)), seq)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::testing::{ev, rows_text};

    fn start(id: &str, t: &str, time: &str, sub: &str, price: i64, extra: &str) -> Event {
        ev(
            id,
            t,
            "subscription.started",
            time,
            &format!(
                r#"{{"subscription_id":"{sub}","plan":"pro","billing_cycle":"monthly","price":{price},"currency":"USD"{extra}}}"#
            ),
        )
    }

    fn change(id: &str, t: &str, time: &str, sub: &str, price: i64) -> Event {
        ev(
            id,
            t,
            "subscription.plan_changed",
            time,
            &format!(
                r#"{{"subscription_id":"{sub}","plan":"max","billing_cycle":"monthly","price":{price},"currency":"USD"}}"#
            ),
        )
    }

    fn cancel(id: &str, t: &str, time: &str, sub: &str, effective: Option<&str>) -> Event {
        let eff = effective
            .map(|e| format!(r#","effective_at":"{e}""#))
            .unwrap_or_default();
        ev(
            id,
            t,
            "subscription.cancelled",
            time,
            &format!(r#"{{"subscription_id":"{sub}"{eff}}}"#),
        )
    }

    fn tick(id: &str, time: &str) -> Event {
        ev(id, "other", "auth.login", time, "{}")
    }

    /// Latest row text per (month, tenant, currency); `None` once deleted.
    type Latest = std::collections::BTreeMap<(String, String, String), Option<Vec<String>>>;

    /// Takes the operator's rows into `latest`.
    fn take_into(op: &mut MrrOperator, latest: &mut Latest) {
        if let Some(b) = op.take_rows(1).unwrap() {
            for v in rows_text(&b) {
                let key = (v[0].clone(), v[1].clone(), v[2].clone());
                latest.insert(key, (v[11] == "false").then_some(v));
            }
        }
    }

    /// (month, tenant, start, end, movement) of the rows not deleted.
    fn live(latest: Latest) -> Vec<(String, String, i64, i64, String)> {
        latest
            .into_values()
            .flatten()
            .map(|v| {
                (
                    v[0].clone(),
                    v[1].clone(),
                    v[3].parse().unwrap(),
                    v[4].parse().unwrap(),
                    v[10].clone(),
                )
            })
            .collect()
    }

    /// (month, tenant, start, end, movement) of the latest rows, deleted ones removed.
    fn view(events: &[Event], batch_size: usize) -> Vec<(String, String, i64, i64, String)> {
        let mut op = MrrOperator::new();
        let mut latest = Latest::default();
        for chunk in events.chunks(batch_size) {
            for e in chunk {
                op.apply(e);
            }
            take_into(&mut op, &mut latest);
        }
        // The count kept as rows change is the rows held.
        assert_eq!(
            op.state_rows(),
            latest.values().flatten().count(),
            "rows held, batch {batch_size}"
        );
        live(latest)
    }

    fn row(m: &str, t: &str, s: i64, e: i64, mv: &str) -> (String, String, i64, i64, String) {
        (m.into(), t.into(), s, e, mv.into())
    }

    #[test]
    fn movements_and_flat_months_without_events() {
        let events = vec![
            start("a1", "a", "2025-01-10T00:00:00Z", "s1", 100, ""),
            change("a2", "a", "2025-03-05T00:00:00Z", "s1", 150),
            change("a3", "a", "2025-04-05T00:00:00Z", "s1", 120),
            cancel("a4", "a", "2025-05-05T00:00:00Z", "s1", None),
            start("a5", "a", "2025-07-01T00:00:00Z", "s2", 90, ""),
            tick("z", "2025-08-02T00:00:00Z"),
        ];
        let want = vec![
            row("2025-01-01", "a", 0, 100, "new"),
            row("2025-02-01", "a", 100, 100, "flat"),
            row("2025-03-01", "a", 100, 150, "expansion"),
            row("2025-04-01", "a", 150, 120, "contraction"),
            row("2025-05-01", "a", 120, 0, "churn"),
            row("2025-07-01", "a", 0, 90, "reactivation"),
            row("2025-08-01", "a", 90, 90, "flat"),
        ];
        assert_eq!(view(&events, 100), want);
        assert_eq!(view(&events, 1), want);
        let mut rev = events.clone();
        rev.reverse();
        assert_eq!(view(&rev, 2), want);
    }

    #[test]
    fn late_cancel_deletes_rows_and_trial_counts_after_it_ends() {
        let events = vec![
            start(
                "b1",
                "b",
                "2025-01-10T00:00:00Z",
                "s1",
                100,
                r#","trial_ends_at":"2025-02-15T00:00:00Z""#,
            ),
            tick("z", "2025-05-02T00:00:00Z"),
            // Late: cancels from inside March, so April and May rows vanish.
            cancel("b2", "b", "2025-03-10T00:00:00Z", "s1", None),
        ];
        let want = vec![
            row("2025-02-01", "b", 0, 100, "new"),
            row("2025-03-01", "b", 100, 0, "churn"),
        ];
        assert_eq!(view(&events, 2), want);
        assert_eq!(view(&events, 3), want);
    }

    #[test]
    fn start_and_cancel_in_one_month_then_a_later_start_is_new() {
        let events = vec![
            start("c1", "c", "2025-01-03T00:00:00Z", "s1", 100, ""),
            cancel("c2", "c", "2025-01-20T00:00:00Z", "s1", None),
            start("c3", "c", "2025-03-03T00:00:00Z", "s2", 70, ""),
            cancel(
                "c4",
                "c",
                "2025-03-04T00:00:00Z",
                "s2",
                Some("2025-05-01T00:00:00Z"),
            ),
            tick("z", "2025-06-02T00:00:00Z"),
        ];
        let want = vec![
            row("2025-03-01", "c", 0, 70, "new"),
            row("2025-04-01", "c", 70, 70, "flat"),
            row("2025-05-01", "c", 70, 0, "churn"),
        ];
        assert_eq!(view(&events, 1), want);
    }

    /// The incremental recompute (from the earliest touched month; new
    /// clock months only appended) against arrival orders and batchings.
    #[test]
    fn a_generated_saas_gives_the_same_rows_in_any_order_and_batching() {
        let events = crate::operator::testing::generated_events(60, 18, 5, 2024, false);
        let expected = view(&events, events.len());
        assert!(expected.len() > 200, "{} rows", expected.len());
        // A deterministic shuffle: a linear congruential walk.
        let mut shuffled = events.clone();
        let mut x = 12345u64;
        for i in (1..shuffled.len()).rev() {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            shuffled.swap(i, (x >> 33) as usize % (i + 1));
        }
        for (order, batch) in [
            (&events, 1),
            (&events, 37),
            (&shuffled, 1),
            (&shuffled, 250),
        ] {
            assert_eq!(view(order, batch), expected, "batch {batch}");
        }
    }

    #[test]
    fn a_void_recomputes_its_tenant_when_the_batch_touches_only_it() {
        let a_start = start("a1", "a", "2025-01-10T00:00:00Z", "s1", 100, "");
        let a_change = change("a2", "a", "2025-03-05T00:00:00Z", "s1", 150);
        let others = [
            start("b1", "b", "2025-01-10T00:00:00Z", "s2", 70, ""),
            start("c1", "c", "2025-01-11T00:00:00Z", "s3", 80, ""),
            start("d1", "d", "2025-01-12T00:00:00Z", "s4", 90, ""),
            start("e1", "e", "2025-01-13T00:00:00Z", "s5", 60, ""),
        ];
        let tick = tick("z", "2025-06-02T00:00:00Z");
        let mut events = vec![a_start.clone(), a_change.clone()];
        events.extend(others.iter().cloned());
        events.push(tick.clone());
        // The same stream, the change voided: batches of one, the void
        // alone in the last (one tenant of five is dirty).
        let mut op = MrrOperator::new();
        let mut latest = Latest::default();
        for e in &events {
            op.apply(e);
            take_into(&mut op, &mut latest);
        }
        let void = tick.clone();
        op.retract(
            &void,
            &[crate::operator::Target { event: a_change }],
            &crate::operator::Ledger::default(),
        );
        take_into(&mut op, &mut latest);
        let got = live(latest);
        let mut effective = vec![a_start];
        effective.extend(others.iter().cloned());
        effective.push(tick);
        let want = view(&effective, 1);
        assert_eq!(got, want);
        assert_eq!(op.state_rows(), want.len());
        assert!(
            want.iter()
                .any(|(m, t, _, e, _)| m == "2025-04-01" && t == "a" && *e == 100)
        );
    }

    /// A void of the first `started`, after its months were written: a
    /// later start is `new` (no MRR is left before it), as in a run that
    /// folds the void in the same batch as its target.
    #[test]
    fn a_void_of_the_first_start_makes_a_later_restart_new() {
        let first = start("r1", "r", "2026-01-01T00:00:00Z", "s1", 100, "");
        let events = vec![
            first.clone(),
            cancel("r2", "r", "2026-02-10T00:00:00Z", "s1", None),
            start("r3", "r", "2026-04-05T00:00:00Z", "s3", 200, ""),
            tick("z", "2026-06-02T00:00:00Z"),
        ];
        let mut op = MrrOperator::new();
        let mut latest = Latest::default();
        for e in &events {
            op.apply(e);
            take_into(&mut op, &mut latest);
        }
        assert!(
            live(latest.clone())
                .iter()
                .any(|(m, _, _, _, mv)| m == "2026-04-01" && mv == "reactivation")
        );
        op.retract(
            &events[3],
            &[crate::operator::Target { event: first }],
            &crate::operator::Ledger::default(),
        );
        take_into(&mut op, &mut latest);
        let want = view(&events[1..], events.len());
        assert_eq!(want[0], row("2026-04-01", "r", 0, 200, "new"));
        assert_eq!(live(latest), want);
        assert_eq!(op.state_rows(), want.len());
    }

    #[test]
    fn diff_emits_changes_and_tombstones() {
        let r = |m, s, e| Row {
            month: m,
            currency: 0,
            start: s,
            end: e,
            movement: Movement::Flat,
        };
        let mut out = Vec::new();
        diff(
            &[r(1, 1, 1), r(2, 1, 1), r(3, 1, 1)],
            &[r(1, 1, 1), r(3, 2, 2), r(4, 1, 1)],
            |row, d| {
                out.push((row.month, d));
            },
        );
        assert_eq!(out, vec![(2, true), (3, false), (4, false)]);
    }
}
