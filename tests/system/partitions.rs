//! Partitioned deployments: N workers over one stream, each folding its
//! tenants (and the catalog) into its own partition of one data location,
//! read as one set of views.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use async_nats::jetstream::stream;

use crate::harness::{
    NatsServer, generated, js, rt, run_expect, sql, tally, until_idle, wait_for_checkpoint,
};
use crate::metrics::{all_views, assert_same_views, publish_file, sorted_csv, views_by};

fn worker(server: &NatsServer, data: &Path, n: u32, k: u32, until_idle: bool) -> Child {
    let mut c = tally(server, data);
    c.args([
        "run",
        "--partitions",
        &n.to_string(),
        "--partition",
        &k.to_string(),
        "--batch-size",
        "200",
    ]);
    if until_idle {
        c.arg("--until-idle");
    }
    c.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Partitions 0 and 2 of three run to the end side by side while
/// partition 1 is killed -9 twice, each time `step` sequences past where
/// it was, then run to the end.
fn three_workers_one_killed_twice(server: &NatsServer, parted: &Path, step: u64) {
    let workers: Vec<Child> = [0, 2]
        .iter()
        .map(|k| worker(server, parted, 3, *k, true))
        .collect();
    let p1 = parted.join("partition-1");
    let mut beyond = 0;
    for _ in 0..2 {
        let mut child = worker(server, parted, 3, 1, false);
        beyond = wait_for_checkpoint(&p1, beyond + step, &mut child);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    wait_ok(worker(server, parted, 3, 1, true));
    for w in workers {
        wait_ok(w);
    }
}

fn wait_ok(child: Child) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "worker failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The tenants a partition's own location holds.
fn tenants_of(server: &NatsServer, partition: &Path) -> Vec<String> {
    let mut t: Vec<String> = sql(server, partition, "SELECT tenant FROM tenants")
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    t.sort();
    t
}

#[test]
fn three_partitions_with_kill_9s_read_as_one_run_over_the_whole_stream() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = generated(dir.path(), 40, 3, 7);
    let whole = dir.path().join("whole");
    publish_file(&server, &whole, &file);
    until_idle(&server, &whole);

    // Three workers side by side; partition 1 is killed twice mid-stream.
    let parted = dir.path().join("parted");
    three_workers_one_killed_twice(&server, &parted, 1000);

    // Every view of the union is the whole run's, row for row.
    assert_same_views(
        &all_views(&server, &whole),
        &all_views(&server, &parted),
        "three partitions against one run",
    );
    // Each tenant is in exactly one partition, the one its FNV-1a hash names.
    let mut seen: Vec<String> = Vec::new();
    for k in 0..3 {
        let own = tenants_of(&server, &parted.join(format!("partition-{k}")));
        assert!(!own.is_empty(), "partition {k} folded no tenant");
        seen.extend(own);
    }
    seen.sort();
    let all = tenants_of(&server, &whole);
    assert_eq!(seen, all, "each tenant once, in one partition");

    // The hash is the one NATS's partition transform computes: a stream
    // that maps `pc.<tenant>` to `pcp.{{partition(3,1)}}.<tenant>` puts
    // each tenant where Tally did.
    rt().block_on(async {
        let js = js(&server).await;
        js.create_stream(stream::Config {
            name: "PARTCHECK".into(),
            subjects: vec!["pc.*".into()],
            subject_transform: Some(stream::SubjectTransform {
                source: "pc.*".into(),
                destination: "pcp.{{partition(3,1)}}.{{wildcard(1)}}".into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        for t in &all {
            js.publish(format!("pc.{t}"), "x".into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        let s = js.get_stream("PARTCHECK").await.unwrap();
        for (i, t) in all.iter().enumerate() {
            let m = s.get_raw_message(i as u64 + 1).await.unwrap();
            let tokens: Vec<&str> = m.subject.split('.').collect();
            let k = tokens[1];
            assert_eq!(tokens[2], t);
            let own = tenants_of(&server, &parted.join(format!("partition-{k}")));
            assert!(
                own.contains(t),
                "NATS puts {t} in partition {k}, Tally did not"
            );
        }
    });

    // The clock tables: one row per partition, the frontier their least.
    let parts = sorted_csv(
        &server,
        &parted,
        "SELECT partition, partitions, checkpoint_seq FROM _tally_partitions",
    );
    let last = sql(&server, &whole, "SELECT checkpoint_seq FROM _tally_clock")[0][0].clone();
    assert_eq!(
        parts,
        format!("partition,partitions,checkpoint_seq\n0,3,{last}\n1,3,{last}\n2,3,{last}\n")
    );
    let frontier = sql(
        &server,
        &parted,
        "SELECT k.stream_clock = (SELECT min(stream_clock) FROM _tally_partitions) FROM _tally_clock k",
    );
    assert_eq!(frontier, vec![vec!["true".to_owned()]]);

    // `tally status` reports each partition; a replay of all partitions
    // leaves the union as it was.
    let mut st = tally(&server, &parted);
    st.args(["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&run_expect(st, 0).stdout).unwrap();
    let reported = status["partitions"].as_array().unwrap();
    assert_eq!(reported.len(), 3);
    for r in reported {
        assert_eq!(r["status"]["lag"], 0, "{r}");
    }
    let mut replay = tally(&server, &parted);
    replay.args(["replay", "--partitions", "3", "--partition", "0..2"]);
    run_expect(replay, 0);
    assert_same_views(
        &all_views(&server, &whole),
        &all_views(&server, &parted),
        "after replaying every partition",
    );
}

#[test]
fn partition_mistakes_are_refused_with_what_to_do() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let parted = dir.path().join("parted");
    let whole = dir.path().join("whole");
    // Exit 2: a mistake in the command line; 1: in what it meets.
    let refused = |data: &Path, args: &[&str], code: i32, says: &str| {
        let mut c = tally(&server, data);
        c.args(["run", "--until-idle"]).args(args);
        let out = run_expect(c, code);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(err.contains(says), "{args:?}: {err}");
    };
    let ok = |data: &Path, args: &[&str]| {
        let mut c = tally(&server, data);
        c.args(["run", "--until-idle"]).args(args);
        run_expect(c, 0);
    };
    ok(&parted, &["--partitions", "2", "--partition", "0"]);
    refused(
        &parted,
        &["--partitions", "3", "--partition", "0"],
        1,
        "partitioned into 2 partitions, not 3",
    );
    refused(&parted, &[], 1, "--partitions 2 --partition K");
    refused(
        &parted,
        &["--partitions", "2", "--partition", "2"],
        2,
        "the partitions are 0 to 1",
    );
    refused(&parted, &["--partition", "1"], 2, "--partitions");
    ok(&whole, &[]);
    refused(
        &whole,
        &["--partitions", "2", "--partition", "0"],
        1,
        "holds views of the whole stream",
    );
    // Two workers claiming one partition: the second is refused while the
    // first holds it.
    let mut first = worker(&server, &parted, 2, 1, false);
    let lock_holder = parted.join("partition-1").join("checkpoint.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !lock_holder.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "worker 1 never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    refused(
        &parted,
        &["--partitions", "2", "--partition", "1"],
        1,
        "another tally process is using",
    );
    first.kill().unwrap();
    first.wait().unwrap();
    // A reader of a partition no worker started says which to start.
    let mut q = tally(&server, &parted);
    q.args(["sql", "SELECT count(*) FROM usage"]);
    run_expect(q, 0);
    let three = dir.path().join("three");
    ok(&three, &["--partitions", "3", "--partition", "0"]);
    let mut q = tally(&server, &three);
    q.args(["sql", "SELECT count(*) FROM usage"]);
    let out = run_expect(q, 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("partition 1 of") && err.contains("--partitions 3 --partition 1"),
        "{err}"
    );
    // One process may own several partitions, each its own run.
    ok(&three, &["--partitions", "3", "--partition", "1..2"]);
    let mut q = tally(&server, &three);
    q.args(["sql", "SELECT count(*) FROM _tally_partitions"]);
    assert!(String::from_utf8_lossy(&run_expect(q, 0).stdout).contains('3'));
    refused(
        &three,
        &[
            "--partitions",
            "3",
            "--partition",
            "0..2",
            "--consumer",
            "c",
        ],
        2,
        "one process per partition",
    );
    // A partition rebuilt with other settings: readers refuse the mix and
    // name the partition to rebuild.
    let toml = dir.path().join("other.toml");
    std::fs::write(&toml, "lateness = \"1h\"\n").unwrap();
    let mut r = tally(&server, &three);
    r.args([
        "replay",
        "--partitions",
        "3",
        "--partition",
        "2",
        "--config",
    ])
    .arg(&toml);
    run_expect(r, 0);
    let mut q = tally(&server, &three);
    q.args(["sql", "SELECT count(*) FROM usage"]);
    let err = String::from_utf8_lossy(&run_expect(q, 1).stderr).to_string();
    assert!(
        err.contains("partition 2 of") && err.contains("other settings"),
        "{err}"
    );
}

/// `GET path` on `port`: the status line's code and the body.
fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (code, body)
}

#[test]
fn tally_serve_answers_a_partitioned_location_and_a_tenant_sees_only_its_own() {
    use crate::serve::{Serve, add_user, psql};
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = generated(dir.path(), 12, 2, 3);
    let whole = dir.path().join("whole");
    publish_file(&server, &whole, &file);
    until_idle(&server, &whole);
    let parted = dir.path().join("parted");
    for k in 0..2 {
        wait_ok(worker(&server, &parted, 2, k, true));
    }
    let tenant = tenants_of(&server, &whole)[0].clone();
    let users = dir.path().join("users.toml");
    add_user(&users, "ops", "ops-pw", &["--all-tenants"]);
    add_user(&users, "acme", "acme-pw", &["--tenant", &tenant]);
    let serve = Serve::start(&server, &parted, &users, &[]);
    let q = |user: &str, pw: &str, sql: &str| {
        let (code, out, err) = psql(&serve.dsn(user, pw), &["-c", sql], dir.path());
        assert_eq!(code, 0, "{sql}: {err}");
        out.trim().to_owned()
    };
    let (code, body) = http_get(serve.http, "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let whole_usage = sql(&server, &whole, "SELECT count(*), sum(sum) FROM usage");
    assert_eq!(
        q("ops", "ops-pw", "SELECT count(*), sum(sum) FROM usage"),
        whole_usage[0].join("|")
    );
    assert_eq!(
        q("ops", "ops-pw", "SELECT count(*) FROM _tally_partitions"),
        "2"
    );
    // The tenant: its rows only, its partition's clock only, no sequences.
    assert_eq!(
        q("acme", "acme-pw", "SELECT DISTINCT tenant FROM usage"),
        tenant
    );
    assert_eq!(
        q(
            "acme",
            "acme-pw",
            "SELECT count(*), count(checkpoint_seq) FROM _tally_partitions"
        ),
        "1|0"
    );
    let own_events = sql(
        &server,
        &whole,
        &format!("SELECT count(*) FROM events WHERE tenant = '{tenant}'"),
    )[0][0]
        .clone();
    assert_eq!(
        q(
            "acme",
            "acme-pw",
            "SELECT count(*), min(stream_seq) FROM events"
        ),
        format!("{own_events}|1")
    );
}

/// A stream created with `--stream-partitions 3` stores each message's
/// partition in its subject, and each worker's consumer filters on it: a
/// worker receives only its own tenants' and the catalog's messages, and
/// the union is still the whole run's, kill -9 included. A message the
/// stream lost is a gap, never passed over as another partition's.
#[test]
fn partitions_stored_in_subjects_deliver_each_worker_only_its_own() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    // The catalog (the generator's first lines) lands mid-stream, after
    // half the tenants' events: partitions read it beside their consumers
    // and must fold it in stream order.
    let text = std::fs::read_to_string(generated(dir.path(), 40, 3, 11)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[..10].iter().all(|l| l.contains("\"_system\"")));
    assert!(!lines[10].contains("\"_system\""));
    let half = lines.len() / 2;
    let reordered: Vec<&str> = lines[10..half]
        .iter()
        .chain(&lines[..10])
        .chain(&lines[half..])
        .copied()
        .collect();
    let file = dir.path().join("catalog-mid-stream.jsonl");
    std::fs::write(&file, reordered.join("\n") + "\n").unwrap();

    // The reference: the same file on a stream of its own that stores
    // subjects as published.
    let reference = dir.path().join("reference");
    let on_reference = |mut c: std::process::Command| {
        c.env("TALLY_STREAM", "REFERENCE")
            .env("TALLY_SUBJECT_PREFIX", "reference.events");
        c
    };
    let mut p = on_reference(tally(&server, &reference));
    p.arg("publish").arg(&file);
    run_expect(p, 0);
    let mut r = on_reference(tally(&server, &reference));
    r.args(["run", "--until-idle"]);
    run_expect(r, 0);

    let parted = dir.path().join("parted");
    let mut p = tally(&server, &parted);
    p.args(["publish", "--stream-partitions", "3"]).arg(&file);
    run_expect(p, 0);
    let last: u64 = sql(
        &server,
        &reference,
        "SELECT checkpoint_seq FROM _tally_clock",
    )[0][0]
        .parse()
        .unwrap();

    // Stored as `tally.events.<partition>.<tenant>.<type>`.
    let stored: Vec<String> = rt().block_on(async {
        let s = js(&server).await.get_stream("TALLY_EVENTS").await.unwrap();
        let mut subjects = Vec::new();
        for seq in 1..=last {
            subjects.push(s.get_raw_message(seq).await.unwrap().subject.to_string());
        }
        subjects
    });
    for subject in &stored {
        let t: Vec<&str> = subject.split('.').collect();
        assert!(t.len() >= 5, "{subject}");
        let k: u32 = t[2].parse().unwrap();
        assert!(k < 3, "{subject}");
    }

    // Three workers; partition 1 is killed -9 twice mid-stream.
    three_workers_one_killed_twice(&server, &parted, 300);
    assert_same_views(
        &views_but_publish_times(&server, &reference),
        &views_but_publish_times(&server, &parted),
        "three filtered partitions against one run",
    );
    // Each partition's checkpoint reaches the stream's end, though its
    // last message may be well before it.
    assert_eq!(
        sorted_csv(
            &server,
            &parted,
            "SELECT partition, checkpoint_seq FROM _tally_partitions"
        ),
        format!("partition,checkpoint_seq\n0,{last}\n1,{last}\n2,{last}\n")
    );
    // Each worker's consumer filtered on its partition and received only
    // its partition's messages (a worker reads the catalog's beside it).
    let own = |k: u32| {
        stored
            .iter()
            .filter(|s| s.starts_with(&format!("tally.events.{k}.")))
            .count() as u64
    };
    rt().block_on(async {
        use futures::StreamExt;
        let s = js(&server).await.get_stream("TALLY_EVENTS").await.unwrap();
        let consumers: Vec<_> = s.consumers().map(|c| c.unwrap()).collect().await;
        for k in [0u32, 2] {
            let filter = format!("tally.events.{k}.>");
            let info = consumers
                .iter()
                .find(|c| c.config.filter_subjects == vec![filter.clone()])
                .unwrap_or_else(|| panic!("no consumer filters on {filter}"));
            assert_eq!(info.delivered.consumer_sequence, own(k), "partition {k}");
            assert!(own(k) < last, "partition {k} holds every message");
        }
    });

    // More messages after the workers stopped: a replay of every
    // partition, through filtered consumers, folds up to the live
    // checkpoints (the stream's old end, likely another partition's
    // sequence), switches there, and goes on to the new end.
    let more_text = std::fs::read_to_string(generated(dir.path(), 40, 1, 12)).unwrap();
    let more_lines: Vec<&str> = more_text.lines().collect();
    let more = dir.path().join("more.jsonl");
    // Ending on a catalog message: each worker folds it, read beside its
    // consumer, as the stream's last message.
    let tail: Vec<&str> = more_lines[more_lines.len() - 300..]
        .iter()
        .chain(&more_lines[..1])
        .copied()
        .collect();
    assert!(more_lines[0].contains("\"_system\""));
    std::fs::write(&more, tail.join("\n") + "\n").unwrap();
    let mut p = on_reference(tally(&server, &reference));
    p.arg("publish").arg(&more);
    run_expect(p, 0);
    let mut r = on_reference(tally(&server, &reference));
    r.args(["run", "--until-idle"]);
    run_expect(r, 0);
    let mut p = tally(&server, &parted);
    p.arg("publish").arg(&more);
    run_expect(p, 0);
    let mut replay = tally(&server, &parted);
    replay.args(["replay", "--partitions", "3", "--partition", "0..2"]);
    run_expect(replay, 0);
    assert_same_views(
        &views_but_publish_times(&server, &reference),
        &views_but_publish_times(&server, &parted),
        "after replaying every filtered partition past its live checkpoint",
    );
    let end = sql(
        &server,
        &reference,
        "SELECT checkpoint_seq FROM _tally_clock",
    )[0][0]
        .clone();
    assert_eq!(
        sorted_csv(
            &server,
            &parted,
            "SELECT partition, checkpoint_seq FROM _tally_partitions"
        ),
        format!("partition,checkpoint_seq\n0,{end}\n1,{end}\n2,{end}\n")
    );

    // Workers whose N is not the stream's read every message, as before.
    let two = dir.path().join("two");
    let mut c = tally(&server, &two);
    c.args([
        "run",
        "--partitions",
        "2",
        "--partition",
        "0..1",
        "--until-idle",
    ]);
    run_expect(c, 0);
    assert_same_views(
        &views_but_publish_times(&server, &reference),
        &views_but_publish_times(&server, &two),
        "two unfiltered partitions of a stream storing three",
    );

    // A message of partition 1 deleted from the stream: partition 1's
    // worker refuses the gap, or records it with --accept-gap.
    let gone = (last / 2..=last)
        .find(|seq| {
            let s = &stored[*seq as usize - 1];
            s.starts_with("tally.events.1.") && !s.contains("._system.")
        })
        .unwrap();
    rt().block_on(async {
        let s = js(&server).await.get_stream("TALLY_EVENTS").await.unwrap();
        assert!(s.delete_message(gone).await.unwrap());
    });
    let fresh = dir.path().join("fresh");
    let mut c = tally(&server, &fresh);
    c.args([
        "run",
        "--partitions",
        "3",
        "--partition",
        "1",
        "--until-idle",
    ]);
    let out = run_expect(c, 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&gone.to_string()) && err.contains("--accept-gap"),
        "{err}"
    );
    let mut c = tally(&server, &fresh);
    c.args([
        "run",
        "--partitions",
        "3",
        "--partition",
        "1",
        "--until-idle",
        "--accept-gap",
    ]);
    run_expect(c, 0);
    assert_eq!(
        sql(
            &server,
            &fresh.join("partition-1"),
            "SELECT first_seq, last_seq FROM _tally_gaps"
        ),
        vec![vec![gone.to_string(), gone.to_string()]]
    );
}

/// Every view as [`all_views`] has it, but for the time each message was
/// published, which differs between two streams given the same file.
fn views_but_publish_times(server: &NatsServer, data: &Path) -> Vec<(String, String)> {
    views_by(|query| {
        let view = query.trim_start_matches("SELECT * FROM ");
        if ["events", "corrections", "restatements"].contains(&view) {
            sorted_csv(
                server,
                data,
                &format!("SELECT * EXCLUDE (published_at) FROM {view}"),
            )
        } else {
            sorted_csv(server, data, query)
        }
    })
}

/// A stream whose layout was changed after messages were stored is refused
/// rather than read wrongly: a subject transform added to a stream with
/// messages stops both a single run and a partition's worker, naming the
/// message; a stream that also captures other subjects is read whole by
/// every worker (no filter would deliver those), and its stray message is
/// dead-lettered once.
#[test]
fn a_stream_layout_changed_after_messages_is_refused_not_misread() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = generated(dir.path(), 10, 1, 5);
    let data = dir.path().join("data");
    publish_file(&server, &data, &file);
    let update =
        |server: &NatsServer, subjects: Vec<String>, transform: Option<(String, String)>| {
            rt().block_on(async {
                let js = js(server).await;
                let mut config = js
                    .get_stream("TALLY_EVENTS")
                    .await
                    .unwrap()
                    .cached_info()
                    .config
                    .clone();
                config.subjects = subjects;
                config.subject_transform =
                    transform.map(|(source, destination)| stream::SubjectTransform {
                        source,
                        destination,
                    });
                js.update_stream(config).await.unwrap();
            })
        };
    // The transform of three partitions, added after the messages.
    let (source, destination) = (
        "tally.events.*.>".to_owned(),
        "tally.events.{{partition(3,1)}}.{{wildcard(1)}}.>".to_owned(),
    );
    update(
        &server,
        vec!["tally.events.>".into()],
        Some((source.clone(), destination.clone())),
    );
    for args in [
        vec!["run", "--until-idle"],
        vec![
            "run",
            "--until-idle",
            "--partitions",
            "3",
            "--partition",
            "1",
        ],
    ] {
        let fresh = tempfile::tempdir().unwrap();
        let mut c = tally(&server, fresh.path());
        c.args(&args);
        let out = run_expect(c, 1);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("transform was added or changed after messages were stored")
                && err.contains("--stream-partitions"),
            "{args:?}: {err}"
        );
    }

    // A stream created with the transform that also captures `other.>`:
    // workers read every message, and the stray one is dead-lettered by
    // partition 0 alone.
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut p = tally(&server, &data);
    p.args(["publish", "--stream-partitions", "3"]).arg(&file);
    run_expect(p, 0);
    update(
        &server,
        vec!["tally.events.>".into(), "other.>".into()],
        Some((source, destination)),
    );
    rt().block_on(async {
        let js = js(&server).await;
        js.publish("other.foo", "{}".into())
            .await
            .unwrap()
            .await
            .unwrap();
    });
    let mut c = tally(&server, &data);
    c.args([
        "run",
        "--until-idle",
        "--partitions",
        "3",
        "--partition",
        "0..2",
    ]);
    run_expect(c, 0);
    let dead: u64 = rt().block_on(async {
        let js = js(&server).await;
        js.get_stream("TALLY_DLQ")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages
    });
    assert_eq!(dead, 1, "the stray message, dead-lettered once");
}
