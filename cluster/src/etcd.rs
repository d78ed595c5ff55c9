//! The cluster in etcd (docs/etcd-layout.md): topology keys written in guarded transactions,
//! leased live registrations kept alive in a loop, and a watch that keeps a snapshot current.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::access::{self, AccessKey, Secret};
use crate::planner::{self, PlanError};
use crate::topology::{ClusterConfig, LiveNode, NodeSpec, PartitionSpec, RetiredReplica, Topology};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("{key}: {reason}")]
    BadValue { key: String, reason: String },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("the topology kept changing under this update ({0} attempts)")]
    Contended(u32),
}

/// Keys changed per transaction (etcd allows 128 operations, and the guards count too).
pub const TXN_CHUNK: usize = 60;

/// What [`ClusterStore::write_topology`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// The keys that changed, relative to the cluster's prefix and sorted (`nodes/m1`,
    /// `partitions/00000003`); empty when `desired` was already there.
    Keys(Vec<String>),
    /// A guard failed: someone changed the topology since the snapshot; nothing (more) written.
    Conflict,
}

/// The key of the cluster's node token, relative to the cluster's prefix.
pub const NODE_TOKEN: &str = "node-token";
/// The key of the token the cluster's datanodes present to disk agents (never rotated by Cairn:
/// each agent binds it to the cluster's volumes on its machine).
pub const DISK_AGENT_TOKEN: &str = "disk-agent-token";
/// Both tokens are stored as a [`NodeToken`] record.
const NODE_TOKEN_FORMAT: u32 = 1;

#[derive(serde::Serialize, serde::Deserialize)]
struct NodeToken {
    format: u32,
    token: String,
}

impl NodeToken {
    /// A stored record's token, if it is one this build understands.
    fn decode(bytes: &[u8]) -> Option<Secret> {
        let record: NodeToken = serde_json::from_slice(bytes).ok()?;
        (record.format == NODE_TOKEN_FORMAT && access::is_node_token(&record.token)).then(|| Secret::new(record.token))
    }
}

/// What etcd holds for one cluster at one revision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub topology: Topology,
    pub live: BTreeMap<String, LiveNode>,
    /// Access keys by id (`keys/<id>`); a record that does not decode is left out (and logged):
    /// a key that cannot be read lets no one in.
    pub keys: BTreeMap<String, AccessKey>,
    /// The token datanodes and the operator present to each other's replica and admin routes
    /// (`node-token`), made once per cluster by [`ClusterStore::ensure_node_token`].
    pub node_token: Option<Secret>,
    pub revision: i64,
    /// mod_revision of every topology key, for guarded updates.
    versions: BTreeMap<String, i64>,
}

impl Snapshot {
    /// The revision of the topology: the newest mod_revision of its keys. Unlike `revision`
    /// (etcd's, moved by every datanode's registration), it changes only with the topology.
    pub fn topology_revision(&self) -> i64 {
        self.versions.values().copied().max().unwrap_or(0)
    }
}

#[derive(Clone)]
pub struct ClusterStore {
    client: Client,
    prefix: String,
    observer: Option<LatencyObserver>,
}

/// Told how long each etcd call took, by kind (`load`, `write`, `register`, `keep_alive`,
/// `update_live`): the datanode turns it into `cairn_etcd_request_duration_seconds`.
pub type LatencyObserver = Arc<dyn Fn(&'static str, Duration) + Send + Sync>;

/// Connection settings: fail fast when etcd is away, notice a dead connection.
pub fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
        .with_keep_alive_while_idle(true)
}

/// TLS to etcd, as PEM: the CA that signed etcd's certificate, and optionally a client
/// certificate and key (etcd's `--client-cert-auth`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: Vec<u8>,
    pub cert: Option<Vec<u8>>,
    pub key: Option<Vec<u8>>,
}

impl EtcdTls {
    /// From files (`--etcd-ca`, `--etcd-cert`, `--etcd-key`).
    pub fn from_files(
        ca: &std::path::Path,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> std::io::Result<Self> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))
        };
        Ok(Self { ca: read(ca)?, cert: cert.map(read).transpose()?, key: key.map(read).transpose()? })
    }

    fn options(&self) -> etcd_client::TlsOptions {
        let mut tls = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(&self.ca));
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
        }
        tls
    }
}

