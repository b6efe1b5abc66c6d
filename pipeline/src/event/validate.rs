//! The validator: message bytes + NATS context -> [`Event`] or [`Reject`].
//!
//! Checks run in the contract's reason order, so a message gets the first
//! reason that applies. The envelope is deserialised into borrowed
//! [`RawValue`]s: nothing is allocated while parsing an event without
//! extension attributes, the `data` object and the extensions' values are
//! archived byte-for-byte, and quantities are parsed from their original
//! text (never through `f64`).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::{DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::decimal::{self, QuantityError};
use super::payload::{
    self, Aggregation, BillingCycle, Dimensions, OveragePrice, Payload, PlanVersion,
    SubscriptionTerms, VOIDED_TYPE,
};
use super::reason::{DlqReason, Reject};
use super::time::{DAY_US, HOUR_US, MICROS, format_micros, parse_rfc3339_micros};
use super::{Event, Text};

/// The contract's largest message (`too_large` above it, `max_message_bytes`).
pub(crate) const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// The contract's default allowed skew of event time past the publish
/// time (`future_skew`), µs.
pub(crate) const DEFAULT_FUTURE_SKEW_US: i64 = HOUR_US;
/// The contract's default maximum event age (`max_event_age`), in days.
pub(crate) const DEFAULT_MAX_EVENT_AGE_DAYS: i64 = 3650;
/// The same, µs.
pub(crate) const DEFAULT_MAX_EVENT_AGE_US: i64 = DEFAULT_MAX_EVENT_AGE_DAYS * DAY_US;

/// Limits that decide rejections; they change results, so they come from
/// the TOML config (see `crate::config`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Messages larger than this are `too_large` (contract: 256 KiB).
    pub(crate) max_bytes: usize,
    /// Allowed clock skew: `time` may exceed the publish time by this much (µs).
    pub(crate) future_skew_us: i64,
    /// `time` may be this much earlier than the publish time (µs); an event
    /// from further back is a producer's bug (`time_too_old`).
    pub(crate) max_event_age_us: i64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_bytes: MAX_MESSAGE_BYTES,
            future_skew_us: DEFAULT_FUTURE_SKEW_US,
            max_event_age_us: DEFAULT_MAX_EVENT_AGE_US,
        }
    }
}

/// Keeps JSON `null` distinguishable from an absent attribute.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

/// The envelope's attributes, borrowed from the message text. The
/// contract's attributes have a field each; any other attribute is kept
/// with its raw value, in the order it appeared, for the archive.
#[derive(Default)]
struct RawEnvelope<'a> {
    specversion: Option<&'a RawValue>,
    id: Option<&'a RawValue>,
    source: Option<&'a RawValue>,
    event_type: Option<&'a RawValue>,
    time: Option<&'a RawValue>,
    tenant: Option<&'a RawValue>,
    dataversion: Option<&'a RawValue>,
    actor: Option<&'a RawValue>,
    actortype: Option<&'a RawValue>,
    datacontenttype: Option<&'a RawValue>,
    subject: Option<&'a RawValue>,
    dataschema: Option<&'a RawValue>,
    data: Option<&'a RawValue>,
    /// Extension attributes: empty, and so never allocated, for most events.
    extensions: Vec<(Cow<'a, str>, &'a RawValue)>,
}

/// Below this many extension attributes a repeat is looked for as each
/// arrives; from there, once, by sorting their names (a message of
/// thousands of distinct names must not cost a quadratic search).
const LINEAR_REPEAT_CHECK: usize = 16;

impl<'de> Deserialize<'de> for RawEnvelope<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(EnvelopeVisitor)
    }
}

struct EnvelopeVisitor;

/// The error for an attribute given twice, worded like serde's own.
fn repeated_attribute<E: serde::de::Error>(name: &str) -> E {
    E::custom(format_args!("duplicate field `{name}`"))
}

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = RawEnvelope<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawEnvelope<'de>, A::Error> {
        let mut env = RawEnvelope::default();
        while let Some(name) = map.next_key_seed(AttributeName)? {
            let slot = match &*name {
                "specversion" => &mut env.specversion,
                "id" => &mut env.id,
                "source" => &mut env.source,
                "type" => &mut env.event_type,
                "time" => &mut env.time,
                "tenant" => &mut env.tenant,
                "dataversion" => &mut env.dataversion,
                "actor" => &mut env.actor,
                "actortype" => &mut env.actortype,
                "datacontenttype" => &mut env.datacontenttype,
                "subject" => &mut env.subject,
                "dataschema" => &mut env.dataschema,
                "data" => &mut env.data,
                _ => {
                    let ext = &mut env.extensions;
                    if ext.len() < LINEAR_REPEAT_CHECK && ext.iter().any(|(n, _)| *n == name) {
                        return Err(repeated_attribute(&name));
                    }
                    let value = map.next_value()?;
                    ext.push((name, value));
                    continue;
                }
            };
            if slot.is_some() {
                return Err(repeated_attribute(&name));
            }
            *slot = Some(map.next_value()?);
        }
        if env.extensions.len() > LINEAR_REPEAT_CHECK {
            let mut names: Vec<&str> = env.extensions.iter().map(|(n, _)| &**n).collect();
            names.sort_unstable();
            if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
                return Err(repeated_attribute(w[0]));
            }
        }
        Ok(env)
    }
}

/// An attribute name, borrowed from the message unless it had escapes.
struct AttributeName;

impl<'de> DeserializeSeed<'de> for AttributeName {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for AttributeName {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an attribute name")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v))
    }
}

/// The extension attributes as a JSON object text, names re-escaped and
/// values as the producer wrote them, in their order; `None` when there
/// are none.
fn extensions_text(extensions: &[(Cow<'_, str>, &RawValue)]) -> Option<Text> {
    if extensions.is_empty() {
        return None;
    }
    let len: usize = extensions
        .iter()
        .map(|(n, v)| n.len() + v.get().len() + 4)
        .sum();
    let mut out = String::with_capacity(len + 1);
    for (i, (name, value)) in extensions.iter().enumerate() {
        out.push(if i == 0 { '{' } else { ',' });
        push_json_string(&mut out, name);
        out.push(':');
        out.push_str(value.get());
    }
    out.push('}');
    Some(Text::from(out))
}

/// `s` as a JSON string literal.
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Every field any metric-driving `data` object can carry; each type reads
/// the ones it defines. One struct keeps the hot path to one parse.
#[derive(Deserialize)]
struct RawData<'a> {
    #[serde(default, borrow, deserialize_with = "present")]
    name: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    plan: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    currency: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    limits: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    overage: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    metric: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    aggregation: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    subscription_id: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    billing_cycle: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    price: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    trial_ends_at: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    reason: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    effective_at: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    quantity: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    invoice_id: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    amount: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    unit_price: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    per: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    unique: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    dimensions: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    group_by: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    billing_anchor: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    target_source: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    target_id: Option<&'a RawValue>,
}

/// Where a message came from; `None` parts skip the checks that need them
/// (`tally publish` validates before there is a subject or publish time).
struct Context<'s> {
    subject: Option<(&'s str, &'s str)>,
    published_at: Option<i64>,
}

