#![doc = include_str!("../README.md")]

mod fence;
mod listener;
mod renewals;
mod sql;
mod tls;
mod url;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use leader_core::{Candidate, CandidateInfo, Driver, Error, Grant, LeaderInfo, Result};
use rand::Rng;
use tokio::time::{Instant, sleep, timeout};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, Row, Statement};

use crate::tls::Tls;
use tracing::{debug, warn};

pub use tokio_postgres;
pub use url::SCHEMES;

pub use fence::{DEFAULT_FENCE_TABLE, Fence};

use listener::Listener;
use renewals::{Cached, Due, Renewals};
pub use sql::DEFAULT_TABLE;
use sql::Table;

/// The default for [`PostgresDriverBuilder::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The default for [`PostgresDriverBuilder::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The `application_name` of the driver's connections, unless the config sets one.
const APPLICATION_NAME: &str = "leader-postgres";

/// A [`Driver`] for PostgreSQL.
///
/// Each election is one row of a table (default [`DEFAULT_TABLE`]): `name`, `holder` (the
/// candidate's unique id, `NULL` when nobody leads), `value`, `fencing_token`,
/// `expires_at` (computed by the server with `clock_timestamp()`), the holder's driver's
/// channel and a handover's nomination. Its waiting candidates stand in a line, rows of
/// `<table>_waiters` with a server-side expiry. Taking the lead, renewing, resigning,
/// handing over and proclaiming are single statements that compare the holder **and** the
/// fencing token; the token is incremented by the statement that takes the lead, and a
/// resignation keeps the row (and so the counter). A resignation `NOTIFY`s only the next
/// waiter, on its driver's channel; a trigger `NOTIFY`s a holder whose term anyone else
/// ends. One statement renews every term a driver holds, one refreshes every place in line
/// it has. See the crate's README for the SQL and the grants.
///
/// Cheap to clone: clones share one connection for the statements (reopened when it
/// breaks) and one connection for `LISTEN`; each election built on it is a distinct
/// candidate.
#[derive(Clone)]
pub struct PostgresDriver {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    tls: Tls,
    table: Table,
    request_timeout: Duration,
    connect_timeout: Duration,
    create_table: bool,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    listener: Listener,
    renewals: Renewals,
    /// Statements sent, for [`PostgresDriver::statements_sent`].
    sent: AtomicU64,
}

/// One open connection and the driver's statements, prepared on it.
struct Connection {
    client: Client,
    acquire: Statement,
    renew: Statement,
    keep: Statement,
    resign: Statement,
    hand_over: Statement,
    proclaim: Statement,
    candidates: Statement,
    leader: Statement,
}

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
        // The driver's own channel: PostgreSQL wakes this driver's waiters and tells its
        // leaders about lost terms on it.
        let channel = format!("leader_d_{:016x}", rand::random::<u64>());
        PostgresDriver {
            inner: Arc::new(Inner {
                listener: Listener::new(
                    listen_config,
                    self.tls.clone(),
                    self.connect_timeout,
                    channel,
                ),
                renewals: Renewals::default(),
                sent: AtomicU64::new(0),
                config,
                tls: self.tls,
                table,
                request_timeout: self.request_timeout,
                connect_timeout: self.connect_timeout,
                create_table: self.create_table,
                connection: tokio::sync::Mutex::new(None),
            }),
        }
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
        driver.inner.connection().await?;
        Ok(driver)
    }

    /// The table, as configured (`leader_elections`, `schema.table`).
    pub fn table(&self) -> &str {
        &self.inner.table.name
    }

    /// The `LISTEN` channel of `election`: `leader_` and 16 hex digits, a hash of the
    /// table and the election name.
    pub fn channel(&self, election: &str) -> String {
        sql::channel(&self.inner.table, election)
    }

    /// The schema the driver creates when it is missing or incomplete (idempotent): the
    /// elections table, its waiters' table (`<table>_waiters`) and the trigger that tells a
    /// leader at once when someone else ends its term. As in the README.
    pub fn create_table_sql(&self) -> String {
        self.inner.table.create()
    }

    /// How many statements this driver has sent to PostgreSQL (not counting `LISTEN`s,
    /// health checks and connection set-up): a diagnostic for load and for tests.
    pub fn statements_sent(&self) -> u64 {
        self.inner.sent.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for PostgresDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio_postgres::Config's Debug shows the password as `_`.
        f.debug_struct("PostgresDriver")
            .field("config", &self.inner.config)
            .field("tls", &self.inner.tls.is_on())
            .field("table", &self.inner.table.name)
            .finish_non_exhaustive()
    }
}

