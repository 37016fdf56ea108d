//! [`LineProcess`]: a child process whose stdout is read line by line, with deadlines.

use std::io;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// A child process (killed on drop) whose stdout lines arrive as they are printed.
#[derive(Debug)]
pub struct LineProcess {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl LineProcess {
    /// Spawns `command` with stdin closed and stdout piped; stderr is left as configured.
    pub fn spawn(command: &mut Command) -> io::Result<Self> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("stdout not piped"))?;
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(LineProcess { child, lines })
    }

    /// The next line, or `None` if there is none within `limit` (or stdout closed).
    pub async fn next_line(&mut self, limit: Duration) -> Option<String> {
        timeout(limit, self.lines.recv()).await.ok().flatten()
    }

    /// A line already printed and not yet read, without waiting.
    pub fn try_line(&mut self) -> Option<String> {
        self.lines.try_recv().ok()
    }

    /// Reads lines until one satisfies `wanted` and returns it; fails if none does within
    /// `limit` or stdout closes first.
    pub async fn wait_for_line(
        &mut self,
        limit: Duration,
        mut wanted: impl FnMut(&str) -> bool,
    ) -> io::Result<String> {
        let search = async {
            while let Some(line) = self.lines.recv().await {
                if wanted(&line) {
                    return Ok(line);
                }
            }
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the process closed its stdout",
            ))
        };
        timeout(limit, search).await.unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no such line within {limit:?}"),
            ))
        })
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends `signal` (`"TERM"`, `"INT"`, `"KILL"`, `"STOP"`, `"CONT"`).
    pub fn signal(&self, signal: &str) -> io::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| io::Error::other("the process has exited"))?;
        crate::process::signal(pid, signal)
    }

    /// Waits up to `limit` for the process to exit.
    pub async fn wait(&mut self, limit: Duration) -> io::Result<ExitStatus> {
        timeout(limit, self.child.wait()).await.unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("still running after {limit:?}"),
            ))
        })
    }
}
