//! Anchored billing periods end to end, against a real nats-server: an
//! anchor on the 31st across February, 29 February, a time of day,
//! periods before the anchor, an anchor changed mid-period (published
//! after the usage it moves), a cancelled subscription's last anchor, and
//! a void that takes a tenant back to calendar months; the same rows after
//! `tally replay`.

use crate::harness::{
    NatsServer, api_calls, event, publish_lines, run_expect, sql, tally, until_idle,
};

fn started(id: &str, tenant: &str, time: &str, anchor: &str) -> String {
    event(
        id,
        tenant,
        "subscription.started",
        time,
        &format!(
            r#"{{"subscription_id":"sub-{tenant}","plan":"pro","billing_cycle":"monthly","price":1000,"currency":"USD","billing_anchor":"{anchor}"}}"#
        ),
    )
}

fn overages(server: &NatsServer, data: &std::path::Path, tenant: &str) -> Vec<String> {
    sql(
        server,
        data,
        &format!(
            "SELECT period_start, period_end, CAST(used AS BIGINT), plan, CAST(period AS VARCHAR) \
             FROM overages WHERE tenant = '{tenant}' ORDER BY period_start"
        ),
    )
    .into_iter()
    .map(|r| r.join(" "))
    .collect()
}

#[test]
fn overages_follow_billing_anchors() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    publish_lines(
        &server,
        &data,
        &[
            event(
                "p1",
                "_system",
                "catalog.plan_published",
                "2024-01-01T00:00:00Z",
                r#"{"plan":"pro","currency":"USD","limits":{"api_calls":100},"overage":{"api_calls":{"unit_price":10,"per":1}}}"#,
            ),
            // Started before its anchor: the periods before it are whole
            // months back from the anchor.
            started("s1", "d31", "2026-01-10T00:00:00Z", "2026-01-31T10:00:00Z"),
            api_calls("a1", "d31", "2026-01-20T00:00:00Z", "1"),
            api_calls("a2", "d31", "2026-02-28T09:59:59Z", "2"),
            api_calls("a3", "d31", "2026-02-28T10:00:00Z", "4"),
            api_calls("a4", "d31", "2026-03-31T09:00:00Z", "8"),
            api_calls("a5", "d31", "2026-04-30T10:00:00Z", "16"),
            started("s2", "leap", "2024-02-29T00:00:00Z", "2024-02-29T00:00:00Z"),
            api_calls("b1", "leap", "2024-03-28T23:00:00Z", "1"),
            api_calls("b2", "leap", "2025-02-28T12:00:00Z", "2"),
            started("s3", "chg", "2026-01-15T00:00:00Z", "2026-01-15T00:00:00Z"),
            api_calls("c1", "chg", "2026-02-19T00:00:00Z", "5"),
            api_calls("c2", "chg", "2026-02-21T00:00:00Z", "5"),
            api_calls("c3", "chg", "2026-03-25T00:00:00Z", "5"),
            // Sets the stream clock past every period above.
            api_calls("z1", "clock", "2026-05-20T00:00:00Z", "1"),
        ],
    );
    until_idle(&server, &data);
    assert_eq!(
        overages(&server, &data, "d31"),
        [
            "2025-12-31T10:00:00Z 2026-01-31T10:00:00Z 1 pro 2025-12-31",
            "2026-01-31T10:00:00Z 2026-02-28T10:00:00Z 2 pro 2026-01-31",
            "2026-02-28T10:00:00Z 2026-03-31T10:00:00Z 12 pro 2026-02-28",
            "2026-04-30T10:00:00Z 2026-05-31T10:00:00Z 16 pro 2026-04-30",
        ]
    );
    assert_eq!(
        overages(&server, &data, "leap"),
        [
            "2024-02-29T00:00:00Z 2024-03-29T00:00:00Z 1 pro 2024-02-29",
            "2025-02-28T00:00:00Z 2025-03-29T00:00:00Z 2 pro 2025-02-28",
        ]
    );
    assert_eq!(
        overages(&server, &data, "chg"),
        [
            "2026-02-15T00:00:00Z 2026-03-15T00:00:00Z 10 pro 2026-02-15",
            "2026-03-15T00:00:00Z 2026-04-15T00:00:00Z 5 pro 2026-03-15",
        ]
    );

    // Late: a new anchor from 20 February, a cancellation on 1 March (the
    // last anchor keeps holding), and a void of leap's start.
    publish_lines(
        &server,
        &data,
        &[
            event(
                "pc",
                "chg",
                "subscription.plan_changed",
                "2026-02-20T00:00:00Z",
                r#"{"subscription_id":"sub-chg","plan":"pro","billing_cycle":"monthly","price":1000,"currency":"USD","billing_anchor":"2026-02-20T00:00:00Z"}"#,
            ),
            event(
                "cx",
                "chg",
                "subscription.cancelled",
                "2026-03-01T00:00:00Z",
                r#"{"subscription_id":"sub-chg"}"#,
            ),
            event(
                "v1",
                "leap",
                "event.voided",
                "2026-05-20T00:00:00Z",
                r#"{"target_source":"test","target_id":"s2"}"#,
            ),
        ],
    );
    until_idle(&server, &data);
    let chg = [
        "2026-02-15T00:00:00Z 2026-03-15T00:00:00Z 5 pro 2026-02-15",
        "2026-02-20T00:00:00Z 2026-03-20T00:00:00Z 5 pro 2026-02-20",
        // After the cancellation: the 20th's series, no plan.
        "2026-03-20T00:00:00Z 2026-04-20T00:00:00Z 5  2026-03-20",
    ];
    assert_eq!(overages(&server, &data, "chg"), chg);
    let leap = [
        "2024-03-01T00:00:00Z 2024-04-01T00:00:00Z 1  2024-03-01",
        "2025-02-01T00:00:00Z 2025-03-01T00:00:00Z 2  2025-02-01",
    ];
    assert_eq!(overages(&server, &data, "leap"), leap);
    // Every final row that changed was restated, with the message that
    // changed it: chg's three late usage events (rows appear, one grows),
    // its new anchor (one row shrinks, one goes, two appear) and its
    // cancellation (the last row loses its plan); leap's two late usage
    // events, and the void (two rows go, two appear).
    let restated: Vec<String> = sql(
        &server,
        &data,
        "SELECT tenant, cause, count(*) FROM restatements WHERE view = 'overages' \
         GROUP BY tenant, cause ORDER BY tenant, cause",
    )
    .into_iter()
    .map(|r| r.join(" "))
    .collect();
    assert_eq!(
        restated,
        ["chg late_event 8", "leap late_event 2", "leap void 4"]
    );

    // A replay gives the same rows.
    let mut c = tally(&server, &data);
    c.arg("replay");
    run_expect(c, 0);
    assert_eq!(overages(&server, &data, "chg"), chg);
    assert_eq!(overages(&server, &data, "leap"), leap);
    assert_eq!(overages(&server, &data, "d31").len(), 4);
}
