//! The event stream: connection, stream and consumer set-up, and the
//! message stream the runtime batches from.
//!
//! Tally owns one durable pull consumer (AckAll). Its position on the
//! server is *not* trusted: at every start the consumer is recreated to
//! deliver from `checkpoint + 1`, so the checkpoint alone decides where
//! processing resumes (a crash between checkpoint and ack redelivers nothing
//! twice; a lost ack loses nothing).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

use crate::event::partition;

/// Runtime knobs of the connection (CLI flags), not results.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub nats_url: String,
    pub stream: String,
    pub subject_prefix: String,
    pub consumer: String,
    pub dlq_stream: String,
    /// Retention of the event stream when Tally creates it (an existing
    /// stream is used as it is): the longest a message is kept, and the
    /// most bytes the stream holds (the oldest go first). `None`: unlimited.
    pub max_age: Option<Duration>,
    pub max_bytes: Option<i64>,
    /// Replicas of the streams Tally creates (event, dead-letter, alert
    /// streams) on a JetStream cluster; an existing stream keeps its own.
    pub replicas: usize,
    /// Whether JetStream drops a message whose `Nats-Msg-Id` it stored
    /// within its duplicate window, when Tally creates the event stream.
    /// Off for untrusted producers: the window is stream-wide, so one
    /// producer could send another's future id first and have the real
    /// message dropped. Tally counts every event once either way.
    pub dedup: bool,
    /// When Tally creates the event stream: store each message's partition
    /// out of this many in its subject (a subject transform), so each
    /// worker of a deployment of as many partitions receives only its own
    /// messages. `None`: subjects stored as published.
    pub stream_partitions: Option<u32>,
}

/// `--replicas` default: one copy, as a single server has.
pub const DEFAULT_REPLICAS: usize = 1;

/// The NATS server a new user runs locally (`--nats`).
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// The event stream (`--stream`).
pub const DEFAULT_STREAM: &str = "TALLY_EVENTS";
/// The durable consumer when none is named; `tally run` and `tally status`
/// derive one per data directory instead (see
/// [`crate::store::DataDir::consumer_name`]).
pub const DEFAULT_CONSUMER: &str = "tally";
/// The dead-letter stream (`--dlq-stream`).
pub const DEFAULT_DLQ_STREAM: &str = "TALLY_DLQ";

impl Default for SourceConfig {
    fn default() -> SourceConfig {
        SourceConfig {
            nats_url: DEFAULT_NATS_URL.into(),
            stream: DEFAULT_STREAM.into(),
            subject_prefix: crate::event::DEFAULT_SUBJECT_PREFIX.into(),
            consumer: DEFAULT_CONSUMER.into(),
            dlq_stream: DEFAULT_DLQ_STREAM.into(),
            max_age: None,
            max_bytes: None,
            replicas: DEFAULT_REPLICAS,
            dedup: true,
            stream_partitions: None,
        }
    }
}

