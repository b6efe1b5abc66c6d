//! Threshold alerts: `usage.threshold_crossed` CloudEvents published to
//! `tally.alerts.<tenant>`, captured by the `TALLY_ALERTS` stream. The
//! `Nats-Msg-Id` is the alert's deterministic id, so a batch redone after a
//! crash does not publish an alert twice (the stream's duplicate window);
//! the alerted thresholds are also part of the `overages` rows, so a restart
//! never decides the same alert again.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture};

use crate::operator::overages::Alert;

pub const STREAM: &str = "TALLY_ALERTS";
pub const SUBJECT_PREFIX: &str = "tally.alerts";

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("cannot publish alert {id}: {cause}")]
    Publish { id: String, cause: String },
    #[error("the alerts stream did not acknowledge alert {id}: {cause}")]
    Ack { id: String, cause: String },
}

/// Publishes every alert and waits for JetStream to store each, at most
/// [`crate::publish::MAX_WINDOW`] awaiting their acks at a time (the client
/// stalls beyond its own limit of unacknowledged publishes).
pub async fn publish_all(js: &jetstream::Context, alerts: &[Alert]) -> Result<(), AlertError> {
    for chunk in alerts.chunks(crate::publish::MAX_WINDOW) {
        let mut pending: Vec<(String, PublishAckFuture)> = Vec::with_capacity(chunk.len());
        for a in chunk {
            let id = a.id();
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            let ack = js
                .publish_with_headers(
                    format!("{SUBJECT_PREFIX}.{}", a.tenant),
                    headers,
                    a.to_json().into(),
                )
                .await
                .map_err(|e| AlertError::Publish {
                    id: id.clone(),
                    cause: e.to_string(),
                })?;
            pending.push((id, ack));
        }
        for (id, ack) in pending {
            ack.await.map_err(|e| AlertError::Ack {
                id,
                cause: e.to_string(),
            })?;
        }
    }
    Ok(())
}
