//! Where results go: view rows to Parquet files under
//! `<data dir>/views/<view>/`, threshold alerts to NATS.

pub mod alerts;
pub mod parquet;
