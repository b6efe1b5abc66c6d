//! The ledger's index: event key -> where each remembered event with that
//! key is, for the voids that look one up.
//!
//! Every accepted event is inserted and few are ever looked up (only the
//! targets of voids), so the index is built for inserts: a small unsorted
//! buffer of the newest entries, and sorted runs of the older ones that
//! merge like the digits of a binary counter (two runs of the same size
//! become one of twice the size). An insert appends to memory written
//! just before, where a hash map touches a random slot of a table as large
//! as the history (a cache miss on every event); each entry is moved
//! about log2(events / [`RECENT`]) times, sequentially. A lookup scans
//! the buffer and binary-searches each run: a few dozen probes whatever
//! the history, far less than a void's own work. A key may have several
//! entries (an event re-sent after the dedup horizon is accepted again);
//! they are found in the order they were inserted.

use super::{Key, Packed};

/// Entries of the unsorted buffer (96 KiB): a lookup scans it, and a run
/// of this size is sorted at once.
const RECENT: usize = 4096;

/// See the module documentation.
#[derive(Default)]
pub(super) struct KeyIndex {
    /// The newest entries, in insertion order.
    recent: Vec<(Key, Packed)>,
    /// Sorted runs, oldest (and largest) first; equal keys in insertion
    /// order within a run. Each run is larger than the next.
    runs: Vec<Vec<(Key, Packed)>>,
}

impl KeyIndex {
    /// Remembers one more entry for `key`.
    pub(super) fn insert(&mut self, key: Key, loc: Packed) {
        if self.recent.capacity() == 0 {
            self.recent.reserve_exact(RECENT);
        }
        self.recent.push((key, loc));
        if self.recent.len() >= RECENT {
            self.seal();
        }
    }

    /// Every entry of `key`, in insertion order, each replaced by what `f`
    /// returns for it.
    pub(super) fn update(&mut self, key: Key, mut f: impl FnMut(Packed) -> Packed) {
        for run in &mut self.runs {
            let from = run.partition_point(|(k, _)| *k < key);
            for entry in run[from..].iter_mut().take_while(|(k, _)| *k == key) {
                entry.1 = f(entry.1);
            }
        }
        for entry in self.recent.iter_mut().filter(|(k, _)| *k == key) {
            entry.1 = f(entry.1);
        }
    }

    /// Entries held.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.recent.len() + self.runs.iter().map(Vec::len).sum::<usize>()
    }

    /// Sorts the buffer into a run and merges runs of the same size or
    /// smaller into it, so that each run is larger than the next.
    fn seal(&mut self) {
        let mut run = std::mem::take(&mut self.recent);
        // Stable: equal keys stay in insertion order.
        run.sort_by_key(|(k, _)| *k);
        while let Some(older) = self.runs.pop_if(|older| older.len() <= run.len()) {
            run = merge(older, run);
        }
        self.runs.push(run);
    }
}

/// One sorted run of `older` and `newer`, an older entry first among
/// equal keys.
fn merge(older: Vec<(Key, Packed)>, newer: Vec<(Key, Packed)>) -> Vec<(Key, Packed)> {
    let mut out = Vec::with_capacity(older.len() + newer.len());
    let (mut a, mut b) = (older.as_slice(), newer.as_slice());
    while let (Some(x), Some(y)) = (a.first(), b.first()) {
        if x.0 <= y.0 {
            out.push(*x);
            a = &a[1..];
        } else {
            out.push(*y);
            b = &b[1..];
        }
    }
    out.extend_from_slice(a);
    out.extend_from_slice(b);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(index: &mut KeyIndex, key: Key) -> Vec<u64> {
        let mut found = Vec::new();
        index.update(key, |p| {
            found.push(p.0);
            p
        });
        found
    }

    #[test]
    fn every_entry_of_a_key_is_found_in_insertion_order_across_runs() {
        let mut index = KeyIndex::default();
        // A pseudo-random key stream with repeats, across many seals.
        let key = |i: u64| Key(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % 5003, 7);
        let n = 3 * RECENT as u64 * 5 + 17;
        for i in 0..n {
            index.insert(key(i), Packed(i));
        }
        assert_eq!(index.len(), n as usize);
        assert!(index.runs.len() > 1, "the test spans runs");
        for k in 0..5003 {
            let want: Vec<u64> = (0..n).filter(|i| key(*i) == Key(k, 7)).collect();
            assert_eq!(entries(&mut index, Key(k, 7)), want, "key {k}");
        }
        assert!(entries(&mut index, Key(1, 8)).is_empty());
        for w in index.runs.windows(2) {
            assert!(w[0].len() > w[1].len(), "runs shrink from oldest to newest");
        }
    }

    #[test]
    fn an_update_replaces_every_entry_of_the_key_and_only_those() {
        let mut index = KeyIndex::default();
        for i in 0..(2 * RECENT as u64 + 3) {
            index.insert(Key(i % 10, 0), Packed(i));
        }
        index.update(Key(3, 0), |_| Packed(u64::MAX));
        assert!(
            entries(&mut index, Key(3, 0))
                .iter()
                .all(|p| *p == u64::MAX)
        );
        assert_eq!(
            entries(&mut index, Key(4, 0)),
            (0..(2 * RECENT as u64 + 3))
                .filter(|i| i % 10 == 4)
                .collect::<Vec<_>>()
        );
    }
}
