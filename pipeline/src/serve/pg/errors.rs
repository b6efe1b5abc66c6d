//! The errors a Postgres client receives: an `ERROR` for a statement that
//! failed alone, a `FATAL` that ends the session, and the SQLSTATE of each
//! query failure.

use pgwire::error::{ErrorInfo, PgWireError};

use crate::query::QueryError;

/// The account's tenants changed (or it was removed) while rows computed
/// for its former scope were still to be sent.
pub(super) fn scope_changed() -> PgWireError {
    user_error(
        "42501",
        "the account's tenants changed since these rows were computed; run the query (or DECLARE the cursor) again",
    )
}

pub(super) fn user_error(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        code.into(),
        message.into(),
    )))
}

pub(super) fn fatal(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "FATAL".into(),
        code.into(),
        message.into(),
    )))
}

/// The SQLSTATE of a query failure.
pub fn sqlstate(e: &QueryError) -> &'static str {
    use datafusion::error::DataFusionError as D;
    match e {
        QueryError::ReadOnly { .. } => "42501",
        QueryError::TooDeep { .. }
        | QueryError::ExpressionTooDeep
        | QueryError::PlanTooLarge { .. } => "54001",
        QueryError::MemoryLimit { .. } | QueryError::OverBudget(_) => "53200",
        QueryError::Timeout { .. } => "57014",
        QueryError::Execute(d) => match d.find_root() {
            D::SQL(..) => "42601",
            D::SchemaError(s, _) => match **s {
                datafusion::common::SchemaError::FieldNotFound { .. } => "42703",
                _ => "42P01",
            },
            D::Plan(m) if m.contains("table") && m.contains("not found") => "42P01",
            D::Plan(_) | D::NotImplemented(_) => "42000",
            D::ArrowError(..) | D::Execution(_) => "22000",
            _ => "XX000",
        },
        QueryError::FileGone { .. }
        | QueryError::Unsettled { .. }
        | QueryError::Switched { .. } => "40001",
        QueryError::NoViews { .. } | QueryError::NoPartition { .. } => "55000",
        _ => "XX000",
    }
}

pub(super) fn query_error(e: &QueryError) -> PgWireError {
    user_error(sqlstate(e), e.to_string())
}