/// Validates a consumed message: every reason applies.
pub fn validate_message(
    bytes: &[u8],
    subject: &str,
    prefix: &str,
    stream_seq: u64,
    published_at: i64,
    limits: &Limits,
) -> Result<Event, Reject> {
    let ctx = Context {
        subject: Some((prefix, subject)),
        published_at: Some(published_at),
    };
    let mut event = validate(bytes, &ctx, limits)?;
    event.stream_seq = stream_seq;
    event.published_at = published_at;
    Ok(event)
}

/// Validates an event before it is published: every rule except
/// `subject_mismatch`, `time_in_future` and `time_too_old`, which need the
/// message context. The publish time is the server's, assigned on arrival;
/// validation never reads the clock in its place.
pub(crate) fn validate_payload(bytes: &[u8], limits: &Limits) -> Result<Event, Reject> {
    validate(
        bytes,
        &Context {
            subject: None,
            published_at: None,
        },
        limits,
    )
}

/// Microseconds in the largest unit that divides them, as the config
/// writes durations (`"3650d"`, `"90s"`).
pub(crate) fn duration_text(us: i64) -> String {
    for (unit, len) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        let unit_us = len * MICROS;
        if us % unit_us == 0 {
            return format!("{}{unit}", us / unit_us);
        }
    }
    format!("{us}µs")
}

fn shown(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let cut: String = s.chars().take(MAX).collect();
        format!("{cut:?}...")
    }
}

fn envelope(detail: impl Into<String>) -> Reject {
    Reject::new(DlqReason::InvalidEnvelope, detail)
}

fn bad_data(detail: impl Into<String>) -> Reject {
    Reject::new(DlqReason::InvalidData, detail)
}

/// A JSON string's value; `None` if the raw value is not a string.
fn string_of(raw: &RawValue) -> Option<Cow<'_, str>> {
    let t = raw.get();
    if !t.starts_with('"') {
        return None;
    }
    if !t.contains('\\') {
        return t.get(1..t.len() - 1).map(Cow::Borrowed);
    }
    serde_json::from_str::<String>(t).ok().map(Cow::Owned)
}

fn kind_of(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'"') => "a string",
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

fn required_str<'a>(
    raw: Option<&'a RawValue>,
    name: &str,
    mk: fn(String) -> Reject,
) -> Result<Cow<'a, str>, Reject> {
    match raw {
        None => Err(mk(format!("required attribute `{name}` is missing"))),
        Some(r) => {
            string_of(r).ok_or_else(|| mk(format!("`{name}` must be a string, got {}", kind_of(r))))
        }
    }
}

fn optional_str<'a>(
    raw: Option<&'a RawValue>,
    name: &str,
    mk: fn(String) -> Reject,
) -> Result<Option<Cow<'a, str>>, Reject> {
    match raw {
        None => Ok(None),
        Some(r) => string_of(r)
            .map(Some)
            .ok_or_else(|| mk(format!("`{name}` must be a string, got {}", kind_of(r)))),
    }
}

/// An optional `data` field: JSON `null` is the field absent (the
/// contract's rule for every optional field of `data`).
fn optional_data_str<'a>(
    raw: Option<&'a RawValue>,
    name: &str,
) -> Result<Option<Cow<'a, str>>, Reject> {
    let raw = raw.filter(|r| r.get().trim() != "null");
    optional_str(raw, name, data_err)
}

fn env_err(s: String) -> Reject {
    envelope(s)
}

fn data_err(s: String) -> Reject {
    bad_data(s)
}

fn is_event_type(s: &str) -> bool {
    // ^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$
    let mut segments = 0;
    for seg in s.split('.') {
        let mut chars = seg.bytes();
        match chars.next() {
            Some(b'a'..=b'z') => {}
            _ => return false,
        }
        if !chars.all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_')) {
            return false;
        }
        segments += 1;
    }
    segments >= 2
}

fn is_tenant(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

/// `^[a-z0-9][a-z0-9_-]{0,63}$`
pub(crate) fn is_plan_code(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=64).contains(&b.len())
        && matches!(b[0], b'a'..=b'z' | b'0'..=b'9')
        && b[1..]
            .iter()
            .all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
}

/// `^[a-z][a-z0-9_]{0,63}$`
pub(crate) fn is_metric_name(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=64).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b[1..]
            .iter()
            .all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_'))
}

fn is_currency(s: &str) -> bool {
    s.len() == 3 && s.bytes().all(|c| c.is_ascii_uppercase())
}

