//! The ledger of corrections: which accepted events are voided, and what
//! it takes to stop counting one.
//!
//! A view is a fold of the *effective* events: the accepted events that no
//! accepted `event.voided` of their tenant names by (`source`, `id`). The
//! processor asks the ledger about every accepted event, in stream order
//! ([`Ledger::classify`]), and gets a [`Verdict`]:
//!
//! - an event whose key a void already named is voided on arrival: only
//!   the archive and `corrections` see it;
//! - a void takes its targets out of the ledger and hands them back as
//!   events, so every operator can retract what it folded from them;
//! - any other event is effective and is remembered, so that a void of any
//!   age can find it.
//!
//! What is remembered per event is what a retraction needs and no more:
//! the key (16 bytes) and where the event is (8 bytes), the stream
//! sequence and the time; a usage event's quantity, `source` and `id` (the
//! order of `last`) in its (tenant, metric, month) bucket; for the other
//! metric-driving events, their type and `data` text (packed: `texts`),
//! parsed again by the validator's own parser when a void needs the
//! payload (a typed payload held several times the bytes of its text,
//! and these events are most of a billing-only stream). The buckets double as the usage history that
//! `usage` and `overages` recompute a window's `min`, `max` and `last`
//! from when a void removes one of them: a void costs about what its
//! target cost, never a pass over history.
//!
//! Every record carries the sequence it was accepted at and the sequence
//! of the void that removed it, so an operator folding a batch can see
//! the bucket as it was right after any message of it
//! ([`Ledger::usage_after`]): the
//! ledger classifies a whole batch before the operators fold it.

mod index;
mod texts;

use std::collections::HashMap;
use std::sync::Arc;

use index::KeyIndex;
use texts::Texts;

use super::FixedState;
use super::window::month_bounds;
use crate::event::payload::{METRIC_TYPES, Payload, VOIDED_TYPE};
use crate::event::{Event, Text, payload_from_archive};

/// A usage event as a void may need it back.
#[derive(Debug, Clone)]
pub struct UsageRecord {
    /// Stream sequence it was accepted at.
    pub seq: u64,
    /// Stream sequence of the void that removed it; `u64::MAX` while effective.
    pub voided_at: u64,
    pub time: i64,
    pub quantity: i128,
    pub source: Text,
    pub id: Text,
    /// `unique` and `dimensions`, boxed: most events carry neither.
    pub extra: Option<Box<UsageExtra>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UsageExtra {
    pub unique: Option<Text>,
    pub dimensions: Option<Arc<crate::event::payload::Dimensions>>,
}

impl UsageRecord {
    /// Whether the record counts right after the message at `seq`.
    pub fn effective_after(&self, seq: u64) -> bool {
        self.seq <= seq && self.voided_at > seq
    }
}

/// An event key (tenant, `source`, `id` hashed, see `state::dedup`) as
/// two words: 8-byte alignment keeps an index entry with an 8-byte
/// location at 24 bytes (a `u128` key pads it to 32), and there is an
/// entry per event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key(u64, u64);

impl From<u128> for Key {
    fn from(k: u128) -> Key {
        Key(k as u64, (k >> 64) as u64)
    }
}

/// Where a remembered event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loc {
    /// `buckets[bucket][pos]`.
    Usage { bucket: u32, pos: u32 },
    /// `others[i]`.
    Other(u32),
    /// A voided event, accepted at this sequence: a later void of the same
    /// key counts it (`corrections.targets`) and takes nothing out.
    Voided(u64),
}

/// A [`Loc`] in one word, as the index keeps it: the top bit clear for
/// `Usage` (bucket in the next 31 bits, position in the low 32), `10` for
/// `Other` (index in the low 32 bits), `11` for `Voided` (sequence in the
/// low 62 bits). The limits are far past what memory holds: 2^31 buckets
/// would take hundreds of GiB, and a stream reaches sequence 2^62 after
/// 146,000 years at a million messages a second.
#[derive(Debug, Clone, Copy)]
struct Packed(u64);

const OTHER_TAG: u64 = 0b10 << 62;
const VOIDED_TAG: u64 = 0b11 << 62;
const LOW_62: u64 = (1 << 62) - 1;

