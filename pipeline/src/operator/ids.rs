//! Ids and hashing shared by the operators: a fixed-seed hasher (runs stay
//! identical), interned names, and numbered (tenant, metric) series, so
//! that state with a row per tenant and month is keyed by small ids.

use std::collections::HashMap;
use std::sync::Arc;

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

/// (tenant, metric) pairs numbered from 0 in order of first sight, found
/// with one string lookup per event (`tenant\u{1f}metric`, built in a
/// reused buffer): `usage` and `overages` key their state by these ids.
#[derive(Default)]
pub(crate) struct SeriesIds {
    ids: HashMap<Box<str>, u32, FixedState>,
    scratch: String,
}

impl SeriesIds {
    /// The id of (`tenant`, `metric`), and whether it is new (then it is
    /// the number of pairs seen before).
    pub(crate) fn id(&mut self, tenant: &str, metric: &str) -> (u32, bool) {
        self.scratch.clear();
        self.scratch.push_str(tenant);
        self.scratch.push('\u{1f}');
        self.scratch.push_str(metric);
        if let Some(id) = self.ids.get(self.scratch.as_str()) {
            return (*id, false);
        }
        let id = u32::try_from(self.ids.len()).unwrap_or(u32::MAX);
        self.ids.insert(self.scratch.as_str().into(), id);
        (id, true)
    }

    /// The id of (`tenant`, `metric`) if seen (allocates: not for a hot path).
    pub(crate) fn get(&self, tenant: &str, metric: &str) -> Option<u32> {
        self.ids
            .get(format!("{tenant}\u{1f}{metric}").as_str())
            .copied()
    }
}
