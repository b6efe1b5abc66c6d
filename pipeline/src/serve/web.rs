//! What the HTTP listener ([`super::http`]) and its pages
//! ([`super::dashboard`]) share: their state, the stream's position for
//! `/healthz`, `/metrics` and the dashboard, and the Basic login.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;

use super::Shared;

/// How long `/healthz` and `/metrics` wait for NATS.
const NATS_WAIT: Duration = Duration::from_secs(2);

/// The state of the HTTP listener.
pub struct Http {
    pub shared: Arc<Shared>,
    /// Where the stream's last sequence comes from.
    stream: crate::source::jetstream::StreamWatch,
}

impl Http {
    pub fn new(shared: Arc<Shared>) -> Http {
        Http {
            stream: crate::source::jetstream::StreamWatch::new(&shared.nats_url, &shared.stream),
            shared,
        }
    }
}

/// The stream's last sequence and the time of its last message (µs), if
/// NATS answers in time.
pub async fn stream_state(http: &Http) -> Result<(u64, i64), String> {
    http.stream.last_position(NATS_WAIT).await
}

/// The account of a request's Basic credentials, if the password is right.
pub fn account_of(http: &Http, headers: &HeaderMap) -> Option<super::accounts::Account> {
    basic_account(&http.shared, headers)
}

/// The account of a Basic `Authorization` header, if the password is right.
pub fn basic_account(shared: &Shared, headers: &HeaderMap) -> Option<super::accounts::Account> {
    basic_login(shared, headers).map(|(_, account)| account)
}

/// The user and account of a Basic `Authorization` header, if the
/// password is right.
fn basic_login(shared: &Shared, headers: &HeaderMap) -> Option<(String, super::accounts::Account)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded =
        String::from_utf8(super::flight::LENIENT_B64.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    let account = shared.login(user, password)?;
    Some((user.to_owned(), account))
}

/// The account of a request that runs queries, and its place among the
/// account's requests running at once: at most
/// `--max-connections-per-account`, so that one account's page loads do
/// not take the query threads from every other (`429` past it).
pub fn account_call(
    http: &Http,
    headers: &HeaderMap,
) -> Result<(super::accounts::Account, super::slots::AccountSlot), Box<Response>> {
    let (user, account) =
        basic_login(&http.shared, headers).ok_or_else(|| Box::new(unauthorized()))?;
    let calls = &http.shared.http_calls;
    let slot = calls.try_take(&user).ok_or_else(|| {
        Box::new(
            (
            StatusCode::TOO_MANY_REQUESTS,
            // Closed with the answer: a client looping on refusals gives
            // its place at the door (`--max-connections`) to the next.
            [(header::RETRY_AFTER, "1"), (header::CONNECTION, "close")],
            format!(
                "account {user} already has {} requests running at once (--max-connections-per-account); wait for one to finish\n",
                calls.max()
            ),
        )
            .into_response(),
        )
    })?;
    Ok((account, slot))
}

pub fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            "Basic realm=\"tally\", charset=\"UTF-8\"",
        )],
        "log in with a tally account (HTTP Basic)\n",
    )
        .into_response()
}
