//! Operators: synchronous state machines, one per view, that turn accepted
//! events into view rows. They never touch the network, the disk or the
//! clock, so they are tested without a runtime; the async shell in
//! [`crate::runtime`] feeds them and makes their output durable.
//!
//! Registration is the one explicit list in [`registry`].
//!
//! Two storage shapes exist (see [`Storage`]): append-only views (the
//! `events` archive) and keyed views whose rows change as late events
//! arrive; those write a new *version* of each changed row per batch, and
//! the query layer shows the latest version per key.

pub mod billing_period;
pub mod catalog;
pub mod corrections;
pub mod dimensions;
pub mod events;
mod ids;
pub mod ledger;
pub mod mrr;
pub mod overages;
pub mod restatements;
pub mod revenue;
mod slots;
pub mod subscription;
pub mod tenants;
pub mod usage;
pub mod window;

#[cfg(test)]
pub(crate) mod testing;

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use crate::config::Settings;
use crate::event::Event;
use crate::event::alert::Alert;
pub(crate) use ids::{FixedState, Names, SeriesIds};
pub use ledger::{Ledger, Target, Verdict};
pub use restatements::{FinalRow, Restatement};
use subscription::SubEvent;

/// One accepted message as the views see it, in stream order (the
/// [`ledger`] decides which).
#[derive(Debug, Clone, Copy)]
pub enum Step<'a> {
    /// An effective event (a void is one too: it cannot be voided), with
    /// its subscription change if it carries one.
    Apply {
        event: &'a Event,
        sub: Option<&'a Arc<SubEvent>>,
    },
    /// An accepted event that the voids at `by` named before it arrived:
    /// archived and on the stream clock, in no other view.
    Voided { event: &'a Event, by: &'a [u64] },
    /// The void `void`, applied just before, takes `targets` out of
    /// every view but the archive; `hits` are the sequences of all the
    /// accepted events it voids (also those voided before).
    Retract {
        void: &'a Event,
        targets: &'a [Target],
        hits: &'a [u64],
    },
}

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("operator {view} cannot build its rows: {source}")]
    Arrow {
        view: &'static str,
        source: arrow::error::ArrowError,
    },
    #[error(
        "cannot restore view {view} from its files ({detail}); move the data directory aside and run `tally replay`"
    )]
    Restore { view: &'static str, detail: String },
}

/// An exact money sum (i128, so a void takes back exactly what its target
/// added) as the Int64 column shows it: saturated.
pub fn saturating_i64(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// Arrow type of every timestamp column: µs, UTC.
pub fn timestamp_type() -> arrow::datatypes::DataType {
    arrow::datatypes::DataType::Timestamp(
        arrow::datatypes::TimeUnit::Microsecond,
        Some("UTC".into()),
    )
}

/// Arrow type of every quantity column: Decimal128(38, 9).
pub fn decimal_type() -> arrow::datatypes::DataType {
    use crate::event::decimal::{PRECISION, SCALE};
    arrow::datatypes::DataType::Decimal128(PRECISION, SCALE as i8)
}

/// Column `name` of a stored batch of `view` as a `T`: `None` if the file
/// has no such column (it was written before the column existed).
pub(crate) fn stored_column<'a, T: 'static>(
    batch: &'a RecordBatch,
    view: &'static str,
    name: &str,
) -> Result<Option<&'a T>, OperatorError> {
    batch
        .column_by_name(name)
        .map(|c| {
            c.as_any()
                .downcast_ref::<T>()
                .ok_or_else(|| OperatorError::Restore {
                    view,
                    detail: format!("column {name} has the wrong type"),
                })
        })
        .transpose()
}

/// Column `name` of a stored batch of `view`, which every file has.
pub(crate) fn required_column<'a, T: 'static>(
    batch: &'a RecordBatch,
    view: &'static str,
    name: &str,
) -> Result<&'a T, OperatorError> {
    stored_column(batch, view, name)?.ok_or_else(|| OperatorError::Restore {
        view,
        detail: format!("column {name} missing"),
    })
}

