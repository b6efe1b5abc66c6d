//! The views as `tally serve` answers from them: one query session per
//! account scope and checkpoint, shared by every connection of that scope.
//!
//! Opening a session (reading the checkpoint, listing view files,
//! registering the views, `pg_catalog`) takes milliseconds to tens of
//! milliseconds; a query that reuses one costs a `stat` of
//! `checkpoint.json`. A session is keyed by that file's identity (inode,
//! size, modification time), which changes at every commit and at a
//! replay's switch of directories. When it has changed, the query is
//! answered from the session it has (a whole checkpoint, only older) while
//! one task opens the new one in the background: under a `tally run`
//! committing every few hundred milliseconds, queries never queue behind
//! opens. Sessions only move forward, so a client never sees a smaller
//! checkpoint than before, but across a replay's switch: the replayed
//! views are the only ones left to read, wherever their checkpoint is. A
//! file compacted away (or switched away by a
//! replay) under a cached session fails the query as gone; it is then run
//! once more on a session opened there and then (the consistency rule of
//! `serve.md`), so an answer always covers exactly one checkpoint. A
//! replay's switch can also put another file under a name the session
//! listed: a session whose directory was exchanged is never answered from
//! again, and a query during which it happened runs once more.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::execution::context::SessionContext;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog;

use crate::query::{self, ByteSize, QueryError, QueryOptions, Scope, Session};
use crate::store::checkpoint::{Checkpoint, CheckpointError};
use crate::store::remote::{Location, MANIFEST};

/// One checkpoint of the views, as one scope sees them.
pub struct Snapshot {
    pub ctx: SessionContext,
    pub checkpoint_seq: u64,
    stamp: Stamp,
    /// The directories its files were listed in: once a replay exchanged
    /// one, the snapshot's paths name the new directory's files, and it
    /// answers nothing more.
    dirs: query::Dirs,
    /// A tenant scope: `EXPLAIN` is refused, since its plans and metrics
    /// describe whole files (rows and row groups of every tenant).
    scoped: bool,
    /// Optimized plans of the statements run on this snapshot, parameters
    /// still placeholders, each with the schema its answer is described
    /// by (the planned one: optimizing may change a column's nullability):
    /// a prepared statement executed again is bound and run without being
    /// planned and optimized again, about half of a point query's time.
    /// At most [`PLANS_KEPT`]; they go with the snapshot, whose tables
    /// they read. A plan that reads the clock (`now()`) is not kept: the
    /// optimizer fixed its time (see [`query::reads_the_clock`]).
    plans: std::sync::Mutex<HashMap<Statement, (LogicalPlan, SchemaRef)>>,
}

/// Optimized plans a snapshot keeps (see [`Snapshot::plans`]).
const PLANS_KEPT: usize = 64;

impl Snapshot {
    /// Plans `statement` read-only on this session.
    pub async fn plan(&self, statement: Statement) -> Result<LogicalPlan, QueryError> {
        if self.scoped && matches!(statement, Statement::Explain { .. }) {
            return Err(QueryError::ReadOnly {
                refused:
                    "EXPLAIN for an account scoped to tenants (plans describe every tenant's files)"
                        .into(),
            });
        }
        query::plan_statement(&self.ctx, statement).await
    }

    /// The optimized plan of `statement`, its parameters placeholders, and
    /// its planned schema: from the snapshot's plans, or planned and
    /// optimized now.
    async fn optimized(
        &self,
        statement: &Statement,
        memory_limit: ByteSize,
    ) -> Result<(LogicalPlan, SchemaRef), QueryError> {
        if let Some(planned) = self.plans().get(statement) {
            return Ok(planned.clone());
        }
        let plan = self.plan(statement.clone()).await?;
        let optimized = query::optimize(&self.ctx, &plan, memory_limit)?;
        let planned = (optimized, Arc::clone(plan.schema().inner()));
        let keep = !query::reads_the_clock(&plan);
        let mut plans = self.plans();
        if keep && plans.len() < PLANS_KEPT {
            plans.insert(statement.clone(), planned.clone());
        }
        Ok(planned)
    }