/// The `--etcd-ca/--etcd-cert/--etcd-key` flags, shared by every binary that talks to etcd.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EtcdTlsArgs {
    /// CA certificate (PEM) of a TLS etcd (endpoints then use https://).
    #[arg(long, env = "CAIRN_ETCD_CA")]
    pub etcd_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for etcd's client-certificate authentication.
    #[arg(long, env = "CAIRN_ETCD_CERT", requires = "etcd_ca")]
    pub etcd_cert: Option<std::path::PathBuf>,
    /// Its key (PEM).
    #[arg(long, env = "CAIRN_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<std::path::PathBuf>,
}

impl EtcdTlsArgs {
    /// The TLS material, read from the files given; `None` for a plain etcd.
    pub fn load(&self) -> std::io::Result<Option<EtcdTls>> {
        self.etcd_ca
            .as_deref()
            .map(|ca| EtcdTls::from_files(ca, self.etcd_cert.as_deref(), self.etcd_key.as_deref()))
            .transpose()
    }
}

impl ClusterStore {
    /// `namespace` separates clusters of the same name (the Kubernetes namespace, or `default`).
    pub async fn connect(endpoints: &[String], namespace: &str, cluster: &str) -> Result<Self, StoreError> {
        Self::connect_tls(endpoints, namespace, cluster, None).await
    }

    /// As [`ClusterStore::connect`], over TLS when `tls` is given (endpoints then use https://).
    pub async fn connect_tls(
        endpoints: &[String],
        namespace: &str,
        cluster: &str,
        tls: Option<&EtcdTls>,
    ) -> Result<Self, StoreError> {
        let mut options = connect_options();
        if let Some(tls) = tls {
            options = options.with_tls(tls.options());
        }
        let client = Client::connect(endpoints, Some(options)).await?;
        Ok(Self { client, prefix: format!("/cairn/v1/{namespace}/{cluster}/"), observer: None })
    }

