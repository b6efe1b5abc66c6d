//! The `tally` command line (clap). Every option reads an environment
//! variable too; defaults let a new user run everything against a local
//! NATS server. Commands dispatch to the library; errors carry what
//! happened and what to do, and map to exit code 1 (usage errors are 2).

use std::io::{BufReader, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::commands::bench::{self, BenchError, BenchOptions};
use crate::commands::generate::{self, GenerateConfig, GenerateError};
use crate::commands::publish::{self, PublishError, PublishOptions};
use crate::commands::status::{self, StatusError};
use crate::query::{self, ByteSize, OutputFormat, QueryError, QueryOptions, Session};
use crate::runtime::{self, RunOptions, RuntimeError};
use crate::serve;
use crate::source::jetstream::{self as js, SourceConfig, SourceError, connect};

#[derive(Debug, Parser)]
#[command(
    name = "tally",
    version,
    about = "SaaS events from NATS JetStream to billing-grade SQL views"
)]
pub struct Cli {
    /// NATS server URL, or a comma-separated list of a cluster's servers.
    #[arg(
        long,
        global = true,
        env = "TALLY_NATS_URL",
        default_value = js::DEFAULT_NATS_URL
    )]
    pub nats: String,
    /// NATS user, for a server with accounts (password from TALLY_NATS_PASSWORD).
    #[arg(long, global = true, env = "TALLY_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password of --nats-user (prefer the environment variable: a flag shows in `ps`).
    #[arg(
        long,
        global = true,
        env = "TALLY_NATS_PASSWORD",
        hide_env_values = true,
        requires = "nats_user"
    )]
    pub nats_password: Option<String>,
    /// NATS credentials file (JWT and seed, from `nsc`), for a server with decentralized accounts.
    #[arg(
        long,
        global = true,
        env = "TALLY_NATS_CREDS",
        conflicts_with = "nats_user"
    )]
    pub nats_creds: Option<PathBuf>,
    /// Data location: a directory, or s3://BUCKET/PREFIX (credentials, region and endpoint from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP): views, checkpoint, settings.
    #[arg(
        long,
        global = true,
        env = "TALLY_DATA_DIR",
        default_value = "./tally-data"
    )]
    pub data: PathBuf,
    /// JetStream stream holding the events.
    #[arg(
        long,
        global = true,
        env = "TALLY_STREAM",
        default_value = js::DEFAULT_STREAM
    )]
    pub stream: String,
    /// Subject prefix: events go to `<prefix>.<tenant>.<type>`.
    #[arg(
        long,
        global = true,
        env = "TALLY_SUBJECT_PREFIX",
        default_value = crate::event::DEFAULT_SUBJECT_PREFIX
    )]
    pub subject_prefix: String,
    /// Retention of the event stream when Tally creates it: keep messages at most this long (e.g. 30d, 12h); default unlimited. Sequences the stream forgets stay in the `events` archive (see docs/guarantees.md, "History").
    #[arg(long, global = true, env = "TALLY_STREAM_MAX_AGE", value_parser = parse_age)]
    pub stream_max_age: Option<Duration>,
    /// Retention of the event stream when Tally creates it: at most this many bytes (e.g. 10G); default unlimited.
    #[arg(long, global = true, env = "TALLY_STREAM_MAX_BYTES", value_parser = parse_bytes)]
    pub stream_max_bytes: Option<i64>,
    /// Replicas of the streams Tally creates, on a JetStream cluster (e.g. 3); an existing stream keeps its own.
    #[arg(long, global = true, env = "TALLY_STREAM_REPLICAS", default_value_t = js::DEFAULT_REPLICAS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=5))]
    pub replicas: usize,
    /// JetStream's duplicate window on the event stream Tally creates: `off` when producers are untrusted (one could send another's Nats-Msg-Id first and have the real message dropped; Tally still counts every event once). See docs/events.md, "Untrusted producers".
    #[arg(long, global = true, env = "TALLY_STREAM_DEDUP", default_value = "on", value_parser = ["on", "off"])]
    pub stream_dedup: String,
    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, global = true, env = "TALLY_LOG", default_value = "text", value_parser = ["text", "json"])]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume the stream and maintain every view, until stopped (SIGINT/SIGTERM).
    Run {
        /// Exit 0 once every message is processed and durable and nothing new arrived for ~1 s.
        #[arg(long)]
        until_idle: bool,
        /// Settings that change results (TOML); default `<data>/tally.toml` if present.
        #[arg(long, env = "TALLY_CONFIG")]
        config: Option<PathBuf>,
        /// Most messages per batch (one Parquet file per view and one checkpoint per batch; a batch is also cut after --batch-wait-ms).
        #[arg(long, env = "TALLY_BATCH_SIZE", default_value_t = runtime::DEFAULT_BATCH_SIZE)]
        batch_size: usize,
        /// Milliseconds to wait for a batch to fill once it has started.
        #[arg(long, env = "TALLY_BATCH_WAIT_MS", default_value_t = runtime::DEFAULT_BATCH_WAIT_MS)]
        batch_wait_ms: u64,
        /// Durable consumer name; default `tally-<hash of the --data path>`, one per data directory.
        #[arg(long, env = "TALLY_CONSUMER")]
        consumer: Option<String>,
        /// Go on past messages the stream no longer holds (retention, a purge, a deletion), recording each gap in the checkpoint, instead of stopping.
        #[arg(long)]
        accept_gap: bool,
        /// Dead-letter stream name.
        #[arg(long, env = "TALLY_DLQ_STREAM", default_value = js::DEFAULT_DLQ_STREAM)]
        dlq_stream: String,
        /// Print a JSON summary line on stdout at exit (used by `tally bench`).
        #[arg(long, hide = true)]
        summary_json: bool,
        /// Serve Prometheus metrics of the pipeline at http://ADDR/metrics (off by default; no login, so bind it where only your scraper reaches).
        #[arg(long, env = "TALLY_METRICS_LISTEN")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// If another run holds the data location, wait and take over when it stops (a lock file locally; a lease in object storage, taken over once unrenewed for 15 s) instead of failing.
        #[arg(long, env = "TALLY_STANDBY")]
        standby: bool,
    },
    /// Rebuild every view from stream sequence 1 into a fresh directory, then
    /// switch the data directory to it atomically (a live `tally run` on it is
    /// paused between batches and resumes on the new views).
    Replay {
        /// Stop after this stream sequence: the views as of that position (needs --into).
        #[arg(long)]
        until_seq: Option<u64>,
        /// Build into this new directory and do not switch.
        #[arg(long)]
        into: Option<PathBuf>,
        /// Settings that change results (TOML); default `<data>/tally.toml` if present.
        #[arg(long, env = "TALLY_CONFIG")]
        config: Option<PathBuf>,
        /// Messages per batch.
        #[arg(long, env = "TALLY_BATCH_SIZE", default_value_t = runtime::DEFAULT_BATCH_SIZE)]
        batch_size: usize,
        /// Dead-letter stream name (must exist; a replay counts dead letters but publishes none).
        #[arg(long, env = "TALLY_DLQ_STREAM", default_value = js::DEFAULT_DLQ_STREAM)]
        dlq_stream: String,
        /// Go on past messages the stream no longer holds, recording each gap, instead of stopping.
        #[arg(long)]
        accept_gap: bool,
        /// Seconds a live `tally run` has to answer the hand-off.
        #[arg(long, default_value_t = runtime::HANDOFF_TIMEOUT_SECS)]
        handoff_timeout_secs: u64,
        /// Print a JSON summary line on stdout at exit (used by `tally bench`).
        #[arg(long, hide = true)]
        summary_json: bool,
    },
    /// Run SQL over the views and the queries/ views.
    Sql {
        /// The query; or use -f.
        query: Option<String>,
        /// Read the query from a file.
        #[arg(short = 'f', long = "file", conflicts_with = "query")]
        file: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
        /// More SQL views (one SELECT per `<name>.sql`), on top of the built-in
        /// queries/ views; a file named like a built-in view replaces it.
        #[arg(long, env = "TALLY_QUERIES_DIR")]
        queries: Option<PathBuf>,
        /// Memory the query may hold, in bytes or with K/M/G/T (powers of 1024),
        /// e.g. 512M; the default is a quarter of this machine's memory.
        #[arg(long, env = "TALLY_MEMORY_LIMIT", default_value_t = query::default_memory_limit())]
        memory_limit: ByteSize,
    },
    /// Validate CloudEvents JSON Lines and publish the valid ones.
    Publish {
        /// File to read, or `-` for stdin.
        file: String,
        /// Publish invalid lines too (to exercise the dead-letter path).
        #[arg(long)]
        allow_invalid: bool,
    },
    /// Write a synthetic SaaS's events as JSON Lines on stdout.
    Generate {
        #[arg(long, default_value_t = 100)]
        tenants: u32,
        #[arg(long, default_value_t = 12)]
        months: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// First month, YYYY-MM.
        #[arg(long, default_value = "2025-01")]
        start: String,
        /// Only the billing lifecycle (catalog, signups, subscriptions,
        /// invoices): no usage or other activity. For subscription-scale tests.
        #[arg(long)]
        no_activity: bool,
    },
    /// Stream position, consumer lag, checkpoint, counts per outcome (exit 1
    /// after printing if the checkpoint or NATS cannot be read).
    Status {
        /// The run's consumer name, if it was given one (default: derived from --data, as `tally run` does).
        #[arg(long, env = "TALLY_CONSUMER")]
        consumer: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the JSON Schema of an event type (or `envelope`); no argument lists them.
    Schema { name: Option<String> },
    /// Serve the views to psql, drivers, BI tools and Flight SQL clients:
    /// read-only, with accounts and per-tenant scoping (see docs/serving.md).
    Serve {
        /// Postgres wire protocol address, or `off`.
        #[arg(long, env = "TALLY_PG_LISTEN", default_value = serve::DEFAULT_PG_LISTEN)]
        pg_listen: serve::Listen,
        /// Arrow Flight SQL address, or `off`.
        #[arg(long, env = "TALLY_FLIGHT_LISTEN", default_value = serve::DEFAULT_FLIGHT_LISTEN)]
        flight_listen: serve::Listen,
        /// HTTP address (/healthz, /metrics), or `off`.
        #[arg(long, env = "TALLY_HTTP_LISTEN", default_value = serve::DEFAULT_HTTP_LISTEN)]
        http_listen: serve::Listen,
        /// The accounts (`tally users` edits it).
        #[arg(long, env = "TALLY_USERS_FILE", default_value = serve::accounts::DEFAULT_USERS_FILE)]
        users: PathBuf,
        /// TLS certificate (PEM) for pgwire and Flight SQL; with --tls-key.
        #[arg(long, env = "TALLY_TLS_CERT")]
        tls_cert: Option<PathBuf>,
        /// TLS private key (PEM); with --tls-cert.
        #[arg(long, env = "TALLY_TLS_KEY")]
        tls_key: Option<PathBuf>,
        /// Seconds a query may run before it is cancelled.
        #[arg(long, env = "TALLY_QUERY_TIMEOUT", default_value_t = serve::DEFAULT_QUERY_TIMEOUT_SECS)]
        query_timeout: u64,
        /// Open pgwire connections allowed; one more is refused.
        #[arg(long, env = "TALLY_MAX_CONNECTIONS", default_value_t = serve::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
        /// Memory all queries together may hold (bytes, or with K/M/G/T); default a quarter of RAM.
        #[arg(long, env = "TALLY_MEMORY_LIMIT", default_value_t = query::default_memory_limit())]
        memory_limit: ByteSize,
        /// `/healthz` fails when the checkpoint is more than this many seconds behind the stream's last message.
        #[arg(long, env = "TALLY_STALE_AFTER", default_value_t = serve::DEFAULT_STALE_AFTER_SECS)]
        stale_after: u64,
        /// More SQL views, as for `tally sql --queries`.
        #[arg(long, env = "TALLY_QUERIES_DIR")]
        queries: Option<PathBuf>,
    },
    /// Accounts of `tally serve`: add, remove, list.
    Users {
        #[command(subcommand)]
        action: UsersAction,
    },
    /// Ingest benchmark: raw JetStream consume rate vs `tally run` on the same stream.
    Bench {
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        #[arg(long, default_value_t = 50_000)]
        batch_size: usize,
        /// Scratch directory (generated events, the run's data dir).
        #[arg(long, default_value = "./tally-bench")]
        scratch: PathBuf,
        /// Generate this many tenants (over --months) instead of --events events.
        #[arg(long)]
        tenants: Option<u32>,
        #[arg(long, default_value_t = 12)]
        months: u32,
        /// Only the billing lifecycle: subscriptions and invoices, no usage.
        #[arg(long)]
        no_activity: bool,
        /// Also measure `tally replay` against a raw ordered consumer.
        #[arg(long)]
        replay: bool,
        /// Also measure validation and each operator alone (in process, one core).
        #[arg(long)]
        operators: bool,
        /// Only that in-process measurement, over an events file (no broker).
        #[arg(long, hide = true, value_name = "EVENTS_FILE")]
        operators_only: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum UsersAction {
    /// Create or replace an account. The password comes from TALLY_PASSWORD,
    /// else one line on stdin; never from the command line.
    Add {
        name: String,
        /// A tenant the account sees (repeat for more).
        #[arg(long = "tenant")]
        tenants: Vec<String>,
        /// The account sees every tenant.
        #[arg(long, conflicts_with = "tenants")]
        all_tenants: bool,
        #[arg(long, env = "TALLY_USERS_FILE", default_value = serve::accounts::DEFAULT_USERS_FILE)]
        users: PathBuf,
    },
    /// Remove an account; its open sessions end at their next query.
    Remove {
        name: String,
        #[arg(long, env = "TALLY_USERS_FILE", default_value = serve::accounts::DEFAULT_USERS_FILE)]
        users: PathBuf,
    },
    /// List the accounts and what they see.
    List {
        #[arg(long, env = "TALLY_USERS_FILE", default_value = serve::accounts::DEFAULT_USERS_FILE)]
        users: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
    #[error(transparent)]
    Users(#[from] crate::commands::users::UsersError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error(transparent)]
    Status(#[from] StatusError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Bench(#[from] BenchError),
    #[error(transparent)]
    Replay(#[from] crate::commands::replay::ReplayError),
    #[error("cannot read {what}: {source}")]
    Input {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot write output: {0}")]
    Output(std::io::Error),
    #[error("{0}")]
    Usage(String),
    #[error("cannot serve metrics on {addr}: {cause}; choose another --metrics-listen address")]
    MetricsListen {
        addr: std::net::SocketAddr,
        cause: std::io::Error,
    },
    #[error(
        "replay interrupted at stream sequence {at} of {target}; the data directory was not switched; run `tally replay` again"
    )]
    ReplayInterrupted { at: u64, target: u64 },
    #[error(
        "{invalid} of {lines} lines were invalid and not published (see above); fix them, or pass --allow-invalid to send them to the dead-letter path"
    )]
    InvalidLines { invalid: u64, lines: u64 },
    #[error(
        "{unsendable} of {lines} lines were over the {max_bytes}-byte limit and not sent, even with --allow-invalid (see above): shrink or split them"
    )]
    UnsendableLines {
        unsendable: u64,
        lines: u64,
        max_bytes: usize,
    },
    /// Every problem `tally status` met, one per line (the status itself
    /// was printed).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\ntally: "))]
    StatusIncomplete(Vec<StatusError>),
}

/// The message of `e` and of each error below it, each cause said once:
/// most errors already name their source in their own message
/// (`cannot create data directory X: Not a directory`), and printing the
/// chain as well would say it twice.
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let said = s.to_string();
        if !said.is_empty() && !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = s.source();
    }
    text
}

