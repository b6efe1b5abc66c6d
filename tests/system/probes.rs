//! What probing the pipeline found, each reproduced against a real
//! nats-server: a message near the server's payload limit, two runs on two
//! data directories, dead letters of a recreated stream.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;

use crate::harness::{NatsServer, api_calls, generated, run_expect, sql_u64, tally, until_idle};
use crate::harness::{events_stream, js, rt};
use crate::metrics::{all_views, assert_same_views, publish_file};

/// Waits for `child` to exit within `secs`; kills it and panics otherwise
/// (a stalled run must fail the test, not hang it).
fn exits_within(mut child: Child, secs: u64, what: &str) -> std::process::Output {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what} did not finish within {secs} s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn_until_idle(server: &NatsServer, data: &Path) -> Child {
    let mut c = tally(server, data);
    c.args(["run", "--until-idle"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.spawn().unwrap()
}

/// All messages of a stream (up to `n`), through an ordered consumer.
async fn read_stream(js: &jetstream::Context, name: &str, n: usize) -> Vec<async_nats::Message> {
    let stream = js.get_stream(name).await.unwrap();
    let mut msgs = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap()
        .messages()
        .await
        .unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(5), msgs.next())
            .await
            .expect("message")
            .unwrap()
            .unwrap();
        out.push(m.message);
    }
    out
}

#[test]
fn a_message_near_the_payload_limit_is_dead_lettered_and_blocks_nothing() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let rt = rt();
    rt.block_on(async {
        let js = js(&server).await;
        js.create_stream(events_stream()).await.unwrap();
        // A valid event padded to just under the server's 1 MiB max payload.
        let head = r#"{"specversion":"1.0","id":"big","source":"test","type":"auth.user_logged_in","time":"2025-01-01T00:00:00Z","tenant":"acme","data":{"pad":""#;
        let tail = r#""}}"#;
        let pad = 1_048_400 - head.len() - tail.len();
        let big = format!("{head}{}{tail}", "x".repeat(pad));
        assert_eq!(big.len(), 1_048_400);
        js.publish("tally.events.acme.auth.user_logged_in", big.into())
            .await
            .unwrap()
            .await
            .unwrap();
        let good = api_calls("after", "acme", "2025-01-01T00:01:00Z", "3");
        js.publish("tally.events.acme.usage.recorded", good.into())
            .await
            .unwrap()
            .await
            .unwrap();
    });
    let out = exits_within(spawn_until_idle(&server, &data), 60, "tally run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sql_u64(&server, &data, "SELECT count(*) FROM events"), 1);
    rt.block_on(async {
        let js = js(&server).await;
        let letters = read_stream(&js, "TALLY_DLQ", 1).await;
        let l = &letters[0];
        assert_eq!(l.subject.as_str(), "tally.dlq.too_large");
        let h = l.headers.as_ref().unwrap();
        assert_eq!(h.get("Tally-Original-Sequence").unwrap().as_str(), "1");
        assert_eq!(h.get("Tally-Truncated-From").unwrap().as_str(), "1048400");
        assert!(l.payload.len() < 1_048_400 && l.payload.len() > 1_000_000);
        assert!(l.payload.starts_with(br#"{"specversion":"1.0","id":"big""#));
    });
}

#[test]
fn two_runs_on_two_data_directories_each_see_every_message() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = generated(dir.path(), 20, 3, 5);
    publish_file(&server, &dir.path().join("unused"), &file);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let (ra, rb) = (spawn_until_idle(&server, &a), spawn_until_idle(&server, &b));
    for (out, what) in [
        (exits_within(ra, 120, "run a"), "a"),
        (exits_within(rb, 120, "run b"), "b"),
    ] {
        assert!(
            out.status.success(),
            "run {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let clean = dir.path().join("clean");
    until_idle(&server, &clean);
    let expected = all_views(&server, &clean);
    assert_same_views(&all_views(&server, &a), &expected, "run a beside run b");
    assert_same_views(&all_views(&server, &b), &expected, "run b beside run a");
}

#[test]
fn two_runs_forced_onto_one_consumer_never_checkpoint_past_what_they_processed() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = generated(dir.path(), 60, 4, 6);
    publish_file(&server, &dir.path().join("unused"), &file);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let spawn = |data: &Path| {
        let mut c = tally(&server, data);
        c.args([
            "run",
            "--until-idle",
            "--consumer",
            "shared",
            "--batch-size",
            "500",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        c.spawn().unwrap()
    };
    let (ra, rb) = (spawn(&a), spawn(&b));
    let outs = [
        exits_within(ra, 180, "run a"),
        exits_within(rb, 180, "run b"),
    ];
    let clean = dir.path().join("clean");
    until_idle(&server, &clean);
    let expected = all_views(&server, &clean);
    for (data, out) in [(&a, &outs[0]), (&b, &outs[1])] {
        // Either run may have stopped on seeing its messages go elsewhere
        // (exit 1, saying so); whatever it checkpointed, it processed
        // every message up to there: finishing the stream alone gives the
        // clean views.
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("another process"), "{err}");
        }
        let mut c = tally(&server, data);
        c.args(["run", "--until-idle", "--consumer", "shared"]);
        run_expect(c, 0);
        assert_same_views(
            &all_views(&server, data),
            &expected,
            "a run that shared its consumer",
        );
    }
}

#[test]
fn dead_letters_of_a_recreated_stream_are_not_lost() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let publish_bad = |what: &'static str| {
        rt.block_on(async {
            let js = js(&server).await;
            js.get_or_create_stream(events_stream()).await.unwrap();
            js.publish("tally.events.acme.usage.recorded", what.into())
                .await
                .unwrap()
                .await
                .unwrap();
        })
    };
    publish_bad("not json, first stream");
    until_idle(&server, &dir.path().join("first"));
    rt.block_on(async {
        js(&server)
            .await
            .delete_stream("TALLY_EVENTS")
            .await
            .unwrap();
    });
    // The new stream's first message has sequence 1 again.
    publish_bad("not json, second stream");
    until_idle(&server, &dir.path().join("second"));
    rt.block_on(async {
        let js = js(&server).await;
        let letters = read_stream(&js, "TALLY_DLQ", 2).await;
        assert_eq!(&letters[0].payload[..], b"not json, first stream");
        assert_eq!(&letters[1].payload[..], b"not json, second stream");
        let info = js
            .get_stream("TALLY_DLQ")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .clone();
        assert_eq!(info.state.messages, 2);
    });
}
