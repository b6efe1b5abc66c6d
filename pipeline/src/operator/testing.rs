//! What the operators' tests share: events made from their parts and
//! validated as `tally run` would, and the generated SaaS folded whole.

use crate::event::Event;

/// A validated event for operator tests: the JSON envelope built from its
/// parts and validated as `tally run` would (publish time far ahead, and no
/// age limit, so any event time is accepted).
pub(crate) fn test_event(
    id: &str,
    source: &str,
    tenant: &str,
    ty: &str,
    time: &str,
    data: &str,
) -> Event {
    use crate::event::{Limits, validate_message};
    let json = format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"{source}","type":"{ty}","time":"{time}","tenant":"{tenant}","data":{data}}}"#
    );
    validate_message(
        json.as_bytes(),
        &format!("tally.events.{tenant}.{ty}"),
        "tally.events",
        1,
        i64::MAX / 2,
        &Limits {
            max_event_age_us: i64::MAX,
            ..Limits::default()
        },
    )
    .unwrap()
}

/// [`test_event`] from source `s`, the operators' tests' usual source.
pub(crate) fn ev(id: &str, tenant: &str, ty: &str, time: &str, data: &str) -> Event {
    test_event(id, "s", tenant, ty, time, data)
}

/// The events of a generated SaaS (`tally generate`), validated, for
/// operator tests over realistic streams.
pub(crate) fn generated_events(
    tenants: u32,
    months: u32,
    seed: u64,
    start_year: i32,
    activity: bool,
) -> Vec<Event> {
    use crate::generator::{GenerateConfig, generate};
    let cfg = GenerateConfig {
        tenants,
        months,
        seed,
        start_year,
        start_month: 1,
        source: "g".into(),
        activity,
    };
    let mut text = Vec::new();
    generate(&cfg, &mut text).unwrap();
    let limits = crate::event::Limits::default();
    text.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| crate::event::validate_payload(l, &limits).unwrap())
        .collect()
}
