//! The `events` view: the archive (audit trail). One row per accepted event
//! of every type, with its stream position and every attribute, so
//! analysts can answer questions nobody modelled yet. Append-only: a
//! batch's rows go to one file. [`decode`] reads the rows back into events
//! (start-up rebuilds the dedup horizon and operator state from them).

use std::sync::{Arc, LazyLock};

use arrow::array::{
    Array, ArrayRef, RecordBatch, StringArray, StringBuilder, TimestampMicrosecondArray,
    TimestampMicrosecondBuilder, UInt64Array, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::{Ledger, Operator, OperatorError, Target};
use crate::event::{Event, Text, payload_from_archive};

pub const VIEW: &str = "events";

use super::timestamp_type as ts;

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("stream_seq", DataType::UInt64, false),
        Field::new("published_at", ts(), false),
        Field::new("id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("type", DataType::Utf8, false),
        Field::new("tenant", DataType::Utf8, false),
        Field::new("time", ts(), false),
        Field::new("dataversion", DataType::Utf8, false),
        Field::new("actor", DataType::Utf8, true),
        Field::new("actortype", DataType::Utf8, true),
        Field::new("subject", DataType::Utf8, true),
        Field::new("data", DataType::Utf8, true),
        // Appended after the first release's columns: files written before
        // them stay readable, the missing columns reading as NULL.
        Field::new("datacontenttype", DataType::Utf8, true),
        Field::new("dataschema", DataType::Utf8, true),
        // The other attributes, as a JSON object text (see `Event::extensions`).
        Field::new("extensions", DataType::Utf8, true),
    ]))
});

/// The archive's schema.
pub fn schema() -> SchemaRef {
    Arc::clone(&SCHEMA)
}

/// Column builders for the rows of the current batch.
pub struct EventsArchive {
    rows: usize,
    stream_seq: UInt64Builder,
    published_at: TimestampMicrosecondBuilder,
    id: StringBuilder,
    source: StringBuilder,
    event_type: StringBuilder,
    tenant: StringBuilder,
    time: TimestampMicrosecondBuilder,
    dataversion: StringBuilder,
    actor: StringBuilder,
    actortype: StringBuilder,
    subject: StringBuilder,
    data: StringBuilder,
    datacontenttype: StringBuilder,
    dataschema: StringBuilder,
    extensions: StringBuilder,
}

impl Default for EventsArchive {
    fn default() -> Self {
        Self::new()
    }
}

impl EventsArchive {
    pub fn new() -> EventsArchive {
        EventsArchive {
            rows: 0,
            stream_seq: UInt64Builder::new(),
            published_at: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            id: StringBuilder::new(),
            source: StringBuilder::new(),
            event_type: StringBuilder::new(),
            tenant: StringBuilder::new(),
            time: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            dataversion: StringBuilder::new(),
            actor: StringBuilder::new(),
            actortype: StringBuilder::new(),
            subject: StringBuilder::new(),
            data: StringBuilder::new(),
            datacontenttype: StringBuilder::new(),
            dataschema: StringBuilder::new(),
            extensions: StringBuilder::new(),
        }
    }
}

