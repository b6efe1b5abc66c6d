//! The catalog: plan versions (`catalog.plan_published`) and meter
//! definitions (`catalog.meter_defined`), kept whole so that any period can
//! resolve the version in effect for it, however late a version arrives.

use std::collections::HashMap;

use crate::event::{Aggregation, Event, Payload, PlanVersion};

type OrderKey = (i64, String, String);

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// plan -> versions sorted by (`time`, `source`, `id`).
    plans: HashMap<String, Vec<(OrderKey, PlanVersion)>>,
    /// metric -> the greatest (`time`, `source`, `id`) definition.
    meters: HashMap<String, (OrderKey, Aggregation)>,
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
            } => {
                let key = key();
                let slot = self
                    .meters
                    .entry(metric.clone())
                    .or_insert_with(|| (key.clone(), *aggregation));
                if key >= slot.0 {
                    *slot = (key, *aggregation);
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

    /// The aggregation of `metric`: the latest definition over the whole stream, `sum` if none.
    pub fn aggregation(&self, metric: &str) -> Aggregation {
        self.meters.get(metric).map(|(_, a)| *a).unwrap_or_default()
    }
}
