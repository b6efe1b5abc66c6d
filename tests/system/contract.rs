//! The event contract end to end: dedup per tenant (also in JetStream's
//! duplicate window), the archive keeping every attribute across a
//! restart, and a `usage` sum too large for Decimal128(38, 9) shown as
//! NULL rather than a wrong number.

use std::path::Path;

use crate::harness::{
    NatsServer, api_calls, publish_lines, run_expect, sql, status_json, tally, until_idle,
};

/// An `invoice.paid` from source `billing` with invoice id `id`.
fn invoice(tenant: &str, id: &str, amount: u64) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"billing","type":"invoice.paid","time":"2026-01-10T00:00:00Z","tenant":"{tenant}","data":{{"invoice_id":"{id}","amount":{amount},"currency":"USD"}}}}"#
    )
}

/// Tenant `evil` reuses `victim`'s (source, id): both invoices count, in
/// Tally's dedup and in JetStream's duplicate window (`tally publish` sets
/// `Nats-Msg-Id`); a copy from the same tenant is still a duplicate.
#[test]
fn dedup_is_per_tenant() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let victim = invoice("victim", "inv-777", 4900);
    let evil = invoice("evil", "inv-777", 1);
    publish_lines(&server, &data, &[evil, victim.clone()]);
    until_idle(&server, &data);
    // A re-send by the victim after JetStream's window (no Nats-Msg-Id, so
    // the broker stores it), seen by a new process: the horizon rebuilt
    // from the archive must know it per tenant.
    crate::harness::rt().block_on(async {
        let js = crate::harness::js(&server).await;
        js.publish("tally.events.victim.invoice.paid", victim.into())
            .await
            .unwrap()
            .await
            .unwrap();
    });
    until_idle(&server, &data);
    assert_eq!(
        sql(
            &server,
            &data,
            "SELECT tenant, paid, invoices_paid FROM revenue ORDER BY tenant"
        ),
        [["evil", "1", "1"], ["victim", "4900", "1"]]
    );
    let s = status_json(&server, &data);
    assert_eq!(s["status"]["counts"]["accepted"].as_u64(), Some(2), "{s}");
    assert_eq!(s["status"]["counts"]["duplicate"].as_u64(), Some(1), "{s}");
}

