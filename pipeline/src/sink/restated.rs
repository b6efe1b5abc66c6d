//! Restatements published live: each `restatements` row as a
//! `<view>.restated` CloudEvent on `tally.restated.<tenant>`, captured by
//! the `TALLY_RESTATEMENTS` stream. The `Nats-Msg-Id` is derived from
//! (`tenant`, `view`, `key`, `stream_seq`), so a batch redone after a crash
//! does not publish a restatement twice (the stream's duplicate window);
//! the checkpoint moves past the message only after the batch's
//! restatements are stored, so a restart never decides them again.

use async_nats::HeaderMap;
use async_nats::jetstream;

use super::nats::{OutMessage, PublishFailure, publish_acked};
use crate::event::time::format_micros;
use crate::operator::Restatement;

pub const STREAM: &str = "TALLY_RESTATEMENTS";
pub const SUBJECT_PREFIX: &str = "tally.restated";

#[derive(Debug, thiserror::Error)]
pub enum RestatedError {
    #[error("cannot publish restatement {id}: {cause}")]
    Publish { id: String, cause: String },
    #[error("the restatements stream did not acknowledge restatement {id}: {cause}")]
    Ack { id: String, cause: String },
}

/// The deterministic id of a restatement, also its `Nats-Msg-Id`.
pub fn id(r: &Restatement) -> String {
    format!(
        "restated:{}:{}:{}:{:032x}",
        r.tenant,
        r.view,
        r.stream_seq,
        xxhash_rust::xxh3::xxh3_128(r.key.as_bytes())
    )
}

/// A restatement as a CloudEvent (JSON text).
pub fn to_json(r: &Restatement) -> String {
    serde_json::json!({
        "specversion": "1.0",
        "id": id(r),
        "source": "tally",
        "type": format!("{}.restated", r.view),
        "time": format_micros(r.published_at),
        "tenant": r.tenant,
        "data": {
            "stream_seq": r.stream_seq,
            "published_at": format_micros(r.published_at),
            "tenant": r.tenant,
            "view": r.view,
            "key": r.key,
            "before": r.before,
            "after": r.after,
            "cause": r.cause,
        }
    })
    .to_string()
}

/// Publishes every restatement and waits for JetStream to store each.
pub async fn publish_all(
    js: &jetstream::Context,
    rows: &[Restatement],
) -> Result<(), RestatedError> {
    let messages: Vec<OutMessage> = rows
        .iter()
        .map(|r| {
            let id = id(r);
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            let subject = format!("{SUBJECT_PREFIX}.{}", r.tenant);
            (id, subject, headers, to_json(r).into())
        })
        .collect();
    publish_acked(js, messages).await.map_err(|f| match f {
        PublishFailure::Publish { label, cause } => RestatedError::Publish { id: label, cause },
        PublishFailure::Ack { label, cause } => RestatedError::Ack { id: label, cause },
    })
}
