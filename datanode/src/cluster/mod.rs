//! A datanode in a cluster: membership in etcd, the volumes of the replicas assigned to this
//! node, routing of the public API to replicas with write quorum, the replica API between
//! datanodes, and pull replication. docs/cluster.md describes the protocols.
//!
//! - [`Cluster`] (this file): registration, the topology watch, and the reconciler that opens and
//!   closes this node's replicas and starts and stops their replication.
//! - [`router`]: PUT/GET/DELETE/TTL of the public API across replicas.
//! - [`replication`]: each replica pulls its peers' journals (one puller per peer node), and
//!   anti-entropy.
//!
//! What datanodes ask each other is served by `api::replica`; its wire types are
//! `cairn_cluster::replica`.

pub mod names;
pub mod replication;
pub mod router;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_cluster::etcd::{ClusterStore, Snapshot};
use cairn_cluster::{ClusterConfig, LiveNode, PartitionSpec, Topology};
use cairn_common::agent_api::CreateVolumeRequest;
use cairn_common::volume_layout::VolumeMarker;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::engine::{now_ms, Volume, VolumeConfig};
use crate::store::{Store, VolumeSource};

/// How far ahead of a node's clock a TTL stamp from another node may be: a stamp far ahead
/// would win over every later change until the clocks caught up with it. Checked where a
/// change enters a replica and where replication takes a peer's expiry.
pub const MAX_TTL_STAMP_AHEAD_MS: u64 = 3_600_000;

/// Whether `stamp` is more than [`MAX_TTL_STAMP_AHEAD_MS`] ahead of `now`.
pub fn stamp_too_far_ahead(stamp: u64, now: u64) -> bool {
    stamp > now.saturating_add(MAX_TTL_STAMP_AHEAD_MS)
}

/// Journal entries kept below the lowest cursor of a partition's peers.
const ACK_MARGIN: u64 = 10_000;

/// How far each peer node has pulled each local replica's journal: the cursors of its last
/// journal request (in memory: after a restart, nothing is truncated by acks until every peer
/// has asked again).
#[derive(Default)]
pub struct JournalAcks(Mutex<BTreeMap<(u32, String), u64>>);

impl JournalAcks {
    pub fn note(&self, node: &str, cursors: &[cairn_cluster::replica::JournalCursor]) {
        if node.is_empty() {
            return;
        }
        let mut acks = self.0.lock().expect("acks lock");
        for cursor in cursors {
            acks.insert((cursor.partition, node.to_owned()), cursor.from);
        }
    }

    /// The lowest cursor of `peers` on `partition`; `None` while one of them has not asked.
    pub fn min(&self, partition: u32, peers: &[&str]) -> Option<u64> {
        let acks = self.0.lock().expect("acks lock");
        peers
            .iter()
            .map(|p| acks.get(&(partition, (*p).to_owned())).copied())
            .collect::<Option<Vec<u64>>>()?
            .into_iter()
            .min()
    }
}

/// The files of a node's mutual TLS with its peers.
#[derive(Debug, Clone)]
pub struct PeerTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub etcd: Vec<String>,
    pub namespace: String,
    pub cluster: String,
    pub node_id: String,
    pub zone: String,
    /// host:port other datanodes and clients use to reach this node.
    pub advertise: String,
    /// Where the replica routes are served apart from the blob API (`--peer-listen`), and the
    /// host:port peers reach it at.
    pub peer_listen: Option<std::net::SocketAddr>,
    pub peer_advertise: Option<String>,
    /// Mutual TLS on the peer port and in calls to peers: the cluster CA, this node's
    /// certificate and key (PEM files; the certificate is reloaded when its files change).
    pub peer_tls: Option<PeerTlsFiles>,
    /// Whether the blob API speaks HTTPS (`--tls-cert`; registered in `live/<node>.tls`).
    pub blob_tls: bool,
    pub volumes: VolumeSource,
    /// Timeout of one request to another datanode.
    pub peer_timeout: Duration,
    /// Lease TTL of the live registration.
    pub lease_ttl_secs: i64,
    /// How often each replica compares its id digests with each peer's (anti-entropy).
    pub anti_entropy_interval: Duration,
    /// Journal entries a replica keeps at most, whatever its peers have pulled: a peer further
    /// behind bootstraps from the index instead.
    pub journal_retain_entries: u64,
    /// TLS to etcd.
    pub etcd_tls: Option<cairn_cluster::etcd::EtcdTls>,
}

