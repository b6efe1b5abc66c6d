-- over_quota: tenants over a plan limit in the month holding the stream
-- clock ("this month" in stream time, never the wall clock), with what the
-- overage will bill so far.
SELECT
    o.tenant,
    o.period,
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
WHERE o.period = CAST(date_trunc('month', k.stream_clock) AS DATE)
    AND o.overage_quantity > 0
