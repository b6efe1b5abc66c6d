//! A tenant's billing periods: which anchor holds at each instant, and the
//! billing period (an `overages` row's [`period_start`, `period_end`)) an
//! instant belongs to.
//!
//! The anchor of an instant comes from the tenant's subscription fold
//! ([`History::anchor_changes`]). Each anchor starts its own series of
//! periods ([`billing_period`]), and an instant belongs to the period of
//! the anchor that holds at it. Two series can overlap in time (each of
//! their periods is its own row); two periods of two series with the same
//! start are one row whose end is the later of its events' periods' ends
//! (metrics.md; `overages` keeps that). Tenants that never had an anchor
//! are calendar months throughout and keep no timeline.

use super::subscription::History;
use super::window::billing_period;

/// Where an instant's usage goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    /// The row's key: its period's start.
    pub start: i64,
    /// The end of the instant's own period (a row merging two series'
    /// periods ends at the latest of them).
    pub end: i64,
    /// Every instant of [`valid_from`, `valid_to`) is located the same way
    /// (the same anchor, the same period): a cache of the last location.
    pub valid_from: i64,
    pub valid_to: i64,
}

/// A tenant's anchor changes: `(from, anchor)`, sorted, each holding from
/// `from` (inclusive) to the next; before the first, calendar months.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timeline {
    changes: Vec<(i64, Option<i64>)>,
}

impl Timeline {
    pub fn of(history: &History) -> Timeline {
        Timeline {
            changes: history.anchor_changes(),
        }
    }

    /// Calendar months at every instant.
    pub fn is_calendar(&self) -> bool {
        self.changes.iter().all(|(_, a)| a.is_none())
    }

    /// The segment holding `t`: its anchor and [from, to).
    fn segment(&self, t: i64) -> (Option<i64>, i64, i64) {
        let i = self.changes.partition_point(|(from, _)| *from <= t);
        let (from, anchor) = match i.checked_sub(1).and_then(|j| self.changes.get(j)) {
            Some((from, anchor)) => (*from, *anchor),
            None => (i64::MIN, None),
        };
        let to = self.changes.get(i).map_or(i64::MAX, |(f, _)| *f);
        (anchor, from, to)
    }

    /// The billing period `t` belongs to.
    pub fn locate(&self, t: i64) -> Located {
        let (anchor, from, to) = self.segment(t);
        let (start, end) = billing_period(anchor, t);
        Located {
            start,
            end,
            valid_from: start.max(from),
            valid_to: end.min(to),
        }
    }