fn validate(bytes: &[u8], ctx: &Context<'_>, limits: &Limits) -> Result<Event, Reject> {
    // 1. too_large
    if bytes.len() > limits.max_bytes {
        return Err(Reject::new(
            DlqReason::TooLarge,
            format!(
                "message is {} bytes, over the {}-byte limit",
                bytes.len(),
                limits.max_bytes
            ),
        ));
    }
    // 2. invalid_json
    let text = std::str::from_utf8(bytes)
        .map_err(|e| Reject::new(DlqReason::InvalidJson, format!("not UTF-8 text: {e}")))?;
    let starts_as_object = text.trim_start().starts_with('{');
    // Anything but an object is told apart below, by its kind.
    let parsed = if starts_as_object {
        serde_json::from_str::<RawEnvelope<'_>>(text)
    } else {
        serde_json::from_str("!")
    };
    let raw: RawEnvelope<'_> = match parsed {
        Ok(raw) => raw,
        Err(e) if e.classify() == serde_json::error::Category::Data && starts_as_object => {
            return Err(envelope(format!(
                "the envelope has a repeated attribute: {e}"
            )));
        }
        Err(e) if e.is_data() || !starts_as_object => {
            let kind = serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .map(|v| match v {
                    serde_json::Value::Array(_) => "an array",
                    serde_json::Value::String(_) => "a string",
                    serde_json::Value::Number(_) => "a number",
                    serde_json::Value::Bool(_) => "a boolean",
                    serde_json::Value::Null => "null",
                    serde_json::Value::Object(_) => "an object",
                });
            return Err(Reject::new(
                DlqReason::InvalidJson,
                match kind {
                    Some(k) => format!("expected a JSON object, got {k}"),
                    None => format!("not valid JSON: {e}"),
                },
            ));
        }
        Err(e) => {
            return Err(Reject::new(
                DlqReason::InvalidJson,
                format!("not valid JSON: {e}"),
            ));
        }
    };

    // 3. invalid_envelope
    let specversion = required_str(raw.specversion, "specversion", env_err)?;
    if specversion != "1.0" {
        return Err(envelope(format!(
            "`specversion` must be \"1.0\", got {}",
            shown(&specversion)
        )));
    }
    let id = required_str(raw.id, "id", env_err)?;
    let id_len = id.chars().count();
    if !(1..=128).contains(&id_len) {
        return Err(envelope(format!(
            "`id` must be 1 to 128 characters, got {id_len}"
        )));
    }
    let source = required_str(raw.source, "source", env_err)?;
    let source_len = source.chars().count();
    if !(1..=256).contains(&source_len) {
        return Err(envelope(format!(
            "`source` must be 1 to 256 characters, got {source_len}"
        )));
    }
    let event_type = required_str(raw.event_type, "type", env_err)?;
    if !is_event_type(&event_type) {
        return Err(envelope(format!(
            "`type` must look like `domain.object_verbed` (^[a-z][a-z0-9_]*(\\.[a-z][a-z0-9_]*)+$), got {}",
            shown(&event_type)
        )));
    }
    let time_text = required_str(raw.time, "time", env_err)?;
    let time = parse_rfc3339_micros(&time_text).ok_or_else(|| {
        envelope(format!(
            "`time` must be an RFC 3339 date-time with offset, e.g. 2026-01-31T12:00:00Z, got {}",
            shown(&time_text)
        ))
    })?;
    let tenant = required_str(raw.tenant, "tenant", env_err)?;
    if !is_tenant(&tenant) {
        return Err(envelope(format!(
            "`tenant` must match ^[A-Za-z0-9_-]{{1,64}}$, got {}",
            shown(&tenant)
        )));
    }
    let dataversion = optional_str(raw.dataversion, "dataversion", env_err)?;
    let actor = optional_str(raw.actor, "actor", env_err)?;
    let actortype = optional_str(raw.actortype, "actortype", env_err)?;
    let subject = optional_str(raw.subject, "subject", env_err)?;
    let dataschema = optional_str(raw.dataschema, "dataschema", env_err)?;
    let datacontenttype = optional_str(raw.datacontenttype, "datacontenttype", env_err)?;
    if let Some(ct) = &datacontenttype
        && ct != "application/json"
    {
        return Err(envelope(format!(
            "`datacontenttype` must be \"application/json\", got {}",
            shown(ct)
        )));
    }
    if let Some(d) = raw.data
        && !d.get().starts_with('{')
    {
        return Err(envelope(format!(
            "`data` must be a JSON object, got {}",
            kind_of(d)
        )));
    }

    // 4. subject_mismatch
    if let Some((prefix, subject)) = ctx.subject {
        let matches = subject
            .strip_prefix(prefix)
            .and_then(|s| s.strip_prefix('.'))
            .and_then(|s| s.strip_prefix(tenant.as_ref()))
            .and_then(|s| s.strip_prefix('.'))
            .is_some_and(|s| s == event_type);
        if !matches {
            return Err(Reject::new(
                DlqReason::SubjectMismatch,
                format!(
                    "subject {} is not {prefix}.<tenant>.<type> of the envelope ({prefix}.{tenant}.{event_type})",
                    shown(subject)
                ),
            ));
        }
    }

    let metric_driving = payload::is_metric_type(&event_type);
    // 5. unsupported_version
    if metric_driving
        && let Some(v) = &dataversion
        && v != "1"
    {
        return Err(Reject::new(
            DlqReason::UnsupportedVersion,
            format!(
                "`{event_type}` supports dataversion \"1\" only, got {}",
                shown(v)
            ),
        ));
    }
    // 6. forbidden_tenant
    let is_catalog = event_type.starts_with("catalog.");
    if is_catalog && tenant != "_system" {
        return Err(Reject::new(
            DlqReason::ForbiddenTenant,
            format!(
                "`{event_type}` may only come from tenant \"_system\", got {}",
                shown(&tenant)
            ),
        ));
    }
    if metric_driving && !is_catalog && tenant == "_system" && event_type != VOIDED_TYPE {
        return Err(Reject::new(
            DlqReason::ForbiddenTenant,
            format!(
                "tenant \"_system\" is reserved for catalog events (and their voids) and cannot send `{event_type}`"
            ),
        ));
    }
    // 7. invalid_data
    let payload = if metric_driving {
        let data = raw
            .data
            .ok_or_else(|| bad_data(format!("`{event_type}` requires a `data` object")))?;
        parse_data(&event_type, data)?
    } else {
        Payload::Other
    };
    // 8. time_in_future
    if let Some(published_at) = ctx.published_at
        && time > published_at.saturating_add(limits.future_skew_us)
    {
        return Err(Reject::new(
            DlqReason::TimeInFuture,
            format!(
                "event time {} is more than {}s after the publish time {}",
                format_micros(time),
                limits.future_skew_us / MICROS,
                format_micros(published_at)
            ),
        ));
    }
    // 9. time_too_old
    if let Some(published_at) = ctx.published_at
        && time < published_at.saturating_sub(limits.max_event_age_us)
    {
        return Err(Reject::new(
            DlqReason::TimeTooOld,
            format!(
                "event time {} is more than {} (max_event_age) before the publish time {}",
                format_micros(time),
                duration_text(limits.max_event_age_us),
                format_micros(published_at)
            ),
        ));
    }

    Ok(Event {
        stream_seq: 0,
        published_at: 0,
        id: Text::from(&*id),
        source: Text::from(&*source),
        event_type: Text::from(&*event_type),
        tenant: Text::from(&*tenant),
        time,
        dataversion: dataversion.map_or_else(|| Text::const_new("1"), |v| Text::from(&*v)),
        actor: actor.map(|v| Text::from(&*v)),
        actortype: actortype.map(|v| Text::from(&*v)),
        subject: subject.map(|v| Text::from(&*v)),
        datacontenttype: datacontenttype.map(|v| Text::from(&*v)),
        dataschema: dataschema.map(|v| Text::from(&*v)),
        data: raw.data.map(|d| Text::from(d.get())),
        extensions: extensions_text(&raw.extensions),
        payload,
    })
}

