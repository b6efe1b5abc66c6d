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
    NatsServer, api_calls, bin, generated, publish_lines, run_expect, tally, until_idle,
};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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
        for _ in 0..5 {
            let (pg, flight, http) = (free_port(), free_port(), free_port());
            let log = data.with_extension(format!("serve-{pg}.log"));
            let mut c = tally(server, data);
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

fn rows(step: &Value) -> Vec<Vec<Option<String>>> {
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

fn sqlstate(step: &Value) -> String {
    step["error"]["sqlstate"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error, got {step}"))
        .to_owned()
}

/// psql with `args`; (exit code, stdout, stderr).
fn psql(dsn: &str, args: &[&str], dir: &Path) -> (i32, String, String) {
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

/// `tally sql` as JSON rows.
fn tally_json(server: &NatsServer, data: &Path, query: &str) -> Vec<Value> {
    let mut c = tally(server, data);
    c.args(["sql", query, "--format", "json"]);
    serde_json::from_slice(&run_expect(c, 0).stdout).unwrap()
}

fn add_user(users: &Path, name: &str, password: &str, scope: &[&str]) {
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
fn saas(server: &NatsServer, dir: &Path) -> PathBuf {
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
        assert!(out.contains(&format!("|{view}|")), "\\d lacks {view}:\n{out}");
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
        &["-c", "SELECT sum FROM usage WHERE tenant = 'tbig' AND granularity = 'month'"],
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
            format!("{},{},{s}", row["tenant"].as_str().unwrap(), row["metric"].as_str().unwrap())
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
        assert_eq!(rows(step), vec![vec![Some("t0003".into()), Some(expected_n.clone())]]);
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
    assert_eq!(columns.len(), 11, "{columns:?}");
    assert!(columns.iter().any(|c| c[0].as_deref() == Some("sum")), "{columns:?}");
    assert!(rows(&steps[5])[0][0].as_deref().unwrap().starts_with("PostgreSQL 16"));
    assert_eq!(rows(&steps[6]), vec![vec![Some("UTC".into())]]);
    assert!(rows(&steps[7]).iter().any(|r| r[1].as_deref() == Some("usage")));

    // pgjdbc: a PreparedStatement run until it is server-prepared,
    // metadata as DBeaver and Metabase read it, a refused write.
    let jar = std::env::var("TALLY_PGJDBC_JAR").unwrap_or_else(|_| "/usr/share/java/postgresql.jar".into());
    let out = Command::new("java")
        .args(["-cp", &jar])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/system/clients/Jdbc.java"))
        .arg(format!("jdbc:postgresql://127.0.0.1:{}/tally", serve.pg))
        .args(["ops", "ops-pw", "tbig"])
        .output()
        .expect("java (OpenJDK) is needed: run deploy/install-clients.sh");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
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
    assert!(text.contains(&format!("CHECKPOINT\t{checkpoint}")), "{text}");
    assert!(text.contains("TABLE\tusage") && text.contains("TABLE\tmrr_waterfall"), "{text}");
    assert!(text.contains("COLUMN\tsum\tnumeric") && text.contains("COLUMN\twindow_start\ttimestamptz"), "{text}");
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
        "is_final: bool not null",
    ]);
    assert_eq!(adbc["steps"][0]["schema"], usage_schema);
    assert_eq!(adbc["table_schema"], usage_schema);
    assert_eq!(adbc["steps"][0]["rows"][0][6], json!(BIG));
    let events = tally_json(&server, &data, "SELECT count(*) AS n FROM events")[0]["n"].to_string();
    assert_eq!(adbc["steps"][1]["rows"], json!([[events]]));
    assert!(adbc["steps"][2]["error"].as_str().unwrap().contains("read-only"), "{adbc}");
    let tables: Vec<&str> = adbc["tables"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    for view in ["usage", "mrr_waterfall", "events", "_tally_clock"] {
        assert!(tables.contains(&view), "{tables:?}");
    }
    let flight = client(
        "flight",
        &json!({"uri": format!("grpc://127.0.0.1:{}", serve.flight), "user": "ops", "password": "ops-pw"}),
    );
    assert!(flight["token"].as_str().unwrap().starts_with("Bearer "), "{flight}");
    let flight = client(
        "flight",
        &json!({"uri": format!("grpc://127.0.0.1:{}", serve.flight), "user": "ops", "password": "wrong"}),
    );
    assert!(flight["error"].as_str().unwrap().contains("Unauthenticated"), "{flight}");
}
