//! `tally serve` against a hostile account: statements that would end or
//! stall the server, a search over every function it registers under an
//! address-space limit, what a tenant account can learn of other tenants'
//! volume, a cursor that outlives a narrowed account, what the SCRAM
//! exchange tells of unknown user names, an account that opens every
//! connection it can, a refused connection that says nothing, and a query
//! past its time that must stop its work.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{
    NatsServer, api_calls, bin, generated, publish_lines, run_expect, sql, tally, until_idle,
};
use crate::serve::{Serve, add_user, client, psql, psql_until_answered, psycopg, rows, sqlstate};

/// The address space the server gets in these tests: room for its
/// threads' stacks and a query's memory, far from the 16 GiB one
/// unbounded function call asks for.
const ADDRESS_LIMIT: u64 = 6 << 30;

/// A nats-server, `tenants` generated tenants over 3 months in views, and a
/// users file with the all-tenant account `ops` (password `ops-pw`).
struct World {
    server: NatsServer,
    data: PathBuf,
    users: PathBuf,
    _dir: tempfile::TempDir,
}

fn world(tenants: u32) -> World {
    world_of(tenants, 3, 17)
}

/// [`world`] of `tenants` generated over `months` with `seed`.
fn world_of(tenants: u32, months: u32, seed: u64) -> World {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = generated(dir.path(), tenants, months, seed);
    let mut p = tally(&server, &data);
    p.arg("publish").arg(&file);
    run_expect(p, 0);
    until_idle(&server, &data);
    let users = dir.path().join("users.toml");
    add_user(&users, "ops", "ops-pw", &["--all-tenants"]);
    World {
        server,
        data,
        users,
        _dir: dir,
    }
}

fn health_ms(serve: &Serve) -> (u64, u128) {
    let started = Instant::now();
    let out = client(
        "http",
        &json!({"url": format!("http://127.0.0.1:{}/healthz", serve.http)}),
    );
    (
        out["status"].as_u64().unwrap(),
        started.elapsed().as_millis(),
    )
}

#[test]
fn no_function_call_can_take_the_servers_memory() {
    let World {
        server,
        data,
        users,
        _dir,
    } = world(10);
    let serve = Serve::start_limited(
        &server,
        &data,
        &users,
        &["--memory-limit", "256M"],
        Some(ADDRESS_LIMIT),
    );
    let dsn = serve.dsn("ops", "ops-pw");
    let over_budget = [
        "SELECT array_repeat(1, 2147483647)",
        "SELECT repeat('ab', 2147483647)",
        "SELECT lpad('x', 2147483647)",
        "SELECT range(0, 9000000000000000000)",
        "SELECT array_resize(make_array(1), 2147483647, 0)",
        "SELECT replace(repeat('a', 600000), '', repeat('b', 600000))",
        "SELECT repeat(id, 200000) FROM events",
        "SELECT string_agg(id, repeat(',', 100000)) FROM events",
        "SELECT arrow_cast(1, 'FixedSizeList(2147483647, Int64)')",
        "SELECT CAST(make_array(1) AS INT[2147483647])",
        "SELECT array_agg(repeat(id, 100000)) FROM events",
    ];
    let mut steps: Vec<Value> = over_budget.iter().map(|s| json!({"sql": s})).collect();
    steps.push(json!({"sql": "SELECT count(*) FROM events"}));
    let out = psycopg(&dsn, Value::Array(steps));
    for (i, q) in over_budget.iter().enumerate() {
        let state = sqlstate(&out[i]);
        assert!(
            state == "53200" || (q.contains("INT[") && state.starts_with("42")),
            "{q}: {}",
            out[i]
        );
        let message = out[i]["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{q}: no message");
    }
    assert!(rows(&out[over_budget.len()])[0][0].is_some());
    assert_eq!(health_ms(&serve).0, 200, "{}", serve.log());
}

