//! The working copy: how a run computes on an object-storage location.
//!
//! The run holds the location's [`Lease`], copies what the manifest commits
//! into a temporary local directory, and works on that directory exactly
//! as on a data directory (same files, same checkpoint, same recovery).
//! Every local commit is then pushed before the batch is acknowledged: the
//! files the store does not have yet go up (named with this run's token),
//! then the manifest, conditional on the version this run last wrote, then
//! the objects the new manifest no longer names (compacted away) are
//! deleted. A crash anywhere leaves the last manifest whole; objects no
//! manifest names are collected when the next run attaches.
//!
//! The local directory is scratch: it is removed when the run ends, and a
//! run on another host rebuilds it from the store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::{PutMode, UpdateVersion};
use tracing::{debug, info, warn};

use super::lease::Lease;
use super::{
    Location, MANIFEST, Manifest, ManifestFile, RemoteError, SETTINGS, new_token, view_key,
};
use crate::store::checkpoint::Checkpoint;
use crate::store::parquet::{ViewDir, ViewFile, views_root};

/// Objects moved at once when a working copy is pulled or pushed.
const PARALLEL: usize = 8;
/// The hand-off objects (see [`crate::store::handoff`]).
pub const HANDOFF_REQUEST: &str = "handoff/request";
pub const HANDOFF_PAUSED: &str = "handoff/paused";
pub const HANDOFF_DONE: &str = "handoff/done";
/// How often the run looks for a replay's hand-off request.
const HANDOFF_POLL: Duration = Duration::from_millis(250);

/// What this run has committed to the store.
#[derive(Default)]
struct Pushed {
    /// The manifest's version as this run last wrote (or read) it.
    version: Option<UpdateVersion>,
    /// The objects that manifest names.
    named: BTreeMap<String, Vec<ManifestFile>>,
    /// Local file -> (its size, its object) for files already in the store.
    uploaded: HashMap<PathBuf, (u64, String)>,
}

pub struct WorkingCopy {
    pub loc: Location,
    dir: tempfile::TempDir,
    writer: String,
    pushed: tokio::sync::Mutex<Pushed>,
    lease: tokio::sync::Mutex<Option<Lease>>,
    /// Set when another run took the lease over.
    lease_lost: Arc<AtomicBool>,
    /// Set by the background watch on [`HANDOFF_REQUEST`].
    handoff_requested: Arc<AtomicBool>,
    watcher: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for WorkingCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkingCopy")
            .field("url", &self.loc.url)
            .field("dir", &self.dir.path())
            .field("writer", &self.writer)
            .finish()
    }
}

