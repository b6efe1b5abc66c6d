//! `tally run`: consume the stream and keep every view, until stopped; the
//! runtime does the work, this file turns the command line into its
//! options.

use std::path::PathBuf;
use std::time::Duration;

use super::{CommandError, Globals, PartitionArgs};
use crate::runtime::{self, RunOptions};
use crate::source::jetstream as js;

/// The arguments of `tally run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Exit 0 once every message is processed and durable and nothing new arrived for ~1 s.
    #[arg(long, env = "TALLY_RUN_UNTIL_IDLE")]
    pub(crate) until_idle: bool,
    /// Settings that change results (TOML); default `<data>/tally.toml` if present.
    #[arg(long, env = "TALLY_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Most messages per batch (one Parquet file per view and one checkpoint per batch; a batch is also cut after --batch-wait-ms).
    #[arg(long, env = "TALLY_BATCH_SIZE", default_value_t = runtime::DEFAULT_BATCH_SIZE)]
    pub(crate) batch_size: usize,
    /// Milliseconds to wait for a batch to fill once it has started.
    #[arg(long, env = "TALLY_BATCH_WAIT_MS", default_value_t = runtime::DEFAULT_BATCH_WAIT_MS)]
    pub(crate) batch_wait_ms: u64,
    /// Durable consumer name; default `tally-<hash of the --data path>`, one per data directory.
    #[arg(long, env = "TALLY_CONSUMER")]
    pub(crate) consumer: Option<String>,
    /// Go on past messages the stream no longer holds (retention, a purge, a deletion), recording each gap in the checkpoint, instead of stopping.
    #[arg(long, env = "TALLY_RUN_ACCEPT_GAP")]
    pub(crate) accept_gap: bool,
    /// Dead-letter stream name.
    #[arg(long, env = "TALLY_DLQ_STREAM", default_value = js::DEFAULT_DLQ_STREAM)]
    pub(crate) dlq_stream: String,
    /// Print a JSON summary line on stdout at exit (used by `tally bench`).
    #[arg(long, hide = true)]
    pub(crate) summary_json: bool,
    /// Serve Prometheus metrics of the pipeline at http://ADDR/metrics (off by default; no login, so bind it where only your scraper reaches).
    #[arg(long, env = "TALLY_METRICS_LISTEN")]
    pub(crate) metrics_listen: Option<std::net::SocketAddr>,
    /// If another run holds the data location, wait and take over when it stops (a lock file locally; a lease in object storage, taken over once unrenewed for 15 s) instead of failing.
    #[arg(long, env = "TALLY_STANDBY")]
    pub(crate) standby: bool,
    #[command(flatten)]
    pub(crate) partitions: PartitionArgs,
}

/// `tally run`, from the command line.
pub(crate) async fn command(g: &Globals, a: &RunArgs) -> Result<(), CommandError> {
    let RunArgs {
        until_idle,
        config,
        batch_size,
        batch_wait_ms,
        consumer,
        accept_gap,
        dlq_stream,
        summary_json,
        metrics_listen,
        standby,
        partitions,
    } = a;
    if *batch_size == 0 {
        return Err(CommandError::Usage(
            "--batch-size must be at least 1".into(),
        ));
    }
    let owned = partitions.resolve(&g.data).await?;
    if owned.len() > 1 && (consumer.is_some() || metrics_listen.is_some()) {
        return Err(CommandError::Usage(
            "--consumer and --metrics-listen name one run: with several partitions in one process, leave them out (each partition derives its consumer from its location), or run one process per partition".into(),
        ));
    }
    let config = partitions.settings(&g.data, config.as_ref());
    let metrics = match (metrics_listen, owned.first()) {
        (Some(addr), Some((_, data))) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|cause| CommandError::MetricsListen { addr: *addr, cause })?;
            let m = std::sync::Arc::new(runtime::metrics::RunMetrics::default());
            tokio::spawn(runtime::metrics::serve(
                listener,
                std::sync::Arc::clone(&m),
                data.clone(),
                g.nats.clone(),
                g.stream.clone(),
                runtime::shutdown_signal(),
            ));
            Some(m)
        }
        _ => None,
    };
    let runs: Vec<RunOptions> = owned
        .into_iter()
        .map(|(partition, data)| {
            let consumer = consumer
                .clone()
                .unwrap_or_else(|| crate::store::DataDir::new(&data).consumer_name());
            let mut source = g.source_config(Some(&consumer), Some(dlq_stream));
            // The first worker of a deployment creates a stream that
            // delivers each worker only its own messages.
            source.stream_partitions = source
                .stream_partitions
                .or(partition.map(|p| p.count).filter(|n| *n > 1));
            RunOptions {
                partition,
                metrics: metrics.clone(),
                standby: *standby,
                until_idle: *until_idle,
                accept_gap: *accept_gap,
                batch_size: *batch_size,
                batch_wait: Duration::from_millis(*batch_wait_ms),
                ..RunOptions::live(data, source, config.clone())
            }
        })
        .collect();
    // Several partitions run side by side, each a run of its own; the
    // first to fail stops the process (the others stop as at a crash:
    // nothing unacknowledged is lost).
    let stop = runtime::shutdown_signal();
    let summaries =
        futures::future::try_join_all(runs.iter().map(|opts| runtime::run(opts, stop.clone())))
            .await?;
    for summary in summaries {
        if *summary_json {
            println!(
                "{}",
                serde_json::json!({
                    "messages": summary.messages,
                    "batches": summary.batches,
                    "last_seq": summary.last_seq,
                    "active_secs": summary.active.as_secs_f64(),
                    "elapsed_secs": summary.elapsed.as_secs_f64(),
                })
            );
        }
    }
    Ok(())
}
