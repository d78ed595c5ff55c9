//! Where datanodes run. The reconcile core ([`converge`]) is the same for every platform: it
//! asks the platform for its machines, writes the topology to etcd, and asks the platform to run
//! one datanode per chosen machine.

use std::collections::BTreeMap;
use std::future::Future;

use cairn_cluster::admin::ReplicaUsage;
use cairn_cluster::etcd::{ClusterStore, EtcdTls, Snapshot, Written};
use cairn_cluster::{planner, ClusterConfig, NodeSpec, PartitionState, ReplicaSpec, RetiredReplica, Topology};
use cairn_resources::store_cluster::{CapacityStatus, PartitionCounts, StoreClusterSpec};
use cairn_resources::StoreClusterStatus;

use cairn_common::agent_api::DiskReport;

use crate::desired::{desired, Machine, SpecError};

/// Why a platform could not do what a pass asked. The reconcile reports it in a condition whose
/// reason says which step failed; the kind says what to look at.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// The Kubernetes API refused (an RBAC refusal is one) or could not be reached. Boxed: the
    /// error is large, and every future that may return it would grow with it.
    #[error("Kubernetes API: {0}")]
    Kubernetes(Box<kube::Error>),
    /// The platform's view of the machines is not complete yet (watches still listing).
    #[error("{0}")]
    NotReady(String),
    /// A machine's disk agent could not be asked, or refused.
    #[error("disk agent on {machine}: {message}")]
    DiskAgent { machine: String, message: String },
    /// A local datanode process could not be started (its binary, its log file).
    #[error("{0}")]
    Process(String),
    /// Something the StoreCluster names cannot be used (a TLS Secret missing, or without a key).
    #[error("{0}")]
    Invalid(String),
    /// A volume is still open (its datanode is stopping): tried again by a later pass.
    #[error("{0}")]
    Busy(String),
}

impl From<kube::Error> for PlatformError {
    fn from(e: kube::Error) -> Self {
        PlatformError::Kubernetes(Box::new(e))
    }
}

pub trait Platform {
    /// Machines that may run a datanode, with their disk inventories.
    fn machines(&self) -> impl Future<Output = Result<Vec<Machine>, PlatformError>> + Send;
    /// Runs one datanode on each of `chosen` (and none elsewhere). `settled`: every datanode is
    /// registered, no partition is short of live replicas, and every replica has caught up with
    /// its peers — only then may a running datanode be replaced (one per pass) for an upgrade.
    fn apply(&self, chosen: &[Machine], settled: bool) -> impl Future<Output = Result<Applied, PlatformError>> + Send;
    /// Stops every datanode of the cluster (it is being deleted).
    fn stop(&self) -> impl Future<Output = Result<(), PlatformError>> + Send;
    /// Removes the cluster's volumes from every machine's disks: true once they are all gone
    /// (false: in progress, ask again).
    fn delete_volumes(&self) -> impl Future<Output = Result<bool, PlatformError>> + Send;
    /// Removes the cluster's volumes from one machine: all of them (`partitions` None: it was
    /// drained and left the topology), or those of `partitions` (replicas that moved away). True
    /// once they are gone; false while in progress or while a datanode still has one open.
    fn purge_machine(
        &self,
        machine: &Machine,
        partitions: Option<&[u32]>,
    ) -> impl Future<Output = Result<bool, PlatformError>> + Send;
    /// TLS material for etcd, when the spec names it.
    fn etcd_tls(&self) -> impl Future<Output = Result<Option<EtcdTls>, PlatformError>> + Send;
    /// How the cluster's blob API certificates are checked, when it speaks HTTPS (recorded in
    /// the cluster's config for whoever calls its datanodes).
    /// `machines`: the cluster's, for a CA made on this pass (see `peer_certs::cluster_ca`).
    fn blob_tls(
        &self,
        _machines: &[Machine],
    ) -> impl Future<Output = Result<Option<cairn_cluster::BlobTls>, PlatformError>> + Send {
        async { Ok(None) }
    }

    /// The etcd clients this platform keeps from pass to pass; none: each pass connects.
    fn etcd_clients(&self) -> Option<&EtcdClients> {
        None
    }
}

/// What [`Platform::apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Changes made, one line each (datanodes started, replaced or stopped; objects written).
    pub changes: Vec<String>,
    /// Datanodes still running an older version (image, binary or flags) after this pass: a
    /// rolling update in progress.
    pub outdated: u32,
    /// Datanodes that keep exiting (restarted after a growing pause), one line each with why.
    pub failing: Vec<String>,
    /// Datanodes running but not yet Ready where clients reach them (on Kubernetes, datanode Pods
    /// whose Ready condition is not True: their Services route nothing to them yet).
    pub unready: u32,
    /// Objects the cluster needs whose names are taken by objects it does not own: never adopted,
    /// changed or deleted; one line each.
    pub foreign: Vec<String>,
}

