//! Reading what a candidate process logged (the `chaos-candidate` binary documents the
//! format).

use std::collections::BTreeMap;
use std::io::{self, BufRead, Read, Seek};
use std::path::Path;

/// Gaps over this long are kept, for the longest-gap figure.
const NOTED_GAP_NS: u64 = 2_000_000;

/// One term as one process logged it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TermLog {
    /// Which candidate process.
    pub process: usize,
    /// Which of the process's elections (0: the one the orchestrator drives and samples).
    pub election: usize,
    /// The term's fencing token.
    pub token: u64,
    /// The first instant of belief (`e` record), if logged.
    pub elected_ns: Option<u64>,
    /// The latest deadline logged (`e`, `d` and `x` records).
    pub last_deadline_ns: u64,
    /// How many deadlines the library's hook logged (`d` records).
    pub deadlines: usize,
    /// When the term ended (`x` record), if logged.
    pub ended_ns: Option<u64>,
    /// The term's final deadline (`x` record), if logged.
    pub final_deadline_ns: Option<u64>,
    /// The latest deadline the hook logged (`d` records only).
    pub hooked_deadline_ns: Option<u64>,
    /// "leader" samples of this term.
    pub samples: usize,
    /// (before, after) of the first and the last "leader" sample.
    pub first_sample: Option<(u64, u64)>,
    /// See `first_sample`.
    pub last_sample: Option<(u64, u64)>,
}

impl TermLog {
    /// The last instant of belief: the end, or the last deadline if that came first (or if
    /// the process was killed before it could log an end).
    pub fn belief_end_ns(&self) -> u64 {
        match self.ended_ns {
            Some(ended) => ended.min(self.last_deadline_ns),
            None => self.last_deadline_ns,
        }
    }
}

/// Everything one candidate process logged.
#[derive(Debug, Default)]
pub struct ProcessLog {
    /// Which candidate process.
    pub process: usize,
    /// Its terms, by (election, token).
    pub terms: BTreeMap<(usize, u64), TermLog>,
    /// Flips: a term that said "leader" again after a sample said "not leader".
    pub flips: Vec<String>,
    /// Gaps over 2 ms between two "leader" samples of one term, as (token, from, to): the
    /// ones over [`MAX_SAMPLE_GAP_NS`](super::MAX_SAMPLE_GAP_NS) may be violations, the
    /// others give the longest gap. Only election 0 is sampled.
    pub gaps: Vec<(u64, u64, u64)>,
    /// "leader" samples taken after the term's last instant of belief as its process
    /// logged it, as (token, sample's start).
    pub late_samples: Vec<(u64, u64)>,
    /// Lines that could not be read.
    pub unreadable: Vec<String>,
}

impl ProcessLog {
    /// The terms of one election.
    pub fn terms_of(&self, election: usize) -> impl Iterator<Item = &TermLog> {
        self.terms
            .range((election, 0)..=(election, u64::MAX))
            .map(|(_, term)| term)
    }
}

fn term(log: &mut ProcessLog, election: usize, token: u64) -> &mut TermLog {
    let process = log.process;
    log.terms
        .entry((election, token))
        .or_insert_with(|| TermLog {
            process,
            election,
            token,
            ..TermLog::default()
        })
}

/// Reads one process's log. A missing file is an empty log (the process never started);
/// an unparsable line is recorded, except a last line cut short (`torn_tail_ok`: the
/// process was killed).
pub fn read_log(process: usize, path: &Path, torn_tail_ok: bool) -> io::Result<ProcessLog> {
    let mut log = ProcessLog {
        process,
        ..ProcessLog::default()
    };
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(log),
        Err(err) => return Err(err),
    };
    let lines: Vec<String> = io::BufReader::new(file)
        .lines()
        .collect::<io::Result<_>>()?;
    // The token of the last "leader" sample, and whether a "not leader" one came after it.
    let mut last_leader: Option<(u64, u64)> = None;
    let mut not_leader_since: Option<u64> = None;
    let mut samples: Vec<(u64, u64)> = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let numbers: Option<Vec<u64>> = fields.iter().skip(1).map(|f| f.parse().ok()).collect();
        let record = match (fields.first().copied(), numbers.as_deref()) {
            (Some(kind), Some(numbers)) => Some((kind, numbers)),
            _ => None,
        };
        let election = |e: u64| usize::try_from(e).unwrap_or(usize::MAX);
        match record {
            Some(("e", &[e, token, elected, deadline])) => {
                let t = term(&mut log, election(e), token);
                t.elected_ns = Some(elected);
                t.last_deadline_ns = t.last_deadline_ns.max(deadline);
            }
            Some(("d", &[e, token, deadline])) => {
                let t = term(&mut log, election(e), token);
                t.last_deadline_ns = t.last_deadline_ns.max(deadline);
                t.hooked_deadline_ns = t.hooked_deadline_ns.max(Some(deadline));
                t.deadlines += 1;
            }
            Some(("x", &[e, token, ended, deadline])) => {
                let t = term(&mut log, election(e), token);
                t.ended_ns = Some(ended);
                t.final_deadline_ns = Some(deadline);
                t.last_deadline_ns = t.last_deadline_ns.max(deadline);
            }
            Some(("s", &[e, token, before, after])) => {
                let e = election(e);
                if not_leader_since.is_some() && last_leader.is_some_and(|(t, _)| t == token) {
                    log.flips.push(format!(
                        "process {process}: term {token} said \"leader\" again at {before} \
                         after \"not leader\""
                    ));
                }
                if let Some((last_token, last_after)) = last_leader
                    && last_token == token
                    && not_leader_since.is_none()
                    && before.saturating_sub(last_after) > NOTED_GAP_NS
                {
                    log.gaps.push((token, last_after, before));
                }
                let t = term(&mut log, e, token);
                t.samples += 1;
                t.first_sample.get_or_insert((before, after));
                t.last_sample = Some((before, after));
                samples.push((token, before));
                last_leader = Some((token, after));
                not_leader_since = None;
            }
            Some(("n", &[_e, before, _after])) => {
                not_leader_since = Some(before);
            }
            _ if index + 1 == lines.len() && torn_tail_ok => {}
            _ => log
                .unreadable
                .push(format!("process {process}, line {}: {line:?}", index + 1)),
        }
    }
    for (token, before) in samples {
        if let Some(t) = log.terms.get(&(0, token))
            && before > t.belief_end_ns()
        {
            log.late_samples.push((token, before));
        }
    }
    Ok(log)
}

/// The latest deadline that election 0's term `token` logged in the file at `path` (its
/// last renewal's, read from the file's tail while the process runs), if any.
pub fn last_deadline(path: &Path, token: u64) -> io::Result<Option<u64>> {
    const TAIL: u64 = 256 * 1024;
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(io::SeekFrom::Start(len.saturating_sub(TAIL)))?;
    let mut tail = String::new();
    // A tail may start inside a character: read bytes, keep what is text.
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    tail.push_str(&String::from_utf8_lossy(&bytes));
    let prefix = format!("d 0 {token} ");
    let entry = format!("e 0 {token} ");
    Ok(tail.lines().rev().find_map(|line| {
        if let Some(rest) = line.strip_prefix(&prefix) {
            rest.trim().parse().ok()
        } else {
            let rest = line.strip_prefix(&entry)?;
            rest.split_whitespace().nth(1)?.parse().ok()
        }
    }))
}
