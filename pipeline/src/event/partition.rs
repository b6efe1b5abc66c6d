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

use std::borrow::Cow;

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

/// The subject transform a stream stores partition numbers with:
/// `<prefix>.<tenant>.<type>` is stored as
/// `<prefix>.<partition>.<tenant>.<type>`, the partition out of `count`
/// that NATS computes as [`partition_of`] does. Returns (source,
/// destination).
pub(crate) fn transform(prefix: &str, count: u32) -> (String, String) {
    (
        format!("{prefix}.*.>"),
        format!("{prefix}.{{{{partition({count},1)}}}}.{{{{wildcard(1)}}}}.>"),
    )
}

/// How many partitions a stream's subject transform stores in its
/// subjects: `Some(n)` for [`transform`]`(prefix, n)` (spaces and the
/// function names' case aside), `None` for any other.
pub(crate) fn stored_count(prefix: &str, source: &str, destination: &str) -> Option<u32> {
    if source != format!("{prefix}.*.>") {
        return None;
    }
    let dest: String = destination
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    let inner = dest
        .strip_prefix(&format!("{}.{{{{partition(", prefix.to_ascii_lowercase()))?
        .strip_suffix(",1)}}.{{wildcard(1)}}.>")?;
    let count: u32 = inner.parse().ok()?;
    (1..=MAX_PARTITIONS).contains(&count).then_some(count)
}

/// The subject a message was published to, from the one a stream of
/// `count` partitions ([`transform`]) stored it under: the partition token
/// removed, once checked to be [`partition_of`] its tenant. A stored
/// subject with fewer than three tokens after the prefix was not
/// transformed (the transform needs a tenant and a type) and is returned
/// as it is. `None` when the token is not the tenant's: the message was
/// stored before the stream's transform was added or changed.
pub(crate) fn published_subject_checked<'a>(
    stored: &'a str,
    prefix: &str,
    count: u32,
) -> Option<Cow<'a, str>> {
    let Some(rest) = stored
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('.'))
    else {
        return Some(Cow::Borrowed(stored));
    };
    match rest.split_once('.') {
        Some((token, published)) if published.contains('.') => {
            let tenant = published.split('.').next().unwrap_or_default();
            (token.parse::<u32>().ok() == Some(partition_of(tenant, count)))
                .then(|| Cow::Owned(format!("{prefix}.{published}")))
        }
        _ => Some(Cow::Borrowed(stored)),
    }
}

impl Partition {
    /// The subject filter of this partition's consumer on a stream that
    /// stores partition numbers ([`transform`]): its own tenants'
    /// messages, and the catalog's when the catalog tenant falls in this
    /// partition. One filter: JetStream serves a consumer of several
    /// wildcard filters far slower on a stream of many subjects.
    pub(crate) fn filter_subject(&self, prefix: &str) -> String {
        format!("{prefix}.{}.>", self.index)
    }

    /// The subjects this partition also folds, which its consumer does not
    /// deliver and which it reads from the stream by subject (they are
    /// few): the catalog's, stored under the catalog tenant's partition,
    /// and for partition 0 the subjects the transform left alone (no type
    /// token), which partition 0 dead-letters.
    pub(crate) fn side_subjects(&self, prefix: &str) -> Vec<String> {
        let mut subjects = Vec::new();
        let system = partition_of(SYSTEM_TENANT, self.count);
        if system != self.index {
            subjects.push(format!("{prefix}.{system}.{SYSTEM_TENANT}.>"));
        }
        if self.index == 0 {
            subjects.push(format!("{prefix}.*"));
        }
        subjects
    }

