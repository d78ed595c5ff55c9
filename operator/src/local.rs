//! The Local platform: datanode processes on this machine, one per configured "machine" (a disk
//! agent socket and a port). Used by `cairn local up` and the end-to-end tests.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cairn_common::agent_client::{AgentClient, AgentClientError};

use crate::desired::Machine;
use crate::platform::{Applied, Platform, PlatformError};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LocalMachine {
    pub name: String,
    /// False while the machine is being drained (its replicas move elsewhere first).
    pub selected: bool,
    pub zone: String,
    /// The machine's disk agent: the socket its datanode is given.
    pub agent_socket: PathBuf,
    /// The disk agent's admin socket: reports and purges (the operator's alone).
    #[serde(default)]
    pub agent_admin_socket: PathBuf,
    /// Port of its datanode on 127.0.0.1.
    pub port: u16,
    /// Port of its datanode's replica routes (mutual TLS when the platform has certificates);
    /// none: the replica routes are on `port`.
    #[serde(default)]
    pub peer_port: Option<u16>,
    /// Port of its datanode's S3 API on 127.0.0.1; none: no S3.
    #[serde(default)]
    pub s3_port: Option<u16>,
    /// Use only the agent's disk at this path (several local machines sharing one disk agent,
    /// each with its own directory disk); `None` uses every disk the agent reports.
    pub disk_path: Option<PathBuf>,
}

struct Running {
    child: Child,
    args: Vec<String>,
    binary: Binary,
    started: std::time::Instant,
}

/// A datanode binary as started: its path and which file was there, so that a rebuild in place
/// (`cargo build` writes a new file) is an upgrade like a new path is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Binary {
    path: PathBuf,
    /// Inode and modification time (ns); None when the file cannot be read (starting it fails).
    file: Option<(u64, i128)>,
}

impl Binary {
    /// Whether a datanode started from `self` runs what `now` names: the same path, and the same
    /// file unless it cannot be read right now (a rebuild replacing it: no upgrade on a guess).
    fn runs(&self, now: &Binary) -> bool {
        self.path == now.path && (now.file.is_none() || self.file == now.file)
    }

    fn at(path: &std::path::Path) -> Self {
        use std::os::unix::fs::MetadataExt;
        let file = std::fs::metadata(path)
            .ok()
            .map(|m| (m.ino(), i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())));
        Self { path: path.to_owned(), file }
    }
}

/// A datanode that keeps exiting: started again after a growing pause, and reported.
struct Crashes {
    /// Exits in a row, each soon after its start.
    count: u32,
    next_start: std::time::Instant,
    /// How it ended the last time, with the last line of its log.
    last: String,
}

/// A datanode that ran this long before exiting is not in a crash loop.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

pub struct LocalPlatform {
    pub cluster: String,
    pub namespace: String,
    pub etcd: Vec<String>,
    /// Extra datanode flags (e.g. `--max-blob-size`).
    pub extra_args: Vec<String>,
    /// Datanode output goes to `<log_dir>/<machine>.log` (else it is discarded).
    pub log_dir: Option<PathBuf>,
    /// Where the cluster CA (`ca.crt`) and each machine's certificate (`<machine>.crt`, `.key`)
    /// are: the datanodes speak mutual TLS on their peer ports.
    pub peer_tls_dir: Option<PathBuf>,
    machines: Mutex<Vec<LocalMachine>>,
    binary: Mutex<PathBuf>,
    running: Mutex<BTreeMap<String, Running>>,
    crashes: Mutex<BTreeMap<String, Crashes>>,
    /// The cluster's etcd client, kept from pass to pass.
    etcd_clients: crate::platform::EtcdClients,
}

impl LocalPlatform {
    pub fn new(
        cluster: &str,
        namespace: &str,
        etcd: Vec<String>,
        binary: PathBuf,
        machines: Vec<LocalMachine>,
    ) -> Self {
        Self {
            cluster: cluster.into(),
            namespace: namespace.into(),
            etcd,
            extra_args: Vec::new(),
            log_dir: None,
            peer_tls_dir: None,
            machines: Mutex::new(machines),
            binary: Mutex::new(binary),
            running: Mutex::default(),
            crashes: Mutex::default(),
            etcd_clients: Default::default(),
        }
    }