/// The cause of a failure at the broker, kept as the error it was (an
/// async-nats error, whose JetStream code can be matched) or the server's
/// own words.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Fatal at start (a run retries while it runs: the client reconnects).
    #[error(
        "cannot reach NATS at {url}: {source} — is nats-server running (with -js)? Set --nats / TALLY_NATS_URL to its address"
    )]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    /// Fatal: the credentials file cannot be read.
    #[error(
        "cannot read the NATS credentials file {}: {cause}; fix --nats-creds / TALLY_NATS_CREDS (a .creds file from `nsc`)",
        path.display()
    )]
    Credentials {
        path: std::path::PathBuf,
        cause: std::io::Error,
    },
    /// Fatal: `--nats` is not a list of server URLs.
    #[error(
        "--nats / TALLY_NATS_URL {url:?} is not a server URL or a comma-separated list of them ({cause}); write e.g. nats://10.0.0.1:4222,nats://10.0.0.2:4222"
    )]
    Address {
        url: String,
        #[source]
        cause: std::io::Error,
    },
    /// Fatal: JetStream did not answer the stream's creation (for `tally
    /// publish` from a producer's account, skipped: see `commands::publish`).
    #[error(
        "cannot create or open stream {stream}: {cause} — is JetStream enabled on the server (nats-server -js)?"
    )]
    Stream {
        stream: String,
        #[source]
        cause: BoxError,
    },
    /// Fatal: the stream's creation was refused, by JetStream's answer or
    /// before the request (for `tally publish`, skipped as
    /// [`SourceError::Stream`] is).
    #[error("cannot create or open stream {stream}: {cause}")]
    StreamRefused {
        stream: String,
        #[source]
        cause: BoxError,
    },
    /// Fatal: another stream already captures the subjects, so the server
    /// refuses a second (and a publish would land in the other one).
    #[error(
        "cannot create stream {stream}: its subjects {subjects:?} overlap those of {other}, which already captures them; use that stream (--stream / TALLY_STREAM for the event stream), give one of the two other subjects (--subject-prefix), or delete that stream"
    )]
    Overlap {
        stream: String,
        subjects: Vec<String>,
        /// `stream NAME`, or `another stream` when the server does not say.
        other: String,
    },
    /// Fatal: the stream is not the event stream this configuration names.
    #[error(
        "stream {stream} exists but captures {found:?}, not {wanted}; use another --stream or --subject-prefix, or fix the stream's subjects"
    )]
    Subjects {
        stream: String,
        found: Vec<String>,
        wanted: String,
    },
    /// Fatal: the stream rewrites subjects in a way Tally cannot undo.
    #[error(
        "stream {stream} transforms subjects {} into {}, which Tally cannot read: remove the transform, or use a stream created with --stream-partitions N (stored as {prefix}.<partition>.<tenant>.<type>)",
        found.source,
        found.destination
    )]
    Transform {
        stream: String,
        found: Box<stream::SubjectTransform>,
        prefix: String,
    },
    /// Fatal: the broker did not answer a stream's state.
    #[error("cannot read the state of stream {stream}: {cause}")]
    Info {
        stream: String,
        #[source]
        cause: BoxError,
    },
    /// Fatal: the consumer cannot be (re)created at its start sequence.
    #[error("cannot set up consumer {consumer} on stream {stream}: {cause}")]
    Consumer {
        stream: String,
        consumer: String,
        #[source]
        cause: BoxError,
    },
    /// Fatal for the run (a restart resumes from the checkpoint): pulling
    /// failed, or the server refused the pull request.
    #[error("cannot consume from stream {stream}: {cause}")]
    Messages {
        stream: String,
        #[source]
        cause: BoxError,
    },
    /// Fatal: another process deleted the consumer under this run.
    #[error(
        "the consumer of stream {stream} was deleted while this run pulled from it (by another process using the same consumer name?)"
    )]
    ConsumerDeleted { stream: String },
}

/// How long a consumer may go without pull requests before the server
/// removes it.
const CONSUMER_INACTIVE: Duration = Duration::from_secs(3600);

/// Messages a subscription can buffer in the client. A full buffer makes
/// the client drop messages (the server then redelivers them only after
/// `ack_wait`, stalling the run), so the consumer never has more unacked
/// messages outstanding than this: see [`max_ack_pending`].
pub const SUBSCRIPTION_CAPACITY: usize = 262_144;

/// The consumer's `max_ack_pending` for a batch size: room for the batch
/// being made durable, the one being processed and the one arriving, and
/// always below [`SUBSCRIPTION_CAPACITY`].
pub fn max_ack_pending(batch_size: usize) -> i64 {
    let wanted = batch_size.saturating_mul(3).max(1000);
    i64::try_from(wanted.min(SUBSCRIPTION_CAPACITY - 16_384)).unwrap_or(i64::MAX)
}

/// Connects with a clear message when the server is not there. The client
/// reconnects by itself after a connection loss; callers retry operations.
/// The last sequence of `stream` and its last message's publish time (µs
/// since the epoch), waiting at most `wait`; for health and metrics, so the
/// error is text for people.
pub async fn last_position(
    client: &async_nats::Client,
    stream: &str,
    wait: Duration,
) -> Result<(u64, i64), String> {
    let js = jetstream::new(client.clone());
    let info = tokio::time::timeout(wait, async {
        let mut s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
        s.info().await.cloned().map_err(|e| e.to_string())
    })
    .await
    .map_err(|_| format!("NATS did not answer within {} s", wait.as_secs()))?
    .map_err(|e| format!("cannot read stream {stream}: {e}"))?;
    Ok((
        info.state.last_sequence,
        info.state.last_timestamp.timestamp_micros(),
    ))
}