/// `tally sql QUERY --format jsonl`, one JSON object per row (NULL columns
/// are absent, so they read as `Value::Null`).
fn sql_json(server: &NatsServer, data: &Path, query: &str) -> Vec<serde_json::Value> {
    let mut c = tally(server, data);
    c.args(["sql", query, "--format", "jsonl"]);
    String::from_utf8(run_expect(c, 0).stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// An `auth.user_logged_in` with every optional attribute and three
/// extensions, one of them an object written with spaces.
const TRACED: &str = r#"{"specversion":"1.0","id":"t1","source":"auth","type":"auth.user_logged_in","time":"2026-01-10T00:00:00Z","tenant":"acme","datacontenttype":"application/json","dataschema":"https://example.com/login.json","traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01","geo":{ "country" : "NL" },"attempt":2,"data":{"method":"sso"}}"#;

/// `datacontenttype`, `dataschema` and the extension attributes reach the
/// archive, stay there through a restart (the archive is read back to
/// rebuild state), and a repeated attribute is dead-lettered.
#[test]
fn the_archive_keeps_every_attribute() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let plain = TRACED
        .replace(r#""id":"t1""#, r#""id":"t2""#)
        .replace(
            r#""datacontenttype":"application/json","dataschema":"https://example.com/login.json","traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01","geo":{ "country" : "NL" },"attempt":2,"#,
            "",
        );
    publish_lines(&server, &data, &[TRACED.to_string(), plain]);
    until_idle(&server, &data);
    // After a restart: a re-send of t1 (a duplicate, known from the archive)
    // and an event repeating an extension attribute.
    let repeated = TRACED
        .replace(r#""id":"t1""#, r#""id":"t3""#)
        .replace(r#""attempt":2"#, r#""attempt":2,"attempt":3"#);
    crate::harness::rt().block_on(async {
        let js = crate::harness::js(&server).await;
        for payload in [TRACED.to_string(), repeated] {
            js.publish("tally.events.acme.auth.user_logged_in", payload.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    until_idle(&server, &data);

    let rows = sql_json(
        &server,
        &data,
        "SELECT id, datacontenttype, dataschema, extensions, data FROM events ORDER BY stream_seq",
    );
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["id"], "t1");
    assert_eq!(rows[0]["datacontenttype"], "application/json");
    assert_eq!(rows[0]["dataschema"], "https://example.com/login.json");
    assert_eq!(
        rows[0]["extensions"],
        r#"{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01","geo":{ "country" : "NL" },"attempt":2}"#
    );
    assert_eq!(rows[0]["data"], r#"{"method":"sso"}"#);
    assert_eq!(rows[1]["id"], "t2");
    for column in ["datacontenttype", "dataschema", "extensions"] {
        assert!(rows[1][column].is_null(), "{column}: {:?}", rows[1]);
    }
    let s = status_json(&server, &data);
    assert_eq!(s["status"]["counts"]["duplicate"].as_u64(), Some(1), "{s}");
    assert_eq!(
        s["status"]["counts"]["dead_lettered"]["invalid_envelope"].as_u64(),
        Some(1),
        "{s}"
    );
}

/// Rewrites every `events` file of `data` as the first release wrote them,
/// without the columns added since.
fn drop_new_archive_columns(data: &Path) {
    use parquet::arrow::ArrowWriter;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let dir = data.join("views").join("events");
    let mut rewritten = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "parquet") {
            continue;
        }
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap())
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<_> = reader
            .map(|b| {
                let b = b.unwrap();
                let keep: Vec<usize> = (0..b.num_columns())
                    .filter(|i| {
                        !["datacontenttype", "dataschema", "extensions"]
                            .contains(&b.schema().field(*i).name().as_str())
                    })
                    .collect();
                b.project(&keep).unwrap()
            })
            .collect();
        let tmp = path.with_extension("old");
        let mut w = ArrowWriter::try_new(
            std::fs::File::create(&tmp).unwrap(),
            batches[0].schema(),
            None,
        )
        .unwrap();
        for b in &batches {
            w.write(b).unwrap();
        }
        w.close().unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        rewritten += 1;
    }
    assert!(rewritten > 0);
}

/// A data directory whose archive was written before `datacontenttype`,
/// `dataschema` and `extensions` existed resumes: its rows read them as
/// NULL (in SQL and when the archive rebuilds the dedup horizon), new rows
/// have them.
#[test]
fn archive_files_from_before_the_new_columns_stay_readable() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    publish_lines(&server, &data, &[TRACED.to_string()]);
    until_idle(&server, &data);
    drop_new_archive_columns(&data);
    let newer = TRACED.replace(r#""id":"t1""#, r#""id":"t2""#);
    crate::harness::rt().block_on(async {
        let js = crate::harness::js(&server).await;
        // t1 again (a duplicate only the old file can tell), then t2.
        for payload in [TRACED.to_string(), newer] {
            js.publish("tally.events.acme.auth.user_logged_in", payload.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    until_idle(&server, &data);
    let rows = sql_json(
        &server,
        &data,
        "SELECT id, dataschema, extensions FROM events ORDER BY stream_seq",
    );
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["id"], "t1");
    assert!(rows[0]["dataschema"].is_null() && rows[0]["extensions"].is_null());
    assert_eq!(rows[1]["id"], "t2");
    assert_eq!(rows[1]["dataschema"], "https://example.com/login.json");
    assert!(
        rows[1]["extensions"]
            .as_str()
            .unwrap()
            .contains("traceparent")
    );
    let s = status_json(&server, &data);
    assert_eq!(s["status"]["counts"]["duplicate"].as_u64(), Some(1), "{s}");
}

/// Two quantities of twenty-nine 9s: their sum does not fit
/// Decimal128(38, 9). `usage.sum` and `overages.used` are NULL (not a
/// saturated number), across a restart too, and the run logs an ERROR.
#[test]
fn a_usage_sum_past_decimal128_is_null_not_a_wrong_number() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let nines = r#""99999999999999999999999999999""#;
    let catalog = crate::harness::event(
        "p1",
        "_system",
        "catalog.plan_published",
        "2026-01-01T00:00:00Z",
        r#"{"plan":"starter","currency":"USD","limits":{"api_calls":1000},"overage":{"api_calls":{"unit_price":100,"per":1000}}}"#,
    );
    let start = crate::harness::event(
        "s1",
        "acme",
        "subscription.started",
        "2026-01-01T00:00:00Z",
        r#"{"subscription_id":"sub1","plan":"starter","billing_cycle":"monthly","price":4900,"currency":"USD"}"#,
    );
    publish_lines(
        &server,
        &data,
        &[
            catalog,
            start,
            api_calls("u1", "acme", "2026-01-05T10:00:00Z", nines),
            api_calls("u2", "acme", "2026-01-05T10:30:00Z", nines),
        ],
    );
    let mut run = tally(&server, &data);
    run.args(["run", "--until-idle"]);
    let logs = String::from_utf8(run_expect(run, 0).stderr).unwrap();
    assert!(
        logs.contains("ERROR") && logs.contains("usage sum exceeds Decimal128(38, 9)"),
        "{logs}"
    );
    // A later event in the same windows, seen by a new process that
    // restores `usage` from its stored rows.
    publish_lines(
        &server,
        &data,
        &[api_calls("u3", "acme", "2026-01-05T10:45:00Z", "1")],
    );
    until_idle(&server, &data);

    let usage = sql_json(
        &server,
        &data,
        "SELECT granularity, events, sum, max FROM usage ORDER BY granularity",
    );
    assert_eq!(usage.len(), 3, "{usage:?}");
    for row in &usage {
        assert_eq!(row["events"], 3, "{row}");
        assert!(row["sum"].is_null(), "{row}");
        assert!(!row["max"].is_null(), "{row}");
    }
    let overages = sql_json(
        &server,
        &data,
        "SELECT used, included, overage_quantity, overage_amount, pct_used, threshold FROM overages",
    );
    assert_eq!(overages.len(), 1, "{overages:?}");
    for column in [
        "used",
        "overage_quantity",
        "overage_amount",
        "pct_used",
        "threshold",
    ] {
        assert!(overages[0][column].is_null(), "{column}: {:?}", overages[0]);
    }
    assert!(!overages[0]["included"].is_null());
}