    fn plans(&self) -> std::sync::MutexGuard<'_, HashMap<Statement, (LogicalPlan, SchemaRef)>> {
        self.plans.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Identity of the checkpoint at a moment: `checkpoint.json`'s file of a
/// data directory, or the manifest's ETag of an `s3://` location.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stamp {
    Local {
        dev: u64,
        ino: u64,
        size: u64,
        mtime_ns: i128,
    },
    Remote(String),
    /// A partitioned location: each partition's.
    Partitions(Vec<Option<Stamp>>),
}

async fn stamp(inner: &Inner) -> Option<Stamp> {
    let (data_dir, remote) = (&inner.data_dir, inner.remote.as_ref());
    if let Some(parts) = inner.partitions.get() {
        return Some(partition_stamps(parts).await);
    }
    match own_stamp(data_dir, remote).await {
        Some(s) => Some(s),
        // No checkpoint at the root: a partitioned location (whose count
        // never changes once set, so it is read once), or nothing yet.
        None => {
            let count = crate::store::partitions_at(data_dir, remote)
                .await
                .ok()
                .flatten()?;
            let parts = (0..count)
                .map(|k| {
                    let dir = crate::store::partition_location(data_dir, k);
                    (dir, crate::store::partition_remote(remote, k))
                })
                .collect();
            Some(partition_stamps(inner.partitions.get_or_init(|| parts)).await)
        }
    }
}

async fn partition_stamps(parts: &[(PathBuf, Option<Location>)]) -> Stamp {
    let mut stamps = Vec::with_capacity(parts.len());
    for (dir, loc) in parts {
        stamps.push(own_stamp(dir, loc.as_ref()).await);
    }
    Stamp::Partitions(stamps)
}

