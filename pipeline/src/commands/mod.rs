//! The commands behind the command line, one file each with its clap
//! arguments and the function `cli` dispatches to, above the runtime, the
//! server and the query layer: [`run`], [`replay`] (rebuild and switch),
//! [`sql`], [`serve`], [`status`], [`publish`] and [`generate`] (the
//! producer side), [`schema`] (the contract's JSON Schemas), [`users`]
//! (accounts of `tally serve`), [`bench`] (the benchmarks). Here: the
//! flags every command shares ([`Globals`]) and the one error type of the
//! command line ([`CommandError`]).

use std::path::PathBuf;
use std::time::Duration;

use crate::event::partition::{MAX_PARTITIONS, Partition};
use crate::generator::GenerateError;
use crate::query::QueryError;
use crate::runtime::RuntimeError;
use crate::source::jetstream::{self as js, SourceConfig, SourceError};
use bench::BenchError;
use publish::PublishError;
use status::StatusError;

pub mod bench;
pub mod generate;
pub mod publish;
pub mod replay;
pub mod run;
pub mod schema;
pub mod serve;
pub mod sql;
pub mod status;
pub mod users;

/// The flags every command takes (`tally --data DIR run`, or after the
/// command's name), each with an environment variable.
#[derive(Debug, clap::Args)]
pub struct Globals {
    /// NATS server URL, or a comma-separated list of a cluster's servers.
    #[arg(
        long,
        global = true,
        env = "TALLY_NATS_URL",
        default_value = js::DEFAULT_NATS_URL
    )]
    pub(crate) nats: String,
    /// NATS user, for a server with accounts (password from TALLY_NATS_PASSWORD).
    #[arg(long, global = true, env = "TALLY_NATS_USER")]
    pub(crate) nats_user: Option<String>,
    /// NATS password of --nats-user (prefer the environment variable: a flag shows in `ps`).
    #[arg(
        long,
        global = true,
        env = "TALLY_NATS_PASSWORD",
        hide_env_values = true,
        requires = "nats_user"
    )]
    pub(crate) nats_password: Option<String>,
    /// NATS credentials file (JWT and seed, from `nsc`), for a server with decentralized accounts.
    #[arg(
        long,
        global = true,
        env = "TALLY_NATS_CREDS",
        conflicts_with = "nats_user"
    )]
    pub(crate) nats_creds: Option<PathBuf>,
    /// Data location: a directory, or s3://BUCKET/PREFIX (credentials, region and endpoint from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP): views, checkpoint, settings.
    #[arg(
        long,
        global = true,
        env = "TALLY_DATA_DIR",
        default_value = "./tally-data"
    )]
    pub(crate) data: PathBuf,
    /// JetStream stream holding the events.
    #[arg(
        long,
        global = true,
        env = "TALLY_STREAM",
        default_value = js::DEFAULT_STREAM
    )]
    pub(crate) stream: String,
    /// Subject prefix: events go to `<prefix>.<tenant>.<type>`.
    #[arg(
        long,
        global = true,
        env = "TALLY_SUBJECT_PREFIX",
        default_value = crate::event::DEFAULT_SUBJECT_PREFIX
    )]
    pub(crate) subject_prefix: String,
    /// Retention of the event stream when Tally creates it: keep messages at most this long (e.g. 30d, 12h); default unlimited. Sequences the stream forgets stay in the `events` archive (see docs/guarantees.md, "History").
    #[arg(long, global = true, env = "TALLY_STREAM_MAX_AGE", value_parser = parse_age)]
    pub(crate) stream_max_age: Option<Duration>,
    /// Retention of the event stream when Tally creates it: at most this many bytes (e.g. 10G); default unlimited.
    #[arg(long, global = true, env = "TALLY_STREAM_MAX_BYTES", value_parser = parse_bytes)]
    pub(crate) stream_max_bytes: Option<i64>,
    /// Replicas of the streams Tally creates, on a JetStream cluster (e.g. 3); an existing stream keeps its own.
    #[arg(long, global = true, env = "TALLY_STREAM_REPLICAS", default_value_t = js::DEFAULT_REPLICAS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=5))]
    pub(crate) replicas: usize,
    /// JetStream's duplicate window on the event stream Tally creates: `off` when producers are untrusted (one could send another's Nats-Msg-Id first and have the real message dropped; Tally still counts every event once). See docs/events.md, "Untrusted producers".
    #[arg(long, global = true, env = "TALLY_STREAM_DEDUP", default_value = "on", value_parser = ["on", "off"])]
    pub(crate) stream_dedup: String,
    /// When Tally creates the event stream: store each message's partition out of N in its subject (a subject transform, `<prefix>.<partition>.<tenant>.<type>`), so each worker of a deployment of N partitions receives only its own messages. Default: the `--partitions` of the `tally run` that creates it, else none. See docs/scaling.md, "Partitions".
    #[arg(long, global = true, env = "TALLY_STREAM_PARTITIONS", value_parser = clap::builder::RangedU64ValueParser::<u32>::new().range(1..=u64::from(crate::event::partition::MAX_PARTITIONS)))]
    pub(crate) stream_partitions: Option<u32>,
    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, global = true, env = "TALLY_LOG", default_value = "text", value_parser = ["text", "json"])]
    pub log: String,
}