impl CliError {
    /// 2 for bad usage, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Users(e) if e.is_usage() => 2,
            _ => 1,
        }
    }
}

/// `tally users`.
fn users(action: &UsersAction) -> Result<(), CliError> {
    use crate::commands::users;
    match action {
        UsersAction::Add {
            name,
            tenants,
            all_tenants,
            users: file,
        } => {
            let sees = users::add(file, name, tenants, *all_tenants)?;
            println!("account {name} ({sees}) saved in {}", file.display());
        }
        UsersAction::Remove { name, users: file } => {
            users::remove(file, name)?;
            println!("account {name} removed from {}", file.display());
        }
        UsersAction::List { users: file } => {
            let lines = users::list(file)?;
            if lines.is_empty() {
                println!(
                    "no accounts in {}; add one with `tally users add NAME --all-tenants`",
                    file.display()
                );
            }
            for l in lines {
                println!("{l}");
            }
        }
    }
    Ok(())
}

/// `30d`, `12h`, `90m`, `45s` as a duration.
fn parse_age(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration_us(s)
        .filter(|us| *us > 0)
        .map(|us| Duration::from_micros(us.unsigned_abs()))
        .ok_or_else(|| format!("{s:?} is not a duration; write e.g. 30d, 12h, 90m"))
}

