//! `leader candidates`: the leader first, then the line, in text and JSON; status 1 when
//! nobody stands, 3 when the store cannot be asked.

mod common;

use std::time::Duration;

use common::{finish, leader};
use leader_testkit::{free_port, redis, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidates_lists_the_leader_then_the_line() {
    let server = redis().await;
    let url = server.url();
    let name = unique("cli-candidates");

    let (code, stdout, stderr) = finish(leader(&["candidates", "--store", &url, &name])).await;
    assert_eq!(code, Some(1), "nobody stands: {stderr}");
    assert!(stdout.is_empty(), "{stdout}");

    let build = |value: &str| {
        let url = url.clone();
        let name = name.clone();
        let value = value.to_owned();
        async move {
            let driver = leader::connect(&url).await.expect("connect");
            leader::Election::builder(driver, name)
                .ttl(Duration::from_secs(5))
                .value(value)
                .build()
                .expect("valid")
        }
    };
    let a = build("10.0.0.1:80").await;
    let b = build("10.0.0.2:80").await;
    a.campaign().await.expect("a leads");
    let waiting = tokio::spawn({
        let b = b.clone();
        async move { b.campaign().await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let (code, stdout, stderr) = finish(leader(&["candidates", "--store", &url, &name])).await;
        assert_eq!(code, Some(0), "{stderr}");
        if stdout.lines().count() == 2 {
            break stdout;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "b never stood in line: {stdout}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        lines,
        format!(
            "leader\t{}\t10.0.0.1:80\nwaiting\t{}\t10.0.0.2:80\n",
            a.id(),
            b.id()
        )
    );
    let (code, stdout, stderr) =
        finish(leader(&["candidates", "--store", &url, "--json", &name])).await;
    assert_eq!(code, Some(0), "{stderr}");
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert_eq!(rows[0]["id"], a.id());
    assert_eq!(rows[0]["isLeader"], true);
    assert_eq!(rows[1]["value"], "10.0.0.2:80");
    assert_eq!(rows[1]["isLeader"], false);

    a.resign().await.expect("resign");
    waiting.await.expect("task").expect("b is elected");
    b.resign().await.expect("resign");

    let port = free_port().expect("a free port");
    let closed = format!("redis://127.0.0.1:{port}");
    let (code, _, stderr) = finish(leader(&["candidates", "--store", &closed, &name])).await;
    assert_eq!(code, Some(3), "unreachable: {stderr}");
}
