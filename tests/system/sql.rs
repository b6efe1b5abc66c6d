//! `tally sql`, `tally status` and `tally publish` at their edges, as a
//! user meets them: the built-in `queries/` views from any directory,
//! schema discovery, one checkpoint per query, JSON nulls, refused and
//! bounded queries, bounded input, and exit codes that tell a script the
//! truth.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{
    NatsServer, api_calls, generated, publish_lines, run_expect, sql, sql_u64, status_json, tally,
    until_idle,
};
use crate::metrics::query_views;

/// A data directory with views over a small generated SaaS (10 tenants,
/// 3 months: about 2,000 events).
fn views(server: &NatsServer, dir: &Path) -> PathBuf {
    let data = dir.join("data");
    let file = generated(dir, 10, 3, 7);
    let mut p = tally(server, &data);
    p.arg("publish").arg(&file).stdout(Stdio::null());
    run_expect(p, 0);
    until_idle(server, &data);
    data
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn builtin_views_answer_from_any_directory_and_a_queries_dir_adds_or_replaces() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = views(&server, dir.path());
    let elsewhere = tempfile::tempdir().unwrap();
    assert!(!elsewhere.path().join("queries").exists());
    for view in query_views() {
        let mut c = tally(&server, &data);
        c.current_dir(elsewhere.path())
            .args(["sql", &format!("SELECT count(*) FROM {view}")]);
        let out = run_expect(c, 0);
        assert!(stderr(&out).is_empty(), "{view}: {}", stderr(&out));
    }
    assert!(sql_u64(&server, &data, "SELECT count(*) FROM churn") > 0);

    // The repository's own queries/ replaces nothing: same text, no note.
    let mut c = tally(&server, &data);
    c.current_dir(elsewhere.path())
        .args(["sql", "SELECT count(*) FROM ltv", "--queries"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../queries"));
    assert!(stderr(&run_expect(c, 0)).is_empty());

    // A directory replaces top_tenants and adds a view that uses it (and
    // sorts before it, so it resolves on the second round).
    let extra = tempfile::tempdir().unwrap();
    std::fs::write(
        extra.path().join("top_tenants.sql"),
        "SELECT 42 AS answer\n",
    )
    .unwrap();
    std::fs::write(
        extra.path().join("a_more.sql"),
        "SELECT answer + 1 AS more FROM top_tenants;",
    )
    .unwrap();
    for by_env in [false, true] {
        let mut c = tally(&server, &data);
        c.current_dir(elsewhere.path())
            .args(["sql", "SELECT more FROM a_more", "--format", "csv"]);
        if by_env {
            c.env("TALLY_QUERIES_DIR", extra.path());
        } else {
            c.arg("--queries").arg(extra.path());
        }
        let out = run_expect(c, 0);
        assert_eq!(stdout(&out), "more\n43\n");
        let note = format!(
            "note: view top_tenants from {} replaces the built-in one",
            extra.path().join("top_tenants.sql").display()
        );
        assert_eq!(stderr(&out).trim(), note);
    }

    // A directory that is not there is an error, not an empty set of views.
    let mut c = tally(&server, &data);
    c.args(["sql", "SELECT 1", "--queries"])
        .arg(extra.path().join("missing"));
    let err = stderr(&run_expect(c, 1));
    assert!(
        err.contains("missing") && err.contains("--queries"),
        "{err}"
    );
}

#[test]
fn a_data_directory_without_views_fails_sql_and_status() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("not-run-yet");
    publish_lines(
        &server,
        &data,
        &[api_calls("n1", "acme", "2025-01-01T00:00:00Z", "1")],
    );
    let mut c = tally(&server, &data);
    c.args(["sql", "SELECT count(*) FROM usage"]);
    let out = run_expect(c, 1);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("no views in {}", data.display()))
            && err.contains("TALLY_DATA_DIR")
            && err.contains("tally run"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    // status shows what the stream says, then fails on the missing checkpoint.
    let mut c = tally(&server, &data);
    c.arg("status");
    let out = run_expect(c, 1);
    let text = stdout(&out);
    assert!(text.contains("first 1 last 1 (1 messages)"), "{text}");
    assert!(text.contains("checkpoint        -"), "{text}");
    assert!(text.contains("lag               1 messages"), "{text}");
    assert!(
        stderr(&out).contains("no checkpoint in"),
        "{}",
        stderr(&out)
    );
    let mut c = tally(&server, &data);
    c.args(["status", "--json"]);
    let out = run_expect(c, 1);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"]["stream_last_seq"].as_u64(), Some(1));
    assert!(v["status"]["checkpoint_seq"].is_null());
    assert!(v["status"]["counts"].is_null());
    assert!(v["nats_error"].is_null());
    assert_eq!(v["problems"].as_array().unwrap().len(), 1);
}

#[test]
fn a_run_over_an_empty_stream_leaves_empty_views_not_none() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    until_idle(&server, &data);
    assert_eq!(sql_u64(&server, &data, "SELECT count(*) FROM events"), 0);
    assert_eq!(
        sql_u64(&server, &data, "SELECT checkpoint_seq FROM _tally_clock"),
        0
    );
    status_json(&server, &data);
}

