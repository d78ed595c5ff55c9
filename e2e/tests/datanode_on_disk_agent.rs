//! A datanode process that gets its volumes from a disk agent process on a real loop device.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_common::agent_client::AgentClient;
use cairn_testkit::machine::Machine;

/// A binary of the workspace, built by `cargo build --workspace` (scripts/test.sh does).
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(path.exists(), "{} missing: run `cargo build --workspace` first", path.display());
    path
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "{what} did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_datanode(socket: &Path, addr: &str) -> Process {
    let child = Command::new(binary("cairn-datanode"))
        .args(["--disk-agent", socket.to_str().unwrap(), "--listen", addr, "--partitions", "2"])
        .args(["--volume-size", "64MiB", "--segment-size", "16MiB", "--max-blob-size", "1MiB"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let url = format!("http://{addr}/readyz");
    wait_for("datanode", || reqwest::blocking::get(&url).map(|r| r.status().is_success()).unwrap_or(false));
    Process(child)
}

#[test]
fn datanode_volumes_come_from_the_disk_agent() {
    let mut m = Machine::new();
    let dev = m.loop_fs("ext4", 256 << 20, "mkfs.ext4", &["-q", "-m", "0"]);
    let mount = m.mount(&dev, "disk", &[]);
    let socket = m.path("agent.sock");
    let _agent = Process(
        Command::new(binary("cairn-disk-agent"))
            .args(["serve", "--mountinfo", "/proc/self/mountinfo", "--kubernetes", "off", "--node-name", "n1"])
            .arg("--config")
            .arg(m.agent_config("headroom: 0%\n"))
            .arg("--state-dir")
            .arg(m.path("state"))
            .arg("--socket")
            .arg(&socket)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    wait_for("disk agent", || std::os::unix::net::UnixStream::connect(&socket).is_ok());

    let addr =
        format!("127.0.0.1:{}", std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port());
    let node = start_datanode(&socket, &addr);
    let http = reqwest::blocking::Client::new();
    let put = http.post(format!("http://{addr}/v1/blobs")).body(vec![7u8; 300_000]).send().unwrap();
    assert_eq!(put.status(), 201);
    let id = put.json::<serde_json::Value>().unwrap()["id"].as_str().unwrap().to_owned();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let agent = AgentClient::new(&socket);
    let volumes = rt.block_on(agent.list_volumes()).unwrap();
    let names: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, vec!["datanode-p0", "datanode-p1"]);
    assert!(volumes.iter().all(|v| v.path.starts_with(mount.to_str().unwrap())));
    let report = rt.block_on(agent.report()).unwrap();
    assert_eq!(report.disks[0].allocated_bytes, 128 << 20);

    // A restart asks again and gets the same volumes: nothing allocated twice, the blob is there.
    drop(node);
    let _node = start_datanode(&socket, &addr);
    assert_eq!(rt.block_on(agent.list_volumes()).unwrap(), volumes);
    let got = http.get(format!("http://{addr}/v1/blobs/{id}")).send().unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().unwrap().as_ref(), vec![7u8; 300_000].as_slice());
}
