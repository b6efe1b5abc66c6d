//! The `tenants` view: one row per tenant, its current state as of the
//! stream clock.
//!
//! A row depends on the tenant's events (name, first and last seen,
//! subscription fold, invoices) and on the clock: the fold is taken at
//! T = clock + 1 µs, a trial is `trialing` while it ends after the clock,
//! and a cancellation can take effect later than it was sent. So besides
//! recomputing a tenant when one of its events arrives, each tenant is
//! given a wake-up instant, the next time its row would change as the
//! clock moves (its next effective subscription event or trial end), and is
//! recomputed when the clock reaches it. Changed rows are written as new
//! versions. The reserved `_system` tenant (the catalog's) is not a
//! customer and has no row. A void takes its targets back out: every
//! `tenant.created` and the count of events per event time are kept, so
//! the name, `first_seen` and `last_seen` of the effective events are
//! found again in O(log n). The state is re-folded from the `events`
//! archive at start-up.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, Int64Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::FixedState;
use super::subscription::{History, SubEvent};
use super::{Ledger, Operator, OperatorError, Storage, Target, timestamp_type as ts};
use crate::event::{Event, Payload, Text};

pub const VIEW: &str = "tenants";

/// The catalog's tenant: reserved, not a customer.
const SYSTEM_TENANT: &str = "_system";

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("tenant", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, true),
        Field::new("first_seen", ts(), false),
        Field::new("last_seen", ts(), false),
        Field::new("subscription_id", DataType::Utf8, true),
        Field::new("plan", DataType::Utf8, true),
        Field::new("billing_cycle", DataType::Utf8, true),
        Field::new("status", DataType::Utf8, false),
        Field::new("mrr", DataType::Int64, false),
        Field::new("currency", DataType::Utf8, true),
        Field::new("revenue_to_date", DataType::Int64, false),
        Field::new("_seq", DataType::UInt64, false),
    ]))
});

/// One computed row (without the tenant key). Rows are computed for every
/// changed tenant and mostly compared and dropped: short strings inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub name: Option<Text>,
    pub first_seen: i64,
    pub last_seen: i64,
    pub subscription_id: Option<Text>,
    pub plan: Option<Text>,
    pub billing_cycle: Option<&'static str>,
    pub status: &'static str,
    pub mrr: i64,
    pub currency: Option<Text>,
    pub revenue_to_date: i64,
}

/// A tenant's effective events' times, as a multiset. Events mostly come
/// in time order: those are appended to a non-decreasing vector, one
/// 8-byte time per event (no allocation per event, no count beside each
/// time); an event older than the newest goes to a tree of counts, so a
/// stream in any order stays O(log n) per event.
#[derive(Debug, Default)]
struct Times {
    in_order: Vec<i64>,
    earlier: BTreeMap<i64, u32>,
}

impl Times {
    fn add(&mut self, t: i64) {
        match self.in_order.last() {
            Some(last) if *last > t => *self.earlier.entry(t).or_insert(0) += 1,
            _ => {
                // A tenant's times are most of this operator's memory.
                super::reserve_by_half(&mut self.in_order, 1);
                self.in_order.push(t);
            }
        }
    }

    /// Takes one event at `t` out (a void).
    fn remove(&mut self, t: i64) {
        if let Some(n) = self.earlier.get_mut(&t) {
            *n -= 1;
            if *n == 0 {
                self.earlier.remove(&t);
            }
        } else if let Ok(i) = self.in_order.binary_search(&t) {
            self.in_order.remove(i);
        }
    }

    fn first(&self) -> Option<i64> {
        let a = self.in_order.first().copied();
        let b = self.earlier.first_key_value().map(|(k, _)| *k);
        a.into_iter().chain(b).min()
    }

    fn last(&self) -> Option<i64> {
        let a = self.in_order.last().copied();
        let b = self.earlier.last_key_value().map(|(k, _)| *k);
        a.into_iter().chain(b).max()
    }
}

/// A `tenant.created` of a tenant.
#[derive(Debug)]
struct Created {
    time: i64,
    source: Text,
    id: Text,
    name: Option<Text>,
}

