//! The system tables every session has: `_tally_clock` (the checkpoint the
//! answers cover), `_tally_gaps` (sequences no view has seen),
//! `_tally_partitions` (a partitioned location's partitions), and what a
//! tenant account sees instead of stream sequences (its own positions).

use std::sync::Arc;

use arrow::array::{RecordBatch, TimestampMicrosecondArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SessionContext;

use super::{OpenError, QueryError};
use crate::store::checkpoint::Checkpoint;

/// The system table of a partitioned location: a row per partition (that
/// the session sees) with its clock and checkpoint.
pub const PARTITIONS_TABLE: &str = "_tally_partitions";

/// The views whose stream sequences a tenant account sees as positions,
/// and the prefix of the names their own rows are registered under until
/// [`tenant_positions`] defines them (then the names are removed).
pub(super) const POSITIONED: [&str; 3] = [
    crate::operator::events::VIEW,
    crate::operator::restatements::VIEW,
    crate::operator::corrections::VIEW,
];
pub(super) const SCOPED: &str = "_tally_scoped_";

/// A tenant account's positions: each stream sequence that carried one of
/// its events or restated one of its rows, numbered 1, 2, 3, ... in
/// stream order.
const POSITIONS: &str = "_tally_positions";

/// Defines, for a tenant account, the views with stream sequences
/// (`events`, `restatements`, `corrections`) with each sequence replaced by
/// its position among the account's own messages: the messages that
/// carried its events or restated its rows (1, 2, 3, ...).
///
/// Stream sequences count every tenant's messages: the gap between two of
/// a tenant's sequences, or a checkpoint's sequence minus the tenant's
/// count, is the platform's volume. A position counts only the account's
/// own messages, grows with each of them and never changes once given, so
/// `WHERE stream_seq > $last` still returns exactly what is new since a
/// position was read (`_tally_clock.checkpoint_seq` is the account's last
/// position; see [`scoped_clock`]).
pub(super) async fn tenant_positions(
    ctx: &SessionContext,
    views: &[(&'static str, SchemaRef)],
) -> Result<(), OpenError> {
    let reg = |view: &str| {
        let view = view.to_owned();
        move |cause| QueryError::Register { view, cause }
    };
    let events = format!("{SCOPED}{}", crate::operator::events::VIEW);
    let restated = format!("{SCOPED}{}", crate::operator::restatements::VIEW);
    ctx.sql(&format!(
        "CREATE VIEW {POSITIONS} AS SELECT seq, row_number() OVER (ORDER BY seq) AS pos FROM \
         (SELECT stream_seq AS seq FROM {events} UNION SELECT stream_seq AS seq FROM {restated})"
    ))
    .await
    .map_err(reg(POSITIONS))?;
    for (view, schema) in views {
        let columns: Vec<String> = schema
            .fields()
            .iter()
            .map(|f| f.name())
            .filter(|n| !n.starts_with('_'))
            .map(|n| match n.as_str() {
                "stream_seq" => "p.pos AS stream_seq".to_owned(),
                "first_target_seq" => "t.pos AS first_target_seq".to_owned(),
                _ => format!("v.\"{n}\""),
            })
            .collect();
        let first_target = if *view == crate::operator::corrections::VIEW {
            format!(" LEFT JOIN {POSITIONS} t ON v.first_target_seq = t.seq")
        } else {
            String::new()
        };
        let sql = format!(
            "CREATE VIEW {view} AS SELECT {} FROM {SCOPED}{view} v JOIN {POSITIONS} p ON v.stream_seq = p.seq{first_target}",
            columns.join(", ")
        );
        ctx.sql(&sql).await.map_err(reg(view))?;
    }
    for (view, _) in views {
        deregister(ctx, &format!("{SCOPED}{view}"))?;
    }
    deregister(ctx, POSITIONS)
}

/// `_tally_clock` for a tenant account: its `checkpoint_seq` is the
/// account's last event position (see [`tenant_positions`]), not the
/// stream's.
pub(super) async fn scoped_clock(ctx: &SessionContext) -> Result<(), OpenError> {
    let reg = |cause| QueryError::Register {
        view: CLOCK_TABLE.to_owned(),
        cause,
    };
    let base = "_tally_scoped_clock";
    let clock = ctx
        .deregister_table(CLOCK_TABLE)
        .map_err(reg)?
        .ok_or_else(|| reg(DataFusionError::Internal("no clock table".into())))?;
    ctx.register_table(base, clock).map_err(reg)?;
    let sql = format!(
        "CREATE VIEW {CLOCK_TABLE} AS SELECT stream_clock, final_before, \
         (SELECT CAST(count(DISTINCT stream_seq) AS BIGINT UNSIGNED) FROM \
         (SELECT stream_seq FROM events UNION ALL SELECT stream_seq FROM restatements)) AS checkpoint_seq FROM {base}"
    );
    ctx.sql(&sql).await.map_err(reg)?;
    deregister(ctx, base)
}

pub(super) fn deregister(ctx: &SessionContext, name: &str) -> Result<(), OpenError> {
    ctx.deregister_table(name)
        .map_err(|cause| QueryError::Register {
            view: name.to_owned(),
            cause,
        })?;
    Ok(())
}

/// The catalog the views are in: `tally.public.usage`, the database that
/// Postgres clients name.
pub const CATALOG: &str = "tally";

/// One-row table: the checkpoint the session reads (`checkpoint_seq`, the
/// last stream sequence every answer covers), the stream clock and the
/// finality bound (`stream clock - lateness`): `is_final` = `end <= final_before`.
pub const CLOCK_TABLE: &str = "_tally_clock";

pub(super) fn register_clock(
    ctx: &SessionContext,
    cp: &Checkpoint,
    name: &str,
) -> Result<(), QueryError> {
    let settings = &cp.settings;
    let ts = || DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let schema = Arc::new(Schema::new(vec![
        Field::new("stream_clock", ts(), true),
        Field::new("final_before", ts(), true),
        Field::new("checkpoint_seq", DataType::UInt64, false),
    ]));
    let clock = cp.stream_clock_us;
    let reg = |cause| QueryError::Register {
        view: name.to_owned(),
        cause,
    };
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(TimestampMicrosecondArray::from(vec![clock]).with_timezone("UTC")),
            Arc::new(
                TimestampMicrosecondArray::from(vec![
                    clock.map(|c| c.saturating_sub(settings.lateness_us)),
                ])
                .with_timezone("UTC"),
            ),
            Arc::new(UInt64Array::from(vec![cp.last_seq])),
        ],
    )
    .map_err(|e| reg(e.into()))?;
    let table = MemTable::try_new(schema, vec![vec![batch]]).map_err(reg)?;
    ctx.register_table(name, Arc::new(table)).map_err(reg)?;
    Ok(())
}

/// The gaps the checkpoint records: stream sequences no view has seen
/// (`tally run --accept-gap`), one row each, so that a billing job can tell
/// that the views are incomplete before it bills from them.
pub const GAPS_TABLE: &str = "_tally_gaps";

/// For a tenant account (`scoped`) the sequences and the number of
/// messages are NULL: they count every tenant's messages.
pub(super) fn register_gaps(
    ctx: &SessionContext,
    cp: &Checkpoint,
    scoped: bool,
    name: &str,
) -> Result<(), QueryError> {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let schema = Arc::new(Schema::new(vec![
        Field::new("first_seq", DataType::UInt64, scoped),
        Field::new("last_seq", DataType::UInt64, scoped),
        Field::new("messages", DataType::UInt64, scoped),
        Field::new("stream_clock", ts, true),
    ]));
    let seqs = |f: &dyn Fn(&crate::store::checkpoint::Gap) -> u64| -> arrow::array::ArrayRef {
        if scoped {
            Arc::new(UInt64Array::from(vec![None; cp.gaps.len()]))
        } else {
            Arc::new(UInt64Array::from_iter_values(cp.gaps.iter().map(f)))
        }
    };
    let reg = |cause| QueryError::Register {
        view: name.to_owned(),
        cause,
    };
    let gaps = &cp.gaps;
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            seqs(&|g| g.first_seq),
            seqs(&|g| g.last_seq),
            seqs(&|g| g.messages),
            Arc::new(
                TimestampMicrosecondArray::from(
                    gaps.iter().map(|g| g.stream_clock_us).collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            ),
        ],
    )
    .map_err(|e| reg(e.into()))?;
    let table = MemTable::try_new(schema, vec![vec![batch]]).map_err(reg)?;
    ctx.register_table(name, Arc::new(table)).map_err(reg)?;
    Ok(())
}
