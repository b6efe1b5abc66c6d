//! Stopping a query's work when its answer is no longer wanted.
//!
//! A query that timed out, or whose client went away, is dropped; its
//! operators running on the query runtime's workers are then aborted at
//! their next pause. An operator that never pauses (a cross join feeding an
//! aggregate returns one batch after another without waiting for anything)
//! would keep a worker busy for as long as its input lasts, which for
//! `events a, events b, events c` is for ever, and every later query of
//! every account would wait behind it.
//!
//! [`guard`] puts a [`CancellableExec`] on every edge of a physical plan.
//! Each batch that passes through it first checks the query's [`Cancel`]
//! flag, set when the query is dropped, and ends the stream with an error
//! once it is; and takes a unit of the task's cooperative budget from
//! tokio, so that a long operator pauses now and then and the queries
//! beside it on the same workers get their share. The rows that do pass
//! are not touched.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::{Stream, StreamExt};

/// A query's flag: set once its answer is no longer wanted. Setting it
/// when dropped makes the owner's drop (a timeout, a client gone) stop
/// the work.
#[derive(Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// The flag the plan's edges read.
    fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.0)
    }
}

impl Drop for Cancel {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// `plan` with a [`CancellableExec`] over it and over each of its
/// operators' inputs, reading `cancel`.
pub fn guard(plan: Arc<dyn ExecutionPlan>, cancel: &Cancel) -> Result<Arc<dyn ExecutionPlan>> {
    let flag = cancel.flag();
    Ok(Arc::new(CancellableExec::new(
        wrap_inputs(plan, &flag)?,
        flag,
    )))
}

fn wrap_inputs(
    plan: Arc<dyn ExecutionPlan>,
    flag: &Arc<AtomicBool>,
) -> Result<Arc<dyn ExecutionPlan>> {
    use datafusion::physical_plan::execution_plan::{
        ChildrenPropertiesMode, ReplaceChildrenOptions,
    };
    let children = plan.children();
    if children.is_empty() {
        return Ok(plan);
    }
    let wrapped = children
        .into_iter()
        .map(|c| {
            let inner = wrap_inputs(Arc::clone(c), flag)?;
            Ok(Arc::new(CancellableExec::new(inner, Arc::clone(flag))) as Arc<dyn ExecutionPlan>)
        })
        .collect::<Result<Vec<_>>>()?;
    // The wrappers have their inputs' properties: nothing to recompute.
    plan.replace_children(
        wrapped,
        ReplaceChildrenOptions::new(ChildrenPropertiesMode::Keep),
    )
}

/// Passes its input's batches through, unless the query was cancelled
/// (see the module's documentation).
#[derive(Debug)]
pub struct CancellableExec {
    input: Arc<dyn ExecutionPlan>,
    flag: Arc<AtomicBool>,
}

impl CancellableExec {
    fn new(input: Arc<dyn ExecutionPlan>, flag: Arc<AtomicBool>) -> CancellableExec {
        CancellableExec { input, flag }
    }
}

impl DisplayAs for CancellableExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CancellableExec")
    }
}

impl ExecutionPlan for CancellableExec {
    fn name(&self) -> &str {
        "CancellableExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(DataFusionError::Internal(format!(
                "CancellableExec has one input, given {}",
                children.len()
            )));
        }
        Ok(Arc::new(CancellableExec::new(
            children.swap_remove(0),
            Arc::clone(&self.flag),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let inner = self.input.execute(partition, context)?;
        Ok(Box::pin(CancellableStream {
            inner,
            flag: Arc::clone(&self.flag),
            ended: false,
        }))
    }
}

struct CancellableStream {
    inner: SendableRecordBatchStream,
    flag: Arc<AtomicBool>,
    /// Cancelled and said so: nothing more comes.
    ended: bool,
}

impl Stream for CancellableStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if self.flag.load(Ordering::Relaxed) {
            self.ended = true;
            return Poll::Ready(Some(Err(DataFusionError::Execution(
                "the query was cancelled (its time ran out, or its client left)".into(),
            ))));
        }
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        let next = self.inner.poll_next_unpin(cx);
        if next.is_ready() {
            coop.made_progress();
        }
        next
    }
}

impl RecordBatchStream for CancellableStream {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;
    use std::time::{Duration, Instant};

    async fn physical(ctx: &SessionContext, sql: &str) -> Arc<dyn ExecutionPlan> {
        let frame = ctx.sql(sql).await.unwrap();
        frame.create_physical_plan().await.unwrap()
    }

    /// A cross join feeding an aggregate never pauses: once its query is
    /// dropped, the work stops within moments, and the runtime's workers
    /// are free for the next query.
    #[test]
    fn a_dropped_query_stops_its_work() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let ctx = SessionContext::new();
            let sql = "SELECT count(*) FROM range(100000) a, range(100000) b, range(100000) c";
            let plan = physical(&ctx, sql).await;
            let cancel = Cancel::default();
            let guarded = guard(plan, &cancel).unwrap();
            let task = ctx.task_ctx();
            let mut stream = datafusion::physical_plan::execute_stream(guarded, task).unwrap();
            let worker = tokio::spawn(async move { stream.next().await.map(|r| r.is_err()) });
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(!worker.is_finished(), "the query should still be running");
            let dropped = Instant::now();
            drop(cancel);
            let ended = tokio::time::timeout(Duration::from_secs(10), worker)
                .await
                .expect("the work did not stop")
                .unwrap();
            assert_eq!(ended, Some(true), "ended by the cancellation's error");
            assert!(dropped.elapsed() < Duration::from_secs(5));
            // The rows of a query that is not cancelled are all there.
            let plan = physical(
                &ctx,
                "SELECT count(*) AS n FROM range(1000) a, range(300) b",
            )
            .await;
            let keep = Cancel::default();
            let guarded = guard(plan, &keep).unwrap();
            let rows = datafusion::physical_plan::collect(guarded, ctx.task_ctx())
                .await
                .unwrap();
            let text = arrow::util::pretty::pretty_format_batches(&rows)
                .unwrap()
                .to_string();
            assert!(text.contains("300000"), "{text}");
        });
    }
}
