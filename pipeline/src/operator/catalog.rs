//! The catalog: plan versions (`catalog.plan_published`) and meter
//! definitions (`catalog.meter_defined`), kept whole so that any period can
//! resolve the version in effect for it, however late a version arrives,
//! and so that a void of one leaves the others in force.

use std::collections::HashMap;

use crate::event::{Aggregation, Event, Payload, PlanVersion};

type OrderKey = (i64, String, String);

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// plan -> versions sorted by (`time`, `source`, `id`).
    plans: HashMap<String, Vec<(OrderKey, PlanVersion)>>,
    /// metric -> its definitions sorted by (`time`, `source`, `id`): the
    /// last one is in force.
    meters: HashMap<String, Vec<(OrderKey, Meter)>>,
}

/// A meter definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meter {
    pub aggregation: Aggregation,
    /// Sorted by bytes.
    pub group_by: Option<Vec<String>>,
}

impl Catalog {
    /// Folds a catalog event; returns whether it was one.
    pub fn apply(&mut self, e: &Event) -> bool {
        // Built only for catalog events: this runs for every event.
        let key = || (e.time, e.source.to_string(), e.id.to_string());
        match &e.payload {
            Payload::PlanPublished(v) => {
                let key = key();
                let versions = self.plans.entry(v.plan.clone()).or_default();
                let pos = versions.partition_point(|(k, _)| *k < key);
                versions.insert(pos, (key, v.clone()));
                true
            }
            Payload::MeterDefined {
                metric,
                aggregation,
                group_by,
            } => {
                let key = key();
                let defs = self.meters.entry(metric.clone()).or_default();
                let pos = defs.partition_point(|(k, _)| *k < key);
                let meter = Meter {
                    aggregation: *aggregation,
                    // In byte order, as `group` texts list them.
                    group_by: group_by.clone().map(|mut keys| {
                        keys.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
                        keys.dedup();
                        keys
                    }),
                };
                defs.insert(pos, (key, meter));
                true
            }
            _ => false,
        }
    }

    /// Takes a catalog event back out (a void of it); returns whether it
    /// was one.
    pub fn remove(&mut self, e: &Event) -> bool {
        let key = || (e.time, e.source.to_string(), e.id.to_string());
        match &e.payload {
            Payload::PlanPublished(v) => {
                let key = key();
                if let Some(versions) = self.plans.get_mut(&v.plan) {
                    versions.retain(|(k, _)| *k != key);
                    if versions.is_empty() {
                        self.plans.remove(&v.plan);
                    }
                }
                true
            }
            Payload::MeterDefined { metric, .. } => {
                let key = key();
                if let Some(defs) = self.meters.get_mut(metric) {
                    defs.retain(|(k, _)| *k != key);
                    if defs.is_empty() {
                        self.meters.remove(metric);
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// The version of `plan` for a period ending at `end`: the latest
    /// published before `end`; if none is that old, the earliest.
    pub fn plan_version(&self, plan: &str, end: i64) -> Option<&PlanVersion> {
        let versions = self.plans.get(plan)?;
        versions
            .iter()
            .rev()
            .find(|(k, _)| k.0 < end)
            .or_else(|| versions.first())
            .map(|(_, v)| v)
    }

    /// Whether some meter definition kept has a `group_by` (if none
    /// does, no metric is grouped: asked for every usage event).
    pub fn any_grouped(&self) -> bool {
        self.meters
            .values()
            .any(|defs| defs.iter().any(|(_, m)| m.group_by.is_some()))
    }

    /// The aggregation of `metric`: the latest definition over the whole stream, `sum` if none.
    pub fn aggregation(&self, metric: &str) -> Aggregation {
        self.meter(metric)
            .map(|m| m.aggregation)
            .unwrap_or_default()
    }

    /// The definition of `metric` in force: the latest over the whole stream.
    pub fn meter(&self, metric: &str) -> Option<&Meter> {
        self.meters.get(metric)?.last().map(|(_, m)| m)
    }
}
