//! [`Failure`]: a Redis client error as this crate's errors carry it.

/// A Redis client error, printed on one line with each cause once: `redis::RedisError`
/// prints its cause's text and also returns that cause as its source (so a chain printed
/// whole says it twice), and some of its messages span lines. This one prints the client's
/// message on one line and returns the root cause as its source only when the message
/// does not already say it.
#[derive(Debug)]
pub(crate) struct Failure(pub(crate) redis::RedisError);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = self.0.to_string();
        let mut lines = text.lines().map(str::trim).filter(|line| !line.is_empty());
        if let Some(first) = lines.next() {
            f.write_str(first)?;
        }
        for line in lines {
            write!(f, "; {line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        let mut cause = std::error::Error::source(&self.0)?;
        while let Some(next) = cause.source() {
            cause = next;
        }
        (!self.to_string().contains(&cause.to_string())).then_some(cause)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leader_core::ErrorChain;

    #[test]
    fn an_io_error_is_said_once() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let err = leader_core::Error::store(Failure(redis::RedisError::from(io)));
        let chain = ErrorChain(&err).to_string();
        assert_eq!(chain.matches("refused").count(), 1, "{chain}");
        assert!(!chain.contains('\n'), "{chain}");
    }
}
