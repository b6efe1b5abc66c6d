//! The `corrections` view: one row per accepted `event.voided`, what it
//! names and what it hit.
//!
//! `targets` counts the accepted events of the prefix that the void voids
//! (also when another void voids them too), `first_target_seq` is the
//! stream sequence of the first of them in stream order. Both change when
//! a target arrives after its void, so rows are versioned by the void's
//! `stream_seq`. The state (one entry per void) is re-folded from the
//! `events` archive at start-up.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, Int64Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::timestamp_type as ts;
use super::{FixedState, Ledger, Operator, OperatorError, Step, Storage, Target};
use crate::event::{Event, Payload, Text};

pub const VIEW: &str = "corrections";

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("stream_seq", DataType::UInt64, false),
        Field::new("published_at", ts(), false),
        Field::new("tenant", DataType::Utf8, false),
        Field::new("target_source", DataType::Utf8, false),
        Field::new("target_id", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, true),
        Field::new("targets", DataType::Int64, false),
        Field::new("first_target_seq", DataType::UInt64, true),
        Field::new("_seq", DataType::UInt64, false),
    ]))
});

#[derive(Debug, Clone)]
struct Row {
    published_at: i64,
    tenant: Text,
    target_source: Text,
    target_id: Text,
    reason: Option<String>,
    targets: i64,
    first_target_seq: Option<u64>,
}

impl Row {
    fn hit(&mut self, seq: u64) {
        self.targets += 1;
        self.first_target_seq = Some(self.first_target_seq.map_or(seq, |f| f.min(seq)));
    }
}

/// The `corrections` operator.
#[derive(Default)]
pub struct CorrectionsOperator {
    /// Void stream sequence -> its row.
    rows: HashMap<u64, Row, FixedState>,
    /// Rows changed since the last `take_rows`, in stream order.
    dirty: BTreeSet<u64>,
}

impl CorrectionsOperator {
    pub fn new() -> CorrectionsOperator {
        CorrectionsOperator::default()
    }

    fn batch<'a>(
        &self,
        seqs: impl Iterator<Item = &'a u64>,
        seq: u64,
    ) -> Result<RecordBatch, OperatorError> {
        let mut stream_seq = UInt64Builder::new();
        let mut published_at = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let mut tenant = StringBuilder::new();
        let mut target_source = StringBuilder::new();
        let mut target_id = StringBuilder::new();
        let mut reason = StringBuilder::new();
        let mut targets = Int64Builder::new();
        let mut first = UInt64Builder::new();
        let mut seqs_col = UInt64Builder::new();
        for s in seqs {
            let Some(r) = self.rows.get(s) else {
                continue;
            };
            stream_seq.append_value(*s);
            published_at.append_value(r.published_at);
            tenant.append_value(&r.tenant);
            target_source.append_value(&r.target_source);
            target_id.append_value(&r.target_id);
            reason.append_option(r.reason.as_deref());
            targets.append_value(r.targets);
            first.append_option(r.first_target_seq);
            seqs_col.append_value(seq);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(stream_seq.finish()),
            Arc::new(published_at.finish()),
            Arc::new(tenant.finish()),
            Arc::new(target_source.finish()),
            Arc::new(target_id.finish()),
            Arc::new(reason.finish()),
            Arc::new(targets.finish()),
            Arc::new(first.finish()),
            Arc::new(seqs_col.finish()),
        ];
        RecordBatch::try_new(Arc::clone(&SCHEMA), columns)
            .map_err(|source| OperatorError::Arrow { view: VIEW, source })
    }
}

impl Operator for CorrectionsOperator {
    fn view(&self) -> &'static str {
        VIEW
    }

    fn schema(&self) -> SchemaRef {
        Arc::clone(&SCHEMA)
    }

    fn storage(&self) -> Storage {
        Storage::Versioned {
            key: &["stream_seq"],
            internal: &[],
            final_column: None,
            deleted_column: None,
        }
    }

    fn rebuilds_from_archive(&self) -> bool {
        true
    }

    fn step(&mut self, step: &Step<'_>, _ledger: &Ledger) {
        match *step {
            Step::Apply { event, .. } => self.apply(event),
            Step::Voided { event, by } => {
                for void in by {
                    if let Some(r) = self.rows.get_mut(void) {
                        r.hit(event.stream_seq);
                        self.dirty.insert(*void);
                    }
                }
            }
            Step::Retract { void, hits, .. } => {
                if let Some(r) = self.rows.get_mut(&void.stream_seq) {
                    for seq in hits {
                        r.hit(*seq);
                    }
                    self.dirty.insert(void.stream_seq);
                }
            }
        }
    }

    fn apply(&mut self, e: &Event) {
        let Payload::EventVoided {
            target_source,
            target_id,
            reason,
        } = &e.payload
        else {
            return;
        };
        self.rows.insert(
            e.stream_seq,
            Row {
                published_at: e.published_at,
                tenant: e.tenant.clone(),
                target_source: target_source.clone(),
                target_id: target_id.clone(),
                reason: reason.clone(),
                targets: 0,
                first_target_seq: None,
            },
        );
        self.dirty.insert(e.stream_seq);
    }

    /// Handled in [`Operator::step`]: a retraction adds to the void's row.
    fn retract(&mut self, _void: &Event, _targets: &[Target], _ledger: &Ledger) {}

    fn take_rows(&mut self, seq: u64) -> Result<Option<RecordBatch>, OperatorError> {
        if self.dirty.is_empty() {
            return Ok(None);
        }
        let dirty = std::mem::take(&mut self.dirty);
        self.batch(dirty.iter(), seq).map(Some)
    }

    fn snapshot_chunks<'a>(
        &'a self,
        seq: u64,
    ) -> Box<dyn Iterator<Item = Result<RecordBatch, OperatorError>> + 'a> {
        let mut seqs: Vec<u64> = self.rows.keys().copied().collect();
        seqs.sort_unstable();
        super::in_chunks(seqs, move |seqs| self.batch(seqs.iter(), seq))
    }

    fn state_rows(&self) -> usize {
        self.rows.len()
    }
}