pub struct Cluster {
    pub options: ClusterOptions,
    pub store: Arc<Store>,
    pub etcd: ClusterStore,
    pub view: watch::Receiver<Arc<Snapshot>>,
    pub http: reqwest::Client,
    pub replication: replication::Replication,
    /// How far each peer has pulled each local replica's journal (from its journal requests).
    pub journal_acks: JournalAcks,
    volume_config: VolumeConfig,
    /// The node token this node sends to its peers (and accepts, besides etcd's).
    node_token: cairn_cluster::access::Secret,
    /// The cluster's token at the disk agent (etcd's `disk-agent-token`), on disk-agent volumes.
    disk_agent_token: Option<cairn_cluster::access::Secret>,
    /// The partition new blobs go to, held for a few ms (see `WriteAffinity`).
    write_affinity: crate::store::WriteAffinity,
    /// Replica writes queued for each peer node (see `router::put_on_peer`).
    peer_writes: Mutex<BTreeMap<String, tokio::sync::mpsc::UnboundedSender<router::QueuedPut>>>,
    /// Peer nodes being pulled from: peer → its puller's token.
    pullers: Mutex<BTreeMap<String, CancellationToken>>,
    /// Bumped when this node's replicas change (opened, closed): pullers look again.
    replicas: watch::Sender<u64>,
    /// Assigned replicas that could not be opened, with the reason; retried, and published with
    /// the live registration.
    unopened: Mutex<BTreeMap<u32, String>>,
    cancel: CancellationToken,
}

