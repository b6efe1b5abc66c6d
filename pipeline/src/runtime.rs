//! The runtime: a thin async shell around the synchronous [`Processor`].
//!
//! Per batch: fetch (pull consumer, large batches) -> validate, dedup, fold
//! (sync) -> make durable (DLQ publishes acked, Parquet renamed into place)
//! -> checkpoint -> ack (AckAll on the batch's last message). A failure in
//! the durable steps keeps the batch unacked and is retried with backoff; a
//! crash at any instant leaves the views equal to the checkpoint's prefix
//! after the next start's recovery.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_nats::jetstream;
use bytes::Bytes;
use futures::FutureExt;
use tracing::{debug, info, warn};

use crate::config::{ConfigError, Settings};
use crate::event::{Event, Limits, validate_message};
use crate::operator::overages::Alert;
use crate::operator::subscription::SubEvent;
use crate::operator::{self, Operator, OperatorError, Storage};
use crate::sink::alerts::{self, AlertError};
use crate::sink::parquet::{SinkError, ViewDir, read_parquet};
use crate::source::dlq::{self, DeadLetter, DlqError};
use crate::source::jetstream::{self as js_source, SourceConfig, SourceError};
use crate::state::checkpoint::{Checkpoint, CheckpointError};
use crate::state::dedup::{self, Dedup};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Dlq(#[from] DlqError),
    #[error(transparent)]
    Alert(#[from] AlertError),
    #[error(transparent)]
    Operator(#[from] OperatorError),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another tally process is using data directory {path}; stop it first, or give this one its own --data"
    )]
    Locked { path: PathBuf },
    #[error(
        "data directory {path} was built from stream {found} (created {found_created}), not {wanted} (created {wanted_created}); use a fresh --data, or `tally replay` to rebuild from this stream"
    )]
    OtherStream {
        path: PathBuf,
        found: String,
        found_created: String,
        wanted: String,
        wanted_created: String,
    },
    #[error(
        "data directory {path} was built with other settings ({found}) than the config now says ({wanted}); views would stop being a function of the stream: restore the config, or run `tally replay` to rebuild with the new one"
    )]
    SettingsChanged {
        path: PathBuf,
        found: String,
        wanted: String,
    },
    #[error(
        "checkpoint of {path} is at sequence {checkpoint} but stream {stream} ends at {last}: the stream lost messages or was recreated; run `tally replay` or use a fresh --data"
    )]
    AheadOfStream {
        path: PathBuf,
        checkpoint: u64,
        stream: String,
        last: u64,
    },
    #[error(
        "internal task failed: {0}; nothing unfinished was acknowledged, the next start redoes it"
    )]
    Task(String),
    #[error(
        "stopped before batch {first}..={last} was durable: {cause}; nothing was acknowledged, the next start redoes it"
    )]
    Interrupted {
        first: u64,
        last: u64,
        cause: String,
    },
}

/// One message as the processor sees it.
pub struct Incoming<'a> {
    pub stream_seq: u64,
    pub published_at: i64,
    pub subject: &'a str,
    pub payload: &'a Bytes,
}

/// A view's rows for one batch.
pub struct ViewRows {
    pub view: &'static str,
    pub schema: SchemaRef,
    pub batch: RecordBatch,
}

/// Operators (with their registry index) that run on one thread.
type Group<'a> = Vec<(usize, &'a mut Box<dyn Operator>)>;

/// The synchronous core: validation, dedup and the operators. No I/O and no
/// clock in any result (a monotonic timer only measures operator costs to
/// share them between two threads); the same messages in the same order
/// give the same state.
pub struct Processor {
    limits: Limits,
    prefix: String,
    dedup: Dedup,
    operators: Vec<Box<dyn Operator>>,
    /// Each operator's measured cost (apply + cut rows) over recent
    /// batches, to split them into two groups of about equal work. Only
    /// which thread runs an operator depends on it, never a result.
    costs: Vec<Duration>,
    live: bool,
    /// Rows written per versioned view since its last snapshot (compaction policy).
    versions_written: std::collections::HashMap<&'static str, usize>,
    /// In-memory state of the checkpoint (counts, positions); saved by the shell.
    pub checkpoint: Checkpoint,
}

impl Processor {
    pub fn new(settings: &Settings, prefix: &str, checkpoint: Checkpoint) -> Processor {
        Processor {
            limits: settings.limits(),
            prefix: prefix.to_owned(),
            dedup: Dedup::new(settings.dedup_horizon_us),
            operators: operator::registry(settings),
            costs: Vec::new(),
            live: true,
            versions_written: std::collections::HashMap::new(),
            checkpoint,
        }
    }

