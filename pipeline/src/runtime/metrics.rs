//! What `tally run --metrics-listen ADDR` shows: Prometheus text about the
//! pipeline, from counters the run updates once per durable batch (never
//! per message) and from what is read when scraped (the stream's last
//! sequence from NATS, the view files' size, the process's peak memory).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::store::checkpoint::Checkpoint;

/// Upper bounds (seconds) of the batch commit duration buckets.
const BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// No value yet.
const NONE: i64 = i64::MIN;

/// The run's counters, shared with the metrics listener.
#[derive(Debug)]
pub struct RunMetrics {
    checkpoint_seq: AtomicU64,
    stream_clock_us: AtomicI64,
    accepted: AtomicU64,
    duplicate: AtomicU64,
    gap_messages: AtomicU64,
    dead_lettered: Mutex<BTreeMap<String, u64>>,
    batches: AtomicU64,
    messages: AtomicU64,
    /// Non-cumulative; the last is +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    commit_us: AtomicU64,
    dedup_entries: AtomicU64,
}

impl Default for RunMetrics {
    fn default() -> RunMetrics {
        RunMetrics {
            checkpoint_seq: AtomicU64::new(0),
            stream_clock_us: AtomicI64::new(NONE),
            accepted: AtomicU64::new(0),
            duplicate: AtomicU64::new(0),
            gap_messages: AtomicU64::new(0),
            dead_lettered: Mutex::new(BTreeMap::new()),
            batches: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            buckets: Default::default(),
            commit_us: AtomicU64::new(0),
            dedup_entries: AtomicU64::new(0),
        }
    }
}

impl RunMetrics {
    /// A batch ending at `checkpoint` is durable; committing it took `took`.
    pub fn durable(&self, checkpoint: &Checkpoint, messages: u64, took: Duration) {
        let c = &checkpoint.counts;
        self.checkpoint_seq
            .store(checkpoint.last_seq, Ordering::Relaxed);
        self.stream_clock_us.store(
            checkpoint.stream_clock_us.unwrap_or(NONE),
            Ordering::Relaxed,
        );
        self.accepted.store(c.accepted, Ordering::Relaxed);
        self.duplicate.store(c.duplicate, Ordering::Relaxed);
        self.gap_messages.store(
            checkpoint.gaps.iter().map(|g| g.messages).sum(),
            Ordering::Relaxed,
        );
        if let Ok(mut d) = self.dead_lettered.lock() {
            d.clone_from(&c.dead_lettered);
        }
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.messages.fetch_add(messages, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.commit_us.fetch_add(
            took.as_micros().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    /// Entries in the dedup horizon now.
    pub fn dedup_entries(&self, n: usize) {
        self.dedup_entries.store(n as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(
        &self,
        stream_last_seq: Option<u64>,
        view_bytes: u64,
        peak_rss: Option<u64>,
    ) -> String {
        let mut w = String::new();
        let mut gauge = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                w,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let checkpoint = self.checkpoint_seq.load(Ordering::Relaxed);
        gauge(
            "tally_checkpoint_sequence",
            "gauge",
            "Last stream sequence the durable views cover.",
            checkpoint.to_string(),
        );
        if let Some(last) = stream_last_seq {
            gauge(
                "tally_stream_last_sequence",
                "gauge",
                "Last sequence in the event stream.",
                last.to_string(),
            );
            gauge(
                "tally_lag_messages",
                "gauge",
                "Stream messages after the checkpoint.",
                last.saturating_sub(checkpoint).to_string(),
            );
        }
        let clock = self.stream_clock_us.load(Ordering::Relaxed);
        if clock != NONE {
            gauge(
                "tally_stream_clock_seconds",
                "gauge",
                "Stream clock (latest accepted event time), Unix seconds.",
                (clock as f64 / 1e6).to_string(),
            );
        }
        gauge(
            "tally_messages_accepted_total",
            "counter",
            "Messages accepted into the views.",
            self.accepted.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            "tally_messages_duplicate_total",
            "counter",
            "Messages dropped as duplicates.",
            self.duplicate.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            "tally_gap_messages",
            "gauge",
            "Stream messages recorded as gaps.",
            self.gap_messages.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            "tally_dedup_horizon_entries",
            "gauge",
            "Events remembered for dedup: those inside the horizon, and those past it until the next sweep.",
            self.dedup_entries.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            "tally_view_files_bytes",
            "gauge",
            "Bytes of the view files in the data directory.",
            view_bytes.to_string(),
        );
        if let Some(rss) = peak_rss {
            gauge(
                "tally_process_peak_resident_bytes",
                "gauge",
                "Peak resident memory of the process (VmHWM).",
                rss.to_string(),
            );
        }
        gauge(
            "tally_batches_total",
            "counter",
            "Batches made durable by this run.",
            self.batches.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            "tally_batch_messages_total",
            "counter",
            "Messages in the batches made durable by this run.",
            self.messages.load(Ordering::Relaxed).to_string(),
        );
        let _ = writeln!(
            w,
            "# HELP tally_messages_dead_lettered_total Messages sent to the dead-letter stream, by reason.\n# TYPE tally_messages_dead_lettered_total counter"
        );
        if let Ok(d) = self.dead_lettered.lock() {
            for (reason, n) in d.iter() {
                let _ = writeln!(
                    w,
                    "tally_messages_dead_lettered_total{{reason=\"{reason}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            w,
            "# HELP tally_batch_commit_seconds Time from handing a batch to the writer to its being durable.\n# TYPE tally_batch_commit_seconds histogram"
        );
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                w,
                "tally_batch_commit_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.buckets[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            w,
            "tally_batch_commit_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            w,
            "tally_batch_commit_seconds_sum {}",
            self.commit_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(w, "tally_batch_commit_seconds_count {cumulative}");
        w
    }
}

/// Bytes of the `.parquet` files under `data_dir`'s view directories.
fn view_bytes(data_dir: &Path) -> u64 {
    let Ok(views) = std::fs::read_dir(data_dir.join("views")) else {
        return 0;
    };
    views
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten())
        .filter(|f| f.path().extension().is_some_and(|x| x == "parquet"))
        .filter_map(|f| f.metadata().ok().map(|m| m.len()))
        .sum()
}

/// The process's peak resident memory (`VmHWM`), where Linux says it.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

struct Listener {
    metrics: Arc<RunMetrics>,
    data_dir: PathBuf,
    stream: crate::source::jetstream::StreamWatch,
}

/// Serves `GET /metrics` on `listener` (no login: bind it where only the
/// scraper reaches) until `stop` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<RunMetrics>,
    data_dir: PathBuf,
    nats_url: String,
    stream: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    use axum::routing::get;
    let state = Arc::new(Listener {
        metrics,
        data_dir,
        stream: crate::source::jetstream::StreamWatch::new(&nats_url, &stream),
    });
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(
                |axum::extract::State(l): axum::extract::State<Arc<Listener>>| async move {
                    let last = l
                        .stream
                        .last_position(Duration::from_secs(2))
                        .await
                        .ok()
                        .map(|(seq, _)| seq);
                    let dir = l.data_dir.clone();
                    let bytes = tokio::task::spawn_blocking(move || view_bytes(&dir))
                        .await
                        .unwrap_or(0);
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        l.metrics.render(last, bytes, peak_rss()),
                    )
                },
            ),
        )
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}
