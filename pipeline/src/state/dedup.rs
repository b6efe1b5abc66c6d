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

use std::collections::{HashMap, VecDeque};
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
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

type KeyMap = HashMap<u128, i64, BuildHasherDefault<PassThroughHasher>>;

/// The dedup horizon.
pub struct Dedup {
    horizon_us: i64,
    /// key -> publish time of the accepted event.
    seen: KeyMap,
    /// (publish time, key) in arrival order, for eviction.
    order: VecDeque<(i64, u128)>,
    /// Largest publish time seen: "now" in stream time.
    now: i64,
}

impl Dedup {
    pub fn new(horizon_us: i64) -> Dedup {
        Dedup {
            horizon_us,
            seen: KeyMap::default(),
            order: VecDeque::new(),
            now: i64::MIN,
        }
    }

    /// Is an event with `key`, published at `published_at`, a duplicate of
    /// one accepted earlier within the horizon?
    pub fn is_duplicate(&self, key: u128, published_at: i64) -> bool {
        self.seen
            .get(&key)
            .is_some_and(|t| published_at.saturating_sub(*t) <= self.horizon_us)
    }

    /// Remembers an accepted event and evicts what fell out of the horizon.
    pub fn insert(&mut self, key: u128, published_at: i64) {
        self.seen.insert(key, published_at);
        self.order.push_back((published_at, key));
        if published_at > self.now {
            self.now = published_at;
            self.evict();
        }
    }

    fn evict(&mut self) {
        let cutoff = self.now.saturating_sub(self.horizon_us);
        while let Some(&(t, k)) = self.order.front() {
            if t >= cutoff {
                break;
            }
            self.order.pop_front();
            // Only drop the map entry if it still belongs to this occurrence.
            if self.seen.get(&k) == Some(&t) {
                self.seen.remove(&k);
            }
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
        let mut d = Dedup::new(32 * DAY);
        let k = key("svc", "e1");
        assert!(!d.is_duplicate(k, 0));
        d.insert(k, 0);
        assert!(d.is_duplicate(k, 31 * DAY));
        assert!(d.is_duplicate(k, 32 * DAY));
        assert!(!d.is_duplicate(k, 32 * DAY + 1));
        assert!(!d.is_duplicate(key("svc", "e2"), DAY));
    }

    #[test]
    fn memory_is_bounded_by_the_horizon() {
        let mut d = Dedup::new(10);
        for i in 0..1000 {
            d.insert(key("s", &i.to_string()), i);
        }
        assert!(d.len() <= 11, "{}", d.len());
    }

    #[test]
    fn key_is_unambiguous() {
        assert_ne!(key("ab", "c"), key("a", "bc"));
    }
}
