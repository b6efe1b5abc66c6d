//! `tally status`: where the stream is, how far Tally got, and what
//! happened to every message so far.
//!
//! The checkpoint and NATS are read independently: when one is missing the
//! other is still shown, and the command fails (exit 1) after printing,
//! saying what is missing, so a script never takes a partial status for a
//! healthy one.

use std::io::Write;
use std::path::{Path, PathBuf};

use async_nats::jetstream;
use serde::Serialize;

use super::{CommandError, Globals};
use crate::source::jetstream::{self as js_source, SourceConfig, SourceError};
use crate::store::checkpoint::{CheckpointError, Counts, Gap};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(
        "no checkpoint in {} (no checkpoint.json), so no views and no counts: is --data / TALLY_DATA_DIR right? `tally run` writes it when it starts",
        dir.display()
    )]
    NoCheckpoint { dir: PathBuf },
    #[error(transparent)]
    Connect(#[from] SourceError),
    #[error(
        "stream {stream} is not on the NATS server at {url} ({cause}): is --stream / TALLY_STREAM right? `tally publish` and `tally run` create it"
    )]
    NoStream {
        stream: String,
        url: String,
        cause: String,
    },
    /// The directory folds another stream, or this one before it was
    /// deleted and created again: `tally run` refuses to resume it.
    #[error(
        "data directory {dir} was built from stream {found} (created {found_created}), not {wanted} (created {wanted_created}): `tally run` will refuse it; use a fresh --data, or `tally replay` to rebuild from this stream"
    )]
    OtherStream {
        dir: PathBuf,
        found: String,
        found_created: String,
        wanted: String,
        wanted_created: String,
    },
    #[error(
        "cannot read the state of stream {stream} at {url}: {cause}; check the server (`nats-server -js`) and try again"
    )]
    StreamInfo {
        stream: String,
        url: String,
        cause: String,
    },
}

