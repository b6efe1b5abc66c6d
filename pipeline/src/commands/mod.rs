//! The commands behind the command line, one file each, above the runtime
//! and the query layer: [`replay`] (rebuild and switch), [`status`],
//! [`publish`] and [`generate`] (the producer side), [`schema`] (the
//! contract's JSON Schemas), [`bench`] (the benchmarks). `tally run` and
//! `tally sql` are the runtime and the query layer themselves.

pub mod bench;
pub mod generate;
pub mod publish;
pub mod replay;
pub mod schema;
pub mod status;
pub mod users;
