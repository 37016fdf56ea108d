//! [`PostgresDriverBuilder`] and the constructors that run the driver on tokio-postgres.

use std::sync::Arc;
use std::time::Duration;

use leader_core::{Error, Result};
use tokio_postgres::Config;

use crate::driver::PostgresDriver;
use crate::pg::PgIo;
use crate::sql::{DEFAULT_TABLE, Table};
use crate::tls::Tls;

/// The default for [`PostgresDriverBuilder::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The default for [`PostgresDriverBuilder::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The `application_name` of the driver's connections, unless the config sets one.
const APPLICATION_NAME: &str = "leader-postgres";

/// Builds a [`PostgresDriver`] with options.
#[derive(Debug, Clone)]
#[must_use = "a PostgresDriverBuilder does nothing until build() is called"]
pub struct PostgresDriverBuilder {
    config: Config,
    tls: Tls,
    table: String,
    request_timeout: Duration,
    connect_timeout: Duration,
    create_table: bool,
}

impl PostgresDriverBuilder {
    /// The table that holds the elections: `table` or `schema.table`, lower-case ASCII
    /// letters, digits and `_` only. Defaults to [`DEFAULT_TABLE`].
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The longest wait for one statement; the server's `statement_timeout` for the
    /// driver's connection too. Defaults to [`DEFAULT_REQUEST_TIMEOUT`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The longest wait for a new connection (and its setup). Defaults to
    /// [`DEFAULT_CONNECT_TIMEOUT`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// TLS for every connection (feature `tls`), with `config` (rustls; your roots, a
    /// client certificate). The server's certificate and name are verified (libpq's
    /// `verify-full`); the connection's `sslmode` is set to `require`, so it never falls
    /// back to plain text.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, config: rustls::ClientConfig) -> Self {
        self.config
            .ssl_mode(tokio_postgres::config::SslMode::Require);
        self.tls = Tls::On(tokio_postgres_rustls::MakeRustlsConnect::new(config));
        self
    }

    /// Whether the driver runs `CREATE TABLE IF NOT EXISTS` when the table is missing.
    /// Turn it off when a DBA creates the table (see the README for the SQL and grants).
    /// Defaults to `true`.
    pub fn create_table(mut self, create: bool) -> Self {
        self.create_table = create;
        self
    }

    /// The driver. It connects on first use.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] (`table`) for a table name that is not `table` or
    /// `schema.table` of lower-case identifiers; (`request_timeout`) for a zero timeout.
    pub fn build(self) -> Result<PostgresDriver> {
        let table = Table::parse(&self.table)?;
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(Error::invalid_config(
                "request_timeout",
                "and connect_timeout must be more than zero",
            ));
        }
        Ok(self.assemble(table))
    }

    /// The driver on options already checked.
    fn assemble(self, table: Table) -> PostgresDriver {
        let mut config = self.config;
        if config.get_application_name().is_none() {
            config.application_name(APPLICATION_NAME);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(self.connect_timeout);
        }
        // The LISTEN connection is `<application_name>-listen`, for DBAs (and tests) to
        // tell the two apart in pg_stat_activity.
        let mut listen_config = config.clone();
        let listen_name = format!(
            "{}-listen",
            config.get_application_name().unwrap_or(APPLICATION_NAME)
        );
        listen_config.application_name(listen_name);
        let io = PgIo {
            config,
            listen_config,
            tls: self.tls,
            table: table.clone(),
            request_timeout: self.request_timeout,
            connect_timeout: self.connect_timeout,
            create_table: self.create_table,
            connection: tokio::sync::Mutex::new(None),
        };
        PostgresDriver::on(Arc::new(io), table)
    }
}

impl PostgresDriver {
    /// A driver on `config`, with the default options. It connects on first use.
    pub fn new(config: Config) -> Self {
        Self::builder(config).assemble(Table::default())
    }

    /// A builder for a driver on `config`.
    pub fn builder(config: Config) -> PostgresDriverBuilder {
        PostgresDriverBuilder {
            config,
            tls: Tls::Off,
            table: DEFAULT_TABLE.to_owned(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            create_table: true,
        }
    }

    /// Connects to `url` (`postgres://user:password@host:5432/db`, or the libpq
    /// `key=value` form), creates the table if it is missing, and returns a driver with the
    /// default options; fails if PostgreSQL cannot be reached now.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] (`store`) for a URL `tokio-postgres` cannot parse;
    /// [`Error::Denied`] for refused credentials or missing privileges;
    /// [`Error::Store`] or [`Error::Timeout`] when the server cannot be reached.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_builder(Self::parse_url(url)?).await
    }

    /// Connects with the options of `builder` (see [`connect`](Self::connect)).
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect), and as [`PostgresDriverBuilder::build`].
    pub async fn connect_builder(builder: PostgresDriverBuilder) -> Result<Self> {
        let driver = builder.build()?;
        driver.inner.io.connect().await?;
        Ok(driver)
    }
}
