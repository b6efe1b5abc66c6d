//! The `restatements` view: numbers that changed after they were final.
//!
//! A row of `usage` at granularity `month`, `overages`, `mrr` or `revenue`
//! is *final before* a message when its window, period or month ends at
//! least lateness before the stream clock of the prefix before it. For
//! every accepted message after which such a row differs from what it was
//! before (a row that appears or disappears included), one restatement
//! per row: the row's key, its columns before and after as JSON texts,
//! and the cause (`void`, `catalog`, `late_event`).
//!
//! The processor decides them message by message in stream order: for a
//! message that may touch a final row, each view lists the final rows the
//! message may change ([`super::Operator::final_rows`]) just before and
//! just after it is applied, and the differences are restatements. This
//! operator only stores them (append-only); the live run also publishes
//! each as a `<view>.restated` event (see `crate::sink::restated`).
//!
//! The JSON texts are canonical ([`Json`]): keys in ascending byte order,
//! no whitespace, every column present (NULL as `null`), dates
//! `YYYY-MM-DD`, timestamps RFC 3339 UTC with six fractional digits,
//! decimals as strings with nine fractional digits.

use std::fmt::Write as _;
use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, RecordBatch, StringBuilder, TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::timestamp_type as ts;
use super::{Ledger, Operator, OperatorError, Target};
use crate::event::Event;
use crate::event::decimal::SCALE;
use crate::event::time::{DAY_US, civil_from_days};

pub const VIEW: &str = "restatements";

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("stream_seq", DataType::UInt64, false),
        Field::new("published_at", ts(), false),
        Field::new("tenant", DataType::Utf8, false),
        Field::new("view", DataType::Utf8, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("before", DataType::Utf8, true),
        Field::new("after", DataType::Utf8, true),
        Field::new("cause", DataType::Utf8, false),
    ]))
});

/// A row a message may restate, as a view shows it: (tenant, key JSON,
/// columns JSON, whether its window, period or month is final). Views
/// whose key fixes the window give final rows only; `overages`, whose
/// merged row's `period_end` may move with a message, gives the row either
/// way and says which, so [`diff`] judges it on the side the spec names.
pub type FinalRow = (Arc<str>, String, String, bool);

/// One restated row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restatement {
    pub stream_seq: u64,
    pub published_at: i64,
    pub tenant: String,
    pub view: &'static str,
    pub key: String,
    pub before: Option<String>,
    pub after: Option<String>,
    pub cause: &'static str,
}

/// Why a message restated: a void, a catalog event, or anything else (a
/// late event).
pub fn cause_of(e: &Event) -> &'static str {
    if e.event_type == crate::event::payload::VOIDED_TYPE {
        "void"
    } else if e.event_type.starts_with("catalog.") {
        "catalog"
    } else {
        "late_event"
    }
}

/// The restatements of `view` between its final rows `before` and `after`
/// a message.
pub fn diff(
    view: &'static str,
    m: &Event,
    mut before: Vec<FinalRow>,
    mut after: Vec<FinalRow>,
    out: &mut Vec<Restatement>,
) {
    let key = |r: &FinalRow| (Arc::clone(&r.0), r.1.clone());
    before.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    after.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    before.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    after.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    let (mut i, mut j) = (0, 0);
    let mut push = |tenant: &str, k: &str, b: Option<&String>, a: Option<&String>| {
        out.push(Restatement {
            stream_seq: m.stream_seq,
            published_at: m.published_at,
            tenant: tenant.to_owned(),
            view,
            key: k.to_owned(),
            before: b.cloned(),
            after: a.cloned(),
            cause: cause_of(m),
        });
    };
    // Finality is judged on the row as it was before m; a row that
    // appears, as it is after.
    while i < before.len() || j < after.len() {
        match (before.get(i), after.get(j)) {
            (Some(b), Some(a)) if key(b) == key(a) => {
                if b.3 && b.2 != a.2 {
                    push(&b.0, &b.1, Some(&b.2), Some(&a.2));
                }
                i += 1;
                j += 1;
            }
            (Some(b), Some(a)) if key(b) < key(a) => {
                if b.3 {
                    push(&b.0, &b.1, Some(&b.2), None);
                }
                i += 1;
            }
            (Some(b), None) => {
                if b.3 {
                    push(&b.0, &b.1, Some(&b.2), None);
                }
                i += 1;
            }
            (_, Some(a)) => {
                if a.3 {
                    push(&a.0, &a.1, None, Some(&a.2));
                }
                j += 1;
            }
            (None, None) => break,
        }
    }
}