impl Created {
    fn order(&self) -> (i64, &str, &str) {
        (self.time, &self.source, &self.id)
    }
}

#[derive(Debug, Default)]
struct Tenant {
    /// Every effective `tenant.created` in (`time`, `source`, `id`) order:
    /// the last one names the tenant. Held to the exact count (nearly
    /// always one), its texts inline up to 24 bytes: there is one per
    /// tenant, and a list grown by pushing (room for four, three strings
    /// allocated) took five times the bytes.
    created: Vec<Created>,
    /// Effective events per event time: `first_seen` and `last_seen` are
    /// its first and last.
    times: Times,
    history: History,
    /// All-time paid minus refunded, every currency (as metrics.md says).
    /// Exact (i128), so that a void takes back exactly what its target
    /// added; written saturated to Int64.
    revenue: i128,
    row: Option<Row>,
    /// When the clock reaches this instant, the row may change.
    wake: Option<i64>,
    /// The map's key, so marking the tenant dirty needs no second lookup.
    key: Arc<str>,
    /// Listed in `dirty` already (every event touches its tenant: a flag
    /// is cheaper than a set insert per event).
    dirty: bool,
}

pub struct TenantsOperator {
    tenants: HashMap<Arc<str>, Tenant, FixedState>,
    /// Tenants to recompute at the next `take_rows`.
    dirty: Vec<Arc<str>>,
    wakeups: BTreeSet<(i64, Arc<str>)>,
    /// Largest accepted event time: the stream clock.
    clock: Option<i64>,
}

impl Default for TenantsOperator {
    fn default() -> Self {
        TenantsOperator::new()
    }
}

impl TenantsOperator {
    pub fn new() -> TenantsOperator {
        TenantsOperator {
            tenants: HashMap::with_hasher(FixedState),
            dirty: Vec::new(),
            wakeups: BTreeSet::new(),
            clock: None,
        }
    }

    /// The row of `t` at `clock`, and its next wake-up instant.
    fn compute(t: &Tenant, clock: i64) -> (Row, Option<i64>) {
        let at = clock.saturating_add(1);
        let fold = t.history.fold_before(at);
        let current = fold.current;
        let trial_end = current.and_then(|c| c.trial_ends_at);
        let status = match current {
            Some(_) if trial_end.is_some_and(|end| end > clock) => "trialing",
            Some(_) => "active",
            None if fold.had_one => "cancelled",
            None => "none",
        };
        let row = Row {
            name: t.created.last().and_then(|c| c.name.clone()),
            first_seen: t.times.first().unwrap_or(0),
            last_seen: t.times.last().unwrap_or(0),
            subscription_id: current.map(|c| c.terms.subscription_id.clone()),
            plan: current.map(|c| c.terms.plan.clone()),
            billing_cycle: current.map(|c| c.terms.billing_cycle.as_str()),
            status,
            mrr: current.map_or(0, |c| fold.mrr_at(at, &c.terms.currency)),
            currency: current.map(|c| c.terms.currency.clone()),
            revenue_to_date: super::saturating_i64(t.revenue),
        };
        let wake = [
            t.history.next_effective_after(clock),
            trial_end.filter(|end| *end > clock),
        ]
        .into_iter()
        .flatten()
        .min();
        (row, wake)
    }

    /// The tenants' names, sorted.
    fn sorted_names(&self) -> Vec<Arc<str>> {
        let mut names: Vec<Arc<str>> = self.tenants.keys().cloned().collect();
        names.sort_unstable();
        names
    }

    fn rows(&self, names: &[Arc<str>], seq: u64) -> Result<RecordBatch, OperatorError> {
        let mut out = RowsBuilder::with_capacity(names.len());
        for key in names {
            if let Some(r) = self.tenants.get(key).and_then(|t| t.row.as_ref()) {
                out.push(key, r, seq);
            }
        }
        out.finish()
    }
}

