//! Typed `data` of the nine metric-driving event types. Everything the
//! operators need is here, already validated: money in minor units (`i64`),
//! quantities in nano-units (`i128`, see [`super::decimal`]), times in µs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How a metric's events combine within a period (`catalog.meter_defined`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    #[default]
    Sum,
    Count,
    Max,
    Latest,
}

impl Aggregation {
    pub fn parse(s: &str) -> Option<Aggregation> {
        match s {
            "sum" => Some(Aggregation::Sum),
            "count" => Some(Aggregation::Count),
            "max" => Some(Aggregation::Max),
            "latest" => Some(Aggregation::Latest),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BillingCycle {
    Monthly,
    Yearly,
}

impl BillingCycle {
    pub fn parse(s: &str) -> Option<BillingCycle> {
        match s {
            "monthly" => Some(BillingCycle::Monthly),
            "yearly" => Some(BillingCycle::Yearly),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BillingCycle::Monthly => "monthly",
            BillingCycle::Yearly => "yearly",
        }
    }
}

/// Package price for usage above the limit: `unit_price` per `per` units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OveragePrice {
    pub unit_price: i64,
    pub per: i64,
}

/// One `catalog.plan_published` version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanVersion {
    pub plan: String,
    pub currency: String,
    /// Metric -> included quantity (nano-units). Absent = unlimited.
    pub limits: BTreeMap<String, i128>,
    pub overage: BTreeMap<String, OveragePrice>,
}

/// The commercial terms of `subscription.started` / `plan_changed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionTerms {
    pub subscription_id: String,
    pub plan: String,
    pub billing_cycle: BillingCycle,
    /// Per billing cycle, minor units.
    pub price: i64,
    pub currency: String,
    /// Only on `started`; µs.
    pub trial_ends_at: Option<i64>,
}

/// The typed meaning of an accepted event's `data`.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// Any type outside the nine: archived and counted, moves no metric.
    Other,
    TenantCreated {
        name: Option<String>,
    },
    PlanPublished(PlanVersion),
    MeterDefined {
        metric: String,
        aggregation: Aggregation,
    },
    SubscriptionStarted(SubscriptionTerms),
    PlanChanged(SubscriptionTerms),
    SubscriptionCancelled {
        subscription_id: String,
        reason: Option<String>,
        effective_at: Option<i64>,
    },
    UsageRecorded {
        metric: super::Text,
        quantity: i128,
    },
    InvoicePaid {
        invoice_id: String,
        amount: i64,
        currency: String,
    },
    InvoiceRefunded {
        invoice_id: String,
        amount: i64,
        currency: String,
    },
}

/// The nine metric-driving types.
pub const METRIC_TYPES: [&str; 9] = [
    "tenant.created",
    "catalog.plan_published",
    "catalog.meter_defined",
    "subscription.started",
    "subscription.plan_changed",
    "subscription.cancelled",
    "usage.recorded",
    "invoice.paid",
    "invoice.refunded",
];

pub fn is_metric_type(event_type: &str) -> bool {
    METRIC_TYPES.contains(&event_type)
}
