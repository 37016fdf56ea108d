//! The table name, checked and quoted, and the statements built on it.

use leader_core::{Error, Result};

/// The default for [`PostgresDriverBuilder::table`](crate::PostgresDriverBuilder::table).
pub const DEFAULT_TABLE: &str = "leader_elections";

/// PostgreSQL truncates identifiers longer than this (NAMEDATALEN - 1).
const MAX_IDENTIFIER_LEN: usize = 63;

/// The longest table name part: the waiters' table is `<table>_waiters`, which must fit.
const MAX_TABLE_LEN: usize = MAX_IDENTIFIER_LEN - WAITERS_SUFFIX.len();

/// The waiters' table is the elections table's name with this suffix.
const WAITERS_SUFFIX: &str = "_waiters";

/// The key of the advisory lock that serialises concurrent schema set-ups.
const SETUP_LOCK: i64 = 0x6c65_6164_6572_7067; // "leaderpg"

/// A table name, `table` or `schema.table`, each part a lower-case identifier, so that
/// quoting it cannot change its meaning and nothing else can reach the SQL. Names the
/// objects that go with it: the waiters' table, its index, the trigger and its function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Table {
    /// As given: `leader_elections`, `ops.leader_elections`.
    pub(crate) name: String,
    /// Quoted for SQL: `"ops"."leader_elections"`.
    pub(crate) quoted: String,
    /// The waiters' table, as named: `ops.leader_elections_waiters`.
    pub(crate) waiters_name: String,
    /// The waiters' table, quoted.
    pub(crate) waiters: String,
    /// The trigger's name (unqualified: triggers belong to their table), on updates.
    pub(crate) trigger: String,
    /// The trigger's name on deletes.
    pub(crate) deleted_trigger: String,
    /// The trigger's function, quoted (in the table's schema).
    function: String,
    /// The resignation's function, quoted (in the table's schema).
    resign_function: String,
    /// Its signature, for `to_regprocedure`: `"ops"."leases_resign"(text,text,bigint,text)`.
    pub(crate) resign_signature: String,
    /// The waiters' line index (unqualified: it goes in its table's schema).
    index: String,
}

impl Default for Table {
    /// [`DEFAULT_TABLE`].
    fn default() -> Self {
        Table::of(None, DEFAULT_TABLE)
    }
}

impl Table {
    fn of(schema: Option<&str>, table: &str) -> Self {
        let qualify = |name: &str| match schema {
            Some(schema) => format!("\"{schema}\".\"{name}\""),
            None => format!("\"{name}\""),
        };
        let named = |name: &str| match schema {
            Some(schema) => format!("{schema}.{name}"),
            None => name.to_owned(),
        };
        let waiters = format!("{table}{WAITERS_SUFFIX}");
        Table {
            name: named(table),
            quoted: qualify(table),
            waiters_name: named(&waiters),
            waiters: qualify(&waiters),
            trigger: format!("{table}_gone"),
            deleted_trigger: format!("{table}_deleted"),
            function: qualify(&format!("{table}_gone")),
            resign_function: qualify(&format!("{table}_resign")),
            resign_signature: format!(
                "{}(text,text,bigint,text)",
                qualify(&format!("{table}_resign"))
            ),
            index: format!("{table}_line"),
        }
    }

    pub(crate) fn parse(name: &str) -> Result<Self> {
        let parts: Vec<&str> = name.split('.').collect();
        if parts.len() > 2 {
            return Err(Error::invalid_config(
                "table",
                format!("`{name}` has more than one `.`: expected `table` or `schema.table`"),
            ));
        }
        for (i, part) in parts.iter().enumerate() {
            let max = if i + 1 == parts.len() {
                MAX_TABLE_LEN
            } else {
                MAX_IDENTIFIER_LEN
            };
            if !is_identifier(part) || part.len() > max {
                return Err(Error::invalid_config(
                    "table",
                    format!(
                        "`{name}`: each part must be lower-case ASCII letters, digits or `_`, \
                         not starting with a digit, at most {MAX_IDENTIFIER_LEN} bytes for the \
                         schema and {MAX_TABLE_LEN} for the table (its waiters' table adds \
                         `{WAITERS_SUFFIX}`)"
                    ),
                ));
            }
        }
        Ok(match parts.as_slice() {
            [schema, table] => Table::of(Some(schema), table),
            _ => Table::of(None, name),
        })
    }

