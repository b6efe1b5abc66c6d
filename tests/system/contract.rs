//! The event contract end to end: dedup per tenant (also in JetStream's
//! duplicate window), the archive keeping every attribute across a
//! restart, and a `usage` sum too large for Decimal128(38, 9) shown as
//! NULL rather than a wrong number.

use crate::harness::{NatsServer, publish_lines, sql, status_json, until_idle};

/// An `invoice.paid` from source `billing` with invoice id `id`.
fn invoice(tenant: &str, id: &str, amount: u64) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"billing","type":"invoice.paid","time":"2026-01-10T00:00:00Z","tenant":"{tenant}","data":{{"invoice_id":"{id}","amount":{amount},"currency":"USD"}}}}"#
    )
}

/// Tenant `evil` reuses `victim`'s (source, id): both invoices count, in
/// Tally's dedup and in JetStream's duplicate window (`tally publish` sets
/// `Nats-Msg-Id`); a copy from the same tenant is still a duplicate.
#[test]
fn dedup_is_per_tenant() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let victim = invoice("victim", "inv-777", 4900);
    let evil = invoice("evil", "inv-777", 1);
    publish_lines(&server, &data, &[evil, victim.clone()]);
    until_idle(&server, &data);
    // A re-send by the victim after JetStream's window (no Nats-Msg-Id, so
    // the broker stores it), seen by a new process: the horizon rebuilt
    // from the archive must know it per tenant.
    crate::rt().block_on(async {
        let js = crate::js(&server).await;
        js.publish("tally.events.victim.invoice.paid", victim.into())
            .await
            .unwrap()
            .await
            .unwrap();
    });
    until_idle(&server, &data);
    assert_eq!(
        sql(
            &server,
            &data,
            "SELECT tenant, paid, invoices_paid FROM revenue ORDER BY tenant"
        ),
        [["evil", "1", "1"], ["victim", "4900", "1"]]
    );
    let s = status_json(&server, &data);
    assert_eq!(s["status"]["counts"]["accepted"].as_u64(), Some(2), "{s}");
    assert_eq!(s["status"]["counts"]["duplicate"].as_u64(), Some(1), "{s}");
}
