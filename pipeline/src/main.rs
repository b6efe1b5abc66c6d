//! The `tally` binary: parse, set up logging, dispatch, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use tally::cli::{Cli, dispatch, error_text};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::new(v),
        _ => EnvFilter::new("info,async_nats=warn"),
    };
    // Colours on a terminal only: a log file or journald gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if cli.globals.log == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if matches!(cli.command, tally::cli::Command::Serve(_)) {
        // `tally serve` parses, plans and runs queries on its workers:
        // they get the stacks of `tally sql`'s query thread.
        builder.thread_stack_size(tally::QUERY_STACK_BYTES);
    }
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tally: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.exit_code();
            eprintln!("tally: {}", error_text(&e));
            ExitCode::from(code)
        }
    }
}
