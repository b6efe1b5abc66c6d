//! `tally serve`: the command line of the server of [`crate::serve`].

use std::path::PathBuf;
use std::time::Duration;

use super::{CommandError, Globals};
use crate::query::{self, ByteSize};
use crate::runtime;
use crate::serve;

/// The arguments of `tally serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Postgres wire protocol address, or `off`.
    #[arg(long, env = "TALLY_PG_LISTEN", default_value = serve::DEFAULT_PG_LISTEN)]
    pub(crate) pg_listen: serve::Listen,
    /// Arrow Flight SQL address, or `off`.
    #[arg(long, env = "TALLY_FLIGHT_LISTEN", default_value = serve::DEFAULT_FLIGHT_LISTEN)]
    pub(crate) flight_listen: serve::Listen,
    /// HTTP address (/healthz, /metrics), or `off`.
    #[arg(long, env = "TALLY_HTTP_LISTEN", default_value = serve::DEFAULT_HTTP_LISTEN)]
    pub(crate) http_listen: serve::Listen,
    /// The accounts (`tally users` edits it).
    #[arg(long, env = "TALLY_USERS_FILE", default_value = serve::accounts::DEFAULT_USERS_FILE)]
    pub(crate) users: PathBuf,
    /// TLS certificate (PEM) for pgwire and Flight SQL; with --tls-key.
    #[arg(long, env = "TALLY_TLS_CERT")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); with --tls-cert.
    #[arg(long, env = "TALLY_TLS_KEY")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Seconds a query may run before it is cancelled.
    #[arg(long, env = "TALLY_QUERY_TIMEOUT", default_value_t = serve::DEFAULT_QUERY_TIMEOUT_SECS)]
    pub(crate) query_timeout: u64,
    /// Open pgwire connections allowed; one more is refused.
    #[arg(long, env = "TALLY_MAX_CONNECTIONS", default_value_t = serve::DEFAULT_MAX_CONNECTIONS)]
    pub(crate) max_connections: usize,
    /// Logged-in pgwire connections one account may hold, so that no account takes every slot; default half of --max-connections.
    #[arg(long, env = "TALLY_MAX_CONNECTIONS_PER_ACCOUNT")]
    pub(crate) max_connections_per_account: Option<usize>,
    /// Memory all queries together may hold (bytes, or with K/M/G/T); default a quarter of RAM.
    #[arg(long, env = "TALLY_MEMORY_LIMIT", default_value_t = query::default_memory_limit())]
    pub(crate) memory_limit: ByteSize,
    /// `/healthz` fails when the checkpoint is more than this many seconds behind the stream's last message.
    #[arg(long, env = "TALLY_STALE_AFTER", default_value_t = serve::DEFAULT_STALE_AFTER_SECS)]
    pub(crate) stale_after: u64,
    /// More SQL views, as for `tally sql --queries`.
    #[arg(long, env = "TALLY_QUERIES_DIR")]
    pub(crate) queries: Option<PathBuf>,
}

/// `tally serve`, from the command line.
pub(crate) async fn command(g: &Globals, a: &ServeArgs) -> Result<(), CommandError> {
    let ServeArgs {
        pg_listen,
        flight_listen,
        http_listen,
        users,
        tls_cert,
        tls_key,
        query_timeout,
        max_connections,
        max_connections_per_account,
        memory_limit,
        stale_after,
        queries,
    } = a;
    let tls = match (tls_cert, tls_key) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        (None, None) => None,
        _ => return Err(serve::ServeError::TlsHalf.into()),
    };
    let opts = serve::ServeOptions {
        data_dir: g.data.clone(),
        queries_dir: queries.clone(),
        users_file: users.clone(),
        pg: *pg_listen,
        flight: *flight_listen,
        http: *http_listen,
        tls,
        query_timeout: Duration::from_secs((*query_timeout).max(1)),
        max_connections: *max_connections,
        max_connections_per_account: max_connections_per_account
            .unwrap_or_else(|| serve::slots::default_per_account(*max_connections)),
        memory_limit: *memory_limit,
        stale_after: Duration::from_secs(*stale_after),
        nats_url: g.nats.clone(),
        stream: g.stream.clone(),
    };
    let mut stop = runtime::shutdown_signal();
    serve::serve(&opts, async move {
        let _ = stop.wait_for(|s| *s).await;
    })
    .await?;
    Ok(())
}
