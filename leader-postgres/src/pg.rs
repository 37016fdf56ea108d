//! The real I/O layer: the protocol's statements on a tokio-postgres connection (shared,
//! reopened when it breaks), and `LISTEN` connections. No protocol decision lives here.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use leader_core::{CandidateInfo, Error, LeaderInfo, Result};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, Config, Row, Statement};
use tracing::{debug, warn};

use crate::io::{
    AcquireRequest, Acquired, HandOver, HandOverRequest, Holder, Kept, ListenClient,
    ListenConnection, Notification, Place, PostgresIo, Renewal, Resigned,
};
use crate::sql::Table;
use crate::tls::Tls;

/// The real [`PostgresIo`].
pub(crate) struct PgIo {
    pub(crate) config: Config,
    /// As `config`, with the `LISTEN` connection's `application_name`.
    pub(crate) listen_config: Config,
    pub(crate) tls: Tls,
    pub(crate) table: Table,
    pub(crate) request_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) create_table: bool,
    pub(crate) connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

impl std::fmt::Debug for PgIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio_postgres::Config's Debug shows the password as `_`.
        f.debug_struct("PgIo")
            .field("config", &self.config)
            .field("tls", &self.tls.is_on())
            .field("table", &self.table.name)
            .finish_non_exhaustive()
    }
}

