//! Ids and hashing shared by the operators: a fixed-seed hasher (runs stay
//! identical), interned names, and numbered (tenant, metric) series, so
//! that state with a row per tenant and month is keyed by small ids.

use std::collections::HashMap;
use std::sync::Arc;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// A fast hasher with fixed seeds: the maps hold only our own keys, and
/// fixed seeds keep runs identical.
#[derive(Debug, Clone, Copy, Default)]
pub struct FixedState;

impl std::hash::BuildHasher for FixedState {
    type Hasher = ahash::AHasher;
    fn build_hasher(&self) -> ahash::AHasher {
        ahash::RandomState::with_seeds(0x7a11, 0x5eed, 0xb111, 0x1e55).build_hasher()
    }
}

/// Interned names and their ids: views whose state has a row per tenant
/// and month key them by small ids instead of strings.
#[derive(Default)]
pub(crate) struct Names {
    ids: HashMap<Arc<str>, u32, FixedState>,
    names: Vec<Arc<str>>,
}

impl Names {
    pub(crate) fn id(&mut self, s: &str) -> u32 {
        if let Some(id) = self.ids.get(s) {
            return *id;
        }
        let id = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        let name: Arc<str> = Arc::from(s);
        self.names.push(Arc::clone(&name));
        self.ids.insert(name, id);
        id
    }

    /// The id of `s`, if it has one.
    pub(crate) fn get(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }

    /// Each id's rank in the names' byte order, by id.
    pub(crate) fn ranks(&self) -> Vec<u32> {
        ranks(&self.names)
    }

    pub(crate) fn name(&self, id: u32) -> &str {
        self.names
            .get(id as usize)
            .map(|n| &**n)
            .unwrap_or_default()
    }
}

/// Each item's rank in sorted order, by index: sorting many keys by
/// their ranks compares two integers where sorting by the items would
/// compare strings.
pub(crate) fn ranks<T: Ord>(items: &[T]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..u32::try_from(items.len()).unwrap_or(u32::MAX)).collect();
    order.sort_unstable_by(|a, b| items[*a as usize].cmp(&items[*b as usize]));
    let mut rank = vec![0u32; order.len()];
    for (r, i) in order.into_iter().enumerate() {
        rank[i as usize] = u32::try_from(r).unwrap_or(u32::MAX);
    }
    rank
}

/// (tenant, metric) pairs numbered from 0 in order of first sight:
/// `usage`, `overages`, `usage_by_dimension` and the ledger key their
/// state by these ids. A pair is found by a 128-bit hash held inline in
/// the table (the tenant's xxh3, and the metric's seeded with it), so a
/// lookup compares 16 bytes in the slot instead of following a pointer to
/// a string: with 20,000 tenants that pointer was a cache miss per event
/// per operator. Two pairs share a hash with probability about 2^-64
/// each, as for the dedup keys.
#[derive(Default)]
pub(crate) struct SeriesIds {
    ids: HashMap<(u64, u64), u32, FixedState>,
}

fn series_key(tenant: &str, metric: &str) -> (u64, u64) {
    let t = xxh3_64(tenant.as_bytes());
    (t, xxh3_64_with_seed(metric.as_bytes(), t))
}

impl SeriesIds {
    /// The id of (`tenant`, `metric`), and whether it is new (then it is
    /// the number of pairs seen before).
    pub(crate) fn id(&mut self, tenant: &str, metric: &str) -> (u32, bool) {
        let next = u32::try_from(self.ids.len()).unwrap_or(u32::MAX);
        match self.ids.entry(series_key(tenant, metric)) {
            std::collections::hash_map::Entry::Occupied(e) => (*e.get(), false),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(next);
                (next, true)
            }
        }
    }

    /// The id of (`tenant`, `metric`) if seen.
    pub(crate) fn get(&self, tenant: &str, metric: &str) -> Option<u32> {
        self.ids.get(&series_key(tenant, metric)).copied()
    }
}
