//! The consume loop of a run: (re)create the consumer from the checkpoint,
//! gather batches, hand them to the processor and the committer, notice a
//! drained stream, a stalled delivery, a gap in the stream or a replay's
//! hand-off request.
//!
//! Every batch is checked to continue the stream exactly where the
//! checkpoint ends: a stream sequence that was passed over is either gone
//! from the stream (a gap: refused, or recorded with `--accept-gap`) or
//! was delivered to someone else (a second process on the same consumer,
//! or a lost delivery): then nothing past it is processed, and the consumer
//! is recreated from the checkpoint. So a run never checkpoints past a
//! message it did not process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer, message::StreamMessage, stream};
use futures::FutureExt;
use tracing::{info, warn};

use super::commit::{self, BatchOutput, InFlight, ViewLink, commit, settle};
use super::decide;
use super::processor::{BUSY_FACTOR, Incoming, Processor};
use super::restore::open_state;
use super::side::SideReads;
use super::{ArchiveSource, RunOptions, RunSummary, RuntimeError};
use crate::config::Settings;
use crate::event::{Event, partition};
use crate::operator::events;
use crate::sink::dlq::DlqTarget;
use crate::sink::{alerts, dlq, restated};
use crate::source::jetstream as js_source;
use crate::store::parquet::read_parquet;
use crate::store::{DataDir, DataDirError, DataDirLock, handoff};

/// Deliveries that passed over a message the stream still holds, within
/// [`LOST_WINDOW`], before the run concludes that another process takes
/// its messages and stops.
const LOST_LIMIT: usize = 3;
const LOST_WINDOW: Duration = Duration::from_secs(60);
/// How often a progress line is logged.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// [`super::run`], leaving the data directory's lock in `lock` when it
/// returns (a replay keeps it until it has switched directories).
pub async fn run_with_lock(
    opts: &RunOptions,
    stop: tokio::sync::watch::Receiver<bool>,
    lock: &mut Option<DataDirLock>,
) -> Result<RunSummary, RuntimeError> {
    let started = Instant::now();
    let Some((data_dir, taken)) =
        DataDir::attach(&opts.data_dir, opts.standby, stop.clone()).await?
    else {
        // Stopped while standing by: nothing was taken, nothing to do.
        return Ok(RunSummary::default());
    };
    *lock = Some(taken);
    let result = async {
        let mut session = Session::open(opts, data_dir.clone()).await?;
        session.consume(stop, lock).await?;
        session.finish(started).await
    }
    .await;
    if let Some(copy) = data_dir.remote() {
        copy.release().await;
    }
    result
}

/// Why the batch loop of one consumer ended.
enum Next {
    /// Recreate the consumer from the checkpoint.
    Resume,
    /// Stop the run (drained with `--until-idle`, stopped, or at the target).
    Stop,
}

/// What a session starts with.
enum Opened {
    /// The stream no longer holds the sequences that come next.
    Gap {
        first: u64,
        last: u64,
    },
    Consuming(Box<(PullConsumer, js_source::Pull)>),
}

/// What a batch of a consumer that filters by subject comes with.
struct Filtered<'a> {
    /// What the stream held once the batch was in.
    held: &'a js_source::Held,
    /// The messages read beside the consumer up to the batch's end, in
    /// stream order.
    side: &'a [StreamMessage],
    /// The sequence the batch accounts for, when the consumer is drained:
    /// what lies between its last message and this is passed over.
    through: Option<u64>,
}

/// A batch's output, and the message that acknowledges it (none when the
/// batch only passed over other partitions' sequences).
type Processed = (BatchOutput, Option<async_nats::Message>);

/// What the messages of a batch look like against the stream.
enum Hole {
    /// Every message continues the stream.
    None,
    /// The message after the batch's usable part skipped `first..=last`.
    Skipped { first: u64, last: u64 },
    /// A read-only consumer lost a delivery on the way.
    LostDelivery,
}

struct Session<'o> {
    opts: &'o RunOptions,
    data_dir: DataDir,
    settings: Settings,
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    created: String,
    dlq: Arc<DlqTarget>,
    p: Processor,
    summary: RunSummary,
    in_flight: Option<InFlight>,
    first_seen: Option<Instant>,
    last_report: Instant,
    reported_msgs: u64,
    /// When deliveries passed over messages the stream still holds.
    lost: Vec<Instant>,
    /// The stream stores subjects with this many partitions' numbers in
    /// them (see [`crate::event::partition::transform`]).
    stored_partitions: Option<u32>,
    /// When the server delivers only this partition's messages (a stream
    /// that stores this deployment's partition numbers): the consumer's
    /// filter and what is read beside it.
    filtered: Option<Filter>,
    /// The stream's subjects and transform at the start: a filtered run
    /// stops if they change under it.
    layout: js_source::Layout,
    /// Archived events folded but not yet committed (a file linked whole
    /// is folded in pieces and committed once): the first sequence of the
    /// batch they belong to and the duplicates among them.
    folded_archived: Option<(u64, u64)>,
}

/// The messages read beside a filtered consumer from `from` up to
/// `through` (`last`: the stream's last sequence, read before), and what
/// the stream holds once they are read: read after them, so that a message
/// the stream dropped meanwhile shows as gone, not as another partition's.
async fn beside(
    stream: &stream::Stream,
    side: &mut SideReads,
    name: &str,
    from: u64,
    through: u64,
    last: u64,
) -> Result<(js_source::Held, Vec<StreamMessage>), js_source::SourceError> {
    let messages = side.between(stream, name, from, through, last).await?;
    let held = js_source::held(stream, name).await?;
    Ok((held, messages))
}

/// A consumer that filters by this partition's subjects.
struct Filter {
    subject: String,
    side: SideReads,
}