impl StatusError {
    /// Whether NATS (not the data directory) is what failed.
    pub(crate) fn is_nats(&self) -> bool {
        matches!(
            self,
            StatusError::Connect(_) | StatusError::NoStream { .. } | StatusError::StreamInfo { .. }
        )
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct Status {
    pub(crate) stream: String,
    /// First and last sequence in the stream, and its message count.
    pub(crate) stream_first_seq: Option<u64>,
    pub(crate) stream_last_seq: Option<u64>,
    pub(crate) stream_messages: Option<u64>,
    /// Messages the durable consumer has not yet delivered, and delivered but unacked.
    pub(crate) consumer_pending: Option<u64>,
    pub(crate) consumer_ack_pending: Option<u64>,
    pub(crate) checkpoint_seq: Option<u64>,
    /// Stream messages after the checkpoint (all of them without one).
    pub(crate) lag: Option<u64>,
    pub(crate) stream_clock: Option<String>,
    /// What happened to the messages up to the checkpoint; none without one.
    pub(crate) counts: Option<Counts>,
    /// Stream sequences the views never saw (`--accept-gap`), for good.
    pub(crate) gaps: Vec<Gap>,
    /// Unprocessed messages the stream's retention is about to drop, or
    /// has dropped.
    pub(crate) warnings: Vec<String>,
}

/// What `tally status` found, and what it could not find out.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) status: Status,
    /// A missing checkpoint, an unreachable server or stream: the status
    /// lacks those parts, and the command fails after printing it.
    pub(crate) problems: Vec<StatusError>,
}

/// Reads the checkpoint, then the stream and consumer. Either may be
/// missing: the status then holds what the other says, and `problems` why
/// the rest is empty. A checkpoint that cannot be read is an error.
pub(crate) async fn status(data_dir: &Path, cfg: &SourceConfig) -> Result<Report, StatusError> {
    let cp = crate::store::read_checkpoint(data_dir).await?;
    let mut problems = Vec::new();
    if cp.is_none() {
        problems.push(StatusError::NoCheckpoint {
            dir: data_dir.to_path_buf(),
        });
    }
    let built_from = cp
        .as_ref()
        .map(|c| (c.stream.clone(), c.stream_created.clone()));
    let mut s = Status {
        stream: cfg.stream.clone(),
        stream_first_seq: None,
        stream_last_seq: None,
        stream_messages: None,
        consumer_pending: None,
        consumer_ack_pending: None,
        checkpoint_seq: cp.as_ref().map(|c| c.last_seq),
        lag: None,
        stream_clock: cp
            .as_ref()
            .and_then(|c| c.stream_clock_us)
            .map(crate::event::time::format_micros),
        gaps: cp.as_ref().map(|c| c.gaps.clone()).unwrap_or_default(),
        counts: cp.map(|c| c.counts),
        warnings: Vec::new(),
    };
    match read_stream(&mut s, cfg).await {
        Ok(created) => {
            if let Some((found, found_created)) = built_from
                && (found != cfg.stream || found_created != created)
            {
                problems.push(StatusError::OtherStream {
                    dir: data_dir.to_path_buf(),
                    found,
                    found_created,
                    wanted: cfg.stream.clone(),
                    wanted_created: created,
                });
            }
        }
        Err(e) => problems.push(e),
    }
    Ok(Report {
        status: s,
        problems,
    })
}

/// Fills the stream and consumer fields from NATS, and returns when the
/// stream was created (as the checkpoint records it). A missing consumer
/// is not a problem: `tally run` creates it on its first start.
async fn read_stream(s: &mut Status, cfg: &SourceConfig) -> Result<String, StatusError> {
    let client = js_source::connect(&cfg.nats_url).await?;
    let js = jetstream::new(client);
    let mut stream = js
        .get_stream(&cfg.stream)
        .await
        .map_err(|e| StatusError::NoStream {
            stream: cfg.stream.clone(),
            url: cfg.nats_url.clone(),
            cause: e.to_string(),
        })?;
    let info = stream
        .info()
        .await
        .cloned()
        .map_err(|e| StatusError::StreamInfo {
            stream: cfg.stream.clone(),
            url: cfg.nats_url.clone(),
            cause: e.to_string(),
        })?;
    s.stream_first_seq = Some(info.state.first_sequence);
    s.stream_last_seq = Some(info.state.last_sequence);
    s.stream_messages = Some(info.state.messages);
    s.lag = Some(
        info.state
            .last_sequence
            .saturating_sub(s.checkpoint_seq.unwrap_or(0)),
    );
    s.warnings = retention_warnings(&stream, &info, s.checkpoint_seq.unwrap_or(0)).await;
    if let Ok(info) = stream.consumer_info(&cfg.consumer).await {
        s.consumer_pending = Some(info.num_pending);
        s.consumer_ack_pending = Some(info.num_ack_pending as u64);
    }
    Ok(info.created.to_rfc3339())
}

/// Share of a retention limit at which unprocessed messages are at risk.
const AT_RISK: f64 = 0.8;

/// What the stream's retention does to the messages after the checkpoint:
/// already dropped some (the next run refuses them), or close to dropping
/// the oldest (its age near `max_age`, the stream near `max_bytes` or
/// `max_msgs`, which drop the oldest first).
async fn retention_warnings(
    stream: &async_nats::jetstream::stream::Stream,
    info: &async_nats::jetstream::stream::Info,
    checkpoint: u64,
) -> Vec<String> {
    let (state, config) = (&info.state, &info.config);
    let mut out = Vec::new();
    if state.last_sequence <= checkpoint {
        return out;
    }
    if state.first_sequence > checkpoint + 1 {
        out.push(format!(
            "the stream no longer holds sequences {} to {} that no view has seen: `tally run` will stop there; `tally run --accept-gap` goes on and records the gap",
            checkpoint + 1,
            state.first_sequence - 1
        ));
        return out;
    }
    let unprocessed = state.last_sequence - checkpoint;
    if config.max_age > std::time::Duration::ZERO
        && let Ok(oldest) = stream.get_raw_message(checkpoint + 1).await
    {
        // How old a message is now is a question about the wall clock, not
        // about the stream: this report is not pipeline logic.
        #[allow(clippy::disallowed_methods)]
        let now = std::time::SystemTime::now();
        let published = std::time::SystemTime::from(oldest.time);
        let age = now.duration_since(published).unwrap_or_default();
        if age.as_secs_f64() >= AT_RISK * config.max_age.as_secs_f64() {
            out.push(format!(
                "the oldest unprocessed message (sequence {}) is {} s old and the stream keeps messages {} s (max_age): run `tally run` before it is dropped",
                checkpoint + 1,
                age.as_secs(),
                config.max_age.as_secs()
            ));
        }
    }
    let near = |used: u64, limit: i64| {
        u64::try_from(limit).is_ok_and(|l| l > 0 && used as f64 >= AT_RISK * l as f64)
    };
    if near(state.bytes, config.max_bytes) {
        out.push(format!(
            "the stream holds {} of its {} bytes (max_bytes) with {unprocessed} messages unprocessed: the oldest go first; run `tally run`",
            state.bytes, config.max_bytes
        ));
    }
    if near(state.messages, config.max_messages) {
        out.push(format!(
            "the stream holds {} of its {} messages (max_msgs) with {unprocessed} unprocessed: the oldest go first; run `tally run`",
            state.messages, config.max_messages
        ));
    }
    out
}

/// Human-readable rendering.
pub(crate) fn render(s: &Status, nats_error: Option<&str>) -> String {
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let mut out = String::new();
    out.push_str(&format!("stream            {}\n", s.stream));
    // Why is said once, on stderr, with what to do.
    if nats_error.is_some() {
        out.push_str("nats              unavailable (the error below)\n");
    }
    out.push_str(&format!(
        "stream position   first {} last {} ({} messages)\n",
        opt(s.stream_first_seq),
        opt(s.stream_last_seq),
        opt(s.stream_messages)
    ));
    out.push_str(&format!("checkpoint        {}\n", opt(s.checkpoint_seq)));
    out.push_str(&format!(
        "lag               {} messages after the checkpoint\n",
        opt(s.lag)
    ));
    out.push_str(&format!(
        "consumer          {} pending, {} awaiting ack\n",
        opt(s.consumer_pending),
        opt(s.consumer_ack_pending)
    ));
    out.push_str(&format!(
        "stream clock      {}\n",
        s.stream_clock.as_deref().unwrap_or("-")
    ));
    let counts = s.counts.as_ref();
    out.push_str(&format!(
        "accepted          {}\n",
        opt(counts.map(|c| c.accepted))
    ));
    out.push_str(&format!(
        "duplicate         {}\n",
        opt(counts.map(|c| c.duplicate))
    ));
    out.push_str(&format!(
        "dead-lettered     {}\n",
        opt(counts.map(Counts::dead_lettered_total))
    ));
    for (reason, n) in counts.iter().flat_map(|c| &c.dead_lettered) {
        // The longest reason (`too_many_dimension_values`) and a space.
        out.push_str(&format!("  {reason:<27}{n}\n"));
    }
    if !s.gaps.is_empty() {
        out.push_str(&format!(
            "gaps              {} (sequences no view has seen)\n",
            s.gaps.len()
        ));
        for g in &s.gaps {
            out.push_str(&format!(
                "  {} to {} ({})\n",
                g.first_seq,
                g.last_seq,
                crate::runtime::messages(g.messages)
            ));
        }
    }
    for w in &s.warnings {
        out.push_str(&format!("warning           {w}\n"));
    }
    out
}

/// The arguments of `tally status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The run's consumer name, if it was given one (default: derived from --data, as `tally run` does).
    #[arg(long, env = "TALLY_CONSUMER")]
    pub(crate) consumer: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, env = "TALLY_STATUS_JSON")]
    pub(crate) json: bool,
}

