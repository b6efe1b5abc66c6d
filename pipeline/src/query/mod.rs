//! SQL over the views, with DataFusion, read-only.
//!
//! A [`Session`] reads one checkpoint and registers, for every view, exactly
//! the Parquet files that checkpoint covers ([`ViewDir::files`] with
//! `last_seq <= checkpoint`, never a directory glob): files a crashed batch
//! left beyond the checkpoint, and compaction leftovers, are never read, and
//! a file that vanishes before it is read fails the query, which is then
//! run once more on the newer checkpoint ([`table`], [`Session::query`]).
//! The `queries/*.sql` views (compiled in, see [`views`]) are registered on
//! top, and `_tally_clock` says which checkpoint the answers cover.
//!
//! User SQL is planned first and refused if the plan holds DDL, DML, COPY or
//! a statement (`SET`, transactions, `PREPARE`); DataFusion's URL tables are
//! off, so nothing outside the views can be read or written. `SHOW` and
//! `DESCRIBE` plan to queries over `information_schema`, which is on.
//! Queries run under a memory pool (`--memory-limit`), their results
//! included; every function call is bounded ([`bounded`]); statements too
//! deep or too large to plan quickly are refused before planning
//! ([`guard`]). Below those limits, DataFusion's recursion protection and
//! the large stacks of [`on_query_threads`] and [`isolated`] keep its
//! recursive planner within bounds, and [`isolated`] keeps one query's
//! planning, panics and timeout away from every other; a query dropped
//! (its time ran out, its client left) stops its operators at their next
//! batch ([`cancel`]).
//!
//! The rooms: this file opens sessions (one checkpoint, or every
//! partition's) and registers the stored views; [`error`] says why a query
//! failed; [`execute`] plans and runs one statement on its threads;
//! [`system`] builds the `_tally_*` tables; [`scope`] is what a tenant
//! account sees; [`table`] keeps a checkpoint's files exact; [`views`] adds
//! the `queries/` views; [`guard`], [`bounded`] and [`memory`] are the
//! limits; [`cancel`] stops what is no longer wanted.

pub mod bounded;
mod cancel;
mod error;
mod execute;
pub mod format;
pub mod guard;
pub mod memory;
pub mod scope;
mod system;
pub mod table;
pub mod view_name;
pub mod views;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::DataFusionError;
use datafusion::execution::context::{SessionConfig, SessionContext};
use datafusion::execution::runtime_env::RuntimeEnv;

use crate::operator::{self, Storage};
use crate::store::checkpoint::{Checkpoint, CheckpointError};
use crate::store::parquet::{ViewDir, ViewFilesError};
use crate::store::remote::{Location, Manifest};

pub use error::QueryError;
pub(crate) use error::classify;
pub use execute::{
    QUERY_STACK_BYTES, execute_optimized, execute_plan, isolated, on_query_threads, optimize,
    plan_statement, reads_the_clock, run,
};
pub use format::{OutputFormat, write_batches};
pub use memory::{ByteSize, default_memory_limit};
pub use scope::Scope;
pub use system::{CATALOG, CLOCK_TABLE, GAPS_TABLE, PARTITIONS_TABLE};
use system::{
    POSITIONED, SCOPED, deregister, register_clock, register_gaps, scoped_clock, tenant_positions,
};
pub use views::Replaced;

/// Attempts to open a session whose checkpoint and files agree (see
/// [`Session::open`]): each retry follows a newer checkpoint, and two
/// commits of `tally run` during one listing are already rare.
const OPEN_ATTEMPTS: usize = 3;

/// How many times a query whose files moved under it (compaction, a
/// replay's switch) runs again on a session opened anew: once is nearly
/// always enough, and three such races in a row do not happen while
/// compaction runs every few seconds.
const GONE_RERUNS: usize = 3;

/// How to open sessions.
#[derive(Debug, Clone)]
pub struct QueryOptions {
    /// Extra `<name>.sql` views, replacing built-in ones of the same name.
    pub queries_dir: Option<PathBuf>,
    /// Bytes the query operators may hold (DataFusion memory pool).
    pub memory_limit: ByteSize,
    /// Which tenants' rows the stored views hold for this session.
    pub scope: Scope,
}

/// A DataFusion session over one checkpoint of a data directory.
pub struct Session {
    pub ctx: SessionContext,
    /// The checkpoint the session reads: every answer covers exactly the
    /// stream up to this sequence.
    pub checkpoint_seq: u64,
    /// Views of the queries directory that replace a built-in one.
    pub replaced: Vec<Replaced>,
    /// Which directories the session's files were listed in (see
    /// [`Dirs`]).
    pub dirs: Dirs,
    data_dir: PathBuf,
    opts: QueryOptions,
    runtime: Arc<RuntimeEnv>,
}

/// The identity (device, inode) of each local data directory a session
/// reads, taken before its checkpoint was read.
///
/// The session names its files by path, and `tally replay` exchanges the
/// directory under a path: after the switch, a path the session listed may
/// name another file of the same name (file names follow stream sequences)
/// with other contents. A session whose directories are no longer the ones
/// at their paths ([`Dirs::switched`]) must not answer; its answer, error
/// or rows, is dropped and the query runs again on a session opened anew.
/// Object-storage locations are named by their manifests and need no
/// identity.
///
/// Each directory is also held open while the session lives: a directory
/// removed after a switch keeps its inode, so no later directory at the
/// path can be given the same number and pass for it.
#[derive(Debug, Clone, Default)]
pub struct Dirs(Vec<Held>);

/// One directory of [`Dirs`].
#[derive(Debug, Clone)]
struct Held {
    path: PathBuf,
    /// (device, inode) when the session listed it.
    id: Option<(u64, u64)>,
    /// Keeps the inode allocated while the session lives.
    _open: Option<Arc<std::fs::File>>,
}

impl Dirs {
    /// (device, inode) of a directory's metadata, if it could be read.
    fn identity(meta: std::io::Result<std::fs::Metadata>) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        meta.ok().map(|m| (m.dev(), m.ino()))
    }

    fn of(dirs: &[&Path]) -> Dirs {
        Dirs(
            dirs.iter()
                .map(|d| {
                    // The identity is the held directory's own (fstat), so
                    // an exchange right after the open shows as a switch.
                    let open = std::fs::File::open(d).ok();
                    let id = open.as_ref().and_then(|f| Dirs::identity(f.metadata()));
                    Held {
                        path: d.to_path_buf(),
                        id,
                        _open: open.map(Arc::new),
                    }
                })
                .collect(),
        )
    }

    /// Whether a directory was exchanged (or removed) since the session
    /// listed its files: one `stat` per directory.
    pub fn switched(&self) -> bool {
        self.0
            .iter()
            .any(|h| Dirs::identity(std::fs::metadata(&h.path)) != h.id)
    }
}

