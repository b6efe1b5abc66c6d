//! Threshold alerts: `usage.threshold_crossed` CloudEvents published to
//! `tally.alerts.<tenant>`, captured by the `TALLY_ALERTS` stream. The
//! `Nats-Msg-Id` is the alert's deterministic id, so a batch redone after a
//! crash does not publish an alert twice (the stream's duplicate window);
//! the alerted thresholds are also part of the `overages` rows, so a restart
//! never decides the same alert again.

use async_nats::HeaderMap;
use async_nats::jetstream;

use super::nats::{OutMessage, PublishFailure, publish_acked};
use crate::event::alert::Alert;

pub const STREAM: &str = "TALLY_ALERTS";
pub const SUBJECT_PREFIX: &str = "tally.alerts";

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("cannot publish alert {id}: {cause}")]
    Publish { id: String, cause: String },
    #[error("the alerts stream did not acknowledge alert {id}: {cause}")]
    Ack { id: String, cause: String },
}

/// Publishes every alert and waits for JetStream to store each.
pub async fn publish_all(js: &jetstream::Context, alerts: &[Alert]) -> Result<(), AlertError> {
    let messages: Vec<OutMessage> = alerts
        .iter()
        .map(|a| {
            let id = a.id();
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            let subject = format!("{SUBJECT_PREFIX}.{}", a.tenant);
            (id, subject, headers, a.to_json().into())
        })
        .collect();
    publish_acked(js, messages).await.map_err(|f| match f {
        PublishFailure::Publish { label, cause } => AlertError::Publish { id: label, cause },
        PublishFailure::Ack { label, cause } => AlertError::Ack { id: label, cause },
    })
}
