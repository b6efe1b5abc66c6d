//! Tally's output to NATS: dead letters ([`super::dlq`]), threshold alerts
//! ([`super::alerts`]) and `tally publish` all publish to JetStream and wait
//! for each message to be stored, through the window defined here.

use async_nats::jetstream;

/// Most publishes awaiting their JetStream acknowledgement at once.
/// async-nats's JetStream context allows 5,000 unacknowledged publishes
/// (`max_ack_inflight`); waiting for a permit while holding more unpolled
/// ack futures than that would deadlock, so the window stays below it.
pub const MAX_WINDOW: usize = 4096;

/// Why [`publish_acked`] stopped: the message's label, the step, the cause.
#[derive(Debug)]
pub enum PublishFailure {
    Publish { label: String, cause: String },
    Ack { label: String, cause: String },
}

/// A message for [`publish_acked`]: (label, subject, headers, payload).
pub type OutMessage = (String, String, async_nats::HeaderMap, bytes::Bytes);

/// Publishes `(label, subject, headers, payload)` messages and waits for
/// JetStream to store each, at most [`MAX_WINDOW`] awaiting
/// their acks at a time (the client stalls beyond its own limit of
/// unacknowledged publishes). The label names a message in errors.
pub async fn publish_acked(
    js: &jetstream::Context,
    messages: Vec<OutMessage>,
) -> Result<(), PublishFailure> {
    let mut pending = Vec::new();
    // A Vec, not an iterator of closures: the future must stay `Send`.
    let mut messages = messages.into_iter().peekable();
    while messages.peek().is_some() {
        for (label, subject, headers, payload) in messages.by_ref().take(MAX_WINDOW) {
            let ack = js
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| PublishFailure::Publish {
                    label: label.clone(),
                    cause: e.to_string(),
                })?;
            pending.push((label, ack));
        }
        for (label, ack) in pending.drain(..) {
            ack.await.map_err(|e| PublishFailure::Ack {
                label,
                cause: e.to_string(),
            })?;
        }
    }
    Ok(())
}
