//! [`RedisServer`]: one `redis-server` (or Sentinel), and how it is started.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::{Process, free_port, require_binary, retry_taken_ports, wait_for_port};
use crate::secure::Certificates;

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
