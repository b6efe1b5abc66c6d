//! Making one batch durable, then acknowledging it: dead letters and
//! alerts published and acked by JetStream, view files renamed into place,
//! then the checkpoint, then the ack. Runs as its own task while the next
//! batch is fetched and processed (one batch in flight at a time).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use async_nats::jetstream;
use tracing::{debug, warn};

use super::processor::{Compaction, Processor, QUIET_FACTOR, SnapshotRows, ViewRows};
use super::{RunOptions, RunSummary, RuntimeError};
use crate::event::alert::Alert;
use crate::operator::Restatement;
use crate::sink::dlq::{DeadLetter, DlqTarget};
use crate::sink::{alerts, dlq, restated};
use crate::source::jetstream as js_source;
use crate::store::DataDir;
use crate::store::checkpoint::Checkpoint;
use crate::store::parquet::{self, ViewFilesError};

/// A finished view file to put in place as the batch's file of `view`
/// (a replay links the live `events` archive's files instead of encoding
/// their rows again).
pub struct ViewLink {
    pub view: &'static str,
    pub from: std::path::PathBuf,
    /// The stream sequences the file covers.
    pub first: u64,
    pub last: u64,
}

/// What one batch must make durable before its checkpoint.
pub struct BatchOutput {
    /// First stream sequence the batch covers.
    pub first: u64,
    pub letters: Vec<DeadLetter>,
    pub alerts: Vec<Alert>,
    /// Restatements to publish (a live run's).
    pub restated: Vec<Restatement>,
    pub rows: Vec<ViewRows>,
    pub links: Vec<ViewLink>,
    /// The checkpoint covering the batch, taken when the batch was cut (the
    /// processor moves on to the next batch while this one is written).
    pub checkpoint: Checkpoint,
    /// Views whose small files to merge once the batch is durable.
    pub compact: Option<Vec<(&'static str, SchemaRef)>>,
    /// Snapshots of versioned views' states as of the batch, each to
    /// replace its view's files once the batch is durable (see
    /// [`Processor::take_due_snapshots`]).
    pub snapshots: Vec<SnapshotRows>,
}

/// Makes one batch durable: DLQ, alerts, restatements, view files, checkpoint. Retries
/// with backoff until it succeeds or `stop` fires. Runs as its own task
/// while the next batch is fetched and processed; the Parquet encoding and
/// fsyncs run on a blocking thread.
pub async fn commit(
    js: jetstream::Context,
    data_dir: DataDir,
    dlq_target: Arc<DlqTarget>,
    out: Arc<BatchOutput>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(Instant, Duration), RuntimeError> {
    let first = out.first;
    let last = out.checkpoint.last_seq;
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt: Result<Duration, RuntimeError> = async {
            dlq::publish_all(&js, &dlq_target, &out.letters).await?;
            alerts::publish_all(&js, &out.alerts).await?;
            restated::publish_all(&js, &out.restated).await?;
            let (dir, batch) = (data_dir.clone(), Arc::clone(&out));
            tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                write_batch(&dir, &batch).map(|()| started.elapsed())
            })
            .await
            .map_err(|e| RuntimeError::Task(e.to_string()))?
        }
        .await;
        match attempt {
            Ok(writing) => return Ok((Instant::now(), writing)),
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => {
                warn!(first, last, error = %e, retry_in_ms = delay.as_millis() as u64, "batch not yet durable; keeping it unacknowledged and retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => {
                        return Err(RuntimeError::Interrupted { first, last, cause: e.to_string() });
                    }
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// The view files of a batch (temp file, fsync, rename), then its checkpoint.
fn write_batch(data_dir: &DataDir, out: &BatchOutput) -> Result<(), RuntimeError> {
    for r in &out.rows {
        let sorted;
        let batch = match r.sort_by {
            None => &r.batch,
            Some(column) => {
                sorted = parquet::sorted_by(&r.batch, column)?;
                &sorted
            }
        };
        data_dir.view(r.view).write(
            out.first,
            out.checkpoint.last_seq,
            &r.schema,
            std::slice::from_ref(batch),
        )?;
    }
    for l in &out.links {
        data_dir.view(l.view).link(&l.from, l.first, l.last)?;
    }
    data_dir.commit(&out.checkpoint)?;
    // The batch is durable; snapshots and merging small files are
    // housekeeping: a failure is logged and retried at the next round,
    // never holds the batch. Snapshots first: each covers the files a
    // merge would have merged.
    for s in &out.snapshots {
        match data_dir.view(s.view).replace_with_chunks(
            out.checkpoint.last_seq,
            &s.schema,
            s.chunks.iter().cloned().map(Ok::<_, ViewFilesError>),
        ) {
            Ok(replaced) => debug!(
                view = s.view,
                replaced, "replaced view versions with a snapshot"
            ),
            Err(e) => {
                warn!(view = s.view, error = %e, "cannot write the view's snapshot yet; its versions stay readable as they are")
            }
        }
    }
    for (view, schema) in out.compact.iter().flatten() {
        match data_dir.view(view).compact(schema, out.checkpoint.last_seq) {
            Ok(0) => {}
            Ok(merged) => debug!(view, merged, "compacted small view files"),
            Err(e) => warn!(view, error = %e, "cannot compact view files yet"),
        }
    }
    Ok(())
}

/// Compacts every view's files: appended views merge their small files;
/// each versioned view due a snapshot at [`QUIET_FACTOR`] is replaced by
/// its snapshot (see [`Processor::take_due_snapshots`]). For a drained
/// stream and a stopping run, right after a checkpoint: readers then take
/// each view's snapshot as it is (sorted by key, a tenant's rows are a
/// few pages) and resolve versions over fewer newer rows than it has.
/// On object storage the checkpoint is committed again when a snapshot
/// was written, so that the manifest names it (no batch may follow).
pub fn compact_all(p: &mut Processor, data_dir: &DataDir) -> Result<(), RuntimeError> {
    let mut snapshots = 0;
    let upto = p.checkpoint.last_seq;
    for (view, schema, how) in p.compactions() {
        if how == Compaction::Merge {
            let merged = data_dir.view(view).compact(&schema, upto)?;
            if merged > 0 {
                debug!(view, merged, "compacted small view files");
            }
        }
    }
    // One view at a time, in chunks: memory holds a chunk of one snapshot.
    for (view, schema) in p.due_snapshots(QUIET_FACTOR) {
        {
            let mut chunks = p.snapshot_chunks(view).peekable();
            if chunks.peek().is_some() {
                let replaced = data_dir
                    .view(view)
                    .replace_with_chunks(upto, &schema, chunks)?;
                debug!(view, replaced, "replaced view versions with a snapshot");
                snapshots += 1;
            }
        }
        p.snapshot_written(view);
    }
    if snapshots > 0 && data_dir.remote().is_some() {
        data_dir.commit(&p.checkpoint)?;
    }
    Ok(())
}

/// A batch being made durable, and the message that acknowledges it.
pub struct InFlight {
    /// Resolves to when the batch became durable, and the time spent writing it.
    pub task: tokio::task::JoinHandle<Result<(Instant, Duration), RuntimeError>>,
    /// AckAll: acknowledging the batch's last message acknowledges it all
    /// (`None` for a checkpoint that only records a gap).
    pub last_msg: Option<async_nats::Message>,
    pub client: async_nats::Client,
    pub last_seq: u64,
    /// What the checkpoint says once the batch is durable, for the run's
    /// metrics: its counts, the stream sequences it covers and when it was
    /// handed to the writer.
    pub checkpoint: Option<Box<crate::store::checkpoint::Checkpoint>>,
    pub messages: u64,
    pub dispatched: Instant,
}

/// Waits for the batch in flight (if any) to be durable, then acks it.
pub async fn settle(
    in_flight: &mut Option<InFlight>,
    summary: &mut RunSummary,
    opts: &RunOptions,
) -> Result<(), RuntimeError> {
    let Some(f) = in_flight.take() else {
        return Ok(());
    };
    let (durable_at, writing) = f
        .task
        .await
        .map_err(|e| RuntimeError::Task(e.to_string()))??;
    summary.durable_at = Some(durable_at);
    summary.writing += writing;
    if opts.mode.acks()
        && let Some(m) = &f.last_msg
        && let Err(e) = js_source::ack(&f.client, m).await
    {
        debug!(error = %e, "ack failed; the checkpoint already covers the batch");
    }
    summary.batches += 1;
    summary.last_seq = f.last_seq;
    if let (Some(m), Some(cp)) = (&opts.metrics, &f.checkpoint) {
        m.durable(cp, f.messages, f.dispatched.elapsed());
    }
    if let Some(pos) = &opts.position {
        pos.store(f.last_seq, Ordering::Relaxed);
    }
    Ok(())
}
