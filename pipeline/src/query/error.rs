//! Why a query failed: [`QueryError`], one variant per failing step, each
//! saying whether to retry, reject or give up, and [`classify`], which
//! sorts a DataFusion failure into the variant a user can act on.

use std::path::PathBuf;
use std::sync::Arc;

use datafusion::error::DataFusionError;
use datafusion::sql::sqlparser::parser::ParserError;

use super::guard::MAX_EXPR_DEPTH;
use super::{OPEN_ATTEMPTS, bounded, views};
use crate::store::checkpoint::CheckpointError;
use crate::store::parquet::ViewFilesError;

/// Why a query failed, each variant saying whether to retry, reject the
/// query (with its SQLSTATE in `tally serve`), or give up (fatal).
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// Fatal for the query (retry once `tally run` has started): no checkpoint.
    #[error(
        "no views in {} (no checkpoint.json): is --data / TALLY_DATA_DIR right? `tally run` creates them when it starts",
        dir.display()
    )]
    NoViews { dir: PathBuf },
    /// Fatal for the query: the view files cannot be listed.
    #[error(transparent)]
    ViewFiles(#[from] ViewFilesError),
    /// Fatal for the query: the location's partitions cannot be told.
    #[error(transparent)]
    Location(#[from] crate::store::DataDirError),
    /// Fatal for the query (retry once the worker has started): a
    /// partition of a partitioned location has no views yet.
    #[error(
        "partition {index} of {} has no views yet (no checkpoint): start its worker, `tally run --partitions {count} --partition {index}`",
        dir.display()
    )]
    NoPartition {
        dir: PathBuf,
        index: u32,
        count: u32,
    },
    /// Fatal for the query: partitions built with other settings cannot
    /// be one set of views.
    #[error(
        "partition {index} of {} was built with other settings ({found}) than partition 0 ({first}); give every worker the same settings file, and rebuild the one that differs with `tally replay --partitions N --partition {index}`",
        dir.display()
    )]
    PartitionSettings {
        dir: PathBuf,
        index: u32,
        first: String,
        found: String,
    },
    /// Fatal for the query: the checkpoint cannot be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Retry: the data directory kept changing while it was opened.
    #[error(
        "{} extends beyond the checkpoint (stream sequence {checkpoint_seq}) after {OPEN_ATTEMPTS} fresh reads of it: the data directory keeps changing while it is opened; try again (a restarted `tally run` repairs a directory left inconsistent)",
        path.display()
    )]
    Unsettled { path: PathBuf, checkpoint_seq: u64 },
    /// Retry: `tally replay` switched the data directory during each of
    /// the query's runs, so none of their answers can be given.
    #[error(
        "`tally replay` switched the data directory {} during each of {runs} runs of the query; run it again",
        dir.display()
    )]
    Switched { dir: PathBuf, runs: usize },
    /// Fatal: DataFusion cannot start.
    #[error("cannot set up the query engine: {0}")]
    Runtime(DataFusionError),
    /// Fatal for the session: a view cannot be registered.
    #[error("cannot register view {view}: {cause}")]
    Register {
        view: String,
        cause: DataFusionError,
    },
    /// Fatal: a `queries/` file cannot be read.
    #[error("cannot read {}: {cause}; check --queries / TALLY_QUERIES_DIR", path.display())]
    ReadQuery {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// Fatal: a `queries/` file has an invalid name.
    #[error(
        "{}: a view file must be named <name>.sql, with a lower-case name of letters, digits and _ (starting with a letter); rename it",
        path.display()
    )]
    ViewName { path: PathBuf },
    /// Fatal: a `queries/` view would hide a stored view.
    #[error(
        "{}: view {name} would hide the stored view of that name; rename the file",
        path.display()
    )]
    ShadowsStoredView { path: PathBuf, name: String },
    /// Fatal: a `queries/` view does not plan.
    #[error("view {name} from {origin} is not valid SQL over the views: {cause}")]
    QueryView {
        name: String,
        origin: views::Origin,
        cause: DataFusionError,
    },
    /// Reject (42501): the statement writes, defines or sets something.
    #[error(
        "refused: the views are read-only ({refused} is not allowed); send a query over the views instead (SELECT or WITH)"
    )]
    ReadOnly { refused: String },
    /// Reject (54001): the parser's recursion limit.
    #[error(
        "the query nests too deeply for the SQL parser ({cause}); flatten it, e.g. `x IN (a, b, c)` instead of nested conditions"
    )]
    TooDeep { cause: DataFusionError },
    /// Reject (54001): expressions deeper than [`MAX_EXPR_DEPTH`].
    #[error(
        "the query's expressions nest more than {MAX_EXPR_DEPTH} levels deep (a chain of {MAX_EXPR_DEPTH} operators, such as `a OR b OR ...`, is that deep); shorten it, e.g. `x IN (a, b, c)` instead of `x = a OR x = b OR x = c`, or split it"
    )]
    ExpressionTooDeep,
    /// Reject (54001): the statement is over a size limit of [`guard`].
    #[error(
        "the query is too large to plan: {why}; split it into several queries, or use IN lists and joins over fewer views"
    )]
    PlanTooLarge { why: String },
    /// Reject (53200): a function call over a bound of [`bounded`].
    #[error(
        "the query went over its budget: {0}; narrow it (smaller counts and lengths, filter first, LIMIT)"
    )]
    OverBudget(bounded::TooLarge),
    /// Reject (57014): the query, planning included, ran past its time.
    #[error(
        "the query ran longer than --query-timeout ({secs} s, planning included); narrow it (filter, LIMIT) or raise the timeout"
    )]
    Timeout { secs: u64 },
    /// Reject (XX000): a panic inside DataFusion, caught; only this query ends.
    #[error(
        "the query failed inside the query engine ({what}); only this query was affected: run it again or simplify it, and report it with the query if it keeps failing"
    )]
    Panicked { what: String },
    /// Fatal for the query: no thread for it (the machine is out of threads).
    #[error("cannot start the query thread: {0}")]
    Thread(std::io::Error),
    /// Fatal for the query: its thread ended without an answer (a bug).
    #[error(
        "the query thread stopped without an answer (a bug in Tally or DataFusion): run with RUST_BACKTRACE=1 and report it"
    )]
    ThreadLost,
    /// Reject (53200): the memory pool (`--memory-limit`) refused it.
    #[error(
        "the query went over the memory limit ({limit} bytes); narrow the query (filter, aggregate, LIMIT) or raise --memory-limit / TALLY_MEMORY_LIMIT. DataFusion said: {cause}"
    )]
    MemoryLimit { limit: u64, cause: DataFusionError },
    /// Retry (40001): files moved under the query twice; run it again.
    #[error(
        "a view file the query was reading vanished twice (compaction or a replay switch replaced it): {cause}; run the query again"
    )]
    FileGone { cause: DataFusionError },
    /// Reject: DataFusion refused or failed the query (the SQLSTATE says why).
    #[error("query failed: {}", described(.0))]
    Execute(DataFusionError),
    /// Fatal for the query: the output cannot be written.
    #[error("cannot write the result: {0}")]
    Output(String),
}

