//! What Tally tells Postgres clients about itself: the settings `SHOW`
//! and `current_setting` answer, the server version, and the functions
//! clients call at connect besides `pg_catalog`. Used by the wire protocol
//! ([`super::pg`]) and by every session ([`super::views`]).

use std::sync::Arc;

use arrow::datatypes::DataType;

/// What `SHOW` and `current_setting` answer.
pub fn setting(name: &str) -> Option<&'static str> {
    Some(match name.to_ascii_lowercase().as_str() {
        "server_version" => SERVER_VERSION,
        "server_version_num" => "160006",
        "server_encoding" | "client_encoding" => "UTF8",
        "datestyle" => "ISO, MDY",
        "timezone" | "time zone" => "UTC",
        "intervalstyle" => "postgres",
        "search_path" => "public",
        "standard_conforming_strings" => "on",
        "integer_datetimes" => "on",
        "transaction_isolation"
        | "transaction isolation level"
        | "default_transaction_isolation" => "read committed",
        "transaction_read_only" | "default_transaction_read_only" => "on",
        "max_identifier_length" => "63",
        "is_superuser" => "off",
        "lc_collate" | "lc_ctype" => "C",
        "extra_float_digits" => "3",
        "statement_timeout" | "lock_timeout" | "idle_in_transaction_session_timeout" => "0",
        "max_connections" => "64",
        "application_name" => "",
        "bytea_output" => "hex",
        _ => return None,
    })
}

/// The version clients see: Postgres 16 for their feature checks.
pub const SERVER_VERSION: &str = "16.6 (Tally)";

/// `version()` as Postgres words it, which drivers and BI tools parse.
pub const VERSION_TEXT: &str = concat!(
    "PostgreSQL 16.6 (Tally ",
    env!("CARGO_PKG_VERSION"),
    ", Apache DataFusion 55) read-only views"
);

/// Registers what clients call at connect besides `pg_catalog`:
/// `version()` in Postgres's words and `current_setting(name)`.
pub fn register_functions(ctx: &datafusion::execution::context::SessionContext) {
    use datafusion::common::ScalarValue;
    use datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};
    ctx.register_udf(create_udf(
        "version",
        vec![],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|_: &[ColumnarValue]| {
            Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(
                VERSION_TEXT.into(),
            ))))
        }),
    ));
    ctx.register_udf(create_udf(
        "current_setting",
        vec![DataType::Utf8],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let name = match args.first() {
                Some(ColumnarValue::Scalar(ScalarValue::Utf8(Some(n)))) => n.clone(),
                _ => {
                    return Err(datafusion::error::DataFusionError::Plan(
                        "current_setting takes one constant setting name".into(),
                    ));
                }
            };
            let value = setting(&name).ok_or_else(|| {
                datafusion::error::DataFusionError::Plan(format!(
                    "unrecognized configuration parameter \"{name}\""
                ))
            })?;
            Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(value.into()))))
        }),
    ));
}
