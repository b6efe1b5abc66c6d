//! Why a message was dead-lettered: the contract's reasons, in the order in
//! which they are checked. `as_str()` is the `<reason>` token of the DLQ
//! subject `tally.dlq.<reason>`.

use serde::{Deserialize, Serialize};

/// A dead-letter reason. Declaration order is check order: a message gets
/// the first reason that applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DlqReason {
    TooLarge,
    InvalidJson,
    InvalidEnvelope,
    SubjectMismatch,
    UnsupportedVersion,
    ForbiddenTenant,
    InvalidData,
    TimeInFuture,
    TimeTooOld,
    /// Not a rule of one message: past the bound on distinct dimension
    /// values (`crate::state::cardinality`), checked after the others.
    TooManyDimensionValues,
}

impl DlqReason {
    /// Every reason, in check order.
    pub const ALL: [DlqReason; 10] = [
        DlqReason::TooLarge,
        DlqReason::InvalidJson,
        DlqReason::InvalidEnvelope,
        DlqReason::SubjectMismatch,
        DlqReason::UnsupportedVersion,
        DlqReason::ForbiddenTenant,
        DlqReason::InvalidData,
        DlqReason::TimeInFuture,
        DlqReason::TimeTooOld,
        DlqReason::TooManyDimensionValues,
    ];

    /// The DLQ subject token and the name used in counts.
    pub fn as_str(self) -> &'static str {
        match self {
            DlqReason::TooLarge => "too_large",
            DlqReason::InvalidJson => "invalid_json",
            DlqReason::InvalidEnvelope => "invalid_envelope",
            DlqReason::SubjectMismatch => "subject_mismatch",
            DlqReason::UnsupportedVersion => "unsupported_version",
            DlqReason::ForbiddenTenant => "forbidden_tenant",
            DlqReason::InvalidData => "invalid_data",
            DlqReason::TimeInFuture => "time_in_future",
            DlqReason::TimeTooOld => "time_too_old",
            DlqReason::TooManyDimensionValues => "too_many_dimension_values",
        }
    }
}

impl std::fmt::Display for DlqReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused message: the reason and a human-readable explanation that
/// names the offending attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub reason: DlqReason,
    pub(crate) detail: String,
}

impl Reject {
    pub(crate) fn new(reason: DlqReason, detail: impl Into<String>) -> Reject {
        Reject {
            reason,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}
