//! The faults a chaos run injects, what each needs to be over, and how long a leader may
//! take to be back after it.

use std::time::Duration;

use crate::StoreKind;

/// The faults, injected in this order, round after round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// SIGKILL the leader (then start a fresh candidate in its place).
    Kill,
    /// SIGTERM the leader: it resigns (then start a fresh candidate in its place).
    Term,
    /// SIGSTOP the leader for 1.5 × TTL, then SIGCONT.
    Stop,
    /// SIGSTOP the leader for a third of the TTL: a pause shorter than the lease.
    ShortPause,
    /// Hold the leader's connection to the store for 2 × TTL, then let it go.
    Partition,
    /// For 2 × TTL the leader's requests reach the store and take effect, but the answers
    /// are held: every renewal looks failed although it succeeded.
    LostAnswers,
    /// For 2 × TTL every chunk between the leader and the store arrives a tenth of the TTL
    /// late (a slow link: each chunk at its arrival plus the delay, in order).
    Latency,
    /// The store's answers to the leader arrive a fifth of the TTL late (ten times the
    /// default safety margin) until a renewal is answered late, then at once (before the
    /// next renewal is sent) the leader is partitioned for 2 × TTL. A lease counted from the answer's arrival instead
    /// of the request's sending outlives the store's by the delay: this fault shows it.
    SlowAnswersThenPartition,
    /// SIGKILL a waiting candidate (then start a fresh one in its place).
    WaiterKill,
    /// Partition a waiting candidate from the store for 2 × TTL.
    WaiterPartition,
    /// Delete the leader's key in the store, as an operator might (PostgreSQL: its row).
    DeleteKey,
    /// etcd only: revoke the leader's lease.
    RevokeLease,
    /// Kill the whole store and start it again on the same data.
    StoreRestart,
    /// etcd only: kill the member the leader talks to, then start it again.
    MemberLoss,
    /// etcd only: cut the member the leader talks to off from the other members (raft
    /// traffic both ways, through the peer proxies) for 2 × TTL; its clients still reach
    /// it, but it has no quorum.
    MemberPartition,
    /// Redis under Sentinel or as a Cluster only: kill the master (on a Cluster, the one
    /// serving the driven election); its replica is promoted (after 2 s down under
    /// Sentinel, the 3 s node timeout on a Cluster), then the old master is started again
    /// as a replica (the bound runs from when it is in sync: under Sentinel with
    /// `replicas=1` no term is granted or renewed without a replica).
    MasterFailover,
    /// Redis and PostgreSQL with a steppable clock only: the store's wall clock steps forward
    /// by TTL/2, then the leader is partitioned for 2 × TTL. Both stores expire leases by
    /// wall clock: the lease ends TTL/2 early, and the next leader may be elected while the
    /// old one still believes (a documented limit, measured, not failed).
    ClockForwardPartition,
    /// Redis and PostgreSQL with a steppable clock only: the store's wall clock steps back by
    /// TTL/2, then the leader is SIGKILLed: its lease outlives it by TTL/2 more.
    ClockBackKill,
}