/// Makes room in `v` for `additional` more items, growing it by half (at
/// least 4) when it is full rather than doubling it: for the per-tenant
/// and per-bucket vectors that hold most of the operators' state, a
/// doubled vector is a quarter empty on average.
pub(crate) fn reserve_by_half<T>(v: &mut Vec<T>, additional: usize) {
    if v.len() + additional > v.capacity() {
        v.reserve_exact(additional.max(v.len() / 2).max(4));
    }
}

/// Rows per chunk of [`Operator::snapshot_chunks`].
pub const SNAPSHOT_CHUNK: usize = 64 * 1024;

/// A snapshot in chunks: `rows` of each [`SNAPSHOT_CHUNK`] of `keys` (in
/// their order), built as the chunks are taken; one empty chunk when there
/// are no keys, as [`Operator::snapshot`] gives an empty batch then.
pub(crate) fn in_chunks<'a, K: 'a>(
    keys: Vec<K>,
    rows: impl Fn(&[K]) -> Result<RecordBatch, OperatorError> + 'a,
) -> Box<dyn Iterator<Item = Result<RecordBatch, OperatorError>> + 'a> {
    let n = keys.len();
    Box::new((0..n.div_ceil(SNAPSHOT_CHUNK).max(1)).map(move |i| {
        let end = n.min((i + 1) * SNAPSHOT_CHUNK);
        rows(keys.get(i * SNAPSHOT_CHUNK..end).unwrap_or_default())
    }))
}

/// How a view's rows are stored and read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// Rows are appended and never change; the stored table is the view.
    Append,
    /// Rows are keyed and change: each file holds new versions stamped
    /// `_seq`; the view `<name>` is the latest version per `key` over the
    /// stored table `_<name>_versions`, with the schema's columns except
    /// the `internal` ones and those starting with `_` (see
    /// [`Storage::public_columns`]) and, when `final_column` is set,
    /// `is_final` = `final_column + lateness <= stream clock`; latest
    /// versions marked by `deleted_column` are hidden.
    Versioned {
        key: &'static [&'static str],
        /// Stored columns that only the operator reads back (restore
        /// state, finality inputs), not part of the view.
        internal: &'static [&'static str],
        final_column: Option<&'static str>,
        /// A Boolean column marking tombstones: a latest version with it
        /// set means the row no longer exists.
        deleted_column: Option<&'static str>,
    },
}

impl Storage {
    /// The view's columns, in schema order: every stored column but the
    /// internal ones and those starting with `_` (`_seq`, tombstones).
    pub fn public_columns(&self, schema: &SchemaRef) -> Vec<String> {
        let internal: &[&str] = match self {
            Storage::Append => &[],
            Storage::Versioned { internal, .. } => internal,
        };
        schema
            .fields()
            .iter()
            .map(|f| f.name())
            .filter(|n| !n.starts_with('_') && !internal.contains(&n.as_str()))
            .cloned()
            .collect()
    }
}

