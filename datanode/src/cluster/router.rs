//! The public API across replicas: PUT picks a writable partition and writes every replica in
//! parallel, answering at write quorum; DELETE and TTL updates need quorum too; reads try the
//! local replica, then the others, failing over on errors and timeouts.

use std::sync::Arc;

use bytes::Bytes;
use cairn_cluster::etcd::Snapshot;
use cairn_cluster::{ClusterConfig, LiveNode, PartitionSpec, PartitionState};
use cairn_common::BlobId;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};

use cairn_cluster::replica::{
    check_version, BatchAnswer, BlobBatch, BlobFrame, ReplicaBlob, TombstoneAnswer, TtlAnswer, TtlBody, WIRE_VERSION,
};

use super::Cluster;
use crate::engine::{BlobMeta, PutRequest, TtlMerge, VolumeError};
use crate::store::WriteAffinity;

/// Why the cluster could not do what was asked: the API layer maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("blob not found")]
    NotFound,
    #[error("blob was deleted")]
    Deleted,
    /// No replica has room for it.
    #[error("{0}")]
    NoRoom(String),
    /// Too few replicas answered for a write quorum (or for any read).
    #[error("{0}")]
    NoQuorum(String),
}

/// One write to one replica.
#[derive(Clone)]
enum ReplicaOp {
    Put {
        id: BlobId,
        meta: BlobMeta,
        payload: Bytes,
        created_ms: u64,
        expiry_ms: Option<u64>,
    },
    /// `if_present`: only where the replica has (or had) the blob; otherwise a tombstone either
    /// way, so that a put still on its way can never land after the delete.
    Delete {
        id: BlobId,
        if_present: bool,
    },
    /// `at_ms`: this node's stamp of the change, the same on every replica.
    Ttl {
        id: BlobId,
        expiry_ms: Option<u64>,
        at_ms: u64,
    },
}

#[derive(Debug)]
pub(crate) enum Outcome {
    /// Done; for a delete, whether the replica had the blob.
    Done {
        existed: bool,
    },
    NotFound,
    Gone,
    /// The replica's volume is full: the partition turns read-only.
    Full,
    /// This blob does not fit (or the replica's disk is short for now); smaller ones may.
    NoRoom(String),
    /// A TTL change whose stamp sorts below the replica's expiry, set at `stamp`: not taken.
    Kept {
        stamp: u64,
    },
    Failed(String),
}

impl Cluster {
    /// Stores a new blob on a writable partition at write quorum; its id.
    pub async fn put(
        self: &Arc<Self>,
        meta: BlobMeta,
        payload: Bytes,
        created_ms: u64,
        expiry_ms: Option<u64>,
        reach: Option<&std::collections::BTreeSet<u32>>,
    ) -> Result<BlobId, RouteError> {
        let snapshot = self.snapshot();
        let config =
            snapshot.topology.config.clone().ok_or_else(|| RouteError::NoQuorum("no cluster config".into()))?;
        // A key limited to some partitions puts its blobs there only.
        let mut excluded: Vec<u32> = match reach {
            Some(reach) => snapshot.topology.partitions.keys().filter(|p| !reach.contains(p)).copied().collect(),
            None => Vec::new(),
        };
        let mut last_error = None;
        for _ in 0..3 {
            let Some(partition) = pick_partition(&snapshot, &config, self.node_id(), &excluded, &self.write_affinity)
            else {
                break;
            };
            let id = BlobId::generate(partition.id);
            let op = ReplicaOp::Put { id, meta: meta.clone(), payload: payload.clone(), created_ms, expiry_ms };
            match self.write_quorum(&partition, &config, op).await {
                Ok(_) => return Ok(id),
                Err(e) => {
                    excluded.push(partition.id);
                    last_error = Some(e);
                }
            }
        }
        if let (None, Some(reach)) = (&last_error, reach) {
            return Err(RouteError::NoQuorum(format!(
                "none of the key's partitions {reach:?} is writable with a quorum of live replicas"
            )));
        }
        Err(last_error.unwrap_or_else(|| {
            // Say why, in the terms that help: no room is not a lack of quorum.
            let writable = snapshot.topology.partitions.values().any(|p| p.state == PartitionState::Writable);
            let full = snapshot.topology.partitions.values().any(|p| p.state == PartitionState::ReadOnly);
            if full && !writable {
                RouteError::NoRoom(
                    "every partition is full (read-only): the cluster needs room (more disks or machines), \
                     or blobs deleted and compacted"
                        .into(),
                )
            } else {
                RouteError::NoQuorum("no writable partition has a quorum of live replicas".into())
            }
        }))
    }