impl Operator for EventsArchive {
    fn view(&self) -> &'static str {
        VIEW
    }

    fn schema(&self) -> SchemaRef {
        schema()
    }

    fn apply(&mut self, e: &Event) {
        self.rows += 1;
        self.stream_seq.append_value(e.stream_seq);
        self.published_at.append_value(e.published_at);
        self.id.append_value(&e.id);
        self.source.append_value(&e.source);
        self.event_type.append_value(&e.event_type);
        self.tenant.append_value(&e.tenant);
        self.time.append_value(e.time);
        self.dataversion.append_value(&e.dataversion);
        self.actor.append_option(e.actor.as_deref());
        self.actortype.append_option(e.actortype.as_deref());
        self.subject.append_option(e.subject.as_deref());
        self.data.append_option(e.data.as_deref());
        self.datacontenttype
            .append_option(e.datacontenttype.as_deref());
        self.dataschema.append_option(e.dataschema.as_deref());
        self.extensions.append_option(e.extensions.as_deref());
    }

    /// The archive holds every accepted event, voided or not.
    fn observe_voided(&mut self, e: &Event) {
        self.apply(e);
    }

    /// The archive is the audit trail: a void removes nothing from it.
    fn retract(&mut self, _void: &Event, _targets: &[Target], _ledger: &Ledger) {}

    fn take_rows(&mut self, _seq: u64) -> Result<Option<RecordBatch>, OperatorError> {
        if self.rows == 0 {
            return Ok(None);
        }
        self.rows = 0;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.stream_seq.finish()),
            Arc::new(self.published_at.finish()),
            Arc::new(self.id.finish()),
            Arc::new(self.source.finish()),
            Arc::new(self.event_type.finish()),
            Arc::new(self.tenant.finish()),
            Arc::new(self.time.finish()),
            Arc::new(self.dataversion.finish()),
            Arc::new(self.actor.finish()),
            Arc::new(self.actortype.finish()),
            Arc::new(self.subject.finish()),
            Arc::new(self.data.finish()),
            Arc::new(self.datacontenttype.finish()),
            Arc::new(self.dataschema.finish()),
            Arc::new(self.extensions.finish()),
        ];
        RecordBatch::try_new(schema(), columns)
            .map(Some)
            .map_err(|source| OperatorError::Arrow { view: VIEW, source })
    }
}

fn column<'a, T: 'static>(
    batch: &'a RecordBatch,
    name: &str,
) -> Result<Option<&'a T>, OperatorError> {
    super::stored_column(batch, VIEW, name)
}

fn required<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T, OperatorError> {
    super::required_column(batch, VIEW, name)
}

