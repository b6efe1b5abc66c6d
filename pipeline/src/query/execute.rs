//! Planning and running one statement: read-only planning (DDL, DML and
//! statements refused, see [`super::guard`]), execution under the memory
//! pool, and the threads queries run on ([`isolated`], [`on_query_threads`]):
//! large stacks for DataFusion's recursive planner, and one query's panic or
//! timeout kept away from every other.

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::execution::context::SessionContext;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::parser::Statement as DFStatement;

use super::error::classify;
use super::{ByteSize, QueryError, guard};

/// Stack of the thread that parses and plans a query: enough for
/// [`MAX_EXPR_DEPTH`] levels of DataFusion's unprotected recursion (several
/// KiB a level in a debug build) and for dropping the syntax tree of a
/// refused, much deeper query (a few hundred bytes a level). Only the pages
/// touched are ever committed.
pub const QUERY_STACK_BYTES: usize = 256 << 20;

/// Stack of the worker threads that execute a query's plan, where
/// expressions at most [`MAX_EXPR_DEPTH`] deep are evaluated recursively.
pub const QUERY_WORKER_STACK_BYTES: usize = 64 << 20;

/// Plans one parsed statement, refusing what [`plan_read_only`] refuses.
pub async fn plan_statement(
    ctx: &SessionContext,
    statement: datafusion::sql::sqlparser::ast::Statement,
) -> Result<LogicalPlan, QueryError> {
    let statement = DFStatement::Statement(Box::new(statement));
    guard::check_statement(&statement)?;
    let plan = ctx
        .state()
        .statement_to_plan(statement)
        .await
        .map_err(|e| classify(e, 0))?;
    guard::check_plan(&plan)?;
    Ok(plan)
}

/// Executes a plan from [`plan_statement`] and collects its rows. The
/// rows collected count against the memory pool while they are
/// collected, so that one result larger than `--memory-limit` is refused
/// (53200) instead of taking the process's memory.
pub async fn execute_plan(
    ctx: &SessionContext,
    plan: LogicalPlan,
    memory_limit: ByteSize,
) -> Result<Vec<RecordBatch>, QueryError> {
    let optimized = optimize(ctx, &plan, memory_limit)?;
    execute_optimized(ctx, optimized, memory_limit).await
}

/// Runs DataFusion's optimizer on `plan`, refusing what
/// [`guard::check_optimized`] refuses.
pub fn optimize(
    ctx: &SessionContext,
    plan: &LogicalPlan,
    memory_limit: ByteSize,
) -> Result<LogicalPlan, QueryError> {
    let optimized = ctx
        .state()
        .optimize(plan)
        .map_err(|e| classify(e, memory_limit.0))?;
    guard::check_optimized(&optimized)?;
    Ok(optimized)
}

/// [`execute_plan`] of a plan [`optimize`] already gave.
pub async fn execute_optimized(
    ctx: &SessionContext,
    optimized: LogicalPlan,
    memory_limit: ByteSize,
) -> Result<Vec<RecordBatch>, QueryError> {
    use datafusion::execution::memory_pool::MemoryConsumer;
    use futures::StreamExt;
    let fail = |e| classify(e, memory_limit.0);
    let running = Running::enter();
    let mut state = ctx.state();
    let cores = state.config().target_partitions();
    let degree = degree_under_load(cores, running.count);
    if degree < cores {
        state.config_mut().options_mut().execution.target_partitions = degree;
    }
    let physical = state
        .query_planner()
        .create_physical_plan(&optimized, &state)
        .await
        .map_err(fail)?;
    // Dropped with this future (a timeout, a client gone): the operators
    // still running on the query runtime stop at their next batch.
    let cancel = super::cancel::Cancel::default();
    let physical = super::cancel::guard(physical, &cancel).map_err(fail)?;
    let task = Arc::new(datafusion::execution::TaskContext::from(&state));
    let mut stream = datafusion::physical_plan::execute_stream(physical, task).map_err(fail)?;
    let reservation = MemoryConsumer::new("query result").register(&ctx.runtime_env().memory_pool);
    let mut batches = Vec::new();
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(fail)?;
        reservation
            .try_grow(batch.get_array_memory_size())
            .map_err(fail)?;
        batches.push(batch);
    }
    drop(cancel);
    Ok(batches)
}