    /// Stores a blob whose id its caller chose (a name record's) at write quorum in the id's
    /// partition, whatever the partition's state: a full replica refuses it by itself.
    pub async fn put_at(
        self: &Arc<Self>,
        id: BlobId,
        meta: BlobMeta,
        payload: Bytes,
        created_ms: u64,
    ) -> Result<(), RouteError> {
        let (partition, config) = self.partition_of(id)?;
        let op = ReplicaOp::Put { id, meta, payload, created_ms, expiry_ms: None };
        self.write_quorum(&partition, &config, op).await.map(|_| ())
    }

    /// Deletes at write quorum. First only where a replica has the blob: a quorum of answers
    /// meets every quorum that stored it, so when none of them has it, it never existed, and no
    /// tombstone is written (random ids cannot grow the index). When one has it, then a
    /// tombstone on every replica, so that a put still on its way to one cannot land later.
    pub async fn delete(self: &Arc<Self>, id: BlobId) -> Result<(), RouteError> {
        let (partition, config) = self.partition_of(id)?;
        // Two quorums of W among N replicas meet only when 2W > N; otherwise a quorum may miss
        // every replica that stored the blob, and tombstones are written everywhere at once.
        let quorums_meet = 2 * config.write_quorum as usize > partition.replicas.len();
        if quorums_meet {
            let outcomes = self.write_quorum(&partition, &config, ReplicaOp::Delete { id, if_present: true }).await?;
            if !outcomes.iter().any(|o| matches!(o, Outcome::Done { existed: true })) {
                return Err(RouteError::NotFound);
            }
        }
        let outcomes = self.write_quorum(&partition, &config, ReplicaOp::Delete { id, if_present: false }).await?;
        if quorums_meet || outcomes.iter().any(|o| matches!(o, Outcome::Done { existed: true })) {
            Ok(())
        } else {
            Err(RouteError::NotFound)
        }
    }

    /// Changes the expiry at write quorum, stamped by this node's clock. A replica takes the
    /// change only if its stamp is the later one, so that a change still on its way to a slow
    /// replica never overrides one acknowledged after it. A replica that keeps a later stamp
    /// (set through a node whose clock is ahead) makes this node try again just above it: the
    /// change the client makes now wins.
    pub async fn update_ttl(self: &Arc<Self>, id: BlobId, expiry_ms: Option<u64>) -> Result<(), RouteError> {
        let (partition, config) = self.partition_of(id)?;
        let mut at_ms = crate::engine::now_ms();
        for _ in 0..TTL_ATTEMPTS {
            let op = ReplicaOp::Ttl { id, expiry_ms, at_ms };
            let (successes, outcomes) = self.write_replicas(&partition, &config, op).await;
            let kept =
                outcomes.iter().filter_map(|o| if let Outcome::Kept { stamp } = o { Some(*stamp) } else { None });
            match kept.max() {
                Some(stamp) if successes < config.write_quorum as usize => {
                    // Above a stamp the other replicas would refuse: the clocks must be fixed first.
                    if super::stamp_too_far_ahead(stamp, crate::engine::now_ms()) {
                        return Err(RouteError::NoQuorum(format!(
                            "a replica of {id} holds an expiry stamped {stamp}, more than an hour ahead of this node's clock: the nodes' clocks disagree"
                        )));
                    }
                    at_ms = at_ms.max(stamp.saturating_add(1));
                }
                _ => return quorum_result(&partition, &config, successes, outcomes).map(drop),
            }
        }
        Err(RouteError::NoQuorum(format!(
            "the expiry of {id} kept changing through other nodes while this change was written; try again"
        )))
    }

