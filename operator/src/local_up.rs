//! `cairn local up`: a whole cluster on this machine without Kubernetes — etcd and a disk agent
//! as child processes, one directory disk per local machine, and the operator's reconcile
//! through the Local platform starting the datanodes. A second start reuses everything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cairn_common::agent_client::AgentSockets;
use cairn_common::text::bytes;
use cairn_resources::StoreCluster;

use crate::local::{LocalMachine, LocalPlatform};
use crate::platform::converge;
use crate::status::{Note, Observation};

/// The etcd namespace of a local cluster's keys.
pub const NAMESPACE: &str = "local";
/// The token of the admin key `cairn local up` makes, in its directory (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Machine `i`'s peer port: the replica routes, over mutual TLS, 100 above its blob port.
fn peer_port(options: &LocalOptions, i: usize) -> u16 {
    options.port + PEER_PORT_OFFSET + i as u16
}

const PEER_PORT_OFFSET: u16 = 100;

/// The S3 access key id and secret access key of the key whose token is in `file`.
fn s3_credentials(file: &Path) -> anyhow::Result<(String, String)> {
    let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let (id, secret) = cairn_cluster::access::parse_token(text.trim())?;
    let key = cairn_cluster::access::AccessKey::from_parts(id, secret, "local admin", Default::default())?;
    Ok((id.to_string(), cairn_cluster::access::s3_secret(&key).expose().to_string()))
}

/// Machine `i`'s S3 port, 200 above its blob port.
fn s3_port(options: &LocalOptions, i: usize) -> u16 {
    options.port + S3_PORT_OFFSET + i as u16
}

const S3_PORT_OFFSET: u16 = 200;

/// The local cluster's CA (`DIR/tls/ca.crt`, its key beside it, readable by the owner only),
/// made on the first start, and a fresh certificate from it for every machine at every start
/// (`DIR/tls/m<i>.crt`, `.key`): the datanodes' mutual TLS. The directory.
fn peer_certificates(dir: &Path, cluster: &str, machines: &[LocalMachine]) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls)?;
    std::fs::set_permissions(&tls, std::fs::Permissions::from_mode(0o700))?;
    let (cert, key) = (tls.join("ca.crt"), tls.join("ca.key"));
    let ca = match (std::fs::read_to_string(&cert), std::fs::read_to_string(&key)) {
        (Ok(cert_pem), Ok(key_pem)) => cairn_cluster::peer_tls::PeerCa::from_pem(&cert_pem, &key_pem)
            .map_err(|e| e.context(format!("{}: delete the tls directory to have a new CA made", tls.display())))?,
        _ => {
            let ca = cairn_cluster::peer_tls::PeerCa::generate(cluster)?;
            write_private(&key, ca.key_pem())?;
            std::fs::write(&cert, ca.cert_pem())?;
            ca
        }
    };
    for m in machines {
        let made = ca.issue(&m.name, &["127.0.0.1".into(), "localhost".into()], 90)?;
        // The key first, then the certificate: a datanode reading them in between skips the
        // mismatched pair and keeps its previous one until both are there.
        write_private(&tls.join(format!("{}.key", m.name)), &made.key_pem)?;
        let staged = tls.join(format!("{}.crt.new", m.name));
        std::fs::write(&staged, &made.cert_pem)?;
        std::fs::rename(&staged, tls.join(format!("{}.crt", m.name)))?;
    }
    Ok(tls)
}

/// Writes `text` to `path` readable by its owner only (through a new file renamed into place).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let staged = path.with_extension("new");
    let _ = std::fs::remove_file(&staged);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&staged)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&staged, path)?;
    Ok(())
}

/// The local cluster's admin key: made on the first start (its token written to
/// `DIR/admin-token`, readable by the owner only), put back into etcd from that file on a later
/// start if etcd lost it. The file's path.
async fn admin_key(dir: &Path, etcd_url: &str, cluster: &str) -> anyhow::Result<PathBuf> {
    let store = cairn_cluster::etcd::ClusterStore::connect(&[etcd_url.to_owned()], NAMESPACE, cluster).await?;
    let path = dir.join(ADMIN_TOKEN_FILE);
    let (key, _, _) = cairn_cluster::access::admin_key_file(&path, "local admin")?;
    if !store.load().await?.keys.contains_key(&key.id) {
        store.create_key(&key).await?;
    }
    Ok(path)
}

