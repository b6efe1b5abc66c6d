-- over_quota: tenants over a plan limit in the billing period holding the
-- stream clock ("this period" in stream time, never the wall clock; a
-- calendar month, or the anniversary period of an anchored subscription),
-- with what the overage will bill so far.
SELECT
    o.tenant,
    o.period_start,
    o.period_end,
    o.metric,
    o.plan,
    o.used,
    o.included,
    o.overage_quantity,
    o.overage_amount,
    o.currency,
    o.pct_used
FROM overages o
CROSS JOIN _tally_clock k
WHERE o.period_start <= k.stream_clock
    AND k.stream_clock < o.period_end
    AND o.overage_quantity > 0