    fn partition_of(&self, id: BlobId) -> Result<(PartitionSpec, ClusterConfig), RouteError> {
        let snapshot = self.snapshot();
        let config =
            snapshot.topology.config.clone().ok_or_else(|| RouteError::NoQuorum("no cluster config".into()))?;
        let partition = snapshot.topology.partitions.get(&id.partition()).cloned().ok_or(RouteError::NotFound)?;
        Ok((partition, config))
    }

    /// Sends `op` to every replica at once and answers as soon as a quorum succeeded; the
    /// other writes go on in the background. The outcomes seen so far.
    async fn write_quorum(
        self: &Arc<Self>,
        partition: &PartitionSpec,
        config: &ClusterConfig,
        op: ReplicaOp,
    ) -> Result<Vec<Outcome>, RouteError> {
        let (successes, outcomes) = self.write_replicas(partition, config, op).await;
        quorum_result(partition, config, successes, outcomes)
    }

    /// [`Cluster::write_quorum`]'s writes: the successes and the outcomes seen until a quorum
    /// succeeded or could no longer.
    async fn write_replicas(
        self: &Arc<Self>,
        partition: &PartitionSpec,
        config: &ClusterConfig,
        op: ReplicaOp,
    ) -> (usize, Vec<Outcome>) {
        let quorum = config.write_quorum as usize;
        // Polled here rather than spawned: a PUT costs no task (and no wake-up) per replica.
        let mut writes: FuturesUnordered<_> = partition
            .replicas
            .iter()
            .map(|replica| {
                let (cluster, node, op) = (self.clone(), replica.node.clone(), op.clone());
                async move { cluster.write_one(&node, op).await }
            })
            .collect();
        let mut outcomes = Vec::new();
        let mut successes = 0;
        let total = partition.replicas.len();
        while let Some(outcome) = writes.next().await {
            if matches!(outcome, Outcome::Done { .. }) {
                successes += 1;
            }
            if let Outcome::Full = outcome {
                self.spawn_mark_read_only(partition.id);
            }
            outcomes.push(outcome);
            if successes >= quorum || successes + (total - outcomes.len()) < quorum {
                break;
            }
        }
        if !writes.is_empty() {
            // The other replicas' writes go on in the background.
            let (cluster, id) = (self.clone(), partition.id);
            tokio::spawn(crate::request::maybe_scope(crate::request::current(), async move {
                while let Some(outcome) = writes.next().await {
                    if let Outcome::Full = outcome {
                        cluster.spawn_mark_read_only(id);
                    }
                }
            }));
        }
        (successes, outcomes)
    }

    fn spawn_mark_read_only(self: &Arc<Self>, partition: u32) {
        let cluster = self.clone();
        tokio::spawn(async move { cluster.mark_read_only(partition).await });
    }