/// A stream watched for its position by health checks and metrics: the
/// connection is made on first use and kept (the client reconnects by
/// itself), so a scrape costs one request, and a NATS that is down costs
/// each caller at most `wait`.
pub struct StreamWatch {
    url: String,
    stream: String,
    client: tokio::sync::Mutex<Option<async_nats::Client>>,
}

impl StreamWatch {
    pub fn new(url: &str, stream: &str) -> StreamWatch {
        StreamWatch {
            url: url.to_owned(),
            stream: stream.to_owned(),
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// The stream's last sequence and its last message's publish time (µs).
    pub async fn last_position(&self, wait: Duration) -> Result<(u64, i64), String> {
        let mut client = self.client.lock().await;
        if client.is_none() {
            let c = tokio::time::timeout(wait, connect(&self.url))
                .await
                .map_err(|_| {
                    format!(
                        "NATS at {} did not answer within {} s",
                        self.url,
                        wait.as_secs()
                    )
                })?
                .map_err(|e| e.to_string())?;
            *client = Some(c);
        }
        let Some(c) = client.as_ref() else {
            return Err("not connected to NATS".into());
        };
        last_position(c, &self.stream, wait).await
    }
}

/// How Tally logs in to NATS: nothing (a server without accounts), a user
/// and password, or a credentials file (JWT and NKey seed, from `nsc`).
/// One per process, set by the command line before any connection
/// ([`set_auth`]).
#[derive(Debug, Clone, Default)]
pub enum NatsAuth {
    #[default]
    None,
    UserPassword {
        user: String,
        password: String,
    },
    Credentials(std::path::PathBuf),
}

static AUTH: std::sync::OnceLock<NatsAuth> = std::sync::OnceLock::new();

/// Sets the login of every later [`connect`]; the first call wins.
pub fn set_auth(auth: NatsAuth) {
    let _ = AUTH.set(auth);
}

pub async fn connect(url: &str) -> Result<async_nats::Client, SourceError> {
    // `--nats` may list several servers of a cluster, comma-separated; the
    // client picks one and fails over to the others.
    let addrs = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| u.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|cause| SourceError::Address {
            url: url.to_owned(),
            cause,
        })?;
    let options = match AUTH.get().cloned().unwrap_or_default() {
        NatsAuth::None => async_nats::ConnectOptions::new(),
        NatsAuth::UserPassword { user, password } => {
            async_nats::ConnectOptions::new().user_and_password(user, password)
        }
        NatsAuth::Credentials(path) => async_nats::ConnectOptions::new()
            .credentials_file(&path)
            .await
            .map_err(|cause| SourceError::Credentials { path, cause })?,
    };
    options
        .connection_timeout(Duration::from_secs(5))
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .name("tally")
        .connect(addrs.as_slice())
        .await
        .map_err(|source| SourceError::Connect {
            url: url.to_owned(),
            source,
        })
}

/// The event stream as Tally reads it.
pub struct EventStream {
    pub stream: stream::Stream,
    /// How many partitions its subjects carry (see
    /// [`crate::event::partition::transform`]); `None`: stored as published.
    pub stored_partitions: Option<u32>,
    pub layout: Layout,
}

/// Creates the event stream if missing; accepts an existing one whose
/// subjects cover `<prefix>.>` and that stores subjects as published or
/// with Tally's partition transform.
pub async fn ensure_event_stream(
    js: &jetstream::Context,
    cfg: &SourceConfig,
) -> Result<EventStream, SourceError> {
    let wanted = format!("{}.>", cfg.subject_prefix);
    let mut config = stream::Config {
        name: cfg.stream.clone(),
        subjects: vec![wanted.clone()],
        storage: stream::StorageType::File,
        max_age: cfg.max_age.unwrap_or_default(),
        max_bytes: cfg.max_bytes.unwrap_or(-1),
        num_replicas: cfg.replicas,
        subject_transform: cfg.stream_partitions.filter(|n| *n > 1).map(|n| {
            let (source, destination) = partition::transform(&cfg.subject_prefix, n);
            stream::SubjectTransform {
                source,
                destination,
            }
        }),
        ..Default::default()
    };
    if !cfg.dedup {
        // JetStream takes a duplicate window of 0 as "off" only on a
        // stream with sources (elsewhere as its 2-minute default): the
        // event stream sources an empty stream that no one writes to.
        let placeholder = format!("{}_NODEDUP", cfg.stream);
        get_or_create(
            js,
            stream::Config {
                name: placeholder.clone(),
                subjects: vec![format!("_tally.nodedup.{}", cfg.stream)],
                storage: stream::StorageType::File,
                num_replicas: cfg.replicas,
                ..Default::default()
            },
        )
        .await?;
        config.duplicate_window = Duration::ZERO;
        config.sources = Some(vec![stream::Source {
            name: placeholder,
            ..Default::default()
        }]);
    }
    let mut s = get_or_create(js, config).await?;
    let info = s.info().await.map_err(|e| SourceError::Info {
        stream: cfg.stream.clone(),
        cause: e.into(),
    })?;
    let covers = info
        .config
        .subjects
        .iter()
        .any(|s| *s == wanted || s == ">" || *s == format!("{}.*.>", cfg.subject_prefix));
    if !covers {
        return Err(SourceError::Subjects {
            stream: cfg.stream.clone(),
            found: info.config.subjects.clone(),
            wanted,
        });
    }
    let stored_partitions = match &info.config.subject_transform {
        None => None,
        Some(t) => Some(
            partition::stored_count(&cfg.subject_prefix, &t.source, &t.destination).ok_or_else(
                || SourceError::Transform {
                    stream: cfg.stream.clone(),
                    found: Box::new(t.clone()),
                    prefix: cfg.subject_prefix.clone(),
                },
            )?,
        ),
    };
    let layout = Layout::of(&info.config);
    Ok(EventStream {
        stream: s,
        stored_partitions,
        layout,
    })
}

/// Opens `config`'s stream, creating it if missing. A refusal is told
/// apart: an overlap names the stream that holds the subjects; an
/// unanswered request asks whether JetStream runs; any other refusal is in
/// the server's (or the client's) own words.
async fn get_or_create(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, SourceError> {
    use jetstream::context::CreateStreamErrorKind as Kind;
    let (stream, subjects) = (config.name.clone(), config.subjects.clone());
    let e = match js.get_or_create_stream(config).await {
        Ok(s) => return Ok(s),
        Err(e) => e,
    };
    Err(match e.kind() {
        Kind::JetStream(j) if j.error_code() == jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP => {
            let mut other = None;
            for subject in &subjects {
                if let Ok(name) = js.stream_by_subject(subject.clone()).await {
                    other = Some(name);
                    break;
                }
            }
            SourceError::Overlap {
                stream,
                subjects,
                other: other.map_or_else(|| "another stream".to_owned(), |o| format!("stream {o}")),
            }
        }
        Kind::JetStream(_)
        | Kind::NotFound
        | Kind::ResponseParse
        | Kind::InvalidStreamName
        | Kind::EmptyStreamName
        | Kind::DomainAndExternalSet => SourceError::StreamRefused {
            stream,
            cause: e.into(),
        },
        _ => SourceError::Stream {
            stream,
            cause: e.into(),
        },
    })
}

/// Creates a stream for Tally's own output (`TALLY_DLQ`, `TALLY_ALERTS`) if
/// missing. Its duplicate window covers a restart after a crash, so a
/// publish repeated by the recovery of an unfinished batch is dropped.
/// Returns the stream's `max_msg_size` (`<= 0`: unlimited).
pub async fn ensure_output_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: &str,
    replicas: usize,
) -> Result<i64, SourceError> {
    let mut s = get_or_create(
        js,
        stream::Config {
            name: name.to_owned(),
            subjects: vec![subjects.to_owned()],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            duplicate_window: Duration::from_secs(3600),
            ..Default::default()
        },
    )
    .await?;
    let info = s.info().await.map_err(|e| SourceError::Info {
        stream: name.to_owned(),
        cause: e.into(),
    })?;
    Ok(i64::from(info.config.max_message_size))
}

/// Stream creation time, as recorded in the checkpoint to detect a stream
/// that was deleted and recreated (its sequences restart).
pub async fn stream_identity(
    s: &mut stream::Stream,
    name: &str,
) -> Result<(String, u64), SourceError> {
    let info = s.info().await.map_err(|e| SourceError::Info {
        stream: name.to_owned(),
        cause: e.into(),
    })?;
    Ok((info.created.to_rfc3339(), info.state.last_sequence))
}

/// The stream's first sequence still held (every sequence below it is
/// gone: retention, a purge) and its last sequence.
pub async fn bounds(s: &mut stream::Stream, name: &str) -> Result<(u64, u64), SourceError> {
    let info = s.info().await.map_err(|e| SourceError::Info {
        stream: name.to_owned(),
        cause: e.into(),
    })?;
    Ok((info.state.first_sequence, info.state.last_sequence))
}

/// What a stream still holds: every sequence from `first` to `last` but
/// the `deleted` ones (sorted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    pub first: u64,
    pub last: u64,
    pub deleted: Vec<u64>,
    /// The stream's subjects and subject transform now.
    pub layout: Layout,
}

