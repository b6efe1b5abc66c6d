//! The JSON Schemas of the contract (`schemas/`), embedded in the binary so
//! `tally schema` can hand producers the exact files this build validates
//! against.

use std::io::Write;

use super::{CommandError, Globals};

/// (file name, contents) of every schema, the envelope first.
pub const SCHEMAS: [(&str, &str); 11] = [
    (
        "envelope.json",
        include_str!("../../../schemas/envelope.json"),
    ),
    (
        "tenant.created.json",
        include_str!("../../../schemas/tenant.created.json"),
    ),
    (
        "catalog.plan_published.json",
        include_str!("../../../schemas/catalog.plan_published.json"),
    ),
    (
        "catalog.meter_defined.json",
        include_str!("../../../schemas/catalog.meter_defined.json"),
    ),
    (
        "subscription.started.json",
        include_str!("../../../schemas/subscription.started.json"),
    ),
    (
        "subscription.plan_changed.json",
        include_str!("../../../schemas/subscription.plan_changed.json"),
    ),
    (
        "subscription.cancelled.json",
        include_str!("../../../schemas/subscription.cancelled.json"),
    ),
    (
        "usage.recorded.json",
        include_str!("../../../schemas/usage.recorded.json"),
    ),
    (
        "invoice.paid.json",
        include_str!("../../../schemas/invoice.paid.json"),
    ),
    (
        "invoice.refunded.json",
        include_str!("../../../schemas/invoice.refunded.json"),
    ),
    (
        "event.voided.json",
        include_str!("../../../schemas/event.voided.json"),
    ),
];

/// The schema of an event type (`usage.recorded`) or `envelope`.
pub(crate) fn schema_for(name: &str) -> Option<&'static str> {
    let file = format!("{name}.json");
    SCHEMAS.iter().find(|(f, _)| *f == file).map(|(_, s)| *s)
}

/// The arguments of `tally schema`.
#[derive(Debug, clap::Args)]
pub struct SchemaArgs {
    pub(crate) name: Option<String>,
}

/// `tally schema`, from the command line.
pub(crate) async fn command(_g: &Globals, a: &SchemaArgs) -> Result<(), CommandError> {
    let SchemaArgs { name } = a;
    let mut out = std::io::stdout().lock();
    match name {
        None => {
            for (file, _) in crate::commands::schema::SCHEMAS {
                writeln!(out, "{}", file.trim_end_matches(".json"))
                    .map_err(CommandError::Output)?;
            }
        }
        Some(n) => {
            let s = crate::commands::schema::schema_for(n).ok_or_else(|| {
                CommandError::Usage(format!("no schema named {n:?}; `tally schema` lists them"))
            })?;
            out.write_all(s.as_bytes()).map_err(CommandError::Output)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_type_has_a_schema_that_parses() {
        for t in crate::event::payload::METRIC_TYPES {
            let s = schema_for(t).unwrap();
            let v: serde_json::Value = serde_json::from_str(s).unwrap();
            assert_eq!(
                v["$schema"], "https://json-schema.org/draft/2020-12/schema",
                "{t}"
            );
        }
        assert!(schema_for("envelope").is_some());
    }
}
