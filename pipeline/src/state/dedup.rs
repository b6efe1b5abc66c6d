//! Dedup by (`tenant`, `source`, `id`) over a horizon of stream time.
//!
//! The tenant is part of the key so that no tenant can suppress another's
//! events by reusing their (`source`, `id`).
//!
//! Each accepted event's key is remembered with its JetStream publish time;
//! a later message with the same key published within the horizon is a
//! duplicate. Entries older than `newest publish time - horizon` count as
//! absent, and are swept out together once the map has grown by a quarter
//! since the last sweep: memory is bounded by the events inside the
//! horizon at the last sweep and a quarter more. Keys are 128-bit xxh3
//! hashes (16 bytes instead of the strings; a collision among 10^9 keys
//! has probability ~10^-21).
//!
//! The state is never written separately: it is rebuilt at start-up from the
//! `events` archive, which holds exactly the accepted events with their
//! publish times and is durable before each checkpoint.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasherDefault, Hasher};

use xxhash_rust::xxh3::{Xxh3, xxh3_128};

/// Longest key hashed from a stack buffer; longer ones (rare: `source`
/// may be 256 characters) go through the streaming hasher.
const ONE_SHOT_MAX: usize = 256;

/// The key of an event: xxh3-128 over `tenant`, `source` and `id` joined by
/// 0xFF bytes (never part of valid UTF-8, so the triple is unambiguous),
/// hashed in one shot from a stack buffer when short (the streaming hasher
/// costs more).
pub fn key(tenant: &str, source: &str, id: &str) -> u128 {
    let parts = [tenant.as_bytes(), source.as_bytes(), id.as_bytes()];
    let n = parts.iter().map(|p| p.len()).sum::<usize>() + parts.len() - 1;
    let mut buf = [0u8; ONE_SHOT_MAX];
    if let Some(out) = buf.get_mut(..n) {
        let mut at = 0;
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                out[at] = 0xFF;
                at += 1;
            }
            out[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        return xxh3_128(out);
    }
    let mut h = Xxh3::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update(&[0xFF]);
        }
        h.update(p);
    }
    h.digest128()
}

/// A key as two machine words: 16 bytes with 8-byte alignment (a `u128`
/// would pad every table slot and horizon entry to 16-byte alignment).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Key {
    lo: u64,
    hi: u64,
}

impl From<u128> for Key {
    fn from(k: u128) -> Key {
        Key {
            lo: k as u64,
            hi: (k >> 64) as u64,
        }
    }
}

impl std::hash::Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.lo);
    }
}