/// What decides where a stream stores a message: its subjects and its
/// subject transform (source, destination).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    pub subjects: Vec<String>,
    pub transform: Option<(String, String)>,
}

impl Layout {
    fn of(config: &stream::Config) -> Layout {
        Layout {
            subjects: config.subjects.clone(),
            transform: config
                .subject_transform
                .as_ref()
                .map(|t| (t.source.clone(), t.destination.clone())),
        }
    }
}

/// What the stream holds now. The deleted sequences are asked for only
/// when there are any (they are rare: a message deleted by hand).
pub async fn held(s: &stream::Stream, name: &str) -> Result<Held, SourceError> {
    let fail = |e: BoxError| SourceError::Info {
        stream: name.to_owned(),
        cause: e,
    };
    let mut info = s
        .info_builder()
        .fetch()
        .await
        .map_err(|e| fail(e.into()))?
        .info;
    if info.state.deleted_count.unwrap_or(0) > 0 {
        info = s
            .info_builder()
            .with_deleted(true)
            .fetch()
            .await
            .map_err(|e| fail(e.into()))?
            .info;
    }
    let mut deleted = info.state.deleted.unwrap_or_default();
    deleted.sort_unstable();
    Ok(Held {
        first: info.state.first_sequence,
        last: info.state.last_sequence,
        deleted,
        layout: Layout::of(&info.config),
    })
}

