//! The fault suite: the real `tally` binary over a generated SaaS, under
//! kill -9, a NATS restart, duplicate publishes and a data directory that
//! cannot be written; and `tally replay`, alone and handing a live run over.
//! After each, every view (stored and `queries/`) must equal, row for row,
//! a clean uninterrupted run over the same stream.
//!
//! Size: a small SaaS by default, so CI stays quick;
//! `TALLY_FAULT_EVENTS=full` runs it over about 240k events.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{NatsServer, generated, run_expect, status_json, tally, wait_for_checkpoint};
use crate::metrics::{all_views, assert_same_views, publish_file};

/// (tenants, months) of the generated SaaS.
fn size() -> (u32, u32) {
    match std::env::var("TALLY_FAULT_EVENTS").as_deref() {
        Ok("full") => (250, 12),
        _ => (40, 5),
    }
}

/// A deterministic pseudo-random sequence (the kill instants), so a failure reproduces.
pub(crate) struct Lcg(pub(crate) u64);

impl Lcg {
    pub(crate) fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

fn spawn_run(server: &NatsServer, data: &Path, consumer: &str, batch: usize) -> Child {
    let mut c = tally(server, data);
    c.args([
        "run",
        "--consumer",
        consumer,
        "--batch-size",
        &batch.to_string(),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c.spawn().unwrap()
}

fn sigterm(child: &mut Child) {
    // Through the `kill` command, as a user would.
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "tally run did not exit 0 on SIGTERM"
    );
}

pub(crate) fn last_seq(server: &NatsServer, data: &Path) -> u64 {
    status_json(server, data)["status"]["stream_last_seq"]
        .as_u64()
        .unwrap()
}

fn checkpoint_seq(data: &Path) -> u64 {
    std::fs::read_to_string(data.join("checkpoint.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["last_seq"].as_u64())
        .unwrap_or(0)
}

fn until_idle_as(server: &NatsServer, data: &Path, consumer: &str) {
    let mut c = tally(server, data);
    c.args(["run", "--until-idle", "--consumer", consumer]);
    run_expect(c, 0);
}

/// Republishes 5% of the lines: half through `tally publish` (same
/// `Nats-Msg-Id`: JetStream's duplicate window drops them) and half with a
/// fresh message id, as if sent after the window (JetStream stores them;
/// Tally's (tenant, source, id) dedup must drop them).
fn republish_five_percent(server: &NatsServer, dir: &Path, file: &Path) -> usize {
    let text = std::fs::read_to_string(file).unwrap();
    let picked: Vec<&str> = text.lines().step_by(20).collect();
    let inside: Vec<&str> = picked.iter().step_by(2).copied().collect();
    let beyond: Vec<(usize, &str)> = picked
        .iter()
        .copied()
        .enumerate()
        .skip(1)
        .step_by(2)
        .collect();
    let inside_file = dir.join("dups-inside.jsonl");
    std::fs::write(&inside_file, inside.join("\n") + "\n").unwrap();
    publish_file(server, &dir.join("unused"), &inside_file);
    crate::harness::rt().block_on(async {
        let js = crate::harness::js(server).await;
        for (i, line) in &beyond {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let subject = format!(
                "tally.events.{}.{}",
                v["tenant"].as_str().unwrap(),
                v["type"].as_str().unwrap()
            );
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("beyond-window-{i}").as_str());
            js.publish_with_headers(subject, h, line.to_string().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    picked.len()
}

pub(crate) struct Stream {
    pub(crate) server: NatsServer,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) clean: Vec<(String, String)>,
}

/// Publishes the SaaS with 5% duplicates and computes the clean run's views.
pub(crate) fn stream() -> Stream {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (tenants, months) = size();
    let file = generated(dir.path(), tenants, months, 11);
    publish_file(&server, &dir.path().join("unused"), &file);
    let dups = republish_five_percent(&server, dir.path(), &file);
    assert!(dups > 100, "only {dups} duplicates");
    let clean_dir = dir.path().join("clean");
    until_idle_as(&server, &clean_dir, "clean");
    let clean = all_views(&server, &clean_dir);
    let events = &clean[0].1;
    assert!(events.lines().count() > 5000, "the SaaS is too small");
    Stream { server, dir, clean }
}

impl Stream {
    fn data(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

#[test]
fn every_fault_leaves_every_view_equal_to_a_clean_run() {
    let mut s = stream();
    let last = last_seq(&s.server, &s.data("clean"));

    // 1. kill -9 at 12 pseudo-random instants, each followed by a restart.
    let data = s.data("killed");
    let mut rng = Lcg(0x7a11);
    let mut kills = 0;
    while kills < 12 && checkpoint_seq(&data) < last {
        let mut child = spawn_run(&s.server, &data, "killed", 1 + rng.next(300) as usize);
        std::thread::sleep(Duration::from_millis(100 + rng.next(300)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    assert!(
        kills >= 10,
        "the stream was consumed after {kills} kills; make it larger"
    );
    until_idle_as(&s.server, &data, "killed");
    assert_same_views(&s.clean, &all_views(&s.server, &data), "after 12 kill -9");
    // The restatements the killed run published are those of the clean run,
    // each once (the same deterministic ids; none extra).
    let restated = s
        .clean
        .iter()
        .find(|(v, _)| v == "restatements")
        .map(|(_, csv)| csv.lines().count() - 1)
        .unwrap();
    assert!(restated > 0, "the SaaS restates nothing");
    assert_eq!(
        stream_count(&s.server, "TALLY_RESTATEMENTS"),
        restated as u64
    );

    // 2. nats-server stopped and restarted on the same store, mid-run.
    let data = s.data("nats-restart");
    let mut child = spawn_run(&s.server, &data, "restart", 200);
    wait_for_checkpoint(&data, 0, &mut child);
    s.server.stop();
    std::thread::sleep(Duration::from_millis(1500));
    s.server.restart();
    wait_for_checkpoint(&data, last - 1, &mut child);
    sigterm(&mut child);
    assert_same_views(
        &s.clean,
        &all_views(&s.server, &data),
        "after a NATS restart",
    );

    // 3. The data directory cannot be written for a while: the `events`
    // view's folder is replaced by a file, so every Parquet write fails
    // (chmod would not stop a root user). The batch stays unacknowledged,
    // is retried with backoff and logged, and lands once writes work.
    let data = s.data("write-failure");
    let mut child = spawn_run(&s.server, &data, "writefail", 100);
    let before = wait_for_checkpoint(&data, 0, &mut child);
    let events_dir = data.join("views").join("events");
    let aside = data.join("views").join("events.aside");
    std::fs::rename(&events_dir, &aside).unwrap();
    std::fs::write(&events_dir, b"not a directory").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let stuck = checkpoint_seq(&data);
    assert!(stuck < last, "the run finished before the failure began");
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        checkpoint_seq(&data),
        stuck,
        "a batch was checkpointed without its files"
    );
    assert!(stuck >= before);
    std::fs::remove_file(&events_dir).unwrap();
    std::fs::rename(&aside, &events_dir).unwrap();
    wait_for_checkpoint(&data, last - 1, &mut child);
    sigterm(&mut child);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("batch not yet durable; keeping it unacknowledged and retrying"),
        "{stderr}"
    );
    assert_same_views(
        &s.clean,
        &all_views(&s.server, &data),
        "after a write failure",
    );
}

fn alerts_count(server: &NatsServer) -> u64 {
    stream_count(server, "TALLY_ALERTS")
}

fn stream_count(server: &NatsServer, stream: &str) -> u64 {
    crate::harness::rt().block_on(async {
        let js = crate::harness::js(server).await;
        match js.get_stream(stream).await {
            Ok(mut st) => st.info().await.unwrap().state.messages,
            Err(_) => 0,
        }
    })
}

#[test]
fn replay_rebuilds_every_view_and_hands_a_live_run_over() {
    let mut s = stream();
    let last = last_seq(&s.server, &s.data("clean"));

    // A replay of a finished directory switches to identical views, with no alerts.
    let data = s.data("clean");
    let alerts = alerts_count(&s.server);
    let restated = stream_count(&s.server, "TALLY_RESTATEMENTS");
    let mut c = tally(&s.server, &data);
    c.arg("replay");
    let out = run_expect(c, 0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("switched to"), "{text}");
    assert_same_views(&s.clean, &all_views(&s.server, &data), "after tally replay");
    assert_eq!(alerts_count(&s.server), alerts, "a replay published alerts");
    assert_eq!(
        stream_count(&s.server, "TALLY_RESTATEMENTS"),
        restated,
        "a replay published restatements"
    );
    assert!(
        !s.data("clean.replay").exists(),
        "the replaced views were left behind"
    );

    // As of a position: the events up to N, into a named directory.
    let asof = s.data("asof");
    let n = last / 2;
    let mut c = tally(&s.server, &data);
    c.args(["replay", "--until-seq", &n.to_string(), "--into"])
        .arg(&asof);
    run_expect(c, 0);
    let q = format!("SELECT * FROM events WHERE stream_seq <= {n}");
    assert_eq!(
        crate::metrics::sorted_csv(&s.server, &asof, "SELECT * FROM events"),
        crate::metrics::sorted_csv(&s.server, &data, &q)
    );
    let mut c = tally(&s.server, &data);
    c.args(["replay", "--until-seq", &(last + 1).to_string(), "--into"])
        .arg(s.data("too-far"));
    let err = String::from_utf8_lossy(&run_expect(c, 1).stderr).to_string();
    assert!(err.contains("beyond the end of stream"), "{err}");

    // nats-server restarted in the middle of a replay: its read-only
    // consumer loses what was on the wire, which is never redelivered; the
    // replay sees the gap (or the stall) and resumes from its checkpoint.
    let restarted = s.data("replay-restart");
    let mut c = tally(&s.server, &data);
    c.args(["replay", "--batch-size", "200", "--into"])
        .arg(&restarted)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    wait_for_checkpoint(&restarted, 0, &mut child);
    s.server.stop();
    std::thread::sleep(Duration::from_millis(1500));
    s.server.restart();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{stderr}");
    assert_same_views(
        &s.clean,
        &all_views(&s.server, &restarted),
        "after a NATS restart mid-replay",
    );

    // A replay while a live run works on the same directory: the live run
    // pauses between batches, resumes on the replayed views, loses nothing.
    let live = s.data("live");
    let mut child = spawn_run(&s.server, &live, "live", 300);
    wait_for_checkpoint(&live, 0, &mut child);
    let started = Instant::now();
    let mut c = tally(&s.server, &live);
    c.args(["replay", "--batch-size", "5000"]);
    let out = run_expect(c, 0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("the live tally run resumed on it"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(120));
    wait_for_checkpoint(&live, last - 1, &mut child);
    sigterm(&mut child);
    assert_same_views(
        &s.clean,
        &all_views(&s.server, &live),
        "after a replay under a live run",
    );
}
