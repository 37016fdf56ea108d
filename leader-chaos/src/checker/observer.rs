//! The observer's view of the store (the `chaos-observer` binary), compared with what the
//! candidates logged of the election it watches (election 0).

use std::io::{self, BufRead};
use std::path::Path;

use super::ProcessLog;

/// The observer's view of the store, compared with the candidates' logs.
#[derive(Debug, Default)]
pub struct Observed {
    /// Leader changes the observer saw.
    pub changes: usize,
    /// Times the observed leader's token went down: the store elected an older term after
    /// a newer one (a violation).
    pub backwards: Vec<String>,
    /// Terms some candidate led that the observer never saw (shorter than its round trip).
    pub unseen_terms: usize,
    /// Tokens the observer saw that no candidate logged: a campaign whose answer was lost
    /// after its effect landed (the key expires, or is withdrawn, unnoticed).
    pub unknown_tokens: Vec<u64>,
}

impl Observed {
    /// Whether the observer's view is consistent with the candidates'.
    pub fn passed(&self) -> bool {
        self.backwards.is_empty()
    }
}

/// Reads the observer's log: (token or none, when) per change.
pub fn read_observer_log(path: &Path) -> io::Result<Vec<(Option<u64>, u64)>> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut seen = Vec::new();
    for line in io::BufReader::new(file).lines() {
        let line = line?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["o", token, at] => {
                let at = at.parse().map_err(|_| bad_line(&line))?;
                let token = match *token {
                    "-" => None,
                    token => Some(token.parse().map_err(|_| bad_line(&line))?),
                };
                seen.push((token, at));
            }
            _ => return Err(bad_line(&line)),
        }
    }
    Ok(seen)
}

fn bad_line(line: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("observer log: {line:?}"),
    )
}

/// Compares what the observer saw with what the candidates logged.
pub fn compare_observer(observed: &[(Option<u64>, u64)], logs: &[ProcessLog]) -> Observed {
    let logged: std::collections::BTreeSet<u64> = logs
        .iter()
        .flat_map(|log| log.terms_of(0).map(|t| t.token))
        .collect();
    let seen: std::collections::BTreeSet<u64> =
        observed.iter().filter_map(|(token, _)| *token).collect();
    let mut result = Observed {
        changes: observed.len(),
        unseen_terms: logged.difference(&seen).count(),
        unknown_tokens: seen.difference(&logged).copied().collect(),
        ..Observed::default()
    };
    let mut highest: Option<u64> = None;
    for &(token, at) in observed {
        let Some(token) = token else { continue };
        if let Some(high) = highest
            && token < high
        {
            result.backwards.push(format!(
                "the store showed term {token} at {at}, after term {high}"
            ));
        }
        highest = highest.max(Some(token));
    }
    result
}