/// The subject the message at `seq` is stored under; `None` when the
/// stream does not hold it.
pub async fn stored_subject(
    s: &stream::Stream,
    name: &str,
    seq: u64,
) -> Result<Option<String>, SourceError> {
    let m = found(name, s.raw_message_builder().sequence(seq).send().await)?;
    Ok(m.map(|m| m.subject.to_string()))
}

/// A stream read's message; `None` when the stream holds none there.
fn found(
    name: &str,
    read: Result<jetstream::message::StreamMessage, stream::RawMessageError>,
) -> Result<Option<jetstream::message::StreamMessage>, SourceError> {
    match read {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(SourceError::Messages {
            stream: name.to_owned(),
            cause: e.into(),
        }),
    }
}

/// The first message at or after sequence `from` whose subject matches
/// `filter`; `None` when the stream holds none (now).
pub async fn next_matching(
    s: &stream::Stream,
    name: &str,
    filter: &str,
    from: u64,
) -> Result<Option<jetstream::message::StreamMessage>, SourceError> {
    let read = s
        .raw_message_builder()
        .sequence(from.max(1))
        .next_by_subject(filter)
        .send()
        .await;
    found(name, read)
}

/// Of the sequences `from..=to`, which a consumer passed over: the last
/// of the run of them, starting at `from`, that the stream no longer holds
/// (below its first sequence, or deleted one by one). `None` when `from`
/// itself is still held: then it was not delivered to us although it
/// exists.
pub async fn gone_until(
    s: &stream::Stream,
    name: &str,
    from: u64,
    to: u64,
) -> Result<Option<u64>, SourceError> {
    let info = s
        .info_builder()
        .with_deleted(true)
        .fetch()
        .await
        .map_err(|e| SourceError::Info {
            stream: name.to_owned(),
            cause: e.into(),
        })?
        .info;
    let deleted: std::collections::HashSet<u64> = info
        .state
        .deleted
        .unwrap_or_default()
        .into_iter()
        .filter(|d| (from..=to).contains(d))
        .collect();
    let first = info.state.first_sequence;
    let gone = |seq: u64| seq < first || deleted.contains(&seq);
    if !gone(from) {
        return Ok(None);
    }
    let mut last = from;
    while last < to {
        let next = last + 1;
        if next < first {
            last = (first - 1).min(to);
        } else if deleted.contains(&next) {
            last = next;
        } else {
            break;
        }
    }
    Ok(Some(last))
}

