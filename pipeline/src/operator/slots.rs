//! Keyed operator state in numbered slots that never move, and the
//! per-series cache of the slot an event last went to.
//!
//! `usage` (one slot per window) and `overages` (one per tenant-month)
//! reach most events' state through a series' [`Recent`] slot, without
//! hashing the key, and list their dirty state as slot numbers, so cutting
//! rows needs no lookup either.

use std::collections::HashMap;
use std::hash::Hash;

use super::FixedState;

/// Slots per chunk.
const CHUNK: usize = 4096;

/// A small index (key -> slot number) over `(key, value)` slots kept in
/// fixed-size chunks, so growing never moves a value (the index moves its
/// small entries; a single vector of ~200-byte slots was copied on every
/// doubling).
pub(crate) struct Slots<K, V> {
    index: HashMap<K, u32, FixedState>,
    chunks: Vec<Vec<(K, V)>>,
    len: usize,
    /// Slots whose key was removed, taken again by the next new keys. A
    /// removed slot keeps its old pair until then: [`Slots::entries`]
    /// still yields it, so callers remove only state that reads as empty.
    free: Vec<u32>,
}

impl<K, V> Default for Slots<K, V> {
    fn default() -> Self {
        Slots {
            index: HashMap::with_hasher(FixedState),
            chunks: Vec::new(),
            len: 0,
            free: Vec::new(),
        }
    }
}

impl<K: Hash + Eq + Clone, V> Slots<K, V> {
    pub(crate) fn slot(&self, i: u32) -> Option<&(K, V)> {
        let i = i as usize;
        self.chunks.get(i / CHUNK)?.get(i % CHUNK)
    }

    pub(crate) fn slot_mut(&mut self, i: u32) -> Option<&mut (K, V)> {
        let i = i as usize;
        self.chunks.get_mut(i / CHUNK)?.get_mut(i % CHUNK)
    }

    /// The slot number of `k`, if it has one.
    pub(crate) fn slot_of(&self, k: &K) -> Option<u32> {
        self.index.get(k).copied()
    }

    pub(crate) fn get(&self, k: &K) -> Option<&V> {
        self.slot(*self.index.get(k)?).map(|(_, v)| v)
    }

    pub(crate) fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        let i = *self.index.get(k)?;
        self.slot_mut(i).map(|(_, v)| v)
    }

    /// The slot of `k` (one hash lookup), made with `new()` if absent;
    /// true when it was made.
    pub(crate) fn upsert(&mut self, k: K, new: impl FnOnce() -> V) -> (u32, bool) {
        use std::collections::hash_map::Entry;
        match self.index.entry(k) {
            Entry::Occupied(o) => (*o.get(), false),
            Entry::Vacant(v) => {
                let pair = (v.key().clone(), new());
                if let Some(i) = self.free.pop()
                    && let Some(slot) = self
                        .chunks
                        .get_mut(i as usize / CHUNK)
                        .and_then(|c| c.get_mut(i as usize % CHUNK))
                {
                    *slot = pair;
                    v.insert(i);
                    return (i, true);
                }
                let i = u32::try_from(self.len).unwrap_or(u32::MAX);
                if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
                    self.chunks.push(Vec::with_capacity(CHUNK));
                }
                if let Some(chunk) = self.chunks.last_mut() {
                    chunk.push(pair);
                    v.insert(i);
                    self.len += 1;
                }
                (i, true)
            }
        }
    }

    /// Forgets `k`; its slot is given to a later new key.
    pub(crate) fn remove(&mut self, k: &K) {
        if let Some(i) = self.index.remove(k) {
            self.free.push(i);
        }
    }

    /// Slots made, removed ones included: slot numbers run `0..len()`.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Keys held (removed ones not counted).
    pub(crate) fn held(&self) -> usize {
        self.index.len()
    }

    /// Every `(key, value)`, in slot order (removed slots not yet taken
    /// again included: see `free`).
    pub(crate) fn entries(&self) -> impl Iterator<Item = &(K, V)> {
        self.chunks.iter().flatten()
    }

    /// Every slot number and `(key, value)`, mutably, in slot order
    /// (removed slots included, as in [`Slots::entries`]).
    pub(crate) fn entries_mut(&mut self) -> impl Iterator<Item = (u32, &mut (K, V))> {
        self.chunks
            .iter_mut()
            .flatten()
            .enumerate()
            .map(|(i, e)| (u32::try_from(i).unwrap_or(u32::MAX), e))
    }
}

/// The slot a series' last event went to, and the time range that slot
/// covers (`[start, end)`; empty until the first event). Slots never move,
/// so a `Recent` never goes stale: it only stops matching (in slots whose
/// keys are never removed, as `usage` and `overages` keep theirs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Recent {
    pub(crate) start: i64,
    pub(crate) end: i64,
    pub(crate) slot: u32,
}

impl Recent {
    pub(crate) const NONE: Recent = Recent {
        start: 0,
        end: 0,
        slot: 0,
    };

    /// The slot, if `t` falls in its range.
    pub(crate) fn slot_at(&self, t: i64) -> Option<u32> {
        (self.start <= t && t < self.end).then_some(self.slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_keep_their_numbers_as_they_grow() {
        let mut s: Slots<u64, u64> = Slots::default();
        for k in 0..10_000u64 {
            assert_eq!(s.upsert(k, || k * 2), (k as u32, true));
        }
        assert_eq!(s.upsert(7, || 0), (7, false));
        *s.get_mut(&7).unwrap() = 1;
        s.upsert(10_000, || 3);
        assert_eq!(s.get(&7), Some(&1));
        assert_eq!(s.slot_of(&7), Some(7));
        assert_eq!(s.slot(5000), Some(&(5000, 10_000)));
        assert_eq!(s.slot(10_000), Some(&(10_000, 3)));
        assert_eq!(s.len(), 10_001);
        assert_eq!(s.entries().count(), 10_001);
        let r = Recent {
            start: 10,
            end: 20,
            slot: 4,
        };
        assert_eq!(
            (r.slot_at(9), r.slot_at(10), r.slot_at(19), r.slot_at(20)),
            (None, Some(4), Some(4), None)
        );
        assert_eq!(Recent::NONE.slot_at(0), None);
    }

    #[test]
    fn a_removed_key_gives_its_slot_to_the_next_new_key() {
        let mut s: Slots<u64, u64> = Slots::default();
        for k in 0..5u64 {
            s.upsert(k, || k);
        }
        s.remove(&2);
        s.remove(&9);
        assert_eq!((s.held(), s.get(&2), s.slot_of(&2)), (4, None, None));
        assert_eq!(s.upsert(7, || 70), (2, true));
        assert_eq!(s.slot(2), Some(&(7, 70)));
        assert_eq!(s.upsert(8, || 80), (5, true));
        assert_eq!((s.len(), s.held()), (6, 6));
        let seen: Vec<(u32, u64)> = s.entries_mut().map(|(i, (k, _))| (i, *k)).collect();
        assert_eq!(seen, [(0, 0), (1, 1), (2, 7), (3, 3), (4, 4), (5, 8)]);
    }
}
