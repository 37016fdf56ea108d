//! [`PostgresServer`]: `initdb` and `postgres`, as the `postgres` system user when root.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{Process, START_TIMEOUT, free_port, require_binary, wait_for_port};
use crate::secure::Certificates;

/// Finds a PostgreSQL server binary (`initdb`, `postgres`) on the `PATH` or in Debian's
/// `/usr/lib/postgresql/<version>/bin` (newest version first).
fn postgres_binary(binary: &str) -> io::Result<PathBuf> {
    if let Ok(found) = require_binary(binary, "postgresql") {
        return Ok(found);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let path = entry.path().join("bin").join(binary);
            path.is_file().then_some((version, path))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, path)| path).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "`{binary}` is not installed (not on the PATH nor in /usr/lib/postgresql/*/bin); \
                 install it with: sudo apt-get install -y postgresql (or run ci/test as root, \
                 which installs it)"
            ),
        )
    })
}

/// Whether this process runs as root (the owner of `/proc/self`).
fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// The uid and gid of system user `name`, from `/etc/passwd`.
fn system_user(name: &str) -> io::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.first() == Some(&name) && fields.len() > 3 {
                Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
            } else {
                None
            }
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "PostgreSQL refuses to run as root and there is no `{name}` system user \
                     (the Debian `postgresql` package creates it): sudo apt-get install -y postgresql"
                ),
            )
        })
}

/// A command for `program` that runs as the `postgres` system user when this process is
/// root (PostgreSQL refuses to run as root), as this user otherwise.
fn as_postgres_user(program: &Path) -> io::Result<Command> {
    if is_root() {
        system_user("postgres")?;
        let setpriv = require_binary("setpriv", "util-linux")?;
        let mut command = Command::new(setpriv);
        command
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(program);
        Ok(command)
    } else {
        Ok(Command::new(program))
    }
}

/// A PostgreSQL server (`initdb` into a temporary directory, then `postgres`) on a free
/// loopback port, its unix socket in the same directory, superuser `postgres` with trust
/// authentication. When the test runs as root, both run as the `postgres` system user.
///
/// The server runs in a process group of its own, so that [`kill`](Self::kill) and
/// [`pause`](Self::pause) reach every backend, not only the postmaster.
#[derive(Debug)]
pub struct PostgresServer {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    log: PathBuf,
    settings: Vec<String>,
    process: Process,
}

impl PostgresServer {
    /// Runs `initdb` and starts `postgres`; returns once it accepts connections.
    pub fn start() -> io::Result<Self> {
        Self::start_with(&[])
    }

    /// [`start`](Self::start), with extra server settings (`name=value`, each passed as
    /// `-c`), e.g. `shared_preload_libraries=pg_stat_statements`.
    pub fn start_with(settings: &[&str]) -> io::Result<Self> {
        Self::start_full(settings, None)
    }

    /// [`start`](Self::start) with TLS on (`ssl=on`, the server certificate of `certs`);
    /// clients may still connect without it.
    pub fn start_tls(certs: &Certificates) -> io::Result<Self> {
        Self::start_full(&[], Some(certs))
    }

