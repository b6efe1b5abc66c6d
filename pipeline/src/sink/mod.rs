//! Tally's output to NATS: rejected messages to the dead-letter stream
//! ([`dlq`]), threshold alerts to the alerts stream ([`alerts`]),
//! restatements to the restatements stream ([`restated`]), all through the
//! acknowledged, windowed publishing of [`nats`], which `tally publish`
//! uses too.

pub mod alerts;
pub mod dlq;
pub mod nats;
pub mod restated;