/// (Re)creates the durable consumer to deliver from `start_seq`.
///
/// `acked`: deliveries are acknowledged (AckAll) once durable, as `tally
/// run` does. A replay's consumer is read-only (AckNone): it lives for one
/// rebuild into a fresh directory whose checkpoint is the only record of
/// progress, and the server then keeps no per-message pending state (a
/// third of its CPU in a replay). Without acks nothing is redelivered, so
/// the reader checks [`Delivery::consumer_seq`] for gaps and resumes from
/// its checkpoint when one appears.
pub async fn consumer_from(
    s: &stream::Stream,
    cfg: &SourceConfig,
    start_seq: u64,
    max_ack_pending: i64,
    acked: bool,
    filter_subjects: Vec<String>,
) -> Result<consumer::PullConsumer, SourceError> {
    let err = |e: BoxError| SourceError::Consumer {
        stream: cfg.stream.clone(),
        consumer: cfg.consumer.clone(),
        cause: e,
    };
    match s.delete_consumer(&cfg.consumer).await {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                stream::ConsumerErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
            ) => {}
        Err(e) => return Err(err(e.into())),
    }
    s.create_consumer(consumer::pull::Config {
        durable_name: Some(cfg.consumer.clone()),
        description: Some("tally run: resumes from its checkpoint".into()),
        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
            start_sequence: start_seq.max(1),
        },
        ack_policy: if acked {
            consumer::AckPolicy::All
        } else {
            consumer::AckPolicy::None
        },
        // Long: a batch is acked only after it is durable, which can take a
        // while when the disk is slow; redeliveries are skipped anyway.
        ack_wait: Duration::from_secs(300),
        max_ack_pending,
        // A consumer a run left behind (its data directory given up) is
        // removed by the server after an hour without pull requests; a live
        // run always has one outstanding.
        inactive_threshold: CONSUMER_INACTIVE,
        // The checkpoint, not the consumer, is the record of progress: the
        // consumer is recreated from it every session. Kept in memory, the
        // server does not re-encode its up to `max_ack_pending` pending
        // entries to disk on every state flush.
        memory_storage: true,
        filter_subjects,
        ..Default::default()
    })
    .await
    .map_err(|e| err(e.into()))
}

/// Deliveries from the pull consumer, fetched over a plain subscription.
///
/// The JetStream pull API is a request per batch (`batch`, `expires`) to
/// `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`, answered on an inbox by
/// the messages and by status messages (408: the request expired, with how
/// many of it were left; 409: it was ended; 100: heartbeat). Doing this
/// here rather than through the client's JetStream stream keeps the
/// per-message cost to the plain message: that stream clones a JetStream
/// context and looks up a header for every message.
/// A lost request (say, across a server restart) is healed by the
/// runtime's stall detector, which recreates the consumer.
pub struct Pull {
    client: async_nats::Client,
    subscriber: async_nats::Subscriber,
    inbox: async_nats::Subject,
    next_subject: async_nats::Subject,
    request: bytes::Bytes,
    batch: usize,
    /// Messages requested and neither delivered nor released by a status.
    owed: usize,
    stream: String,
}