/// A view-maintaining state machine.
pub trait Operator: Send {
    /// The view (and DataFusion table) this operator maintains.
    fn view(&self) -> &'static str;
    /// Arrow schema of the stored rows.
    fn schema(&self) -> SchemaRef;
    fn storage(&self) -> Storage {
        Storage::Append
    }
    /// Folds one accepted, deduplicated event, in stream order. Must give the
    /// same state for any order of the same events (views are ordered by
    /// (`time`, `source`, `id`), never by arrival).
    fn apply(&mut self, event: &Event);
    /// Rows to write for the events applied since the last call, stamped
    /// with `seq`, the batch's last stream sequence.
    fn take_rows(&mut self, seq: u64) -> Result<Option<RecordBatch>, OperatorError>;
    /// The whole current state as rows, sorted by key (versioned views:
    /// compaction), in chunks of about [`SNAPSHOT_CHUNK`] rows built as
    /// they are taken: a view with millions of rows then never holds them
    /// all as Arrow arrays at once. None for a view without state.
    fn snapshot_chunks<'a>(
        &'a self,
        _seq: u64,
    ) -> Box<dyn Iterator<Item = Result<RecordBatch, OperatorError>> + 'a> {
        Box::new(std::iter::empty())
    }
    /// [`Operator::snapshot_chunks`] as one batch (`None` without chunks).
    #[cfg(test)]
    fn snapshot(&self, seq: u64) -> Result<Option<RecordBatch>, OperatorError> {
        let chunks = self.snapshot_chunks(seq).collect::<Result<Vec<_>, _>>()?;
        if chunks.len() < 2 {
            return Ok(chunks.into_iter().next());
        }
        arrow::compute::concat_batches(&self.schema(), &chunks)
            .map(Some)
            .map_err(|source| OperatorError::Arrow {
                view: self.view(),
                source,
            })
    }
    /// Rows in the current state (versioned views): compaction waits until
    /// as many versions were written since the last snapshot, so snapshots
    /// cost amortised O(1) per written row.
    fn state_rows(&self) -> usize {
        0
    }
    /// Folds stored rows back into the state at start-up, file by file in
    /// stream order (versioned views).
    fn restore(&mut self, _rows: &RecordBatch) -> Result<(), OperatorError> {
        Ok(())
    }
    /// Whether the state is rebuilt at start-up by re-applying the `events`
    /// archive (then `restore` sees the stored rows afterwards).
    fn rebuilds_from_archive(&self) -> bool {
        false
    }
    /// Alerts decided by the last `take_rows`.
    fn take_alerts(&mut self) -> Vec<Alert> {
        Vec::new()
    }
    /// [`Operator::apply`] with the event's subscription change, if any,
    /// built once for every operator (they share it instead of each
    /// keeping a copy of every tenant's history).
    fn apply_with(&mut self, event: &Event, _sub: Option<&Arc<SubEvent>>) {
        self.apply(event);
    }
    /// Live runs publish alerts; restore and replay do not.
    fn set_live(&mut self, _live: bool) {}
    /// Folds one step, in stream order. `ledger` has classified the whole
    /// batch: [`Ledger::usage_after`] shows the usage history as it is
    /// right after a given message.
    fn step(&mut self, step: &Step<'_>, ledger: &Ledger) {
        match *step {
            Step::Apply { event, sub } => self.apply_with(event, sub),
            Step::Voided { event, .. } => self.observe_voided(event),
            Step::Retract { void, targets, .. } => self.retract(void, targets, ledger),
        }
    }
    /// An accepted event that counts in no view (it is voided): the views
    /// that keep the stream clock still see its time.
    fn observe_voided(&mut self, _event: &Event) {}
    /// Takes `targets`, voided by `void`, out of the view, as if they had
    /// never been accepted. Every operator says what that means for it.
    fn retract(&mut self, void: &Event, targets: &[Target], ledger: &Ledger);
    /// The rows of this view that are final (their window, period or month
    /// ends at or before `final_before`) and that the message whose steps
    /// are `unit` may change, as the view shows them. The processor calls
    /// it just before and just after applying a message that may restate
    /// (see [`restatements`]); views that are not restated have none.
    fn final_rows(
        &self,
        _unit: &[Step<'_>],
        _final_before: i64,
        _ledger: &Ledger,
    ) -> Vec<FinalRow> {
        Vec::new()
    }
    /// Restatements the processor decided: only `restatements` keeps them.
    fn record_restatements(&mut self, _rows: &[Restatement]) {}
}

/// The events of a message's steps that a view folds: the applied event,
/// or the targets a void retracts.
pub fn unit_events<'a>(unit: &'a [Step<'a>]) -> impl Iterator<Item = &'a Event> + 'a {
    unit.iter()
        .flat_map(|s| -> Box<dyn Iterator<Item = &'a Event> + 'a> {
            match *s {
                Step::Apply { event, .. } => Box::new(std::iter::once(event)),
                Step::Voided { .. } => Box::new(std::iter::empty()),
                Step::Retract { targets, .. } => Box::new(targets.iter().map(|t| &t.event)),
            }
        })
}

