//! Reading a cluster for `cairn status`, `cairn disks` and `cairn topology` (also run as
//! `kubectl cairn …`): the StoreCluster and machines from Kubernetes or from a `cairn local up`
//! directory ([`Source`]), the topology and live registrations from etcd, replication progress
//! from the datanodes. Nothing here writes anything.

pub mod render;
pub mod view;

use std::collections::BTreeMap;
use std::path::PathBuf;

use cairn_cluster::admin::ReplicaUsage;
use cairn_cluster::etcd::{EtcdTls, Snapshot};
use cairn_cluster::LiveNode;
use cairn_resources::store_cluster::CapacityStatus;
use cairn_resources::{StoreCluster, StoreNode};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::ResourceExt;

use crate::desired::Machine;
use crate::kubernetes::KubernetesPlatform;
use crate::local::LocalPlatform;
use crate::local_up::LocalState;
use crate::platform::{
    capacity, datanode_admin, partition_counts, partition_list, replica_serving, retired_volumes, store_for,
    unplaced_volumes, Platform, PlatformError, ReplicaProgress, REPLICAS_PATH, USAGE_PATH,
};
use view::{CapacityView, ClusterView, ConditionView, EventView, MachineView, NodeDisks, PartitionIssue};

/// Events shown by `cairn status`.
const EVENTS_SHOWN: usize = 5;

/// Which cluster, and how to reach it (the command-line flags).
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// The StoreCluster; optional when the namespace holds exactly one.
    pub name: Option<String>,
    /// Kubernetes namespace (default: the context's, else `default`).
    pub namespace: Option<String>,
    pub context: Option<String>,
    /// Kubeconfig file (default: `KUBECONFIG`, then `~/.kube/config`, then in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// A `cairn local up` directory instead of Kubernetes.
    pub local: Option<PathBuf>,
    /// etcd endpoints to use instead of the spec's (e.g. through `kubectl port-forward`).
    pub etcd: Vec<String>,
    /// TLS for those endpoints (default: the spec's `etcd.tlsSecret`).
    pub etcd_tls: Option<EtcdTls>,
}

/// Where StoreClusters and machines are read from.
pub enum Source {
    Kubernetes {
        client: kube::Client,
        namespace: String,
        server: String,
        /// A datanode did not answer directly (outside the cluster its name does not resolve):
        /// the others are read through the API server's proxy at once.
        through_proxy: std::sync::atomic::AtomicBool,
    },
    Local {
        dir: PathBuf,
        state: Box<LocalState>,
    },
}

type Result<T> = anyhow::Result<T>;

impl Source {
    pub async fn open(selection: &Selection) -> Result<Self> {
        if let Some(dir) = &selection.local {
            let state = LocalState::load(dir)?;
            return Ok(Source::Local { dir: dir.clone(), state: Box::new(state) });
        }
        let options = KubeConfigOptions { context: selection.context.clone(), ..Default::default() };
        let config = match (&selection.kubeconfig, &selection.context) {
            (Some(path), _) => {
                let file =
                    Kubeconfig::read_from(path).map_err(|e| anyhow::anyhow!("kubeconfig {}: {e}", path.display()))?;
                kube::Config::from_custom_kubeconfig(file, &options).await.map_err(|e| anyhow::anyhow!("{e}"))?
            }
            (None, Some(_)) => kube::Config::from_kubeconfig(&options).await.map_err(|e| anyhow::anyhow!("{e}"))?,
            (None, None) => kube::Config::infer().await.map_err(|e| {
                anyhow::anyhow!(
                    "no Kubernetes configuration ({e}); set KUBECONFIG or --kubeconfig, \
                     or use --local for a `cairn local up` cluster"
                )
            })?,
        };
        let namespace = selection.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
        let server = config.cluster_url.to_string();
        let client = kube::Client::try_from(config).map_err(|e| anyhow::anyhow!("Kubernetes client: {e}"))?;
        Ok(Source::Kubernetes { client, namespace, server, through_proxy: Default::default() })
    }

    /// Reads a local cluster's state again (Kubernetes is read afresh by every call anyway).
    pub fn refresh(&mut self) -> Result<()> {
        if let Source::Local { dir, state } = self {
            **state = LocalState::load(dir)?;
        }
        Ok(())
    }

