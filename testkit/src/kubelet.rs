//! A scheduler and a kubelet per node for [`MemoryApi`](crate::MemoryApi): Pods become real
//! processes, each in a network namespace of its own with a Pod IP on a bridge (so that every
//! datanode listens on the same port, as in a cluster), its hostPath volumes bind-mounted where
//! the Pod asks for them, and an `/etc/hosts` that resolves exactly what CoreDNS would
//! (`<hostname>.<subdomain>.<namespace>.svc` for a Pod selected by the headless Service named
//! `subdomain`).
//!
//! What it does, as the real ones do:
//! - schedules a Pod to the node its `nodeName`, required node affinity (`matchFields`
//!   `metadata.name`, `matchExpressions` on labels) and `nodeSelector` allow, unless the node is
//!   cordoned or has a `NoSchedule` taint the Pod does not tolerate (the Pod stays Pending,
//!   `PodScheduled` False `Unschedulable`);
//! - starts it (Pending → Running), waits for `type: Directory` hostPaths and Secrets of
//!   `secret` volumes to exist (`ContainerCreating` until then), mounts Secret volumes read-only
//!   and keeps them following their Secrets (every few seconds, never at once) as the kubelet's atomic writer does
//!   ([`crate::secret_volume`]), probes `readinessProbe.httpGet` (Ready), restarts an exited
//!   container under `restartPolicy: Always` (restartCount), and ends it Succeeded/Failed otherwise;
//! - on deletion, sends SIGTERM, SIGKILL after the grace period, and then removes the Pod;
//! - on request: a node-pressure eviction (Failed, reason Evicted), a node whose kubelet is
//!   stopped (nothing starts there until it is back).
//!
//! Not simulated: ClusterIP Services (clients use [`Nodes::endpoints`]), images (an image names a
//! directory of binaries and an entrypoint), resource limits, liveness probes.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::{json, Value};

use crate::MemoryApi;

/// An image: the directory its binaries are in (what `command` names is looked up there) and
/// its entrypoint (run when a container has no `command`).
#[derive(Clone, Debug)]
pub struct Image {
    pub bin_dir: PathBuf,
    pub entrypoint: String,
}

/// A node: its name, zone and labels, and where its host paths are on this machine (prefix →
/// directory; a host path no prefix matches is the same path here).
#[derive(Clone, Debug, Default)]
pub struct NodeSpec {
    pub name: String,
    pub zone: String,
    pub labels: BTreeMap<String, String>,
    pub host_paths: Vec<(String, PathBuf)>,
}

impl NodeSpec {
    fn host_path(&self, path: &str) -> PathBuf {
        for (prefix, dir) in &self.host_paths {
            // By whole components: `/run/cairn` is not a prefix of `/run/cairn-admin`.
            match path.strip_prefix(prefix.as_str()) {
                Some(rest) if rest.is_empty() || rest.starts_with('/') => {
                    return dir.join(rest.trim_start_matches('/'))
                }
                _ => {}
            }
        }
        PathBuf::from(path)
    }
}

/// A bridge and the network namespaces of the Pods on it; removed on drop.
pub struct PodNetwork {
    bridge: String,
    /// `10.X.Y`: Pods get `.2` on, the host (the bridge) has `.1`.
    prefix: String,
    next: Mutex<u8>,
    /// Held for the network's life: its number (bridge name, subnet) is this process's.
    _claim: std::fs::File,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl PodNetwork {
    /// A new bridge with a /24 of its own: the first number whose lock file no one holds
    /// (`/tmp/cairn-testkit-net-N.lock`, held while the network lives), so that concurrent tests
    /// and processes never share a bridge or a subnet; a bridge left by a killed run with that
    /// number is replaced.
    pub fn create() -> Self {
        let (id, claim) = (0..4096u32)
            .find_map(|id| {
                let file = std::fs::File::create(format!("/tmp/cairn-testkit-net-{id}.lock")).ok()?;
                rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).ok()?;
                Some((id, file))
            })
            .expect("a free network number");
        let bridge = format!("ctk{id}");
        let prefix = format!("10.{}.{}", 100 + id / 256, id % 256);
        let _ = ip(&["link", "del", &bridge]);
        ip(&["link", "add", &bridge, "type", "bridge"]).expect("a bridge (root, iproute2)");
        ip(&["addr", "add", &format!("{prefix}.1/24"), "dev", &bridge]).expect("bridge address");
        ip(&["link", "set", &bridge, "up"]).expect("bridge up");
        Self { bridge, prefix, next: Mutex::new(2), _claim: claim }
    }

    /// The host's address on the bridge: what Pods reach the API server and etcd on.
    pub fn gateway(&self) -> String {
        format!("{}.1", self.prefix)
    }

    /// A network namespace named `name` with a fresh address on the bridge.
    fn add(&self, name: &str) -> Result<String, String> {
        let address = {
            let mut next = self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let a = *next;
            *next = next.checked_add(1).filter(|n| *n < 255).unwrap_or(2);
            format!("{}.{a}", self.prefix)
        };
        let host_end = format!("v{}", &name[name.len().saturating_sub(13)..]);
        // Its /etc/netns directory first: cleanup finds namespaces by those names.
        std::fs::create_dir_all(format!("/etc/netns/{name}")).map_err(|e| e.to_string())?;
        let _ = ip(&["netns", "del", name]);
        let made = self.connect(name, &host_end, &address);
        if made.is_err() {
            Self::remove(name);
        }
        made.map(|()| address)
    }

