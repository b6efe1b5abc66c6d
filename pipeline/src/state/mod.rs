//! What survives a restart: the checkpoint (the commit point of every batch)
//! and the dedup horizon.

pub mod checkpoint;
pub mod dedup;
