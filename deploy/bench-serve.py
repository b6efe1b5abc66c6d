"""Benchmark of `tally serve`, timed as a user would: real clients (psycopg,
ADBC Flight SQL) against the real binary on this machine.

    . deploy/install-nats-server.sh; . deploy/install-clients.sh
    cargo build --profile fast --bin tally
    $TALLY_CLIENT_PYTHON deploy/bench-serve.py --tenants 2000 --months 12

Measures, on the views of a generated SaaS:
  1. one tenant's monthly usage over pgwire (prepared, a random tenant each
     time): p50/p99 latency with 1 client and with 32 concurrent clients;
  2. the whole mrr_waterfall over pgwire: p50/p99;
  3. the whole `usage` view over Flight SQL (ADBC) against `tally sql
     --format parquet` of the same view (rows/s, whole command);
  4. the cost of serving on ingest: `tally run --until-idle` on a fresh
     directory with 32 clients querying it, against the same run with none.
Prints a JSON summary on stdout; progress on stderr.
"""

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psycopg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tenants", type=int, default=2000)
    ap.add_argument("--months", type=int, default=12)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--only-queries", action="store_true",
                    help="measure the point queries and the full scan only (skip transfer and ingest under load)")
    ap.add_argument("--tally", default=os.environ.get("TALLY_BIN", os.path.expanduser("~/.cache/tally-target/fast/tally")))
    ap.add_argument("--work", help="keep the generated stream and views in this directory; "
                    "when its views already exist, measure them again without ingesting")
    args = ap.parse_args()
    tally = args.tally
    nats_bin = os.environ.get("NATS_SERVER_BIN", "nats-server")
    work = args.work or tempfile.mkdtemp(prefix="tally-bench-serve.")
    os.makedirs(work, exist_ok=True)
    reuse = os.path.exists(f"{work}/data/checkpoint.json")
    nport = free_port()
    nats = subprocess.Popen([nats_bin, "-js", "-a", "127.0.0.1", "-p", str(nport), "-sd", f"{work}/js"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [nats]
    try:
        wait_port(nport)
        env = dict(os.environ, TALLY_NATS_URL=f"nats://127.0.0.1:{nport}", RUST_LOG="warn")
        data = f"{work}/data"
        env["TALLY_DATA_DIR"] = data
        ingest_alone = None
        if not reuse:
            log(f"generating {args.tenants} tenants x {args.months} months")
            with open(f"{work}/events.jsonl", "wb") as f:
                subprocess.run([tally, "generate", "--tenants", str(args.tenants), "--months", str(args.months), "--seed", "3"],
                               stdout=f, check=True)
            log("publishing")
            subprocess.run([tally, "publish", f"{work}/events.jsonl"], env=env, check=True, stdout=subprocess.DEVNULL)
            log("ingesting (no clients)")
            t0 = time.monotonic()
            subprocess.run([tally, "run", "--until-idle"], env=env, check=True)
            ingest_alone = time.monotonic() - t0
        events = int(subprocess.run([tally, "sql", "SELECT checkpoint_seq FROM _tally_clock", "--format", "csv"],
                                    env=env, check=True, capture_output=True, text=True).stdout.split()[1])
        usage_rows = int(subprocess.run([tally, "sql", "SELECT count(*) FROM usage", "--format", "csv"],
                                        env=env, check=True, capture_output=True, text=True).stdout.split()[1])
        users = f"{work}/users.toml"
        if not os.path.exists(users):
            subprocess.run([tally, "users", "add", "bench", "--all-tenants", "--users", users],
                           env=dict(env, TALLY_PASSWORD="bench-pw"), check=True, stdout=subprocess.DEVNULL)
        pg, fl, http = free_port(), free_port(), free_port()

        def serve(on):
            p = subprocess.Popen([tally, "serve", "--users", users, "--pg-listen", f"127.0.0.1:{pg}",
                                  "--flight-listen", f"127.0.0.1:{fl}", "--http-listen", f"127.0.0.1:{http}",
                                  # Every client is the one account `bench`: it may hold every connection.
                                  "--max-connections-per-account", "64"],
                                 env=dict(env, TALLY_DATA_DIR=on), stderr=subprocess.DEVNULL)
            procs.append(p)
            wait_port(pg)
            return p

        server = serve(data)
        dsn = f"host=127.0.0.1 port={pg} dbname=tally user=bench password=bench-pw"
        tenants = [f"t{i:04d}" for i in range(1, args.tenants + 1)]
        one = "SELECT metric, window_start, sum FROM usage WHERE tenant = %s AND granularity = 'month' ORDER BY metric, window_start"
        # One tenant's daily usage of one month: the shape of a usage page.
        daily = ("SELECT metric, window_start, sum FROM usage WHERE tenant = %s AND granularity = 'day' "
                 "AND window_start >= %s::timestamptz AND window_start < %s::timestamptz ORDER BY metric, window_start")
        span = subprocess.run([tally, "sql", "SELECT min(window_start), max(window_start) FROM usage WHERE granularity = 'month'",
                               "--format", "csv"], env=env, check=True, capture_output=True, text=True).stdout.split()[1]
        first, last = [x[:7] for x in span.split(",")]
        months = []
        y, m = int(first[:4]), int(first[5:7])
        while f"{y:04d}-{m:02d}" <= last:
            months.append((y, m))
            y, m = (y + 1, 1) if m == 12 else (y, m + 1)

        def params(sql):
            tenant = random.choice(tenants)
            if sql is one:
                return (tenant,)
            y, m = random.choice(months)
            ny, nm = (y + 1, 1) if m == 12 else (y, m + 1)
            return (tenant, f"{y:04d}-{m:02d}-01T00:00:00Z", f"{ny:04d}-{nm:02d}-01T00:00:00Z")

        def one_client(seconds, out, errors, stop_at=None, sql=one):
            with psycopg.connect(dsn, autocommit=True) as c:
                end = time.monotonic() + seconds
                while time.monotonic() < end and not (stop_at and stop_at.is_set()):
                    t = time.monotonic()
                    try:
                        c.execute(sql, params(sql), prepare=True).fetchall()
                        out.append((time.monotonic() - t) * 1000)
                    except psycopg.Error:
                        errors.append(1)

        def measure(sql, name, what):
            """`sql` from 1 client, then from --clients at once: latencies and rates."""
            log(f"1 client, {what}")
            one_client(1, [], [], sql=sql)  # warms the session and page caches
            lat1, err1 = [], []
            one_client(args.seconds / 2, lat1, err1, sql=sql)
            result[f"{name}_1_client"] = {
                "p50_ms": pct(lat1, 50), "p99_ms": pct(lat1, 99), "queries": len(lat1), "errors": len(err1)}
            log(f"{args.clients} clients, {what}")
            latn, errn = [], []
            threads = [threading.Thread(target=one_client, args=(args.seconds, latn, errn, None, sql))
                       for _ in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            result[f"{name}_{args.clients}_clients"] = {
                "p50_ms": pct(latn, 50), "p99_ms": pct(latn, 99), "queries": len(latn),
                "qps": len(latn) / args.seconds, "errors": len(errn)}

        result = {"tenants": args.tenants, "months": args.months, "events": events, "usage_rows": usage_rows}
        one_client(1, [], [])  # the first session after start-up opens the views
        measure(one, "one_tenant_month", "one tenant's monthly usage")
        measure(daily, "one_tenant_days_of_month", "one tenant's daily usage of a month")
        log("full scan of usage")
        scan = []
        with psycopg.connect(dsn, autocommit=True) as c:
            for _ in range(5):
                t = time.monotonic()
                c.execute("SELECT granularity, count(*), sum(sum) FROM usage GROUP BY granularity").fetchall()
                scan.append((time.monotonic() - t) * 1000)
        result["usage_full_scan"] = {"p50_ms": pct(scan, 50), "min_ms": min(scan)}
        log("mrr_waterfall")
        wf = []
        with psycopg.connect(dsn, autocommit=True) as c:
            for _ in range(30):
                t = time.monotonic()
                rows = c.execute("SELECT * FROM mrr_waterfall ORDER BY currency, month").fetchall()
                wf.append((time.monotonic() - t) * 1000)
        result["mrr_waterfall"] = {"p50_ms": pct(wf, 50), "p99_ms": pct(wf, 99), "rows": len(rows)}
        if args.only_queries or reuse:
            print(json.dumps(result, indent=2))
            return

        log("usage over Flight SQL vs tally sql --format parquet")
        import adbc_driver_flightsql.dbapi as adbc
        t = time.monotonic()
        conn = adbc.connect(f"grpc://127.0.0.1:{fl}", db_kwargs={"username": "bench", "password": "bench-pw"})
        cur = conn.cursor()
        cur.execute("SELECT * FROM usage")
        table = cur.fetch_arrow_table()
        flight_s = time.monotonic() - t
        conn.close()
        t = time.monotonic()
        with open(f"{work}/usage.parquet", "wb") as f:
            subprocess.run([tally, "sql", "SELECT * FROM usage", "--format", "parquet"], env=env, stdout=f, check=True)
        parquet_s = time.monotonic() - t
        result["usage_transfer"] = {
            "rows": table.num_rows, "flight_sql_s": flight_s, "flight_sql_rows_per_s": table.num_rows / flight_s,
            "tally_sql_parquet_s": parquet_s, "tally_sql_parquet_rows_per_s": table.num_rows / parquet_s,
            "ratio_flight_over_parquet": (table.num_rows / flight_s) / (table.num_rows / parquet_s)}
        server.terminate()
        server.wait()

        log(f"ingest with {args.clients} clients querying the directory being built")
        data2 = f"{work}/data2"
        t0 = time.monotonic()
        run = subprocess.Popen([tally, "run", "--until-idle"], env=dict(env, TALLY_DATA_DIR=data2))
        procs.append(run)
        while not os.path.exists(f"{data2}/checkpoint.json"):
            time.sleep(0.01)
        server = serve(data2)
        stop = threading.Event()
        lat_i, err_i = [], []
        threads = [threading.Thread(target=one_client, args=(3600, lat_i, err_i, stop)) for _ in range(args.clients)]
        for t in threads:
            t.start()
        run.wait()
        ingest_loaded = time.monotonic() - t0
        stop.set()
        for t in threads:
            t.join()
        result["ingest"] = {
            "alone_s": ingest_alone, "alone_events_per_s": events / ingest_alone,
            "with_clients_s": ingest_loaded, "with_clients_events_per_s": events / ingest_loaded,
            "ratio_with_over_alone": ingest_alone / ingest_loaded,
            "queries_during": len(lat_i), "query_errors_during": len(err_i),
            "p99_ms_during": pct(lat_i, 99) if lat_i else None}
        print(json.dumps(result, indent=2))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


if __name__ == "__main__":
    main()