#[test]
fn planning_is_bounded_isolated_and_counts_against_the_timeout() {
    let World {
        server,
        data,
        users,
        _dir,
    } = world(10);
    add_user(&users, "other", "other-pw", &["--tenant", "t0002"]);
    let serve = Serve::start(&server, &data, &users, &["--query-timeout", "3"]);
    let dsn = serve.dsn("ops", "ops-pw");

    // Too large to plan quickly: refused at once with 54001.
    let union = vec!["SELECT 1 AS a"; 3200].join(" UNION ALL ");
    let joins = format!(
        "SELECT count(*) FROM events e0 {}",
        (1..70)
            .map(|i| format!("JOIN events e{i} ON e{i}.id = e0.id"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let started = Instant::now();
    let out = psycopg(&dsn, json!([{"sql": union}, {"sql": joins}]));
    assert_eq!(sqlstate(&out[0]), "54001", "{}", out[0]);
    assert_eq!(sqlstate(&out[1]), "54001", "{}", out[1]);
    assert!(started.elapsed() < Duration::from_secs(5));

    // Within the limits but slow to plan (a chain of 990 additions takes
    // seconds in DataFusion's planner): the timeout covers planning, and
    // meanwhile health and another account's query answer at once.
    let chain = format!("SELECT {}", vec!["1"; 990].join(" + "));
    let slow_dsn = dsn.clone();
    let slow = std::thread::spawn(move || {
        let started = Instant::now();
        let out = psycopg(&slow_dsn, json!([{"sql": chain}, {"sql": chain}]));
        (out, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(1500));
    let (status, ms) = health_ms(&serve);
    assert_eq!(status, 200);
    assert!(ms < 1500, "/healthz took {ms} ms while a query planned");
    let started = Instant::now();
    let other = psycopg(
        &serve.dsn("other", "other-pw"),
        json!([{"sql": "SELECT count(*) FROM usage"}]),
    );
    assert!(rows(&other[0])[0][0].is_some());
    let other_ms = started.elapsed().as_millis();
    assert!(
        other_ms < 2500,
        "another account waited {other_ms} ms behind the planning"
    );
    let (out, took) = slow.join().unwrap();
    for step in &out {
        // Planned in time on a fast machine, or stopped by the timeout.
        if step.get("error").is_some() {
            assert_eq!(sqlstate(step), "57014", "{step}");
        }
    }
    assert!(
        took < Duration::from_secs(20),
        "two statements with a 3 s timeout took {took:?}"
    );
}

/// A tenant's query that never pauses (a cross join feeding an aggregate)
/// and runs out of time stops its work: the queries after it, of any
/// account, are answered as if it had never run.
#[test]
fn a_query_past_its_time_stops_its_work() {
    // 50 tenants over 6 months: the tenant's 600-odd events four times
    // over, about 10^11 rows, split over the query runtime's workers.
    let World {
        server,
        data,
        users,
        _dir,
    } = world_of(50, 6, 1);
    add_user(&users, "acme", "acme-pw", &["--tenant", "t0001"]);
    let serve = Serve::start(&server, &data, &users, &["--query-timeout", "2"]);
    let cross = "SELECT count(*) FROM events a, events b, events c, events d";
    let out = psycopg(
        &serve.dsn("acme", "acme-pw"),
        json!([{"sql": cross}, {"sql": cross}]),
    );
    assert_eq!(sqlstate(&out[0]), "57014", "{}", out[0]);
    assert_eq!(sqlstate(&out[1]), "57014", "{}", out[1]);
    let scan = json!({"sql": "SELECT count(*), sum(length(data)) FROM events"});
    let started = Instant::now();
    let answers = psycopg(
        &serve.dsn("ops", "ops-pw"),
        json!([scan.clone(), scan.clone(), scan]),
    );
    for a in &answers {
        assert!(
            a.get("error").is_none(),
            "a scan after the stopped queries: {a}"
        );
        assert!(rows(a)[0][0].is_some());
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "three scans took {took:?} after the stopped queries"
    );
}

/// Every scalar, aggregate, window and table function the server lists,
/// with extreme arguments, against a server under an address-space limit,
/// within a time bound; the server answers afterwards.
#[test]
fn every_function_with_extreme_arguments_leaves_the_server_answering() {
    let World {
        server,
        data,
        users,
        _dir,
    } = world(5);
    let serve = Serve::start_limited(
        &server,
        &data,
        &users,
        &["--memory-limit", "512M", "--query-timeout", "5"],
        Some(ADDRESS_LIMIT),
    );
    let nested = format!("{}1{}", "make_array(".repeat(12), ")".repeat(12));
    let extremes = [
        "0",
        "-1",
        "2147483647",
        "-2147483648",
        "9223372036854775807",
        "-9223372036854775808",
        "NULL",
        "''",
        "repeat('x', 1000000)",
        "'%'",
        "make_array(1, 2, 3)",
        "range(100000)",
        nested.as_str(),
        "1e308",
        "DATE '9999-12-31'",
        "TIMESTAMP '1677-09-21 00:12:44'",
        "INTERVAL '100000 years'",
        "'\u{1F980}'",
    ];
    let deep = [
        format!("SELECT {}", vec!["1"; 999].join(" + ")),
        format!("SELECT {}1{}", "(".repeat(5000), ")".repeat(5000)),
        // Exponential in the Postgres-dialect parser: refused on its text.
        format!("SELECT {}1{}", "make_array(".repeat(40), ")".repeat(40)),
        format!("SELECT {}", vec!["'a'"; 900].join(" || ")),
        // Table functions (information_schema lists scalar, aggregate and
        // window functions).
        "SELECT * FROM generate_series(1, 9223372036854775807) LIMIT 3".to_owned(),
        "SELECT * FROM range(-9223372036854775808, 9223372036854775807, 1) LIMIT 3".to_owned(),
        "SELECT count(*) FROM generate_series(1, 1000000000000)".to_owned(),
        "SELECT * FROM unnest(range(100000000)) LIMIT 3".to_owned(),
        "SELECT * FROM generate_series(TIMESTAMP '1970-01-01', TIMESTAMP '2200-01-01', INTERVAL '1 microsecond') LIMIT 3".to_owned(),
    ];
    let out = client(
        "fuzz",
        &json!({
            "dsn": serve.dsn("ops", "ops-pw"),
            "extremes": extremes,
            "normal": "1",
            "max_arity": 3,
            "check_every": 500,
            "seconds": 300,
            "deep": deep,
        }),
    );
    eprintln!("function search: {out}");
    assert!(out["lost"].is_null(), "{out}\n{}", serve.log());
    assert_eq!(out["alive"], true, "{}", serve.log());
    assert!(out["functions"].as_u64().unwrap() > 200, "{out}");
    assert!(out["tried"].as_u64().unwrap() > 5_000, "{out}");
}

/// Polls `sql` (one cell) until it answers `want`: a session answers from
/// the checkpoint it has while it opens the newer one.
fn wait_for(dsn: &str, sql: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = psycopg(dsn, json!([{"sql": sql}]));
        if rows(&out[0])[0][0].as_deref() == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql} never gave {want}: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_tenant_account_learns_nothing_of_other_tenants_volume() {
    let World {
        server,
        data,
        users,
        _dir,
    } = world(12);
    add_user(&users, "acme", "acme-pw", &["--tenant", "t0003"]);
    let serve = Serve::start(&server, &data, &users, &[]);
    let acme = serve.dsn("acme", "acme-pw");
    let look = |dsn: &str| {
        psycopg(
            dsn,
            json!([
                {"sql": "SELECT checkpoint_seq - count(*) FROM events, _tally_clock GROUP BY checkpoint_seq"},
                {"sql": "SELECT min(stream_seq), max(stream_seq), count(*), count(DISTINCT stream_seq) FROM events"},
                {"sql": "SELECT checkpoint_seq FROM _tally_clock"},
                {"sql": "SELECT first_seq, last_seq, messages FROM _tally_gaps"},
                {"sql": "SELECT id FROM events ORDER BY stream_seq"},
            ]),
        )
    };
    let before = look(&acme);
    assert_eq!(rows(&before[0]), vec![vec![Some("0".into())]]);
    let n = rows(&before[2])[0][0].clone().unwrap();
    assert_eq!(
        rows(&before[1]),
        vec![vec![
            Some("1".into()),
            Some(n.clone()),
            Some(n.clone()),
            Some(n.clone())
        ]]
    );
    let page = client(
        "http",
        &json!({"url": format!("http://acme:acme-pw@127.0.0.1:{}/api/tenants/t0003", serve.http)}),
    );
    let page: Value = serde_json::from_str(page["body"].as_str().unwrap()).unwrap();
    assert_eq!(page["checkpoint_seq"].to_string(), n, "{page}");

    // Other tenants publish (moving the stream clock, which all share):
    // nothing else the account sees moves.
    let others: Vec<String> = (0..50)
        .map(|i| api_calls(&format!("o{i}"), "t0005", "2026-11-20T00:00:00Z", "1"))
        .collect();
    publish_lines(&server, &data, &others);
    until_idle(&server, &data);
    wait_for(
        &acme,
        "SELECT CAST(stream_clock AS VARCHAR) LIKE '2026-11-20%' FROM _tally_clock",
        "True",
    );
    let after = look(&acme);
    for i in [0, 1, 2, 4] {
        assert_eq!(rows(&after[i]), rows(&before[i]), "step {i}");
    }

    // Its own event: the next position, and "since I last looked" works.
    publish_lines(
        &server,
        &data,
        &[api_calls("mine-1", "t0003", "2026-11-20T00:00:00Z", "1")],
    );
    until_idle(&server, &data);
    let n1 = (n.parse::<u64>().unwrap() + 1).to_string();
    wait_for(&acme, "SELECT checkpoint_seq FROM _tally_clock", &n1);
    let next = psycopg(
        &acme,
        json!([
            {"sql": "SELECT checkpoint_seq FROM _tally_clock"},
            {"sql": format!("SELECT id, stream_seq FROM events WHERE stream_seq > {n}")},
        ]),
    );
    assert_eq!(rows(&next[0]), vec![vec![Some(n1.clone())]]);
    assert_eq!(rows(&next[1]), vec![vec![Some("mine-1".into()), Some(n1)]]);

    // `tally sql` (every tenant) still shows stream sequences.
    let all = sql(
        &server,
        &data,
        "SELECT (SELECT checkpoint_seq FROM _tally_clock) - (SELECT max(stream_seq) FROM events)",
    );
    assert_eq!(all, vec![vec!["0".to_owned()]]);
}

#[test]
fn a_cursor_does_not_outlive_a_narrowed_account() {
    let World {
        server,
        data,
        users,
        _dir,
    } = world(8);
    let serve = Serve::start(&server, &data, &users, &[]);
    let out = client(
        "narrowed",
        &json!({
            "dsn": serve.dsn("ops", "ops-pw"),
            "declare": "DECLARE c CURSOR FOR SELECT tenant FROM usage ORDER BY tenant",
            "between": [bin(), "users", "add", "ops", "--tenant", "t0003", "--users", users],
            "env": {"TALLY_PASSWORD": "ops-pw", "PATH": std::env::var("PATH").unwrap()},
        }),
    );
    assert_eq!(out["first"].as_array().unwrap().len(), 2, "{out}");
    assert_eq!(out["error"]["sqlstate"], "42501", "{out}");
    assert!(out.get("after").is_none(), "{out}");
}

/// A cancel request with the session's key (psycopg's `cancel()`) stops
/// the statement it runs with `57014`, and the session goes on.
#[test]
fn a_cancel_request_stops_the_running_statement() {
    let World {
        server,
        data,
        users,
        _dir,
    } = world(8);
    let serve = Serve::start(&server, &data, &users, &["--query-timeout", "60"]);
    let out = client(
        "cancel",
        &json!({
            "dsn": serve.dsn("ops", "ops-pw"),
            "sql": "SELECT count(*) FROM events a, events b, events c, events d WHERE a.data <> b.data",
            "after": 1.0,
            "then": "SELECT count(*) FROM tenants",
        }),
    );
    assert_eq!(out["error"]["sqlstate"], "57014", "{out}");
    let took = out["seconds"].as_f64().unwrap();
    assert!(took < 10.0, "the cancelled statement took {took} s");
    assert_eq!(out["then"][0][0], "8", "{out}");
}

/// A session's cursors are bounded: at most 64 open, and their rows
/// together within its share of `--memory-limit` (the limit shared by
/// `--max-connections`), so that no account holds the server's memory in
/// cursors it never fetches.
#[test]
fn a_sessions_cursors_are_bounded() {
    let World {
        server,
        data,
        users,
        _dir,
    } = world(8);
    let serve = Serve::start(
        &server,
        &data,
        &users,
        &["--memory-limit", "64M", "--max-connections", "16"],
    );
    let mut steps: Vec<Value> = (0..65)
        .map(|i| json!({"sql": format!("DECLARE c{i} CURSOR FOR SELECT tenant FROM tenants")}))
        .collect();
    steps.push(json!({"sql": "CLOSE ALL"}));
    // A few MiB of rows: more than this session's 4 MiB share.
    steps.push(json!({"sql": "DECLARE big CURSOR FOR SELECT a.data, b.data FROM events a, events b LIMIT 30000"}));
    steps.push(json!({"sql": "DECLARE small CURSOR FOR SELECT tenant FROM tenants"}));
    steps.push(json!({"sql": "FETCH 2 FROM small"}));
    let out = psycopg(&serve.dsn("ops", "ops-pw"), json!(steps));
    for step in &out[..64] {
        assert!(step.get("error").is_none(), "{step}");
    }
    assert_eq!(sqlstate(&out[64]), "53000", "{}", out[64]);
    assert_eq!(sqlstate(&out[66]), "53200", "{}", out[66]);
    assert!(
        out[66]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--memory-limit"),
        "{}",
        out[66]
    );
    assert_eq!(rows(&out[68]).len(), 2, "{}", out[68]);
}

#[test]
fn a_sessions_prepared_statements_are_checked_and_bounded() {
    let World {
        server,
        data,
        users,
        _dir,
    } = world(2);
    let serve = Serve::start(&server, &data, &users, &[]);
    let query = "SELECT count(*) FROM tenants WHERE tenant = $1";
    let mut steps = vec![
        json!({"do": "prepare", "name": "s1", "sql": query}),
        json!({"do": "prepare", "name": "s1", "sql": "SELECT 1"}),
        json!({"do": "execute", "name": "s1", "params": ["t0001", "t0002"]}),
        json!({"do": "execute", "name": "s1", "params": []}),
        json!({"do": "execute", "name": "s1", "params": ["t0001"], "formats": [7]}),
        json!({"do": "execute", "name": "s1", "params": ["t0001"]}),
        json!({"do": "sql", "sql": "DEALLOCATE s1"}),
        json!({"do": "sql", "sql": "DEALLOCATE s1"}),
        json!({"do": "prepare", "name": "s1", "sql": "SELECT 1"}),
        json!({"do": "execute", "name": "nothing", "params": []}),
    ];
    let before = steps.len();
    steps.extend(
        (0..1024).map(|i| json!({"do": "prepare", "name": format!("p{i}"), "sql": "SELECT 1"})),
    );
    steps.push(json!({"do": "sql", "sql": "DEALLOCATE ALL"}));
    steps.push(json!({"do": "prepare", "name": "p0", "sql": "SELECT 1"}));
    let out = client(
        "protocol",
        &json!({"dsn": serve.dsn("ops", "ops-pw"), "steps": steps}),
    );
    let states: Vec<&str> = out["states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(
        states[..before],
        [
            "ok", "42P05", "08P01", "08P01", "22023", "ok", "ok", "26000", "ok", "26000"
        ],
        "{out}"
    );
    // s1 and 1,023 more fit; the 1,025th named statement is refused.
    let prepared = &states[before..before + 1024];
    assert!(prepared[..1023].iter().all(|s| *s == "ok"), "{out}");
    assert_eq!(prepared[1023], "53000", "{out}");
    assert_eq!(states[before + 1024..], ["ok", "ok"], "{out}");
    assert_eq!(out["alive"], json!(true), "{out}");
}

/// Sockets that open the HTTP and Flight ports and send nothing (or half
/// a request) hold at most `--max-connections` descriptors each, are
/// closed once nothing was answered on them for the query timeout and a
/// margin, and never keep pgwire from answering.
#[test]
fn silent_sockets_cannot_take_the_servers_descriptors() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let World {
        server,
        data,
        users,
        _dir,
    } = world(2);
    let serve = Serve::start(
        &server,
        &data,
        &users,
        &["--max-connections", "4", "--query-timeout", "1"],
    );
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", serve.pid()))
            .unwrap()
            .count()
    };
    let before = fds();
    let mut silent = Vec::new();
    for _ in 0..60 {
        for port in [serve.http, serve.flight] {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            // Half a request: a header that never ends.
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            silent.push(s);
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let during = fds();
    assert!(
        during <= before + 8 + 2,
        "{before} descriptors before, {during} with 120 silent sockets"
    );
    let started = Instant::now();
    let (code, out, err) = psql(
        &serve.dsn("ops", "ops-pw"),
        &["-c", "SELECT 1"],
        _dir.path(),
    );
    assert_eq!((code, out.trim()), (0, "1"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The server closes what it accepted once nothing was answered on it
    // for the query timeout (1 s) and 15 s.
    let mut first = silent.remove(0);
    first
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 64];
    let waited = Instant::now();
    let closed = matches!(first.read(&mut buf), Ok(0) | Err(_));
    assert!(
        closed && waited.elapsed() < Duration::from_secs(25),
        "{:?}",
        waited.elapsed()
    );
    drop(silent);
    let (status, ms) = health_ms(&serve);
    assert_eq!(status, 200);
    assert!(ms < 5_000, "{ms} ms");
}

/// One account's page loads hold at most `--max-connections-per-account`
/// of the server's query work at once; the rest are told to come back
/// (`429`), and another account's page still answers.
#[test]
fn one_accounts_page_loads_are_bounded() {
    let World {
        server,
        data,
        users,
        _dir,
    } = world(4);
    add_user(&users, "acme", "acme-pw", &["--tenant", "t0003"]);
    let serve = Serve::start(
        &server,
        &data,
        &users,
        &[
            "--max-connections-per-account",
            "2",
            "--max-connections",
            "16",
        ],
    );
    let url = format!(
        "http://acme:acme-pw@127.0.0.1:{}/api/tenants/t0003",
        serve.http
    );
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let out = client("http", &json!({"url": url, "parallel": 32}));
        statuses.extend(out.as_array().unwrap().iter().map(|r| {
            let status = r["status"].as_u64().unwrap();
            if status == 429 {
                assert!(
                    r["body"]
                        .as_str()
                        .unwrap()
                        .contains("--max-connections-per-account"),
                    "{r}"
                );
            }
            status
        }));
        if statuses.contains(&429) {
            break;
        }
    }
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    // While the tenant's loads go on, past the door's limit of
    // connections too, another account's page still gets in: a refused
    // request's connection is closed, so it gives its place up.
    let flood = std::thread::spawn(move || {
        client("http", &json!({"url": url, "loops": 48, "seconds": 15}))
    });
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let ops = client(
        "http",
        &json!({"url": format!("http://ops:ops-pw@127.0.0.1:{}/api/dashboard", serve.http)}),
    );
    assert_eq!(ops["status"], json!(200), "{ops}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let counts = flood.join().unwrap();
    assert!(counts.get("429").is_some(), "{counts}");
}

#[test]
fn an_unknown_users_salt_is_stable_across_restarts() {
    let World {
        server,
        data,
        users,
        _dir,
    } = world(2);
    let salt = |serve: &Serve, user: &str| -> Value {
        client(
            "scram_salt",
            &json!({"host": "127.0.0.1", "port": serve.pg, "user": user}),
        )
    };
    let serve = Serve::start(&server, &data, &users, &[]);
    let first = (
        salt(&serve, "ghost"),
        salt(&serve, "ops"),
        salt(&serve, "ghost2"),
    );
    drop(serve);
    let serve = Serve::start(&server, &data, &users, &[]);
    let second = (
        salt(&serve, "ghost"),
        salt(&serve, "ops"),
        salt(&serve, "ghost2"),
    );
    assert!(first.0["salt"].is_string(), "{first:?}");
    assert_eq!(first.0, second.0, "an unknown name's salt changed");
    assert_eq!(first.1, second.1, "a real user's salt changed");
    assert_ne!(
        first.0["salt"], first.2["salt"],
        "two unknown names share a salt"
    );
    assert_eq!(first.0["iterations"], first.1["iterations"]);
}

#[test]
fn one_account_cannot_take_every_connection() {
    let World {
        server,
        data,
        users,
        _dir,
    } = world(8);
    add_user(&users, "acme", "acme-pw", &["--tenant", "t0003"]);
    let serve = Serve::start(
        &server,
        &data,
        &users,
        &[
            "--max-connections",
            "6",
            "--max-connections-per-account",
            "3",
        ],
    );
    let acme = serve.dsn("acme", "acme-pw");
    let dir = tempfile::tempdir().unwrap();
    // Three sessions, each answering before the next starts: all three
    // hold their slots.
    let mut idle: Vec<Child> = (0..3).map(|_| logged_in(&acme, &serve)).collect();
    // The account's fourth session is refused, clearly, before it runs
    // anything.
    let (code, _, refused) = psql(&acme, &["-c", "SELECT 1"], dir.path());
    assert_ne!(code, 0, "a fourth session of the account was let in");
    assert!(
        refused.contains("too many connections for account \"acme\"")
            && refused.contains("--max-connections-per-account")
            && !refused.contains("too many clients"),
        "{refused}"
    );
    // A wrong password at the limit hears only that the password is wrong.
    let (_, _, wrong) = psql(
        &serve.dsn("acme", "not-it-9"),
        &["-c", "SELECT 1"],
        dir.path(),
    );
    assert!(
        wrong.contains("password authentication failed for user \"acme\""),
        "{wrong}"
    );
    // Every other account still gets in and is answered.
    let ops = serve.dsn("ops", "ops-pw");
    let (code, out, err) = psql(&ops, &["-c", "SELECT count(*) > 0 FROM usage"], dir.path());
    assert_eq!((code, out.trim()), (0, "t"), "{err}");
    // A session that ends gives its slot back.
    let mut one = idle.pop().unwrap();
    one.kill().unwrap();
    one.wait().unwrap();
    let answer = psql_until_answered(
        &acme,
        "SELECT 1",
        dir.path(),
        Duration::from_secs(30),
        "the account never got its slot back",
    );
    assert_eq!(answer, "1");
    for c in &mut idle {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    let log = serve.log();
    assert!(
        log.contains("the account holds all the connections it may"),
        "{log}"
    );
}

/// A psql session that has logged in and answered a query, kept open (its
/// standard input stays open) until killed.
fn logged_in(dsn: &str, serve: &Serve) -> Child {
    let mut c = Command::new("psql")
        .arg(dsn)
        .args(["-X", "-q", "-A", "-t"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    c.stdin.as_mut().unwrap().write_all(b"SELECT 1;\n").unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim(),
        "1",
        "the session did not log in: {}",
        serve.log()
    );
    c
}

#[test]
fn a_refused_connection_that_sends_nothing_is_closed() {
    let World {
        server,
        data,
        users,
        _dir,
    } = world(2);
    let serve = Serve::start(&server, &data, &users, &["--max-connections", "1"]);
    let mut held = logged_in(&serve.dsn("ops", "ops-pw"), &serve);
    // Over the limit and silent: refused, and closed after the login limit
    // (15 s) instead of keeping a task and a socket for as long as it likes.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", serve.pg)).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let read = std::io::Read::read(&mut raw, &mut buf);
    assert!(
        matches!(read, Ok(0)),
        "the silent connection was not closed: {read:?} after {:?}",
        started.elapsed()
    );
    held.kill().unwrap();
    held.wait().unwrap();
}