    fn connect(&self, name: &str, host_end: &str, address: &str) -> Result<(), String> {
        ip(&["netns", "add", name])?;
        ip(&["link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", name])?;
        ip(&["link", "set", host_end, "master", &self.bridge, "up"])?;
        for args in [
            vec!["addr", "add", &format!("{address}/24"), "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
            vec!["link", "set", "lo", "up"],
            vec!["route", "add", "default", "via", &format!("{}.1", self.prefix)],
        ] {
            let mut all = vec!["-n", name];
            all.extend(args.iter().map(|a| &**a));
            ip(&all)?;
        }
        Ok(())
    }

    fn remove(name: &str) {
        let _ = ip(&["netns", "del", name]);
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{name}"));
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// A process in a network namespace of its own, with the hosts file the Pods have: for what
/// runs in a Pod in a real cluster and is started by hand here (the operator).
pub struct HostProcess {
    child: Child,
    netns: String,
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        PodNetwork::remove(&self.netns);
    }
}

struct Running {
    child: Option<Child>,
    netns: String,
    ip: String,
    restarts: u32,
    ready: bool,
    /// When SIGTERM was sent.
    terminating: Option<Instant>,
    /// When an exited container may start again (restartPolicy Always).
    restart_at: Option<Instant>,
    /// Consecutive readiness probe failures, and when the next probe is due.
    probe_failures: u32,
    next_probe: Instant,
    /// When its Secret volumes are next brought up to date.
    next_secret_sync: Instant,
}

/// How often a running Pod's Secret volumes follow their Secrets. The kubelet's is its sync
/// period, a minute, plus its Secret cache's TTL; shorter here for tests' sake, but never at once,
/// so that nothing may count on a Secret's change being seen immediately.
const SECRET_SYNC: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Shared {
    nodes: BTreeMap<String, NodeSpec>,
    /// Nodes whose kubelet is stopped.
    stopped: BTreeSet<String>,
    /// By Pod uid.
    running: BTreeMap<String, Running>,
    /// Pods to evict (node pressure), by namespace/name.
    evict: BTreeSet<(String, String)>,
    /// The hosts file every namespace gets.
    hosts: String,
    /// Longest grace period honoured (a test need not wait 60 s).
    max_grace: Duration,
    /// Where Pods' Secret volumes are projected: `<dir>/<pod uid>/<volume>`.
    volumes: PathBuf,
    stop: bool,
}

/// The scheduler and the kubelets of a set of nodes, running as a background task.
pub struct Nodes {
    api: MemoryApi,
    shared: Arc<Mutex<Shared>>,
    network: Arc<PodNetwork>,
    logs: PathBuf,
    task: Option<std::thread::JoinHandle<()>>,
    host_processes: Mutex<u32>,
}

impl Nodes {
    /// Starts on the current tokio runtime; Pods' output goes to `logs/<namespace>_<pod>.log`.
    pub fn start(api: &MemoryApi, network: Arc<PodNetwork>, images: BTreeMap<String, Image>, logs: &Path) -> Self {
        std::fs::create_dir_all(logs).unwrap();
        api.hold_pod_deletions();
        let volumes = logs.join("..pod-volumes");
        std::fs::create_dir_all(&volumes).unwrap();
        let shared = Arc::new(Mutex::new(Shared { max_grace: Duration::from_secs(10), volumes, ..Shared::default() }));
        // A thread of its own: the kubelet runs commands (`ip`) and probes that block, which
        // must not hold up the test's runtime (where the API may be served).
        let task = {
            let (client, shared, network, logs) = (api.client(), shared.clone(), network.clone(), logs.to_owned());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
                runtime.block_on(async move {
                    while !lock(&shared).stop {
                        if let Err(e) = tick(&client, &shared, &network, &images, &logs).await {
                            eprintln!("kubelet: {e}");
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                })
            })
        };
        Self {
            api: api.clone(),
            shared,
            network,
            logs: logs.to_owned(),
            task: Some(task),
            host_processes: Mutex::new(0),
        }
    }

    /// Registers a node (its Node object too: Ready, with hostname and zone labels).
    pub async fn add_node(&self, node: NodeSpec) {
        let mut labels = node.labels.clone();
        labels.insert("kubernetes.io/hostname".into(), node.name.clone());
        labels.insert("topology.kubernetes.io/zone".into(), node.zone.clone());
        let nodes: Api<Node> = Api::all(self.api.client());
        let object = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name, "labels": labels}});
        nodes.patch(&node.name, &PatchParams::apply("kubelet"), &Patch::Apply(object)).await.unwrap();
        let status = json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
                                       "addresses": [{"type": "InternalIP", "address": self.network.gateway()}]}});
        nodes.patch_status(&node.name, &PatchParams::default(), &Patch::Merge(status)).await.unwrap();
        lock(&self.shared).nodes.insert(node.name.clone(), node);
    }

    /// A node-pressure eviction: the kubelet kills the Pod's container and marks it Failed,
    /// reason Evicted. The Pod object stays, for its owner to replace.
    pub fn evict(&self, namespace: &str, pod: &str) {
        lock(&self.shared).evict.insert((namespace.into(), pod.into()));
    }

    /// Stops (or starts again) a node's kubelet: nothing starts there meanwhile.
    /// The node's status follows, as the node lifecycle controller makes it once the kubelet's
    /// heartbeats stop: Ready `Unknown` and the `unreachable` taints (at once here, not after the
    /// 40 s grace), and back to Ready without them when it runs again.
    pub async fn set_kubelet_running(&self, node: &str, running: bool) {
        {
            let mut shared = lock(&self.shared);
            if running {
                shared.stopped.remove(node);
            } else {
                shared.stopped.insert(node.into());
            }
        }
        let nodes: Api<Node> = Api::all(self.api.client());
        let now = crate::now();
        let (ready, reason, taints) = if running {
            ("True", "KubeletReady", json!([]))
        } else {
            let taint =
                |effect: &str| json!({"key": "node.kubernetes.io/unreachable", "effect": effect, "timeAdded": now});
            ("Unknown", "NodeStatusUnknown", json!([taint("NoSchedule"), taint("NoExecute")]))
        };
        let status = json!({"status": {"conditions": [{"type": "Ready", "status": ready, "reason": reason,
                                                       "lastTransitionTime": now}]}});
        nodes.patch_status(node, &PatchParams::default(), &Patch::Merge(status)).await.unwrap();
        nodes.patch(node, &PatchParams::default(), &Patch::Merge(json!({"spec": {"taints": taints}}))).await.unwrap();
    }

    /// The addresses (`IP:port`) of the ready Pods a Service selects, as its Endpoints list them.
    pub async fn endpoints(&self, namespace: &str, service: &str) -> Vec<String> {
        let services: Api<Service> = Api::namespaced(self.api.client(), namespace);
        let Ok(service) = services.get(service).await else { return Vec::new() };
        let spec = service.spec.unwrap_or_default();
        let selector = spec.selector.unwrap_or_default();
        let port = spec.ports.unwrap_or_default().first().map(|p| p.port).unwrap_or(80);
        let pods: Api<Pod> = Api::namespaced(self.api.client(), namespace);
        let mut out = Vec::new();
        for pod in pods.list(&ListParams::default()).await.unwrap().items {
            let labels = pod.metadata.labels.clone().unwrap_or_default();
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let selected = selector.iter().all(|(k, v)| labels.get(k) == Some(v));
            if selected && ready && pod.metadata.deletion_timestamp.is_none() {
                if let Some(ip) = pod.status.and_then(|s| s.pod_ip) {
                    out.push(format!("{ip}:{port}"));
                }
            }
        }
        out
    }

    /// Runs `command` as a process in a network namespace of its own, resolving names as Pods
    /// do (for the operator, which talks to datanodes by their DNS names). Its output goes to
    /// `logs/<name>.log`. Killed on drop.
    pub fn host_process(&self, name: &str, command: &mut Command) -> HostProcess {
        let netns = {
            let mut n = self.host_processes.lock().unwrap();
            *n += 1;
            format!("{}h{n}", self.network.bridge)
        };
        self.network.add(&netns).expect("network namespace");
        let hosts = lock(&self.shared).hosts.clone();
        write_hosts(&netns, &hosts);
        let log = std::fs::File::create(self.logs.join(format!("{name}.log"))).unwrap();
        let mut wrapped = Command::new("ip");
        wrapped.args(["netns", "exec", &netns]).arg(command.get_program()).args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(v) => wrapped.env(key, v),
                None => wrapped.env_remove(key),
            };
        }
        die_with_parent(&mut wrapped);
        let child = wrapped.stdout(log.try_clone().unwrap()).stderr(log).spawn().expect("ip netns exec");
        HostProcess { child, netns }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        // The kubelet stops first (it may be starting a Pod), then what it ran goes.
        lock(&self.shared).stop = true;
        if let Some(task) = self.task.take() {
            let _ = task.join();
        }
        let mut shared = lock(&self.shared);
        for (_, mut running) in std::mem::take(&mut shared.running) {
            if let Some(child) = running.child.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
            PodNetwork::remove(&running.netns);
        }
        // Host processes' namespaces go with their handles; leftovers by name prefix.
        if let Ok(entries) = std::fs::read_dir("/etc/netns") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&format!("{}p", self.network.bridge)) {
                    PodNetwork::remove(&name);
                }
            }
        }
    }
}

