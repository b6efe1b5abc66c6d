-- invoice_preview: every tenant's open billing period (the one holding
-- the stream clock) as its invoice will show it: the period's bounds, each
-- metric's usage against the plan and the overage so far. Anchored
-- subscriptions bill from their anchor, others by calendar month.
SELECT
    o.tenant,
    o.period_start,
    o.period_end,
    o.plan,
    o.metric,
    o.aggregation,
    o.used,
    o.included,
    o.overage_amount,
    o.currency
FROM overages o
CROSS JOIN _tally_clock k
WHERE o.period_start <= k.stream_clock
    AND k.stream_clock < o.period_end
