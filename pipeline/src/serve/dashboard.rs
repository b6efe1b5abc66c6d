//! The pages of `tally serve`'s HTTP listener: the dashboard (`/`), a
//! tenant's usage page (`/tenants/<tenant>`), and the JSON they load
//! (`/api/dashboard`, `/api/tenants/<tenant>`).
//!
//! The JSON is the rows of SQL over the views, run through
//! [`super::views::Views`] for the logged-in account's scope, all queries of
//! one page on one checkpoint: a number on screen is what `tally sql` says
//! at that checkpoint. The browser code (`assets/web/app.js`) lays numbers
//! out and computes none. ECharts is vendored (`assets/echarts/`) and
//! embedded, so nothing is fetched from the internet. A tenant account
//! asking for another tenant gets 404, as for one that does not exist.

use std::sync::Arc;

use arrow::array::RecordBatch;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde_json::{Map, Value, json};

use super::web::{Http, account_call, account_of, stream_state, unauthorized};
use crate::query::{QueryError, Scope};

const ECHARTS: &[u8] = include_bytes!("../../assets/echarts/echarts.min.js");
const ECHARTS_LICENSE: &[u8] = include_bytes!("../../assets/echarts/LICENSE");
const APP_JS: &[u8] = include_bytes!("../../assets/web/app.js");
const STYLE: &[u8] = include_bytes!("../../assets/web/style.css");
const FAVICON: &[u8] = include_bytes!("../../assets/web/favicon.svg");

/// The page shell: the script fills `<main>`.
fn shell(title: &str, body_attrs: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><link rel="icon" href="/static/favicon.svg" type="image/svg+xml"><link rel="stylesheet" href="/static/style.css"><script src="/static/echarts.min.js"></script></head>
<body {body_attrs}><header><h1>{title}</h1><span class="meta" id="meta"></span><span class="meta"><a href="/">dashboard</a></span></header>
<main id="app">Loading…</main><script src="/static/app.js"></script></body></html>"#
    )
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// `'...'` with quotes doubled: a tenant name as a SQL literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

