//! Event-time tumbling windows aligned to UTC, and the stream clock.
//!
//! Windows never depend on arrival: an event's window is a function of its
//! `time` alone. Finality is `window_end + lateness <= stream clock`, where
//! the stream clock is the largest accepted event time; it is computed when
//! a view is read (see `crate::query`), so a row's `is_final` never needs
//! rewriting as the clock moves.

use crate::event::time::{DAY_US, MICROS, civil_from_days, days_from_civil, days_in_month};

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

/// `[start(k), start(k+1))` holding `t`, where `start(k)` is `anchor`
/// shifted by `k` whole months: the anchor's time of day, its day of
/// month clamped to the month's last day. Each start is computed from the
/// anchor (never from the previous period), so an anchor on the 31st
/// comes back to the 31st after February.
pub fn anchored_period(anchor: i64, t: i64) -> (i64, i64) {
    let (ay, am, ad) = civil_from_days(anchor.div_euclid(DAY_US));
    let time_of_day = anchor.rem_euclid(DAY_US);
    let anchor_month = ay * 12 + (am - 1);
    let start = |k: i64| {
        let m = anchor_month + k;
        let (y, m) = (m.div_euclid(12), m.rem_euclid(12) + 1);
        let d = ad.min(days_in_month(y, m));
        days_from_civil(y, m, d)
            .saturating_mul(DAY_US)
            .saturating_add(time_of_day)
    };
    let (ty, tm, _) = civil_from_days(t.div_euclid(DAY_US));
    // start(k) falls in the k-th month after the anchor's: the period
    // holding t starts in t's month or the one before.
    let mut k = ty * 12 + (tm - 1) - anchor_month;
    if start(k) > t {
        k -= 1;
    }
    (start(k), start(k + 1))
}

/// The billing period holding `t` under `anchor`: the calendar month
/// without one.
pub fn billing_period(anchor: Option<i64>, t: i64) -> (i64, i64) {
    match anchor {
        None => month_bounds(t),
        Some(a) => anchored_period(a, t),
    }
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

    fn period(anchor: &str, at: &str) -> (String, String) {
        use crate::event::time::format_micros;
        let (s, e) = anchored_period(t(anchor).unwrap(), t(at).unwrap());
        (format_micros(s), format_micros(e))
    }

    #[test]
    fn anchored_periods_clamp_the_day_and_come_back() {
        let p = |a, x| period(a, x);
        let anchor = "2026-01-31T10:00:00Z";
        assert_eq!(
            p(anchor, "2026-02-15T00:00:00Z"),
            ("2026-01-31T10:00:00Z".into(), "2026-02-28T10:00:00Z".into())
        );
        assert_eq!(
            p(anchor, "2026-03-01T00:00:00Z"),
            ("2026-02-28T10:00:00Z".into(), "2026-03-31T10:00:00Z".into())
        );
        assert_eq!(
            p(anchor, "2026-04-30T10:00:00Z"),
            ("2026-04-30T10:00:00Z".into(), "2026-05-31T10:00:00Z".into())
        );
        assert_eq!(
            p(anchor, "2028-02-29T09:59:59Z"),
            ("2028-01-31T10:00:00Z".into(), "2028-02-29T10:00:00Z".into())
        );
        // Before the anchor: negative periods.
        assert_eq!(
            p(anchor, "2025-12-31T10:00:00Z"),
            ("2025-12-31T10:00:00Z".into(), "2026-01-31T10:00:00Z".into())
        );
        // 29 February: the 28th in other years, back to the 29th in leap years.
        let leap = "2024-02-29T00:00:00Z";
        assert_eq!(
            p(leap, "2025-02-28T00:00:00Z"),
            ("2025-02-28T00:00:00Z".into(), "2025-03-29T00:00:00Z".into())
        );
        assert_eq!(
            p(leap, "2028-02-29T00:00:00Z"),
            ("2028-02-29T00:00:00Z".into(), "2028-03-29T00:00:00Z".into())
        );
    }

    /// The property the billing periods rest on: for every anchor day of
    /// month and several times of day, across leap and common years,
    /// consecutive periods tile time (each ends where the next starts), and
    /// the period of every instant holds it.
    #[test]
    fn anchored_periods_tile_time() {
        use crate::event::time::{DAY_US, MICROS};
        let times = [0, 1, 10 * 3600 * MICROS, DAY_US - 1];
        for year in [2023, 2024, 2100, 2000] {
            for month in 1..=12 {
                for day in 1..=days_in_month(year, month) {
                    for tod in times {
                        let a = days_from_civil(year, month, day) * DAY_US + tod;
                        // Walk 50 consecutive periods from two years before.
                        let mut at = a - 2 * 366 * DAY_US;
                        let (mut s, mut e) = anchored_period(a, at);
                        assert!(s <= at && at < e);
                        for _ in 0..50 {
                            let (ns, ne) = anchored_period(a, e);
                            assert_eq!(ns, e, "anchor {a}: no gap, no overlap");
                            assert_eq!(anchored_period(a, e - 1), (s, e));
                            assert_eq!(anchored_period(a, s), (s, e));
                            // Within a month of days of 28..=31.
                            assert!((28 * DAY_US..=31 * DAY_US).contains(&(e - s)));
                            // The anchor's time of day, always.
                            assert_eq!(s.rem_euclid(DAY_US), tod);
                            at = e + 17 * 3600 * MICROS;
                            assert_eq!(anchored_period(a, at.min(ne - 1)).0, ns);
                            (s, e) = (ns, ne);
                        }
                        assert_eq!(anchored_period(a, a).0, a, "a period starts at the anchor");
                    }
                }
            }
        }
    }

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