#[test]
fn json_rows_carry_every_column_with_explicit_nulls() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    publish_lines(
        &server,
        &data,
        &[api_calls("j1", "acme", "2025-01-01T00:00:00Z", "1")],
    );
    until_idle(&server, &data);
    let q = "SELECT 'a' AS x, CAST(NULL AS BIGINT) AS y UNION ALL SELECT NULL, 2 ORDER BY y NULLS FIRST";
    let mut c = tally(&server, &data);
    c.args(["sql", q, "--format", "jsonl"]);
    assert_eq!(
        stdout(&run_expect(c, 0)),
        "{\"x\":\"a\",\"y\":null}\n{\"x\":null,\"y\":2}\n"
    );
    let mut c = tally(&server, &data);
    c.args(["sql", q, "--format", "json"]);
    assert_eq!(
        stdout(&run_expect(c, 0)),
        "[{\"x\":\"a\",\"y\":null},{\"x\":null,\"y\":2}]\n"
    );
    // A stored view's NULL column too: `actor` of an event without one.
    let mut c = tally(&server, &data);
    c.args(["sql", "SELECT id, actor FROM events", "--format", "jsonl"]);
    assert_eq!(
        stdout(&run_expect(c, 0)),
        "{\"id\":\"j1\",\"actor\":null}\n"
    );
}

#[test]
fn schema_discovery_works_and_everything_else_stays_refused() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    publish_lines(
        &server,
        &data,
        &[api_calls("s1", "acme", "2025-01-01T00:00:00Z", "1")],
    );
    until_idle(&server, &data);
    let tables: Vec<String> = sql(&server, &data, "SHOW TABLES")
        .into_iter()
        .map(|r| r[2].clone())
        .collect();
    for view in [
        "events",
        "usage",
        "overages",
        "mrr",
        "revenue",
        "tenants",
        "_tally_clock",
    ]
    .into_iter()
    .map(String::from)
    .chain(query_views())
    {
        assert!(tables.contains(&view), "{view} not in {tables:?}");
    }
    let columns: Vec<String> = sql(
        &server,
        &data,
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'usage' ORDER BY ordinal_position",
    )
    .into_iter()
    .map(|r| r[0].clone())
    .collect();
    assert_eq!(
        columns,
        [
            "tenant",
            "metric",
            "granularity",
            "window_start",
            "window_end",
            "events",
            "sum",
            "min",
            "max",
            "last",
            "unique_count",
            "is_final"
        ]
    );
    for q in ["DESCRIBE usage", "SHOW COLUMNS FROM usage"] {
        let rows = sql(&server, &data, q);
        assert!(
            rows.iter().any(|r| r.iter().any(|c| c == "window_start")),
            "{q}: {rows:?}"
        );
    }
    let churn = sql(&server, &data, "DESCRIBE churn");
    assert!(churn.iter().any(|r| r[0] == "nrr"), "{churn:?}");

    for q in [
        "CREATE VIEW v AS SELECT 1",
        "CREATE TABLE t AS SELECT 1",
        "INSERT INTO events SELECT * FROM events",
        "COPY (SELECT 1) TO '/tmp/tally-sql-should-not-exist.csv'",
        "SET datafusion.execution.batch_size = 1",
        "RESET datafusion.execution.batch_size",
    ] {
        let mut c = tally(&server, &data);
        c.args(["sql", q]);
        let err = stderr(&run_expect(c, 1));
        assert!(err.contains("read-only"), "{q}: {err}");
    }
    assert!(!Path::new("/tmp/tally-sql-should-not-exist.csv").exists());
    let mut c = tally(&server, &data);
    c.args(["sql", "SELECT * FROM '/etc/passwd'"]);
    let err = stderr(&run_expect(c, 1));
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn a_query_reads_exactly_the_checkpoint_it_names() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = views(&server, dir.path());
    let checkpoint = status_json(&server, &data)["status"]["checkpoint_seq"]
        .as_u64()
        .unwrap();
    assert_eq!(
        sql_u64(&server, &data, "SELECT checkpoint_seq FROM _tally_clock"),
        checkpoint
    );
    let events = sql_u64(&server, &data, "SELECT count(*) FROM events");
    let tenants = sql_u64(&server, &data, "SELECT count(*) FROM _tenants_versions");
    // A crashed batch's files: written after the checkpoint, never
    // committed. Here, copies of the committed files under the next range.
    for view in ["events", "tenants"] {
        let vdir = data.join("views").join(view);
        let file = std::fs::read_dir(&vdir).unwrap().next().unwrap().unwrap();
        let leftover = vdir.join(format!(
            "seq-{:020}-{:020}.parquet",
            checkpoint + 1,
            checkpoint + 50
        ));
        std::fs::copy(file.path(), leftover).unwrap();
    }
    assert_eq!(
        sql_u64(&server, &data, "SELECT count(*) FROM events"),
        events
    );
    assert_eq!(
        sql_u64(&server, &data, "SELECT count(*) FROM _tenants_versions"),
        tenants
    );
}

