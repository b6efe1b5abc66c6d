//! Corrections and restatements end to end, against a real nats-server:
//! voids in every order and of every kind the contract lists, each view
//! compared with a run over the effective stream (the stream without the
//! voided events); restatements from a late event, voids and a catalog
//! void, published once each to `TALLY_RESTATEMENTS`, none by a replay.

use crate::harness::{
    NatsServer, api_calls, event, js, publish_lines, rt, run_expect, sql, tally, until_idle,
};
use crate::metrics::{query_views, sorted_csv};

fn void(id: &str, tenant: &str, time: &str, target_id: &str) -> String {
    event(
        id,
        tenant,
        "event.voided",
        time,
        &format!(r#"{{"target_source":"test","target_id":"{target_id}","reason":"fix"}}"#),
    )
}

fn plan(id: &str, time: &str, limit: u32) -> String {
    event(
        id,
        "_system",
        "catalog.plan_published",
        time,
        &format!(
            r#"{{"plan":"starter","currency":"USD","limits":{{"api_calls":{limit}}},"overage":{{"api_calls":{{"unit_price":100,"per":100}}}}}}"#
        ),
    )
}

fn start(id: &str, tenant: &str, sub: &str) -> String {
    event(
        id,
        tenant,
        "subscription.started",
        "2025-01-03T00:00:00Z",
        &format!(
            r#"{{"subscription_id":"{sub}","plan":"starter","billing_cycle":"monthly","price":4900,"currency":"USD"}}"#
        ),
    )
}

/// The views that must equal those of the effective stream.
fn effective_views(server: &NatsServer, data: &std::path::Path) -> Vec<(String, String)> {
    ["usage", "overages", "mrr", "revenue", "tenants"]
        .iter()
        .map(|v| v.to_string())
        .chain(query_views())
        .map(|v| {
            let text = sorted_csv(server, data, &format!("SELECT * FROM {v}"));
            (v, text)
        })
        .collect()
}

fn stream_messages(server: &NatsServer, stream: &str) -> Vec<(String, serde_json::Value)> {
    rt().block_on(async {
        let js = js(server).await;
        let Ok(mut st) = js.get_stream(stream).await else {
            return Vec::new();
        };
        let n = st.info().await.unwrap().state.messages;
        let mut out = Vec::new();
        for seq in 1..=n {
            let m = st.get_raw_message(seq).await.unwrap();
            let id = m
                .headers
                .get("Nats-Msg-Id")
                .map(|v| v.to_string())
                .unwrap_or_default();
            out.push((id, serde_json::from_slice(&m.payload).unwrap()));
        }
        out
    })
}

#[test]
fn voids_of_every_kind_leave_the_views_of_the_effective_stream_and_restate_final_numbers() {
    let first = vec![
        plan("p1", "2025-01-01T00:00:00Z", 1000),
        plan("p2", "2025-01-02T00:00:00Z", 2000),
        event(
            "c1",
            "acme",
            "tenant.created",
            "2025-01-01T00:00:00Z",
            r#"{"name":"Acme"}"#,
        ),
        event(
            "c2",
            "beta",
            "tenant.created",
            "2025-01-01T00:00:00Z",
            r#"{"name":"Beta"}"#,
        ),
        start("s1", "acme", "sub_a"),
        start("sb1", "beta", "sub_b"),
        api_calls("u1", "acme", "2025-01-05T00:00:00Z", "100"),
        api_calls("u2", "acme", "2025-01-06T00:00:00Z", "5000"),
        api_calls("b1", "beta", "2025-01-08T00:00:00Z", "7"),
        event(
            "i1",
            "acme",
            "invoice.paid",
            "2025-01-31T00:00:00Z",
            r#"{"invoice_id":"inv1","amount":4900,"currency":"USD"}"#,
        ),
        // A tenant that cancels and starts again: its March is a
        // reactivation until the void of its first start (below).
        start("r1", "rho", "sub_r1"),
        event(
            "r2",
            "rho",
            "subscription.cancelled",
            "2025-02-10T00:00:00Z",
            r#"{"subscription_id":"sub_r1"}"#,
        ),
        event(
            "r3",
            "rho",
            "subscription.started",
            "2025-03-05T00:00:00Z",
            r#"{"subscription_id":"sub_r3","plan":"starter","billing_cycle":"monthly","price":9900,"currency":"USD"}"#,
        ),
        // Before its target.
        void("v_before", "acme", "2025-03-01T00:00:00Z", "u3"),
        // The clock moves to March: January and February are final.
        api_calls("u9", "acme", "2025-03-10T00:00:00Z", "1"),
    ];
    let later = vec![
        api_calls("u3", "acme", "2025-01-07T00:00:00Z", "300"),
        // An amendment: void the wrong event, send the right one with a new id.
        void("v_after", "acme", "2025-03-01T00:00:00Z", "u2"),
        api_calls("u2b", "acme", "2025-01-06T00:00:00Z", "500"),
        // Of a void, of another tenant's event, of nothing: no change.
        void("v_void", "acme", "2025-03-01T00:00:00Z", "v_after"),
        void("v_other", "beta", "2025-03-01T00:00:00Z", "u1"),
        void("v_nothing", "acme", "2025-03-01T00:00:00Z", "nope"),
        // Of a catalog plan version, a subscription start, an invoice.
        void("v_catalog", "_system", "2025-03-01T00:00:00Z", "p2"),
        void("v_sub", "beta", "2025-03-01T00:00:00Z", "sb1"),
        void("v_inv", "acme", "2025-03-01T00:00:00Z", "i1"),
        // A re-sent voided event is a duplicate.
        api_calls("u2", "acme", "2025-01-06T00:00:00Z", "5000"),
        // A back-dated cancellation, effective in a final month.
        event(
            "x1",
            "acme",
            "subscription.cancelled",
            "2025-03-02T00:00:00Z",
            r#"{"subscription_id":"sub_a","effective_at":"2025-02-01T00:00:00Z"}"#,
        ),
        // Of a tenant's first start, months after it: the restart is new.
        void("v_first", "rho", "2025-03-01T00:00:00Z", "r1"),
    ];
    let voided = ["u3", "u2", "p2", "sb1", "i1", "r1"];
    let id_of = |line: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["id"].as_str().unwrap().to_owned()
    };
    let effective = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| !voided.contains(&id_of(l).as_str()))
            .cloned()
            .collect()
    };

    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    publish_lines(&server, &data, &first);
    until_idle(&server, &data);
    publish_lines(&server, &data, &later);
    until_idle(&server, &data);

    let clean = NatsServer::start();
    let clean_data = dir.path().join("clean");
    let mut all = effective(&first);
    all.extend(effective(&later));
    publish_lines(&clean, &clean_data, &all);
    until_idle(&clean, &clean_data);

    let (got, want) = (
        effective_views(&server, &data),
        effective_views(&clean, &clean_data),
    );
    for ((name, g), (_, w)) in got.iter().zip(&want) {
        assert_eq!(g, w, "view {name} differs from the effective stream's");
    }

    // Every void and what it hit.
    let corrections: Vec<String> = sql(
        &server,
        &data,
        "SELECT tenant, target_id, targets, first_target_seq IS NOT NULL FROM corrections ORDER BY stream_seq",
    )
    .into_iter()
    .map(|r| r.join(","))
    .collect();
    assert_eq!(
        corrections,
        [
            "acme,u3,1,true",
            "acme,u2,1,true",
            "acme,v_after,0,false",
            "beta,u1,0,false",
            "acme,nope,0,false",
            "_system,p2,1,true",
            "beta,sb1,1,true",
            "acme,i1,1,true",
            "rho,r1,1,true",
        ]
    );
    // The restart after the voided first start, as the effective stream has it.
    assert_eq!(
        sql(
            &server,
            &data,
            "SELECT CAST(month AS VARCHAR) AS m, movement, new_mrr, reactivation_mrr FROM mrr WHERE tenant = 'rho' ORDER BY m",
        )[0],
        ["2025-03-01", "new", "9900", "0"]
    );

    // Restatements: the amendment's void and its new event, the catalog
    // void, the subscription void, the invoice void; nothing from the void
    // sent before its target.
    let restated = sql(
        &server,
        &data,
        "SELECT view, tenant, cause, before IS NULL, after IS NULL FROM restatements ORDER BY stream_seq, view, tenant, key",
    );
    let lines: Vec<String> = restated.iter().map(|r| r.join(",")).collect();
    for want in [
        "usage,acme,void,false,false",
        "overages,acme,void,false,false",
        "usage,acme,late_event,false,false",
        "revenue,acme,void,false,true",
        "mrr,beta,void,false,true",
        "mrr,acme,late_event,false,false",
    ] {
        assert!(lines.iter().any(|l| l == want), "no {want} in {lines:#?}");
    }
    let catalog: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("overages,acme,void"))
        .collect();
    assert_eq!(
        catalog.len(),
        2,
        "the amendment's void and the catalog void: {lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("catalog")),
        "a _system void of a catalog event restates with cause void: {lines:#?}"
    );

    // Published once each, with the same texts.
    let published = stream_messages(&server, "TALLY_RESTATEMENTS");
    assert_eq!(published.len(), lines.len(), "{published:#?}");
    let mut ids: Vec<&String> = published.iter().map(|(id, _)| id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), published.len(), "restatement ids repeat");
    let keys: Vec<String> = sql(
        &server,
        &data,
        // Commas and quotes swapped, so that the CSV cell is the text.
        "SELECT replace(replace(key || '|' || COALESCE(before, 'null') || '|' || COALESCE(after, 'null'), ',', ';'), '\"', '''') FROM restatements",
    )
    .into_iter()
    .map(|r| r[0].clone())
    .collect();
    for (_, m) in &published {
        let d = &m["data"];
        let text = format!(
            "{}|{}|{}",
            d["key"].as_str().unwrap(),
            d["before"].as_str().unwrap_or("null"),
            d["after"].as_str().unwrap_or("null")
        )
        .replace(',', ";")
        .replace('"', "'");
        assert!(keys.contains(&text), "{text} not in the view");
        assert_eq!(
            m["type"],
            format!("{}.restated", d["view"].as_str().unwrap())
        );
    }

    // A replay rebuilds the same restatements and publishes none.
    let before = sorted_csv(&server, &data, "SELECT * FROM restatements");
    let mut c = tally(&server, &data);
    c.arg("replay");
    run_expect(c, 0);
    assert_eq!(
        sorted_csv(&server, &data, "SELECT * FROM restatements"),
        before
    );
    assert_eq!(
        stream_messages(&server, "TALLY_RESTATEMENTS").len(),
        published.len()
    );
}