/// Keys are already uniformly distributed hashes: use their low bits.
#[derive(Default)]
pub struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes.iter().take(8) {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type KeyTimes = HashMap<Key, i64, BuildHasherDefault<PassThroughHasher>>;

/// Most entries reserved up front ([`Dedup::reserve`]): growing the
/// table rehashes every key and faults in a fresh table each time, which
/// costs measurable ingest time; beyond this the table grows as needed.
pub const MAX_RESERVE: usize = 1 << 20;

/// The smallest map that is swept for keys past the horizon.
const SWEEP_MIN: usize = 4096;

/// The dedup horizon.
///
/// A map from key to the time it is remembered from: its publish time, or
/// the newest publish time remembered before it if that is later (after
/// the server's clock stepped back, a key is kept at least as long as the
/// keys accepted before it, as a queue in arrival order would). A key
/// remembered from before `newest publish time - horizon` has left the
/// horizon and is treated as absent, so every key that counts was accepted
/// within the horizon of the message being checked. The keys past the
/// horizon are swept out together when the map has grown by a quarter
/// since the last sweep: no second structure in arrival order is kept for
/// eviction, so an entry is one 24-byte slot (a set slot and a queue entry
/// took 40). Between sweeps the map holds the keys left by the last sweep
/// and at most a quarter more; a quiet stream keeps expired keys until
/// that quarter arrives.
pub struct Dedup {
    horizon_us: i64,
    /// Keys of accepted events and the time each is remembered from: those
    /// inside the horizon, and those past it until the next sweep.
    seen: KeyTimes,
    /// Largest publish time seen: "now" in stream time.
    now: i64,
    /// Latest time a key is remembered from.
    newest: i64,
    /// The map's size at which the next sweep runs.
    sweep_at: usize,
}

impl Dedup {
    pub fn new(horizon_us: i64) -> Dedup {
        Dedup {
            horizon_us,
            seen: KeyTimes::default(),
            now: i64::MIN,
            newest: i64::MIN,
            sweep_at: SWEEP_MIN,
        }
    }

    /// Makes room for `entries` more (at most [`MAX_RESERVE`]) before the
    /// horizon grows.
    pub fn reserve(&mut self, entries: usize) {
        let n = entries.min(MAX_RESERVE);
        self.seen.reserve(n);
    }

    /// Admits an event with `key`, published at `published_at`: false if
    /// it duplicates one accepted within the horizon (and changes nothing),
    /// true if it is new (and is remembered).
    pub fn admit(&mut self, key: u128, published_at: i64) -> bool {
        self.now = self.now.max(published_at);
        let cutoff = self.now.saturating_sub(self.horizon_us);
        let from = published_at.max(self.newest);
        match self.seen.entry(Key::from(key)) {
            Entry::Occupied(mut seen) => {
                if *seen.get() >= cutoff {
                    return false;
                }
                // Past the horizon: accepted again, remembered from now.
                seen.insert(from);
            }
            Entry::Vacant(slot) => {
                slot.insert(from);
                if self.seen.len() >= self.sweep_at {
                    self.seen.retain(|_, t| *t >= cutoff);
                    let left = self.seen.len();
                    self.sweep_at = (left + left / 4).max(SWEEP_MIN);
                }
            }
        }
        self.newest = from;
        true
    }

    /// Entries currently remembered (those past the horizon included,
    /// until the next sweep).
    pub fn len(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000_000;

    #[test]
    fn duplicates_inside_the_horizon_only() {
        let k = key("t", "svc", "e1");
        for (at, duplicate) in [(31 * DAY, true), (32 * DAY, true), (32 * DAY + 1, false)] {
            let mut d = Dedup::new(32 * DAY);
            assert!(d.admit(k, 0));
            assert_eq!(!d.admit(k, at), duplicate, "at {at}");
        }
        let mut d = Dedup::new(32 * DAY);
        assert!(d.admit(k, 0));
        assert!(d.admit(key("t", "svc", "e2"), DAY));
        // A duplicate is not remembered again: the horizon runs from the
        // accepted event, so it expires 32 days after that one.
        assert!(!d.admit(k, 20 * DAY));
        assert!(d.admit(k, 32 * DAY + 1));
        // ...and the re-accepted key is a duplicate again from there.
        assert!(!d.admit(k, 40 * DAY));
    }

    #[test]
    fn a_publish_time_behind_the_newest_still_sees_the_horizon() {
        let mut d = Dedup::new(10);
        assert!(d.admit(key("t", "s", "a"), 100));
        assert!(d.admit(key("t", "s", "b"), 105));
        // The server clock stepped back: still inside the horizon of "a".
        assert!(!d.admit(key("t", "s", "a"), 103));
        // Stepped back past the horizon: "c" is kept as long as the keys
        // accepted before it ("b", from 105), so its copy is a duplicate...
        assert!(d.admit(key("t", "s", "c"), 80));
        assert!(!d.admit(key("t", "s", "c"), 81));
        assert!(!d.admit(key("t", "s", "c"), 115));
        // ...until "b" leaves the horizon too.
        assert!(d.admit(key("t", "s", "c"), 116));
    }

    #[test]
    fn memory_is_bounded_by_the_horizon() {
        let mut d = Dedup::new(10);
        d.reserve(16);
        for i in 0..100_000 {
            assert!(d.admit(key("t", "s", &i.to_string()), i));
            assert!(d.len() <= SWEEP_MIN, "{i}: {}", d.len());
        }
        // A horizon of many keys: between sweeps the map holds at most a
        // quarter more than the horizon.
        let mut d = Dedup::new(100_000);
        for i in 0..1_000_000 {
            assert!(d.admit(key("t", "s", &i.to_string()), i));
            assert!(d.len() <= 125_002, "{i}: {}", d.len());
        }
        // Keys swept out are new again; keys inside the horizon still are not.
        assert!(d.admit(key("t", "s", "0"), 1_000_000));
        assert!(!d.admit(key("t", "s", "999999"), 1_000_000));
    }

    #[test]
    fn key_is_unambiguous() {
        assert_ne!(key("t", "ab", "c"), key("t", "a", "bc"));
        assert_ne!(key("ta", "b", "c"), key("t", "ab", "c"));
    }

    #[test]
    fn key_is_per_tenant() {
        // Another tenant reusing a (source, id) must not suppress the event.
        assert_ne!(
            key("victim", "billing", "inv-777"),
            key("evil", "billing", "inv-777")
        );
        let mut d = Dedup::new(DAY);
        assert!(d.admit(key("evil", "billing", "inv-777"), 0));
        assert!(d.admit(key("victim", "billing", "inv-777"), 1));
        assert!(!d.admit(key("victim", "billing", "inv-777"), 2));
    }

    #[test]
    fn long_keys_hash_like_short_ones() {
        // Past the stack buffer the streaming hasher must give the one-shot hash.
        let source = "s".repeat(ONE_SHOT_MAX);
        let joined = [b"t".as_slice(), &[0xFF], source.as_bytes(), &[0xFF], b"i"].concat();
        assert_eq!(key("t", &source, "i"), xxh3_128(&joined));
        assert_ne!(key("t", &source, "i"), key("u", &source, "i"));
    }
}
