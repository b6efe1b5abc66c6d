//! The runtime: the thin async shell that drives the synchronous
//! [`Processor`] over the stream and makes its output durable.
//!
//! Per batch: fetch (pull consumer, large batches) -> validate, dedup, fold
//! (sync) -> make durable (DLQ publishes acked, Parquet renamed into place)
//! -> checkpoint -> ack (AckAll on the batch's last message). A failure in
//! the durable steps keeps the batch unacked and is retried with backoff; a
//! crash at any instant leaves the views equal to the checkpoint's prefix
//! after the next start's recovery.
//!
//! Rooms: [`processor`] (the synchronous core), [`restore`] (loading and
//! checking the data directory's state at start), [`session`] (the consume
//! loop: batches, idle and stall detection, the hand-off), [`decide`] (the
//! loop's decisions as pure functions: where a message falls, what a quiet
//! consumer means), [`commit`]
//! (making one batch durable, then acking it), [`signal`] (SIGINT/SIGTERM).

pub mod commit;
mod decide;
pub mod metrics;
pub mod processor;
pub mod restore;
pub mod session;
mod side;
pub mod signal;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use crate::config::ConfigError;
use crate::event::partition::Partition;
use crate::operator::OperatorError;
use crate::sink::alerts::AlertError;
use crate::sink::dlq::DlqError;
use crate::sink::restated::RestatedError;
use crate::source::jetstream::{SourceConfig, SourceError};
use crate::store::DataDirError;
use crate::store::checkpoint::{CheckpointError, Counts, Gap};
use crate::store::parquet::ViewFilesError;

pub use session::run_with_lock;
pub use signal::shutdown_signal;

/// Most messages per batch: one Parquet file per view and one checkpoint
/// per batch (`--batch-size`).
pub const DEFAULT_BATCH_SIZE: usize = 50_000;
/// How long a batch waits to fill once it has started (`--batch-wait-ms`).
pub const DEFAULT_BATCH_WAIT_MS: u64 = 200;
/// How long the stream must stay quiet for `--until-idle` to exit.
pub const IDLE: Duration = Duration::from_secs(1);
/// How long a live run waits, paused, for a replay to switch directories,
/// and how long a replay waits for a live run to answer
/// (`--handoff-timeout-secs`): one figure for both sides of the hand-off.
pub const HANDOFF_TIMEOUT_SECS: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    ViewFiles(#[from] ViewFilesError),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Dlq(#[from] DlqError),
    #[error(transparent)]
    Alert(#[from] AlertError),
    #[error(transparent)]
    Restated(#[from] RestatedError),
    #[error(transparent)]
    Operator(#[from] OperatorError),
    /// Fatal: the directory folds another part of the stream.
    #[error(
        "data directory {path} holds the views of {}, not of {}; give the --partitions and --partition it was built with, or another --data",
        describe_partition(found),
        describe_partition(wanted)
    )]
    OtherPartition {
        path: PathBuf,
        found: Option<Partition>,
        wanted: Option<Partition>,
    },
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
    /// Fatal: a message is not stored where the stream's transform puts it.
    #[error(
        "message {seq} of stream {stream} is stored under {subject}, not where the stream's subject transform of {partitions} partitions puts it (<prefix>.<partition of its tenant>.<tenant>.<type>): the transform was added or changed after messages were stored, and Tally cannot tell which messages are whose. Use a stream whose transform was set when it was created: create a new one (`tally publish --stream-partitions N` or the first `tally run --partitions N` does) and publish the events to it again"
    )]
    StoredLayout {
        stream: String,
        seq: u64,
        subject: String,
        partitions: u32,
    },
    /// Fatal: the stream's subjects or transform changed while the run
    /// read it.
    #[error(
        "the subjects or subject transform of stream {stream} changed while this run read it (now {now}); stopped with everything up to sequence {checkpoint} durable. A stream's layout must stay as it was created; restore it, or create a new stream and publish the events to it again"
    )]
    StreamChanged {
        stream: String,
        now: String,
        checkpoint: u64,
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
        "stream {stream} no longer holds sequences {first} to {last} ({}), which data directory {path} needs next (retention, a purge or a deleted message removed them); stopped before them, the views and the checkpoint ({checkpoint}) are untouched. To keep the history, give the stream enough retention; to go on without these messages and record the gap for good (`tally status` and the `_tally_gaps` table show it), run again with --accept-gap",
        messages(last - first + 1)
    )]
    Gap {
        stream: String,
        first: u64,
        last: u64,
        path: PathBuf,
        checkpoint: u64,
    },
    #[error(
        "messages of stream {stream} were delivered through consumer {consumer} to another process, again and again: another tally run (or a client) uses the same consumer name; stopped with everything up to sequence {checkpoint} durable. Give every data directory its own --consumer (the default derives one from --data)"
    )]
    ConsumerShared {
        stream: String,
        consumer: String,
        checkpoint: u64,
    },
    #[error(
        "the events archive holds {duplicates} events among sequences {first}..={last} that this replay finds to be duplicates: the archive and the settings disagree; the live views are untouched. Replay from a stream that holds every message, or with the settings the live views were built with"
    )]
    ArchiveDuplicates {
        first: u64,
        last: u64,
        duplicates: u64,
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

/// A partition as an error message names it.
fn describe_partition(p: &Option<Partition>) -> String {
    match p {
        Some(p) => format!("partition {p}"),
        None => "the whole stream (no partitions)".to_owned(),
    }
}

/// Whether a run is `tally run` or a replay. The three behaviours that
/// differ between them always change together, so they are one choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `tally run`: publishes alerts, dead letters and restatements, acks
    /// each batch once durable, and answers a replay's hand-off.
    Live,
    /// A replay: rebuilds views only. It reads through a read-only
    /// consumer and checks deliveries for gaps instead of acking (see
    /// [`crate::source::jetstream::consumer_from`]), and publishes nothing
    /// (the live run did).
    Replay,
}