    /// Scale out or in: the machines from now on.
    pub fn set_machines(&self, machines: Vec<LocalMachine>) {
        *self.machines.lock().expect("machines lock") = machines;
    }

    /// The machines, as configured.
    pub fn local_machines(&self) -> Vec<LocalMachine> {
        self.machines.lock().expect("machines lock").clone()
    }

    /// Drain a machine: its replicas move to the others (each new replica caught up before the
    /// old one goes), then its datanode stops.
    pub fn drain(&self, name: &str) {
        for m in self.machines.lock().expect("machines lock").iter_mut() {
            if m.name == name {
                m.selected = false;
            }
        }
    }

    /// Upgrade: the datanode binary from now on (datanodes are restarted one per pass, each only
    /// once every running datanode has caught up).
    pub fn set_binary(&self, binary: PathBuf) {
        *self.binary.lock().expect("binary lock") = binary;
    }

    fn args(&self, m: &LocalMachine) -> Vec<String> {
        cairn_cluster::datanode_command::DatanodeCommand {
            tls: None,
            s3_listen: m.s3_port.map(|p| format!("127.0.0.1:{p}")),
            // Local mode signs for the datanode's default region, us-east-1.
            s3_region: None,
            s3_domain: None,
            etcd: self.etcd.clone(),
            cluster: self.cluster.clone(),
            namespace: self.namespace.clone(),
            node_id: m.name.clone(),
            zone: m.zone.clone(),
            disk_agent: m.agent_socket.display().to_string(),
            listen: format!("127.0.0.1:{}", m.port),
            advertise: None,
            peer_listen: m.peer_port.map(|p| format!("127.0.0.1:{p}")),
            etcd_tls: None,
            peer_tls: self.peer_tls_dir.as_ref().filter(|_| m.peer_port.is_some()).map(|dir| {
                let file = |name: String| dir.join(name).display().to_string();
                cairn_cluster::datanode_command::TlsFiles {
                    ca: file("ca.crt".into()),
                    cert: file(format!("{}.crt", m.name)),
                    key: file(format!("{}.key", m.name)),
                }
            }),
            extra: self.extra_args.clone(),
        }
        .to_args()
    }

    /// Records a datanode's exit: one that exits soon after its start again and again is started
    /// after a pause that doubles each time (2 s … 60 s).
    fn note_exit(&self, name: &str, lived: Duration, line: &str) {
        let tail = self.log_dir.as_ref().map(|dir| log_tail(&dir.join(format!("{name}.log")), 1)).unwrap_or_default();
        let mut crashes = self.crashes.lock().expect("crashes lock");
        let count = match crashes.get(name) {
            Some(c) if lived < HEALTHY_RUN => c.count + 1,
            _ => 1,
        };
        let pause = Duration::from_secs((1u64 << count.min(6)).min(60));
        let last = if tail.is_empty() { line.to_owned() } else { format!("{line}; its last log line: {tail}") };
        crashes.insert(name.to_owned(), Crashes { count, next_start: Instant::now() + pause, last });
    }

    /// Whether a datanode that keeps exiting is still in its pause.
    fn waiting_to_restart(&self, name: &str) -> bool {
        self.crashes.lock().expect("crashes lock").get(name).is_some_and(|c| Instant::now() < c.next_start)
    }

    /// Datanodes that keep exiting, one line each.
    fn failing(&self) -> Vec<String> {
        self.crashes
            .lock()
            .expect("crashes lock")
            .iter()
            .filter(|(_, c)| c.count >= 2)
            .map(|(name, c)| {
                format!(
                    "datanode {name} keeps exiting ({} times; started again after a growing pause): {}",
                    c.count, c.last
                )
            })
            .collect()
    }

    /// The binary each running datanode was started from.
    pub fn binaries(&self) -> Vec<PathBuf> {
        self.running.lock().expect("running lock").values().map(|r| r.binary.path.clone()).collect()
    }

    /// Stops every datanode (kill, then wait).
    pub fn stop_all(&self) {
        for (_, mut running) in std::mem::take(&mut *self.running.lock().expect("running lock")) {
            let _ = running.child.kill();
            let _ = running.child.wait();
        }
    }

