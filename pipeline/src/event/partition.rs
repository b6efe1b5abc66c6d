//! Partitions of the stream by tenant: which messages a partitioned
//! deployment's worker folds.
//!
//! A deployment of N partitions gives each message to the partition
//! `fnv1a32(tenant token of its subject) mod N`, the hash NATS's
//! `{{partition(N, ...)}}` subject transform uses, so a producer or a
//! stream transform can compute the same. The catalog's messages (tenant
//! `_system`) belong to every partition: each folds the catalog of the
//! whole stream. A subject without a tenant token belongs to partition 0,
//! which dead-letters it. Everything here looks at the subject alone, so
//! a worker passes over other partitions' messages without reading them.

use serde::{Deserialize, Serialize};

/// The tenant whose messages (the catalog) every partition folds.
pub(crate) const SYSTEM_TENANT: &str = "_system";

/// The most partitions a deployment may have.
pub(crate) const MAX_PARTITIONS: u32 = 1024;

/// One partition of a deployment of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub(crate) index: u32,
    pub(crate) count: u32,
}

/// FNV-1a, 32 bits.
pub(crate) fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The tenant token of `subject` (`<prefix>.<tenant>.<type>`), if it has one.
pub(crate) fn subject_tenant<'a>(subject: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let tenant = rest.split('.').next()?;
    (!tenant.is_empty()).then_some(tenant)
}

/// The partition out of `count` that `tenant`'s messages belong to.
pub(crate) fn partition_of(tenant: &str, count: u32) -> u32 {
    fnv1a32(tenant.as_bytes()) % count.max(1)
}

/// Whose message is it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// This partition's: folded, archived, dead-lettered here.
    Own,
    /// The catalog's: folded and archived by every partition, dead-lettered
    /// by partition 0 only (one dead letter per message).
    Shared,
    /// Another partition's: passed over.
    Other,
}

impl Partition {
    /// Whose is the message on `subject`.
    pub(crate) fn owner(&self, subject: &str, prefix: &str) -> Owner {
        match subject_tenant(subject, prefix) {
            Some(SYSTEM_TENANT) => Owner::Shared,
            Some(t) if partition_of(t, self.count) == self.index => Owner::Own,
            None if self.index == 0 => Owner::Own,
            _ => Owner::Other,
        }
    }

    /// Whether this partition publishes the dead letters of shared messages.
    pub(crate) fn reports_shared(&self) -> bool {
        self.index == 0
    }
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of {}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a32_is_the_reference_hash() {
        // The FNV-1a test vectors.
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn every_message_has_one_owner_and_the_catalog_is_shared() {
        let prefix = "tally.events";
        let n = 3;
        let parts: Vec<Partition> = (0..n).map(|index| Partition { index, count: n }).collect();
        for tenant in ["acme", "globex", "t0001", "t0002", "initech", "x"] {
            let subject = format!("{prefix}.{tenant}.usage.recorded");
            let own: Vec<u32> = parts
                .iter()
                .filter(|p| p.owner(&subject, prefix) == Owner::Own)
                .map(|p| p.index)
                .collect();
            assert_eq!(own, vec![partition_of(tenant, n)], "{tenant}");
        }
        let catalog = format!("{prefix}._system.catalog.plan_published");
        assert!(
            parts
                .iter()
                .all(|p| p.owner(&catalog, prefix) == Owner::Shared)
        );
        // No tenant token: partition 0 dead-letters it.
        for bad in [
            "tally.events",
            "other.acme.usage.recorded",
            "tally.events..x",
        ] {
            let own: Vec<u32> = parts
                .iter()
                .filter(|p| p.owner(bad, prefix) == Owner::Own)
                .map(|p| p.index)
                .collect();
            assert_eq!(own, vec![0], "{bad}");
        }
    }
}