    /// [`from`, `until`): from the first instant whose anchor differs
    /// between the two timelines to the first after which they agree
    /// again for good (`i64::MAX` if they never do); `None` when they
    /// agree everywhere. An instant outside it has the same anchor, and
    /// so the same billing period, under both.
    pub fn differing_span(&self, other: &Timeline) -> Option<(i64, i64)> {
        let mut points: Vec<i64> = std::iter::once(i64::MIN)
            .chain(self.changes.iter().map(|c| c.0))
            .chain(other.changes.iter().map(|c| c.0))
            .collect();
        points.sort_unstable();
        points.dedup();
        // Both anchors are constant from one point to the next.
        let differs = |p: &i64| self.segment(*p).0 != other.segment(*p).0;
        let first = points.iter().position(differs)?;
        let last = points.iter().rposition(differs).unwrap_or(first);
        let from = points.get(first).copied().unwrap_or(i64::MIN);
        let until = points.get(last + 1).copied().unwrap_or(i64::MAX);
        Some((from, until))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::time::{format_micros, parse_rfc3339_micros as t};

    fn timeline(changes: &[(&str, Option<&str>)]) -> Timeline {
        Timeline {
            changes: changes
                .iter()
                .map(|(from, a)| (t(from).unwrap(), a.map(|a| t(a).unwrap())))
                .collect(),
        }
    }

    fn located(tl: &Timeline, at: &str) -> (String, String) {
        let l = tl.locate(t(at).unwrap());
        assert!(l.valid_from <= t(at).unwrap() && t(at).unwrap() < l.valid_to);
        (format_micros(l.start), format_micros(l.end))
    }

    #[test]
    fn calendar_before_the_first_anchor_and_series_overlap_after_a_change() {
        let tl = timeline(&[
            ("2026-01-15T10:00:00Z", Some("2026-01-15T10:00:00Z")),
            ("2026-02-20T00:00:00Z", Some("2026-02-20T00:00:00Z")),
        ]);
        assert_eq!(
            located(&tl, "2026-01-10T00:00:00Z"),
            ("2026-01-01T00:00:00Z".into(), "2026-02-01T00:00:00Z".into())
        );
        assert_eq!(
            located(&tl, "2026-02-19T23:00:00Z"),
            ("2026-02-15T10:00:00Z".into(), "2026-03-15T10:00:00Z".into())
        );
        // The new series' period starts at the change and overlaps the old one.
        assert_eq!(
            located(&tl, "2026-02-20T00:00:00Z"),
            ("2026-02-20T00:00:00Z".into(), "2026-03-20T00:00:00Z".into())
        );
    }

    #[test]
    fn two_series_can_share_a_start_with_their_own_ends() {
        // Anchored on the 31st until 5 March, then on the 30th: both put
        // 28 February as a start, ending 31 and 30 March (`overages`
        // merges them into one row ending at the later).
        let tl = timeline(&[
            ("2026-01-01T00:00:00Z", Some("2026-01-31T00:00:00Z")),
            ("2026-03-05T00:00:00Z", Some("2026-01-30T00:00:00Z")),
        ]);
        assert_eq!(
            located(&tl, "2026-03-01T00:00:00Z"),
            ("2026-02-28T00:00:00Z".into(), "2026-03-31T00:00:00Z".into())
        );
        assert_eq!(
            located(&tl, "2026-03-10T00:00:00Z"),
            ("2026-02-28T00:00:00Z".into(), "2026-03-30T00:00:00Z".into())
        );
        // The 30th series goes on from its own period end.
        assert_eq!(
            located(&tl, "2026-03-30T00:00:00Z"),
            ("2026-03-30T00:00:00Z".into(), "2026-04-30T00:00:00Z".into())
        );
        // The cache of a location never crosses an anchor change.
        let l = tl.locate(t("2026-03-01T00:00:00Z").unwrap());
        assert_eq!(l.valid_to, t("2026-03-05T00:00:00Z").unwrap());
    }

    #[test]
    fn the_differing_span_ends_where_the_timelines_agree_again() {
        let old = timeline(&[
            ("2025-01-01T00:00:00Z", Some("2025-01-05T00:00:00Z")),
            ("2025-05-01T00:00:00Z", Some("2025-01-20T00:00:00Z")),
        ]);
        let new = timeline(&[
            ("2025-01-01T00:00:00Z", Some("2025-01-05T00:00:00Z")),
            ("2025-03-01T00:00:00Z", Some("2025-01-09T00:00:00Z")),
            ("2025-05-01T00:00:00Z", Some("2025-01-20T00:00:00Z")),
        ]);
        assert_eq!(
            old.differing_span(&new),
            Some((
                t("2025-03-01T00:00:00Z").unwrap(),
                t("2025-05-01T00:00:00Z").unwrap()
            ))
        );
        // A change nothing later overrides differs to the end of time.
        let last = timeline(&[
            ("2025-01-01T00:00:00Z", Some("2025-01-05T00:00:00Z")),
            ("2025-06-01T00:00:00Z", Some("2025-01-09T00:00:00Z")),
        ]);
        let (from, until) = old.differing_span(&last).unwrap();
        assert_eq!(from, t("2025-05-01T00:00:00Z").unwrap());
        assert_eq!(until, i64::MAX);
        assert_eq!(old.differing_span(&old), None);
    }

    #[test]
    fn first_difference_finds_where_the_anchor_changes() {
        let a = timeline(&[("2026-01-15T00:00:00Z", Some("2026-01-15T00:00:00Z"))]);
        let b = timeline(&[
            ("2026-01-15T00:00:00Z", Some("2026-01-15T00:00:00Z")),
            ("2026-03-01T00:00:00Z", None),
        ]);
        assert_eq!(a.differing_span(&a.clone()), None);
        assert_eq!(
            a.differing_span(&b).map(|s| s.0),
            Some(t("2026-03-01T00:00:00Z").unwrap())
        );
        assert_eq!(
            Timeline::default().differing_span(&a).map(|s| s.0),
            Some(t("2026-01-15T00:00:00Z").unwrap())
        );
        assert!(Timeline::default().is_calendar() && !a.is_calendar());
    }
}
