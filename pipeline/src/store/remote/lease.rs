//! The lease: which run computes on an object-storage location.
//!
//! `<prefix>/lease.json` names its holder and is rewritten by it every
//! [`RENEW`] with a conditional put (`If-Match` its last version). Another
//! run that finds it:
//! - takes it over at once if the holder ran on this host and its process
//!   is gone (a crash, a kill -9: the common restart);
//! - otherwise watches it: if it is renewed, a live run holds it (a plain
//!   run stops with [`RemoteError::Held`], a `--standby` keeps waiting); if
//!   it stays the same for [`EXPIRES`] (the holder died, hangs, is paused
//!   or cut off), the watcher takes it over with a conditional put.
//!
//! Staleness is measured on the watcher's own monotonic clock (the lease
//! holds no time), so clocks of different hosts never matter. The lease
//! only decides who *tries* to run: what keeps two runs from both
//! committing is the manifest's conditional put (see [`super`]); a former
//! holder that wakes up finds the manifest rewritten by its successor and
//! stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::{PutMode, UpdateVersion};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Location, RemoteError};

pub const LEASE: &str = "lease.json";
/// How often the holder renews the lease.
pub const RENEW: Duration = Duration::from_secs(3);
/// How long a lease must stay unrenewed before another run takes it over.
pub const EXPIRES: Duration = Duration::from_secs(15);
/// How often a waiting run looks at the lease.
const WATCH: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The holder's writer token (also in the manifests it writes).
    pub holder: String,
    pub host: String,
    pub pid: u32,
    /// Renewals so far: every renewal changes the object.
    pub renewals: u64,
}

impl LeaseRecord {
    fn describe(&self) -> String {
        format!("run {} on host {} pid {}", self.holder, self.host, self.pid)
    }
}

/// A held lease, renewed in the background until dropped or released.
pub struct Lease {
    loc: Location,
    pub holder: String,
    renewer: tokio::task::JoinHandle<()>,
    /// Set when a renewal found the lease taken by another run.
    lost: Arc<AtomicBool>,
}

/// This host's name, as the lease records it.
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Whether process `pid` of this host is alive (a zombie is not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

impl Lease {
    /// Takes the lease of `loc` for `holder`. With `standby`, waits for as
    /// long as a live run holds it; without, fails if one does.
    pub async fn acquire(
        loc: &Location,
        holder: &str,
        standby: bool,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<Lease>, RemoteError> {
        let me = LeaseRecord {
            holder: holder.to_owned(),
            host: host(),
            pid: std::process::id(),
            renewals: 0,
        };
        let mut announced = false;
        loop {
            let current = loc.get(LEASE).await?;
            let taken = match current {
                None => put(loc, &me, PutMode::Create).await,
                Some((bytes, version)) => {
                    let other: Option<LeaseRecord> = serde_json::from_slice(&bytes).ok();
                    // Our own pid in a lease we do not hold is an earlier
                    // incarnation of this process's slot (a restarted
                    // container is pid 1 again): gone too. Our own token
                    // is a create whose answer was lost and retried.
                    let dead_here = other.as_ref().is_some_and(|o| {
                        o.holder == me.holder
                            || (o.host == me.host && (o.pid == me.pid || !alive(o.pid)))
                    });
                    if !dead_here {
                        let who = other
                            .as_ref()
                            .map(LeaseRecord::describe)
                            .unwrap_or_else(|| "an unreadable lease".to_owned());
                        if !announced {
                            info!(url = %loc.url, holder = %who, standby, "the location is leased; waiting to see whether its holder is alive");
                            announced = true;
                        }
                        match watch(loc, &version, &mut stop).await? {
                            Watched::Renewed if !standby => {
                                return Err(RemoteError::Held {
                                    url: loc.url.clone(),
                                    holder: who,
                                });
                            }
                            Watched::Renewed | Watched::Freed => continue,
                            Watched::Stopped => return Ok(None),
                            Watched::Expired => {
                                info!(url = %loc.url, holder = %who, "the lease was not renewed for {} s; taking over", EXPIRES.as_secs());
                            }
                        }
                    }
                    put(loc, &me, PutMode::Update(version)).await
                }
            };
            match taken {
                Ok(version) => {
                    info!(url = %loc.url, holder, "holding the location's lease");
                    return Ok(Some(Lease::start(loc.clone(), me, version)));
                }
                // Someone else moved first: look again.
                Err(RemoteError::Superseded { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn start(loc: Location, mut me: LeaseRecord, mut version: UpdateVersion) -> Lease {
        let lost = Arc::new(AtomicBool::new(false));
        let holder = me.holder.clone();
        let (l, flag) = (loc.clone(), Arc::clone(&lost));
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(RENEW).await;
                me.renewals += 1;
                match put(&l, &me, PutMode::Update(version.clone())).await {
                    Ok(v) => version = v,
                    Err(RemoteError::Superseded { .. }) => {
                        warn!(url = %l.url, "another run took the lease over; this run's next commit will be refused");
                        flag.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(e) => {
                        warn!(url = %l.url, error = %e, "cannot renew the lease yet; retrying")
                    }
                }
            }
        });
        Lease {
            loc,
            holder,
            renewer,
            lost,
        }
    }

    /// The flag [`Lease::lost`] reads, for a holder to watch.
    pub fn lost_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.lost)
    }

    /// Whether another run has taken the lease.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Gives the lease up (a clean stop): a standby takes over at once.
    pub async fn release(self) {
        self.renewer.abort();
        if self.lost() {
            return;
        }
        // Only our own lease is removed: a renewal could not have been
        // taken over without `lost` being set, short of a race within one
        // renewal period, which the manifest's fencing covers anyway.
        if let Ok(Some((bytes, _))) = self.loc.get(LEASE).await
            && serde_json::from_slice::<LeaseRecord>(&bytes).is_ok_and(|r| r.holder == self.holder)
            && let Err(e) = self.loc.delete(LEASE).await
        {
            warn!(url = %self.loc.url, error = %e, "cannot release the lease; a standby takes over once it expires");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

enum Watched {
    /// The holder renewed it: alive.
    Renewed,
    /// Unchanged for [`EXPIRES`].
    Expired,
    /// Released: the way is free.
    Freed,
    /// The run was asked to stop.
    Stopped,
}

async fn watch(
    loc: &Location,
    seen: &UpdateVersion,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<Watched, RemoteError> {
    let since = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(WATCH) => {}
            _ = stop.changed() => return Ok(Watched::Stopped),
        }
        match loc.head(LEASE).await {
            Ok(Some(tag)) if Some(&tag) == seen.e_tag.as_ref() => {}
            Ok(Some(_)) => return Ok(Watched::Renewed),
            Ok(None) => return Ok(Watched::Freed),
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => warn!(url = %loc.url, error = %e, "cannot read the lease yet; retrying"),
        }
        if since.elapsed() >= EXPIRES {
            return Ok(Watched::Expired);
        }
    }
}

async fn put(
    loc: &Location,
    record: &LeaseRecord,
    mode: PutMode,
) -> Result<UpdateVersion, RemoteError> {
    let bytes = serde_json::to_vec(record).unwrap_or_default();
    loc.put(LEASE, Bytes::from(bytes), mode).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_alive_until_it_is_reaped_or_a_zombie() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX - 1));
    }
}
