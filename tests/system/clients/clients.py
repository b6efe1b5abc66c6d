"""Real clients of `tally serve`, driven by the system tests (tests/system/serve.rs).

Usage: python clients.py KIND < spec.json > result.json, where KIND is
psycopg, loop, adbc, flight, http or prometheus. Every value comes back as text (None for
NULL) so the Rust side compares exact digits; errors come back as data
(SQLSTATE or gRPC status and message), never as a crash of this script.
"""

import json
import sys


def psycopg_run(spec):
    import psycopg

    out = []
    conn = psycopg.connect(spec["dsn"], autocommit=spec.get("autocommit", False))
    for step in spec["steps"]:
        try:
            if step.get("cursor"):
                with conn.cursor(name=step["cursor"]) as cur:
                    cur.itersize = step.get("itersize", 7)
                    cur.execute(step["sql"], step.get("params"))
                    rows = list(cur)
                    cols = [d.name for d in cur.description]
            else:
                cur = conn.cursor(binary=step.get("binary", False))
                cur.execute(step["sql"], step.get("params"), prepare=step.get("prepare"))
                rows = cur.fetchall() if cur.description else []
                cols = [d.name for d in cur.description] if cur.description else []
            out.append({"columns": cols, "rows": [[None if v is None else str(v) for v in r] for r in rows]})
        except psycopg.Error as e:
            out.append({"error": {"sqlstate": e.sqlstate, "message": str(e)}})
            conn.rollback()
    conn.close()
    return out


def loop_run(spec):
    """Runs one query over and over for `seconds`, on one connection: every
    answer (or error) in order, with the time it took."""
    import time

    import psycopg

    conn = psycopg.connect(spec["dsn"], autocommit=True)
    out = []
    end = time.monotonic() + spec["seconds"]
    while time.monotonic() < end:
        start = time.monotonic()
        try:
            row = conn.execute(spec["sql"]).fetchone()
            out.append({"row": [None if v is None else str(v) for v in row], "ms": (time.monotonic() - start) * 1000})
        except psycopg.Error as e:
            out.append({"error": f"{e.sqlstate}: {e}"})
    conn.close()
    return out


def adbc_run(spec):
    import adbc_driver_flightsql.dbapi as adbc
    import adbc_driver_manager

    out = {"steps": []}
    conn = adbc.connect(spec["uri"], db_kwargs={"username": spec["user"], "password": spec["password"]})
    cur = conn.cursor()
    for step in spec["steps"]:
        try:
            cur.execute(step["sql"])
            table = cur.fetch_arrow_table()
            out["steps"].append({
                "schema": [f"{f.name}: {f.type}{'' if f.nullable else ' not null'}" for f in table.schema],
                "rows": [[None if v is None else str(v) for v in row.values()] for row in table.to_pylist()],
            })
        except adbc_driver_manager.Error as e:
            out["steps"].append({"error": str(e)})
    if spec.get("table_schema"):
        s = conn.adbc_get_table_schema(spec["table_schema"])
        out["table_schema"] = [f"{f.name}: {f.type}{'' if f.nullable else ' not null'}" for f in s]
    if spec.get("objects"):
        objs = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        out["tables"] = sorted(
            t["table_name"] for c in objs for s in (c["catalog_db_schemas"] or []) for t in (s["db_schema_tables"] or [])
        )
    conn.close()
    return out


def flight_run(spec):
    import pyarrow.flight as fl

    client = fl.FlightClient(spec["uri"])
    out = {}
    try:
        key, value = client.authenticate_basic_token(spec["user"], spec["password"])
        out["token"] = value.decode() if isinstance(value, bytes) else value
        out["header"] = key.decode() if isinstance(key, bytes) else key
    except fl.FlightError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def http_run(spec):
    import base64
    import urllib.parse
    import urllib.request

    url = urllib.parse.urlsplit(spec["url"])
    req = urllib.request.Request(url._replace(netloc=url.hostname + (f":{url.port}" if url.port else "")).geturl())
    if url.username:
        token = base64.b64encode(f"{url.username}:{url.password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        resp = urllib.request.urlopen(req, timeout=10)
        return {"status": resp.status, "body": resp.read().decode()}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": e.read().decode()}


def prometheus_run(spec):
    import base64
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(spec["url"])
    if spec.get("user"):
        token = base64.b64encode(f"{spec['user']}:{spec['password']}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        body = urllib.request.urlopen(req, timeout=10).read().decode()
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": e.read().decode()}
    samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return {"status": 200, "samples": samples}


if __name__ == "__main__":
    kind = sys.argv[1]
    spec = json.load(sys.stdin)
    result = {"psycopg": psycopg_run, "loop": loop_run, "adbc": adbc_run, "flight": flight_run, "prometheus": prometheus_run, "http": http_run}[kind](spec)
    json.dump(result, sys.stdout)