    /// The StoreCluster `name`, or the only one there is.
    pub async fn cluster(&self, name: Option<&str>) -> Result<StoreCluster> {
        match self {
            Source::Local { dir, state } => match name {
                Some(n) if Some(n) != state.cluster.metadata.name.as_deref() => {
                    anyhow::bail!("the local cluster in {} is {:?}, not {n:?}", dir.display(), state.cluster.name_any())
                }
                _ => Ok(state.cluster.clone()),
            },
            Source::Kubernetes { client, namespace, server, .. } => {
                let api: Api<StoreCluster> = Api::namespaced(client.clone(), namespace);
                if let Some(name) = name {
                    if let Some(found) = api.get_opt(name).await.map_err(|e| kube_error(server, e))? {
                        return Ok(found);
                    }
                }
                let list = api.list(&ListParams::default()).await.map_err(|e| kube_error(server, e))?;
                let names: Vec<String> = list.items.iter().map(|c| c.name_any()).collect();
                match (name, list.items.len()) {
                    (Some(name), _) => anyhow::bail!(
                        "no StoreCluster {name:?} in namespace {namespace:?} (there: {})",
                        listing(&names)
                    ),
                    (None, 1) => Ok(list.items.into_iter().next().expect("one")),
                    (None, 0) => anyhow::bail!("no StoreCluster in namespace {namespace:?} (-n selects another)"),
                    (None, _) => anyhow::bail!(
                        "namespace {namespace:?} has several StoreClusters ({}); name one",
                        names.join(", ")
                    ),
                }
            }
        }
    }

    pub async fn machines(&self, sc: &StoreCluster) -> std::result::Result<Vec<Machine>, PlatformError> {
        match self {
            Source::Kubernetes { client, .. } => {
                KubernetesPlatform { client: client.clone(), cluster: sc, caches: None }.machines().await
            }
            Source::Local { state, .. } => local_platform(state).machines().await,
        }
    }

    async fn etcd_tls(&self, sc: &StoreCluster) -> std::result::Result<Option<EtcdTls>, PlatformError> {
        match self {
            Source::Kubernetes { client, .. } => {
                KubernetesPlatform { client: client.clone(), cluster: sc, caches: None }.etcd_tls().await
            }
            Source::Local { .. } => Ok(None),
        }
    }

    /// Whether each machine's datanode Pod is Ready (Kubernetes only).
    /// A datanode admin route's JSON: from the datanode directly, or, on Kubernetes when that
    /// fails (run from outside the cluster, where the datanode's DNS name does not resolve),
    /// through the API server's proxy to its Pod (`pods/proxy`, which `get` on it allows).
    async fn datanode<T: serde::de::DeserializeOwned>(
        &self,
        sc: &StoreCluster,
        snapshot: &cairn_cluster::etcd::Snapshot,
        node: &str,
        address: &str,
        path: &str,
    ) -> Option<T> {
        use std::sync::atomic::Ordering::Relaxed;
        let proxy_only = matches!(self, Source::Kubernetes { through_proxy, .. } if through_proxy.load(Relaxed));
        if !proxy_only {
            if let Some(answer) = datanode_admin(snapshot, address, path).await {
                return Some(answer);
            }
        }
        let Source::Kubernetes { client, namespace, through_proxy, .. } = self else { return None };
        let pod = crate::kubernetes::pod_name(&sc.name_any(), node);
        // `https:` where the datanode serves HTTPS (the API server does not check its certificate).
        let scheme = if snapshot.live.get(node).is_some_and(|l| l.tls) { "https:" } else { "" };
        let port = crate::kubernetes::API_PORT;
        let uri = format!("/api/v1/namespaces/{namespace}/pods/{scheme}{pod}:{port}/proxy{path}");
        let mut request = http::Request::get(uri);
        if let Some(token) = &snapshot.node_token {
            request = request.header(cairn_cluster::access::NODE_TOKEN_HEADER, token.expose());
        }
        let request = request.body(Vec::new()).ok()?;
        let answer =
            tokio::time::timeout(std::time::Duration::from_secs(5), client.request::<T>(request)).await.ok()?.ok();
        // Direct failed and the proxy answered: the proxy is the way from here.
        if answer.is_some() {
            through_proxy.store(true, Relaxed);
        }
        answer
    }