/// Every error in `e`'s chain of sources, `e` first.
fn chain(e: &DataFusionError) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
}

/// Sorts a DataFusion failure into what the user can act on.
pub(crate) fn classify(e: DataFusionError, memory_limit: u64) -> QueryError {
    let mut file_gone = false;
    let mut memory = false;
    let mut too_deep = false;
    let mut too_large = None;
    for cause in chain(&e) {
        if let Some(t) = cause.downcast_ref::<bounded::TooLarge>() {
            too_large.get_or_insert_with(|| bounded::TooLarge {
                function: t.function.clone(),
                what: t.what.clone(),
            });
        }
        let df = cause.downcast_ref::<DataFusionError>().or_else(|| {
            cause
                .downcast_ref::<Arc<DataFusionError>>()
                .map(AsRef::as_ref)
        });
        match df {
            Some(DataFusionError::ResourcesExhausted(_)) => memory = true,
            Some(DataFusionError::SQL(p, _)) => {
                too_deep |= matches!(**p, ParserError::RecursionLimitExceeded);
            }
            _ => {}
        }
        if let Some(datafusion::object_store::Error::NotFound { .. }) = cause.downcast_ref() {
            file_gone = true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            file_gone |= io.kind() == std::io::ErrorKind::NotFound;
        }
    }
    if let Some(t) = too_large {
        QueryError::OverBudget(t)
    } else if memory {
        QueryError::MemoryLimit {
            limit: memory_limit,
            cause: e,
        }
    } else if too_deep {
        QueryError::TooDeep { cause: e }
    } else if file_gone {
        QueryError::FileGone { cause: e }
    } else {
        QueryError::Execute(e)
    }
}

/// DataFusion's error as a user reads it: a parser error by its message
/// (DataFusion shows the parser's debug form, `ParserError("...")`).
fn described(e: &DataFusionError) -> String {
    match e.find_root() {
        DataFusionError::SQL(p, _) => match &**p {
            ParserError::ParserError(m) | ParserError::TokenizerError(m) => {
                format!("syntax error: {m}")
            }
            ParserError::RecursionLimitExceeded => e.to_string(),
        },
        _ => e.to_string(),
    }
}
