//! Child processes of the servers: free ports, binaries, waiting for a port, killing and
//! signalling.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to accept connections after it starts.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A free loopback port: bound, read, released. Another process could take it in between;
/// servers that fail to bind say so in the error of their start.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Fails with an install hint when `binary` is not on the `PATH`.
pub fn require_binary(binary: &str, package: &str) -> io::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "`{binary}` is not installed; install it with: sudo apt-get install -y {package} \
                     (or run ci/test as root, which installs it)"
                ),
            )
        })
}

/// `start`, again (up to five times) while it fails because a port that was free when
/// chosen was taken before the server bound it.
pub(crate) fn retry_taken_ports<T>(mut start: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut attempt = 1;
    loop {
        match start() {
            Err(err)
                if attempt < 5
                    && err
                        .to_string()
                        .to_ascii_lowercase()
                        .contains("address already in use") =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Waits until something accepts TCP connections on `addr`, or `child` exits.
pub(crate) fn wait_for_port(
    addr: SocketAddr,
    child: &mut Child,
    what: &str,
    log: &Path,
) -> io::Result<()> {
    let start = Instant::now();
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let output = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = output.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(io::Error::other(format!(
                "{what} exited with {status} before listening on {addr}:\n{}",
                tail.join("\n")
            )));
        }
        if start.elapsed() > START_TIMEOUT {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what} did not listen on {addr} within {START_TIMEOUT:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub(crate) struct Process {
    pub(crate) child: Option<Child>,
}

impl Process {
    pub(crate) fn spawn(command: &mut Command, log: &Path) -> io::Result<Self> {
        let log_file = std::fs::File::create(log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()?;
        Ok(Process { child: Some(child) })
    }

    pub(crate) fn child(&mut self) -> io::Result<&mut Child> {
        self.child
            .as_mut()
            .ok_or_else(|| io::Error::other("process already stopped"))
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`.
    pub(crate) fn terminate(&mut self, grace: Duration) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let start = Instant::now();
            while start.elapsed() < grace {
                if let Some(child) = self.child.as_mut()
                    && matches!(child.try_wait(), Ok(Some(_)))
                {
                    self.child = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `signal` (e.g. `"STOP"`, `"CONT"`, `"KILL"`, or with its `SIG` prefix) to
/// process `pid`, with the `kill` system call: at once, so that what a benchmark times
/// from here starts with the signal, not with starting a `kill` program (a fork and an
/// exec, a millisecond or two on a busy machine).
pub fn signal(pid: u32, signal: &str) -> io::Result<()> {
    let name = if signal.starts_with("SIG") {
        signal.to_owned()
    } else {
        format!("SIG{signal}")
    };
    let sig: nix::sys::signal::Signal = name
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("no signal {signal}")))?;
    let pid = i32::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("no process {pid}")))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
        .map_err(|errno| io::Error::other(format!("kill -{signal} {pid} failed: {errno}")))
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn signals_reach_the_process_by_either_name_and_bad_names_are_refused() {
        for name in ["TERM", "SIGKILL"] {
            let mut child = Command::new("sleep")
                .arg("30")
                .spawn()
                .expect("sleep starts");
            signal(child.id(), name).expect("signalled");
            let status = child.wait().expect("sleep ends");
            let expected = if name == "TERM" { 15 } else { 9 };
            assert_eq!(status.signal(), Some(expected), "{name}: {status}");
        }
        let err = signal(std::process::id(), "NOPE").expect_err("no such signal");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
