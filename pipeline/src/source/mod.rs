//! NATS JetStream input: the event stream, its durable pull consumer and
//! the deliveries the runtime batches from ([`jetstream`]).

pub mod jetstream;
