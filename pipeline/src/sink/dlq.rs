//! Dead-letter publishing: every rejected message goes to
//! `tally.dlq.<reason>` on the DLQ stream with its original bytes and
//! headers saying where it came from and why it was refused.

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;

use super::nats::{OutMessage, PublishFailure, publish_acked};
use crate::event::Reject;

/// DLQ subjects: `tally.dlq.<reason>`.
pub const SUBJECT_PREFIX: &str = "tally.dlq";
/// Header: the subject the message was published to.
pub const HEADER_SUBJECT: &str = "Tally-Original-Subject";
/// Header: its sequence in the event stream.
pub const HEADER_SEQUENCE: &str = "Tally-Original-Sequence";
/// Header: the event stream's name.
pub const HEADER_STREAM: &str = "Tally-Original-Stream";
/// Header: the reason token.
pub const HEADER_REASON: &str = "Tally-Reason";
/// Header: the human-readable error.
pub const HEADER_ERROR: &str = "Tally-Error";

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("cannot publish to the dead-letter stream ({subject}): {cause}")]
    Publish { subject: String, cause: String },
    #[error("the dead-letter stream did not acknowledge {subject}: {cause}")]
    Ack { subject: String, cause: String },
}

/// A message to dead-letter.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub stream_seq: u64,
    pub subject: String,
    pub payload: Bytes,
    pub reject: Reject,
}

/// Header values cannot hold CR/LF; keep them on one line.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Publishes every dead letter and waits until JetStream has stored each.
/// The `Nats-Msg-Id` is derived from the original stream and sequence, so
/// a repeat after a crash is dropped by the DLQ stream's duplicate window.
pub async fn publish_all(
    js: &jetstream::Context,
    stream: &str,
    letters: &[DeadLetter],
) -> Result<(), DlqError> {
    let messages: Vec<OutMessage> = letters
        .iter()
        .map(|l| {
            let subject = format!("{SUBJECT_PREFIX}.{}", l.reject.reason.as_str());
            let mut headers = HeaderMap::new();
            headers.insert(
                "Nats-Msg-Id",
                format!("tally-dlq:{stream}:{}", l.stream_seq).as_str(),
            );
            headers.insert(HEADER_STREAM, stream);
            headers.insert(HEADER_SUBJECT, one_line(&l.subject).as_str());
            headers.insert(HEADER_SEQUENCE, l.stream_seq.to_string().as_str());
            headers.insert(HEADER_REASON, l.reject.reason.as_str());
            headers.insert(HEADER_ERROR, one_line(&l.reject.detail).as_str());
            (subject.clone(), subject, headers, l.payload.clone())
        })
        .collect();
    publish_acked(js, messages).await.map_err(|f| match f {
        PublishFailure::Publish { label, cause } => DlqError::Publish {
            subject: label,
            cause,
        },
        PublishFailure::Ack { label, cause } => DlqError::Ack {
            subject: label,
            cause,
        },
    })
}
