//! The consume loop's decisions, as pure functions of what the broker and
//! the checkpoint said: where a delivered message falls against the
//! stream's next sequence, and what a quiet consumer means (drained,
//! stalled, or the stream forgot what comes next). The loop in
//! [`super::session`] does the I/O and acts on the answers; the answers
//! are tested here without a broker.

use crate::source::jetstream::Held;

/// Where a delivered message falls, the checkpoint's next sequence being
/// `next`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    /// At or below the checkpoint: a redelivery, already processed.
    Redelivered,
    /// The next sequence: process it.
    Next,
    /// It skipped `first..=last` (within the run's target and split): the
    /// batch ends before it, and the hole is refused or recorded.
    Hole { first: u64, last: u64 },
    /// Past the run's target (`stop_at`) or the split: the batch ends
    /// before it.
    Beyond,
}

/// The run's bounds on what one batch may take.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Bounds {
    /// The last sequence the run processes (`--until-seq`, a replay's end).
    pub stop_at: Option<u64>,
    /// A sequence a batch may not cross (the views must be committed there).
    pub split_at: Option<u64>,
    /// The checkpoint's sequence when the batch began: a split already
    /// passed does not cut again.
    pub batch_start: u64,
}

impl Bounds {
    fn split(&self) -> Option<u64> {
        self.split_at.filter(|n| self.batch_start < *n)
    }

    /// `seq`, or the target or the split if it lies before it: as far as
    /// one batch may go.
    pub(super) fn cap(&self, seq: u64) -> u64 {
        self.stop_at
            .into_iter()
            .chain(self.split())
            .fold(seq, u64::min)
    }
}

/// Where the message at `seq` falls when `next` is expected.
pub(super) fn place(seq: u64, next: u64, bounds: &Bounds) -> Place {
    if seq < next {
        return Place::Redelivered;
    }
    if seq > next {
        // Skipped sequences up to the target or the split are a hole even
        // when this message lies beyond them.
        let last = bounds
            .stop_at
            .into_iter()
            .chain(bounds.split())
            .fold(seq - 1, u64::min);
        if next <= last {
            return Place::Hole { first: next, last };
        }
    }
    if bounds.stop_at.is_some_and(|n| seq > n) || bounds.split().is_some_and(|n| seq > n) {
        return Place::Beyond;
    }
    Place::Next
}

/// What the consumer's state said after a quiet wait with nothing in
/// flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ConsumerFacts {
    /// Messages the server still has for the consumer.
    pub pending: u64,
    /// Delivered and not acknowledged.
    pub ack_pending: usize,
    /// A read-only consumer's delivery went missing on the way (unacked
    /// deliveries are not counted as pending: one lost at the tail shows
    /// as delivered, not received).
    pub lost: bool,
}

/// What a quiet wait means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Quiet {
    /// Nothing pending: look at the stream's bounds ([`after_bounds`]).
    CheckStream,
    /// The server has messages that did not arrive; wait `ticks` more.
    Waiting { ticks: u32 },
    /// Still not arriving after [`STALL_TICKS`] waits: recreate the
    /// consumer from the checkpoint.
    Stalled,
    /// The consumer's state could not be read: reconnect.
    Reconnect,
}

/// Quiet waits in a row with messages pending before the consumer is
/// recreated.
pub(super) const STALL_TICKS: u32 = 3;

/// `facts` (`None`: unreadable) after a quiet wait, `ticks` such waits
/// having come before it.
pub(super) fn quiet(facts: Option<ConsumerFacts>, ticks: u32) -> Quiet {
    match facts {
        None => Quiet::Reconnect,
        Some(f) if f.pending == 0 && f.ack_pending == 0 && !f.lost => Quiet::CheckStream,
        Some(_) if ticks + 1 >= STALL_TICKS => Quiet::Stalled,
        Some(_) => Quiet::Waiting { ticks: ticks + 1 },
    }
}

/// What the stream's bounds say of a drained consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tail {
    /// The stream's first sequence is past the next one: it forgot what
    /// comes next; the session start decides (archive, or refuse).
    Forgotten,
    /// The stream holds `from..=to` that the consumer did not deliver: ask
    /// which are gone.
    Check { from: u64, to: u64 },
    /// Nothing more: the run is idle.
    Drained,
}

/// `bounds` (first, last; `None`: unreadable) against `next`, up to the
/// run's target.
pub(super) fn after_bounds(bounds: Option<(u64, u64)>, next: u64, stop_at: Option<u64>) -> Tail {
    match bounds {
        Some((first, _)) if first > next => Tail::Forgotten,
        Some((_, last)) if last >= next => Tail::Check {
            from: next,
            to: stop_at.map_or(last, |n| last.min(n)),
        },
        _ => Tail::Drained,
    }
}

