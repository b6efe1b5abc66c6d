//! Dimensions and unique counts end to end, against a real nats-server:
//! `usage_by_dimension` with missing keys and a `group_by` changed by a
//! later meter definition, exact unique counts across windows and periods
//! with a void, a `unique_count` meter's overages, and the bound on
//! distinct dimension values.

use crate::harness::{NatsServer, event, publish_lines, sql, status_json, until_idle};

fn tokens(id: &str, time: &str, q: u32, dims: &str) -> String {
    event(
        id,
        "acme",
        "usage.recorded",
        time,
        &format!(r#"{{"metric":"tokens","quantity":{q},"dimensions":{dims}}}"#),
    )
}

fn login(id: &str, time: &str, user: &str) -> String {
    event(
        id,
        "acme",
        "usage.recorded",
        time,
        &format!(r#"{{"metric":"mau","quantity":1,"unique":"{user}"}}"#),
    )
}

fn rows(server: &NatsServer, data: &std::path::Path, q: &str) -> Vec<String> {
    sql(server, data, q)
        .into_iter()
        .map(|r| r.join(","))
        .collect()
}

#[test]
fn usage_splits_by_dimension_and_counts_unique_values_exactly() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let meter = |id: &str, time: &str, metric: &str, agg: &str, by: &str| {
        event(
            id,
            "_system",
            "catalog.meter_defined",
            time,
            &format!(r#"{{"metric":"{metric}","aggregation":"{agg}","group_by":{by}}}"#),
        )
    };
    publish_lines(
        &server,
        &data,
        &[
            meter(
                "m1",
                "2025-01-01T00:00:00Z",
                "tokens",
                "sum",
                r#"["region","model"]"#,
            ),
            meter("m2", "2025-01-01T00:00:00Z", "mau", "unique_count", "null"),
            event(
                "p1",
                "_system",
                "catalog.plan_published",
                "2025-01-01T00:00:00Z",
                r#"{"plan":"pro","currency":"USD","limits":{"mau":2},"overage":{"mau":{"unit_price":500,"per":1}}}"#,
            ),
            event(
                "s1",
                "acme",
                "subscription.started",
                "2025-01-01T00:00:00Z",
                r#"{"subscription_id":"sub1","plan":"pro","billing_cycle":"monthly","price":1000,"currency":"USD"}"#,
            ),
            tokens(
                "t1",
                "2025-01-05T10:00:00Z",
                100,
                r#"{"model":"gpt-5","region":"eu"}"#,
            ),
            tokens(
                "t2",
                "2025-01-05T10:10:00Z",
                50,
                r#"{"model":"gpt-5","region":"eu","team":"x"}"#,
            ),
            tokens("t3", "2025-01-05T11:00:00Z", 7, r#"{"region":"us"}"#),
            tokens("t4", "2025-01-06T09:00:00Z", 1, "{}"),
            login("l1", "2025-01-05T10:00:00Z", "ann"),
            login("l2", "2025-01-05T10:30:00Z", "ann"),
            login("l3", "2025-01-05T11:00:00Z", "bob"),
            login("l4", "2025-01-20T11:00:00Z", "cid"),
            login("l5", "2025-01-21T11:00:00Z", "dee"),
            event(
                "v1",
                "acme",
                "event.voided",
                "2025-01-22T00:00:00Z",
                r#"{"target_source":"test","target_id":"l5"}"#,
            ),
        ],
    );
    until_idle(&server, &data);

    // Keys in byte order, a missing key as null, other keys ignored.
    assert_eq!(
        rows(
            &server,
            &data,
            r#"SELECT "group" IN ('{"model":"gpt-5","region":"eu"}', '{"model":null,"region":"us"}', '{"model":null,"region":null}'), events, sum FROM usage_by_dimension WHERE granularity = 'month' ORDER BY sum DESC"#
        ),
        [
            "true,2,150.000000000",
            "true,1,7.000000000",
            "true,1,1.000000000"
        ]
    );
    // Summed over groups, events and sum equal usage, window by window.
    assert_eq!(
        rows(
            &server,
            &data,
            "SELECT count(*) FROM usage u LEFT JOIN (SELECT tenant, metric, granularity, window_start, sum(events) AS e, sum(sum) AS s FROM usage_by_dimension GROUP BY tenant, metric, granularity, window_start) d USING (tenant, metric, granularity, window_start) WHERE u.metric = 'tokens' AND (d.e IS NULL OR d.e <> u.events OR d.s <> u.sum)"
        ),
        ["0"]
    );
    let groups = rows(
        &server,
        &data,
        "SELECT events, sum FROM usage_by_dimension WHERE granularity = 'month' ORDER BY sum DESC",
    );
    assert_eq!(
        groups,
        ["2,150.000000000", "1,7.000000000", "1,1.000000000"]
    );

    // Unique counts: per window, exact, without the voided login.
    assert_eq!(
        rows(
            &server,
            &data,
            "SELECT granularity, CAST(window_start AS VARCHAR) AS ws, events, unique_count FROM usage WHERE metric = 'mau' AND granularity IN ('hour', 'month') ORDER BY granularity, ws"
        ),
        [
            "hour,2025-01-05T10:00:00Z,2,1",
            "hour,2025-01-05T11:00:00Z,1,1",
            "hour,2025-01-20T11:00:00Z,1,1",
            "month,2025-01-01T00:00:00Z,4,3",
        ]
    );
    assert_eq!(
        rows(
            &server,
            &data,
            "SELECT unique_count IS NULL FROM usage WHERE metric = 'tokens' AND granularity = 'month'"
        ),
        ["true"]
    );
    // A unique_count meter's overages: 3 users against 2 included.
    assert_eq!(
        rows(
            &server,
            &data,
            "SELECT aggregation, used, included, overage_quantity, overage_amount, threshold FROM overages WHERE metric = 'mau'"
        ),
        ["unique_count,3.000000000,2.000000000,1.000000000,500,100"]
    );

    // A later definition regroups every window of the metric.
    publish_lines(
        &server,
        &data,
        &[meter(
            "m3",
            "2025-01-02T00:00:00Z",
            "tokens",
            "sum",
            r#"["model"]"#,
        )],
    );
    until_idle(&server, &data);
    assert_eq!(
        rows(
            &server,
            &data,
            "SELECT \"group\" = '{\"model\":\"gpt-5\"}', events FROM usage_by_dimension WHERE granularity = 'month' ORDER BY \"group\""
        ),
        ["true,2", "false,2"]
    );
}

#[test]
fn a_dimension_cardinality_bomb_is_dead_lettered_past_the_bound() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("tally.toml"), "max_dimension_values = 3\n").unwrap();
    let mut lines: Vec<String> = (0..6)
        .map(|i| {
            tokens(
                &format!("b{i}"),
                "2025-01-05T10:00:00Z",
                1,
                &format!(r#"{{"request":"req-{i}"}}"#),
            )
        })
        .collect();
    // Known values stay welcome; so does another month.
    lines.push(tokens(
        "b6",
        "2025-01-06T10:00:00Z",
        1,
        r#"{"request":"req-0"}"#,
    ));
    lines.push(tokens(
        "b7",
        "2025-02-06T10:00:00Z",
        1,
        r#"{"request":"req-9"}"#,
    ));
    publish_lines(&server, &data, &lines);
    until_idle(&server, &data);
    let s = status_json(&server, &data);
    assert_eq!(
        s["status"]["counts"]["dead_lettered"]["too_many_dimension_values"].as_u64(),
        Some(3),
        "{s}"
    );
    assert_eq!(
        rows(
            &server,
            &data,
            "SELECT sum(events) FROM usage WHERE granularity = 'month'"
        ),
        ["5"]
    );
}
