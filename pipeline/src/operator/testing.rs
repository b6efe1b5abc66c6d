//! What the operators' tests share: events made from their parts and
//! validated as `tally run` would, and the generated SaaS folded whole.

use arrow::array::RecordBatch;

use crate::event::Event;

/// Each row of `b` as its columns' display text.
pub(crate) fn rows_text(b: &RecordBatch) -> Vec<Vec<String>> {
    let cols: Vec<_> = b
        .columns()
        .iter()
        .map(|c| {
            arrow::util::display::ArrayFormatter::try_new(c.as_ref(), &Default::default()).unwrap()
        })
        .collect();
    (0..b.num_rows())
        .map(|r| cols.iter().map(|c| c.value(r).to_string()).collect())
        .collect()
}

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

/// `event.voided` of tenant `tenant` naming (`target_source`, `target_id`).
pub(crate) fn void(
    id: &str,
    tenant: &str,
    time: &str,
    target_source: &str,
    target_id: &str,
) -> Event {
    test_event(
        id,
        "corrections",
        tenant,
        "event.voided",
        time,
        &format!(r#"{{"target_source":"{target_source}","target_id":"{target_id}"}}"#),
    )
}

/// Feeds one operator as the processor does: numbers the events in
/// order, asks a ledger about each and hands the operator its steps.
#[derive(Default)]
pub(crate) struct Fed {
    pub ledger: super::Ledger,
    seq: u64,
}

impl Fed {
    pub(crate) fn feed(&mut self, op: &mut dyn super::Operator, e: &Event) {
        use super::{Step, Verdict};
        use crate::event::Payload;
        use std::hash::{Hash, Hasher};
        let key = |t: &str, s: &str, i: &str| {
            let mut a = std::collections::hash_map::DefaultHasher::new();
            (t, s, i).hash(&mut a);
            let mut b = std::collections::hash_map::DefaultHasher::new();
            (i, s, t, 1u8).hash(&mut b);
            (u128::from(a.finish()) << 64) | u128::from(b.finish())
        };
        let mut e = e.clone();
        self.seq += 1;
        e.stream_seq = self.seq;
        let target = match &e.payload {
            Payload::EventVoided {
                target_source,
                target_id,
                ..
            } => Some(key(&e.tenant, target_source, target_id)),
            _ => None,
        };
        let verdict = self
            .ledger
            .classify(&e, key(&e.tenant, &e.source, &e.id), target);
        let sub = super::subscription::SubEvent::from_event(&e).map(std::sync::Arc::new);
        let apply = Step::Apply {
            event: &e,
            sub: sub.as_ref(),
        };
        match &verdict {
            Verdict::Effective => op.step(&apply, &self.ledger),
            Verdict::Voided { by } => op.step(&Step::Voided { event: &e, by }, &self.ledger),
            Verdict::Void { targets, hits } => {
                op.step(&apply, &self.ledger);
                if !hits.is_empty() {
                    let retract = Step::Retract {
                        void: &e,
                        targets,
                        hits,
                    };
                    op.step(&retract, &self.ledger);
                }
            }
        }
    }
}
