//! The table name, checked and quoted, and the statements built on it.

use leader_core::{Error, Result};

/// The default for [`PostgresDriverBuilder::table`](crate::PostgresDriverBuilder::table).
pub const DEFAULT_TABLE: &str = "leader_elections";

/// PostgreSQL truncates identifiers longer than this (NAMEDATALEN - 1).
const MAX_IDENTIFIER_LEN: usize = 63;

/// A table name, `table` or `schema.table`, each part a lower-case identifier, so that
/// quoting it cannot change its meaning and nothing else can reach the SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Table {
    /// As given: `leader_elections`, `ops.leader_elections`.
    pub(crate) name: String,
    /// Quoted for SQL: `"ops"."leader_elections"`.
    pub(crate) quoted: String,
}

impl Default for Table {
    /// [`DEFAULT_TABLE`].
    fn default() -> Self {
        Table {
            name: DEFAULT_TABLE.to_owned(),
            quoted: format!("\"{DEFAULT_TABLE}\""),
        }
    }
}

impl Table {
    pub(crate) fn parse(name: &str) -> Result<Self> {
        let parts: Vec<&str> = name.split('.').collect();
        if parts.len() > 2 {
            return Err(Error::invalid_config(
                "table",
                format!("`{name}` has more than one `.`: expected `table` or `schema.table`"),
            ));
        }
        for part in &parts {
            let valid_start = part
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
            let valid_rest = part
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !valid_start || !valid_rest || part.len() > MAX_IDENTIFIER_LEN {
                return Err(Error::invalid_config(
                    "table",
                    format!(
                        "`{name}`: each part must be 1 to {MAX_IDENTIFIER_LEN} lower-case ASCII \
                         letters, digits or `_`, not starting with a digit"
                    ),
                ));
            }
        }
        let quoted = parts
            .iter()
            .map(|part| format!("\"{part}\""))
            .collect::<Vec<_>>()
            .join(".");
        Ok(Table {
            name: name.to_owned(),
            quoted,
        })
    }

    /// `CREATE TABLE IF NOT EXISTS`, as in the README.
    pub(crate) fn create(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {t} (
    name          text        PRIMARY KEY,
    holder        text,
    value         bytea       NOT NULL DEFAULT '',
    fencing_token bigint      NOT NULL DEFAULT 0,
    expires_at    timestamptz NOT NULL DEFAULT '-infinity'
)",
            t = self.quoted
        )
    }

    /// Takes the lead if the row is free (no holder), expired, or this candidate's own
    /// (an ended term), with the next fencing token, and announces it; otherwise returns
    /// the holder's remaining lease in milliseconds (server time). One statement.
    ///
    /// A new row's first token is the server's clock in microseconds since 1970, so that
    /// tokens keep increasing even when an operator deletes the row (a row gains one token
    /// per term, far fewer than a microsecond's worth).
    ///
    /// $1 name, $2 holder, $3 value, $4 TTL in ms, $5 channel.
    /// Returns (fencing token or NULL, remaining ms of the holder or NULL).
    pub(crate) fn acquire(&self) -> String {
        format!(
            "WITH acquired AS (
    INSERT INTO {t} AS e (name, holder, value, fencing_token, expires_at)
    VALUES ($1, $2, $3, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint,
            clock_timestamp() + $4::float8 * interval '1 millisecond')
    ON CONFLICT (name) DO UPDATE
        SET holder = excluded.holder,
            value = excluded.value,
            fencing_token = e.fencing_token + 1,
            expires_at = clock_timestamp() + $4::float8 * interval '1 millisecond'
        WHERE e.holder IS NULL
           OR e.holder = excluded.holder
           OR e.expires_at <= clock_timestamp()
    RETURNING e.fencing_token
), announced AS MATERIALIZED (
    SELECT fencing_token, pg_notify($5::text, 'elected') AS notified FROM acquired
)
SELECT (SELECT fencing_token FROM announced),
       (SELECT {remaining} FROM {t} AS h WHERE h.name = $1 AND h.holder IS NOT NULL)",
            remaining = remaining("h.expires_at"),
            t = self.quoted
        )
    }

    /// Extends the lease of exactly this term, if it has not expired.
    /// $1 name, $2 holder, $3 fencing token, $4 TTL in ms. One row updated when renewed.
    pub(crate) fn renew(&self) -> String {
        format!(
            "UPDATE {t}
    SET expires_at = clock_timestamp() + $4::float8 * interval '1 millisecond'
    WHERE name = $1 AND holder = $2 AND fencing_token = $3
      AND expires_at > clock_timestamp()",
            t = self.quoted
        )
    }

    /// Ends exactly this term, keeping the row and its counter, and wakes the waiters.
    /// $1 name, $2 holder, $3 fencing token, $4 channel. One row when released.
    pub(crate) fn resign(&self) -> String {
        format!(
            "WITH released AS (
    UPDATE {t}
        SET holder = NULL, value = '', expires_at = '-infinity'
        WHERE name = $1 AND holder = $2 AND fencing_token = $3
    RETURNING name
)
SELECT pg_notify($4::text, 'resigned')::text FROM released",
            t = self.quoted
        )
    }

    /// The holder of an unexpired term: holder, value, fencing token, remaining ms.
    /// $1 name.
    pub(crate) fn leader(&self) -> String {
        format!(
            "SELECT holder, value, fencing_token, {remaining}
    FROM {t}
    WHERE name = $1 AND holder IS NOT NULL AND expires_at > clock_timestamp()",
            t = self.quoted,
            remaining = remaining("expires_at"),
        )
    }
}

