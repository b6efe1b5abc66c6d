//! The dashboard and tenant pages of `tally serve` in a real browser:
//! headless Chromium (Debian `chromium`) loads them against a generated
//! SaaS, with no console errors, and the numbers in the DOM equal `tally
//! sql`'s. A tenant account asking for another tenant gets 404.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use crate::harness::{NatsServer, run_expect, tally};
use crate::serve::{Serve, add_user, client, saas};

fn chromium() -> String {
    std::env::var("TALLY_CHROMIUM").unwrap_or_else(|_| "chromium".into())
}

/// Loads `url` in headless Chromium; (DOM after the scripts ran, console
/// messages).
fn load(url: &str, width: u32) -> (String, Vec<String>) {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=15000",
            "--enable-logging=stderr",
            "--v=0",
            &format!("--window-size={width},1600"),
            "--dump-dom",
            url,
        ])
        .output()
        .expect("chromium is needed for the page tests: run deploy/install-clients.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let console = stderr
        .lines()
        .filter(|l| l.contains("CONSOLE"))
        .map(str::to_owned)
        .collect();
    (String::from_utf8_lossy(&out.stdout).into_owned(), console)
}

/// Every `data-cell="KEY" data-raw="VALUE"` of a DOM.
fn cells(dom: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = dom;
    while let Some(i) = rest.find("data-cell=\"") {
        rest = &rest[i + 11..];
        let end = rest.find('"').unwrap();
        let key = rest[..end].replace("&amp;", "&");
        rest = &rest[end..];
        let raw = rest
            .strip_prefix("\" data-raw=\"")
            .map(|r| r[..r.find('"').unwrap()].to_owned())
            .unwrap_or_default();
        out.push((key, raw));
    }
    out
}

fn tally_json(server: &NatsServer, data: &Path, query: &str) -> Vec<Value> {
    let mut c = tally(server, data);
    c.args(["sql", query, "--format", "json"]);
    serde_json::from_slice(&run_expect(c, 0).stdout).unwrap()
}

/// The same number, whatever its spelling (`1222` and `1222.000000000`).
fn same(dom: &str, sql: &Value) -> bool {
    match sql {
        Value::Null => dom.is_empty(),
        Value::String(s) => dom == s || dom.parse::<f64>().ok() == s.parse::<f64>().ok(),
        v => {
            let (a, b) = (dom.parse::<f64>(), v.to_string().parse::<f64>());
            matches!((a, b), (Ok(a), Ok(b)) if (a - b).abs() <= 1e-9 * b.abs().max(1.0))
        }
    }
}

