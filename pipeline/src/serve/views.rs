//! The views as `tally serve` answers from them: one query session per
//! account scope and checkpoint, shared by every connection of that scope
//! until the checkpoint moves.
//!
//! Opening a session (reading the checkpoint, listing view files,
//! registering the views, `pg_catalog`) takes milliseconds; a query that
//! reuses one costs a `stat` of `checkpoint.json`. A session is keyed by
//! the file's identity (inode, size, modification time), which changes at
//! every commit and at a replay's switch of directories. A file compacted
//! away under a cached session fails the query as gone; it is then run
//! once more on a freshly opened session (the consistency rule of
//! `serve.md`), so an answer always covers exactly one checkpoint.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::execution::context::SessionContext;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog;

use crate::query::{self, ByteSize, QueryError, QueryOptions, Scope, Session};
use crate::store::checkpoint::Checkpoint;

/// One checkpoint of the views, as one scope sees them.
pub struct Snapshot {
    pub ctx: SessionContext,
    pub checkpoint_seq: u64,
    stamp: Stamp,
}

/// Identity of `checkpoint.json` at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

fn stamp(data_dir: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(Checkpoint::path(data_dir)).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

pub struct Views {
    data_dir: PathBuf,
    queries_dir: Option<PathBuf>,
    memory_limit: ByteSize,
    /// One memory pool for every query of the server.
    runtime: Arc<RuntimeEnv>,
    /// Held while a session opens, so that many connections arriving after
    /// a commit open it once.
    cache: tokio::sync::Mutex<HashMap<Scope, Arc<Snapshot>>>,
}

impl Views {
    pub fn new(
        data_dir: PathBuf,
        queries_dir: Option<PathBuf>,
        memory_limit: ByteSize,
    ) -> Result<Views, QueryError> {
        Ok(Views {
            data_dir,
            queries_dir,
            memory_limit,
            runtime: query::memory::runtime_env(memory_limit)?,
            cache: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn memory_limit(&self) -> ByteSize {
        self.memory_limit
    }

    /// The latest checkpoint as `scope` sees it.
    pub async fn current(&self, scope: &Scope) -> Result<Arc<Snapshot>, QueryError> {
        let now = stamp(&self.data_dir);
        let mut cache = self.cache.lock().await;
        if let Some(s) = cache.get(scope)
            && Some(s.stamp) == now
        {
            return Ok(Arc::clone(s));
        }
        let snapshot = Arc::new(self.open(scope).await?);
        cache.insert(scope.clone(), Arc::clone(&snapshot));
        Ok(snapshot)
    }

    /// Drops the cached session of `scope` if it is `stale` (its files
    /// moved under it).
    async fn forget(&self, scope: &Scope, stale: &Arc<Snapshot>) {
        let mut cache = self.cache.lock().await;
        if cache.get(scope).is_some_and(|s| Arc::ptr_eq(s, stale)) {
            cache.remove(scope);
        }
    }

    async fn open(&self, scope: &Scope) -> Result<Snapshot, QueryError> {
        // The stamp is taken before the checkpoint is read: if a commit
        // lands in between, the next query sees a new stamp and reopens.
        let before = stamp(&self.data_dir).ok_or_else(|| QueryError::NoViews {
            dir: self.data_dir.clone(),
        })?;
        let opts = QueryOptions {
            queries_dir: self.queries_dir.clone(),
            memory_limit: self.memory_limit,
            scope: scope.clone(),
        };
        let session = Session::open_with(&self.data_dir, &opts, Arc::clone(&self.runtime)).await?;
        setup_pg_catalog(&session.ctx, query::CATALOG, EmptyContextProvider).map_err(|e| {
            QueryError::Register {
                view: "pg_catalog".into(),
                cause: *e,
            }
        })?;
        super::pg::register_functions(&session.ctx);
        Ok(Snapshot {
            ctx: session.ctx,
            checkpoint_seq: session.checkpoint_seq,
            stamp: before,
        })
    }

    /// Plans `statement` on the latest checkpoint and runs it; a file gone
    /// under it sends it once more to a freshly opened session. `plan`
    /// turns the statement into a plan (parameters bound).
    pub async fn run<F>(
        &self,
        scope: &Scope,
        statement: &Statement,
        bind: F,
    ) -> Result<Answer, QueryError>
    where
        F: Fn(LogicalPlan) -> Result<LogicalPlan, QueryError>,
    {
        let mut retried = false;
        loop {
            let snapshot = self.current(scope).await?;
            let plan = bind(query::plan_statement(&snapshot.ctx, statement.clone()).await?)?;
            match query::execute_plan(&snapshot.ctx, plan.clone(), self.memory_limit).await {
                Err(QueryError::FileGone { .. }) if !retried => {
                    retried = true;
                    self.forget(scope, &snapshot).await;
                }
                Err(e) => return Err(e),
                Ok(batches) => {
                    return Ok(Answer {
                        schema: Arc::clone(plan.schema().inner()),
                        batches,
                        checkpoint_seq: snapshot.checkpoint_seq,
                    });
                }
            }
        }
    }
}

/// The rows of one query and the checkpoint they cover.
pub struct Answer {
    pub schema: arrow::datatypes::SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub checkpoint_seq: u64,
}