/// The first run of sequences within `from..=to` that the stream no
/// longer holds (below its first sequence, or deleted), if any. A consumer
/// that filters by subject passes over other subjects' sequences as a
/// matter of course; only these are a gap.
pub(super) fn first_gone(held: &Held, from: u64, to: u64) -> Option<(u64, u64)> {
    if from > to {
        return None;
    }
    let is_deleted = |seq: u64| held.deleted.binary_search(&seq).is_ok();
    let start = if from < held.first {
        from
    } else {
        let i = held.deleted.partition_point(|d| *d < from);
        held.deleted.get(i).copied().filter(|d| *d <= to)?
    };
    let mut last = start;
    while last < to {
        let next = last + 1;
        if next < held.first {
            last = (held.first - 1).min(to);
        } else if is_deleted(next) {
            last = next;
        } else {
            break;
        }
    }
    Some((start, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_placed_against_the_next_sequence() {
        let free = Bounds::default();
        assert_eq!(place(4, 5, &free), Place::Redelivered);
        assert_eq!(place(5, 5, &free), Place::Next);
        assert_eq!(place(8, 5, &free), Place::Hole { first: 5, last: 7 });
    }

    #[test]
    fn the_target_and_the_split_bound_a_hole_and_end_the_batch() {
        let to_6 = Bounds {
            stop_at: Some(6),
            ..Bounds::default()
        };
        // The hole stops at the target; past it nothing is a hole.
        assert_eq!(place(9, 5, &to_6), Place::Hole { first: 5, last: 6 });
        assert_eq!(place(7, 7, &to_6), Place::Beyond);
        assert_eq!(place(9, 7, &to_6), Place::Beyond);
        assert_eq!(place(6, 6, &to_6), Place::Next);
        let split = Bounds {
            split_at: Some(10),
            batch_start: 4,
            ..Bounds::default()
        };
        assert_eq!(place(10, 10, &split), Place::Next);
        assert_eq!(place(11, 11, &split), Place::Beyond);
        assert_eq!(place(12, 9, &split), Place::Hole { first: 9, last: 10 });
        // A split the batch started past does not cut it.
        let passed = Bounds {
            batch_start: 10,
            ..split
        };
        assert_eq!(place(11, 11, &passed), Place::Next);
        assert_eq!(
            place(13, 11, &passed),
            Place::Hole {
                first: 11,
                last: 12
            }
        );
    }

    #[test]
    fn a_batch_goes_as_far_as_the_target_and_the_split() {
        let split = Bounds {
            split_at: Some(10),
            batch_start: 4,
            ..Bounds::default()
        };
        // A filtered consumer's next message just past the split: the
        // skipped sequences end at the split, and the message lies beyond.
        assert_eq!(place(11, 9, &split), Place::Hole { first: 9, last: 10 });
        assert_eq!(split.cap(11), 10);
        assert_eq!(split.cap(10), 10);
        assert_eq!(split.cap(7), 7);
        let both = Bounds {
            stop_at: Some(8),
            ..split
        };
        assert_eq!(both.cap(11), 8);
        // A split the batch started past bounds nothing.
        let passed = Bounds {
            batch_start: 10,
            ..split
        };
        assert_eq!(passed.cap(20), 20);
    }

    #[test]
    fn only_sequences_the_stream_forgot_are_gone() {
        let held = Held {
            first: 10,
            last: 40,
            deleted: vec![15, 16, 20, 30],
            ..Held::default()
        };
        assert_eq!(first_gone(&held, 3, 12), Some((3, 9)));
        assert_eq!(first_gone(&held, 3, 7), Some((3, 7)));
        assert_eq!(first_gone(&held, 10, 14), None);
        assert_eq!(first_gone(&held, 11, 40), Some((15, 16)));
        assert_eq!(first_gone(&held, 17, 25), Some((20, 20)));
        assert_eq!(first_gone(&held, 21, 29), None);
        assert_eq!(first_gone(&held, 30, 30), Some((30, 30)));
        assert_eq!(first_gone(&held, 12, 11), None);
        let clean = Held {
            first: 1,
            last: 5,
            ..Held::default()
        };
        assert_eq!(first_gone(&clean, 1, 5), None);
    }

    #[test]
    fn a_quiet_consumer_is_drained_stalled_or_unreadable() {
        let drained = ConsumerFacts {
            pending: 0,
            ack_pending: 0,
            lost: false,
        };
        assert_eq!(quiet(Some(drained), 0), Quiet::CheckStream);
        assert_eq!(quiet(Some(drained), 2), Quiet::CheckStream);
        assert_eq!(quiet(None, 0), Quiet::Reconnect);
        for stuck in [
            ConsumerFacts {
                pending: 3,
                ..drained
            },
            ConsumerFacts {
                ack_pending: 1,
                ..drained
            },
            ConsumerFacts {
                lost: true,
                ..drained
            },
        ] {
            assert_eq!(quiet(Some(stuck), 0), Quiet::Waiting { ticks: 1 });
            assert_eq!(quiet(Some(stuck), 1), Quiet::Waiting { ticks: 2 });
            assert_eq!(quiet(Some(stuck), 2), Quiet::Stalled);
        }
    }

    #[test]
    fn the_stream_bounds_tell_forgotten_undelivered_and_drained() {
        assert_eq!(after_bounds(Some((10, 20)), 5, None), Tail::Forgotten);
        assert_eq!(
            after_bounds(Some((1, 20)), 5, None),
            Tail::Check { from: 5, to: 20 }
        );
        assert_eq!(
            after_bounds(Some((1, 20)), 5, Some(8)),
            Tail::Check { from: 5, to: 8 }
        );
        assert_eq!(after_bounds(Some((1, 4)), 5, None), Tail::Drained);
        assert_eq!(after_bounds(Some((0, 0)), 1, None), Tail::Drained);
        assert_eq!(after_bounds(None, 5, None), Tail::Drained);
    }
}
