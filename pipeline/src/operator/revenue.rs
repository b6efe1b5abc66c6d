//! The `revenue` view: collected cash per (`month`, `tenant`, `currency`),
//! from `invoice.paid` and `invoice.refunded`, month of the event `time`.
//!
//! Sums commute, so arrival order cannot matter; a late invoice rewrites
//! only its own row, written as a new version like `usage`. A void
//! subtracts what its target added; a row left with no invoice event is
//! written as a tombstone (`_deleted`). The state is
//! re-folded from the `events` archive at start-up.

use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Int64Builder, RecordBatch, StringBuilder,
    UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::restatements::Json;
use super::window::{month_bounds, month_date32};
use super::{
    FinalRow, Ledger, Names, Operator, OperatorError, Step, Storage, Target, saturating_i64,
    unit_events,
};
use crate::event::{Event, Payload};

pub const VIEW: &str = "revenue";

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("month", DataType::Date32, false),
        Field::new("tenant", DataType::Utf8, false),
        Field::new("currency", DataType::Utf8, false),
        Field::new("paid", DataType::Int64, false),
        Field::new("refunded", DataType::Int64, false),
        Field::new("net", DataType::Int64, false),
        Field::new("invoices_paid", DataType::Int64, false),
        Field::new("_seq", DataType::UInt64, false),
        // Set when the row's last invoice event was voided: the row is gone.
        Field::new("_deleted", DataType::Boolean, false),
    ]))
});

/// (tenant id, month as days since the epoch, currency id): the key of a
/// row, 12 bytes.
type Key = (u32, i32, u16);

/// An exact sum (an `i128`) kept as two words, so that a row aligns to 8
/// bytes and not 16: a row is 56 bytes, not 64 with padding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Exact {
    lo: u64,
    hi: i64,
}

impl Exact {
    fn get(self) -> i128 {
        (i128::from(self.hi) << 64) | i128::from(self.lo)
    }

    fn add(&mut self, v: i128) {
        let s = self.get().wrapping_add(v);
        // Truncation is the point: the low and the high word.
        self.lo = s as u64;
        self.hi = (s >> 64) as i64;
    }
}

/// One row of a tenant: its month and currency, and the cash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Row {
    month: i32,
    currency: u16,
    /// Exact sums: a void subtracts exactly what its target added;
    /// written saturated to Int64.
    paid: Exact,
    refunded: Exact,
    invoices_paid: i64,
    /// Invoice events (paid and refunded) in the row: none left, no row.
    events: i64,
}

/// Where the row of (`month`, `currency`) is in a tenant's sorted rows,
/// or where it would go.
fn find(rows: &[Row], month: i32, currency: u16) -> Result<usize, usize> {
    rows.binary_search_by_key(&(month, currency), |r| (r.month, r.currency))
}

pub struct RevenueOperator {
    /// Per tenant id, its rows sorted by (month, currency id). A tenant has
    /// a row per month it paid or refunded in (2.4M rows at 100k tenants
    /// over two years): small vectors grown by half, not a map of 2.4M
    /// entries whose doubling holds the old and the new table at once.
    by_tenant: Vec<Vec<Row>>,
    /// Rows held, across tenants.
    len: usize,
    /// Rows changed since the last `take_rows`; may repeat a key.
    dirty: Vec<Key>,
    tenants: Names,
    currencies: Names,
}

impl Default for RevenueOperator {
    fn default() -> Self {
        RevenueOperator::new()
    }
}

impl RevenueOperator {
    pub fn new() -> RevenueOperator {
        RevenueOperator {
            by_tenant: Vec::new(),
            len: 0,
            dirty: Vec::new(),
            tenants: Names::default(),
            currencies: Names::default(),
        }
    }

    fn row(&self, (tenant, month, currency): Key) -> Option<&Row> {
        let rows = self.by_tenant.get(tenant as usize)?;
        rows.get(find(rows, month, currency).ok()?)
    }

    /// Adds (`sign` 1) or takes back (-1) an invoice event.
    fn fold(&mut self, e: &Event, sign: i64) {
        let (amount, currency, paid) = match &e.payload {
            Payload::InvoicePaid {
                amount, currency, ..
            } => (*amount, currency, true),
            Payload::InvoiceRefunded {
                amount, currency, ..
            } => (*amount, currency, false),
            _ => return,
        };
        let tenant = self.tenants.id(&e.tenant);
        let month = month_date32(e.time);
        let currency = u16::try_from(self.currencies.id(currency)).unwrap_or(u16::MAX);
        let t = tenant as usize;
        if self.by_tenant.len() <= t {
            self.by_tenant.resize_with(t + 1, Vec::new);
        }
        let Some(rows) = self.by_tenant.get_mut(t) else {
            return;
        };
        let at = match find(rows, month, currency) {
            Ok(at) => at,
            Err(at) => {
                super::reserve_by_half(rows, 1);
                rows.insert(
                    at,
                    Row {
                        month,
                        currency,
                        paid: Exact::default(),
                        refunded: Exact::default(),
                        invoices_paid: 0,
                        events: 0,
                    },
                );
                self.len += 1;
                at
            }
        };
        let Some(row) = rows.get_mut(at) else {
            return;
        };
        let amount = i128::from(amount) * i128::from(sign);
        if paid {
            row.paid.add(amount);
            row.invoices_paid += sign;
        } else {
            row.refunded.add(amount);
        }
        row.events += sign;
        self.dirty.push((tenant, month, currency));
    }

