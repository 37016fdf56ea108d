//! The leader probe over real HTTP: 503 before the election, 200 with the fencing token on
//! the leader, 503 again after it resigned.

use std::time::Duration;

use leader::Election;
use leader_core::testing::MemoryStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `GET path` over a new connection: the status code and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status code");
    assert!(
        path != "/leader"
            || head
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
        "{head}"
    );
    (code, body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_leader_answers_200_with_the_token_on_the_leader_and_503_elsewhere() {
    let store = MemoryStore::new();
    let election = Election::builder(store.driver(), "probe")
        .ttl(Duration::from_secs(5))
        .build()
        .expect("valid");
    let follower = Election::builder(store.driver(), "probe")
        .ttl(Duration::from_secs(5))
        .build()
        .expect("valid");
    let serve = |status| async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server =
            tokio::spawn(async move { axum::serve(listener, leader::http::router(status)).await });
        (addr, server)
    };
    let (leader_addr, leader_server) = serve(election.status()).await;
    let (follower_addr, follower_server) = serve(follower.status()).await;

    assert_eq!(
        get(leader_addr, "/leader").await,
        (503, r#"{"leader":false}"#.to_owned())
    );
    let term = election.campaign().await.expect("elected");
    assert_eq!(
        get(leader_addr, "/leader").await,
        (
            200,
            format!(
                r#"{{"leader":true,"fencingToken":{}}}"#,
                term.fencing_token()
            )
        )
    );
    assert_eq!(
        get(follower_addr, "/leader").await,
        (503, r#"{"leader":false}"#.to_owned())
    );
    election.resign().await.expect("resign");
    assert_eq!(
        get(leader_addr, "/leader").await,
        (503, r#"{"leader":false}"#.to_owned())
    );
    assert_eq!(get(leader_addr, "/other").await.0, 404);
    leader_server.abort();
    follower_server.abort();
}
