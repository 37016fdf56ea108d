//! An etcd cluster with peer proxies: an isolated member cannot serve linearizable reads
//! (it has no quorum) while the others can, and serves them again once healed.

use std::process::Command;
use std::time::{Duration, Instant};

use leader_testkit::EtcdServer;

/// Whether a linearizable read through member `i` succeeds within a second.
fn reads_through(server: &EtcdServer, i: usize) -> bool {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", server.client_addr(i)))
        .args([
            "--command-timeout=1s",
            "--dial-timeout=1s",
            "get",
            "peers-test-key",
        ])
        .output()
        .expect("etcdctl runs (install it with: sudo apt-get install -y etcd-client)")
        .status
        .success()
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_isolated_member_loses_its_quorum_and_gets_it_back_when_healed() {
    let server = EtcdServer::start_cluster_with_peer_proxies(3).expect("etcd starts");
    wait_until("every member serves reads", || {
        (0..3).all(|i| reads_through(&server, i))
    });
    wait_until("the proxies know member 0's id", || {
        server.isolate_member(0).is_ok()
    });
    wait_until("member 0 no longer serves reads", || {
        !reads_through(&server, 0)
    });
    assert!(reads_through(&server, 1), "member 1 keeps its quorum");
    assert!(reads_through(&server, 2), "member 2 keeps its quorum");
    server.heal_member(0).expect("peer proxies");
    wait_until("member 0 serves reads again", || reads_through(&server, 0));
}

#[test]
fn a_cluster_without_peer_proxies_refuses_isolation() {
    let server = EtcdServer::start_cluster(1).expect("etcd starts");
    assert!(server.isolate_member(0).is_err());
}
