//! Contract agreement: one fixture corpus (`tests/fixtures/contract.jsonl`)
//! runs through the JSON Schemas in `schemas/` (the `jsonschema` crate, with
//! format validation) and through Tally's Rust validator. The validator
//! must give every line its expected outcome, and the schemas must agree
//! with it wherever a rule is expressible in JSON Schema.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use jsonschema::{Draft, Registry, Resource, Validator};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use tally::event::time::parse_rfc3339_micros;
use tally::event::{Limits, payload::is_metric_type, validate_message};

const SCHEMA_BASE: &str = "https://tally.dev/schemas/v1/";

#[derive(Deserialize)]
struct Repeat {
    #[serde(default)]
    prefix: String,
    text: String,
    times: usize,
    #[serde(default)]
    suffix: String,
}

#[derive(Deserialize)]
struct Case<'a> {
    name: String,
    expect: String,
    #[serde(borrow, default)]
    event: Option<&'a RawValue>,
    raw: Option<String>,
    raw_repeat: Option<Repeat>,
    subject: Option<String>,
    published_at: Option<String>,
}

fn schemas() -> (Validator, BTreeMap<String, Validator>) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas");
    let mut docs = BTreeMap::new();
    for (file, text) in tally::commands::schema::SCHEMAS {
        // The embedded copy must be the file on disk.
        assert_eq!(
            std::fs::read_to_string(format!("{dir}/{file}")).unwrap(),
            text,
            "{file}"
        );
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["$id"], format!("{SCHEMA_BASE}{file}"), "{file} $id");
        docs.insert(file.to_string(), v);
    }
    let mut builder = Registry::new();
    for (file, v) in &docs {
        builder = builder
            .add(
                format!("{SCHEMA_BASE}{file}"),
                Resource::from_contents(v.clone()),
            )
            .unwrap();
    }
    let registry = builder.prepare().unwrap();
    let build = |v: &Value| {
        jsonschema::options()
            .with_draft(Draft::Draft202012)
            .should_validate_formats(true)
            .with_registry(&registry)
            .build(v)
            .unwrap()
    };
    let envelope = build(&docs["envelope.json"]);
    let types = docs
        .iter()
        .filter(|(f, _)| *f != "envelope.json")
        .map(|(f, v)| (f.trim_end_matches(".json").to_string(), build(v)))
        .collect();
    (envelope, types)
}

#[test]
fn schemas_and_validator_agree_on_the_corpus() {
    let (envelope, types) = schemas();
    let corpus = include_str!("fixtures/contract.jsonl");
    let limits = Limits::default();
    let mut checked = 0;
    let mut failures = Vec::new();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for (n, line) in corpus
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let case: Case<'_> =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("fixture line {}: {e}", n + 1));
        let payload: Vec<u8> = match (&case.event, &case.raw, &case.raw_repeat) {
            (Some(e), None, None) => e.get().as_bytes().to_vec(),
            (None, Some(r), None) => r.as_bytes().to_vec(),
            (None, None, Some(r)) => {
                format!("{}{}{}", r.prefix, r.text.repeat(r.times), r.suffix).into_bytes()
            }
            _ => panic!(
                "fixture line {}: exactly one of event, raw, raw_repeat",
                n + 1
            ),
        };
        let parsed: Option<Value> = serde_json::from_slice(&payload).ok();
        let subject = case
            .subject
            .clone()
            .unwrap_or_else(|| match (&case.event, &parsed) {
                (Some(_), Some(v)) if v["tenant"].is_string() && v["type"].is_string() => {
                    format!(
                        "tally.events.{}.{}",
                        v["tenant"].as_str().unwrap(),
                        v["type"].as_str().unwrap()
                    )
                }
                _ => "tally.events.x.y".to_string(),
            });
        let published_at = parse_rfc3339_micros(
            case.published_at
                .as_deref()
                .unwrap_or("2026-01-01T00:00:00Z"),
        )
        .expect("published_at");

        // 1. The Rust validator gives the expected outcome.
        let got =
            match validate_message(&payload, &subject, "tally.events", 1, published_at, &limits) {
                Ok(_) => "accepted".to_string(),
                Err(r) => r.reason.as_str().to_string(),
            };
        *outcomes.entry(got.clone()).or_default() += 1;
        if got != case.expect {
            failures.push(format!(
                "{}: validator says {got}, expected {}",
                case.name, case.expect
            ));
        }

        // 2. The schemas agree where the rule is expressible in JSON Schema.
        let Some(value) = parsed.filter(Value::is_object) else {
            continue;
        };
        if case.expect == "too_large" || case.expect == "invalid_json" {
            continue;
        }
        let env_ok = envelope.is_valid(&value);
        let type_name = value["type"].as_str().unwrap_or("");
        let type_ok = if is_metric_type(type_name) {
            types[type_name].is_valid(&value)
        } else {
            true
        };
        let schema_ok = env_ok && type_ok;
        // Rules JSON Schema cannot express: the rounding of a quantity, and a
        // repeated attribute (a JSON parser keeps one of the two values).
        let documented_exception = case.name.contains("rounds up past Decimal128")
            || case.name.contains("repeated attribute");
        let agree = match case.expect.as_str() {
            "accepted" | "time_in_future" | "time_too_old" => schema_ok,
            // Checked before the tenant and data rules, which the line may break too.
            "subject_mismatch" => true,
            _ if documented_exception => schema_ok,
            _ => !schema_ok,
        };
        if !agree {
            failures.push(format!(
                "{}: expected {}, but the JSON Schemas say envelope valid = {env_ok}, type valid = {type_ok}",
                case.name, case.expect
            ));
        }
        checked += 1;
    }
    assert!(
        failures.is_empty(),
        "{} disagreements:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Every outcome of one message is exercised; the bound on dimension
    // values is one of the stream, tested in `tests/system/dimensions.rs`.
    for reason in tally::event::DlqReason::ALL
        .into_iter()
        .filter(|r| *r != tally::event::DlqReason::TooManyDimensionValues)
    {
        assert!(
            outcomes.get(reason.as_str()).copied().unwrap_or(0) > 0,
            "no fixture for {reason}"
        );
    }
    assert!(outcomes["accepted"] > 20);
    assert!(
        checked > 100,
        "only {checked} lines reached the schema check"
    );
}