impl Cluster {
    /// Connects to etcd, registers, opens this node's replicas and keeps them in step with the
    /// topology until `cancel`.
    pub async fn start(
        options: ClusterOptions,
        volume_config: VolumeConfig,
        store: Arc<Store>,
        peer_tls: Option<rustls::ClientConfig>,
        cancel: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let metrics = store.metrics().clone();
        let etcd =
            ClusterStore::connect_tls(&options.etcd, &options.namespace, &options.cluster, options.etcd_tls.as_ref())
                .await?
                .with_latency_observer(Arc::new(move |call, took| {
                    let labels = crate::metrics::EtcdCallLabels { call };
                    metrics.etcd_request_seconds.get_or_create(&labels).observe(took.as_secs_f64());
                }));
        // Replica calls carry the cluster's node token (made by the first node if need be).
        let node_token = etcd.ensure_node_token(&cairn_cluster::access::new_node_token()).await?;
        let disk_agent_token = match &options.volumes {
            VolumeSource::DiskAgent { .. } => {
                Some(etcd.ensure_disk_agent_token(&cairn_cluster::access::new_node_token()).await?)
            }
            VolumeSource::DataDir(_) => None,
        };
        let initial = etcd.load().await?;
        let view = etcd.watch(initial, cancel.clone());
        let mut headers = reqwest::header::HeaderMap::new();
        let mut token = reqwest::header::HeaderValue::from_str(node_token.expose())?;
        token.set_sensitive(true);
        headers.insert(cairn_cluster::access::NODE_TOKEN_HEADER, token);
        let mut http = reqwest::Client::builder();
        if let Some(tls) = peer_tls {
            // Peers are called over mutual TLS: this node's certificate, the cluster CA only.
            http = http.use_preconfigured_tls(tls);
        }
        let http = http
            .default_headers(headers)
            // The token goes to peers only: never on to wherever a redirect points.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .build()?;
        let cluster = Arc::new(Self {
            replication: replication::Replication::new(store.metrics().clone()),
            journal_acks: JournalAcks::default(),
            options,
            store,
            etcd,
            view,
            http,
            volume_config,
            pullers: Mutex::default(),
            write_affinity: Default::default(),
            node_token,
            disk_agent_token,
            peer_writes: Mutex::default(),
            replicas: watch::Sender::new(0),
            unopened: Mutex::default(),
            cancel: cancel.clone(),
        });
        let live = LiveNode {
            tls: cluster.options.blob_tls,
            node: cluster.options.node_id.clone(),
            address: cluster.options.advertise.clone(),
            peer_address: cluster.options.peer_advertise.clone(),
            peer_tls: cluster.options.peer_tls.is_some(),
            zone: cluster.options.zone.clone(),
            started_ms: now_ms(),
            free_bytes: BTreeMap::new(),
            unopened: BTreeMap::new(),
        };
        let (live_tx, live_rx) = watch::channel(live);
        tokio::spawn({
            let (etcd, cancel, ttl) = (cluster.etcd.clone(), cancel.clone(), cluster.options.lease_ttl_secs);
            async move { etcd.keep_registered(live_rx, ttl, cancel).await }
        });
        // Free space of each replica, published with the registration for writers to weigh.
        tokio::spawn({
            let cluster = cluster.clone();
            async move {
                loop {
                    let mut free = BTreeMap::new();
                    for volume in cluster.store.volumes() {
                        if let Ok(stats) = volume.stats() {
                            // A replica that takes no blobs now (full, stalled) has no room to offer.
                            let room = match stats.health {
                                crate::engine::VolumeHealth::Writable => {
                                    stats.capacity_bytes.saturating_sub(stats.allocated_bytes)
                                }
                                _ => 0,
                            };
                            free.insert(volume.partition(), room);
                        }
                    }
                    let unopened = cluster.unopened();
                    live_tx.send_if_modified(|l| {
                        let changed = l.free_bytes != free || l.unopened != unopened;
                        l.free_bytes = free;
                        l.unopened = unopened;
                        changed
                    });
                    tokio::select! {
                        _ = cluster.cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                }
            }
        });
        // Journals are truncated below what every replica of their partition has pulled.
        tokio::spawn({
            let cluster = cluster.clone();
            async move {
                loop {
                    tokio::select! {
                        _ = cluster.cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                    }
                    cluster.truncate_journals().await;
                }
            }
        });
        let snapshot = cluster.view.borrow().clone();
        cluster.reconcile(&snapshot).await;
        tokio::spawn({
            let cluster = cluster.clone();
            async move {
                let mut view = cluster.view.clone();
                loop {
                    // Replicas that could not be opened are tried again every few seconds: the
                    // cause (a disk agent restarting, no file descriptors) may pass.
                    let retry = !cluster.unopened().is_empty();
                    tokio::select! {
                        _ = cluster.cancel.cancelled() => return,
                        changed = view.changed() => if changed.is_err() { return },
                        _ = tokio::time::sleep(Duration::from_secs(5)), if retry => {}
                    }
                    let snapshot = view.borrow_and_update().clone();
                    cluster.reconcile(&snapshot).await;
                    // The token record gone (deleted by hand, or by an older binary's topology
                    // write): put this node's back, the one every running peer sends.
                    if snapshot.node_token.is_none() {
                        if let Err(e) = cluster.etcd.ensure_node_token(&cluster.node_token).await {
                            tracing::warn!(error = %e, "the cluster's node token could not be put back");
                        }
                    }
                }
            }
        });
        Ok(cluster)
    }

    pub fn node_id(&self) -> &str {
        &self.options.node_id
    }

    /// The node token this node was started with (see docs/security.md).
    pub fn node_token(&self) -> &cairn_cluster::access::Secret {
        &self.node_token
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.view.borrow().clone()
    }

    /// Assigned replicas this node cannot open, with the reason.
    pub fn unopened(&self) -> BTreeMap<u32, String> {
        self.unopened.lock().expect("unopened lock").clone()
    }

    pub fn config(&self) -> Option<ClusterConfig> {
        self.snapshot().topology.config.clone()
    }

    /// Where a node answers: its live registration, else the address in the topology.
    pub fn address_of(snapshot: &Snapshot, node: &str) -> Option<String> {
        snapshot
            .live
            .get(node)
            .map(|l| l.address.clone())
            .or_else(|| snapshot.topology.nodes.get(node).map(|n| n.address.clone()))
    }

    /// The base URL a node's peers call it at (replica routes, and reads of its own replica):
    /// its peer port when it registered one (`https://` with mutual TLS), else
    /// `http://` [`Cluster::address_of`].
    /// A node with mutual TLS calls only peers that speak it: never one over plain HTTP, where
    /// its node token would travel in clear.
    pub fn peer_base_of(&self, snapshot: &Snapshot, node: &str) -> Option<String> {
        let live = snapshot.live.get(node);
        match (live.and_then(|l| l.peer_address.as_ref().map(|a| (a, l.peer_tls))), self.options.peer_tls.is_some()) {
            (Some((address, true)), _) => Some(format!("https://{address}")),
            (_, true) => None,
            (Some((address, false)), false) => Some(format!("http://{address}")),
            (None, false) => Self::address_of(snapshot, node).map(|a| format!("http://{a}")),
        }
    }

    /// Opens the volumes of the replicas assigned here, closes those no longer assigned (their
    /// data stays), and starts or stops replication from each peer.
    async fn reconcile(self: &Arc<Self>, snapshot: &Snapshot) {
        let me = self.node_id().to_owned();
        let Some(config) = snapshot.topology.config.clone() else { return };
        let assigned: Vec<PartitionSpec> = snapshot.topology.partitions_of(&me).cloned().collect();
        for partition in &assigned {
            if self.store.volume(partition.id).is_some() {
                continue;
            }
            match self.open_replica(&config, partition).await {
                Ok(volume) => {
                    tracing::info!(partition = partition.id, "serving replica");
                    self.store.insert(volume);
                    self.unopened.lock().expect("unopened lock").remove(&partition.id);
                }
                Err(e) => {
                    let reason = format!("{e:#}");
                    let mut unopened = self.unopened.lock().expect("unopened lock");
                    if unopened.get(&partition.id) != Some(&reason) {
                        tracing::error!(partition = partition.id, error = %reason, "cannot open replica; trying again");
                    }
                    unopened.insert(partition.id, reason);
                }
            }
        }
        self.unopened.lock().expect("unopened lock").retain(|p, _| assigned.iter().any(|a| a.id == *p));
        for volume in self.store.volumes() {
            if !assigned.iter().any(|p| p.id == volume.partition()) {
                tracing::warn!(partition = volume.partition(), "replica no longer assigned here; closing (data kept)");
                if let Some(volume) = self.store.remove(volume.partition()) {
                    let _ = tokio::task::spawn_blocking(move || volume.close()).await;
                }
            }
        }
        // One puller per peer node that shares an open replica with this one.
        let wanted: std::collections::BTreeSet<String> = assigned
            .iter()
            .filter(|p| self.store.volume(p.id).is_some())
            .flat_map(|p| p.replicas.iter().filter(|r| r.node != me).map(|r| r.node.clone()))
            .collect();
        {
            let mut pullers = self.pullers.lock().expect("pullers lock");
            pullers.retain(|peer, token| {
                let keep = wanted.contains(peer);
                if !keep {
                    token.cancel();
                    self.replication.forget_peer(peer);
                }
                keep
            });
            for peer in wanted {
                if pullers.contains_key(&peer) {
                    continue;
                }
                let token = self.cancel.child_token();
                pullers.insert(peer.clone(), token.clone());
                tokio::spawn(replication::pull_peer(self.clone(), peer, token));
            }
        }
        self.replicas.send_modify(|generation| *generation += 1);
    }

    /// Truncates each local replica's journal below what every other replica of its partition
    /// has pulled (less a margin: a peer's token is durable only at its next checkpoint, and a
    /// crash may take it back a little), and in any case to the last `journal_retain_entries`.
    async fn truncate_journals(&self) {
        let snapshot = self.snapshot();
        for volume in self.store.volumes() {
            let partition = volume.partition();
            let Some(spec) = snapshot.topology.partitions.get(&partition) else { continue };
            let peers: Vec<&str> =
                spec.replicas.iter().map(|r| r.node.as_str()).filter(|n| *n != self.node_id()).collect();
            let acked = self.journal_acks.min(partition, &peers).map(|a| a.saturating_sub(ACK_MARGIN)).unwrap_or(0);
            let tail = volume.journal_tail();
            let below = acked.max(tail.saturating_sub(self.options.journal_retain_entries));
            let head = {
                let volume = volume.clone();
                match tokio::task::spawn_blocking(move || volume.journal_head()).await {
                    Ok(Ok(head)) => head,
                    _ => continue,
                }
            };
            if below > head {
                if let Err(e) = volume.truncate_journal(below).await {
                    tracing::warn!(partition, error = %e, "cannot truncate the journal");
                }
            }
        }
    }

    /// Wakes when this node's replicas change (see [`Cluster::replicas`]).
    pub fn replicas_changed(&self) -> watch::Receiver<u64> {
        self.replicas.subscribe()
    }

    /// How a replica's volume is opened: it takes any blob its segments hold (the cluster's
    /// largest-blob setting is the API's to enforce, and may be raised up to that), and keeps one
    /// segment (at most a sixteenth of the volume) of room for what its peers may still owe it (a replica that was away packs what
    /// it missed differently, and must not find itself a few blobs short for good).
    fn replica_config(&self, config: &ClusterConfig) -> VolumeConfig {
        let max_blob_bytes = cairn_common::volume_layout::largest_blob_for_segment(config.segment_size_bytes);
        let peer_reserve_bytes = config.segment_size_bytes.min(config.volume_size_bytes / 16);
        VolumeConfig { max_blob_bytes, peer_reserve_bytes, ..self.volume_config.clone() }
    }

    /// Gets the replica's volume (from the disk agent, or under the data directory) and opens it.
    async fn open_replica(&self, config: &ClusterConfig, partition: &PartitionSpec) -> anyhow::Result<Arc<Volume>> {
        let name = Topology::volume_name(&self.options.cluster, partition.id, self.node_id());
        let me = self.node_id();
        let disk = partition.replicas.iter().find(|r| r.node == me).map(|r| r.disk.clone()).unwrap_or_default();
        let dir: PathBuf = match &self.options.volumes {
            VolumeSource::DiskAgent { socket, .. } => {
                let token = self.disk_agent_token.as_ref().expect("made at start on disk-agent volumes");
                let agent = cairn_common::agent_client::AgentClient::new(socket)
                    .as_cluster(&self.options.cluster, token.expose());
                let request = CreateVolumeRequest {
                    disk,
                    capacity_bytes: config.volume_size_bytes,
                    segment_size_bytes: config.segment_size_bytes,
                    partition: partition.id,
                    node: Some(me.to_owned()),
                };
                PathBuf::from(agent.create_volume(&name, &request).await?.volume.path)
            }
            VolumeSource::DataDir(data) => {
                let dir = data.join("volumes").join(&name);
                let marker = VolumeMarker::new(partition.id, config.segment_size_bytes, config.volume_size_bytes)?;
                let (d, c) = (dir.clone(), self.replica_config(config));
                tokio::task::spawn_blocking(move || Volume::create(&d, &marker, &c)).await??;
                dir
            }
        };
        let (volume_config, metrics) = (self.replica_config(config), self.store.metrics().engine.clone());
        let volume = tokio::task::spawn_blocking(move || Volume::open(&dir, volume_config, metrics)).await??;
        anyhow::ensure!(
            volume.partition() == partition.id,
            "volume {name} holds partition {}, expected {}",
            volume.partition(),
            partition.id
        );
        Ok(Arc::new(volume))
    }

    /// Marks a partition read-only in etcd (its volume here is full), guarded by revision.
    pub async fn mark_read_only(&self, partition: u32) {
        for _ in 0..3 {
            let snapshot = self.snapshot();
            let Some(mut spec) = snapshot.topology.partitions.get(&partition).cloned() else { return };
            if spec.state != cairn_cluster::PartitionState::Writable {
                return;
            }
            spec.state = cairn_cluster::PartitionState::ReadOnly;
            match self.etcd.update_partition(&snapshot, &spec).await {
                Ok(true) => {
                    tracing::warn!(partition, "partition full: marked read-only");
                    return;
                }
                Ok(false) => match self.etcd.load().await {
                    Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    Err(e) => return tracing::warn!(error = %e, "cannot mark partition read-only"),
                },
                Err(e) => return tracing::warn!(error = %e, "cannot mark partition read-only"),
            }
        }
    }
}