/// The milliseconds from now (server time) to `column`, rounded up; +/-infinity for a row
/// set to never (or always) expire by hand, which PostgreSQL 15 cannot subtract.
fn remaining(column: &str) -> String {
    format!(
        "CASE WHEN isfinite({column}) \
         THEN ceil(extract(epoch FROM {column} - clock_timestamp()) * 1000)::float8 \
         WHEN {column} > clock_timestamp() THEN 'infinity'::float8 \
         ELSE '-infinity'::float8 END"
    )
}

/// The `LISTEN` channel of `election` in `table`: a hash, since channel names are
/// identifiers of at most 63 bytes and election names may be longer. Two elections that
/// share a channel only wake each other's waiters, who look and wait again.
pub(crate) fn channel(table: &Table, election: &str) -> String {
    // FNV-1a, 64 bits: stable across processes and versions, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in table
        .name
        .as_bytes()
        .iter()
        .chain([0u8].iter())
        .chain(election.as_bytes())
    {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("leader_{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_checked_and_quoted() {
        let plain = Table::parse("leader_elections").expect("valid");
        assert_eq!(plain.quoted, "\"leader_elections\"");
        assert_eq!(plain, Table::default());
        let qualified = Table::parse("ops.leases_2").expect("valid");
        assert_eq!(qualified.quoted, "\"ops\".\"leases_2\"");
        for bad in [
            "",
            "a.b.c",
            ".x",
            "x.",
            "Leader",
            "2fast",
            "x\"; DROP TABLE users; --",
            "x y",
            "x;",
            &"a".repeat(64),
        ] {
            let err = Table::parse(bad).expect_err(bad);
            assert!(
                matches!(err, Error::InvalidConfig { name: "table", .. }),
                "{bad}: {err:?}"
            );
        }
    }

    #[test]
    fn channels_are_short_identifiers_per_table_and_election() {
        let t = Table::parse("leader_elections").expect("valid");
        let u = Table::parse("other").expect("valid");
        let a = channel(&t, "jobs");
        assert_eq!(a, channel(&t, "jobs"));
        assert_ne!(a, channel(&t, "jobs2"));
        assert_ne!(a, channel(&u, "jobs"));
        assert_eq!(a.len(), "leader_".len() + 16);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        );
        assert_eq!(channel(&t, &"x".repeat(512)).len(), a.len());
    }
}