pub async fn asset(UrlPath(name): UrlPath<String>) -> Response {
    let (body, kind): (&'static [u8], &str) = match name.as_str() {
        "echarts.min.js" => (ECHARTS, "text/javascript; charset=utf-8"),
        "echarts-LICENSE.txt" => (ECHARTS_LICENSE, "text/plain; charset=utf-8"),
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "style.css" => (STYLE, "text/css; charset=utf-8"),
        "favicon.svg" => (FAVICON, "image/svg+xml"),
        _ => return not_found(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// `/favicon.ico`, which browsers ask for whatever the page says: the
/// same icon (browsers read an SVG served there).
pub async fn favicon() -> Response {
    asset(UrlPath("favicon.svg".to_owned())).await
}

/// `/`: the dashboard for accounts that see all tenants; a tenant account
/// goes to its own page.
pub async fn index(State(http): State<Arc<Http>>, headers: HeaderMap) -> Response {
    let Some(account) = account_of(&http, &headers) else {
        return unauthorized();
    };
    match account.scope() {
        Scope::AllTenants => html(shell("Tally", r#"data-page="dashboard""#)),
        Scope::Tenants(t) => match t.first() {
            Some(first) => Redirect::to(&format!("/tenants/{}", url_encode(first))).into_response(),
            None => not_found(),
        },
    }
}

fn html(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `/tenants/<tenant>`.
pub async fn tenant_page(
    State(http): State<Arc<Http>>,
    UrlPath(tenant): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let (account, _call) = match account_call(&http, &headers) {
        Ok(call) => call,
        Err(refused) => return *refused,
    };
    let scope = account.scope();
    if !scope.sees(&tenant) || !tenant_exists(&http, &scope, &tenant).await {
        return not_found();
    }
    let attrs = format!(
        r#"data-page="tenant" data-tenant="{}""#,
        html_escape(&tenant)
    );
    html(shell(&format!("Tally · {}", html_escape(&tenant)), &attrs))
}

async fn tenant_exists(http: &Http, scope: &Scope, tenant: &str) -> bool {
    let sql = format!(
        "SELECT 1 FROM tenants WHERE tenant = {t} UNION ALL SELECT 1 FROM usage WHERE tenant = {t} LIMIT 1",
        t = literal(tenant)
    );
    matches!(run(http, scope, &[("x", sql)]).await, Ok(v) if v["x"].as_array().is_some_and(|a| !a.is_empty()))
}

/// Runs `queries` on one checkpoint for `scope`: `{name: rows, ...,
/// checkpoint_seq, stream_clock}`.
async fn run(http: &Http, scope: &Scope, queries: &[(&str, String)]) -> Result<Value, QueryError> {
    let shared = &http.shared;
    let sqls: Vec<String> = queries.iter().map(|(_, q)| q.clone()).collect();
    let (answers, checkpoint_seq) = shared.views.run_many(scope, &sqls).await?;
    let mut out = Map::new();
    for ((name, _), batches) in queries.iter().zip(answers) {
        out.insert((*name).to_owned(), rows_json(&batches)?);
    }
    // A tenant account's position is its own (`_tally_clock`), never the
    // stream's sequence, which counts every tenant's messages.
    if *scope == Scope::AllTenants {
        out.insert("checkpoint_seq".into(), json!(checkpoint_seq));
    }
    Ok(Value::Object(out))
}

fn rows_json(batches: &[RecordBatch]) -> Result<Value, QueryError> {
    let mut buf = Vec::new();
    {
        let mut w = arrow::json::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, arrow::json::writer::JsonArray>(&mut buf);
        for b in batches {
            w.write(b).map_err(|e| QueryError::Output(e.to_string()))?;
        }
        w.finish().map_err(|e| QueryError::Output(e.to_string()))?;
    }
    if buf.is_empty() {
        return Ok(json!([]));
    }
    serde_json::from_slice(&buf).map_err(|e| QueryError::Output(e.to_string()))
}

fn query_failed(e: &QueryError) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{e}\n"),
    )
        .into_response()
}

/// `/api/dashboard`: every number of the dashboard, for all-tenant accounts.
pub async fn dashboard_json(State(http): State<Arc<Http>>, headers: HeaderMap) -> Response {
    let (account, _call) = match account_call(&http, &headers) {
        Ok(call) => call,
        Err(refused) => return *refused,
    };
    if account.scope() != Scope::AllTenants {
        return not_found();
    }
    let queries = [
        ("mrr_waterfall", "SELECT * FROM mrr_waterfall ORDER BY currency, month".to_owned()),
        ("churn", "SELECT * FROM churn ORDER BY currency, month".to_owned()),
        ("ltv", "SELECT * FROM ltv ORDER BY currency, month".to_owned()),
        ("revenue_by_month", "SELECT * FROM revenue_by_month ORDER BY currency, month".to_owned()),
        ("top_tenants", "SELECT * FROM top_tenants ORDER BY rank, currency LIMIT 15".to_owned()),
        ("over_quota", "SELECT * FROM over_quota ORDER BY overage_amount DESC NULLS LAST, tenant, metric LIMIT 25".to_owned()),
        ("clock", "SELECT CAST(stream_clock AS VARCHAR) AS stream_clock FROM _tally_clock".to_owned()),
        ("gaps", "SELECT * FROM _tally_gaps ORDER BY first_seq".to_owned()),
        ("restatements", "SELECT view, cause, count(*) AS rows, count(DISTINCT tenant) AS tenants FROM restatements GROUP BY view, cause ORDER BY view, cause".to_owned()),
        ("corrections", "SELECT count(*) AS voids, COALESCE(sum(targets), 0) AS voided FROM corrections".to_owned()),
    ];
    let mut v = match run(&http, &Scope::AllTenants, &queries).await {
        Ok(v) => v,
        Err(e) => return query_failed(&e),
    };
    let clock = v["clock"][0]["stream_clock"].clone();
    v["stream_clock"] = clock.clone();
    let checkpoint = http.shared.views.checkpoint().await.ok().flatten();
    let stream = stream_state(&http).await;
    let checkpoint_seq = v["checkpoint_seq"].as_u64().unwrap_or(0);
    let (last, stream_error) = match stream {
        Ok((last, _)) => (Some(last), None),
        Err(e) => (None, Some(e)),
    };
    // Counts come from the checkpoint the rows were read at when it is
    // still the current one; otherwise from the newer one (it only grows).
    let counts = checkpoint.as_ref().map(|c| &c.counts);
    v["pipeline"] = json!({
        "checkpoint_seq": checkpoint_seq,
        "stream_last_seq": last,
        "lag": last.map(|l| l.saturating_sub(checkpoint_seq)),
        "stream_clock": clock,
        "accepted": counts.map(|c| c.accepted),
        "duplicate": counts.map(|c| c.duplicate),
        "dead_lettered": counts.map(|c| c.dead_lettered.clone()).unwrap_or_default(),
        "gaps": v["gaps"].clone(),
        "stream_error": stream_error,
    });
    Json(v).into_response()
}

/// `/api/tenants/<tenant>`: the tenant page's numbers, for accounts that
/// see the tenant.
pub async fn tenant_json(
    State(http): State<Arc<Http>>,
    UrlPath(tenant): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let (account, _call) = match account_call(&http, &headers) {
        Ok(call) => call,
        Err(refused) => return *refused,
    };
    let scope = account.scope();
    if !scope.sees(&tenant) {
        return not_found();
    }
    let t = literal(&tenant);
    let queries = [
        (
            "tenants",
            format!("SELECT * FROM tenants WHERE tenant = {t}"),
        ),
        (
            "usage",
            format!(
                "SELECT metric, granularity, CAST(window_start AS VARCHAR) AS window_start, events, sum, max, last, unique_count FROM usage WHERE tenant = {t} ORDER BY metric, granularity, window_start"
            ),
        ),
        (
            "overages",
            format!(
                "SELECT CAST(period AS VARCHAR) AS period, CAST(period_start AS VARCHAR) AS period_start, CAST(period_end AS VARCHAR) AS period_end, metric, plan, aggregation, used, included, overage_quantity, overage_amount, currency, pct_used, threshold, is_final FROM overages WHERE tenant = {t} ORDER BY period_start, metric"
            ),
        ),
        (
            // The open billing period: the one holding the stream clock.
            "open_period",
            format!(
                "SELECT CAST(o.period_start AS VARCHAR) AS period_start, CAST(o.period_end AS VARCHAR) AS period_end, o.metric FROM overages o CROSS JOIN _tally_clock k WHERE o.tenant = {t} AND o.period_start <= k.stream_clock AND k.stream_clock < o.period_end ORDER BY o.metric"
            ),
        ),
        (
            "by_dimension",
            format!(
                "SELECT metric, \"group\", granularity, CAST(window_start AS VARCHAR) AS window_start, \"sum\", \"max\" FROM usage_by_dimension WHERE tenant = {t} ORDER BY metric, granularity, window_start, \"group\""
            ),
        ),
        (
            "timeline",
            format!(
                "SELECT CAST(time AS VARCHAR) AS time, type, data FROM events WHERE tenant = {t} AND (type LIKE 'subscription.%' OR type LIKE 'tenant.%') ORDER BY time, stream_seq"
            ),
        ),
        (
            "invoices",
            format!(
                "SELECT CAST(time AS VARCHAR) AS time, type, data FROM events WHERE tenant = {t} AND (type LIKE 'invoice.%' OR type LIKE 'payment.%') ORDER BY time, stream_seq"
            ),
        ),
        (
            "revenue",
            format!("SELECT * FROM revenue WHERE tenant = {t} ORDER BY month, currency"),
        ),
        (
            "corrections",
            format!(
                "SELECT CAST(published_at AS VARCHAR) AS published_at, target_source, target_id, reason, targets FROM corrections WHERE tenant = {t} ORDER BY stream_seq DESC LIMIT 50"
            ),
        ),
        (
            "restatements",
            format!(
                "SELECT CAST(published_at AS VARCHAR) AS published_at, view, key, before, after, cause FROM restatements WHERE tenant = {t} ORDER BY stream_seq DESC, view, key LIMIT 50"
            ),
        ),
        (
            "clock",
            "SELECT CAST(stream_clock AS VARCHAR) AS stream_clock, checkpoint_seq FROM _tally_clock"
                .to_owned(),
        ),
    ];
    let mut v = match run(&http, &scope, &queries).await {
        Ok(v) => v,
        Err(e) => return query_failed(&e),
    };
    let empty = |k: &str| v[k].as_array().is_none_or(|a| a.is_empty());
    if empty("tenants") && empty("usage") && empty("timeline") {
        return not_found();
    }
    v["tenant"] = v["tenants"][0].clone();
    v["tenant_id"] = json!(tenant);
    v["stream_clock"] = v["clock"][0]["stream_clock"].clone();
    v["checkpoint_seq"] = v["clock"][0]["checkpoint_seq"].clone();
    Json(v).into_response()
}

struct Json(Value);

impl IntoResponse for Json {
    fn into_response(self) -> Response {
        (
            [(header::CONTENT_TYPE, "application/json")],
            self.0.to_string(),
        )
            .into_response()
    }
}