#[test]
fn dashboard_and_tenant_pages_show_what_tally_sql_says() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = saas(&server, dir.path());
    let users = dir.path().join("users.toml");
    add_user(&users, "ops", "ops-pw", &["--all-tenants"]);
    add_user(&users, "acme", "acme-pw", &["--tenant", "t0003"]);
    let serve = Serve::start(&server, &data, &users, &[]);
    let base = format!("127.0.0.1:{}", serve.http);

    // The dashboard, on a desktop and on a phone.
    let (dom, console) = load(&format!("http://ops:ops-pw@{base}/"), 1280);
    assert!(console.is_empty(), "console messages: {console:?}");
    assert!(!dom.contains("class=\"error\""), "{dom}");
    // The icon browsers ask for on every page, with or without a link to it.
    for path in ["/favicon.ico", "/static/favicon.svg"] {
        let icon = client("http", &json!({"url": format!("http://{base}{path}")}));
        assert_eq!(icon["status"], 200, "{path}: {icon}");
        assert!(icon["body"].as_str().unwrap().starts_with("<svg"), "{path}");
    }
    let found = cells(&dom);
    assert!(
        found.len() > 50,
        "too few numbers on the dashboard: {}",
        found.len()
    );
    let waterfall = tally_json(&server, &data, "SELECT * FROM mrr_waterfall");
    let churn = tally_json(&server, &data, "SELECT * FROM churn");
    let ltv = tally_json(&server, &data, "SELECT * FROM ltv");
    let top = tally_json(&server, &data, "SELECT * FROM top_tenants");
    let over = tally_json(&server, &data, "SELECT * FROM over_quota");
    let clock = tally_json(&server, &data, "SELECT checkpoint_seq FROM _tally_clock");
    let mut checked = 0;
    for (key, raw) in &found {
        let parts: Vec<&str> = key.split('|').collect();
        let find = |rows: &[Value], pred: &dyn Fn(&Value) -> bool, col: &str| -> Value {
            rows.iter()
                .find(|r| pred(r))
                .unwrap_or_else(|| panic!("{key}: no such row in tally sql"))[col]
                .clone()
        };
        let expected = match parts.as_slice() {
            ["mrr_waterfall" | "churn" | "ltv", m, cur, col] => {
                let rows = match parts[0] {
                    "mrr_waterfall" => &waterfall,
                    "churn" => &churn,
                    _ => &ltv,
                };
                find(
                    rows,
                    &|r| r["month"] == json!(m) && r["currency"] == json!(cur),
                    col,
                )
            }
            ["top_tenants", t, col] => find(&top, &|r| r["tenant"] == json!(t), col),
            ["over_quota", t, m, col] => find(
                &over,
                &|r| r["tenant"] == json!(t) && r["metric"] == json!(m),
                col,
            ),
            ["checkpoint_seq"] | ["pipeline", "checkpoint_seq"] => {
                clock[0]["checkpoint_seq"].clone()
            }
            _ => continue,
        };
        assert!(
            same(raw, &expected),
            "{key}: page {raw:?}, tally sql {expected}"
        );
        checked += 1;
    }
    assert!(checked > 50, "checked only {checked}");
    let (phone, console) = load(&format!("http://ops:ops-pw@{base}/"), 390);
    assert!(
        console.is_empty() && cells(&phone).len() == found.len(),
        "{console:?}"
    );

    // A tenant's page, as the tenant: its overages and revenue as in tally sql.
    let (dom, console) = load(&format!("http://acme:acme-pw@{base}/tenants/t0003"), 1280);
    assert!(console.is_empty(), "console messages: {console:?}");
    assert!(!dom.contains("class=\"error\""), "{dom}");
    // Usage by dimension: a stacked chart per grouped metric, drawn.
    assert!(dom.contains("api_calls by region"), "{dom}");
    assert!(dom.contains("This billing period: "), "{dom}");
    let overages = tally_json(
        &server,
        &data,
        "SELECT CAST(period_start AS VARCHAR) AS p, metric, used, included, pct_used, overage_quantity, overage_amount, threshold FROM overages WHERE tenant = 't0003'",
    );
    let revenue = tally_json(
        &server,
        &data,
        "SELECT * FROM revenue WHERE tenant = 't0003'",
    );
    let tenants = tally_json(
        &server,
        &data,
        "SELECT * FROM tenants WHERE tenant = 't0003'",
    );
    let mut checked = 0;
    for (key, raw) in cells(&dom) {
        let parts: Vec<&str> = key.split('|').collect();
        let expected = match parts.as_slice() {
            ["overages" | "alerts", p, m, col] => overages
                .iter()
                .find(|r| r["p"] == json!(p) && r["metric"] == json!(m))
                .unwrap_or_else(|| panic!("{key}"))[*col]
                .clone(),
            ["revenue", m, col] => {
                revenue.iter().find(|r| r["month"] == json!(m)).unwrap()[*col].clone()
            }
            ["tenants", col] => tenants[0][*col].clone(),
            _ => continue,
        };
        assert!(
            same(&raw, &expected),
            "{key}: page {raw:?}, tally sql {expected}"
        );
        checked += 1;
    }
    assert!(checked >= 8, "checked only {checked} tenant numbers");

    // Scoping: another tenant's page or JSON is 404, as an unknown one is;
    // the dashboard's JSON is not a tenant's.
    let status = |user: &str, pw: &str, path: &str| {
        client(
            "http",
            &json!({"url": format!("http://{user}:{pw}@{base}{path}")}),
        )["status"]
            .clone()
    };
    assert_eq!(status("acme", "acme-pw", "/tenants/t0005"), json!(404));
    assert_eq!(status("acme", "acme-pw", "/api/tenants/t0005"), json!(404));
    assert_eq!(status("acme", "acme-pw", "/api/tenants/t9999"), json!(404));
    assert_eq!(status("acme", "acme-pw", "/api/dashboard"), json!(404));
    assert_eq!(status("ops", "ops-pw", "/api/tenants/t9999"), json!(404));
    assert_eq!(status("ops", "ops-pw", "/api/tenants/t0005"), json!(200));
    assert_eq!(status("ops", "wrong", "/api/dashboard"), json!(401));
}