    /// Deletes this cluster's volumes through each machine's disk agent; how many.
    pub async fn purge_volumes(&self) -> Result<u32, PlatformError> {
        let machines: Vec<(PathBuf, String)> = self
            .machines
            .lock()
            .expect("machines lock")
            .iter()
            .map(|m| (m.agent_admin_socket.clone(), m.name.clone()))
            .collect();
        let mut deleted = 0;
        for (socket, machine) in machines {
            let (count, in_use) = self.purge_through(&socket, &machine, None, None).await?;
            if let Some(name) = in_use {
                return Err(PlatformError::Busy(format!("volume {name} on {machine} is still open")));
            }
            deleted += count;
        }
        Ok(deleted)
    }

    /// Deletes this cluster's volumes of `machine` through its disk agent (only on `disks` and
    /// of `partitions`, when given): how many, and a volume that a datanode still has open (the
    /// agent refuses it; it is left for a later pass), if any.
    async fn purge_through(
        &self,
        socket: &std::path::Path,
        machine: &str,
        disks: Option<&[String]>,
        partitions: Option<&[u32]>,
    ) -> Result<(u32, Option<String>), PlatformError> {
        let agent = AgentClient::new(socket);
        let (mut deleted, mut in_use) = (0, None);
        let agent_error = |message: String| PlatformError::DiskAgent { machine: machine.to_owned(), message };
        for volume in agent.list_volumes().await.map_err(|e| agent_error(e.to_string()))? {
            if cairn_cluster::Topology::is_volume_of(&self.cluster, machine, &volume.name)
                && disks.is_none_or(|d| d.contains(&volume.disk))
                && partitions.is_none_or(|p| p.contains(&volume.partition))
            {
                match agent.delete_volume(&volume.name).await {
                    Ok(_) => deleted += 1,
                    Err(AgentClientError::Refused { code, .. }) if code == "volume_in_use" => {
                        in_use = Some(volume.name.clone())
                    }
                    Err(e) => return Err(agent_error(format!("deleting volume {}: {e}", volume.name))),
                }
            }
        }
        Ok((deleted, in_use))
    }
}

impl Platform for LocalPlatform {
    fn etcd_clients(&self) -> Option<&crate::platform::EtcdClients> {
        Some(&self.etcd_clients)
    }

    async fn machines(&self) -> Result<Vec<Machine>, PlatformError> {
        let machines = self.machines.lock().expect("machines lock").clone();
        let mut out = Vec::new();
        for m in machines {
            let report = AgentClient::new(&m.agent_admin_socket)
                .report()
                .await
                .map_err(|e| PlatformError::DiskAgent { machine: m.name.clone(), message: e.to_string() })?;
            let disks = match &m.disk_path {
                Some(path) => {
                    report.disks.into_iter().filter(|d| std::path::Path::new(&d.canonical_mount) == path).collect()
                }
                None => report.disks,
            };
            out.push(Machine {
                name: m.name.clone(),
                zone: m.zone.clone(),
                disks,
                address: format!("127.0.0.1:{}", m.port),
                selected: m.selected,
                down: None,
            });
        }
        Ok(out)
    }

