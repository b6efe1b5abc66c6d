//! The subscription fold, shared by `overages` and the MRR views.
//!
//! A tenant's subscription events are applied in order of *effective* time
//! (`started`, `plan_changed`: `time`; `cancelled`: `effective_at` if given,
//! else `time`), ties by (`source`, `id`). A tenant has at most one current
//! subscription: `started` replaces it; `plan_changed` and `cancelled` apply
//! only if they name the current one; `cancelled` leaves none and remembers
//! the terms it had and when. The whole history is kept, sorted, so an event
//! that arrives late or out of order gives the same fold as in-order arrival.

use std::sync::Arc;

use crate::event::{BillingCycle, Event, Payload, SubscriptionTerms, Text};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Started(SubscriptionTerms),
    PlanChanged(SubscriptionTerms),
    Cancelled { subscription_id: String },
}

/// One subscription event, positioned by its effective time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubEvent {
    pub effective: i64,
    /// Inline up to 24 bytes (no allocation for the usual `source`/`id`):
    /// the histories hold one per subscription event for good.
    pub source: Text,
    pub id: Text,
    pub change: Change,
}

impl SubEvent {
    /// The subscription event carried by `e`, if any.
    pub fn from_event(e: &Event) -> Option<SubEvent> {
        let (effective, change) = match &e.payload {
            Payload::SubscriptionStarted(t) => (e.time, Change::Started(t.clone())),
            Payload::PlanChanged(t) => (e.time, Change::PlanChanged(t.clone())),
            Payload::SubscriptionCancelled {
                subscription_id,
                effective_at,
                ..
            } => (
                effective_at.unwrap_or(e.time),
                Change::Cancelled {
                    subscription_id: subscription_id.clone(),
                },
            ),
            _ => return None,
        };
        Some(SubEvent {
            effective,
            source: e.source.clone(),
            id: e.id.clone(),
            change,
        })
    }

    fn order_key(&self) -> (i64, &str, &str) {
        (self.effective, &self.source, &self.id)
    }
}

/// A subscription as the fold sees it: the terms of its last change,
/// borrowed from the history (folding copies nothing), its trial end,
/// which a change keeps, and its billing anchor, which a change replaces
/// only when it carries one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Current<'a> {
    pub terms: &'a SubscriptionTerms,
    pub trial_ends_at: Option<i64>,
    /// `None`: calendar months.
    pub anchor: Option<i64>,
}

/// What the fold says at an instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FoldState<'a> {
    /// The current subscription (plan, price, ... as last changed).
    pub current: Option<Current<'a>>,
    /// The last cancelled subscription, and when it ended.
    pub last_cancel: Option<(Current<'a>, i64)>,
    /// Whether a subscription was ever current before the instant (a
    /// `started` took effect): a tenant that had one and has none now is
    /// `cancelled`. A `cancelled` or `plan_changed` of a subscription that
    /// was never current changes nothing, so it does not count.
    pub had_one: bool,
}

/// One tenant's subscription history, sorted by effective time.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Shared: the operators that fold subscriptions hold the same events
    /// (built once per event by the processor), not a copy each.
    events: Vec<Arc<SubEvent>>,
}

impl History {
    pub fn insert(&mut self, e: impl Into<Arc<SubEvent>>) {
        let e: Arc<SubEvent> = e.into();
        let pos = self
            .events
            .partition_point(|x| x.order_key() < e.order_key());
        self.events.insert(pos, e);
    }

    /// Takes out the event with `e`'s effective time, `source` and `id`
    /// (a void of it); false if there is none.
    pub fn remove(&mut self, e: &SubEvent) -> bool {
        let pos = self
            .events
            .partition_point(|x| x.order_key() < e.order_key());
        if self
            .events
            .get(pos)
            .is_some_and(|x| x.order_key() == e.order_key())
        {
            self.events.remove(pos);
            true
        } else {
            false
        }
    }

    /// The events, by effective time.
    pub fn events(&self) -> impl Iterator<Item = &SubEvent> {
        self.events.iter().map(|e| &**e)
    }

