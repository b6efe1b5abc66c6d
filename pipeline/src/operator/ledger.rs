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
//! the key (16 bytes), the stream sequence and the time; a usage event's
//! quantity, `source` and `id` (the order of `last`) in its (tenant,
//! metric, month) bucket; the typed payload of the rare other
//! metric-driving events. The buckets double as the usage history that
//! `usage` and `overages` recompute a window's `min`, `max` and `last`
//! from when a void removes one of them: a void costs about what its
//! target cost, never a pass over history.
//!
//! Every record carries the sequence it was accepted at and the sequence
//! of the void that removed it, so an operator folding a batch can see
//! the bucket as it was right after any message of it
//! ([`Ledger::usage_after`]): the
//! ledger classifies a whole batch before the operators fold it.

use std::collections::HashMap;
use std::sync::Arc;

use super::FixedState;
use super::window::month_bounds;
use crate::event::payload::{Payload, VOIDED_TYPE};
use crate::event::{Event, Text};

/// Most entries [`Ledger::reserve`] makes room for at once (16M: about
/// 512 MiB of index), so a huge backlog does not allocate it all up front.
const MAX_RESERVE: usize = 1 << 24;

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
    pub dimensions: Option<Box<crate::event::payload::Dimensions>>,
}

impl UsageRecord {
    /// Whether the record counts right after the message at `seq`.
    pub fn effective_after(&self, seq: u64) -> bool {
        self.seq <= seq && self.voided_at > seq
    }
}

/// Where a remembered event is.
#[derive(Debug, Clone, Copy)]
enum Loc {
    /// `buckets[bucket][pos]`.
    Usage { bucket: u32, pos: u32 },
    /// `others[i]`.
    Other(u32),
    /// A voided event, accepted at this sequence: a later void of the same
    /// key counts it (`corrections.targets`) and takes nothing out.
    Voided(u64),
}

/// A remembered event other than usage.
#[derive(Debug)]
struct OtherRecord {
    seq: u64,
    time: i64,
    /// Type and payload of a metric-driving event; `None` for any other
    /// type (only its time counts, in `tenants`).
    typed: Option<Box<(Text, Payload)>>,
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
    /// Key (tenant, source, id) -> the effective event with it.
    index: HashMap<u128, Loc, FixedState>,
    /// Further effective events with a key already in `index` (an event
    /// re-sent after the dedup horizon is accepted again).
    more: HashMap<u128, Vec<Loc>, FixedState>,
    /// Target key -> the first void naming it.
    voided: HashMap<u128, u64, FixedState>,
    /// Target key -> the later voids naming it.
    voided_more: HashMap<u128, Vec<u64>, FixedState>,
    others: Vec<OtherRecord>,
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
        if let (Payload::EventVoided { .. }, Some(target)) = (&e.payload, target_key) {
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
            let mut locs: Vec<Loc> = self.index.get(&target).copied().into_iter().collect();
            locs.extend(self.more.get(&target).into_iter().flatten().copied());
            let mut targets = Vec::new();
            let mut hits = Vec::with_capacity(locs.len());
            let mut gone = Vec::with_capacity(locs.len());
            for loc in locs {
                match loc {
                    Loc::Voided(seq) => {
                        hits.push(seq);
                        gone.push(loc);
                    }
                    _ => {
                        if let Some(t) = self.take(loc, e) {
                            hits.push(t.event.stream_seq);
                            gone.push(Loc::Voided(t.event.stream_seq));
                            targets.push(t);
                        }
                    }
                }
            }
            if let Some((first, rest)) = gone.split_first() {
                self.index.insert(target, *first);
                if !rest.is_empty() {
                    self.more.insert(target, rest.to_vec());
                }
            }
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
                let i = u32::try_from(self.others.len()).unwrap_or(u32::MAX);
                self.others.push(OtherRecord {
                    seq: e.stream_seq,
                    time: e.time,
                    typed: (!matches!(p, Payload::Other))
                        .then(|| Box::new((e.event_type.clone(), p.clone()))),
                });
                Loc::Other(i)
            }
        };
        self.remember(key, loc);
        Verdict::Effective
    }

    fn remember(&mut self, key: u128, loc: Loc) {
        match self.index.entry(key) {
            std::collections::hash_map::Entry::Occupied(_) => {
                self.more.entry(key).or_default().push(loc);
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(loc);
            }
        }
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
                let r = self.others.get_mut(i as usize)?;
                // The record is never needed again: free its payload.
                let (event_type, payload) = match r.typed.take() {
                    Some(t) => *t,
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

    /// Makes room for `events` more remembered events (at most
    /// [`MAX_RESERVE`]): a run that knows how many messages it will read
    /// spares the index its rehashes as it grows.
    pub fn reserve(&mut self, events: usize) {
        self.index.reserve(events.min(MAX_RESERVE));
    }

    /// Accepted voids so far.
    #[cfg(test)]
    pub fn voids(&self) -> u64 {
        self.voids
    }

    /// Accepted events remembered (voided ones included).
    #[cfg(test)]
    pub fn remembered(&self) -> usize {
        self.index.len() + self.more.values().map(Vec::len).sum::<usize>()
    }
}