/// Arrow builders for `tenants` rows, filled as rows are decided (no
/// second lookup per tenant to write them).
struct RowsBuilder {
    tenant: StringBuilder,
    name: StringBuilder,
    first: TimestampMicrosecondBuilder,
    last: TimestampMicrosecondBuilder,
    sub: StringBuilder,
    plan: StringBuilder,
    cycle: StringBuilder,
    status: StringBuilder,
    mrr: Int64Builder,
    currency: StringBuilder,
    revenue: Int64Builder,
    seqs: UInt64Builder,
}

impl RowsBuilder {
    fn with_capacity(n: usize) -> RowsBuilder {
        RowsBuilder {
            tenant: StringBuilder::new(),
            name: StringBuilder::new(),
            first: TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC"),
            last: TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC"),
            sub: StringBuilder::new(),
            plan: StringBuilder::new(),
            cycle: StringBuilder::new(),
            status: StringBuilder::new(),
            mrr: Int64Builder::with_capacity(n),
            currency: StringBuilder::new(),
            revenue: Int64Builder::with_capacity(n),
            seqs: UInt64Builder::with_capacity(n),
        }
    }

    fn push(&mut self, key: &str, r: &Row, seq: u64) {
        self.tenant.append_value(key);
        self.name.append_option(r.name.as_deref());
        self.first.append_value(r.first_seen);
        self.last.append_value(r.last_seen);
        self.sub.append_option(r.subscription_id.as_deref());
        self.plan.append_option(r.plan.as_deref());
        self.cycle.append_option(r.billing_cycle);
        self.status.append_value(r.status);
        self.mrr.append_value(r.mrr);
        self.currency.append_option(r.currency.as_deref());
        self.revenue.append_value(r.revenue_to_date);
        self.seqs.append_value(seq);
    }

    fn is_empty(&self) -> bool {
        self.seqs.values_slice().is_empty()
    }

    fn finish(mut self) -> Result<RecordBatch, OperatorError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.tenant.finish()),
            Arc::new(self.name.finish()),
            Arc::new(self.first.finish()),
            Arc::new(self.last.finish()),
            Arc::new(self.sub.finish()),
            Arc::new(self.plan.finish()),
            Arc::new(self.cycle.finish()),
            Arc::new(self.status.finish()),
            Arc::new(self.mrr.finish()),
            Arc::new(self.currency.finish()),
            Arc::new(self.revenue.finish()),
            Arc::new(self.seqs.finish()),
        ];
        RecordBatch::try_new(Arc::clone(&SCHEMA), columns)
            .map_err(|source| OperatorError::Arrow { view: VIEW, source })
    }
}

