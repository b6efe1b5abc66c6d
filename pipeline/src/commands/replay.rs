//! `tally replay`: rebuilds every view from stream sequence 1 into a fresh
//! directory with fresh state, then switches the data directory to it
//! atomically; and the hand-off that lets a live `tally run` on the same
//! data directory keep working across the switch.
//!
//! # The rebuild
//! The fresh directory is `<data>.replay`, a sibling (so the switch is a
//! rename on one file system), locked by the replay while it is built. It
//! is filled by the same pipeline as `tally run` (same settings, same
//! operators, same files-then-checkpoint protocol), read through its own
//! read-only consumer (no acks, so the server keeps no pending state: the
//! fresh directory's checkpoint is the only record of progress, and a gap
//! in the consumer sequence sends the replay back to it), with its outputs
//! to NATS off (`live = false`: a replay
//! publishes no alerts and no dead letters, which the live run published;
//! it still counts the dead letters, and remembers which thresholds were
//! crossed so a later live run does not alert them again). It stops at the
//! stream's last sequence as of the start, or at `--until-seq`.
//!
//! # The switch, and the hand-off with a live run
//! Without a live run, the replay takes the data directory's lock and
//! exchanges the two directories in one `renameat2(RENAME_EXCHANGE)`
//! (readers see the old or the new views, never none), then deletes the old.
//!
//! With a live run (it holds the lock), the replay asks it to pause
//! between batches and hands the new directory over through the protocol of
//! [`crate::store::handoff`].
//!
//! Nothing is lost or doubled: the new directory holds exactly the stream
//! up to its checkpoint, and the live run continues from there (messages it
//! had processed beyond that point are processed again into the new
//! directory; an alert among them is re-sent with the same `Nats-Msg-Id`,
//! which the alerts stream deduplicates). If the live run does not answer
//! within the time-out, the replay withdraws the request and fails, and the
//! live run carries on untouched.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use tracing::{info, warn};

use super::{CommandError, Globals, PartitionArgs};
use crate::config::Settings;
use crate::runtime;
use crate::runtime::{ArchiveSource, Mode, RunOptions, RunSummary, RuntimeError, run_with_lock};
use crate::source::jetstream as js_source;
use crate::source::jetstream as js;
use crate::store::checkpoint::Checkpoint;
use crate::store::handoff::{self, DONE, PAUSED, REQUEST};
use crate::store::remote::lease::{self, Lease};
use crate::store::remote::{self, Location, RemoteError, working};
use crate::store::{DataDir, DataDirLock, SETTINGS_FILE};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error(
        "stream {stream} no longer holds sequences {first} to {last}, and the events archive of {data} does not have them either: a replay would build views from less history than the live ones, so it stops here and the live views are untouched. Run `tally replay --accept-gap` to rebuild without them and record the gap"
    )]
    LessHistory {
        stream: String,
        data: PathBuf,
        first: u64,
        last: u64,
    },
    #[error(
        "the replay accepted {replayed} events up to sequence {upto} where the live views accepted {live}: the events archive of {data} and the stream disagree; the live views are untouched. Move {data} aside and replay from a stream that holds every message"
    )]
    ArchiveDisagrees {
        data: PathBuf,
        upto: u64,
        replayed: u64,
        live: u64,
    },
    #[error(
        "the replay ended at stream sequence {reached}, before its target {target}; the data directory was not switched. Run `tally replay` again; if it ends there again, `tally status` shows what the stream holds"
    )]
    Short { reached: u64, target: u64 },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another tally replay is building {path}; wait for it to finish (or stop it) before starting one"
    )]
    Busy { path: PathBuf },
    #[error(
        "--until-seq {wanted} is beyond the end of stream {stream} (last sequence {last}); pick a sequence at most {last}"
    )]
    BeyondStream {
        wanted: u64,
        stream: String,
        last: u64,
    },
    #[error(
        "{path} already exists and is not empty; `tally replay --into` writes a new directory: name one that does not exist"
    )]
    IntoExists { path: PathBuf },
    #[error(
        "a process holds {path} but did not answer the replay's hand-off within {secs} s (an older tally, or a stuck run); the rebuilt views are in {fresh}; stop that process and run `tally replay` again"
    )]
    NoAnswer {
        path: PathBuf,
        fresh: PathBuf,
        secs: u64,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ReplayError + 'a {
    move |source| ReplayError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// What `tally replay` does.
#[derive(Debug, Clone)]
pub(crate) struct ReplayOptions {
    /// The run's options; `data_dir` is the directory to rebuild and switch.
    pub(crate) run: RunOptions,
    /// Stop after this stream sequence (an as-of rebuild).
    pub(crate) until_seq: Option<u64>,
    /// Build here and do not switch (with `until_seq`: the as-of views).
    pub(crate) into: Option<PathBuf>,
    /// How long a live run has to answer the hand-off.
    pub(crate) handoff_timeout: Duration,
    /// Draw a progress bar (stderr is a terminal).
    pub(crate) progress_bar: bool,
}

/// What a replay did.
#[derive(Debug)]
pub(crate) struct ReplayReport {
    pub(crate) summary: RunSummary,
    pub(crate) target: u64,
    pub(crate) dir: PathBuf,
    pub(crate) switched: bool,
    pub(crate) live_run_handed_off: bool,
}

/// The fresh directory next to `data`.
pub(crate) fn fresh_dir(data: &Path) -> PathBuf {
    let mut name = data
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "tally-data".into());
    name.push(".replay");
    data.with_file_name(name)
}

