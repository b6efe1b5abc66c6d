//! The `revenue` view: collected cash per (`month`, `tenant`, `currency`),
//! from `invoice.paid` and `invoice.refunded`, month of the event `time`.
//!
//! Sums commute, so arrival order cannot matter; a late invoice rewrites
//! only its own row, written as a new version like `usage`. A void
//! subtracts what its target added; a row left with no invoice event is
//! written as a tombstone (`_deleted`). The state is
//! re-folded from the `events` archive at start-up.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Int64Builder, RecordBatch, StringBuilder,
    UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::FixedState;
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

/// (month start µs, tenant id, currency id): 16 bytes, not two fat
/// pointers, because there is a row per tenant and month (2.4M at 100k
/// tenants over two years).
type Key = (i64, u32, u16);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cash {
    /// Exact sums (i128): a void subtracts exactly what its target added;
    /// written saturated to Int64.
    pub paid: i128,
    pub refunded: i128,
    pub invoices_paid: i64,
    /// Invoice events (paid and refunded) in the row: none left, no row.
    pub events: i64,
}

pub struct RevenueOperator {
    rows: HashMap<Key, Cash, FixedState>,
    dirty: HashSet<Key, FixedState>,
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
            rows: HashMap::with_hasher(FixedState),
            dirty: HashSet::with_hasher(FixedState),
            tenants: Names::default(),
            currencies: Names::default(),
        }
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
        let key = (
            month_bounds(e.time).0,
            self.tenants.id(&e.tenant),
            u16::try_from(self.currencies.id(currency)).unwrap_or(u16::MAX),
        );
        let cash = self.rows.entry(key).or_default();
        if paid {
            cash.paid += i128::from(amount) * i128::from(sign);
            cash.invoices_paid += sign;
        } else {
            cash.refunded += i128::from(amount) * i128::from(sign);
        }
        cash.events += sign;
        self.dirty.insert(key);
    }

    /// The rows' keys in key order: month, tenant, currency.
    fn sorted_keys(&self) -> Vec<Key> {
        let mut keys: Vec<Key> = self.rows.keys().copied().collect();
        keys.sort_by(|a, b| {
            (
                a.0,
                self.tenants.name(a.1),
                self.currencies.name(u32::from(a.2)),
            )
                .cmp(&(
                    b.0,
                    self.tenants.name(b.1),
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
            let gone = Cash::default();
            let c = self.rows.get(key).unwrap_or(&gone);
            month.append_value(month_date32(key.0));
            tenant.append_value(self.tenants.name(key.1));
            currency.append_value(self.currencies.name(u32::from(key.2)));
            paid.append_value(saturating_i64(c.paid));
            refunded.append_value(saturating_i64(c.refunded));
            net.append_value(saturating_i64(c.paid - c.refunded));
            count.append_value(c.invoices_paid);
            seqs.append_value(seq);
            deleted.append_value(c.events == 0);
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
            let Some(cash) = self
                .rows
                .get(&(month, t, u16::try_from(c).unwrap_or(u16::MAX)))
                .filter(|c| c.events > 0)
            else {
                continue;
            };
            out.push((
                Arc::from(e.tenant.as_str()),
                Json::new()
                    .str("currency", Some(currency))
                    .date("month", Some(month))
                    .finish(),
                Json::new()
                    .int("paid", Some(saturating_i64(cash.paid)))
                    .int("refunded", Some(saturating_i64(cash.refunded)))
                    .int("net", Some(saturating_i64(cash.paid - cash.refunded)))
                    .int("invoices_paid", Some(cash.invoices_paid))
                    .finish(),
            ));
        }
        out
    }

    fn take_rows(&mut self, seq: u64) -> Result<Option<RecordBatch>, OperatorError> {
        if self.dirty.is_empty() {
            return Ok(None);
        }
        let keys: Vec<Key> = self.dirty.drain().collect();
        let rows = self.rows(&keys, seq).map(Some);
        self.rows.retain(|_, c| c.events != 0);
        rows
    }

    fn state_rows(&self) -> usize {
        self.rows.len()
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
}
