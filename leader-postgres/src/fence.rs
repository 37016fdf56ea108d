//! Fencing at the resource: a stale leader's writes to the service's own PostgreSQL fail.

use leader_core::{Error, Result};
use tokio_postgres::GenericClient;
use tokio_postgres::error::SqlState;

use crate::sql::is_identifier;

/// The default for [`Fence::table`].
pub const DEFAULT_FENCE_TABLE: &str = "leader_fences";

/// A fence for one resource in the service's own PostgreSQL (any database, not
/// necessarily the one that holds the elections): a row per resource in a table (default
/// [`DEFAULT_FENCE_TABLE`]) with the highest fencing token that wrote to it.
///
/// Call [`check`](Self::check) inside the transaction that writes to the resource, with
/// the term's [`fencing_token`](leader_core::Term::fencing_token): it records the token
/// unless a higher one is there, and holds the resource's row until the transaction ends,
/// so that a newer leader's transaction and a stale one's are serialised and the stale one
/// fails with [`Error::Fenced`], whatever the timing: a leader paused past its deadline
/// (garbage collection, `SIGSTOP`, a VM migration) cannot write once a newer leader has.
///
/// ```rust,no_run
/// # async fn example(mut client: leader_postgres::tokio_postgres::Client, term: leader_core::Term)
/// # -> leader_core::Result<()> {
/// use leader_postgres::Fence;
///
/// let fence = Fence::new("reports");
/// fence.create_table(&client).await?; // idempotent; or run the SQL of the README
/// let tx = client.transaction().await.map_err(leader_core::Error::store)?;
/// fence.check(&tx, term.fencing_token()).await?; // Error::Fenced for a stale leader
/// tx.execute("UPDATE reports SET done = true", &[]).await.map_err(leader_core::Error::store)?;
/// tx.commit().await.map_err(leader_core::Error::store)?;
/// # Ok(()) }
/// ```
///
/// Cheap to clone. The fence works under `READ COMMITTED` (PostgreSQL's default); under
/// `REPEATABLE READ` or `SERIALIZABLE` a stale transaction that waited for a newer one
/// fails with a serialization error instead of [`Error::Fenced`] (still nothing written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    resource: String,
    table: String,
}

impl Fence {
    /// A fence for `resource` (any text: a table's name, a job's), in
    /// [`DEFAULT_FENCE_TABLE`].
    pub fn new(resource: impl Into<String>) -> Self {
        Fence {
            resource: resource.into(),
            table: DEFAULT_FENCE_TABLE.to_owned(),
        }
    }

    /// The table of fences: `table` or `schema.table`, lower-case ASCII letters, digits
    /// and `_`. Defaults to [`DEFAULT_FENCE_TABLE`]. A bad name is an
    /// [`Error::InvalidConfig`] when the fence is used.
    #[must_use]
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The resource this fence guards.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The table, quoted for SQL.
    fn quoted(&self) -> Result<String> {
        let parts: Vec<&str> = self.table.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|part| is_identifier(part)) {
            return Err(Error::invalid_config(
                "table",
                format!(
                    "fence table `{}`: expected `table` or `schema.table` of lower-case ASCII \
                     letters, digits and `_`",
                    self.table
                ),
            ));
        }
        Ok(parts
            .iter()
            .map(|part| format!("\"{part}\""))
            .collect::<Vec<_>>()
            .join("."))
    }

    /// The `CREATE TABLE IF NOT EXISTS` that [`create_table`](Self::create_table) runs (as
    /// in the README).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a bad table name.
    pub fn create_table_sql(&self) -> Result<String> {
        Ok(format!(
            "CREATE TABLE IF NOT EXISTS {} (
    resource      text        PRIMARY KEY,
    fencing_token bigint      NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp()
)",
            self.quoted()?
        ))
    }

    /// Creates the table of fences if it is missing. Idempotent.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a bad table name; [`Error::Denied`] without the
    /// privilege to create it; [`Error::Store`] for other failures.
    pub async fn create_table<C: GenericClient + Sync>(&self, client: &C) -> Result<()> {
        let sql = self.create_table_sql()?;
        match client.batch_execute(&sql).await {
            Ok(()) => Ok(()),
            // Created concurrently by another process.
            Err(err) if err.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(()),
            Err(err) => Err(fence_error(err)),
        }
    }

    /// Records `token` as the resource's token unless a higher one is there, and holds the
    /// resource's row until `client`'s transaction ends. Call it inside the transaction
    /// that writes to the resource, before the writes; a stale token fails and the caller
    /// rolls back. An equal token passes (the same term writing again). Outside a
    /// transaction (a bare `Client`) it records the token and holds nothing.
    ///
    /// # Errors
    ///
    /// [`Error::Fenced`] (with the higher token) when a higher token has written to the
    /// resource: the caller's term has ended; nothing is recorded. [`Error::InvalidConfig`]
    /// for a bad table name; [`Error::Denied`] without SELECT, INSERT and UPDATE on the
    /// table; [`Error::Store`] for other failures (the transaction is then aborted).
    pub async fn check<C: GenericClient + Sync>(&self, client: &C, token: u64) -> Result<()> {
        let table = self.quoted()?;
        let Ok(bigint) = i64::try_from(token) else {
            return Err(Error::invalid_config(
                "fencing_token",
                format!("{token} does not fit a PostgreSQL bigint"),
            ));
        };
        // ON CONFLICT DO UPDATE locks the conflicting row even when its WHERE is false,
        // and waits for a transaction that holds it: the newer token wins either way.
        let recorded = client
            .query_opt(
                &format!(
                    "INSERT INTO {table} AS f (resource, fencing_token) VALUES ($1, $2)
                     ON CONFLICT (resource) DO UPDATE
                         SET fencing_token = excluded.fencing_token,
                             updated_at = clock_timestamp()
                         WHERE f.fencing_token <= excluded.fencing_token
                     RETURNING fencing_token"
                ),
                &[&self.resource, &bigint],
            )
            .await
            .map_err(fence_error)?;
        if recorded.is_some() {
            return Ok(());
        }
        // Stale. A new snapshot (READ COMMITTED) sees the newer token that won.
        let newer = client
            .query_opt(
                &format!("SELECT fencing_token FROM {table} WHERE resource = $1"),
                &[&self.resource],
            )
            .await
            .ok()
            .flatten()
            .and_then(|row| row.try_get::<_, i64>(0).ok())
            .and_then(|newer| u64::try_from(newer).ok());
        Err(Error::Fenced {
            resource: self.resource.clone(),
            token,
            newer,
        })
    }
}

fn fence_error(err: tokio_postgres::Error) -> Error {
    if err.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
        Error::denied(err)
    } else {
        Error::store(err)
    }
}

#[cfg(test)]
mod readme_tests {
    use super::*;

    #[test]
    fn the_readme_shows_the_fence_table() {
        let readme = include_str!("../README.md");
        let fence = Fence::new("x").create_table_sql().expect("valid table");
        assert!(
            readme.contains(&fence),
            "the README's SQL differs from:\n{fence}"
        );
    }
}
