//! The business views (`mrr`, `revenue`, `tenants`) and the `queries/` SQL
//! views: a hand-computed fixture, order independence, and the golden
//! outputs every `queries/*.sql` view is held to.

use std::path::{Path, PathBuf};

use crate::harness::{NatsServer, generated, publish_lines, run_expect, tally, until_idle};

pub fn queries_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../queries")
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// `tally sql QUERY --format csv`: the header, then the rows sorted as text
/// (views have no order; this makes outputs comparable).
pub fn sorted_csv(server: &NatsServer, data: &Path, query: &str) -> String {
    let mut c = tally(server, data);
    c.args(["sql", query, "--format", "csv"]);
    sort_csv(&String::from_utf8(run_expect(c, 0).stdout).unwrap())
}

/// CSV with its header first and its rows sorted.
pub fn sort_csv(out: &str) -> String {
    let mut lines: Vec<&str> = out.lines().collect();
    if lines.len() > 1 {
        lines[1..].sort_unstable();
    }
    lines.join("\n") + "\n"
}

/// The names of the `queries/*.sql` views, sorted.
pub fn query_views() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(queries_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .map(|p| p.file_stem().unwrap().to_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

/// Every stored view and every `queries/` view as sorted CSV, by name: what
/// two runs over the same stream must agree on row for row.
pub fn all_views(server: &NatsServer, data: &Path) -> Vec<(String, String)> {
    views_by(|query| sorted_csv(server, data, query))
}

/// Every stored and `queries/` view, by name, as `sorted` answers
/// `SELECT * FROM <view>` (sorted CSV).
pub fn views_by(sorted: impl Fn(&str) -> String) -> Vec<(String, String)> {
    let stored = [
        "events",
        "usage",
        "usage_by_dimension",
        "overages",
        "mrr",
        "revenue",
        "tenants",
        "corrections",
        "restatements",
    ];
    stored
        .iter()
        .map(|v| v.to_string())
        .chain(query_views())
        .map(|v| {
            let text = sorted(&format!("SELECT * FROM {v}"));
            (v, text)
        })
        .collect()
}

/// Asserts two runs agree on every view, naming the first that differs.
pub fn assert_same_views(a: &[(String, String)], b: &[(String, String)], what: &str) {
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(b) {
        if x != y {
            let diff: Vec<String> = x
                .lines()
                .zip(y.lines())
                .filter(|(l, r)| l != r)
                .take(3)
                .map(|(l, r)| format!("  clean: {l}\n  other: {r}"))
                .collect();
            panic!(
                "{what}: view {name} differs ({} vs {} lines)\n{}",
                x.lines().count(),
                y.lines().count(),
                diff.join("\n")
            );
        }
    }
}

/// Compares with a checked-in expected file; `TALLY_BLESS=1` rewrites it.
fn check_golden(path: &Path, got: &str) {
    if std::env::var_os("TALLY_BLESS").is_some() {
        std::fs::write(path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with TALLY_BLESS=1 to create it)",
            path.display()
        )
    });
    assert_eq!(
        got,
        want,
        "{} differs from the output (TALLY_BLESS=1 rewrites it after review)",
        path.display()
    );
}

/// The golden SaaS: deterministic, small enough for CI, with every event family.
pub fn golden_stream(dir: &Path) -> PathBuf {
    generated(dir, 40, 8, 42)
}

pub fn publish_file(server: &NatsServer, data: &Path, file: &Path) {
    let mut p = tally(server, data);
    p.arg("publish").arg(file);
    run_expect(p, 0);
}

/// Every `queries/*.sql` view has a golden output in `queries/golden/`.
#[test]
fn queries_match_their_golden_outputs() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    publish_file(&server, &data, &golden_stream(dir.path()));
    until_idle(&server, &data);
    let names = query_views();
    assert!(names.len() >= 6, "{names:?}");
    for name in names {
        let got = sorted_csv(&server, &data, &format!("SELECT * FROM {name}"));
        assert!(got.lines().count() > 1, "{name} is empty");
        check_golden(
            &queries_dir().join("golden").join(format!("{name}.csv")),
            &got,
        );
    }
}

/// A hand-computed fixture (`tests/fixtures/subscriptions.md` shows the
/// working) covering every movement and fold rule, published out of order.
#[test]
fn business_views_match_the_hand_computation() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    publish_file(&server, &data, &fixtures_dir().join("subscriptions.jsonl"));
    until_idle(&server, &data);
    let expected = |name: &str| {
        std::fs::read_to_string(fixtures_dir().join(format!("subscriptions.{name}.csv"))).unwrap()
    };
    let check = |name: &str, query: &str| {
        let got = sorted_csv(&server, &data, query);
        let want = expected(name);
        let mut want_lines: Vec<&str> = want.lines().collect();
        want_lines[1..].sort_unstable();
        assert_eq!(got, want_lines.join("\n") + "\n", "view {name}");
    };
    check("mrr", "SELECT * FROM mrr");
    check("revenue", "SELECT * FROM revenue");
    check("tenants", "SELECT * FROM tenants");
    check(
        "churn",
        "SELECT month, currency, customers_start, customers_churned, round(logo_churn_rate, 6) AS logo_churn_rate, \
         mrr_start, mrr_end, new_mrr, expansion_mrr, contraction_mrr, churned_mrr, reactivation_mrr, \
         round(gross_mrr_churn_rate, 6) AS gross_mrr_churn_rate, round(net_mrr_churn_rate, 6) AS net_mrr_churn_rate, \
         round(nrr, 6) AS nrr FROM churn",
    );
    check(
        "ltv",
        "SELECT month, currency, customers_end, round(arpa, 6) AS arpa, \
         round(avg_logo_churn_6m, 6) AS avg_logo_churn_6m, round(ltv, 6) AS ltv FROM ltv",
    );

    // Order independence: the same events in reverse arrival order, one
    // event per batch, on another stream, give the same rows.
    let lines: Vec<String> = std::fs::read_to_string(fixtures_dir().join("subscriptions.jsonl"))
        .unwrap()
        .lines()
        .rev()
        .map(str::to_owned)
        .collect();
    let other = NatsServer::start();
    let data2 = dir.path().join("reversed");
    publish_lines(&other, &data2, &lines);
    let mut c = tally(&other, &data2);
    c.args(["run", "--until-idle", "--batch-size", "1"]);
    run_expect(c, 0);
    for v in ["mrr", "revenue", "tenants", "churn", "ltv"] {
        let q = format!("SELECT * FROM {v}");
        assert_eq!(
            sorted_csv(&server, &data, &q),
            sorted_csv(&other, &data2, &q),
            "view {v} depends on arrival order"
        );
    }
}
