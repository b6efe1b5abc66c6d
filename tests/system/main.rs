//! System tests: the real `tally` binary against a real `nats-server -js`
//! (started per test by [`harness`], killed on drop). No mock brokers.

// Integration-test crate: panicking on a broken fixture is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod anchors;
mod cluster;
mod contract;
mod corrections;
mod dashboard;
mod dimensions;
mod faults;
mod harness;
mod history;
mod hostile;
mod metrics;
mod objectstore;
mod partitions;
mod probes;
mod producers;
mod serve;
mod sql;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::stream;
use harness::{
    NatsServer, api_calls, event, events_stream, generated, js, publish_lines, rt, run_expect, sql,
    sql_u64, status_json, tally, unique_events, until_idle, wait_for_checkpoint,
};

#[test]
fn publish_run_and_query_end_to_end() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = generated(dir.path(), 20, 3, 1);
    let mut p = tally(&server, &data);
    p.arg("publish").arg(&file);
    let out = run_expect(p, 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("published"));
    until_idle(&server, &data);

    let unique = unique_events(&file) as u64;
    assert_eq!(
        sql_u64(&server, &data, "SELECT count(*) FROM events"),
        unique
    );
    assert_eq!(
        sql_u64(
            &server,
            &data,
            "SELECT count(DISTINCT stream_seq) FROM events"
        ),
        unique
    );
    let types = sql(
        &server,
        &data,
        "SELECT DISTINCT type FROM events ORDER BY type",
    );
    for t in [
        "catalog.plan_published",
        "subscription.started",
        "usage.recorded",
        "invoice.paid",
        "auth.user_logged_in",
    ] {
        assert!(
            types.iter().any(|r| r[0] == t),
            "{t} missing from {types:?}"
        );
    }
    // The archive keeps the data object and the envelope attributes.
    let row = sql(
        &server,
        &data,
        "SELECT tenant, dataversion, data FROM events WHERE type = 'tenant.created' ORDER BY tenant LIMIT 1",
    );
    assert_eq!(row[0][0], "t0001");
    assert_eq!(row[0][1], "1");

    let s = status_json(&server, &data);
    assert_eq!(s["status"]["counts"]["accepted"].as_u64(), Some(unique));
    assert_eq!(s["status"]["lag"].as_u64(), Some(0));
    assert_eq!(
        s["status"]["checkpoint_seq"],
        s["status"]["stream_last_seq"]
    );

    // Every output format works.
    for format in ["table", "csv", "json", "jsonl", "parquet"] {
        let mut c = tally(&server, &data);
        c.args([
            "sql",
            "SELECT id, time, data FROM events ORDER BY stream_seq LIMIT 3",
            "--format",
            format,
        ]);
        let out = run_expect(c, 0);
        assert!(!out.stdout.is_empty(), "{format}");
        if format == "jsonl" {
            assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
        }
        if format == "parquet" {
            assert_eq!(&out.stdout[..4], b"PAR1");
        }
    }
}