/// Every operator, in one explicit list.
pub fn registry(settings: &Settings) -> Vec<Box<dyn Operator>> {
    vec![
        Box::new(events::EventsArchive::new()),
        Box::new(usage::UsageOperator::new(&settings.granularities)),
        Box::new(dimensions::DimensionsOperator::new(&settings.granularities)),
        Box::new(overages::OveragesOperator::new(settings.lateness_us)),
        Box::new(mrr::MrrOperator::new()),
        Box::new(revenue::RevenueOperator::new()),
        Box::new(tenants::TenantsOperator::new()),
        Box::new(corrections::CorrectionsOperator::new()),
        Box::new(restatements::RestatementsOperator::new()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks cover the keys once, in order, at most SNAPSHOT_CHUNK each;
    /// no keys give one empty chunk.
    #[test]
    fn a_snapshot_in_chunks_covers_its_keys_once_in_order() {
        use arrow::array::UInt64Array;
        use arrow::datatypes::{DataType, Field, Schema};
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::UInt64, false)]));
        let rows = |keys: &[u64]| -> Result<RecordBatch, OperatorError> {
            let column = Arc::new(UInt64Array::from(keys.to_vec()));
            Ok(RecordBatch::try_new(Arc::clone(&schema), vec![column]).unwrap())
        };
        let n = 2 * SNAPSHOT_CHUNK as u64 + 5;
        let chunks: Vec<RecordBatch> = in_chunks((0..n).collect(), rows)
            .collect::<Result<_, _>>()
            .unwrap();
        let sizes: Vec<usize> = chunks.iter().map(|c| c.num_rows()).collect();
        assert_eq!(sizes, [SNAPSHOT_CHUNK, SNAPSHOT_CHUNK, 5]);
        let all = arrow::compute::concat_batches(&schema, &chunks).unwrap();
        let keys = all
            .column(0)
            .as_any()
            .downcast_ref::<UInt64Array>()
            .unwrap();
        assert!(keys.values().iter().copied().eq(0..n));
        let empty: Vec<_> = in_chunks(Vec::<u64>::new(), rows).collect();
        assert_eq!(empty.len(), 1);
        assert_eq!(empty[0].as_ref().unwrap().num_rows(), 0);
    }

    /// `docs/views.md` is where analysts read the views: each view has a
    /// section there naming every column a query can see.
    #[test]
    fn every_column_of_every_view_is_documented() {
        let doc = include_str!("../../../docs/views.md");
        for op in registry(&Settings::default()) {
            let view = op.view();
            let start = doc
                .find(&format!("## `{view}`"))
                .or_else(|| doc.find(&format!("## {view}")))
                .unwrap_or_else(|| panic!("docs/views.md has no section for {view}"));
            let section = &doc[start..];
            let end = section[3..].find("\n## ").map_or(section.len(), |e| e + 3);
            let section = &section[..end];
            let mut columns = op.storage().public_columns(&op.schema());
            if let Storage::Versioned {
                final_column: Some(_),
                ..
            } = op.storage()
            {
                columns.push("is_final".to_owned());
            }
            for c in columns {
                assert!(
                    section.contains(&format!("`{c}`")),
                    "docs/views.md, section {view}: column {c} is not documented"
                );
            }
        }
    }

    /// The views' columns are a public contract (metrics.md).
    #[test]
    fn every_view_shows_the_columns_of_the_contract() {
        let expected = [
            (
                "usage",
                "tenant, metric, granularity, window_start, window_end, events, sum, min, max, last, unique_count",
            ),
            (
                "overages",
                "tenant, period, metric, plan, aggregation, used, included, overage_quantity, overage_amount, currency, pct_used, threshold, period_start, period_end",
            ),
            (
                "mrr",
                "month, tenant, currency, mrr_start, mrr_end, new_mrr, expansion_mrr, contraction_mrr, churned_mrr, reactivation_mrr, movement",
            ),
            (
                "revenue",
                "month, tenant, currency, paid, refunded, net, invoices_paid",
            ),
            (
                "corrections",
                "stream_seq, published_at, tenant, target_source, target_id, reason, targets, first_target_seq",
            ),
            (
                "usage_by_dimension",
                "tenant, metric, granularity, window_start, group, window_end, events, sum, min, max, last, unique_count",
            ),
            (
                "restatements",
                "stream_seq, published_at, tenant, view, key, before, after, cause",
            ),
            (
                "tenants",
                "tenant, name, first_seen, last_seen, subscription_id, plan, billing_cycle, status, mrr, currency, revenue_to_date",
            ),
        ];
        let ops = registry(&Settings::default());
        for (view, columns) in expected {
            let op = ops.iter().find(|o| o.view() == view).unwrap();
            assert_eq!(
                op.storage().public_columns(&op.schema()).join(", "),
                columns,
                "{view}"
            );
        }
    }
}
