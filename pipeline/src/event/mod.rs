//! The event contract: what an accepted event is, and the validator that
//! turns a NATS message into an accepted [`Event`] or a [`Reject`] with the
//! contract's dead-letter reason.
//!
//! The rules here are the same rules as `schemas/*.json`; the contract test
//! (`tests/contract.rs`) runs one fixture corpus through both and requires
//! that they agree on every event.

pub mod alert;
pub mod decimal;
pub mod partition;
pub mod payload;
pub mod reason;
pub mod time;
pub mod validate;

pub(crate) use payload::{Aggregation, BillingCycle, Payload, PlanVersion, SubscriptionTerms};
pub use reason::DlqReason;
pub(crate) use reason::Reject;
pub use validate::{Limits, validate_message};
pub(crate) use validate::{payload_from_archive, validate_payload};

/// An event's string: inline when short (see [`Event`]).
pub(crate) type Text = compact_str::CompactString;

/// An accepted event, with its position in the stream.
///
/// Times are microseconds since the Unix epoch, UTC. Strings are
/// [`Text`]: up to 24 bytes (ids, sources, tenants, types) are kept inline,
/// so validating an event allocates only for its longer strings (usually
/// just `data`), and dropping it frees as few.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// JetStream stream sequence of the message that carried it.
    pub(crate) stream_seq: u64,
    /// JetStream publish time: stream time, used for dedup and skew.
    pub(crate) published_at: i64,
    pub(crate) id: Text,
    pub(crate) source: Text,
    pub(crate) event_type: Text,
    pub(crate) tenant: Text,
    /// Event time, normalised to UTC and truncated to microseconds.
    pub(crate) time: i64,
    /// `"1"` when the producer left it out.
    pub(crate) dataversion: Text,
    pub(crate) actor: Option<Text>,
    pub(crate) actortype: Option<Text>,
    pub(crate) subject: Option<Text>,
    /// `application/json` when given (the only value the contract allows).
    pub(crate) datacontenttype: Option<Text>,
    pub(crate) dataschema: Option<Text>,
    /// The `data` object as the producer wrote it (JSON text).
    pub(crate) data: Option<Text>,
    /// The attributes outside the contract's list (extensions such as
    /// `traceparent`) as a JSON object text: names in the order they
    /// appeared, values as the producer wrote them; `None` when there are
    /// none.
    pub(crate) extensions: Option<Text>,
    /// The typed meaning of `data` for the ten metric-driving types.
    pub(crate) payload: Payload,
}

/// The contract's default subject prefix.
pub(crate) const DEFAULT_SUBJECT_PREFIX: &str = "tally.events";

/// The subject an event belongs on: `<prefix>.<tenant>.<type>`.
pub(crate) fn subject_for(prefix: &str, tenant: &str, event_type: &str) -> String {
    format!("{prefix}.{tenant}.{event_type}")
}

/// The `Nats-Msg-Id` for an event:
/// `<tenant>:<byte length of source>:<source>:<id>`.
///
/// The tenant is part of it, as it is of the dedup key: with (`source`,
/// `id`) alone, one tenant's message would make JetStream drop another
/// tenant's inside the duplicate window. The value is unambiguous for any
/// triple: `:` is percent-encoded in the tenant (a valid tenant has none),
/// so the first `:` ends it, and the source's length delimits the source.
/// Control characters and `%` are percent-encoded everywhere, so the value
/// is always a valid header.
pub fn nats_msg_id(tenant: &str, source: &str, id: &str) -> String {
    fn push_escaped(out: &mut String, s: &str, also: Option<char>) {
        for c in s.chars() {
            if c.is_control() || c == '%' || Some(c) == also {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("%{b:02X}"));
                }
            } else {
                out.push(c);
            }
        }
    }
    let mut out = String::with_capacity(tenant.len() + source.len() + id.len() + 8);
    push_escaped(&mut out, tenant, Some(':'));
    out.push(':');
    out.push_str(&source.len().to_string());
    out.push(':');
    push_escaped(&mut out, source, None);
    out.push(':');
    push_escaped(&mut out, id, None);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_id_is_unambiguous() {
        assert_ne!(nats_msg_id("t", "a:b", "c"), nats_msg_id("t", "a", "b:c"));
        assert_ne!(nats_msg_id("t:1", "s", "i"), nats_msg_id("t", "1:s", "i"));
        assert_eq!(
            nats_msg_id("acme", "billing", "evt_1"),
            "acme:7:billing:evt_1"
        );
        assert_eq!(nats_msg_id("acme", "s", "a\nb%"), "acme:1:s:a%0Ab%25");
        assert_eq!(nats_msg_id("a:b", "s", "i"), "a%3Ab:1:s:i");
    }

    #[test]
    fn msg_id_is_per_tenant() {
        // Else JetStream's duplicate window would drop the victim's invoice.
        assert_ne!(
            nats_msg_id("evil", "billing", "inv-777"),
            nats_msg_id("victim", "billing", "inv-777")
        );
    }
}
