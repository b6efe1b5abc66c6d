//! NATS JetStream: the event stream Tally consumes ([`jetstream`]) and the
//! dead-letter stream it publishes rejects to ([`dlq`]).

pub mod dlq;
pub mod jetstream;
