#![doc = include_str!("../README.md")]

mod builder;
mod driver;
mod fence;
mod inner;
pub mod io;
mod listener;
mod own_channel;
mod pg;
mod renewals;
mod sql;
mod tls;
mod url;

pub use tokio_postgres;
pub use url::SCHEMES;

pub use builder::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, PostgresDriverBuilder};
pub use driver::PostgresDriver;
pub use fence::{DEFAULT_FENCE_TABLE, Fence};
pub use io::{ListenClient, PostgresIo};
pub use sql::DEFAULT_TABLE;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use leader_core::Error;
    use tokio_postgres::Config;

    use super::*;

    #[test]
    fn the_password_never_shows_in_debug_or_errors() {
        let driver = PostgresDriver::parse_url("postgres://app:hunter2@127.0.0.1:5432/db")
            .expect("valid url")
            .build()
            .expect("valid options");
        let shown = format!("{driver:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("leader_elections"), "{shown}");
        let err = PostgresDriver::parse_url("postgres://app:hunter2@127.0.0.1:notaport/db")
            .expect_err("bad port");
        assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");
    }

    #[test]
    fn bad_options_are_invalid_config() {
        let config: Config = "host=localhost".parse().expect("valid");
        let err = PostgresDriver::builder(config.clone())
            .table("x; DROP TABLE y")
            .build()
            .expect_err("bad table");
        assert!(matches!(err, Error::InvalidConfig { name: "table", .. }));
        let err = PostgresDriver::builder(config)
            .request_timeout(Duration::ZERO)
            .build()
            .expect_err("zero timeout");
        assert!(matches!(err, Error::InvalidConfig { .. }));
    }
}
