//! `tally status`: where the stream is, how far Tally got, and what
//! happened to every message so far.

use std::path::Path;

use async_nats::jetstream;
use serde::Serialize;

use crate::source::jetstream::{self as js_source, SourceConfig, SourceError};
use crate::store::checkpoint::{Checkpoint, CheckpointError, Counts};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub stream: String,
    /// First and last sequence in the stream, and its message count.
    pub stream_first_seq: Option<u64>,
    pub stream_last_seq: Option<u64>,
    pub stream_messages: Option<u64>,
    /// Messages the durable consumer has not yet delivered, and delivered but unacked.
    pub consumer_pending: Option<u64>,
    pub consumer_ack_pending: Option<u64>,
    pub checkpoint_seq: Option<u64>,
    /// Stream messages after the checkpoint.
    pub lag: Option<u64>,
    pub stream_clock: Option<String>,
    pub counts: Counts,
}

/// Reads the stream, consumer and checkpoint. Works without NATS too: the
/// stream fields are then empty and `nats_error` says why.
pub async fn status(
    data_dir: &Path,
    cfg: &SourceConfig,
) -> Result<(Status, Option<String>), StatusError> {
    let cp = Checkpoint::load(data_dir)?;
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
        counts: cp.map(|c| c.counts).unwrap_or_default(),
    };
    let client = match js_source::connect(&cfg.nats_url).await {
        Ok(c) => c,
        Err(e) => return Ok((s, Some(e.to_string()))),
    };
    let js = jetstream::new(client);
    let mut stream = match js.get_stream(&cfg.stream).await {
        Ok(st) => st,
        Err(e) => return Ok((s, Some(format!("stream {} not available: {e}", cfg.stream)))),
    };
    if let Ok(info) = stream.info().await {
        s.stream_first_seq = Some(info.state.first_sequence);
        s.stream_last_seq = Some(info.state.last_sequence);
        s.stream_messages = Some(info.state.messages);
        s.lag = Some(
            info.state
                .last_sequence
                .saturating_sub(s.checkpoint_seq.unwrap_or(0)),
        );
    }
    if let Ok(info) = stream.consumer_info(&cfg.consumer).await {
        s.consumer_pending = Some(info.num_pending);
        s.consumer_ack_pending = Some(info.num_ack_pending as u64);
    }
    Ok((s, None))
}

/// Human-readable rendering.
pub fn render(s: &Status, nats_error: Option<&str>) -> String {
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let mut out = String::new();
    out.push_str(&format!("stream            {}\n", s.stream));
    if let Some(e) = nats_error {
        out.push_str(&format!("nats              unavailable: {e}\n"));
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
    out.push_str(&format!("accepted          {}\n", s.counts.accepted));
    out.push_str(&format!("duplicate         {}\n", s.counts.duplicate));
    out.push_str(&format!(
        "dead-lettered     {}\n",
        s.counts.dead_lettered_total()
    ));
    for (reason, n) in &s.counts.dead_lettered {
        out.push_str(&format!("  {reason:<16}{n}\n"));
    }
    out
}
