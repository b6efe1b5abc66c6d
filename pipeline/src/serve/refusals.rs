//! How often a refused login is logged: the first refusal of a user name,
//! then at most one line per [`EVERY`] saying how many more there were.
//!
//! A password guesser tries thousands of times a second; a WARN line for
//! each filled the log (about 9 MB in 20 s) and buried everything else.
//! The guesses are still refused one by one; only the lines are summed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The shortest time between two lines about one user name.
pub const EVERY: Duration = Duration::from_secs(10);

/// User names remembered at once; past it the table starts over (a
/// guesser trying many names gets a line per name again, no more).
const NAMES: usize = 10_000;

/// Refusals per user name since its last line.
#[derive(Default)]
pub struct Refusals {
    names: Mutex<HashMap<String, (Instant, u64)>>,
}

impl Refusals {
    /// Notes a refused login of `user` at `now`: `Some(n)` when a line
    /// should be logged now, `n` the refusals since the last line that
    /// were not logged.
    pub fn note(&self, user: &str, now: Instant) -> Option<u64> {
        let mut names = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, unlogged)) = names.get_mut(user) {
            if now.duration_since(*at) < EVERY {
                *unlogged += 1;
                return None;
            }
            let n = *unlogged;
            *at = now;
            *unlogged = 0;
            return Some(n);
        }
        if names.len() >= NAMES {
            names.clear();
        }
        names.insert(user.to_owned(), (now, 0));
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_refusals_is_one_line_per_period() {
        let r = Refusals::default();
        let t0 = Instant::now();
        assert_eq!(r.note("ops", t0), Some(0));
        for i in 1..1000 {
            assert_eq!(r.note("ops", t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(r.note("acme", t0), Some(0));
        assert_eq!(r.note("ops", t0 + EVERY), Some(999));
        assert_eq!(r.note("ops", t0 + EVERY + Duration::from_secs(1)), None);
    }
}
