//! SQL over the views, with DataFusion, read-only.
//!
//! Every view is registered as a table over exactly the Parquet files that
//! [`ViewDir::files`] lists (never a directory glob), so files a crash left
//! beyond the checkpoint or compaction leftovers are never read twice. The
//! `queries/*.sql` files are registered as SQL views on top, by file name.
//!
//! User SQL runs with DDL, DML and statements refused, and DataFusion's
//! URL tables are off, so nothing outside the views can be read or written.

pub mod format;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{RecordBatch, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::context::{SQLOptions, SessionContext};

use crate::config::Settings;
use crate::operator::{self, Storage};
use crate::store::checkpoint::{Checkpoint, CheckpointError};
use crate::store::parquet::{ViewDir, ViewFilesError};

pub use format::{OutputFormat, write_batches};

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    ViewFiles(#[from] ViewFilesError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("cannot register view {view}: {source}")]
    Register {
        view: String,
        source: datafusion::error::DataFusionError,
    },
    #[error("cannot read {path}: {source}")]
    ReadQuery {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("query view {path} is not valid SQL: {source}")]
    QueryView {
        path: PathBuf,
        source: datafusion::error::DataFusionError,
    },
    #[error(
        "refused: tally sql is read-only ({detail}). Only queries over the views are allowed: SELECT, WITH, EXPLAIN. To load other data, use DataFusion directly"
    )]
    ReadOnly { detail: String },
    #[error("query failed: {0}")]
    Execute(datafusion::error::DataFusionError),
    #[error("cannot write the result: {0}")]
    Output(String),
}

/// Opens a session with every view and every `queries/*.sql` view registered.
pub async fn open_session(
    data_dir: &Path,
    queries_dir: Option<&Path>,
) -> Result<SessionContext, QueryError> {
    let ctx = SessionContext::new();
    let checkpoint = Checkpoint::load(data_dir)?;
    let settings = checkpoint
        .as_ref()
        .map(|c| c.settings.clone())
        .unwrap_or_default();
    register_clock(&ctx, checkpoint.as_ref(), &settings)?;
    for op in operator::registry(&settings) {
        let view = op.view();
        match op.storage() {
            Storage::Append => register_files(&ctx, data_dir, view, view, op.schema())?,
            Storage::Versioned {
                key,
                columns,
                final_column,
                deleted_column,
            } => {
                let stored = format!("_{view}_versions");
                register_files(&ctx, data_dir, view, &stored, op.schema())?;
                let is_final = final_column
                    .map(|c| format!(", COALESCE({c} <= (SELECT final_before FROM {CLOCK_TABLE}), false) AS is_final"))
                    .unwrap_or_default();
                let deleted = deleted_column
                    .map(|c| format!(" AND NOT {c}"))
                    .unwrap_or_default();
                let sql = format!(
                    "CREATE VIEW {view} AS SELECT {columns}{is_final} FROM \
                     (SELECT *, row_number() OVER (PARTITION BY {} ORDER BY _seq DESC) AS _tally_rn FROM {stored}) \
                     WHERE _tally_rn = 1{deleted}",
                    key.join(", ")
                );
                ctx.sql(&sql).await.map_err(|source| QueryError::Register {
                    view: view.to_owned(),
                    source,
                })?;
            }
        }
    }
    if let Some(dir) = queries_dir {
        register_query_views(&ctx, dir).await?;
    }
    Ok(ctx)
}

/// One-row table with the stream clock and the finality bound
/// (`stream clock - lateness`): `is_final` = `end <= final_before`.
pub const CLOCK_TABLE: &str = "_tally_clock";

fn register_clock(
    ctx: &SessionContext,
    cp: Option<&Checkpoint>,
    settings: &Settings,
) -> Result<(), QueryError> {
    let ts = || DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let schema = Arc::new(Schema::new(vec![
        Field::new("stream_clock", ts(), true),
        Field::new("final_before", ts(), true),
    ]));
    let clock = cp.and_then(|c| c.stream_clock_us);
    let reg = |source| QueryError::Register {
        view: CLOCK_TABLE.to_owned(),
        source,
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
        ],
    )
    .map_err(|e| reg(e.into()))?;
    let table = MemTable::try_new(schema, vec![vec![batch]]).map_err(reg)?;
    ctx.register_table(CLOCK_TABLE, Arc::new(table))
        .map_err(reg)?;
    Ok(())
}