/// A process started here is killed when the thread that started it ends (a test killed before
/// its cleanup ran leaves no Pod process behind).
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only the async-signal-safe prctl is called.
    unsafe {
        command.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(std::io::Error::from)
        });
    }
}

/// The shared state, also after a panic elsewhere (cleanup must still run).
fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes a namespace's hosts file in place (the same inode stays bind-mounted over
/// `/etc/hosts` in processes already running there).
fn write_hosts(netns: &str, hosts: &str) {
    let path = format!("/etc/netns/{netns}/hosts");
    if let Ok(mut file) = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(path) {
        let _ = file.write_all(hosts.as_bytes());
    }
}

/// A started Pod's conditions, whole (a merge patch replaces the list): scheduled and
/// initialized, its containers and itself ready or not.
fn pod_conditions(ready: bool) -> Value {
    json!([
        condition("PodScheduled", true),
        condition("Initialized", true),
        condition("ContainersReady", ready),
        condition("Ready", ready)
    ])
}

fn condition(kind: &str, status: bool) -> Value {
    json!({"type": kind, "status": if status { "True" } else { "False" }})
}

/// Whether `node` may run `pod`: node name, required node affinity, node selector, cordon and
/// NoSchedule taints. `Err` says why not.
fn fits(pod: &Value, node: &Value) -> Result<(), String> {
    let name = node["metadata"]["name"].as_str().unwrap_or_default();
    let labels = &node["metadata"]["labels"];
    if let Some(wanted) = pod["spec"]["nodeName"].as_str() {
        if wanted != name {
            return Err("another node".into());
        }
    }
    for (k, v) in pod["spec"]["nodeSelector"].as_object().into_iter().flatten() {
        if &labels[k] != v {
            return Err(format!("node selector {k}={v}"));
        }
    }
    let terms =
        &pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
    if let Some(terms) = terms.as_array() {
        let term_fits = |term: &Value| {
            let fields = term["matchFields"].as_array().cloned().unwrap_or_default();
            let expressions = term["matchExpressions"].as_array().cloned().unwrap_or_default();
            // An empty term selects no node.
            if fields.is_empty() && expressions.is_empty() {
                return false;
            }
            let values = |e: &Value| -> Vec<String> {
                e["values"].as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect()
            };
            let field_ok = fields.iter().all(|e| {
                let has = values(e).iter().any(|v| v == name);
                e["key"] == "metadata.name"
                    && match e["operator"].as_str() {
                        Some("In") => has,
                        Some("NotIn") => !has,
                        _ => false,
                    }
            });
            let labels_ok = expressions.iter().all(|e| crate::selector::requirement_matches(labels, e));
            field_ok && labels_ok
        };
        if !terms.iter().any(term_fits) {
            return Err("node affinity".into());
        }
    }
    // As the scheduler matches a toleration to a taint: the same effect (or none given), the
    // same key (an empty key with Exists: every key), and with Equal (the default) the same value.
    let tolerates = |taint: &Value| {
        pod["spec"]["tolerations"].as_array().into_iter().flatten().any(|t| {
            let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            let effect_ok = text(&t["effect"]).is_empty() || t["effect"] == taint["effect"];
            let exists = t["operator"] == "Exists";
            let key_ok = if text(&t["key"]).is_empty() { exists } else { t["key"] == taint["key"] };
            effect_ok && key_ok && (exists || text(&t["value"]) == text(&taint["value"]))
        })
    };
    let cordon = json!({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"});
    if node["spec"]["unschedulable"] == true && !tolerates(&cordon) {
        return Err("node is unschedulable (cordoned)".into());
    }
    for taint in node["spec"]["taints"].as_array().into_iter().flatten() {
        let effect = taint["effect"].as_str().unwrap_or_default();
        if (effect == "NoSchedule" || effect == "NoExecute") && !tolerates(taint) {
            return Err(format!("untolerated taint {}", taint["key"]));
        }
    }
    Ok(())
}

/// HTTP GET `path` on `ip:port`: whether it answers 2xx/3xx within half a second.
/// An HTTP GET probe: 2xx or 3xx passes. `https`: over TLS without checking the certificate,
/// as the kubelet probes (Kubernetes documents that HTTPS probes skip verification).
fn probe(ip: &str, port: u64, path: &str, https: bool) -> bool {
    let Ok(address) = format!("{ip}:{port}").parse::<std::net::SocketAddr>() else { return false };
    let Ok(stream) = std::net::TcpStream::connect_timeout(&address, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = stream.set_write_timeout(Some(Duration::from_millis(500)));
    let request = format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n");
    fn answered(mut stream: impl Read + Write, request: &str) -> bool {
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).is_ok() && matches!(head[9], b'2' | b'3')
    }
    if !https {
        return answered(stream, &request);
    }
    let Ok(name) = rustls::pki_types::ServerName::try_from(ip.to_owned()) else { return false };
    let Ok(connection) = rustls::ClientConnection::new(crate::unchecked_tls_client(), name) else { return false };
    answered(rustls::StreamOwned::new(connection, stream), &request)
}

/// One round of the scheduler and the kubelets.
async fn tick(
    client: &kube::Client,
    shared: &Arc<Mutex<Shared>>,
    network: &PodNetwork,
    images: &BTreeMap<String, Image>,
    logs: &Path,
) -> Result<(), String> {
    let nodes = list_all::<Node>(client).await?;
    let pods = list_all::<Pod>(client).await?;
    let services = list_all::<Service>(client).await?;
    let secrets = crate::secret_volume::decode(&list_all::<k8s_openapi::api::core::v1::Secret>(client).await?);
    let namespaced = |ns: &str| Api::<Pod>::namespaced(client.clone(), ns);
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();

    // Containers of Pods that are gone (force-deleted) stop.
    let present: BTreeSet<String> = pods.iter().map(|p| text(&p["metadata"]["uid"])).collect();
    {
        let mut s = lock(shared);
        let gone: Vec<String> = s.running.keys().filter(|uid| !present.contains(*uid)).cloned().collect();
        for uid in gone {
            let mut running = s.running.remove(&uid).expect("listed");
            if let Some(child) = running.child.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
            PodNetwork::remove(&running.netns);
        }
        // And their Secret volumes.
        for entry in std::fs::read_dir(&s.volumes).into_iter().flatten().flatten() {
            if !present.contains(entry.file_name().to_string_lossy().as_ref()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    for pod in &pods {
        let (ns, name, uid) =
            (text(&pod["metadata"]["namespace"]), text(&pod["metadata"]["name"]), text(&pod["metadata"]["uid"]));
        let deleting = !pod["metadata"]["deletionTimestamp"].is_null();
        let phase = text(&pod["status"]["phase"]);
        let ended = phase == "Succeeded" || phase == "Failed";
        let node_name = pod["spec"]["nodeName"].as_str().map(str::to_owned);

        // The scheduler.
        let Some(node_name) = node_name else {
            if deleting {
                let _ = namespaced(&ns).delete(&name, &gone(&uid)).await;
                continue;
            }
            let mut why = Vec::new();
            let chosen = nodes.iter().find(|n| match fits(pod, n) {
                Ok(()) => true,
                Err(e) => {
                    why.push(format!("{}: {e}", text(&n["metadata"]["name"])));
                    false
                }
            });
            let patch = match chosen {
                Some(node) => json!({"metadata": {"uid": uid}, "spec": {"nodeName": node["metadata"]["name"]}}),
                None => {
                    let message = format!("0/{} nodes are available: {}", nodes.len(), why.join("; "));
                    let mut unschedulable = condition("PodScheduled", false);
                    unschedulable["reason"] = json!("Unschedulable");
                    unschedulable["message"] = json!(message);
                    if pod["status"]["conditions"] == json!([unschedulable]) {
                        continue;
                    }
                    let status = json!({"metadata": {"uid": uid}, "status": {"phase": "Pending", "conditions": [unschedulable]}});
                    namespaced(&ns)
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                        .await
                        .map_err(|e| e.to_string())?;
                    continue;
                }
            };
            namespaced(&ns)
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .map_err(|e| e.to_string())?;
            continue;
        };

        // The kubelet of that node.
        let (spec, stopped, evict) = {
            let mut s = lock(shared);
            let evict = s.evict.remove(&(ns.clone(), name.clone()));
            (s.nodes.get(&node_name).cloned(), s.stopped.contains(&node_name), evict)
        };
        let Some(node) = spec else { continue };
        if stopped {
            continue;
        }
        let container = &pod["spec"]["containers"][0];
        let mut status_patch: Option<Value> = None;
        if deleting || evict {
            // The grace period the deletion asked for (kubectl delete --grace-period, an
            // eviction's options), else the Pod's own.
            let grace = pod["metadata"]["deletionGracePeriodSeconds"]
                .as_u64()
                .or(pod["spec"]["terminationGracePeriodSeconds"].as_u64())
                .unwrap_or(30);
            let grace = Duration::from_secs(grace);
            let done = {
                let mut s = lock(shared);
                let max_grace = s.max_grace;
                match s.running.get_mut(&uid) {
                    Some(running) => {
                        let exited = running.child.as_mut().is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))));
                        let since = *running.terminating.get_or_insert_with(|| {
                            if let Some(child) = running.child.as_ref() {
                                let _ = rustix::process::kill_process(
                                    rustix::process::Pid::from_raw(child.id() as i32).expect("pid"),
                                    rustix::process::Signal::TERM,
                                );
                            }
                            Instant::now()
                        });
                        if exited || evict || since.elapsed() >= grace.min(max_grace) {
                            let mut running = s.running.remove(&uid).expect("present");
                            if let Some(child) = running.child.as_mut() {
                                let _ = child.kill();
                                let _ = child.wait();
                            }
                            PodNetwork::remove(&running.netns);
                            true
                        } else {
                            false
                        }
                    }
                    None => true,
                }
            };
            if done && evict && !deleting {
                let mut terminated = container_status(container, pod, 0, false);
                terminated["state"] = json!({"terminated": {"exitCode": 137, "reason": "Error"}});
                let mut conditions = pod_conditions(false);
                if let Some(list) = conditions.as_array_mut() {
                    list.push(json!({"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                                     "message": "The node was low on resource: ephemeral-storage."}));
                }
                status_patch = Some(json!({"status": {"phase": "Failed", "reason": "Evicted",
                    "message": "The node was low on resource: ephemeral-storage.",
                    "conditions": conditions, "containerStatuses": [terminated]}}));
            } else if done && deleting {
                let _ = namespaced(&ns).delete(&name, &gone(&uid)).await;
                continue;
            }
        } else if ended {
            continue;
        } else {
            let mut s = lock(shared);
            let volumes_root = s.volumes.clone();
            if let Some(running) = s.running.get_mut(&uid).filter(|r| r.next_secret_sync <= Instant::now()) {
                // The periodic sync: a running Pod's Secret volumes follow their Secrets (one
                // deleted or broken meanwhile leaves the files as they were).
                running.next_secret_sync = Instant::now() + SECRET_SYNC;
                if let Err(e) = project_secret_volumes(pod, &secrets, &volumes_root.join(&uid)) {
                    eprintln!("kubelet: {ns}/{name}: {e}");
                }
            }
            let restart_policy = pod["spec"]["restartPolicy"].as_str().unwrap_or("Always").to_owned();
            match s.running.get_mut(&uid) {
                None => {
                    drop(s);
                    status_patch = Some(start(pod, &node, shared, network, images, logs, &secrets));
                }
                Some(running) => {
                    let exited = running.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                    if let Some(exit) = exited {
                        running.child = None;
                        running.ready = false;
                        let code = exit.code().unwrap_or(137);
                        if restart_policy == "Always" || (restart_policy == "OnFailure" && code != 0) {
                            running.restarts += 1;
                            // The kubelet's back-off: 10 s, doubled at each exit, at most 5 min.
                            let backoff =
                                Duration::from_secs(10 << (running.restarts - 1).min(5)).min(Duration::from_secs(300));
                            running.restart_at = Some(Instant::now() + backoff);
                            let mut waiting = container_status(container, pod, running.restarts, false);
                            waiting["state"] = json!({"waiting": {"reason": "CrashLoopBackOff"}});
                            waiting["lastState"] = json!({"terminated": {"exitCode": code}});
                            status_patch = Some(json!({"status": {"conditions": pod_conditions(false),
                                "containerStatuses": [waiting]}}));
                        } else {
                            let mut terminated = container_status(container, pod, running.restarts, false);
                            terminated["state"] = json!({"terminated": {"exitCode": code,
                                "reason": if code == 0 { "Completed" } else { "Error" }}});
                            let netns = running.netns.clone();
                            s.running.remove(&uid);
                            PodNetwork::remove(&netns);
                            status_patch =
                                Some(json!({"status": {"phase": if code == 0 { "Succeeded" } else { "Failed" },
                                "conditions": pod_conditions(false),
                                "containerStatuses": [terminated]}}));
                        }
                    } else if running.child.is_none() {
                        if running.restart_at.is_some_and(|t| Instant::now() >= t) {
                            running.restart_at = None;
                            match spawn(pod, &node, &running.netns, &running.ip, images, logs, &volumes_root) {
                                Ok(child) => running.child = Some(child),
                                Err(e) => eprintln!("kubelet: restarting {ns}/{name}: {e}"),
                            }
                        }
                    } else {
                        // The readiness probe every periodSeconds (10); Ready at the first success,
                        // not ready after failureThreshold (3) failures in a row.
                        let spec = &container["readinessProbe"];
                        let probe_of = &spec["httpGet"];
                        let ready = if probe_of.is_null() {
                            true
                        } else if Instant::now() < running.next_probe {
                            running.ready
                        } else {
                            running.next_probe =
                                Instant::now() + Duration::from_secs(spec["periodSeconds"].as_u64().unwrap_or(10));
                            let port = match &probe_of["port"] {
                                Value::Number(n) => n.as_u64(),
                                Value::String(name) => container["ports"]
                                    .as_array()
                                    .into_iter()
                                    .flatten()
                                    .find(|p| &p["name"] == name)
                                    .and_then(|p| p["containerPort"].as_u64()),
                                _ => None,
                            };
                            let passed = port.is_some_and(|port| {
                                let path = probe_of["path"].as_str().unwrap_or("/");
                                probe(&running.ip, port, path, probe_of["scheme"] == "HTTPS")
                            });
                            running.probe_failures = if passed { 0 } else { running.probe_failures + 1 };
                            passed
                                || (running.ready
                                    && running.probe_failures < spec["failureThreshold"].as_u64().unwrap_or(3) as u32)
                        };
                        let was = crate::pod_ready(pod);
                        running.ready = ready;
                        if ready != was {
                            status_patch = Some(json!({"status": {"phase": "Running", "podIP": running.ip,
                                "conditions": pod_conditions(ready),
                                "containerStatuses": [container_status(container, pod, running.restarts, ready)]}}));
                        }
                    }
                }
            }
        }
        if let Some(mut patch) = status_patch {
            // For this Pod only, not one re-created under its name meanwhile.
            patch["metadata"] = json!({"uid": uid});
            if let Err(e) = namespaced(&ns).patch_status(&name, &PatchParams::default(), &Patch::Merge(patch)).await {
                eprintln!("kubelet: status of {ns}/{name}: {e}");
            }
        }
    }

    // DNS as CoreDNS answers it, for every namespace.
    let mut hosts = String::from("127.0.0.1 localhost\n");
    {
        let s = lock(shared);
        for pod in &pods {
            let uid = text(&pod["metadata"]["uid"]);
            let Some(running) = s.running.get(&uid) else { continue };
            let (hostname, subdomain, ns) =
                (text(&pod["spec"]["hostname"]), text(&pod["spec"]["subdomain"]), text(&pod["metadata"]["namespace"]));
            if hostname.is_empty() || subdomain.is_empty() {
                continue;
            }
            let headless = services.iter().any(|svc| {
                svc["metadata"]["namespace"] == ns.as_str()
                    && svc["metadata"]["name"] == subdomain.as_str()
                    && svc["spec"]["clusterIP"] == "None"
                    && svc["spec"]["selector"]
                        .as_object()
                        .is_some_and(|sel| sel.iter().all(|(k, v)| &pod["metadata"]["labels"][k] == v))
            });
            if headless {
                let fqdn = format!("{hostname}.{subdomain}.{ns}.svc");
                hosts += &format!("{} {fqdn}.cluster.local {fqdn}\n", running.ip);
            }
        }
    }
    let mut s = lock(shared);
    if s.hosts != hosts {
        s.hosts = hosts.clone();
        let namespaces: Vec<String> = s.running.values().map(|r| r.netns.clone()).collect();
        drop(s);
        for netns in namespaces {
            write_hosts(&netns, &hosts);
        }
        if let Ok(entries) = std::fs::read_dir("/etc/netns") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&format!("{}h", network.bridge)) {
                    write_hosts(&name, &hosts);
                }
            }
        }
    }
    Ok(())
}

/// Delete options confirming that a Pod's containers are gone: grace period 0, for the Pod with
/// this uid only.
fn gone(uid: &str) -> DeleteParams {
    DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(kube::api::Preconditions { uid: Some(uid.to_owned()), resource_version: None }),
        ..Default::default()
    }
}