    /// The rows' keys in key order: month, tenant, currency.
    fn sorted_keys(&self) -> Vec<Key> {
        let mut keys: Vec<Key> = Vec::with_capacity(self.len);
        for (t, rows) in self.by_tenant.iter().enumerate() {
            let t = u32::try_from(t).unwrap_or(u32::MAX);
            keys.extend(rows.iter().map(|r| (t, r.month, r.currency)));
        }
        keys.sort_by(|a, b| {
            (
                a.1,
                self.tenants.name(a.0),
                self.currencies.name(u32::from(a.2)),
            )
                .cmp(&(
                    b.1,
                    self.tenants.name(b.0),
                    self.currencies.name(u32::from(b.2)),
                ))
        });
        keys
    }

    fn rows(&self, keys: &[Key], seq: u64) -> Result<RecordBatch, OperatorError> {
        let mut month = Date32Builder::with_capacity(keys.len());
        let mut tenant = StringBuilder::new();
        let mut currency = StringBuilder::new();
        let mut paid = Int64Builder::with_capacity(keys.len());
        let mut refunded = Int64Builder::with_capacity(keys.len());
        let mut net = Int64Builder::with_capacity(keys.len());
        let mut count = Int64Builder::with_capacity(keys.len());
        let mut seqs = UInt64Builder::with_capacity(keys.len());
        let mut deleted = BooleanBuilder::with_capacity(keys.len());
        for key in keys {
            let (p, r, n, events) = match self.row(*key) {
                Some(c) => (c.paid.get(), c.refunded.get(), c.invoices_paid, c.events),
                None => (0, 0, 0, 0),
            };
            month.append_value(key.1);
            tenant.append_value(self.tenants.name(key.0));
            currency.append_value(self.currencies.name(u32::from(key.2)));
            paid.append_value(saturating_i64(p));
            refunded.append_value(saturating_i64(r));
            net.append_value(saturating_i64(p - r));
            count.append_value(n);
            seqs.append_value(seq);
            deleted.append_value(events == 0);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(month.finish()),
            Arc::new(tenant.finish()),
            Arc::new(currency.finish()),
            Arc::new(paid.finish()),
            Arc::new(refunded.finish()),
            Arc::new(net.finish()),
            Arc::new(count.finish()),
            Arc::new(seqs.finish()),
            Arc::new(deleted.finish()),
        ];
        RecordBatch::try_new(Arc::clone(&SCHEMA), columns)
            .map_err(|source| OperatorError::Arrow { view: VIEW, source })
    }
}