/// The typed payload of an archived event (its `type` and `data` text, as
/// stored in the `events` view), for rebuilding operator state.
pub(crate) fn payload_from_archive(
    event_type: &str,
    data: Option<&str>,
) -> Result<Payload, Reject> {
    if !payload::is_metric_type(event_type) {
        return Ok(Payload::Other);
    }
    let text = data.ok_or_else(|| bad_data(format!("`{event_type}` requires a `data` object")))?;
    let raw: &RawValue = serde_json::from_str(text)
        .map_err(|e| bad_data(format!("archived `data` is not JSON: {e}")))?;
    parse_data(event_type, raw)
}

fn field<'a>(raw: Option<&'a RawValue>, name: &str) -> Result<&'a RawValue, Reject> {
    raw.ok_or_else(|| bad_data(format!("`data.{name}` is required")))
}

/// A string attribute of `data`, borrowed when it has no escapes: the
/// caller decides what to own it as.
fn data_str<'a>(raw: Option<&'a RawValue>, name: &str) -> Result<Cow<'a, str>, Reject> {
    // The attribute's name is only spelled out (allocated) for the reject.
    match raw.and_then(string_of) {
        Some(s) => Ok(s),
        None => required_str(raw, &format!("data.{name}"), data_err),
    }
}

fn data_nonempty(raw: Option<&RawValue>, name: &str) -> Result<String, Reject> {
    let s = data_str(raw, name)?;
    if s.is_empty() {
        return Err(bad_data(format!("`data.{name}` must not be empty")));
    }
    Ok(s.into_owned())
}

fn data_checked<'a>(
    raw: Option<&'a RawValue>,
    name: &str,
    ok: fn(&str) -> bool,
    rule: &str,
) -> Result<Cow<'a, str>, Reject> {
    let s = data_str(raw, name)?;
    if !ok(&s) {
        return Err(bad_data(format!(
            "`data.{name}` must match {rule}, got {}",
            shown(&s)
        )));
    }
    Ok(s)
}

fn data_time(raw: Option<&RawValue>, name: &str) -> Result<Option<i64>, Reject> {
    match optional_data_str(raw, &format!("data.{name}"))? {
        None => Ok(None),
        Some(t) => parse_rfc3339_micros(&t).map(Some).ok_or_else(|| {
            bad_data(format!(
                "`data.{name}` must be an RFC 3339 date-time with offset, got {}",
                shown(&t)
            ))
        }),
    }
}

/// A JSON integer (JSON Schema's `integer`: `3`, `3.0` and `3e2` all count) >= `min`.
fn data_int(raw: Option<&RawValue>, name: &str, min: i64) -> Result<i64, Reject> {
    let r = field(raw, name)?;
    let t = r.get();
    let value = if t.bytes().all(|c| c.is_ascii_digit() || c == b'-') {
        t.parse::<i64>().ok()
    } else {
        match serde_json::from_str::<serde_json::Number>(t) {
            Ok(n) => n
                .as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.2e18)
                .map(|f| f as i64),
            Err(_) => None,
        }
    };
    match value {
        Some(v) if v >= min => Ok(v),
        Some(v) => Err(bad_data(format!("`data.{name}` must be >= {min}, got {v}"))),
        None => Err(bad_data(format!(
            "`data.{name}` must be a whole number (minor units), got {}",
            shown(t)
        ))),
    }
}

fn quantity(r: &RawValue, name: &str) -> Result<i128, Reject> {
    let t = r.get();
    let parsed = match t.as_bytes().first() {
        Some(b'"') => match string_of(r) {
            Some(s) => decimal::parse_decimal_string(&s),
            None => Err(QuantityError::Syntax),
        },
        Some(b'-' | b'0'..=b'9') => decimal::parse_json_number(t),
        _ => Err(QuantityError::Syntax),
    };
    parsed.map_err(|e| {
        bad_data(format!(
            "`{name}` must be a number >= 0 or a decimal string like \"12.5\" ({e}), got {}",
            shown(t)
        ))
    })
}

fn object_entries<'a>(
    r: &'a RawValue,
    name: &str,
) -> Result<BTreeMap<String, &'a RawValue>, Reject> {
    if !r.get().starts_with('{') {
        return Err(bad_data(format!(
            "`data.{name}` must be an object, got {}",
            kind_of(r)
        )));
    }
    serde_json::from_str(r.get())
        .map_err(|e| bad_data(format!("`data.{name}` is not a valid object: {e}")))
}

