-- ltv: customer lifetime value per (month, currency), over `mrr` and `churn`
-- (metrics.md). arpa = MRR at month end per paying customer;
-- avg_logo_churn_6m = mean of the non-NULL logo_churn_rate of the six
-- months before this one (current month excluded; months without rows in
-- that currency have no rate and do not count); ltv = arpa / that mean,
-- NULL when it is NULL or 0.
WITH month_end AS (
    SELECT
        month,
        currency,
        CAST(SUM(CASE WHEN mrr_end > 0 THEN 1 ELSE 0 END) AS BIGINT) AS customers_end,
        CAST(SUM(mrr_end) AS DOUBLE)
            / NULLIF(SUM(CASE WHEN mrr_end > 0 THEN 1 ELSE 0 END), 0) AS arpa
    FROM mrr
    GROUP BY month, currency
),
trailing AS (
    -- The mean is taken in exact decimals: a sum of floats depends on the
    -- order rows arrive in, and the view must not.
    SELECT
        m.month,
        m.currency,
        CAST(AVG(CAST(c.logo_churn_rate AS DECIMAL(38, 18))) AS DOUBLE) AS avg_logo_churn_6m
    FROM month_end m
    LEFT JOIN churn c
        ON c.currency = m.currency
        AND c.month < m.month
        AND c.month >= m.month - INTERVAL '6 months'
    GROUP BY m.month, m.currency
)
SELECT
    m.month,
    m.currency,
    m.customers_end,
    m.arpa,
    t.avg_logo_churn_6m,
    m.arpa / NULLIF(t.avg_logo_churn_6m, 0) AS ltv
FROM month_end m
JOIN trailing t ON t.month = m.month AND t.currency = m.currency