/// SQL too long for one command-line argument goes through `-f`.
fn sql_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn deeply_nested_expressions_fail_alone_or_answer() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    publish_lines(
        &server,
        &data,
        &[
            api_calls("d1", "acme", "2025-01-01T00:00:00Z", "1"),
            api_calls("d2", "acme", "2025-01-01T00:01:00Z", "1"),
        ],
    );
    until_idle(&server, &data);
    let plus = format!("SELECT {}", vec!["1"; 5000].join("+"));
    let ors = format!(
        "SELECT count(*) FROM events WHERE {}",
        (0..5000)
            .map(|i| format!("tenant = 't{i}'"))
            .collect::<Vec<_>>()
            .join(" OR ")
    );
    for (name, q) in [("plus.sql", plus), ("ors.sql", ors)] {
        let mut c = tally(&server, &data);
        c.args(["sql", "-f"]).arg(sql_file(dir.path(), name, &q));
        let out = c.output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("nest more than 1000 levels") && err.contains("IN ("),
            "{name}: {err}"
        );
    }
    // Below the limit, a chain evaluated per row (not folded to a constant)
    // answers, on the query threads' stacks.
    let terms = vec!["stream_seq"; 400].join(" + ");
    let q = format!("SELECT sum({terms}) FROM events");
    let mut c = tally(&server, &data);
    c.args(["sql", "--format", "csv", "-f"])
        .arg(sql_file(dir.path(), "sum.sql", &q));
    // Stream sequences 1 and 2, each added 400 times.
    let out = stdout(&run_expect(c, 0));
    assert_eq!(out.lines().last(), Some("1200"), "{out}");
}

#[test]
fn a_query_over_the_memory_limit_fails_with_a_clear_error() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = views(&server, dir.path());
    let q = "SELECT count(DISTINCT a.id || b.id) FROM events a CROSS JOIN events b";
    for by_env in [false, true] {
        let mut c = tally(&server, &data);
        c.args(["sql", q]);
        if by_env {
            c.env("TALLY_MEMORY_LIMIT", "8M");
        } else {
            c.args(["--memory-limit", "8388608"]);
        }
        let err = stderr(&run_expect(c, 1));
        assert!(
            err.contains("over the memory limit (8388608 bytes)") && err.contains("--memory-limit"),
            "{err}"
        );
    }
    let mut c = tally(&server, &data);
    c.args(["sql", "SELECT 1", "--memory-limit", "lots"]);
    let err = stderr(&run_expect(c, 2));
    assert!(err.contains("512M"), "{err}");
}

