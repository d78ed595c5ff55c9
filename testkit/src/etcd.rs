//! A real etcd (Debian's etcd-server) on free loopback ports with a temporary data directory.

use crate::ports::free_port;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct EtcdServer {
    child: Option<Child>,
    pub client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
    /// With TLS: client certificates required, PEM files under the data directory.
    tls: bool,
    /// The address it listens on (127.0.0.1 unless [`start_on`](Self::start_on)).
    host: String,
}

/// PEM files of a TLS etcd: the CA, and a client certificate and key it signed.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl EtcdServer {
    pub fn start() -> Self {
        Self::start_on("127.0.0.1")
    }

    /// Listening on `host` (e.g. a bridge address that Pods in network namespaces reach).
    pub fn start_on(host: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("cairn-etcd-").tempdir().unwrap();
        let mut server = Self {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            dir,
            tls: false,
            host: host.to_owned(),
        };
        server.restart();
        server
    }

    /// An etcd that speaks only TLS and wants client certificates (made with openssl here).
    pub fn start_tls() -> Self {
        let dir = tempfile::Builder::new().prefix("cairn-etcd-").tempdir().unwrap();
        let p = |name: &str| dir.path().join(name).display().to_string();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl").args(args).output().expect("openssl runs");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=cairn-test-ca",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.crt"),
        ]);
        std::fs::write(p("san.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n").unwrap();
        for name in ["server", "client"] {
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &p(&format!("{name}.key")),
                "-out",
                &p(&format!("{name}.csr")),
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &p(&format!("{name}.csr")),
                "-CA",
                &p("ca.crt"),
                "-CAkey",
                &p("ca.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &p("san.ext"),
                "-out",
                &p(&format!("{name}.crt")),
            ]);
        }
        let mut server = Self {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            dir,
            tls: true,
            host: "127.0.0.1".into(),
        };
        server.restart();
        server
    }

    /// The client certificate files of a TLS etcd.
    pub fn tls_files(&self) -> TlsFiles {
        let p = |name: &str| self.dir.path().join(name);
        TlsFiles { ca: p("ca.crt"), cert: p("client.crt"), key: p("client.key") }
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.client_port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts (again) on the same ports and data; waits until it answers.
    pub fn restart(&mut self) {
        let client = self.endpoint();
        let peer = format!("http://{}:{}", self.host, self.peer_port);
        let mut command = Command::new("etcd");
        command
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--name", "test", "--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")]);
        if self.tls {
            let p = |name: &str| self.dir.path().join(name);
            command
                .arg("--cert-file")
                .arg(p("server.crt"))
                .arg("--key-file")
                .arg(p("server.key"))
                .arg("--trusted-ca-file")
                .arg(p("ca.crt"))
                .arg("--client-cert-auth");
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd runs (Debian package etcd-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        // Over TLS, a listening port is the sign (the plain-HTTP health probe cannot speak TLS).
        let up = |port: u16| {
            if self.tls {
                std::net::TcpStream::connect((self.host.as_str(), port)).is_ok()
            } else {
                healthy(&self.host, port)
            }
        };
        while !up(self.client_port) {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// etcd answers `/health` on its client port.
fn healthy(host: &str, port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect((host, port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
