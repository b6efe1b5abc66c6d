//! The subscription fold, shared by `overages` and the MRR views.
//!
//! A tenant's subscription events are applied in order of *effective* time
//! (`started`, `plan_changed`: `time`; `cancelled`: `effective_at` if given,
//! else `time`), ties by (`source`, `id`). A tenant has at most one current
//! subscription: `started` replaces it; `plan_changed` and `cancelled` apply
//! only if they name the current one; `cancelled` leaves none and remembers
//! the terms it had and when. The whole history is kept, sorted, so an event
//! that arrives late or out of order gives the same fold as in-order arrival.

use crate::event::{Event, Payload, SubscriptionTerms};

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
    pub source: String,
    pub id: String,
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

/// What the fold says at an instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FoldState {
    /// The current subscription's terms (plan, price, ... as last changed).
    pub current: Option<SubscriptionTerms>,
    /// The terms the last cancelled subscription had, and when it ended.
    pub last_cancel: Option<(SubscriptionTerms, i64)>,
    /// Whether any subscription event is effective before the instant.
    pub any: bool,
}

/// One tenant's subscription history, sorted by effective time.
#[derive(Debug, Clone, Default)]
pub struct History {
    events: Vec<SubEvent>,
}

impl History {
    pub fn insert(&mut self, e: SubEvent) {
        let pos = self
            .events
            .partition_point(|x| x.order_key() < e.order_key());
        self.events.insert(pos, e);
    }

    pub fn events(&self) -> &[SubEvent] {
        &self.events
    }

    /// Folds the events effective strictly before `t`.
    pub fn fold_before(&self, t: i64) -> FoldState {
        let mut s = FoldState::default();
        for e in self.events.iter().take_while(|e| e.effective < t) {
            s.any = true;
            match &e.change {
                Change::Started(terms) => s.current = Some(terms.clone()),
                Change::PlanChanged(terms) => {
                    if let Some(cur) = &mut s.current
                        && cur.subscription_id == terms.subscription_id
                    {
                        // A change keeps the trial end of the subscription it changes.
                        let trial = cur.trial_ends_at;
                        *cur = terms.clone();
                        cur.trial_ends_at = trial;
                    }
                }
                Change::Cancelled { subscription_id } => {
                    if s.current
                        .as_ref()
                        .is_some_and(|c| &c.subscription_id == subscription_id)
                    {
                        s.last_cancel = s.current.take().map(|c| (c, e.effective));
                    }
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::BillingCycle;

    fn terms(id: &str, plan: &str) -> SubscriptionTerms {
        SubscriptionTerms {
            subscription_id: id.into(),
            plan: plan.into(),
            billing_cycle: BillingCycle::Monthly,
            price: 100,
            currency: "USD".into(),
            trial_ends_at: None,
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
        assert_eq!(h.fold_before(15).current.unwrap().plan, "starter");
        assert_eq!(h.fold_before(25).current.unwrap().plan, "pro");
        let after = h.fold_before(31);
        assert_eq!(after.current, None);
        assert_eq!(
            after.last_cancel.map(|(t, at)| (t.plan, at)),
            Some(("pro".to_string(), 30))
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
        assert_eq!(s.current.unwrap().plan, "pro");
        assert_eq!(s.last_cancel, None);
    }
}
