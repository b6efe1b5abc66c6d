//! The `events` view: the archive (audit trail). One row per accepted event
//! of every type, with its stream position, so analysts can answer
//! questions nobody modelled yet. Append-only: a batch's rows go to one file.

use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, RecordBatch, StringBuilder, TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::{Operator, OperatorError};
use crate::event::Event;

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
    }

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
        ];
        RecordBatch::try_new(schema(), columns)
            .map(Some)
            .map_err(|source| OperatorError::Arrow { view: VIEW, source })
    }
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
}