impl Operator for RevenueOperator {
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
        self.fold(e, 1);
    }

    fn retract(&mut self, _void: &Event, targets: &[Target], _ledger: &Ledger) {
        for t in targets {
            self.fold(&t.event, -1);
        }
    }

    fn final_rows(&self, unit: &[Step<'_>], final_before: i64, _ledger: &Ledger) -> Vec<FinalRow> {
        let mut out = Vec::new();
        for e in unit_events(unit) {
            let currency = match &e.payload {
                Payload::InvoicePaid { currency, .. }
                | Payload::InvoiceRefunded { currency, .. } => currency,
                _ => continue,
            };
            let (month, end) = month_bounds(e.time);
            if end > final_before {
                continue;
            }
            let (Some(t), Some(c)) = (self.tenants.get(&e.tenant), self.currencies.get(currency))
            else {
                continue;
            };
            let key = (
                t,
                month_date32(e.time),
                u16::try_from(c).unwrap_or(u16::MAX),
            );
            let Some(cash) = self.row(key).filter(|c| c.events > 0) else {
                continue;
            };
            let (paid, refunded) = (cash.paid.get(), cash.refunded.get());
            out.push((
                Arc::from(e.tenant.as_str()),
                Json::new()
                    .str("currency", Some(currency))
                    .date("month", Some(month))
                    .finish(),
                Json::new()
                    .int("paid", Some(saturating_i64(paid)))
                    .int("refunded", Some(saturating_i64(refunded)))
                    .int("net", Some(saturating_i64(paid - refunded)))
                    .int("invoices_paid", Some(cash.invoices_paid))
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
        let mut keys = std::mem::take(&mut self.dirty);
        keys.sort_unstable();
        keys.dedup();
        let rows = self.rows(&keys, seq).map(Some);
        // Rows left with no invoice event are gone (written as tombstones
        // above); only changed rows can be.
        for (t, month, currency) in keys {
            if let Some(rows) = self.by_tenant.get_mut(t as usize)
                && let Ok(i) = find(rows, month, currency)
                && rows.get(i).is_some_and(|r| r.events == 0)
            {
                rows.remove(i);
                self.len -= 1;
            }
        }
        rows
    }

    fn state_rows(&self) -> usize {
        self.len
    }

    fn snapshot_chunks<'a>(
        &'a self,
        seq: u64,
    ) -> Box<dyn Iterator<Item = Result<RecordBatch, OperatorError>> + 'a> {
        super::in_chunks(self.sorted_keys(), move |keys| self.rows(keys, seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::testing::test_event;

    fn invoice(id: &str, ty: &str, time: &str, amount: i64, currency: &str) -> Event {
        test_event(
            id,
            "s",
            "acme",
            ty,
            time,
            &format!(r#"{{"invoice_id":"i-{id}","amount":{amount},"currency":"{currency}"}}"#),
        )
    }

    #[test]
    fn paid_refunded_and_net_per_month_and_currency() {
        let mut op = RevenueOperator::new();
        for e in [
            invoice("1", "invoice.paid", "2025-01-05T00:00:00Z", 1000, "USD"),
            invoice("2", "invoice.paid", "2025-01-25T00:00:00Z", 500, "USD"),
            invoice("3", "invoice.refunded", "2025-01-26T00:00:00Z", 200, "USD"),
            invoice("4", "invoice.refunded", "2025-02-01T00:00:00Z", 100, "USD"),
            invoice("5", "invoice.paid", "2025-01-07T00:00:00Z", 900, "EUR"),
        ] {
            op.apply(&e);
        }
        let b = op.snapshot(7).unwrap().unwrap();
        let text = arrow::util::pretty::pretty_format_batches(&[b])
            .unwrap()
            .to_string();
        let want = "\
+------------+--------+----------+------+----------+------+---------------+------+----------+
| month      | tenant | currency | paid | refunded | net  | invoices_paid | _seq | _deleted |
+------------+--------+----------+------+----------+------+---------------+------+----------+
| 2025-01-01 | acme   | EUR      | 900  | 0        | 900  | 1             | 7    | false    |
| 2025-01-01 | acme   | USD      | 1500 | 200      | 1300 | 2             | 7    | false    |
| 2025-02-01 | acme   | USD      | 0    | 100      | -100 | 0             | 7    | false    |
+------------+--------+----------+------+----------+------+---------------+------+----------+";
        assert_eq!(text, want);
        assert_eq!(op.take_rows(8).unwrap().unwrap().num_rows(), 3);
        assert!(op.take_rows(9).unwrap().is_none());
    }

    #[test]
    fn sums_stay_exact_past_int64_and_a_void_takes_a_row_out() {
        let mut op = RevenueOperator::new();
        let big = i64::MAX;
        let a = invoice("a", "invoice.paid", "2025-03-02T00:00:00Z", big, "USD");
        let b = invoice("b", "invoice.paid", "2025-03-03T00:00:00Z", big, "USD");
        let c = invoice("c", "invoice.paid", "2025-01-03T00:00:00Z", 5, "USD");
        for e in [&a, &b, &c] {
            op.apply(e);
        }
        assert_eq!(op.state_rows(), 2);
        let key = (0, month_date32(a.time), 0);
        assert_eq!(op.row(key).map(|r| r.paid.get()), Some(2 * i128::from(big)));
        op.take_rows(1).unwrap();
        // Taking one back leaves exactly the other, not a saturated sum.
        let ledger = Ledger::default();
        let void = invoice("v", "invoice.paid", "2025-03-04T00:00:00Z", 0, "USD");
        op.retract(&void, &[Target { event: b.clone() }], &ledger);
        assert_eq!(op.row(key).map(|r| r.paid.get()), Some(i128::from(big)));
        op.take_rows(2).unwrap();
        // The month's last invoice voided: a tombstone, and the row is gone.
        op.retract(&void, &[Target { event: a.clone() }], &ledger);
        let gone = op.take_rows(3).unwrap().unwrap();
        assert_eq!(gone.num_rows(), 1);
        let deleted = gone
            .column(8)
            .as_any()
            .downcast_ref::<arrow::array::BooleanArray>()
            .unwrap();
        assert!(deleted.value(0));
        assert_eq!(op.state_rows(), 1);
        assert!(op.row(key).is_none());
        // Negative sums keep their sign through the two words.
        let mut e = Exact::default();
        e.add(-7);
        assert_eq!(e.get(), -7);
        e.add(i128::from(i64::MIN) * 4);
        assert_eq!(e.get(), -7 + i128::from(i64::MIN) * 4);
    }
}