/// The stamp of the checkpoint of one data location.
async fn own_stamp(data_dir: &Path, remote: Option<&Location>) -> Option<Stamp> {
    if let Some(loc) = remote {
        return loc.head(MANIFEST).await.ok().flatten().map(Stamp::Remote);
    }
    let m = std::fs::metadata(Checkpoint::path(data_dir)).ok()?;
    Some(Stamp::Local {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

#[derive(Clone)]
pub struct Views {
    inner: Arc<Inner>,
}

struct Inner {
    data_dir: PathBuf,
    /// The object-storage location `data_dir` names, if it is one (one
    /// client, and so one connection pool, for the server's life).
    remote: Option<Location>,
    queries_dir: Option<PathBuf>,
    memory_limit: ByteSize,
    /// How long one query may take, planning included (`--query-timeout`).
    query_timeout: std::time::Duration,
    /// One memory pool for every query of the server.
    runtime: Arc<RuntimeEnv>,
    cache: std::sync::Mutex<HashMap<Scope, Entry>>,
    /// Held while a session opens on a query's path (nothing cached, or
    /// a file gone), so that many connections open it once.
    opening: tokio::sync::Mutex<()>,
    /// A partitioned location's partitions (their directories, and their
    /// object-storage locations), once seen.
    partitions: std::sync::OnceLock<Vec<(PathBuf, Option<Location>)>>,
}

struct Entry {
    snapshot: Arc<Snapshot>,
    /// A background open of a newer session is under way.
    refreshing: bool,
}

impl Views {
    pub fn new(
        data_dir: PathBuf,
        queries_dir: Option<PathBuf>,
        memory_limit: ByteSize,
        query_timeout: std::time::Duration,
    ) -> Result<Views, QueryError> {
        let remote = Location::parse(&data_dir)
            .map_err(|e| QueryError::Checkpoint(CheckpointError::Remote(e)))?;
        Ok(Views {
            inner: Arc::new(Inner {
                remote,
                data_dir,
                queries_dir,
                memory_limit,
                query_timeout,
                runtime: query::memory::runtime_env(memory_limit)?,
                cache: std::sync::Mutex::new(HashMap::new()),
                opening: tokio::sync::Mutex::new(()),
                partitions: std::sync::OnceLock::new(),
            }),
        })
    }

    /// The latest committed checkpoint of the data location.
    pub async fn checkpoint(&self) -> Result<Option<Checkpoint>, CheckpointError> {
        crate::store::frontier_checkpoint(&self.inner.data_dir, self.inner.remote.as_ref()).await
    }

    pub fn memory_limit(&self) -> ByteSize {
        self.inner.memory_limit
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<Scope, Entry>> {
        match self.inner.cache.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        }
    }

    /// The session `scope` answers from now: the cached one (refreshed in
    /// the background if the checkpoint moved), or one opened now.
    pub async fn current(&self, scope: &Scope) -> Result<Arc<Snapshot>, QueryError> {
        let now = stamp(&self.inner).await;
        if let Some(s) = self.cached(scope, now.clone()) {
            return Ok(s);
        }
        let _opening = self.inner.opening.lock().await;
        if let Some(s) = self.cached(scope, now) {
            return Ok(s);
        }
        let snapshot = Arc::new(self.open(scope).await?);
        self.install(scope, &snapshot);
        Ok(snapshot)
    }

    /// The cached session of `scope`, starting a background refresh if the
    /// checkpoint moved since it was opened.
    fn cached(&self, scope: &Scope, now: Option<Stamp>) -> Option<Arc<Snapshot>> {
        let mut cache = self.cache();
        let entry = cache.get_mut(scope)?;
        if entry.snapshot.dirs.switched() {
            // Its paths now name the replayed directory's files.
            return None;
        }
        if Some(&entry.snapshot.stamp) != now.as_ref() && !entry.refreshing {
            entry.refreshing = true;
            let (views, scope) = (self.clone(), scope.clone());
            tokio::spawn(async move {
                let opened = views.open(&scope).await;
                match opened {
                    Ok(s) => views.install(&scope, &Arc::new(s)),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot open the newer checkpoint yet");
                        if let Some(entry) = views.cache().get_mut(&scope) {
                            entry.refreshing = false;
                        }
                    }
                }
            });
        }
        Some(Arc::clone(&entry.snapshot))
    }

    /// Caches `snapshot` for `scope` unless a newer one is cached (one
    /// whose directory a replay switched away is never newer).
    fn install(&self, scope: &Scope, snapshot: &Arc<Snapshot>) {
        let mut cache = self.cache();
        let newer = cache.get(scope).is_some_and(|e| {
            e.snapshot.checkpoint_seq > snapshot.checkpoint_seq && !e.snapshot.dirs.switched()
        });
        if !newer {
            cache.insert(
                scope.clone(),
                Entry {
                    snapshot: Arc::clone(snapshot),
                    refreshing: false,
                },
            );
        } else if let Some(e) = cache.get_mut(scope) {
            e.refreshing = false;
        }
    }

    /// Opens a session now and caches it for `scope`: the query's files
    /// moved under the one it had (compaction, a replay's switch), and a
    /// session opened in the background may predate that move too.
    async fn reopen(&self, scope: &Scope) -> Result<(), QueryError> {
        let _opening = self.inner.opening.lock().await;
        let snapshot = Arc::new(self.open(scope).await?);
        self.cache().insert(
            scope.clone(),
            Entry {
                snapshot,
                refreshing: false,
            },
        );
        Ok(())
    }

    async fn open(&self, scope: &Scope) -> Result<Snapshot, QueryError> {
        let inner = &self.inner;
        // The stamp is taken before the checkpoint is read: if a commit
        // lands in between, the next query sees a new stamp and reopens.
        let before = stamp(inner).await.ok_or_else(|| QueryError::NoViews {
            dir: inner.data_dir.clone(),
        })?;
        let opts = QueryOptions {
            queries_dir: inner.queries_dir.clone(),
            memory_limit: inner.memory_limit,
            scope: scope.clone(),
        };
        let session = Session::open_in(
            &inner.data_dir,
            inner.remote.as_ref(),
            &opts,
            Arc::clone(&inner.runtime),
        )
        .await?;
        setup_pg_catalog(&session.ctx, query::CATALOG, EmptyContextProvider).map_err(|e| {
            QueryError::Register {
                view: "pg_catalog".into(),
                cause: *e,
            }
        })?;
        super::postgres::register_functions(&session.ctx);
        query::bounded::bound_functions(&session.ctx);
        Ok(Snapshot {
            ctx: session.ctx,
            checkpoint_seq: session.checkpoint_seq,
            stamp: before,
            dirs: session.dirs,
            scoped: *scope != Scope::AllTenants,
            plans: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Plans `statement` for `scope` on the latest checkpoint, isolated
    /// and within the query timeout like a query (see [`query::isolated`]).
    pub async fn plan(
        &self,
        scope: &Scope,
        statement: &Statement,
    ) -> Result<LogicalPlan, QueryError> {
        let (views, scope, statement) = (self.clone(), scope.clone(), statement.clone());
        query::isolated(self.inner.query_timeout, move || async move {
            views.current(&scope).await?.plan(statement).await
        })
        .await
    }

    /// Plans `statement` on the latest checkpoint and runs it, isolated
    /// and within the query timeout (see [`query::isolated`]); a file gone
    /// under it sends it once more to a freshly opened session. `bind`
    /// turns the plan into the one to run (parameters bound).
    pub async fn run<F>(
        &self,
        scope: &Scope,
        statement: &Statement,
        bind: F,
    ) -> Result<Answer, QueryError>
    where
        F: Fn(LogicalPlan) -> Result<LogicalPlan, QueryError> + Send + 'static,
    {
        let (views, scope, statement) = (self.clone(), scope.clone(), statement.clone());
        query::isolated(self.inner.query_timeout, move || async move {
            views.run_here(&scope, &statement, bind).await
        })
        .await
    }

    async fn run_here<F>(
        &self,
        scope: &Scope,
        statement: &Statement,
        bind: F,
    ) -> Result<Answer, QueryError>
    where
        F: Fn(LogicalPlan) -> Result<LogicalPlan, QueryError>,
    {
        let mut retries = 0;
        loop {
            let snapshot = self.current(scope).await?;
            let limit = self.memory_limit();
            // Bound once optimized, when the plan with placeholders
            // optimizes; otherwise (a placeholder whose type only its value
            // gives) bound first, then optimized.
            let (plan, schema) = match snapshot.optimized(statement, limit).await {
                Ok((optimized, schema)) => (bind(optimized)?, schema),
                Err(_) => {
                    let bound = bind(snapshot.plan(statement.clone()).await?)?;
                    let schema = Arc::clone(bound.schema().inner());
                    (query::optimize(&snapshot.ctx, &bound, limit)?, schema)
                }
            };
            let answer = query::execute_optimized(&snapshot.ctx, plan, limit).await;
            if !query::rerun(&answer, &snapshot.dirs, retries, &self.inner.data_dir)? {
                return answer.map(|batches| Answer { schema, batches });
            }
            retries += 1;
            self.reopen(scope).await?;
        }
    }
}

impl Views {
    /// Runs several queries (SQL text) on one checkpoint, for one page:
    /// their rows, in order, and the checkpoint.
    pub async fn run_many(
        &self,
        scope: &Scope,
        sqls: &[String],
    ) -> Result<(Vec<Vec<RecordBatch>>, u64), QueryError> {
        let (views, scope, sqls) = (self.clone(), scope.clone(), sqls.to_vec());
        query::isolated(self.inner.query_timeout, move || async move {
            views.run_many_here(&scope, &sqls).await
        })
        .await
    }

    async fn run_many_here(
        &self,
        scope: &Scope,
        sqls: &[String],
    ) -> Result<(Vec<Vec<RecordBatch>>, u64), QueryError> {
        let parser =
            datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser::new();
        let mut statements = Vec::with_capacity(sqls.len());
        for sql in sqls {
            let mut parsed = parser.parse(sql).map_err(|e| {
                QueryError::Execute(datafusion::error::DataFusionError::Plan(e.to_string()))
            })?;
            if parsed.len() != 1 {
                return Err(QueryError::Execute(
                    datafusion::error::DataFusionError::Plan("one statement per query".into()),
                ));
            }
            statements.push(parsed.remove(0));
        }
        let mut retries = 0;
        'again: loop {
            let snapshot = self.current(scope).await?;
            let mut out = Vec::with_capacity(statements.len());
            for statement in &statements {
                let plan = snapshot.plan(statement.clone()).await?;
                let answer = query::execute_plan(&snapshot.ctx, plan, self.memory_limit()).await;
                if query::rerun(&answer, &snapshot.dirs, retries, &self.inner.data_dir)? {
                    retries += 1;
                    self.reopen(scope).await?;
                    continue 'again;
                }
                out.push(answer?);
            }
            return Ok((out, snapshot.checkpoint_seq));
        }
    }
}

/// The rows of one query.
pub struct Answer {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}