/// A PostgreSQL refusal, with what the client lacks spelled out.
#[derive(Debug)]
struct Refused {
    what: String,
    source: tokio_postgres::Error,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for Refused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A PostgreSQL error as this crate's [`Error`]: refused credentials and missing
/// privileges are [`Error::Denied`] (retrying cannot fix them), anything else
/// [`Error::Store`].
fn pg_error(table: &Table, err: tokio_postgres::Error) -> Error {
    let what = match err.code() {
        Some(code) if *code == SqlState::INSUFFICIENT_PRIVILEGE => format!(
            "PostgreSQL denied a privilege: the driver needs SELECT, INSERT and UPDATE on \
             table `{}`, SELECT, INSERT, UPDATE and DELETE on `{}` (and CREATE on its schema \
             only if it is to create the tables)",
            table.name, table.waiters_name
        ),
        Some(code)
            if *code == SqlState::INVALID_PASSWORD
                || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            "PostgreSQL refused the login: check the user and password (and pg_hba.conf)".to_owned()
        }
        _ => return Error::store(err),
    };
    Error::denied(Refused { what, source: err })
}

fn ttl_millis(ttl: Duration) -> f64 {
    ttl.as_secs_f64() * 1000.0
}

fn check_name(election: &str) -> Result<()> {
    if election.contains('\0') {
        return Err(Error::invalid_config(
            "name",
            "must not contain NUL bytes with PostgreSQL (text cannot hold them)",
        ));
    }
    Ok(())
}

fn token_of(value: i64) -> Result<u64> {
    u64::try_from(value).map_err(|_| {
        Error::store(std::io::Error::other(format!(
            "fencing token {value} in the table is negative"
        )))
    })
}

/// How long a waiter sleeps on a holder's remaining lease (server time, as a duration):
/// that plus a little jitter, so waiters that saw the same expiry do not all ask at the
/// same millisecond.
fn expiry_wait(remaining_ms: Option<f64>, ttl: Duration) -> Duration {
    let base = match remaining_ms {
        Some(ms) if ms.is_finite() => Duration::from_secs_f64((ms.max(0.0) / 1000.0).min(3600.0)),
        // A row set by hand to never expire: look again a TTL later.
        Some(ms) if ms > 0.0 => ttl,
        Some(_) => Duration::ZERO,
        // The row was not visible to the statement's snapshot (inserted concurrently):
        // look again soon.
        _ => ttl / 20,
    };
    let spread = u64::try_from((ttl / 20).as_millis())
        .unwrap_or(50)
        .clamp(1, 50);
    base + Duration::from_millis(rand::rng().random_range(1..=spread))
}

