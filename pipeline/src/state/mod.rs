//! The processor's in-memory state that is not a view: the dedup horizon
//! ([`dedup`]), rebuilt at start-up from the `events` archive.

pub mod dedup;