/// Every object of a kind, as JSON.
async fn list_all<K>(client: &kube::Client) -> Result<Vec<Value>, String>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let list = Api::<K>::all(client.clone()).list(&ListParams::default()).await.map_err(|e| e.to_string())?;
    Ok(list.items.into_iter().map(|o| serde_json::to_value(o).expect("JSON")).collect())
}

fn container_status(container: &Value, pod: &Value, restarts: u32, ready: bool) -> Value {
    json!({"name": container["name"], "image": container["image"], "imageID": "", "ready": ready,
           "started": true, "restartCount": restarts, "state": {"running": {"startedAt": pod["metadata"]["creationTimestamp"]}}})
}

/// Starts a Pod on `node`: its network namespace, then its container. The status to write.
fn start(
    pod: &Value,
    node: &NodeSpec,
    shared: &Arc<Mutex<Shared>>,
    network: &PodNetwork,
    images: &BTreeMap<String, Image>,
    logs: &Path,
    secrets: &crate::secret_volume::Secrets,
) -> Value {
    let container = &pod["spec"]["containers"][0];
    // `type: Directory` hostPaths must exist: until then the Pod waits, as a kubelet makes it.
    for volume in pod["spec"]["volumes"].as_array().into_iter().flatten() {
        let host = &volume["hostPath"];
        if host["type"] == "Directory" && !node.host_path(host["path"].as_str().unwrap_or_default()).is_dir() {
            let mut waiting = container_status(container, pod, 0, false);
            waiting["started"] = json!(false);
            waiting["state"] = json!({"waiting": {"reason": "ContainerCreating"}});
            return json!({"status": {"phase": "Pending", "message": format!("hostPath type check failed: {} is not a directory", host["path"]),
                "conditions": [condition("PodScheduled", true)], "containerStatuses": [waiting]}});
        }
    }
    let uid = pod["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
    let volumes_root = lock(shared).volumes.clone();
    if let Err(message) = project_secret_volumes(pod, secrets, &volumes_root.join(&uid)) {
        let mut waiting = container_status(container, pod, 0, false);
        waiting["started"] = json!(false);
        waiting["state"] = json!({"waiting": {"reason": "ContainerCreating"}});
        return json!({"status": {"phase": "Pending", "message": message,
            "conditions": [condition("PodScheduled", true)], "containerStatuses": [waiting]}});
    }
    let netns = format!("{}p{}", network.bridge, &uid[uid.len().saturating_sub(6)..]);
    let address = match network.add(&netns) {
        Ok(address) => address,
        Err(e) => return json!({"status": {"phase": "Pending", "message": e}}),
    };
    let hosts = lock(shared).hosts.clone();
    write_hosts(&netns, &hosts);
    let child = match spawn(pod, node, &netns, &address, images, logs, &volumes_root) {
        Ok(child) => child,
        Err(e) => {
            PodNetwork::remove(&netns);
            return json!({"status": {"phase": "Pending", "message": e}});
        }
    };
    lock(shared).running.insert(
        uid,
        Running {
            child: Some(child),
            netns,
            ip: address.clone(),
            restarts: 0,
            ready: false,
            terminating: None,
            restart_at: None,
            probe_failures: 0,
            next_probe: Instant::now(),
            next_secret_sync: Instant::now() + SECRET_SYNC,
        },
    );
    json!({"status": {"phase": "Running", "podIP": address, "podIPs": [{"ip": address}], "hostIP": network.gateway(),
        "startTime": pod["metadata"]["creationTimestamp"],
        "conditions": pod_conditions(false),
        "containerStatuses": [container_status(container, pod, 0, false)]}})
}

/// Projects the Pod's Secret volumes into `dir/<volume>` ([`crate::secret_volume`]); the
/// kubelet's `MountVolume.SetUp failed` message for the first that cannot be.
fn project_secret_volumes(pod: &Value, secrets: &crate::secret_volume::Secrets, dir: &Path) -> Result<(), String> {
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let fs_group = pod["spec"]["securityContext"]["fsGroup"].as_u64().map(|g| g as u32);
    for volume in pod["spec"]["volumes"].as_array().into_iter().flatten() {
        let source = &volume["secret"];
        if !source.is_object() {
            continue;
        }
        let name = volume["name"].as_str().unwrap_or_default();
        let failed = |e: String| format!("MountVolume.SetUp failed for volume \"{name}\" : {e}");
        match crate::secret_volume::files(namespace, source, secrets).map_err(failed)? {
            Some(files) => {
                crate::secret_volume::project(&dir.join(name), &files, fs_group).map_err(|e| failed(e.to_string()))?;
            }
            // An optional volume of a missing Secret: an empty directory.
            None => std::fs::create_dir_all(dir.join(name)).map_err(|e| failed(e.to_string()))?,
        }
    }
    Ok(())
}

/// The container's process, in the Pod's network namespace: a fresh `/run`, its hostPath
/// volumes bind-mounted at their mount paths, its environment, its image's binary.
fn spawn(
    pod: &Value,
    node: &NodeSpec,
    netns: &str,
    address: &str,
    images: &BTreeMap<String, Image>,
    logs: &Path,
    volumes_root: &Path,
) -> Result<Child, String> {
    let container = &pod["spec"]["containers"][0];
    let image_name = container["image"].as_str().unwrap_or_default();
    let image = images.get(image_name).ok_or_else(|| format!("ErrImagePull: no image {image_name:?}"))?;
    let strings = |v: &Value| -> Vec<String> {
        v.as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect()
    };
    let mut argv = strings(&container["command"]);
    if argv.is_empty() {
        argv.push(image.entrypoint.clone());
    }
    if !argv[0].starts_with('/') {
        argv[0] = image.bin_dir.join(&argv[0]).display().to_string();
    }
    argv.extend(strings(&container["args"]));
    let mut script = String::from("set -e; mount -t tmpfs cairn-pod-run /run; ");
    let volumes: BTreeMap<String, &Value> = pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| (v["name"].as_str().unwrap_or_default().to_owned(), v))
        .collect();
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let Some(volume) = volumes.get(mount["name"].as_str().unwrap_or_default()) else { continue };
        let target = mount["mountPath"].as_str().unwrap_or_default();
        if volume["secret"].is_object() {
            // Read-only, as the kubelet mounts every Secret volume.
            let source = volumes_root
                .join(pod["metadata"]["uid"].as_str().unwrap_or_default())
                .join(volume["name"].as_str().unwrap_or_default());
            if source.is_dir() {
                script += &format!(
                    "mkdir -p '{target}'; mount --bind '{}' '{target}'; mount -o remount,bind,ro '{target}'; ",
                    source.display()
                );
            }
            continue;
        }
        let Some(path) = volume["hostPath"]["path"].as_str() else { continue };
        let source = node.host_path(path);
        if source != Path::new(target) {
            script += &format!("mkdir -p '{target}'; mount --bind '{}' '{target}'; ", source.display());
        }
    }
    // The container's user, as the kubelet sets it: the container's securityContext over the
    // Pod's; runAsNonRoot with no user or user 0 is refused (the images here declare no user).
    let security = |key: &str| {
        let own = &container["securityContext"][key];
        if own.is_null() {
            pod["spec"]["securityContext"][key].clone()
        } else {
            own.clone()
        }
    };
    let uid = security("runAsUser").as_u64();
    if security("runAsNonRoot") == true && uid.unwrap_or(0) == 0 {
        return Err("CreateContainerConfigError: container has runAsNonRoot and image will run as root".into());
    }
    match uid.filter(|u| *u != 0) {
        Some(uid) => {
            let gid = security("runAsGroup").as_u64().unwrap_or(0);
            script += &format!("exec setpriv --reuid={uid} --regid={gid} --clear-groups \"$0\" \"$@\"");
        }
        None => script += "exec \"$0\" \"$@\"",
    }
    let log_path = logs.join(format!(
        "{}_{}.log",
        pod["metadata"]["namespace"].as_str().unwrap_or_default(),
        pod["metadata"]["name"].as_str().unwrap_or_default()
    ));
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(|e| e.to_string())?;
    let mut command = Command::new("ip");
    command.args(["netns", "exec", netns, "sh", "-c", &script]).args(&argv).env_clear();
    command.env("PATH", format!("{}:/usr/local/bin:/usr/bin:/bin", image.bin_dir.display()));
    command.env("HOSTNAME", pod["spec"]["hostname"].as_str().or(pod["metadata"]["name"].as_str()).unwrap_or_default());
    for env in container["env"].as_array().into_iter().flatten() {
        let name = env["name"].as_str().unwrap_or_default();
        let value = match (&env["value"], env["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
            (Value::String(v), _) => v.clone(),
            (_, Some("metadata.name")) => pod["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
            (_, Some("metadata.namespace")) => pod["metadata"]["namespace"].as_str().unwrap_or_default().to_owned(),
            (_, Some("spec.nodeName")) => node.name.clone(),
            (_, Some("status.podIP")) => address.to_owned(),
            _ => continue,
        };
        command.env(name, value);
    }
    command.stdin(Stdio::null()).stdout(log.try_clone().map_err(|e| e.to_string())?).stderr(log);
    die_with_parent(&mut command);
    command.spawn().map_err(|e| format!("ip netns exec: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_map_by_whole_components() {
        let spec = NodeSpec {
            host_paths: vec![("/run/cairn".into(), "/t/run".into()), ("/run/cairn-admin".into(), "/t/admin".into())],
            ..NodeSpec::default()
        };
        assert_eq!(spec.host_path("/run/cairn"), PathBuf::from("/t/run"));
        assert_eq!(spec.host_path("/run/cairn/disk-agent.sock"), PathBuf::from("/t/run/disk-agent.sock"));
        assert_eq!(spec.host_path("/run/cairn-admin/disk-agent.sock"), PathBuf::from("/t/admin/disk-agent.sock"));
        assert_eq!(spec.host_path("/var/lib/x"), PathBuf::from("/var/lib/x"));
    }

    fn node(name: &str, taints: Value, unschedulable: bool) -> Value {
        json!({"metadata": {"name": name, "labels": {"zone": "a", "cores": "8"}},
               "spec": {"taints": taints, "unschedulable": unschedulable}})
    }

    fn pod(affinity_term: Value, tolerations: Value) -> Value {
        json!({"spec": {"tolerations": tolerations, "affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [affinity_term]}}}}})
    }

    /// The scheduler's rules: node affinity terms (empty ones select nothing), and tolerations
    /// matched to taints by effect, key and value as upstream matches them.
    #[test]
    fn scheduling_follows_affinity_and_tolerations() {
        let on = |name: &str| json!({"matchFields": [{"key": "metadata.name", "operator": "In", "values": [name]}]});
        let free = node("n1", json!([]), false);
        assert!(fits(&pod(on("n1"), json!([])), &free).is_ok());
        assert!(fits(&pod(on("n2"), json!([])), &free).is_err());
        let not_n1 = json!({"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["n1"]}]});
        assert!(fits(&pod(not_n1, json!([])), &free).is_err());
        assert!(fits(&pod(json!({}), json!([])), &free).is_err(), "an empty term selects no node");
        let big = json!({"matchExpressions": [{"key": "cores", "operator": "Gt", "values": ["4"]}]});
        assert!(fits(&pod(big, json!([])), &free).is_ok());

        let tainted = node("n1", json!([{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]), false);
        let equal = |value: &str| json!([{"key": "dedicated", "operator": "Equal", "value": value}]);
        assert!(fits(&pod(on("n1"), equal("db")), &tainted).is_ok());
        assert!(fits(&pod(on("n1"), equal("web")), &tainted).is_err(), "another value is not tolerated");
        assert!(fits(&pod(on("n1"), json!([{"operator": "Exists"}])), &tainted).is_ok(), "empty key + Exists: all");
        let other_effect = json!([{"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}]);
        assert!(fits(&pod(on("n1"), other_effect), &tainted).is_err());
        let cordoned = node("n1", json!([]), true);
        assert!(fits(&pod(on("n1"), json!([])), &cordoned).is_err());
        let unschedulable = json!([{"key": "node.kubernetes.io/unschedulable", "operator": "Exists"}]);
        assert!(fits(&pod(on("n1"), unschedulable), &cordoned).is_ok());
    }
}