impl Inner {
    /// The shared connection, opened on first use and again after it broke.
    async fn connection(&self) -> Result<Arc<Connection>> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref()
            && !connection.client.is_closed()
        {
            return Ok(Arc::clone(connection));
        }
        *slot = None;
        let limit = self.connect_timeout;
        let connection = match timeout(limit, self.open()).await {
            Ok(result) => Arc::new(result?),
            Err(_) => return Err(Error::Timeout(limit)),
        };
        *slot = Some(Arc::clone(&connection));
        Ok(connection)
    }

    async fn open(&self) -> Result<Connection> {
        let error = |err| pg_error(&self.table, err);
        let (client, mut messages) = self.tls.connect(&self.config).await.map_err(error)?;
        tokio::spawn(async move {
            use futures::StreamExt;
            while let Some(message) = messages.next().await {
                if let Err(err) = message {
                    debug!(error = %err, "PostgreSQL connection closed");
                    break;
                }
            }
        });
        let statement_timeout = self.request_timeout.as_millis().max(1);
        client
            .batch_execute(&format!("SET statement_timeout = {statement_timeout}"))
            .await
            .map_err(error)?;
        self.ensure_schema(&client).await?;
        let table = &self.table;
        Ok(Connection {
            acquire: client.prepare(&table.acquire()).await.map_err(error)?,
            renew: client.prepare(&table.renew()).await.map_err(error)?,
            keep: client.prepare(&table.keep()).await.map_err(error)?,
            resign: client.prepare(&table.resign()).await.map_err(error)?,
            hand_over: client.prepare(&table.hand_over()).await.map_err(error)?,
            proclaim: client.prepare(&table.proclaim()).await.map_err(error)?,
            candidates: client.prepare(&table.candidates()).await.map_err(error)?,
            leader: client.prepare(&table.leader()).await.map_err(error)?,
            client,
        })
    }

    /// Creates the schema (or completes one of an earlier version) if anything is missing
    /// and the driver may. Checks first, so that a user without CREATE on the schema works
    /// on tables a DBA made.
    async fn ensure_schema(&self, client: &Client) -> Result<()> {
        let error = |err| pg_error(&self.table, err);
        let complete: bool = client
            .query_one(
                Table::complete(),
                &[&self.table.quoted, &self.table.waiters, &self.table.trigger],
            )
            .await
            .map_err(error)?
            .try_get(0)
            .map_err(Error::store)?;
        if complete {
            return Ok(());
        }
        if !self.create_table {
            return Err(Error::invalid_config(
                "table",
                format!(
                    "`{}` (with `{}` and its trigger) does not exist or is of an earlier \
                     version, and creating it is turned off; create it with the SQL in the \
                     leader-postgres README",
                    self.table.name, self.table.waiters_name
                ),
            ));
        }
        debug!(table = %self.table.name, "creating the elections tables");
        match client.batch_execute(&self.table.setup()).await {
            Ok(()) => Ok(()),
            Err(err) => {
                // Leave no transaction open on the connection.
                let _ = client.batch_execute("ROLLBACK").await;
                if err.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
                    Err(Error::denied(Refused {
                        what: format!(
                            "table `{}` (or `{}`, or its trigger) does not exist and this user \
                             may not create it: have a DBA run the SQL in the leader-postgres \
                             README, or grant CREATE on the schema",
                            self.table.name, self.table.waiters_name
                        ),
                        source: err,
                    }))
                } else {
                    Err(error(err))
                }
            }
        }
    }

    /// Drops `connection` (if still the shared one) after a statement got no answer: the
    /// next statement opens a new one rather than wait behind a silent socket.
    async fn discard(&self, connection: &Arc<Connection>) {
        let mut slot = self.connection.lock().await;
        if slot
            .as_ref()
            .is_some_and(|held| Arc::ptr_eq(held, connection))
        {
            debug!("PostgreSQL statement timed out; opening a new connection for the next one");
            *slot = None;
        }
    }

    /// Runs one prepared statement, within the request timeout.
    async fn query(
        &self,
        which: fn(&Connection) -> &Statement,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        let connection = self.connection().await?;
        self.sent.fetch_add(1, Ordering::Relaxed);
        let answer = timeout(
            self.request_timeout,
            connection.client.query(which(&connection), params),
        )
        .await;
        match answer {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(err)) => {
                if connection.client.is_closed() || err.code() == Some(&SqlState::QUERY_CANCELED) {
                    self.discard(&connection).await;
                }
                Err(pg_error(&self.table, err))
            }
            Err(_) => {
                self.discard(&connection).await;
                Err(Error::Timeout(self.request_timeout))
            }
        }
    }

    /// Runs one prepared statement that returns one row.
    async fn query_one(
        &self,
        which: fn(&Connection) -> &Statement,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row> {
        self.query(which, params)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::store(std::io::Error::other("a statement returned no row")))
    }

    /// One attempt to take the lead; joins the line (or refreshes this candidate's place)
    /// otherwise.
    async fn try_acquire(&self, candidate: &Candidate, channel: &str) -> Result<Attempt> {
        let ttl = ttl_millis(candidate.ttl);
        // Taken before the statement is sent: the server's expiry is later than this plus
        // the TTL.
        let sent_at = Instant::now();
        let row = self
            .query_one(
                |c| &c.acquire,
                &[
                    &candidate.election,
                    &candidate.id,
                    &candidate.value,
                    &ttl,
                    &channel,
                    &self.listener.shared().channel,
                ],
            )
            .await?;
        let token: Option<i64> = row.try_get(0).map_err(Error::store)?;
        let first: Option<bool> = row.try_get(1).map_err(Error::store)?;
        let remaining: Option<f64> = row.try_get(2).map_err(Error::store)?;
        match token {
            Some(token) => Ok(Attempt::Elected(Grant::new(
                token_of(token)?,
                sent_at,
                candidate.ttl,
            ))),
            None => Ok(Attempt::Wait {
                first: first.unwrap_or(false),
                remaining,
            }),
        }
    }

    /// The leader and its remaining lease in milliseconds.
    async fn leader_with_remaining(&self, election: &str) -> Result<Option<(LeaderInfo, f64)>> {
        let rows = self.query(|c| &c.leader, &[&election]).await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let holder: String = row.try_get(0).map_err(Error::store)?;
        let value: Vec<u8> = row.try_get(1).map_err(Error::store)?;
        let token: i64 = row.try_get(2).map_err(Error::store)?;
        let remaining: f64 = row.try_get(3).map_err(Error::store)?;
        Ok(Some((
            LeaderInfo::new(holder, value, token_of(token)?),
            remaining,
        )))
    }

    /// Ends the term `token` (if any) of `candidate`, removes a nomination naming it and
    /// its place in line, and wakes the one waiter whose turn it now is.
    async fn resign_exactly(
        &self,
        candidate: &Candidate,
        token: Option<u64>,
        channel: &str,
    ) -> Result<()> {
        let token = token.map(bigint).transpose()?;
        let row = self
            .query_one(
                |c| &c.resign,
                &[&candidate.election, &candidate.id, &token, &channel],
            )
            .await?;
        let released: i64 = row.try_get(0).map_err(Error::store)?;
        let woken: i64 = row.try_get(1).map_err(Error::store)?;
        debug!(election = %candidate.election, released, woken, "resigned");
        Ok(())
    }

    /// Renews the term of `grant`, in a batch with every other term of this driver that is
    /// due, or answers from a batch that just renewed it.
    async fn renew(&self, candidate: &Candidate, grant: &Grant) -> Result<Grant> {
        let (id, token, ttl) = (&candidate.id, grant.fencing_token, candidate.ttl);
        let cached =
            || match self
                .renewals
                .ask(&candidate.election, id, token, ttl, grant.confirmed_at)
            {
                Cached::Renewed(at) => Some(Ok(Grant::new(token, at, ttl))),
                Cached::Gone => Some(Err(Error::TermGone)),
                Cached::Miss => None,
            };
        if let Some(answer) = cached() {
            return answer;
        }
        let _batch = self.renewals.batch.lock().await;
        // A batch that ran while this one waited may have renewed it.
        if let Some(answer) = cached() {
            return answer;
        }
        let mut batch = vec![Due {
            election: candidate.election.clone(),
            holder: id.clone(),
            token,
            ttl,
        }];
        batch.extend(self.renewals.due(id, renewals::BATCH - 1));
        let names: Vec<&str> = batch.iter().map(|d| d.election.as_str()).collect();
        let holders: Vec<&str> = batch.iter().map(|d| d.holder.as_str()).collect();
        let tokens = batch
            .iter()
            .map(|d| bigint(d.token))
            .collect::<Result<Vec<i64>>>()?;
        let ttls: Vec<f64> = batch.iter().map(|d| ttl_millis(d.ttl)).collect();
        let sent_at = Instant::now();
        let rows = self
            .query(|c| &c.renew, &[&names, &holders, &tokens, &ttls])
            .await?;
        let renewed = rows
            .iter()
            .map(|row| row.try_get::<_, String>(0))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(Error::store)?;
        debug!(
            terms = batch.len(),
            renewed = renewed.len(),
            "renewed a batch"
        );
        self.renewals.record(&batch, &renewed, sent_at);
        if renewed.contains(id) {
            Ok(Grant::new(token, sent_at, ttl))
        } else {
            Err(Error::TermGone)
        }
    }

    /// Ends the term `token` of `candidate` and nominates `nominee` for one TTL, in one
    /// statement.
    async fn hand_over(
        &self,
        candidate: &Candidate,
        token: u64,
        nominee: &str,
        channel: &str,
    ) -> Result<HandedOver> {
        let token = bigint(token)?;
        let ttl = ttl_millis(candidate.ttl);
        let row = self
            .query_one(
                |c| &c.hand_over,
                &[
                    &candidate.election,
                    &candidate.id,
                    &token,
                    &nominee,
                    &ttl,
                    &channel,
                ],
            )
            .await?;
        let handed: bool = row.try_get(0).map_err(Error::store)?;
        let held: bool = row.try_get(1).map_err(Error::store)?;
        let waiting: bool = row.try_get(2).map_err(Error::store)?;
        Ok(if handed {
            HandedOver::Done
        } else if !held {
            HandedOver::TermGone
        } else if !waiting {
            HandedOver::NotWaiting
        } else {
            // Both held in the statement's snapshot, yet the update found neither: the
            // term ended meanwhile.
            HandedOver::TermGone
        })
    }

    /// Sets the value of the term `token` of `candidate`; whether it was still held.
    async fn proclaim(
        &self,
        candidate: &Candidate,
        token: u64,
        value: &[u8],
        channel: &str,
    ) -> Result<bool> {
        let token = bigint(token)?;
        let row = self
            .query_one(
                |c| &c.proclaim,
                &[&candidate.election, &candidate.id, &token, &value, &channel],
            )
            .await?;
        row.try_get(0).map_err(Error::store)
    }

    /// The leader (`true`), then the waiters in the order they would lead.
    async fn candidates(&self, election: &str) -> Result<Vec<(String, Vec<u8>, bool)>> {
        let rows = self.query(|c| &c.candidates, &[&election]).await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect::<std::result::Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(Error::store)
    }

    /// Starts the keeper task: while this driver has waiters, it refreshes their places in
    /// line every third of their TTL (one statement for all of them) and wakes those whose
    /// turn came without a notice (a holder, waiter or nominee that died).
    fn start_keeper(self: &Arc<Self>, first_round: Duration) {
        let inner = Arc::downgrade(self);
        tokio::spawn(keeper(inner, first_round));
    }

    /// One round of the keeper. Returns the period until the next, or `None` when no
    /// waiter is left.
    async fn keep(&self) -> Option<Duration> {
        let waiters = self.listener.shared().waiters_for_keeper();
        let period = waiters.iter().map(|(_, w)| w.ttl).min()? / 3;
        let names: Vec<&str> = waiters.iter().map(|(_, w)| w.election.as_str()).collect();
        let ids: Vec<&str> = waiters.iter().map(|(id, _)| id.as_str()).collect();
        let ttls: Vec<f64> = waiters.iter().map(|(_, w)| ttl_millis(w.ttl)).collect();
        match self.query(|c| &c.keep, &[&names, &ids, &ttls]).await {
            Ok(rows) => {
                let mut refreshed = std::collections::HashSet::with_capacity(rows.len());
                for row in &rows {
                    let (Ok(id), Ok(first), Ok(free)) = (
                        row.try_get::<_, String>(0),
                        row.try_get::<_, bool>(1),
                        row.try_get::<_, bool>(2),
                    ) else {
                        continue;
                    };
                    if let Some(waiter) = self.listener.shared().waiter(&id)
                        && first
                        && (free || !waiter.armed.load(Ordering::SeqCst))
                    {
                        waiter.wake.notify_one();
                    }
                    refreshed.insert(id);
                }
                // A place that is gone (swept, deleted by hand): its waiter joins again.
                for (id, waiter) in &waiters {
                    if !refreshed.contains(id.as_str()) {
                        waiter.wake.notify_one();
                    }
                }
            }
            Err(err) => {
                warn!(error = %leader_core::ErrorChain(&err), "refreshing the waiters' places failed; retrying");
                return Some(period.min(Duration::from_secs(1)));
            }
        }
        Some(period)
    }
}