    async fn write_one(self: &Arc<Self>, node: &str, op: ReplicaOp) -> Outcome {
        if node == self.node_id() {
            return self.write_local(op).await;
        }
        let snapshot = self.snapshot();
        if !snapshot.live.contains_key(node) {
            return Outcome::Failed(format!("{node} is not live"));
        }
        let Some(address) = self.peer_base_of(&snapshot, node) else {
            return Outcome::Failed(format!("no address for {node}"));
        };
        let request = match &op {
            ReplicaOp::Put { id, meta, payload, created_ms, expiry_ms } => {
                let blob = ReplicaBlob {
                    version: WIRE_VERSION,
                    content_type: meta.content_type.clone(),
                    user: meta.user.clone(),
                    created_ms: *created_ms,
                    expires_ms: *expiry_ms,
                    expiry_set_ms: None,
                };
                return self.put_on_peer(node, *id, blob, payload.clone()).await;
            }
            ReplicaOp::Delete { id, if_present } => {
                self.http.delete(format!("{address}/replica/v1/blobs/{id}?if_present={if_present}"))
            }
            ReplicaOp::Ttl { id, expiry_ms, at_ms } => self
                .http
                .put(format!("{address}/replica/v1/blobs/{id}/ttl"))
                .json(&TtlBody { expires_ms: *expiry_ms, at_ms: Some(*at_ms) }),
        };
        let timeout = self.options.peer_timeout;
        let response = match with_request_id(request).timeout(timeout).send().await {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(format!("{node}: {e}")),
        };
        let status = response.status().as_u16();
        match (status, op) {
            // 204: taken; 200: kept, the replica's expiry being the later one.
            (200, ReplicaOp::Ttl { .. }) => match response.json::<TtlAnswer>().await {
                Ok(answer) => match check_version(answer.version) {
                    Ok(()) => Outcome::Kept { stamp: answer.kept_stamp },
                    Err(e) => Outcome::Failed(format!("{node}: {e}")),
                },
                Err(e) => Outcome::Failed(format!("{node}: {e}")),
            },
            (200..=299, ReplicaOp::Delete { .. }) => match response.json::<TombstoneAnswer>().await {
                Ok(answer) => Outcome::Done { existed: answer.existed },
                Err(e) => Outcome::Failed(format!("{node}: {e}")),
            },
            (507, _) => match response.json::<serde_json::Value>().await {
                Ok(body) => outcome_of(node, status, body["error"]["code"].as_str(), body["error"]["message"].as_str()),
                Err(e) => Outcome::NoRoom(format!("{node}: no room ({e})")),
            },
            _ => outcome_of(node, status, None, None),
        }
    }

