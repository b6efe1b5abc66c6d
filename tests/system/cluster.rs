//! A 3-node JetStream cluster of the pinned nats-server on loopback ports,
//! each node with its own store: `--nats` with every node's URL,
//! `--replicas 3` streams, and the stream leader killed with -9 during a
//! run and restarted. The views equal those of an undisturbed run over the
//! same stream.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{free_port, generated, run_expect};
use crate::metrics::{all_views, assert_same_views};

struct Node {
    name: String,
    port: u16,
    cluster_port: u16,
    store: PathBuf,
    child: Option<Child>,
}

/// Three nats-server processes, killed on drop.
pub struct Cluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
    pub url: String,
}

impl Cluster {
    pub fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes: Vec<Node> = (0..3)
            .map(|i| Node {
                name: format!("n{i}"),
                port: free_port(),
                cluster_port: free_port(),
                store: dir.path().join(format!("n{i}")),
                child: None,
            })
            .collect();
        let routes: Vec<String> = nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.cluster_port))
            .collect();
        let url = nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",");
        for n in &mut nodes {
            spawn(n, &routes);
        }
        Cluster {
            nodes,
            _dir: dir,
            url,
        }
    }

    pub fn kill(&mut self, name: &str) {
        let n = self.nodes.iter_mut().find(|n| n.name == name).unwrap();
        let mut c = n.child.take().unwrap();
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
    }

    pub fn restart(&mut self, name: &str) {
        let routes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.cluster_port))
            .collect();
        let n = self.nodes.iter_mut().find(|n| n.name == name).unwrap();
        spawn(n, &routes);
    }
}