    async fn datanode_pods(&self, sc: &StoreCluster) -> Option<std::collections::BTreeMap<String, bool>> {
        match self {
            Source::Kubernetes { client, .. } => crate::kubernetes::datanode_pods(sc, client).await.ok(),
            Source::Local { .. } => None,
        }
    }

    /// The cluster's recent events, oldest first.
    async fn events(&self, sc: &StoreCluster) -> std::result::Result<Vec<EventView>, String> {
        let mut events: Vec<EventView> = match self {
            Source::Local { state, .. } => state
                .events
                .iter()
                .map(|e| EventView {
                    time: e.time.clone(),
                    warning: e.warning,
                    reason: e.reason.clone(),
                    message: e.message.clone(),
                    count: 1,
                })
                .collect(),
            Source::Kubernetes { client, namespace, .. } => {
                let api: Api<Event> = Api::namespaced(client.clone(), namespace);
                let list = api.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
                list.items
                    .into_iter()
                    .filter(|e| {
                        e.regarding.as_ref().is_some_and(|r| {
                            r.kind.as_deref() == Some("StoreCluster")
                                && r.name.as_deref() == sc.metadata.name.as_deref()
                        })
                    })
                    .map(|e| {
                        let series = e.series.as_ref();
                        let time = series
                            .map(|s| s.last_observed_time.0.to_string())
                            .or_else(|| e.event_time.as_ref().map(|t| t.0.to_string()))
                            .or_else(|| e.deprecated_last_timestamp.as_ref().map(|t| t.0.to_string()))
                            .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()))
                            .unwrap_or_default();
                        EventView {
                            time,
                            warning: e.type_.as_deref() == Some("Warning"),
                            reason: e.reason.unwrap_or_default(),
                            message: e.note.unwrap_or_default(),
                            count: series.map(|s| s.count.max(1) as u32).unwrap_or(1),
                        }
                    })
                    .collect()
            }
        };
        events.sort_by(|a, b| a.time.cmp(&b.time));
        let excess = events.len().saturating_sub(EVENTS_SHOWN);
        events.drain(..excess);
        Ok(events)
    }

    /// Every disk agent's inventory: StoreNodes on Kubernetes, the disk agent locally.
    pub async fn disks(&self) -> Result<Vec<NodeDisks>> {
        match self {
            Source::Local { state, .. } => {
                let socket = state.machines.first().map(|m| m.agent_admin_socket.clone()).unwrap_or_default();
                let report = cairn_common::agent_client::AgentClient::new(&socket)
                    .report()
                    .await
                    .map_err(|e| anyhow::anyhow!("disk agent at {}: {e}", socket.display()))?;
                Ok(vec![NodeDisks {
                    node: "local".into(),
                    ready: None,
                    disks: report.disks,
                    excluded: report.excluded,
                    missing: report.missing,
                }])
            }
            Source::Kubernetes { client, server, .. } => {
                let api: Api<StoreNode> = Api::all(client.clone());
                let list = api.list(&ListParams::default()).await.map_err(|e| kube_error(server, e))?;
                Ok(list
                    .items
                    .into_iter()
                    .map(|n| {
                        let status = n.status.clone().unwrap_or_default();
                        let ready = status.conditions.iter().find(|c| c.type_ == "Ready").map(|c| c.status == "True");
                        NodeDisks {
                            node: n.name_any(),
                            ready,
                            disks: status.disks,
                            excluded: status.excluded,
                            missing: Vec::new(),
                        }
                    })
                    .collect())
            }
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Source::Kubernetes { .. } => "kubernetes",
            Source::Local { .. } => "local",
        }
    }
}

fn local_platform(state: &LocalState) -> LocalPlatform {
    let sc = &state.cluster;
    LocalPlatform::new(
        &sc.name_any(),
        &sc.namespace().unwrap_or_default(),
        sc.spec.etcd.endpoints.clone(),
        PathBuf::new(),
        state.machines.clone(),
    )
}