/// `tally replay`.
pub(crate) async fn replay(
    opts: &ReplayOptions,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<ReplayReport, ReplayError> {
    match Location::parse(&opts.run.data_dir)? {
        Some(loc) => replay_remote(opts, loc, stop).await,
        None => replay_local(opts, stop).await,
    }
}

/// `tally replay` on an `s3://` location: the live location's checkpoint,
/// settings and `events` archive are copied into a scratch directory, the
/// views are rebuilt next to it as for a local directory, and the result
/// is published as the location's new commit: directly if no run holds
/// the lease (the replay takes it meanwhile), else through the hand-off
/// with the live run (see [`crate::store::handoff`]).
async fn replay_remote(
    opts: &ReplayOptions,
    loc: Location,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<ReplayReport, ReplayError> {
    loc.probe().await?;
    let scratch = tempfile::Builder::new()
        .prefix("tally-replay-")
        .tempdir()
        .map_err(io("create", &std::env::temp_dir()))?;
    let snap = scratch.path().join("live");
    working::snapshot(&loc, &snap, Some(&[crate::operator::events::VIEW])).await?;
    let fresh = opts
        .into
        .clone()
        .unwrap_or_else(|| scratch.path().join("fresh"));
    let mut local = opts.clone();
    local.run.data_dir = snap;
    local.into = Some(fresh.clone());
    let report = replay_local(&local, stop).await?;
    if opts.into.is_some() || report.summary.last_seq < report.target {
        return Ok(ReplayReport {
            dir: fresh,
            ..report
        });
    }
    let handed_off = switch_remote(&loc, &fresh, opts.handoff_timeout).await?;
    Ok(ReplayReport {
        dir: opts.run.data_dir.clone(),
        switched: true,
        live_run_handed_off: handed_off,
        ..report
    })
}

/// Publishes the rebuilt views of `fresh` as `loc`'s commit. Returns
/// whether a live run was handed off.
async fn switch_remote(
    loc: &Location,
    fresh: &Path,
    timeout: Duration,
) -> Result<bool, ReplayError> {
    let (_never, quiet) = tokio::sync::watch::channel(false);
    let me = remote::new_token();
    let started = Instant::now();
    let mut asked = false;
    loop {
        match Lease::acquire(loc, &me, false, quiet.clone()).await {
            Ok(Some(lease)) => {
                if asked {
                    loc.delete(working::HANDOFF_REQUEST).await?;
                }
                let manifest = working::publish(loc, fresh).await?;
                working::collect_unnamed(loc, &manifest.files).await;
                lease.release().await;
                info!(data = %loc.url, "switched to the replayed views");
                return Ok(false);
            }
            Ok(None) => {}
            Err(RemoteError::Held { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        if !asked {
            loc.put(
                working::HANDOFF_REQUEST,
                bytes::Bytes::from_static(b"replay"),
                object_store::PutMode::Overwrite,
            )
            .await?;
            info!(data = %loc.url, "a live tally run holds the location; asking it to pause between batches");
            asked = true;
        }
        // Wait for the live run to pause, or to go away (then the lease
        // is free and the loop takes it).
        loop {
            if loc.head(working::HANDOFF_PAUSED).await?.is_some() {
                working::publish(loc, fresh).await?;
                loc.put(
                    working::HANDOFF_DONE,
                    bytes::Bytes::from_static(b"done"),
                    object_store::PutMode::Overwrite,
                )
                .await?;
                loc.delete(working::HANDOFF_REQUEST).await?;
                let taken = Instant::now();
                while loc.head(working::HANDOFF_DONE).await?.is_some() && taken.elapsed() < timeout
                {
                    tokio::time::sleep(handoff::POLL).await;
                }
                info!(data = %loc.url, "switched to the replayed views; the live run resumed on them");
                return Ok(true);
            }
            if loc.head(lease::LEASE).await?.is_none() {
                break;
            }
            if started.elapsed() > timeout {
                loc.delete(working::HANDOFF_REQUEST).await?;
                return Err(ReplayError::NoAnswer {
                    path: PathBuf::from(&loc.url),
                    fresh: fresh.to_path_buf(),
                    secs: timeout.as_secs(),
                });
            }
            tokio::time::sleep(handoff::POLL).await;
        }
    }
}

async fn replay_local(
    opts: &ReplayOptions,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<ReplayReport, ReplayError> {
    let data = opts.run.data_dir.clone();
    let target_dir = opts.into.clone().unwrap_or_else(|| fresh_dir(&data));
    if opts.into.is_some() {
        let non_empty = std::fs::read_dir(&target_dir).is_ok_and(|mut d| d.next().is_some());
        if non_empty {
            return Err(ReplayError::IntoExists { path: target_dir });
        }
    } else if target_dir.exists() {
        // A leftover of an interrupted replay, unless one is running.
        let lock = DataDir::new(&target_dir)
            .lock()
            .map_err(|_| ReplayError::Busy {
                path: target_dir.clone(),
            })?;
        drop(lock);
        std::fs::remove_dir_all(&target_dir).map_err(io("remove", &target_dir))?;
    }
    // The stream's end now: the replay's target.
    let client = js_source::connect(&opts.run.source.nats_url)
        .await
        .map_err(RuntimeError::from)?;
    let js = jetstream::new(client);
    let mut stream = js_source::ensure_event_stream(&js, &opts.run.source)
        .await
        .map_err(RuntimeError::from)?
        .stream;
    let (created, last) = js_source::stream_identity(&mut stream, &opts.run.source.stream)
        .await
        .map_err(RuntimeError::from)?;
    let target = match opts.until_seq {
        Some(n) if n > last => {
            return Err(ReplayError::BeyondStream {
                wanted: n,
                stream: opts.run.source.stream.clone(),
                last,
            });
        }
        Some(n) => n,
        None => last,
    };
    // The settings of the directory being rebuilt go with the new one.
    std::fs::create_dir_all(&target_dir).map_err(io("create", &target_dir))?;
    if opts.run.config.is_none() {
        let toml = data.join(SETTINGS_FILE);
        if toml.exists() {
            let to = target_dir.join(SETTINGS_FILE);
            std::fs::copy(&toml, &to).map_err(io("copy settings to", &to))?;
        }
    }
    let position = Arc::new(AtomicU64::new(0));
    let mut run = opts.run.clone();
    run.config = DataDir::new(&data).settings_path(opts.run.config.as_deref());
    run.data_dir = target_dir.clone();
    run.mode = Mode::Replay;
    run.until_idle = true;
    run.stop_at = Some(target);
    run.position = Some(Arc::clone(&position));
    // What the live views were built from: their archive stands in for
    // sequences the stream has forgotten, if they come from this stream and
    // these settings.
    let settings = Settings::load(run.config.as_deref()).map_err(RuntimeError::from)?;
    let live = DataDir::new(&data)
        .archive_checkpoint()
        .map_err(RuntimeError::from)?
        .filter(|cp| {
            cp.stream == opts.run.source.stream
                && cp.stream_created == created
                && cp.settings == settings
        });
    run.archive = live.as_ref().map(|cp| ArchiveSource {
        dir: data.clone(),
        upto: cp.last_seq,
        gaps: cp.gaps.clone(),
    });
    run.split_at = live
        .as_ref()
        .map(|cp| cp.last_seq)
        .filter(|n| *n >= 1 && *n <= target);
    run.source.consumer = format!(
        "tally-replay-{:016x}",
        xxhash_rust::xxh3::xxh3_64(target_dir.to_string_lossy().as_bytes())
    );
    info!(target, dir = %target_dir.display(), "replay starting from sequence 1");
    let bar = opts
        .progress_bar
        .then(|| progress_bar(target, Arc::clone(&position)));
    let mut lock_slot = None;
    let summary = run_with_lock(&run, stop.clone(), &mut lock_slot).await;
    if let Some((bar, task)) = bar {
        task.abort();
        bar.finish_and_clear();
    }
    if let Err(e) = stream.delete_consumer(&run.source.consumer).await {
        warn!(error = %e, consumer = %run.source.consumer, "cannot delete the replay's consumer");
    }
    let summary = match summary {
        Err(RuntimeError::Gap {
            stream,
            first,
            last,
            ..
        }) => {
            return Err(ReplayError::LessHistory {
                stream,
                data: data.clone(),
                first,
                last,
            });
        }
        other => other?,
    };
    if let Some(live) = &live {
        carry_counts(&data, &target_dir, live, &summary)?;
    }
    let interrupted = *stop.borrow() && summary.last_seq < target;
    if interrupted {
        info!(
            last_seq = summary.last_seq,
            "replay interrupted; the data directory was not switched"
        );
    }
    if !interrupted && summary.last_seq < target {
        return Err(ReplayError::Short {
            reached: summary.last_seq,
            target,
        });
    }
    if interrupted || opts.into.is_some() {
        return Ok(ReplayReport {
            summary,
            target,
            dir: target_dir,
            switched: false,
            live_run_handed_off: false,
        });
    }
    let Some(fresh_lock) = lock_slot else {
        return Err(ReplayError::Busy { path: target_dir });
    };
    let handed_off = switch(&data, &target_dir, fresh_lock, opts.handoff_timeout).await?;
    Ok(ReplayReport {
        summary,
        target,
        dir: data,
        switched: true,
        live_run_handed_off: handed_off,
    })
}

/// Completes the rebuilt checkpoint's counts with what only the live run
/// knew: duplicates and dead letters among the sequences read from the
/// archive (which holds accepted events only). The live counts up to its
/// checkpoint, less what the replay counted up to the same sequence, are
/// exactly those; the accepted counts must agree.
fn carry_counts(
    data: &Path,
    fresh: &Path,
    live: &Checkpoint,
    summary: &RunSummary,
) -> Result<(), ReplayError> {
    let Some(snap) = &summary.counts_at_split else {
        if summary.last_seq < live.last_seq {
            warn!(
                upto = summary.last_seq,
                "duplicates and dead letters among sequences read from the archive before this point are not counted (the live counts cover more)"
            );
        }
        return Ok(());
    };
    if snap.accepted != live.counts.accepted {
        return Err(ReplayError::ArchiveDisagrees {
            data: data.to_path_buf(),
            upto: live.last_seq,
            replayed: snap.accepted,
            live: live.counts.accepted,
        });
    }
    let dir = DataDir::new(fresh);
    let Some(mut cp) = dir.checkpoint().map_err(RuntimeError::from)? else {
        return Ok(());
    };
    cp.counts.duplicate += live.counts.duplicate.saturating_sub(snap.duplicate);
    for (reason, n) in &live.counts.dead_lettered {
        let seen = snap.dead_lettered.get(reason).copied().unwrap_or(0);
        *cp.counts.dead_lettered.entry(reason.clone()).or_insert(0) += n.saturating_sub(seen);
    }
    dir.commit(&cp).map_err(RuntimeError::from)?;
    Ok(())
}

/// Exchanges `fresh` into `data`, coordinating with a live run if one
/// holds `data`. Returns whether a live run was handed off.
async fn switch(
    data: &Path,
    fresh: &Path,
    fresh_lock: DataDirLock,
    timeout: Duration,
) -> Result<bool, ReplayError> {
    if let Ok(data_lock) = DataDir::new(data).lock() {
        exchange(fresh, data)?;
        drop(data_lock);
        drop(fresh_lock);
        remove_old(fresh);
        info!(data = %data.display(), "switched to the replayed views");
        return Ok(false);
    }
    let request = data.join(REQUEST);
    std::fs::write(&request, fresh.to_string_lossy().as_bytes()).map_err(io("write", &request))?;
    info!(data = %data.display(), "a live tally run holds the data directory; asking it to pause between batches");
    let started = Instant::now();
    let paused = data.join(PAUSED);
    loop {
        if paused.exists() {
            break;
        }
        // The live run may have exited meanwhile: then the lock is free.
        if let Ok(data_lock) = DataDir::new(data).lock() {
            let _ = std::fs::remove_file(&request);
            exchange(fresh, data)?;
            drop(data_lock);
            drop(fresh_lock);
            remove_old(fresh);
            return Ok(false);
        }
        if started.elapsed() > timeout {
            let _ = std::fs::remove_file(&request);
            return Err(ReplayError::NoAnswer {
                path: data.to_path_buf(),
                fresh: fresh.to_path_buf(),
                secs: timeout.as_secs(),
            });
        }
        tokio::time::sleep(handoff::POLL).await;
    }
    let done = fresh.join(DONE);
    std::fs::write(&done, b"").map_err(io("write", &done))?;
    exchange(fresh, data)?;
    drop(fresh_lock);
    // Wait for the live run to take the new directory over, then drop the old one.
    let taken = data.join(DONE);
    let started = Instant::now();
    while taken.exists() && started.elapsed() < timeout {
        tokio::time::sleep(handoff::POLL).await;
    }
    if taken.exists() {
        warn!(data = %data.display(), "the live run has not resumed on the replayed views yet");
    }
    remove_old(fresh);
    info!(data = %data.display(), "switched to the replayed views; the live run resumed on them");
    Ok(true)
}

/// Swaps two directories atomically (Linux `RENAME_EXCHANGE`); when
/// `data` does not exist yet, a plain rename.
fn exchange(fresh: &Path, data: &Path) -> Result<(), ReplayError> {
    if !data.exists() {
        return std::fs::rename(fresh, data).map_err(io("rename", fresh));
    }
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        fresh,
        rustix::fs::CWD,
        data,
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .map_err(|e| ReplayError::Io {
        action: "exchange with the data directory",
        path: fresh.to_path_buf(),
        source: e.into(),
    })
}

fn remove_old(old: &Path) {
    if let Err(e) = std::fs::remove_dir_all(old) {
        warn!(dir = %old.display(), error = %e, "cannot remove the replaced views; delete the directory by hand");
    }
}

fn progress_bar(
    target: u64,
    position: Arc<AtomicU64>,
) -> (indicatif::ProgressBar, tokio::task::JoinHandle<()>) {
    let bar = indicatif::ProgressBar::new(target);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "replay {bar:32.cyan/blue} seq {pos}/{len}  {per_sec}  ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let b = bar.clone();
    let task = tokio::spawn(async move {
        loop {
            b.set_position(position.load(Ordering::Relaxed));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    (bar, task)
}

/// The arguments of `tally replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Stop after this stream sequence: the views as of that position (needs --into).
    #[arg(long, env = "TALLY_REPLAY_UNTIL_SEQ")]
    pub(crate) until_seq: Option<u64>,
    /// Build into this new directory and do not switch.
    #[arg(long, env = "TALLY_REPLAY_INTO")]
    pub(crate) into: Option<PathBuf>,
    /// Settings that change results (TOML); default `<data>/tally.toml` if present.
    #[arg(long, env = "TALLY_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Messages per batch.
    #[arg(long, env = "TALLY_BATCH_SIZE", default_value_t = runtime::DEFAULT_BATCH_SIZE)]
    pub(crate) batch_size: usize,
    /// Dead-letter stream name (must exist; a replay counts dead letters but publishes none).
    #[arg(long, env = "TALLY_DLQ_STREAM", default_value = js::DEFAULT_DLQ_STREAM)]
    pub(crate) dlq_stream: String,
    /// Go on past messages the stream no longer holds, recording each gap, instead of stopping.
    #[arg(long, env = "TALLY_REPLAY_ACCEPT_GAP")]
    pub(crate) accept_gap: bool,
    /// Seconds a live `tally run` has to answer the hand-off.
    #[arg(long, default_value_t = runtime::HANDOFF_TIMEOUT_SECS, env = "TALLY_REPLAY_HANDOFF_TIMEOUT_SECS")]
    pub(crate) handoff_timeout_secs: u64,
    /// Print a JSON summary line on stdout at exit (used by `tally bench`).
    #[arg(long, hide = true)]
    pub(crate) summary_json: bool,
    /// Rebuild one partition of a partitioned location.
    #[command(flatten)]
    pub(crate) partitions: PartitionArgs,
}

/// `tally replay`, from the command line.
pub(crate) async fn command(g: &Globals, a: &ReplayArgs) -> Result<(), CommandError> {
    let ReplayArgs {
        until_seq,
        into,
        config,
        batch_size,
        dlq_stream,
        accept_gap,
        handoff_timeout_secs,
        summary_json,
        partitions,
    } = a;
    if *batch_size == 0 {
        return Err(CommandError::Usage(
            "--batch-size must be at least 1".into(),
        ));
    }
    if *until_seq == Some(0) {
        return Err(CommandError::Usage(
            "--until-seq 0 is before the stream's first message: give the last sequence the views should include (1 or more)".into(),
        ));
    }
    if until_seq.is_some() && into.is_none() {
        return Err(CommandError::Usage(
            "--until-seq builds the views as of a past position, which must not replace the live ones: name a new directory with --into DIR".into(),
        ));
    }
    let owned = partitions.resolve(&g.data).await?;
    if owned.len() > 1 && into.is_some() {
        return Err(CommandError::Usage(
            "--into names one directory: rebuild one partition with it (--partition K), or leave it out to replace each partition's views".into(),
        ));
    }
    let config = partitions.settings(&g.data, config.as_ref());
    // Partitions are rebuilt one after another, each switched when done.
    for (partition, data) in owned {
        let opts = crate::commands::replay::ReplayOptions {
            run: RunOptions {
                batch_size: *batch_size,
                accept_gap: *accept_gap,
                handoff_timeout: Duration::from_secs(*handoff_timeout_secs),
                partition,
                ..RunOptions::live(
                    data,
                    g.source_config(Some("tally-replay"), Some(dlq_stream)),
                    config.clone(),
                )
            },
            until_seq: *until_seq,
            into: into.clone(),
            handoff_timeout: Duration::from_secs(*handoff_timeout_secs),
            progress_bar: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        };
        let r = crate::commands::replay::replay(&opts, runtime::shutdown_signal()).await?;
        if *summary_json {
            println!(
                "{}",
                serde_json::json!({
                    "messages": r.summary.messages,
                    "last_seq": r.summary.last_seq,
                    "active_secs": r.summary.active.as_secs_f64(),
                    "elapsed_secs": r.summary.elapsed.as_secs_f64(),
                })
            );
        }
        let verb = if r.switched { "switched to" } else { "built" };
        println!(
            "replayed {} messages (stream sequence 1..{}) in {:.1} s; {verb} {}{}",
            r.summary.messages,
            r.summary.last_seq,
            r.summary.elapsed.as_secs_f64(),
            r.dir.display(),
            if r.live_run_handed_off {
                " (the live tally run resumed on it)"
            } else {
                ""
            }
        );
        if r.summary.last_seq < r.target {
            return Err(CommandError::ReplayInterrupted {
                at: r.summary.last_seq,
                target: r.target,
            });
        }
    }
    Ok(())
}
