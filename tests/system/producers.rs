//! Untrusted producers: the NATS configuration of `deploy/nats-tenants`
//! (one account per tenant's producers) on a real nats-server. A producer
//! publishes its own tenant's events with `tally publish` and its own
//! login, and cannot publish into another tenant's subjects, reach
//! JetStream, or make another tenant's message be dropped as a duplicate.

use std::path::Path;
use std::process::Command;

use async_nats::HeaderMap;

use crate::harness::{NatsServer, api_calls, js, rt, run_expect, tally};

fn config(dir: &Path) -> std::path::PathBuf {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats-tenants/make-config.py");
    let out = Command::new("python3")
        .arg(script)
        .args([
            "--tally-password",
            "tally-pw",
            "--producer",
            "t0001=p1-secret",
            "--producer",
            "t0002=p2-secret",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.join("nats-tenants.conf");
    std::fs::write(&path, out.stdout).unwrap();
    path
}

/// `tally` logged in as `user`.
fn as_user(server: &NatsServer, data: &Path, user: &str, password: &str) -> Command {
    let mut c = tally(server, data);
    c.env("TALLY_NATS_USER", user)
        .env("TALLY_NATS_PASSWORD", password)
        .env("TALLY_STREAM_DEDUP", "off");
    c
}

fn publish(
    server: &NatsServer,
    data: &Path,
    user: &str,
    password: &str,
    lines: &[String],
) -> std::process::Output {
    let file = data.with_extension(format!("{user}.jsonl"));
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let mut c = as_user(server, data, user, password);
    c.arg("publish").arg(&file);
    c.output().unwrap()
}

#[test]
fn a_producer_of_one_tenant_cannot_publish_into_anothers_subjects() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start_with_config(&config(dir.path()));
    let data = dir.path().join("data");
    let run = || {
        let mut c = as_user(&server, &data, "tally", "tally-pw");
        c.args(["run", "--until-idle"]);
        run_expect(c, 0);
    };
    // Tally's own login creates the streams, JetStream's duplicate window off.
    run();

    // Its own tenant: published, acknowledged by the stream.
    let own = publish(
        &server,
        &data,
        "producer-t0001",
        "p1-secret",
        &[api_calls("a1", "t0001", "2026-01-05T00:00:00Z", "5")],
    );
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );

    // Another tenant's subject: refused, nothing stored.
    let other = publish(
        &server,
        &data,
        "producer-t0001",
        "p1-secret",
        &[api_calls("a2", "t0002", "2026-01-05T00:00:00Z", "7")],
    );
    assert!(
        !other.status.success(),
        "a producer of t0001 published t0002's event"
    );

    // Poisoning: t0001 sends, on its own subject, the Nats-Msg-Id that
    // t0002's producer will give its next event.
    let poison = tally::event::nats_msg_id("t0002", "test", "b1");
    rt().block_on(async {
        let client = async_nats::ConnectOptions::new()
            .user_and_password("producer-t0001".into(), "p1-secret".into())
            .connect(&server.url)
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client.clone());
        // No JetStream API in a producer's account.
        assert!(js.get_stream("TALLY_EVENTS").await.is_err());
        // A core publish to another tenant's subject goes nowhere.
        client
            .publish(
                "tally.events.t0002.usage.recorded",
                api_calls("a3", "t0002", "2026-01-05T00:00:00Z", "9").into(),
            )
            .await
            .unwrap();
        client.flush().await.unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", poison.as_str());
        let ack = js
            .publish_with_headers(
                "tally.events.t0001.usage.recorded",
                headers,
                api_calls("x1", "t0001", "2026-01-05T00:00:00Z", "1").into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(!ack.duplicate);
    });
    let b = publish(
        &server,
        &data,
        "producer-t0002",
        "p2-secret",
        &[api_calls("b1", "t0002", "2026-01-05T00:00:00Z", "3")],
    );
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let said = String::from_utf8_lossy(&b.stdout);
    assert!(said.contains("JetStream duplicates 0"), "{said}");

    run();
    let mut c = as_user(&server, &data, "tally", "tally-pw");
    c.args([
        "sql",
        "SELECT tenant, string_agg(id, ' ' ORDER BY id) FROM events GROUP BY tenant ORDER BY tenant",
        "--format",
        "csv",
    ]);
    let out = String::from_utf8(run_expect(c, 0).stdout).unwrap();
    assert_eq!(
        out.lines().skip(1).collect::<Vec<_>>(),
        ["t0001,a1 x1", "t0002,b1"]
    );

    // Without a login, nothing.
    let mut c = tally(&server, &data);
    c.args(["run", "--until-idle"]);
    let out = c.output().unwrap();
    assert!(!out.status.success());
}

/// A stream that already captures Tally's subjects under another name: a
/// run or a publish naming a new stream is refused with the other stream's
/// name, and nothing lands in the other stream (before, a publish said
/// "published" and its messages went there).
#[test]
fn a_stream_whose_subjects_another_stream_holds_is_refused_naming_it() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    rt().block_on(async {
        let js = js(&server).await;
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "OLDER".into(),
            subjects: vec!["tally.events.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    });
    let file = dir.path().join("one.jsonl");
    std::fs::write(
        &file,
        r#"{"specversion":"1.0","id":"u1","source":"s","type":"usage.recorded","time":"2025-01-01T00:00:00Z","tenant":"acme","data":{"metric":"api_calls","quantity":1}}"#,
    )
    .unwrap();
    for args in [
        vec!["publish", file.to_str().unwrap()],
        vec!["run", "--until-idle"],
    ] {
        let mut c = tally(&server, &data);
        c.env("TALLY_STREAM", "NEWER").args(&args);
        let err = String::from_utf8(run_expect(c, 1).stderr).unwrap();
        assert!(
            err.contains("overlap those of stream OLDER") && !err.contains("JetStream enabled"),
            "{args:?}: {err}"
        );
        assert_eq!(err.matches("overlap").count(), 1, "said once: {err}");
    }
    let held = rt().block_on(async {
        let js = js(&server).await;
        let mut s = js.get_stream("OLDER").await.unwrap();
        s.info().await.unwrap().state.messages
    });
    assert_eq!(held, 0, "nothing was published into the other stream");
}