impl Globals {
    /// How to log in to NATS, from `--nats-user` / `--nats-creds`.
    pub(crate) fn nats_auth(&self) -> js::NatsAuth {
        match (&self.nats_user, &self.nats_creds) {
            (Some(user), _) => js::NatsAuth::UserPassword {
                user: user.clone(),
                password: self.nats_password.clone().unwrap_or_default(),
            },
            (None, Some(path)) => js::NatsAuth::Credentials(path.clone()),
            (None, None) => js::NatsAuth::None,
        }
    }

    pub(crate) fn source_config(&self, consumer: Option<&str>, dlq: Option<&str>) -> SourceConfig {
        let d = SourceConfig::default();
        SourceConfig {
            nats_url: self.nats.clone(),
            stream: self.stream.clone(),
            subject_prefix: self.subject_prefix.clone(),
            consumer: consumer.map_or(d.consumer, str::to_owned),
            dlq_stream: dlq.map_or(d.dlq_stream, str::to_owned),
            max_age: self.stream_max_age,
            max_bytes: self.stream_max_bytes,
            replicas: self.replicas,
            dedup: self.stream_dedup == "on",
            stream_partitions: self.stream_partitions,
        }
    }
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

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Serve(#[from] crate::serve::ServeError),
    #[error(transparent)]
    Users(#[from] users::UsersError),
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
    Replay(#[from] replay::ReplayError),
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
    StatusIncomplete(Vec<status::StatusError>),
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

/// Standard output that notes when its reader has gone (`| head`): the
/// command then stops quietly and succeeds, as `cat` and `grep` do,
/// instead of reporting a broken pipe.
pub(crate) struct Stdout {
    inner: std::io::StdoutLock<'static>,
    /// Set once a write found the reader gone.
    pub(crate) reader_gone: bool,
}

impl Stdout {
    pub(crate) fn new() -> Stdout {
        Stdout {
            inner: std::io::stdout().lock(),
            reader_gone: false,
        }
    }

    fn noted<T>(&mut self, r: std::io::Result<T>) -> std::io::Result<T> {
        if let Err(e) = &r
            && e.kind() == std::io::ErrorKind::BrokenPipe
        {
            self.reader_gone = true;
        }
        r
    }
}

impl std::io::Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let r = self.inner.write(buf);
        self.noted(r)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let r = self.inner.flush();
        self.noted(r)
    }
}

impl CommandError {
    /// 2 for bad usage, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Usage(_) => 2,
            CommandError::Users(e) if e.is_usage() => 2,
            CommandError::Serve(
                crate::serve::ServeError::TlsHalf | crate::serve::ServeError::NothingToServe,
            ) => 2,
            _ => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_is_one_number_or_an_inclusive_span() {
        assert_eq!(parse_span("3"), Ok((3, 3)));
        assert_eq!(parse_span("0..2"), Ok((0, 2)));
        assert_eq!(parse_span("1..=4"), Ok((1, 4)));
        assert!(parse_span("2..1").is_err() && parse_span("a").is_err());
        assert!(parse_span("-1").is_err() && parse_span("1..").is_err());
    }

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

/// `--partitions N --partition K`: a worker of a partitioned deployment.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct PartitionArgs {
    /// Partitions of a partitioned deployment, fixed when its data location is created: each worker folds its partitions (the tenants whose FNV-1a hash mod N is the partition's number, and the catalog), readers see the union. Needs --partition.
    #[arg(long, env = "TALLY_PARTITIONS", requires = "partition")]
    pub(crate) partitions: Option<u32>,
    /// The partition this worker folds, 0 to N-1, or K..L for K to L inclusive, each with its own consumer and location (with --partitions).
    #[arg(long, env = "TALLY_PARTITION", requires = "partitions", value_parser = parse_span)]
    pub(crate) partition: Option<(u32, u32)>,
}

/// `K` or `K..L` (inclusive) as (first, last).
fn parse_span(s: &str) -> Result<(u32, u32), String> {
    let number = |t: &str| {
        t.trim()
            .parse::<u32>()
            .map_err(|_| format!("{s:?} is not a partition; write K, or K..L for K to L"))
    };
    let (first, last) = match s.split_once("..") {
        Some((a, b)) => (number(a)?, number(b.strip_prefix('=').unwrap_or(b))?),
        None => (number(s)?, number(s)?),
    };
    if first > last {
        return Err(format!("{s:?} is empty; write K..L with K <= L"));
    }
    Ok((first, last))
}

impl PartitionArgs {
    /// The settings file of a run on `data`: `explicit` (`--config`), else
    /// for a partition's run the one at the deployment's root (a run of the
    /// whole stream finds `<data>/tally.toml` itself).
    pub(crate) fn settings(
        &self,
        data: &std::path::Path,
        explicit: Option<&PathBuf>,
    ) -> Option<PathBuf> {
        explicit.cloned().or_else(|| {
            self.partitions
                .map(|_| data.join(crate::store::SETTINGS_FILE))
                .filter(|p| p.exists())
        })
    }

    /// The partitions asked for, each with where its views live: the
    /// location itself without partitions (one entry, `None`), else each
    /// partition's own location under it (the location's count is claimed
    /// or checked first). A location that is partitioned refuses a run
    /// without them.
    pub(crate) async fn resolve(
        &self,
        data: &std::path::Path,
    ) -> Result<Vec<(Option<Partition>, PathBuf)>, CommandError> {
        use crate::store;
        let (count, (first, last)) = match (self.partitions, self.partition) {
            (Some(count), Some(span)) => (count, span),
            (None, None) => {
                return match store::partitions(data).await.map_err(RuntimeError::from)? {
                    Some(found) => Err(RuntimeError::from(store::DataDirError::Partitioned {
                        path: data.to_path_buf(),
                        found,
                    })
                    .into()),
                    None => Ok(vec![(None, data.to_path_buf())]),
                };
            }
            _ => {
                return Err(CommandError::Usage(
                    "--partitions and --partition go together: give both, or neither".into(),
                ));
            }
        };
        if count == 0 || count > MAX_PARTITIONS {
            return Err(CommandError::Usage(format!(
                "--partitions {count} is out of range; give 1 to {MAX_PARTITIONS}"
            )));
        }
        if last >= count {
            return Err(CommandError::Usage(format!(
                "--partition {last} is out of range: with --partitions {count} the partitions are 0 to {}",
                count - 1
            )));
        }
        store::claim_partitions(data, count)
            .await
            .map_err(RuntimeError::from)?;
        Ok((first..=last)
            .map(|index| {
                (
                    Some(Partition { index, count }),
                    store::partition_location(data, index),
                )
            })
            .collect())
    }
}