/// What `cairn local up` keeps in its directory for `cairn status --local`.
pub const STATE_FILE: &str = "cluster.json";
/// Held (flock) by the `cairn local up` running in the directory.
pub const LOCK_FILE: &str = "local-up.lock";
/// Events kept in the state file.
const EVENTS_KEPT: usize = 20;

/// A local cluster as `cairn local up` runs it: the StoreCluster (its status kept the way the
/// operator keeps it on Kubernetes), the machines and their disk agent, and recent events.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LocalState {
    /// The `cairn local up` process.
    pub pid: u32,
    pub cluster: StoreCluster,
    pub machines: Vec<LocalMachine>,
    pub events: Vec<LocalEvent>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LocalEvent {
    /// RFC 3339.
    pub time: String,
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

impl LocalState {
    /// The state for this run: a first start creates the StoreCluster (creation time, generation
    /// 1); a restart keeps its creation time, status and events.
    fn start(dir: &Path, name: &str, spec: &cairn_resources::StoreClusterSpec, machines: Vec<LocalMachine>) -> Self {
        let previous: Option<LocalState> =
            std::fs::read(dir.join(STATE_FILE)).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let mut cluster = StoreCluster::new(name, spec.clone());
        cluster.metadata.namespace = Some(NAMESPACE.into());
        cluster.metadata.generation = Some(1);
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
        cluster.metadata.creation_timestamp = Some(now);
        let mut events = Vec::new();
        if let Some(previous) = previous {
            cluster.metadata.creation_timestamp = previous.cluster.metadata.creation_timestamp;
            if previous.cluster.spec == *spec {
                cluster.metadata.generation = previous.cluster.metadata.generation;
            } else {
                cluster.metadata.generation = previous.cluster.metadata.generation.map(|g| g + 1);
            }
            cluster.status = previous.cluster.status;
            events = previous.events;
        }
        let mut state = Self { pid: std::process::id(), cluster, machines, events };
        state.record(vec![Note {
            warning: false,
            reason: "Started".into(),
            action: "Start",
            message: format!("cairn local up (pid {})", std::process::id()),
        }]);
        state
    }

    fn record(&mut self, notes: Vec<Note>) {
        let time = k8s_openapi::jiff::Timestamp::now().to_string();
        for n in notes {
            self.events.push(LocalEvent {
                time: time.clone(),
                warning: n.warning,
                reason: n.reason,
                message: n.message,
            });
        }
        let excess = self.events.len().saturating_sub(EVENTS_KEPT);
        self.events.drain(..excess);
    }

    fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let body = serde_json::to_vec_pretty(self)?;
        cairn_common::volume_layout::write_atomic(&dir.join(STATE_FILE), &body)?;
        Ok(())
    }

    /// The state of the local cluster in `dir`, which must be running.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(STATE_FILE);
        let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                anyhow::anyhow!("no local cluster in {} (start one with `cairn local up`)", dir.display())
            }
            _ => anyhow::anyhow!("{}: {e}", path.display()),
        })?;
        let state: Self = serde_json::from_slice(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: not a local cluster state: {e}", path.display()))?;
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", state.pid)).unwrap_or_default();
        let running = String::from_utf8_lossy(&cmdline).split('\0').any(|arg| arg == "up");
        anyhow::ensure!(
            running,
            "the local cluster in {} is not running (its `cairn local up`, pid {}, has exited; start it again)",
            dir.display(),
            state.pid
        );
        Ok(state)
    }
}

pub struct LocalOptions {
    /// Everything lives here: etcd's data, the disk agent's state, the machines' disks.
    pub dir: PathBuf,
    pub machines: usize,
    /// Quota of each machine's directory disk.
    pub disk_size: String,
    /// The machines' disks: directories (on any mount, e.g. a dedicated one), one per machine;
    /// empty: `<dir>/disks/m<i>`.
    pub disks: Vec<PathBuf>,
    /// The first datanode's port; the others follow.
    pub port: u16,
    pub etcd_port: u16,
    /// Machines to drain (`m<i>`): their replicas move to the others, then their datanode stops.
    pub drain: Vec<String>,
}

/// A child process that is started again when it exits (with a growing pause, so that one that
/// cannot start does not spin), and stopped (TERM, then KILL) and reaped when dropped.
struct Supervised {
    name: &'static str,
    child: Child,
    /// Makes the command again: a `Command` runs once.
    command: Box<dyn Fn() -> anyhow::Result<Command> + Send>,
    log: PathBuf,
    restarts: u32,
    next_start: std::time::Instant,
}

