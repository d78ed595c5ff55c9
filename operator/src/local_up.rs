//! `cairn local up`: a whole cluster on this machine without Kubernetes — etcd and a disk agent
//! as child processes, one directory disk per local machine, and the operator's reconcile
//! through the Local platform starting the datanodes. A second start reuses everything.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cairn_resources::StoreCluster;

use crate::local::{LocalMachine, LocalPlatform};
use crate::platform::converge;

pub struct LocalOptions {
    /// Everything lives here: etcd's data, the disk agent's state, the machines' disks.
    pub dir: PathBuf,
    pub machines: usize,
    /// Quota of each machine's directory disk.
    pub disk_size: String,
    /// The first datanode's port; the others follow.
    pub port: u16,
    pub etcd_port: u16,
}

/// A child process stopped (TERM, then KILL) and reaped when dropped.
struct Supervised {
    name: &'static str,
    child: Child,
}

impl Drop for Supervised {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        tracing::warn!(process = self.name, "had to be killed");
    }
}

/// A binary next to this one (`cargo build` puts them together), else on PATH.
fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    for _ in 0..300 {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("{what} did not start within 30 s")
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<Stdio> {
    Ok(Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{name}.log")))?))
}

/// Runs until Ctrl-C (or SIGTERM), then stops everything.
pub async fn up(cluster: StoreCluster, options: LocalOptions) -> anyhow::Result<()> {
    let dir = &options.dir;
    std::fs::create_dir_all(dir.join("logs"))?;
    let logs = dir.join("logs");
    let name = cluster.metadata.name.clone().unwrap_or_else(|| "local".into());

    let etcd_url = format!("http://127.0.0.1:{}", options.etcd_port);
    let peer_url = format!("http://127.0.0.1:{}", options.etcd_port + 1);
    let etcd = Supervised {
        name: "etcd",
        child: Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.join("etcd"))
            .args(["--name", "local", "--listen-client-urls", &etcd_url, "--advertise-client-urls", &etcd_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("local={peer_url}")])
            .stdout(log_file(&logs, "etcd")?)
            .stderr(log_file(&logs, "etcd")?)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting etcd (Debian: apt-get install etcd-server): {e}"))?,
    };
    wait_for("etcd", || std::net::TcpStream::connect(("127.0.0.1", options.etcd_port)).is_ok())?;

    let mut config = String::from("selector:\n  fs_types: []\nheadroom: 0%\ndirectories:\n");
    let disk_dir = |i: usize| dir.join("disks").join(format!("m{i}"));
    for i in 0..options.machines {
        config += &format!("  - {{path: {}, capacity: {}}}\n", disk_dir(i).display(), options.disk_size);
    }
    std::fs::write(dir.join("disk-agent.yaml"), config)?;
    let socket = dir.join("disk-agent.sock");
    let agent = Supervised {
        name: "disk agent",
        child: Command::new(sibling("cairn-disk-agent"))
            .args(["serve", "--mountinfo", "/proc/self/mountinfo", "--kubernetes", "off", "--node-name", "local"])
            .arg("--config")
            .arg(dir.join("disk-agent.yaml"))
            .arg("--state-dir")
            .arg(dir.join("disk-agent-state"))
            .arg("--socket")
            .arg(&socket)
            .stdout(log_file(&logs, "disk-agent")?)
            .stderr(log_file(&logs, "disk-agent")?)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting cairn-disk-agent: {e}"))?,
    };
    wait_for("the disk agent", || std::os::unix::net::UnixStream::connect(&socket).is_ok())?;

    let machines: Vec<LocalMachine> = (0..options.machines)
        .map(|i| LocalMachine {
            name: format!("m{i}"),
            selected: true,
            zone: format!("zone-{i}"),
            agent_socket: socket.clone(),
            port: options.port + i as u16,
            disk_path: Some(disk_dir(i)),
        })
        .collect();
    let mut spec = cluster.spec.clone();
    spec.etcd.endpoints = vec![etcd_url.clone()];
    let mut platform = LocalPlatform::new(&name, "local", vec![etcd_url.clone()], sibling("cairn-datanode"), machines);
    platform.log_dir = Some(logs.clone());
    // The largest blob must fit in a segment (with its record's overhead).
    let segment = crate::desired::parse_size("segmentSize", &spec.segment_size).map_err(anyhow::Error::msg)?;
    platform.extra_args = vec!["--max-blob-size".into(), format!("{}", (segment / 2).min(64 << 20))];

    let mut announced = false;
    let mut last_phase = String::new();
    loop {
        let outcome = converge(&name, "local", &spec, &platform).await;
        let phase = match (&outcome.degraded, outcome.ready) {
            (Some((reason, message)), _) => format!("degraded ({reason}): {message}"),
            (None, true) => "ready".into(),
            (None, false) => format!(
                "starting: {}/{} datanodes, {} partitions under-replicated",
                outcome.status.nodes_ready, outcome.status.nodes_total, outcome.status.partitions.under_replicated
            ),
        };
        if phase != last_phase {
            println!("cluster {name}: {phase}");
            last_phase = phase;
        }
        if outcome.ready && !announced {
            announced = true;
            println!(
                "\nBlob API: http://127.0.0.1:{} (every datanode serves it: ports {}–{})",
                options.port,
                options.port,
                options.port + options.machines as u16 - 1
            );
            println!("  curl -s -X POST --data-binary @file http://127.0.0.1:{}/v1/blobs", options.port);
            println!("  curl -s http://127.0.0.1:{}/v1/blobs/<id>", options.port);
            println!("  cairn topology show --etcd {etcd_url} --cluster {name} --namespace local");
            println!("Data and logs: {}. Ctrl-C stops everything; starting again reuses the data.\n", dir.display());
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tokio::time::sleep(Duration::from_secs(if outcome.ready { 5 } else { 1 })) => {}
        }
    }
    println!("stopping");
    platform.stop_all();
    drop(agent);
    drop(etcd);
    Ok(())
}