/// The checkpoint and the view files disagree: a file extends beyond it.
struct Moved {
    path: PathBuf,
}

enum OpenError {
    Moved(Moved),
    Failed(QueryError),
}

impl From<QueryError> for OpenError {
    fn from(e: QueryError) -> OpenError {
        OpenError::Failed(e)
    }
}

impl From<ViewFilesError> for OpenError {
    fn from(e: ViewFilesError) -> OpenError {
        OpenError::Failed(e.into())
    }
}

impl Session {
    /// Reads the checkpoint of `data_dir` once and registers every view as of
    /// it. A file that starts within the checkpoint but ends beyond it means
    /// compaction merged batches committed after the checkpoint was read;
    /// then the checkpoint is read again.
    pub async fn open(data_dir: &Path, opts: &QueryOptions) -> Result<Session, QueryError> {
        let runtime = memory::runtime_env(opts.memory_limit)?;
        Session::open_with(data_dir, opts, runtime).await
    }

    /// [`Session::open`] with a runtime (and so a memory pool) shared with
    /// other sessions, as `tally serve` shares one among all its queries.
    pub async fn open_with(
        data_dir: &Path,
        opts: &QueryOptions,
        runtime: Arc<RuntimeEnv>,
    ) -> Result<Session, QueryError> {
        let remote = Location::parse(data_dir).map_err(CheckpointError::from)?;
        Session::open_in(data_dir, remote.as_ref(), opts, runtime).await
    }

    /// [`Session::open_with`] with the `s3://` location `data_dir` names
    /// already parsed (`tally serve` keeps one client, and its connections,
    /// for its life).
    pub async fn open_in(
        data_dir: &Path,
        remote: Option<&Location>,
        opts: &QueryOptions,
        runtime: Arc<RuntimeEnv>,
    ) -> Result<Session, QueryError> {
        if let Some(loc) = remote {
            let Some((manifest, _)) = loc.manifest().await.map_err(CheckpointError::from)? else {
                // No checkpoint at the root: a partitioned location?
                if let Some(count) = crate::store::partitions_at(data_dir, remote).await? {
                    return Session::open_partitions(data_dir, count, remote, opts, runtime).await;
                }
                // A missing bucket reads as no manifest too: say which it is.
                loc.probe().await.map_err(CheckpointError::from)?;
                return Err(QueryError::NoViews {
                    dir: data_dir.to_path_buf(),
                });
            };
            register_store(&runtime, loc)?;
            let files = Files::Remote(loc, &manifest);
            return match open_at(&files, &manifest.checkpoint, opts, Arc::clone(&runtime)).await {
                Ok((ctx, replaced)) => Ok(Session {
                    ctx,
                    checkpoint_seq: manifest.checkpoint.last_seq,
                    replaced,
                    dirs: Dirs::default(),
                    data_dir: data_dir.to_path_buf(),
                    opts: opts.clone(),
                    runtime,
                }),
                // A manifest names every object exactly: nothing can extend
                // beyond it.
                Err(OpenError::Moved(m)) => Err(QueryError::Unsettled {
                    path: m.path,
                    checkpoint_seq: manifest.checkpoint.last_seq,
                }),
                Err(OpenError::Failed(e)) => Err(e),
            };
        }
        let mut moved = None;
        for _ in 0..OPEN_ATTEMPTS {
            let dirs = Dirs::of(&[data_dir]);
            let Some(checkpoint) = Checkpoint::load(data_dir)? else {
                if let Some(count) = crate::store::partitions_at(data_dir, remote).await? {
                    return Session::open_partitions(data_dir, count, remote, opts, runtime).await;
                }
                return Err(QueryError::NoViews {
                    dir: data_dir.to_path_buf(),
                });
            };
            match open_at(
                &Files::Local(data_dir),
                &checkpoint,
                opts,
                Arc::clone(&runtime),
            )
            .await
            {
                Ok((ctx, replaced)) => {
                    return Ok(Session {
                        ctx,
                        checkpoint_seq: checkpoint.last_seq,
                        replaced,
                        dirs,
                        data_dir: data_dir.to_path_buf(),
                        opts: opts.clone(),
                        runtime,
                    });
                }
                Err(OpenError::Moved(m)) => moved = Some((m.path, checkpoint.last_seq)),
                Err(OpenError::Failed(e)) => return Err(e),
            }
        }
        let (path, checkpoint_seq) = moved.unwrap_or_default();
        Err(QueryError::Unsettled {
            path,
            checkpoint_seq,
        })
    }