/// The keeper task of a driver (see [`Inner::start_keeper`]).
async fn keeper(inner: Weak<Inner>, first_round: Duration) {
    let mut period = first_round;
    loop {
        sleep(period).await;
        let Some(driver) = inner.upgrade() else {
            return;
        };
        match driver.keep().await {
            Some(next) => period = next.max(Duration::from_millis(10)),
            None => return,
        }
    }
}

/// The outcome of a handover.
#[derive(Debug, PartialEq, Eq)]
enum HandedOver {
    Done,
    TermGone,
    NotWaiting,
}

/// The outcome of one attempt to take the lead.
enum Attempt {
    Elected(Grant),
    /// Not elected; in line. `first`: first in line or nominated (then `remaining` is the
    /// time in ms until the holder's lease, or a nomination, ends).
    Wait {
        first: bool,
        remaining: Option<f64>,
    },
}

/// A fencing token as the table's bigint.
fn bigint(token: u64) -> Result<i64> {
    i64::try_from(token).map_err(|_| {
        Error::store(std::io::Error::other(format!(
            "fencing token {token} does not fit the table's bigint"
        )))
    })
}

#[async_trait]
impl Driver for PostgresDriver {
    async fn campaign(&self, candidate: &Candidate) -> Result<Grant> {
        check_name(&candidate.election)?;
        let channel = self.channel(&candidate.election);
        // Listen first, so that a wake-up between our attempt and our wait is not missed;
        // the registration keeps a wake-up that comes before the wait.
        self.inner.listener.ensure().await;
        let (place, start_keeper) =
            self.inner
                .listener
                .wait(&candidate.id, &candidate.election, candidate.ttl);
        if start_keeper {
            self.inner.start_keeper(candidate.ttl / 3);
        }
        loop {
            match self.inner.try_acquire(candidate, &channel).await? {
                Attempt::Elected(grant) => {
                    self.inner.renewals.hold(
                        &candidate.election,
                        &candidate.id,
                        grant.fencing_token,
                        candidate.ttl,
                        grant.confirmed_at,
                    );
                    return Ok(grant);
                }
                Attempt::Wait { first, remaining } => {
                    place.waiter.armed.store(first, Ordering::SeqCst);
                    if first {
                        // First in line: a timer at the end of the holder's lease (or of a
                        // nomination) in case nobody says it ended.
                        let wait = expiry_wait(remaining, candidate.ttl);
                        debug!(election = %candidate.election, ?wait, "first in line");
                        tokio::select! {
                            () = place.waiter.wake.notified() => {}
                            () = sleep(wait) => {}
                        }
                    } else {
                        // Behind others: woken by a notice, or by the keeper.
                        debug!(election = %candidate.election, "waiting in line");
                        place.waiter.wake.notified().await;
                    }
                }
            }
        }
    }

