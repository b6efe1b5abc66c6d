//! Event-time tumbling windows aligned to UTC, and the stream clock.
//!
//! Windows never depend on arrival: an event's window is a function of its
//! `time` alone. Finality is `window_end + lateness <= stream clock`, where
//! the stream clock is the largest accepted event time; it is computed when
//! a view is read (see `crate::query`), so a row's `is_final` never needs
//! rewriting as the clock moves.

use crate::event::time::{DAY_US, MICROS, civil_from_days, days_from_civil};

pub use crate::config::Granularity;

impl Granularity {
    /// `[start, end)` of the window holding `t` (µs since the epoch, UTC).
    pub fn window(self, t: i64) -> (i64, i64) {
        let fixed = |size: i64| {
            let start = t.div_euclid(size) * size;
            (start, start + size)
        };
        match self {
            Granularity::Minute => fixed(60 * MICROS),
            Granularity::Hour => fixed(3600 * MICROS),
            Granularity::Day => fixed(DAY_US),
            Granularity::Month => month_bounds(t),
        }
    }
}

/// `[s, e)` of the UTC calendar month holding `t`.
pub fn month_bounds(t: i64) -> (i64, i64) {
    let days = t.div_euclid(DAY_US);
    let (y, m, _) = civil_from_days(days);
    let start = days_from_civil(y, m, 1) * DAY_US;
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    (start, days_from_civil(ny, nm, 1) * DAY_US)
}

/// Days since the epoch of the first day of the month holding `t` (an Arrow `Date32`).
pub fn month_date32(t: i64) -> i32 {
    let (s, _) = month_bounds(t);
    i32::try_from(s.div_euclid(DAY_US)).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::time::parse_rfc3339_micros as t;

    #[test]
    fn windows_are_utc_aligned() {
        let x = t("2026-02-28T23:59:59.999999Z").unwrap();
        assert_eq!(
            Granularity::Hour.window(x),
            (
                t("2026-02-28T23:00:00Z").unwrap(),
                t("2026-03-01T00:00:00Z").unwrap()
            )
        );
        assert_eq!(
            Granularity::Day.window(x).0,
            t("2026-02-28T00:00:00Z").unwrap()
        );
        assert_eq!(
            Granularity::Month.window(x),
            (
                t("2026-02-01T00:00:00Z").unwrap(),
                t("2026-03-01T00:00:00Z").unwrap()
            )
        );
        assert_eq!(
            Granularity::Month
                .window(t("2024-12-31T23:00:00-02:00").unwrap())
                .0,
            t("2025-01-01T00:00:00Z").unwrap()
        );
        assert_eq!(
            Granularity::Minute
                .window(t("1969-12-31T23:59:30Z").unwrap())
                .0,
            t("1969-12-31T23:59:00Z").unwrap()
        );
    }
}
