//! The data location: everything a run leaves behind, behind one seam.
//!
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

use std::path::{Path, PathBuf};

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
}

/// A data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

/// Holds a data directory's lock until dropped.
pub struct DataDirLock {
    _file: std::fs::File,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir { root: root.into() }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The default name of the durable consumer of runs on this directory:
    /// `tally-` and a hash of its absolute path. Each data directory gets a
    /// consumer of its own, so two runs on two directories never split one
    /// consumer's messages between them.
    pub fn consumer_name(&self) -> String {
        let path = std::path::absolute(&self.root).unwrap_or_else(|_| self.root.clone());
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

    /// Commits `cp`: from now on the views are those it covers.
    pub fn commit(&self, cp: &Checkpoint) -> Result<(), CheckpointError> {
        cp.save(&self.root)
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