impl Supervised {
    fn start(
        name: &'static str,
        log: PathBuf,
        command: impl Fn() -> anyhow::Result<Command> + Send + 'static,
    ) -> anyhow::Result<Self> {
        let mut first = command()?;
        crate::local::dies_with_this_process(&mut first);
        let child = first.spawn().map_err(|e| anyhow::anyhow!("starting {name}: {e}"))?;
        Ok(Self { name, child, command: Box::new(command), log, restarts: 0, next_start: std::time::Instant::now() })
    }

    /// If the child has exited: starts it again (once its pause is over) and says so.
    fn revive(&mut self) -> Option<String> {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) | Err(_) => return None,
        };
        if std::time::Instant::now() < self.next_start {
            return None;
        }
        let tail = crate::local::log_tail(&self.log, 1);
        self.restarts += 1;
        // 1 s, 2 s, 4 s … at most 30 s between starts of a child that keeps exiting.
        let pause = Duration::from_secs((1u64 << self.restarts.min(5)).min(30));
        self.next_start = std::time::Instant::now() + pause;
        let started = (self.command)().and_then(|mut c| {
            crate::local::dies_with_this_process(&mut c);
            c.spawn().map_err(anyhow::Error::from)
        });
        match started {
            Ok(child) => {
                self.child = child;
                Some(format!("{} exited ({status}; last log line: {tail}); started it again", self.name))
            }
            Err(e) => Some(format!("{} exited ({status}) and could not be started again: {e}", self.name)),
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
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

/// Waits up to 30 s for a child to be `ready`; if it exits first, says so with its log's tail.
fn wait_for(process: &mut Supervised, log: &Path, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    for _ in 0..300 {
        if let Ok(Some(status)) = process.child.try_wait() {
            let tail = crate::local::log_tail(log, 5).replace(" / ", "\n");
            anyhow::bail!("{} exited ({status}); the end of {}:\n{tail}", process.name, log.display());
        }
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("{} did not start within 30 s (see {})", process.name, log.display())
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<Stdio> {
    Ok(Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{name}.log")))?))
}

/// A line on stdout; a closed stdout (`| head`) must not stop the cluster.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// The local machines of this run: `m0`…`m<N-1>` of `--machines N` (those named by `--drain`
/// unselected), and, unselected so that they are drained rather than lost, the machines of an
/// earlier run beyond N that were not yet drained to the end (a machine is left out of the state
/// once it is drained, stopped and purged).
fn local_machines(
    dir: &Path,
    options: &LocalOptions,
    sockets: &AgentSockets,
    spec: &cairn_resources::StoreClusterSpec,
) -> anyhow::Result<Vec<LocalMachine>> {
    let disk_dir = |i: usize| match options.disks.get(i) {
        Some(path) => path.clone(),
        None => dir.join("disks").join(format!("m{i}")),
    };
    let mut machines: Vec<LocalMachine> = (0..options.machines)
        .map(|i| LocalMachine {
            name: format!("m{i}"),
            selected: true,
            zone: format!("zone-{i}"),
            agent_socket: sockets.node.clone(),
            agent_admin_socket: sockets.admin.clone(),
            port: options.port + i as u16,
            peer_port: Some(peer_port(options, i)),
            s3_port: Some(s3_port(options, i)),
            disk_path: Some(disk_dir(i)),
        })
        .collect();
    let previous: Vec<LocalMachine> = std::fs::read(dir.join(STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<LocalState>(&b).ok())
        .map(|s| s.machines)
        .unwrap_or_default();
    for p in previous {
        let index: Option<usize> = p.name.strip_prefix('m').and_then(|i| i.parse().ok());
        if let Some(i) = index.filter(|i| *i >= options.machines) {
            let port = options.port + i as u16;
            machines.push(LocalMachine {
                selected: false,
                agent_socket: sockets.node.clone(),
                agent_admin_socket: sockets.admin.clone(),
                port,
                peer_port: Some(peer_port(options, i)),
                s3_port: Some(s3_port(options, i)),
                ..p
            });
        }
    }
    for drained in &options.drain {
        let Some(m) = machines.iter_mut().find(|m| m.name == *drained) else {
            let names: Vec<&str> = machines.iter().map(|m| m.name.as_str()).collect();
            anyhow::bail!("--drain {drained}: no such machine (the machines are {})", names.join(", "));
        };
        m.selected = false;
    }
    let selected = machines.iter().filter(|m| m.selected).count();
    anyhow::ensure!(
        selected >= spec.replication_factor as usize,
        "{selected} machine(s) would be left for replicationFactor {}: drain fewer",
        spec.replication_factor
    );
    Ok(machines)
}

/// The machines' directory disks each promise `--disk-size`, and directories on one filesystem
/// share its free space: what they still promise must fit there now. Otherwise placement plans
/// replicas on space that is not there, and their volumes can never be created.
fn check_room(machines: &[LocalMachine], disk_size: &str, volume: u64) -> anyhow::Result<()> {
    let size = crate::desired::parse_size("--disk-size", disk_size)?;
    anyhow::ensure!(
        size >= volume,
        "--disk-size {disk_size} cannot hold one volume of the StoreCluster's volumeSize ({})",
        bytes(volume)
    );
    // Device → (a disk on it, disks, bytes still promised, free bytes).
    let mut filesystems: BTreeMap<u64, (PathBuf, usize, u64, u64)> = BTreeMap::new();
    for m in machines.iter().filter(|m| m.selected) {
        let path = m.disk_path.as_ref().expect("local machines have a directory disk");
        let (dev, free) = cairn_common::disk_space::filesystem_of(path)
            .map_err(|e| anyhow::anyhow!("machine {}'s disk {}: {e}", m.name, path.display()))?;
        let held = cairn_common::disk_space::allocated_bytes(path);
        let entry = filesystems.entry(dev).or_insert_with(|| (path.clone(), 0, 0, free));
        entry.1 += 1;
        entry.2 += size.saturating_sub(held);
    }
    for (path, disks, promised, free) in filesystems.into_values() {
        anyhow::ensure!(
            promised <= free,
            "the filesystem of {} has {} free, and the {disks} machine disk(s) on it still promise {} \
             ({disks} × --disk-size {disk_size}, less what their volumes already hold): free some space, \
             or pass a smaller --disk-size (each disk holds whole volumes of {})",
            path.display(),
            bytes(free),
            bytes(promised),
            bytes(volume)
        );
    }
    Ok(())
}

/// Runs until Ctrl-C (or SIGTERM), then stops everything.
pub async fn up(cluster: StoreCluster, options: LocalOptions) -> anyhow::Result<()> {
    // A spec no datanode could serve (say, segments too small for the largest blob) is refused
    // before anything starts, as the CRD's rules refuse it on Kubernetes.
    // The CRD's own CEL rules first (the name, the geometry), as an API server runs them.
    kube::core::cel::validate_cel(&cluster).map_err(|e| anyhow::anyhow!("the StoreCluster is not valid: {e}"))?;
    let (volume, segment, max_blob) =
        crate::desired::check_spec(&cluster.spec).map_err(|e| anyhow::anyhow!("the StoreCluster is not valid: {e}"))?;
    let largest = max_blob.unwrap_or_else(|| cairn_common::volume_layout::largest_blob_for_segment(segment));
    // Exact: a segment's own overhead makes the largest blob a little less than the segment.
    let largest = format!("{largest} bytes, {:.2} MiB", largest as f64 / f64::from(1u32 << 20));
    let dir = &options.dir;
    std::fs::create_dir_all(dir.join("logs"))?;
    // One `cairn local up` per directory: a second would rewrite the first one's state and, on
    // its way out, remove the disk agent socket the first one's datanodes use.
    let _lock = match cairn_common::process_lock::ProcessLock::acquire(&dir.join(LOCK_FILE)) {
        Ok(lock) => lock,
        Err(cairn_common::process_lock::LockError::Held { holder, .. }) => anyhow::bail!(
            "a `cairn local up` is already running in {} ({holder}); stop it first (Ctrl-C), or use another --dir",
            dir.display()
        ),
        Err(e) => return Err(e.into()),
    };
    let logs = dir.join("logs");
    let name = cluster.metadata.name.clone().unwrap_or_else(|| "local".into());
    // Bad --drain is refused before anything starts.
    let sockets = AgentSockets::in_dir(dir);
    let machines = local_machines(dir, &options, &sockets, &cluster.spec)?;
    check_room(&machines, &options.disk_size, volume)?;

    // Our etcd must be the one that answers: were its port taken (another etcd, another local
    // cluster), ours would exit while the cluster wrote its topology into the other one.
    for (port, what) in [(options.etcd_port, "client"), (options.etcd_port + 1, "peer")] {
        if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            anyhow::bail!(
                "etcd's {what} port 127.0.0.1:{port} is not free ({e}): another etcd or `cairn local up` uses it; \
                 choose other ports with --etcd-port"
            );
        }
    }
    let etcd_url = format!("http://127.0.0.1:{}", options.etcd_port);
    let peer_url = format!("http://127.0.0.1:{}", options.etcd_port + 1);
    let mut etcd = {
        let (data, logs, etcd_url, peer_url) = (dir.join("etcd"), logs.clone(), etcd_url.clone(), peer_url.clone());
        Supervised::start("etcd", logs.join("etcd.log"), move || {
            let mut command = Command::new("etcd");
            command
                .arg("--data-dir")
                .arg(&data)
                .args(["--name", "local", "--listen-client-urls", &etcd_url, "--advertise-client-urls", &etcd_url])
                .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("local={peer_url}")])
                .stdout(log_file(&logs, "etcd")?)
                .stderr(log_file(&logs, "etcd")?);
            Ok(command)
        })
        .map_err(|e| e.context("Debian has etcd in the package etcd-server"))?
    };
    wait_for(&mut etcd, &logs.join("etcd.log"), || {
        std::net::TcpStream::connect(("127.0.0.1", options.etcd_port)).is_ok()
    })?;

    let mut config = String::from("selector:\n  fs_types: []\nheadroom: 0%\ndirectories:\n");
    for m in &machines {
        let path = m.disk_path.as_ref().expect("local machines have a directory disk");
        config += &format!("  - {{path: {}, capacity: {}}}\n", path.display(), options.disk_size);
    }
    std::fs::write(dir.join("disk-agent.yaml"), config)?;
    let mut agent = {
        let (dir, logs, sockets) = (dir.clone(), logs.clone(), sockets.clone());
        Supervised::start("disk agent", logs.join("disk-agent.log"), move || {
            let mut command = Command::new(sibling("cairn-disk-agent"));
            command
                .args(["serve", "--mountinfo", "/proc/self/mountinfo", "--kubernetes", "off", "--node-name", "local"])
                // Directory disks on one machine: rescanning often is cheap, and a replaced disk
                // accepted with `forget` is taken within seconds.
                .args(["--interval-secs", "5"])
                .arg("--config")
                .arg(dir.join("disk-agent.yaml"))
                .arg("--state-dir")
                .arg(dir.join("disk-agent-state"))
                .args(sockets.args())
                .stdout(log_file(&logs, "disk-agent")?)
                .stderr(log_file(&logs, "disk-agent")?);
            Ok(command)
        })?
    };
    wait_for(&mut agent, &logs.join("disk-agent.log"), || {
        std::os::unix::net::UnixStream::connect(&sockets.admin).is_ok()
    })?;

    for m in machines.iter().filter(|m| !m.selected) {
        say(&format!("cluster {name}: draining {}: its replicas move to the other machines, then it stops", m.name));
    }
    let mut spec = cluster.spec.clone();
    spec.etcd.endpoints = vec![etcd_url.clone()];
    let mut platform =
        LocalPlatform::new(&name, NAMESPACE, vec![etcd_url.clone()], sibling("cairn-datanode"), machines);
    platform.log_dir = Some(logs.clone());
    platform.peer_tls_dir = Some(peer_certificates(dir, &name, &platform.local_machines())?);

    let admin = match spec.auth {
        cairn_resources::store_cluster::ClusterAuth::Keys => {
            Some(admin_key(dir, &etcd_url, &name).await.map_err(|e| e.context("making the admin key"))?)
        }
        cairn_resources::store_cluster::ClusterAuth::None => None,
    };
    let mut state = LocalState::start(dir, &name, &spec, platform.local_machines());
    state.save(dir)?;
    let mut announced = false;
    let mut last_line = String::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        // Every child is supervised: etcd and the disk agent here, the datanodes by the pass.
        let revived: Vec<String> = [&mut etcd, &mut agent].into_iter().filter_map(Supervised::revive).collect();
        for line in &revived {
            say(&format!("cluster {name}: {line}"));
        }
        let outcome = Box::pin(converge(&name, NAMESPACE, &spec, &platform)).await;
        let old = state.cluster.status.clone().unwrap_or_default();
        let mut notes = crate::status::notes(&old, &outcome);
        notes.extend(revived.into_iter().map(|message| crate::status::Note {
            warning: true,
            reason: "ProcessRestarted".into(),
            action: "Supervise",
            message,
        }));
        let status = crate::status::next_status(&old, state.cluster.metadata.generation, Observation::Pass(&outcome));
        let message = status.conditions.iter().find(|c| c.type_ == "Ready").map(|c| c.message.as_str());
        let line = format!("{}: {}", status.phase.to_lowercase(), message.unwrap_or_default());
        // Saved before it is said, so that `cairn status` agrees with what was printed.
        if status != old || !notes.is_empty() {
            state.cluster.status = Some(status);
            state.record(notes);
            state.save(dir)?;
        }
        if line != last_line {
            say(&format!("cluster {name}: {line}"));
            last_line = line;
        }
        if outcome.ready && !announced {
            announced = true;
            // Ready: every drain is complete (the machine left the topology, its datanode
            // stopped, its volumes purged). A machine beyond --machines is then forgotten.
            let mut kept = Vec::new();
            for m in platform.local_machines() {
                if m.selected {
                    kept.push(m);
                    continue;
                }
                let disk = m.disk_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
                let stays = options.drain.contains(&m.name);
                say(&format!(
                    "cluster {name}: {} is drained and stopped; {}",
                    m.name,
                    if stays {
                        "it stays out while --drain names it".to_string()
                    } else {
                        format!("the next start leaves it out, and its disk {disk} can be removed")
                    }
                ));
                if stays {
                    kept.push(m);
                }
            }
            if kept.len() != platform.local_machines().len() {
                platform.set_machines(kept);
                state.machines = platform.local_machines();
                state.save(dir)?;
            }
            let (first, last) = (options.port, options.port + options.machines as u16 - 1);
            let (auth, header) = match &admin {
                Some(token) => (
                    format!(
                        "An admin key's token is in {token} (more keys: cairn keys create --local {dir} \
                         --name app --scope read,write):\n  \
                         export CAIRN_TOKEN=$(cat {token})\n  ",
                        token = token.display(),
                        dir = dir.display()
                    ),
                    "-H \"Authorization: Bearer $CAIRN_TOKEN\" ",
                ),
                None => {
                    ("auth: None — anyone who can reach these ports may read, write and delete blobs.\n  ".into(), "")
                }
            };
            let (s3_first, s3_last) = (s3_port(&options, 0), s3_port(&options, options.machines - 1));
            let s3 = match &admin {
                Some(token) => {
                    let (id, secret) = s3_credentials(token)?;
                    format!(
                        "export AWS_ACCESS_KEY_ID={id} AWS_SECRET_ACCESS_KEY={secret} AWS_DEFAULT_REGION=us-east-1\n  \
                         aws --endpoint-url http://127.0.0.1:{s3_first} s3 mb s3://demo\n  \
                         aws --endpoint-url http://127.0.0.1:{s3_first} s3 cp file s3://demo/file"
                    )
                }
                None => "auth: None — objects need no signature; buckets need an admin key (none was made)".into(),
            };
            say(&format!(
                "\nBlob API: http://127.0.0.1:{first} (every datanode serves it: ports {first}–{last}; blobs up to {largest})\n  \
                 {auth}curl -s {header}-X POST --data-binary @file http://127.0.0.1:{first}/v1/blobs\n  \
                 curl -s {header}http://127.0.0.1:{first}/v1/blobs/<id>\n  \
                 cairn status --local {dir}     (also: cairn disks --local, cairn topology --local)\n\
                 S3: http://127.0.0.1:{s3_first} (every datanode serves it: ports {s3_first}–{s3_last}; docs/s3.md), as the admin key:\n  \
                 {s3}\n\
                 Data and logs: {dir}. Ctrl-C stops everything; starting again reuses the data.\n",
                dir = dir.display()
            ));
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tokio::time::sleep(Duration::from_secs(if outcome.ready { 5 } else { 1 })) => {}
        }
    }
    say("stopping");
    platform.stop_all();
    drop(agent);
    drop(etcd);
    Ok(())
}
