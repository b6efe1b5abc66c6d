-- top_tenants: the ten largest tenants by current MRR in each currency
-- (as of the stream clock), ties broken by tenant id.
SELECT rank, tenant, name, plan, billing_cycle, status, mrr, currency, revenue_to_date
FROM (
    SELECT
        CAST(ROW_NUMBER() OVER (PARTITION BY currency ORDER BY mrr DESC, tenant) AS BIGINT) AS rank,
        tenant, name, plan, billing_cycle, status, mrr, currency, revenue_to_date
    FROM tenants
    WHERE mrr > 0
)
WHERE rank <= 10