    /// Whose is a message the server delivered through
    /// [`Partition::filter_subject`] and [`Partition::side_subjects`]: the
    /// catalog's, or this partition's.
    pub(crate) fn owner_of_delivered(subject: &str, prefix: &str) -> Owner {
        match subject_tenant(subject, prefix) {
            Some(SYSTEM_TENANT) => Owner::Shared,
            _ => Owner::Own,
        }
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
    fn the_partition_transform_is_read_back_and_undone() {
        let (src, dest) = transform("tally.events", 3);
        assert_eq!(src, "tally.events.*.>");
        assert_eq!(dest, "tally.events.{{partition(3,1)}}.{{wildcard(1)}}.>");
        assert_eq!(stored_count("tally.events", &src, &dest), Some(3));
        assert_eq!(
            stored_count(
                "tally.events",
                &src,
                "tally.events.{{ Partition(3, 1) }}.{{ wildcard(1) }}.>"
            ),
            Some(3)
        );
        for (s, d) in [
            ("tally.events.>", dest.as_str()),
            (
                src.as_str(),
                "tally.events.{{partition(3,2)}}.{{wildcard(1)}}.>",
            ),
            (
                src.as_str(),
                "tally.events.{{partition(0,1)}}.{{wildcard(1)}}.>",
            ),
            (src.as_str(), "other.{{wildcard(1)}}.>"),
        ] {
            assert_eq!(stored_count("tally.events", s, d), None, "{s} -> {d}");
        }
        let p = "tally.events";
        let five = partition_of("5", 3);
        assert_eq!(
            published_subject_checked(&format!("tally.events.{five}.5.x"), p, 3).as_deref(),
            Some("tally.events.5.x")
        );
        assert_eq!(
            published_subject_checked("other.1.a.b", p, 3).as_deref(),
            Some("other.1.a.b")
        );
        // Checked against the transform of 3 partitions.
        let k = partition_of("acme", 3);
        assert_eq!(
            published_subject_checked(&format!("tally.events.{k}.acme.usage.recorded"), p, 3)
                .as_deref(),
            Some("tally.events.acme.usage.recorded")
        );
        let wrong = (k + 1) % 3;
        for stored in [
            format!("tally.events.{wrong}.acme.usage.recorded"),
            "tally.events.acme.usage.recorded".to_owned(),
        ] {
            assert_eq!(published_subject_checked(&stored, p, 3), None, "{stored}");
        }
        assert_eq!(
            published_subject_checked("tally.events.acme", p, 3).as_deref(),
            Some("tally.events.acme")
        );
    }

    #[test]
    fn partition_filters_cover_each_stored_subject_once() {
        let prefix = "tally.events";
        let n = 4;
        let parts: Vec<Partition> = (0..n).map(|index| Partition { index, count: n }).collect();
        // A subject filter as JetStream matches it.
        let matches = |filter: &str, subject: &str| {
            let (f, s): (Vec<&str>, Vec<&str>) =
                (filter.split('.').collect(), subject.split('.').collect());
            for (i, t) in f.iter().enumerate() {
                match *t {
                    ">" => return s.len() > i,
                    "*" if i < s.len() => {}
                    t if s.get(i) == Some(&t) => {}
                    _ => return false,
                }
            }
            f.len() == s.len()
        };
        let receivers = |stored: &str| -> Vec<u32> {
            parts
                .iter()
                .filter(|p| {
                    std::iter::once(p.filter_subject(prefix))
                        .chain(p.side_subjects(prefix))
                        .any(|f| matches(&f, stored))
                })
                .map(|p| p.index)
                .collect()
        };
        for tenant in ["acme", "globex", "t0001", "t0002", "initech", "x"] {
            let k = partition_of(tenant, n);
            let stored = format!("{prefix}.{k}.{tenant}.usage.recorded");
            assert_eq!(receivers(&stored), vec![k], "{tenant}");
            assert_eq!(
                Partition::owner_of_delivered(
                    &published_subject_checked(&stored, prefix, n).unwrap(),
                    prefix
                ),
                Owner::Own
            );
        }
        let system = partition_of(SYSTEM_TENANT, n);
        let catalog = format!("{prefix}.{system}.{SYSTEM_TENANT}.catalog.plan_published");
        assert_eq!(receivers(&catalog), vec![0, 1, 2, 3]);
        assert_eq!(
            Partition::owner_of_delivered(
                &published_subject_checked(&catalog, prefix, n).unwrap(),
                prefix
            ),
            Owner::Shared
        );
        // Left alone by the transform: partition 0 dead-letters it.
        assert_eq!(receivers("tally.events.acme"), vec![0]);
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
