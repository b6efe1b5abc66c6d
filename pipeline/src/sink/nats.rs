//! Tally's output to NATS: dead letters ([`super::dlq`]), threshold alerts
//! ([`super::alerts`]) and `tally publish` all publish to JetStream and wait
//! for each message to be stored, through the window defined here.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::context::{PublishAckFuture, PublishError};
use async_nats::jetstream::publish::PublishAck;

/// Most publishes awaiting their JetStream acknowledgement at once.
/// async-nats's JetStream context allows 5,000 unacknowledged publishes
/// (`max_ack_inflight`); waiting for a permit while holding more unpolled
/// ack futures than that would deadlock, so the window stays below it.
pub const MAX_WINDOW: usize = 4096;

/// How many times a message refused as a duplicate still in flight is
/// published again (see [`ack_or_republish`]), and how long apart.
const IN_FLIGHT_RETRIES: u32 = 20;
const IN_FLIGHT_PAUSE: Duration = Duration::from_millis(50);

/// Whether JetStream refused a publish because a message with the same
/// `Nats-Msg-Id` is still being stored (a replicated stream answers so,
/// error 10158, while the earlier copy's proposal is under way): retry.
fn duplicate_in_flight(e: &PublishError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .is_some_and(|j| j.error_code() == jetstream::ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT)
}

/// Awaits `ack`. If the stream answered that a message with the same
/// `Nats-Msg-Id` is still in flight, publishes this one again (with the same
/// id) until the earlier copy is stored and the stream answers with the
/// duplicate's ack; any other failure is returned as it is.
pub async fn ack_or_republish(
    js: &jetstream::Context,
    ack: PublishAckFuture,
    subject: &str,
    headers: &async_nats::HeaderMap,
    payload: &bytes::Bytes,
) -> Result<PublishAck, PublishError> {
    let mut result = ack.await;
    for _ in 0..IN_FLIGHT_RETRIES {
        match &result {
            Err(e) if duplicate_in_flight(e) => {}
            _ => break,
        }
        tokio::time::sleep(IN_FLIGHT_PAUSE).await;
        result = match js
            .publish_with_headers(subject.to_owned(), headers.clone(), payload.clone())
            .await
        {
            Ok(again) => again.await,
            Err(e) => Err(e),
        };
    }
    result
}

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
                .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                .await
                .map_err(|e| PublishFailure::Publish {
                    label: label.clone(),
                    cause: e.to_string(),
                })?;
            pending.push((label, subject, headers, payload, ack));
        }
        for (label, subject, headers, payload, ack) in pending.drain(..) {
            ack_or_republish(js, ack, &subject, &headers, &payload)
                .await
                .map_err(|e| PublishFailure::Ack {
                    label,
                    cause: e.to_string(),
                })?;
        }
    }
    Ok(())
}
