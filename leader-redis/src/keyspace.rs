//! Keyspace notifications: when the server publishes them, a leader hears at once that
//! its key was deleted, expired, evicted or overwritten, instead of at its next renewal.
//!
//! The driver reads `notify-keyspace-events` (`CONFIG GET`) on each new command
//! connection. It uses the notifications when the flags hold `K` (keyspace channels) and
//! the generic and expiry classes (`g` and `x`, or `A`): then `DEL`, `UNLINK`, `RENAME`,
//! an expiry and (with `$`) a `SET` of the key are pushed. A refused `CONFIG GET` (an ACL
//! without `+config|get`) counts as off. On a Redis Cluster the events are published on
//! the node that holds the key only, to clients connected to that node, so the driver
//! does not use them there.
//!
//! An event is only a reason to look: the leader then reads its key and steps down only
//! if the key no longer holds its term. The `expire` events of renewals (its own, every
//! third of a TTL) are ignored, so a held term costs nothing in steady state.

/// The keyspace channel prefix of database `db` if `flags` (the value of
/// `notify-keyspace-events`) publish what a held term needs.
pub(crate) fn channel_prefix(db: i64, flags: Option<&str>) -> Option<String> {
    let flags = flags?;
    let keyspace = flags.contains('K');
    let classes = flags.contains('A') || (flags.contains('g') && flags.contains('x'));
    (keyspace && classes).then(|| format!("__keyspace@{db}__:"))
}

/// Whether a message on a keyspace channel is worth a look: not the `expire` that a
/// renewal's `PEXPIRE` publishes.
pub(crate) fn worth_a_look(channel: &str, payload: &[u8]) -> bool {
    !(channel.starts_with("__keyspace@") && payload == b"expire")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_that_publish_deletions_and_expiries_turn_it_on() {
        assert_eq!(
            channel_prefix(0, Some("AKE")).as_deref(),
            Some("__keyspace@0__:")
        );
        assert_eq!(
            channel_prefix(3, Some("Kgx")).as_deref(),
            Some("__keyspace@3__:")
        );
        assert_eq!(channel_prefix(0, Some("")), None);
        assert_eq!(
            channel_prefix(0, Some("EA")),
            None,
            "keyevent channels only"
        );
        assert_eq!(channel_prefix(0, Some("Kg")), None, "no expiry events");
        assert_eq!(channel_prefix(0, None), None, "CONFIG GET refused");
    }

    #[test]
    fn renewals_expire_events_are_ignored() {
        assert!(!worth_a_look("__keyspace@0__:leader:{a}:leader", b"expire"));
        assert!(worth_a_look("__keyspace@0__:leader:{a}:leader", b"del"));
        assert!(worth_a_look("leader:{a}:events", b"expire"));
    }
}
