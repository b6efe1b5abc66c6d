//! The few messages a partition's worker folds that its consumer does not
//! deliver (the catalog's; for partition 0, subjects without a type), on
//! a stream that stores partition numbers in subjects: read from the
//! stream by subject, as far as each batch reaches, and merged with the
//! consumer's deliveries by stream sequence.
//!
//! What is kept here are facts about the stream, not progress: the
//! matching messages within a scanned range of sequences. A range is never
//! read twice while the run moves forward; a run that resumes from an
//! earlier checkpoint reads it again.

use std::collections::BTreeMap;

use async_nats::jetstream::{message::StreamMessage, stream};

use crate::source::jetstream::{self as js_source, SourceError};

/// One subject filter read beside the consumer.
struct Side {
    filter: String,
    /// Every matching message with a sequence in `from..=through`.
    from: u64,
    through: u64,
    found: BTreeMap<u64, StreamMessage>,
}

/// The subjects a worker reads beside its consumer.
pub(super) struct SideReads {
    sides: Vec<Side>,
}

impl SideReads {
    pub(super) fn new(filters: Vec<String>) -> SideReads {
        SideReads {
            sides: filters
                .into_iter()
                .map(|filter| Side {
                    filter,
                    from: 1,
                    through: 0,
                    found: BTreeMap::new(),
                })
                .collect(),
        }
    }

    /// The matching messages with a sequence in `from..=through`, in
    /// stream order. `last` is the stream's last sequence as read before
    /// this call (at least `through`): a subject with no match beyond a
    /// point has none up to `last`.
    pub(super) async fn between(
        &mut self,
        s: &stream::Stream,
        name: &str,
        from: u64,
        through: u64,
        last: u64,
    ) -> Result<Vec<StreamMessage>, SourceError> {
        let mut out = Vec::new();
        if from > through {
            return Ok(out);
        }
        for side in &mut self.sides {
            if from < side.from || from > side.through + 1 {
                side.found.clear();
                side.through = from - 1;
            }
            side.from = from;
            side.found = side.found.split_off(&from);
            while side.through < through {
                match js_source::next_matching(s, name, &side.filter, side.through + 1).await? {
                    Some(m) => {
                        side.through = m.sequence;
                        side.found.insert(m.sequence, m);
                    }
                    None => {
                        side.through = side.through.max(last);
                        break;
                    }
                }
            }
            out.extend(side.found.range(from..=through).map(|(_, m)| m.clone()));
        }
        out.sort_by_key(|m| m.sequence);
        Ok(out)
    }
}
