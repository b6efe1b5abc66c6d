//! Threshold alerts: the `usage.threshold_crossed` CloudEvent Tally emits
//! when a tenant's usage of a metric first reaches 80, 90 or 100 % of its
//! plan's limit in a billing period (metrics.md). The `overages` operator
//! decides them; the alerts sink publishes them.

use super::time::format_micros;

/// A `usage.threshold_crossed` alert to publish to `tally.alerts.<tenant>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Alert {
    pub(crate) tenant: String,
    /// `YYYY-MM-DD`, the UTC date of `period_start`.
    pub(crate) period: String,
    /// The first instant of the billing period (µs, UTC): with anchored
    /// periods, what tells two rows of one day apart.
    pub(crate) period_start: i64,
    pub(crate) metric: String,
    pub(crate) threshold: i32,
    pub(crate) used: String,
    pub(crate) included: Option<String>,
    /// The stream clock when it was decided (the alert's event time).
    pub(crate) time: i64,
}

impl Alert {
    /// The deterministic id, also its `Nats-Msg-Id`.
    pub(crate) fn id(&self) -> String {
        format!(
            "threshold:{}:{}:{}:{}",
            self.tenant,
            format_micros(self.period_start),
            self.metric,
            self.threshold
        )
    }

    /// The alert as a CloudEvent (JSON text).
    pub(crate) fn to_json(&self) -> String {
        serde_json::json!({
            "specversion": "1.0",
            "id": self.id(),
            "source": "tally",
            "type": "usage.threshold_crossed",
            "time": format_micros(self.time),
            "tenant": self.tenant,
            "data": {
                "period": self.period,
                "period_start": format_micros(self.period_start),
                "metric": self.metric,
                "threshold": self.threshold,
                "used": self.used,
                "included": self.included,
            }
        })
        .to_string()
    }
}