    /// Reports the latency of every etcd call to `observer`.
    pub fn with_latency_observer(mut self, observer: LatencyObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Awaits an etcd call, reporting how long it took.
    async fn timed<T>(&self, call: &'static str, future: impl std::future::Future<Output = T>) -> T {
        let started = std::time::Instant::now();
        let result = future.await;
        if let Some(observe) = &self.observer {
            observe(call, started.elapsed());
        }
        result
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn config_key(&self) -> String {
        format!("{}config", self.prefix)
    }
    fn node_key(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.prefix)
    }
    fn partition_key(&self, id: u32) -> String {
        format!("{}partitions/{id:08}", self.prefix)
    }
    fn live_key(&self, node: &str) -> String {
        format!("{}live/{node}", self.prefix)
    }

    /// Everything under the cluster's prefix.
    pub async fn load(&self) -> Result<Snapshot, StoreError> {
        let mut client = self.client.clone();
        let response =
            self.timed("load", client.get(self.prefix.clone(), Some(GetOptions::new().with_prefix()))).await?;
        let mut snapshot =
            Snapshot { revision: response.header().map(|h| h.revision()).unwrap_or_default(), ..Snapshot::default() };
        for kv in response.kvs() {
            let key = kv.key_str()?.to_owned();
            self.apply(&mut snapshot, &key, Some((kv.value(), kv.mod_revision())))?;
        }
        Ok(snapshot)
    }

    /// Puts one key's value (or its deletion) into a snapshot.
    fn apply(&self, snapshot: &mut Snapshot, key: &str, value: Option<(&[u8], i64)>) -> Result<(), StoreError> {
        let Some(rel) = key.strip_prefix(&self.prefix) else { return Ok(()) };
        fn parse<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
            serde_json::from_slice(bytes).map_err(|e| StoreError::BadValue { key: key.into(), reason: e.to_string() })
        }
        let t = &mut snapshot.topology;
        match (rel.split_once('/'), value) {
            (None, Some((bytes, _))) if rel == "config" => t.config = Some(parse(key, bytes)?),
            (None, None) if rel == "config" => t.config = None,
            (Some(("nodes", id)), Some((bytes, _))) => {
                t.nodes.insert(id.to_owned(), parse(key, bytes)?);
            }
            (Some(("nodes", id)), None) => {
                t.nodes.remove(id);
            }
            (Some(("partitions", id)), v) => {
                let id: u32 =
                    id.parse().map_err(|_| StoreError::BadValue { key: key.into(), reason: "bad id".into() })?;
                match v {
                    Some((bytes, _)) => t.partitions.insert(id, parse(key, bytes)?),
                    None => t.partitions.remove(&id),
                };
            }
            (Some(("retired", id)), Some((bytes, _))) => {
                t.retired.insert(id.to_owned(), parse(key, bytes)?);
            }
            (Some(("retired", id)), None) => {
                t.retired.remove(id);
            }
            (Some(("live", node)), Some((bytes, _))) => {
                snapshot.live.insert(node.to_owned(), parse(key, bytes)?);
            }
            (Some(("live", node)), None) => {
                snapshot.live.remove(node);
            }
            (Some(("keys", id)), Some((bytes, _))) => match AccessKey::decode(bytes) {
                Ok(access) if access.id == id => {
                    snapshot.keys.insert(id.to_owned(), access);
                }
                Ok(_) | Err(_) => {
                    tracing::warn!(key, "an access key record that does not decode (or names another id) is ignored");
                    snapshot.keys.remove(id);
                }
            },
            (Some(("keys", id)), None) => {
                snapshot.keys.remove(id);
            }
            (None, Some((bytes, _))) if rel == NODE_TOKEN => {
                snapshot.node_token = NodeToken::decode(bytes);
                if snapshot.node_token.is_none() {
                    tracing::warn!(key, "a node token record that does not decode is ignored");
                }
            }
            (None, None) if rel == NODE_TOKEN => snapshot.node_token = None,
            _ => tracing::debug!(key, "ignoring an unknown key"),
        }
        // Only the topology's keys guard topology writes (and make its revision).
        if !rel.starts_with("live/") && !rel.starts_with("keys/") && rel != NODE_TOKEN && rel != DISK_AGENT_TOKEN {
            match value {
                Some((_, revision)) => snapshot.versions.insert(key.to_owned(), revision),
                None => snapshot.versions.remove(key),
            };
        }
        Ok(())
    }

    /// Writes the config and nodes, and a placement planned from them and what etcd holds, in one
    /// transaction guarded by the mod revision of every topology key it read (retried when another
    /// writer got there first). Returns the topology written.
    /// Plans and writes a topology; the topology, and the keys written (none when unchanged).
    pub async fn apply_topology(
        &self,
        config: &ClusterConfig,
        nodes: &[NodeSpec],
    ) -> Result<(Topology, Vec<String>), StoreError> {
        const ATTEMPTS: u32 = 5;
        for _ in 0..ATTEMPTS {
            let snapshot = self.load().await?;
            let partitions = planner::plan(config, nodes, &snapshot.topology.partitions)?;
            let desired = Topology {
                config: Some(config.clone()),
                nodes: nodes.iter().map(|n| (n.id.clone(), n.clone())).collect(),
                partitions,
                retired: snapshot.topology.retired.clone(),
            };
            if let Written::Keys(keys) = self.write_topology(&snapshot, &desired).await? {
                return Ok((desired, keys));
            }
        }
        Err(StoreError::Contended(ATTEMPTS))
    }

