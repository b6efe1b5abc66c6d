//! The consume loop of a run: (re)create the consumer from the checkpoint,
//! gather batches, hand them to the processor and the committer, notice a
//! drained stream, a stalled delivery or a replay's hand-off request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::FutureExt;
use tracing::{info, warn};

use super::commit::{BatchOutput, InFlight, commit, settle};
use super::processor::{Incoming, Processor};
use super::restore::open_state;
use super::{RunOptions, RunSummary, RuntimeError};
use crate::config::Settings;
use crate::sink::{alerts, dlq};
use crate::source::jetstream as js_source;
use crate::store::{DataDir, DataDirLock, handoff};

/// [`run`], leaving the data directory's lock in `lock` when it returns
/// (a replay keeps it until it has switched directories).
pub async fn run_with_lock(
    opts: &RunOptions,
    mut stop: tokio::sync::watch::Receiver<bool>,
    lock: &mut Option<DataDirLock>,
) -> Result<RunSummary, RuntimeError> {
    let started = Instant::now();
    let data_dir = DataDir::new(&opts.data_dir);
    *lock = Some(data_dir.lock()?);
    let settings = Settings::load(data_dir.settings_path(opts.config.as_deref()).as_deref())?;
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
        &data_dir,
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
            if opts.serve_handoff && handoff::requested(&data_dir) {
                settle(&mut in_flight, &mut summary, opts).await?;
                if handoff::serve(&data_dir, p.checkpoint.last_seq, lock, opts.handoff_timeout)
                    .await?
                {
                    p = open_state(
                        &data_dir,
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
                    data_dir.clone(),
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
    p.compact(&data_dir)?;
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
