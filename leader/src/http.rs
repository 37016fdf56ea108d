//! The leader probe for axum (feature `axum`): `GET /leader` answers 200 on the leader and
//! 503 elsewhere, so a load balancer or a Kubernetes readiness probe routes to the active
//! replica only.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::Status;

/// A router serving `GET /leader` from `status`:
///
/// * `200 OK` with `{"leader":true,"fencingToken":N}` while this candidate leads;
/// * `503 Service Unavailable` with `{"leader":false}` otherwise.
///
/// Each answer reads [`Status::fencing_token`], which checks the term's deadline itself.
/// Merge it into the service's own router:
///
/// ```no_run
/// # async fn demo(election: leader::Election) -> std::io::Result<()> {
/// let app = axum::Router::new()
///     // .route("/", …) the service's own routes
///     .merge(leader::http::router(election.status()));
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
/// axum::serve(listener, app).await
/// # }
/// ```
///
/// A Kubernetes readiness probe on it sends the Service's traffic to the leader alone:
///
/// ```yaml
/// readinessProbe:
///   httpGet: { path: /leader, port: 8080 }
///   periodSeconds: 1
/// ```
pub fn router(status: Status) -> Router {
    Router::new()
        .route("/leader", get(leader))
        .with_state(status)
}

async fn leader(State(status): State<Status>) -> Response {
    let headers = [
        (CONTENT_TYPE, "application/json"),
        (CACHE_CONTROL, "no-store"),
    ];
    match status.fencing_token() {
        Some(token) => (
            StatusCode::OK,
            headers,
            format!(r#"{{"leader":true,"fencingToken":{token}}}"#),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            headers,
            r#"{"leader":false}"#.to_owned(),
        )
            .into_response(),
    }
}
