#!/usr/bin/env python3
"""DuckDB building Tally's `usage` view from a data directory's `events`
archive: the yardstick `tally replay` from the archive is measured against
(docs/benchmarks.md). Hour, day and month windows per (tenant, metric), with
events, sum, min, max and last (the quantity of the greatest event by
(time, source, id)), quantities as exact DECIMAL(38, 9).

    python3 deploy/bench-duckdb-usage.py DATA_DIR

Prints one JSON line: rows built, seconds for the query, and seconds for
the whole process (the number to compare with a whole `tally replay`).
Needs `pip install duckdb`.
"""
import json
import sys
import time

started = time.time()
import duckdb  # noqa: E402  (its import is part of the whole command's time)

data = sys.argv[1]
con = duckdb.connect()
con.execute("SET TimeZone = 'UTC'")
query = f"""
CREATE TABLE usage AS
WITH u AS (
  SELECT tenant,
         json_extract_string(data, '$.metric') AS metric,
         CAST(json_extract_string(data, '$.quantity') AS DECIMAL(38, 9)) AS q,
         time, source, id
  FROM read_parquet('{data}/views/events/*.parquet')
  WHERE type = 'usage.recorded'
), w AS (
  SELECT 'hour' AS granularity, date_trunc('hour', time) AS window_start, * FROM u
  UNION ALL SELECT 'day', date_trunc('day', time), * FROM u
  UNION ALL SELECT 'month', date_trunc('month', time), * FROM u
)
SELECT tenant, metric, granularity, window_start,
       count(*) AS events, sum(q) AS sum, min(q) AS min, max(q) AS max,
       arg_max(q, struct_pack(t := time, s := source, i := id)) AS last
FROM w
GROUP BY tenant, metric, granularity, window_start
"""
t = time.time()
con.execute(query)
query_secs = time.time() - t
rows = con.execute("SELECT count(*) FROM usage").fetchone()[0]
print(json.dumps({"rows": rows, "query_secs": query_secs, "process_secs": time.time() - started}))