    /// Whether the tables, the columns of this version, the triggers and the resignation's
    /// function are all there (and this user may run the function). The waiters' `stamp`
    /// column came with the function that grants the next waiter its term: one `setup`
    /// transaction creates both, so the column's presence says the function is of this
    /// version too (unless a DBA added the column alone: the older function then wakes the
    /// next waiter instead of granting it the term, which still works).
    /// $1 the table (quoted), $2 the waiters' table (quoted), $3 the update trigger's name,
    /// $4 the resignation's function's signature, $5 the delete trigger's name.
    pub(crate) fn complete() -> &'static str {
        "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL
            AND EXISTS (SELECT 1 FROM pg_attribute
                        WHERE attrelid = to_regclass($1) AND attname = 'nominated_until')
            AND EXISTS (SELECT 1 FROM pg_attribute
                        WHERE attrelid = to_regclass($2) AND attname = 'stamp')
            AND EXISTS (SELECT 1 FROM pg_trigger
                        WHERE tgrelid = to_regclass($1) AND tgname = $3)
            AND EXISTS (SELECT 1 FROM pg_trigger
                        WHERE tgrelid = to_regclass($1) AND tgname = $5)
            AND to_regprocedure($4) IS NOT NULL
            AND has_function_privilege(to_regprocedure($4), 'EXECUTE')"
    }

    /// The schema: both tables, the columns a table of an earlier version lacks, the
    /// waiters' index, the triggers that tell a holder its term was ended by someone else
    /// (their conditions in `WHEN`, so that the function runs for no statement of the
    /// driver's own but a takeover after an expiry), and the resignation's function.
    /// Idempotent; as in the README.
    pub(crate) fn create(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {t} (
    name            text        PRIMARY KEY,
    holder          text,
    value           bytea       NOT NULL DEFAULT '',
    fencing_token   bigint      NOT NULL DEFAULT 0,
    expires_at      timestamptz NOT NULL DEFAULT '-infinity',
    channel         text,
    nominee         text,
    nominated_until timestamptz NOT NULL DEFAULT '-infinity'
);
ALTER TABLE {t}
    ADD COLUMN IF NOT EXISTS channel         text,
    ADD COLUMN IF NOT EXISTS nominee         text,
    ADD COLUMN IF NOT EXISTS nominated_until timestamptz NOT NULL DEFAULT '-infinity';
CREATE TABLE IF NOT EXISTS {w} (
    name       text        NOT NULL,
    candidate  text        NOT NULL,
    value      bytea       NOT NULL DEFAULT '',
    channel    text        NOT NULL,
    position   bigint      NOT NULL,
    expires_at timestamptz NOT NULL,
    stamp      bigint,
    PRIMARY KEY (name, candidate)
);
ALTER TABLE {w} ADD COLUMN IF NOT EXISTS stamp bigint;
CREATE INDEX IF NOT EXISTS \"{index}\" ON {w} (name, position);
CREATE OR REPLACE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify(OLD.channel, 'g' || OLD.fencing_token || ':' || OLD.holder);
    RETURN NULL;
END
$fn$;
CREATE OR REPLACE TRIGGER \"{trigger}\" AFTER UPDATE ON {t} FOR EACH ROW
    WHEN (OLD.holder IS NOT NULL AND OLD.channel IS NOT NULL
          AND (NEW.holder IS NOT NULL OR NEW.channel IS NOT NULL)
          AND (NEW.holder IS DISTINCT FROM OLD.holder
               OR NEW.fencing_token IS DISTINCT FROM OLD.fencing_token
               OR NEW.expires_at < OLD.expires_at))
    EXECUTE FUNCTION {f}();
CREATE OR REPLACE TRIGGER \"{deleted}\" AFTER DELETE ON {t} FOR EACH ROW
    WHEN (OLD.holder IS NOT NULL AND OLD.channel IS NOT NULL)
    EXECUTE FUNCTION {f}();
CREATE OR REPLACE FUNCTION {r}(
    _name text, _candidate text, _token bigint, _channel text,
    OUT released bigint, OUT woken bigint) LANGUAGE plpgsql AS $fn$
DECLARE
    _ended boolean;
    _freed boolean;
    _nominee text;
    _left boolean;
    _next_channel text;
    _next text;
    _granted boolean;
BEGIN
    UPDATE {t} SET
        holder = CASE WHEN holder = _candidate AND fencing_token = _token
                      THEN NULL ELSE holder END,
        value = CASE WHEN holder = _candidate AND fencing_token = _token
                     THEN ''::bytea ELSE value END,
        channel = CASE WHEN holder = _candidate AND fencing_token = _token
                       THEN NULL ELSE channel END,
        expires_at = CASE WHEN holder = _candidate AND fencing_token = _token
                          THEN '-infinity'::timestamptz ELSE expires_at END,
        nominee = CASE WHEN nominee = _candidate THEN NULL ELSE nominee END,
        nominated_until = CASE WHEN nominee = _candidate
                               THEN '-infinity'::timestamptz ELSE nominated_until END
    WHERE name = _name AND ((holder = _candidate AND fencing_token = _token)
                            OR nominee = _candidate)
    RETURNING holder IS NULL,
              CASE WHEN nominee IS NOT NULL AND nominated_until > clock_timestamp()
                   THEN nominee END
    INTO _freed, _nominee;
    _ended := FOUND;
    DELETE FROM {w} WHERE name = _name AND candidate = _candidate;
    _left := FOUND;
    woken := 0;
    released := 0;
    IF _ended OR _left THEN
        -- A statement of its own, so a snapshot of its own: taken after the UPDATE above
        -- waited for any attempt holding the row's lock, it sees the place that attempt
        -- took in line. The next waiter's place is locked, so that it cannot change or go
        -- before the grant. When the row is left free with no live nomination and that
        -- place carries a stamp, the waiter's term begins here, as its own attempt would
        -- begin it, with the next token; its lease ends when its place would have. That
        -- expiry was set by the waiter's statement that wrote the stamp: the waiter knows
        -- when it sent that statement, so it bounds the lease from below as it bounds an
        -- attempt's.
        WITH next AS MATERIALIZED (
            SELECT w.channel, w.candidate, w.value, w.stamp, w.expires_at FROM {w} AS w
            WHERE w.name = _name AND w.candidate <> _candidate
              AND w.expires_at > clock_timestamp()
              AND (_nominee IS NULL OR w.candidate = _nominee)
            ORDER BY w.position, w.candidate
            LIMIT 1
            FOR UPDATE
        ), granted AS (
            UPDATE {t} AS e SET holder = n.candidate, value = n.value, channel = n.channel,
                fencing_token = e.fencing_token + 1, expires_at = n.expires_at,
                nominee = NULL, nominated_until = '-infinity'
            FROM next AS n
            WHERE e.name = _name AND e.holder IS NULL AND n.stamp IS NOT NULL
              AND _ended AND _freed AND _nominee IS NULL
            RETURNING e.fencing_token, n.candidate, n.channel, n.stamp
        ), left_line AS (
            DELETE FROM {w} AS w USING granted AS g
            WHERE w.name = _name AND w.candidate = g.candidate
        ), told AS MATERIALIZED (
            SELECT pg_notify(g.channel,
                             'G' || g.fencing_token || ':' || g.stamp || ':' || g.candidate),
                   pg_notify(_channel, 'elected')
            FROM granted AS g
        )
        SELECT n.channel, n.candidate, EXISTS (SELECT 1 FROM told)
        INTO _next_channel, _next, _granted
        FROM next AS n;
        IF _granted THEN
            woken := 1;
            released := 1;
            RETURN;
        END IF;
        IF FOUND THEN
            PERFORM pg_notify(_next_channel, 'w' || _next);
            woken := 1;
        END IF;
    END IF;
    IF _ended AND _freed THEN
        PERFORM pg_notify(_channel, 'resigned');
        released := 1;
    END IF;
END
$fn$;",
            t = self.quoted,
            w = self.waiters,
            f = self.function,
            r = self.resign_function,
            index = self.index,
            trigger = self.trigger,
            deleted = self.deleted_trigger,
        )
    }

    /// [`create`](Self::create) in a transaction that holds an advisory lock, so that
    /// drivers starting together do not trip over each other's DDL.
    pub(crate) fn setup(&self) -> String {
        format!(
            "BEGIN;\nSELECT pg_advisory_xact_lock({SETUP_LOCK});\n{};\nCOMMIT;",
            self.create()
        )
    }

    /// Takes the lead if the row is free (no holder), expired, or this candidate's own
    /// (an ended term), no live nomination names someone else, and no live waiter stands
    /// before this candidate in line (the nominee skips the line); or, whatever the line,
    /// if the row holds a live term of this candidate's (one a resignation granted it,
    /// which it could not trust or never heard of: its place is gone, so the line would
    /// put it last and the row would stay held by nobody who knows it until the lease
    /// ends). Either way with the next fencing token, announcing it to observers, and
    /// leaving the line. Otherwise joins the line (or
    /// refreshes this candidate's place) and says whether this candidate is first in line
    /// (or nominated), with the time until the row can free up without a notice: the
    /// holder's expiry, or a nomination's. Also sweeps the election's long-expired waiters.
    /// One statement.
    ///
    /// A new row's first token is the server's clock in microseconds since 1970, so that
    /// tokens keep increasing even when an operator deletes the row (a row gains one token
    /// per term, far fewer than a microsecond's worth).
    ///
    /// $1 name, $2 candidate, $3 value, $4 TTL in ms, $5 the election's channel, $6 the
    /// driver's channel, $7 the stamp that names this statement to its waiter (see
    /// [`create`](Self::create): a resignation that grants the waiter its term quotes it).
    /// Returns (fencing token or NULL, first in line or nominated, remaining ms or NULL).
    pub(crate) fn acquire(&self) -> String {
        format!(
            "WITH me AS (
    SELECT coalesce(
        (SELECT position FROM {w} WHERE name = $1 AND candidate = $2),
        (extract(epoch FROM clock_timestamp()) * 1000000)::bigint) AS position
), line AS (
    SELECT NOT EXISTS (
        SELECT 1 FROM {w} AS o, me
        WHERE o.name = $1 AND o.candidate <> $2 AND o.expires_at > clock_timestamp()
          AND (o.position, o.candidate) < (me.position, $2)) AS first
), nominated AS (
    SELECT nominee FROM {t}
    WHERE name = $1 AND nominee IS NOT NULL AND nominated_until > clock_timestamp()
), own AS (
    SELECT EXISTS (SELECT 1 FROM {t}
                   WHERE name = $1 AND holder = $2 AND expires_at > clock_timestamp()) AS live
), allowed AS (
    SELECT CASE WHEN (SELECT live FROM own) THEN true
                WHEN EXISTS (SELECT 1 FROM nominated)
                THEN EXISTS (SELECT 1 FROM nominated WHERE nominee = $2)
                ELSE (SELECT first FROM line) END AS ok
), acquired AS (
    INSERT INTO {t} AS e (name, holder, value, fencing_token, expires_at, channel)
    SELECT $1, $2, $3, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint,
           clock_timestamp() + $4::float8 * interval '1 millisecond', $6
    FROM allowed WHERE allowed.ok
    ON CONFLICT (name) DO UPDATE
        SET holder = excluded.holder,
            value = excluded.value,
            fencing_token = e.fencing_token + 1,
            expires_at = clock_timestamp() + $4::float8 * interval '1 millisecond',
            channel = excluded.channel,
            nominee = NULL,
            nominated_until = '-infinity'
        WHERE (e.holder IS NULL OR e.holder = excluded.holder
               OR e.expires_at <= clock_timestamp())
          AND (e.nominee IS NULL OR e.nominee = excluded.holder
               OR e.nominated_until <= clock_timestamp())
    RETURNING e.fencing_token
), left_line AS (
    DELETE FROM {w} WHERE name = $1 AND candidate = $2 AND EXISTS (SELECT 1 FROM acquired)
), joined AS (
    INSERT INTO {w} (name, candidate, value, channel, position, expires_at, stamp)
    SELECT $1, $2, $3, $6, me.position,
           clock_timestamp() + $4::float8 * interval '1 millisecond', $7
    FROM me WHERE NOT EXISTS (SELECT 1 FROM acquired)
    ON CONFLICT (name, candidate) DO UPDATE
        SET value = excluded.value, channel = excluded.channel,
            expires_at = excluded.expires_at, stamp = excluded.stamp
), swept AS (
    DELETE FROM {w}
    WHERE (name, candidate) IN (
        SELECT name, candidate FROM {w}
        WHERE name = $1 AND candidate <> $2
          AND expires_at <= clock_timestamp() - interval '1 second'
        FOR UPDATE SKIP LOCKED)
), announced AS MATERIALIZED (
    SELECT fencing_token, pg_notify($5::text, 'elected') AS notified FROM acquired
)
SELECT (SELECT fencing_token FROM announced),
       (SELECT first FROM line) OR EXISTS (SELECT 1 FROM nominated WHERE nominee = $2),
       (SELECT greatest(
            CASE WHEN h.holder IS NOT NULL THEN {held} END,
            CASE WHEN h.nominee IS NOT NULL AND h.nominee <> $2 THEN {nominated} END)
        FROM {t} AS h WHERE h.name = $1)",
            held = remaining("h.expires_at"),
            nominated = remaining("h.nominated_until"),
            t = self.quoted,
            w = self.waiters,
        )
    }

    /// Extends the leases of a batch of terms, each only if it is exactly that term
    /// (holder and token) and has not expired.
    /// $1 names, $2 holders, $3 fencing tokens, $4 TTLs in ms (arrays of one length).
    /// Returns the holder of each renewed term.
    pub(crate) fn renew(&self) -> String {
        format!(
            "UPDATE {t} AS e
    SET expires_at = clock_timestamp() + b.ttl * interval '1 millisecond'
    FROM unnest($1::text[], $2::text[], $3::int8[], $4::float8[]) AS b(name, holder, token, ttl)
    WHERE e.name = b.name AND e.holder = b.holder AND e.fencing_token = b.token
      AND e.expires_at > clock_timestamp()
    RETURNING e.holder",
            t = self.quoted
        )
    }

    /// Refreshes a batch of waiters' places in line, sweeps long-expired places (skipping
    /// any another statement holds, so that sweeps never wait for each other), and tells
    /// which of the refreshed waiters are first in line (or nominated), and whether their
    /// election is free for them now.
    /// $1 names, $2 candidates, $3 TTLs in ms, $4 stamps (as the attempt's $7). Returns
    /// (candidate, first or nominated, free for it).
    pub(crate) fn keep(&self) -> String {
        format!(
            "WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::float8[], $4::int8[])
        AS b(name, candidate, ttl, stamp)
), refreshed AS (
    UPDATE {w} AS w SET expires_at = clock_timestamp() + b.ttl * interval '1 millisecond',
        stamp = b.stamp
    FROM batch AS b
    WHERE w.name = b.name AND w.candidate = b.candidate
    RETURNING w.name, w.candidate, w.position
), swept AS (
    DELETE FROM {w}
    WHERE (name, candidate) IN (
        SELECT w.name, w.candidate FROM {w} AS w
        WHERE w.expires_at <= clock_timestamp() - interval '1 second'
          AND NOT EXISTS (SELECT 1 FROM batch AS b
                          WHERE b.name = w.name AND b.candidate = w.candidate)
        FOR UPDATE SKIP LOCKED)
)
SELECT r.candidate,
       NOT EXISTS (
           SELECT 1 FROM {w} AS o
           WHERE o.name = r.name AND o.candidate <> r.candidate
             AND o.expires_at > clock_timestamp()
             AND (o.position, o.candidate) < (r.position, r.candidate))
       OR EXISTS (
           SELECT 1 FROM {t} AS e
           WHERE e.name = r.name AND e.nominee = r.candidate
             AND e.nominated_until > clock_timestamp()),
       NOT EXISTS (
           SELECT 1 FROM {t} AS e
           WHERE e.name = r.name
             AND ((e.holder IS NOT NULL AND e.expires_at > clock_timestamp())
                  OR (e.nominee IS NOT NULL AND e.nominee <> r.candidate
                      AND e.nominated_until > clock_timestamp())))
FROM refreshed AS r",
            t = self.quoted,
            w = self.waiters,
        )
    }

    /// Ends exactly this term (if $3 is not NULL), removes a nomination naming this
    /// candidate and its place in line, and then turns to one waiter: the nominee of a
    /// live nomination, or the first in line. When the row is left free, no nomination
    /// lives and that waiter's place carries a stamp, the same transaction grants it the
    /// term (the next token; the lease its place had; `G<token>:<stamp>:<id>` on its
    /// driver's channel; `elected` to observers), so that a handoff takes one commit, not
    /// a resignation's and then the waiter's attempt's. Otherwise it wakes that waiter
    /// (`w<id>`) and announces a released term to observers. The row and its counter
    /// stay. One call of the schema's resignation function (see
    /// [`create`](Self::create)): it reads the line in a statement of its own, after its
    /// update of the election's row, so that it sees the place of an attempt that held the
    /// row's lock while the update waited for it (one statement would read the line from
    /// its snapshot, taken before that attempt joined the line, and wake nobody).
    /// $1 name, $2 candidate, $3 fencing token or NULL, $4 the election's channel.
    /// Returns (terms released, waiters woken).
    pub(crate) fn resign(&self) -> String {
        format!(
            "SELECT released, woken FROM {r}($1, $2, $3, $4)",
            r = self.resign_function,
        )
    }

    /// Ends exactly this unexpired term and nominates a live waiter for one TTL (server
    /// time), waking it; announces the release to observers. Nothing changes unless both
    /// hold. One statement.
    /// $1 name, $2 holder, $3 fencing token, $4 nominee, $5 TTL in ms, $6 the election's
    /// channel. Returns (handed over, the term was held, the nominee waits).
    pub(crate) fn hand_over(&self) -> String {
        format!(
            "WITH target AS (
    SELECT channel, candidate FROM {w}
    WHERE name = $1 AND candidate = $4 AND candidate <> $2
      AND expires_at > clock_timestamp()
), held AS (
    SELECT 1 FROM {t}
    WHERE name = $1 AND holder = $2 AND fencing_token = $3 AND expires_at > clock_timestamp()
), handed AS (
    UPDATE {t} SET holder = NULL, value = '', channel = NULL, expires_at = '-infinity',
        nominee = $4,
        nominated_until = clock_timestamp() + $5::float8 * interval '1 millisecond'
    WHERE name = $1 AND holder = $2 AND fencing_token = $3
      AND expires_at > clock_timestamp() AND EXISTS (SELECT 1 FROM target)
    RETURNING name
), woken AS MATERIALIZED (
    SELECT pg_notify(target.channel, 'w' || target.candidate) AS woke,
           pg_notify($6::text, 'resigned') AS announced
    FROM target, handed
)
SELECT (SELECT count(*) FROM woken) > 0, EXISTS (SELECT 1 FROM held),
       EXISTS (SELECT 1 FROM target)",
            t = self.quoted,
            w = self.waiters,
        )
    }

    /// Sets the value of exactly this unexpired term, and tells observers.
    /// $1 name, $2 holder, $3 fencing token, $4 value, $5 the election's channel.
    /// Returns whether it was set.
    pub(crate) fn proclaim(&self) -> String {
        format!(
            "WITH proclaimed AS (
    UPDATE {t} SET value = $4
    WHERE name = $1 AND holder = $2 AND fencing_token = $3 AND expires_at > clock_timestamp()
    RETURNING name
), announced AS MATERIALIZED (
    SELECT pg_notify($5::text, 'proclaimed') AS notified FROM proclaimed
)
SELECT (SELECT count(*) FROM announced) > 0",
            t = self.quoted
        )
    }

    /// The leader, then the live waiters in the order they would lead (a nominee first).
    /// $1 name. Returns (id, value, is leader).
    pub(crate) fn candidates(&self) -> String {
        format!(
            "WITH leader AS (
    SELECT holder, value FROM {t}
    WHERE name = $1 AND holder IS NOT NULL AND expires_at > clock_timestamp()
), nominated AS (
    SELECT nominee FROM {t}
    WHERE name = $1 AND nominee IS NOT NULL AND nominated_until > clock_timestamp()
)
SELECT holder, value, true, 0, 0::bigint FROM leader
UNION ALL
SELECT w.candidate, w.value, false,
       CASE WHEN w.candidate IN (SELECT nominee FROM nominated) THEN 1 ELSE 2 END,
       w.position
FROM {w} AS w
WHERE w.name = $1 AND w.expires_at > clock_timestamp()
  AND w.candidate NOT IN (SELECT holder FROM leader)
ORDER BY 4, 5, 1",
            t = self.quoted,
            w = self.waiters,
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

/// Whether `part` is an identifier that needs no quoting and means the same quoted.
pub(crate) fn is_identifier(part: &str) -> bool {
    part.chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && part
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && part.len() <= MAX_IDENTIFIER_LEN
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
    fn the_readme_shows_the_schema_the_driver_creates() {
        let readme = include_str!("../README.md");
        let schema = Table::default().create();
        assert!(
            readme.contains(&schema),
            "the README's SQL differs from:\n{schema}"
        );
    }

    #[test]
    fn long_table_names_leave_room_for_the_waiters_table() {
        assert!(Table::parse(&"a".repeat(55)).is_ok());
        assert!(Table::parse(&"a".repeat(56)).is_err());
        assert!(Table::parse(&format!("{}.{}", "s".repeat(63), "a".repeat(55))).is_ok());
        let t = Table::parse("ops.leases").expect("valid");
        assert_eq!(t.waiters, "\"ops\".\"leases_waiters\"");
        assert_eq!(t.waiters_name, "ops.leases_waiters");
        assert_eq!(t.trigger, "leases_gone");
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
        // What identifiers would fold or cut stays apart: case, bytes past 63, separators.
        assert_ne!(channel(&t, "Jobs"), channel(&t, "jobs"));
        let long = "y".repeat(63);
        assert_ne!(
            channel(&t, &format!("{long}a")),
            channel(&t, &format!("{long}b"))
        );
        assert_ne!(channel(&t, "svc/x"), channel(&t, "svc"));
        assert_ne!(channel(&t, "svc.x"), channel(&t, "svc_x"));
    }
}
