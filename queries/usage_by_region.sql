-- usage_by_region: each grouped metric's monthly usage per group (the
-- meter's `group_by`, such as `region`), over every tenant, for the last
-- three months before the stream clock's.
SELECT
    d.metric,
    d."group",
    d.window_start,
    CAST(SUM(d.events) AS BIGINT) AS events,
    SUM(d."sum") AS total,
    CAST(COUNT(*) AS BIGINT) AS tenants
FROM usage_by_dimension d
CROSS JOIN _tally_clock k
WHERE d.granularity = 'month'
    AND d.window_start >= date_trunc('month', k.stream_clock) - INTERVAL '3 months'
    AND d.window_start < date_trunc('month', k.stream_clock)
GROUP BY d.metric, d."group", d.window_start
