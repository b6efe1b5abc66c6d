//! Dedup by (`source`, `id`) over a horizon of stream time.
//!
//! Each accepted event's key is remembered with its JetStream publish time;
//! a later message with the same key published within the horizon is a
//! duplicate. Memory is bounded by the number of events inside the horizon:
//! entries older than `newest publish time - horizon` are evicted in publish
//! order. Keys are 128-bit xxh3 hashes (16 bytes instead of the strings;
//! a collision among 10^9 keys has probability ~10^-21).
//!
//! The state is never written separately: it is rebuilt at start-up from the
//! `events` archive, which holds exactly the accepted events with their
//! publish times and is durable before each checkpoint.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use xxhash_rust::xxh3::{Xxh3, xxh3_128};

/// The key of an event: xxh3-128 over `source`, a 0xFF separator (never
/// valid UTF-8, so the pair is unambiguous) and `id`, hashed in one shot
/// from a stack buffer when short (the streaming hasher costs more).
pub fn key(source: &str, id: &str) -> u128 {
    let (s, i) = (source.as_bytes(), id.as_bytes());
    let mut buf = [0u8; 192];
    let n = s.len() + 1 + i.len();
    if let Some(out) = buf.get_mut(..n) {
        out[..s.len()].copy_from_slice(s);
        out[s.len()] = 0xFF;
        out[s.len() + 1..].copy_from_slice(i);
        return xxh3_128(out);
    }
    let mut h = Xxh3::new();
    h.update(s);
    h.update(&[0xFF]);
    h.update(i);
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

type KeySet = HashSet<Key, BuildHasherDefault<PassThroughHasher>>;

/// Most entries reserved up front ([`Dedup::reserve`]): growing the
/// table rehashes every key and faults in a fresh table each time, which
/// showed at ~4% of ingest CPU; beyond this the table grows as needed.
pub const MAX_RESERVE: usize = 1 << 20;

/// The dedup horizon.
///
/// A set, not a map to publish times: the horizon is evicted up to the
/// newest publish time *before* each lookup, so every key still present was
/// accepted within the horizon of the message being checked (publish times
/// of one stream only move forward; an older one, after a clock step back,
/// is even closer to every remembered key). 40 bytes per remembered event.
pub struct Dedup {
    horizon_us: i64,
    /// Keys of the accepted events inside the horizon.
    seen: KeySet,
    /// (publish time, key) in arrival order, for eviction.
    order: VecDeque<(i64, Key)>,
    /// Largest publish time seen: "now" in stream time.
    now: i64,
}

impl Dedup {
    pub fn new(horizon_us: i64) -> Dedup {
        Dedup {
            horizon_us,
            seen: KeySet::default(),
            order: VecDeque::new(),
            now: i64::MIN,
        }
    }

    /// Makes room for `entries` more (at most [`MAX_RESERVE`]) before the
    /// horizon grows.
    pub fn reserve(&mut self, entries: usize) {
        let n = entries.min(MAX_RESERVE);
        self.seen.reserve(n);
        self.order.reserve(n);
    }

    /// Admits an event with `key`, published at `published_at`: false if
    /// it duplicates one accepted within the horizon (and changes nothing),
    /// true if it is new (and is remembered).
    pub fn admit(&mut self, key: u128, published_at: i64) -> bool {
        if published_at > self.now {
            self.now = published_at;
            self.evict();
        }
        let key = Key::from(key);
        if !self.seen.insert(key) {
            return false;
        }
        self.order.push_back((published_at, key));
        true
    }

    fn evict(&mut self) {
        let cutoff = self.now.saturating_sub(self.horizon_us);
        while let Some(&(t, k)) = self.order.front() {
            if t >= cutoff {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&k);
        }
    }

    /// Entries currently remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000_000;

    #[test]
    fn duplicates_inside_the_horizon_only() {
        let k = key("svc", "e1");
        for (at, duplicate) in [(31 * DAY, true), (32 * DAY, true), (32 * DAY + 1, false)] {
            let mut d = Dedup::new(32 * DAY);
            assert!(d.admit(k, 0));
            assert_eq!(!d.admit(k, at), duplicate, "at {at}");
        }
        let mut d = Dedup::new(32 * DAY);
        assert!(d.admit(k, 0));
        assert!(d.admit(key("svc", "e2"), DAY));
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
        assert!(d.admit(key("s", "a"), 100));
        assert!(d.admit(key("s", "b"), 105));
        // The server clock stepped back: still inside the horizon of "a".
        assert!(!d.admit(key("s", "a"), 103));
    }

    #[test]
    fn memory_is_bounded_by_the_horizon() {
        let mut d = Dedup::new(10);
        d.reserve(16);
        for i in 0..1000 {
            assert!(d.admit(key("s", &i.to_string()), i));
        }
        assert!(d.len() <= 11, "{}", d.len());
    }

    #[test]
    fn key_is_unambiguous() {
        assert_ne!(key("ab", "c"), key("a", "bc"));
    }
}
