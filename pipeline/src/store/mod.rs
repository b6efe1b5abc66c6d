//! The data location: everything a run leaves behind, behind one seam.
//!
//! A data location is a local directory or an `s3://bucket/prefix` in
//! object storage ([`remote`]); a run on the latter works on a temporary
//! local working copy that every commit pushes to the store, so the rest
//! of this module (and everything above it) sees a directory either way.
//! A data directory holds the view files ([`parquet`]), the checkpoint
//! that commits them ([`checkpoint`]), the settings file, the lock that
//! keeps one run per directory, and the hand-off files through which a
//! replay takes the directory over from a live run ([`handoff`]). Runs,
//! replays and readers reach all of it through [`DataDir`], so that
//! another storage backend can plug in here without touching the
//! operators or the session loop. Files are put in place atomically
//! ([`atomic`]).

pub mod atomic;
pub mod checkpoint;
pub mod handoff;
pub mod parquet;
pub mod remote;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use checkpoint::{Checkpoint, CheckpointError};
use parquet::ViewDir;

/// The settings file a data directory carries (see [`crate::config`]).
pub const SETTINGS_FILE: &str = "tally.toml";
/// The lock file: one run per data directory.
const LOCK_FILE: &str = ".lock";

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("cannot create data directory {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another tally process is using data directory {path}; stop it first, or give this one its own --data"
    )]
    Locked { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Remote(#[from] remote::RemoteError),
    /// Fatal: the location is partitioned in another count.
    #[error(
        "data location {path} is partitioned into {found} partitions, not {wanted}; give --partitions {found} (the count is fixed when a location is created), or another --data"
    )]
    PartitionCount {
        path: PathBuf,
        found: u32,
        wanted: u32,
    },
    /// Fatal: a partitioned run on a location of the whole stream.
    #[error(
        "data location {path} holds views of the whole stream, not partitions; run without --partitions, or give another --data"
    )]
    NotPartitioned { path: PathBuf },
    /// Fatal: an unpartitioned run on a partitioned location.
    #[error(
        "data location {path} is partitioned into {found} partitions; run each worker with --partitions {found} --partition K, or give another --data"
    )]
    Partitioned { path: PathBuf, found: u32 },
    /// Fatal: the partitions file cannot be read.
    #[error(
        "{path} is not a partitions file ({cause}); it says how many partitions the location has: restore it as {{\"partitions\": N}}"
    )]
    PartitionsFile { path: PathBuf, cause: String },
}

/// The file at a partitioned location's root (an object in object
/// storage) that fixes its partition count.
pub const PARTITIONS_FILE: &str = "partitions.json";

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PartitionsFile {
    partitions: u32,
}

/// Where partition `index` of a partitioned location keeps its views: a
/// data location of its own, under the location's root.
pub fn partition_location(location: &Path, index: u32) -> PathBuf {
    location.join(partition_name(index))
}

fn partition_name(index: u32) -> String {
    format!("partition-{index}")
}

/// The object-storage location of partition `index` of `remote` (the
/// same client), or `None` for a directory.
pub fn partition_remote(remote: Option<&remote::Location>, index: u32) -> Option<remote::Location> {
    remote.map(|loc| loc.within(&partition_name(index)))
}

/// The partition count of the location `--data` names; `None`: not
/// partitioned (or nothing there yet).
pub async fn partitions(location: &Path) -> Result<Option<u32>, DataDirError> {
    let remote = remote::Location::parse(location)?;
    partitions_at(location, remote.as_ref()).await
}

/// [`partitions`] with the location's client already made.
pub async fn partitions_at(
    location: &Path,
    remote: Option<&remote::Location>,
) -> Result<Option<u32>, DataDirError> {
    let bytes = match remote {
        Some(loc) => loc.get(PARTITIONS_FILE).await?.map(|(b, _)| b.to_vec()),
        None => match std::fs::read(location.join(PARTITIONS_FILE)) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(DataDirError::PartitionsFile {
                    path: location.join(PARTITIONS_FILE),
                    cause: e.to_string(),
                });
            }
        },
    };
    let Some(bytes) = bytes else {
        return Ok(None);
    };
    match serde_json::from_slice::<PartitionsFile>(&bytes) {
        Ok(f) if f.partitions >= 1 => Ok(Some(f.partitions)),
        Ok(_) => Err(DataDirError::PartitionsFile {
            path: location.join(PARTITIONS_FILE),
            cause: "0 partitions".into(),
        }),
        Err(e) => Err(DataDirError::PartitionsFile {
            path: location.join(PARTITIONS_FILE),
            cause: e.to_string(),
        }),
    }
}

