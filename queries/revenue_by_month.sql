-- revenue_by_month: collected cash per (month, currency) across tenants.
SELECT
    month,
    currency,
    SUM(paid) AS paid,
    SUM(refunded) AS refunded,
    SUM(net) AS net,
    SUM(invoices_paid) AS invoices_paid,
    CAST(COUNT(DISTINCT CASE WHEN paid > 0 THEN tenant END) AS BIGINT) AS paying_tenants
FROM revenue
GROUP BY month, currency