/// Peak resident memory of a running process, in KiB; `None` once it has
/// exited (a zombie's status has no memory lines).
fn peak_rss_kib(child: &Child) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[test]
fn publish_does_not_buffer_a_line_over_the_limit() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // `head -c 20000000 /dev/zero | tally publish -`, fed by hand so the
    // peak memory can be read while the process still runs.
    let mut p = tally(&server, &data);
    p.args(["publish", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = p.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let chunk = vec![0u8; 1 << 20];
    stdin.write_all(&chunk).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = peak_rss_kib(&child).unwrap();
    let mut written = chunk.len();
    while written < 20_000_000 {
        let n = chunk.len().min(20_000_000 - written);
        stdin.write_all(&chunk[..n]).unwrap();
        written += n;
    }
    // All but a pipe's and a read buffer's worth has been read by now.
    let after = peak_rss_kib(&child).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("line 1: too_large: line is 20000000 bytes, over the 262144-byte limit"),
        "{err}"
    );
    assert!(
        stdout(&out).contains("lines 1  published 0"),
        "{}",
        stdout(&out)
    );
    assert!(
        after < before + 8 * 1024,
        "peak memory grew from {before} KiB to {after} KiB while reading one 20 MB line"
    );
}

#[test]
fn publish_skips_a_too_large_line_and_goes_on() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("in.jsonl");
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(300 * 1024));
    let good = api_calls("g1", "acme", "2025-01-01T00:00:00Z", "1");
    std::fs::write(&file, format!("{big}\n{good}\n")).unwrap();
    let mut c = tally(&server, &data);
    c.arg("publish").arg(&file);
    let out = run_expect(c, 1);
    assert!(
        stderr(&out).contains("line 1: too_large"),
        "{}",
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("lines 2  published 1"),
        "{}",
        stdout(&out)
    );
    // --allow-invalid cannot send it either, and says so.
    let mut c = tally(&server, &data);
    c.arg("publish").arg("--allow-invalid").arg(&file);
    let out = run_expect(c, 1);
    let err = stderr(&out);
    assert!(
        err.contains("not sent even with --allow-invalid")
            && err.contains("1 of 2 lines were over the 262144-byte limit"),
        "{err}"
    );
    until_idle(&server, &data);
    assert_eq!(sql_u64(&server, &data, "SELECT count(*) FROM events"), 1);
    let s = status_json(&server, &data);
    assert_eq!(s["status"]["stream_messages"].as_u64(), Some(1));
}

#[test]
fn publish_stops_on_input_without_line_ends() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut p = tally(&server, &dir.path().join("data"));
    p.args(["publish", "/dev/zero"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = p.spawn().unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        let rss = peak_rss_kib(&child).unwrap_or(0);
        if rss > 512 * 1024 || started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tally publish /dev/zero still reading after {:?}, {rss} KiB resident",
                started.elapsed()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("line 1 has no end after") && err.contains("not JSON Lines"),
        "{err}"
    );
}

#[test]
fn status_fails_after_printing_when_nats_is_unreachable() {
    let mut server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    publish_lines(
        &server,
        &data,
        &[api_calls("u1", "acme", "2025-01-01T00:00:00Z", "1")],
    );
    until_idle(&server, &data);
    server.stop();
    let mut c = tally(&server, &data);
    c.arg("status");
    let out = run_expect(c, 1);
    let text = stdout(&out);
    assert!(text.contains("checkpoint        1"), "{text}");
    assert!(text.contains("accepted          1"), "{text}");
    let err = stderr(&out);
    assert!(
        err.contains("cannot reach NATS") && err.contains("nats-server"),
        "{err}"
    );
    let mut c = tally(&server, &data);
    c.args(["status", "--json"]);
    let out = run_expect(c, 1);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"]["checkpoint_seq"].as_u64(), Some(1));
    assert_eq!(v["status"]["counts"]["accepted"].as_u64(), Some(1));
    assert!(
        v["nats_error"]
            .as_str()
            .unwrap()
            .contains("cannot reach NATS"),
        "{v}"
    );
}