    async fn apply(&self, chosen: &[Machine], settled: bool) -> Result<Applied, PlatformError> {
        let machines = self.machines.lock().expect("machines lock").clone();
        let binary = Binary::at(&self.binary.lock().expect("binary lock"));
        let mut changes = Vec::new();
        // Stop what is no longer chosen, and restart what died.
        {
            let mut running = self.running.lock().expect("running lock");
            let names: Vec<String> = running.keys().cloned().collect();
            for name in names {
                let gone = !chosen.iter().any(|m| m.name == name);
                let entry = running.get_mut(&name).expect("listed");
                let exited = entry.child.try_wait().map(|s| s.is_some()).unwrap_or(true);
                if gone || exited {
                    let mut r = running.remove(&name).expect("listed");
                    let _ = r.child.kill();
                    let status = r.child.wait();
                    let line = match (gone, status) {
                        (true, _) => format!("stopped datanode {name} (its machine left the topology)"),
                        (false, Ok(status)) => format!("datanode {name} exited ({status})"),
                        (false, Err(e)) => format!("datanode {name} exited (status unknown: {e})"),
                    };
                    if !gone {
                        self.note_exit(&name, r.started.elapsed(), &line);
                    }
                    changes.push(line);
                } else if entry.started.elapsed() >= HEALTHY_RUN {
                    self.crashes.lock().expect("crashes lock").remove(&name);
                }
            }
        }
        let mut upgraded_one = false;
        let mut outdated_left = 0;
        for machine in machines.iter().filter(|m| chosen.iter().any(|c| c.name == m.name)) {
            let args = self.args(machine);
            let outdated = {
                let running = self.running.lock().expect("running lock");
                match running.get(&machine.name) {
                    None => None,
                    Some(r) if r.args == args && r.binary.runs(&binary) => continue,
                    Some(r) => Some(r.args == args),
                }
            };
            if outdated.is_some() {
                // One datanode at a time, and only when everyone has caught up.
                if upgraded_one || !settled {
                    outdated_left += 1;
                    continue;
                }
                upgraded_one = true;
                if let Some(mut r) = self.running.lock().expect("running lock").remove(&machine.name) {
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                }
            }
            if outdated.is_none() && self.waiting_to_restart(&machine.name) {
                continue;
            }
            let output = |dir: &PathBuf| -> Result<Stdio, PlatformError> {
                let path = dir.join(format!("{}.log", machine.name));
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map(Stdio::from)
                    .map_err(|e| PlatformError::Process(format!("{}: {e}", path.display())))
            };
            let (stdout, stderr) = match &self.log_dir {
                Some(dir) => (output(dir)?, output(dir)?),
                None => (Stdio::null(), Stdio::inherit()),
            };
            let mut command = Command::new(&binary.path);
            dies_with_this_process(&mut command);
            let child = command
                .args(&args)
                .env("RUST_LOG", std::env::var("CAIRN_DATANODE_LOG").unwrap_or_else(|_| "info".into()))
                .stdout(stdout)
                .stderr(stderr)
                .spawn()
                .map_err(|e| PlatformError::Process(format!("starting {}: {e}", binary.path.display())))?;
            tracing::info!(node = %machine.name, port = machine.port, "datanode started");
            self.running
                .lock()
                .expect("running lock")
                .insert(machine.name.clone(), Running { child, args, binary: binary.clone(), started: Instant::now() });
            changes.push(match outdated {
                None => format!("started datanode {}", machine.name),
                Some(true) => format!("replaced datanode {} (new binary)", machine.name),
                Some(false) => format!("replaced datanode {} (new flags)", machine.name),
            });
        }
        // A local datanode serves once it registers live, which `settled` already waits for.
        Ok(Applied { changes, outdated: outdated_left, failing: self.failing(), foreign: Vec::new(), unready: 0 })
    }

    async fn stop(&self) -> Result<(), PlatformError> {
        self.stop_all();
        Ok(())
    }

    async fn delete_volumes(&self) -> Result<bool, PlatformError> {
        self.purge_volumes().await.map(|_| true)
    }

    async fn purge_machine(&self, machine: &Machine, partitions: Option<&[u32]>) -> Result<bool, PlatformError> {
        let socket = self
            .machines
            .lock()
            .expect("machines lock")
            .iter()
            .find(|m| m.name == machine.name)
            .map(|m| m.agent_admin_socket.clone())
            .ok_or_else(|| PlatformError::Invalid(format!("no machine {}", machine.name)))?;
        let disks: Vec<String> = machine.disks.iter().map(|d| d.id.clone()).collect();
        let (_, in_use) = self.purge_through(&socket, &machine.name, Some(&disks), partitions).await?;
        Ok(in_use.is_none())
    }

    async fn etcd_tls(&self) -> Result<Option<cairn_cluster::etcd::EtcdTls>, PlatformError> {
        Ok(None)
    }
}

impl Drop for LocalPlatform {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// The child gets SIGTERM when this process dies, even by kill -9, so `cairn local up` never
/// leaves etcd, a disk agent or datanodes running behind it. Linux sends the signal when the
/// *thread* that started the child ends, so it is only asked for from the main thread, which
/// lives as long as the process (`cairn local up` starts every child from it).
pub(crate) fn dies_with_this_process(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    if std::thread::current().name() != Some("main") {
        return;
    }
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            // The parent may have died before prctl: then no signal would ever come.
            if libc::getppid() != parent {
                libc::raise(libc::SIGTERM);
            }
            Ok(())
        });
    }
}

/// The last `n` non-empty lines of a child's log file, joined with " / " (empty if unreadable).
pub(crate) fn log_tail(log: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}
