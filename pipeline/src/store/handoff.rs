//! The hand-off: how a `tally replay` takes a data directory over from the
//! live `tally run` that holds it, through files in the directory.
//!
//! 1. the replay writes [`REQUEST`] into the data directory;
//! 2. the live run, between batches (its last batch durable and acked),
//!    writes [`PAUSED`] and stops consuming ([`serve`]);
//! 3. the replay writes [`DONE`] into its fresh directory, exchanges the
//!    two directories and releases the fresh one's lock;
//! 4. the live run sees [`DONE`] at the data path, takes the lock of the
//!    (new) directory, and reloads its state from it.
//!
//! If the replay withdraws [`REQUEST`] (or the time-out passes), the live
//! run resumes on the same views.
//!
//! On an `s3://` location the same steps go through objects under
//! `handoff/` (see [`super::remote::working`]): the replay publishes its
//! manifest (conditional on the paused run's last one) instead of
//! exchanging directories, and the live run copies the new views in.

use std::time::{Duration, Instant};

use tracing::info;

use super::{DataDir, DataDirError, DataDirLock};

/// Written by the replay: "pause between batches".
pub const REQUEST: &str = "handoff.request";
/// Written by the live run: "paused, my last batch is durable".
pub const PAUSED: &str = "handoff.paused";
/// Written by the replay into the fresh directory before the exchange.
pub const DONE: &str = "handoff.done";

/// How often either side looks at the hand-off files while waiting.
pub const POLL: Duration = Duration::from_millis(20);

/// Whether a replay asks for the directory (the live side, between batches).
pub fn requested(dir: &DataDir) -> bool {
    match dir.remote() {
        Some(copy) => copy.handoff_requested(),
        None => dir.path().join(REQUEST).exists(),
    }
}

/// The live side: pause (the last batch is durable and acked), wait for the
/// switch, then take the new directory's lock into `lock`. Returns `false`
/// if the replay withdrew its request within `timeout` (nothing changed).
pub async fn serve(
    dir: &DataDir,
    last_seq: u64,
    lock: &mut Option<DataDirLock>,
    timeout: Duration,
) -> Result<bool, DataDirError> {
    if let Some(copy) = dir.remote() {
        return Ok(copy.serve_handoff(last_seq, timeout).await?);
    }
    let paused = dir.path().join(PAUSED);
    std::fs::write(&paused, last_seq.to_string()).map_err(|source| DataDirError::Write {
        path: paused.clone(),
        source,
    })?;
    info!(
        last_seq,
        "a tally replay asked for the data directory; paused between batches"
    );
    let done = dir.path().join(DONE);
    let started = Instant::now();
    loop {
        if done.exists() {
            break;
        }
        if !requested(dir) || started.elapsed() > timeout {
            let _ = std::fs::remove_file(&paused);
            info!("the replay withdrew; resuming on the same views");
            return Ok(false);
        }
        tokio::time::sleep(POLL).await;
    }
    // The directories were exchanged: the path now holds the replayed one.
    *lock = None;
    let started = Instant::now();
    let new_lock = loop {
        match dir.lock() {
            Ok(l) => break l,
            Err(e) if started.elapsed() > timeout => return Err(e),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    };
    *lock = Some(new_lock);
    let _ = std::fs::remove_file(&done);
    Ok(true)
}
