//! The seed's server: an HTTP server whose `/` says whether this replica leads, with the
//! leader probe `GET /leader` (`leader::http::router`: 200 and the fencing token on the
//! leader, 503 elsewhere) for a load balancer or a readiness probe. A
//! subscriber prints each status change (`true` when elected, `false` when the term ends).
//! It serves for one second once elected, then shuts down gracefully, resigning: its whole
//! output is `true` then `false`.
//!
//! ```text
//! LEADER_STORE=redis://127.0.0.1:6379 cargo run -p leader-examples --example server
//! ```

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use futures::StreamExt;
use leader::{CancellationToken, Election, Status};
use leader_examples::{driver_from_env, exit_with, init_logging};

#[tokio::main]
async fn main() {
    init_logging();
    if let Err(err) = run().await {
        exit_with(err.as_ref());
    }
}

async fn whoami(State(status): State<Status>) -> &'static str {
    if status.is_leader() {
        "I am leader"
    } else {
        "I am follower"
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let driver = driver_from_env().await?;
    let name = std::env::var("LEADER_ELECTION").unwrap_or_else(|_| "server-example".to_owned());
    let election = Election::builder(driver, name)
        .ttl(Duration::from_secs(5))
        .build()?;

    // Print every status change, in order.
    let mut events = election.subscribe();
    let printer = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            println!("{}", event.is_leader());
            if !event.is_leader() {
                return;
            }
        }
    });

    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving");
    let app = Router::new()
        .route("/", get(whoami))
        .with_state(election.status())
        .merge(leader::http::router(election.status()));

    let stop = CancellationToken::new();
    let campaign = tokio::spawn({
        let (election, stop) = (election.clone(), stop.clone());
        async move { election.run(stop.cancelled_owned()).await }
    });
    let serving = tokio::spawn({
        let stop = stop.clone();
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        }
    });

    // Serve for one second of leadership, then shut down gracefully.
    let mut status = election.subscribe();
    while !election.status().is_leader() {
        status.next().await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    serving.await??;
    campaign.await??;
    printer.await?;
    Ok(())
}
