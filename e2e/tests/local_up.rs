//! `cairn local up`: a whole cluster on this machine, started, used, stopped with Ctrl-C and
//! started again over the same data.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::{binary, free_port};

struct LocalUp {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl LocalUp {
    fn start(dir: &std::path::Path, port: u16, etcd_port: u16) -> Self {
        let mut child = Command::new(binary("cairn"))
            .args(["local", "up", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/local.yaml")])
            .arg("--dir")
            .arg(dir)
            .args(["--port", &port.to_string(), "--etcd-port", &etcd_port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self { child, lines }
    }

    fn wait_for(&self, needle: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(90))
                .unwrap_or_else(|_| panic!("no {needle:?} in {seen:?}"));
            let done = line.contains(needle);
            seen.push(line);
            if done {
                return seen;
            }
        }
    }

    /// Ctrl-C; it must stop everything and exit cleanly.
    fn interrupt(mut self) {
        assert!(Command::new("kill").args(["-INT", &self.child.id().to_string()]).status().unwrap().success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "cairn local up exited with {status}");
    }
}

#[test]
fn local_up_serves_stops_on_ctrl_c_and_restarts_over_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let (port, etcd_port) = (free_port(), free_port());
    let up = LocalUp::start(dir.path(), port, etcd_port);
    let output = up.wait_for(": ready");
    up.wait_for("Blob API");
    assert!(output.iter().any(|l| l.contains("starting")), "{output:?}");

    let client = reqwest::blocking::Client::new();
    let r = client.post(format!("http://127.0.0.1:{port}/v1/blobs")).body("kept across restarts").send().unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<serde_json::Value>().unwrap()["id"].as_str().unwrap().to_owned();
    let read = |p: u16| client.get(format!("http://127.0.0.1:{p}/v1/blobs/{id}")).send().unwrap().text().unwrap();
    assert_eq!(read(port + 2), "kept across restarts", "every datanode serves every blob");
    up.interrupt();
    for p in [port, port + 1, port + 2, etcd_port] {
        assert!(std::net::TcpStream::connect(("127.0.0.1", p)).is_err(), "port {p} still open after Ctrl-C");
    }

    let up = LocalUp::start(dir.path(), port, etcd_port);
    up.wait_for(": ready");
    assert_eq!(read(port + 1), "kept across restarts");
    up.interrupt();
}