fn spawn(n: &mut Node, routes: &[String]) {
    let bin = std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"));
    let child = Command::new(bin)
        .args([
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &n.port.to_string(),
            "-n",
            &n.name,
        ])
        .args(["--cluster_name", "tally-test"])
        .args(["--cluster", &format!("nats://127.0.0.1:{}", n.cluster_port)])
        .args(["--routes", &routes.join(",")])
        .arg("-sd")
        .arg(&n.store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    n.child = Some(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", n.port)).is_err() {
        assert!(Instant::now() < deadline, "node {} did not listen", n.name);
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn tally(cluster: &Cluster, data: &std::path::Path) -> Command {
    let mut c = Command::new(crate::harness::bin());
    c.env("TALLY_NATS_URL", &cluster.url)
        .env("TALLY_DATA_DIR", data)
        .env("TALLY_STREAM_REPLICAS", "3")
        .env("RUST_LOG", "warn")
        .env_remove("TALLY_QUERIES_DIR");
    c
}

fn checkpoint(data: &std::path::Path) -> u64 {
    std::fs::read_to_string(data.join("checkpoint.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["last_seq"].as_u64())
        .unwrap_or(0)
}

/// The stream's leader, and its last sequence.
fn leader(cluster: &Cluster) -> (String, u64) {
    crate::harness::rt().block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let addrs: Vec<async_nats::ServerAddr> =
                cluster.url.split(',').map(|u| u.parse().unwrap()).collect();
            if let Ok(client) = async_nats::connect(addrs.as_slice()).await {
                let js = async_nats::jetstream::new(client);
                if let Ok(mut s) = js.get_stream("TALLY_EVENTS").await
                    && let Ok(info) = s.info().await
                    && let Some(l) = info.cluster.as_ref().and_then(|c| c.leader.clone())
                {
                    assert_eq!(info.config.num_replicas, 3, "the stream is not R3");
                    return (l, info.state.last_sequence);
                }
            }
            assert!(Instant::now() < deadline, "no stream leader");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// Runs `tally run --batch-size 200 <extra>` on `data`; once every
/// checkpoint directory in `dirs` has committed, kills the stream's leader
/// with -9, waits for another leader, restarts the killed node, and stops
/// the run once every directory has reached `last`.
fn run_through_a_leader_kill(
    cluster: &mut Cluster,
    data: &std::path::Path,
    extra: &[&str],
    dirs: &[std::path::PathBuf],
    last: u64,
) {
    let least = || dirs.iter().map(|d| checkpoint(d)).min().unwrap_or(0);
    let mut run = tally(cluster, data);
    run.args(["run", "--batch-size", "200"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut run = run.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while least() == 0 {
        assert!(Instant::now() < deadline, "the run never committed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (killed, _) = leader(cluster);
    cluster.kill(&killed);
    assert!(
        least() < last,
        "the run finished before the leader died: make the stream larger"
    );
    let (new_leader, _) = leader(cluster);
    assert_ne!(new_leader, killed);
    std::thread::sleep(Duration::from_millis(500));
    cluster.restart(&killed);
    let deadline = Instant::now() + Duration::from_secs(180);
    while least() < last {
        assert!(run.try_wait().unwrap().is_none(), "the run stopped");
        assert!(
            Instant::now() < deadline,
            "the run stalled at {:?}",
            dirs.iter().map(|d| checkpoint(d)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    run.kill().unwrap();
    run.wait().unwrap();
}

#[test]
fn the_stream_leader_killed_mid_run_changes_no_row() {
    let mut cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let file = generated(dir.path(), 30, 3, 11);
    // The cluster elects its JetStream meta leader first: publish (which
    // creates the R3 stream) until it can. The stream stores partition
    // numbers for two: the partitioned workers below each receive only
    // their own messages, and single runs read them all.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut p = tally(&cluster, &dir.path().join("clean"));
        p.arg("publish")
            .env("TALLY_STREAM_PARTITIONS", "2")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if p.status().unwrap().success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster never took the events"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (_, last) = leader(&cluster);

    // A run in small batches; the leader dies under it, and comes back.
    let data = dir.path().join("failover");
    run_through_a_leader_kill(&mut cluster, &data, &[], std::slice::from_ref(&data), last);

    // An undisturbed run over the same stream.
    let clean = dir.path().join("clean");
    let mut c = tally(&cluster, &clean);
    c.args(["run", "--until-idle"]);
    run_expect(c, 0);

    let url = cluster.url.clone();
    let views = |d: &std::path::Path| {
        let server = crate::harness::NatsServer::external(&url);
        all_views(&server, d)
    };
    assert_same_views(
        &views(&clean),
        &views(&data),
        "after the stream leader was killed",
    );

    // Two partition workers in one process; the leader dies under them.
    let parted = dir.path().join("parted");
    run_through_a_leader_kill(
        &mut cluster,
        &parted,
        &["--partitions", "2", "--partition", "0..1"],
        &[parted.join("partition-0"), parted.join("partition-1")],
        last,
    );
    assert_same_views(
        &views(&clean),
        &views(&parted),
        "two partitions after the stream leader was killed",
    );
}

/// A replicated stream refuses a message whose `Nats-Msg-Id` is still being
/// stored (JetStream error 10158) instead of answering "duplicate": `tally
/// publish` publishes it again until the stream says duplicate, so a file
/// with repeated events publishes in one go on a cluster as on one server.
#[test]
fn publish_to_a_replicated_stream_counts_copies_in_flight_as_duplicates() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let file = generated(dir.path(), 5, 1, 3);
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().take(300).collect();
    // The stream exists (and has a leader) once a first line is taken.
    let first = dir.path().join("first.jsonl");
    std::fs::write(&first, format!("{}\n", lines[0])).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut p = tally(&cluster, &dir.path().join("data"));
        p.arg("publish")
            .arg(&first)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if p.status().unwrap().success() {
            break;
        }
        assert!(Instant::now() < deadline, "the cluster never took an event");
        std::thread::sleep(Duration::from_millis(500));
    }
    // Every other event twice in a row: the second copy arrives while the
    // first is still being replicated.
    let doubled: Vec<&str> = lines[1..].iter().flat_map(|l| [*l, *l]).collect();
    let path = dir.path().join("doubled.jsonl");
    std::fs::write(&path, doubled.join("\n") + "\n").unwrap();
    let mut p = tally(&cluster, &dir.path().join("data"));
    p.arg("publish").arg(&path);
    let out = run_expect(p, 0);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("published {}", doubled.len())),
        "{said}"
    );
    // At least every second copy (the generator repeats some events too).
    let duplicates: usize = said
        .split("(of which JetStream duplicates ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    assert!(duplicates >= lines.len() - 1, "{said}");
}
