//! Views in object storage: the real `tally` binary on `s3://` locations of
//! a real S3 server (SeaweedFS, started per test on free ports), under the
//! fault suite (kill -9 at pseudo-random instants, duplicates, the store
//! going away mid-run, a replay alone and during a run), a standby taking
//! over from a paused holder, and refused credentials or a missing bucket.
//! After each, every view must equal a clean run on a local directory.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::faults::{Lcg, last_seq, stream};
use crate::harness::{NatsServer, SeaweedS3, bin, generated, run_expect};
use crate::metrics::{all_views, assert_same_views, publish_file, sort_csv, views_by};

const BUCKET: &str = "tally-views";

/// `tally` with the NATS server, the S3 server's `AWS_*` variables and
/// `--data` set, as a user would.
fn tally(server: &NatsServer, s3: &SeaweedS3, data: &str) -> Command {
    let mut c = Command::new(bin());
    c.env("TALLY_NATS_URL", &server.url)
        .env("TALLY_DATA_DIR", data)
        .env("RUST_LOG", "warn")
        .env_remove("TALLY_QUERIES_DIR")
        .envs(s3.envs());
    c
}

/// Every view of an `s3://` location, as [`all_views`] gives a directory's.
fn views(server: &NatsServer, s3: &SeaweedS3, data: &str) -> Vec<(String, String)> {
    views_by(|query| {
        let mut c = tally(server, s3, data);
        c.args(["sql", query, "--format", "csv"]);
        sort_csv(&String::from_utf8(run_expect(c, 0).stdout).unwrap())
    })
}

/// The location's manifest (its `checkpoint.json`), read straight from S3.
fn manifest(s3: &SeaweedS3, data: &str) -> Option<serde_json::Value> {
    let key = data.strip_prefix("s3://").unwrap();
    let (code, body) = s3.request("GET", &format!("/{key}/checkpoint.json"));
    (code == 200).then(|| serde_json::from_str(&body).unwrap())
}

fn committed(s3: &SeaweedS3, data: &str) -> u64 {
    manifest(s3, data)
        .and_then(|m| m["last_seq"].as_u64())
        .unwrap_or(0)
}

fn spawn_run(server: &NatsServer, s3: &SeaweedS3, data: &str, extra: &[&str]) -> Child {
    let mut c = tally(server, s3, data);
    c.arg("run")
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c.spawn().unwrap()
}