impl From<Loc> for Packed {
    fn from(loc: Loc) -> Packed {
        Packed(match loc {
            Loc::Usage { bucket, pos } => {
                (u64::from(bucket & (u32::MAX >> 1)) << 32) | u64::from(pos)
            }
            Loc::Other(i) => OTHER_TAG | u64::from(i),
            Loc::Voided(seq) => VOIDED_TAG | (seq & LOW_62),
        })
    }
}

impl From<Packed> for Loc {
    fn from(p: Packed) -> Loc {
        match p.0 >> 62 {
            0b10 => Loc::Other(p.0 as u32),
            0b11 => Loc::Voided(p.0 & LOW_62),
            _ => Loc::Usage {
                bucket: (p.0 >> 32) as u32,
                pos: p.0 as u32,
            },
        }
    }
}

/// Records per chunk of [`Ledger`]'s `others` (1.5 MiB).
const OTHERS_CHUNK: usize = 1 << 16;

/// A remembered event other than usage: 24 bytes.
#[derive(Debug)]
struct OtherRecord {
    seq: u64,
    time: i64,
    /// Type and `data` of a metric-driving event in [`Texts`];
    /// [`Texts::NONE`] for any other type (only its time counts, in
    /// `tenants`) and once a void has taken the event out.
    text: u64,
}

/// A (tenant, metric, month) bucket of usage records.
#[derive(Debug)]
struct Bucket {
    tenant: Arc<str>,
    metric: Arc<str>,
    records: Vec<UsageRecord>,
}

/// An event a void takes out of the views, rebuilt from the ledger: the
/// tenant, `source`, `id`, type, time and payload it was folded with.
#[derive(Debug, Clone)]
pub struct Target {
    pub event: Event,
}

/// What an accepted event is to the views.
#[derive(Debug)]
pub enum Verdict {
    /// Counts in every view.
    Effective,
    /// Named by the voids at these sequences before it arrived: counts
    /// only in the archive (and in those voids' `corrections` rows).
    Voided { by: Vec<u64> },
    /// A void (itself effective); these earlier accepted events stop
    /// counting (`targets`), out of all the accepted events it voids
    /// (`hits`: their sequences, also those another void voided before).
    Void {
        targets: Vec<Target>,
        hits: Vec<u64>,
    },
}