    /// Queues a replica write for `node`: writes queued for one node while its earlier ones are
    /// on their way go together in one request (`POST /replica/v1/blobs`), so that a busy
    /// router costs each peer one request and one group commit per batch, not per blob; a lone
    /// write goes at once.
    async fn put_on_peer(self: &Arc<Self>, node: &str, id: BlobId, blob: ReplicaBlob, payload: Bytes) -> Outcome {
        let (reply, answer) = oneshot::channel();
        let sender = {
            let mut queues = self.peer_writes.lock().expect("peer writes lock");
            queues
                .entry(node.to_owned())
                .or_insert_with(|| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(self.clone().send_batches(node.to_owned(), rx));
                    tx
                })
                .clone()
        };
        let request_id = crate::request::current();
        if sender.send(QueuedPut { id, blob, payload, reply, request_id }).is_err() {
            return Outcome::Failed(format!("{node}: shutting down"));
        }
        answer.await.unwrap_or_else(|_| Outcome::Failed(format!("{node}: write dropped")))
    }

    /// Sends the writes queued for `node`, a batch at a time, at most a few batches at once.
    async fn send_batches(self: Arc<Self>, node: String, mut queue: mpsc::UnboundedReceiver<QueuedPut>) {
        let in_flight = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
        loop {
            let first = tokio::select! {
                _ = self.cancel.cancelled() => return,
                first = queue.recv() => match first { Some(first) => first, None => return },
            };
            let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
            // Taken after the permit: what queued while every batch was busy goes together.
            let mut bytes = first.payload.len();
            let mut batch = vec![first];
            while batch.len() < BATCH_BLOBS && bytes < BATCH_BYTES {
                match queue.try_recv() {
                    Ok(next) => {
                        bytes += next.payload.len();
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            let (cluster, node) = (self.clone(), node.clone());
            tokio::spawn(async move {
                cluster.send_batch(&node, batch).await;
                drop(permit);
            });
        }
    }

    async fn send_batch(&self, node: &str, batch: Vec<QueuedPut>) {
        let snapshot = self.snapshot();
        let address = match (snapshot.live.contains_key(node), self.peer_base_of(&snapshot, node)) {
            (true, Some(address)) => address,
            (live, _) => {
                let why = if live { format!("no address for {node}") } else { format!("{node} is not live") };
                for put in batch {
                    let _ = put.reply.send(Outcome::Failed(why.clone()));
                }
                return;
            }
        };
        let size: usize = batch.iter().map(|p| p.payload.len()).sum();
        // Big bodies get time to travel: the timeout grows by a second per 16 MiB.
        let timeout = self.options.peer_timeout + std::time::Duration::from_secs((size as u64) >> 24);
        let outcomes: Vec<Outcome> = if let [put] = &batch[..] {
            // Alone: the single write, as before batching.
            let head = BlobFrame::head(&put.blob);
            let parts: [Result<Bytes, std::io::Error>; 2] = [Ok(head.clone()), Ok(put.payload.clone())];
            let mut request = self.http.put(format!("{address}/replica/v1/blobs/{}", put.id));
            if let Some(id) = &put.request_id {
                request = request.header(crate::request::HEADER, id.as_str());
            }
            let request = request
                .header("content-length", (head.len() + put.payload.len()).to_string())
                .body(reqwest::Body::wrap_stream(futures::stream::iter(parts)))
                .timeout(timeout);
            vec![match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let body = if status == 507 { response.json::<serde_json::Value>().await.ok() } else { None };
                    let error = |field: &str| body.as_ref().and_then(|b| b["error"][field].as_str().map(str::to_owned));
                    outcome_of(node, status, error("code").as_deref(), error("message").as_deref())
                }
                Err(e) => Outcome::Failed(format!("{node}: {e}")),
            }]
        } else {
            let mut parts = Vec::with_capacity(batch.len() * 3);
            let mut length = 0;
            for put in &batch {
                for part in BlobBatch::entry(&put.id.to_string(), &put.blob, &put.payload) {
                    length += part.len();
                    parts.push(Ok::<Bytes, std::io::Error>(part));
                }
            }
            let ids: Vec<&str> = batch.iter().filter_map(|p| p.request_id.as_deref()).collect();
            let mut request = self.http.post(format!("{address}/replica/v1/blobs"));
            if !ids.is_empty() {
                request = request.header(crate::request::HEADER, ids.join(","));
            }
            let request = request
                .header("content-length", length.to_string())
                .body(reqwest::Body::wrap_stream(futures::stream::iter(parts)))
                .timeout(timeout);
            let answer = match request.send().await {
                Ok(response) if response.status().is_success() => {
                    response.json::<BatchAnswer>().await.map_err(|e| format!("{node}: {e}"))
                }
                Ok(response) => Err(format!("{node} answered {} to a batch", response.status())),
                Err(e) => Err(format!("{node}: {e}")),
            };
            match answer {
                Ok(answer) if answer.outcomes.len() == batch.len() => answer
                    .outcomes
                    .iter()
                    .map(|o| outcome_of(node, o.status, o.code.as_deref(), o.message.as_deref()))
                    .collect(),
                Ok(answer) => {
                    let why = format!("{node} answered {} outcomes for {} writes", answer.outcomes.len(), batch.len());
                    batch.iter().map(|_| Outcome::Failed(why.clone())).collect()
                }
                Err(why) => batch.iter().map(|_| Outcome::Failed(why.clone())).collect(),
            }
        };
        for (put, outcome) in batch.into_iter().zip(outcomes) {
            let _ = put.reply.send(outcome);
        }
    }

    async fn write_local(&self, op: ReplicaOp) -> Outcome {
        let id = match &op {
            ReplicaOp::Put { id, .. } | ReplicaOp::Delete { id, .. } | ReplicaOp::Ttl { id, .. } => *id,
        };
        let Some(volume) = self.store.volume(id.partition()) else {
            return Outcome::Failed(format!("no local replica of partition {}", id.partition()));
        };
        let result = match op {
            ReplicaOp::Put { id, meta, payload, created_ms, expiry_ms } => {
                volume.put(PutRequest { blob_id: id, meta, payload, created_ms, expiry_ms }).await.map(|_| true)
            }
            ReplicaOp::Delete { id, if_present: true } => volume.delete_if_present(id).await,
            ReplicaOp::Delete { id, if_present: false } => volume.tombstone(id).await,
            ReplicaOp::Ttl { id, expiry_ms, at_ms } => match volume.merge_ttl(id, expiry_ms, at_ms).await {
                Ok(TtlMerge::Kept { stamp }) => return Outcome::Kept { stamp },
                Ok(TtlMerge::Taken | TtlMerge::AlreadySo) => Ok(true),
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(existed) => Outcome::Done { existed },
            Err(VolumeError::NotFound) => Outcome::NotFound,
            Err(VolumeError::Deleted | VolumeError::Expired) => Outcome::Gone,
            Err(VolumeError::Full) => Outcome::Full,
            Err(e @ (VolumeError::NoRoom { .. } | VolumeError::Paused { no_space: true, .. })) => {
                Outcome::NoRoom(format!("{}: {e}", self.node_id()))
            }
            Err(e) => Outcome::Failed(format!("{}: {e}", self.node_id())),
        }
    }

    /// Reads from the other replicas (the local one was tried by the caller): live ones first,
    /// each within the peer timeout. `suffix` is "" for the blob, "/info" for its description;
    /// `range` the client's `Range` header. The first peer's answer that settles the read (the
    /// blob, a range of it, or that it is gone), for the API to relay.
    pub async fn read_from_peers(
        &self,
        id: BlobId,
        method: reqwest::Method,
        suffix: &str,
        range: Option<&[u8]>,
    ) -> Result<reqwest::Response, RouteError> {
        self.first_peer_answer(id, |address| {
            let request = self.http.request(method.clone(), format!("{address}/v1/blobs/{id}{suffix}?local=true"));
            match range {
                Some(range) => request.header("range", range),
                None => request,
            }
        })
        .await
    }

    /// Asks the other replicas of `id`'s partition, live ones first, each within the peer
    /// timeout, with the request `make` builds for a peer's base URL: the first answer that
    /// settles the read (2xx, 416, or 410 gone). 404 from all that answered: not found.
    pub(crate) async fn first_peer_answer(
        &self,
        id: BlobId,
        make: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, RouteError> {
        let snapshot = self.snapshot();
        let partition = snapshot.topology.partitions.get(&id.partition()).ok_or(RouteError::NotFound)?;
        let mut peers: Vec<&str> =
            partition.replicas.iter().map(|r| r.node.as_str()).filter(|n| *n != self.node_id()).collect();
        peers.sort_by_key(|n| !snapshot.live.contains_key(*n));
        let mut not_found = 0;
        let mut failures = Vec::new();
        for peer in peers {
            let Some(address) = self.peer_base_of(&snapshot, peer) else { continue };
            // The peer has the timeout to answer, not to send the whole body: a body streams on
            // to a client at the client's pace.
            let response =
                match tokio::time::timeout(self.options.peer_timeout, with_request_id(make(&address)).send()).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => {
                        failures.push(format!("{peer}: {e}"));
                        continue;
                    }
                    Err(_) => {
                        failures.push(format!("{peer}: no answer within {:?}", self.options.peer_timeout));
                        continue;
                    }
                };
            match response.status().as_u16() {
                200 | 206 | 416 | 410 => return Ok(response),
                404 => not_found += 1,
                status => failures.push(format!("{peer} answered {status}")),
            }
        }
        if not_found > 0 || failures.is_empty() {
            return Err(RouteError::NotFound);
        }
        Err(RouteError::NoQuorum(format!(
            "no replica of partition {} could answer: {}",
            id.partition(),
            failures.join("; ")
        )))
    }
}

/// A replica write waiting for its batch.
pub(crate) struct QueuedPut {
    id: BlobId,
    blob: ReplicaBlob,
    payload: Bytes,
    reply: oneshot::Sender<Outcome>,
    request_id: Option<String>,
}

/// A replica call made for the request being served carries its id.
pub(crate) fn with_request_id(request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    match crate::request::current() {
        Some(id) => request.header(crate::request::HEADER, id),
        None => request,
    }
}

/// Batches on their way to one peer at once, at most: few, so that what queues behind them goes
/// together (cairn-bench cluster, put_4k: 8 in flight 0.20–0.22 of a single node, 2 in flight
/// 0.22–0.24, 1 in flight 0.20–0.22).
const BATCHES_IN_FLIGHT: usize = 2;
/// Tries of one TTL change, each stamped above what the replicas that kept theirs said.
const TTL_ATTEMPTS: usize = 4;
/// Writes in one batch, at most; and the payload bytes after which a batch takes no more.
const BATCH_BLOBS: usize = 128;
const BATCH_BYTES: usize = 1 << 20;

/// A write's answer from its replicas' outcomes: the outcomes when a quorum succeeded, else why
/// not, in the most useful terms.
fn quorum_result(
    partition: &PartitionSpec,
    config: &ClusterConfig,
    successes: usize,
    outcomes: Vec<Outcome>,
) -> Result<Vec<Outcome>, RouteError> {
    let (quorum, total) = (config.write_quorum as usize, partition.replicas.len());
    if successes >= quorum {
        return Ok(outcomes);
    }
    // Not enough: say why, in the most useful terms.
    if outcomes.iter().any(|o| matches!(o, Outcome::Gone)) {
        return Err(RouteError::Deleted);
    }
    if outcomes.iter().filter(|o| matches!(o, Outcome::NotFound)).count() + successes >= quorum {
        return Err(RouteError::NotFound);
    }
    if outcomes.iter().any(|o| matches!(o, Outcome::Full)) {
        return Err(RouteError::NoRoom(format!("partition {} is full", partition.id)));
    }
    if let Some(Outcome::NoRoom(reason)) = outcomes.iter().find(|o| matches!(o, Outcome::NoRoom(_))) {
        return Err(RouteError::NoRoom(format!("partition {}: {reason}", partition.id)));
    }
    let reasons: Vec<String> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Failed(reason) => Some(reason.clone()),
            _ => None,
        })
        .collect();
    Err(RouteError::NoQuorum(format!(
        "{successes} of {total} replicas of partition {} acknowledged, {quorum} needed: {}",
        partition.id,
        reasons.join("; ")
    )))
}

