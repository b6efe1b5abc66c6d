//! The processor's in-memory state that is not a view: the dedup horizon
//! ([`dedup`]) and the bound on dimension values ([`cardinality`]), both
//! rebuilt at start-up from the `events` archive.

pub mod cardinality;
pub mod dedup;
