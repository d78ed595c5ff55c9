//! Runs real `cairn-datanode` processes for tests.

#![allow(dead_code)]

pub mod s3;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Datanode {
    pub addr: String,
    pub data_dir: PathBuf,
    extra: Vec<String>,
    /// Environment of the process beyond the root key (e.g. FAILPOINTS), at every (re)start.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    /// Serves HTTPS: ready once its port takes connections.
    tls: bool,
}

/// A blocking client that authenticates with the test key (every node here has it as root key).
pub fn client() -> reqwest::blocking::Client {
    client_builder().build().unwrap()
}

pub fn client_builder() -> reqwest::blocking::ClientBuilder {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, cairn_testkit::keys::authorization().parse().unwrap());
    reqwest::blocking::Client::builder().default_headers(headers)
}

pub fn free_port() -> u16 {
    cairn_testkit::ports::free_port()
}

impl Datanode {
    pub fn start(data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_with(data_dir, extra, false, &[])
    }

    /// A node started with more environment (kept for restarts: clear `env` to drop it).
    pub fn start_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_with(data_dir, extra, false, env)
    }

    /// A node started with `--tls-cert`/`--tls-key` among `extra`.
    pub fn start_tls(data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_with(data_dir, extra, true, &[])
    }

    fn start_with(data_dir: &Path, extra: &[&str], tls: bool, env: &[(&str, &str)]) -> Self {
        let mut node = Self {
            addr: format!("127.0.0.1:{}", free_port()),
            data_dir: data_dir.to_owned(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            child: None,
            tls,
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.data_dir.with_extension("log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cairn-datanode"))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(&self.addr)
            .envs(cairn_testkit::keys::root_key_env())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .args(&self.extra)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = reqwest::blocking::Client::new();
        loop {
            if self.tls {
                if std::net::TcpStream::connect(&self.addr).is_ok() {
                    return;
                }
            } else if let Ok(r) = client.get(self.url("/healthz")).send() {
                if r.status().is_success() {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let log = std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default();
                panic!("datanode exited with {status}:\n{log}");
            }
            assert!(Instant::now() < deadline, "datanode did not become healthy");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// A line of /proc/PID/status in KiB (VmRSS: resident now, VmHWM: the peak).
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// SIGTERM, then how long the process took to exit (at most `limit`, else it is killed).
    pub fn stop_timed(&mut self, limit: Duration) -> Option<Duration> {
        let mut child = self.child.take()?;
        let started = Instant::now();
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        while started.elapsed() < limit {
            if child.try_wait().unwrap().is_some() {
                return Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM and wait: the clean shutdown path.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait().unwrap();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Waits for a process that ends by itself (a failpoint's abort); its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < limit, "the datanode did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none());
        self.spawn();
    }
}

impl Drop for Datanode {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[allow(unused_imports)]
pub use cairn_testkit::payload;

/// PUTs blobs of `size` bytes until one is refused with `refused` (any other answer fails the
/// test, and so do `bound` stored blobs); how many were stored.
pub fn put_until_refused(
    client: &reqwest::blocking::Client,
    node: &Datanode,
    size: usize,
    refused: reqwest::StatusCode,
    bound: usize,
) -> usize {
    let mut stored = 0;
    loop {
        let r = client.post(node.url("/v1/blobs")).body(vec![9u8; size]).send().unwrap();
        match r.status() {
            reqwest::StatusCode::CREATED => stored += 1,
            status if status == refused => return stored,
            other => panic!("unexpected {other}: {}", r.text().unwrap()),
        }
        assert!(stored < bound, "blobs of {size} bytes never stopped");
    }
}