    async fn renew(&self, candidate: &Candidate, grant: &Grant) -> Result<Grant> {
        if i64::try_from(grant.fencing_token).is_err() {
            return Err(Error::TermGone);
        }
        self.inner.renew(candidate, grant).await
    }

    async fn resign(&self, candidate: &Candidate, fencing_token: Option<u64>) -> Result<()> {
        let channel = self.channel(&candidate.election);
        // Releases by exact token only: this request may land late, after this
        // candidate's next term began, and must not end that one. Without a token (a
        // campaign whose answer never came), read it first; the place in line and a
        // nomination naming this candidate go either way.
        let token = match fencing_token {
            Some(token) => Some(token),
            None => match self
                .inner
                .leader_with_remaining(&candidate.election)
                .await?
            {
                Some((leader, _)) if leader.id == candidate.id => Some(leader.fencing_token),
                _ => None,
            },
        };
        self.inner.renewals.release(&candidate.id, token);
        self.inner.resign_exactly(candidate, token, &channel).await
    }

    async fn leader(&self, election: &str) -> Result<Option<LeaderInfo>> {
        check_name(election)?;
        Ok(self
            .inner
            .leader_with_remaining(election)
            .await?
            .map(|(info, _)| info))
    }

    async fn candidates(&self, election: &str) -> Result<Vec<CandidateInfo>> {
        check_name(election)?;
        Ok(self
            .inner
            .candidates(election)
            .await?
            .into_iter()
            .map(|(id, value, is_leader)| CandidateInfo::new(id, value, is_leader))
            .collect())
    }

