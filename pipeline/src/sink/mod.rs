//! Where view rows go: Parquet files under `<data dir>/views/<view>/`.

pub mod parquet;
