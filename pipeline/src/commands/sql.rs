//! `tally sql`: one query over the views of a data location, printed in
//! the asked format; the query layer does the work.

use std::path::PathBuf;

use super::{CommandError, Globals};
use crate::query::{self, ByteSize, OutputFormat, QueryOptions, Session};

/// The arguments of `tally sql`.
#[derive(Debug, clap::Args)]
pub struct SqlArgs {
    /// The query; or use -f.
    pub(crate) query: Option<String>,
    /// Read the query from a file.
    #[arg(
        short = 'f',
        long = "file",
        conflicts_with = "query",
        env = "TALLY_SQL_FILE"
    )]
    pub(crate) file: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "table", env = "TALLY_SQL_FORMAT")]
    pub(crate) format: OutputFormat,
    /// More SQL views (one SELECT per `<name>.sql`), on top of the built-in
    /// queries/ views; a file named like a built-in view replaces it.
    #[arg(long, env = "TALLY_QUERIES_DIR")]
    pub(crate) queries: Option<PathBuf>,
    /// Memory the query may hold, in bytes or with K/M/G/T (powers of 1024),
    /// e.g. 512M; the default is a quarter of this machine's memory.
    #[arg(long, env = "TALLY_MEMORY_LIMIT", default_value_t = query::default_memory_limit())]
    pub(crate) memory_limit: ByteSize,
}

/// `tally sql`, from the command line.
pub(crate) async fn command(g: &Globals, a: &SqlArgs) -> Result<(), CommandError> {
    let SqlArgs {
        query: q,
        file,
        format,
        queries,
        memory_limit,
    } = a;
    let sql = match (q, file) {
        (Some(q), None) => q.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).map_err(|source| CommandError::Input {
            what: f.display().to_string(),
            source,
        })?,
        _ => String::new(),
    };
    if sql.trim().is_empty() {
        return Err(CommandError::Usage(
            "give a query, e.g. tally sql \"SELECT count(*) FROM events\", or -f FILE.sql".into(),
        ));
    }
    let opts = QueryOptions {
        scope: query::Scope::AllTenants,
        queries_dir: queries.clone(),
        memory_limit: *memory_limit,
    };
    let data = g.data.clone();
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
    let mut stdout = super::Stdout::new();
    match query::write_batches(&batches, *format, &mut stdout) {
        Err(_) if stdout.reader_gone => Ok(()),
        other => Ok(other?),
    }
}