/// How long a pull request waits on the server before it expires (408).
const PULL_EXPIRES: Duration = Duration::from_secs(30);

impl Pull {
    /// Subscribes an inbox for `consumer` on `stream`, fetching `batch`
    /// messages per request (a new one when half of the last is in). At
    /// most 1.5 requests are outstanding, so `batch` is capped at half the
    /// subscription's capacity: even a consumer without `max_ack_pending`
    /// (a read-only one) never overflows it.
    pub async fn start(
        client: &async_nats::Client,
        stream: &str,
        consumer: &str,
        batch: usize,
    ) -> Result<Pull, SourceError> {
        let inbox = async_nats::Subject::from(client.new_inbox());
        let subscriber =
            client
                .subscribe(inbox.clone())
                .await
                .map_err(|e| SourceError::Messages {
                    stream: stream.to_owned(),
                    cause: e.into(),
                })?;
        let batch = batch.clamp(1, SUBSCRIPTION_CAPACITY / 2);
        let request = format!(
            "{{\"batch\":{batch},\"expires\":{}}}",
            PULL_EXPIRES.as_nanos()
        );
        Ok(Pull {
            client: client.clone(),
            subscriber,
            inbox,
            next_subject: format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}").into(),
            request: request.into(),
            batch,
            owed: 0,
            stream: stream.to_owned(),
        })
    }

    fn failed(&self, cause: impl Into<BoxError>) -> SourceError {
        SourceError::Messages {
            stream: self.stream.clone(),
            cause: cause.into(),
        }
    }

    /// The next delivered message; `None` once the subscription is closed.
    /// Cancel-safe: a request is counted only once it is sent.
    pub async fn next(&mut self) -> Option<Result<async_nats::Message, SourceError>> {
        use async_nats::StatusCode;
        use futures::StreamExt;
        loop {
            if self.owed <= self.batch / 2 {
                if let Err(e) = self
                    .client
                    .publish_with_reply(
                        self.next_subject.clone(),
                        self.inbox.clone(),
                        self.request.clone(),
                    )
                    .await
                {
                    return Some(Err(self.failed(e)));
                }
                self.owed += self.batch;
            }
            let m = self.subscriber.next().await?;
            match m.status {
                None | Some(StatusCode::OK) => {
                    self.owed = self.owed.saturating_sub(1);
                    return Some(Ok(m));
                }
                Some(StatusCode::IDLE_HEARTBEAT) => continue,
                Some(StatusCode::TIMEOUT | StatusCode::REQUEST_TERMINATED) => {
                    let gone = m.description.as_deref().unwrap_or_default();
                    // The server says so in the status's description only.
                    if gone.contains("Consumer Deleted") {
                        return Some(Err(SourceError::ConsumerDeleted {
                            stream: self.stream.clone(),
                        }));
                    }
                    if gone.contains("push based") || gone.starts_with("Exceeded Max") {
                        return Some(Err(self.failed(format!("pull request refused: {gone}"))));
                    }
                    // What was left of that request will not come.
                    let left = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Pending-Messages"))
                        .and_then(|v| v.as_str().parse::<usize>().ok())
                        .unwrap_or(self.batch);
                    self.owed = self.owed.saturating_sub(left);
                }
                Some(StatusCode::NOT_FOUND) => self.owed = 0,
                Some(status) => {
                    let what = m.description.as_deref().unwrap_or_default();
                    return Some(Err(self.failed(format!("status {status} {what}"))));
                }
            }
        }
    }
}

/// Where a delivered message sits, from its `$JS.ACK.` reply subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Position in the stream.
    pub stream_seq: u64,
    /// Position among the consumer's deliveries: consecutive from 1 for a
    /// new consumer, so a gap means a delivery was lost on the way.
    pub consumer_seq: u64,
    /// JetStream publish time, µs since the epoch.
    pub published_at: i64,
}

/// Follows a read-only consumer's deliveries, which are never redelivered:
/// each must carry the next consumer sequence (a new consumer starts at 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deliveries {
    next: u64,
}

impl Default for Deliveries {
    fn default() -> Self {
        Deliveries { next: 1 }
    }
}