impl Fault {
    /// What the report calls it.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "sigkill leader",
            Fault::Term => "sigterm leader",
            Fault::Stop => "sigstop leader 1.5xTTL",
            Fault::ShortPause => "sigstop leader TTL/3",
            Fault::Partition => "partition leader 2xTTL",
            Fault::LostAnswers => "lost answers 2xTTL",
            Fault::Latency => "latency TTL/10 2xTTL",
            Fault::SlowAnswersThenPartition => "slow answers, partition",
            Fault::WaiterKill => "sigkill waiter",
            Fault::WaiterPartition => "partition waiter 2xTTL",
            Fault::DeleteKey => "delete leader key",
            Fault::RevokeLease => "revoke leader lease",
            Fault::StoreRestart => "store restart",
            Fault::MemberLoss => "etcd member loss",
            Fault::MemberPartition => "etcd member partition 2xTTL",
            Fault::MasterFailover => "redis master failover",
            Fault::ClockForwardPartition => "clock +TTL/2, partition",
            Fault::ClockBackKill => "clock -TTL/2, sigkill",
        }
    }

    /// The store clock steps, in order (forward, then back to the true time).
    pub fn clock_steps() -> Vec<Fault> {
        vec![Fault::ClockForwardPartition, Fault::ClockBackKill]
    }

    /// A name without spaces, for the results' figure keys.
    pub fn key(self) -> String {
        self.name()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect::<String>()
            .split('_')
            .filter(|part| !part.is_empty())
            .collect::<Vec<_>>()
            .join("_")
    }

    /// A few letters, for the timeline's fault marks.
    pub fn short(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Term => "term",
            Fault::Stop => "stop",
            Fault::ShortPause => "pause",
            Fault::Partition => "part",
            Fault::LostAnswers => "lost",
            Fault::Latency => "slow",
            Fault::SlowAnswersThenPartition => "late+part",
            Fault::WaiterKill => "w-kill",
            Fault::WaiterPartition => "w-part",
            Fault::DeleteKey => "del",
            Fault::RevokeLease => "revoke",
            Fault::StoreRestart => "restart",
            Fault::MemberLoss => "member",
            Fault::MemberPartition => "m-part",
            Fault::MasterFailover => "failover",
            Fault::ClockForwardPartition => "clock+",
            Fault::ClockBackKill => "clock-",
        }
    }

    /// Every kind `backend` supports, in the order a run cycles through them.
    pub fn all(backend: StoreKind) -> Vec<Fault> {
        let mut faults = vec![
            Fault::SlowAnswersThenPartition,
            Fault::Kill,
            Fault::Term,
            Fault::Stop,
            Fault::ShortPause,
            Fault::Partition,
            Fault::LostAnswers,
            Fault::Latency,
            Fault::WaiterKill,
            Fault::WaiterPartition,
            Fault::DeleteKey,
            Fault::StoreRestart,
        ];
        if backend == StoreKind::Etcd {
            faults.push(Fault::RevokeLease);
            faults.push(Fault::MemberLoss);
            faults.push(Fault::MemberPartition);
        }
        faults
    }

    /// Whether a new leader must be elected (the leader was taken away), or only some
    /// leader must exist afterwards.
    pub fn fails_over(self) -> bool {
        !matches!(
            self,
            Fault::ShortPause
                | Fault::Latency
                | Fault::WaiterKill
                | Fault::WaiterPartition
                | Fault::StoreRestart
                | Fault::MasterFailover
        )
    }

    /// Whether the fault tampers with the store behind the candidates' backs.
    pub fn tampers(self) -> bool {
        matches!(self, Fault::DeleteKey | Fault::RevokeLease)
    }

    /// How long the answers are slowed before the partition of
    /// [`SlowAnswersThenPartition`](Fault::SlowAnswersThenPartition), and by how much:
    /// long enough for a renewal to be sent and answered late whatever the phase.
    pub(crate) fn slow_answers(ttl: Duration) -> (Duration, Duration) {
        let delay = ttl / 5;
        (ttl / 3 + delay + ttl / 10, delay)
    }

    /// How long after the fault a (new) leader must be there. A crash costs the TTL plus
    /// the store's expiry sweep (etcd checks leases twice a second; Redis expires keys
    /// within 100 ms) plus a second; a graceful handover under a second.
    pub fn bound(self, backend: StoreKind, ttl: Duration) -> Duration {
        let second = Duration::from_secs(1);
        let sweep = match backend {
            StoreKind::Etcd => Duration::from_millis(500),
            StoreKind::Redis | StoreKind::Postgres => Duration::from_millis(100),
        };
        match self {
            Fault::Term | Fault::RevokeLease => second,
            // Redis does not announce a DEL, nor PostgreSQL a DELETE by hand: the
            // waiters' timers are set to the key's expiry, up to a TTL away.
            Fault::DeleteKey => match backend {
                StoreKind::Etcd => second,
                StoreKind::Redis | StoreKind::Postgres => ttl + second,
            },
            Fault::Kill
            | Fault::Stop
            | Fault::Partition
            | Fault::MemberLoss
            | Fault::ClockForwardPartition => ttl + sweep + second,
            // The isolated member loses its quorum within an election timeout (100 ms in
            // the tests); a new raft leader extends every lease to its full TTL once.
            Fault::MemberPartition => ttl + ttl / 5 + sweep + second,
            Fault::ClockBackKill => ttl + ttl / 2 + sweep + second,
            Fault::SlowAnswersThenPartition => Self::slow_answers(ttl).0 + ttl + sweep + second,
            // The renewals that land keep the key alive until the leader's withdrawal, or
            // (Redis, whose withdrawal must read first) its expiry, lands.
            Fault::LostAnswers => ttl * 2 + sweep + second,
            Fault::ShortPause | Fault::Latency => ttl + sweep + second,
            Fault::WaiterKill | Fault::WaiterPartition => second,
            Fault::StoreRestart => Duration::from_secs(15),
            // Measured from the old master's return as a replica in sync: the promoted
            // replica holds every acknowledged term.
            Fault::MasterFailover => ttl + sweep + second,
        }
    }

    /// Whether the faulted candidate was the leader and must campaign again (or still
    /// lead) once the fault is over.
    pub fn heals_leader(self) -> bool {
        matches!(
            self,
            Fault::Stop
                | Fault::ShortPause
                | Fault::Partition
                | Fault::LostAnswers
                | Fault::Latency
                | Fault::SlowAnswersThenPartition
                | Fault::ClockForwardPartition
                | Fault::MemberPartition
        )
    }
}

/// How many phase bins the renewal interval is cut into (the soak covers each fault kind
/// in every one).
pub const PHASE_BINS: usize = 5;

/// The phase at which the `occurrence`-th fault of a kind is aimed, as a fraction of the
/// renewal interval after the leader's last renewal: the bins in turn, and within a bin a
/// point that moves from one pass to the next (the golden ratio's fractional part).
pub fn target_phase(occurrence: usize) -> f64 {
    let bin = occurrence % PHASE_BINS;
    let within = ((occurrence / PHASE_BINS) as f64 * 0.618_033_988_749_895 + 0.5).fract();
    (bin as f64 + within) / PHASE_BINS as f64
}

/// The bin of a phase (a fraction of the renewal interval); none past the interval (a
/// renewal overdue: the fault hit no bin of a regular interval).
pub fn phase_bin(phase: f64) -> Option<usize> {
    let bin = (phase.max(0.0) * PHASE_BINS as f64) as usize;
    (bin < PHASE_BINS).then_some(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_cover_every_bin_in_turn() {
        let bins: Vec<Option<usize>> = (0..10).map(|i| phase_bin(target_phase(i))).collect();
        let expected: Vec<Option<usize>> = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4].map(Some).to_vec();
        assert_eq!(bins, expected);
        assert_eq!(phase_bin(1.2), None);
        assert!((0..100).all(|i| (0.0..1.0).contains(&target_phase(i))));
        assert_eq!(
            Fault::SlowAnswersThenPartition.key(),
            "slow_answers_partition"
        );
        assert_eq!(Fault::Stop.key(), "sigstop_leader_1_5xTTL");
    }
}