/// Deleting a cluster: datanodes stop; with a confirmed `Delete`, the volumes are removed and
/// then the topology leaves etcd (true when done, false to come back later). With `Retain`,
/// volumes and topology stay for a cluster re-created under the same name.
pub async fn delete_cluster<P: Platform>(
    name: &str,
    namespace: &str,
    spec: &StoreClusterSpec,
    platform: &P,
) -> Result<bool, String> {
    platform.stop().await.map_err(|e| e.to_string())?;
    let confirmed =
        spec.deletion_policy == cairn_resources::DeletionPolicy::Delete && spec.confirm_delete.as_deref() == Some(name);
    if !confirmed {
        // Retained: the data stays, the cluster's etcd client goes with the StoreCluster.
        if let Some(clients) = platform.etcd_clients() {
            clients.forget(namespace, name);
        }
        return Ok(true);
    }
    if !platform.delete_volumes().await.map_err(|e| e.to_string())? {
        return Ok(false);
    }
    let store = cluster_store(platform, spec, namespace, name).await?;
    store.delete_all().await.map_err(|e| e.to_string())?;
    if let Some(clients) = platform.etcd_clients() {
        clients.forget(namespace, name);
    }
    tracing::info!(cluster = name, "volumes and topology removed (deletionPolicy Delete)");
    Ok(true)
}

/// What one pass found and did.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Counts for the status (conditions are the caller's).
    pub status: StoreClusterStatus,
    /// Everything converged: datanodes live, no partition under-replicated, nothing changed.
    pub ready: bool,
    /// What this pass changed, one line each: the topology keys it wrote, workloads started,
    /// replaced or stopped, machines purged. Empty when converged.
    pub changes: Vec<String>,
    /// Why the cluster cannot converge: (reason, message) for a Degraded condition.
    pub degraded: Option<(&'static str, String)>,
    /// Long operations under way, one line each (drains, moves, rolling updates).
    pub progress: Vec<String>,
}

impl Outcome {
    fn degraded(reason: &'static str, message: String) -> Self {
        Self {
            status: StoreClusterStatus::default(),
            ready: false,
            changes: Vec::new(),
            degraded: Some((reason, message)),
            progress: Vec::new(),
        }
    }
}

/// One etcd client per cluster, kept from pass to pass (otherwise every pass connects anew: a
/// TCP connection and, with TLS, a handshake). Keyed by the cluster; a changed endpoint list or
/// TLS Secret connects anew, and a pass that finds etcd unreachable drops the client.
#[derive(Default)]
pub struct EtcdClients(std::sync::Mutex<BTreeMap<String, (u64, ClusterStore)>>);

impl EtcdClients {
    /// The client of `namespace/name`, connecting (failing fast) when there is none yet.
    pub async fn get(
        &self,
        endpoints: &[String],
        namespace: &str,
        name: &str,
        tls: Option<&EtcdTls>,
    ) -> Result<ClusterStore, String> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        (endpoints, tls.map(|t| (&t.ca, &t.cert, &t.key))).hash(&mut hasher);
        let (id, settings) = (format!("{namespace}/{name}"), hasher.finish());
        if let Some((kept, store)) = self.0.lock().expect("etcd clients").get(&id) {
            if *kept == settings {
                return Ok(store.clone());
            }
        }
        let store = store_for(endpoints, namespace, name, tls).await?;
        self.0.lock().expect("etcd clients").insert(id, (settings, store.clone()));
        Ok(store)
    }

    /// Drops the client of `namespace/name` (etcd did not answer it, or the cluster is gone).
    pub fn forget(&self, namespace: &str, name: &str) {
        self.0.lock().expect("etcd clients").remove(&format!("{namespace}/{name}"));
    }
}

/// The etcd client of a cluster, with the TLS its spec names.
pub async fn cluster_store<P: Platform>(
    platform: &P,
    spec: &StoreClusterSpec,
    namespace: &str,
    name: &str,
) -> Result<ClusterStore, String> {
    let tls = platform.etcd_tls().await.map_err(|e| e.to_string())?;
    etcd_of(platform, spec, namespace, name, tls.as_ref()).await
}

/// The etcd client of a cluster: the platform's kept one, or a new one.
async fn etcd_of<P: Platform>(
    platform: &P,
    spec: &StoreClusterSpec,
    namespace: &str,
    name: &str,
    tls: Option<&EtcdTls>,
) -> Result<ClusterStore, String> {
    match platform.etcd_clients() {
        Some(clients) => clients.get(&spec.etcd.endpoints, namespace, name, tls).await,
        None => store_for(&spec.etcd.endpoints, namespace, name, tls).await,
    }
}

/// Connects to the cluster's etcd, failing fast when it is away.
pub async fn store_for(
    endpoints: &[String],
    namespace: &str,
    name: &str,
    tls: Option<&EtcdTls>,
) -> Result<ClusterStore, String> {
    let connect = ClusterStore::connect_tls(endpoints, namespace, name, tls);
    match tokio::time::timeout(std::time::Duration::from_secs(5), connect).await {
        Ok(Ok(store)) => Ok(store),
        Ok(Err(e)) => Err(format!("etcd {endpoints:?} unreachable: {e}")),
        Err(_) => Err(format!("etcd {endpoints:?} unreachable: timed out")),
    }
}

