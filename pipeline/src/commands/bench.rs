//! `tally bench`: the hot paths, measured against the broker.
//!
//! - **Ingest** (always): publishes N generated events to a dedicated
//!   stream, measures the raw JetStream consume rate of that stream (pull
//!   consumer, AckAll, batches of 10k, no processing), then runs `tally run
//!   --until-idle` as a child process on the same stream from an empty data
//!   directory, and reports both rates, their ratio and the child's peak RSS.
//! - **Replay** (`--replay`): a raw ordered-consumer read of the same stream
//!   against `tally replay --into` (a child), rate ratio and peak RSS; then
//!   the stream is purged and `tally replay --into` reads every sequence
//!   from the run's `events` archive: both whole commands' wall times.
//! - **Operators** (`--operators`): in process, on one core, no broker:
//!   validation alone, then each operator alone, in events/s.
//! - **Shape** (`--tenants N --months M [--no-activity]`): the generated SaaS
//!   instead of `--events`, e.g. 100k tenants' subscription history; or
//!   (`--usage-month`) `--events` usage events of `--tenants` tenants in
//!   one month, each with `dimensions` and a `unique` out of `--uniques`
//!   distinct values.
//! - **Fields** (`--without unique|dimensions`): the ingest again over the
//!   same stream with that field taken out of every usage event: rates and
//!   peak RSS, with against without.
//!
//! Ratios, not absolute rates, are comparable across machines.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use serde::Serialize;

use super::{CommandError, Globals};
use crate::commands::publish::{self, PublishError, PublishOptions};
use crate::generator::{self as generate, GenerateConfig, GenerateError};
use crate::source::jetstream::{self as js_source, SourceError};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("benchmark stream {stream}: {detail}")]
    Stream { stream: String, detail: String },
    #[error("cannot use scratch directory {path}: {source}")]
    Scratch {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`tally run` child failed: {0}")]
    Child(String),
}

#[derive(Debug, Clone)]
pub(crate) struct BenchOptions {
    pub(crate) nats_url: String,
    pub(crate) events: u64,
    pub(crate) seed: u64,
    pub(crate) stream: String,
    pub(crate) prefix: String,
    pub(crate) scratch: PathBuf,
    pub(crate) batch_size: usize,
    /// Generate this many tenants (with `months`) instead of `events` events.
    pub(crate) tenants: Option<u32>,
    pub(crate) months: u32,
    /// Only the billing lifecycle (see [`GenerateConfig::activity`]).
    pub(crate) no_activity: bool,
    /// Also measure `tally replay` against a raw ordered consumer.
    pub(crate) replay: bool,
    /// Also measure validation and each operator alone, in process.
    pub(crate) operators: bool,
    /// Percent of the events to void (0: none): see [`with_voids`].
    pub(crate) voids: f64,
    /// A [`usage_month`] stream with this many distinct `unique` values
    /// instead of the generated SaaS.
    pub(crate) usage_month: Option<u64>,
    /// Take this field out of every usage event.
    pub(crate) without: Option<UsageField>,
}

/// An optional field of `usage.recorded` that `--without` takes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum UsageField {
    Unique,
    Dimensions,
}

impl UsageField {
    fn name(self) -> &'static str {
        match self {
            UsageField::Unique => "unique",
            UsageField::Dimensions => "dimensions",
        }
    }
}

/// Regions and endpoints of [`usage_month`]'s dimensions.
const REGIONS: [&str; 4] = ["us-east", "us-west", "eu-west", "ap-south"];
const ENDPOINTS: [&str; 8] = [
    "/v1/chat",
    "/v1/embed",
    "/v1/search",
    "/v1/files",
    "/v1/users",
    "/v1/batch",
    "/v1/audio",
    "/v1/image",
];

