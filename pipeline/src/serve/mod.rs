//! `tally serve`: the views on the network, read-only, for accounts.
//!
//! Three listeners share one [`Shared`]: the Postgres wire protocol
//! ([`pg`], with what it tells clients about itself in [`postgres`]),
//! Arrow Flight SQL ([`flight`]) and HTTP for health and metrics ([`http`],
//! with the dashboard and tenant pages of [`dashboard`]; what both use is
//! in [`web`]). Every
//! query goes through [`views::Views`], which answers
//! from exactly one checkpoint for the account's tenant scope, and through
//! the same read-only guard as `tally sql`. Accounts come from the users
//! file ([`accounts`]); logins use SCRAM-SHA-256 on pgwire ([`scram`]) and
//! the password over TLS (or loopback) for Flight and HTTP Basic. No one
//! account holds more than its share of the pgwire connections ([`slots`]).
//! HTTP and Flight SQL hold at most `--max-connections` connections each
//! and close one that stays unanswered ([`gate`]).

pub mod accounts;
pub mod dashboard;
pub mod flight;
pub mod gate;
pub mod http;
pub mod metrics;
pub mod numeric;
pub mod pg;
pub mod postgres;
pub mod refusals;
pub mod scram;
pub mod slots;
pub mod views;
pub mod web;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use crate::query::{ByteSize, QueryError};
use accounts::{Account, AccountsError, AccountsFile};
use metrics::{Metrics, Protocol};

/// `--pg-listen` default.
pub const DEFAULT_PG_LISTEN: &str = "127.0.0.1:5433";
/// `--flight-listen` default.
pub const DEFAULT_FLIGHT_LISTEN: &str = "127.0.0.1:50051";
/// `--http-listen` default.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8080";
/// `--query-timeout` default, seconds.
pub const DEFAULT_QUERY_TIMEOUT_SECS: u64 = 60;
/// `--max-connections` default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// `--stale-after` default, seconds: `/healthz` fails when the checkpoint
/// is older than this behind the stream's last message.
pub const DEFAULT_STALE_AFTER_SECS: u64 = 300;
/// How long a pgwire connection may take to log in (Postgres allows 60 s;
/// a quarter of that keeps silent connections from holding the slots of
/// `--max-connections`); a connection still without a login then is closed.
pub const AUTHENTICATION_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a FATAL error has to reach the client before its connection
/// is closed.
const FATAL_FLUSH: Duration = Duration::from_millis(200);
/// The longest query text accepted. Deeper nesting than
/// [`crate::query::MAX_EXPR_DEPTH`] is refused after parsing; this bound
/// keeps what is parsed (and cloned and dropped, recursively) within the
/// large query-thread stacks.
pub const MAX_QUERY_BYTES: usize = 256 * 1024;
/// How long running queries may finish after SIGINT/SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A listener address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    Off,
    On(SocketAddr),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Listen, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Listen::Off);
        }
        s.parse().map(Listen::On).map_err(|_| {
            format!(
                "{s:?} is not an address: give HOST:PORT with an IP, e.g. 127.0.0.1:5433, or off"
            )
        })
    }
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub data_dir: PathBuf,
    pub queries_dir: Option<PathBuf>,
    pub users_file: PathBuf,
    pub pg: Listen,
    pub flight: Listen,
    pub http: Listen,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub query_timeout: Duration,
    pub max_connections: usize,
    /// pgwire sessions one account may hold (see [`slots`]).
    pub max_connections_per_account: usize,
    pub memory_limit: ByteSize,
    pub stale_after: Duration,
    /// Where `/healthz` and `/metrics` read the stream's last sequence.
    pub nats_url: String,
    pub stream: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Fatal: the users file cannot be used.
    #[error(transparent)]
    Accounts(#[from] AccountsError),
    /// Fatal: TLS was asked for and cannot be set up; never plaintext instead.
    #[error("cannot use the TLS certificate {} and key {}: {cause}; fix them or leave out --tls-cert/--tls-key (serve never falls back to plaintext)", cert.display(), key.display())]
    Tls {
        cert: PathBuf,
        key: PathBuf,
        cause: String,
    },
    #[error("--tls-cert and --tls-key go together: give both or neither")]
    TlsHalf,
    /// Fatal: a listener cannot bind.
    #[error(
        "cannot listen for {what} on {addr}: {cause}; is another server on that port? choose another with --{flag} (or `off`)"
    )]
    Bind {
        what: &'static str,
        flag: &'static str,
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error(
        "every listener is off: turn on at least one of --pg-listen, --flight-listen, --http-listen"
    )]
    NothingToServe,
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error("the Flight SQL server failed: {0}")]
    Flight(String),
    #[error("the HTTP server failed: {0}")]
    Http(std::io::Error),
}