impl Drop for WorkingCopy {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl WorkingCopy {
    /// Takes the lease of `loc` (waiting for it with `standby`), copies the
    /// committed views into a temporary directory, and makes every later
    /// commit of a former holder fail. `None` if `stop` fired while waiting.
    pub async fn attach(
        loc: Location,
        standby: bool,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<WorkingCopy>, RemoteError> {
        loc.probe().await?;
        let writer = new_token();
        let Some(lease) = Lease::acquire(&loc, &writer, standby, stop).await? else {
            return Ok(None);
        };
        let dir = tempfile::Builder::new()
            .prefix("tally-working-")
            .tempdir()
            .map_err(|source| RemoteError::Local {
                action: "create",
                path: std::env::temp_dir(),
                source,
            })?;
        let flag = Arc::new(AtomicBool::new(false));
        let (l, f) = (loc.clone(), Arc::clone(&flag));
        let watcher = tokio::spawn(async move {
            loop {
                tokio::time::sleep(HANDOFF_POLL).await;
                if let Ok(found) = l.head(HANDOFF_REQUEST).await {
                    f.store(found.is_some(), Ordering::SeqCst);
                }
            }
        });
        let copy = WorkingCopy {
            loc,
            dir,
            writer,
            lease_lost: lease.lost_flag(),
            pushed: tokio::sync::Mutex::new(Pushed::default()),
            lease: tokio::sync::Mutex::new(Some(lease)),
            handoff_requested: flag,
            watcher,
        };
        copy.pull_and_fence().await?;
        copy.collect_garbage().await;
        Ok(Some(copy))
    }

    /// The local directory the run works in.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Copies the committed views into the working directory and rewrites
    /// the manifest as this run's: from then on a former holder's
    /// conditional put fails. Retried if a former holder commits in between.
    async fn pull_and_fence(&self) -> Result<(), RemoteError> {
        for _ in 0..5 {
            let mut pushed = self.pushed.lock().await;
            let Some((mut manifest, version)) = snapshot(&self.loc, self.root(), None).await?
            else {
                *pushed = Pushed::default();
                return Ok(());
            };
            *pushed = Pushed {
                version: Some(version),
                named: manifest.files.clone(),
                uploaded: local_files(self.root(), &manifest),
            };
            manifest.writer = self.writer.clone();
            match self
                .loc
                .put_manifest(&manifest, pushed.version.as_ref())
                .await
            {
                Ok(v) => {
                    pushed.version = Some(v);
                    info!(url = %self.loc.url, last_seq = manifest.checkpoint.last_seq, "working copy of the location ready");
                    return Ok(());
                }
                Err(RemoteError::Superseded { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(RemoteError::Superseded {
            url: self.loc.url.clone(),
        })
    }

    /// Deletes view objects that no manifest names: uploads of a run that
    /// died before committing them, and what compaction replaced. Only the
    /// lease holder does it, right after it has fenced the manifest.
    async fn collect_garbage(&self) {
        let named = self.pushed.lock().await.named.clone();
        let n = collect_unnamed(&self.loc, &named).await;
        if n > 0 {
            info!(url = %self.loc.url, objects = n, "collected objects no checkpoint names");
        }
    }

    /// Commits the working directory's state at `cp` to the store.
    pub async fn push(&self, cp: &Checkpoint) -> Result<(), RemoteError> {
        self.check_lease()?;
        let mut pushed = self.pushed.lock().await;
        let started = Instant::now();
        let mut wanted: Vec<(String, PathBuf, ManifestFile)> = Vec::new();
        for (view, f) in committed_files(self.root(), cp.last_seq)? {
            let key = match pushed.uploaded.get(&f.path) {
                Some((bytes, key)) if *bytes == f.bytes => key.clone(),
                _ => view_key(&view, f.first_seq, f.last_seq, &self.writer),
            };
            let m = ManifestFile {
                key,
                first_seq: f.first_seq,
                last_seq: f.last_seq,
                bytes: f.bytes,
            };
            wanted.push((view, f.path, m));
        }
        let uploads: Vec<(PathBuf, ManifestFile)> = wanted
            .iter()
            .filter(|(_, path, f)| {
                pushed
                    .uploaded
                    .get(path)
                    .is_none_or(|(b, k)| *b != f.bytes || *k != f.key)
            })
            .map(|(_, path, f)| (path.clone(), f.clone()))
            .collect();
        let uploaded_bytes: u64 = uploads.iter().map(|(_, f)| f.bytes).sum();
        let n_uploads = uploads.len();
        upload_all(&self.loc, &uploads).await?;
        for (path, f) in uploads {
            pushed.uploaded.insert(path, (f.bytes, f.key));
        }
        let mut files: BTreeMap<String, Vec<ManifestFile>> = BTreeMap::new();
        for (view, _, f) in &wanted {
            files.entry(view.clone()).or_default().push(f.clone());
        }
        let manifest = Manifest {
            checkpoint: cp.clone(),
            writer: self.writer.clone(),
            files,
        };
        let version = self
            .loc
            .put_manifest(&manifest, pushed.version.as_ref())
            .await?;
        let named: HashSet<&str> = manifest
            .files
            .values()
            .flatten()
            .map(|f| f.key.as_str())
            .collect();
        let dropped: Vec<String> = pushed
            .named
            .values()
            .flatten()
            .filter(|f| !named.contains(f.key.as_str()))
            .map(|f| f.key.clone())
            .collect();
        pushed.version = Some(version);
        pushed.named = manifest.files.clone();
        pushed.uploaded.retain(|path, _| path.exists());
        drop(pushed);
        let n_dropped = dropped.len();
        delete_all(&self.loc, dropped).await;
        debug!(
            last_seq = cp.last_seq,
            uploads = n_uploads,
            uploaded_bytes,
            dropped = n_dropped,
            ms = started.elapsed().as_millis() as u64,
            "checkpoint pushed to the object store"
        );
        Ok(())
    }

    /// Fails once another run has taken the lease over: this run must stop
    /// (its commits would be refused anyway).
    pub fn check_lease(&self) -> Result<(), RemoteError> {
        if self.lease_lost.load(Ordering::SeqCst) {
            return Err(RemoteError::Superseded {
                url: self.loc.url.clone(),
            });
        }
        Ok(())
    }

    /// Whether a replay asks for the location (see [`crate::store::handoff`]).
    pub fn handoff_requested(&self) -> bool {
        self.handoff_requested.load(Ordering::SeqCst)
    }

    /// The live side of a replay's hand-off: say we are paused (the last
    /// batch is committed), wait for the replay's manifest, then work on
    /// it. `false` if the replay withdrew within `timeout`.
    pub async fn serve_handoff(
        &self,
        last_seq: u64,
        timeout: Duration,
    ) -> Result<bool, RemoteError> {
        self.loc
            .put(
                HANDOFF_PAUSED,
                Bytes::from(last_seq.to_string()),
                PutMode::Overwrite,
            )
            .await?;
        info!(last_seq, url = %self.loc.url, "a tally replay asked for the location; paused between batches");
        let started = Instant::now();
        loop {
            if self.loc.head(HANDOFF_DONE).await?.is_some() {
                break;
            }
            if self.loc.head(HANDOFF_REQUEST).await?.is_none() || started.elapsed() > timeout {
                self.loc.delete(HANDOFF_PAUSED).await?;
                self.handoff_requested.store(false, Ordering::SeqCst);
                info!("the replay withdrew; resuming on the same views");
                return Ok(false);
            }
            tokio::time::sleep(super::super::handoff::POLL).await;
        }
        self.pull_and_fence().await?;
        self.collect_garbage().await;
        self.loc.delete(HANDOFF_PAUSED).await?;
        self.loc.delete(HANDOFF_DONE).await?;
        self.handoff_requested.store(false, Ordering::SeqCst);
        Ok(true)
    }

    /// Gives the lease up (a clean stop), so a standby takes over at once.
    pub async fn release(&self) {
        if let Some(lease) = self.lease.lock().await.take() {
            lease.release().await;
        }
    }
}

/// The local name of a committed object (as a data directory names it).
fn local_path(root: &Path, view: &str, f: &ManifestFile) -> PathBuf {
    ViewDir::new(root, view).file_path(f.first_seq, f.last_seq)
}

fn local_files(root: &Path, manifest: &Manifest) -> HashMap<PathBuf, (u64, String)> {
    manifest
        .files
        .iter()
        .flat_map(|(view, files)| {
            files
                .iter()
                .map(move |f| (local_path(root, view, f), (f.bytes, f.key.clone())))
        })
        .collect()
}

/// Copies what `loc`'s manifest commits into the local directory `into`
/// (emptied first): its checkpoint, the settings file if the location has
/// one, and the objects of `only` these views (all if `None`). `None` if
/// nothing was ever committed there.
pub async fn snapshot(
    loc: &Location,
    into: &Path,
    only: Option<&[&str]>,
) -> Result<Option<(Manifest, UpdateVersion)>, RemoteError> {
    let local = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| RemoteError::Local {
            action,
            path,
            source,
        }
    };
    for name in ["views", MANIFEST, SETTINGS] {
        let p = into.join(name);
        let gone = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        match gone {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(local("clear", &p)(e));
            }
            _ => {}
        }
    }
    std::fs::create_dir_all(into).map_err(local("create", into))?;
    if let Some((bytes, _)) = loc.get(SETTINGS).await? {
        let p = into.join(SETTINGS);
        std::fs::write(&p, &bytes).map_err(local("write", &p))?;
    }
    let Some((manifest, version)) = loc.manifest().await? else {
        return Ok(None);
    };
    let mut downloads = Vec::new();
    for (view, files) in &manifest.files {
        if only.is_some_and(|o| !o.contains(&view.as_str())) {
            continue;
        }
        let dir = ViewDir::new(into, view);
        std::fs::create_dir_all(&dir.dir).map_err(local("create", &dir.dir))?;
        for f in files {
            downloads.push((f.key.clone(), local_path(into, view, f)));
        }
    }
    futures::stream::iter(
        downloads
            .iter()
            .map(|(key, to)| async move { loc.download(key, to).await }),
    )
    .buffer_unordered(PARALLEL)
    .try_collect::<Vec<()>>()
    .await?;
    manifest
        .checkpoint
        .save(into)
        .map_err(|e| RemoteError::Local {
            action: "write the checkpoint of",
            path: into.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(Some((manifest, version)))
}

/// Publishes the views of the local directory `from` (a finished replay)
/// as `loc`'s commit, replacing whatever it commits now: uploads every
/// file, then the manifest, conditional on the version read just before.
/// The caller holds the lease or the live holder is paused for it.
pub async fn publish(loc: &Location, from: &Path) -> Result<Manifest, RemoteError> {
    let cp = Checkpoint::load(from)
        .ok()
        .flatten()
        .ok_or_else(|| RemoteError::Local {
            action: "read the checkpoint of",
            path: from.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
    let writer = new_token();
    let mut uploads = Vec::new();
    let mut files: BTreeMap<String, Vec<ManifestFile>> = BTreeMap::new();
    for (view, f) in committed_files(from, cp.last_seq)? {
        let m = ManifestFile {
            key: view_key(&view, f.first_seq, f.last_seq, &writer),
            first_seq: f.first_seq,
            last_seq: f.last_seq,
            bytes: f.bytes,
        };
        files.entry(view).or_default().push(m.clone());
        uploads.push((f.path, m));
    }
    upload_all(loc, &uploads).await?;
    let manifest = Manifest {
        checkpoint: cp,
        writer,
        files,
    };
    let current = loc.manifest().await?.map(|(_, v)| v);
    loc.put_manifest(&manifest, current.as_ref()).await?;
    Ok(manifest)
}

/// Deletes view objects, logging (not failing on) the ones that stay: an
/// unnamed object is invisible, and the next collection retries it.
pub async fn delete_all(loc: &Location, keys: Vec<String>) {
    let results: Vec<Result<(), RemoteError>> =
        futures::stream::iter(keys.iter().map(|k| async move { loc.delete(k).await }))
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
    for e in results.into_iter().filter_map(Result::err) {
        warn!(url = %loc.url, error = %e, "cannot delete an object no checkpoint names; it is collected later");
    }
}

/// Deletes every view object of `loc` that `named` (a manifest's files)
/// does not name; returns how many. Only whoever may commit calls it: the
/// lease holder right after it fenced the manifest, or a replay holding
/// the lease after it published.
pub async fn collect_unnamed(loc: &Location, named: &BTreeMap<String, Vec<ManifestFile>>) -> usize {
    let named: HashSet<&str> = named.values().flatten().map(|f| f.key.as_str()).collect();
    match loc.list("views").await {
        Ok(keys) => {
            let garbage: Vec<String> = keys
                .into_iter()
                .filter(|k| !named.contains(k.as_str()))
                .collect();
            let n = garbage.len();
            delete_all(loc, garbage).await;
            n
        }
        Err(e) => {
            warn!(url = %loc.url, error = %e, "cannot list the location to collect unreferenced objects; the next run does");
            0
        }
    }
}

/// The files of every view of the local directory `root` that a
/// checkpoint at `upto` commits, by view (views in name order).
fn committed_files(root: &Path, upto: u64) -> Result<Vec<(String, ViewFile)>, RemoteError> {
    let views_dir = views_root(root);
    let mut views: Vec<String> = match std::fs::read_dir(&views_dir) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(RemoteError::Local {
                action: "list",
                path: views_dir,
                source,
            });
        }
    };
    views.sort();
    let mut out = Vec::new();
    for view in views {
        let dir = ViewDir::new(root, &view);
        let files = dir.files().map_err(|e| RemoteError::Local {
            action: "list",
            path: dir.dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        out.extend(
            files
                .into_iter()
                .filter(|f| f.last_seq <= upto)
                .map(|f| (view.clone(), f)),
        );
    }
    Ok(out)
}

/// Uploads each local file as its manifest entry's key, [`PARALLEL`] at once.
async fn upload_all(
    loc: &Location,
    uploads: &[(PathBuf, ManifestFile)],
) -> Result<(), RemoteError> {
    futures::stream::iter(
        uploads
            .iter()
            .map(|(path, f)| async move { loc.upload(path, &f.key).await }),
    )
    .buffer_unordered(PARALLEL)
    .try_collect::<Vec<u64>>()
    .await?;
    Ok(())
}