/// Marks the location `--data` names as partitioned into `count` (the
/// first worker to start does; a conditional create, so two racing ones
/// agree), or checks the mark: another count, or views of the whole
/// stream at its root, are refused.
pub async fn claim_partitions(location: &Path, count: u32) -> Result<(), DataDirError> {
    if let Some(found) = partitions(location).await? {
        return if found == count {
            Ok(())
        } else {
            Err(DataDirError::PartitionCount {
                path: location.to_path_buf(),
                found,
                wanted: count,
            })
        };
    }
    let not_partitioned = || DataDirError::NotPartitioned {
        path: location.to_path_buf(),
    };
    let bytes = serde_json::to_vec(&PartitionsFile { partitions: count }).unwrap_or_default();
    match remote::Location::parse(location)? {
        Some(loc) => {
            if loc.manifest().await?.is_some() {
                return Err(not_partitioned());
            }
            match loc
                .put(PARTITIONS_FILE, bytes.into(), object_store::PutMode::Create)
                .await
            {
                Ok(_) | Err(remote::RemoteError::Superseded { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        None => {
            if location.join(checkpoint::FILE_NAME).exists() {
                return Err(not_partitioned());
            }
            std::fs::create_dir_all(location).map_err(|source| DataDirError::Create {
                path: location.to_path_buf(),
                source,
            })?;
            let path = location.join(PARTITIONS_FILE);
            // Written aside, then linked into place: the first link wins,
            // and a reader never sees half a file.
            let tmp = location.join(format!(".{PARTITIONS_FILE}.{}", std::process::id()));
            let write = |source| DataDirError::Write {
                path: path.clone(),
                source,
            };
            std::fs::write(&tmp, &bytes).map_err(write)?;
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(write(e)),
            }
        }
    }
    // Whoever won the race, the count now at the location decides.
    match partitions(location).await? {
        Some(found) if found == count => Ok(()),
        Some(found) => Err(DataDirError::PartitionCount {
            path: location.to_path_buf(),
            found,
            wanted: count,
        }),
        None => Err(not_partitioned()),
    }
}

/// How often a `--standby` run tries a local directory's lock.
const STANDBY_POLL: Duration = Duration::from_millis(250);

/// A data directory: a local one, or the working copy of an object-storage
/// location.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    /// The object-storage location this directory is the working copy of.
    remote: Option<Arc<remote::WorkingCopy>>,
}

impl PartialEq for DataDir {
    fn eq(&self, other: &DataDir) -> bool {
        self.root == other.root
    }
}

/// Holds a data directory's lock until dropped.
pub struct DataDirLock {
    _file: std::fs::File,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir {
            root: root.into(),
            remote: None,
        }
    }

    /// Opens the data location `--data` names for a run and takes it: the
    /// lock of a local directory, the lease of an `s3://` location (whose
    /// committed views are then copied into a local working copy). With
    /// `standby`, waits while another run holds it. `None` if `stop` fired
    /// while waiting.
    pub async fn attach(
        location: &Path,
        standby: bool,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<(DataDir, DataDirLock)>, DataDirError> {
        if let Some(loc) = remote::Location::parse(location)? {
            let Some(copy) = remote::WorkingCopy::attach(loc, standby, stop).await? else {
                return Ok(None);
            };
            let dir = DataDir {
                root: copy.root().to_path_buf(),
                remote: Some(Arc::new(copy)),
            };
            let lock = dir.lock()?;
            return Ok(Some((dir, lock)));
        }
        let dir = DataDir::new(location);
        let mut announced = false;
        loop {
            match dir.lock() {
                Ok(lock) => return Ok(Some((dir, lock))),
                Err(DataDirError::Locked { .. }) if standby => {
                    if !announced {
                        tracing::info!(data = %location.display(), "another run holds the data directory; standing by");
                        announced = true;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(STANDBY_POLL) => {}
                        _ = stop.changed() => return Ok(None),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The object-storage location this directory is the working copy of.
    pub fn remote(&self) -> Option<&Arc<remote::WorkingCopy>> {
        self.remote.as_ref()
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The default name of the durable consumer of runs on this directory:
    /// `tally-` and a hash of its absolute path. Each data directory gets a
    /// consumer of its own, so two runs on two directories never split one
    /// consumer's messages between them.
    pub fn consumer_name(&self) -> String {
        // An `s3://` URL names the same location from any directory.
        let path = if remote::is_remote(&self.root) {
            self.root.clone()
        } else {
            std::path::absolute(&self.root).unwrap_or_else(|_| self.root.clone())
        };
        format!(
            "tally-{:016x}",
            xxhash_rust::xxh3::xxh3_64(path.as_os_str().as_encoded_bytes())
        )
    }

    /// One view's files.
    pub fn view(&self, view: &str) -> ViewDir {
        ViewDir::new(&self.root, view)
    }

    /// The last committed checkpoint, if any.
    pub fn checkpoint(&self) -> Result<Option<Checkpoint>, CheckpointError> {
        Checkpoint::load(&self.root)
    }

    /// The checkpoint of a location whose `events` archive a replay reads
    /// (also one written by an earlier version of Tally).
    pub fn archive_checkpoint(&self) -> Result<Option<Checkpoint>, CheckpointError> {
        Checkpoint::load_archive(&self.root)
    }

    /// Commits `cp`: from now on the views are those it covers. A working
    /// copy's commit is pushed to the object store before this returns.
    pub fn commit(&self, cp: &Checkpoint) -> Result<(), CheckpointError> {
        cp.save(&self.root)?;
        if let Some(copy) = &self.remote {
            // Called from blocking threads and from the run's start-up;
            // either way this thread may wait for the push.
            let handle = tokio::runtime::Handle::current();
            tokio::task::block_in_place(|| handle.block_on(copy.push(cp)))?;
        }
        Ok(())
    }

    /// The settings file in effect: `explicit` (`--config`), else the
    /// directory's own [`SETTINGS_FILE`] if present.
    pub fn settings_path(&self, explicit: Option<&Path>) -> Option<PathBuf> {
        match explicit {
            Some(p) => Some(p.to_path_buf()),
            None => Some(self.root.join(SETTINGS_FILE)).filter(|p| p.exists()),
        }
    }

    /// Creates the directory if needed and takes its lock, or says who holds it.
    pub fn lock(&self) -> Result<DataDirLock, DataDirError> {
        std::fs::create_dir_all(&self.root).map_err(|source| DataDirError::Create {
            path: self.root.clone(),
            source,
        })?;
        let path = self.root.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| DataDirError::Create {
                path: path.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => Ok(DataDirLock { _file: file }),
            Err(_) => Err(DataDirError::Locked {
                path: self.root.clone(),
            }),
        }
    }
}

/// The last committed checkpoint of the location `--data` names (a local
/// directory or an `s3://` location), for readers.
pub async fn read_checkpoint(location: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
    let remote = remote::Location::parse(location)?;
    checkpoint_in(location, remote.as_ref()).await
}

/// [`read_checkpoint`] with the `s3://` location `location` names already
/// parsed (`None`: a local directory).
pub async fn checkpoint_in(
    location: &Path,
    remote: Option<&remote::Location>,
) -> Result<Option<Checkpoint>, CheckpointError> {
    match remote {
        Some(loc) => Ok(loc.manifest().await?.map(|(m, _)| m.checkpoint)),
        None => Checkpoint::load(location),
    }
}

/// The checkpoint of the location `--data` names as one: its own, or for a
/// partitioned location the partitions' frontier: the checkpoint of the
/// partition furthest behind, with the least stream clock, the counts of
/// all (each partition counts the catalog's messages it folds) and the
/// stream's gaps once. `None` until every partition has one.
pub async fn frontier_checkpoint(
    location: &Path,
    remote: Option<&remote::Location>,
) -> Result<Option<Checkpoint>, CheckpointError> {
    if let Some(cp) = checkpoint_in(location, remote).await? {
        return Ok(Some(cp));
    }
    let count = match partitions_at(location, remote).await {
        Ok(Some(n)) => n,
        Ok(None) => return Ok(None),
        Err(DataDirError::Remote(e)) => return Err(e.into()),
        Err(e) => {
            return Err(CheckpointError::Read {
                path: location.join(PARTITIONS_FILE),
                source: std::io::Error::other(e.to_string()),
            });
        }
    };
    let mut frontier: Option<Checkpoint> = None;
    let mut counts = checkpoint::Counts::default();
    let mut gaps: Vec<checkpoint::Gap> = Vec::new();
    let mut clock: Option<i64> = None;
    for k in 0..count {
        let dir = partition_location(location, k);
        let loc = partition_remote(remote, k);
        let Some(cp) = checkpoint_in(&dir, loc.as_ref()).await? else {
            return Ok(None);
        };
        counts.accepted += cp.counts.accepted;
        counts.duplicate += cp.counts.duplicate;
        for (reason, n) in &cp.counts.dead_lettered {
            *counts.dead_lettered.entry(reason.clone()).or_insert(0) += n;
        }
        // Every partition reads every sequence: a gap of the stream is
        // recorded by each, and counts once.
        for g in &cp.gaps {
            if !gaps.contains(g) {
                gaps.push(g.clone());
            }
        }
        clock = match (clock, cp.stream_clock_us) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if frontier.as_ref().is_none_or(|f| cp.last_seq < f.last_seq) {
            frontier = Some(cp);
        }
    }
    Ok(frontier.map(|mut f| {
        f.counts = counts;
        f.gaps = gaps;
        f.stream_clock_us = clock;
        f
    }))
}
