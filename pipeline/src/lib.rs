//! Tally: SaaS events from NATS JetStream to billing-grade SQL views.
//!
//! # Layout
//!
//! Arrows point down only: a module uses the ones below it, never one above.
//!
//! - [`cli`]: the `tally` command line (clap): parses and dispatches.
//! - [`commands`]: `run`, `replay`, `sql`, `serve`, `status`, `publish`,
//!   `generate`, `schema`, `bench`, `users`: one file each with its clap
//!   arguments, on top of the runtime, the server and the query layer; the
//!   shared flags ([`commands::Globals`]) and the command line's error
//!   ([`commands::CommandError`]).
//! - [`runtime`]: `tally run`, the thin async shell: [`runtime::session`]
//!   (consume loop, its decisions pure functions in `runtime::decide`; a
//!   partition's worker reads the catalog beside its consumer in
//!   `runtime::side`),
//!   [`runtime::processor`] (validation, dedup, the ledger, operators and
//!   restatements: the synchronous core; it reads and writes nothing itself),
//!   [`runtime::commit`]
//!   (durable, then checkpoint, then ack; compaction), [`runtime::restore`] (state at
//!   start-up: reads the archive and the views and hands them over),
//!   [`runtime::metrics`] (`--metrics-listen`), [`runtime::signal`].
//! - [`serve`]: `tally serve`: the views over the Postgres wire protocol
//!   ([`serve::pg`]), Arrow Flight SQL ([`serve::flight`]) and HTTP
//!   ([`serve::http`], with the pages of [`serve::dashboard`] and what both
//!   share in [`serve::web`]; [`serve::postgres`] what clients are told), with
//!   accounts ([`serve::accounts`],
//!   [`serve::scram`], each holding at most its share of the connections:
//!   [`serve::slots`]; refused logins logged without flooding:
//!   [`serve::refusals`]), the HTTP and Flight listeners' door
//!   ([`serve::gate`]) and per-tenant scoping, answering from one
//!   checkpoint per query ([`serve::views`]).
//! - [`query`]: DataFusion SQL over the views and the `queries/` views,
//!   read-only, for all tenants or a tenant scope ([`query::Scope`]), with
//!   the guards of a statement ([`query::guard`]), bounded functions and
//!   aggregates ([`query::bounded`]) and isolated execution ([`query::isolated`]).
//! - [`operator`]: synchronous state machines, one file per view, that turn
//!   accepted events into view rows: [`operator::events`] (the archive),
//!   [`operator::usage`], [`operator::dimensions`] (`usage_by_dimension`),
//!   [`operator::overages`], [`operator::mrr`], [`operator::revenue`],
//!   [`operator::tenants`], [`operator::corrections`],
//!   [`operator::restatements`]; with [`operator::ledger`] (which events
//!   are voided, and what a void needs to take them out),
//!   [`operator::window`] (UTC tumbling windows and anchored periods),
//!   [`operator::billing_period`] (a tenant's anchors and the billing
//!   period of an instant), [`operator::catalog`] and
//!   [`operator::subscription`] (the subscription fold they share).
//! - [`source`]: NATS JetStream input: the stream, the durable pull
//!   consumer, deliveries.
//! - [`sink`]: NATS output: dead letters, threshold alerts, restatements,
//!   the windowed acknowledged publish they and `tally publish` share.
//! - [`store`]: the data location behind one seam ([`store::DataDir`]):
//!   view files ([`store::parquet`]), the checkpoint that commits them
//!   ([`store::checkpoint`]), the lock, the replay hand-off
//!   ([`store::handoff`]), atomic file writes ([`store::atomic`]); and
//!   `s3://` locations ([`store::remote`]: the manifest written with
//!   conditional puts, the lease, the run's working copy).
//! - [`state`]: the processor's in-memory state that is not a view: the
//!   dedup horizon.
//! - [`config`]: settings that change results (TOML, `deny_unknown_fields`).
//! - [`generator`]: a deterministic synthetic SaaS (`tally generate`,
//!   `tally bench`, the operators' tests), on the contract and its time.
//! - [`event`]: the wire contract at the bottom: envelope and `data`
//!   validation, exact decimals, RFC 3339 time, the dead-letter reasons, the
//!   threshold alert event, the partition a subject belongs to
//!   ([`event::partition`]).
//!
//! The library's interface is what the binary and the contract test use:
//! [`cli`], [`commands`], [`event`] and [`QUERY_STACK_BYTES`]; every other
//! module is the crate's own (`pub(crate)`), so the compiler reports what
//! no path reaches.
//!
//! Time in pipeline logic comes only from event time and JetStream publish
//! time, never the wall clock (clippy's `disallowed-methods` enforces it), so
//! every view is a pure function of the stream.

pub mod cli;
pub mod commands;
pub(crate) mod config;
pub mod event;
pub(crate) mod generator;
pub(crate) mod operator;
pub(crate) mod query;
pub(crate) mod runtime;
pub(crate) mod serve;
pub(crate) mod sink;
pub(crate) mod source;
pub(crate) mod state;
pub(crate) mod store;

/// The stack of the thread that parses and plans a query, which `main`
/// gives every worker thread of `tally serve`.
pub use query::QUERY_STACK_BYTES;