/// See the module documentation.
#[derive(Default)]
pub struct Ledger {
    /// Key (tenant, source, id) -> every remembered event with it (an
    /// event re-sent after the dedup horizon is accepted again).
    index: KeyIndex,
    /// Target key -> the first void naming it.
    voided: HashMap<Key, u64, FixedState>,
    /// Target key -> the later voids naming it.
    voided_more: HashMap<Key, Vec<u64>, FixedState>,
    /// Remembered events other than usage, in chunks of
    /// [`OTHERS_CHUNK`]: one vector of millions would double (and for a
    /// moment hold both copies) each time it grows.
    others: Vec<Vec<OtherRecord>>,
    /// How many `others` hold.
    others_len: u32,
    texts: Texts,
    buckets: Vec<Bucket>,
    /// (series, month start) -> bucket.
    bucket_ids: HashMap<(u32, i64), u32, FixedState>,
    series: super::SeriesIds,
    /// The (tenant, metric) of each series.
    names: Vec<(Arc<str>, Arc<str>)>,
    /// Voids accepted: the memory that voids alone cost is bounded by them.
    voids: u64,
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// Classifies an accepted event, in stream order. `key` is its dedup
    /// key (tenant, `source`, `id`); `target_key` that of its target, for a void.
    pub fn classify(&mut self, e: &Event, key: u128, target_key: Option<u128>) -> Verdict {
        let key = Key::from(key);
        if let (Payload::EventVoided { .. }, Some(target)) = (&e.payload, target_key) {
            let target = Key::from(target);
            self.voids += 1;
            match self.voided.entry(target) {
                std::collections::hash_map::Entry::Occupied(_) => {
                    self.voided_more
                        .entry(target)
                        .or_default()
                        .push(e.stream_seq);
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(e.stream_seq);
                }
            }
            let mut locs: Vec<Loc> = Vec::new();
            self.index.update(target, |p| {
                locs.push(Loc::from(p));
                p
            });
            let mut targets = Vec::new();
            let mut hits = Vec::with_capacity(locs.len());
            // What each entry of the key becomes, in the same order.
            let mut now = Vec::with_capacity(locs.len());
            for loc in locs {
                match loc {
                    Loc::Voided(seq) => {
                        hits.push(seq);
                        now.push(loc);
                    }
                    _ => match self.take(loc, e) {
                        Some(t) => {
                            hits.push(t.event.stream_seq);
                            now.push(Loc::Voided(t.event.stream_seq));
                            targets.push(t);
                        }
                        None => now.push(loc),
                    },
                }
            }
            let mut now = now.into_iter();
            self.index
                .update(target, |p| now.next().map_or(p, Packed::from));
            return Verdict::Void { targets, hits };
        }
        if let Some(first) = self.voided.get(&key) {
            let mut by = vec![*first];
            by.extend(self.voided_more.get(&key).into_iter().flatten());
            // Remembered, so that a later void of the key counts it too.
            self.remember(key, Loc::Voided(e.stream_seq));
            return Verdict::Voided { by };
        }
        if e.event_type == VOIDED_TYPE {
            // A void cannot be voided: it is not remembered as a target.
            return Verdict::Effective;
        }
        let loc = match &e.payload {
            Payload::UsageRecorded {
                metric,
                quantity,
                unique,
                dimensions,
            } => {
                let bucket = self.bucket(&e.tenant, metric, e.time);
                let records = &mut self.buckets[bucket as usize].records;
                let pos = u32::try_from(records.len()).unwrap_or(u32::MAX);
                // The records are most of the ledger on a usage stream.
                super::reserve_by_half(records, 1);
                records.push(UsageRecord {
                    seq: e.stream_seq,
                    voided_at: u64::MAX,
                    time: e.time,
                    quantity: *quantity,
                    source: e.source.clone(),
                    id: e.id.clone(),
                    extra: (unique.is_some() || dimensions.is_some()).then(|| {
                        Box::new(UsageExtra {
                            unique: unique.clone(),
                            dimensions: dimensions.clone(),
                        })
                    }),
                });
                Loc::Usage { bucket, pos }
            }
            p => {
                let i = self.others_len;
                let typed = METRIC_TYPES.iter().position(|t| *t == e.event_type);
                let text = match (p, typed, e.data.as_deref()) {
                    (Payload::Other, _, _) => Texts::NONE,
                    (_, Some(t), Some(data)) => self.texts.push(t as u8, data),
                    _ => Texts::NONE,
                };
                if self.others.last().is_none_or(|c| c.len() == OTHERS_CHUNK) {
                    self.others.push(Vec::with_capacity(OTHERS_CHUNK));
                }
                if let Some(chunk) = self.others.last_mut() {
                    chunk.push(OtherRecord {
                        seq: e.stream_seq,
                        time: e.time,
                        text,
                    });
                }
                self.others_len = self.others_len.saturating_add(1);
                Loc::Other(i)
            }
        };
        self.remember(key, loc);
        Verdict::Effective
    }

    fn remember(&mut self, key: Key, loc: Loc) {
        self.index.insert(key, Packed::from(loc));
    }