/// What every listener shares.
pub struct Shared {
    pub views: views::Views,
    pub accounts: Arc<AccountsFile>,
    pub metrics: Metrics,
    /// The pgwire sessions each account holds.
    pub slots: Arc<slots::AccountSlots>,
    /// Flight SQL calls planning or running a query, per account (the
    /// same limit as pgwire sessions; see `flight`).
    pub flight_calls: Arc<slots::AccountSlots>,
    /// HTTP requests that run queries, per account (see
    /// [`web::account_call`]).
    pub http_calls: Arc<slots::AccountSlots>,
    /// Refused logins, for logging them without flooding the log.
    pub refusals: refusals::Refusals,
    /// The pgwire sessions a cancel request may stop.
    pub cancels: Arc<pg::cancel::Cancels>,
    /// The rows one pgwire session may hold in its open cursors:
    /// `--memory-limit` shared by `--max-connections` (at least 1 MiB), so
    /// that every session's cursors together stay within the limit.
    pub cursor_bytes: u64,
    pub stale_after: Duration,
    /// Per-process secret: the password HTTP and Flight check an unknown
    /// user against, so that a refusal costs what a real check costs.
    pub secret: [u8; 32],
    pub nats_url: String,
    pub stream: String,
    /// Passwords checked before: (user, SHA-256 of the password) -> the
    /// verifier they matched, so that HTTP and Flight logins do not run
    /// PBKDF2 on every request. An entry counts only while the account
    /// still has that verifier.
    checked: Mutex<HashMap<(String, [u8; 32]), String>>,
}

impl Shared {
    /// The account `user` if `password` is its password.
    /// Logs a refused login of `user`, at most a line per user name every
    /// [`refusals::EVERY`] (with how many more there were).
    pub fn refused(&self, user: &str, why: &str) {
        if let Some(more) = self.refusals.note(user, std::time::Instant::now()) {
            tracing::warn!(user = %user, more_since_last_line = more, "{why}");
        }
    }

    pub fn login(&self, user: &str, password: &str) -> Option<Account> {
        let account = self.accounts.account(user);
        let key = (user.to_owned(), Sha256::digest(password.as_bytes()).into());
        let Some(account) = account else {
            // As long as a known user's check, so timing tells nothing.
            let _ =
                accounts::Verifier::new(password, &self.secret[..16], accounts::SCRAM_ITERATIONS);
            self.refused(user, "login refused: unknown user or wrong password");
            return None;
        };
        let cached = self.checked.lock().ok().and_then(|c| c.get(&key).cloned());
        if cached.as_deref() == Some(account.verifier.as_str()) {
            return Some(account);
        }
        let ok = accounts::Verifier::parse(&account.verifier).is_some_and(|v| v.check(password));
        if !ok {
            self.refused(user, "login refused: unknown user or wrong password");
            return None;
        }
        if let Ok(mut c) = self.checked.lock() {
            if c.len() > 10_000 {
                c.clear();
            }
            c.insert(key, account.verifier.clone());
        }
        Some(account)
    }
}