/// One reconcile pass: machines → desired topology (planner, minimal movement) → etcd (only
/// changed keys) → workloads (only what differs) → observed counts.
pub async fn converge<P: Platform>(name: &str, namespace: &str, spec: &StoreClusterSpec, platform: &P) -> Outcome {
    let machines = match platform.machines().await {
        Ok(m) => m,
        Err(e) => return Outcome::degraded("MachinesUnavailable", e.to_string()),
    };
    let tls = match platform.etcd_tls().await {
        Ok(tls) => tls,
        Err(e) => return Outcome::degraded("EtcdTlsUnavailable", e.to_string()),
    };
    let blob_tls = match platform.blob_tls(&machines).await {
        Ok(tls) => tls,
        Err(e) => return Outcome::degraded("BlobTlsUnavailable", e.to_string()),
    };
    let store = match etcd_of(platform, spec, namespace, name, tls.as_ref()).await {
        Ok(store) => store,
        Err(message) => return Outcome::degraded("EtcdUnreachable", message),
    };
    let snapshot = match store.load().await {
        Ok(s) => s,
        Err(e) => {
            if let Some(clients) = platform.etcd_clients() {
                clients.forget(namespace, name);
            }
            return Outcome::degraded("EtcdUnreachable", e.to_string());
        }
    };
    // What cannot be planned (a machine lost its disk, no room for a scale-out, a bad spec) is a
    // condition with its reason, never a stop: the pass goes on and serves everything that exists.
    let mut problem: Option<(&'static str, String)> = None;
    let plan = match desired(name, spec, &machines, &snapshot.topology) {
        Ok(mut plan) => {
            plan.config.blob_tls = blob_tls;
            Some(plan)
        }
        Err(e) => {
            let reason = match e {
                SpecError::Invalid { .. } => "InvalidSpec",
                SpecError::NoDisks { .. } => "NoUsableDisks",
                SpecError::TooFewMachines { .. } => "NotEnoughMachines",
            };
            // A disk refused for a conflict is most often why: say which, and how to accept it.
            let conflicts: Vec<String> = machines
                .iter()
                .filter(|m| m.selected)
                .flat_map(|m| m.disks.iter().filter_map(move |d| Some(format!("{}: {}", m.name, d.conflict.as_ref()?))))
                .collect();
            let mut message = format!("{e}; serving what the cluster has meanwhile");
            if !conflicts.is_empty() {
                message += &format!("; disk refused on {}", conflicts.join("; "));
            }
            problem = Some((reason, message));
            None
        }
    };
    // Counted from what this pass wrote, not from etcd's revision: datanodes re-register their
    // free space as blobs arrive, which moves the revision without changing the topology.
    let mut changes: Vec<String> = match &plan {
        Some(plan) => match move_step(&store, &snapshot, &plan.config, &plan.nodes).await {
            Ok(wrote) => wrote.into_iter().collect(),
            Err(e) => {
                problem = Some(("PlacementFailed", format!("{e}; serving what the cluster has meanwhile")));
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    let after = if changes.is_empty() { snapshot } else { store.load().await.unwrap_or_else(|_| snapshot.clone()) };
    // Datanodes run on the chosen machines, and on leaving ones until their replicas have moved.
    let (chosen, others): (Vec<Machine>, Vec<Machine>) =
        machines.into_iter().partition(|m| after.topology.nodes.contains_key(&m.name));
    let rf = match (&plan, &after.topology.config) {
        (Some(plan), _) => plan.config.replication_factor,
        (None, Some(config)) => config.replication_factor,
        (None, None) => spec.replication_factor,
    };
    let status = observed(&after, &chosen, rf);
    // Every live datanode's replication progress, asked once for this pass.
    let replication = progress_of(&after).await;
    let settled = status.nodes_ready == status.nodes_total
        && status.partitions.under_replicated == 0
        && replication_settled(&after, &replication);
    let applied = match platform.apply(&chosen, settled).await {
        Ok(applied) => applied,
        Err(e) => return Outcome::degraded("WorkloadsFailed", e.to_string()),
    };
    changes.extend(applied.changes);
    let mut progress = moves_in_progress(&after.topology, &chosen, rf);
    if applied.outdated > 0 {
        progress.push(format!("rolling update: {} of {} datanodes still to replace", applied.outdated, chosen.len()));
    }
    if applied.unready > 0 {
        progress.push(format!("{} datanode Pod(s) not Ready yet", applied.unready));
    }
    // A machine that is away cannot run a purge: its volumes wait for it to come back.
    for machine in chosen.iter().chain(others.iter()) {
        if let Some(why) = &machine.down {
            progress.push(format!(
                "{} is away ({why}): its replicas are placed elsewhere; its volumes are removed once it is back",
                machine.name
            ));
        }
    }
    // A drained machine that left the topology gives back the volumes of the replicas that moved.
    for machine in others.iter().filter(|m| !m.selected && m.down.is_none()) {
        if machine.holds_volumes_of(name) {
            match platform.purge_machine(machine, None).await {
                Ok(_) => changes.push(format!("purging the volumes left on {}", machine.name)),
                Err(e) => return Outcome::degraded("PurgeFailed", e.to_string()),
            }
        }
    }
    // A replica a completed move dropped leaves its volume behind (its datanode closed it, data
    // kept). Once every replica is live and caught up, and this pass changed nothing, the volume
    // goes; only volumes the topology recorded as retired, never one it merely does not mention.
    let known: Vec<&Machine> = chosen.iter().chain(others.iter()).filter(|m| m.down.is_none()).collect();
    if settled && changes.is_empty() {
        for (machine, partitions) in retired_volumes(name, &known, &after.topology) {
            match platform.purge_machine(machine, Some(&partitions)).await {
                Ok(_) => changes.push(format!(
                    "purging the volumes of {} retired replica(s) on {} ({})",
                    partitions.len(),
                    machine.name,
                    partition_list(&partitions)
                )),
                Err(e) => return Outcome::degraded("PurgeFailed", e.to_string()),
            }
        }
    }
    // A retirement is done when its volume is gone (or its machine is).
    // (A machine that is away is still a machine: its retirements wait for it.)
    let every: Vec<&Machine> = chosen.iter().chain(others.iter()).collect();
    let done = finished_retirements(name, &every, &after.topology);
    if !done.is_empty() {
        let mut t = after.topology.clone();
        for key in &done {
            t.retired.remove(key);
        }
        match store.write_topology(&after, &t).await {
            Ok(Written::Keys(keys)) if !keys.is_empty() => {
                changes.push(format!("topology: forgot {} retired replica(s) whose volume is gone", done.len()))
            }
            Ok(_) => {}
            Err(e) => return Outcome::degraded("EtcdUnreachable", e.to_string()),
        }
    }
    // Entries a replica could not apply are retried; owed for too long, they are a condition.
    let stalled = spec.replication_stall_grace().and_then(|grace| {
        let answered: Vec<(String, Vec<ReplicaProgress>)> =
            replication.iter().map(|(node, list)| (node.clone(), list.clone().unwrap_or_default())).collect();
        stalled(&answered, grace)
    });
    // A datanode that cannot open a replica assigned to it keeps trying; until it can, the
    // cluster is Degraded with its reason (never "creating" forever).
    let degraded = problem
        .or_else(|| (!applied.failing.is_empty()).then(|| ("DatanodeFailing", applied.failing.join("; "))))
        .or_else(|| {
            (!applied.foreign.is_empty()).then(|| {
                let names = applied.foreign.join(", ");
                ("ForeignObjects", format!("{names} exist(s) and are not this StoreCluster's: rename or remove them"))
            })
        })
        .or_else(|| unopened_replicas(&after).map(|message| ("ReplicaOpenFailed", message)))
        .or_else(|| stalled.map(|message| ("ReplicationStalled", message)))
        .or_else(|| cluster_full(&status.partitions));
    // Ready: settled (as observed above, from the same snapshot) and nothing left to change.
    let ready = settled && changes.is_empty() && degraded.is_none() && applied.unready == 0;
    Outcome { status, ready, changes, degraded, progress }
}

/// Volumes of this cluster that a completed move retired and that are still on their machine,
/// by machine (the partitions). A replica placed there again is not retired.
pub fn retired_volumes<'m>(
    cluster: &str,
    machines: &[&'m Machine],
    topology: &Topology,
) -> Vec<(&'m Machine, Vec<u32>)> {
    volumes_where(cluster, machines, |partition, node| {
        topology.retired.contains_key(&RetiredReplica::key(partition, node)) && !places(topology, partition, node)
    })
}

/// Volumes of this cluster on machines of the topology whose partition has no replica there and
/// that no move retired (a topology rewritten by hand, etcd restored from an old backup): kept,
/// and reported.
pub fn unplaced_volumes<'m>(
    cluster: &str,
    machines: &[&'m Machine],
    topology: &Topology,
) -> Vec<(&'m Machine, Vec<u32>)> {
    volumes_where(cluster, machines, |partition, node| {
        topology.nodes.contains_key(node)
            && topology.partitions.contains_key(&partition)
            && !topology.retired.contains_key(&RetiredReplica::key(partition, node))
            && !places(topology, partition, node)
    })
}

/// Retirement records whose volume is gone from its machine's disks, or whose machine is.
pub fn finished_retirements(cluster: &str, machines: &[&Machine], topology: &Topology) -> Vec<String> {
    topology
        .retired
        .iter()
        .filter(|(_, r)| match machines.iter().find(|m| m.name == r.node) {
            None => true,
            Some(m) => {
                let name = Topology::volume_name(cluster, r.partition, &r.node);
                !m.disks.iter().flat_map(|d| &d.volumes).any(|v| v.name == name)
            }
        })
        .map(|(key, _)| key.clone())
        .collect()
}

fn places(topology: &Topology, partition: u32, node: &str) -> bool {
    topology.partitions.get(&partition).is_some_and(|p| p.replicas.iter().any(|r| r.node == node))
}

/// This cluster's volumes on each machine (exact names) whose (partition, machine) passes `keep`.
fn volumes_where<'m>(
    cluster: &str,
    machines: &[&'m Machine],
    keep: impl Fn(u32, &str) -> bool,
) -> Vec<(&'m Machine, Vec<u32>)> {
    let mut out = Vec::new();
    for &machine in machines {
        let mut partitions: Vec<u32> = machine
            .disks
            .iter()
            .flat_map(|d| &d.volumes)
            // Exactly the name of its partition's volume here (so never another cluster's).
            .filter(|v| Topology::volume_name(cluster, v.partition, &machine.name) == v.name)
            .filter(|v| keep(v.partition, &machine.name))
            .map(|v| v.partition)
            .collect();
        partitions.sort();
        partitions.dedup();
        if !partitions.is_empty() {
            out.push((machine, partitions));
        }
    }
    out
}

/// `p3, p5`.
pub fn partition_list(partitions: &[u32]) -> String {
    partitions.iter().map(|p| format!("p{p}")).collect::<Vec<_>>().join(", ")
}

/// A cluster whose every partition is full takes no new blobs: that is Degraded, so that
/// alerting on the condition (or on `cairn status`'s exit status) catches it.
fn cluster_full(partitions: &PartitionCounts) -> Option<(&'static str, String)> {
    (partitions.total > 0 && partitions.writable == 0).then(|| {
        (
            "ClusterFull",
            format!(
                "all {} partitions are full (read-only): the cluster takes no new blobs; add disks or machines, \
                 or delete blobs (compaction then frees their room)",
                partitions.total
            ),
        )
    })
}

/// Replicas the live datanodes report they cannot open, as one message (the first few named).
fn unopened_replicas(snapshot: &Snapshot) -> Option<String> {
    let all: Vec<String> = snapshot
        .live
        .values()
        .flat_map(|l| {
            l.unopened.iter().map(move |(p, reason)| format!("{} cannot open partition {p}: {reason}", l.node))
        })
        .collect();
    let (first, rest) = all.split_at(all.len().min(3));
    match (first.is_empty(), rest.len()) {
        (true, _) => None,
        (false, 0) => Some(first.join("; ")),
        (false, n) => Some(format!("{}; and {n} more", first.join("; "))),
    }
}

/// Drains and replica moves under way, as the topology shows them: a machine no longer
/// selected that still holds replicas, and partitions with a replica beside its replacement.
fn moves_in_progress(topology: &Topology, chosen: &[Machine], rf: u32) -> Vec<String> {
    let mut lines = Vec::new();
    for machine in chosen.iter().filter(|m| !m.selected) {
        let left = topology.partitions_of(&machine.name).count();
        lines.push(format!("draining {}: {left} replica(s) still to move", machine.name));
    }
    let moving = topology.partitions.values().filter(|p| p.replicas.len() > rf as usize).count();
    if moving > 0 {
        lines.push(format!("{moving} partition(s) moving a replica (the new one catching up)"));
    }
    lines
}

/// Replicas moved per pass for balance (each copies a whole volume through replication).
const MOVES_PER_PASS: usize = 2;

/// Places replicas (minimal movement), then moves a few for balance and off leaving nodes —
/// never dropping below quorum: a replica that moves stays where it was, beside its replacement,
/// until the replacement has pulled everything from its peers; then it goes, and a node with no
/// replica left leaves the topology. Writes only what changed, guarded; says what it wrote.
async fn move_step(
    store: &ClusterStore,
    snapshot: &Snapshot,
    config: &ClusterConfig,
    nodes: &[NodeSpec],
) -> Result<Option<String>, String> {
    let placed = planner::plan(config, nodes, &snapshot.topology.partitions).map_err(|e| e.to_string())?;
    let target = planner::rebalance(config, nodes, &placed, MOVES_PER_PASS);
    let mut merged = Topology {
        config: Some(config.clone()),
        nodes: nodes.iter().map(|n| (n.id.clone(), n.clone())).collect(),
        partitions: BTreeMap::new(),
        retired: snapshot.topology.retired.clone(),
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    for (id, mut partition) in target {
        if let Some(current) = snapshot.topology.partitions.get(&id) {
            let removed: Vec<ReplicaSpec> =
                current.replicas.iter().filter(|r| !partition.replicas.contains(r)).cloned().collect();
            let added: Vec<String> =
                partition.replicas.iter().filter(|r| !current.replicas.contains(r)).map(|r| r.node.clone()).collect();
            if !removed.is_empty() {
                if caught_up(snapshot, id, &added).await {
                    // Recorded in the same transaction that drops them: only these volumes are
                    // ever purged from a node that stays.
                    for r in removed {
                        let retired = RetiredReplica { partition: id, node: r.node, disk: r.disk, retired_ms: now };
                        merged.retired.insert(RetiredReplica::key(id, &retired.node), retired);
                    }
                } else {
                    partition.replicas.extend(removed);
                }
            }
        }
        // A replica placed (again) on a node is no longer retired there.
        for r in &partition.replicas {
            merged.retired.remove(&RetiredReplica::key(id, &r.node));
        }
        merged.partitions.insert(id, partition);
    }
    for (id, spec) in &snapshot.topology.nodes {
        let referenced = merged.partitions.values().any(|p| p.replicas.iter().any(|r| &r.node == id));
        if referenced && !merged.nodes.contains_key(id) {
            merged.nodes.insert(id.clone(), spec.clone());
        }
    }
    match store.write_topology(snapshot, &merged).await.map_err(|e| e.to_string())? {
        Written::Keys(keys) if keys.is_empty() => Ok(None),
        Written::Keys(keys) => Ok(Some(format!("topology: wrote {}", keys.join(", ")))),
        // Someone else wrote in between: not converged, so this pass still counts as a change.
        Written::Conflict => {
            tracing::info!("the topology changed while planning; planning again on the next pass");
            Ok(Some("topology changed by someone else while planning; planning again".into()))
        }
    }
}

/// The HTTP client for datanodes' admin API: one per process for plain HTTP, one per blob CA for
/// HTTPS (their connections are reused from pass to pass); a datanode that does not answer
/// within 2 s is taken as not answering.
fn datanode_http(tls: Option<&cairn_cluster::BlobTls>) -> Option<reqwest::Client> {
    type Clients = std::sync::Mutex<BTreeMap<Option<cairn_cluster::BlobTls>, reqwest::Client>>;
    static CLIENTS: std::sync::OnceLock<Clients> = std::sync::OnceLock::new();
    let mut clients = CLIENTS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(client) = clients.get(&tls.cloned()) {
        return Some(client.clone());
    }
    let mut builder = reqwest::Client::builder()
        // The node token goes to datanodes only, never on to wherever a redirect points.
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(2))
        .connect_timeout(std::time::Duration::from_secs(2));
    if let Some(tls) = tls {
        match cairn_cluster::blob_tls::client_config(tls) {
            Ok(config) => builder = builder.use_preconfigured_tls(config),
            Err(e) => {
                tracing::warn!(error = %e, "the cluster's blob CA is unusable: its datanodes cannot be asked");
                return None;
            }
        }
    }
    let client = builder.build().ok()?;
    if clients.len() > 64 {
        clients.clear();
    }
    clients.insert(tls.cloned(), client.clone());
    Some(client)
}

pub use cairn_cluster::admin::ReplicaProgress;

/// Each live datanode's replication progress (`None`: it did not answer).
async fn progress_of(snapshot: &Snapshot) -> BTreeMap<String, Option<Vec<ReplicaProgress>>> {
    let mut out = BTreeMap::new();
    for (node, live) in &snapshot.live {
        out.insert(node.clone(), replica_progress(snapshot, &live.address).await);
    }
    out
}

/// "partition P on N owes K entries of M's journal (oldest Xs: why)" for every replica (by
/// datanode) that has owed entries for longer than `grace`; `None` when none has.
pub fn stalled(progress: &[(String, Vec<ReplicaProgress>)], grace: std::time::Duration) -> Option<String> {
    let mut stalled = Vec::new();
    for (node, list) in progress {
        for p in list.iter().filter(|p| p.owed_entries > 0 && p.oldest_owed_seconds > grace.as_secs_f64()) {
            stalled.push(format!(
                "partition {} on {node} owes {} entr{} of {}'s journal (oldest {:.0}s: {})",
                p.partition,
                p.owed_entries,
                if p.owed_entries == 1 { "y" } else { "ies" },
                p.peer,
                p.oldest_owed_seconds,
                p.owed_error.as_deref().unwrap_or("unknown error")
            ));
        }
    }
    (!stalled.is_empty()).then(|| stalled.join("; "))
}

/// The admin routes `cairn status` and the reconcile read from a datanode.
pub const REPLICAS_PATH: &str = "/v1/admin/replicas";
pub const USAGE_PATH: &str = "/v1/admin/usage";

/// A datanode admin route's JSON, read directly from the datanode at `address`; `None` when it
/// does not answer (within 2 s) or answers with an error.
pub async fn datanode_admin<T: serde::de::DeserializeOwned>(
    snapshot: &Snapshot,
    address: &str,
    path: &str,
) -> Option<T> {
    // HTTPS where the datanode registered it, checked against the cluster's blob CA.
    let tls = snapshot.live.values().any(|l| l.address == address && l.tls);
    let blob_tls = snapshot.topology.config.as_ref().and_then(|c| c.blob_tls.as_ref());
    let url = match (tls, blob_tls) {
        (false, _) => format!("http://{address}{path}"),
        (true, Some(_)) => format!("https://{address}{path}"),
        (true, None) => return None,
    };
    let mut request = datanode_http(blob_tls.filter(|_| tls))?.get(url);
    if let Some(token) = &snapshot.node_token {
        request = request.header(cairn_cluster::access::NODE_TOKEN_HEADER, token.expose());
    }
    let response = request.send().await.ok()?;
    response.error_for_status().ok()?.json::<T>().await.ok()
}

/// A datanode's replication progress, or `None` when it does not answer within 2 s.
pub async fn replica_progress(snapshot: &Snapshot, address: &str) -> Option<Vec<ReplicaProgress>> {
    datanode_admin(snapshot, address, REPLICAS_PATH).await
}

async fn replicas_of(snapshot: &Snapshot, node: &str) -> Option<Vec<ReplicaProgress>> {
    replica_progress(snapshot, &snapshot.live.get(node)?.address).await
}

/// Whether the replicas of `partition` on `nodes` have pulled everything from every peer.
async fn caught_up(snapshot: &Snapshot, partition: u32, nodes: &[String]) -> bool {
    for node in nodes {
        let Some(list) = replicas_of(snapshot, node).await else { return false };
        let mine: Vec<_> = list.iter().filter(|p| p.partition == partition).collect();
        if mine.is_empty() || !mine.iter().all(|p| p.caught_up()) {
            return false;
        }
    }
    true
}

/// Whether every datanode of the topology has its replicas open and reports no replication lag
/// behind any peer.
fn replication_settled(snapshot: &Snapshot, progress: &BTreeMap<String, Option<Vec<ReplicaProgress>>>) -> bool {
    for node in snapshot.topology.nodes.keys() {
        let with_peers = snapshot.topology.partitions_of(node).filter(|p| p.replicas.len() > 1).count();
        let Some(list) = progress.get(node).and_then(Option::as_ref) else { return false };
        let partitions: std::collections::BTreeSet<u32> = list.iter().map(|p| p.partition).collect();
        if partitions.len() < with_peers || !list.iter().all(ReplicaProgress::caught_up) {
            return false;
        }
    }
    true
}

/// Counts from etcd: live datanodes, partition states, replicas not live.
fn observed(snapshot: &Snapshot, machines: &[Machine], rf: u32) -> StoreClusterStatus {
    let total = machines.len() as u32;
    let ready = machines.iter().filter(|m| snapshot.live.contains_key(&m.name)).count() as u32;
    StoreClusterStatus {
        nodes_ready: ready,
        nodes_total: total,
        nodes_summary: format!("{ready}/{total}"),
        capacity: capacity(machines.iter().flat_map(|m| &m.disks)),
        partitions: partition_counts(snapshot, rf),
        topology_revision: snapshot.topology_revision(),
        ..StoreClusterStatus::default()
    }
}

/// Whether the replica of `partition` on `node` serves: its datanode is live and has it open (a
/// replica its datanode cannot open — a wiped disk, say — is no replica).
pub fn replica_serving(snapshot: &Snapshot, partition: u32, node: &str) -> bool {
    snapshot.live.get(node).is_some_and(|l| !l.unopened.contains_key(&partition))
}

/// Partitions by state, and those with fewer live replicas than `rf`.
pub fn partition_counts(snapshot: &Snapshot, rf: u32) -> PartitionCounts {
    let t = &snapshot.topology;
    let mut counts = PartitionCounts { total: t.partitions.len() as u32, ..PartitionCounts::default() };
    for p in t.partitions.values() {
        match p.state {
            PartitionState::Writable => counts.writable += 1,
            _ => counts.read_only += 1,
        }
        let live = p.replicas.iter().filter(|r| replica_serving(snapshot, p.id, &r.node)).count() as u32;
        if live < rf {
            counts.under_replicated += 1;
        }
    }
    counts
}

/// Space of the usable disks: their size, what Cairn volumes hold, what they can still allocate.
pub fn capacity<'a>(disks: impl IntoIterator<Item = &'a DiskReport>) -> CapacityStatus {
    let mut capacity = CapacityStatus::default();
    for d in disks.into_iter().filter(|d| d.usable) {
        capacity.total_bytes += d.total_bytes;
        capacity.allocated_bytes += d.allocated_bytes;
        capacity.allocatable_bytes += d.allocatable_bytes;
    }
    capacity
}

/// What the replicas of a datanode hold (`GET /v1/admin/usage`), or `None` when it does not
/// answer within 2 s.
pub async fn replica_usage(snapshot: &Snapshot, address: &str) -> Option<Vec<ReplicaUsage>> {
    datanode_admin(snapshot, address, USAGE_PATH).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cluster's etcd client is kept: passes after the first reuse its connection (one TCP
    /// connection to etcd however many passes, where connecting per pass opens one each); a
    /// forgotten client (etcd did not answer a pass) connects anew.
    #[tokio::test]
    async fn etcd_clients_are_kept_until_forgotten() {
        let etcd = cairn_testkit::etcd::EtcdServer::start();
        // Connections to etcd's client port seen from this machine (established or closing).
        let connections = || {
            let port = format!(":{:04X} ", etcd.client_port);
            let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
            table
                .lines()
                .skip(1)
                .filter(|l| l.split_whitespace().nth(2).is_some_and(|r| format!("{r} ").ends_with(&port)))
                .count()
        };
        let before = connections(); // the health checks of the test's etcd start
        let clients = EtcdClients::default();
        let endpoints = vec![etcd.endpoint()];
        for _ in 0..5 {
            clients.get(&endpoints, "ns", "c1", None).await.unwrap().load().await.unwrap();
        }
        assert_eq!(connections(), before + 1, "five passes, one connection");
        clients.forget("ns", "c1");
        clients.get(&endpoints, "ns", "c1", None).await.unwrap().load().await.unwrap();
        assert_eq!(connections(), before + 2, "forgotten: a new connection (the old one closing)");
    }

    #[test]
    fn only_volumes_of_retired_replicas_are_purged() {
        use cairn_common::agent_api::VolumeInfo;
        let volume = |name: &str, partition| VolumeInfo { name: name.into(), partition, ..VolumeInfo::default() };
        let machine = |name: &str, volumes: Vec<VolumeInfo>| Machine {
            name: name.into(),
            zone: String::new(),
            disks: vec![DiskReport { volumes, usable: true, ..DiskReport::default() }],
            address: String::new(),
            selected: true,
            down: None,
        };
        let node = |id: &str| {
            (id.to_string(), NodeSpec { id: id.into(), zone: String::new(), address: String::new(), disks: vec![] })
        };
        let partition = |id, nodes: &[&str]| {
            let replicas = nodes.iter().map(|n| ReplicaSpec { node: n.to_string(), disk: String::new() }).collect();
            (id, cairn_cluster::PartitionSpec { id, state: PartitionState::Writable, replicas })
        };
        let retired = |partition, node: &str| {
            let r = RetiredReplica { partition, node: node.into(), disk: String::new(), retired_ms: 1 };
            (RetiredReplica::key(partition, node), r)
        };
        let topology = Topology {
            config: None,
            nodes: [node("m0"), node("m1")].into(),
            partitions: [
                partition(0, &["m0", "m1"]),
                partition(1, &["m1"]),
                partition(2, &["m1"]),
                partition(3, &["m1"]),
            ]
            .into(),
            // p1 moved off m0 (retired); p2 is not on m0 and nothing retired it (a topology
            // rewritten by hand): kept; p0 retired on m0 but placed there again: kept; p3's
            // volume on m0 is already gone, and m9 no longer exists.
            retired: [retired(1, "m0"), retired(0, "m0"), retired(3, "m0"), retired(4, "m9")].into(),
        };
        let machines = [
            machine(
                "m0",
                vec![
                    volume("c1-p0-m0", 0),
                    volume("c1-p1-m0", 1),
                    volume("c1-p2-m0", 2),
                    volume("c2-p1-m0", 1),
                    volume("c1-p2-p1-m0", 1),
                ],
            ),
            machine("m1", vec![volume("c1-p0-m1", 0), volume("c1-p1-m1", 1), volume("c1-p2-m1", 2)]),
        ];
        let known: Vec<&Machine> = machines.iter().collect();
        let by_machine = |found: Vec<(&Machine, Vec<u32>)>| -> Vec<(String, Vec<u32>)> {
            found.into_iter().map(|(m, p)| (m.name.clone(), p)).collect()
        };
        assert_eq!(by_machine(retired_volumes("c1", &known, &topology)), [("m0".to_string(), vec![1])]);
        assert_eq!(by_machine(unplaced_volumes("c1", &known, &topology)), [("m0".to_string(), vec![2])]);
        let mut done = finished_retirements("c1", &known, &topology);
        done.sort();
        assert_eq!(done, [RetiredReplica::key(3, "m0"), RetiredReplica::key(4, "m9")]);
        assert_eq!(partition_list(&[1, 2]), "p1, p2");
    }

    #[test]
    fn a_replica_its_datanode_cannot_open_does_not_count_as_live() {
        let mut snapshot = Snapshot::default();
        let replicas = ["m0", "m1", "m2"].map(|n| ReplicaSpec { node: n.into(), disk: String::new() }).to_vec();
        let p = cairn_cluster::PartitionSpec { id: 4, state: PartitionState::Writable, replicas };
        snapshot.topology.partitions.insert(4, p);
        for node in ["m0", "m1", "m2"] {
            let live = cairn_cluster::LiveNode { node: node.into(), ..cairn_cluster::LiveNode::default() };
            snapshot.live.insert(node.into(), live);
        }
        assert_eq!(partition_counts(&snapshot, 3).under_replicated, 0);
        snapshot.live.get_mut("m2").unwrap().unopened.insert(4, "disk wiped".into());
        assert!(!replica_serving(&snapshot, 4, "m2") && replica_serving(&snapshot, 4, "m1"));
        assert_eq!(partition_counts(&snapshot, 3).under_replicated, 1, "2 of 3 serve");
    }

    #[test]
    fn a_cluster_with_no_writable_partition_is_full() {
        let counts =
            |total, writable| PartitionCounts { total, writable, read_only: total - writable, under_replicated: 0 };
        assert_eq!(cluster_full(&counts(0, 0)), None, "no partitions yet is not full");
        assert_eq!(cluster_full(&counts(6, 1)), None);
        let (reason, message) = cluster_full(&counts(6, 0)).unwrap();
        assert_eq!(reason, "ClusterFull");
        assert!(message.starts_with("all 6 partitions are full"), "{message}");
    }

    #[test]
    fn replicas_a_datanode_cannot_open_make_one_message() {
        let mut snapshot = Snapshot::default();
        assert_eq!(unopened_replicas(&snapshot), None);
        for (node, partitions) in [("m0", vec![1u32, 2]), ("m1", vec![]), ("m2", vec![3, 4, 5])] {
            let live = cairn_cluster::LiveNode {
                tls: false,
                node: node.into(),
                address: String::new(),
                peer_address: None,
                peer_tls: false,
                zone: String::new(),
                started_ms: 0,
                free_bytes: Default::default(),
                unopened: partitions.into_iter().map(|p| (p, format!("reason {p}"))).collect(),
            };
            snapshot.live.insert(node.into(), live);
        }
        let message = unopened_replicas(&snapshot).unwrap();
        assert!(message.starts_with("m0 cannot open partition 1: reason 1; m0 cannot open partition 2"), "{message}");
        assert!(message.ends_with("; and 2 more"), "{message}");
    }
}