    /// Marks the event at `loc` voided by `void` and rebuilds it.
    fn take(&mut self, loc: Loc, void: &Event) -> Option<Target> {
        let Payload::EventVoided {
            target_source,
            target_id,
            ..
        } = &void.payload
        else {
            return None;
        };
        let event = |seq, time, event_type: Text, payload| Event {
            stream_seq: seq,
            published_at: 0,
            id: target_id.clone(),
            source: target_source.clone(),
            event_type,
            tenant: void.tenant.clone(),
            time,
            dataversion: Text::const_new("1"),
            actor: None,
            actortype: None,
            subject: None,
            datacontenttype: None,
            dataschema: None,
            data: None,
            extensions: None,
            payload,
        };
        match loc {
            Loc::Usage { bucket, pos } => {
                let b = self.buckets.get_mut(bucket as usize)?;
                let r = b.records.get_mut(pos as usize)?;
                r.voided_at = void.stream_seq;
                let extra = r.extra.as_deref();
                let payload = Payload::UsageRecorded {
                    metric: Text::from(&*b.metric),
                    quantity: r.quantity,
                    unique: extra.and_then(|x| x.unique.clone()),
                    dimensions: extra.and_then(|x| x.dimensions.clone()),
                };
                Some(Target {
                    event: event(r.seq, r.time, Text::const_new("usage.recorded"), payload),
                })
            }
            Loc::Other(i) => {
                let r = self
                    .others
                    .get_mut(i as usize / OTHERS_CHUNK)?
                    .get_mut(i as usize % OTHERS_CHUNK)?;
                // The record is never needed again: its text is dropped
                // from it (the bytes stay in their chunk; voids are few).
                let handle = std::mem::replace(&mut r.text, Texts::NONE);
                let (event_type, payload) = match self.texts.get(handle) {
                    // The text passed this same parser when the event was
                    // accepted, so it parses to the payload folded then.
                    Some((t, data)) => match payload_from_archive(t, Some(data.as_str())) {
                        Ok(p) => (Text::from(t), p),
                        Err(reject) => {
                            tracing::error!(
                                seq = r.seq,
                                event_type = t,
                                reason = %reject.detail,
                                "a remembered event's data no longer parses; its void takes out only its time"
                            );
                            (Text::const_new(""), Payload::Other)
                        }
                    },
                    None => (Text::const_new(""), Payload::Other),
                };
                Some(Target {
                    event: event(r.seq, r.time, event_type, payload),
                })
            }
            Loc::Voided(_) => None,
        }
    }

    fn bucket(&mut self, tenant: &str, metric: &str, time: i64) -> u32 {
        let (series, new) = self.series.id(tenant, metric);
        if new {
            self.names.push((Arc::from(tenant), Arc::from(metric)));
        }
        let month = month_bounds(time).0;
        let next = u32::try_from(self.buckets.len()).unwrap_or(u32::MAX);
        let id = *self.bucket_ids.entry((series, month)).or_insert(next);
        if id == next {
            let (tenant, metric) = self.names[series as usize].clone();
            self.buckets.push(Bucket {
                tenant,
                metric,
                records: Vec::new(),
            });
        }
        id
    }

    /// The usage records of (`tenant`, `metric`) in the calendar month
    /// holding `time` that count right after the message at `seq`.
    pub fn usage_after<'a>(
        &'a self,
        tenant: &str,
        metric: &str,
        time: i64,
        seq: u64,
    ) -> impl Iterator<Item = &'a UsageRecord> + 'a {
        let bucket = self
            .series
            .get(tenant, metric)
            .and_then(|s| self.bucket_ids.get(&(s, month_bounds(time).0)))
            .and_then(|b| self.buckets.get(*b as usize));
        bucket
            .into_iter()
            .flat_map(|b| b.records.iter())
            .filter(move |r| r.effective_after(seq))
    }

    /// Every tenant's usage records of `metric` that count right after the
    /// message at `seq`, with their tenant (a meter's new `group_by`
    /// regroups the metric's windows from them).
    pub fn metric_usage_after<'a>(
        &'a self,
        metric: &'a str,
        seq: u64,
    ) -> impl Iterator<Item = (&'a str, &'a UsageRecord)> + 'a {
        self.buckets
            .iter()
            .filter(move |b| &*b.metric == metric)
            .flat_map(|b| b.records.iter().map(move |r| (&*b.tenant, r)))
            .filter(move |(_, r)| r.effective_after(seq))
    }

    /// Accepted voids so far.
    #[cfg(test)]
    pub fn voids(&self) -> u64 {
        self.voids
    }

    /// Accepted events remembered (voided ones included).
    #[cfg(test)]
    pub fn remembered(&self) -> usize {
        self.index.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_location_packs_into_one_word_and_back() {
        let locs = [
            Loc::Usage { bucket: 0, pos: 0 },
            Loc::Usage {
                bucket: (1 << 31) - 1,
                pos: u32::MAX,
            },
            Loc::Usage { bucket: 7, pos: 9 },
            Loc::Other(0),
            Loc::Other(u32::MAX),
            Loc::Voided(0),
            Loc::Voided(LOW_62),
            Loc::Voided(123_456_789),
        ];
        for loc in locs {
            assert_eq!(Loc::from(Packed::from(loc)), loc);
        }
        // The index's entry: a 16-byte key and an 8-byte location.
        assert_eq!(std::mem::size_of::<(Key, Packed)>(), 24);
        assert_eq!(std::mem::size_of::<OtherRecord>(), 24);
    }
}