/// A usage-only stream: `events` `api_calls` events of `tenants` tenants
/// (round robin) spread evenly over January 2024 in time order, after the
/// meter (grouped by `region`). Each carries `dimensions` (`region`,
/// `endpoint`) and a `unique` user out of `uniques` distinct values
/// (every value appears once `events` >= `uniques`), unless `without`
/// takes one out.
pub(crate) fn usage_month(
    tenants: u32,
    events: u64,
    uniques: u64,
    without: Option<UsageField>,
) -> Vec<u8> {
    use std::io::Write;
    const START_US: i64 = 1_704_067_200_000_000; // 2024-01-01T00:00:00Z
    const MONTH_US: i64 = 31 * 86_400_000_000;
    let step = MONTH_US / i64::try_from(events.max(1)).unwrap_or(i64::MAX);
    let mut out = Vec::with_capacity(usize::try_from(events).unwrap_or(0) * 260);
    let _ = writeln!(
        out,
        r#"{{"specversion":"1.0","id":"meter-api","source":"tally-bench","type":"catalog.meter_defined","time":"2024-01-01T00:00:00Z","tenant":"_system","data":{{"metric":"api_calls","aggregation":"sum","group_by":["region"]}}}}"#
    );
    let tenants = u64::from(tenants.max(1));
    for i in 0..events {
        let t = i % tenants + 1;
        let time = START_US + step * i64::try_from(i).unwrap_or(0);
        let q = 1 + (i * 7919) % 100;
        let _ = write!(
            out,
            r#"{{"specversion":"1.0","id":"u{i}","source":"tally-bench","type":"usage.recorded","time":"{}","tenant":"t{t:05}","data":{{"metric":"api_calls","quantity":{q}"#,
            crate::event::time::format_micros(time)
        );
        if without != Some(UsageField::Dimensions) {
            let region = REGIONS[usize::try_from(t % 4).unwrap_or(0)];
            let endpoint = ENDPOINTS[usize::try_from(i % 8).unwrap_or(0)];
            let _ = write!(
                out,
                r#","dimensions":{{"region":"{region}","endpoint":"{endpoint}"}}"#
            );
        }
        if without != Some(UsageField::Unique) {
            // 2654435761 is prime, so i -> i * 2654435761 mod uniques
            // visits every value.
            let _ = write!(
                out,
                r#","unique":"user-{}""#,
                (i.wrapping_mul(2_654_435_761)) % uniques.max(1)
            );
        }
        out.extend_from_slice(b"}}\n");
    }
    out
}

/// `lines` with `field` taken out of every `usage.recorded` event.
pub(crate) fn without_field(lines: &[u8], field: UsageField) -> Vec<u8> {
    let mut out = Vec::with_capacity(lines.len());
    for line in lines.split_inclusive(|b| *b == b'\n') {
        if line.windows(16).any(|w| w == b"\"usage.recorded\"")
            && let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(line)
            && let Some(data) = v.get_mut("data").and_then(|d| d.as_object_mut())
            && data.remove(field.name()).is_some()
        {
            out.extend_from_slice(v.to_string().as_bytes());
            out.push(b'\n');
        } else {
            out.extend_from_slice(line);
        }
    }
    out
}

#[derive(Debug, Serialize)]
pub(crate) struct BenchReport {
    pub(crate) events: u64,
    pub(crate) publish_per_s: f64,
    pub(crate) raw_consume_per_s: f64,
    pub(crate) tally_run_per_s: f64,
    pub(crate) ratio: f64,
    pub(crate) replay: Option<ReplayBench>,
    pub(crate) operators: Option<OperatorsBench>,
    pub(crate) tally_peak_rss_mib: f64,
}

/// `tally replay` against a raw ordered-consumer read of the same stream,
/// then `tally replay` of the same sequences from the `events` archive
/// once the stream was purged completely.
#[derive(Debug, Serialize)]
pub(crate) struct ReplayBench {
    pub(crate) raw_ordered_per_s: f64,
    pub(crate) tally_replay_per_s: f64,
    pub(crate) ratio: f64,
    pub(crate) peak_rss_mib: f64,
    /// The whole `tally replay` command, start to exit, from the stream.
    pub(crate) stream_wall_secs: f64,
    /// The same with the stream purged: every sequence from the archive.
    pub(crate) archive_wall_secs: f64,
    /// Stream sequences per second of wall time, from the archive.
    pub(crate) archive_per_s: f64,
    /// Archive replay rate / stream replay rate, both whole commands.
    pub(crate) archive_vs_stream: f64,
    pub(crate) archive_peak_rss_mib: f64,
}