fn parse_data(event_type: &str, data: &RawValue) -> Result<Payload, Reject> {
    let d: RawData<'_> = serde_json::from_str(data.get())
        .map_err(|e| bad_data(format!("`data` has a repeated field: {e}")))?;
    fn currency<'a>(d: &RawData<'a>) -> Result<Cow<'a, str>, Reject> {
        data_checked(d.currency, "currency", is_currency, "^[A-Z]{3}$ (ISO 4217)")
    }
    fn plan<'a>(d: &RawData<'a>) -> Result<Cow<'a, str>, Reject> {
        data_checked(d.plan, "plan", is_plan_code, "^[a-z0-9][a-z0-9_-]{0,63}$")
    }
    fn metric<'a>(d: &RawData<'a>) -> Result<Cow<'a, str>, Reject> {
        data_checked(d.metric, "metric", is_metric_name, "^[a-z][a-z0-9_]{0,63}$")
    }
    let terms = |d: &RawData<'_>, trial: Option<i64>| -> Result<SubscriptionTerms, Reject> {
        let billing_anchor = data_time(d.billing_anchor, "billing_anchor")?;
        let subscription_id = data_nonempty(d.subscription_id, "subscription_id")?;
        let plan = plan(d)?;
        let cycle_text = data_str(d.billing_cycle, "billing_cycle")?;
        let billing_cycle = BillingCycle::parse(&cycle_text).ok_or_else(|| {
            bad_data(format!(
                "`data.billing_cycle` must be \"monthly\" or \"yearly\", got {}",
                shown(&cycle_text)
            ))
        })?;
        let price = data_int(d.price, "price", 0)?;
        let currency = currency(d)?;
        Ok(SubscriptionTerms {
            subscription_id: subscription_id.into(),
            plan: Text::from(plan.as_ref()),
            billing_cycle,
            price,
            currency: Text::from(currency.as_ref()),
            trial_ends_at: trial,
            billing_anchor,
        })
    };
    Ok(match event_type {
        "tenant.created" => Payload::TenantCreated {
            name: optional_data_str(d.name, "data.name")?.map(Cow::into_owned),
        },
        "catalog.plan_published" => {
            let plan = plan(&d)?;
            let currency = currency(&d)?;
            let mut limits = BTreeMap::new();
            for (m, q) in object_entries(field(d.limits, "limits")?, "limits")? {
                if !is_metric_name(&m) {
                    return Err(bad_data(format!(
                        "`data.limits` key {} is not a metric name",
                        shown(&m)
                    )));
                }
                let v = quantity(q, &format!("data.limits.{m}"))?;
                limits.insert(m, v);
            }
            let mut overage = BTreeMap::new();
            if let Some(o) = d.overage.filter(|r| r.get().trim() != "null") {
                for (m, price) in object_entries(o, "overage")? {
                    if !is_metric_name(&m) {
                        return Err(bad_data(format!(
                            "`data.overage` key {} is not a metric name",
                            shown(&m)
                        )));
                    }
                    let p: RawData<'_> = if price.get().starts_with('{') {
                        serde_json::from_str(price.get()).map_err(|e| {
                            bad_data(format!("`data.overage.{m}` is not a valid object: {e}"))
                        })?
                    } else {
                        return Err(bad_data(format!(
                            "`data.overage.{m}` must be an object, got {}",
                            kind_of(price)
                        )));
                    };
                    let unit_price = data_int(p.unit_price, &format!("overage.{m}.unit_price"), 0)?;
                    let per = data_int(p.per, &format!("overage.{m}.per"), 1)?;
                    overage.insert(m, OveragePrice { unit_price, per });
                }
            }
            Payload::PlanPublished(PlanVersion {
                plan: plan.into_owned(),
                currency: currency.into_owned(),
                limits,
                overage,
            })
        }
        "catalog.meter_defined" => {
            let metric = metric(&d)?;
            let agg_text = data_str(d.aggregation, "aggregation")?;
            let aggregation = Aggregation::parse(&agg_text).ok_or_else(|| {
                bad_data(format!(
                    "`data.aggregation` must be one of sum, count, max, latest, unique_count; got {}",
                    shown(&agg_text)
                ))
            })?;
            Payload::MeterDefined {
                metric: metric.into_owned(),
                aggregation,
                group_by: group_by(d.group_by)?,
            }
        }
        "subscription.started" => {
            let trial = data_time(d.trial_ends_at, "trial_ends_at")?;
            Payload::SubscriptionStarted(terms(&d, trial)?)
        }
        "subscription.plan_changed" => Payload::PlanChanged(terms(&d, None)?),
        "subscription.cancelled" => Payload::SubscriptionCancelled {
            subscription_id: data_nonempty(d.subscription_id, "subscription_id")?,
            reason: optional_data_str(d.reason, "data.reason")?.map(Cow::into_owned),
            effective_at: data_time(d.effective_at, "effective_at")?,
        },
        "usage.recorded" => {
            let metric = metric(&d)?;
            let quantity = quantity(field(d.quantity, "quantity")?, "data.quantity")?;
            let unique = match optional_data_str(d.unique, "data.unique")? {
                None => None,
                Some(u) => Some(Text::from(&*chars_within(u, "unique", 1, MAX_UNIQUE)?)),
            };
            Payload::UsageRecorded {
                metric: Text::from(&*metric),
                quantity,
                unique,
                dimensions: dimensions(d.dimensions)?,
            }
        }
        "invoice.paid" | "invoice.refunded" => {
            let invoice_id = data_nonempty(d.invoice_id, "invoice_id")?;
            let amount = data_int(d.amount, "amount", 0)?;
            let currency = currency(&d)?;
            if event_type == "invoice.paid" {
                Payload::InvoicePaid {
                    invoice_id,
                    amount,
                    currency: currency.into_owned(),
                }
            } else {
                Payload::InvoiceRefunded {
                    invoice_id,
                    amount,
                    currency: currency.into_owned(),
                }
            }
        }
        VOIDED_TYPE => Payload::EventVoided {
            target_source: Text::from(&*chars_within(
                data_str(d.target_source, "target_source")?,
                "target_source",
                1,
                MAX_SOURCE_CHARS,
            )?),
            target_id: Text::from(&*chars_within(
                data_str(d.target_id, "target_id")?,
                "target_id",
                1,
                MAX_ID_CHARS,
            )?),
            reason: match optional_data_str(d.reason, "data.reason")? {
                None => None,
                Some(r) => Some(chars_within(r, "reason", 0, MAX_VOID_REASON)?.into_owned()),
            },
        },
        _ => Payload::Other,
    })
}

/// Most entries in a usage event's `dimensions`.
pub(crate) const MAX_DIMENSIONS: usize = 8;
/// Longest dimension value, in characters.
pub(crate) const MAX_DIMENSION_VALUE: usize = 128;
/// Longest `unique` value, in characters.
pub(crate) const MAX_UNIQUE: usize = 256;
/// Most keys in a meter's `group_by`.
pub(crate) const MAX_GROUP_BY: usize = 4;
/// Longest `reason` of a void, in characters.
pub(crate) const MAX_VOID_REASON: usize = 1024;
const MAX_SOURCE_CHARS: usize = 256;
const MAX_ID_CHARS: usize = 128;

/// `s` if it has `min..=max` characters (Unicode code points).
fn chars_within<'a>(
    s: Cow<'a, str>,
    name: &str,
    min: usize,
    max: usize,
) -> Result<Cow<'a, str>, Reject> {
    let n = s.chars().count();
    if n < min || n > max {
        return Err(bad_data(format!(
            "`data.{name}` must have {min} to {max} characters, got {n}"
        )));
    }
    Ok(s)
}

/// A dimension key (or `group_by` entry): the metric name pattern.
fn is_dimension_key(s: &str) -> bool {
    is_metric_name(s)
}

/// How many distinct `dimensions` texts each validating thread keeps with
/// their validated sets (cleared when full), and the longest text kept.
/// A stream's usage events mostly repeat a few sets (a model and a region):
/// a repeat is then one lookup of its text and a shared set, instead of
/// reading, checking and allocating it again. The bound keeps a stream of
/// distinct sets (a cardinality bomb) from growing it.
const DIMENSION_SETS_KEPT: usize = 1024;
const DIMENSION_TEXT_KEPT: usize = 512;

type DimensionSets = std::collections::HashMap<Box<str>, Arc<Dimensions>, ahash::RandomState>;

thread_local! {
    /// The validated sets of this thread, by their exact text. The result
    /// of a text never changes, so what is kept changes no outcome.
    static VALIDATED_DIMENSIONS: std::cell::RefCell<DimensionSets> = const {
        std::cell::RefCell::new(DimensionSets::with_hasher(ahash::RandomState::with_seeds(
            0xd1, 0x3e, 0x75, 0x10,
        )))
    };
}

