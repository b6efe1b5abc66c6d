//! The checkpoint: the commit point of the durability protocol.
//!
//! A batch's effects are made durable first (Parquet renamed into place, DLQ
//! publishes acknowledged by JetStream); then this file records the last
//! stream sequence they cover; only then is the batch acknowledged. On start
//! Tally resumes from `last_seq + 1`, never from the consumer's ack floor,
//! and removes view files that a crash left beyond the checkpoint. The file
//! is replaced atomically (temp file, fsync, rename, fsync of the directory).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::event::DlqReason;
use crate::event::partition::Partition;

pub const FILE_NAME: &str = "checkpoint.json";
/// Version 2: views over effective events (voids), `corrections`,
/// `usage.unique_count`; a version-1 location is rebuilt by `tally replay`.
const VERSION: u32 = 2;
/// Versions whose `events` archive a replay may read: the archive's format
/// has not changed since version 1.
const ARCHIVE_VERSIONS: [u32; 2] = [1, 2];

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read checkpoint {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "checkpoint {path} is corrupt ({source}); move the data directory aside and run `tally replay` to rebuild it"
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "checkpoint {path} has version {found}, this tally understands {VERSION}; run `tally replay` into a new data directory"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write checkpoint {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The checkpoint of an object-storage location.
    #[error(transparent)]
    Remote(#[from] super::remote::error::RemoteError),
}

/// Outcome counters, cumulative over the stream prefix processed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub accepted: u64,
    pub duplicate: u64,
    /// Reason token -> count.
    pub dead_lettered: BTreeMap<String, u64>,
}

impl Counts {
    pub fn dead_letter(&mut self, reason: DlqReason) {
        *self
            .dead_lettered
            .entry(reason.as_str().to_owned())
            .or_insert(0) += 1;
    }

    pub fn dead_lettered_total(&self) -> u64 {
        self.dead_lettered.values().sum()
    }
}

/// Stream sequences the views never saw: gone from the stream (retention, a
/// purge, a deleted message) before a run reached them, and passed over
/// with `--accept-gap`. Recorded for good, so that whoever reads the views
/// can tell they are incomplete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub first_seq: u64,
    pub last_seq: u64,
    /// `last_seq - first_seq + 1`.
    pub messages: u64,
    /// The stream clock when the gap was found (µs): how far the views had got.
    pub stream_clock_us: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// The stream this data directory was built from.
    pub stream: String,
    /// The stream's creation time (RFC 3339): a recreated stream restarts
    /// its sequences and must not be mixed with views of the old one.
    pub stream_created: String,
    /// Every message with a sequence <= this is reflected in the views.
    pub last_seq: u64,
    /// Largest JetStream publish time processed (µs): stream "now".
    pub stream_now_us: Option<i64>,
    /// Largest accepted event time (µs): the stream clock of metrics.md.
    pub stream_clock_us: Option<i64>,
    /// The result-changing settings the views were built with.
    pub settings: Settings,
    pub counts: Counts,
    /// Sequences passed over, in stream order.
    #[serde(default)]
    pub gaps: Vec<Gap>,
    /// The partition of a partitioned deployment these views fold; `None`:
    /// the whole stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<Partition>,
}

impl Checkpoint {
    pub fn new(stream: &str, stream_created: &str, settings: &Settings) -> Checkpoint {
        Checkpoint {
            version: VERSION,
            stream: stream.to_owned(),
            stream_created: stream_created.to_owned(),
            last_seq: 0,
            stream_now_us: None,
            stream_clock_us: None,
            settings: settings.clone(),
            counts: Counts::default(),
            gaps: Vec::new(),
            partition: None,
        }
    }

    /// Moves past the message at `seq`, published at `published_at` (µs).
    pub fn advance(&mut self, seq: u64, published_at: i64) {
        self.last_seq = seq;
        self.stream_now_us = Some(
            self.stream_now_us
                .map_or(published_at, |n| n.max(published_at)),
        );
    }

    /// Counts an accepted event of event time `time` (µs).
    pub fn accept(&mut self, time: i64) {
        self.counts.accepted += 1;
        self.stream_clock_us = Some(self.stream_clock_us.map_or(time, |c| c.max(time)));
    }

    /// Passes over the gone sequences `first..=last`: the views go on
    /// without them, and the gap is recorded.
    pub fn skip_gap(&mut self, first: u64, last: u64) {
        self.gaps.push(Gap {
            first_seq: first,
            last_seq: last,
            messages: last - first + 1,
            stream_clock_us: self.stream_clock_us,
        });
        self.last_seq = self.last_seq.max(last);
    }

    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(FILE_NAME)
    }

    /// Loads the checkpoint of `data_dir`; `None` if there is none yet.
    pub fn load(data_dir: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
        Checkpoint::load_versions(data_dir, &[VERSION])
    }

    /// Loads the checkpoint of a data location whose `events` archive a
    /// replay reads: also one an earlier version of Tally wrote.
    pub fn load_archive(data_dir: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
        Checkpoint::load_versions(data_dir, &ARCHIVE_VERSIONS)
    }

    fn load_versions(
        data_dir: &Path,
        versions: &[u32],
    ) -> Result<Option<Checkpoint>, CheckpointError> {
        let path = Checkpoint::path(data_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(CheckpointError::Read { path, source }),
        };
        let cp: Checkpoint =
            serde_json::from_slice(&bytes).map_err(|source| CheckpointError::Corrupt {
                path: path.clone(),
                source,
            })?;
        if !versions.contains(&cp.version) {
            return Err(CheckpointError::Version {
                path,
                found: cp.version,
            });
        }
        Ok(Some(cp))
    }

    /// Atomically replaces the checkpoint of `data_dir`.
    pub fn save(&self, data_dir: &Path) -> Result<(), CheckpointError> {
        let path = Checkpoint::path(data_dir);
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| CheckpointError::Write {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        super::atomic::write(&path, &bytes)
            .map_err(|source| CheckpointError::Write { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Checkpoint::load(dir.path()).unwrap(), None);
        let mut cp = Checkpoint::new("TALLY_EVENTS", "2026-01-01T00:00:00Z", &Settings::default());
        cp.last_seq = 42;
        cp.counts.dead_letter(DlqReason::InvalidJson);
        cp.save(dir.path()).unwrap();
        assert_eq!(Checkpoint::load(dir.path()).unwrap(), Some(cp));
        assert!(!dir.path().join("checkpoint.tmp").exists());
    }

    #[test]
    fn corrupt_file_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"{").unwrap();
        let err = Checkpoint::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tally replay"), "{err}");
    }
}
