-- churn: company-level MRR churn per (month, currency), over `mrr`
-- (metrics.md, "Company-level metrics"). Rates are Float64, NULL where the
-- denominator is 0. net_mrr_churn_rate subtracts expansion and
-- reactivation, as ChartMogul does; it is negative when they outweigh churn.
SELECT
    month,
    currency,
    CAST(SUM(CASE WHEN mrr_start > 0 THEN 1 ELSE 0 END) AS BIGINT) AS customers_start,
    CAST(SUM(CASE WHEN movement = 'churn' THEN 1 ELSE 0 END) AS BIGINT) AS customers_churned,
    CAST(SUM(CASE WHEN movement = 'churn' THEN 1 ELSE 0 END) AS DOUBLE)
        / NULLIF(SUM(CASE WHEN mrr_start > 0 THEN 1 ELSE 0 END), 0) AS logo_churn_rate,
    SUM(mrr_start) AS mrr_start,
    SUM(mrr_end) AS mrr_end,
    SUM(new_mrr) AS new_mrr,
    SUM(expansion_mrr) AS expansion_mrr,
    SUM(contraction_mrr) AS contraction_mrr,
    SUM(churned_mrr) AS churned_mrr,
    SUM(reactivation_mrr) AS reactivation_mrr,
    CAST(SUM(churned_mrr) + SUM(contraction_mrr) AS DOUBLE)
        / NULLIF(SUM(mrr_start), 0) AS gross_mrr_churn_rate,
    CAST(SUM(churned_mrr) + SUM(contraction_mrr) - SUM(expansion_mrr) - SUM(reactivation_mrr) AS DOUBLE)
        / NULLIF(SUM(mrr_start), 0) AS net_mrr_churn_rate,
    CAST(SUM(mrr_start) + SUM(expansion_mrr) - SUM(contraction_mrr) - SUM(churned_mrr) AS DOUBLE)
        / NULLIF(SUM(mrr_start), 0) AS nrr
FROM mrr
GROUP BY month, currency
