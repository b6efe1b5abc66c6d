"""Real clients of `tally serve`, driven by the system tests (tests/system/serve.rs).

Usage: python clients.py KIND < spec.json > result.json, where KIND is
psycopg, loop, adbc, flight, http, prometheus, narrowed, cancel,
protocol, scram_salt or fuzz. Every value comes back as text (None for
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
    """One GET of `url`; with `parallel`: N, that many at once, their
    statuses and bodies in a list."""
    import base64
    import urllib.parse
    import urllib.request

    if spec.get("loops"):
        return keepalive_loops(spec)
    if spec.get("parallel"):
        from concurrent.futures import ThreadPoolExecutor

        one = dict(spec, parallel=None)
        with ThreadPoolExecutor(spec["parallel"]) as pool:
            return list(pool.map(lambda _: http_run(one), range(spec["parallel"])))

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


def keepalive_loops(spec):
    """`loops` threads, each sending GETs of `url` for `seconds` on one
    kept-alive connection (a new one when the server closes it): the count
    of each status."""
    import base64
    import http.client
    import threading
    import urllib.parse

    url = urllib.parse.urlsplit(spec["url"])
    token = base64.b64encode(f"{url.username}:{url.password}".encode()).decode()
    counts = {}
    lock = threading.Lock()

    import time

    end = time.monotonic() + spec["seconds"]

    def loop():
        conn = None
        while time.monotonic() < end:
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=20)
                conn.request("GET", url.path, headers={"Authorization": f"Basic {token}"})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except Exception:
                status = 0
                conn = None
            with lock:
                counts[str(status)] = counts.get(str(status), 0) + 1

    threads = [threading.Thread(target=loop) for _ in range(spec["loops"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts


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


def narrowed_run(spec):
    """Declares a cursor on an all-tenant session, fetches some rows, runs
    `between` (a command that narrows the account), waits, and fetches the
    rest: the rows before, and the rest or its error."""
    import subprocess
    import time

    import psycopg

    conn = psycopg.connect(spec["dsn"], autocommit=False)
    cur = conn.cursor()
    cur.execute(spec["declare"])
    cur.execute("FETCH 2 FROM c")
    first = [[None if v is None else str(v) for v in r] for r in cur.fetchall()]
    subprocess.run(spec["between"], check=True, env=spec.get("env"), capture_output=True)
    time.sleep(spec.get("wait", 0.5))
    out = {"first": first}
    try:
        cur.execute("FETCH ALL FROM c")
        out["after"] = [[None if v is None else str(v) for v in r] for r in cur.fetchall()]
    except psycopg.Error as e:
        out["error"] = {"sqlstate": e.sqlstate, "message": str(e)}
    conn.close()
    return out


def cancel_run(spec):
    """Runs `sql` and cancels it after `after` seconds with psycopg's
    `cancel()` (a CancelRequest with the session's key, on a connection of
    its own); then runs `then` on the same session. The error and the
    seconds the statement took, and the rows of `then`."""
    import threading
    import time

    import psycopg

    conn = psycopg.connect(spec["dsn"], autocommit=True)
    threading.Timer(spec["after"], conn.cancel).start()
    started = time.monotonic()
    out = {}
    try:
        conn.execute(spec["sql"]).fetchall()
    except psycopg.Error as e:
        out["error"] = {"sqlstate": e.sqlstate, "message": str(e)}
    out["seconds"] = time.monotonic() - started
    out["then"] = [[None if v is None else str(v) for v in r] for r in conn.execute(spec["then"]).fetchall()]
    conn.close()
    return out


def protocol_run(spec):
    """Extended-protocol messages as a driver would not send them, through
    libpq's low-level calls: each step's SQLSTATE ("ok" on success), then
    whether the session still answers."""
    import psycopg
    from psycopg import pq

    conn = psycopg.connect(spec["dsn"], autocommit=True)
    pg = conn.pgconn

    def state(res):
        if res.status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
            return "ok"
        code = res.error_field(pq.DiagnosticField.SQLSTATE)
        return code.decode() if code else "?"

    out = []
    for step in spec["steps"]:
        name = step.get("name", "").encode()
        if step["do"] == "prepare":
            res = pg.prepare(name, step["sql"].encode())
        elif step["do"] == "execute":
            params = [p.encode() for p in step["params"]]
            res = pg.exec_prepared(name, params, param_formats=step.get("formats"))
        else:
            res = pg.exec_(step["sql"].encode())
        out.append(state(res))
    alive = conn.execute("SELECT 1").fetchone()[0] == 1
    conn.close()
    return {"states": out, "alive": alive}


def scram_salt_run(spec):
    """The salt and iteration count the server's SCRAM first message gives
    `user`, read off the wire (no password needed)."""
    import base64
    import os
    import socket
    import struct

    sock = socket.create_connection((spec["host"], spec["port"]), timeout=10)
    params = b"user\0" + spec["user"].encode() + b"\0database\0tally\0\0"
    sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)

    def message():
        head = b""
        while len(head) < 5:
            head += sock.recv(5 - len(head))
        kind, length = head[:1], struct.unpack("!i", head[1:])[0]
        body = b""
        while len(body) < length - 4:
            body += sock.recv(length - 4 - len(body))
        return kind, body

    kind, body = message()
    if kind != b"R" or struct.unpack("!i", body[:4])[0] != 10:
        return {"error": f"expected SASL, got {kind} {body[:8]!r}"}
    nonce = base64.b64encode(os.urandom(18)).decode()
    first = f"n,,n=,r={nonce}".encode()
    mech = b"SCRAM-SHA-256\0"
    payload = mech + struct.pack("!i", len(first)) + first
    sock.sendall(b"p" + struct.pack("!i", 4 + len(payload)) + payload)
    kind, body = message()
    if kind != b"R" or struct.unpack("!i", body[:4])[0] != 11:
        return {"error": f"expected SASL continue, got {kind} {body[:40]!r}"}
    fields = dict(f.split("=", 1) for f in body[4:].decode().split(","))
    sock.close()
    return {"salt": fields["s"], "iterations": fields["i"]}


def fuzz_run(spec):
    """Calls every function the server lists with extreme arguments, one
    statement at a time, and checks after every `check_every` statements
    that the server still answers. Returns the number of statements, the
    SQLSTATEs they got, and the first connection failure if any."""
    import time

    import psycopg

    def connect():
        return psycopg.connect(spec["dsn"], autocommit=True, connect_timeout=10)

    conn = connect()
    functions = conn.execute(
        "SELECT DISTINCT routine_name, function_type FROM information_schema.routines ORDER BY 1"
    ).fetchall()
    extremes = spec["extremes"]
    normal = spec["normal"]
    statements = []
    for name, kind in functions:
        if name in spec.get("skip", []):
            continue
        quoted = '"' + name.replace('"', '""') + '"'
        for arity in range(0, spec["max_arity"] + 1):
            tuples = [[normal] * arity] if arity else [[]]
            for pos in range(arity):
                for e in extremes:
                    args = [normal] * arity
                    args[pos] = e
                    tuples.append(args)
                tuples.append([e for e in extremes[:1]] * arity)
            for args in tuples:
                call = f"{quoted}({', '.join(args)})"
                kind_l = (kind or "").lower()
                if "table" in kind_l:
                    statements.append(f"SELECT * FROM {call} LIMIT 3")
                elif "window" in kind_l:
                    statements.append(f"SELECT {call} OVER (ORDER BY x) FROM (VALUES (1), (2)) t(x)")
                else:
                    statements.append(f"SELECT {call}")
    deep = spec.get("deep", [])
    statements.extend(deep)
    states = {}
    lost = None
    started = time.monotonic()
    for i, sql in enumerate(statements):
        if time.monotonic() - started > spec["seconds"]:
            break
        try:
            cur = conn.execute(sql)
            if cur.description:
                cur.fetchmany(3)
            states["ok"] = states.get("ok", 0) + 1
        except psycopg.OperationalError as e:
            if conn.closed or conn.broken:
                lost = {"statement": sql, "error": str(e)}
                break
            states[e.sqlstate or "?"] = states.get(e.sqlstate or "?", 0) + 1
        except psycopg.Error as e:
            states[e.sqlstate or "?"] = states.get(e.sqlstate or "?", 0) + 1
        if i % spec["check_every"] == 0:
            try:
                with connect() as probe:
                    probe.execute("SELECT 1").fetchone()
            except psycopg.Error as e:
                lost = {"statement": sql, "error": f"the server stopped answering: {e}"}
                break
    tried = sum(states.values())
    try:
        with connect() as probe:
            alive = probe.execute("SELECT count(*) FROM events").fetchone()[0] is not None
    except psycopg.Error:
        alive = False
    return {"functions": len(functions), "planned": len(statements), "tried": tried, "states": states, "lost": lost, "alive": alive}


if __name__ == "__main__":
    kind = sys.argv[1]
    spec = json.load(sys.stdin)
    result = {"psycopg": psycopg_run, "loop": loop_run, "adbc": adbc_run, "flight": flight_run, "prometheus": prometheus_run, "http": http_run, "narrowed": narrowed_run, "cancel": cancel_run, "scram_salt": scram_salt_run, "protocol": protocol_run, "fuzz": fuzz_run}[kind](spec)
    json.dump(result, sys.stdout)
