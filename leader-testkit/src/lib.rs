#![doc = include_str!("../README.md")]
//! Real store processes for tests, examples and benchmarks: `etcd` (one member or a
//! 3-member cluster), `redis-server` and PostgreSQL, each on free loopback ports with a data directory
//! of its own, killed and reaped on drop.
//!
//! A missing binary is an error that says how to install it: tests that need a server fail
//! loudly rather than skip.

mod lines;
mod secure;
mod topologies;

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use lines::LineProcess;
pub use secure::{Certificates, ROOT_PASSWORD, SecureEtcd, secure_etcd};
pub use topologies::{MASTER_NAME, RedisCluster, RedisSentinel};

/// How long a server may take to accept connections after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(30);

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
fn retry_taken_ports<T>(mut start: impl FnMut() -> io::Result<T>) -> io::Result<T> {
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
fn wait_for_port(addr: SocketAddr, child: &mut Child, what: &str, log: &Path) -> io::Result<()> {
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
struct Process {
    child: Option<Child>,
}

impl Process {
    fn spawn(command: &mut Command, log: &Path) -> io::Result<Self> {
        let log_file = std::fs::File::create(log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()?;
        Ok(Process { child: Some(child) })
    }

    fn child(&mut self) -> io::Result<&mut Child> {
        self.child
            .as_mut()
            .ok_or_else(|| io::Error::other("process already stopped"))
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`.
    fn terminate(&mut self, grace: Duration) {
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

/// Sends `signal` (e.g. `"STOP"`, `"CONT"`, `"KILL"`) to process `pid`.
pub fn signal(pid: u32, signal: &str) -> io::Result<()> {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "kill -{signal} {pid} failed: {status}"
        )))
    }
}

/// One etcd member.
#[derive(Debug)]
struct EtcdMember {
    name: String,
    client_addr: SocketAddr,
    peer_url: String,
    data_dir: PathBuf,
    log: PathBuf,
    process: Process,
}

/// etcd, one member or a cluster, on free loopback ports with temporary data directories.
///
/// Started with a 10ms heartbeat and 100ms election timeout, so that leases as short as one
/// second are granted as asked (etcd's minimum lease TTL is 1.5 election timeouts).
#[derive(Debug)]
pub struct EtcdServer {
    members: Vec<EtcdMember>,
    initial_cluster: String,
    /// Extra command-line arguments of every member (TLS, auth-token options).
    extra: Vec<String>,
    /// `https` when the members serve clients over TLS.
    scheme: &'static str,
    _dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts a single-member etcd.
    pub fn start() -> io::Result<Self> {
        Self::start_cluster(1)
    }

    /// Starts an etcd cluster of `size` members and waits until each accepts clients.
    pub fn start_cluster(size: usize) -> io::Result<Self> {
        Self::start_with(size, Vec::new(), "http")
    }

    /// Starts `size` members with `extra` arguments, serving clients with `scheme`; on
    /// free ports chosen again if another process took one first.
    pub(crate) fn start_with(
        size: usize,
        extra: Vec<String>,
        scheme: &'static str,
    ) -> io::Result<Self> {
        retry_taken_ports(|| Self::start_once(size, extra.clone(), scheme))
    }

    fn start_once(size: usize, extra: Vec<String>, scheme: &'static str) -> io::Result<Self> {
        require_binary("etcd", "etcd-server")?;
        let dir = tempfile::Builder::new().prefix("leader-etcd-").tempdir()?;
        let mut specs = Vec::new();
        for i in 0..size {
            let name = format!("m{i}");
            let client_addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
            let peer_url = format!("http://127.0.0.1:{}", free_port()?);
            specs.push((name, client_addr, peer_url));
        }
        let initial_cluster = specs
            .iter()
            .map(|(name, _, peer)| format!("{name}={peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (name, client_addr, peer_url) in specs {
            let data_dir = dir.path().join(&name);
            let log = dir.path().join(format!("{name}.log"));
            let process = Self::spawn_member(
                &name,
                client_addr,
                &peer_url,
                &data_dir,
                &log,
                &initial_cluster,
                "new",
                (&extra, scheme),
            )?;
            members.push(EtcdMember {
                name,
                client_addr,
                peer_url,
                data_dir,
                log,
                process,
            });
        }
        for member in &mut members {
            let child = member.process.child()?;
            wait_for_port(member.client_addr, child, "etcd", &member.log)?;
        }
        Ok(EtcdServer {
            members,
            initial_cluster,
            extra,
            scheme,
            _dir: dir,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_member(
        name: &str,
        client_addr: SocketAddr,
        peer_url: &str,
        data_dir: &Path,
        log: &Path,
        initial_cluster: &str,
        state: &str,
        (extra, scheme): (&[String], &str),
    ) -> io::Result<Process> {
        let client_url = format!("{scheme}://{client_addr}");
        Process::spawn(
            Command::new("etcd")
                .args(extra)
                .args(["--name", name])
                .arg("--data-dir")
                .arg(data_dir)
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", peer_url])
                .args(["--initial-advertise-peer-urls", peer_url])
                .args(["--initial-cluster", initial_cluster])
                .args(["--initial-cluster-state", state])
                .args(["--initial-cluster-token", "leader-testkit"])
                .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
                .args(["--log-level", "warn"]),
            log,
        )
    }

    /// Client endpoints (`127.0.0.1:port`), one per member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| m.client_addr.to_string())
            .collect()
    }

    /// Client address of member `i`.
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        self.members[i].client_addr
    }

    /// Process id of member `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].process.pid()
    }

    /// Kills member `i` (SIGKILL); its data directory stays for [`restart`](Self::restart).
    pub fn kill(&mut self, i: usize) {
        self.members[i].process.kill();
    }

    /// Stops member `i` gracefully (SIGTERM).
    pub fn stop(&mut self, i: usize) {
        self.members[i].process.terminate(Duration::from_secs(10));
    }

    /// Starts member `i` again on its data directory and ports, and waits until it listens.
    pub fn restart(&mut self, i: usize) -> io::Result<()> {
        let initial_cluster = self.initial_cluster.clone();
        let member = &mut self.members[i];
        let (extra, scheme) = (&self.extra, self.scheme);
        member.process.kill();
        member.process = Self::spawn_member(
            &member.name,
            member.client_addr,
            &member.peer_url,
            &member.data_dir,
            &member.log,
            &initial_cluster,
            "existing",
            (extra, scheme),
        )?;
        let child = member.process.child()?;
        wait_for_port(member.client_addr, child, "etcd", &member.log)
    }
}

/// A `redis-server` on a free loopback port with a temporary working directory.
#[derive(Debug)]
pub struct RedisServer {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    options: RedisOptions,
    log: PathBuf,
    process: Process,
}

/// How a [`RedisServer`] is started.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// `appendonly yes` and `appendfsync always` (else no persistence at all).
    pub persistent: bool,
    /// Serve TLS only (no plain port), with these certificates.
    pub tls: Option<Certificates>,
    /// More lines of `redis.conf` (`user …`, `cluster-enabled yes`, `replicaof …`).
    pub config: Vec<String>,
    /// Run as a Sentinel (`--sentinel`); `config` then holds its `sentinel …` lines.
    pub sentinel: bool,
}

impl RedisServer {
    /// Starts `redis-server` without persistence (no RDB, no AOF).
    pub fn start() -> io::Result<Self> {
        Self::start_with(RedisOptions::default())
    }

    /// Starts `redis-server` with `appendonly yes` and `appendfsync always`: a restart keeps
    /// every acknowledged write.
    pub fn start_persistent() -> io::Result<Self> {
        Self::start_with(RedisOptions {
            persistent: true,
            ..RedisOptions::default()
        })
    }

    /// Starts `redis-server` (or a Sentinel) with `options`, and waits until it listens;
    /// on a free port chosen again if another process took it first.
    pub fn start_with(options: RedisOptions) -> io::Result<Self> {
        retry_taken_ports(|| Self::start_once(options.clone()))
    }

    fn start_once(options: RedisOptions) -> io::Result<Self> {
        require_binary("redis-server", "redis-server")?;
        let dir = tempfile::Builder::new().prefix("leader-redis-").tempdir()?;
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let log = dir.path().join("redis.log");
        let process = Self::spawn(addr, dir.path(), &options, &log)?;
        let mut server = RedisServer {
            addr,
            dir,
            options,
            log,
            process,
        };
        server.wait()?;
        Ok(server)
    }

    fn spawn(
        addr: SocketAddr,
        dir: &Path,
        options: &RedisOptions,
        log: &Path,
    ) -> io::Result<Process> {
        // Sentinel rewrites its config file, so it must be one of its own; the same file
        // serves the other options' lines.
        let conf = dir.join("redis.conf");
        if !conf.exists() {
            let mut lines = options.config.clone();
            lines.push(String::new());
            std::fs::write(&conf, lines.join("\n"))?;
        }
        let port = addr.port().to_string();
        let mut command = Command::new("redis-server");
        command.arg(&conf);
        if options.sentinel {
            command.arg("--sentinel");
        }
        match &options.tls {
            Some(certs) => {
                command
                    .args(["--port", "0", "--tls-port", &port])
                    .arg("--tls-cert-file")
                    .arg(certs.server_cert())
                    .arg("--tls-key-file")
                    .arg(certs.server_key())
                    .arg("--tls-ca-cert-file")
                    .arg(certs.ca())
                    .args(["--tls-auth-clients", "optional"]);
            }
            None => {
                command.args(["--port", &port]);
            }
        }
        command
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir)
            .args(["--daemonize", "no"]);
        if !options.sentinel {
            command.args(["--save", ""]);
            if options.persistent {
                command.args(["--appendonly", "yes", "--appendfsync", "always"]);
            } else {
                command.args(["--appendonly", "no"]);
            }
        }
        Process::spawn(&mut command, log)
    }

    fn wait(&mut self) -> io::Result<()> {
        let child = self.process.child()?;
        wait_for_port(self.addr, child, "redis-server", &self.log)
    }

    /// `redis://127.0.0.1:port` (`rediss://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.options.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// The server's log so far: what it said before a test failed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Kills the server (SIGKILL): what is not persisted is lost.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the server again on the same port and directory (so an AOF, if any, is
    /// replayed), and waits until it listens.
    pub fn restart(&mut self) -> io::Result<()> {
        self.process.kill();
        self.process = Self::spawn(self.addr, self.dir.path(), &self.options, &self.log)?;
        self.wait()
    }
}

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

/// One PostgreSQL server for a test, started off the async runtime. Panics with the command
/// that installs PostgreSQL when the binaries are missing (a test never skips).
pub async fn postgres() -> PostgresServer {
    tokio::task::spawn_blocking(PostgresServer::start)
        .await
        .expect("the start task ran")
        .expect("postgres starts (install it with: sudo apt-get install -y postgresql)")
}

/// One etcd member for a test, started off the async runtime. Panics with the command that
/// installs etcd when the binary is missing (a test never skips).
pub async fn etcd() -> EtcdServer {
    tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .expect("the start task ran")
        .expect("etcd starts (install it with: sudo apt-get install -y etcd-server)")
}

/// One redis-server for a test, started off the async runtime. Panics with the command that
/// installs Redis when the binary is missing (a test never skips).
pub async fn redis() -> RedisServer {
    tokio::task::spawn_blocking(RedisServer::start)
        .await
        .expect("the start task ran")
        .expect("redis-server starts (install it with: sudo apt-get install -y redis-server)")
}

/// `what` with a suffix no other test (or run) uses, for election names and key prefixes.
pub fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{what}-{:08x}-{n}", std::process::id() ^ nanos)
}