/// Runs the server until `shutdown` resolves, then lets running queries
/// finish for up to [`SHUTDOWN_GRACE`].
pub async fn serve(
    opts: &ServeOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    if opts.pg == Listen::Off && opts.flight == Listen::Off && opts.http == Listen::Off {
        return Err(ServeError::NothingToServe);
    }
    let accounts = Arc::new(AccountsFile::open(&opts.users_file)?);
    if accounts.get().users.is_empty() {
        tracing::warn!(path = %opts.users_file.display(), "no accounts in the users file: nobody can log in; add one with `tally users add NAME --all-tenants`");
    }
    let tls = match &opts.tls {
        Some((cert, key)) => Some(tls_config(cert, key)?),
        None => None,
    };
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| ServeError::Flight(format!("no randomness: {e}")))?;
    let shared = Arc::new(Shared {
        views: views::Views::new(
            opts.data_dir.clone(),
            opts.queries_dir.clone(),
            opts.memory_limit,
            opts.query_timeout,
        )?,
        accounts,
        metrics: Metrics::default(),
        slots: slots::AccountSlots::new(opts.max_connections_per_account),
        flight_calls: slots::AccountSlots::new(opts.max_connections_per_account),
        http_calls: slots::AccountSlots::new(opts.max_connections_per_account),
        refusals: refusals::Refusals::default(),
        cancels: Arc::new(pg::cancel::Cancels::default()),
        cursor_bytes: (opts.memory_limit.0 / opts.max_connections.max(1) as u64).max(1 << 20),
        stale_after: opts.stale_after,
        secret,
        nats_url: opts.nats_url.clone(),
        stream: opts.stream.clone(),
        checked: Mutex::new(HashMap::new()),
    });

    // The listeners beyond loopback without TLS, for one warning.
    let in_the_clear: Vec<String> = [
        (opts.pg, "pgwire"),
        (opts.flight, "Flight SQL"),
        (opts.http, "HTTP"),
    ]
    .into_iter()
    .filter_map(|(listen, what)| match listen {
        Listen::On(addr) if !addr.ip().is_loopback() && (tls.is_none() || what == "HTTP") => {
            Some(format!("{what} on {addr}"))
        }
        _ => None,
    })
    .collect();
    if !in_the_clear.is_empty() {
        tracing::warn!(listeners = %in_the_clear.join(", "), "listening beyond loopback without TLS: passwords and rows cross the network in the clear (pgwire and Flight take --tls-cert/--tls-key; put HTTP behind a TLS proxy)");
    }
    let bind = async |listen: Listen, what: &'static str, flag: &'static str| match listen {
        Listen::Off => Ok(None),
        Listen::On(addr) => {
            TcpListener::bind(addr)
                .await
                .map(Some)
                .map_err(|cause| ServeError::Bind {
                    what,
                    flag,
                    addr,
                    cause,
                })
        }
    };
    let pg_listener = bind(opts.pg, "Postgres wire protocol", "pg-listen").await?;
    let flight_listener = bind(opts.flight, "Flight SQL", "flight-listen").await?;
    let http_listener = bind(opts.http, "HTTP", "http-listen").await?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    // Rows already on their way (suspended portals, Flight streams) see a
    // narrowed or removed account within one period, even with no query.
    let watched = Arc::clone(&shared.accounts);
    tasks.spawn(async move {
        loop {
            tokio::time::sleep(accounts::WATCH_PERIOD).await;
            watched.get();
        }
    });
    if let Some(l) = pg_listener {
        tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), tls = tls.is_some(), "serving the Postgres wire protocol (database tally)");
        let acceptor = tls
            .clone()
            .map(|c| tokio_rustls::TlsAcceptor::from(Arc::clone(&c)));
        tasks.spawn(accept_pg(
            l,
            Arc::clone(&shared),
            acceptor,
            opts.max_connections,
            stop_rx.clone(),
        ));
    }
    if let Some(l) = flight_listener {
        tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), tls = tls.is_some(), "serving Arrow Flight SQL");
        let shared = Arc::clone(&shared);
        let tls = opts.tls.clone();
        let gate = gate::Gate::new(opts.max_connections, opts.query_timeout);
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = flight::serve(l, shared, tls, gate, stopped).await {
                tracing::error!(error = %e, "Flight SQL server stopped");
            }
        });
    }
    if let Some(l) = http_listener {
        tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving HTTP (/healthz, /metrics)");
        let shared = Arc::clone(&shared);
        let gate = gate::Gate::new(opts.max_connections, opts.query_timeout);
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = http::serve(l, shared, gate, stopped).await {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        });
    }

    shutdown.await;
    tracing::info!("stopping: no new connections; running queries may finish");
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    while shared.metrics.in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tasks.abort_all();
    Ok(())
}

fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<tokio_rustls::rustls::ServerConfig>, ServeError> {
    use tokio_rustls::rustls;
    let fail = |cause: String| ServeError::Tls {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        cause,
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).map_err(|e| fail(e.to_string()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| fail(e.to_string()))?;
    if certs.is_empty() {
        return Err(fail("no certificate in the PEM file".into()));
    }
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).map_err(|e| fail(e.to_string()))?,
    ))
    .map_err(|e| fail(e.to_string()))?
    .ok_or_else(|| fail("no private key in the PEM file".into()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| fail(e.to_string()))?;
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Arc::new(config))
}

/// Answers a connection's startup packet with `message` (`53300`) and
/// closes it, holding no slot; a peer that sends no startup packet is
/// dropped after the login limit.
async fn refuse_pg(
    socket: tokio::net::TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    message: String,
) {
    let refuse = pg::RefuseHandlers(Arc::new(pg::Refuse(message)));
    let _ = tokio::time::timeout(
        AUTHENTICATION_TIMEOUT,
        pgwire::tokio::process_socket(socket, tls, refuse),
    )
    .await;
}

/// Accepts pgwire connections until stopped; past `max` open ones, a new
/// one is answered `53300 too many connections` and closed.
async fn accept_pg(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    max: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Retry: out of file descriptors and the like pass.
                tracing::warn!(error = %e, "pgwire accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        let tls = tls.clone();
        tokio::spawn(async move {
            let Some(_open) = shared.metrics.try_open(Protocol::Pg, max) else {
                tracing::warn!(%peer, max, "pgwire connection refused: too many connections");
                refuse_pg(socket, tls, format!(
                    "sorry, too many clients already: tally serve allows {max} connections (--max-connections); close idle ones or raise the limit"
                ))
                .await;
                return;
            };
            let conn = Arc::new(pg::Connection::new(Arc::clone(&shared)));
            let session =
                pgwire::tokio::process_socket(socket, tls, pg::Handlers(Arc::clone(&conn)));
            tokio::pin!(session);
            let login_by = tokio::time::sleep(AUTHENTICATION_TIMEOUT);
            tokio::pin!(login_by);
            let mut waiting_login = true;
            // The session ends when the client leaves, after a FATAL error
            // (even if the client keeps its socket open), or when it has
            // not logged in within the limit: it never holds a slot idly.
            let ended = loop {
                tokio::select! {
                    r = &mut session => break Some(r),
                    _ = conn.ended.notified() => {
                        // Let the error reach the client first.
                        let _ = tokio::time::timeout(FATAL_FLUSH, &mut session).await;
                        break None;
                    }
                    _ = &mut login_by, if waiting_login => {
                        if !conn.logged_in() {
                            tracing::debug!(%peer, "pgwire connection closed: no login within the limit");
                            break None;
                        }
                        waiting_login = false;
                    }
                }
            };
            if let Some(Err(e)) = ended {
                tracing::debug!(%peer, error = %e, "pgwire connection ended with an error");
            }
        });
    }
}
