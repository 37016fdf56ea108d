//! Stores with their security switched on: certificates made at test time, etcd with TLS
//! and authentication.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use crate::etcd::EtcdServer;
use crate::process::require_binary;

/// A CA, a server certificate for `127.0.0.1` and `localhost`, and a client certificate,
/// made with the `openssl` command into a temporary directory (P-256 keys: fast to make).
/// Cheap to clone: clones share the directory, removed when the last one drops.
#[derive(Debug, Clone)]
pub struct Certificates {
    dir: Arc<tempfile::TempDir>,
}

fn run(command: &mut Command, what: &str) -> io::Result<Output> {
    let output = command.output()?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(io::Error::other(format!(
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )))
    }
}

impl Certificates {
    /// Makes them.
    pub fn generate() -> io::Result<Self> {
        require_binary("openssl", "openssl")?;
        let dir = tempfile::Builder::new().prefix("leader-certs-").tempdir()?;
        let at = |name: &str| dir.path().join(name);
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(
            Command::new("openssl")
                .args(["req", "-x509"])
                .args(ec)
                .arg("-keyout")
                .arg(at("ca.key"))
                .arg("-out")
                .arg(at("ca.pem"))
                .args(["-days", "2", "-subj", "/CN=leader-testkit CA"])
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]),
            "openssl: the CA",
        )?;
        for (name, subject) in [("server", "/CN=localhost"), ("client", "/CN=leader-client")] {
            run(
                Command::new("openssl")
                    .arg("req")
                    .args(ec)
                    .arg("-keyout")
                    .arg(at(&format!("{name}.key")))
                    .arg("-out")
                    .arg(at(&format!("{name}.csr")))
                    .args(["-subj", subject]),
                "openssl: a certificate request",
            )?;
            std::fs::write(
                at(&format!("{name}.ext")),
                "basicConstraints=CA:FALSE\n\
                 keyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth,clientAuth\n\
                 subjectAltName=IP:127.0.0.1,DNS:localhost\n",
            )?;
            run(
                Command::new("openssl")
                    .args(["x509", "-req", "-days", "2"])
                    .arg("-in")
                    .arg(at(&format!("{name}.csr")))
                    .arg("-CA")
                    .arg(at("ca.pem"))
                    .arg("-CAkey")
                    .arg(at("ca.key"))
                    .arg("-CAcreateserial")
                    .arg("-extfile")
                    .arg(at(&format!("{name}.ext")))
                    .arg("-out")
                    .arg(at(&format!("{name}.pem"))),
                "openssl: signing a certificate",
            )?;
        }
        // Servers that drop privileges (none here yet) must still read them.
        for entry in std::fs::read_dir(dir.path())? {
            let path = entry?.path();
            let mut permissions = std::fs::metadata(&path)?.permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o644);
            std::fs::set_permissions(&path, permissions)?;
        }
        Ok(Certificates { dir: Arc::new(dir) })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA's certificate (PEM).
    pub fn ca(&self) -> PathBuf {
        self.file("ca.pem")
    }

    /// The server's certificate (PEM), for `127.0.0.1` and `localhost`.
    pub fn server_cert(&self) -> PathBuf {
        self.file("server.pem")
    }

    /// The server's key (PEM).
    pub fn server_key(&self) -> PathBuf {
        self.file("server.key")
    }

    /// The client's certificate (PEM).
    pub fn client_cert(&self) -> PathBuf {
        self.file("client.pem")
    }

    /// The client's key (PEM).
    pub fn client_key(&self) -> PathBuf {
        self.file("client.key")
    }

    /// `ca=…&cert=…&key=…`, for a store URL's query.
    pub fn query(&self) -> String {
        format!(
            "ca={}&cert={}&key={}",
            self.ca().display(),
            self.client_cert().display(),
            self.client_key().display()
        )
    }
}

/// One etcd member that serves clients over TLS only (client certificates required),
/// with authentication enabled, a `root` user, and a user `app` (password `app-pw`) whose
/// role `app` may read and write the keys under `app/` and nothing else.
#[derive(Debug)]
pub struct SecureEtcd {
    /// The member.
    pub server: EtcdServer,
    /// Its certificates and the client's.
    pub certs: Certificates,
}

/// The password of `root` in a [`SecureEtcd`].
pub const ROOT_PASSWORD: &str = "root-pw";

impl SecureEtcd {
    /// Starts it, with auth tokens that expire after `token_ttl_secs` seconds.
    pub fn start(token_ttl_secs: u32) -> io::Result<Self> {
        require_binary("etcdctl", "etcd-client")?;
        let certs = Certificates::generate()?;
        let path = |p: &Path| p.display().to_string();
        let extra = vec![
            "--cert-file".to_owned(),
            path(&certs.server_cert()),
            "--key-file".to_owned(),
            path(&certs.server_key()),
            "--trusted-ca-file".to_owned(),
            path(&certs.ca()),
            "--client-cert-auth".to_owned(),
            "--auth-token".to_owned(),
            "simple".to_owned(),
            "--auth-token-ttl".to_owned(),
            token_ttl_secs.to_string(),
        ];
        let server = EtcdServer::start_with(1, extra, "https")?;
        let etcd = SecureEtcd { server, certs };
        etcd.etcdctl(&["user", "add", &format!("root:{ROOT_PASSWORD}")])?;
        etcd.etcdctl(&["user", "grant-role", "root", "root"])?;
        etcd.etcdctl(&["role", "add", "app"])?;
        etcd.etcdctl(&[
            "role",
            "grant-permission",
            "app",
            "--prefix=true",
            "readwrite",
            "app/",
        ])?;
        etcd.etcdctl(&["user", "add", "app:app-pw"])?;
        etcd.etcdctl(&["user", "grant-role", "app", "app"])?;
        etcd.etcdctl(&["auth", "enable"])?;
        Ok(etcd)
    }

    /// Runs `etcdctl` against it over TLS (as `root` once auth is on), and returns its
    /// standard output.
    pub fn etcdctl(&self, args: &[&str]) -> io::Result<String> {
        let mut command = Command::new("etcdctl");
        command
            .env("ETCDCTL_API", "3")
            .arg(format!(
                "--endpoints=https://{}",
                self.server.client_addr(0)
            ))
            .arg("--cacert")
            .arg(self.certs.ca())
            .arg("--cert")
            .arg(self.certs.client_cert())
            .arg("--key")
            .arg(self.certs.client_key())
            .arg(format!("--user=root:{ROOT_PASSWORD}"))
            .args(args);
        // Before `auth enable`, etcd ignores the credentials.
        let output = run(&mut command, &format!("etcdctl {}", args.join(" ")))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `etcds://user:password@127.0.0.1:port/prefix?ca=…&cert=…&key=…`.
    pub fn url(&self, user: &str, password: &str, prefix: &str) -> String {
        format!(
            "etcds://{user}:{password}@{}/{prefix}?{}",
            self.server.client_addr(0),
            self.certs.query()
        )
    }
}

/// A [`SecureEtcd`] for a test, started off the async runtime.
pub async fn secure_etcd(token_ttl_secs: u32) -> SecureEtcd {
    tokio::task::spawn_blocking(move || SecureEtcd::start(token_ttl_secs))
        .await
        .expect("the start task ran")
        .expect("etcd with TLS and auth starts (needs etcd-server, etcd-client, openssl)")
}