/// `tally status`, from the command line.
pub(crate) async fn command(g: &Globals, a: &StatusArgs) -> Result<(), CommandError> {
    let partitions = crate::store::partitions(&g.data)
        .await
        .map_err(crate::runtime::RuntimeError::from)?;
    match partitions {
        Some(count) => partitioned(g, a, count).await,
        None => whole(g, a).await,
    }
}

/// The status of each partition of a location partitioned into `count`,
/// one after another (JSON: `{"partitions": [...]}`), each with the
/// consumer its worker derives from its location.
async fn partitioned(g: &Globals, a: &StatusArgs, count: u32) -> Result<(), CommandError> {
    if a.consumer.is_some() {
        return Err(CommandError::Usage(
            "--consumer names one run's consumer; a partitioned location has one per partition, derived from its location: leave --consumer out".into(),
        ));
    }
    let mut text = String::new();
    let mut all_problems = Vec::new();
    let mut json = Vec::new();
    for k in 0..count {
        let dir = crate::store::partition_location(&g.data, k);
        let consumer = crate::store::DataDir::new(&dir).consumer_name();
        let report = status(&dir, &g.source_config(Some(&consumer), None)).await?;
        if a.json {
            let mut v = report.json();
            v["partition"] = k.into();
            v["partitions"] = count.into();
            json.push(v);
        } else {
            text.push_str(&format!("partition         {k} of {count}\n"));
            text.push_str(&report.text());
            text.push('\n');
        }
        all_problems.extend(report.problems);
    }
    if a.json {
        text = serde_json::json!({ "partitions": json }).to_string() + "\n";
    }
    print_status(&text, all_problems)
}

/// The status of a location of the whole stream.
async fn whole(g: &Globals, a: &StatusArgs) -> Result<(), CommandError> {
    let consumer = a
        .consumer
        .clone()
        .unwrap_or_else(|| crate::store::DataDir::new(&g.data).consumer_name());
    let report = status(&g.data, &g.source_config(Some(&consumer), None)).await?;
    let text = if a.json {
        report.json().to_string() + "\n"
    } else {
        report.text()
    };
    print_status(&text, report.problems)
}

impl Report {
    /// What NATS failed with, if it did.
    fn nats_error(&self) -> Option<String> {
        self.problems
            .iter()
            .find(|p| p.is_nats())
            .map(ToString::to_string)
    }

    /// `--json`: the status, the NATS error and every problem.
    fn json(&self) -> serde_json::Value {
        let problems: Vec<String> = self.problems.iter().map(ToString::to_string).collect();
        serde_json::json!({
            "status": self.status,
            "nats_error": self.nats_error(),
            "problems": problems,
        })
    }

    /// The text form.
    fn text(&self) -> String {
        render(&self.status, self.nats_error().as_deref())
    }
}

/// Prints `text`; fails, after printing, when anything could not be found out.
fn print_status(text: &str, problems: Vec<StatusError>) -> Result<(), CommandError> {
    std::io::stdout()
        .write_all(text.as_bytes())
        .map_err(CommandError::Output)?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CommandError::StatusIncomplete(problems))
    }
}
