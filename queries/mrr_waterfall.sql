-- mrr_waterfall: the MRR bridge per (month, currency): start + new +
-- expansion + reactivation - contraction - churned = end, with the number
-- of tenants behind each movement.
SELECT
    month,
    currency,
    SUM(mrr_start) AS mrr_start,
    SUM(new_mrr) AS new_mrr,
    SUM(expansion_mrr) AS expansion_mrr,
    SUM(reactivation_mrr) AS reactivation_mrr,
    -SUM(contraction_mrr) AS contraction_mrr,
    -SUM(churned_mrr) AS churned_mrr,
    SUM(new_mrr) + SUM(expansion_mrr) + SUM(reactivation_mrr)
        - SUM(contraction_mrr) - SUM(churned_mrr) AS net_new_mrr,
    SUM(mrr_end) AS mrr_end,
    CAST(SUM(CASE WHEN movement = 'new' THEN 1 ELSE 0 END) AS BIGINT) AS new_tenants,
    CAST(SUM(CASE WHEN movement = 'reactivation' THEN 1 ELSE 0 END) AS BIGINT) AS reactivated_tenants,
    CAST(SUM(CASE WHEN movement = 'churn' THEN 1 ELSE 0 END) AS BIGINT) AS churned_tenants,
    CAST(SUM(CASE WHEN mrr_end > 0 THEN 1 ELSE 0 END) AS BIGINT) AS paying_tenants
FROM mrr
GROUP BY month, currency