/// Waits until the location commits beyond `beyond`; panics if `child` exits first.
fn wait_committed(s3: &SeaweedS3, data: &str, beyond: u64, child: &mut Child) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let at = committed(s3, data);
        if at > beyond {
            return at;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!("tally run exited early with {status}: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "no commit beyond {beyond} in {data}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

fn stop(mut child: Child) -> String {
    signal(&child, "-TERM");
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(0), "tally run did not exit 0: {err}");
    err
}

/// Object keys under `prefix` in the test bucket.
fn keys(s3: &SeaweedS3, prefix: &str) -> Vec<String> {
    let (code, body) = s3.request(
        "GET",
        &format!(
            "/{BUCKET}?list-type=2&max-keys=10000&prefix={}%2F",
            prefix.replace('/', "%2F")
        ),
    );
    assert_eq!(code, 200, "{body}");
    body.split("<Key>")
        .skip(1)
        .filter_map(|k| k.split_once("</Key>").map(|(k, _)| k.to_owned()))
        .collect()
}

#[test]
fn faults_on_object_storage_leave_every_view_equal_to_a_clean_local_run() {
    let s = stream();
    let server = &s.server;
    let last = last_seq(server, &s.dir.path().join("clean"));
    let mut s3 = SeaweedS3::start();
    s3.create_bucket(BUCKET);

    // 1. kill -9 at pseudo-random instants, each followed by a restart
    // (the lease of a dead process on this host is taken over at once).
    let data = format!("s3://{BUCKET}/killed");
    let mut rng = Lcg(0x5eed);
    let mut kills = 0;
    while kills < 8 && committed(&s3, &data) < last {
        let batch = (1 + rng.next(300)).to_string();
        let mut child = spawn_run(server, &s3, &data, &["--batch-size", &batch]);
        std::thread::sleep(Duration::from_millis(300 + rng.next(500)));
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    assert!(kills >= 6, "the stream was consumed after {kills} kills");
    let mut c = tally(server, &s3, &data);
    c.args(["run", "--until-idle"]);
    run_expect(c, 0);
    assert_eq!(committed(&s3, &data), last);
    assert_same_views(&s.clean, &views(server, &s3, &data), "s3: after kill -9s");
    // Objects the kills left unnamed are collected by the next run: then
    // every object under the prefix is one the manifest names.
    let mut c = tally(server, &s3, &data);
    c.args(["run", "--until-idle"]);
    run_expect(c, 0);
    let m = manifest(&s3, &data).unwrap();
    let named: Vec<String> = m["files"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|fs| fs.as_array().unwrap().iter())
        .map(|f| format!("killed/{}", f["key"].as_str().unwrap()))
        .collect();
    let stored = keys(&s3, "killed/views");
    assert_eq!(stored.len(), named.len(), "{stored:?}");
    for k in stored {
        assert!(named.contains(&k), "{k} is not in the manifest");
    }

    // 2. The S3 server goes away mid-run and comes back: the batch waits
    // unacknowledged, retried with backoff, and lands.
    let data = format!("s3://{BUCKET}/outage");
    let mut child = spawn_run(server, &s3, &data, &["--batch-size", "150"]);
    let before = wait_committed(&s3, &data, 0, &mut child);
    s3.stop();
    std::thread::sleep(Duration::from_millis(3000));
    s3.restart();
    let after = wait_committed(&s3, &data, last - 1, &mut child);
    assert!(after > before);
    let err = stop(child);
    assert!(
        err.contains("batch not yet durable; keeping it unacknowledged and retrying"),
        "{err}"
    );
    assert_same_views(&s.clean, &views(server, &s3, &data), "s3: after an outage");
    // The run wrote each window's versions more than once: stopping, it
    // replaced them with a snapshot and committed again, so the manifest
    // names one file covering the whole stream.
    let m = manifest(&s3, &data).unwrap();
    let usage: Vec<(u64, u64)> = m["files"]["usage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["first_seq"].as_u64().unwrap(),
                f["last_seq"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(usage, [(1, last)], "usage files after the run stopped");

    // 3. A replay with no run: switches the location to identical views.
    let data = format!("s3://{BUCKET}/killed");
    let mut c = tally(server, &s3, &data);
    c.arg("replay");
    run_expect(c, 0);
    assert_same_views(&s.clean, &views(server, &s3, &data), "s3: after a replay");

    // 4. A replay while a run holds the location: the run pauses, the
    // replay's manifest replaces its, and the run resumes on it.
    let data = format!("s3://{BUCKET}/handoff");
    let mut child = spawn_run(server, &s3, &data, &["--batch-size", "100"]);
    wait_committed(&s3, &data, 0, &mut child);
    let mut c = tally(server, &s3, &data);
    c.arg("replay");
    let out = run_expect(c, 0);
    let said = String::from_utf8_lossy(&out.stderr);
    wait_committed(&s3, &data, last - 1, &mut child);
    stop(child);
    assert_same_views(
        &s.clean,
        &views(server, &s3, &data),
        &format!("s3: after a replay during a run ({said})"),
    );

    // 5. status and the stored checkpoint agree.
    let mut c = tally(server, &s3, &data);
    c.args(["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&run_expect(c, 0).stdout).unwrap();
    assert_eq!(v["status"]["checkpoint_seq"].as_u64(), Some(last), "{v}");

    // 6. `tally serve` answers from the location like `tally sql`.
    let users = s.dir.path().join("users.toml");
    crate::serve::add_user(&users, "analyst", "pw-analyst", &["--all-tenants"]);
    let (pg, http) = (crate::harness::free_port(), crate::harness::free_port());
    let mut c = tally(server, &s3, &data);
    c.arg("serve")
        .args(["--pg-listen", &format!("127.0.0.1:{pg}")])
        .args(["--flight-listen", "off"])
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        .arg("--users")
        .arg(&users)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut serve = c.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", pg)).is_err() {
        assert!(Instant::now() < deadline, "tally serve did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={pg} user=analyst password=pw-analyst dbname=tally sslmode=disable"
        ))
        .args([
            "-X",
            "-A",
            "-t",
            "-c",
            "SELECT (SELECT count(*) FROM events), checkpoint_seq FROM _tally_clock",
        ])
        .output()
        .expect("psql (Debian postgresql-client): run deploy/install-clients.sh");
    let events = s.clean[0].1.lines().count() - 1;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{events}|{last}"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let health = Command::new("curl")
        .args(["-s", &format!("http://127.0.0.1:{http}/healthz")])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&health.stdout).trim(), "ok");
    serve.kill().unwrap();
    serve.wait().unwrap();
}

#[test]
fn a_standby_takes_over_and_a_paused_former_holder_cannot_commit() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = generated(dir.path(), 20, 4, 21);
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let third = lines.len() / 3;
    let part = |i: usize, range: std::ops::Range<usize>| {
        let p = dir.path().join(format!("part{i}.jsonl"));
        std::fs::write(&p, lines[range].join("\n") + "\n").unwrap();
        p
    };
    let unused = dir.path().join("unused");
    publish_file(&server, &unused, &part(1, 0..third));
    let s3 = SeaweedS3::start();
    s3.create_bucket(BUCKET);
    let data = format!("s3://{BUCKET}/ha");

    let mut holder = spawn_run(&server, &s3, &data, &["--batch-size", "100"]);
    wait_committed(&s3, &data, 0, &mut holder);
    let holder_writer = manifest(&s3, &data).unwrap()["writer"].clone();
    // A plain second run is refused; a standby waits.
    let mut c = tally(&server, &s3, &data);
    c.args(["run", "--until-idle"]);
    let out = run_expect(c, 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another tally run holds") && err.contains("--standby"),
        "{err}"
    );
    let mut standby = spawn_run(&server, &s3, &data, &["--standby", "--batch-size", "100"]);
    std::thread::sleep(Duration::from_secs(4));
    assert!(standby.try_wait().unwrap().is_none());
    assert_eq!(manifest(&s3, &data).unwrap()["writer"], holder_writer);

    // The holder is paused (not dead: its process is still there), and
    // more events arrive: the standby takes over within 30 s.
    signal(&holder, "-STOP");
    let paused_at = Instant::now();
    publish_file(&server, &unused, &part(2, third..2 * third));
    let part2_end = {
        let mut c = tally(&server, &s3, &data);
        c.args(["status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&run_expect(c, 0).stdout).unwrap();
        v["status"]["stream_last_seq"].as_u64().unwrap()
    };
    wait_committed(&s3, &data, part2_end - 1, &mut standby);
    let took = paused_at.elapsed();
    eprintln!("the standby took over {took:?} after the holder was paused");
    assert!(took < Duration::from_secs(30), "took over after {took:?}");
    assert_ne!(manifest(&s3, &data).unwrap()["writer"], holder_writer);

    // The former holder wakes up: it must not commit, and stops saying why.
    signal(&holder, "-CONT");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = holder.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the former holder kept running");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut holder.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("took over"), "{err}");
    assert_ne!(manifest(&s3, &data).unwrap()["writer"], holder_writer);

    // The new holder goes on; every view equals a clean local run.
    publish_file(&server, &unused, &part(3, 2 * third..lines.len()));
    let clean = dir.path().join("clean");
    let mut c = crate::harness::tally(&server, &clean);
    c.args(["run", "--until-idle", "--consumer", "clean"]);
    run_expect(c, 0);
    let last = last_seq(&server, &clean);
    wait_committed(&s3, &data, last - 1, &mut standby);
    stop(standby);
    assert_same_views(
        &all_views(&server, &clean),
        &views(&server, &s3, &data),
        "s3: after a standby took over",
    );

    // Locally the lock file does the same: a standby takes over at once
    // when the holder dies.
    let local = dir.path().join("local");
    let mut holder = crate::harness::tally(&server, &local);
    holder
        .args(["run", "--consumer", "local"])
        .stderr(Stdio::null());
    let mut holder = holder.spawn().unwrap();
    crate::harness::wait_for_checkpoint(&local, 0, &mut holder);
    let mut standby = crate::harness::tally(&server, &local);
    standby
        .args(["run", "--standby", "--consumer", "local"])
        .stderr(Stdio::null());
    let mut standby = standby.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(standby.try_wait().unwrap().is_none());
    holder.kill().unwrap();
    holder.wait().unwrap();
    crate::harness::wait_for_checkpoint(&local, last - 1, &mut standby);
    signal(&standby, "-TERM");
    assert_eq!(standby.wait().unwrap().code(), Some(0));
    assert_same_views(
        &all_views(&server, &clean),
        &all_views(&server, &local),
        "local: after a standby took over",
    );
}

#[test]
fn refused_credentials_and_a_missing_bucket_stop_with_what_to_do() {
    let server = NatsServer::start();
    let s3 = SeaweedS3::start();
    s3.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    publish_file(
        &server,
        &dir.path().join("unused"),
        &generated(dir.path(), 3, 1, 2),
    );

    let mut c = tally(&server, &s3, &format!("s3://{BUCKET}/prod"));
    c.args(["run", "--until-idle"])
        .env("AWS_SECRET_ACCESS_KEY", "wrong");
    let out = run_expect(c, 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused")
            && err.contains(BUCKET)
            && err.contains("prod")
            && err.contains("AWS_SECRET_ACCESS_KEY"),
        "{err}"
    );

    assert!(!s3.bucket_exists("no-such-bucket"));
    let mut c = tally(&server, &s3, "s3://no-such-bucket/prod");
    c.args(["run", "--until-idle"]);
    let out = run_expect(c, 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bucket no-such-bucket does not exist"),
        "{err}"
    );

    // Readers say the same; a location nothing was written to has no views.
    let mut c = tally(&server, &s3, "s3://no-such-bucket/prod");
    c.args(["sql", "SELECT 1"]);
    let out = run_expect(c, 1);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut c = tally(&server, &s3, &format!("s3://{BUCKET}/empty"));
    c.args(["sql", "SELECT count(*) FROM usage"]);
    let out = run_expect(c, 1);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tally run"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing was written to the local disk but temporary files.
    assert!(!Path::new("s3:").exists());
}

#[test]
fn partitions_in_object_storage_read_as_one_run_even_with_a_worker_killed() {
    let s = stream();
    let server = &s.server;
    let last = last_seq(server, &s.dir.path().join("clean"));
    let s3 = SeaweedS3::start();
    s3.create_bucket(BUCKET);
    let data = format!("s3://{BUCKET}/parted");
    let part = |k: u32| {
        [
            "--partitions",
            "2",
            "--partition",
            if k == 0 { "0" } else { "1" },
        ]
    };
    // Partition 1 is killed once mid-stream and started again; the lease of
    // a dead process on this host is taken over at once.
    let mut p1 = spawn_run(server, &s3, &data, &part(1));
    wait_committed(&s3, &format!("{data}/partition-1"), last / 3, &mut p1);
    p1.kill().unwrap(); // SIGKILL
    p1.wait().unwrap();
    for k in [0, 1] {
        let mut c = tally(server, &s3, &data);
        c.args(["run", "--until-idle"]).args(part(k));
        run_expect(c, 0);
    }
    let (code, body) = s3.request("GET", &format!("/{BUCKET}/parted/partitions.json"));
    assert_eq!((code, body.trim()), (200, r#"{"partitions":2}"#));
    assert_same_views(&s.clean, &views(server, &s3, &data), "two partitions on S3");
    // Another count on the same location is refused.
    let mut c = tally(server, &s3, &data);
    c.args([
        "run",
        "--until-idle",
        "--partitions",
        "3",
        "--partition",
        "0",
    ]);
    let out = run_expect(c, 1);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("partitioned into 2 partitions, not 3"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