impl<'o> Session<'o> {
    /// Locks the data directory, connects, makes sure the streams exist,
    /// and loads the state the checkpoint describes.
    async fn open(opts: &'o RunOptions, data_dir: DataDir) -> Result<Session<'o>, RuntimeError> {
        let settings = Settings::load(data_dir.settings_path(opts.config.as_deref()).as_deref())?;
        let client = js_source::connect(&opts.source.nats_url).await?;
        let js = jetstream::new(client.clone());
        let js_source::EventStream {
            mut stream,
            stored_partitions,
            layout,
        } = js_source::ensure_event_stream(&js, &opts.source).await?;
        let prefix = &opts.source.subject_prefix;
        let filtered = opts
            .partition
            // Only the event subjects: a stream that also captures others
            // has messages no partition's filter would deliver.
            .filter(|p| {
                p.count > 1
                    && stored_partitions == Some(p.count)
                    && layout.subjects == [format!("{prefix}.>")]
            })
            .map(|p| Filter {
                subject: p.filter_subject(prefix),
                side: SideReads::new(p.side_subjects(prefix)),
            });
        if let Some(p) = opts.partition.filter(|p| p.count > 1 && filtered.is_none()) {
            info!(
                partition = %p,
                stream = %opts.source.stream,
                stored_partitions = stored_partitions.unwrap_or(1),
                "this worker reads every message of the stream and passes over other partitions' (a stream created with --stream-partitions {} delivers each worker only its own)",
                p.count
            );
        }
        let dlq_max = js_source::ensure_output_stream(
            &js,
            &opts.source.dlq_stream,
            &format!("{}.>", dlq::SUBJECT_PREFIX),
            opts.source.replicas,
        )
        .await?;
        js_source::ensure_output_stream(
            &js,
            alerts::STREAM,
            &format!("{}.>", alerts::SUBJECT_PREFIX),
            opts.source.replicas,
        )
        .await?;
        js_source::ensure_output_stream(
            &js,
            restated::STREAM,
            &format!("{}.>", restated::SUBJECT_PREFIX),
            opts.source.replicas,
        )
        .await?;
        let (created, stream_last) =
            js_source::stream_identity(&mut stream, &opts.source.stream).await?;
        let mut p = open_state(
            &data_dir,
            &settings,
            &opts.source.stream,
            &created,
            &opts.source.subject_prefix,
            opts.partition,
        )?;
        p.set_live(opts.mode.publishes());
        p.set_server_filtered(filtered.is_some());
        if let Some(count) = stored_partitions.filter(|_| filtered.is_some()) {
            // A filtered consumer never sees a message stored before the
            // transform was added or changed: look at a few, spread over
            // the stream, before trusting it.
            let (first, _) = js_source::bounds(&mut stream, &opts.source.stream).await?;
            let step = (stream_last.saturating_sub(first) / 8).max(1);
            let mut seq = first.max(1);
            while seq <= stream_last {
                if let Some(subject) =
                    js_source::stored_subject(&stream, &opts.source.stream, seq).await?
                    && partition::published_subject_checked(
                        &subject,
                        &opts.source.subject_prefix,
                        count,
                    )
                    .is_none()
                {
                    return Err(RuntimeError::StoredLayout {
                        stream: opts.source.stream.clone(),
                        seq,
                        subject,
                        partitions: count,
                    });
                }
                seq += step;
            }
        }
        // A partition keeps about its share of the backlog.
        let share = u64::from(opts.partition.map_or(1, |p| p.count.max(1)));
        p.reserve_dedup(stream_last.saturating_sub(p.checkpoint.last_seq) / share);
        if p.checkpoint.last_seq > stream_last {
            return Err(RuntimeError::AheadOfStream {
                path: opts.data_dir.clone(),
                checkpoint: p.checkpoint.last_seq,
                stream: opts.source.stream.clone(),
                last: stream_last,
            });
        }
        let dlq = Arc::new(DlqTarget {
            source_stream: opts.source.stream.clone(),
            source_created: created.clone(),
            max_message_bytes: dlq::message_budget(client.server_info().max_payload, dlq_max),
        });
        info!(
            stream = %opts.source.stream,
            consumer = %opts.source.consumer,
            resume_from = p.checkpoint.last_seq + 1,
            stream_last,
            data = %opts.data_dir.display(),
            "tally run starting"
        );
        let summary = RunSummary {
            last_seq: p.checkpoint.last_seq,
            ..Default::default()
        };
        Ok(Session {
            opts,
            data_dir,
            settings,
            client,
            js,
            stream,
            created,
            dlq,
            p,
            summary,
            in_flight: None,
            first_seen: None,
            last_report: Instant::now(),
            reported_msgs: 0,
            lost: Vec::new(),
            stored_partitions,
            filtered,
            layout,
            folded_archived: None,
        })
    }

    fn done(&self) -> bool {
        self.opts
            .stop_at
            .is_some_and(|n| self.p.checkpoint.last_seq >= n)
    }

    async fn settle(&mut self) -> Result<(), RuntimeError> {
        settle(&mut self.in_flight, &mut self.summary, self.opts).await
    }

    /// Sessions of one consumer each, until the run stops.
    async fn consume(
        &mut self,
        mut stop: tokio::sync::watch::Receiver<bool>,
        lock: &mut Option<DataDirLock>,
    ) -> Result<(), RuntimeError> {
        let opts = self.opts;
        let max_ack_pending = js_source::max_ack_pending(opts.batch_size);
        let mut failures = 0u32;
        loop {
            self.settle().await?;
            if *stop.borrow() || self.done() {
                return Ok(());
            }
            let (consumer, messages) = match self.open_consumer(max_ack_pending).await {
                Ok(Opened::Gap { first, last }) => {
                    self.gap(first, last, &stop).await?;
                    continue;
                }
                Ok(Opened::Consuming(opened)) => *opened,
                Err(e) => {
                    failures += 1;
                    warn!(error = %e, "cannot consume from the stream yet; retrying");
                    if backoff(failures, &mut stop).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            match self.batches(consumer, messages, &mut stop, lock).await? {
                Next::Resume => {}
                Next::Stop => return Ok(()),
            }
        }
    }

    /// (Re)creates the consumer to deliver from the checkpoint, and starts
    /// pulling from it; unless the stream has forgotten what comes next
    /// (retention, a purge), which no delivery would show: that is looked
    /// at first.
    async fn open_consumer(
        &mut self,
        max_ack_pending: i64,
    ) -> Result<Opened, js_source::SourceError> {
        let opts = self.opts;
        let next = self.p.checkpoint.last_seq + 1;
        let (first, _) = js_source::bounds(&mut self.stream, &opts.source.stream).await?;
        if first > next {
            return Ok(Opened::Gap {
                first: next,
                last: first - 1,
            });
        }
        let consumer = js_source::consumer_from(
            &self.stream,
            &opts.source,
            self.p.checkpoint.last_seq + 1,
            max_ack_pending,
            opts.mode.acks(),
            self.filtered
                .as_ref()
                .map(|f| vec![f.subject.clone()])
                .unwrap_or_default(),
        )
        .await?;
        let messages = js_source::Pull::start(
            &self.client,
            &opts.source.stream,
            &opts.source.consumer,
            opts.batch_size,
        )
        .await?;
        Ok(Opened::Consuming(Box::new((consumer, messages))))
    }

    /// Batches from one consumer until it must be recreated or the run stops.
    async fn batches(
        &mut self,
        consumer: PullConsumer,
        mut messages: js_source::Pull,
        stop: &mut tokio::sync::watch::Receiver<bool>,
        lock: &mut Option<DataDirLock>,
    ) -> Result<Next, RuntimeError> {
        let opts = self.opts;
        // The consumer's deliveries, checked for losses when they are not
        // acked (see `Mode::acks`).
        let mut deliveries = js_source::Deliveries::default();
        let mut stalled_ticks = 0u32;
        loop {
            if let Some(copy) = self.data_dir.remote() {
                copy.check_lease().map_err(DataDirError::from)?;
            }
            if opts.mode.answers_handoff() && handoff::requested(&self.data_dir) {
                self.settle().await?;
                if handoff::serve(
                    &self.data_dir,
                    self.p.checkpoint.last_seq,
                    lock,
                    opts.handoff_timeout,
                )
                .await?
                {
                    self.p = open_state(
                        &self.data_dir,
                        &self.settings,
                        &opts.source.stream,
                        &self.created,
                        &opts.source.subject_prefix,
                        opts.partition,
                    )?;
                    self.p.set_live(opts.mode.publishes());
                    self.p.set_server_filtered(self.filtered.is_some());
                    info!(
                        resume_from = self.p.checkpoint.last_seq + 1,
                        "resumed on the replayed views"
                    );
                }
                return Ok(Next::Resume);
            }
            // Wait for the first message of a batch, the idle timeout, or a
            // stop; with a batch in flight, only briefly: it is acked as soon
            // as it is durable, not when the stream goes quiet.
            let wait = if self.in_flight.is_some() {
                opts.batch_wait
            } else {
                opts.idle
            };
            let first_msg = tokio::select! {
                biased;
                _ = stop.changed() => return Ok(Next::Stop),
                r = tokio::time::timeout(wait, messages.next()) => r,
            };
            let first_msg = match first_msg {
                Err(_) if self.in_flight.is_some() => {
                    self.settle().await?;
                    continue;
                }
                Err(_) => {
                    // Quiet for a while with nothing in flight. Either the
                    // stream is drained, or delivery stalled: the server has
                    // messages for us (pending, or delivered and never
                    // received) that did not arrive. A stall is healed by
                    // recreating the consumer from the checkpoint.
                    // A filtered consumer's drained tail is read against
                    // what the stream held before the consumer said it
                    // had nothing more: a message stored after that look
                    // is delivered, not passed over.
                    let held_before = match &self.filtered {
                        Some(_) => match js_source::held(&self.stream, &opts.source.stream).await {
                            Ok(h) => Some(h),
                            Err(e) => {
                                warn!(error = %e, "cannot read the stream's state; reconnecting");
                                return Ok(Next::Resume);
                            }
                        },
                        None => None,
                    };
                    let mut c = consumer.clone();
                    let info = c.info().await;
                    if let Err(e) = &info {
                        warn!(error = %e, "cannot read consumer state; reconnecting");
                    }
                    let facts = info.as_ref().ok().map(|info| decide::ConsumerFacts {
                        pending: info.num_pending,
                        ack_pending: info.num_ack_pending,
                        lost: (!opts.mode.acks() || self.filtered.is_some())
                            && deliveries.lost_any(info.delivered.consumer_sequence),
                    });
                    match decide::quiet(facts, stalled_ticks) {
                        decide::Quiet::Reconnect => return Ok(Next::Resume),
                        decide::Quiet::Waiting { ticks } => stalled_ticks = ticks,
                        decide::Quiet::Stalled => {
                            warn!(
                                pending = facts.map_or(0, |f| f.pending),
                                delivered_unacked = facts.map_or(0, |f| f.ack_pending),
                                resume_from = self.p.checkpoint.last_seq + 1,
                                "message delivery stalled; recreating the consumer from the checkpoint"
                            );
                            return Ok(Next::Resume);
                        }
                        decide::Quiet::CheckStream => {
                            stalled_ticks = 0;
                            // Drained, unless the stream forgot what comes
                            // next: all of it (the session start looks at
                            // that), or its tail.
                            let next = self.p.checkpoint.last_seq + 1;
                            let bounds = match &held_before {
                                Some(h) => Ok((h.first, h.last)),
                                None => {
                                    js_source::bounds(&mut self.stream, &opts.source.stream).await
                                }
                            };
                            let tail = decide::after_bounds(bounds.ok(), next, opts.stop_at);
                            match (tail, &held_before) {
                                (decide::Tail::Forgotten, _) => return Ok(Next::Resume),
                                // Filtered: what the consumer did not deliver
                                // up to the tail is other partitions', but
                                // for what the stream forgot.
                                (decide::Tail::Check { from, to }, Some(held)) => {
                                    let before = self.p.checkpoint.last_seq;
                                    let Some(hole) = self
                                        .drained_tail(held.last, from, to, &mut deliveries, stop)
                                        .await?
                                    else {
                                        return Ok(Next::Resume);
                                    };
                                    if let Hole::Skipped { first, last } = hole {
                                        self.skipped(first, last, stop).await?;
                                        return Ok(Next::Resume);
                                    }
                                    if self.opts.split_at.is_some_and(|n| {
                                        before < n && self.p.checkpoint.last_seq == n
                                    }) {
                                        return Ok(Next::Resume);
                                    }
                                    if let Err(e) = commit::compact_all(&mut self.p, &self.data_dir)
                                    {
                                        warn!(error = %e, "cannot compact the views yet; retrying when the stream is next drained");
                                    }
                                }
                                (decide::Tail::Check { from, to }, None) => {
                                    if let Some(gone) = js_source::gone_until(
                                        &self.stream,
                                        &opts.source.stream,
                                        from,
                                        to,
                                    )
                                    .await?
                                    {
                                        self.gap(from, gone, stop).await?;
                                        return Ok(Next::Resume);
                                    }
                                }
                                (decide::Tail::Drained, _) => {
                                    // Spare time: the views' snapshots due.
                                    // Housekeeping: a failure waits for the
                                    // next round.
                                    if let Err(e) = commit::compact_all(&mut self.p, &self.data_dir)
                                    {
                                        warn!(error = %e, "cannot compact the views yet; retrying when the stream is next drained");
                                    }
                                }
                            }
                            if opts.until_idle {
                                return Ok(Next::Stop);
                            }
                        }
                    }
                    continue;
                }
                Ok(None) => {
                    warn!("message stream ended; reconnecting");
                    return Ok(Next::Resume);
                }
                Ok(Some(Err(e))) => {
                    warn!(error = %e, "message stream failed; resuming from the checkpoint");
                    if matches!(e, js_source::SourceError::ConsumerDeleted { .. }) {
                        self.lost_to_another().await?;
                    }
                    return Ok(if pause(Duration::from_millis(500), stop).await {
                        Next::Stop
                    } else {
                        Next::Resume
                    });
                }
                Ok(Some(Ok(m))) => {
                    stalled_ticks = 0;
                    m
                }
            };
            self.first_seen.get_or_insert_with(Instant::now);
            let (batch, stream_failed) = gather(first_msg, &mut messages, opts).await;
            let before = self.p.checkpoint.last_seq;
            let report_now = self.last_report.elapsed() >= REPORT_EVERY;
            // A filtered consumer passes over other partitions' sequences
            // (what the stream holds tells them from a gap), and the
            // messages read beside it join the batch.
            let (held, side) = match &mut self.filtered {
                Some(f) => {
                    let through = batch
                        .iter()
                        .filter_map(|m| js_source::delivery_info(m).map(|d| d.stream_seq))
                        .max()
                        .unwrap_or(0);
                    let read = async {
                        let last = js_source::held(&self.stream, &opts.source.stream)
                            .await?
                            .last;
                        beside(
                            &self.stream,
                            &mut f.side,
                            &opts.source.stream,
                            before + 1,
                            through,
                            last,
                        )
                        .await
                    };
                    match read.await {
                        Ok((held, side)) => {
                            if held.layout != self.layout {
                                return Err(self.changed(&held.layout).await);
                            }
                            (Some(held), side)
                        }
                        Err(e) => {
                            // A leader election, say: the batch comes again.
                            warn!(error = %e, "cannot read the stream beside the consumer; resuming from the checkpoint");
                            return Ok(if pause(Duration::from_millis(500), stop).await {
                                Next::Stop
                            } else {
                                Next::Resume
                            });
                        }
                    }
                }
                None => (None, Vec::new()),
            };
            let filtered = held.as_ref().map(|held| Filtered {
                held,
                side: &side,
                through: None,
            });
            let (hole, out) = self.process(batch, filtered, &mut deliveries, report_now)?;
            drop(side);
            if let Some((out, ack)) = out {
                // One batch in flight: the previous one must be durable (and
                // is acked) before this one is written.
                let waited = Instant::now();
                self.settle().await?;
                self.summary.waiting_durable += waited.elapsed();
                self.dispatch(out, ack, stop);
                if report_now {
                    self.report();
                }
            }
            self.note_split();
            if self
                .opts
                .split_at
                .is_some_and(|n| before < n && self.p.checkpoint.last_seq == n)
            {
                // The batch was cut at the split: the rest of it comes again.
                return Ok(Next::Resume);
            }
            match hole {
                Hole::None if stream_failed => return Ok(Next::Resume),
                Hole::None => {}
                Hole::LostDelivery => {
                    // An acked consumer loses no delivery it keeps to
                    // itself: another process pulls from it.
                    if opts.mode.acks() {
                        self.lost_to_another().await?;
                    }
                    return Ok(Next::Resume);
                }
                Hole::Skipped { first, last } => {
                    self.skipped(first, last, stop).await?;
                    return Ok(Next::Resume);
                }
            }
            if *stop.borrow() || self.done() {
                return Ok(Next::Stop);
            }
        }
    }

    /// Processes the usable part of `batch`: its output and the message
    /// that acknowledges it, if any. The usable part ends before a message
    /// that does not continue the stream (reported as the [`Hole`]) or past
    /// the run's target.
    ///
    /// `filtered` (a consumer that filters by subject): the messages read
    /// beside it, merged in by sequence, and what the stream holds; a
    /// skipped sequence it still holds is another partition's, passed over,
    /// and a batch may end on such sequences up to the target, the split or
    /// its `through` (then with nothing to acknowledge).
    fn process(
        &mut self,
        batch: Vec<async_nats::Message>,
        filtered: Option<Filtered<'_>>,
        deliveries: &mut js_source::Deliveries,
        compact: bool,
    ) -> Result<(Hole, Option<Processed>), RuntimeError> {
        let opts = self.opts;
        let cpu = Instant::now();
        let first_seq_before = self.p.checkpoint.last_seq;
        let mut next = first_seq_before + 1;
        let mut hole = Hole::None;
        let bounds = decide::Bounds {
            stop_at: opts.stop_at,
            split_at: opts.split_at,
            batch_start: first_seq_before,
        };
        // The deliveries, up to one lost on the way (not redelivered
        // without acks: what came before it is taken, then the run resumes
        // from the checkpoint).
        let mut delivered = Vec::with_capacity(batch.len());
        let mut lost = false;
        for (idx, m) in batch.iter().enumerate() {
            let Some(d) = js_source::delivery_info(m) else {
                warn!(subject = %m.subject, "message without JetStream metadata skipped");
                continue;
            };
            // Without acks nothing is redelivered; a filtered consumer's
            // skipped sequences are no sign of a lost delivery: both follow
            // the consumer's sequence.
            if (!opts.mode.acks() || filtered.is_some()) && !deliveries.admit(&d) {
                warn!(
                    expected = deliveries.expected(),
                    got = d.consumer_seq,
                    "a delivery was lost; resuming from the checkpoint"
                );
                lost = true;
                break;
            }
            delivered.push((idx, d));
        }
        let side = filtered.as_ref().map_or(&[][..], |f| f.side);
        // Side messages past a lost delivery wait for the resumed run.
        let side_cap = match delivered.last() {
            Some((_, d)) if lost => d.stream_seq,
            None if lost => first_seq_before,
            _ => u64::MAX,
        };
        // The subjects as published, when the stream stores partition
        // numbers in them.
        let prefix = opts.source.subject_prefix.as_str();
        // A message stored otherwise than the transform puts it stops the
        // run before anything of the batch is folded.
        let stored = self.stored_partitions;
        let stream_name = &opts.source.stream;
        let published = |subject: &'_ str, seq: u64| -> Result<Option<String>, RuntimeError> {
            let Some(count) = stored else {
                return Ok(None);
            };
            match partition::published_subject_checked(subject, prefix, count) {
                Some(std::borrow::Cow::Owned(s)) => Ok(Some(s)),
                Some(std::borrow::Cow::Borrowed(_)) => Ok(None),
                None => Err(RuntimeError::StoredLayout {
                    stream: stream_name.clone(),
                    seq,
                    subject: subject.to_owned(),
                    partitions: count,
                }),
            }
        };
        let delivered_subjects: Vec<Option<String>> = if stored.is_some() {
            batch
                .iter()
                .map(|m| {
                    let seq = js_source::delivery_info(m).map_or(0, |d| d.stream_seq);
                    published(m.subject.as_str(), seq)
                })
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        let side_subjects: Vec<Option<String>> = side
            .iter()
            .map(|m| published(m.subject.as_str(), m.sequence))
            .collect::<Result<_, _>>()?;
        let mut incoming = Vec::with_capacity(batch.len() + side.len());
        let mut last_idx = None;
        let mut passed_to = None;
        let (mut i, mut j) = (0, 0);
        loop {
            let from_side = match (delivered.get(i), side.get(j)) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some((_, d)), Some(m)) => m.sequence < d.stream_seq,
            };
            let (seq, published_at, subject, payload, idx) = if from_side {
                let m = &side[j];
                let subject = side_subjects[j].as_deref().unwrap_or(m.subject.as_str());
                j += 1;
                if m.sequence > side_cap {
                    break;
                }
                (
                    m.sequence,
                    m.time.timestamp_micros(),
                    subject,
                    &m.payload,
                    None,
                )
            } else {
                let (idx, d) = delivered[i];
                i += 1;
                let m = &batch[idx];
                let subject = delivered_subjects
                    .get(idx)
                    .and_then(Option::as_deref)
                    .unwrap_or(m.subject.as_str());
                (d.stream_seq, d.published_at, subject, &m.payload, Some(idx))
            };
            match decide::place(seq, next, &bounds) {
                decide::Place::Redelivered => continue,
                decide::Place::Next => {}
                decide::Place::Hole { first, last } => match &filtered {
                    None => {
                        hole = Hole::Skipped { first, last };
                        break;
                    }
                    Some(f) => match decide::first_gone(f.held, first, last) {
                        Some((first, last)) => {
                            hole = Hole::Skipped { first, last };
                            break;
                        }
                        // Other partitions' messages up to the target or
                        // the split, which this one lies beyond.
                        None if bounds.cap(seq) < seq => {
                            passed_to = Some(last);
                            break;
                        }
                        None => {}
                    },
                },
                decide::Place::Beyond => break,
            }
            next = seq + 1;
            incoming.push(Incoming {
                stream_seq: seq,
                published_at,
                subject,
                payload,
            });
            if idx.is_some() {
                last_idx = idx;
            }
        }
        let ended = i >= delivered.len() && j >= side.len() && passed_to.is_none();
        if lost && matches!(hole, Hole::None) {
            hole = Hole::LostDelivery;
        } else if ended
            && matches!(hole, Hole::None)
            && let Some(f) = &filtered
            && let Some(through) = f.through.map(|t| bounds.cap(t))
            && through >= next
        {
            // The rest up to `through` was not for this partition, but for
            // what the stream forgot.
            match decide::first_gone(f.held, next, through) {
                Some((first, last)) => hole = Hole::Skipped { first, last },
                None => passed_to = Some(through),
            }
        }
        let processed = incoming.len() as u64;
        let mut letters = self.p.process_batch(&incoming);
        if !opts.mode.publishes() {
            // A replay rebuilds views; the dead letters (like the alerts)
            // were published by the live run, and are counted anyway.
            letters.clear();
        }
        drop(incoming);
        drop(delivered_subjects);
        drop(side_subjects);
        if let Some(through) = passed_to {
            self.p.pass_over(through);
        }
        // Nothing to commit only when nothing was folded or passed over: a
        // batch of messages read beside the consumer has no delivery to
        // acknowledge, and still moves the checkpoint.
        let last_msg = last_idx.and_then(|i| batch.get(i).cloned());
        if processed == 0 && passed_to.is_none() {
            return Ok((hole, None));
        }
        // Freeing a batch's messages is a noticeable share of this thread's work: the
        // blocking pool does it while the next batch is processed.
        tokio::task::spawn_blocking(move || drop(batch));
        let rows = self.p.take_rows()?;
        let snapshots = if compact {
            self.p.take_due_snapshots(BUSY_FACTOR)?
        } else {
            Vec::new()
        };
        let out = BatchOutput {
            first: first_seq_before + 1,
            rows,
            snapshots,
            alerts: self.p.take_alerts(),
            restated: self.p.take_restated(),
            letters,
            links: Vec::new(),
            checkpoint: self.p.checkpoint.clone(),
            // Every few seconds the writer also merges small view files,
            // after this batch is durable (it is the only one writing files).
            compact: compact.then(|| self.p.view_schemas()),
        };
        self.summary.processing += cpu.elapsed();
        self.summary.messages += processed;
        Ok((hole, Some((out, last_msg))))
    }

    /// A filtered consumer drained with the stream at `to`: folds the
    /// messages read beside it up to there and passes over the rest (other
    /// partitions'), unless the stream forgot some of it: that hole is
    /// returned. `None`: the stream could not be read (resume).
    async fn drained_tail(
        &mut self,
        last: u64,
        from: u64,
        to: u64,
        deliveries: &mut js_source::Deliveries,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<Hole>, RuntimeError> {
        let opts = self.opts;
        let Some(f) = &mut self.filtered else {
            return Ok(None);
        };
        let (held, side) = match beside(
            &self.stream,
            &mut f.side,
            &opts.source.stream,
            from,
            to,
            last,
        )
        .await
        {
            Ok(read) => read,
            Err(e) => {
                warn!(error = %e, "cannot read the stream beside the consumer; resuming from the checkpoint");
                return Ok(None);
            }
        };
        if held.layout != self.layout {
            return Err(self.changed(&held.layout).await);
        }
        let filtered = Filtered {
            held: &held,
            side: &side,
            through: Some(to),
        };
        let (hole, out) = self.process(Vec::new(), Some(filtered), deliveries, false)?;
        if let Some((out, ack)) = out {
            self.settle().await?;
            self.dispatch(out, ack, stop);
            self.settle().await?;
        }
        self.note_split();
        Ok(Some(hole))
    }

    /// The error of a stream whose layout changed under a filtered run,
    /// once what is in flight is durable.
    async fn changed(&mut self, now: &js_source::Layout) -> RuntimeError {
        if let Err(e) = self.settle().await {
            return e;
        }
        RuntimeError::StreamChanged {
            stream: self.opts.source.stream.clone(),
            now: format!("{:?}, {:?}", now.subjects, now.transform),
            checkpoint: self.p.checkpoint.last_seq,
        }
    }

    /// Hands a batch's output to the committer; the caller has settled the
    /// previous batch (one in flight at a time).
    fn dispatch(
        &mut self,
        out: BatchOutput,
        ack: Option<async_nats::Message>,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) {
        let (checkpoint, messages) = match &self.opts.metrics {
            Some(m) => {
                m.dedup_entries(self.p.dedup_len());
                (
                    Some(Box::new(out.checkpoint.clone())),
                    (out.checkpoint.last_seq + 1).saturating_sub(out.first),
                )
            }
            None => (None, 0),
        };
        let task = tokio::spawn(commit(
            self.js.clone(),
            self.data_dir.clone(),
            Arc::clone(&self.dlq),
            Arc::new(out),
            stop.clone(),
        ));
        self.in_flight = Some(InFlight {
            task,
            last_msg: ack,
            client: self.client.clone(),
            last_seq: self.p.checkpoint.last_seq,
            checkpoint,
            messages,
            dispatched: Instant::now(),
        });
    }

    fn report(&mut self) {
        let rate = (self.summary.messages - self.reported_msgs) as f64
            / self.last_report.elapsed().as_secs_f64();
        let c = &self.p.checkpoint.counts;
        info!(
            last_seq = self.p.checkpoint.last_seq,
            accepted = c.accepted,
            duplicate = c.duplicate,
            dead_lettered = c.dead_lettered_total(),
            msgs_per_s = rate as u64,
            "progress"
        );
        self.last_report = Instant::now();
        self.reported_msgs = self.summary.messages;
    }

    /// A delivery passed over `first..=last`: a gap if the stream no longer
    /// holds them, else they went elsewhere and the consumer is recreated.
    async fn skipped(
        &mut self,
        first: u64,
        last: u64,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), RuntimeError> {
        let opts = self.opts;
        match js_source::gone_until(&self.stream, &opts.source.stream, first, last).await? {
            Some(gone) => self.gap(first, gone, stop).await,
            None => {
                warn!(
                    missing = first,
                    "the consumer passed over a message the stream holds; resuming from the checkpoint"
                );
                self.lost_to_another().await
            }
        }
    }

    /// Notes a sign that another process uses this run's consumer (a
    /// message delivered elsewhere, the consumer deleted under the run);
    /// [`LOST_LIMIT`] of them within [`LOST_WINDOW`] stop the run.
    async fn lost_to_another(&mut self) -> Result<(), RuntimeError> {
        let now = Instant::now();
        self.lost.retain(|t| now.duration_since(*t) < LOST_WINDOW);
        self.lost.push(now);
        if self.lost.len() < LOST_LIMIT {
            return Ok(());
        }
        self.settle().await?;
        Err(RuntimeError::ConsumerShared {
            stream: self.opts.source.stream.clone(),
            consumer: self.opts.source.consumer.clone(),
            checkpoint: self.p.checkpoint.last_seq,
        })
    }

    /// The stream no longer holds `first..=last`, the sequences that come
    /// next: refuse (nothing past them is processed, the checkpoint stays),
    /// or with `--accept-gap` record the gap and go on.
    async fn gap(
        &mut self,
        first: u64,
        last: u64,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), RuntimeError> {
        let opts = self.opts;
        let last = opts.stop_at.map_or(last, |n| last.min(n));
        self.settle().await?;
        let mut first = first;
        if let Some(src) = &opts.archive
            && first <= src.upto
        {
            let end = last.min(src.upto);
            self.feed_archive(src, first, end, stop).await?;
            if end >= last {
                return Ok(());
            }
            first = end + 1;
        }
        if !opts.accept_gap {
            return Err(RuntimeError::Gap {
                stream: opts.source.stream.clone(),
                first,
                last,
                path: opts.data_dir.clone(),
                checkpoint: self.p.checkpoint.last_seq,
            });
        }
        warn!(
            first_seq = first,
            last_seq = last,
            messages = last - first + 1,
            "the stream no longer holds these messages; going on without them (--accept-gap) and recording the gap"
        );
        self.p.checkpoint.skip_gap(first, last);
        self.commit_position(first, stop).await
    }

    /// Makes the checkpoint durable where it now is, from `first`, with no
    /// rows: after a gap was recorded, or sequences passed over.
    async fn commit_position(
        &mut self,
        first: u64,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), RuntimeError> {
        self.note_split();
        let out = BatchOutput {
            first,
            rows: Vec::new(),
            alerts: Vec::new(),
            restated: Vec::new(),
            letters: Vec::new(),
            links: Vec::new(),
            checkpoint: self.p.checkpoint.clone(),
            compact: None,
            snapshots: Vec::new(),
        };
        self.dispatch(out, None, stop);
        self.settle().await
    }

    /// Keeps the counts once the checkpoint reaches the split.
    fn note_split(&mut self) {
        if let Some(n) = self.opts.split_at
            && self.summary.counts_at_split.is_none()
            && self.p.checkpoint.last_seq >= n
        {
            self.summary.counts_at_split = Some(self.p.checkpoint.counts.clone());
        }
    }

    /// Processes `from..=to` from the archive of `src` (the stream no
    /// longer holds them), in batches, each made durable like a stream
    /// batch; the gaps `src` recorded in that range are recorded again.
    async fn feed_archive(
        &mut self,
        src: &ArchiveSource,
        from: u64,
        to: u64,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), RuntimeError> {
        info!(
            from,
            to,
            archive = %src.dir.display(),
            "the stream no longer holds these sequences; reading them from the events archive"
        );
        let archive = DataDir::new(&src.dir);
        // Small whole files are folded together, up to a batch's size
        // (larger batches measured slower: less of the writing overlaps
        // the folding of the next batch).
        let group = self.opts.batch_size;
        let mut chunk: Vec<Event> = Vec::new();
        let mut links: Vec<ViewLink> = Vec::new();
        for file in archive.view(events::VIEW).files()? {
            if file.last_seq < from || file.first_seq > to {
                continue;
            }
            // A file wholly inside the range holds exactly the `events` rows
            // of its sequences: it is linked into the new directory as it
            // is, not decoded and encoded again. A batch is linked files
            // only, or decoded rows only.
            let whole = file.first_seq >= from && file.last_seq <= to;
            if whole && links.is_empty() && !chunk.is_empty() {
                let through = file.first_seq - 1;
                self.commit_archived(std::mem::take(&mut chunk), through, Vec::new(), stop)
                    .await?;
            }
            if !whole && let Some(through) = links.last().map(|l| l.last) {
                let batch = (std::mem::take(&mut chunk), std::mem::take(&mut links));
                self.commit_archived(batch.0, through, batch.1, stop)
                    .await?;
            }
            for batch in read_parquet(&file.path)? {
                let mut failed = None;
                events::decode(&batch?, |e| {
                    if (from..=to).contains(&e.stream_seq) {
                        chunk.push(e);
                    }
                })
                .unwrap_or_else(|e| failed = Some(e));
                if let Some(e) = failed {
                    return Err(e.into());
                }
                if chunk.len() >= self.opts.batch_size {
                    let through = chunk.last().map_or(from, |e| e.stream_seq);
                    if whole {
                        // The file's rows become durable together, when it
                        // is linked; its events are folded a batch at a
                        // time meanwhile, so a file of millions of rows is
                        // never held decoded at once.
                        self.fold_archived(std::mem::take(&mut chunk), through, true);
                    } else {
                        self.commit_archived(std::mem::take(&mut chunk), through, Vec::new(), stop)
                            .await?;
                    }
                }
            }
            if whole {
                links.push(ViewLink {
                    view: events::VIEW,
                    from: file.path,
                    first: file.first_seq,
                    last: file.last_seq,
                });
                // Measured in sequences since the last commit, as a
                // stream batch is.
                let committed = self
                    .folded_archived
                    .map_or(self.p.checkpoint.last_seq, |(first, _)| first - 1);
                if file.last_seq - committed >= group as u64 {
                    let batch = (std::mem::take(&mut chunk), std::mem::take(&mut links));
                    self.commit_archived(batch.0, file.last_seq, batch.1, stop)
                        .await?;
                }
            }
        }
        if let Some(through) = links.last().map(|l| l.last) {
            let batch = (std::mem::take(&mut chunk), std::mem::take(&mut links));
            self.commit_archived(batch.0, through, batch.1, stop)
                .await?;
        }
        for g in &src.gaps {
            if g.last_seq >= from && g.first_seq <= to {
                self.p.checkpoint.gaps.push(g.clone());
            }
        }
        self.commit_archived(chunk, to, Vec::new(), stop).await
    }

    /// Folds archived events into the views without committing them
    /// (`linked`: they are the rows of files to be linked whole, so the
    /// `events` view is skipped); the batch's [`Session::commit_archived`]
    /// commits them. Returns the batch's first sequence and its duplicates
    /// so far.
    fn fold_archived(&mut self, chunk: Vec<Event>, through: u64, linked: bool) -> (u64, u64) {
        let cpu = Instant::now();
        let first = self.p.checkpoint.last_seq + 1;
        let duplicates = self.p.process_archived(&chunk, through, linked);
        let folded = self.folded_archived.get_or_insert((first, 0));
        folded.1 += duplicates;
        let batch = *folded;
        self.summary.processing += cpu.elapsed();
        self.summary.messages += chunk.len() as u64;
        // Dropping the events off this thread, as for stream batches.
        tokio::task::spawn_blocking(move || drop(chunk));
        batch
    }

    /// One batch of archived events through the processor and the
    /// committer; with `links`, the archive files that hold exactly these
    /// events' rows become the new `events` files for their ranges.
    async fn commit_archived(
        &mut self,
        chunk: Vec<Event>,
        through: u64,
        links: Vec<ViewLink>,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), RuntimeError> {
        let linked = !links.is_empty();
        let (first, duplicates) = self.fold_archived(chunk, through, linked);
        self.folded_archived = None;
        if duplicates > 0 && linked {
            // The archive's rows would show events this replay drops.
            return Err(RuntimeError::ArchiveDuplicates {
                first,
                last: through,
                duplicates,
            });
        }
        let cpu = Instant::now();
        let out = BatchOutput {
            first,
            rows: self.p.take_rows()?,
            alerts: self.p.take_alerts(),
            restated: self.p.take_restated(),
            letters: Vec::new(),
            links,
            checkpoint: self.p.checkpoint.clone(),
            compact: None,
            snapshots: Vec::new(),
        };
        self.summary.processing += cpu.elapsed();
        self.settle().await?;
        self.dispatch(out, None, stop);
        self.note_split();
        Ok(())
    }

    /// Settles the last batch, merges small files, logs the outcome.
    async fn finish(mut self, started: Instant) -> Result<RunSummary, RuntimeError> {
        self.settle().await?;
        if let (Some(first), Some(durable)) = (self.first_seen, self.summary.durable_at) {
            self.summary.active = durable.saturating_duration_since(first);
        }
        commit::compact_all(&mut self.p, &self.data_dir)?;
        self.summary.elapsed = started.elapsed();
        let c = &self.p.checkpoint.counts;
        info!(
            last_seq = self.p.checkpoint.last_seq,
            accepted = c.accepted,
            duplicate = c.duplicate,
            dead_lettered = c.dead_lettered_total(),
            gaps = self.p.checkpoint.gaps.len(),
            seconds = self.summary.elapsed.as_secs_f64(),
            processing_secs = self.summary.processing.as_secs_f64(),
            waiting_durable_secs = self.summary.waiting_durable.as_secs_f64(),
            writing_secs = self.summary.writing.as_secs_f64(),
            "tally run stopped; everything processed is durable and acknowledged"
        );
        Ok(self.summary)
    }
}

/// Gathers a batch after its first message: up to the batch size, for at
/// most the batch wait. Also says whether the message stream failed.
async fn gather(
    first: async_nats::Message,
    messages: &mut js_source::Pull,
    opts: &RunOptions,
) -> (Vec<async_nats::Message>, bool) {
    let mut batch = Vec::with_capacity(opts.batch_size);
    batch.push(first);
    let deadline = tokio::time::Instant::now() + opts.batch_wait;
    while batch.len() < opts.batch_size {
        // Messages already received are taken without arming a timer each
        // (arming one costs more than taking the message itself).
        let next = match messages.next().now_or_never() {
            Some(m) => Ok(m),
            None => tokio::time::timeout_at(deadline, messages.next()).await,
        };
        match next {
            Ok(Some(Ok(m))) => batch.push(m),
            Ok(Some(Err(e))) => {
                warn!(error = %e, "message stream failed mid-batch; committing what arrived");
                return (batch, true);
            }
            Ok(None) => return (batch, true),
            Err(_) => break,
        }
    }
    (batch, false)
}

/// Waits `delay` unless the run is stopped first (then true).
async fn pause(delay: Duration, stop: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = stop.changed() => true,
    }
}

/// Waits longer after each failure in a row (0.25 s more each, up to 10 s);
/// true if the run was stopped meanwhile.
async fn backoff(failures: u32, stop: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    pause(
        Duration::from_millis(250 * u64::from(failures.min(40))),
        stop,
    )
    .await
}