    /// [`Session::open_in`] on a location partitioned into `count`: every
    /// partition's checkpoint is read once, and the views are their union
    /// (see [`open_partitioned`]).
    async fn open_partitions(
        data_dir: &Path,
        count: u32,
        remote: Option<&Location>,
        opts: &QueryOptions,
        runtime: Arc<RuntimeEnv>,
    ) -> Result<Session, QueryError> {
        if let Some(loc) = remote {
            register_store(&runtime, loc)?;
        }
        let dirs: Vec<PathBuf> = (0..count)
            .map(|k| crate::store::partition_location(data_dir, k))
            .collect();
        let locations: Vec<Option<Location>> = (0..count)
            .map(|k| crate::store::partition_remote(remote, k))
            .collect();
        let no_partition = |index: u32| QueryError::NoPartition {
            dir: data_dir.to_path_buf(),
            index,
            count,
        };
        let mut moved = None;
        for _ in 0..OPEN_ATTEMPTS {
            let local: Vec<&Path> = dirs
                .iter()
                .zip(&locations)
                .filter(|(_, loc)| loc.is_none())
                .map(|(d, _)| d.as_path())
                .collect();
            let identities = Dirs::of(&local);
            let mut manifests = Vec::with_capacity(dirs.len());
            let mut checkpoints = Vec::with_capacity(dirs.len());
            for (k, (dir, loc)) in (0..count).zip(dirs.iter().zip(&locations)) {
                match loc {
                    Some(loc) => {
                        let (m, _) = loc
                            .manifest()
                            .await
                            .map_err(CheckpointError::from)?
                            .ok_or_else(|| no_partition(k))?;
                        checkpoints.push(m.checkpoint.clone());
                        manifests.push(Some(m));
                    }
                    None => {
                        checkpoints.push(Checkpoint::load(dir)?.ok_or_else(|| no_partition(k))?);
                        manifests.push(None);
                    }
                }
            }
            let parts: Vec<(Files<'_>, Checkpoint)> = dirs
                .iter()
                .zip(&locations)
                .zip(&manifests)
                .zip(checkpoints)
                .map(|(((dir, loc), manifest), cp)| {
                    let files = match (loc, manifest) {
                        (Some(loc), Some(m)) => Files::Remote(loc, m),
                        _ => Files::Local(dir),
                    };
                    (files, cp)
                })
                .collect();
            // One set of views needs one set of settings.
            let first = parts.first().map(|(_, cp)| &cp.settings);
            if let Some(k) = parts
                .iter()
                .position(|(_, cp)| first.is_some_and(|f| *f != cp.settings))
            {
                return Err(QueryError::PartitionSettings {
                    dir: data_dir.to_path_buf(),
                    index: u32::try_from(k).unwrap_or(u32::MAX),
                    first: first.map(|f| f.fingerprint()).unwrap_or_default(),
                    found: parts
                        .get(k)
                        .map(|(_, cp)| cp.settings.fingerprint())
                        .unwrap_or_default(),
                });
            }
            let checkpoint_seq = parts.iter().map(|(_, cp)| cp.last_seq).min().unwrap_or(0);
            match open_partitioned(&parts, opts, Arc::clone(&runtime)).await {
                Ok((ctx, replaced)) => {
                    return Ok(Session {
                        ctx,
                        checkpoint_seq,
                        replaced,
                        dirs: identities,
                        data_dir: data_dir.to_path_buf(),
                        opts: opts.clone(),
                        runtime,
                    });
                }
                Err(OpenError::Moved(m)) => moved = Some((m.path, checkpoint_seq)),
                Err(OpenError::Failed(e)) => return Err(e),
            }
        }
        let (path, checkpoint_seq) = moved.unwrap_or_default();
        Err(QueryError::Unsettled {
            path,
            checkpoint_seq,
        })
    }

    /// Runs one read-only statement and collects its rows, on a session
    /// opened anew as long as [`rerun`] says so.
    pub async fn query(&mut self, sql: &str) -> Result<Vec<RecordBatch>, QueryError> {
        let mut reruns = 0;
        loop {
            let answer = run(&self.ctx, sql, self.opts.memory_limit).await;
            if !rerun(&answer, &self.dirs, reruns, &self.data_dir)? {
                return answer;
            }
            reruns += 1;
            *self =
                Session::open_with(&self.data_dir, &self.opts, Arc::clone(&self.runtime)).await?;
        }
    }
}

/// Whether the answer of a run on a session reading `dirs` of `data_dir`,
/// after `reruns` runs again, must be dropped and the query run once more
/// on a session opened anew: a file the plan lists vanished before it was
/// read (compaction merged it), or `tally replay` switched a directory
/// while it ran (whatever it answered). At most [`GONE_RERUNS`] times; a
/// switch after the last is [`QueryError::Switched`], never an answer.
pub fn rerun<T>(
    answer: &Result<T, QueryError>,
    dirs: &Dirs,
    reruns: usize,
    data_dir: &Path,
) -> Result<bool, QueryError> {
    let switched = dirs.switched();
    if !switched && !matches!(answer, Err(QueryError::FileGone { .. })) {
        return Ok(false);
    }
    if reruns < GONE_RERUNS {
        return Ok(true);
    }
    if switched {
        return Err(QueryError::Switched {
            dir: data_dir.to_path_buf(),
            runs: reruns + 1,
        });
    }
    Ok(false)
}

/// Lets `runtime` read the bucket of the `s3://` location `loc`.
fn register_store(runtime: &RuntimeEnv, loc: &Location) -> Result<(), QueryError> {
    let url =
        datafusion::execution::object_store::ObjectStoreUrl::parse(format!("s3://{}", loc.bucket))
            .map_err(|cause| QueryError::Register {
                view: "(object store)".into(),
                cause,
            })?;
    runtime.register_object_store(url.as_ref(), Arc::clone(&loc.store));
    Ok(())
}

/// Where a session finds the files of a checkpoint.
enum Files<'a> {
    /// A data directory: its listing, as of the checkpoint.
    Local(&'a Path),
    /// An object-storage location: the objects its manifest names.
    Remote(&'a Location, &'a Manifest),
}

async fn open_at(
    data_dir: &Files<'_>,
    checkpoint: &Checkpoint,
    opts: &QueryOptions,
    runtime: Arc<RuntimeEnv>,
) -> Result<(SessionContext, Vec<Replaced>), OpenError> {
    let ctx = new_context(runtime);
    let scoped = opts.scope != Scope::AllTenants;
    register_clock(&ctx, checkpoint, CLOCK_TABLE)?;
    register_gaps(&ctx, checkpoint, scoped, GAPS_TABLE)?;
    let names = Names {
        prefix: String::new(),
        clock: CLOCK_TABLE.to_owned(),
        positions: scoped,
    };
    let (stored, positioned) = register_views(&ctx, data_dir, checkpoint, opts, &names).await?;
    let stored: Vec<&'static str> = stored.iter().map(|s| s.view).collect();
    if scoped {
        tenant_positions(&ctx, &positioned).await?;
        scoped_clock(&ctx).await?;
    }
    let (sql_views, replaced) = views::view_sql(opts.queries_dir.as_deref(), &stored)?;
    views::register(&ctx, &sql_views).await?;
    Ok((ctx, replaced))
}

/// A session context with the functions the views may call.
fn new_context(runtime: Arc<RuntimeEnv>) -> SessionContext {
    // The catalog is named like the database clients connect to.
    let config = SessionConfig::new()
        .with_information_schema(true)
        .with_default_catalog_and_schema(CATALOG, "public");
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    // Before any view is defined: a view holds the functions it calls.
    bounded::bound_functions(&ctx);
    ctx
}

/// The names one checkpoint's views are registered under.
struct Names {
    /// Before every table's name: "" for a location of the whole stream,
    /// `_p<k>_` for partition k of a partitioned one.
    prefix: String,
    /// The clock table `is_final` reads.
    clock: String,
    /// Register the views with stream sequences under [`SCOPED`] names,
    /// for [`tenant_positions`] to define.
    positions: bool,
}

/// A stored view as [`register_views`] registered it.
struct Stored {
    view: &'static str,
    schema: SchemaRef,
    /// Whether it has a `_<view>_versions` table.
    versioned: bool,
}

/// Registers the views of one checkpoint (the rows of `files` it covers)
/// under `names`: every stored view, and the `_<view>_versions` table of
/// each versioned one for all-tenant sessions. Returns the stored views
/// and, with `names.positions`, the views whose sequences become positions.
async fn register_views(
    ctx: &SessionContext,
    data_dir: &Files<'_>,
    checkpoint: &Checkpoint,
    opts: &QueryOptions,
    names: &Names,
) -> Result<(Vec<Stored>, Vec<(&'static str, SchemaRef)>), OpenError> {
    let settings = &checkpoint.settings;
    let scoped = opts.scope != Scope::AllTenants;
    let prefix = names.prefix.as_str();
    let clock = names.clock.as_str();
    // What each operator stores, taken before any await: operators are not
    // `Sync`, and a session opens inside `Send` futures (`tally serve`).
    let stores: Vec<(&'static str, Storage, SchemaRef)> = operator::registry(settings)
        .iter()
        .map(|op| (op.view(), op.storage(), op.schema()))
        .collect();
    let mut stored = Vec::with_capacity(stores.len());
    // For a tenant account, the views with stream positions are defined
    // once all are registered (see `tenant_positions`).
    let mut positioned: Vec<(&'static str, SchemaRef)> = Vec::new();
    for (view, storage, schema) in stores {
        stored.push(Stored {
            view,
            schema: Arc::clone(&schema),
            versioned: matches!(storage, Storage::Versioned { .. }),
        });
        let upto = checkpoint.last_seq;
        let name = if names.positions && POSITIONED.contains(&view) {
            positioned.push((view, Arc::clone(&schema)));
            format!("{SCOPED}{view}")
        } else {
            format!("{prefix}{view}")
        };
        match storage {
            Storage::Append => register_files(
                ctx,
                data_dir,
                upto,
                view,
                &name,
                Arc::clone(&schema),
                &opts.scope,
            )?,
            storage @ Storage::Versioned {
                key,
                final_column,
                deleted_column,
                ..
            } => {
                // Quoted: a column may be a keyword (`usage_by_dimension.group`).
                let quote = |c: &str| format!("\"{c}\"");
                let columns: Vec<String> = storage
                    .public_columns(&schema)
                    .iter()
                    .map(|c| quote(c))
                    .collect();
                let columns = columns.join(", ");
                let versions = format!("_{prefix}{view}_versions");
                let refs = checkpoint_refs(data_dir, upto, view)?;
                // A snapshot first (each key once, nothing older counts):
                // its rows are taken as they are, and versions are resolved
                // only against the files after it.
                let layout = match refs.first() {
                    Some(first) if first.unique_keys().await => {
                        if refs.len() == 1 {
                            Layout::Snapshot
                        } else {
                            Layout::SnapshotAndNewer
                        }
                    }
                    _ => Layout::Versions,
                };
                let base = format!("_{prefix}{view}_snapshot");
                let newer = format!("_{prefix}{view}_newer");
                if layout != Layout::Versions {
                    register_refs(
                        ctx,
                        refs[..1].to_vec(),
                        view,
                        &base,
                        Arc::clone(&schema),
                        &opts.scope,
                    )?;
                }
                if layout == Layout::SnapshotAndNewer {
                    register_refs(
                        ctx,
                        refs[1..].to_vec(),
                        view,
                        &newer,
                        Arc::clone(&schema),
                        &opts.scope,
                    )?;
                }
                register_refs(ctx, refs, view, &versions, Arc::clone(&schema), &opts.scope)?;
                let is_final = final_column
                    .map(|c| format!(", COALESCE({c} <= (SELECT final_before FROM {clock}), false) AS is_final"))
                    .unwrap_or_default();
                let deleted = deleted_column
                    .map(|c| format!(" WHERE NOT {c}"))
                    .unwrap_or_default();
                let current = current_rows(layout, key, &schema, &versions, &base, &newer);
                let latest = format!("SELECT {columns}{is_final} FROM ({current}){deleted}");
                let sql = format!("CREATE VIEW {name} AS {latest}");
                ctx.sql(&sql).await.map_err(|cause| QueryError::Register {
                    view: view.to_owned(),
                    cause,
                })?;
                // The view keeps the tables it reads; the snapshot and the
                // newer files are a layout of `_{view}_versions`, not
                // tables of their own.
                if layout != Layout::Versions {
                    deregister(ctx, &base)?;
                }
                if layout == Layout::SnapshotAndNewer {
                    deregister(ctx, &newer)?;
                }
                if scoped {
                    // `_seq` is a stream position: the account does not
                    // see the versions.
                    deregister(ctx, &versions)?;
                }
            }
        }
    }
    Ok((stored, positioned))
}

/// Opens a partitioned location's partitions, each at its own checkpoint
/// (`parts[k]` is partition k), as one set of views: each stored view is
/// the union of the partitions' rows, every partition's `is_final` by its
/// own clock. The catalog's rows (tenant `_system`), which every partition
/// keeps, are taken from partition 0 only. `_tally_clock` is the
/// deployment's frontier (the least clock and checkpoint of the
/// partitions the session sees) and `_tally_partitions` has a row per
/// partition; `_tally_gaps` is every partition's gaps.
async fn open_partitioned(
    parts: &[(Files<'_>, Checkpoint)],
    opts: &QueryOptions,
    runtime: Arc<RuntimeEnv>,
) -> Result<(SessionContext, Vec<Replaced>), OpenError> {
    let ctx = new_context(runtime);
    let scoped = opts.scope != Scope::AllTenants;
    let count = u32::try_from(parts.len()).unwrap_or(u32::MAX);
    // A tenant account sees the partitions of its tenants only: another
    // partition's clock is other tenants' time.
    let seen: Vec<usize> = (0..parts.len())
        .filter(|k| match &opts.scope {
            Scope::AllTenants => true,
            // The catalog's rows are read from partition 0.
            Scope::Tenants(ts) => ts.iter().any(|t| {
                let p = if t == crate::event::partition::SYSTEM_TENANT {
                    0
                } else {
                    crate::event::partition::partition_of(t, count)
                };
                usize::try_from(p) == Ok(*k)
            }),
        })
        .collect();
    let mut schemas: Vec<Stored> = Vec::new();
    for (k, (files, cp)) in parts.iter().enumerate() {
        let prefix = format!("_p{k}_");
        let clock = format!("{prefix}tally_clock");
        register_clock(&ctx, cp, &clock)?;
        register_gaps(&ctx, cp, scoped, &format!("{prefix}tally_gaps"))?;
        let names = Names {
            prefix,
            clock,
            positions: false,
        };
        let (views, _) = register_views(&ctx, files, cp, opts, &names).await?;
        if schemas.is_empty() {
            schemas = views;
        }
    }
    let reg = |view: &str| {
        let view = view.to_owned();
        move |cause| QueryError::Register { view, cause }
    };
    // Every partition's table `table(k)`; the catalog's rows from partition 0.
    let union = |table: &dyn Fn(usize) -> String, has_tenant: bool| {
        (0..parts.len())
            .map(|k| {
                let only_own = if has_tenant && k != 0 {
                    format!(
                        " WHERE tenant <> '{}'",
                        crate::event::partition::SYSTEM_TENANT
                    )
                } else {
                    String::new()
                };
                format!("SELECT * FROM {}{only_own}", table(k))
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ")
    };
    let mut positioned = Vec::new();
    for Stored {
        view,
        schema,
        versioned,
    } in &schemas
    {
        let has_tenant = schema.field_with_name("tenant").is_ok();
        let name = if scoped && POSITIONED.contains(view) {
            positioned.push((*view, Arc::clone(schema)));
            format!("{SCOPED}{view}")
        } else {
            (*view).to_owned()
        };
        let sql = format!(
            "CREATE VIEW {name} AS {}",
            union(&|k| format!("_p{k}_{view}"), has_tenant)
        );
        ctx.sql(&sql).await.map_err(reg(view))?;
        if *versioned && !scoped {
            let sql = format!(
                "CREATE VIEW _{view}_versions AS {}",
                union(&|k| format!("__p{k}_{view}_versions"), has_tenant)
            );
            ctx.sql(&sql).await.map_err(reg(view))?;
        }
    }
    // A stream sequence counts every tenant's messages: a tenant account
    // gets its own position in `_tally_clock` instead (see `scoped_clock`).
    let checkpoint_seq = if scoped {
        "CAST(NULL AS BIGINT UNSIGNED)"
    } else {
        "checkpoint_seq"
    };
    let rows: Vec<String> = seen
        .iter()
        .map(|k| {
            format!(
                "SELECT CAST({k} AS INT) AS partition, CAST({count} AS INT) AS partitions, stream_clock, final_before, {checkpoint_seq} AS checkpoint_seq FROM _p{k}_tally_clock"
            )
        })
        .collect();
    ctx.sql(&format!(
        "CREATE VIEW {PARTITIONS_TABLE} AS {}",
        rows.join(" UNION ALL ")
    ))
    .await
    .map_err(reg(PARTITIONS_TABLE))?;
    ctx.sql(&format!(
        "CREATE VIEW {CLOCK_TABLE} AS SELECT min(stream_clock) AS stream_clock, \
         min(final_before) AS final_before, min(checkpoint_seq) AS checkpoint_seq FROM {PARTITIONS_TABLE}"
    ))
    .await
    .map_err(reg(CLOCK_TABLE))?;
    let gaps: Vec<String> = seen
        .iter()
        .map(|k| format!("SELECT CAST({k} AS INT) AS partition, * FROM _p{k}_tally_gaps"))
        .collect();
    ctx.sql(&format!(
        "CREATE VIEW {GAPS_TABLE} AS {}",
        gaps.join(" UNION ALL ")
    ))
    .await
    .map_err(reg(GAPS_TABLE))?;
    // The partitions' own tables are read through the union only.
    for k in 0..parts.len() {
        for name in [format!("_p{k}_tally_clock"), format!("_p{k}_tally_gaps")] {
            deregister(&ctx, &name)?;
        }
        for Stored {
            view, versioned, ..
        } in &schemas
        {
            deregister(&ctx, &format!("_p{k}_{view}"))?;
            if *versioned && !scoped {
                deregister(&ctx, &format!("__p{k}_{view}_versions"))?;
            }
        }
    }
    if scoped {
        tenant_positions(&ctx, &positioned).await?;
        scoped_clock(&ctx).await?;
    }
    let stored: Vec<&'static str> = schemas.iter().map(|s| s.view).collect();
    let (sql_views, replaced) = views::view_sql(opts.queries_dir.as_deref(), &stored)?;
    views::register(&ctx, &sql_views).await?;
    Ok((ctx, replaced))
}

/// How a versioned view's files resolve into its current rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Any files: the latest version of each key over all of them.
    Versions,
    /// One snapshot: its rows.
    Snapshot,
    /// A snapshot, then newer files: the snapshot's rows whose key no newer
    /// file has, and the latest version of each key of the newer files.
    SnapshotAndNewer,
}

/// The SQL of a versioned view's current rows (every stored column,
/// deleted rows included) under `layout`.
///
/// Resolving versions over the whole table sorts it by key: seconds for a
/// few million rows, whatever the query asks. A snapshot needs none: only
/// the files after it are sorted, and the snapshot's rows meet them in a
/// hash anti-join. Keys compare with `IS NOT DISTINCT FROM` when one may
/// be NULL, as the window's partitions do.
fn current_rows(
    layout: Layout,
    key: &[&str],
    schema: &SchemaRef,
    versions: &str,
    base: &str,
    newer: &str,
) -> String {
    let quote = |c: &str| format!("\"{c}\"");
    let all = schema
        .fields()
        .iter()
        .map(|f| quote(f.name()))
        .collect::<Vec<_>>()
        .join(", ");
    let partition = key.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
    let latest_of = |table: &str| {
        format!(
            "SELECT {all} FROM \
             (SELECT *, row_number() OVER (PARTITION BY {partition} ORDER BY _seq DESC) AS _tally_rn FROM {table}) \
             WHERE _tally_rn = 1"
        )
    };
    match layout {
        Layout::Versions => latest_of(versions),
        Layout::Snapshot => format!("SELECT {all} FROM {base}"),
        Layout::SnapshotAndNewer => {
            let nullable = key
                .iter()
                .any(|k| schema.field_with_name(k).map_or(true, |f| f.is_nullable()));
            let eq = if nullable {
                "IS NOT DISTINCT FROM"
            } else {
                "="
            };
            let same_key = key
                .iter()
                .map(|k| format!("n.{} {eq} s.{}", quote(k), quote(k)))
                .collect::<Vec<_>>()
                .join(" AND ");
            format!(
                "SELECT {all} FROM {base} s WHERE NOT EXISTS (SELECT 1 FROM {newer} n WHERE {same_key}) \
                 UNION ALL {}",
                latest_of(newer)
            )
        }
    }
}

/// Registers the files of `view` that the checkpoint at `upto` covers as
/// table `name`, holding only the rows `scope` sees.
fn register_files(
    ctx: &SessionContext,
    files: &Files<'_>,
    upto: u64,
    view: &str,
    name: &str,
    schema: SchemaRef,
    scope: &Scope,
) -> Result<(), OpenError> {
    let refs = checkpoint_refs(files, upto, view)?;
    register_refs(ctx, refs, view, name, schema, scope)
}

/// The files of `view` that the checkpoint at `upto` covers, in stream
/// order.
fn checkpoint_refs(
    files: &Files<'_>,
    upto: u64,
    view: &str,
) -> Result<Vec<table::FileRef>, OpenError> {
    let data_dir = match files {
        Files::Local(dir) => *dir,
        Files::Remote(loc, manifest) => {
            return Ok(manifest
                .files
                .get(view)
                .into_iter()
                .flatten()
                .map(|f| table::FileRef::Remote {
                    url: loc.object_url(&f.key),
                    store: Arc::clone(&loc.store),
                    path: loc.path(&f.key),
                })
                .collect());
        }
    };
    let listed = ViewDir::new(data_dir, view).files()?;
    if let Some(f) = listed
        .iter()
        .find(|f| f.first_seq <= upto && f.last_seq > upto)
    {
        // A compaction of batches newer than `upto` covers files `upto`
        // needs, and `files()` has already left those out.
        return Err(OpenError::Moved(Moved {
            path: f.path.clone(),
        }));
    }
    Ok(listed
        .into_iter()
        .filter(|f| f.last_seq <= upto)
        .map(|f| {
            let path = std::path::absolute(&f.path).unwrap_or_else(|_| f.path.clone());
            table::FileRef::Local {
                url: path.to_string_lossy().into_owned(),
                path,
            }
        })
        .collect())
}

/// Registers exactly `files` as table `name`, holding only the rows
/// `scope` sees.
fn register_refs(
    ctx: &SessionContext,
    files: Vec<table::FileRef>,
    view: &str,
    name: &str,
    schema: SchemaRef,
    scope: &Scope,
) -> Result<(), OpenError> {
    let reg = |cause| QueryError::Register {
        view: view.to_owned(),
        cause,
    };
    if files.is_empty() {
        let table = MemTable::try_new(Arc::clone(&schema), vec![vec![]]).map_err(reg)?;
        ctx.register_table(name, scoped(name, Arc::new(table), scope).map_err(reg)?)
            .map_err(reg)?;
        return Ok(());
    }
    let mut urls = Vec::with_capacity(files.len());
    for f in &files {
        urls.push(ListingTableUrl::parse(f.url()).map_err(reg)?);
    }
    let options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(schema);
    let table = ListingTable::try_new(config).map_err(reg)?;
    let table = Arc::new(table::CheckpointFiles::new(table, files));
    ctx.register_table(name, scoped(name, table, scope).map_err(reg)?)
        .map_err(reg)?;
    Ok(())
}

/// `table` as `scope` sees it: itself for all tenants, else only the rows
/// of the scope's tenants (see [`scope`]).
fn scoped(
    _name: &str,
    table: Arc<dyn TableProvider>,
    scope: &Scope,
) -> Result<Arc<dyn TableProvider>, DataFusionError> {
    Ok(match scope {
        Scope::AllTenants => table,
        Scope::Tenants(tenants) => Arc::new(scope::ScopedTable::new(table, tenants)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use crate::store::parquet::views_root;
    use arrow::array::UInt64Array;
    use arrow::datatypes::DataType;
    use arrow::datatypes::Field;

    fn opts() -> QueryOptions {
        QueryOptions {
            scope: Scope::AllTenants,
            queries_dir: None,
            memory_limit: ByteSize(256 << 20),
        }
    }

    /// A data directory with a checkpoint at `last_seq` and no view files.
    fn data_dir(last_seq: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut cp = Checkpoint::new("TALLY_EVENTS", "2026-01-01T00:00:00Z", &Settings::default());
        cp.last_seq = last_seq;
        cp.save(dir.path()).unwrap();
        dir
    }

    /// Writes an `events` file for stream sequences `first..=last`, one row each.
    fn write_events(data: &Path, first: u64, last: u64) {
        let op = operator::registry(&Settings::default())
            .into_iter()
            .find(|o| o.view() == "events")
            .unwrap();
        let schema = op.schema();
        let seqs: Vec<u64> = (first..=last).collect();
        let columns: Vec<arrow::array::ArrayRef> = schema
            .fields()
            .iter()
            .map(|f| -> arrow::array::ArrayRef {
                if f.name() == "stream_seq" {
                    Arc::new(UInt64Array::from(seqs.clone()))
                } else if f.is_nullable() {
                    arrow::array::new_null_array(f.data_type(), seqs.len())
                } else if f.data_type() == &DataType::Utf8 {
                    Arc::new(arrow::array::StringArray::from_iter_values(
                        seqs.iter().map(|s| format!("e{s}")),
                    ))
                } else {
                    let n =
                        arrow::array::Int64Array::from_iter_values(seqs.iter().map(|s| *s as i64));
                    arrow::compute::cast(&n, f.data_type()).unwrap()
                }
            })
            .collect();
        let batch = RecordBatch::try_new(Arc::clone(&schema), columns).unwrap();
        let dir = ViewDir::new(data, "events");
        dir.create().unwrap();
        dir.write(first, last, &schema, &[batch]).unwrap();
    }

    async fn count(s: &mut Session) -> u64 {
        let rows = s.query("SELECT count(*) AS n FROM events").await.unwrap();
        rows[0]
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap()
            .value(0) as u64
    }

    /// `usage` rows of one metric, window and granularity: (tenant, events,
    /// `_seq`, deleted).
    fn usage_rows(rows: &[(&str, i64, u64, bool)]) -> (SchemaRef, RecordBatch) {
        let op = operator::registry(&Settings::default())
            .into_iter()
            .find(|o| o.view() == "usage")
            .unwrap();
        let schema = op.schema();
        let n = rows.len();
        let int = |f: &Field, v: Vec<i64>| {
            arrow::compute::cast(&arrow::array::Int64Array::from(v), f.data_type()).unwrap()
        };
        let columns: Vec<arrow::array::ArrayRef> = schema
            .fields()
            .iter()
            .map(|f| -> arrow::array::ArrayRef {
                match f.name().as_str() {
                    "tenant" => Arc::new(arrow::array::StringArray::from_iter_values(
                        rows.iter().map(|r| r.0),
                    )),
                    "events" => int(f, rows.iter().map(|r| r.1).collect()),
                    "_seq" => Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.2))),
                    "_deleted" => Arc::new(arrow::array::BooleanArray::from_iter(
                        rows.iter().map(|r| Some(r.3)),
                    )),
                    _ if f.data_type() == &DataType::Utf8 => Arc::new(
                        arrow::array::StringArray::from_iter_values(std::iter::repeat_n("x", n)),
                    ),
                    _ if f.is_nullable() => arrow::array::new_null_array(f.data_type(), n),
                    _ => int(f, vec![0; n]),
                }
            })
            .collect();
        let batch = RecordBatch::try_new(Arc::clone(&schema), columns).unwrap();
        (schema, batch)
    }

    /// (tenant, events) of `sql`'s rows.
    async fn tenant_events(s: &mut Session, sql: &str) -> Vec<(String, i64)> {
        let rows = s.query(sql).await.unwrap();
        let mut out = Vec::new();
        for b in &rows {
            let t = arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
            let t = t
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .unwrap();
            let e = arrow::compute::cast(b.column(1), &DataType::Int64).unwrap();
            let e = e
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .unwrap();
            for i in 0..b.num_rows() {
                out.push((t.value(i).to_owned(), e.value(i)));
            }
        }
        out
    }

    #[tokio::test]
    async fn a_snapshot_and_newer_versions_give_the_latest_rows() {
        let dir = data_dir(10);
        let at = |seq: u64| {
            let mut cp = Checkpoint::load(dir.path()).unwrap().unwrap();
            cp.last_seq = seq;
            cp.save(dir.path()).unwrap();
        };
        let usage = ViewDir::new(dir.path(), "usage");
        usage.create().unwrap();
        let (schema, snap) = usage_rows(&[
            ("a", 1, 10, false),
            ("b", 1, 10, false),
            ("c", 1, 10, false),
        ]);
        usage.replace_with(10, &schema, &snap).unwrap();
        let want_snapshot = vec![("a".into(), 1), ("b".into(), 1), ("c".into(), 1)];
        let all = "SELECT tenant, events FROM usage ORDER BY tenant";
        let mut s = Session::open(dir.path(), &opts()).await.unwrap();
        assert_eq!(tenant_events(&mut s, all).await, want_snapshot);
        // Newer files: b twice, c deleted, d new then updated; the second
        // file holds two versions of d (as a merged file would).
        let (_, f2) = usage_rows(&[("b", 2, 20, false), ("d", 1, 20, false)]);
        usage.write(11, 20, &schema, &[f2]).unwrap();
        let (_, f3) = usage_rows(&[
            ("b", 3, 30, false),
            ("c", 1, 30, true),
            ("d", 5, 25, false),
            ("d", 2, 30, false),
        ]);
        usage.write(21, 30, &schema, &[f3]).unwrap();
        at(30);
        let mut s = Session::open(dir.path(), &opts()).await.unwrap();
        let want = vec![("a".into(), 1), ("b".into(), 3), ("d".into(), 2)];
        assert_eq!(tenant_events(&mut s, all).await, want);
        // The same as resolving versions over every file.
        let resolved = "SELECT tenant, events FROM (SELECT *, row_number() OVER \
             (PARTITION BY tenant, metric, granularity, window_start ORDER BY _seq DESC) AS rn \
             FROM _usage_versions) WHERE rn = 1 AND NOT _deleted ORDER BY tenant";
        assert_eq!(tenant_events(&mut s, resolved).await, want);
        for (tenant, events) in [
            ("a", vec![1]),
            ("b", vec![3]),
            ("c", vec![]),
            ("d", vec![2]),
        ] {
            let sql = format!("SELECT tenant, events FROM usage WHERE tenant = '{tenant}'");
            let got: Vec<i64> = tenant_events(&mut s, &sql)
                .await
                .into_iter()
                .map(|r| r.1)
                .collect();
            assert_eq!(got, events, "{tenant}");
        }
        // Compaction merges the newer files, never the snapshot with them.
        for i in 0..COMPACT_TEST_FILES {
            let seq = 31 + i;
            let (_, f) = usage_rows(&[("e", i as i64, seq, false)]);
            usage.write(seq, seq, &schema, &[f]).unwrap();
        }
        let upto = 30 + COMPACT_TEST_FILES;
        at(upto);
        assert!(usage.compact(&schema, upto).unwrap() > 0);
        let files = usage.files().unwrap();
        assert_eq!(
            (files[0].first_seq, files[0].last_seq),
            (1, 10),
            "{files:?}"
        );
        assert_eq!(files.len(), 2, "{files:?}");
        let mut s = Session::open(dir.path(), &opts()).await.unwrap();
        let mut want = want;
        want.push(("e".into(), COMPACT_TEST_FILES as i64 - 1));
        assert_eq!(tenant_events(&mut s, all).await, want);
    }

    /// Enough single-row files to trigger a compaction.
    const COMPACT_TEST_FILES: u64 = 40;

    #[tokio::test]
    async fn writes_settings_and_file_reads_are_refused() {
        let dir = data_dir(0);
        let mut s = Session::open(dir.path(), &opts()).await.unwrap();
        for sql in [
            "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'",
            "CREATE TABLE x AS SELECT 1",
            "CREATE VIEW v AS SELECT 1",
            "INSERT INTO events SELECT * FROM events",
            "COPY events TO '/tmp/x.csv'",
            "COPY (SELECT 1) TO '/tmp/x.csv'",
            "DROP TABLE events",
            "SET datafusion.execution.batch_size = 1",
            "EXPLAIN CREATE TABLE x AS SELECT 1",
            "START TRANSACTION",
            "PREPARE p AS SELECT 1",
        ] {
            let err = s.query(sql).await.unwrap_err();
            assert!(matches!(err, QueryError::ReadOnly { .. }), "{sql}: {err}");
        }
        let err = s.query("SELECT * FROM '/etc/passwd'").await.unwrap_err();
        assert!(matches!(err, QueryError::Execute(_)), "{err}");
        assert!(!Path::new("/tmp/x.csv").exists());
    }

    #[tokio::test]
    async fn schema_discovery_lists_every_view_and_its_columns() {
        let dir = data_dir(0);
        let mut s = Session::open(dir.path(), &opts()).await.unwrap();
        let text = |b: &[RecordBatch]| {
            arrow::util::pretty::pretty_format_batches(b)
                .unwrap()
                .to_string()
        };
        let tables = text(&s.query("SHOW TABLES").await.unwrap());
        for view in ["events", "usage", "tenants", "churn", "ltv", CLOCK_TABLE] {
            assert!(tables.contains(&format!(" {view} ")), "{view}:\n{tables}");
        }
        let columns = text(
            &s.query(
                "SELECT column_name, data_type FROM information_schema.columns \
                 WHERE table_name = 'usage' ORDER BY ordinal_position",
            )
            .await
            .unwrap(),
        );
        assert!(columns.contains("window_start") && columns.contains("is_final"));
        for sql in ["DESCRIBE usage", "SHOW COLUMNS FROM usage"] {
            let out = text(&s.query(sql).await.unwrap());
            assert!(out.contains("window_start"), "{sql}:\n{out}");
        }
        let churn = text(&s.query("DESCRIBE churn").await.unwrap());
        assert!(churn.contains("logo_churn_rate"), "{churn}");
        let clock = text(&s.query("DESCRIBE _tally_clock").await.unwrap());
        assert!(clock.contains("checkpoint_seq"), "{clock}");
    }

    #[tokio::test]
    async fn a_directory_without_a_checkpoint_has_no_views() {
        let dir = tempfile::tempdir().unwrap();
        let err = Session::open(dir.path(), &opts()).await.err().unwrap();
        assert!(matches!(err, QueryError::NoViews { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&dir.path().display().to_string()) && msg.contains("tally run"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn views_without_files_are_empty() {
        let dir = data_dir(0);
        let mut s = Session::open(dir.path(), &opts()).await.unwrap();
        assert_eq!(count(&mut s).await, 0);
    }

    #[tokio::test]
    async fn files_beyond_the_checkpoint_are_not_read() {
        let dir = data_dir(20);
        write_events(dir.path(), 1, 10);
        write_events(dir.path(), 11, 20);
        // A crashed batch's leftover: written, never checkpointed.
        write_events(dir.path(), 21, 30);
        let mut s = Session::open(dir.path(), &opts()).await.unwrap();
        assert_eq!(s.checkpoint_seq, 20);
        assert_eq!(count(&mut s).await, 20);
        let rows = s
            .query("SELECT checkpoint_seq FROM _tally_clock")
            .await
            .unwrap();
        let seq = rows[0]
            .column(0)
            .as_any()
            .downcast_ref::<UInt64Array>()
            .unwrap()
            .value(0);
        assert_eq!(seq, 20);
    }

    #[tokio::test]
    async fn a_compaction_beyond_the_checkpoint_read_is_followed() {
        // The session read checkpoint 20, but by the time it lists the files,
        // batch 21..=30 was committed and compacted with 1..=20.
        let dir = data_dir(20);
        write_events(dir.path(), 1, 30);
        let stale = Checkpoint::load(dir.path()).unwrap().unwrap();
        let runtime = memory::runtime_env(opts().memory_limit).unwrap();
        assert!(matches!(
            open_at(
                &Files::Local(dir.path()),
                &stale,
                &opts(),
                Arc::clone(&runtime)
            )
            .await,
            Err(OpenError::Moved(_))
        ));
        let mut newer = stale.clone();
        newer.last_seq = 30;
        newer.save(dir.path()).unwrap();
        let mut s = Session::open(dir.path(), &opts()).await.unwrap();
        assert_eq!((s.checkpoint_seq, count(&mut s).await), (30, 30));
    }

    #[tokio::test]
    async fn a_file_compacted_away_after_listing_is_retried_on_the_new_checkpoint() {
        let dir = data_dir(20);
        write_events(dir.path(), 1, 10);
        write_events(dir.path(), 11, 20);
        let mut s = Session::open(dir.path(), &opts()).await.unwrap();
        // Compaction between listing and reading: the parts are replaced by
        // one file over the same range.
        let files = ViewDir::new(dir.path(), "events").files().unwrap();
        write_events(dir.path(), 1, 20);
        for f in files {
            std::fs::remove_file(f.path).unwrap();
        }
        let first = run(&s.ctx, "SELECT count(*) FROM events", opts().memory_limit)
            .await
            .unwrap_err();
        assert!(matches!(first, QueryError::FileGone { .. }), "{first}");
        assert_eq!(count(&mut s).await, 20);
        assert!(views_root(dir.path()).join("events").exists());
    }

    #[tokio::test]
    async fn a_directory_switched_under_a_session_is_read_anew() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        let fresh = root.path().join("data.replay");
        for (dir, last) in [(&data, 10), (&fresh, 30)] {
            std::fs::create_dir(dir).unwrap();
            let mut cp =
                Checkpoint::new("TALLY_EVENTS", "2026-01-01T00:00:00Z", &Settings::default());
            cp.last_seq = last;
            cp.save(dir).unwrap();
        }
        // The same file name in both, other rows: what a replay's different
        // batching leaves.
        write_events(&data, 1, 10);
        write_events(&fresh, 1, 10);
        write_events(&fresh, 11, 30);
        let mut s = Session::open(&data, &opts()).await.unwrap();
        assert!(!s.dirs.switched());
        assert_eq!(count(&mut s).await, 10);
        std::fs::rename(&data, root.path().join("old")).unwrap();
        std::fs::rename(&fresh, &data).unwrap();
        assert!(s.dirs.switched());
        assert_eq!(count(&mut s).await, 30);
        assert_eq!(s.checkpoint_seq, 30);
        assert!(!s.dirs.switched());
    }

    #[test]
    fn a_gone_file_or_a_switch_reruns_a_bounded_number_of_times() {
        let gone = || -> Result<(), QueryError> {
            Err(QueryError::FileGone {
                cause: DataFusionError::Plan("gone".into()),
            })
        };
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let dirs = Dirs::of(&[data.as_path()]);
        // Not switched: only a gone file reruns, up to the bound.
        assert!(!rerun(&Ok(()), &dirs, 0, &data).unwrap());
        assert!(rerun(&gone(), &dirs, GONE_RERUNS - 1, &data).unwrap());
        assert!(!rerun(&gone(), &dirs, GONE_RERUNS, &data).unwrap());
        // Switched: any answer reruns, and past the bound none is given.
        std::fs::rename(&data, root.path().join("old")).unwrap();
        std::fs::create_dir(&data).unwrap();
        assert!(rerun(&Ok(()), &dirs, 0, &data).unwrap());
        let err = rerun(&Ok(()), &dirs, GONE_RERUNS, &data).unwrap_err();
        assert!(
            matches!(err, QueryError::Switched { runs, .. } if runs == GONE_RERUNS + 1),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_file_removed_after_planning_fails_its_read_as_gone() {
        let dir = data_dir(10);
        write_events(dir.path(), 1, 10);
        let s = Session::open(dir.path(), &opts()).await.unwrap();
        let df = s
            .ctx
            .sql("SELECT count(*) FROM events WHERE id LIKE 'e%'")
            .await
            .unwrap();
        let plan = df.create_physical_plan().await.unwrap();
        for f in ViewDir::new(dir.path(), "events").files().unwrap() {
            std::fs::remove_file(f.path).unwrap();
        }
        let err = datafusion::physical_plan::collect(plan, s.ctx.task_ctx())
            .await
            .unwrap_err();
        let err = classify(err, 0);
        assert!(matches!(err, QueryError::FileGone { .. }), "{err}");
    }

    #[tokio::test]
    async fn an_operator_over_the_memory_limit_fails_alone() {
        let dir = data_dir(2000);
        write_events(dir.path(), 1, 2000);
        let small = QueryOptions {
            scope: Scope::AllTenants,
            memory_limit: ByteSize(4 << 20),
            ..opts()
        };
        let mut s = Session::open(dir.path(), &small).await.unwrap();
        let err = s
            .query(
                "SELECT count(DISTINCT CAST(a.stream_seq AS VARCHAR) || '-' || CAST(b.stream_seq AS VARCHAR)) \
                 FROM events a CROSS JOIN events b",
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, QueryError::MemoryLimit { limit, .. } if limit == 4 << 20),
            "{err}"
        );
        assert!(err.to_string().contains("--memory-limit"), "{err}");
        // The session still answers.
        assert_eq!(count(&mut s).await, 2000);
    }

    #[tokio::test]
    async fn a_query_nested_beyond_the_parser_limit_is_refused_clearly() {
        let dir = data_dir(0);
        let mut s = Session::open(dir.path(), &opts()).await.unwrap();
        let sql = format!("SELECT {}1{}", "(".repeat(500), ")".repeat(500));
        let err = s.query(&sql).await.unwrap_err();
        assert!(matches!(err, QueryError::TooDeep { .. }), "{err}");
    }
}