/// A canonical JSON object text (see the module documentation).
///
/// The values are written one after another into one buffer and put in
/// key order at [`Json::finish`]: a row's text costs two allocations, not
/// one per column (the processor builds two per final row a message may
/// change).
#[derive(Default)]
pub struct Json {
    buf: String,
    /// Each field's name and its value's range in `buf`.
    fields: Vec<(&'static str, usize, usize)>,
}

impl Json {
    pub fn new() -> Json {
        Json::default()
    }

    /// Adds field `name`, its value written by `write` (or `null`).
    fn field<T>(
        mut self,
        name: &'static str,
        v: Option<T>,
        write: impl FnOnce(&mut String, T),
    ) -> Json {
        let from = self.buf.len();
        match v {
            Some(v) => write(&mut self.buf, v),
            None => self.buf.push_str("null"),
        }
        self.fields.push((name, from, self.buf.len()));
        self
    }

    pub fn str(self, name: &'static str, v: Option<&str>) -> Json {
        self.field(name, v, |buf, s| match serde_json::to_string(s) {
            Ok(text) => buf.push_str(&text),
            Err(_) => buf.push_str("null"),
        })
    }

    pub fn int(self, name: &'static str, v: Option<i64>) -> Json {
        self.field(name, v, |buf, v| {
            let _ = write!(buf, "{v}");
        })
    }

    pub fn float(self, name: &'static str, v: Option<f64>) -> Json {
        let text = v
            .filter(|f| f.is_finite())
            .and_then(|f| serde_json::to_string(&f).ok());
        self.field(name, text, |buf, t| buf.push_str(&t))
    }

    /// A Decimal128(38, 9) value (nano-units) as a string with nine
    /// fractional digits.
    pub fn dec(self, name: &'static str, v: Option<i128>) -> Json {
        self.field(name, v, |buf, v| {
            buf.push('"');
            push_decimal(buf, v);
            buf.push('"');
        })
    }

    /// A timestamp (µs) as RFC 3339 UTC with six fractional digits.
    pub fn ts(self, name: &'static str, v: Option<i64>) -> Json {
        self.field(name, v, |buf, v| {
            buf.push('"');
            push_timestamp(buf, v);
            buf.push('"');
        })
    }

    /// A date (the day holding the instant `v`, µs) as `YYYY-MM-DD`.
    pub fn date(self, name: &'static str, v: Option<i64>) -> Json {
        self.field(name, v, |buf, v| {
            buf.push('"');
            push_date(buf, v);
            buf.push('"');
        })
    }

    pub fn finish(mut self) -> String {
        self.fields
            .sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let names: usize = self.fields.iter().map(|f| f.0.len() + 4).sum();
        let mut out = String::with_capacity(self.buf.len() + names + 2);
        out.push('{');
        for (i, (k, from, to)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('"');
            out.push_str(k);
            out.push_str("\":");
            out.push_str(self.buf.get(*from..*to).unwrap_or("null"));
        }
        out.push('}');
        out
    }
}

/// Nano-units as a decimal with nine fractional digits, no exponent.
#[cfg(test)]
pub fn decimal_text(v: i128) -> String {
    let mut out = String::new();
    push_decimal(&mut out, v);
    out
}

fn push_decimal(out: &mut String, v: i128) {
    let scale = 10u128.pow(SCALE);
    let a = v.unsigned_abs();
    if v < 0 {
        out.push('-');
    }
    let _ = write!(out, "{}.", a / scale);
    push_digits(out, (a % scale) as u64, 9);
}

/// `v` in exactly `width` decimal digits, zero-padded (`v` < 10^`width`).
fn push_digits(out: &mut String, v: u64, width: u32) {
    let mut p = 10u64.pow(width.saturating_sub(1));
    while p > 0 {
        let d = (v / p % 10) as u8;
        out.push(char::from(b'0' + d));
        p /= 10;
    }
}

/// `YYYY-MM-DD` of the day holding `t` (µs, UTC).
#[cfg(test)]
pub fn date_text(t: i64) -> String {
    let mut out = String::with_capacity(10);
    push_date(&mut out, t);
    out
}

fn push_date(out: &mut String, t: i64) {
    let (y, m, d) = civil_from_days(t.div_euclid(DAY_US));
    match u64::try_from(y) {
        Ok(y) if y <= 9999 => push_digits(out, y, 4),
        _ => {
            let _ = write!(out, "{y:04}");
        }
    }
    out.push('-');
    push_digits(out, m.unsigned_abs(), 2);
    out.push('-');
    push_digits(out, d.unsigned_abs(), 2);
}

/// RFC 3339 UTC with six fractional digits and `Z`.
#[cfg(test)]
pub fn timestamp_text(t: i64) -> String {
    let mut out = String::with_capacity(27);
    push_timestamp(&mut out, t);
    out
}

fn push_timestamp(out: &mut String, t: i64) {
    let rem = t.rem_euclid(DAY_US).unsigned_abs();
    let secs = rem / 1_000_000;
    push_date(out, t);
    out.push('T');
    push_digits(out, secs / 3600, 2);
    out.push(':');
    push_digits(out, secs / 60 % 60, 2);
    out.push(':');
    push_digits(out, secs % 60, 2);
    out.push('.');
    push_digits(out, rem % 1_000_000, 6);
    out.push('Z');
}

/// The `restatements` operator: stores what the processor decided.
#[derive(Default)]
pub struct RestatementsOperator {
    pending: Vec<Restatement>,
}

impl RestatementsOperator {
    pub fn new() -> RestatementsOperator {
        RestatementsOperator::default()
    }
}

impl Operator for RestatementsOperator {
    fn view(&self) -> &'static str {
        VIEW
    }

