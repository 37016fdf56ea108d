//! TLS to a real PostgreSQL with `ssl=on` and a certificate made at test time.

use std::time::Duration;

use leader_core::{Election, Error};
use leader_postgres::PostgresDriver;
use leader_testkit::{Certificates, PostgresServer};

fn tls_url(server: &PostgresServer, ca: &std::path::Path, mode: &str) -> String {
    format!(
        "postgres://postgres@{}/postgres?sslmode={mode}&sslrootcert={}&application_name=leader-tls",
        server.addr(),
        ca.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elects_over_tls_verifying_the_server_and_refuses_an_unknown_ca() {
    let (server, certs, other) = tokio::task::spawn_blocking(|| {
        let certs = Certificates::generate().expect("certificates");
        let other = Certificates::generate().expect("another CA");
        let server = PostgresServer::start_tls(&certs).expect("postgres with ssl=on starts");
        (server, certs, other)
    })
    .await
    .expect("start task");

    for mode in ["require", "verify-full"] {
        let driver = PostgresDriver::connect(&tls_url(&server, &certs.ca(), mode))
            .await
            .expect("connects over TLS");
        let election = Election::builder(driver, format!("tls-{mode}"))
            .ttl(Duration::from_secs(2))
            .build()
            .expect("valid");
        let term = election.campaign().await.expect("elected over TLS");
        assert!(term.is_valid());
        // Every connection of the driver is encrypted, the LISTEN one included.
        let (admin, connection) = tokio_postgres::connect(
            &format!("postgres://postgres@{}/postgres", server.addr()),
            tokio_postgres::NoTls,
        )
        .await
        .expect("admin connection");
        tokio::spawn(connection);
        let rows = admin
            .query(
                "SELECT a.application_name, s.ssl FROM pg_stat_activity a \
                 JOIN pg_stat_ssl s USING (pid) WHERE a.application_name LIKE 'leader-tls%'",
                &[],
            )
            .await
            .expect("pg_stat_ssl");
        assert!(!rows.is_empty(), "the driver's connections are there");
        for row in &rows {
            let (name, ssl): (String, bool) = (row.get(0), row.get(1));
            assert!(ssl, "{name} is not encrypted");
        }
        election.resign().await.expect("resign");
    }

    // A CA that did not sign the server's certificate: refused, not retried forever.
    let refused = tokio::time::timeout(
        Duration::from_secs(20),
        PostgresDriver::connect(&tls_url(&server, &other.ca(), "verify-full")),
    )
    .await
    .expect("connect gives up");
    assert!(
        refused.is_err(),
        "connected to a server the CA does not vouch for"
    );

    // TLS without a CA to verify the server with: a configuration error.
    let err = PostgresDriver::connect(&format!(
        "postgres://postgres@{}/postgres?sslmode=require",
        server.addr()
    ))
    .await
    .expect_err("no sslrootcert");
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
}