fn listing(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// A Kubernetes API error, said plainly: unreachable server, missing CRD, refused access.
fn kube_error(server: &str, error: kube::Error) -> anyhow::Error {
    match &error {
        kube::Error::Api(status) if status.code == 404 => anyhow::anyhow!(
            "the Kubernetes API at {server} has no StoreCluster/StoreNode resources: \
             is Cairn installed? (helm install cairn charts/cairn)"
        ),
        kube::Error::Api(status) if status.code == 401 || status.code == 403 => {
            anyhow::anyhow!("the Kubernetes API at {server} refused access: {}", status.message)
        }
        kube::Error::Api(status) => anyhow::anyhow!("the Kubernetes API at {server}: {}", status.message),
        _ => anyhow::anyhow!("cannot reach the Kubernetes API at {server}: {error}"),
    }
}

/// What etcd holds for the cluster, through the selection's endpoints or the spec's.
pub async fn snapshot(source: &Source, sc: &StoreCluster, selection: &Selection) -> Result<Snapshot> {
    let (endpoints, tls) = if selection.etcd.is_empty() {
        (sc.spec.etcd.endpoints.clone(), source.etcd_tls(sc).await.map_err(anyhow::Error::msg)?)
    } else {
        (selection.etcd.clone(), selection.etcd_tls.clone())
    };
    let namespace = sc.namespace().unwrap_or_default();
    let hint = match source {
        Source::Kubernetes { .. } if selection.etcd.is_empty() => {
            " (from outside the cluster, forward a port to etcd and pass --etcd http://127.0.0.1:PORT)"
        }
        _ => "",
    };
    let store = store_for(&endpoints, &namespace, &sc.name_any(), tls.as_ref())
        .await
        .map_err(|e| anyhow::anyhow!("{e}{hint}"))?;
    store.load().await.map_err(|e| anyhow::anyhow!("etcd {endpoints:?} unreachable: {e}{hint}"))
}

/// Everything `cairn status` shows. What cannot be read (etcd, a datanode, the machines) becomes
/// a warning; the status the operator wrote is always there.
pub async fn status(source: &Source, sc: &StoreCluster, selection: &Selection) -> ClusterView {
    let status = sc.status.clone().unwrap_or_default();
    let mut warnings = Vec::new();
    let machines = source.machines(sc).await.unwrap_or_else(|e| {
        warnings.push(format!("machines unknown: {e}"));
        Vec::new()
    });
    let snapshot = match snapshot(source, sc, selection).await {
        Ok(s) => Some(s),
        Err(e) => {
            warnings.push(format!("{e:#}; live state unknown"));
            None
        }
    };
    let rf = sc.spec.replication_factor;
    let mut issues = Vec::new();
    // What each live datanode's replicas hold, from the datanode itself.
    let mut usage: BTreeMap<String, Vec<ReplicaUsage>> = BTreeMap::new();
    if let Some(snapshot) = &snapshot {
        for p in snapshot.topology.partitions.values() {
            let not_live: Vec<String> = p
                .replicas
                .iter()
                .filter(|r| !replica_serving(snapshot, p.id, &r.node))
                .map(|r| r.node.clone())
                .collect();
            let live = (p.replicas.len() - not_live.len()) as u32;
            if live < rf {
                let state = p.state.as_str().to_string();
                issues.push(PartitionIssue::UnderReplicated { partition: p.id, state, live, wanted: rf, not_live });
            }
            if p.replicas.len() > rf as usize {
                let replicas = p.replicas.iter().map(|r| r.node.clone()).collect();
                issues.push(PartitionIssue::Moving { partition: p.id, replicas });
            }
        }
        for (node, live) in &snapshot.live {
            match source.datanode::<Vec<ReplicaProgress>>(sc, snapshot, node, &live.address, REPLICAS_PATH).await {
                Some(progress) => {
                    for r in progress.into_iter().filter(|r| !r.caught_up()) {
                        issues.push(PartitionIssue::Lagging {
                            partition: r.partition,
                            node: node.clone(),
                            peer: r.peer,
                            lag_entries: r.lag_entries,
                            lag_seconds: r.lag_seconds,
                            error: r.last_error.clone().or_else(|| {
                                (r.owed_entries > 0).then(|| {
                                    format!(
                                        "{} entr{} owed, retried with back-off; oldest: {}",
                                        r.owed_entries,
                                        if r.owed_entries == 1 { "y" } else { "ies" },
                                        r.owed_error.as_deref().unwrap_or("unknown error")
                                    )
                                })
                            }),
                        });
                    }
                }
                None => warnings.push(format!(
                    "datanode {node} at {} did not answer{}; its replication lag is unknown",
                    live.address,
                    match source {
                        Source::Kubernetes { .. } => " (directly, nor through the API server's proxy to its Pod)",
                        Source::Local { .. } => "",
                    }
                )),
            }
            if let Some(list) =
                source.datanode::<Vec<ReplicaUsage>>(sc, snapshot, node, &live.address, USAGE_PATH).await
            {
                usage.insert(node.clone(), list);
            }
        }
    }
    issues.sort_by_key(|i| match i {
        PartitionIssue::UnderReplicated { partition, .. } => (0, *partition),
        PartitionIssue::Lagging { partition, .. } => (1, *partition),
        PartitionIssue::Moving { partition, .. } => (2, *partition),
    });

    // Without etcd, the Pods still tell whether each datanode runs.
    let pods = if snapshot.is_none() { source.datanode_pods(sc).await } else { None };
    let machine_views = machine_rows(&machines, snapshot.as_ref(), pods.as_ref(), &usage);
    for m in &machine_views {
        if m.datanode == "not-registered" {
            warnings.push(format!("datanode {} is not registered in etcd (not running, or cannot reach etcd)", m.name));
        }
        if m.datanode == "gone" {
            warnings.push(format!("machine {} is in the topology but no longer exists", m.name));
        }
    }
    for m in &machines {
        for d in &m.disks {
            if let Some(conflict) = &d.conflict {
                warnings.push(format!("disk {} on {}: {conflict}", d.id, m.name));
            }
        }
    }
    if let Some(s) = &snapshot {
        let cluster = sc.name_any();
        let known: Vec<&Machine> = machines.iter().collect();
        // The command that removes volumes of `partitions` on machine `m` by hand.
        let purge = |m: &Machine, partitions: &[u32]| {
            let mut flags: String = partitions.iter().map(|p| format!(" --partition {p}")).collect();
            let mut place = "on that machine: ";
            if let Source::Local { state, .. } = source {
                if let Some(local) = state.machines.iter().find(|l| l.name == m.name) {
                    flags += &format!(" --disk-agent {}", local.agent_admin_socket.display());
                    place = "";
                }
            }
            format!("{place}cairn volumes purge --cluster {cluster} --node {}{flags}", m.name)
        };
        for (m, partitions) in retired_volumes(&cluster, &known, &s.topology) {
            warnings.push(format!(
                "{} keeps the volumes of {} replica(s) moved away ({}); the operator removes them once every \
                 replica is live and caught up, or now {}",
                m.name,
                partitions.len(),
                partition_list(&partitions),
                purge(m, &partitions)
            ));
        }
        for (m, partitions) in unplaced_volumes(&cluster, &known, &s.topology) {
            warnings.push(format!(
                "{} holds volumes of {} partition(s) the topology does not place there and no move retired ({}): \
                 kept (the topology may have been rewritten or restored); if their data is not needed: {}",
                m.name,
                partitions.len(),
                partition_list(&partitions),
                purge(m, &partitions)
            ));
        }
    }
    if let (Some(g), Some(o)) = (sc.metadata.generation, status.observed_generation) {
        if o < g {
            warnings.push(format!("the operator has not acted on the latest spec yet (generation {g}, observed {o})"));
        }
    }
    if let Some(c) = status.conditions.iter().find(|c| c.type_ == "Degraded" && c.status == "True") {
        warnings.insert(0, format!("Degraded ({}): {}", c.reason, c.message));
    }
    if sc.spec.paused {
        warnings.push("reconciling is paused (spec.paused)".into());
    }
    if status.conditions.is_empty() {
        warnings.push("no status yet: is the operator running?".into());
    }
    let events = source.events(sc).await.unwrap_or_else(|e| {
        warnings.push(format!("events unavailable: {e}"));
        Vec::new()
    });
    let partitions = match &snapshot {
        Some(s) => partition_counts(s, rf),
        None => status.partitions.clone(),
    };
    ClusterView {
        name: sc.name_any(),
        namespace: sc.namespace().unwrap_or_default(),
        source: source.kind().into(),
        phase: if status.phase.is_empty() { "Unknown".into() } else { status.phase.clone() },
        image: sc.spec.image.clone(),
        created: sc.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()),
        generation: sc.metadata.generation,
        observed_generation: status.observed_generation,
        conditions: status
            .conditions
            .iter()
            .map(|c| ConditionView {
                type_: c.type_.clone(),
                status: c.status.clone(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                since: c.last_transition_time.0.to_string(),
            })
            .collect(),
        capacity: capacity_line(&machine_views, &usage, &status.capacity),
        partitions,
        topology_revision: snapshot.as_ref().map(|s| s.topology_revision()).unwrap_or(status.topology_revision),
        machines: machine_views,
        partition_issues: issues,
        warnings,
        events,
    }
}

/// The Capacity line: the sums of the machine rows (the status's disk figures when no machine
/// could be read), and the blobs counted once — for each partition, the most any replica that
/// answered holds (replicas converge to the same set).
fn capacity_line(
    rows: &[MachineView],
    usage: &BTreeMap<String, Vec<ReplicaUsage>>,
    status: &CapacityStatus,
) -> CapacityView {
    let known = |f: fn(&MachineView) -> Option<u64>| {
        rows.iter().filter_map(f).fold(None, |sum: Option<u64>, b| Some(sum.unwrap_or(0) + b))
    };
    let mut blobs: BTreeMap<u32, u64> = BTreeMap::new();
    for u in usage.values().flatten() {
        let most = blobs.entry(u.partition).or_default();
        *most = (*most).max(u.blobs);
    }
    let disks = if rows.is_empty() {
        status.clone()
    } else {
        CapacityStatus {
            allocated_bytes: rows.iter().map(|r| r.allocated_bytes).sum(),
            allocatable_bytes: rows.iter().map(|r| r.allocatable_bytes).sum(),
            total_bytes: rows.iter().map(|r| r.total_bytes).sum(),
        }
    };
    CapacityView {
        blobs: (!usage.is_empty()).then(|| blobs.values().sum()),
        stored_bytes: known(|r| r.stored_bytes),
        reclaimable_bytes: known(|r| r.reclaimable_bytes),
        allocated_bytes: disks.allocated_bytes,
        allocatable_bytes: disks.allocatable_bytes,
        total_bytes: disks.total_bytes,
    }
}

/// What one datanode's replicas hold, summed: (stored, reclaimable); `None` when it did not say.
fn node_usage(usage: &BTreeMap<String, Vec<ReplicaUsage>>, node: &str) -> (Option<u64>, Option<u64>) {
    match usage.get(node) {
        Some(list) => {
            (Some(list.iter().map(|u| u.stored_bytes).sum()), Some(list.iter().map(|u| u.reclaimable_bytes).sum()))
        }
        None => (None, None),
    }
}

/// One row per machine, one per topology node that no machine matches, and one per other live
/// datanode. `pods`: whether each machine's datanode Pod is Ready, for when etcd could not be
/// read; `usage`: what each datanode that answered holds.
fn machine_rows(
    machines: &[Machine],
    snapshot: Option<&Snapshot>,
    pods: Option<&std::collections::BTreeMap<String, bool>>,
    usage: &BTreeMap<String, Vec<ReplicaUsage>>,
) -> Vec<MachineView> {
    let mut rows: Vec<MachineView> = machines
        .iter()
        .map(|m| {
            // A machine outside the selection and the topology lends the cluster no capacity.
            let lends = m.selected || snapshot.is_none_or(|s| s.topology.nodes.contains_key(&m.name));
            let space = if lends { capacity(&m.disks) } else { CapacityStatus::default() };
            let (stored, reclaimable) = node_usage(usage, &m.name);
            let in_topology = snapshot.map(|s| s.topology.nodes.contains_key(&m.name));
            let datanode = match (snapshot, in_topology) {
                (None, _) => match pods.map(|p| p.get(&m.name)) {
                    Some(Some(true)) => "pod-ready",
                    Some(Some(false)) => "pod-not-ready",
                    Some(None) => "no-pod",
                    None => "unknown",
                },
                (Some(s), Some(true)) if !m.selected && s.topology.partitions_of(&m.name).next().is_some() => {
                    "draining"
                }
                (Some(s), Some(true)) if s.live.contains_key(&m.name) => "ready",
                (Some(_), Some(true)) => "not-registered",
                _ if !m.selected => "unselected",
                _ => "idle",
            };
            MachineView {
                name: m.name.clone(),
                zone: m.zone.clone(),
                datanode: datanode.into(),
                address: snapshot.and_then(|s| s.live.get(&m.name)).map(|l| l.address.clone()).unwrap_or_default(),
                disks: m.disks.iter().filter(|d| d.usable).count() as u32,
                stored_bytes: stored,
                reclaimable_bytes: reclaimable,
                allocated_bytes: space.allocated_bytes,
                allocatable_bytes: space.allocatable_bytes,
                total_bytes: space.total_bytes,
                replicas: snapshot.map(|s| s.topology.partitions_of(&m.name).count() as u32).unwrap_or_default(),
            }
        })
        .collect();
    if let Some(s) = snapshot {
        for node in s.topology.nodes.values().filter(|n| !machines.iter().any(|m| m.name == n.id)) {
            let (stored, reclaimable) = node_usage(usage, &node.id);
            rows.push(MachineView {
                name: node.id.clone(),
                zone: node.zone.clone(),
                datanode: if s.live.contains_key(&node.id) { "ready".into() } else { "gone".into() },
                address: node.address.clone(),
                stored_bytes: stored,
                reclaimable_bytes: reclaimable,
                replicas: s.topology.partitions_of(&node.id).count() as u32,
                ..MachineView::default()
            });
        }
        // Every live datanode has a row, so that the rows add up to the capacity line.
        let strangers: Vec<&LiveNode> = s.live.values().filter(|l| !rows.iter().any(|r| r.name == l.node)).collect();
        for live in strangers {
            let (stored, reclaimable) = node_usage(usage, &live.node);
            rows.push(MachineView {
                name: live.node.clone(),
                zone: live.zone.clone(),
                datanode: "not-in-topology".into(),
                address: live.address.clone(),
                stored_bytes: stored,
                reclaimable_bytes: reclaimable,
                ..MachineView::default()
            });
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_cluster::{NodeSpec, PartitionSpec, PartitionState, ReplicaSpec, Topology};
    use cairn_common::agent_api::DiskReport;

    fn machine(name: &str, selected: bool) -> Machine {
        let disk = DiskReport {
            id: format!("{name}-d"),
            total_bytes: 100,
            available_bytes: 60,
            fs_reserved_bytes: 5,
            allocated_bytes: 30,
            allocatable_bytes: 50,
            usable: true,
            ..DiskReport::default()
        };
        let unusable = DiskReport { id: format!("{name}-x"), total_bytes: 1000, ..DiskReport::default() };
        Machine {
            name: name.into(),
            zone: "z".into(),
            disks: vec![disk, unusable],
            address: format!("{name}:7480"),
            selected,
            down: None,
        }
    }

    #[test]
    fn machine_rows_say_what_each_datanode_is_doing() {
        let node =
            |id: &str| NodeSpec { id: id.into(), zone: "z".into(), address: format!("{id}:7480"), disks: vec![] };
        let replica = |n: &str| ReplicaSpec { node: n.into(), disk: format!("{n}-d") };
        let mut snapshot = Snapshot::default();
        snapshot.topology = Topology {
            config: None,
            nodes: ["ready", "down", "leaving", "vanished"].iter().map(|n| (n.to_string(), node(n))).collect(),
            partitions: [(
                0,
                PartitionSpec {
                    id: 0,
                    state: PartitionState::Writable,
                    replicas: vec![replica("ready"), replica("down"), replica("leaving"), replica("vanished")],
                },
            )]
            .into(),
            ..Topology::default()
        };
        let live = |n: &str| LiveNode { node: n.into(), address: format!("{n}:7480"), ..LiveNode::default() };
        snapshot.live =
            [live("ready"), live("leaving"), live("stranger")].into_iter().map(|l| (l.node.clone(), l)).collect();
        // Replicas of partition 0 hold 7 blobs on "ready" and 5 on "leaving" (still catching up);
        // "stranger" holds partition 9's 2 blobs.
        let replica =
            |partition, blobs: u64| ReplicaUsage { partition, blobs, stored_bytes: blobs * 100, reclaimable_bytes: 10 };
        let usage: BTreeMap<String, Vec<ReplicaUsage>> = [
            ("ready".to_string(), vec![replica(0, 7)]),
            ("leaving".to_string(), vec![replica(0, 5)]),
            ("stranger".to_string(), vec![replica(9, 2)]),
        ]
        .into();
        let machines = vec![
            machine("ready", true),
            machine("down", true),
            machine("leaving", false),
            machine("spare", true),
            machine("cordoned", false),
        ];
        let rows = machine_rows(&machines, Some(&snapshot), None, &usage);
        let states: Vec<(&str, &str)> = rows.iter().map(|r| (r.name.as_str(), r.datanode.as_str())).collect();
        assert_eq!(
            states,
            [
                ("ready", "ready"),
                ("down", "not-registered"),
                ("leaving", "draining"),
                ("spare", "idle"),
                ("cordoned", "unselected"),
                ("vanished", "gone"),
                ("stranger", "not-in-topology"),
            ]
        );
        // Only usable disks count.
        assert_eq!(
            (rows[0].disks, rows[0].stored_bytes, rows[0].allocated_bytes, rows[0].allocatable_bytes),
            (1, Some(700), 30, 50)
        );
        assert_eq!((rows[1].stored_bytes, rows[1].reclaimable_bytes), (None, None), "not live: unknown");
        // The capacity line adds up the rows, and counts each blob once.
        let c = capacity_line(&rows, &usage, &CapacityStatus::default());
        let sum = |f: fn(&MachineView) -> u64| rows.iter().map(f).sum::<u64>();
        assert_eq!(c.stored_bytes, Some(sum(|r| r.stored_bytes.unwrap_or(0))));
        assert_eq!(c.reclaimable_bytes, Some(sum(|r| r.reclaimable_bytes.unwrap_or(0))));
        assert_eq!(c.allocated_bytes, sum(|r| r.allocated_bytes));
        assert_eq!(c.allocatable_bytes, sum(|r| r.allocatable_bytes));
        assert_eq!(c.total_bytes, sum(|r| r.total_bytes));
        // The cordoned machine (unselected, not in the topology) lends no capacity; the one
        // leaving still does until it is out of the topology.
        assert_eq!((rows[4].name.as_str(), rows[4].total_bytes), ("cordoned", 0));
        assert_eq!((rows[2].name.as_str(), rows[2].total_bytes), ("leaving", 100));
        assert_eq!((c.blobs, c.stored_bytes, c.total_bytes), (Some(9), Some(1400), 400));
        // No datanode answered: unknown, not zero; no machine read: the status's disk figures.
        let status = CapacityStatus { allocated_bytes: 1, allocatable_bytes: 2, total_bytes: 3 };
        let blind = capacity_line(&[], &BTreeMap::new(), &status);
        assert_eq!((blind.blobs, blind.stored_bytes, blind.total_bytes), (None, None, 3));
        assert_eq!((rows[0].replicas, rows[3].replicas, rows[5].replicas), (1, 0, 1));
        assert_eq!(rows[0].address, "ready:7480");

        let unknown = machine_rows(&machines, None, None, &BTreeMap::new());
        assert!(unknown.iter().all(|r| r.datanode == "unknown"), "{unknown:?}");
        assert_eq!(unknown.len(), machines.len());
        // etcd unreadable, the Pods known.
        let pods = [("ready".to_string(), true), ("down".to_string(), false)].into();
        let by_pod = machine_rows(&machines, None, Some(&pods), &BTreeMap::new());
        let states: Vec<&str> = by_pod.iter().map(|r| r.datanode.as_str()).collect();
        assert_eq!(states, ["pod-ready", "pod-not-ready", "no-pod", "no-pod", "no-pod"]);

        let counted = partition_counts(&snapshot, 3);
        assert_eq!((counted.total, counted.writable, counted.under_replicated), (1, 1, 1), "2 of 4 live < 3");
    }
}