impl Mode {
    /// Publishes alerts, dead letters and restatements.
    pub fn publishes(self) -> bool {
        self == Mode::Live
    }

    /// Acknowledges each batch once durable (otherwise deliveries are
    /// checked for losses).
    pub fn acks(self) -> bool {
        self == Mode::Live
    }

    /// Answers a `tally replay`'s hand-off between batches (see
    /// [`crate::store::handoff`]).
    pub fn answers_handoff(self) -> bool {
        self == Mode::Live
    }
}

/// How `tally run` behaves (runtime knobs, not results).
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub data_dir: PathBuf,
    /// The partition of a partitioned deployment this run folds (its
    /// `data_dir` is that partition's); `None`: the whole stream.
    pub partition: Option<Partition>,
    pub source: SourceConfig,
    pub config: Option<PathBuf>,
    /// Exit once the stream is drained and quiet for `idle`.
    pub until_idle: bool,
    pub idle: Duration,
    pub batch_size: usize,
    /// How long to wait for more messages once a batch has started.
    pub batch_wait: Duration,
    /// A live run or a replay: what the run publishes, whether it acks,
    /// and whether it answers a replay's hand-off.
    pub mode: Mode,
    /// How long to wait, paused, for the replay to switch directories.
    pub handoff_timeout: Duration,
    /// Wait while another run holds the data location, and take over when
    /// it stops (`--standby`).
    pub standby: bool,
    /// Go on past sequences the stream no longer holds, recording the gap
    /// in the checkpoint (`--accept-gap`), instead of stopping.
    pub accept_gap: bool,
    /// An `events` archive to read the sequences the stream no longer
    /// holds from (a replay's source besides the stream).
    pub archive: Option<ArchiveSource>,
    /// Cut a batch after this sequence and keep the counts there
    /// ([`RunSummary::counts_at_split`]).
    pub split_at: Option<u64>,
    /// Stop once this stream sequence is processed (replay's target).
    pub stop_at: Option<u64>,
    /// The last processed sequence, for a progress display.
    pub position: Option<Arc<AtomicU64>>,
    /// Counters for `--metrics-listen`, updated once per durable batch.
    pub metrics: Option<Arc<metrics::RunMetrics>>,
}

impl RunOptions {
    /// `tally run`'s behaviour with the given knobs.
    pub fn live(data_dir: PathBuf, source: SourceConfig, config: Option<PathBuf>) -> RunOptions {
        RunOptions {
            partition: None,
            data_dir,
            source,
            config,
            until_idle: false,
            idle: IDLE,
            batch_size: DEFAULT_BATCH_SIZE,
            batch_wait: Duration::from_millis(DEFAULT_BATCH_WAIT_MS),
            handoff_timeout: Duration::from_secs(HANDOFF_TIMEOUT_SECS),
            mode: Mode::Live,
            standby: false,
            accept_gap: false,
            archive: None,
            split_at: None,
            stop_at: None,
            position: None,
            metrics: None,
        }
    }
}

/// A data directory whose `events` archive holds what a run processed up
/// to `upto`, with the gaps that run recorded.
#[derive(Debug, Clone)]
pub struct ArchiveSource {
    pub dir: PathBuf,
    pub upto: u64,
    pub gaps: Vec<Gap>,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// The counts once the checkpoint reached [`RunOptions::split_at`].
    pub counts_at_split: Option<Counts>,
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

/// `tally run`.
impl RuntimeError {
    /// Whether retrying cannot help: the run stops at once (wrong
    /// credentials, a missing bucket, another run took the location over).
    pub fn is_fatal(&self) -> bool {
        match self {
            RuntimeError::Checkpoint(CheckpointError::Remote(e))
            | RuntimeError::DataDir(DataDirError::Remote(e)) => e.is_fatal(),
            _ => false,
        }
    }
}

/// `n messages`, or `1 message`.
pub fn messages(n: u64) -> String {
    if n == 1 {
        "1 message".to_owned()
    } else {
        format!("{n} messages")
    }
}

pub async fn run(
    opts: &RunOptions,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<RunSummary, RuntimeError> {
    let mut lock = None;
    run_with_lock(opts, stop, &mut lock).await
}