    async fn hand_over(
        &self,
        candidate: &Candidate,
        fencing_token: u64,
        nominee: &str,
    ) -> Result<()> {
        let channel = self.channel(&candidate.election);
        match self
            .inner
            .hand_over(candidate, fencing_token, nominee, &channel)
            .await?
        {
            HandedOver::Done => {
                self.inner
                    .renewals
                    .release(&candidate.id, Some(fencing_token));
                Ok(())
            }
            HandedOver::TermGone => Err(Error::TermGone),
            HandedOver::NotWaiting => Err(Error::NotWaiting {
                id: nominee.to_owned(),
            }),
        }
    }

    async fn proclaim(
        &self,
        candidate: &Candidate,
        fencing_token: u64,
        value: &[u8],
    ) -> Result<()> {
        let channel = self.channel(&candidate.election);
        if self
            .inner
            .proclaim(candidate, fencing_token, value, &channel)
            .await?
        {
            Ok(())
        } else {
            Err(Error::TermGone)
        }
    }

    fn check_name(&self, election: &str) -> Result<()> {
        check_name(election)
    }

    fn term_gone(&self, candidate: &Candidate, fencing_token: u64) -> BoxFuture<'static, ()> {
        // The table's trigger tells this driver's channel when anyone but the holder ends
        // the term (a DELETE, another holder or token, an earlier expiry). A LISTEN lost on
        // a reconnection may have lost that notice: after each reconnection, look at the
        // row once.
        // Kept small while it waits (it lives as long as the term, one per election): the
        // look at the row is boxed, not part of this future's state.
        let term = self.inner.listener.hold(&candidate.id, fencing_token);
        let inner = Arc::clone(&self.inner);
        let election: Arc<str> = candidate.election.as_str().into();
        Box::pin(async move {
            loop {
                term.watch.wake.notified().await;
                if term.watch.gone.load(Ordering::SeqCst) {
                    warn!(%election, fencing_token, "the row no longer holds this term (ended by someone else)");
                    return;
                }
                let look: BoxFuture<'_, _> = Box::pin(inner.leader_with_remaining(&election));
                match look.await {
                    Ok(Some((leader, _)))
                        if leader.id == term.id() && leader.fencing_token == fencing_token => {}
                    Ok(_) => {
                        warn!(%election, fencing_token, "the row no longer holds this term");
                        return;
                    }
                    // The renewal loop deals with store errors.
                    Err(_) => {}
                }
            }
        })
    }

    fn observe(&self, election: &str) -> BoxStream<'static, Result<Option<LeaderInfo>>> {
        let driver = self.clone();
        let election = election.to_owned();
        futures::stream::unfold(
            (driver, election, None, None),
            |(driver, election, mut notices, next_check)| async move {
                if notices.is_none() {
                    let channel = driver.channel(&election);
                    notices = Some(driver.inner.listener.listen(&channel).await);
                }
                let notices_ref = notices.as_mut()?;
                if let Some(wait) = next_check {
                    tokio::select! {
                        () = notices_ref.changed() => {}
                        () = sleep(wait) => {}
                    }
                }
                notices_ref.mark_seen();
                let (item, next) = match check_name(&election) {
                    Err(err) => (Err(err), Some(Duration::from_secs(3600))),
                    Ok(()) => match driver.inner.leader_with_remaining(&election).await {
                        Ok(Some((info, remaining))) => (
                            Ok(Some(info)),
                            Some(expiry_wait(Some(remaining), Duration::from_secs(1))),
                        ),
                        // No leader: wait for an announcement (or a LISTEN reconnection).
                        Ok(None) => (Ok(None), Some(Duration::from_secs(3600))),
                        Err(err) => (Err(err), Some(Duration::from_millis(500))),
                    },
                };
                Some((item, (driver, election, notices, next)))
            },
        )
        .boxed()
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn waits_follow_the_servers_remaining_lease() {
        let ttl = Duration::from_secs(1);
        let wait = expiry_wait(Some(400.0), ttl);
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(450));
        assert!(expiry_wait(Some(-5.0), ttl) <= Duration::from_millis(50));
        assert!(expiry_wait(None, ttl) <= Duration::from_millis(100));
        assert!(expiry_wait(Some(f64::INFINITY), ttl) > ttl);
        assert!(expiry_wait(Some(f64::NEG_INFINITY), ttl) <= Duration::from_millis(50));
    }
}
