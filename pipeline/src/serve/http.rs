//! The HTTP listener of `tally serve` (axum): `/healthz`, open to all,
//! `/metrics` (Prometheus text), behind HTTP Basic with an account that
//! sees all tenants, since the pipeline's counts cover every tenant, and
//! the pages of [`super::dashboard`].

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use super::gate::{Gate, Gated};

use super::web::{Http, basic_account, stream_state, unauthorized};
use super::{ServeError, Shared};
use crate::query::Scope;

async fn healthz(State(http): State<Arc<Http>>) -> Response {
    let shared = &http.shared;
    if let Err(e) = shared.views.current(&Scope::AllTenants).await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("views cannot be read: {e}\n"),
        )
            .into_response();
    }
    let checkpoint = match shared.views.checkpoint().await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return (StatusCode::SERVICE_UNAVAILABLE, "no checkpoint yet\n").into_response();
        }
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("checkpoint cannot be read: {e}\n"),
            )
                .into_response();
        }
    };
    match stream_state(&http).await {
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot compare the checkpoint with the stream: {e}\n"),
        )
            .into_response(),
        Ok((last_seq, last_us)) => {
            let behind_us = if last_seq > checkpoint.last_seq {
                last_us.saturating_sub(checkpoint.stream_now_us.unwrap_or(0))
            } else {
                0
            };
            let stale = shared.stale_after.as_micros() as i64;
            if behind_us > stale {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "stale: the checkpoint is {} s behind the stream's last message; more than --stale-after {} s. Is `tally run` running? (/metrics, for an all-tenant account, has the sequences)\n",
                        behind_us / 1_000_000,
                        shared.stale_after.as_secs()
                    ),
                )
                    .into_response()
            } else {
                (StatusCode::OK, "ok\n").into_response()
            }
        }
    }
}

async fn metrics(State(http): State<Arc<Http>>, headers: HeaderMap) -> Response {
    let shared = &http.shared;
    let Some(account) = basic_account(shared, &headers) else {
        return unauthorized();
    };
    if account.scope() != Scope::AllTenants {
        return (
            StatusCode::FORBIDDEN,
            "the metrics cover every tenant: log in with an account made with --all-tenants\n",
        )
            .into_response();
    }
    let checkpoint = shared.views.checkpoint().await.ok().flatten();
    let last_seq = stream_state(&http).await.ok().map(|(s, _)| s);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared.metrics.render(checkpoint.as_ref(), last_seq),
    )
        .into_response()
}

/// The HTTP listener behind its [`Gate`].
struct GatedListener {
    listener: TcpListener,
    gate: Gate,
}

impl axum::serve::Listener for GatedListener {
    type Io = Gated;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Gated, std::net::SocketAddr) {
        self.gate.accept(&self.listener).await
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}

/// Serves HTTP on `listener`, behind `gate`, until `stopped`.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    gate: Gate,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let state = Arc::new(Http::new(shared));
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/", get(super::dashboard::index))
        .route("/favicon.ico", get(super::dashboard::favicon))
        .route("/tenants/{tenant}", get(super::dashboard::tenant_page))
        .route("/api/dashboard", get(super::dashboard::dashboard_json))
        .route("/api/tenants/{tenant}", get(super::dashboard::tenant_json))
        .route("/static/{name}", get(super::dashboard::asset))
        .with_state(state);
    axum::serve(GatedListener { listener, gate }, app)
        .with_graceful_shutdown(stopped)
        .await
        .map_err(ServeError::Http)
}