    /// Folds the events effective strictly before `t`.
    pub fn fold_before(&self, t: i64) -> FoldState<'_> {
        let mut c = self.cursor();
        c.advance_to(t);
        c.state
    }

    /// A fold that moves forward in time: walking N instants in order costs
    /// one pass over the history, not N.
    pub fn cursor(&self) -> Cursor<'_> {
        Cursor {
            events: &self.events,
            pos: 0,
            state: FoldState::default(),
        }
    }

    /// Where the billing anchor changes, in time order: each `(from,
    /// anchor)` holds for the instants at or after `from` up to the next
    /// one; before the first, calendar months. The anchor of an instant is
    /// the current subscription's, or with none current the last
    /// cancelled one's (metrics.md, "billing period of an instant").
    pub fn anchor_changes(&self) -> Vec<(i64, Option<i64>)> {
        let mut out: Vec<(i64, Option<i64>)> = Vec::new();
        let mut c = self.cursor();
        let mut i = 0;
        while let Some(e) = self.events.get(i) {
            let at = e.effective;
            // Every event effective at `at` applies to `at` itself.
            c.advance_to(at.saturating_add(1));
            if c.pos <= i {
                // Effective at the last representable instant: it applies to
                // no instant a view can hold.
                break;
            }
            i = c.pos;
            let anchor = match (&c.state.current, &c.state.last_cancel) {
                (Some(cur), _) => cur.anchor,
                (None, Some((cancelled, _))) => cancelled.anchor,
                (None, None) => None,
            };
            let before = out.last().and_then(|(_, a)| *a);
            if anchor != before {
                out.push((at, anchor));
            }
        }
        out
    }

    /// The first effective time strictly after `t`, if any.
    pub fn next_effective_after(&self, t: i64) -> Option<i64> {
        let i = self.events.partition_point(|e| e.effective <= t);
        self.events.get(i).map(|e| e.effective)
    }
}

/// An incremental fold over a [`History`]; see [`History::cursor`].
pub struct Cursor<'a> {
    events: &'a [Arc<SubEvent>],
    pos: usize,
    pub state: FoldState<'a>,
}

impl<'a> Cursor<'a> {
    /// Applies the events effective strictly before `t` not applied yet.
    pub fn advance_to(&mut self, t: i64) -> &FoldState<'a> {
        let s = &mut self.state;
        while let Some(e) = self.events.get(self.pos)
            && e.effective < t
        {
            self.pos += 1;
            match &e.change {
                Change::Started(terms) => {
                    s.had_one = true;
                    s.current = Some(Current {
                        terms,
                        trial_ends_at: terms.trial_ends_at,
                        anchor: terms.billing_anchor,
                    });
                }
                Change::PlanChanged(terms) => {
                    if let Some(cur) = &mut s.current
                        && cur.terms.subscription_id == terms.subscription_id
                    {
                        // A change keeps the trial end of the subscription it
                        // changes, and its anchor unless it brings one.
                        cur.terms = terms;
                        cur.anchor = terms.billing_anchor.or(cur.anchor);
                    }
                }
                Change::Cancelled { subscription_id } => {
                    if s.current
                        .is_some_and(|c| c.terms.subscription_id == subscription_id)
                    {
                        s.last_cancel = s.current.take().map(|c| (c, e.effective));
                    }
                }
            }
        }
        &self.state
    }
}

/// A price per billing cycle normalised to a month, in minor units:
/// yearly prices are divided by 12 and rounded half away from zero.
pub fn monthly(terms: &SubscriptionTerms) -> i64 {
    match terms.billing_cycle {
        BillingCycle::Monthly => terms.price,
        BillingCycle::Yearly => {
            let (q, r) = (terms.price / 12, terms.price % 12);
            if r.abs() * 2 >= 12 {
                q + terms.price.signum()
            } else {
                q
            }
        }
    }
}

