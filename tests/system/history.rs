//! History the stream forgot: purges, `max_msgs` retention and deleted
//! messages. A run refuses to go past a gap (the checkpoint and views stay
//! as they were) unless told `--accept-gap`, which records it for good.

use std::path::Path;

use async_nats::jetstream::stream;

use crate::harness::{NatsServer, generated, run_expect, tally, until_idle};
use crate::harness::{events_stream, js, rt};
use crate::metrics::{all_views, publish_file};

fn checkpoint(data: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(data.join("checkpoint.json")).unwrap()).unwrap()
}

/// `tally run --until-idle` expecting the gap refusal; returns stderr.
fn refused(server: &NatsServer, data: &Path) -> String {
    let mut c = tally(server, data);
    c.args(["run", "--until-idle"]);
    String::from_utf8(run_expect(c, 1).stderr).unwrap()
}

fn accept_gap(server: &NatsServer, data: &Path) {
    let mut c = tally(server, data);
    c.args(["run", "--until-idle", "--accept-gap"]);
    run_expect(c, 0);
}

fn gaps(data: &Path) -> Vec<(u64, u64)> {
    checkpoint(data)["gaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["first_seq"].as_u64().unwrap(),
                g["last_seq"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Purges the event stream, keeping its newest `keep` messages (all of
/// them gone with `None`); returns its last sequence.
fn purge(server: &NatsServer, keep: Option<u64>) -> u64 {
    rt().block_on(async {
        let js = js(server).await;
        let mut s = js.get_stream("TALLY_EVENTS").await.unwrap();
        match keep {
            Some(n) => s.purge().keep(n).await.unwrap(),
            None => s.purge().await.unwrap(),
        };
        s.info().await.unwrap().state.last_sequence
    })
}

/// Deletes single messages from the event stream.
fn delete(server: &NatsServer, seqs: impl IntoIterator<Item = u64>) {
    rt().block_on(async {
        let js = js(server).await;
        let s = js.get_stream("TALLY_EVENTS").await.unwrap();
        for seq in seqs {
            assert!(s.delete_message(seq).await.unwrap(), "message {seq}");
        }
    })
}

/// The stream's last sequence.
fn stream_last(server: &NatsServer) -> u64 {
    rt().block_on(async {
        let js = js(server).await;
        let mut s = js.get_stream("TALLY_EVENTS").await.unwrap();
        s.info().await.unwrap().state.last_sequence
    })
}

/// Publishes the first `n` lines of `file` and writes the rest to
/// `rest.jsonl`; returns the stream's last sequence (JetStream drops the
/// file's quick re-sends, so fewer than `n`).
fn publish_split(server: &NatsServer, dir: &Path, file: &Path, n: usize) -> u64 {
    let text = std::fs::read_to_string(file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let (a, b) = lines.split_at(n);
    let first = dir.join("first.jsonl");
    let rest = dir.join("rest.jsonl");
    std::fs::write(&first, a.join("\n") + "\n").unwrap();
    std::fs::write(&rest, b.join("\n") + "\n").unwrap();
    publish_file(server, &dir.join("unused"), &first);
    stream_last(server)
}

#[test]
fn a_purge_past_the_checkpoint_is_refused_then_recorded_with_accept_gap() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = generated(dir.path(), 20, 3, 11);
    let first = publish_split(&server, dir.path(), &file, 2000);
    until_idle(&server, &data);
    let before = checkpoint(&data);
    let views_before = all_views(&server, &data);
    assert_eq!(before["last_seq"].as_u64().unwrap(), first);
    publish_file(
        &server,
        &dir.path().join("unused"),
        &dir.path().join("rest.jsonl"),
    );
    let last = purge(&server, Some(500));
    let gone_first = first + 1;
    let gone_last = last - 500;
    let err = refused(&server, &data);
    assert!(
        err.contains(&format!("sequences {gone_first} to {gone_last}"))
            && err.contains(&format!("{} messages", gone_last - gone_first + 1))
            && err.contains("--accept-gap"),
        "{err}"
    );
    assert_eq!(checkpoint(&data), before, "the checkpoint is untouched");
    assert_eq!(
        all_views(&server, &data),
        views_before,
        "the views are untouched"
    );
    let status = crate::harness::status_json(&server, &data);
    let warnings = status["status"]["warnings"].to_string();
    assert!(warnings.contains("no longer holds"), "{status}");
    accept_gap(&server, &data);
    assert_eq!(gaps(&data), vec![(gone_first, gone_last)]);
    assert_eq!(checkpoint(&data)["last_seq"].as_u64().unwrap(), last);
    let status = crate::harness::status_json(&server, &data);
    assert_eq!(status["status"]["gaps"][0]["first_seq"], gone_first);
    assert_eq!(status["status"]["gaps"][0]["last_seq"], gone_last);
    let rows = crate::harness::sql(
        &server,
        &data,
        "SELECT first_seq, last_seq, messages FROM _tally_gaps",
    );
    assert_eq!(
        rows,
        vec![vec![
            gone_first.to_string(),
            gone_last.to_string(),
            (gone_last - gone_first + 1).to_string()
        ]]
    );
    // Recorded for good: a later run keeps it and goes on.
    until_idle(&server, &data);
    assert_eq!(gaps(&data), vec![(gone_first, gone_last)]);
}

#[test]
fn a_fresh_directory_on_a_purged_stream_is_refused() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = generated(dir.path(), 5, 2, 12);
    publish_file(&server, &dir.path().join("unused"), &file);
    let last = purge(&server, Some(100));
    let err = refused(&server, &data);
    assert!(
        err.contains(&format!("sequences 1 to {}", last - 100)),
        "{err}"
    );
    accept_gap(&server, &data);
    assert_eq!(gaps(&data), vec![(1, last - 100)]);
}

#[test]
fn a_single_deleted_message_is_a_gap_of_one() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = generated(dir.path(), 5, 2, 13);
    publish_file(&server, &dir.path().join("unused"), &file);
    delete(&server, [200]);
    let err = refused(&server, &data);
    assert!(err.contains("sequences 200 to 200 (1 message)"), "{err}");
    assert_eq!(checkpoint(&data)["last_seq"].as_u64().unwrap(), 199);
    accept_gap(&server, &data);
    assert_eq!(gaps(&data), vec![(200, 200)]);
}

#[test]
fn a_stream_whose_retention_drops_what_a_run_has_not_read_is_refused() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    rt().block_on(async {
        let js = js(&server).await;
        js.create_stream(stream::Config {
            max_messages: 300,
            ..events_stream()
        })
        .await
        .unwrap();
    });
    let file = generated(dir.path(), 5, 2, 14);
    let first = publish_split(&server, dir.path(), &file, 250);
    until_idle(&server, &data);
    assert_eq!(checkpoint(&data)["last_seq"].as_u64().unwrap(), first);
    publish_file(
        &server,
        &dir.path().join("unused"),
        &dir.path().join("rest.jsonl"),
    );
    let err = refused(&server, &data);
    assert!(
        err.contains(&format!("sequences {} to ", first + 1)),
        "{err}"
    );
    // The whole remaining tail purged: nothing is delivered, the gap is
    // still noticed.
    purge(&server, None);
    let err = refused(&server, &data);
    assert!(
        err.contains(&format!("sequences {} to ", first + 1)),
        "{err}"
    );
}

/// `tally replay` on `data`, expecting `code`; returns stderr.
fn replay(server: &NatsServer, data: &Path, args: &[&str], code: i32) -> String {
    let mut c = tally(server, data);
    c.arg("replay").args(args);
    String::from_utf8(run_expect(c, code).stderr).unwrap()
}

/// The checkpoint's counts and gaps: what a replay must carry over.
fn counts(data: &Path) -> (serde_json::Value, serde_json::Value, u64) {
    let cp = checkpoint(data);
    (
        cp["counts"].clone(),
        cp["gaps"].clone(),
        cp["last_seq"].as_u64().unwrap(),
    )
}

#[test]
fn replay_reads_what_the_stream_forgot_from_the_archive() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = generated(dir.path(), 25, 4, 21);
    publish_file(&server, &dir.path().join("unused"), &file);
    // Bad messages and a re-sent duplicate beyond JetStream's window, so the
    // forgotten range holds every outcome.
    rt().block_on(async {
        let js = js(&server).await;
        for body in ["not json", "{\"specversion\":\"0.3\"}"] {
            js.publish("tally.events.acme.usage.recorded", body.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    let lines: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .take(40)
        .map(str::to_string)
        .collect();
    crate::harness::publish_lines(&server, &dir.path().join("unused"), &lines);
    // Small batches: the archive has many files, so a replay links several
    // in one batch.
    let mut c = tally(&server, &data);
    c.args(["run", "--until-idle", "--batch-size", "400"]);
    run_expect(c, 0);
    let files: Vec<String> = std::fs::read_dir(data.join("views/events"))
        .unwrap()
        .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(files.len() > 3, "{files:?}");
    let complete = all_views(&server, &data);
    let complete_counts = counts(&data);
    // A replay of the complete stream, as of a past position, for later.
    let as_of = complete_counts.2 / 2;
    let past = dir.path().join("past");
    replay(
        &server,
        &data,
        &[
            "--until-seq",
            &as_of.to_string(),
            "--into",
            past.to_str().unwrap(),
        ],
        0,
    );
    let past_views = all_views(&server, &past);
    // The stream forgets: a message in the middle, then everything but the
    // newest 300, then everything.
    delete(&server, [complete_counts.2 - 100]);
    purge(&server, Some(300));
    replay(&server, &data, &[], 0);
    assert_eq!(
        all_views(&server, &data),
        complete,
        "after a purge with keep"
    );
    assert_eq!(counts(&data), complete_counts);
    purge(&server, None);
    replay(&server, &data, &[], 0);
    assert_eq!(
        all_views(&server, &data),
        complete,
        "after a complete purge"
    );
    assert_eq!(counts(&data), complete_counts);
    // Batches smaller than the archive's files (each holds hundreds of
    // rows): a file linked whole is folded a batch at a time and committed
    // once, its rows neither lost nor doubled.
    replay(&server, &data, &["--batch-size", "50"], 0);
    assert_eq!(
        all_views(&server, &data),
        complete,
        "files folded in pieces"
    );
    assert_eq!(counts(&data), complete_counts);
    let past_again = dir.path().join("past-again");
    replay(
        &server,
        &data,
        &[
            "--until-seq",
            &as_of.to_string(),
            "--into",
            past_again.to_str().unwrap(),
        ],
        0,
    );
    assert_eq!(
        all_views(&server, &past_again),
        past_views,
        "--until-seq from the archive"
    );
    // The dedup horizon survives: a late re-send of an archived event is
    // still a duplicate.
    crate::harness::publish_lines(&server, &dir.path().join("unused"), &lines[..5]);
    until_idle(&server, &data);
    assert_eq!(
        all_views(&server, &data),
        complete,
        "re-sends after the replay"
    );
}

#[test]
fn replay_refuses_to_build_views_from_less_history() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = generated(dir.path(), 10, 3, 22);
    let first = publish_split(&server, dir.path(), &file, 1500);
    until_idle(&server, &data);
    let before = all_views(&server, &data);
    let before_cp = checkpoint(&data);
    publish_file(
        &server,
        &dir.path().join("unused"),
        &dir.path().join("rest.jsonl"),
    );
    purge(&server, Some(50));
    // The live views stop at `first`; the stream forgot what came after.
    let err = replay(&server, &data, &[], 1);
    assert!(
        err.contains(&format!("sequences {} to ", first + 1)) && err.contains("less history"),
        "{err}"
    );
    assert_eq!(
        all_views(&server, &data),
        before,
        "the live views are untouched"
    );
    assert_eq!(checkpoint(&data), before_cp);
    replay(&server, &data, &["--accept-gap"], 0);
    assert_eq!(gaps(&data).len(), 1);
    assert_eq!(gaps(&data)[0].0, first + 1);
}

#[test]
fn status_warns_when_retention_is_about_to_drop_unprocessed_messages() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    rt().block_on(async {
        js(&server)
            .await
            .create_stream(stream::Config {
                max_messages: 1000,
                ..events_stream()
            })
            .await
            .unwrap();
    });
    let file = generated(dir.path(), 5, 2, 15);
    publish_split(&server, dir.path(), &file, 100);
    until_idle(&server, &data);
    let quiet = crate::harness::status_json(&server, &data);
    assert_eq!(
        quiet["status"]["warnings"],
        serde_json::json!([]),
        "{quiet}"
    );
    let more: Vec<String> = (0..800)
        .map(|i| crate::harness::api_calls(&format!("r{i}"), "acme", "2025-03-01T00:00:00Z", "1"))
        .collect();
    crate::harness::publish_lines(&server, &dir.path().join("unused"), &more);
    let status = crate::harness::status_json(&server, &data);
    let warnings = status["status"]["warnings"].to_string();
    assert!(warnings.contains("max_msgs"), "{status}");
}

#[test]
fn the_stream_tally_creates_gets_the_retention_asked_for() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut c = tally(&server, &dir.path().join("data"));
    c.args([
        "--stream-max-age",
        "30d",
        "--stream-max-bytes",
        "1G",
        "run",
        "--until-idle",
    ]);
    run_expect(c, 0);
    let config = rt().block_on(async {
        let js = js(&server).await;
        let mut s = js.get_stream("TALLY_EVENTS").await.unwrap();
        s.info().await.unwrap().config.clone()
    });
    assert_eq!(config.max_age, std::time::Duration::from_secs(30 * 86_400));
    assert_eq!(config.max_bytes, 1 << 30);
}

#[test]
fn replay_reads_deletions_at_the_split_and_at_the_tail_from_the_archive() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (data, clean) = (dir.path().join("data"), dir.path().join("clean"));
    let file = generated(dir.path(), 10, 3, 23);
    let split = publish_split(&server, dir.path(), &file, 1200);
    until_idle(&server, &data);
    publish_file(
        &server,
        &dir.path().join("unused"),
        &dir.path().join("rest.jsonl"),
    );
    until_idle(&server, &clean);
    let complete = all_views(&server, &clean);
    let complete_counts = counts(&clean);
    // The message at the live checkpoint (the replay's split) is gone, and
    // later ones exist.
    delete(&server, [split]);
    replay(&server, &data, &[], 0);
    assert_eq!(all_views(&server, &data), complete, "deleted at the split");
    assert_eq!(counts(&data), complete_counts);
    // The stream's tail is gone too, after the live run processed it.
    let last = stream_last(&server);
    delete(&server, last - 4..=last);
    replay(&server, &data, &[], 0);
    assert_eq!(all_views(&server, &data), complete, "deleted at the tail");
    assert_eq!(counts(&data), complete_counts);
}
