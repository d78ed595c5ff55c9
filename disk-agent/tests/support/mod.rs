//! The disk agent as a process, and its scan command; devices come from cairn_testkit::machine.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use cairn_testkit::machine::{du, sh, statvfs, Machine};

/// A `cairn-disk-agent serve` process; killed when dropped.
pub struct AgentProcess {
    child: Child,
    /// The datanodes' socket.
    pub socket: PathBuf,
    /// The admin socket.
    pub admin_socket: PathBuf,
    args: Vec<String>,
}

impl AgentProcess {
    pub fn start(machine: &Machine, config: &Path) -> Self {
        let socket = machine.path("agent.sock");
        let admin_socket = machine.path("agent-admin.sock");
        let args = vec![
            "serve".to_string(),
            "--mountinfo".into(),
            "/proc/self/mountinfo".into(),
            "--config".into(),
            config.display().to_string(),
            "--state-dir".into(),
            machine.path("state").display().to_string(),
            "--node-name".into(),
            "test-node".into(),
            "--socket".into(),
            socket.display().to_string(),
            "--admin-socket".into(),
            admin_socket.display().to_string(),
            "--kubernetes".into(),
            "off".into(),
        ];
        let mut agent = Self { child: spawn(&args), socket, admin_socket, args };
        agent.wait_ready();
        agent
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.admin_socket).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("agent exited: {status}");
            }
            assert!(Instant::now() < deadline, "agent did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn restart(&mut self) {
        self.child = spawn(&self.args);
        self.wait_ready();
    }

    /// A client of the admin socket (everything allowed).
    pub fn client(&self) -> cairn_common::agent_client::AgentClient {
        cairn_common::agent_client::AgentClient::new(&self.admin_socket)
    }

    /// A client of the node socket, as a datanode of `cluster` holding `token`.
    pub fn node_client(&self, cluster: &str, token: &str) -> cairn_common::agent_client::AgentClient {
        cairn_common::agent_client::AgentClient::new(&self.socket).as_cluster(cluster, token)
    }
}

fn spawn(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cairn-disk-agent"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `cairn-disk-agent scan -o json` with this config: the report.
pub fn scan(machine: &Machine, config: &Path) -> cairn_common::agent_api::NodeReport {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-disk-agent"))
        .args(["scan", "-o", "json", "--mountinfo", "/proc/self/mountinfo", "--config"])
        .arg(config)
        .arg("--state-dir")
        .arg(machine.path("state"))
        .output()
        .unwrap();
    assert!(out.status.success(), "scan failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `cairn-disk-agent scan` (the table) with this config, with `--all` if asked.
pub fn scan_table(machine: &Machine, config: &Path, all: bool) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cairn-disk-agent"));
    command.args(["scan", "--mountinfo", "/proc/self/mountinfo", "--config"]).arg(config);
    command.arg("--state-dir").arg(machine.path("state"));
    if all {
        command.arg("--all");
    }
    let out = command.output().unwrap();
    assert!(out.status.success(), "scan failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}