#[test]
fn every_bad_message_is_dead_lettered_with_its_reason() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let good = api_calls("g1", "acme", "2025-01-01T00:00:00Z", "1");
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(300 * 1024));
    let cases: Vec<(&str, String, String)> = vec![
        ("too_large", "tally.events.acme.usage.recorded".into(), big),
        (
            "invalid_json",
            "tally.events.acme.usage.recorded".into(),
            "not json".into(),
        ),
        (
            "invalid_envelope",
            "tally.events.acme.usage.recorded".into(),
            good.replace(r#""specversion":"1.0""#, r#""specversion":"0.3""#),
        ),
        (
            "subject_mismatch",
            "tally.events.globex.usage.recorded".into(),
            good.replace("g1", "b4"),
        ),
        (
            "unsupported_version",
            "tally.events.acme.usage.recorded".into(),
            good.replace("g1", "b5")
                .replace(r#""tenant":"acme""#, r#""tenant":"acme","dataversion":"2""#),
        ),
        (
            "forbidden_tenant",
            "tally.events.acme.catalog.meter_defined".into(),
            event(
                "b6",
                "acme",
                "catalog.meter_defined",
                "2025-01-01T00:00:00Z",
                r#"{"metric":"x","aggregation":"sum"}"#,
            ),
        ),
        (
            "invalid_data",
            "tally.events.acme.usage.recorded".into(),
            good.replace("g1", "b7")
                .replace(r#""quantity":1"#, r#""quantity":-1"#),
        ),
        (
            "time_in_future",
            "tally.events.acme.usage.recorded".into(),
            good.replace("g1", "b8").replace("2025-01-01", "2999-01-01"),
        ),
        (
            "time_too_old",
            "tally.events.acme.usage.recorded".into(),
            good.replace("g1", "b9").replace("2025-01-01", "1990-01-01"),
        ),
    ];
    rt().block_on(async {
        let js = js(&server).await;
        js.create_stream(events_stream()).await.unwrap();
        js.publish("tally.events.acme.usage.recorded", good.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
        for (_, subject, payload) in &cases {
            js.publish(subject.clone(), payload.clone().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    until_idle(&server, &data);
    assert_eq!(sql_u64(&server, &data, "SELECT count(*) FROM events"), 1);
    let s = status_json(&server, &data);
    for (reason, _, _) in &cases {
        assert_eq!(
            s["status"]["counts"]["dead_lettered"][reason].as_u64(),
            Some(1),
            "{reason}: {s}"
        );
    }
    rt().block_on(async {
        let js = js(&server).await;
        let dlq = js.get_stream("TALLY_DLQ").await.unwrap();
        for (i, (reason, subject, payload)) in cases.iter().enumerate() {
            let m = dlq.get_raw_message(i as u64 + 1).await.unwrap();
            assert_eq!(m.subject.as_str(), format!("tally.dlq.{reason}"));
            assert_eq!(
                m.payload.as_ref(),
                payload.as_bytes(),
                "{reason}: original bytes"
            );
            let h = &m.headers;
            assert_eq!(
                h.get("Tally-Original-Subject").unwrap().as_str(),
                subject.as_str()
            );
            assert_eq!(
                h.get("Tally-Original-Sequence").unwrap().as_str(),
                (i + 2).to_string()
            );
            assert_eq!(h.get("Tally-Reason").unwrap().as_str(), *reason);
            assert!(!h.get("Tally-Error").unwrap().as_str().is_empty());
        }
    });
    // Dead letters do not stall what comes after them.
    let mut p = tally(&server, &data);
    p.args(["publish", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let mut child = p.spawn().unwrap();
    let later = api_calls("g2", "acme", "2025-01-02T00:00:00Z", r#""2.5""#);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(later.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    until_idle(&server, &data);
    assert_eq!(sql_u64(&server, &data, "SELECT count(*) FROM events"), 2);
}

/// More dead letters in one batch than the NATS client allows
/// unacknowledged publishes (5000): they are published in windows and the
/// run never stalls behind them (it used to wait forever).
#[test]
fn a_batch_of_thousands_of_dead_letters_does_not_stall() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let bad = 6000u64;
    rt().block_on(async {
        let js = js(&server).await;
        js.create_stream(events_stream()).await.unwrap();
        let mut acks = Vec::new();
        for i in 0..bad {
            acks.push(
                js.publish(
                    "tally.events.acme.usage.recorded",
                    format!("not json {i}").into(),
                )
                .await
                .unwrap(),
            );
            if acks.len() == 1000 {
                for a in acks.drain(..) {
                    a.await.unwrap();
                }
            }
        }
        for a in acks {
            a.await.unwrap();
        }
    });
    let mut c = tally(&server, &data);
    c.args(["run", "--until-idle", "--batch-size", "50000"]);
    let started = std::time::Instant::now();
    run_expect(c, 0);
    assert!(started.elapsed() < Duration::from_secs(60));
    let s = status_json(&server, &data);
    assert_eq!(
        s["status"]["counts"]["dead_lettered"]["invalid_json"].as_u64(),
        Some(bad),
        "{s}"
    );
    rt().block_on(async {
        let js = js(&server).await;
        let mut dlq = js.get_stream("TALLY_DLQ").await.unwrap();
        assert_eq!(dlq.info().await.unwrap().state.messages, bad);
    });
}

#[test]
fn duplicates_inside_and_beyond_the_jetstream_window_count_once() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let e1 = api_calls("e1", "acme", "2025-01-01T00:00:00Z", "1");
    let e2 = api_calls("e2", "acme", "2025-01-01T00:00:01Z", "1");
    let msg_id = tally::event::nats_msg_id("acme", "test", "e1");
    rt().block_on(async {
        let js = js(&server).await;
        // A short JetStream duplicate window, so "beyond the window" is quick to reach.
        js.create_stream(stream::Config {
            duplicate_window: Duration::from_secs(1),
            ..events_stream()
        })
        .await
        .unwrap();
        let with_id = || {
            let mut h = HeaderMap::new();
            h.insert("Nats-Msg-Id", msg_id.as_str());
            h
        };
        let subject = "tally.events.acme.usage.recorded";
        let a = js
            .publish_with_headers(subject, with_id(), e1.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(!a.duplicate);
        let b = js
            .publish_with_headers(subject, with_id(), e1.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(b.duplicate, "inside the window JetStream drops it");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let c = js
            .publish_with_headers(subject, with_id(), e1.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(!c.duplicate, "beyond the window JetStream stores it again");
        // Without a Nats-Msg-Id, JetStream stores every copy.
        js.publish(subject, e2.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
        js.publish(subject, e2.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    });
    until_idle(&server, &data);
    assert_eq!(sql_u64(&server, &data, "SELECT count(*) FROM events"), 2);
    assert_eq!(
        status_json(&server, &data)["status"]["counts"]["duplicate"].as_u64(),
        Some(2)
    );

    // A later copy, seen by a new process: the horizon is rebuilt from the archive.
    rt().block_on(async {
        let js = js(&server).await;
        js.publish("tally.events.acme.usage.recorded", e1.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    });
    until_idle(&server, &data);
    assert_eq!(sql_u64(&server, &data, "SELECT count(*) FROM events"), 2);
    assert_eq!(
        status_json(&server, &data)["status"]["counts"]["duplicate"].as_u64(),
        Some(3)
    );
}

#[test]
fn sigterm_finishes_the_batch_and_exits_zero() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = generated(dir.path(), 20, 3, 5);
    let mut p = tally(&server, &data);
    p.arg("publish").arg(&file);
    run_expect(p, 0);
    let mut c = tally(&server, &data);
    c.args(["run", "--batch-size", "200"]);
    let mut child = c.spawn().unwrap();
    wait_for_checkpoint(&data, 0, &mut child);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert_eq!(exit.code(), Some(0));
    until_idle(&server, &data);
    assert_eq!(
        sql_u64(&server, &data, "SELECT count(*) FROM events"),
        unique_events(&file) as u64
    );
}

#[test]
fn sql_is_read_only() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    publish_lines(
        &server,
        &data,
        &[api_calls("r1", "acme", "2025-01-01T00:00:00Z", "1")],
    );
    until_idle(&server, &data);
    for q in [
        "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'",
        "COPY (SELECT 1) TO '/tmp/tally-should-not-exist.csv'",
        "INSERT INTO events SELECT * FROM events",
        "DROP TABLE events",
    ] {
        let mut c = tally(&server, &data);
        c.args(["sql", q]);
        let out = run_expect(c, 1);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("read-only"), "{q}: {err}");
    }
    assert!(!std::path::Path::new("/tmp/tally-should-not-exist.csv").exists());
    let mut c = tally(&server, &data);
    c.args(["sql", "SELECT * FROM '/etc/passwd'"]);
    run_expect(c, 1);
}

#[test]
fn publish_reports_invalid_lines_and_allow_invalid_sends_them() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("in.jsonl");
    let good = event(
        "p1",
        "acme",
        "auth.user_logged_in",
        "2025-01-01T00:00:00Z",
        "{}",
    );
    let bad = good
        .replace("p1", "p2")
        .replace(r#""tenant":"acme""#, r#""tenant":"ac me""#);
    std::fs::write(&file, format!("{good}\n{bad}\n")).unwrap();
    let mut c = tally(&server, &data);
    c.arg("publish").arg(&file);
    let out = run_expect(c, 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2: invalid_envelope"), "{err}");
    let mut c = tally(&server, &data);
    c.arg("publish").arg("--allow-invalid").arg(&file);
    run_expect(c, 0);
    until_idle(&server, &data);
    let s = status_json(&server, &data);
    assert_eq!(s["status"]["counts"]["accepted"].as_u64(), Some(1));
    assert_eq!(
        s["status"]["counts"]["duplicate"].as_u64(),
        Some(0),
        "JetStream dropped the second copy of p1"
    );
    assert_eq!(
        s["status"]["counts"]["dead_lettered"]["invalid_envelope"].as_u64(),
        Some(1)
    );
}

#[test]
fn unreachable_nats_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = std::process::Command::new(harness::bin())
        .args(["--nats", &format!("nats://127.0.0.1:{port}"), "--data"])
        .arg(dir.path())
        .args(["run", "--until-idle"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach NATS") && err.contains("nats-server"),
        "{err}"
    );
    let bad = std::process::Command::new(harness::bin())
        .args(["sql"])
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

/// A nested error says each cause once (`main` used to print the error's
/// own message, which names its source, and then the source again).
#[test]
fn a_nested_error_says_its_cause_once() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    std::fs::write(&file, "").unwrap();
    let mut c = tally(&server, &file.join("views"));
    c.args(["run", "--until-idle"]);
    let out = run_expect(c, 1);
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("tally: "))
        .unwrap_or_else(|| panic!("no error line in {err}"));
    assert!(line.contains("events.jsonl/views"), "{line}");
    assert_eq!(line.matches("Not a directory").count(), 1, "{line}");
}

/// Hand-computed rows of the `usage` view, including a late event that
/// arrives after its window was written, equal event times, and rounding.
#[test]
fn usage_view_golden() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let u = |id: &str, time: &str, q: &str| api_calls(id, "acme", time, q);
    publish_lines(
        &server,
        &data,
        &[
            u("u1", "2026-01-05T10:15:00Z", "\"0.1\""),
            u("u2", "2026-01-05T10:45:00Z", "0.2"),
            u("u3", "2026-01-05T11:00:00Z", "\"12.5\""),
            // Same time as u3: `last` is decided by (time, source, id), and "u3" > "a".
            u("a", "2026-01-05T11:00:00+00:00", "2"),
            // 0.0000000025 rounds half-to-even to 0.000000002.
            u("u5", "2026-01-06T00:00:00Z", "\"0.0000000025\""),
        ],
    );
    until_idle(&server, &data);
    // Late: its hour was written by the first run.
    publish_lines(&server, &data, &[u("u6", "2026-01-05T10:50:00Z", "1")]);
    until_idle(&server, &data);

    let rows = sql(
        &server,
        &data,
        "SELECT tenant, metric, granularity, window_start, window_end, events, sum, min, max, last, is_final \
         FROM usage ORDER BY granularity, window_start",
    );
    let got: Vec<String> = rows.iter().map(|r| r.join(",")).collect();
    // Stream clock 2026-01-06T00:00:00Z, lateness 5 min: final iff window_end <= 2026-01-05T23:55:00Z.
    let expected = [
        "acme,api_calls,day,2026-01-05T00:00:00Z,2026-01-06T00:00:00Z,5,15.800000000,0.100000000,12.500000000,12.500000000,false",
        "acme,api_calls,day,2026-01-06T00:00:00Z,2026-01-07T00:00:00Z,1,0.000000002,0.000000002,0.000000002,0.000000002,false",
        "acme,api_calls,hour,2026-01-05T10:00:00Z,2026-01-05T11:00:00Z,3,1.300000000,0.100000000,1.000000000,1.000000000,true",
        "acme,api_calls,hour,2026-01-05T11:00:00Z,2026-01-05T12:00:00Z,2,14.500000000,2.000000000,12.500000000,12.500000000,true",
        "acme,api_calls,hour,2026-01-06T00:00:00Z,2026-01-06T01:00:00Z,1,0.000000002,0.000000002,0.000000002,0.000000002,false",
        "acme,api_calls,month,2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,6,15.800000002,0.000000002,12.500000000,0.000000002,false",
    ];
    assert_eq!(got, expected);

    // A replay-equivalent: a fresh data dir over the same stream gives the same rows.
    let fresh = dir.path().join("fresh");
    let mut c = tally(&server, &fresh);
    c.args(["run", "--until-idle", "--consumer", "fresh"]);
    run_expect(c, 0);
    let again = sql(
        &server,
        &fresh,
        "SELECT * FROM usage ORDER BY granularity, window_start",
    );
    assert_eq!(
        again,
        sql(
            &server,
            &data,
            "SELECT * FROM usage ORDER BY granularity, window_start"
        )
    );
}

/// The `overages` view end to end, and threshold alerts published once
/// each to `tally.alerts.<tenant>`, also across a restart.
#[test]
fn overages_view_and_threshold_alerts() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let catalog = event(
        "p1",
        "_system",
        "catalog.plan_published",
        "2026-01-01T00:00:00Z",
        r#"{"plan":"starter","currency":"USD","limits":{"api_calls":1000},"overage":{"api_calls":{"unit_price":100,"per":1000}}}"#,
    );
    let start = event(
        "s1",
        "acme",
        "subscription.started",
        "2026-01-01T00:00:00Z",
        r#"{"subscription_id":"sub1","plan":"starter","billing_cycle":"monthly","price":4900,"currency":"USD"}"#,
    );
    let u = |id: &str, time: &str, q: &str| api_calls(id, "acme", time, q);
    publish_lines(
        &server,
        &data,
        &[catalog, start, u("u1", "2026-01-05T00:00:00Z", "850")],
    );
    until_idle(&server, &data);
    publish_lines(&server, &data, &[u("u2", "2026-01-06T00:00:00Z", "1150")]);
    until_idle(&server, &data);
    // A restart with nothing new publishes nothing again.
    until_idle(&server, &data);

    let rows = sql(
        &server,
        &data,
        "SELECT tenant, period, metric, plan, used, included, overage_quantity, overage_amount, currency, pct_used, threshold, is_final FROM overages",
    );
    assert_eq!(
        rows.iter().map(|r| r.join(",")).collect::<Vec<_>>(),
        [
            "acme,2026-01-01,api_calls,starter,2000.000000000,1000.000000000,1000.000000000,100,USD,200.0,100,false"
        ]
    );

    rt().block_on(async {
        let js = js(&server).await;
        let mut alerts = js.get_stream("TALLY_ALERTS").await.unwrap();
        assert_eq!(alerts.info().await.unwrap().state.messages, 3);
        let mut thresholds = Vec::new();
        for seq in 1..=3 {
            let m = alerts.get_raw_message(seq).await.unwrap();
            assert_eq!(m.subject.as_str(), "tally.alerts.acme");
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(v["type"], "usage.threshold_crossed");
            assert_eq!(v["data"]["period"], "2026-01-01");
            assert_eq!(v["data"]["period_start"], "2026-01-01T00:00:00Z");
            assert_eq!(v["data"]["metric"], "api_calls");
            assert_eq!(v["data"]["included"], "1000");
            thresholds.push(v["data"]["threshold"].as_i64().unwrap());
        }
        assert_eq!(thresholds, [80, 90, 100]);
    });
}
