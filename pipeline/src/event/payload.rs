//! Typed `data` of the ten metric-driving event types. Everything the
//! operators need is here, already validated: money in minor units (`i64`),
//! quantities in nano-units (`i128`, see [`super::decimal`]), times in µs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How a metric's events combine within a period (`catalog.meter_defined`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Aggregation {
    #[default]
    Sum,
    Count,
    Max,
    Latest,
    /// The number of distinct `unique` values (events without one do not count).
    UniqueCount,
}

impl Aggregation {
    pub(crate) fn parse(s: &str) -> Option<Aggregation> {
        match s {
            "sum" => Some(Aggregation::Sum),
            "count" => Some(Aggregation::Count),
            "max" => Some(Aggregation::Max),
            "latest" => Some(Aggregation::Latest),
            "unique_count" => Some(Aggregation::UniqueCount),
            _ => None,
        }
    }
}

/// A usage event's `dimensions`: (key, value) pairs, keys in ascending byte
/// order, at most eight. Held behind an `Arc` made in one allocation,
/// shared by the payload and the ledger.
pub(crate) type Dimensions = [(super::Text, super::Text)];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum BillingCycle {
    Monthly,
    Yearly,
}

impl BillingCycle {
    pub(crate) fn parse(s: &str) -> Option<BillingCycle> {
        match s {
            "monthly" => Some(BillingCycle::Monthly),
            "yearly" => Some(BillingCycle::Yearly),
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            BillingCycle::Monthly => "monthly",
            BillingCycle::Yearly => "yearly",
        }
    }
}

/// Package price for usage above the limit: `unit_price` per `per` units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OveragePrice {
    pub(crate) unit_price: i64,
    pub(crate) per: i64,
}

/// One `catalog.plan_published` version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PlanVersion {
    pub(crate) plan: String,
    pub(crate) currency: String,
    /// Metric -> included quantity (nano-units). Absent = unlimited.
    pub(crate) limits: BTreeMap<String, i128>,
    pub(crate) overage: BTreeMap<String, OveragePrice>,
}

/// The commercial terms of `subscription.started` / `plan_changed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SubscriptionTerms {
    /// Texts inline up to 24 bytes: the subscription histories keep every
    /// change's terms for good.
    pub(crate) subscription_id: super::Text,
    pub(crate) plan: super::Text,
    pub(crate) billing_cycle: BillingCycle,
    /// Per billing cycle, minor units.
    pub(crate) price: i64,
    pub(crate) currency: super::Text,
    /// Only on `started`; µs.
    pub(crate) trial_ends_at: Option<i64>,
    /// Billing periods start at this instant (µs) shifted by whole months;
    /// `None`: calendar months (on `plan_changed`: keep the current anchor).
    pub(crate) billing_anchor: Option<i64>,
}

/// The typed meaning of an accepted event's `data`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Payload {
    /// Any type outside the ten: archived and counted, moves no metric.
    Other,
    TenantCreated {
        name: Option<String>,
    },
    PlanPublished(PlanVersion),
    MeterDefined {
        metric: String,
        aggregation: Aggregation,
        /// Dimension keys that split the metric in `usage_by_dimension`.
        group_by: Option<Vec<String>>,
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
        /// The value a `unique_count` meter counts once per window or period.
        unique: Option<super::Text>,
        /// Behind a pointer: most usage events carry none, and the variant
        /// stays small; shared, so that the ledger keeps it without a copy.
        dimensions: Option<std::sync::Arc<Dimensions>>,
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
    /// A correction: voids the tenant's accepted events with this
    /// (`source`, `id`), except voids.
    EventVoided {
        target_source: super::Text,
        target_id: super::Text,
        reason: Option<String>,
    },
}

/// The type of a correction.
pub(crate) const VOIDED_TYPE: &str = "event.voided";

/// The ten metric-driving types.
pub(crate) const METRIC_TYPES: [&str; 10] = [
    "tenant.created",
    "catalog.plan_published",
    "catalog.meter_defined",
    "subscription.started",
    "subscription.plan_changed",
    "subscription.cancelled",
    "usage.recorded",
    "invoice.paid",
    "invoice.refunded",
    VOIDED_TYPE,
];

pub fn is_metric_type(event_type: &str) -> bool {
    METRIC_TYPES.contains(&event_type)
}