/// `10G`, `512M`, `64K` or plain bytes.
fn parse_bytes(s: &str) -> Result<i64, String> {
    let t = s.trim();
    let (digits, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1i64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        Some((i, 'T' | 't')) => (&t[..i], 1 << 40),
        _ => (t, 1),
    };
    digits
        .parse::<i64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?} is not a size; write e.g. 10G, 512M or a number of bytes"))
}

fn source_config(cli: &Cli, consumer: Option<&str>, dlq: Option<&str>) -> SourceConfig {
    let d = SourceConfig::default();
    SourceConfig {
        nats_url: cli.nats.clone(),
        stream: cli.stream.clone(),
        subject_prefix: cli.subject_prefix.clone(),
        consumer: consumer.map_or(d.consumer, str::to_owned),
        dlq_stream: dlq.map_or(d.dlq_stream, str::to_owned),
        max_age: cli.stream_max_age,
        max_bytes: cli.stream_max_bytes,
        replicas: cli.replicas,
        dedup: cli.stream_dedup == "on",
    }
}

/// Runs the parsed command.
pub async fn dispatch(cli: Cli) -> Result<(), CliError> {
    js::set_auth(match (&cli.nats_user, &cli.nats_creds) {
        (Some(user), _) => js::NatsAuth::UserPassword {
            user: user.clone(),
            password: cli.nats_password.clone().unwrap_or_default(),
        },
        (None, Some(path)) => js::NatsAuth::Credentials(path.clone()),
        (None, None) => js::NatsAuth::None,
    });
    match &cli.command {
        Command::Run {
            until_idle,
            config,
            batch_size,
            batch_wait_ms,
            consumer,
            accept_gap,
            dlq_stream,
            summary_json,
            metrics_listen,
            standby,
        } => {
            if *batch_size == 0 {
                return Err(CliError::Usage("--batch-size must be at least 1".into()));
            }
            let metrics = match metrics_listen {
                Some(addr) => {
                    let listener = tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(|cause| CliError::MetricsListen { addr: *addr, cause })?;
                    let m = std::sync::Arc::new(runtime::metrics::RunMetrics::default());
                    tokio::spawn(runtime::metrics::serve(
                        listener,
                        std::sync::Arc::clone(&m),
                        cli.data.clone(),
                        cli.nats.clone(),
                        cli.stream.clone(),
                        runtime::shutdown_signal(),
                    ));
                    Some(m)
                }
                None => None,
            };
            let consumer = consumer
                .clone()
                .unwrap_or_else(|| crate::store::DataDir::new(&cli.data).consumer_name());
            let opts = RunOptions {
                metrics,
                standby: *standby,
                until_idle: *until_idle,
                accept_gap: *accept_gap,
                batch_size: *batch_size,
                batch_wait: Duration::from_millis(*batch_wait_ms),
                ..RunOptions::live(
                    cli.data.clone(),
                    source_config(&cli, Some(&consumer), Some(dlq_stream)),
                    config.clone(),
                )
            };
            let summary = runtime::run(&opts, runtime::shutdown_signal()).await?;
            if *summary_json {
                println!(
                    "{}",
                    serde_json::json!({
                        "messages": summary.messages,
                        "batches": summary.batches,
                        "last_seq": summary.last_seq,
                        "active_secs": summary.active.as_secs_f64(),
                        "elapsed_secs": summary.elapsed.as_secs_f64(),
                    })
                );
            }
            Ok(())
        }
        Command::Replay {
            until_seq,
            into,
            config,
            batch_size,
            dlq_stream,
            accept_gap,
            handoff_timeout_secs,
            summary_json,
        } => {
            if *batch_size == 0 {
                return Err(CliError::Usage("--batch-size must be at least 1".into()));
            }
            if until_seq.is_some() && into.is_none() {
                return Err(CliError::Usage(
                    "--until-seq builds the views as of a past position, which must not replace the live ones: name a new directory with --into DIR".into(),
                ));
            }
            let opts = crate::commands::replay::ReplayOptions {
                run: RunOptions {
                    batch_size: *batch_size,
                    accept_gap: *accept_gap,
                    handoff_timeout: Duration::from_secs(*handoff_timeout_secs),
                    ..RunOptions::live(
                        cli.data.clone(),
                        source_config(&cli, Some("tally-replay"), Some(dlq_stream)),
                        config.clone(),
                    )
                },
                until_seq: *until_seq,
                into: into.clone(),
                handoff_timeout: Duration::from_secs(*handoff_timeout_secs),
                progress_bar: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let r = crate::commands::replay::replay(&opts, runtime::shutdown_signal()).await?;
            if *summary_json {
                println!(
                    "{}",
                    serde_json::json!({
                        "messages": r.summary.messages,
                        "last_seq": r.summary.last_seq,
                        "active_secs": r.summary.active.as_secs_f64(),
                        "elapsed_secs": r.summary.elapsed.as_secs_f64(),
                    })
                );
            }
            let verb = if r.switched { "switched to" } else { "built" };
            println!(
                "replayed {} messages (stream sequence 1..{}) in {:.1} s; {verb} {}{}",
                r.summary.messages,
                r.summary.last_seq,
                r.summary.elapsed.as_secs_f64(),
                r.dir.display(),
                if r.live_run_handed_off {
                    " (the live tally run resumed on it)"
                } else {
                    ""
                }
            );
            if r.summary.last_seq < r.target {
                return Err(CliError::ReplayInterrupted {
                    at: r.summary.last_seq,
                    target: r.target,
                });
            }
            Ok(())
        }
        Command::Sql {
            query: q,
            file,
            format,
            queries,
            memory_limit,
        } => {
            let sql = match (q, file) {
                (Some(q), None) => q.clone(),
                (None, Some(f)) => {
                    std::fs::read_to_string(f).map_err(|source| CliError::Input {
                        what: f.display().to_string(),
                        source,
                    })?
                }
                _ => return Err(CliError::Usage(
                    "give a query, e.g. tally sql \"SELECT count(*) FROM events\", or -f FILE.sql"
                        .into(),
                )),
            };
            let opts = QueryOptions {
                scope: query::Scope::AllTenants,
                queries_dir: queries.clone(),
                memory_limit: *memory_limit,
            };
            let data = cli.data.clone();
            let batches = query::on_query_threads(move || async move {
                let mut session = Session::open(&data, &opts).await?;
                for r in &session.replaced {
                    eprintln!(
                        "note: view {} from {} replaces the built-in one",
                        r.name,
                        r.path.display()
                    );
                }
                session.query(&sql).await
            })
            .await??;
            let stdout = std::io::stdout();
            query::write_batches(&batches, *format, stdout.lock())?;
            Ok(())
        }
        Command::Publish {
            file,
            allow_invalid,
        } => {
            let input: Box<dyn Read> = if file == "-" {
                Box::new(std::io::stdin())
            } else {
                Box::new(std::fs::File::open(file).map_err(|source| CliError::Input {
                    what: file.clone(),
                    source,
                })?)
            };
            let client = connect(&cli.nats).await?;
            let js = async_nats::jetstream::new(client);
            // A producer's first publish on a fresh server should just work.
            // A producer whose account has no JetStream of its own (one
            // account per tenant, see deploy/nats-tenants) cannot create or
            // inspect the stream: it publishes, and the acks say whether
            // the stream took each message.
            match crate::source::jetstream::ensure_event_stream(
                &js,
                &source_config(&cli, None, None),
            )
            .await
            {
                Err(SourceError::Stream { stream, cause }) => {
                    tracing::debug!(%stream, %cause, "cannot set up the event stream from this account; publishing to it as it is");
                }
                other => {
                    other?;
                }
            }
            let opts = PublishOptions {
                prefix: cli.subject_prefix.clone(),
                allow_invalid: *allow_invalid,
                window: crate::sink::nats::MAX_WINDOW,
            };
            let report =
                publish::publish(&js, BufReader::with_capacity(1 << 20, input), &opts).await?;
            for (line, reason, detail) in &report.problems {
                eprintln!("line {line}: {reason}: {detail}");
            }
            if report.invalid as usize > report.problems.len() {
                eprintln!(
                    "... and {} more invalid lines",
                    report.invalid as usize - report.problems.len()
                );
            }
            println!(
                "lines {}  published {}  (of which JetStream duplicates {})  invalid {}",
                report.lines, report.published, report.duplicates, report.invalid
            );
            if let Some((line, bytes)) = report.unended_line {
                return Err(PublishError::NoLineEnd {
                    line,
                    bytes,
                    max_bytes: crate::event::Limits::default().max_bytes,
                }
                .into());
            }
            if report.invalid > 0 && !allow_invalid {
                return Err(CliError::InvalidLines {
                    invalid: report.invalid,
                    lines: report.lines,
                });
            }
            if report.unsendable > 0 {
                return Err(CliError::UnsendableLines {
                    unsendable: report.unsendable,
                    lines: report.lines,
                    max_bytes: crate::event::Limits::default().max_bytes,
                });
            }
            Ok(())
        }
        Command::Generate {
            tenants,
            months,
            seed,
            start,
            no_activity,
        } => {
            let (start_year, start_month) =
                generate::parse_start(start).map_err(|e| CliError::Usage(e.to_string()))?;
            if *tenants == 0 || *months == 0 {
                return Err(CliError::Usage(
                    "--tenants and --months must be at least 1".into(),
                ));
            }
            let cfg = GenerateConfig {
                tenants: *tenants,
                months: *months,
                seed: *seed,
                start_year,
                start_month,
                source: "tally-generate".into(),
                activity: !*no_activity,
            };
            let stdout = std::io::stdout();
            let stats = generate::generate(&cfg, stdout.lock())?;
            eprintln!(
                "generated {} events ({} duplicates, {} late)",
                stats.events, stats.duplicates, stats.late
            );
            Ok(())
        }
        Command::Serve {
            pg_listen,
            flight_listen,
            http_listen,
            users,
            tls_cert,
            tls_key,
            query_timeout,
            max_connections,
            memory_limit,
            stale_after,
            queries,
        } => {
            let tls = match (tls_cert, tls_key) {
                (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                (None, None) => None,
                _ => return Err(serve::ServeError::TlsHalf.into()),
            };
            let opts = serve::ServeOptions {
                data_dir: cli.data.clone(),
                queries_dir: queries.clone(),
                users_file: users.clone(),
                pg: *pg_listen,
                flight: *flight_listen,
                http: *http_listen,
                tls,
                query_timeout: Duration::from_secs((*query_timeout).max(1)),
                max_connections: *max_connections,
                memory_limit: *memory_limit,
                stale_after: Duration::from_secs(*stale_after),
                nats_url: cli.nats.clone(),
                stream: cli.stream.clone(),
            };
            let mut stop = runtime::shutdown_signal();
            serve::serve(&opts, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await?;
            Ok(())
        }
        Command::Users { action } => users(action),
        Command::Status { consumer, json } => {
            let consumer = consumer
                .clone()
                .unwrap_or_else(|| crate::store::DataDir::new(&cli.data).consumer_name());
            let report =
                status::status(&cli.data, &source_config(&cli, Some(&consumer), None)).await?;
            let nats_error = report
                .problems
                .iter()
                .find(|p| p.is_nats())
                .map(ToString::to_string);
            let text = if *json {
                let problems: Vec<String> =
                    report.problems.iter().map(ToString::to_string).collect();
                serde_json::json!({
                    "status": report.status,
                    "nats_error": nats_error,
                    "problems": problems,
                })
                .to_string()
                    + "\n"
            } else {
                status::render(&report.status, nats_error.as_deref())
            };
            std::io::stdout()
                .write_all(text.as_bytes())
                .map_err(CliError::Output)?;
            if report.problems.is_empty() {
                Ok(())
            } else {
                Err(CliError::StatusIncomplete(report.problems))
            }
        }
        Command::Schema { name } => {
            let mut out = std::io::stdout().lock();
            match name {
                None => {
                    for (file, _) in crate::commands::schema::SCHEMAS {
                        writeln!(out, "{}", file.trim_end_matches(".json"))
                            .map_err(CliError::Output)?;
                    }
                }
                Some(n) => {
                    let s = crate::commands::schema::schema_for(n).ok_or_else(|| {
                        CliError::Usage(format!("no schema named {n:?}; `tally schema` lists them"))
                    })?;
                    out.write_all(s.as_bytes()).map_err(CliError::Output)?;
                }
            }
            Ok(())
        }
        Command::Bench {
            events,
            seed,
            batch_size,
            scratch,
            tenants,
            months,
            no_activity,
            replay,
            operators,
            operators_only,
        } => {
            if let Some(file) = operators_only {
                let o = bench::operators_bench(file, "tally.bench")?;
                print_operators(&o);
                return Ok(());
            }
            let exe = std::env::current_exe().map_err(|source| CliError::Input {
                what: "own executable path".into(),
                source,
            })?;
            let opts = BenchOptions {
                nats_url: cli.nats.clone(),
                events: *events,
                seed: *seed,
                stream: "TALLY_BENCH".into(),
                prefix: "tally.bench".into(),
                scratch: scratch.clone(),
                batch_size: *batch_size,
                tenants: *tenants,
                months: *months,
                no_activity: *no_activity,
                replay: *replay,
                operators: *operators,
            };
            let r = bench::run(&opts, &exe).await?;
            println!("events               {}", r.events);
            println!("publish              {:>10.0} msg/s", r.publish_per_s);
            println!("raw consume (AckAll) {:>10.0} msg/s", r.raw_consume_per_s);
            println!("tally run            {:>10.0} msg/s", r.tally_run_per_s);
            println!("ratio                {:>10.3}", r.ratio);
            println!("tally peak RSS       {:>10.1} MiB", r.tally_peak_rss_mib);
            if let Some(rp) = &r.replay {
                println!("raw ordered read     {:>10.0} msg/s", rp.raw_ordered_per_s);
                println!("tally replay         {:>10.0} msg/s", rp.tally_replay_per_s);
                println!("replay ratio         {:>10.3}", rp.ratio);
                println!("replay peak RSS      {:>10.1} MiB", rp.peak_rss_mib);
                println!(
                    "replay, whole cmd    {:>10.2} s (from the stream)",
                    rp.stream_wall_secs
                );
                println!(
                    "replay, whole cmd    {:>10.2} s (stream purged: from the archive)",
                    rp.archive_wall_secs
                );
                println!("archive replay       {:>10.0} seq/s", rp.archive_per_s);
                println!("archive vs stream    {:>10.2}x", rp.archive_vs_stream);
                println!("archive replay RSS   {:>10.1} MiB", rp.archive_peak_rss_mib);
            }
            if let Some(o) = &r.operators {
                print_operators(o);
            }
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            Ok(())
        }
    }
}

fn print_operators(o: &bench::OperatorsBench) {
    println!("in process, one core, {} events:", o.events);
    println!("  validate           {:>10.0} events/s", o.validate_per_s);
    for (view, per_s) in &o.operators {
        println!("  {view:<18} {per_s:>10.0} events/s");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_flags_read_ages_and_sizes() {
        assert_eq!(parse_age("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_age("90m"), Ok(Duration::from_secs(5400)));
        assert!(parse_age("0s").is_err() && parse_age("30").is_err());
        assert_eq!(parse_bytes("10G"), Ok(10 << 30));
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("-1").is_err() && parse_bytes("10X").is_err());
    }
}

#[cfg(test)]
mod error_text_tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot create data directory x/views: {0}")]
        Says(#[source] std::io::Error),
        #[error("cannot open the views")]
        Silent(#[source] std::io::Error),
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = || std::io::Error::from_raw_os_error(20);
        let says = Outer::Says(io());
        let text = error_text(&says);
        assert_eq!(text.matches("Not a directory").count(), 1, "{text}");
        let silent = Outer::Silent(io());
        let text = error_text(&silent);
        assert!(
            text.starts_with("cannot open the views: Not a directory"),
            "{text}"
        );
    }
}
