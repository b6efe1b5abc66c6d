//! `tally serve` against real clients: psql, psycopg 3, pgjdbc, ADBC Flight
//! SQL and `pyarrow.flight` (installed by `deploy/install-clients.sh`), and
//! Prometheus's own text parser. The server is the real binary on free
//! ports, killed on drop.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{
    NatsServer, api_calls, bin, free_port, generated, publish_lines, run_expect, tally, until_idle,
};

/// A running `tally serve`, killed on drop.
pub struct Serve {
    child: Option<Child>,
    pub pg: u16,
    pub flight: u16,
    pub http: u16,
    pub log: PathBuf,
}

impl Serve {
    pub fn start(server: &NatsServer, data: &Path, users: &Path, extra: &[&str]) -> Serve {
        Serve::start_limited(server, data, users, extra, None)
    }

    /// [`Serve::start`] with the process's address space limited to
    /// `address_bytes` (RLIMIT_AS): an allocation past it fails, and a
    /// server that does not bound its allocations aborts.
    pub fn start_limited(
        server: &NatsServer,
        data: &Path,
        users: &Path,
        extra: &[&str],
        address_bytes: Option<u64>,
    ) -> Serve {
        for _ in 0..5 {
            let (pg, flight, http) = (free_port(), free_port(), free_port());
            let log = data.with_extension(format!("serve-{pg}.log"));
            let mut c = match address_bytes {
                // prlimit sets RLIMIT_AS and execs the server (same pid).
                Some(limit) => {
                    let t = tally(server, data);
                    let mut c = Command::new("prlimit");
                    c.arg(format!("--as={limit}"))
                        .arg("--")
                        .arg(t.get_program())
                        .args(t.get_args());
                    for (k, v) in t.get_envs() {
                        if let Some(v) = v {
                            c.env(k, v);
                        }
                    }
                    c
                }
                None => tally(server, data),
            };
            c.arg("serve")
                .args(["--pg-listen", &format!("127.0.0.1:{pg}")])
                .args(["--flight-listen", &format!("127.0.0.1:{flight}")])
                .args(["--http-listen", &format!("127.0.0.1:{http}")])
                .arg("--users")
                .arg(users)
                .args(extra)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap());
            let mut child = c.spawn().unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if child.try_wait().unwrap().is_some() {
                    break; // a port was taken: try others
                }
                if [pg, flight, http]
                    .iter()
                    .all(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok())
                {
                    return Serve {
                        child: Some(child),
                        pg,
                        flight,
                        http,
                        log,
                    };
                }
                assert!(Instant::now() < deadline, "tally serve did not listen");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("tally serve could not start on free ports");
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn dsn(&self, user: &str, password: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname=tally sslmode=disable",
            self.pg
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        child.wait().unwrap()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The Python with the client libraries (`deploy/install-clients.sh`).
fn python() -> PathBuf {
    std::env::var_os("TALLY_CLIENT_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        panic!("TALLY_CLIENT_PYTHON is not set: the serve tests drive real clients; run `. deploy/install-clients.sh` (tests/run.sh does)")
    })
}

fn clients_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/system/clients/clients.py")
}

/// Runs one client of `clients.py` with `spec`; its JSON answer.
pub fn client(kind: &str, spec: &Value) -> Value {
    let mut child = Command::new(python())
        .arg(clients_script())
        .arg(kind)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(spec.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{kind} client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// psycopg: each step's rows, or its error.
pub fn psycopg(dsn: &str, steps: Value) -> Vec<Value> {
    client("psycopg", &json!({"dsn": dsn, "steps": steps}))
        .as_array()
        .unwrap()
        .clone()
}

pub fn rows(step: &Value) -> Vec<Vec<Option<String>>> {
    assert!(step.get("error").is_none(), "query failed: {step}");
    step["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .collect()
}

pub fn sqlstate(step: &Value) -> String {
    step["error"]["sqlstate"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error, got {step}"))
        .to_owned()
}

/// psql with `args`; (exit code, stdout, stderr).
pub fn psql(dsn: &str, args: &[&str], dir: &Path) -> (i32, String, String) {
    let out = Command::new("psql")
        .arg(dsn)
        .args(["-X", "-A", "-t", "-F", "|", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("psql (Debian postgresql-client) is needed: run deploy/install-clients.sh");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `sql` with psql until it answers (a refused or failed attempt is
/// tried again every 100 ms), for at most `within`; its output, trimmed.
/// `what` says what it means when it never answers.
pub fn psql_until_answered(
    dsn: &str,
    sql: &str,
    dir: &Path,
    within: Duration,
    what: &str,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (code, out, err) = psql(dsn, &["-c", sql], dir);
        if code == 0 {
            return out.trim().to_owned();
        }
        assert!(Instant::now() < deadline, "{what}: {err}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `tally sql` as JSON rows.
fn tally_json(server: &NatsServer, data: &Path, query: &str) -> Vec<Value> {
    let mut c = tally(server, data);
    c.args(["sql", query, "--format", "json"]);
    serde_json::from_slice(&run_expect(c, 0).stdout).unwrap()
}

pub fn add_user(users: &Path, name: &str, password: &str, scope: &[&str]) {
    let mut c = Command::new(bin());
    c.args(["users", "add", name])
        .args(scope)
        .arg("--users")
        .arg(users)
        .env("TALLY_PASSWORD", password);
    run_expect(c, 0);
}

/// 20 generated tenants over 3 months, plus tenant `tbig` with one usage
/// event of 29 integer digits (more than `rust_decimal` holds), in views.
pub fn saas(server: &NatsServer, dir: &Path) -> PathBuf {
    let data = dir.join("data");
    let file = generated(dir, 20, 3, 5);
    let mut p = tally(server, &data);
    p.arg("publish").arg(&file);
    run_expect(p, 0);
    publish_lines(
        server,
        &data,
        &[api_calls(
            "big-1",
            "tbig",
            "2025-02-10T10:00:00Z",
            "\"12345678901234567890123456789.123456789\"",
        )],
    );
    until_idle(server, &data);
    data
}

const BIG: &str = "12345678901234567890123456789.123456789";

#[test]
fn serve_answers_psql_psycopg_jdbc_adbc_and_flight_as_tally_sql_does() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = saas(&server, dir.path());
    let users = dir.path().join("users.toml");
    add_user(&users, "ops", "ops-pw", &["--all-tenants"]);
    let serve = Serve::start(&server, &data, &users, &[]);
    let dsn = serve.dsn("ops", "ops-pw");

    // psql: \d lists every view, \d usage its columns with Postgres types.
    let (code, out, err) = psql(&dsn, &["-c", "\\d"], dir.path());
    assert_eq!(code, 0, "{err}");
    for view in [
        "events",
        "usage",
        "overages",
        "mrr",
        "revenue",
        "tenants",
        "churn",
        "ltv",
        "mrr_waterfall",
        "_tally_clock",
    ] {
        assert!(
            out.contains(&format!("|{view}|")),
            "\\d lacks {view}:\n{out}"
        );
    }
    let (code, out, err) = psql(&dsn, &["-c", "\\d usage"], dir.path());
    assert_eq!(code, 0, "{err}");
    for (col, ty) in [
        ("tenant", "text"),
        ("window_start", "timestamp with time zone"),
        ("events", "bigint"),
        ("sum", "numeric"),
        ("is_final", "boolean"),
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("{col}|{ty}|"))),
            "\\d usage: {col} {ty}:\n{out}"
        );
    }
    // Every digit of a 29-digit decimal, and \copy to CSV.
    let (code, out, err) = psql(
        &dsn,
        &[
            "-c",
            "SELECT sum FROM usage WHERE tenant = 'tbig' AND granularity = 'month'",
        ],
        dir.path(),
    );
    assert_eq!((code, out.trim()), (0, BIG), "{err}");
    let (code, out, err) = psql(
        &dsn,
        &[
            "-c",
            "\\copy (SELECT tenant, metric, sum FROM usage WHERE granularity = 'month' ORDER BY tenant, metric, window_start) TO 'usage.csv' CSV HEADER",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    let csv = std::fs::read_to_string(dir.path().join("usage.csv")).unwrap();
    let expected = tally_json(
        &server,
        &data,
        "SELECT tenant, metric, CAST(sum AS VARCHAR) AS s FROM usage WHERE granularity = 'month' ORDER BY tenant, metric, window_start",
    );
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("tenant,metric,sum"));
    let got: Vec<&str> = lines.collect();
    assert_eq!(got.len(), expected.len());
    assert!(out.contains(&format!("COPY {}", expected.len())), "{out}");
    for (line, row) in got.iter().zip(&expected) {
        let s = row["s"].as_str().unwrap_or("");
        assert_eq!(
            *line,
            format!(
                "{},{},{s}",
                row["tenant"].as_str().unwrap(),
                row["metric"].as_str().unwrap()
            )
        );
    }

    // psycopg: parameters (simple and prepared, text and binary), a
    // server-side cursor, the checkpoint an answer covers.
    let per_tenant = "SELECT tenant, sum(events) AS n FROM usage WHERE tenant = %s AND granularity = 'day' GROUP BY tenant";
    let steps = psycopg(
        &dsn,
        json!([
            {"sql": per_tenant, "params": ["t0003"]},
            {"sql": per_tenant, "params": ["t0003"], "prepare": true},
            {"sql": per_tenant, "params": ["t0003"], "prepare": true, "binary": true},
            {"sql": "SELECT sum FROM usage WHERE tenant = %s AND granularity = %s", "params": ["tbig", "month"], "binary": true},
            {"sql": "SELECT tenant, metric FROM usage ORDER BY tenant, metric, granularity, window_start", "cursor": "c1"},
            {"sql": "SELECT checkpoint_seq FROM _tally_clock"},
        ]),
    );
    let expected_n = tally_json(
        &server,
        &data,
        "SELECT sum(events) AS n FROM usage WHERE tenant = 't0003' AND granularity = 'day'",
    )[0]["n"]
        .to_string();
    for step in &steps[..3] {
        assert_eq!(
            rows(step),
            vec![vec![Some("t0003".into()), Some(expected_n.clone())]]
        );
    }
    assert_eq!(rows(&steps[3]), vec![vec![Some(BIG.into())]]);
    let all = tally_json(&server, &data, "SELECT count(*) AS n FROM usage")[0]["n"]
        .as_u64()
        .unwrap();
    assert_eq!(rows(&steps[4]).len() as u64, all);
    let checkpoint: u64 = serde_json::from_str::<Value>(
        &std::fs::read_to_string(data.join("checkpoint.json")).unwrap(),
    )
    .unwrap()["last_seq"]
        .as_u64()
        .unwrap();
    assert_eq!(rows(&steps[5]), vec![vec![Some(checkpoint.to_string())]]);

    // What Grafana's and Metabase's Postgres datasources send at connect
    // and for schema browsing answers, with the views in it.
    let steps = psycopg(
        &dsn,
        json!([
            {"sql": "SELECT current_setting('server_version_num')::int/100 as version"},
            {"sql": "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"},
            {"sql": "SELECT schema_name AS \"name\" FROM information_schema.schemata WHERE schema_name NOT IN ('information_schema', 'pg_catalog', 'pg_toast') ORDER BY schema_name"},
            {"sql": "SELECT quote_ident(table_name) AS \"table\" FROM information_schema.tables WHERE quote_ident(table_schema) = 'public' ORDER BY 1"},
            {"sql": "SELECT quote_ident(column_name) AS \"column\", data_type AS \"type\" FROM information_schema.columns WHERE CASE WHEN array_length(parse_ident('usage'),1) = 2 THEN quote_ident(table_schema) = (parse_ident('usage'))[1] AND quote_ident(table_name) = (parse_ident('usage'))[2] ELSE quote_ident(table_name) = 'usage' AND quote_ident(table_schema) IN (\n SELECT\n CASE WHEN trim(s[i]) = '\"$user\"' THEN user ELSE trim(s[i]) END\n FROM\n generate_series(\n array_lower(string_to_array(current_setting('search_path'),','),1),\n array_upper(string_to_array(current_setting('search_path'),','),1)\n ) as i,\n string_to_array(current_setting('search_path'),',') s\n ) END"},
            {"sql": "SELECT version()"},
            {"sql": "show timezone;"},
            {"sql": "SELECT n.nspname AS schema, c.relname AS name, CASE c.relkind WHEN 'r' THEN 'TABLE' WHEN 'v' THEN 'VIEW' ELSE NULL END AS type, d.description AS description FROM pg_catalog.pg_class AS c INNER JOIN pg_catalog.pg_namespace AS n ON c.relnamespace = n.oid LEFT JOIN pg_catalog.pg_description AS d ON (c.oid = d.objoid) AND (d.objsubid = 0) AND (d.classoid = 'pg_class'::regclass) WHERE (c.relnamespace = n.oid) AND (n.nspname !~ '^pg_') AND (n.nspname <> 'information_schema') AND c.relkind in ('r', 'p', 'v', 'f', 'm') AND n.nspname IN ('public') ORDER BY type ASC, schema ASC, name ASC"},
        ]),
    );
    assert_eq!(rows(&steps[0]), vec![vec![Some("1600".into())]]);
    assert!(rows(&steps[1]).is_empty());
    assert_eq!(rows(&steps[2]), vec![vec![Some("public".into())]]);
    assert!(rows(&steps[3]).contains(&vec![Some("mrr_waterfall".into())]));
    let columns = rows(&steps[4]);
    assert_eq!(columns.len(), 12, "{columns:?}");
    assert!(
        columns.iter().any(|c| c[0].as_deref() == Some("sum")),
        "{columns:?}"
    );
    assert!(
        rows(&steps[5])[0][0]
            .as_deref()
            .unwrap()
            .starts_with("PostgreSQL 16")
    );
    assert_eq!(rows(&steps[6]), vec![vec![Some("UTC".into())]]);
    assert!(
        rows(&steps[7])
            .iter()
            .any(|r| r[1].as_deref() == Some("usage"))
    );

    // pgjdbc: a PreparedStatement run until it is server-prepared,
    // metadata as DBeaver and Metabase read it, a refused write.
    let jar = std::env::var("TALLY_PGJDBC_JAR")
        .unwrap_or_else(|_| "/usr/share/java/postgresql.jar".into());
    let out = Command::new("java")
        .args(["-cp", &jar])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/system/clients/Jdbc.java"))
        .arg(format!("jdbc:postgresql://127.0.0.1:{}/tally", serve.pg))
        .args(["ops", "ops-pw", "tbig"])
        .output()
        .expect("java (OpenJDK) is needed: run deploy/install-clients.sh");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let day = tally_json(
        &server,
        &data,
        "SELECT CAST(sum AS VARCHAR) AS s FROM usage WHERE tenant = 'tbig' AND granularity = 'day'",
    );
    assert!(
        text.contains(&format!(
            "ROW\ttbig\tapi_calls\t2025-02-10T00:00:00Z\t{}",
            day[0]["s"].as_str().unwrap()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("CHECKPOINT\t{checkpoint}")),
        "{text}"
    );
    assert!(
        text.contains("TABLE\tusage") && text.contains("TABLE\tmrr_waterfall"),
        "{text}"
    );
    assert!(
        text.contains("COLUMN\tsum\tnumeric") && text.contains("COLUMN\twindow_start\ttimestamptz"),
        "{text}"
    );
    assert!(text.contains("REFUSED\t42501"), "{text}");

    // ADBC Flight SQL: the views' Arrow schema exactly, the same rows, the
    // catalog calls; pyarrow.flight's handshake gets a bearer token.
    let adbc = client(
        "adbc",
        &json!({
            "uri": format!("grpc://127.0.0.1:{}", serve.flight),
            "user": "ops", "password": "ops-pw",
            "steps": [
                {"sql": "SELECT * FROM usage WHERE tenant = 'tbig' AND granularity = 'month'"},
                {"sql": "SELECT count(*) AS n FROM events"},
                {"sql": "DROP VIEW usage"},
            ],
            "table_schema": "usage",
            "objects": true,
        }),
    );
    let usage_schema = json!([
        "tenant: string not null",
        "metric: string not null",
        "granularity: string not null",
        "window_start: timestamp[us, tz=UTC] not null",
        "window_end: timestamp[us, tz=UTC] not null",
        "events: int64 not null",
        "sum: decimal128(38, 9)",
        "min: decimal128(38, 9) not null",
        "max: decimal128(38, 9) not null",
        "last: decimal128(38, 9) not null",
        "unique_count: int64",
        "is_final: bool not null",
    ]);
    assert_eq!(adbc["steps"][0]["schema"], usage_schema);
    assert_eq!(adbc["table_schema"], usage_schema);
    assert_eq!(adbc["steps"][0]["rows"][0][6], json!(BIG));
    let events = tally_json(&server, &data, "SELECT count(*) AS n FROM events")[0]["n"].to_string();
    assert_eq!(adbc["steps"][1]["rows"], json!([[events]]));
    assert!(
        adbc["steps"][2]["error"]
            .as_str()
            .unwrap()
            .contains("read-only"),
        "{adbc}"
    );
    let tables: Vec<&str> = adbc["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    for view in ["usage", "mrr_waterfall", "events", "_tally_clock"] {
        assert!(tables.contains(&view), "{tables:?}");
    }
    let flight = client(
        "flight",
        &json!({"uri": format!("grpc://127.0.0.1:{}", serve.flight), "user": "ops", "password": "ops-pw"}),
    );
    assert!(
        flight["token"].as_str().unwrap().starts_with("Bearer "),
        "{flight}"
    );
    let flight = client(
        "flight",
        &json!({"uri": format!("grpc://127.0.0.1:{}", serve.flight), "user": "ops", "password": "wrong"}),
    );
    assert!(
        flight["error"]
            .as_str()
            .unwrap()
            .contains("Unauthenticated"),
        "{flight}"
    );
}

/// The lines of a JSON Lines file whose tenant is one of `tenants`.
fn only_tenants(file: &Path, tenants: &[&str], out: &Path) -> PathBuf {
    let text = std::fs::read_to_string(file).unwrap();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            tenants.contains(&v["tenant"].as_str().unwrap())
        })
        .collect();
    std::fs::write(out, kept.join("\n") + "\n").unwrap();
    out.to_path_buf()
}

/// Rows as sorted text, without the columns that say where and when a
/// message arrived or how final the stream clock makes a row (the clock is
/// the whole stream's, visible to every account).
fn comparable(step: &Value) -> Vec<String> {
    assert!(step.get("error").is_none(), "query failed: {step}");
    let columns: Vec<&str> = step["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let mut out: Vec<String> = step["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .zip(&columns)
                .filter(|(_, c)| !matches!(**c, "stream_seq" | "published_at" | "is_final"))
                .map(|(v, c)| format!("{c}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_tenant_account_sees_its_own_world_and_cannot_escape_it() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = generated(dir.path(), 12, 3, 9);
    let mut p = tally(&server, &data);
    p.arg("publish").arg(&file);
    run_expect(p, 0);
    until_idle(&server, &data);
    let users = dir.path().join("users.toml");
    add_user(&users, "acme", "acme-pw", &["--tenant", "t0003"]);
    add_user(
        &users,
        "two",
        "two-pw",
        &["--tenant", "t0003", "--tenant", "t0005"],
    );
    let serve = Serve::start(&server, &data, &users, &[]);
    let acme = serve.dsn("acme", "acme-pw");

    // The reference: the same stream with only t0003's events (and the
    // catalog's), processed by a run of its own.
    let ref_server = NatsServer::start();
    let ref_data = dir.path().join("ref");
    let ref_file = only_tenants(&file, &["t0003", "_system"], &dir.path().join("ref.jsonl"));
    let mut p = tally(&ref_server, &ref_data);
    p.arg("publish").arg(&ref_file);
    run_expect(p, 0);
    until_idle(&ref_server, &ref_data);
    let ref_users = dir.path().join("ref-users.toml");
    add_user(&ref_users, "ops", "ops-pw", &["--all-tenants"]);
    let ref_serve = Serve::start(&ref_server, &ref_data, &ref_users, &[]);

    // Every stored view and every queries/ view, and views of views, equal
    // the reference's (`stream_seq` aside: a tenant account's is a position
    // among its own events, see hostile.rs).
    let views = [
        ("events", "SELECT * FROM events WHERE tenant <> '_system'"),
        ("usage", "SELECT * FROM usage"),
        ("overages", "SELECT * FROM overages"),
        ("mrr", "SELECT * FROM mrr"),
        ("revenue", "SELECT * FROM revenue"),
        ("tenants", "SELECT * FROM tenants WHERE tenant <> '_system'"),
        ("churn", "SELECT * FROM churn"),
        ("ltv", "SELECT * FROM ltv"),
        ("mrr_waterfall", "SELECT * FROM mrr_waterfall"),
        ("revenue_by_month", "SELECT * FROM revenue_by_month"),
        ("top_tenants", "SELECT * FROM top_tenants"),
        ("over_quota", "SELECT * FROM over_quota"),
        (
            "nested",
            "WITH w AS (SELECT * FROM mrr_waterfall) SELECT currency, sum(mrr_end) AS s, count(*) AS n FROM w GROUP BY currency",
        ),
        (
            "subquery",
            "SELECT (SELECT sum(events) FROM usage) AS a, (SELECT count(*) FROM events WHERE tenant <> '_system') AS b, (SELECT sum(net) FROM revenue) AS c",
        ),
    ];
    let scoped_steps: Vec<Value> = views
        .iter()
        .map(|(name, sql)| {
            // The tenant account asks plainly: scoping is its world.
            let plain = match *name {
                "events" => "SELECT * FROM events".to_owned(),
                "tenants" => "SELECT * FROM tenants".to_owned(),
                "subquery" => "SELECT (SELECT sum(events) FROM usage) AS a, (SELECT count(*) FROM events) AS b, (SELECT sum(net) FROM revenue) AS c".to_owned(),
                _ => sql.to_string(),
            };
            json!({"sql": plain})
        })
        .collect();
    let ref_steps: Vec<Value> = views.iter().map(|(_, sql)| json!({"sql": sql})).collect();
    let scoped = psycopg(&acme, Value::Array(scoped_steps));
    let reference = psycopg(&ref_serve.dsn("ops", "ops-pw"), Value::Array(ref_steps));
    for (i, (name, _)) in views.iter().enumerate() {
        let (a, b) = (comparable(&scoped[i]), comparable(&reference[i]));
        assert!(
            !b.is_empty() || *name == "over_quota",
            "{name}: reference is empty"
        );
        assert_eq!(
            a, b,
            "{name}: the tenant's world differs from its events alone"
        );
    }

    // Escapes: every path to other tenants' rows finds none.
    let steps = psycopg(
        &acme,
        json!([
            {"sql": "SELECT DISTINCT tenant FROM events UNION SELECT DISTINCT tenant FROM usage UNION SELECT DISTINCT tenant FROM mrr UNION SELECT DISTINCT tenant FROM revenue UNION SELECT DISTINCT tenant FROM overages UNION SELECT DISTINCT tenant FROM tenants"},
            {"sql": "SELECT count(*) FROM usage u1 JOIN usage u2 ON u1.tenant <> u2.tenant"},
            {"sql": "SELECT count(*) FROM tally.public.usage WHERE tenant <> 't0003'"},
            {"sql": "SELECT count(*) FROM usage u JOIN events e ON u.tenant <> e.tenant"},
            {"sql": "SELECT count(*) FROM events WHERE tenant IN (SELECT tenant FROM tenants WHERE tenant <> 't0003')"},
            {"sql": "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' AND table_name LIKE '\\_%' AND table_name NOT LIKE '\\_tally%' ORDER BY 1"},
            {"sql": "SELECT count(*) FROM pg_catalog.pg_class"},
            {"sql": format!("SELECT count(*) FROM '{}'", data.join("usage").display())},
            {"sql": "SELECT * FROM read_parquet('x.parquet')"},
            {"sql": "CREATE VIEW leak AS SELECT 1"},
            {"sql": "SELECT reltuples FROM pg_catalog.pg_class WHERE relname = 'usage'"},
            // Nothing the query says is evaluated on another tenant's row:
            // not a cast that would fail naming its value, not a division
            // by zero as an oracle, not a count from the files' metadata.
            {"sql": "SELECT count(*) FROM events WHERE CAST(tenant AS INT) = 0 OR tenant = 't0003'"},
            {"sql": "SELECT count(*) FROM usage WHERE CASE WHEN tenant = 't0005' THEN 1 / 0 ELSE 1 END = 1"},
            {"sql": "SELECT count(*) FROM events"},
            {"sql": "EXPLAIN ANALYZE SELECT * FROM usage"},
            {"sql": "EXPLAIN SELECT * FROM usage"},
        ]),
    );
    assert_eq!(rows(&steps[0]), vec![vec![Some("t0003".into())]]);
    for step in &steps[1..5] {
        assert_eq!(rows(step), vec![vec![Some("0".into())]], "{step}");
    }
    assert!(
        rows(&steps[5]).is_empty(),
        "the version tables (stream positions) are not a tenant's: {:?}",
        rows(&steps[5])
    );
    assert!(rows(&steps[6])[0][0].is_some());
    assert!(
        steps[7].get("error").is_some() && steps[8].get("error").is_some(),
        "{steps:?}"
    );
    assert_eq!(sqlstate(&steps[9]), "42501");
    assert_eq!(
        rows(&steps[10]),
        vec![vec![Some("0.0".into())]],
        "no row counts leak"
    );
    let cast = steps[11]["error"]["message"].as_str().unwrap_or_default();
    for t in ["t0001", "t0002", "t0004", "t0005", "t0012"] {
        assert!(!cast.contains(t), "an error names tenant {t}: {cast}");
    }
    let usage_rows = rows(&scoped[1]).len().to_string();
    assert_eq!(
        rows(&steps[12]),
        vec![vec![Some(usage_rows)]],
        "{}",
        steps[12]
    );
    let events_rows = rows(&scoped[0]).len().to_string();
    assert_eq!(rows(&steps[13]), vec![vec![Some(events_rows)]]);
    assert_eq!(sqlstate(&steps[14]), "42501");
    assert_eq!(sqlstate(&steps[15]), "42501");

    // Two tenants see both; Flight SQL scopes the same way.
    let two = psycopg(
        &serve.dsn("two", "two-pw"),
        json!([{"sql": "SELECT DISTINCT tenant FROM usage ORDER BY 1"}]),
    );
    assert_eq!(
        rows(&two[0]),
        vec![vec![Some("t0003".into())], vec![Some("t0005".into())]]
    );
    let adbc = client(
        "adbc",
        &json!({
            "uri": format!("grpc://127.0.0.1:{}", serve.flight),
            "user": "acme", "password": "acme-pw",
            "steps": [{"sql": "SELECT DISTINCT tenant FROM events"}, {"sql": "SELECT count(*) FROM _overages_versions"}],
        }),
    );
    assert_eq!(adbc["steps"][0]["rows"], json!([["t0003"]]));
    assert!(
        adbc["steps"][1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("_overages_versions")),
        "{adbc}"
    );
}

/// A query that runs for minutes in little memory.
const SLOW: &str = "SELECT sum(value % 7) FROM generate_series(1, 100000000000)";

#[test]
fn bad_input_gets_a_clear_answer_and_harms_no_one() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = saas(&server, dir.path());
    let users = dir.path().join("users.toml");
    add_user(&users, "ops", "ops-pw", &["--all-tenants"]);
    let serve = Serve::start(
        &server,
        &data,
        &users,
        &[
            "--max-connections",
            "4",
            "--max-connections-per-account",
            "4",
            "--query-timeout",
            "3",
            "--memory-limit",
            "8M",
        ],
    );
    let dsn = serve.dsn("ops", "ops-pw");

    // One session opened first, used again at the end.
    let mut held = Command::new("psql")
        .arg(&dsn)
        .args(["-X", "-A", "-t", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, out, _) = psql(&dsn, &["-c", "SELECT 1"], dir.path());
    assert_eq!((code, out.trim()), (0, "1"));

    // A statement run again reads the clock again: its kept plan does not
    // hold the first execution's `now()`.
    let clock = || psql(&dsn, &["-c", "SELECT now()"], dir.path()).1;
    let first = clock();
    std::thread::sleep(Duration::from_millis(20));
    let second = clock();
    assert!(
        !first.trim().is_empty() && first != second,
        "now() answered {first:?} and then {second:?}"
    );

    // Wrong password and unknown user: one error, and a WARN without the password.
    let (_, _, wrong) = psql(
        &serve.dsn("ops", "not-it-9"),
        &["-c", "SELECT 1"],
        dir.path(),
    );
    let (_, _, unknown) = psql(
        &serve.dsn("nobody", "not-it-9"),
        &["-c", "SELECT 1"],
        dir.path(),
    );
    assert!(
        wrong.contains("password authentication failed for user \"ops\""),
        "{wrong}"
    );
    assert!(
        unknown.contains("password authentication failed for user \"nobody\""),
        "{unknown}"
    );
    // Another database name.
    let other = dsn.replace("dbname=tally", "dbname=prod");
    let (_, _, err) = psql(&other, &["-c", "SELECT 1"], dir.path());
    assert!(err.contains("database \"prod\" does not exist"), "{err}");

    // Malformed protocol bytes, and a startup packet without a user.
    let mut raw = TcpStream::connect(("127.0.0.1", serve.pg)).unwrap();
    raw.write_all(b"\x00\x00\x00\x10GARBAGE-BYTES!!").unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 256];
    let _ = std::io::Read::read(&mut raw, &mut buf);
    drop(raw);
    let mut raw = TcpStream::connect(("127.0.0.1", serve.pg)).unwrap();
    let mut startup = Vec::new();
    startup.extend_from_slice(&196608u32.to_be_bytes());
    startup.extend_from_slice(b"database\0tally\0\0");
    let mut packet = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&startup);
    raw.write_all(&packet).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut raw, &mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.contains("28000") && answer.contains("no user name"),
        "{answer}"
    );
    // `raw` stays open: the refused session must not hold a slot anyway.

    // A client that vanishes mid-query.
    let mut vanishing = Command::new("psql")
        .arg(&dsn)
        .args(["-X", "-c", SLOW])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    vanishing.kill().unwrap();
    vanishing.wait().unwrap();

    // Past the timeout, over the memory limit, read-only, a bad plan.
    let steps = psycopg(
        &dsn,
        json!([
            {"sql": SLOW},
            {"sql": "SELECT a.id, b.id, a.data, b.data FROM events a JOIN events b ON a.tenant = b.tenant ORDER BY a.data, b.data"},
            {"sql": "SET work_mem = '1GB'"},
            {"sql": "DROP VIEW usage"},
            {"sql": "SELECT no_such_column FROM usage"},
            {"sql": "SELECT * FROM no_such_view"},
            {"sql": "SET application_name = 'billing-job'"},
        ]),
    );
    assert_eq!(sqlstate(&steps[0]), "57014", "{}", steps[0]);
    assert!(
        steps[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--query-timeout")
    );
    assert_eq!(sqlstate(&steps[1]), "53200", "{}", steps[1]);
    assert!(
        steps[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("memory limit")
    );
    assert_eq!(sqlstate(&steps[2]), "42501");
    assert!(
        steps[2]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("SET work_mem")
    );
    assert_eq!(sqlstate(&steps[3]), "42501");
    assert_eq!(sqlstate(&steps[4]), "42703");
    assert_eq!(sqlstate(&steps[5]), "42P01");
    assert!(steps[6].get("error").is_none(), "{}", steps[6]);

    // More connections than allowed: the fifth is refused, clearly. First
    // the vanished client's session must end (its query runs on until the
    // timeout), leaving the held one.
    let metrics = json!({"url": format!("http://127.0.0.1:{}/metrics", serve.http), "user": "ops", "password": "ops-pw"});
    let open_now = || {
        client("prometheus", &metrics)["samples"]["tally_serve_open_connections{protocol=pgwire}"]
            .as_f64()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while open_now() != Some(1.0) {
        if Instant::now() > deadline {
            let ss = Command::new("ss").args(["-tnpa"]).output().unwrap();
            panic!(
                "sessions did not end: {:?}\n{}\n{}",
                open_now(),
                String::from_utf8_lossy(&ss.stdout)
                    .lines()
                    .filter(|l| l.contains(&format!(":{}", serve.pg)))
                    .collect::<Vec<_>>()
                    .join("\n"),
                serve.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut idle: Vec<Child> = (0..3)
        .map(|_| {
            Command::new("psql")
                .arg(&dsn)
                .args(["-X", "-q"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    // Until the server counts all four (logins take a while on a loaded
    // machine), then a fifth.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let open = open_now();
        if open == Some(4.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the idle sessions never all connected: {open:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let (code, _, err) = psql(&dsn, &["-c", "SELECT 1"], dir.path());
        if code != 0 {
            break err;
        }
        assert!(
            Instant::now() < deadline,
            "a fifth connection was never refused"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        refused.contains("too many clients") && refused.contains("--max-connections"),
        "{refused}"
    );
    for c in &mut idle {
        c.kill().unwrap();
        c.wait().unwrap();
    }

    // The first session still works, and so does a new one.
    let mut stdin = held.stdin.take().unwrap();
    stdin
        .write_all(b"SELECT count(*) > 0 FROM usage;\n\\q\n")
        .unwrap();
    drop(stdin);
    let out = held.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "t",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer = psql_until_answered(
        &dsn,
        "SELECT count(*) > 0 FROM usage",
        dir.path(),
        Duration::from_secs(10),
        "the server stopped serving",
    );
    assert_eq!(answer, "t");
    let log = serve.log();
    assert!(
        log.contains("login refused") && !log.contains("not-it-9"),
        "{log}"
    );
}

/// `n` usage events, one per minute from `start_min`, each of quantity 1.
fn minute_events(prefix: &str, start_min: u32, n: u32) -> Vec<String> {
    (start_min..start_min + n)
        .map(|m| {
            let (d, rest) = (m / 1440, m % 1440);
            let time = format!("2025-03-{:02}T{:02}:{:02}:00Z", 1 + d, rest / 60, rest % 60);
            api_calls(&format!("{prefix}-{m}"), &format!("t{}", m % 7), &time, "1")
        })
        .collect()
}

#[test]
fn answers_stay_consistent_while_run_ingests_compacts_and_replay_switches() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    publish_lines(&server, &data, &minute_events("a", 0, 300));
    until_idle(&server, &data);
    let users = dir.path().join("users.toml");
    add_user(&users, "ops", "ops-pw", &["--all-tenants"]);
    let serve = Serve::start(&server, &data, &users, &[]);

    // Every event is unique and counted once: at any checkpoint, the
    // archive and the hourly usage both hold exactly checkpoint_seq events.
    let probe = "SELECT (SELECT checkpoint_seq FROM _tally_clock), (SELECT count(*) FROM events), (SELECT sum(events) FROM usage WHERE granularity = 'hour')";
    let spec = json!({"dsn": serve.dsn("ops", "ops-pw"), "seconds": 25, "sql": probe});
    let looping = std::thread::spawn(move || client("loop", &spec));

    // Small batches (many files, compactions) while the loop reads...
    let mut run = tally(&server, &data);
    run.args(["run", "--batch-size", "25"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut run = run.spawn().unwrap();
    for chunk in 0..8 {
        publish_lines(&server, &data, &minute_events("b", 300 + chunk * 150, 150));
        std::thread::sleep(Duration::from_millis(700));
    }
    // ...and a replay that switches the directory under it.
    let mut replay = tally(&server, &data);
    replay.arg("replay");
    run_expect(replay, 0);
    publish_lines(&server, &data, &minute_events("c", 1500, 100));
    std::thread::sleep(Duration::from_secs(2));
    let samples = looping.join().unwrap();
    run.kill().unwrap();
    run.wait().unwrap();

    let samples = samples.as_array().unwrap();
    assert!(samples.len() > 20, "too few answers: {}", samples.len());
    let mut last = 0u64;
    let mut seen = std::collections::BTreeSet::new();
    for s in samples {
        assert!(
            s.get("error").is_none(),
            "a query failed while the views changed: {s}"
        );
        let row: Vec<u64> = s["row"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().parse().unwrap())
            .collect();
        assert_eq!(row[0], row[1], "half a batch: {s}");
        assert_eq!(row[0], row[2], "half a batch: {s}");
        assert!(
            row[0] >= last,
            "the checkpoint went back: {last} then {}",
            row[0]
        );
        last = row[0];
        seen.insert(row[0]);
    }
    assert!(seen.len() > 3, "the loop saw too few checkpoints: {seen:?}");
    assert!(last >= 1500, "the loop never saw the later batches: {last}");
}

#[test]
fn accounts_health_metrics_tls_and_shutdown() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    publish_lines(&server, &data, &minute_events("a", 0, 50));
    until_idle(&server, &data);
    let users = dir.path().join("users.toml");

    // `tally users`: the password from stdin; only a verifier on disk.
    let mut add = Command::new(bin());
    add.args(["users", "add", "ops", "--all-tenants", "--users"])
        .arg(&users)
        .env_remove("TALLY_PASSWORD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = add.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"stdin-secret-77\n")
        .unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
    add_user(&users, "t1", "t1-pw-123", &["--tenant", "t1"]);
    let text = std::fs::read_to_string(&users).unwrap();
    assert!(
        text.contains("SCRAM-SHA-256$4096:")
            && !text.contains("stdin-secret-77")
            && !text.contains("t1-pw-123")
    );
    let mut list = Command::new(bin());
    list.args(["users", "list", "--users"]).arg(&users);
    let out = String::from_utf8(run_expect(list, 0).stdout).unwrap();
    assert!(
        out.contains("ops\tall tenants") && out.contains("t1\ttenants: t1"),
        "{out}"
    );
    let mut bad = Command::new(bin());
    bad.args(["users", "add", "x", "--users"])
        .arg(&users)
        .env("TALLY_PASSWORD", "p");
    let err = String::from_utf8(run_expect(bad, 2).stderr).unwrap();
    assert!(
        err.contains("--tenant T") && err.contains("--all-tenants"),
        "{err}"
    );

    // TLS that cannot be used: refuse to start, never plaintext.
    let mut c = tally(&server, &data);
    c.args([
        "serve",
        "--tls-cert",
        "/nonexistent/cert.pem",
        "--tls-key",
        "/nonexistent/key.pem",
        "--users",
    ])
    .arg(&users)
    .args([
        "--pg-listen",
        "127.0.0.1:0",
        "--flight-listen",
        "off",
        "--http-listen",
        "off",
    ]);
    let err = String::from_utf8(run_expect(c, 1).stderr).unwrap();
    assert!(
        err.contains("cannot use the TLS certificate")
            && err.contains("never falls back to plaintext"),
        "{err}"
    );

    // TLS that can: psql with sslmode=require.
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl is needed for the TLS test");
    assert!(ok.success());
    let mut serve = Serve::start(
        &server,
        &data,
        &users,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--stale-after",
            "1",
        ],
    );
    let tls_dsn = serve
        .dsn("ops", "stdin-secret-77")
        .replace("sslmode=disable", "sslmode=require");
    let (code, out, err) = psql(&tls_dsn, &["-c", "SELECT count(*) FROM events"], dir.path());
    assert_eq!((code, out.trim()), (0, "50"), "{err}");

    // A user added while serving can log in; a removed one's session ends
    // at its next query.
    add_user(&users, "late", "late-pw-1", &["--all-tenants"]);
    let mut session = Command::new("psql")
        .arg(serve.dsn("late", "late-pw-1"))
        .args(["-X", "-A", "-t", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = session.stdin.take().unwrap();
    stdin.write_all(b"SELECT 'before';\n").unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let mut rm = Command::new(bin());
    rm.args(["users", "remove", "late", "--users"]).arg(&users);
    run_expect(rm, 0);
    stdin.write_all(b"SELECT 'after';\n").unwrap();
    drop(stdin);
    let out = session.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stdout.contains("before") && !stdout.contains("after"),
        "{stdout}"
    );
    assert!(stderr.contains("account late was removed"), "{stderr}");

    // /healthz: open, ok while the checkpoint keeps up.
    let health = |serve: &Serve| -> (u16, String) {
        let out = client(
            "http",
            &json!({"url": format!("http://127.0.0.1:{}/healthz", serve.http)}),
        );
        (
            out["status"].as_u64().unwrap() as u16,
            out["body"].as_str().unwrap_or("").to_owned(),
        )
    };
    assert_eq!(health(&serve), (200, "ok\n".to_owned()));

    // /metrics: Basic auth, all tenants only, parsed by prometheus_client.
    let url = format!("http://127.0.0.1:{}/metrics", serve.http);
    let anon = client("prometheus", &json!({"url": url}));
    assert_eq!(anon["status"], 401);
    let tenant = client(
        "prometheus",
        &json!({"url": url, "user": "t1", "password": "t1-pw-123"}),
    );
    assert_eq!(tenant["status"], 403);
    let scrape = || {
        client(
            "prometheus",
            &json!({"url": url, "user": "ops", "password": "stdin-secret-77"}),
        )
    };
    let first = scrape();
    assert_eq!(first["status"], 200, "{first}");
    let s = &first["samples"];
    assert_eq!(s["tally_checkpoint_sequence{}"], 50.0, "{s}");
    assert_eq!(s["tally_stream_last_sequence{}"], 50.0);
    assert_eq!(s["tally_lag_messages{}"], 0.0);
    assert_eq!(s["tally_messages_accepted_total{}"], 50.0);
    let served = s["tally_serve_queries_total{protocol=pgwire}"]
        .as_f64()
        .unwrap();
    assert!(served >= 2.0, "{s}");
    assert!(
        s["tally_serve_query_duration_seconds_count{protocol=pgwire}"]
            .as_f64()
            .unwrap()
            >= served
    );
    // They move: more queries, more messages.
    psql(&tls_dsn, &["-c", "SELECT 1"], dir.path());
    std::thread::sleep(Duration::from_millis(1500));
    publish_lines(&server, &data, &minute_events("z", 60, 5));
    let second = scrape();
    let s2 = &second["samples"];
    assert!(
        s2["tally_serve_queries_total{protocol=pgwire}"]
            .as_f64()
            .unwrap()
            > served
    );
    assert_eq!(s2["tally_stream_last_sequence{}"], 55.0);
    assert_eq!(s2["tally_lag_messages{}"], 5.0);

    // The checkpoint now trails the stream's last message by more than
    // --stale-after: /healthz says so.
    let (code, body) = health(&serve);
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("stale") && body.contains("tally run"),
        "{body}"
    );
    until_idle(&server, &data);
    assert_eq!(health(&serve).0, 200);

    // SIGTERM: exit 0.
    assert!(serve.terminate().success(), "{}", serve.log());
}
