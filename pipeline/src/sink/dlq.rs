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
/// Header, only on a dead letter that carries a prefix of the original
/// because the whole would not fit the server's payload limit: the
/// original's size in bytes. The original stays in the event stream at
/// [`HEADER_SEQUENCE`].
pub const HEADER_TRUNCATED: &str = "Tally-Truncated-From";

/// Room kept for the protocol's own framing and headers JetStream may add.
const FRAMING: usize = 256;

/// Where dead letters go, and how large one may be.
#[derive(Debug, Clone)]
pub struct DlqTarget {
    /// The event stream the rejected messages come from, and its creation
    /// time: with the sequence they make each dead letter's id, unique
    /// also after the event stream was recreated (its sequences restart).
    pub source_stream: String,
    pub source_created: String,
    /// Largest message (headers and payload) the server and the DLQ
    /// stream take.
    pub max_message_bytes: usize,
}

/// The largest dead letter: the server's `max_payload`, or the DLQ
/// stream's `max_msg_size` if it sets a smaller one (`<= 0`: none).
pub fn message_budget(server_max_payload: usize, stream_max_msg_size: i64) -> usize {
    match usize::try_from(stream_max_msg_size) {
        Ok(n) if n > 0 => n.min(server_max_payload),
        _ => server_max_payload,
    }
}

/// Bytes the headers take on the wire (`NATS/1.0\r\n`, `Key: Value\r\n`
/// each, a blank line).
fn header_bytes(headers: &HeaderMap) -> usize {
    let mut n = "NATS/1.0\r\n\r\n".len();
    for (k, values) in headers.iter() {
        for v in values {
            n += AsRef::<str>::as_ref(k).len() + 2 + v.as_str().len() + 2;
        }
    }
    n
}

/// A dead letter as it is published: its subject, headers and payload,
/// the payload cut to what fits `max_bytes` (and a header saying so).
pub fn envelope(target: &DlqTarget, l: &DeadLetter) -> (String, HeaderMap, Bytes) {
    let subject = format!("{SUBJECT_PREFIX}.{}", l.reject.reason.as_str());
    let mut headers = HeaderMap::new();
    headers.insert(
        "Nats-Msg-Id",
        format!(
            "tally-dlq:{}:{}:{}",
            target.source_stream, target.source_created, l.stream_seq
        )
        .as_str(),
    );
    headers.insert(HEADER_STREAM, target.source_stream.as_str());
    headers.insert(HEADER_SUBJECT, one_line(&l.subject).as_str());
    headers.insert(HEADER_SEQUENCE, l.stream_seq.to_string().as_str());
    headers.insert(HEADER_REASON, l.reject.reason.as_str());
    headers.insert(HEADER_ERROR, one_line(&l.reject.detail).as_str());
    let room = target
        .max_message_bytes
        .saturating_sub(FRAMING + subject.len());
    let mut payload = l.payload.clone();
    let needed = header_bytes(&headers) + payload.len();
    if needed > room {
        let original = payload.len().to_string();
        let with_note = header_bytes(&headers) + HEADER_TRUNCATED.len() + 4 + original.len();
        payload.truncate(room.saturating_sub(with_note));
        headers.insert(HEADER_TRUNCATED, original.as_str());
    }
    (subject, headers, payload)
}

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

/// Longest header value, in characters: the headers of a dead letter must
/// leave room for at least part of the original in any payload limit.
const MAX_HEADER_CHARS: usize = 1024;

/// Header values cannot hold CR/LF; keep them on one line, and short.
fn one_line(s: &str) -> String {
    s.chars()
        .take(MAX_HEADER_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Publishes every dead letter and waits until JetStream has stored each.
/// The `Nats-Msg-Id` is derived from the original stream, its creation and
/// the sequence, so a repeat after a crash is dropped by the DLQ stream's
/// duplicate window. A dead letter always fits: one larger than the
/// server takes carries a prefix of the original (see [`envelope`]), so no
/// message can hold up the ones behind it.
pub async fn publish_all(
    js: &jetstream::Context,
    target: &DlqTarget,
    letters: &[DeadLetter],
) -> Result<(), DlqError> {
    let messages: Vec<OutMessage> = letters
        .iter()
        .map(|l| {
            let (subject, headers, payload) = envelope(target, l);
            (subject.clone(), subject, headers, payload)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::DlqReason;

    fn letter(bytes: usize) -> DeadLetter {
        DeadLetter {
            stream_seq: 7,
            subject: "tally.events.acme.usage.recorded".into(),
            payload: Bytes::from(vec![b'x'; bytes]),
            reject: Reject::new(DlqReason::TooLarge, "message is too large"),
        }
    }

    fn target(max: usize) -> DlqTarget {
        DlqTarget {
            source_stream: "TALLY_EVENTS".into(),
            source_created: "2026-01-01T00:00:00Z".into(),
            max_message_bytes: max,
        }
    }

    #[test]
    fn a_dead_letter_always_fits_and_says_when_it_was_cut() {
        let max = 1024 * 1024;
        let (subject, headers, payload) = envelope(&target(max), &letter(max - 100));
        assert_eq!(subject, "tally.dlq.too_large");
        assert!(header_bytes(&headers) + payload.len() + subject.len() + FRAMING <= max);
        assert_eq!(
            headers.get(HEADER_TRUNCATED).unwrap().as_str(),
            (max - 100).to_string()
        );
        assert!(
            payload.len() > max - 2048,
            "keeps what fits: {}",
            payload.len()
        );
        let (_, headers, payload) = envelope(&target(max), &letter(1000));
        assert!(headers.get(HEADER_TRUNCATED).is_none());
        assert_eq!(payload.len(), 1000);
        assert_eq!(
            headers.get("Nats-Msg-Id").unwrap().as_str(),
            "tally-dlq:TALLY_EVENTS:2026-01-01T00:00:00Z:7"
        );
    }

    #[test]
    fn the_stream_limit_counts_when_smaller() {
        assert_eq!(message_budget(1 << 20, -1), 1 << 20);
        assert_eq!(message_budget(1 << 20, 0), 1 << 20);
        assert_eq!(message_budget(1 << 20, 4096), 4096);
        assert_eq!(message_budget(1 << 20, 1 << 30), 1 << 20);
    }
}