#[test]
fn run_metrics_parse_with_prometheus_and_move_as_it_ingests() {
    use crate::harness::{api_calls, publish_lines};
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut run = tally(&server, &data);
    run.args([
        "run",
        "--batch-wait-ms",
        "20",
        "--metrics-listen",
        &format!("127.0.0.1:{port}"),
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let mut run = run.spawn().unwrap();
    let url = format!("http://127.0.0.1:{port}/metrics");
    let scrape = |want: f64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let out = client("prometheus", &json!({"url": url}));
            if out["status"] == 200
                && out["samples"]["tally_checkpoint_sequence{}"].as_f64() == Some(want)
            {
                return out["samples"].clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "metrics never reached {want}: {out}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    let lines = |from: u32, n: u32| -> Vec<String> {
        (from..from + n)
            .map(|i| {
                api_calls(
                    &format!("m-{i}"),
                    "t1",
                    &format!("2025-01-01T00:{:02}:{:02}Z", i / 60, i % 60),
                    "1",
                )
            })
            .collect()
    };
    publish_lines(&server, &data, &lines(0, 20));
    let mut bad = lines(20, 1);
    bad.push(r#"{"specversion":"1.0","id":"x","source":"s","type":"usage.recorded","time":"2025-01-01T00:00:00Z","tenant":"t1","data":{}}"#.to_owned());
    let mut p = tally(&server, &data);
    p.args(["publish", "-", "--allow-invalid"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = p.spawn().unwrap();
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        (bad.join("\n") + "\n").as_bytes(),
    )
    .unwrap();
    child.wait().unwrap();
    let first = scrape(22.0);
    let n = |s: &Value, k: &str| s[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {s}"));
    assert_eq!(n(&first, "tally_messages_accepted_total{}"), 21.0);
    assert_eq!(n(&first, "tally_stream_last_sequence{}"), 22.0);
    assert_eq!(n(&first, "tally_lag_messages{}"), 0.0);
    assert!(first["tally_batches_total{}"].as_f64().unwrap() >= 1.0);
    assert!(
        first["tally_batch_commit_seconds_count{}"]
            .as_f64()
            .unwrap()
            >= 1.0
    );
    assert!(
        first["tally_process_peak_resident_bytes{}"]
            .as_f64()
            .unwrap()
            > 1e6
    );
    assert!(first["tally_view_files_bytes{}"].as_f64().unwrap() > 0.0);
    assert!(first["tally_dedup_horizon_entries{}"].as_f64().unwrap() >= 21.0);
    let dead: f64 = first
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("tally_messages_dead_lettered_total{reason="))
        .map(|(_, v)| v.as_f64().unwrap())
        .sum();
    assert_eq!(dead, 1.0, "{first}");
    publish_lines(&server, &data, &lines(40, 10));
    let second = scrape(32.0);
    assert_eq!(n(&second, "tally_messages_accepted_total{}"), 31.0);
    assert!(second["tally_batches_total{}"].as_f64() > first["tally_batches_total{}"].as_f64());
    run.kill().unwrap();
    run.wait().unwrap();
}
