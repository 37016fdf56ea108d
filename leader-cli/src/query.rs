//! `leader who` and `leader observe`: ask the store who leads, without standing.

use std::process::ExitCode;

use futures::StreamExt;
use leader::{Election, LeaderInfo, StoreUrl};
use tokio::signal::unix::{SignalKind, signal};
use tracing::warn;

use crate::cli::{NO_LEADER, OK, ObserveArgs, STORE};
use crate::errors::{fail, one_line, parse_store, say};
use crate::logging::TARGET;

/// The leader as `who` and `observe` print it.
pub(crate) fn show(leader: Option<&LeaderInfo>, json: bool) -> String {
    match (leader, json) {
        (Some(leader), false) => leader.value_lossy().into_owned(),
        (None, false) => String::new(),
        (Some(leader), true) => serde_json::json!({
            "leader": {
                "value": leader.value_lossy(),
                "fencingToken": leader.fencing_token,
                "id": leader.id,
            }
        })
        .to_string(),
        (None, true) => serde_json::json!({ "leader": null }).to_string(),
    }
}

/// An election handle that never campaigns, to ask the store who leads `args.name`.
async fn observer(args: &ObserveArgs) -> Result<(Election, StoreUrl), ExitCode> {
    let url = parse_store(&args.store.store).await?;
    let driver = leader::connect_to(&url)
        .await
        .map_err(|err| fail("cannot reach the store", Some(&url), &err))?;
    let election = Election::builder(driver, args.name.as_str())
        .build()
        .map_err(|err| fail("bad election name", None, &err))?;
    Ok((election, url))
}

/// `leader observe`: a line per change until SIGTERM or SIGINT. Exit 3 if the store cannot
/// be asked for the first answer; later store errors are logged and watched through.
pub(crate) async fn observe(args: ObserveArgs) -> ExitCode {
    let (election, url) = match observer(&args).await {
        Ok(found) => found,
        Err(code) => return code,
    };
    let mut changes = election.observe();
    let Ok(mut sigterm) = signal(SignalKind::terminate()) else {
        say("cannot handle signals");
        return ExitCode::from(NO_LEADER);
    };
    let mut answered = false;
    loop {
        let change = tokio::select! {
            biased;
            _ = sigterm.recv() => return ExitCode::from(OK),
            _ = tokio::signal::ctrl_c() => return ExitCode::from(OK),
            change = changes.next() => change,
        };
        match change {
            Some(Ok(leader)) => {
                answered = true;
                println!("{}", show(leader.as_ref(), args.json));
            }
            Some(Err(err)) if !answered || !err.is_transient() => {
                return fail("cannot ask the store", Some(&url), &err);
            }
            Some(Err(err)) => {
                warn!(target: TARGET, store = %url, error = %one_line(&err), "store error; still watching");
            }
            None => {
                say(&format!("the store at {url} stopped answering"));
                return ExitCode::from(STORE);
            }
        }
    }
}

/// `leader who`: the leader's value (exit 0), nothing (exit 1), or a store error (exit 3).
pub(crate) async fn who(args: ObserveArgs) -> ExitCode {
    let (election, url) = match observer(&args).await {
        Ok(found) => found,
        Err(code) => return code,
    };
    match election.leader().await {
        Ok(Some(leader)) => {
            println!("{}", show(Some(&leader), args.json));
            ExitCode::from(OK)
        }
        Ok(None) => {
            if args.json {
                println!("{}", show(None, true));
            }
            ExitCode::from(NO_LEADER)
        }
        Err(err) => fail("cannot ask the store", Some(&url), &err),
    }
}

/// `leader candidates`: every candidate standing, the leader first, one line each
/// (`leader` or `waiting`, the id, the value, tab-separated; or a JSON object). Exit 1 if
/// nobody stands.
pub(crate) async fn candidates(args: ObserveArgs) -> ExitCode {
    let (election, url) = match observer(&args).await {
        Ok(found) => found,
        Err(code) => return code,
    };
    let line = match election.candidates().await {
        Ok(line) => line,
        Err(err) => return fail("cannot list the candidates", Some(&url), &err),
    };
    for candidate in &line {
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "id": candidate.id,
                    "value": candidate.value_lossy(),
                    "isLeader": candidate.is_leader,
                })
            );
        } else {
            let role = if candidate.is_leader {
                "leader"
            } else {
                "waiting"
            };
            println!("{role}\t{}\t{}", candidate.id, candidate.value_lossy());
        }
    }
    ExitCode::from(if line.is_empty() { NO_LEADER } else { OK })
}