impl Operator for TenantsOperator {
    fn view(&self) -> &'static str {
        VIEW
    }

    fn schema(&self) -> SchemaRef {
        Arc::clone(&SCHEMA)
    }

    fn storage(&self) -> Storage {
        Storage::Versioned {
            key: &["tenant"],
            internal: &[],
            final_column: None,
            deleted_column: None,
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
        if e.tenant == SYSTEM_TENANT {
            return;
        }
        if !self.tenants.contains_key(e.tenant.as_str()) {
            let key: Arc<str> = Arc::from(e.tenant.as_str());
            self.tenants.insert(
                Arc::clone(&key),
                Tenant {
                    key,
                    ..Tenant::default()
                },
            );
        }
        let Some(t) = self.tenants.get_mut(e.tenant.as_str()) else {
            return;
        };
        t.times.add(e.time);
        match &e.payload {
            Payload::TenantCreated { name } => {
                let c = Created {
                    time: e.time,
                    source: e.source.clone(),
                    id: e.id.clone(),
                    name: name.as_deref().map(Text::from),
                };
                let pos = t.created.partition_point(|k| k.order() < c.order());
                t.created.reserve_exact(1);
                t.created.insert(pos, c);
            }
            Payload::InvoicePaid { amount, .. } => t.revenue += i128::from(*amount),
            Payload::InvoiceRefunded { amount, .. } => t.revenue -= i128::from(*amount),
            _ => {
                if let Some(sub) = sub {
                    t.history.insert(Arc::clone(sub));
                }
            }
        }
        if !t.dirty {
            t.dirty = true;
            self.dirty.push(Arc::clone(&t.key));
        }
    }

    fn observe_voided(&mut self, e: &Event) {
        self.clock = Some(self.clock.map_or(e.time, |c| c.max(e.time)));
    }

    fn retract(&mut self, _void: &Event, targets: &[Target], _ledger: &Ledger) {
        for target in targets {
            let e = &target.event;
            let Some(t) = self.tenants.get_mut(e.tenant.as_str()) else {
                continue;
            };
            t.times.remove(e.time);
            match &e.payload {
                Payload::TenantCreated { .. } => {
                    let key = (e.time, e.source.as_str(), e.id.as_str());
                    if let Some(pos) = t.created.iter().position(|k| k.order() == key) {
                        t.created.remove(pos);
                    }
                }
                Payload::InvoicePaid { amount, .. } => t.revenue -= i128::from(*amount),
                Payload::InvoiceRefunded { amount, .. } => t.revenue += i128::from(*amount),
                _ => {
                    if let Some(sub) = SubEvent::from_event(e) {
                        t.history.remove(&sub);
                    }
                }
            }
            if !t.dirty {
                t.dirty = true;
                self.dirty.push(Arc::clone(&t.key));
            }
        }
    }

    fn take_rows(&mut self, seq: u64) -> Result<Option<RecordBatch>, OperatorError> {
        let Some(clock) = self.clock else {
            return Ok(None);
        };
        while let Some(first) = self.wakeups.first()
            && first.0 <= clock
        {
            if let Some((_, name)) = self.wakeups.pop_first()
                && let Some(t) = self.tenants.get_mut(&name)
                && !t.dirty
            {
                t.dirty = true;
                self.dirty.push(name);
            }
        }
        // In recompute order: row order inside a file carries no meaning.
        let mut out = RowsBuilder::with_capacity(self.dirty.len());
        for name in std::mem::take(&mut self.dirty) {
            let Some(t) = self.tenants.get_mut(&name) else {
                continue;
            };
            t.dirty = false;
            let (row, wake) = TenantsOperator::compute(t, clock);
            if t.wake != wake {
                if let Some(old) = t.wake {
                    self.wakeups.remove(&(old, Arc::clone(&name)));
                }
                if let Some(new) = wake {
                    self.wakeups.insert((new, Arc::clone(&name)));
                }
                t.wake = wake;
            }
            if t.row.as_ref() != Some(&row) {
                out.push(&name, &row, seq);
                t.row = Some(row);
            }
        }
        if out.is_empty() {
            return Ok(None);
        }
        out.finish().map(Some)
    }

    fn state_rows(&self) -> usize {
        self.tenants.len()
    }

    fn snapshot_chunks<'a>(
        &'a self,
        seq: u64,
    ) -> Box<dyn Iterator<Item = Result<RecordBatch, OperatorError>> + 'a> {
        super::in_chunks(self.sorted_names(), move |names| self.rows(names, seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::testing::{ev, rows_text};

    /// `tenant,name,plan,status,mrr,revenue_to_date` of the rows written.
    /// The rows cut, sorted (their order in a batch carries no meaning).
    fn rows(op: &mut TenantsOperator) -> Vec<String> {
        let b = op.take_rows(1).unwrap().unwrap();
        rows_text(&b)
            .into_iter()
            .map(|v| [0, 1, 5, 7, 8, 10].map(|i| v[i].as_str()).join(","))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    #[test]
    fn trial_ends_and_future_cancellation_take_effect_as_the_clock_moves() {
        let mut op = TenantsOperator::new();
        for e in [
            ev(
                "1",
                "acme",
                "tenant.created",
                "2025-01-01T00:00:00Z",
                r#"{"name":"Acme"}"#,
            ),
            ev(
                "2",
                "acme",
                "subscription.started",
                "2025-01-02T00:00:00Z",
                r#"{"subscription_id":"s1","plan":"pro","billing_cycle":"yearly","price":1206,"currency":"USD","trial_ends_at":"2025-02-01T00:00:00Z"}"#,
            ),
            ev(
                "3",
                "acme",
                "subscription.cancelled",
                "2025-01-03T00:00:00Z",
                r#"{"subscription_id":"s1","effective_at":"2025-03-01T00:00:00Z"}"#,
            ),
            ev(
                "4",
                "acme",
                "invoice.paid",
                "2025-01-04T00:00:00Z",
                r#"{"invoice_id":"i","amount":700,"currency":"USD"}"#,
            ),
            ev(
                "5",
                "_system",
                "catalog.meter_defined",
                "2025-01-05T00:00:00Z",
                r#"{"metric":"x","aggregation":"sum"}"#,
            ),
        ] {
            op.apply(&e);
        }
        // No row for the reserved `_system` tenant.
        assert_eq!(rows(&mut op), ["acme,Acme,pro,trialing,0,700"]);
        // The clock reaches the trial end: active, worth 1206 / 12 = 100.5 -> 101.
        op.apply(&ev(
            "6",
            "other",
            "auth.login",
            "2025-02-01T00:00:00Z",
            "{}",
        ));
        assert_eq!(
            rows(&mut op),
            ["acme,Acme,pro,active,101,700", "other,,,none,0,0"]
        );
        // The cancellation is effective at 2025-03-01T00:00:00Z; T = clock + 1 µs.
        op.apply(&ev(
            "7",
            "other",
            "auth.login",
            "2025-02-28T23:59:59.999999Z",
            "{}",
        ));
        assert_eq!(rows(&mut op), ["other,,,none,0,0"]);
        op.apply(&ev(
            "8",
            "other",
            "auth.login",
            "2025-03-01T00:00:00Z",
            "{}",
        ));
        assert_eq!(
            rows(&mut op),
            ["acme,Acme,,cancelled,0,700", "other,,,none,0,0"]
        );
    }

    /// `cancelled` is for a tenant that had a subscription: a cancel or a
    /// plan change of one that was never current changes nothing, and a
    /// voided `started` was never accepted.
    #[test]
    fn a_tenant_that_never_had_a_subscription_is_none() {
        let mut op = TenantsOperator::new();
        let started = ev(
            "n1",
            "nu",
            "subscription.started",
            "2026-01-01T00:00:00Z",
            r#"{"subscription_id":"n","plan":"pro","billing_cycle":"monthly","price":100,"currency":"USD"}"#,
        );
        for e in [
            ev(
                "o1",
                "omega",
                "subscription.cancelled",
                "2026-01-05T00:00:00Z",
                r#"{"subscription_id":"zz"}"#,
            ),
            ev(
                "p1",
                "psi",
                "subscription.plan_changed",
                "2026-01-05T00:00:00Z",
                r#"{"subscription_id":"zz","plan":"pro","billing_cycle":"monthly","price":100,"currency":"USD"}"#,
            ),
            started.clone(),
            ev(
                "n3",
                "nu",
                "subscription.cancelled",
                "2026-01-03T00:00:00Z",
                r#"{"subscription_id":"n"}"#,
            ),
        ] {
            op.apply(&e);
        }
        assert_eq!(
            rows(&mut op),
            ["nu,,,cancelled,0,0", "omega,,,none,0,0", "psi,,,none,0,0"]
        );
        let void = ev(
            "n2",
            "nu",
            "event.voided",
            "2026-01-06T00:00:00Z",
            r#"{"target_source":"test","target_id":"n1"}"#,
        );
        op.retract(
            &void,
            &[crate::operator::Target { event: started }],
            &crate::operator::Ledger::default(),
        );
        assert_eq!(rows(&mut op), ["nu,,,none,0,0"]);
    }

    #[test]
    fn times_keep_first_and_last_in_any_order_and_through_removals() {
        let mut t = Times::default();
        for x in [10, 12, 12, 11, 9, 12, 30, 9] {
            t.add(x);
        }
        assert_eq!((t.first(), t.last()), (Some(9), Some(30)));
        t.remove(9);
        assert_eq!(t.first(), Some(9), "two events at 9");
        t.remove(9);
        t.remove(30);
        assert_eq!((t.first(), t.last()), (Some(10), Some(12)));
        for x in [10, 11, 12, 12, 12] {
            t.remove(x);
        }
        assert_eq!((t.first(), t.last()), (None, None));
    }
}
