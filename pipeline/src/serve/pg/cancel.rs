//! Cancel requests, as Postgres answers them: each logged-in session is
//! told a random process id and secret key (`BackendKeyData`); a
//! `CancelRequest` naming both, sent on a connection of its own (psql's
//! Ctrl-C, psycopg's `cancel()`, JDBC's `cancel()` and query timeout),
//! stops the statement that session is running, which answers `57014`.
//! A request naming anything else does nothing and says nothing, so it
//! tells a stranger nothing of other sessions. A request that arrives
//! while the session runs nothing does nothing either.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use pgwire::api::cancel::CancelHandler;
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::startup::SecretKey;

/// The sessions that may be cancelled: process id -> (secret, the
/// session's signal).
#[derive(Default)]
pub struct Cancels {
    sessions: Mutex<HashMap<i32, (i32, Arc<tokio::sync::Notify>)>>,
}

impl Cancels {
    fn sessions(&self) -> MutexGuard<'_, HashMap<i32, (i32, Arc<tokio::sync::Notify>)>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new key for the session signalled by `signal`, kept until the
    /// key is dropped; `None` without randomness (the session then just
    /// cannot be cancelled).
    pub fn register(self: &Arc<Self>, signal: Arc<tokio::sync::Notify>) -> Option<CancelKey> {
        let mut sessions = self.sessions();
        loop {
            let mut raw = [0u8; 8];
            getrandom::fill(&mut raw).ok()?;
            let [a, b, c, d, e, f, g, h] = raw;
            // Positive, as a process id is.
            let pid = i32::from_le_bytes([a, b, c, d]) & i32::MAX;
            let secret = i32::from_le_bytes([e, f, g, h]);
            if pid == 0 || sessions.contains_key(&pid) {
                continue;
            }
            sessions.insert(pid, (secret, signal));
            return Some(CancelKey {
                cancels: Arc::clone(self),
                pid,
                secret,
            });
        }
    }

    /// Signals the session `pid` if `secret` is its key.
    fn cancel(&self, pid: i32, secret: &SecretKey) {
        let sessions = self.sessions();
        if let Some((mine, signal)) = sessions.get(&pid)
            // The request's connection may decode the same 4 bytes as
            // bytes rather than an integer (another protocol version).
            && secret.eq_value(&SecretKey::I32(*mine))
        {
            signal.notify_waiters();
        }
    }
}

/// A session's key; the session can no longer be cancelled once it is
/// dropped (with the connection).
pub struct CancelKey {
    cancels: Arc<Cancels>,
    pub pid: i32,
    pub secret: i32,
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        self.cancels.sessions().remove(&self.pid);
    }
}

/// pgwire's handler of the requests.
pub struct OnCancel(pub Arc<Cancels>);

#[async_trait]
impl CancelHandler for OnCancel {
    async fn on_cancel_request(&self, request: CancelRequest) {
        tracing::debug!(pid = request.pid, "pgwire cancel request");
        self.0.cancel(request.pid, &request.secret_key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_right_key_signals_and_a_dropped_key_is_gone() {
        let cancels = Arc::new(Cancels::default());
        let signal = Arc::new(tokio::sync::Notify::new());
        let key = cancels.register(Arc::clone(&signal)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let wait = |s: Arc<tokio::sync::Notify>| async move {
                tokio::time::timeout(std::time::Duration::from_millis(200), s.notified())
                    .await
                    .is_ok()
            };
            let waiting = tokio::spawn(wait(Arc::clone(&signal)));
            tokio::task::yield_now().await;
            cancels.cancel(key.pid, &SecretKey::I32(key.secret.wrapping_add(1)));
            assert!(!waiting.await.unwrap(), "a wrong secret signalled");
            let waiting = tokio::spawn(wait(Arc::clone(&signal)));
            tokio::task::yield_now().await;
            cancels.cancel(key.pid, &SecretKey::I32(key.secret));
            assert!(waiting.await.unwrap(), "the right key did not signal");
            let waiting = tokio::spawn(wait(Arc::clone(&signal)));
            tokio::task::yield_now().await;
            let bytes = bytes::Bytes::copy_from_slice(&key.secret.to_be_bytes());
            cancels.cancel(key.pid, &SecretKey::Bytes(bytes));
            assert!(waiting.await.unwrap(), "the key as bytes did not signal");
        });
        let pid = key.pid;
        drop(key);
        assert!(cancels.sessions().get(&pid).is_none());
    }
}