/// `data.dimensions`: absent or null, or an object of at most eight
/// entries with dimension keys and string values of 1..128 characters;
/// sorted by key.
fn dimensions(raw: Option<&RawValue>) -> Result<Option<Arc<Dimensions>>, Reject> {
    let Some(r) = raw.filter(|r| r.get().trim() != "null") else {
        return Ok(None);
    };
    let text = r.get();
    if text.len() > DIMENSION_TEXT_KEPT {
        return dimensions_of(r).map(Some);
    }
    if let Some(seen) = VALIDATED_DIMENSIONS.with_borrow(|sets| sets.get(text).cloned()) {
        return Ok(Some(seen));
    }
    let dims = dimensions_of(r)?;
    VALIDATED_DIMENSIONS.with_borrow_mut(|sets| {
        if sets.len() >= DIMENSION_SETS_KEPT {
            sets.clear();
        }
        sets.insert(Box::from(text), Arc::clone(&dims));
    });
    Ok(Some(dims))
}

/// [`dimensions`] of a present, non-null value, read and checked.
fn dimensions_of(r: &RawValue) -> Result<Arc<Dimensions>, Reject> {
    if !r.get().starts_with('{') {
        return Err(bad_data(format!(
            "`data.dimensions` must be an object, got {}",
            kind_of(r)
        )));
    }
    if let Some(plain) = plain_dimensions(r.get()) {
        return Ok(plain);
    }
    let entries: Vec<(Cow<'_, str>, &RawValue)> = serde_json::from_str::<Entries<'_>>(r.get())
        .map_err(|e| bad_data(format!("`data.dimensions` is not a valid object: {e}")))?
        .0;
    if entries.len() > MAX_DIMENSIONS {
        return Err(bad_data(format!(
            "`data.dimensions` may have at most {MAX_DIMENSIONS} entries, got {}",
            entries.len()
        )));
    }
    let mut out = Vec::with_capacity(entries.len());
    for (k, v) in entries {
        if !is_dimension_key(&k) {
            return Err(bad_data(format!(
                "`data.dimensions` key {} must match ^[a-z][a-z0-9_]{{0,63}}$",
                shown(&k)
            )));
        }
        let value = string_of(v).ok_or_else(|| {
            bad_data(format!(
                "`data.dimensions.{k}` must be a string, got {}",
                kind_of(v)
            ))
        })?;
        // Counted here, not through `chars_within`: its name would be
        // formatted for every entry of every usage event.
        let n = value.chars().count();
        if !(1..=MAX_DIMENSION_VALUE).contains(&n) {
            return Err(bad_data(format!(
                "`data.dimensions.{k}` must have 1 to {MAX_DIMENSION_VALUE} characters, got {n}"
            )));
        }
        out.push((Text::from(&*k), Text::from(&*value)));
    }
    out.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    if out.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(bad_data("`data.dimensions` has a repeated key"));
    }
    Ok(Arc::from(out))
}

/// `dimensions` as producers usually write them: an object of string
/// members with no escapes, read here without serde (it runs for every
/// usage event). `None` when it is anything else or breaks a rule: the
/// full reading in [`dimensions`] then decides, its errors included, so
/// this gives only what that would give.
fn plain_dimensions(t: &str) -> Option<Arc<Dimensions>> {
    if t.contains('\\') {
        return None;
    }
    let b = t.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while b
            .get(*i)
            .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
        {
            *i += 1;
        }
    };
    // A string without escapes at `i`: its text, `i` past its closing quote.
    let string = |i: &mut usize| -> Option<&str> {
        if b.get(*i) != Some(&b'"') {
            return None;
        }
        let start = *i + 1;
        let len = b.get(start..)?.iter().position(|c| *c == b'"')?;
        *i = start + len + 1;
        t.get(start..start + len)
    };
    skip_ws(&mut i);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    skip_ws(&mut i);
    // On the stack until the one allocation of the `Arc`.
    let mut out: [(Text, Text); MAX_DIMENSIONS] = Default::default();
    let mut len = 0;
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            let key = string(&mut i)?;
            skip_ws(&mut i);
            if b.get(i) != Some(&b':') {
                return None;
            }
            i += 1;
            skip_ws(&mut i);
            let value = string(&mut i)?;
            let n = value.chars().count();
            if !is_dimension_key(key)
                || !(1..=MAX_DIMENSION_VALUE).contains(&n)
                || len == MAX_DIMENSIONS
            {
                return None;
            }
            out[len] = (Text::from(key), Text::from(value));
            len += 1;
            skip_ws(&mut i);
            match b.get(i) {
                Some(b',') => {
                    i += 1;
                    skip_ws(&mut i);
                }
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    skip_ws(&mut i);
    if i != b.len() {
        return None;
    }
    let pairs = &mut out[..len];
    pairs.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    if pairs.windows(2).any(|w| w[0].0 == w[1].0) {
        return None;
    }
    Some(out.into_iter().take(len).collect())
}