    fn start_full(settings: &[&str], tls: Option<&Certificates>) -> io::Result<Self> {
        let mut settings: Vec<String> = settings.iter().map(|s| (*s).to_owned()).collect();
        let initdb = postgres_binary("initdb")?;
        postgres_binary("postgres")?;
        let dir = tempfile::Builder::new().prefix("leader-pg-").tempdir()?;
        if let Some(certs) = tls {
            // PostgreSQL wants its key readable by its own user only.
            let cert = dir.path().join("server.pem");
            let key = dir.path().join("server.key");
            std::fs::copy(certs.server_cert(), &cert)?;
            std::fs::copy(certs.server_key(), &key)?;
            let mut permissions = std::fs::metadata(&key)?.permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o600);
            std::fs::set_permissions(&key, permissions)?;
            if is_root() {
                let (uid, gid) = system_user("postgres")?;
                std::os::unix::fs::chown(&cert, Some(uid), Some(gid))?;
                std::os::unix::fs::chown(&key, Some(uid), Some(gid))?;
            }
            settings.push("ssl=on".to_owned());
            settings.push(format!("ssl_cert_file={}", cert.display()));
            settings.push(format!("ssl_key_file={}", key.display()));
        }
        if is_root() {
            let (uid, gid) = system_user("postgres")?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        let log = dir.path().join("postgres.log");
        let initdb_log = dir.path().join("initdb.log");
        let status = as_postgres_user(&initdb)?
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])
            .args(["--locale", "C"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&initdb_log)?)
            .stderr(std::fs::File::create(dir.path().join("initdb.err"))?)
            .status()?;
        if !status.success() {
            let err = std::fs::read_to_string(dir.path().join("initdb.err")).unwrap_or_default();
            return Err(io::Error::other(format!("initdb failed ({status}): {err}")));
        }
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let process = Self::spawn(addr, dir.path(), &log, &settings)?;
        let mut server = PostgresServer {
            addr,
            dir,
            log,
            settings,
            process,
        };
        server.wait(0)?;
        Ok(server)
    }

    fn spawn(addr: SocketAddr, dir: &Path, log: &Path, settings: &[String]) -> io::Result<Process> {
        use std::os::unix::process::CommandExt;
        let postgres = postgres_binary("postgres")?;
        let mut command = as_postgres_user(&postgres)?;
        command
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-p", &addr.port().to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.display()))
            .args(["-c", "shared_buffers=16MB", "-c", "max_connections=100"])
            .args(["-c", "fsync=off", "-c", "log_min_messages=warning"])
            .process_group(0);
        for setting in settings {
            command.arg("-c").arg(setting);
        }
        // Appends, so that the log of every run stays.
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()?;
        Ok(Process { child: Some(child) })
    }

    /// Waits until the server started last accepts connections: it listens, and has
    /// written "ready to accept connections" to its log after byte `from`.
    fn wait(&mut self, from: usize) -> io::Result<()> {
        let child = self.process.child()?;
        wait_for_port(self.addr, child, "postgres", &self.log)?;
        let start = Instant::now();
        loop {
            let log = std::fs::read(&self.log).unwrap_or_default();
            let tail = String::from_utf8_lossy(log.get(from..).unwrap_or_default());
            if tail.contains("ready to accept connections") {
                return Ok(());
            }
            if let Some(status) = self.process.child()?.try_wait()? {
                return Err(io::Error::other(format!(
                    "postgres exited with {status}: {tail}"
                )));
            }
            if start.elapsed() > START_TIMEOUT {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("postgres was not ready within {START_TIMEOUT:?}: {tail}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `postgres://postgres@127.0.0.1:port/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@{}/postgres", self.addr)
    }

    /// The URL of the same server for `user` with `password`.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("postgres://{user}:{password}@{}/postgres", self.addr)
    }

    /// The server's TCP address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The directory of the server's unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Process id of the postmaster (also its process group), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Sends `signal` to the postmaster and every backend (the whole process group).
    pub fn signal_all(&self, signal: &str) -> io::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| io::Error::other("postgres is not running"))?;
        let status = Command::new("kill")
            .args([format!("-{signal}"), "--".to_owned(), format!("-{pid}")])
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "kill -{signal} -{pid} failed: {status}"
            )))
        }
    }

    /// Stops every process of the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) -> io::Result<()> {
        self.signal_all("STOP")
    }

    /// Resumes a paused server (SIGCONT).
    pub fn resume(&self) -> io::Result<()> {
        self.signal_all("CONT")
    }

    /// Kills the postmaster and every backend (SIGKILL). Committed rows survive (crash
    /// recovery replays the WAL on [`restart`](Self::restart)).
    pub fn kill(&mut self) {
        let _ = self.signal_all("CONT");
        let _ = self.signal_all("KILL");
        self.process.kill();
    }

    /// Starts the server again on the same port and data directory (after killing it if
    /// it runs), and waits until it accepts connections.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        let from = std::fs::metadata(&self.log).map_or(0, |m| m.len() as usize);
        let start = Instant::now();
        loop {
            self.process = Self::spawn(self.addr, self.dir.path(), &self.log, &self.settings)?;
            match self.wait(from) {
                Ok(()) => return Ok(()),
                // The old backends may still hold the shared memory or the port for a moment.
                Err(err) if start.elapsed() < START_TIMEOUT => {
                    self.process.kill();
                    let _ = err;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(err) => return Err(err),
            }
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.kill();
    }
}