    /// Processes a batch of messages in stream order; returns the dead
    /// letters. Messages at or below the checkpoint are ignored
    /// (redeliveries). Gives exactly the state of processing the messages
    /// one at a time, using two cores: validation (a pure function of
    /// each message) runs on both halves of the batch at once, and the
    /// operators (independent state machines that each see every accepted
    /// event in order) run in two groups at once.
    pub fn process_batch(&mut self, msgs: &[Incoming<'_>]) -> Vec<DeadLetter> {
        let (prefix, limits) = (self.prefix.as_str(), &self.limits);
        // The dedup key is hashed here too, on both halves.
        let validate = |m: &Incoming<'_>| {
            validate_message(
                m.payload,
                m.subject,
                prefix,
                m.stream_seq,
                m.published_at,
                limits,
            )
            .map(|event| {
                let key = dedup::key(&event.tenant, &event.source, &event.id);
                (event, key)
            })
        };
        let results = on_two_cores(msgs, validate);
        let cp = &mut self.checkpoint;
        let mut letters = Vec::new();
        let mut accepted = Vec::with_capacity(msgs.len());
        // Events stay where validation put them; the operators see them by
        // reference (moving ~400-byte events cost more than the dedup).
        for (m, result) in msgs.iter().zip(&results) {
            if m.stream_seq <= cp.last_seq {
                continue;
            }
            cp.last_seq = m.stream_seq;
            cp.stream_now_us = Some(
                cp.stream_now_us
                    .map_or(m.published_at, |n| n.max(m.published_at)),
            );
            match result {
                Err(reject) => {
                    cp.counts.dead_letter(reject.reason);
                    letters.push(DeadLetter {
                        stream_seq: m.stream_seq,
                        subject: m.subject.to_owned(),
                        payload: m.payload.clone(),
                        reject: reject.clone(),
                    });
                }
                Ok((event, key)) => {
                    if !self.dedup.admit(*key, m.published_at) {
                        cp.counts.duplicate += 1;
                        continue;
                    }
                    cp.counts.accepted += 1;
                    cp.stream_clock_us =
                        Some(cp.stream_clock_us.map_or(event.time, |c| c.max(event.time)));
                    accepted.push(event);
                }
            }
        }
        // Each subscription change is built once and shared by the operators.
        let subs: Vec<Option<Arc<SubEvent>>> = accepted
            .iter()
            .map(|e| SubEvent::from_event(e).map(Arc::new))
            .collect();
        let (first, second) = self.groups();
        let apply = |ops: Group<'_>| -> Vec<(usize, Duration)> {
            ops.into_iter()
                .map(|(i, op)| {
                    let started = Instant::now();
                    for (e, sub) in accepted.iter().zip(&subs) {
                        op.apply_with(e, sub.as_ref());
                    }
                    (i, started.elapsed())
                })
                .collect()
        };
        let (a, b) = run_pair(first, second, apply, apply);
        self.measured(a.into_iter().chain(b), true);
        letters
    }

    /// Makes room in the dedup horizon for `messages` more events (the
    /// stream's backlog), so that it does not grow step by step.
    pub fn reserve_dedup(&mut self, messages: u64) {
        self.dedup
            .reserve(usize::try_from(messages).unwrap_or(usize::MAX));
    }

    /// The operators in two groups of about equal measured cost, for
    /// [`run_pair`]: largest first, each to the group with less so far.
    fn groups(&mut self) -> (Group<'_>, Group<'_>) {
        self.costs.resize(self.operators.len(), Duration::ZERO);
        let mut order: Vec<usize> = (0..self.operators.len()).collect();
        order.sort_by_key(|i| std::cmp::Reverse(self.costs[*i]));
        let mut in_first = vec![false; self.operators.len()];
        let (mut first, mut second) = (Duration::ZERO, Duration::ZERO);
        for i in order {
            if first <= second {
                first += self.costs[i];
                in_first[i] = true;
            } else {
                second += self.costs[i];
            }
        }
        self.operators
            .iter_mut()
            .enumerate()
            .partition(|(i, _)| in_first[*i])
    }

    /// Records measured costs: `apply` starts a batch's figure (half the
    /// previous one carried over, so the split follows the stream's mix
    /// without jumping on one odd batch); cutting rows adds to it.
    fn measured(&mut self, times: impl Iterator<Item = (usize, Duration)>, apply: bool) {
        for (i, t) in times {
            if let Some(c) = self.costs.get_mut(i) {
                *c = if apply { *c / 2 + t } else { *c + t };
            }
        }
    }

    /// The rows the operators produced since the last call (cut in the
    /// same two groups at once), in registry order.
    pub fn take_rows(&mut self) -> Result<Vec<ViewRows>, OperatorError> {
        let seq = self.checkpoint.last_seq;
        let (first, second) = self.groups();
        type Cut = Result<Vec<(usize, Duration, Option<ViewRows>)>, OperatorError>;
        let cut = |ops: Group<'_>| -> Cut {
            let mut out = Vec::new();
            for (i, op) in ops {
                let started = Instant::now();
                let rows = op.take_rows(seq)?.map(|batch| ViewRows {
                    view: op.view(),
                    schema: op.schema(),
                    batch,
                });
                out.push((i, started.elapsed(), rows));
            }
            Ok(out)
        };
        let (a, b) = run_pair(first, second, cut, cut);
        let mut cut = a?;
        cut.extend(b?);
        self.measured(cut.iter().map(|(i, t, _)| (*i, *t)), false);
        let mut rows: Vec<(usize, ViewRows)> = cut
            .into_iter()
            .filter_map(|(i, _, rows)| rows.map(|r| (i, r)))
            .collect();
        rows.sort_by_key(|(i, _)| *i);
        let mut out = Vec::with_capacity(rows.len());
        for (_, r) in rows {
            *self.versions_written.entry(r.view).or_insert(0) += r.batch.num_rows();
            out.push(r);
        }
        Ok(out)
    }

    /// Restores the state at start-up in one pass over the `events`
    /// archive: the dedup horizon (the archive holds exactly the accepted
    /// events, in the order they were inserted, so re-inserting them gives
    /// the same horizon, evictions included) and the operators that rebuild
    /// from the archive (silently). Then every versioned view folds its
    /// stored rows back.
    pub fn restore(&mut self, data_dir: &Path) -> Result<(), RuntimeError> {
        let rebuild: Vec<usize> = (0..self.operators.len())
            .filter(|i| self.operators[*i].rebuilds_from_archive())
            .collect();
        for i in &rebuild {
            self.operators[*i].set_live(false);
        }
        let mut replayed = 0u64;
        for_each_archived(data_dir, |event| {
            self.dedup.admit(
                dedup::key(&event.tenant, &event.source, &event.id),
                event.published_at,
            );
            let sub = SubEvent::from_event(event).map(Arc::new);
            for i in &rebuild {
                self.operators[*i].apply_with(event, sub.as_ref());
            }
            replayed += 1;
        })?;
        for i in &rebuild {
            let op = &mut self.operators[*i];
            op.take_rows(0)?;
            op.take_alerts();
        }
        debug!(
            replayed,
            dedup_entries = self.dedup.len(),
            "state re-folded from the events archive"
        );
        for op in &mut self.operators {
            if op.storage() == Storage::Append {
                continue;
            }
            for file in ViewDir::new(data_dir, op.view()).files()? {
                for batch in read_parquet(&file.path)? {
                    op.restore(&batch?)?;
                }
            }
        }
        for i in &rebuild {
            self.operators[*i].set_live(self.live);
        }
        Ok(())
    }

    /// Whether alerts are published (a live run) or not (replay).
    pub fn set_live(&mut self, live: bool) {
        self.live = live;
        for op in &mut self.operators {
            op.set_live(live);
        }
    }

    /// Alerts decided by the last [`Processor::take_rows`].
    pub fn take_alerts(&mut self) -> Vec<Alert> {
        self.operators
            .iter_mut()
            .flat_map(|o| o.take_alerts())
            .collect()
    }

    /// Compacts every view's files once there are many small ones: appended
    /// views merge their files; versioned views write a snapshot of their
    /// state covering the whole prefix. Call only right after a checkpoint.
    pub fn compact(&mut self, data_dir: &Path) -> Result<(), RuntimeError> {
        let upto = self.checkpoint.last_seq;
        for op in &self.operators {
            let dir = ViewDir::new(data_dir, op.view());
            match op.storage() {
                Storage::Append => {
                    let merged = dir.compact(&op.schema(), upto)?;
                    if merged > 0 {
                        debug!(view = op.view(), merged, "compacted small view files");
                    }
                }
                Storage::Versioned { .. } => {
                    let written = self.versions_written.get(op.view()).copied().unwrap_or(0);
                    if written >= op.state_rows()
                        && dir.needs_compaction(upto)?
                        && let Some(snapshot) = op.snapshot(upto)?
                    {
                        let replaced = dir.replace_with(upto, &op.schema(), &snapshot)?;
                        self.versions_written.insert(op.view(), 0);
                        debug!(
                            view = op.view(),
                            replaced, "replaced view versions with a snapshot"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    pub fn view_schemas(&self) -> Vec<(&'static str, SchemaRef)> {
        self.operators
            .iter()
            .map(|o| (o.view(), o.schema()))
            .collect()
    }
}

/// Maps `f` over `items` in order, on two threads (one per half) when
/// there are enough items to pay for it.
fn on_two_cores<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if items.len() < 1024 {
        return items.iter().map(&f).collect();
    }
    let (a, b) = items.split_at(items.len() / 2);
    let map = |half: &[T]| half.iter().map(&f).collect::<Vec<R>>();
    let (mut out, second) = run_pair(a, b, map, map);
    out.extend(second);
    out
}

/// Runs `fa(a)` on a second thread and `fb(b)` on this one, at once.
fn run_pair<A: Send, B, RA: Send, RB>(
    a: A,
    b: B,
    fa: impl FnOnce(A) -> RA + Send,
    fb: impl FnOnce(B) -> RB,
) -> (RA, RB) {
    std::thread::scope(|s| {
        let first = s.spawn(|| fa(a));
        let second = fb(b);
        match first.join() {
            Ok(ra) => (ra, second),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// How `tally run` behaves (runtime knobs, not results).
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub data_dir: PathBuf,
    pub source: SourceConfig,
    pub config: Option<PathBuf>,
    /// Exit once the stream is drained and quiet for `idle`.
    pub until_idle: bool,
    pub idle: Duration,
    pub batch_size: usize,
    /// How long to wait for more messages once a batch has started.
    pub batch_wait: Duration,
    /// Publish alerts (`tally run`); a replay does not.
    pub live: bool,
    /// Acknowledge each batch once durable (`tally run`). A replay reads
    /// through a read-only consumer instead and checks deliveries for gaps
    /// (see [`js_source::consumer_from`]).
    pub acked: bool,
    /// Answer a `tally replay`'s hand-off between batches (see [`crate::replay`]).
    pub serve_handoff: bool,
    /// Stop once this stream sequence is processed (replay's target).
    pub stop_at: Option<u64>,
    /// The last processed sequence, for a progress display.
    pub position: Option<Arc<AtomicU64>>,
}

impl RunOptions {
    /// `tally run`'s behaviour with the given knobs.
    pub fn live(data_dir: PathBuf, source: SourceConfig, config: Option<PathBuf>) -> RunOptions {
        RunOptions {
            data_dir,
            source,
            config,
            until_idle: false,
            idle: Duration::from_secs(1),
            batch_size: 50_000,
            batch_wait: Duration::from_millis(200),
            live: true,
            acked: true,
            serve_handoff: true,
            stop_at: None,
            position: None,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub batches: u64,
    pub messages: u64,
    pub last_seq: u64,
    pub elapsed: Duration,
    /// From the first message received to the last batch acknowledged:
    /// the time spent working, without start-up and the final idle wait.
    pub active: Duration,
    /// When the last batch became durable.
    pub durable_at: Option<Instant>,
    /// Time spent validating, folding and cutting rows (the main thread's work).
    pub processing: Duration,
    /// Time the main thread waited for the previous batch to become durable.
    pub waiting_durable: Duration,
    /// Time spent encoding and writing view files and checkpoints (the writer thread).
    pub writing: Duration,
}

/// The settings file in effect: `--config`, else `<data>/tally.toml` if present.
pub fn settings_path(data_dir: &Path, explicit: Option<&Path>) -> Option<PathBuf> {
    match explicit {
        Some(p) => Some(p.to_path_buf()),
        None => Some(data_dir.join("tally.toml")).filter(|p| p.exists()),
    }
}

/// Holds the data directory's lock for the lifetime of a run.
pub struct DataDirLock {
    _file: std::fs::File,
}

pub fn lock_data_dir(data_dir: &Path) -> Result<DataDirLock, RuntimeError> {
    std::fs::create_dir_all(data_dir).map_err(|source| RuntimeError::DataDir {
        path: data_dir.to_path_buf(),
        source,
    })?;
    let path = data_dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| RuntimeError::DataDir {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(DataDirLock { _file: file }),
        Err(_) => Err(RuntimeError::Locked {
            path: data_dir.to_path_buf(),
        }),
    }
}

/// Loads or starts the checkpoint, checks it belongs to this stream and
/// these settings, and brings the view directories back to it.
pub fn open_state(
    data_dir: &Path,
    settings: &Settings,
    stream: &str,
    stream_created: &str,
    prefix: &str,
) -> Result<Processor, RuntimeError> {
    let checkpoint = match Checkpoint::load(data_dir)? {
        None => Checkpoint::new(stream, stream_created, settings),
        Some(cp) => {
            if cp.stream != stream || cp.stream_created != stream_created {
                return Err(RuntimeError::OtherStream {
                    path: data_dir.to_path_buf(),
                    found: cp.stream,
                    found_created: cp.stream_created,
                    wanted: stream.to_owned(),
                    wanted_created: stream_created.to_owned(),
                });
            }
            if cp.settings != *settings {
                return Err(RuntimeError::SettingsChanged {
                    path: data_dir.to_path_buf(),
                    found: cp.settings.fingerprint(),
                    wanted: settings.fingerprint(),
                });
            }
            cp
        }
    };
    let mut processor = Processor::new(settings, prefix, checkpoint);
    for (view, _) in processor.view_schemas() {
        let dir = ViewDir::new(data_dir, view);
        dir.create()?;
        let removed = dir.recover(processor.checkpoint.last_seq)?;
        if removed > 0 {
            info!(
                view,
                removed, "removed view files a crash left beyond the checkpoint"
            );
        }
    }
    processor.restore(data_dir)?;
    Ok(processor)
}

/// Calls `f` with every archived event, in stream order.
pub fn for_each_archived(data_dir: &Path, mut f: impl FnMut(&Event)) -> Result<(), RuntimeError> {
    for file in ViewDir::new(data_dir, operator::events::VIEW).files()? {
        for batch in read_parquet(&file.path)? {
            operator::events::decode(&batch?, &mut f)?;
        }
    }
    Ok(())
}

/// What one batch must make durable before its checkpoint.
pub struct BatchOutput {
    /// First stream sequence the batch covers.
    pub first: u64,
    pub letters: Vec<DeadLetter>,
    pub alerts: Vec<Alert>,
    pub rows: Vec<ViewRows>,
    /// The checkpoint covering the batch, taken when the batch was cut (the
    /// processor moves on to the next batch while this one is written).
    pub checkpoint: Checkpoint,
    /// Views whose small files to merge once the batch is durable.
    pub compact: Option<Vec<(&'static str, SchemaRef)>>,
}

/// Makes one batch durable: DLQ, alerts, view files, checkpoint. Retries
/// with backoff until it succeeds or `stop` fires. Runs as its own task
/// while the next batch is fetched and processed; the Parquet encoding and
/// fsyncs run on a blocking thread.
async fn commit(
    js: jetstream::Context,
    data_dir: PathBuf,
    stream: String,
    out: Arc<BatchOutput>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(Instant, Duration), RuntimeError> {
    let first = out.first;
    let last = out.checkpoint.last_seq;
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt: Result<Duration, RuntimeError> = async {
            dlq::publish_all(&js, &stream, &out.letters).await?;
            alerts::publish_all(&js, &out.alerts).await?;
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
fn write_batch(data_dir: &Path, out: &BatchOutput) -> Result<(), RuntimeError> {
    for r in &out.rows {
        ViewDir::new(data_dir, r.view).write(
            out.first,
            out.checkpoint.last_seq,
            &r.schema,
            std::slice::from_ref(&r.batch),
        )?;
    }
    out.checkpoint.save(data_dir)?;
    // The batch is durable; merging small files is housekeeping: a failure
    // is logged and retried at the next round, never holds the batch.
    for (view, schema) in out.compact.iter().flatten() {
        match ViewDir::new(data_dir, view).compact(schema, out.checkpoint.last_seq) {
            Ok(0) => {}
            Ok(merged) => debug!(view, merged, "compacted small view files"),
            Err(e) => warn!(view, error = %e, "cannot compact view files yet"),
        }
    }
    Ok(())
}

/// A batch being made durable, and the message that acknowledges it.
struct InFlight {
    /// Resolves to when the batch became durable, and the time spent writing it.
    task: tokio::task::JoinHandle<Result<(Instant, Duration), RuntimeError>>,
    /// AckAll: acknowledging the batch's last message acknowledges it all.
    last_msg: async_nats::Message,
    client: async_nats::Client,
    last_seq: u64,
}

/// Waits for the batch in flight (if any) to be durable, then acks it.
async fn settle(
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
    if opts.acked
        && let Err(e) = js_source::ack(&f.client, &f.last_msg).await
    {
        debug!(error = %e, "ack failed; the checkpoint already covers the batch");
    }
    summary.batches += 1;
    summary.last_seq = f.last_seq;
    if let Some(pos) = &opts.position {
        pos.store(f.last_seq, Ordering::Relaxed);
    }
    Ok(())
}

/// Fires on SIGINT or SIGTERM.
pub fn shutdown_signal() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(t) => t,
                    Err(e) => {
                        warn!(error = %e, "cannot listen for SIGTERM");
                        let _ = tokio::signal::ctrl_c().await;
                        let _ = tx.send(true);
                        return;
                    }
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        info!("shutdown requested: finishing the current batch");
        let _ = tx.send(true);
    });
    rx
}

/// How long a live run waits, paused, for a replay to switch directories.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(120);

/// `tally run`.
pub async fn run(
    opts: &RunOptions,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<RunSummary, RuntimeError> {
    let mut lock = None;
    run_with_lock(opts, stop, &mut lock).await
}

/// [`run`], leaving the data directory's lock in `lock` when it returns
/// (a replay keeps it until it has switched directories).
pub async fn run_with_lock(
    opts: &RunOptions,
    mut stop: tokio::sync::watch::Receiver<bool>,
    lock: &mut Option<DataDirLock>,
) -> Result<RunSummary, RuntimeError> {
    let started = Instant::now();
    *lock = Some(lock_data_dir(&opts.data_dir)?);
    let settings =
        Settings::load(settings_path(&opts.data_dir, opts.config.as_deref()).as_deref())?;
    let client = js_source::connect(&opts.source.nats_url).await?;
    let js = jetstream::new(client.clone());
    let mut stream = js_source::ensure_event_stream(&js, &opts.source).await?;
    js_source::ensure_output_stream(
        &js,
        &opts.source.dlq_stream,
        &format!("{}.>", dlq::SUBJECT_PREFIX),
    )
    .await?;
    js_source::ensure_output_stream(
        &js,
        alerts::STREAM,
        &format!("{}.>", alerts::SUBJECT_PREFIX),
    )
    .await?;
    let (created, stream_last) =
        js_source::stream_identity(&mut stream, &opts.source.stream).await?;
    let mut p = open_state(
        &opts.data_dir,
        &settings,
        &opts.source.stream,
        &created,
        &opts.source.subject_prefix,
    )?;
    p.set_live(opts.live);
    p.reserve_dedup(stream_last.saturating_sub(p.checkpoint.last_seq));
    if p.checkpoint.last_seq > stream_last {
        return Err(RuntimeError::AheadOfStream {
            path: opts.data_dir.clone(),
            checkpoint: p.checkpoint.last_seq,
            stream: opts.source.stream.clone(),
            last: stream_last,
        });
    }
    info!(
        stream = %opts.source.stream,
        resume_from = p.checkpoint.last_seq + 1,
        stream_last,
        data = %opts.data_dir.display(),
        "tally run starting"
    );
    let mut summary = RunSummary {
        last_seq: p.checkpoint.last_seq,
        ..Default::default()
    };
    let mut last_report = Instant::now();
    let mut reported_msgs = 0u64;
    let max_ack_pending = js_source::max_ack_pending(opts.batch_size);
    let mut failures = 0u32;
    let mut first_seen: Option<Instant> = None;
    let done = |p: &Processor| opts.stop_at.is_some_and(|n| p.checkpoint.last_seq >= n);
    let mut in_flight: Option<InFlight> = None;
    // Idle ticks in a row with messages owed to us (see the idle branch).
    let mut stalled_ticks = 0u32;
    // The current consumer's deliveries, checked for gaps when they are
    // not acked (see `acked`).
    let mut deliveries: js_source::Deliveries;
    'session: loop {
        settle(&mut in_flight, &mut summary, opts).await?;
        if *stop.borrow() || done(&p) {
            break;
        }
        let consumer = match js_source::consumer_from(
            &stream,
            &opts.source,
            p.checkpoint.last_seq + 1,
            max_ack_pending,
            opts.acked,
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                failures += 1;
                let delay = Duration::from_millis(250 * u64::from(failures.min(40)));
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "consumer not available; retrying");
                tokio::select! { _ = tokio::time::sleep(delay) => continue 'session, _ = stop.changed() => break 'session }
            }
        };
        deliveries = js_source::Deliveries::default();
        let mut messages = match js_source::Pull::start(
            &client,
            &opts.source.stream,
            &opts.source.consumer,
            opts.batch_size,
        )
        .await
        {
            Ok(m) => m,
            Err(e) => {
                failures += 1;
                warn!(error = %e, "cannot start consuming; retrying");
                tokio::select! { _ = tokio::time::sleep(Duration::from_millis(500)) => continue 'session, _ = stop.changed() => break 'session }
            }
        };
        loop {
            if opts.serve_handoff && crate::replay::handoff_requested(&opts.data_dir) {
                settle(&mut in_flight, &mut summary, opts).await?;
                if crate::replay::serve_handoff(
                    &opts.data_dir,
                    p.checkpoint.last_seq,
                    lock,
                    HANDOFF_TIMEOUT,
                )
                .await?
                {
                    p = open_state(
                        &opts.data_dir,
                        &settings,
                        &opts.source.stream,
                        &created,
                        &opts.source.subject_prefix,
                    )?;
                    p.set_live(opts.live);
                    info!(
                        resume_from = p.checkpoint.last_seq + 1,
                        "resumed on the replayed views"
                    );
                }
                continue 'session;
            }
            // Wait for the first message of a batch, the idle timeout, or a
            // stop; with a batch in flight, only briefly: it is acked as soon
            // as it is durable, not when the stream goes quiet.
            let wait = if in_flight.is_some() {
                opts.batch_wait
            } else {
                opts.idle
            };
            let first_msg = tokio::select! {
                biased;
                _ = stop.changed() => break 'session,
                r = tokio::time::timeout(wait, messages.next()) => r,
            };
            let first_msg = match first_msg {
                Err(_) if in_flight.is_some() => {
                    settle(&mut in_flight, &mut summary, opts).await?;
                    continue;
                }
                Err(_) => {
                    // Quiet for a while with nothing in flight. Either the
                    // stream is drained, or delivery stalled: the server has
                    // messages for us (pending, or delivered and never
                    // received) that did not arrive. A stall is healed by
                    // recreating the consumer from the checkpoint.
                    let mut c = consumer.clone();
                    match c.info().await {
                        // Unacked deliveries are not counted as pending: one
                        // lost at the tail shows as delivered, not received.
                        Ok(info)
                            if info.num_pending == 0
                                && info.num_ack_pending == 0
                                && (opts.acked
                                    || !deliveries.lost_any(info.delivered.consumer_sequence)) =>
                        {
                            stalled_ticks = 0;
                            if opts.until_idle {
                                break 'session;
                            }
                        }
                        Ok(info) => {
                            stalled_ticks += 1;
                            if stalled_ticks >= 3 {
                                warn!(
                                    pending = info.num_pending,
                                    delivered_unacked = info.num_ack_pending,
                                    resume_from = p.checkpoint.last_seq + 1,
                                    "message delivery stalled; recreating the consumer from the checkpoint"
                                );
                                stalled_ticks = 0;
                                continue 'session;
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "cannot read consumer state; reconnecting");
                            continue 'session;
                        }
                    }
                    continue;
                }
                Ok(None) => {
                    warn!("message stream ended; reconnecting");
                    continue 'session;
                }
                Ok(Some(Err(e))) => {
                    warn!(error = %e, "message stream failed; resuming from the checkpoint");
                    tokio::select! { _ = tokio::time::sleep(Duration::from_millis(500)) => continue 'session, _ = stop.changed() => break 'session }
                }
                Ok(Some(Ok(m))) => {
                    stalled_ticks = 0;
                    m
                }
            };
            first_seen.get_or_insert_with(Instant::now);
            let mut batch = Vec::with_capacity(opts.batch_size);
            batch.push(first_msg);
            let deadline = tokio::time::Instant::now() + opts.batch_wait;
            let mut stream_failed = false;
            while batch.len() < opts.batch_size {
                // Messages already received are taken without arming a
                // timer each (that cost more than the message itself).
                let next = match messages.next().now_or_never() {
                    Some(m) => Ok(m),
                    None => tokio::time::timeout_at(deadline, messages.next()).await,
                };
                match next {
                    Ok(Some(Ok(m))) => batch.push(m),
                    Ok(Some(Err(e))) => {
                        warn!(error = %e, "message stream failed mid-batch; committing what arrived");
                        stream_failed = true;
                        break;
                    }
                    Ok(None) => {
                        stream_failed = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            // Process (sync).
            let cpu = Instant::now();
            let report_now = last_report.elapsed() >= Duration::from_secs(5);
            let first_seq_before = p.checkpoint.last_seq;
            let mut incoming = Vec::with_capacity(batch.len());
            let mut last_idx = None;
            for (idx, m) in batch.iter().enumerate() {
                let Some(d) = js_source::delivery_info(m) else {
                    warn!(subject = %m.subject, "message without JetStream metadata skipped");
                    continue;
                };
                if !opts.acked && !deliveries.admit(&d) {
                    // Not redelivered without acks: take what came before
                    // it, then resume from the checkpoint.
                    warn!(
                        expected = deliveries.expected(),
                        got = d.consumer_seq,
                        "a delivery was lost; resuming from the checkpoint"
                    );
                    stream_failed = true;
                    break;
                }
                if opts.stop_at.is_some_and(|n| d.stream_seq > n) {
                    break;
                }
                incoming.push(Incoming {
                    stream_seq: d.stream_seq,
                    published_at: d.published_at,
                    subject: m.subject.as_str(),
                    payload: &m.payload,
                });
                last_idx = Some(idx);
            }
            let processed = incoming.len() as u64;
            let mut letters = p.process_batch(&incoming);
            if !opts.live {
                // A replay rebuilds views; the dead letters (like the alerts)
                // were published by the live run, and are counted anyway.
                letters.clear();
            }
            drop(incoming);
            let Some(last_msg) = last_idx.and_then(|i| batch.get(i).cloned()) else {
                if stream_failed {
                    continue 'session;
                }
                continue;
            };
            // Freeing 50k messages is a tenth of this thread's work: the
            // blocking pool does it while the next batch is processed.
            tokio::task::spawn_blocking(move || drop(batch));
            let out = BatchOutput {
                first: first_seq_before + 1,
                rows: p.take_rows()?,
                alerts: p.take_alerts(),
                letters,
                checkpoint: p.checkpoint.clone(),
                // Every 5 s the writer also merges small view files, after
                // this batch is durable (it is the only one writing files).
                compact: report_now.then(|| p.view_schemas()),
            };
            summary.processing += cpu.elapsed();
            // One batch in flight: the previous one must be durable (and is
            // acked) before this one is written.
            let waited = Instant::now();
            settle(&mut in_flight, &mut summary, opts).await?;
            summary.waiting_durable += waited.elapsed();
            in_flight = Some(InFlight {
                task: tokio::spawn(commit(
                    js.clone(),
                    opts.data_dir.clone(),
                    opts.source.stream.clone(),
                    Arc::new(out),
                    stop.clone(),
                )),
                last_msg,
                client: client.clone(),
                last_seq: p.checkpoint.last_seq,
            });
            summary.messages += processed;
            if report_now {
                let rate =
                    (summary.messages - reported_msgs) as f64 / last_report.elapsed().as_secs_f64();
                let c = &p.checkpoint.counts;
                info!(
                    last_seq = p.checkpoint.last_seq,
                    accepted = c.accepted,
                    duplicate = c.duplicate,
                    dead_lettered = c.dead_lettered_total(),
                    msgs_per_s = rate as u64,
                    "progress"
                );
                last_report = Instant::now();
                reported_msgs = summary.messages;
            }
            if stream_failed {
                continue 'session;
            }
            if *stop.borrow() || done(&p) {
                break 'session;
            }
        }
    }
    settle(&mut in_flight, &mut summary, opts).await?;
    if let (Some(first), Some(durable)) = (first_seen, summary.durable_at) {
        summary.active = durable.saturating_duration_since(first);
    }
    p.compact(&opts.data_dir)?;
    summary.elapsed = started.elapsed();
    let c = &p.checkpoint.counts;
    info!(
        last_seq = p.checkpoint.last_seq,
        accepted = c.accepted,
        duplicate = c.duplicate,
        dead_lettered = c.dead_lettered_total(),
        seconds = summary.elapsed.as_secs_f64(),
        processing_secs = summary.processing.as_secs_f64(),
        waiting_durable_secs = summary.waiting_durable.as_secs_f64(),
        writing_secs = summary.writing.as_secs_f64(),
        "tally run stopped; everything processed is durable and acknowledged"
    );
    Ok(summary)
}