impl FoldState<'_> {
    /// MRR at the instant `t` this state was folded to, in `currency`:
    /// the current subscription's monthly price if it is in that currency
    /// and its trial (if any) ended before `t`; else 0.
    pub fn mrr_at(&self, t: i64, currency: &str) -> i64 {
        match &self.current {
            Some(c)
                if c.terms.currency == currency && c.trial_ends_at.is_none_or(|end| end < t) =>
            {
                monthly(c.terms)
            }
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(id: &str, plan: &str) -> SubscriptionTerms {
        SubscriptionTerms {
            subscription_id: id.into(),
            plan: plan.into(),
            billing_cycle: BillingCycle::Monthly,
            price: 100,
            currency: "USD".into(),
            trial_ends_at: None,
            billing_anchor: None,
        }
    }

    fn ev(t: i64, id: &str, change: Change) -> SubEvent {
        SubEvent {
            effective: t,
            source: "s".into(),
            id: id.into(),
            change,
        }
    }

    #[test]
    fn fold_applies_in_effective_order_whatever_the_arrival() {
        let mut h = History::default();
        h.insert(ev(20, "b", Change::PlanChanged(terms("sub1", "pro"))));
        h.insert(ev(10, "a", Change::Started(terms("sub1", "starter"))));
        h.insert(ev(
            30,
            "c",
            Change::Cancelled {
                subscription_id: "sub1".into(),
            },
        ));
        assert_eq!(h.fold_before(10).current, None);
        assert_eq!(h.fold_before(15).current.unwrap().terms.plan, "starter");
        assert_eq!(h.fold_before(25).current.unwrap().terms.plan, "pro");
        let after = h.fold_before(31);
        assert_eq!(after.current, None);
        assert_eq!(
            after.last_cancel.map(|(t, at)| (t.terms.plan.as_str(), at)),
            Some(("pro", 30))
        );
    }

    #[test]
    fn changes_naming_another_subscription_change_nothing() {
        let mut h = History::default();
        h.insert(ev(10, "a", Change::Started(terms("sub1", "starter"))));
        h.insert(ev(20, "b", Change::Started(terms("sub2", "pro"))));
        h.insert(ev(
            30,
            "c",
            Change::Cancelled {
                subscription_id: "sub1".into(),
            },
        ));
        h.insert(ev(
            40,
            "d",
            Change::PlanChanged(terms("sub1", "enterprise")),
        ));
        let s = h.fold_before(50);
        assert_eq!(s.current.unwrap().terms.plan, "pro");
        assert_eq!(s.last_cancel, None);
    }

    #[test]
    fn yearly_prices_round_half_away_from_zero() {
        let y = |price| {
            monthly(&SubscriptionTerms {
                billing_cycle: BillingCycle::Yearly,
                price,
                ..terms("s", "p")
            })
        };
        assert_eq!(y(1206), 101); // 100.5
        assert_eq!(y(1194), 100); // 99.5
        assert_eq!(y(1205), 100); // 100.41..
        assert_eq!(y(1211), 101); // 100.91..
        assert_eq!(y(12), 1);
        assert_eq!(y(6), 1); // 0.5
        assert_eq!(y(5), 0);
    }

    #[test]
    fn trials_are_worth_nothing_until_they_end() {
        let mut h = History::default();
        let mut t = terms("sub1", "pro");
        t.trial_ends_at = Some(100);
        h.insert(ev(10, "a", Change::Started(t)));
        h.insert(ev(50, "b", Change::PlanChanged(terms("sub1", "max"))));
        assert_eq!(h.fold_before(100).mrr_at(100, "USD"), 0);
        assert_eq!(h.fold_before(101).mrr_at(101, "USD"), 100);
        assert_eq!(h.fold_before(101).mrr_at(101, "EUR"), 0);
        let mut c = h.cursor();
        assert_eq!(c.advance_to(20).mrr_at(20, "USD"), 0);
        assert_eq!(c.advance_to(200).mrr_at(200, "USD"), 100);
        assert_eq!(h.next_effective_after(10), Some(50));
        assert_eq!(h.next_effective_after(50), None);
    }
}
