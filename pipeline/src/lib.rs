//! Tally: SaaS events from NATS JetStream to billing-grade SQL views.
//!
//! # Layout
//!
//! - [`event`]: the wire contract. Envelope and `data` validation, exact
//!   decimals, RFC 3339 time, the dead-letter reasons.
//! - [`config`]: settings that change results (TOML, `deny_unknown_fields`).
//! - [`source`]: NATS JetStream. [`source::jetstream`] owns streams, the
//!   durable pull consumer and batching; [`source::dlq`] publishes rejects.
//! - [`state`]: what survives a restart. [`state::checkpoint`] is the commit
//!   point of the durability protocol; [`state::dedup`] the (source, id)
//!   horizon.
//! - [`operator`]: synchronous state machines, one file per view, that turn
//!   accepted events into view rows: [`operator::events`] (the archive),
//!   [`operator::usage`], [`operator::overages`], [`operator::mrr`],
//!   [`operator::revenue`], [`operator::tenants`]; with
//!   [`operator::window`] (UTC tumbling windows), [`operator::catalog`] and
//!   [`operator::subscription`] (the subscription fold they share).
//! - [`sink`]: Parquet files, written to a temporary name and renamed
//!   ([`sink::parquet`]); threshold alerts to NATS ([`sink::alerts`]).
//! - [`query`]: DataFusion over the views and `queries/*.sql`, read-only.
//! - [`runtime`]: the thin async shell: fetch, process, make durable,
//!   checkpoint, ack.
//! - [`replay`]: rebuild from sequence 1 into a fresh directory, then switch
//!   atomically, handing a live run over to the new views.
//! - [`generate`], [`publish`], [`bench`], [`status`]: the producer-side and
//!   operator-side commands.
//! - [`cli`]: the `tally` command line.
//!
//! Time in pipeline logic comes only from event time and JetStream publish
//! time, never the wall clock (clippy's `disallowed-methods` enforces it), so
//! every view is a pure function of the stream.

pub mod bench;
pub mod cli;
pub mod config;
pub mod event;
pub mod generate;
pub mod operator;
pub mod publish;
pub mod query;
pub mod replay;
pub mod runtime;
pub mod schema;
pub mod sink;
pub mod source;
pub mod state;
pub mod status;