/// Calls `f` with the event of every row of `batch` (archive rows, as
/// [`EventsArchive`] wrote them), in row order. Columns are found by name;
/// a nullable column the file does not have (it was written before the
/// column existed) reads as NULL.
pub fn decode(batch: &RecordBatch, mut f: impl FnMut(Event)) -> Result<(), OperatorError> {
    let seqs = required::<UInt64Array>(batch, "stream_seq")?;
    let published = required::<TimestampMicrosecondArray>(batch, "published_at")?;
    let time = required::<TimestampMicrosecondArray>(batch, "time")?;
    let s = |name: &str| required::<StringArray>(batch, name);
    let (id, source, ty, tenant, dataversion) = (
        s("id")?,
        s("source")?,
        s("type")?,
        s("tenant")?,
        s("dataversion")?,
    );
    let o = |name: &str| column::<StringArray>(batch, name);
    let (actor, actortype, subject, data) =
        (o("actor")?, o("actortype")?, o("subject")?, o("data")?);
    let (datacontenttype, dataschema, extensions) =
        (o("datacontenttype")?, o("dataschema")?, o("extensions")?);
    let text = |a: Option<&StringArray>, i: usize| {
        a.filter(|a| !a.is_null(i)).map(|a| Text::from(a.value(i)))
    };
    for i in 0..batch.num_rows() {
        let data = text(data, i);
        let payload = payload_from_archive(ty.value(i), data.as_deref()).map_err(|r| {
            OperatorError::Restore {
                view: VIEW,
                detail: format!(
                    "archived event {} at seq {}: {r}",
                    id.value(i),
                    seqs.value(i)
                ),
            }
        })?;
        f(Event {
            stream_seq: seqs.value(i),
            published_at: published.value(i),
            id: id.value(i).into(),
            source: source.value(i).into(),
            event_type: ty.value(i).into(),
            tenant: tenant.value(i).into(),
            time: time.value(i),
            dataversion: dataversion.value(i).into(),
            actor: text(actor, i),
            actortype: text(actortype, i),
            subject: text(subject, i),
            datacontenttype: text(datacontenttype, i),
            dataschema: text(dataschema, i),
            data,
            extensions: text(extensions, i),
            payload,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Limits, validate_message};

    #[test]
    fn one_row_per_event_then_empty() {
        let mut op = EventsArchive::new();
        let json = br#"{"specversion":"1.0","id":"e1","source":"s","type":"auth.user_logged_in","time":"2026-01-01T00:00:00Z","tenant":"acme","actor":"u1"}"#;
        let e = validate_message(
            json,
            "tally.events.acme.auth.user_logged_in",
            "tally.events",
            3,
            1_767_225_600_000_000,
            &Limits::default(),
        )
        .unwrap();
        op.apply(&e);
        op.apply(&e);
        let b = op.take_rows(9).unwrap().unwrap();
        assert_eq!(b.num_rows(), 2);
        assert_eq!(b.schema(), schema());
        assert!(op.take_rows(9).unwrap().is_none());
    }

    /// Events with every attribute, with none, and with odd extensions.
    fn varied_events() -> Vec<Event> {
        let lines = [
            (
                "tally.events.acme.usage.recorded",
                r#"{"specversion":"1.0","id":"u1","source":"metering","type":"usage.recorded","time":"2026-01-01T00:00:00.123456Z","tenant":"acme","dataversion":"1","actor":"key_9","actortype":"api_key","subject":"item/7","datacontenttype":"application/json","dataschema":"https://example.com/usage.json","traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01","region":{ "name" : "eu" },"retries":[1,2.50],"note":null,"data":{"metric":"api_calls","quantity":"12.5"}}"#,
            ),
            (
                "tally.events.beta.auth.user_logged_in",
                r#"{"specversion":"1.0","id":"a1","source":"auth","type":"auth.user_logged_in","time":"2026-01-01T00:00:01Z","tenant":"beta"}"#,
            ),
            (
                "tally.events.beta.invoice.paid",
                r#"{"tenant":"beta","x\"q\u00e9\n":"\u00e9","specversion":"1.0","id":"i1","source":"billing","type":"invoice.paid","time":"2026-01-01T00:00:02Z","data":{"invoice_id":"inv-1","amount":4900,"currency":"USD"}}"#,
            ),
        ];
        lines
            .iter()
            .enumerate()
            .map(|(i, (subject, json))| {
                validate_message(
                    json.as_bytes(),
                    subject,
                    "tally.events",
                    i as u64 + 1,
                    1_767_225_600_000_000 + i as i64,
                    &Limits::default(),
                )
                .unwrap()
            })
            .collect()
    }

    fn decoded(batch: &RecordBatch) -> Vec<Event> {
        let mut out = Vec::new();
        decode(batch, |e| out.push(e)).unwrap();
        out
    }

    #[test]
    fn every_attribute_round_trips_through_the_archive() {
        let events = varied_events();
        assert_eq!(
            events[0].extensions.as_deref(),
            Some(
                r#"{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01","region":{ "name" : "eu" },"retries":[1,2.50],"note":null}"#
            )
        );
        assert_eq!(
            events[0].dataschema.as_deref(),
            Some("https://example.com/usage.json")
        );
        assert_eq!(
            events[0].datacontenttype.as_deref(),
            Some("application/json")
        );
        assert_eq!(events[1].extensions, None);
        assert_eq!(
            events[2].extensions.as_deref(),
            Some(r#"{"x\"qé\u000a":"\u00e9"}"#)
        );
        let mut op = EventsArchive::new();
        for e in &events {
            op.apply(e);
        }
        let batch = op.take_rows(3).unwrap().unwrap();
        assert_eq!(decoded(&batch), events);
    }

    #[test]
    fn files_from_before_the_new_columns_decode_them_as_null() {
        let events = varied_events();
        let mut op = EventsArchive::new();
        for e in &events {
            op.apply(e);
        }
        let batch = op.take_rows(3).unwrap().unwrap();
        let old: Vec<usize> = ["datacontenttype", "dataschema", "extensions"]
            .iter()
            .map(|c| batch.schema().index_of(c).unwrap())
            .collect();
        let kept: Vec<usize> = (0..batch.num_columns())
            .filter(|i| !old.contains(i))
            .collect();
        let older = batch.project(&kept).unwrap();
        let expected: Vec<Event> = events
            .into_iter()
            .map(|e| Event {
                datacontenttype: None,
                dataschema: None,
                extensions: None,
                ..e
            })
            .collect();
        assert_eq!(decoded(&older), expected);
        // A required column missing is an error that says which.
        let no_id: Vec<usize> = (0..batch.num_columns())
            .filter(|i| *i != batch.schema().index_of("id").unwrap())
            .collect();
        let err = decode(&batch.project(&no_id).unwrap(), |_| {}).unwrap_err();
        assert!(err.to_string().contains("column id missing"), "{err}");
    }
}