impl Deliveries {
    /// Takes a delivery in; false when one before it was lost on the way
    /// (and then nothing from it on may be used).
    pub fn admit(&mut self, d: &Delivery) -> bool {
        if d.consumer_seq != self.next {
            return false;
        }
        self.next += 1;
        true
    }

    /// Whether the consumer reports deliveries (`delivered.consumer_sequence`)
    /// that never arrived: lost at the tail, where no later one shows a gap.
    pub fn lost_any(&self, delivered: u64) -> bool {
        delivered >= self.next
    }

    /// The consumer sequence expected next.
    pub fn expected(&self) -> u64 {
        self.next
    }
}

/// The [`Delivery`] of a message, from its `$JS.ACK.` reply subject: the
/// original 9 tokens
/// (`$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>`)
/// or the 11+ of ADR-15, with domain and account hash after `$JS.ACK.`.
pub fn delivery_info(m: &async_nats::Message) -> Option<Delivery> {
    let rest = m.reply.as_deref()?.strip_prefix("$JS.ACK.")?;
    let mut t = [""; 10];
    let mut n = 0;
    for (slot, token) in t.iter_mut().zip(rest.split('.')) {
        *slot = token;
        n += 1;
    }
    let at = match n {
        7 => 0,
        n if n >= 9 => 2,
        _ => return None,
    };
    let nanos = t.get(at + 5)?.parse::<i64>().ok()?;
    Some(Delivery {
        stream_seq: t.get(at + 3)?.parse::<u64>().ok()?,
        consumer_seq: t.get(at + 4)?.parse::<u64>().ok()?,
        published_at: nanos.div_euclid(1000),
    })
}

/// Acknowledges a delivery (AckAll: every earlier one too).
pub async fn ack(client: &async_nats::Client, m: &async_nats::Message) -> Result<(), String> {
    let Some(reply) = m.reply.clone() else {
        return Err("no reply subject".into());
    };
    client
        .publish(reply, bytes::Bytes::from_static(b"+ACK"))
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(reply: &str) -> async_nats::Message {
        async_nats::Message {
            subject: "tally.events.t.x".into(),
            reply: Some(reply.into()),
            payload: bytes::Bytes::new(),
            headers: None,
            status: None,
            description: None,
            length: 0,
        }
    }

    #[test]
    fn a_lost_delivery_is_noticed_in_the_middle_and_at_the_tail() {
        let at = |consumer_seq| Delivery {
            stream_seq: 100 + consumer_seq,
            consumer_seq,
            published_at: 0,
        };
        let mut d = Deliveries::default();
        assert!(d.admit(&at(1)) && d.admit(&at(2)));
        assert!(!d.lost_any(2), "both delivered ones arrived");
        assert!(d.lost_any(3), "the third was delivered and not received");
        assert!(!d.admit(&at(4)), "the third is missing");
        assert_eq!(d.expected(), 3);
        assert!(d.admit(&at(3)));
    }

    #[test]
    fn delivery_info_reads_both_ack_subject_formats() {
        let ns = 1_700_000_000_123_456_789i64;
        let v1 = delivered(&format!("$JS.ACK.EVENTS.tally.1.42.7.{ns}.3"));
        let d = |stream_seq, consumer_seq| {
            Some(Delivery {
                stream_seq,
                consumer_seq,
                published_at: 1_700_000_000_123_456,
            })
        };
        assert_eq!(delivery_info(&v1), d(42, 7));
        let v2 = delivered(&format!("$JS.ACK._.hash.EVENTS.tally.1.43.8.{ns}.0.tok"));
        assert_eq!(delivery_info(&v2), d(43, 8));
        let v2_short = delivered(&format!("$JS.ACK.hub.hash.EVENTS.tally.2.44.9.{ns}.0"));
        assert_eq!(delivery_info(&v2_short), d(44, 9));
        assert_eq!(delivery_info(&delivered("_INBOX.abc")), None);
        assert_eq!(delivery_info(&delivered("$JS.ACK.a.b.c")), None);
        assert_eq!(delivery_info(&delivered("$JS.ACK.S.C.1.x.7.1.3")), None);
    }
}