/// In-process rates on one core, no broker.
#[derive(Debug, Serialize)]
pub(crate) struct OperatorsBench {
    pub(crate) events: u64,
    /// Envelope and `data` validation into typed events.
    pub(crate) validate_per_s: f64,
    /// (view, events/s) of each operator alone: apply + rows every 10k events.
    pub(crate) operators: Vec<(String, f64)>,
    /// This process's peak RSS after holding every event and operator state.
    pub(crate) peak_rss_mib: f64,
}

/// Peak resident set size (VmHWM) of a process, in KiB.
pub(crate) fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn scratch_err(path: &Path) -> impl Fn(std::io::Error) -> BenchError + '_ {
    move |source| BenchError::Scratch {
        path: path.to_path_buf(),
        source,
    }
}

/// `lines` (JSON Lines) with voids of `pct` percent of the usage events,
/// picked uniformly (so spread over the whole history): half sent just
/// before their target, half at a uniformly random later position.
pub(crate) fn with_voids(lines: &[u8], pct: f64, seed: u64) -> Vec<u8> {
    let lines: Vec<&[u8]> = lines.split_inclusive(|b| *b == b'\n').collect();
    let mut rng = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: u64| {
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (rng >> 33) % n.max(1)
    };
    let every = (100.0 / pct).round().max(1.0) as u64;
    // Where each void goes: before line i (its target) or after line j.
    let mut before: Vec<Option<Vec<u8>>> = vec![None; lines.len()];
    let mut after: Vec<Vec<Vec<u8>>> = vec![Vec::new(); lines.len()];
    let mut n = 0u64;
    for (i, line) in lines.iter().enumerate() {
        if !line.windows(16).any(|w| w == b"\"usage.recorded\"") || next(every) != 0 {
            continue;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        n += 1;
        let void = serde_json::json!({
            "specversion": "1.0",
            "id": format!("bench-void-{n}"),
            "source": "billing-ops",
            "type": "event.voided",
            "time": v["time"],
            "tenant": v["tenant"],
            "data": {"target_source": v["source"], "target_id": v["id"], "reason": "bench"},
        });
        let mut text = void.to_string().into_bytes();
        text.push(b'\n');
        if n.is_multiple_of(2) {
            before[i] = Some(text);
        } else {
            let j = i + next((lines.len() - i) as u64) as usize;
            after[j.min(lines.len() - 1)].push(text);
        }
    }
    let mut out = Vec::with_capacity(lines.iter().map(|l| l.len()).sum::<usize>() * 101 / 100);
    for (i, line) in lines.iter().enumerate() {
        if let Some(v) = &before[i] {
            out.extend_from_slice(v);
        }
        out.extend_from_slice(line);
        for v in &after[i] {
            out.extend_from_slice(v);
        }
    }
    out
}

/// Runs the benchmark; `tally` is the binary to run as the child.
/// The ingest figures of one `run`, the publish rate with `publish`.
fn print_ingest(r: &BenchReport, publish: bool) {
    println!("events               {}", r.events);
    if publish {
        println!("publish              {:>10.0} msg/s", r.publish_per_s);
    }
    println!("raw consume (AckAll) {:>10.0} msg/s", r.raw_consume_per_s);
    println!("tally run            {:>10.0} msg/s", r.tally_run_per_s);
    println!("ratio                {:>10.3}", r.ratio);
    println!("tally peak RSS       {:>10.1} MiB", r.tally_peak_rss_mib);
}

pub(crate) async fn run(opts: &BenchOptions, tally: &Path) -> Result<BenchReport, BenchError> {
    std::fs::create_dir_all(&opts.scratch).map_err(scratch_err(&opts.scratch))?;
    // 1. Generate: ~80 events per tenant-month, 12 months; or the shape asked for.
    let events_file = opts.scratch.join("events.jsonl");
    let cfg = GenerateConfig {
        tenants: opts
            .tenants
            .unwrap_or_else(|| u32::try_from((opts.events / 900).max(1)).unwrap_or(u32::MAX)),
        months: if opts.tenants.is_some() {
            opts.months
        } else {
            12
        },
        seed: opts.seed,
        // Early enough that 24 months of history end in the past: events
        // after the publish time (+1 h) would be dead-lettered.
        start_year: 2024,
        start_month: 1,
        source: "tally-bench".into(),
        activity: !opts.no_activity,
    };
    let mut kept = if let Some(uniques) = opts.usage_month {
        usage_month(
            opts.tenants.unwrap_or(10_000),
            opts.events,
            uniques,
            opts.without,
        )
    } else {
        let mut all = Vec::new();
        generate::generate(&cfg, &mut all)?;
        let limit = match opts.tenants {
            Some(_) => usize::MAX,
            None => usize::try_from(opts.events).unwrap_or(usize::MAX),
        };
        let mut kept = Vec::with_capacity(all.len());
        for line in all.split_inclusive(|b| *b == b'\n').take(limit) {
            kept.extend_from_slice(line);
        }
        match opts.without {
            Some(field) => without_field(&kept, field),
            None => kept,
        }
    };
    if opts.voids > 0.0 {
        kept = with_voids(&kept, opts.voids, opts.seed);
    }
    let events = kept.iter().filter(|b| **b == b'\n').count() as u64;
    std::fs::write(&events_file, &kept).map_err(scratch_err(&events_file))?;
    drop(kept);

    // 2. A fresh stream.
    let client = js_source::connect(&opts.nats_url).await?;
    let js = jetstream::new(client);
    let serr = |detail: String| BenchError::Stream {
        stream: opts.stream.clone(),
        detail,
    };
    let _ = js.delete_stream(&opts.stream).await;
    let s = js
        .create_stream(stream::Config {
            name: opts.stream.clone(),
            subjects: vec![format!("{}.>", opts.prefix)],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| serr(e.to_string()))?;

    // 3. Publish.
    let started = Instant::now();
    let file = std::fs::File::open(&events_file).map_err(scratch_err(&events_file))?;
    let popts = PublishOptions {
        prefix: opts.prefix.clone(),
        allow_invalid: false,
        window: publish::MAX_WINDOW,
        print_problems: false,
    };
    let report = publish::publish(&js, std::io::BufReader::new(file), &popts).await?;
    let publish_per_s = report.published as f64 / started.elapsed().as_secs_f64();
    let stored = report.published - report.duplicates;

    // 4. Raw consume: pull, AckAll, batch 10k, no processing.
    let raw = s
        .create_consumer(consumer::pull::Config {
            durable_name: Some("bench-raw".into()),
            ack_policy: consumer::AckPolicy::All,
            max_ack_pending: 100_000,
            ..Default::default()
        })
        .await
        .map_err(|e| serr(e.to_string()))?;
    let started = Instant::now();
    let mut msgs = raw
        .stream()
        .max_messages_per_batch(10_000)
        .messages()
        .await
        .map_err(|e| serr(e.to_string()))?;
    let mut seen = 0u64;
    while seen < stored {
        match tokio::time::timeout(Duration::from_secs(10), msgs.next()).await {
            Ok(Some(Ok(m))) => {
                seen += 1;
                if seen.is_multiple_of(10_000) || seen == stored {
                    m.ack().await.map_err(|e| serr(e.to_string()))?;
                }
            }
            Ok(Some(Err(e))) => return Err(serr(e.to_string())),
            Ok(None) | Err(_) => {
                return Err(serr(format!(
                    "raw consume stalled after {seen} of {stored} messages"
                )));
            }
        }
    }
    let raw_consume_per_s = seen as f64 / started.elapsed().as_secs_f64();
    drop(msgs);

    // 5. tally run --until-idle, as a child, from an empty data directory.
    let data = opts.scratch.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let (summary, peak) = child(
        tally,
        opts,
        &data,
        &[
            "run",
            "--until-idle",
            "--summary-json",
            "--batch-size",
            &opts.batch_size.to_string(),
        ],
    )
    .await?;
    let tally_run_per_s = rate(&summary);

    // 6. Replay: raw ordered consumer, then `tally replay --into`.
    let replay = if opts.replay {
        let started = Instant::now();
        let ordered = s
            .create_consumer(consumer::pull::OrderedConfig::default())
            .await
            .map_err(|e| serr(e.to_string()))?;
        let mut msgs = ordered.messages().await.map_err(|e| serr(e.to_string()))?;
        let mut seen = 0u64;
        while seen < stored {
            match tokio::time::timeout(Duration::from_secs(10), msgs.next()).await {
                Ok(Some(Ok(_))) => seen += 1,
                Ok(Some(Err(e))) => return Err(serr(e.to_string())),
                Ok(None) | Err(_) => {
                    return Err(serr(format!(
                        "ordered read stalled after {seen} of {stored} messages"
                    )));
                }
            }
        }
        let raw_ordered_per_s = seen as f64 / started.elapsed().as_secs_f64();
        drop(msgs);
        let (summary, peak, stream_wall_secs) =
            timed_replay(tally, opts, &data, "replayed").await?;
        let tally_replay_per_s = rate(&summary);
        // The stream forgets everything: the replay reads the archive.
        s.purge().await.map_err(|e| serr(e.to_string()))?;
        let (_, archive_peak, archive_wall_secs) =
            timed_replay(tally, opts, &data, "replayed-from-archive").await?;
        Some(ReplayBench {
            raw_ordered_per_s,
            tally_replay_per_s,
            ratio: tally_replay_per_s / raw_ordered_per_s,
            peak_rss_mib: peak as f64 / 1024.0,
            stream_wall_secs,
            archive_wall_secs,
            archive_per_s: stored as f64 / archive_wall_secs,
            archive_vs_stream: stream_wall_secs / archive_wall_secs,
            archive_peak_rss_mib: archive_peak as f64 / 1024.0,
        })
    } else {
        None
    };

    // 7. Validation and each operator alone, in process.
    let operators = if opts.operators {
        Some(operators_bench(&events_file, &opts.prefix)?)
    } else {
        None
    };
    let _ = js.delete_stream(&opts.stream).await;
    Ok(BenchReport {
        events,
        publish_per_s,
        raw_consume_per_s,
        tally_run_per_s,
        ratio: tally_run_per_s / raw_consume_per_s,
        replay,
        operators,
        tally_peak_rss_mib: peak as f64 / 1024.0,
    })
}

/// `tally replay --into <scratch>/<name>` of `data` as a child: its summary,
/// peak RSS (KiB) and the whole command's wall time (s).
async fn timed_replay(
    tally: &Path,
    opts: &BenchOptions,
    data: &Path,
    name: &str,
) -> Result<(serde_json::Value, u64, f64), BenchError> {
    let into = opts.scratch.join(name);
    let _ = std::fs::remove_dir_all(&into);
    let into = into.to_string_lossy().into_owned();
    let batch = opts.batch_size.to_string();
    let started = Instant::now();
    let (summary, peak) = child(
        tally,
        opts,
        data,
        &[
            "replay",
            "--summary-json",
            "--into",
            &into,
            "--batch-size",
            &batch,
        ],
    )
    .await?;
    Ok((summary, peak, started.elapsed().as_secs_f64()))
}

/// Messages per second of active work in a child's `--summary-json` line.
fn rate(summary: &serde_json::Value) -> f64 {
    let active = summary["active_secs"].as_f64().unwrap_or(f64::NAN);
    summary["messages"].as_f64().unwrap_or(0.0) / active
}

/// Runs `tally <global options> <args>` as a child on the bench stream;
/// returns its `--summary-json` line and its peak RSS in KiB.
async fn child(
    tally: &Path,
    opts: &BenchOptions,
    data: &Path,
    args: &[&str],
) -> Result<(serde_json::Value, u64), BenchError> {
    let mut child = tokio::process::Command::new(tally)
        .args([
            "--nats",
            &opts.nats_url,
            "--stream",
            &opts.stream,
            "--subject-prefix",
            &opts.prefix,
            "--data",
        ])
        .arg(data)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| BenchError::Child(e.to_string()))?;
    let pid = child.id().unwrap_or(0);
    let mut peak = 0u64;
    let stdout = child.stdout.take();
    let reader = tokio::spawn(async move {
        let mut buf = String::new();
        if let Some(mut out) = stdout {
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut out, &mut buf).await;
        }
        buf
    });
    let status = loop {
        if let Some(kib) = peak_rss_kib(pid) {
            peak = peak.max(kib);
        }
        match tokio::time::timeout(Duration::from_millis(50), child.wait()).await {
            Ok(r) => break r.map_err(|e| BenchError::Child(e.to_string()))?,
            Err(_) => continue,
        }
    };
    let out = reader.await.unwrap_or_default();
    if !status.success() {
        return Err(BenchError::Child(format!("{args:?} exited with {status}")));
    }
    let summary = out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| BenchError::Child(format!("no summary on stdout: {out:?}")))?;
    Ok((summary, peak))
}