/// What a replica's answer to a write means for the quorum: one mapping for single and batched
/// writes.
fn outcome_of(node: &str, status: u16, code: Option<&str>, message: Option<&str>) -> Outcome {
    match status {
        200..=299 => Outcome::Done { existed: true },
        404 => Outcome::NotFound,
        410 => Outcome::Gone,
        507 if code == Some("volume_full") => Outcome::Full,
        507 => Outcome::NoRoom(format!("{node}: {}", message.unwrap_or("no room"))),
        status => Outcome::Failed(format!("{node} answered {status}")),
    }
}

/// A writable partition with a quorum of live replicas, chosen at random weighted by the free
/// space its fullest live replica reports (MiB), doubled when every replica is live and again
/// when one replica is this node (a local write).
fn pick_partition(
    snapshot: &Snapshot,
    config: &ClusterConfig,
    me: &str,
    excluded: &[u32],
    affinity: &WriteAffinity,
) -> Option<PartitionSpec> {
    let my_zone = snapshot.live.get(me).map(|l| l.zone.as_str()).filter(|z| !z.is_empty());
    let candidates: Vec<(&PartitionSpec, u64)> = snapshot
        .topology
        .partitions
        .values()
        .filter(|p| p.state == PartitionState::Writable && !excluded.contains(&p.id))
        .filter_map(|p| {
            let live: Vec<_> = p.replicas.iter().filter_map(|r| snapshot.live.get(&r.node)).collect();
            let live_count = p.replicas.iter().filter(|r| r.node == me || snapshot.live.contains_key(&r.node)).count();
            if live_count < config.write_quorum as usize {
                return None;
            }
            // A replica that has not reported yet counts as empty.
            let free = live
                .iter()
                .map(|l| l.free_bytes.get(&p.id).copied().unwrap_or(config.volume_size_bytes))
                .min()
                .unwrap_or(config.volume_size_bytes);
            let mut weight = (free >> 20).max(1);
            if live_count == p.replicas.len() {
                weight *= 2;
            }
            let same_zone = |r: &&LiveNode| my_zone.is_some_and(|z| r.zone == z);
            weight *= if p.replicas.iter().any(|r| r.node == me) {
                4
            } else if live.iter().any(same_zone) {
                3
            } else {
                2
            };
            Some((p, weight))
        })
        .collect();
    let weights: Vec<(u32, u64)> = candidates.iter().map(|(p, weight)| (p.id, *weight)).collect();
    let id = affinity.pick(&weights)?;
    candidates.into_iter().find(|(p, _)| p.id == id).map(|(p, _)| p.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_cluster::{ReplicaSpec, Topology};

    fn snapshot(free: &[(u32, u64)], live: &[&str]) -> Snapshot {
        let partitions = (0..2)
            .map(|id| {
                let replicas =
                    ["a", "b", "c"].iter().map(|n| ReplicaSpec { node: n.to_string(), disk: "d".into() }).collect();
                (id, PartitionSpec { id, state: PartitionState::Writable, replicas })
            })
            .collect();
        let mut snapshot = Snapshot::default();
        snapshot.topology = Topology { partitions, ..Topology::default() };
        for n in live {
            let node = LiveNode {
                tls: false,
                node: n.to_string(),
                address: String::new(),
                peer_address: None,
                peer_tls: false,
                zone: String::new(),
                started_ms: 0,
                free_bytes: free.iter().copied().collect(),
                unopened: Default::default(),
            };
            snapshot.live.insert(n.to_string(), node);
        }
        snapshot
    }

    fn config() -> ClusterConfig {
        ClusterConfig {
            blob_tls: None,
            replication_factor: 3,
            write_quorum: 2,
            partitions: 2,
            volume_size_bytes: 1 << 30,
            segment_size_bytes: 1 << 26,
            max_blob_size_bytes: None,
            auth: Default::default(),
        }
    }

    #[test]
    fn writes_prefer_room_and_need_a_quorum_of_live_replicas() {
        let s = snapshot(&[(0, 1 << 30), (1, 1 << 20)], &["a", "b", "c"]);
        // A fresh affinity per pick: each is a new draw (holds are WriteAffinity's own tests).
        let pick = |s: &Snapshot, me: &str, excluded: &[u32]| {
            pick_partition(s, &config(), me, excluded, &WriteAffinity::default()).map(|p| p.id)
        };
        let picks: Vec<u32> = (0..2000).map(|_| pick(&s, "x", &[]).unwrap()).collect();
        let ones = picks.iter().filter(|p| **p == 1).count();
        assert!(ones < 20, "the nearly full partition gets ~1/1024 of writes: {ones}");
        assert_eq!(pick(&s, "x", &[0]), Some(1));
        assert_eq!(pick(&s, "x", &[0, 1]), None);
        let lonely = snapshot(&[], &["a"]);
        assert_eq!(pick(&lonely, "x", &[]), None, "one live replica of three");
        assert!(pick(&lonely, "b", &[]).is_some(), "this node counts as live");
        // A held partition is left as soon as it is excluded.
        let affinity = WriteAffinity::default();
        let held = pick_partition(&s, &config(), "x", &[], &affinity).unwrap().id;
        let other = pick_partition(&s, &config(), "x", &[held], &affinity).unwrap().id;
        assert_ne!(held, other);
    }
}