/// Whether `plan` (the views it reads included) calls a function that is
/// not immutable: `now()`, `current_date` and the like, which the
/// optimizer folds into the time the plan was optimized at. Such a plan
/// is optimized again for each execution, never kept (a kept one would
/// answer every later execution with the first one's time).
pub fn reads_the_clock(plan: &LogicalPlan) -> bool {
    use datafusion::catalog::default_table_source::source_as_provider;
    use datafusion::catalog::view::ViewTable;
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::{Expr, Volatility};
    let mut found = false;
    let walked = plan.apply_with_subqueries(|p| {
        p.apply_expressions(|e| {
            e.apply(|e| {
                if let Expr::ScalarFunction(f) = e
                    && f.func.signature().volatility != Volatility::Immutable
                {
                    found = true;
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })?;
        if let LogicalPlan::TableScan(scan) = p
            && let Ok(provider) = source_as_provider(&scan.source)
            && let Some(view) = provider.downcast_ref::<ViewTable>()
            && reads_the_clock(view.logical_plan())
        {
            found = true;
        }
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    // A walk that fails (it cannot here) counts as reading the clock: the
    // plan is then only not kept.
    found || walked.is_err()
}

/// Queries of this process planned and not yet answered (see
/// [`degree_under_load`]).
static RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One query counted in [`RUNNING`] while it lives.
struct Running {
    /// How many were running once this one entered, itself included.
    count: usize,
}

impl Running {
    fn enter() -> Running {
        use std::sync::atomic::Ordering;
        let count = RUNNING.fetch_add(1, Ordering::Relaxed) + 1;
        Running { count }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How many partitions a query is planned with when `running` queries
/// (itself included) share the `cores` partitions a query alone gets: its
/// share, at least one. A query alone splits its scan over every core;
/// under load the cores are already busy with other queries, and each
/// extra partition only costs another pruning pass, another file range
/// and a merge. The answer is the same at any degree (only the order of
/// rows no `ORDER BY` fixes may differ, as it may between any two runs).
fn degree_under_load(cores: usize, running: usize) -> usize {
    (cores / running.max(1)).max(1)
}

/// Parses and plans `sql`, refusing plans that write, define or set
/// anything. DataFusion's `SHOW ...` and `DESCRIBE` plan to queries over
/// `information_schema` (and `DescribeTable`), which are reads and pass.
async fn plan_read_only(ctx: &SessionContext, sql: &str) -> Result<LogicalPlan, QueryError> {
    let state = ctx.state();
    let dialect = state.config().options().sql_parser.dialect;
    let statement = state
        .sql_to_statement(sql, &dialect)
        .map_err(|e| classify(e, 0))?;
    guard::check_statement(&statement)?;
    let plan = state
        .statement_to_plan(statement)
        .await
        .map_err(|e| classify(e, 0))?;
    guard::check_plan(&plan)?;
    Ok(plan)
}

/// Runs one read-only statement on `ctx` and collects its rows (no retry;
/// see [`Session::query`]).
pub async fn run(
    ctx: &SessionContext,
    sql: &str,
    memory_limit: ByteSize,
) -> Result<Vec<RecordBatch>, QueryError> {
    let plan = plan_read_only(ctx, sql).await?;
    execute_plan(ctx, plan, memory_limit).await
}

/// The runtime every isolated query executes on (see [`isolated`]): its
/// workers run the operators of every query of the process, never the
/// listeners, health checks or metrics of `tally serve`.
///
/// Built by the first query, under the lock: two first queries at once
/// must not both build one, since the loser's would be dropped inside an
/// async context, which panics. A build that fails is tried again by the
/// next query.
static QUERY_RUNTIME: std::sync::Mutex<Option<tokio::runtime::Runtime>> =
    std::sync::Mutex::new(None);

fn query_runtime() -> Result<tokio::runtime::Handle, QueryError> {
    let mut rt = QUERY_RUNTIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(rt) = rt.as_ref() {
        return Ok(rt.handle().clone());
    }
    let built = tokio::runtime::Builder::new_multi_thread()
        .thread_name("tally-query-worker")
        .thread_stack_size(QUERY_WORKER_STACK_BYTES)
        .enable_all()
        .build()
        .map_err(QueryError::Thread)?;
    let handle = built.handle().clone();
    *rt = Some(built);
    Ok(handle)
}

/// How long a query holds its turn (see [`turns`]): a point query is
/// answered well within it; a longer one then goes on beside the queries
/// that have their turns, so that no query, however heavy, keeps the
/// others waiting for more than this.
const TURN: std::time::Duration = std::time::Duration::from_millis(20);

/// Queries that may plan and run at once per core before the next one
/// waits for its turn.
const TURNS_PER_CORE: usize = 2;

/// The turns queries take, first come first served: with more queries at
/// once than the cores can run, each waits in line for a turn instead of
/// every one of them slowing every other down, so that a query's answer
/// takes about as long as the queue before it (a short tail), not as long
/// as the unluckiest share of the cores. A query holds its turn at most
/// [`TURN`].
fn turns() -> &'static Arc<tokio::sync::Semaphore> {
    static TURNS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    TURNS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Arc::new(tokio::sync::Semaphore::new(cores * TURNS_PER_CORE))
    })
}

/// A query's turn (see [`turns`]), until it is given back.
type Turn = std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>;

fn give_back(turn: &Turn) {
    drop(turn.lock().unwrap_or_else(|p| p.into_inner()).take());
}

/// Runs `work` (planning and executing one query) where it can neither
/// stall nor end anything else: on a thread of its own with
/// [`QUERY_STACK_BYTES`] of stack, so that planning, which is synchronous
/// and can take seconds, blocks no runtime; its operators on the shared
/// query runtime; and a panic inside it answers this query only. After
/// `timeout` the caller gets [`QueryError::Timeout`] and the work is
/// dropped at its next await (planning finishes first; the limits of
/// [`guard`] keep that short).
pub async fn isolated<F, Fut, T>(timeout: std::time::Duration, work: F) -> Result<T, QueryError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, QueryError>>,
    T: Send + 'static,
{
    use futures::FutureExt;
    let handle = query_runtime()?;
    let turns = Arc::clone(turns());
    let (mut tx, rx) = tokio::sync::oneshot::channel::<Result<T, QueryError>>();
    std::thread::Builder::new()
        .name("tally-query".into())
        .stack_size(QUERY_STACK_BYTES)
        .spawn(move || {
            let out = handle.block_on(async {
                // Its turn first (see `turns`), given back once answered
                // or after `TURN`, whichever comes first: by a task on the
                // runtime's workers, since planning keeps this thread busy
                // without a pause for as long as it takes.
                let turn = tokio::select! {
                    turn = turns.acquire_owned() => Arc::new(Turn::new(turn.ok())),
                    () = tx.closed() => return None,
                };
                let over = {
                    let turn = Arc::clone(&turn);
                    tokio::spawn(async move {
                        tokio::time::sleep(TURN).await;
                        give_back(&turn);
                    })
                };
                let work = std::panic::AssertUnwindSafe(async move { work().await }).catch_unwind();
                let out = tokio::select! {
                    out = work => Some(out),
                    () = tx.closed() => None,
                };
                give_back(&turn);
                over.abort();
                out
            });
            let out = match out {
                None => return,
                Some(Ok(out)) => out,
                Some(Err(panic)) => Err(QueryError::Panicked {
                    what: panic_message(panic.as_ref()),
                }),
            };
            let _ = tx.send(out);
        })
        .map_err(QueryError::Thread)?;
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(out)) => out,
        Ok(Err(_)) => Err(QueryError::ThreadLost),
        Err(_) => Err(QueryError::Timeout {
            secs: timeout.as_secs(),
        }),
    }
}

/// What a panic said, for the error the query gets.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned());
    text.chars().take(200).collect()
}

/// Runs `work` (opening a session, running queries) on a runtime of its
/// own, on a thread with [`QUERY_STACK_BYTES`] of stack and workers with
/// [`QUERY_WORKER_STACK_BYTES`] (tokio's default is 2 MiB), and waits for
/// it without blocking the caller's runtime.
pub async fn on_query_threads<F, Fut, T>(work: F) -> Result<T, QueryError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("tally-query".into())
        .stack_size(QUERY_STACK_BYTES)
        .spawn(move || {
            let out = tokio::runtime::Builder::new_multi_thread()
                .thread_name("tally-query-worker")
                .thread_stack_size(QUERY_WORKER_STACK_BYTES)
                .enable_all()
                .build()
                .map(|rt| rt.block_on(work()))
                .map_err(QueryError::Thread);
            // The receiver only goes away if the caller was cancelled.
            let _ = tx.send(out);
        })
        .map_err(QueryError::Thread)?;
    rx.await.map_err(|_| QueryError::ThreadLost)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_query_alone_takes_every_core_and_under_load_its_share() {
        assert_eq!(degree_under_load(2, 1), 2);
        assert_eq!(degree_under_load(2, 2), 1);
        assert_eq!(degree_under_load(2, 32), 1);
        assert_eq!(degree_under_load(8, 3), 2);
        assert_eq!(degree_under_load(8, 0), 8);
    }

    #[tokio::test]
    async fn a_plan_that_reads_the_clock_is_told_from_one_that_does_not() {
        let ctx = SessionContext::new();
        ctx.sql("CREATE VIEW today AS SELECT current_date AS d")
            .await
            .unwrap();
        ctx.sql("CREATE VIEW fixed AS SELECT abs(-1) AS one")
            .await
            .unwrap();
        for (sql, reads) in [
            ("SELECT now()", true),
            ("SELECT 1 WHERE now() > '2020-01-01'::timestamptz", true),
            ("SELECT (SELECT max(d) FROM today)", true),
            ("SELECT * FROM today", true),
            ("SELECT abs(-2), upper('a')", false),
            ("SELECT * FROM fixed", false),
        ] {
            let plan = ctx.state().create_logical_plan(sql).await.unwrap();
            assert_eq!(reads_the_clock(&plan), reads, "{sql}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_query_that_holds_its_thread_gives_its_turn_back() {
        // More queries than there are turns, each busy without a pause
        // (as planning is) for far longer than a turn.
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let busy: Vec<_> = (0..cores * TURNS_PER_CORE + 2)
            .map(|_| {
                tokio::spawn(isolated(Duration::from_secs(10), || async {
                    std::thread::sleep(Duration::from_millis(1500));
                    Ok(())
                }))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        isolated(Duration::from_secs(10), || async { Ok(()) })
            .await
            .unwrap();
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_millis(700),
            "a query waited {waited:?} behind busy ones"
        );
        for b in busy {
            b.await.unwrap().unwrap();
        }
    }

    #[test]
    fn a_query_counts_as_running_until_it_is_answered() {
        let before = RUNNING.load(std::sync::atomic::Ordering::Relaxed);
        let first = Running::enter();
        let second = Running::enter();
        assert!(first.count > before && second.count > first.count);
        drop((first, second));
    }
}