/// A JSON object's members in order, repeats kept (so they can be refused).
struct Entries<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Entries<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<'de>, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key_seed(AttributeName)? {
                    let v: &'de RawValue = map.next_value()?;
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// `data.group_by`: absent or null, or 1..4 distinct dimension keys.
fn group_by(raw: Option<&RawValue>) -> Result<Option<Vec<String>>, Reject> {
    let Some(r) = raw.filter(|r| r.get().trim() != "null") else {
        return Ok(None);
    };
    let keys: Vec<String> = if r.get().starts_with('[') {
        serde_json::from_str(r.get())
            .map_err(|_| bad_data("`data.group_by` must be an array of dimension keys (strings)"))?
    } else {
        return Err(bad_data(format!(
            "`data.group_by` must be an array, got {}",
            kind_of(r)
        )));
    };
    if keys.is_empty() || keys.len() > MAX_GROUP_BY {
        return Err(bad_data(format!(
            "`data.group_by` must have 1 to {MAX_GROUP_BY} keys, got {}",
            keys.len()
        )));
    }
    for (i, k) in keys.iter().enumerate() {
        if !is_dimension_key(k) {
            return Err(bad_data(format!(
                "`data.group_by` key {} must match ^[a-z][a-z0-9_]{{0,63}}$",
                shown(k)
            )));
        }
        if keys[..i].contains(k) {
            return Err(bad_data(format!(
                "`data.group_by` repeats the key {}",
                shown(k)
            )));
        }
    }
    Ok(Some(keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_dimensions_text_shares_its_set_and_a_bad_one_is_refused_every_time() {
        let raw = |t: &str| serde_json::from_str::<Box<RawValue>>(t).unwrap();
        let text = r#"{"region":"eu","model":"m1"}"#;
        let first = dimensions(Some(&raw(text))).unwrap().unwrap();
        let again = dimensions(Some(&raw(text))).unwrap().unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(first, dimensions_of(&raw(text)).unwrap());
        for _ in 0..2 {
            let err = dimensions(Some(&raw(r#"{"Region":"eu"}"#))).unwrap_err();
            assert_eq!(err.reason, DlqReason::InvalidData);
        }
        // Past the bound the kept sets start over; answers stay the same.
        for i in 0..DIMENSION_SETS_KEPT + 5 {
            let t = format!(r#"{{"n":"{i}"}}"#);
            let d = dimensions(Some(&raw(&t))).unwrap().unwrap();
            assert_eq!(d[0].1.as_str(), i.to_string());
        }
        let kept = VALIDATED_DIMENSIONS.with_borrow(|sets| sets.len());
        assert!(kept <= DIMENSION_SETS_KEPT, "{kept}");
        let members: Vec<String> = (0..6)
            .map(|i| format!(r#""k{i}":"{}""#, "x".repeat(100)))
            .collect();
        let long = format!("{{{}}}", members.join(","));
        assert!(long.len() > DIMENSION_TEXT_KEPT);
        assert!(dimensions(Some(&raw(&long))).is_ok());
        assert!(VALIDATED_DIMENSIONS.with_borrow(|sets| !sets.contains_key(long.as_str())));
    }

    #[test]
    fn plain_dimensions_read_what_the_full_reading_reads_and_nothing_else() {
        let pairs = |v: &[(&str, &str)]| -> Arc<Dimensions> {
            let mut d: Vec<(Text, Text)> = v
                .iter()
                .map(|(k, v)| (Text::from(*k), Text::from(*v)))
                .collect();
            d.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            Arc::from(d)
        };
        assert_eq!(plain_dimensions("{}"), Some(pairs(&[])));
        assert_eq!(
            plain_dimensions(r#"{"region":"eu","model":"gpt-5"}"#),
            Some(pairs(&[("model", "gpt-5"), ("region", "eu")]))
        );
        assert_eq!(
            plain_dimensions(" { \"a\" : \"東京\" ,\n\"b_2\":\"x y\" } "),
            Some(pairs(&[("a", "東京"), ("b_2", "x y")]))
        );
        // Anything else is left to the full reading, which refuses or
        // unescapes it.
        for t in [
            r#"{"a":"x","a":"y"}"#,
            r#"{"A":"x"}"#,
            r#"{"a":""}"#,
            r#"{"a":1}"#,
            r#"{"a":"x\"y"}"#,
            r#"{"a":{"b":"c"}}"#,
            r#"{"a":"x",}"#,
            r#"{"a":"x"} x"#,
            r#"{"a":"x""#,
            r#"{"a","x"}"#,
        ] {
            assert_eq!(plain_dimensions(t), None, "{t}");
        }
        let long = format!(r#"{{"a":"{}"}}"#, "é".repeat(MAX_DIMENSION_VALUE + 1));
        assert_eq!(plain_dimensions(&long), None);
        let ok = format!(r#"{{"a":"{}"}}"#, "é".repeat(MAX_DIMENSION_VALUE));
        assert!(plain_dimensions(&ok).is_some());
        let nine = (0..9)
            .map(|i| format!(r#""k{i}":"v""#))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(plain_dimensions(&format!("{{{nine}}}")), None);
        let eight = (0..8)
            .map(|i| format!(r#""k{i}":"v""#))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            plain_dimensions(&format!("{{{eight}}}")).map(|d| d.len()),
            Some(8)
        );
    }

    fn msg(json: &str, subject: &str) -> Result<Event, Reject> {
        validate_message(
            json.as_bytes(),
            subject,
            "tally.events",
            7,
            1_767_225_600_000_000,
            &Limits::default(),
        )
    }

    const USAGE: &str = r#"{"specversion":"1.0","id":"e1","source":"svc","type":"usage.recorded","time":"2025-12-31T23:00:00+01:00","tenant":"acme","data":{"metric":"api_calls","quantity":"12.5"}}"#;

    #[test]
    fn accepts_usage_with_exact_quantity() {
        let e = msg(USAGE, "tally.events.acme.usage.recorded").unwrap();
        assert_eq!(e.stream_seq, 7);
        assert_eq!(e.dataversion, "1");
        assert_eq!(
            e.time,
            super::super::time::parse_rfc3339_micros("2025-12-31T22:00:00Z").unwrap()
        );
        assert_eq!(
            e.payload,
            Payload::UsageRecorded {
                metric: "api_calls".into(),
                quantity: 12_500_000_000,
                unique: None,
                dimensions: None,
            }
        );
        assert_eq!(
            e.data.as_deref(),
            Some(r#"{"metric":"api_calls","quantity":"12.5"}"#)
        );
    }

    /// An optional `data` field sent as `null` is absent.
    #[test]
    fn a_null_optional_data_field_is_absent() {
        let ev = |ty: &str, data: &str| {
            format!(
                r#"{{"specversion":"1.0","id":"n1","source":"svc","type":"{ty}","time":"2025-12-31T23:00:00Z","tenant":"acme","data":{data}}}"#
            )
        };
        let cases = [
            ("tenant.created", r#"{"name":null}"#),
            (
                "subscription.started",
                r#"{"subscription_id":"s1","plan":"pro","billing_cycle":"monthly","price":100,"currency":"USD","trial_ends_at":null}"#,
            ),
            (
                "subscription.cancelled",
                r#"{"subscription_id":"s1","reason":null,"effective_at":null}"#,
            ),
        ];
        for (ty, data) in cases {
            let e = msg(&ev(ty, data), &format!("tally.events.acme.{ty}"));
            assert!(e.is_ok(), "{ty} {data}: {:?}", e.err().map(|r| r.detail));
        }
        let plan = ev(
            "catalog.plan_published",
            r#"{"plan":"pro","currency":"USD","limits":{"api_calls":10},"overage":null}"#,
        )
        .replace(r#""tenant":"acme""#, r#""tenant":"_system""#);
        let e = msg(&plan, "tally.events._system.catalog.plan_published");
        assert!(e.is_ok(), "{:?}", e.err().map(|r| r.detail));
        // A required field is still required.
        let e = msg(
            &ev(
                "usage.recorded",
                r#"{"metric":"api_calls","quantity":null}"#,
            ),
            "tally.events.acme.usage.recorded",
        );
        assert_eq!(e.unwrap_err().reason, DlqReason::InvalidData);
    }

    #[test]
    fn first_reason_wins() {
        let r = msg(USAGE, "tally.events.other.usage.recorded").unwrap_err();
        assert_eq!(r.reason, DlqReason::SubjectMismatch);
        let bad_env = USAGE.replace("\"acme\"", "\"ac me\"");
        assert_eq!(
            msg(&bad_env, "x").unwrap_err().reason,
            DlqReason::InvalidEnvelope
        );
        assert_eq!(msg("[1]", "x").unwrap_err().reason, DlqReason::InvalidJson);
        assert_eq!(
            msg("{\"a\":", "x").unwrap_err().reason,
            DlqReason::InvalidJson
        );
        let dup = r#"{"id":"a","id":"b"}"#;
        assert_eq!(
            msg(dup, "x").unwrap_err().reason,
            DlqReason::InvalidEnvelope
        );
    }

    /// `USAGE` with event time `time`, on its subject.
    fn usage_at(time: &str, limits: &Limits) -> Result<Event, Reject> {
        validate_message(
            USAGE.replace("2025-12-31T23:00:00+01:00", time).as_bytes(),
            "tally.events.acme.usage.recorded",
            "tally.events",
            7,
            PUBLISHED,
            limits,
        )
    }

    /// The publish time `msg` uses: 2026-01-01T00:00:00Z.
    const PUBLISHED: i64 = 1_767_225_600_000_000;

    #[test]
    fn time_too_old_at_the_boundary() {
        let limits = Limits::default();
        // 3650 days before the publish time is still accepted...
        assert_eq!(
            format_micros(PUBLISHED - limits.max_event_age_us),
            "2016-01-04T00:00:00Z"
        );
        assert!(usage_at("2016-01-04T00:00:00Z", &limits).is_ok());
        assert!(usage_at("2016-01-04T01:00:00+01:00", &limits).is_ok());
        // ...one microsecond more is not.
        let r = usage_at("2016-01-03T23:59:59.999999Z", &limits).unwrap_err();
        assert_eq!(r.reason, DlqReason::TimeTooOld);
        assert_eq!(
            r.detail,
            "event time 2016-01-03T23:59:59.999999Z is more than 3650d (max_event_age) before the publish time 2026-01-01T00:00:00Z"
        );
        // The limit is the setting's.
        let day = Limits {
            max_event_age_us: 86_400 * MICROS,
            ..Limits::default()
        };
        assert!(usage_at("2025-12-31T00:00:00Z", &day).is_ok());
        assert_eq!(
            usage_at("2025-12-30T23:59:59.999999Z", &day)
                .unwrap_err()
                .reason,
            DlqReason::TimeTooOld
        );
        // An age beyond any time: the cutoff saturates rather than wraps.
        let none = Limits {
            max_event_age_us: i64::MAX,
            ..Limits::default()
        };
        assert!(usage_at("0001-01-01T00:00:00Z", &none).is_ok());
    }

    #[test]
    fn time_too_old_is_checked_last() {
        let old_and_bad = USAGE
            .replace("2025-12-31T23:00:00+01:00", "1990-01-01T00:00:00Z")
            .replace("\"12.5\"", "\"abc\"");
        assert_eq!(
            msg(&old_and_bad, "tally.events.acme.usage.recorded")
                .unwrap_err()
                .reason,
            DlqReason::InvalidData
        );
        // Before publishing there is no publish time: nothing is too old yet.
        let old = USAGE.replace("2025-12-31T23:00:00+01:00", "1990-01-01T00:00:00Z");
        assert!(validate_payload(old.as_bytes(), &Limits::default()).is_ok());
        assert_eq!(
            msg(&old, "tally.events.acme.usage.recorded")
                .unwrap_err()
                .reason,
            DlqReason::TimeTooOld
        );
    }

    /// `USAGE` with `extra` attributes (JSON members) after `tenant`.
    fn usage_with(extra: &str) -> Result<Event, Reject> {
        msg(
            &USAGE.replace(r#""tenant":"acme""#, &format!(r#""tenant":"acme",{extra}"#)),
            "tally.events.acme.usage.recorded",
        )
    }

    #[test]
    fn extensions_are_kept_in_order_with_their_raw_values() {
        let e = usage_with(r#""zeta":1.50,"alpha": {"b" : [true]},"dataschema":"urn:s""#).unwrap();
        assert_eq!(
            e.extensions.as_deref(),
            Some(r#"{"zeta":1.50,"alpha":{"b" : [true]}}"#)
        );
        assert_eq!(e.dataschema.as_deref(), Some("urn:s"));
        let plain = msg(USAGE, "tally.events.acme.usage.recorded").unwrap();
        assert_eq!((plain.extensions, plain.dataschema), (None, None));
    }

    #[test]
    fn a_repeated_attribute_is_invalid_envelope_and_named() {
        for (extra, name) in [
            (
                r#""traceparent":"a","x":1,"traceparent":"b""#,
                "traceparent",
            ),
            (r#""id":"e2""#, "id"),
            // The name is compared after unescaping: this is `id` again.
            (r#""\u0069d":"e2""#, "id"),
            (r#""actor":"a","actor":"a""#, "actor"),
        ] {
            let r = usage_with(extra).unwrap_err();
            assert_eq!(r.reason, DlqReason::InvalidEnvelope, "{extra}");
            assert!(
                r.detail.starts_with(&format!(
                    "the envelope has a repeated attribute: duplicate field `{name}`"
                )),
                "{extra}: {}",
                r.detail
            );
        }
        // Past the linear check, a repeat is still found.
        let many: Vec<String> = (0..40).map(|i| format!(r#""x{i}":{i}"#)).collect();
        assert!(usage_with(&many.join(",")).is_ok());
        let r = usage_with(&format!("{},\"x3\":0", many.join(","))).unwrap_err();
        assert_eq!(r.reason, DlqReason::InvalidEnvelope);
        assert!(r.detail.contains("duplicate field `x3`"), "{}", r.detail);
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let j = USAGE.replace("\"e1\"", r#""e\u0031""#);
        assert_eq!(
            msg(&j, "tally.events.acme.usage.recorded").unwrap().id,
            "e1"
        );
    }

    #[test]
    fn integers_follow_json_schema() {
        let paid = |amount: &str| {
            format!(
                r#"{{"specversion":"1.0","id":"i","source":"s","type":"invoice.paid","time":"2025-01-01T00:00:00Z","tenant":"t","data":{{"invoice_id":"x","amount":{amount},"currency":"USD"}}}}"#
            )
        };
        for ok in ["0", "1500", "1.0", "1e3"] {
            assert!(
                msg(&paid(ok), "tally.events.t.invoice.paid").is_ok(),
                "{ok}"
            );
        }
        for bad in ["1.5", "-1", "\"10\"", "null"] {
            assert_eq!(
                msg(&paid(bad), "tally.events.t.invoice.paid")
                    .unwrap_err()
                    .reason,
                DlqReason::InvalidData,
                "{bad}"
            );
        }
    }
}
