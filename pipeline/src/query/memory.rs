//! The memory bound of queries: the `--memory-limit` value (bytes, with an
//! optional K/M/G/T suffix), its default (a quarter of the machine's
//! memory), and the DataFusion runtime whose memory pool enforces it.

use std::fmt;
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::Arc;

use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{GreedyMemoryPool, TrackConsumersPool};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};

use super::QueryError;

/// Used when the machine's memory cannot be read (not Linux, or no /proc).
const FALLBACK_MEMORY_LIMIT: u64 = 1 << 30;

/// A number of bytes as `--memory-limit` takes it: `1048576`, `512K`, `512M`,
/// `2G`, `1T` (powers of 1024; a trailing `B`/`iB` is accepted: `2GiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

#[derive(Debug, thiserror::Error)]
#[error(
    "{0:?} is not a size in bytes: write a whole number, optionally with K, M, G or T (powers of 1024), e.g. 536870912 or 512M"
)]
pub struct ByteSizeError(String);

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(s: &str) -> Result<ByteSize, ByteSizeError> {
        let err = || ByteSizeError(s.to_owned());
        let t = s.trim();
        let t = t
            .strip_suffix("iB")
            .or_else(|| t.strip_suffix("ib"))
            .or_else(|| t.strip_suffix(['B', 'b']))
            .unwrap_or(t);
        let (digits, shift) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let shift = match c.to_ascii_uppercase() {
                    'K' => 10,
                    'M' => 20,
                    'G' => 30,
                    'T' => 40,
                    _ => return Err(err()),
                };
                (&t[..i], shift)
            }
            _ => (t, 0),
        };
        let digits = digits.trim();
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let n: u64 = digits.parse().map_err(|_| err())?;
        n.checked_mul(1u64 << shift).map(ByteSize).ok_or_else(err)
    }
}

/// Plain bytes: clap re-parses a default's text, and the number is exact.
impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn mem_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line
        .trim_start_matches("MemTotal:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// The cgroup v2 memory limit of this process, if one is set: in a
/// container, a quarter of the host's memory could be more than the
/// container may use.
fn cgroup_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok()?;
    text.trim().parse().ok()
}

/// The default of `--memory-limit`: a quarter of the machine's memory (the
/// smaller of `MemTotal` and the cgroup limit), or 1 GiB if neither can be read.
pub fn default_memory_limit() -> ByteSize {
    let total = match (mem_total(), cgroup_limit()) {
        (Some(m), Some(c)) => Some(m.min(c)),
        (m, c) => m.or(c),
    };
    ByteSize(total.map_or(FALLBACK_MEMORY_LIMIT, |t| (t / 4).max(1)))
}

/// Operators named in a memory-limit error: the largest holders.
const TOP_CONSUMERS: NonZeroUsize = NonZeroUsize::MIN.saturating_add(2);

/// A DataFusion runtime whose memory pool holds every query operator's
/// reservations to `limit` bytes; an operator that would go over fails its
/// query with `ResourcesExhausted`, naming the largest consumers.
///
/// Spilling is off: spill files go to the temporary directory, often a
/// tmpfs that is memory too, and a read-only command should not write
/// gigabytes behind the user's back. A sort or aggregation larger than the
/// limit fails instead, and the user narrows the query or raises the limit.
pub fn runtime_env(limit: ByteSize) -> Result<Arc<RuntimeEnv>, QueryError> {
    let pool = usize::try_from(limit.0).unwrap_or(usize::MAX);
    RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(TrackConsumersPool::new(
            GreedyMemoryPool::new(pool),
            TOP_CONSUMERS,
        )))
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        )
        .build_arc()
        .map_err(QueryError::Runtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_suffixes() {
        for (text, bytes) in [
            ("0", 0),
            ("1048576", 1 << 20),
            ("512K", 512 << 10),
            ("512M", 512 << 20),
            ("2G", 2 << 30),
            ("2g", 2 << 30),
            ("2GiB", 2 << 30),
            ("2GB", 2 << 30),
            ("1T", 1 << 40),
            (" 64 M ", 64 << 20),
        ] {
            assert_eq!(text.parse::<ByteSize>().unwrap(), ByteSize(bytes), "{text}");
        }
        for bad in ["", "M", "-1", "1.5G", "12X", "99999999999T", "1 2"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
    }

    #[test]
    fn display_round_trips() {
        let d = default_memory_limit();
        assert!(d.0 > 0);
        assert_eq!(d.to_string().parse::<ByteSize>().unwrap(), d);
    }

    #[test]
    fn default_is_a_quarter_of_memory() {
        let Some(total) = mem_total() else {
            return;
        };
        let limit = default_memory_limit().0;
        assert!(limit <= total / 4, "{limit} > {total} / 4");
    }
}
