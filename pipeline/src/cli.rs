//! The `tally` command line (clap): the flags every command shares and one
//! subcommand per file of [`crate::commands`]. It parses and dispatches;
//! every option reads an environment variable too, and defaults let a new
//! user run everything against a local NATS server. Errors carry what
//! happened and what to do, and map to exit code 1 (usage errors are 2).

use clap::{Parser, Subcommand};

use crate::commands::{self, Globals};
pub use crate::commands::{CommandError as CliError, error_text};
use crate::source::jetstream as js;

#[derive(Debug, Parser)]
#[command(
    name = "tally",
    version,
    about = "SaaS events from NATS JetStream to billing-grade SQL views"
)]
pub struct Cli {
    #[command(flatten)]
    pub globals: Globals,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume the stream and maintain every view, until stopped (SIGINT/SIGTERM).
    Run(commands::run::RunArgs),
    /// Rebuild every view from stream sequence 1 into a fresh directory, then
    /// switch the data directory to it atomically (a live `tally run` on it is
    /// paused between batches and resumes on the new views).
    Replay(commands::replay::ReplayArgs),
    /// Run SQL over the views and the queries/ views.
    Sql(commands::sql::SqlArgs),
    /// Validate CloudEvents JSON Lines and publish the valid ones.
    Publish(commands::publish::PublishArgs),
    /// Write a synthetic SaaS's events as JSON Lines on stdout.
    Generate(commands::generate::GenerateArgs),
    /// Stream position, consumer lag, checkpoint, counts per outcome (exit 1
    /// after printing if the checkpoint or NATS cannot be read).
    Status(commands::status::StatusArgs),
    /// Print the JSON Schema of an event type (or `envelope`); no argument lists them.
    Schema(commands::schema::SchemaArgs),
    /// Serve the views to psql, drivers, BI tools and Flight SQL clients:
    /// read-only, with accounts and per-tenant scoping (see docs/serving.md).
    Serve(commands::serve::ServeArgs),
    /// Accounts of `tally serve`: add, remove, list.
    Users {
        #[command(subcommand)]
        action: commands::users::UsersAction,
    },
    /// Ingest benchmark: raw JetStream consume rate vs `tally run` on the same stream.
    Bench(commands::bench::BenchArgs),
}

/// Runs the parsed command.
pub async fn dispatch(cli: Cli) -> Result<(), CliError> {
    let g = &cli.globals;
    js::set_auth(g.nats_auth());
    match &cli.command {
        Command::Run(a) => commands::run::command(g, a).await,
        Command::Replay(a) => commands::replay::command(g, a).await,
        Command::Sql(a) => commands::sql::command(g, a).await,
        Command::Publish(a) => commands::publish::command(g, a).await,
        Command::Generate(a) => commands::generate::command(g, a).await,
        Command::Status(a) => commands::status::command(g, a).await,
        Command::Schema(a) => commands::schema::command(g, a).await,
        Command::Serve(a) => commands::serve::command(g, a).await,
        Command::Users { action } => commands::users::command(action),
        Command::Bench(a) => commands::bench::command(g, a).await,
    }
}