/// Registers the files of `view` as table `name`.
fn register_files(
    ctx: &SessionContext,
    data_dir: &Path,
    view: &str,
    name: &str,
    schema: SchemaRef,
) -> Result<(), QueryError> {
    let files = ViewDir::new(data_dir, view).files()?;
    let reg = |source| QueryError::Register {
        view: view.to_owned(),
        source,
    };
    if files.is_empty() {
        let table = MemTable::try_new(Arc::clone(&schema), vec![vec![]]).map_err(reg)?;
        ctx.register_table(name, Arc::new(table)).map_err(reg)?;
        return Ok(());
    }
    let mut urls = Vec::with_capacity(files.len());
    for f in &files {
        let path = std::path::absolute(&f.path).unwrap_or_else(|_| f.path.clone());
        urls.push(ListingTableUrl::parse(path.to_string_lossy().as_ref()).map_err(reg)?);
    }
    let options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(schema);
    let table = ListingTable::try_new(config).map_err(reg)?;
    ctx.register_table(name, Arc::new(table)).map_err(reg)?;
    Ok(())
}

/// Registers each `<dir>/<name>.sql` (a single SELECT) as view `<name>`, in
/// file-name order; a view may use the views before it and every table.
async fn register_query_views(ctx: &SessionContext, dir: &Path) -> Result<(), QueryError> {
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(QueryError::ReadQuery {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    paths.sort();
    // Views may depend on each other: retry the ones that failed until no progress.
    let mut pending = paths;
    loop {
        let mut failed = Vec::new();
        let mut last_err = None;
        for path in &pending {
            let sql = std::fs::read_to_string(path).map_err(|source| QueryError::ReadQuery {
                path: path.clone(),
                source,
            })?;
            let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("view");
            let body = sql.trim().trim_end_matches(';');
            match ctx
                .sql(&format!("CREATE OR REPLACE VIEW {name} AS {body}"))
                .await
            {
                Ok(_) => {}
                Err(e) => {
                    failed.push(path.clone());
                    last_err = Some((path.clone(), e));
                }
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        if failed.len() == pending.len() {
            if let Some((path, source)) = last_err {
                return Err(QueryError::QueryView { path, source });
            }
            return Ok(());
        }
        pending = failed;
    }
}

/// Runs one read-only statement and collects its rows.
pub async fn query(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>, QueryError> {
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let df = ctx.sql_with_options(sql, options).await.map_err(|e| {
        let msg = e.to_string();
        if msg.contains("not supported")
            && (msg.contains("DDL") || msg.contains("DML") || msg.contains("Statement"))
        {
            QueryError::ReadOnly { detail: msg }
        } else {
            QueryError::Execute(e)
        }
    })?;
    df.collect().await.map_err(QueryError::Execute)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_and_file_reads_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = open_session(dir.path(), None).await.unwrap();
        for sql in [
            "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'",
            "CREATE TABLE x AS SELECT 1",
            "INSERT INTO events SELECT * FROM events",
            "COPY events TO '/tmp/x.csv'",
            "DROP TABLE events",
            "SET datafusion.execution.batch_size = 1",
        ] {
            let err = query(&ctx, sql).await.unwrap_err();
            assert!(matches!(err, QueryError::ReadOnly { .. }), "{sql}: {err}");
        }
        let err = query(&ctx, "SELECT * FROM '/etc/passwd'")
            .await
            .unwrap_err();
        assert!(matches!(err, QueryError::Execute(_)), "{err}");
    }

    #[tokio::test]
    async fn empty_views_are_queryable() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = open_session(dir.path(), None).await.unwrap();
        let rows = query(&ctx, "SELECT count(*) AS n FROM events")
            .await
            .unwrap();
        assert_eq!(rows[0].num_rows(), 1);
    }
}