    /// Stores a new access key; false if one with its id exists (ids are random: make another).
    pub async fn create_key(&self, key: &AccessKey) -> Result<bool, StoreError> {
        let path = format!("{}keys/{}", self.prefix, key.id);
        let value = serde_json::to_vec(key).expect("an access key serializes");
        let txn = Txn::new()
            .when([Compare::version(path.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(path, value, None)]);
        let mut client = self.client.clone();
        Ok(self.timed("write", client.txn(txn)).await?.succeeded())
    }

    /// The key record `id`, if there is one that decodes.
    pub async fn get_key(&self, id: &str) -> Result<Option<AccessKey>, StoreError> {
        let path = format!("{}keys/{id}", self.prefix);
        let mut client = self.client.clone();
        let response = self.timed("read", client.get(path.clone(), None)).await?;
        match response.kvs().first() {
            None => Ok(None),
            Some(kv) => {
                AccessKey::decode(kv.value()).map(Some).map_err(|reason| StoreError::BadValue { key: path, reason })
            }
        }
    }

    /// Writes a key record as given (the operator's, for a StoreAccessKey whose scopes changed).
    pub async fn put_key(&self, key: &AccessKey) -> Result<(), StoreError> {
        let path = format!("{}keys/{}", self.prefix, key.id);
        let value = serde_json::to_vec(key).expect("an access key serializes");
        let mut client = self.client.clone();
        self.timed("write", client.put(path, value, None)).await?;
        Ok(())
    }

    /// Revokes an access key: false if there was none with this id.
    pub async fn delete_key(&self, id: &str) -> Result<bool, StoreError> {
        let mut client = self.client.clone();
        let path = format!("{}keys/{id}", self.prefix);
        Ok(self.timed("write", client.delete(path, None)).await?.deleted() > 0)
    }

    /// The cluster's node token: the one stored, or `proposed` if there is none yet (the first
    /// datanode makes it; a running one puts its own back if the record disappears). A record
    /// that does not decode is an error: the cluster's nodes would not agree on a token.
    pub async fn ensure_node_token(&self, proposed: &Secret) -> Result<Secret, StoreError> {
        self.ensure_token(NODE_TOKEN, proposed).await
    }

    /// The token of the cluster's datanodes at disk agents: `proposed`, stored if the cluster has
    /// none yet, else the stored one.
    pub async fn ensure_disk_agent_token(&self, proposed: &Secret) -> Result<Secret, StoreError> {
        self.ensure_token(DISK_AGENT_TOKEN, proposed).await
    }

    async fn ensure_token(&self, key: &str, proposed: &Secret) -> Result<Secret, StoreError> {
        let path = format!("{}{key}", self.prefix);
        let made = NodeToken { format: NODE_TOKEN_FORMAT, token: proposed.expose().to_owned() };
        let txn = Txn::new()
            .when([Compare::version(path.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(path.clone(), serde_json::to_vec(&made).expect("serializes"), None)])
            .or_else([TxnOp::get(path.clone(), None)]);
        let mut client = self.client.clone();
        let response = self.timed("write", client.txn(txn)).await?;
        if response.succeeded() {
            return Ok(proposed.clone());
        }
        let stored = response.op_responses().into_iter().find_map(|op| match op {
            etcd_client::TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        stored.as_deref().and_then(NodeToken::decode).ok_or_else(|| StoreError::BadValue {
            key: path,
            reason: "not a token (43 letters and digits, format 1): delete it to have a new one made".into(),
        })
    }

    /// Removes every key of the cluster (a StoreCluster deleted with deletionPolicy Delete).
    pub async fn delete_all(&self) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        client.delete(self.prefix.clone(), Some(etcd_client::DeleteOptions::new().with_prefix())).await?;
        Ok(())
    }

    /// Replaces one partition (its state or replicas), guarded by what `snapshot` saw: false if
    /// someone changed the topology since.
    pub async fn update_partition(&self, snapshot: &Snapshot, partition: &PartitionSpec) -> Result<bool, StoreError> {
        let mut desired = snapshot.topology.clone();
        desired.partitions.insert(partition.id, partition.clone());
        Ok(matches!(self.write_topology(snapshot, &desired).await?, Written::Keys(_)))
    }

    /// From `snapshot.topology` to `desired`, writing only the keys that change, each guarded by
    /// the revision it was read at (or by its absence): [`Written::Conflict`] if someone changed
    /// one since.
    ///
    /// etcd caps a transaction at 128 operations (`--max-txn-ops`), so a large change is written
    /// in transactions of at most [`TXN_CHUNK`] keys, every one also guarded by the config key;
    /// a change that fits is one atomic transaction. Only the operator's leader (or one CLI call)
    /// writes the topology, so chunks are not interleaved with another writer's in practice, and
    /// a guard that fails stops the rest.
    pub async fn write_topology(&self, snapshot: &Snapshot, desired: &Topology) -> Result<Written, StoreError> {
        let values = self.encode(desired);
        let current = self.encode(&snapshot.topology);
        let guard = |key: &String| match snapshot.versions.get(key) {
            Some(revision) => Compare::mod_revision(key.clone(), CompareOp::Equal, *revision),
            None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
        };
        let mut changes: Vec<(String, Option<Vec<u8>>)> = Vec::new();
        for (key, value) in &values {
            if current.get(key) != Some(value) {
                changes.push((key.clone(), Some(value.clone())));
            }
        }
        for key in snapshot.versions.keys() {
            if !values.contains_key(key) {
                changes.push((key.clone(), None));
            }
        }
        if changes.is_empty() {
            return Ok(Written::Keys(Vec::new()));
        }
        let config_key = self.config_key();
        // The config key goes last: every earlier chunk is guarded by it being as read.
        changes.sort_by_key(|(key, _)| *key == config_key);
        let mut client = self.client.clone();
        for chunk in changes.chunks(TXN_CHUNK) {
            let mut guards: Vec<Compare> = chunk.iter().map(|(key, _)| guard(key)).collect();
            if !chunk.iter().any(|(key, _)| *key == config_key) {
                guards.push(guard(&config_key));
            }
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(key, value)| match value {
                    Some(value) => TxnOp::put(key.clone(), value.clone(), None),
                    None => TxnOp::delete(key.clone(), None),
                })
                .collect();
            if !self.timed("write", client.txn(Txn::new().when(guards).and_then(ops))).await?.succeeded() {
                return Ok(Written::Conflict);
            }
        }
        let mut keys: Vec<String> = changes.into_iter().map(|(key, _)| key[self.prefix.len()..].to_owned()).collect();
        keys.sort();
        Ok(Written::Keys(keys))
    }

    /// The topology as etcd keys and values.
    fn encode(&self, t: &Topology) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        if let Some(config) = &t.config {
            out.insert(self.config_key(), serde_json::to_vec(config).expect("JSON"));
        }
        for node in t.nodes.values() {
            out.insert(self.node_key(&node.id), serde_json::to_vec(node).expect("JSON"));
        }
        for p in t.partitions.values() {
            out.insert(self.partition_key(p.id), serde_json::to_vec(p).expect("JSON"));
        }
        for r in t.retired.values() {
            let key = format!("{}retired/{}", self.prefix, RetiredReplica::key(r.partition, &r.node));
            out.insert(key, serde_json::to_vec(r).expect("JSON"));
        }
        out
    }

    /// Keeps `live/<node>` registered under a lease until `cancel`: keep-alive every ttl/3, a new
    /// lease and registration whenever the old one expired or etcd was away, the value rewritten
    /// (same lease) when `live` changes, revoke on the way out.
    pub async fn keep_registered(&self, mut live: watch::Receiver<LiveNode>, ttl_secs: i64, cancel: CancellationToken) {
        let node = live.borrow().node.clone();
        let key = self.live_key(&node);
        let mut client = self.client.clone();
        let beat = Duration::from_millis((ttl_secs as u64 * 1000 / 3).max(100));
        let mut failures = 0u32;
        // The last lease granted: revoked on the way out, however the way out comes (a lease from
        // before an etcd restart may still hold the key).
        let mut last_lease = None;
        while !cancel.is_cancelled() {
            let value = serde_json::to_vec(&*live.borrow_and_update()).expect("JSON");
            let lease = self
                .timed("register", async {
                    let lease = client.lease_grant(ttl_secs, None).await?.id();
                    client.put(key.clone(), value, Some(PutOptions::new().with_lease(lease))).await?;
                    Ok::<_, etcd_client::Error>(lease)
                })
                .await;
            let lease = match lease {
                Ok(lease) => lease,
                Err(e) => {
                    tracing::warn!(error = %e, "registering in etcd failed; retrying");
                    failures += 1;
                    if !pause(&cancel, failures).await {
                        break;
                    }
                    continue;
                }
            };
            failures = 0;
            last_lease = Some(lease);
            tracing::info!(node = %node, lease, "registered in etcd");
            let kept = async {
                let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
                loop {
                    let answer = self
                        .timed("keep_alive", async {
                            keeper.keep_alive().await?;
                            responses.message().await
                        })
                        .await?;
                    match answer {
                        Some(r) if r.ttl() > 0 => {}
                        _ => return Ok::<_, etcd_client::Error>(()), // expired: register again
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(beat) => {}
                        changed = live.changed() => if changed.is_ok() {
                            let value = serde_json::to_vec(&*live.borrow_and_update()).expect("JSON");
                            let options = Some(PutOptions::new().with_lease(lease));
                            self.timed("update_live", client.put(key.clone(), value, options)).await?;
                        },
                    }
                }
            }
            .await;
            if cancel.is_cancelled() {
                break;
            }
            match kept {
                Ok(()) => tracing::warn!(node = %node, "lease expired; registering again"),
                Err(e) => {
                    tracing::warn!(error = %e, "lease keep-alive failed; registering again");
                    failures += 1;
                    if !pause(&cancel, failures).await {
                        break;
                    }
                }
            }
        }
        if let Some(lease) = last_lease {
            let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
        }
    }

    /// A snapshot kept current by a watch until `cancel`: resumed at revision + 1 when the stream
    /// breaks, re-listed when etcd compacted past it.
    pub fn watch(&self, initial: Snapshot, cancel: CancellationToken) -> watch::Receiver<Arc<Snapshot>> {
        let (tx, rx) = watch::channel(Arc::new(initial.clone()));
        let store = self.clone();
        tokio::spawn(async move {
            let mut snapshot = initial;
            let mut relist = false;
            let mut failures = 0u32;
            while !cancel.is_cancelled() {
                if relist {
                    match store.load().await {
                        Ok(fresh) => {
                            snapshot = fresh;
                            tx.send_replace(Arc::new(snapshot.clone()));
                            relist = false;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "listing etcd failed; retrying");
                            failures += 1;
                            if !pause(&cancel, failures).await {
                                return;
                            }
                            continue;
                        }
                    }
                }
                let mut client = store.client.clone();
                let options = WatchOptions::new().with_prefix().with_start_revision(snapshot.revision + 1);
                let mut stream = match client.watch(store.prefix.clone(), Some(options)).await {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "watching etcd failed; retrying");
                        failures += 1;
                        if !pause(&cancel, failures).await {
                            return;
                        }
                        continue;
                    }
                };
                loop {
                    let message = tokio::select! {
                        _ = cancel.cancelled() => return,
                        m = stream.message() => m,
                    };
                    match message {
                        Ok(Some(response)) => {
                            failures = 0;
                            if response.compact_revision() > 0 || response.canceled() {
                                tracing::warn!(
                                    compacted = response.compact_revision(),
                                    "watch canceled; listing again"
                                );
                                relist = true;
                                break;
                            }
                            let mut changed = false;
                            for event in response.events() {
                                let Some(kv) = event.kv() else { continue };
                                let Ok(key) = kv.key_str() else { continue };
                                let value = match event.event_type() {
                                    EventType::Put => Some((kv.value(), kv.mod_revision())),
                                    EventType::Delete => None,
                                };
                                if let Err(e) = store.apply(&mut snapshot, key, value) {
                                    tracing::warn!(error = %e, "ignoring a bad value");
                                }
                                snapshot.revision = snapshot.revision.max(kv.mod_revision());
                                changed = true;
                            }
                            if let Some(header) = response.header() {
                                snapshot.revision = snapshot.revision.max(header.revision());
                            }
                            if changed {
                                tx.send_replace(Arc::new(snapshot.clone()));
                            }
                        }
                        Ok(None) | Err(_) => {
                            tracing::warn!(revision = snapshot.revision, "watch stream ended; resuming");
                            failures += 1;
                            if !pause(&cancel, failures).await {
                                return;
                            }
                            break;
                        }
                    }
                }
            }
        });
        rx
    }
}

/// Waits before the next try of an etcd call that failed `failures` times in a row (250 ms
/// doubling to 2 s, jittered: a fleet of datanodes does not retry a restarting etcd in step, and
/// a registration is back well within its lease once etcd is); false when cancelled meanwhile.
async fn pause(cancel: &CancellationToken, failures: u32) -> bool {
    let wait = cairn_common::backoff::delay(failures, Duration::from_millis(250), Duration::from_secs(2));
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}