/// One open connection and the driver's statements, prepared on it.
pub(crate) struct Connection {
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

fn token_of(value: i64) -> Result<u64> {
    u64::try_from(value).map_err(|_| {
        Error::store(std::io::Error::other(format!(
            "fencing token {value} in the table is negative"
        )))
    })
}

/// A fencing token as the table's bigint.
fn bigint(token: u64) -> Result<i64> {
    i64::try_from(token).map_err(|_| {
        Error::store(std::io::Error::other(format!(
            "fencing token {token} does not fit the table's bigint"
        )))
    })
}

/// A waiter's statement stamp as the table's bigint.
fn stamp(stamp: u64) -> Result<i64> {
    i64::try_from(stamp).map_err(|_| {
        Error::store(std::io::Error::other(format!(
            "stamp {stamp} does not fit the waiters' table's bigint"
        )))
    })
}

/// Runs a handoff in a transaction and rolls it back: a candidate elected, a second one
/// in line, the first resigning (which grants the second the term), the second taking
/// its own term anew and resigning. The rows are of an election of its own and never
/// committed; neither are the notifications (PostgreSQL sends them at commit).
async fn warm_up(connection: &Connection) -> std::result::Result<(), tokio_postgres::Error> {
    let client = &connection.client;
    let election = format!("leader warm-up {}", rand::random::<u64>());
    let channel = "leader_warm_up";
    let ttl = 60_000.0_f64;
    let value: &[u8] = b"";
    let stamp = 1_i64;
    let attempt = async |candidate: &str| {
        let params: [&(dyn ToSql + Sync); 7] = [
            &election, &candidate, &value, &ttl, &channel, &channel, &stamp,
        ];
        client.query_one(&connection.acquire, &params).await
    };
    let resign = async |candidate: &str, token: Option<i64>| {
        let params: [&(dyn ToSql + Sync); 4] = [&election, &candidate, &token, &channel];
        client.query_one(&connection.resign, &params).await
    };
    client.batch_execute("BEGIN").await?;
    let first: Option<i64> = attempt("a").await?.try_get(0)?;
    attempt("b").await?;
    resign("a", first).await?;
    let second: Option<i64> = attempt("b").await?.try_get(0)?;
    resign("b", second).await?;
    client.batch_execute("ROLLBACK").await
}

impl PgIo {
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
            while let Some(message) = messages.next().await {
                if let Err(err) = message {
                    debug!(error = %err, "PostgreSQL connection closed");
                    break;
                }
            }
        });
        let statement_timeout = self.request_timeout.as_millis().max(1);
        // READ COMMITTED whatever the role's default: the resignation's function reads the
        // line in a statement of its own to see what a concurrent attempt committed
        // meanwhile (see `Table::resign`), which a transaction-wide snapshot would hide.
        // Generic plans: each statement is planned once per connection, not at each of its
        // first five runs (and after them whenever PostgreSQL judges a generic plan no
        // cheaper). Planning the attempt costs 1 to 5 ms, which a waiter would otherwise
        // pay inside a handoff; every statement here looks rows up by their keys, which a
        // generic plan does as well as a custom one.
        client
            .batch_execute(&format!(
                "SET statement_timeout = {statement_timeout}; \
                 SET default_transaction_isolation = 'read committed'; \
                 SET plan_cache_mode = force_generic_plan"
            ))
            .await
            .map_err(error)?;
        self.ensure_schema(&client).await?;
        let table = &self.table;
        let connection = Connection {
            acquire: client.prepare(&table.acquire()).await.map_err(error)?,
            renew: client.prepare(&table.renew()).await.map_err(error)?,
            keep: client.prepare(&table.keep()).await.map_err(error)?,
            resign: client.prepare(&table.resign()).await.map_err(error)?,
            hand_over: client.prepare(&table.hand_over()).await.map_err(error)?,
            proclaim: client.prepare(&table.proclaim()).await.map_err(error)?,
            candidates: client.prepare(&table.candidates()).await.map_err(error)?,
            leader: client.prepare(&table.leader()).await.map_err(error)?,
            client,
        };
        // The handoff's statements run now, in a transaction rolled back, so that the
        // backend has compiled the resignation's function and planned both statements
        // before a handoff needs them (a process's first resignation is often its last: a
        // rolling restart). Best effort: a user without the grants hears of them from its
        // first real statement, as before.
        if let Err(err) = warm_up(&connection).await {
            debug!(error = %err, "warming up the handoff's statements failed");
            // Leave no transaction open on the connection; if even that fails, the
            // connection is of no use.
            connection
                .client
                .batch_execute("ROLLBACK")
                .await
                .map_err(error)?;
        }
        Ok(connection)
    }

    /// Creates the schema (or completes one of an earlier version) if anything is missing
    /// and the driver may. Checks first, so that a user without CREATE on the schema works
    /// on tables a DBA made.
    async fn ensure_schema(&self, client: &Client) -> Result<()> {
        let error = |err| pg_error(&self.table, err);
        let complete: bool = client
            .query_one(
                Table::complete(),
                &[
                    &self.table.quoted,
                    &self.table.waiters,
                    &self.table.trigger,
                    &self.table.resign_signature,
                    &self.table.deleted_trigger,
                ],
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
                    "`{}` (with `{}`, its trigger and its function) does not exist or is of an earlier \
                     version (or this user may not EXECUTE its function), and creating it is \
                     turned off; create it with the SQL in the leader-postgres README",
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
                            "table `{}` (or `{}`, its trigger or its function) does not exist or \
                             is of an earlier version (or this user may not EXECUTE its \
                             function), and this user may not create it: have a DBA run the \
                             SQL in the leader-postgres README (and GRANT EXECUTE on the \
                             function), or grant CREATE on the schema",
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
}

#[async_trait]
impl PostgresIo for PgIo {
    async fn connect(&self) -> Result<()> {
        self.connection().await.map(drop)
    }

    async fn acquire(&self, r: &AcquireRequest) -> Result<Acquired> {
        let ttl = ttl_millis(r.ttl);
        let stamp = stamp(r.stamp)?;
        let row = self
            .query_one(
                |c| &c.acquire,
                &[
                    &r.election,
                    &r.candidate,
                    &r.value,
                    &ttl,
                    &r.election_channel,
                    &r.driver_channel,
                    &stamp,
                ],
            )
            .await?;
        let token: Option<i64> = row.try_get(0).map_err(Error::store)?;
        let first: Option<bool> = row.try_get(1).map_err(Error::store)?;
        let remaining_ms: Option<f64> = row.try_get(2).map_err(Error::store)?;
        Ok(Acquired {
            token: token.map(token_of).transpose()?,
            first: first.unwrap_or(false),
            remaining_ms,
        })
    }

    async fn renew(&self, batch: &[Renewal]) -> Result<Vec<String>> {
        let names: Vec<&str> = batch.iter().map(|d| d.election.as_str()).collect();
        let holders: Vec<&str> = batch.iter().map(|d| d.holder.as_str()).collect();
        let tokens = batch
            .iter()
            .map(|d| bigint(d.token))
            .collect::<Result<Vec<i64>>>()?;
        let ttls: Vec<f64> = batch.iter().map(|d| ttl_millis(d.ttl)).collect();
        let rows = self
            .query(|c| &c.renew, &[&names, &holders, &tokens, &ttls])
            .await?;
        rows.iter()
            .map(|row| row.try_get::<_, String>(0))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(Error::store)
    }

    async fn keep(&self, places: &[Place]) -> Result<Vec<Kept>> {
        let names: Vec<&str> = places.iter().map(|p| p.election.as_str()).collect();
        let ids: Vec<&str> = places.iter().map(|p| p.candidate.as_str()).collect();
        let ttls: Vec<f64> = places.iter().map(|p| ttl_millis(p.ttl)).collect();
        let stamps = places
            .iter()
            .map(|p| stamp(p.stamp))
            .collect::<Result<Vec<i64>>>()?;
        let rows = self
            .query(|c| &c.keep, &[&names, &ids, &ttls, &stamps])
            .await?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                Some(Kept {
                    candidate: row.try_get(0).ok()?,
                    first: row.try_get(1).ok()?,
                    free: row.try_get(2).ok()?,
                })
            })
            .collect())
    }

    async fn resign(
        &self,
        election: &str,
        candidate: &str,
        token: Option<u64>,
        election_channel: &str,
    ) -> Result<Resigned> {
        let token = token.map(bigint).transpose()?;
        let row = self
            .query_one(
                |c| &c.resign,
                &[&election, &candidate, &token, &election_channel],
            )
            .await?;
        let released: i64 = row.try_get(0).map_err(Error::store)?;
        let woken: i64 = row.try_get(1).map_err(Error::store)?;
        Ok(Resigned {
            released: u64::try_from(released).unwrap_or(0),
            woken: u64::try_from(woken).unwrap_or(0),
        })
    }

    async fn hand_over(&self, r: &HandOverRequest) -> Result<HandOver> {
        let token = bigint(r.token)?;
        let ttl = ttl_millis(r.ttl);
        let row = self
            .query_one(
                |c| &c.hand_over,
                &[
                    &r.election,
                    &r.holder,
                    &token,
                    &r.nominee,
                    &ttl,
                    &r.election_channel,
                ],
            )
            .await?;
        Ok(HandOver {
            handed: row.try_get(0).map_err(Error::store)?,
            held: row.try_get(1).map_err(Error::store)?,
            waiting: row.try_get(2).map_err(Error::store)?,
        })
    }

    async fn proclaim(
        &self,
        election: &str,
        holder: &str,
        token: u64,
        value: &[u8],
        election_channel: &str,
    ) -> Result<bool> {
        let token = bigint(token)?;
        let row = self
            .query_one(
                |c| &c.proclaim,
                &[&election, &holder, &token, &value, &election_channel],
            )
            .await?;
        row.try_get(0).map_err(Error::store)
    }

    async fn candidates(&self, election: &str) -> Result<Vec<CandidateInfo>> {
        let rows = self.query(|c| &c.candidates, &[&election]).await?;
        rows.iter()
            .map(|row| {
                Ok(CandidateInfo::new(
                    row.try_get::<_, String>(0)?,
                    row.try_get::<_, Vec<u8>>(1)?,
                    row.try_get::<_, bool>(2)?,
                ))
            })
            .collect::<std::result::Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(Error::store)
    }

    async fn leader(&self, election: &str) -> Result<Option<Holder>> {
        let rows = self.query(|c| &c.leader, &[&election]).await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let holder: String = row.try_get(0).map_err(Error::store)?;
        let value: Vec<u8> = row.try_get(1).map_err(Error::store)?;
        let token: i64 = row.try_get(2).map_err(Error::store)?;
        let remaining_ms: f64 = row.try_get(3).map_err(Error::store)?;
        Ok(Some(Holder {
            info: LeaderInfo::new(holder, value, token_of(token)?),
            remaining_ms,
        }))
    }

    async fn listen_connection(&self) -> Result<ListenConnection> {
        let limit = self.connect_timeout;
        let (client, mut connection) =
            match timeout(limit, self.tls.connect(&self.listen_config)).await {
                Ok(Ok(pair)) => pair,
                Ok(Err(err)) => return Err(pg_error(&self.table, err)),
                Err(_) => return Err(Error::Timeout(limit)),
            };
        // The connection's own task: it drives the client's requests and hands over the
        // notifications; it ends (and so does the stream) when the connection does.
        let (tx, rx) = mpsc::unbounded_channel();
        let driving = tokio::spawn(async move {
            while let Some(message) = connection.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        let notification = Notification {
                            channel: n.channel().to_owned(),
                            payload: n.payload().to_owned(),
                        };
                        if tx.send(notification).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(err) => {
                        warn!(error = %err, "PostgreSQL LISTEN connection lost");
                        return;
                    }
                }
            }
        });
        Ok(ListenConnection {
            client: Box::new(PgListen {
                client,
                limit,
                _driving: AbortOnDrop(driving),
            }),
            notifications: futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|n| (n, rx))
            })
            .boxed(),
        })
    }

    fn random(&self) -> u64 {
        rand::random()
    }
}

/// A `LISTEN` connection's client; the connection stops when it is dropped.
struct PgListen {
    client: Client,
    limit: Duration,
    _driving: AbortOnDrop,
}

impl PgListen {
    async fn run(&self, sql: &str) -> Result<()> {
        match timeout(self.limit, self.client.batch_execute(sql)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(Error::store(err)),
            Err(_) => Err(Error::Timeout(self.limit)),
        }
    }
}

fn listen_sql(verb: &str, channels: &[String]) -> String {
    // Channel names are `leader_` and hex digits (see `sql::channel`): safe to quote.
    channels
        .iter()
        .map(|channel| format!("{verb} \"{channel}\";"))
        .collect()
}

#[async_trait]
impl ListenClient for PgListen {
    async fn listen(&self, channels: &[String]) -> Result<()> {
        self.run(&listen_sql("LISTEN", channels)).await
    }

    async fn unlisten(&self, channel: &str) -> Result<()> {
        self.run(&listen_sql("UNLISTEN", &[channel.to_owned()]))
            .await
    }

    async fn ping(&self) -> Result<()> {
        match timeout(self.limit, self.client.simple_query("SELECT 1")).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(Error::store(err)),
            Err(_) => Err(Error::Timeout(self.limit)),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
