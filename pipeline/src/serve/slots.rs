//! Connections per account: how many logged-in pgwire sessions each account
//! holds, so that no one account (a tenant's portal, a leaked password, a
//! client pool set too large) can take every `--max-connections` slot and
//! lock every other account out of `tally serve`.
//!
//! A session takes one of its account's slots when its password has been
//! checked, and gives it back when it ends. A session over the account's
//! limit is refused with `53300` before it can run anything, as Postgres
//! refuses a role over its `CONNECTION LIMIT`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// The share of `--max-connections` one account may hold when
/// `--max-connections-per-account` is not given: half, so that the other
/// accounts always keep at least the other half.
pub const DEFAULT_ACCOUNT_SHARE: usize = 2;

/// `--max-connections-per-account` when it is not given: the account
/// share of `max_connections`, at least one.
pub fn default_per_account(max_connections: usize) -> usize {
    max_connections.div_ceil(DEFAULT_ACCOUNT_SHARE).max(1)
}

/// The sessions each account holds, and how many it may.
#[derive(Debug)]
pub struct AccountSlots {
    max: usize,
    /// Sessions held, by account name; an account holding none has no entry.
    held: Mutex<HashMap<String, usize>>,
}

/// One session's slot, given back when dropped.
#[derive(Debug)]
pub struct AccountSlot {
    slots: Arc<AccountSlots>,
    user: String,
}

impl AccountSlots {
    pub fn new(max: usize) -> Arc<AccountSlots> {
        Arc::new(AccountSlots {
            max: max.max(1),
            held: Mutex::new(HashMap::new()),
        })
    }

    /// Sessions one account may hold.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A poisoned lock still holds correct counts: every change to them is
    /// one statement that cannot panic halfway.
    fn held(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one of `user`'s slots; `None` when it holds all it may.
    pub fn try_take(self: &Arc<Self>, user: &str) -> Option<AccountSlot> {
        let mut held = self.held();
        let n = held.entry(user.to_owned()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(AccountSlot {
            slots: Arc::clone(self),
            user: user.to_owned(),
        })
    }

    /// Sessions `user` holds now.
    #[cfg(test)]
    fn held_by(&self, user: &str) -> usize {
        self.held().get(user).copied().unwrap_or(0)
    }
}

impl Drop for AccountSlot {
    fn drop(&mut self) {
        let mut held = self.slots.held();
        if let Some(n) = held.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_holds_at_most_its_limit_and_others_are_not_counted() {
        let slots = AccountSlots::new(2);
        let a1 = slots.try_take("acme").unwrap();
        let _a2 = slots.try_take("acme").unwrap();
        assert!(
            slots.try_take("acme").is_none(),
            "a third session is refused"
        );
        let _b = slots.try_take("analyst").unwrap();
        assert_eq!(slots.held_by("acme"), 2);
        assert_eq!(slots.held_by("analyst"), 1);
        drop(a1);
        assert_eq!(slots.held_by("acme"), 1);
        let _a3 = slots.try_take("acme").unwrap();
        assert!(slots.try_take("acme").is_none());
    }

    #[test]
    fn slots_given_back_leave_no_entry() {
        let slots = AccountSlots::new(1);
        drop(slots.try_take("acme").unwrap());
        assert_eq!(slots.held_by("acme"), 0);
        assert!(slots.held().is_empty());
    }

    #[test]
    fn the_default_is_half_of_the_server_and_at_least_one() {
        assert_eq!(default_per_account(64), 32);
        assert_eq!(default_per_account(5), 3);
        assert_eq!(default_per_account(1), 1);
        assert_eq!(default_per_account(0), 1);
        assert_eq!(AccountSlots::new(0).max(), 1);
    }
}