/// Validation, then each operator alone over the same events, on this
/// thread: the CPU cost of the hot path without the broker.
/// The non-empty lines of an events file, and the subject a producer
/// would publish each to (computed here, outside any timing).
fn lines_and_subjects(
    events_file: &Path,
    prefix: &str,
) -> Result<(Vec<bytes::Bytes>, Vec<String>), BenchError> {
    let text = std::fs::read(events_file).map_err(scratch_err(events_file))?;
    let lines: Vec<bytes::Bytes> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    let subjects = lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_slice(l).unwrap_or_default();
            crate::event::subject_for(
                prefix,
                v["tenant"].as_str().unwrap_or_default(),
                v["type"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    Ok((lines, subjects))
}

pub(crate) fn operators_bench(
    events_file: &Path,
    prefix: &str,
) -> Result<OperatorsBench, BenchError> {
    let (lines, subjects) = lines_and_subjects(events_file, prefix)?;
    // Publish time far ahead, so nothing is "in the future" here, and no
    // age limit, so nothing is too old either.
    let limits = crate::event::Limits {
        max_event_age_us: i64::MAX,
        ..crate::event::Limits::default()
    };
    let started = Instant::now();
    let mut events = Vec::with_capacity(lines.len());
    for (i, (line, subject)) in lines.iter().zip(&subjects).enumerate() {
        if let Ok(e) = crate::event::validate_message(
            line,
            subject,
            prefix,
            i as u64 + 1,
            i64::MAX / 2,
            &limits,
        ) {
            events.push(e);
        }
    }
    let validate_per_s = lines.len() as f64 / started.elapsed().as_secs_f64();
    let settings = crate::config::Settings::default();
    let mut operators = Vec::new();
    for mut op in crate::operator::registry(&settings) {
        let started = Instant::now();
        for (i, chunk) in events.chunks(10_000).enumerate() {
            for e in chunk {
                op.apply(e);
            }
            op.take_rows(i as u64)
                .map_err(|e| BenchError::Child(e.to_string()))?;
        }
        let per_s = events.len() as f64 / started.elapsed().as_secs_f64();
        operators.push((op.view().to_owned(), per_s));
    }
    let peak = peak_rss_kib(std::process::id()).unwrap_or(0);
    Ok(OperatorsBench {
        events: events.len() as u64,
        validate_per_s,
        operators,
        peak_rss_mib: peak as f64 / 1024.0,
    })
}

/// The synchronous core in process, on both cores, with no broker and no
/// storage: `Processor::process_batch` (validation, dedup, the ledger,
/// every operator, restatements) over batches of `batch` messages, and
/// each batch's rows cut (`take_rows`) but not written. Returns (events,
/// events/s).
pub(crate) fn processor_bench(
    events_file: &Path,
    prefix: &str,
    batch: usize,
) -> Result<(u64, f64), BenchError> {
    use crate::runtime::processor::{Incoming, Processor};
    let (lines, subjects) = lines_and_subjects(events_file, prefix)?;
    let settings = crate::config::Settings {
        max_event_age_us: i64::MAX,
        ..crate::config::Settings::default()
    };
    let checkpoint = crate::store::checkpoint::Checkpoint::new("BENCH", "", &settings);
    let mut p = Processor::new(&settings, prefix, checkpoint);
    p.set_live(false);
    let started = Instant::now();
    for (c, chunk) in lines.chunks(batch.max(1)).enumerate() {
        let first = c * batch.max(1);
        let msgs: Vec<Incoming<'_>> = chunk
            .iter()
            .enumerate()
            .map(|(i, payload)| Incoming {
                stream_seq: (first + i) as u64 + 1,
                published_at: i64::MAX / 2,
                subject: subjects.get(first + i).map_or("", String::as_str),
                payload,
            })
            .collect();
        p.process_batch(&msgs);
        p.take_rows()
            .map_err(|e| BenchError::Child(e.to_string()))?;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok((lines.len() as u64, lines.len() as f64 / secs))
}

/// The arguments of `tally bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 1_000_000, env = "TALLY_BENCH_EVENTS")]
    pub(crate) events: u64,
    #[arg(long, default_value_t = 7, env = "TALLY_BENCH_SEED")]
    pub(crate) seed: u64,
    #[arg(long, default_value_t = 50_000, env = "TALLY_BENCH_BATCH_SIZE")]
    pub(crate) batch_size: usize,
    /// Scratch directory (generated events, the run's data dir).
    #[arg(long, default_value = "./tally-bench", env = "TALLY_BENCH_SCRATCH")]
    pub(crate) scratch: PathBuf,
    /// Generate this many tenants (over --months) instead of --events events.
    #[arg(long, env = "TALLY_BENCH_TENANTS")]
    pub(crate) tenants: Option<u32>,
    #[arg(long, default_value_t = 12, env = "TALLY_BENCH_MONTHS")]
    pub(crate) months: u32,
    /// Only the billing lifecycle: subscriptions and invoices, no usage.
    #[arg(long, env = "TALLY_BENCH_NO_ACTIVITY")]
    pub(crate) no_activity: bool,
    /// Also measure `tally replay` against a raw ordered consumer.
    #[arg(long, env = "TALLY_BENCH_REPLAY")]
    pub(crate) replay: bool,
    /// Also measure validation and each operator alone (in process, one core).
    #[arg(long, env = "TALLY_BENCH_OPERATORS")]
    pub(crate) operators: bool,
    /// Only that in-process measurement, over an events file (no broker).
    #[arg(long, hide = true, value_name = "EVENTS_FILE")]
    pub(crate) operators_only: Option<PathBuf>,
    /// Only the synchronous core (validation, dedup, ledger, operators),
    /// in process on both cores, over an events file (no broker, no storage).
    #[arg(long, hide = true, value_name = "EVENTS_FILE")]
    pub(crate) processor_only: Option<PathBuf>,
    /// Also run the ingest over the same stream with this percent of its
    /// usage events voided (half before their targets, half after), and
    /// report the rate against the stream without voids.
    #[arg(long, value_name = "PERCENT", env = "TALLY_BENCH_VOIDS")]
    pub(crate) voids: Option<f64>,
    /// A usage-only stream instead of the generated SaaS: --events
    /// `api_calls` events of --tenants tenants (default 10,000) in one
    /// month, each with `dimensions` and a `unique` out of --uniques values.
    #[arg(long, env = "TALLY_BENCH_USAGE_MONTH")]
    pub(crate) usage_month: bool,
    /// Distinct `unique` values of --usage-month.
    #[arg(long, default_value_t = 1_000_000, env = "TALLY_BENCH_UNIQUES")]
    pub(crate) uniques: u64,
    /// Also run the ingest over the same stream with this field taken out
    /// of every usage event, and report rates and peak RSS against it.
    #[arg(long, value_enum, env = "TALLY_BENCH_WITHOUT")]
    pub(crate) without: Option<UsageField>,
}

/// `tally bench`, from the command line.
pub(crate) async fn command(g: &Globals, a: &BenchArgs) -> Result<(), CommandError> {
    let BenchArgs {
        events,
        seed,
        batch_size,
        scratch,
        tenants,
        months,
        no_activity,
        replay,
        operators,
        operators_only,
        processor_only,
        voids,
        usage_month,
        uniques,
        without,
    } = a;
    if let Some(file) = operators_only {
        let o = operators_bench(file, "tally.bench")?;
        print_operators(&o);
        return Ok(());
    }
    if let Some(file) = processor_only {
        let (n, per_s) = processor_bench(file, "tally.bench", *batch_size)?;
        println!("in process, both cores, no broker, no storage, {n} messages:");
        println!("  processor          {per_s:>10.0} messages/s");
        return Ok(());
    }
    let exe = std::env::current_exe().map_err(|source| CommandError::Input {
        what: "own executable path".into(),
        source,
    })?;
    let opts = BenchOptions {
        nats_url: g.nats.clone(),
        events: *events,
        seed: *seed,
        stream: "TALLY_BENCH".into(),
        prefix: "tally.bench".into(),
        scratch: scratch.clone(),
        batch_size: *batch_size,
        tenants: *tenants,
        months: *months,
        no_activity: *no_activity,
        replay: *replay,
        operators: *operators,
        voids: 0.0,
        usage_month: usage_month.then_some(*uniques),
        without: None,
    };
    let r = run(&opts, &exe).await?;
    print_ingest(&r, true);
    if let Some(rp) = &r.replay {
        println!("raw ordered read     {:>10.0} msg/s", rp.raw_ordered_per_s);
        println!("tally replay         {:>10.0} msg/s", rp.tally_replay_per_s);
        println!("replay ratio         {:>10.3}", rp.ratio);
        println!("replay peak RSS      {:>10.1} MiB", rp.peak_rss_mib);
        println!(
            "replay, whole cmd    {:>10.2} s (from the stream)",
            rp.stream_wall_secs
        );
        println!(
            "replay, whole cmd    {:>10.2} s (stream purged: from the archive)",
            rp.archive_wall_secs
        );
        println!("archive replay       {:>10.0} seq/s", rp.archive_per_s);
        println!("archive vs stream    {:>10.2}x", rp.archive_vs_stream);
        println!("archive replay RSS   {:>10.1} MiB", rp.archive_peak_rss_mib);
    }
    if let Some(o) = &r.operators {
        print_operators(o);
    }
    println!("{}", serde_json::to_string(&r).unwrap_or_default());
    if let Some(field) = without {
        let w = run(
            &BenchOptions {
                without: Some(*field),
                replay: false,
                operators: false,
                ..opts.clone()
            },
            &exe,
        )
        .await?;
        println!("without `{}`:", field.name());
        print_ingest(&w, false);
        println!(
            "with / without       {:>10.3} (rates); {:.3} (ratios to raw); {:.3} (peak RSS)",
            r.tally_run_per_s / w.tally_run_per_s,
            r.ratio / w.ratio,
            r.tally_peak_rss_mib / w.tally_peak_rss_mib
        );
        println!("{}", serde_json::to_string(&w).unwrap_or_default());
    }
    if let Some(pct) = voids {
        let v = run(
            &BenchOptions {
                voids: *pct,
                replay: false,
                operators: false,
                ..opts
            },
            &exe,
        )
        .await?;
        println!("with {pct}% of usage voided:");
        print_ingest(&v, false);
        println!(
            "voided / plain run   {:>10.3} (rates); {:.3} (ratios to raw)",
            v.tally_run_per_s / r.tally_run_per_s,
            v.ratio / r.ratio
        );
        println!("{}", serde_json::to_string(&v).unwrap_or_default());
    }
    Ok(())
}

fn print_operators(o: &OperatorsBench) {
    println!("in process, one core, {} events:", o.events);
    println!("  validate           {:>10.0} events/s", o.validate_per_s);
    for (view, per_s) in &o.operators {
        println!("  {view:<18} {per_s:>10.0} events/s");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn validated(lines: &[u8]) -> Vec<crate::event::Event> {
        let limits = crate::event::Limits::default();
        lines
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| crate::event::validate_payload(l, &limits).unwrap())
            .collect()
    }

    #[test]
    fn usage_month_is_valid_and_has_every_unique_value() {
        let events = validated(&usage_month(7, 500, 300, None));
        assert_eq!(events.len(), 501, "the meter and the usage");
        let mut uniques = HashSet::new();
        let mut tenants = HashSet::new();
        for e in &events[1..] {
            let crate::event::Payload::UsageRecorded {
                unique, dimensions, ..
            } = &e.payload
            else {
                panic!("not usage: {e:?}");
            };
            assert!(dimensions.is_some());
            uniques.insert(unique.clone().unwrap().to_string());
            tenants.insert(e.tenant.to_string());
        }
        assert_eq!((uniques.len(), tenants.len()), (300, 7));
        assert!(events.windows(2).all(|w| w[0].time <= w[1].time));
    }

    #[test]
    fn without_takes_the_field_out_of_usage_events_only() {
        let with = usage_month(3, 20, 10, None);
        for field in [UsageField::Unique, UsageField::Dimensions] {
            let stripped = without_field(&with, field);
            assert_eq!(
                validated(&stripped).len(),
                validated(&usage_month(3, 20, 10, Some(field))).len()
            );
            for e in validated(&stripped).iter().skip(1) {
                let crate::event::Payload::UsageRecorded {
                    unique, dimensions, ..
                } = &e.payload
                else {
                    panic!()
                };
                assert_eq!(unique.is_none(), field == UsageField::Unique);
                assert_eq!(dimensions.is_none(), field == UsageField::Dimensions);
            }
        }
    }
}