    fn schema(&self) -> SchemaRef {
        Arc::clone(&SCHEMA)
    }

    fn apply(&mut self, _e: &Event) {}

    /// Restatements are decided by the processor, not folded from events.
    fn retract(&mut self, _void: &Event, _targets: &[Target], _ledger: &Ledger) {}

    fn record_restatements(&mut self, rows: &[Restatement]) {
        self.pending.extend_from_slice(rows);
    }

    fn take_rows(&mut self, _seq: u64) -> Result<Option<RecordBatch>, OperatorError> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let rows = std::mem::take(&mut self.pending);
        let mut seq = UInt64Builder::with_capacity(rows.len());
        let mut published = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let mut tenant = StringBuilder::new();
        let mut view = StringBuilder::new();
        let mut key = StringBuilder::new();
        let mut before = StringBuilder::new();
        let mut after = StringBuilder::new();
        let mut cause = StringBuilder::new();
        for r in &rows {
            seq.append_value(r.stream_seq);
            published.append_value(r.published_at);
            tenant.append_value(&r.tenant);
            view.append_value(r.view);
            key.append_value(&r.key);
            before.append_option(r.before.as_deref());
            after.append_option(r.after.as_deref());
            cause.append_value(r.cause);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(seq.finish()),
            Arc::new(published.finish()),
            Arc::new(tenant.finish()),
            Arc::new(view.finish()),
            Arc::new(key.finish()),
            Arc::new(before.finish()),
            Arc::new(after.finish()),
            Arc::new(cause.finish()),
        ];
        RecordBatch::try_new(Arc::clone(&SCHEMA), columns)
            .map(Some)
            .map_err(|source| OperatorError::Arrow { view: VIEW, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_timestamps_and_decimals_are_written_digit_by_digit_as_formatted() {
        let formatted = |t: i64| {
            let (y, m, d) = civil_from_days(t.div_euclid(DAY_US));
            let rem = t.rem_euclid(DAY_US);
            let secs = rem / 1_000_000;
            format!(
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
                secs / 3600,
                secs / 60 % 60,
                secs % 60,
                rem % 1_000_000
            )
        };
        for t in [
            0,
            1,
            -1,
            1_735_689_599_999_999,
            1_767_225_600_123_456,
            -62_135_596_800_000_000,
            253_402_300_799_999_999,
            -86_400_000_000 * 800_000,
        ] {
            assert_eq!(timestamp_text(t), formatted(t), "{t}");
            assert_eq!(
                date_text(t),
                formatted(t)[..formatted(t).find('T').unwrap_or(0)]
            );
        }
        assert_eq!(decimal_text(0), "0.000000000");
        assert_eq!(decimal_text(-1), "-0.000000001");
        assert_eq!(decimal_text(12_500_000_000), "12.500000000");
        assert_eq!(
            decimal_text(i128::MIN),
            "-170141183460469231731687303715.884105728"
        );
        let j = Json::new().int("b", None).dec("a", Some(-1)).finish();
        assert_eq!(j, r#"{"a":"-0.000000001","b":null}"#);
    }

    #[test]
    fn texts_are_canonical() {
        let j = Json::new()
            .str("metric", Some("api_calls"))
            .ts("window_start", Some(1_735_689_600_000_000))
            .str("granularity", Some("month"))
            .finish();
        assert_eq!(
            j,
            r#"{"granularity":"month","metric":"api_calls","window_start":"2025-01-01T00:00:00.000000Z"}"#
        );
        assert_eq!(decimal_text(12_500_000_000), "12.500000000");
        assert_eq!(decimal_text(5), "0.000000005");
        assert_eq!(date_text(1_735_689_600_000_000), "2025-01-01");
        let j = Json::new()
            .dec("used", None)
            .float("pct_used", Some(85.5))
            .int("events", Some(3))
            .str("q", Some("a\"b"))
            .finish();
        assert_eq!(j, r#"{"events":3,"pct_used":85.5,"q":"a\"b","used":null}"#);
    }
}
