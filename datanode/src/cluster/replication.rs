//! Pull replication and anti-entropy. One puller per peer node (not per partition × peer): it
//! asks the peer for the journals of every partition the two share in one request, which the
//! peer holds open until one of them has an entry (a long poll: an idle cluster sends one
//! request per pair of nodes every few seconds, whatever its number of partitions). Each page is
//! applied concurrently, so its writes share group commits, and the token that covers it goes
//! through the volume's writer behind them: never ahead of what it covers.
//!
//! An entry that cannot be applied (the peer cannot send its blob, the local volume refuses it,
//! the entry is corrupt) does not stop the ones after it: it is owed — recorded durably with its
//! error in the transaction that moves the token past it — and retried with back-off.
//!
//! Whatever went wrong besides (a journal entry missed, an index damaged, a replica restored
//! from a backup), anti-entropy makes replicas converge: on a slow schedule each replica compares
//! digests of its id buckets with each peer's and copies what it lacks through the same path.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_cluster::replica::{
    check_version, hex, BlobFrame, BucketEntries, DigestAnswer, EntryKind, JournalBatch, JournalCursor, JournalPage,
    JournalRequest, ReplicaBlob, WIRE_VERSION,
};
use cairn_common::backoff;
use cairn_common::BlobId;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Cluster;
use crate::engine::{now_ms, BlobMeta, OwedEntry, PutRequest, Volume, VolumeError};
use crate::metrics::{Metrics, NodeLabels, PeerCallLabels, PeerLabels};

/// Entries per partition in one journal answer.
const PAGE: usize = 500;
/// How long the peer holds a journal request open when nothing is new.
const IDLE_WAIT: Duration = Duration::from_secs(10);
/// Entries of one page applied at once (their writes share group commits).
const APPLY_CONCURRENCY: usize = 8;
/// How long a puller that has caught up with its peer waits before asking again. The router
/// writes every replica itself, so a caught-up puller finds almost nothing to copy: asking after
/// every commit would spend a request, a page and a progress write on each of them.
pub const FOLLOW_PAUSE: Duration = Duration::from_millis(100);
/// How often a replica asks its peer for the blobs recovery found damaged here.
const REPAIR_EVERY: Duration = Duration::from_secs(30);

/// Progress of one local replica behind one peer (`GET /v1/admin/replicas`): the wire type the
/// operator reads.
pub use cairn_cluster::admin::ReplicaProgress as PeerStatus;

pub struct Replication {
    metrics: Arc<Metrics>,
    status: Mutex<BTreeMap<(u32, String), Published>>,
}

/// A puller's last report, with the times its ages are counted from: a puller waiting on a long
/// poll reports seldom, and the ages must not stand still meanwhile.
#[derive(Clone)]
struct Published {
    status: PeerStatus,
    behind_since: Option<Instant>,
    oldest_owed_ms: Option<u64>,
}

impl Published {
    /// The report with its ages as of now.
    fn now(&self) -> PeerStatus {
        let mut status = self.status.clone();
        status.lag_seconds = self.behind_since.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        status.oldest_owed_seconds =
            self.oldest_owed_ms.map(|t| now_ms().saturating_sub(t) as f64 / 1000.0).unwrap_or(0.0);
        status
    }
}

impl Replication {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics, status: Mutex::default() }
    }

    pub fn list(&self) -> Vec<PeerStatus> {
        let list: Vec<PeerStatus> = self.status.lock().expect("status lock").values().map(Published::now).collect();
        for status in &list {
            let labels = PeerLabels { partition: status.partition.to_string(), peer: status.peer.clone() };
            self.metrics.replication_lag_seconds.get_or_create(&labels).set(status.lag_seconds);
        }
        list
    }

    pub fn forget(&self, partition: u32, peer: &str) {
        self.status.lock().expect("status lock").remove(&(partition, peer.to_owned()));
        let labels = PeerLabels { partition: partition.to_string(), peer: peer.to_owned() };
        self.metrics.replication_lag_entries.remove(&labels);
        self.metrics.replication_lag_bytes.remove(&labels);
        self.metrics.replication_lag_seconds.remove(&labels);
        self.metrics.replication_owed_entries.remove(&labels);
    }

    /// Forgets every partition's progress behind `peer` (its puller stopped).
    pub fn forget_peer(&self, peer: &str) {
        let partitions: Vec<u32> =
            self.status.lock().expect("status lock").keys().filter(|(_, p)| p == peer).map(|(p, _)| *p).collect();
        for partition in partitions {
            self.forget(partition, peer);
        }
    }

    /// Records a puller's progress — unless it was cancelled: a request in flight when the peer
    /// left every shared partition ends in an error, and writing that back after `forget_peer`
    /// would leave a stale entry that reads as lag forever. The cancel is checked under the
    /// status lock, and [`Cluster`] cancels before it forgets, so the two cannot interleave.
    fn update(
        &self,
        status: &PeerStatus,
        behind_since: Option<Instant>,
        oldest_owed_ms: Option<u64>,
        cancel: &CancellationToken,
    ) {
        let mut all = self.status.lock().expect("status lock");
        if cancel.is_cancelled() {
            return;
        }
        let labels = PeerLabels { partition: status.partition.to_string(), peer: status.peer.clone() };
        self.metrics.replication_lag_entries.get_or_create(&labels).set(status.lag_entries as i64);
        self.metrics.replication_lag_bytes.get_or_create(&labels).set(status.lag_bytes as i64);
        self.metrics.replication_lag_seconds.get_or_create(&labels).set(status.lag_seconds);
        self.metrics.replication_owed_entries.get_or_create(&labels).set(status.owed_entries as i64);
        let published = Published { status: status.clone(), behind_since, oldest_owed_ms };
        all.insert((status.partition, status.peer.clone()), published);
    }
}

/// One local replica's replication from the peer.
struct PartitionPull {
    volume: Arc<Volume>,
    status: PeerStatus,
    /// This puller is the only writer of its peer's owed entries: kept in memory, loaded once.
    owed: Vec<(u64, OwedEntry)>,
    behind_since: Option<Instant>,
    next_repair: Instant,
    next_anti_entropy: Instant,
    /// The last page left entries behind: the next request does not wait.
    more: bool,
}

impl PartitionPull {
    fn publish(&mut self, replication: &Replication, cancel: &CancellationToken) {
        let status = &mut self.status;
        self.behind_since =
            if status.lag_entries > 0 { Some(self.behind_since.unwrap_or_else(Instant::now)) } else { None };
        status.lag_seconds = self.behind_since.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        let oldest = self.owed.iter().min_by_key(|(_, e)| e.first_failed_ms);
        status.owed_entries = self.owed.len() as u64;
        status.oldest_owed_seconds =
            oldest.map(|(_, e)| now_ms().saturating_sub(e.first_failed_ms) as f64 / 1000.0).unwrap_or(0.0);
        status.owed_error = oldest
            .map(|(seq, e)| format!("{} {} (entry {seq}, {} attempts): {}", e.kind, e.id, e.attempts, e.last_error));
        replication.update(status, self.behind_since, oldest.map(|(_, e)| e.first_failed_ms), cancel);
    }

    /// When this partition next needs the puller without a journal entry (an owed entry's
    /// retry, a repair pass, anti-entropy).
    fn next_due(&self) -> Instant {
        let now_wall = now_ms();
        let owed = self
            .owed
            .iter()
            .map(|(_, e)| Instant::now() + Duration::from_millis(e.next_retry_ms.saturating_sub(now_wall)))
            .min();
        [Some(self.next_repair), Some(self.next_anti_entropy), owed].into_iter().flatten().min().expect("some")
    }
}

/// What this node shares with `peer`: the partitions both hold a replica of, whose volume is
/// open here.
fn shared_with(cluster: &Cluster, peer: &str) -> Vec<(u32, Arc<Volume>)> {
    let snapshot = cluster.snapshot();
    let me = cluster.node_id();
    snapshot
        .topology
        .partitions
        .values()
        .filter(|p| p.replicas.iter().any(|r| r.node == me) && p.replicas.iter().any(|r| r.node == peer))
        .filter_map(|p| cluster.store.volume(p.id).map(|v| (p.id, v)))
        .collect()
}

/// Pulls every partition this node shares with `peer` until `cancel`.
pub async fn pull_peer(cluster: Arc<Cluster>, peer: String, cancel: CancellationToken) {
    let mut parts: BTreeMap<u32, PartitionPull> = BTreeMap::new();
    let mut replicas = cluster.replicas_changed();
    let mut failures = 0u32;
    let node = NodeLabels { peer: peer.clone() };
    loop {
        replicas.borrow_and_update();
        sync_partitions(&cluster, &peer, &mut parts).await;
        let snapshot = cluster.snapshot();
        let address =
            match (parts.is_empty(), snapshot.live.contains_key(&peer), cluster.peer_base_of(&snapshot, &peer)) {
                (false, true, Some(address)) => Some(address),
                (false, live, _) => {
                    let why = if live { format!("no address for {peer}") } else { format!("peer {peer} is not live") };
                    for part in parts.values_mut() {
                        part.status.last_error = Some(why.clone());
                        part.publish(&cluster.replication, &cancel);
                    }
                    None
                }
                (true, ..) => None,
            };
        let Some(address) = address else {
            // Nothing to pull now: until the topology or this node's replicas change.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = replicas.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            continue;
        };
        let link = Link { cluster: &cluster, peer: &peer, address: &address };
        for (partition, part) in parts.iter_mut() {
            if let Err(e) = link.housekeeping(*partition, part).await {
                tracing::debug!(partition, %peer, error = %e, "replication housekeeping not done now");
            }
        }
        let wait = if parts.values().any(|p| p.more) {
            Duration::ZERO
        } else {
            let due = parts.values().map(PartitionPull::next_due).min().unwrap_or_else(Instant::now);
            due.saturating_duration_since(Instant::now()).min(IDLE_WAIT)
        };
        let request = JournalRequest {
            version: WIRE_VERSION,
            node: cluster.node_id().to_owned(),
            cursors: parts.iter().map(|(p, part)| JournalCursor { partition: *p, from: part.status.token }).collect(),
            limit: PAGE,
            wait_ms: wait.as_millis() as u64,
        };
        let answer = tokio::select! {
            _ = cancel.cancelled() => return,
            // A replica opened or closed here: ask again with the new set.
            _ = replicas.changed() => continue,
            answer = link.journal(&request, wait) => answer,
        };
        match answer {
            Ok(batch) => {
                failures = 0;
                for page in batch.pages {
                    if let Some(part) = parts.get_mut(&page.partition) {
                        link.apply_page(part, page).await;
                        part.publish(&cluster.replication, &cancel);
                    }
                }
                // Behind: the next page at once. Caught up: what comes next arrives in pages.
                if !parts.values().any(|p| p.more) {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = replicas.changed() => {}
                        _ = tokio::time::sleep(FOLLOW_PAUSE) => {}
                    }
                }
            }
            Err(e) => {
                failures += 1;
                cluster.store.metrics().replication_errors.get_or_create(&node).inc();
                for part in parts.values_mut() {
                    part.status.last_error = Some(e.clone());
                    part.more = false;
                    part.publish(&cluster.replication, &cancel);
                }
                let pause = backoff::delay(failures, Duration::from_millis(500), Duration::from_secs(30));
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = replicas.changed() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// Brings `parts` in line with what this node shares with the peer now: new partitions start
/// from their persisted token and owed entries; partitions no longer shared are forgotten.
async fn sync_partitions(cluster: &Cluster, peer: &str, parts: &mut BTreeMap<u32, PartitionPull>) {
    let shared = shared_with(cluster, peer);
    parts.retain(|partition, part| {
        let keep = shared.iter().any(|(p, v)| p == partition && Arc::ptr_eq(v, &part.volume));
        if !keep {
            cluster.replication.forget(*partition, peer);
        }
        keep
    });
    for (partition, volume) in shared {
        if parts.contains_key(&partition) {
            continue;
        }
        let loaded = {
            let (volume, peer) = (volume.clone(), peer.to_owned());
            tokio::task::spawn_blocking(move || -> Result<_, VolumeError> {
                let token = volume.replication_token(&peer)?;
                let owed: Vec<(u64, OwedEntry)> =
                    volume.owed()?.into_iter().filter(|(p, _, _)| *p == peer).map(|(_, s, e)| (s, e)).collect();
                Ok((token, owed))
            })
            .await
        };
        let (token, owed) = match loaded {
            Ok(Ok(loaded)) => loaded,
            Ok(Err(e)) => {
                tracing::warn!(partition, %peer, error = %e, "cannot read replication progress; trying again");
                continue;
            }
            Err(_) => continue,
        };
        // Spread the first anti-entropy pass of each partition over the interval.
        let every = cluster.options.anti_entropy_interval;
        let first = every.mul_f64(rand::random_range(0.1..1.0));
        parts.insert(
            partition,
            PartitionPull {
                volume,
                status: PeerStatus { partition, peer: peer.to_owned(), token, ..PeerStatus::default() },
                owed,
                behind_since: None,
                next_repair: Instant::now(),
                next_anti_entropy: Instant::now() + first,
                more: true,
            },
        );
    }
}

/// Why a journal entry was not applied.
enum ApplyError {
    /// The peer could not be reached: the entry waits for it, as every other.
    Peer(String),
    /// This entry could not be applied (the peer cannot send it, the local volume refuses it):
    /// it is owed, and the ones after it go on.
    Entry(String),
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Peer(e) | ApplyError::Entry(e) => f.write_str(e),
        }
    }
}

/// What fetching a blob from a peer's own replica came to.
enum Fetched {
    /// Stored here (or already here).
    Stored,
    /// Deleted or expired there: a tombstone here.
    Gone,
    /// The peer never had it (or compacted it away after a delete).
    Absent,
}

/// Calls to one peer node.
struct Link<'a> {
    cluster: &'a Cluster,
    peer: &'a str,
    address: &'a str,
}

impl Link<'_> {
    fn url(&self, path: &str) -> String {
        format!("{}/replica/v1/{path}", self.address)
    }

    /// Sends a request, timing it by `call`; a transport error is the peer's.
    async fn send(
        &self,
        call: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ApplyError> {
        let started = Instant::now();
        let result = request.send().await;
        let labels = PeerCallLabels { peer: self.peer.to_owned(), call };
        self.cluster
            .store
            .metrics()
            .peer_request_seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        result.map_err(|e| ApplyError::Peer(format!("{call} from {}: {e}", self.peer)))
    }

    async fn journal(&self, request: &JournalRequest, wait: Duration) -> Result<JournalBatch, String> {
        let timeout = self.cluster.options.peer_timeout + wait;
        let response = self
            .send("journal", self.cluster.http.post(self.url("journal")).json(request).timeout(timeout))
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("journal of {}: {}", self.peer, response.status()));
        }
        let batch: JournalBatch = response.json().await.map_err(|e| format!("journal of {}: {e}", self.peer))?;
        check_version(batch.version).map_err(|e| format!("journal of {}: {e}", self.peer))?;
        Ok(batch)
    }

    /// Applies one page (its entries at once) and moves the token past what it covers.
    async fn apply_page(&self, part: &mut PartitionPull, page: JournalPage) {
        let status = &mut part.status;
        if let Some(error) = page.error {
            status.last_error = Some(error);
            part.more = false;
            return;
        }
        if page.truncated {
            // The entries this replica needs are gone from the peer's journal: compare every id
            // bucket and copy what is missing, then go on from the tail the page was made at
            // (whatever the peer wrote since is in its journal still).
            tracing::warn!(partition = status.partition, peer = %self.peer, token = status.token, head = page.head, "behind the peer's retained journal: bootstrapping from its index");
            let all = (0..cairn_cluster::replica::DIGEST_BUCKETS).collect();
            let copied = match self.sync_buckets(status.partition, &part.volume, all).await {
                Ok(copied) => copied,
                Err(e) => {
                    status.last_error = Some(format!("bootstrap: {e}"));
                    part.more = false;
                    return;
                }
            };
            if let Err(e) = part.volume.advance_replication(self.peer, page.tail, Vec::new()).await {
                status.last_error = Some(format!("recording progress: {e}"));
                part.more = false;
                return;
            }
            tracing::info!(partition = status.partition, peer = %self.peer, copied, tail = page.tail, "bootstrapped");
            status.token = page.tail;
            status.peer_tail = page.tail;
            status.lag_entries = 0;
            status.last_error = None;
            part.more = true;
            return;
        }
        let token = status.token;
        status.peer_tail = page.tail;
        status.lag_entries = page.tail.saturating_sub(token);
        status.lag_bytes = page.entries.iter().map(|e| e.len).sum();
        if page.entries.is_empty() {
            status.last_error = None;
            part.more = false;
            return;
        }
        let volume = &part.volume;
        // Most puts of a page are here already (the router wrote every replica): one look at the
        // index for the whole page, off the async runtime, skips them; only the rest are applied.
        let puts: Vec<Option<BlobId>> =
            (page.entries.iter()).map(|e| if e.kind == EntryKind::Put { e.id.parse().ok() } else { None }).collect();
        let held = {
            let ids: Vec<BlobId> = puts.iter().flatten().copied().collect();
            let volume = volume.clone();
            tokio::task::spawn_blocking(move || volume.held(&ids)).await.ok().and_then(Result::ok).unwrap_or_default()
        };
        let work: Vec<(usize, String, EntryKind)> = (page.entries.iter().zip(&puts).enumerate())
            .filter(|(_, (_, put))| !put.is_some_and(|id| held.contains(&id)))
            .map(|(i, (e, _))| (i, e.id.clone(), e.kind))
            .collect();
        let mut results: Vec<Result<(), ApplyError>> = page.entries.iter().map(|_| Ok(())).collect();
        let applied: Vec<(usize, Result<(), ApplyError>)> = futures::stream::iter(work)
            .map(|(i, id, kind)| async move { (i, self.apply_entry(volume, &id, kind).await) })
            .buffered(APPLY_CONCURRENCY)
            .collect()
            .await;
        for (i, result) in applied {
            results[i] = result;
        }
        let mut next = token;
        let mut newly_owed = Vec::new();
        let mut stopped = None;
        let (mut applied, mut bytes) = (0u64, 0u64);
        for (entry, result) in page.entries.iter().zip(results) {
            match result {
                Ok(()) => {
                    applied += 1;
                    bytes += entry.len;
                }
                // The peer went away mid-page: the rest of the page waits for it, nothing is owed.
                Err(ApplyError::Peer(e)) => {
                    stopped = Some(format!("{} {}: {e}", entry.kind, entry.id));
                    break;
                }
                Err(ApplyError::Entry(e)) => {
                    tracing::warn!(partition = status.partition, peer = %self.peer, id = %entry.id, kind = %entry.kind, error = %e, "entry owed; the ones after it go on");
                    let now = now_ms();
                    newly_owed.push((
                        entry.seq,
                        OwedEntry {
                            id: entry.id.clone(),
                            kind: entry.kind.to_string(),
                            last_error: e,
                            attempts: 1,
                            first_failed_ms: now,
                            next_retry_ms: now + retry_delay(1).as_millis() as u64,
                        },
                    ));
                }
            }
            next = entry.seq + 1;
        }
        let metrics = self.cluster.store.metrics();
        let node = NodeLabels { peer: self.peer.to_owned() };
        metrics.replication_applied_entries.get_or_create(&node).inc_by(applied);
        metrics.replication_applied_bytes.get_or_create(&node).inc_by(bytes);
        status.applied += applied;
        if next > token {
            if let Err(e) = volume.advance_replication(self.peer, next, newly_owed.clone()).await {
                status.last_error = Some(format!("recording progress: {e}"));
                part.more = false;
                return;
            }
            part.owed.extend(newly_owed);
            status.token = next;
        }
        status.lag_entries = page.tail.saturating_sub(status.token);
        part.more = stopped.is_none() && status.token < page.tail;
        status.last_error = stopped;
    }

    /// A journal entry as the peer sent it (its id still text): applied, or why not.
    async fn apply_entry(&self, volume: &Volume, id: &str, kind: EntryKind) -> Result<(), ApplyError> {
        match id.parse::<BlobId>() {
            Ok(id) => self.apply(volume, id, kind).await,
            Err(e) => Err(ApplyError::Entry(format!("corrupt journal entry: bad blob id: {e}"))),
        }
    }

    /// Brings one journal entry of the peer into the local replica; applying twice changes nothing.
    async fn apply(&self, volume: &Volume, id: BlobId, kind: EntryKind) -> Result<(), ApplyError> {
        let entry = |e: VolumeError| ApplyError::Entry(e.to_string());
        let known = match volume.entry(id) {
            Ok(_) => true,
            Err(VolumeError::NotFound) => false,
            Err(e) => return Err(entry(e)),
        };
        match kind {
            EntryKind::Put if known => Ok(()),
            // Gone from the peer entirely (compacted after a delete): its delete entry follows.
            EntryKind::Put => self.fetch_blob(volume, id).await.map(|_| ()),
            EntryKind::Delete => volume.tombstone(id).await.map(|_| ()).map_err(entry),
            EntryKind::TtlUpdate if !known => Ok(()), // the put, when it comes, carries the current expiry
            EntryKind::TtlUpdate => {
                let request = self
                    .cluster
                    .http
                    .get(self.url(&format!("blobs/{id}/meta")))
                    .timeout(self.cluster.options.peer_timeout);
                let response = self.send("meta", request).await?;
                match response.status().as_u16() {
                    200 => {}
                    404 | 410 => return Ok(()), // deleted or expired there: its delete entry follows
                    status => return Err(peer_status(self.peer, status)),
                }
                let blob: ReplicaBlob = response.json().await.map_err(|e| ApplyError::Entry(e.to_string()))?;
                // The peer's expiry wins only if it is the later one (both sides compare alike),
                // so two replicas never copy each other's back and forth. A peer of an older
                // release sends no stamp: its change is taken as made now, as it was before.
                let set_ms = blob.expiry_set_ms.unwrap_or_else(crate::engine::now_ms);
                take_peer_expiry(volume, id, blob.expires_ms, set_ms).await
            }
            // A segment boundary on the peer: nothing to copy.
            EntryKind::Seal => Ok(()),
            EntryKind::Unknown => Err(ApplyError::Entry("a journal entry of a kind this version does not know".into())),
        }
    }

    /// Copies a blob from the peer's own replica into the local one.
    async fn fetch_blob(&self, volume: &Volume, id: BlobId) -> Result<Fetched, ApplyError> {
        let request =
            self.cluster.http.get(self.url(&format!("blobs/{id}"))).timeout(self.cluster.options.peer_timeout * 10);
        let response = self.send("fetch", request).await?;
        match response.status().as_u16() {
            200 => {
                let body = response.bytes().await.map_err(|e| ApplyError::Peer(e.to_string()))?;
                let (blob, payload) = BlobFrame::split(body).map_err(|e| ApplyError::Entry(e.to_string()))?;
                let meta = BlobMeta::new(blob.content_type, blob.user)
                    .map_err(|e| ApplyError::Entry(format!("the peer sent metadata no blob may have: {e}")))?;
                let request =
                    PutRequest { blob_id: id, meta, payload, created_ms: blob.created_ms, expiry_ms: blob.expires_ms };
                match volume.put_replicated(request).await {
                    Ok(()) | Err(VolumeError::Conflict) => {}
                    Err(e) => return Err(ApplyError::Entry(e.to_string())),
                }
                // The put carries the peer's current expiry; its stamp comes too, or this replica
                // would hold that expiry as set at the put's time, below where the peer has it,
                // and lose to an older change (the TTL entries after the put are skipped while
                // the put is missing).
                if let Some(set_ms) = blob.expiry_set_ms.filter(|s| *s > blob.created_ms) {
                    take_peer_expiry(volume, id, blob.expires_ms, set_ms).await?;
                }
                Ok(Fetched::Stored)
            }
            // Deleted or expired there: keep a tombstone so the put can never land later.
            410 => volume.tombstone(id).await.map(|_| Fetched::Gone).map_err(|e| ApplyError::Entry(e.to_string())),
            // Only "no such blob" means absent; a 404 for a route this peer does not serve
            // (an older version) must not read as "the peer never had it".
            404 => {
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                if body["error"]["code"] == "blob_not_found" {
                    Ok(Fetched::Absent)
                } else {
                    Err(ApplyError::Entry(format!("fetching from {}: 404 {}", self.peer, body["error"]["code"])))
                }
            }
            status => Err(peer_status(self.peer, status)),
        }
    }

    /// Owed entries whose time has come, retries of damaged blobs, and anti-entropy.
    async fn housekeeping(&self, partition: u32, part: &mut PartitionPull) -> Result<(), String> {
        self.retry_owed(part).await?;
        if Instant::now() >= part.next_repair {
            part.next_repair = Instant::now() + REPAIR_EVERY;
            self.repair_damaged(partition, &part.volume).await?;
        }
        // Differences while behind are only lag: anti-entropy waits until the journal is pulled.
        if Instant::now() >= part.next_anti_entropy && !part.more && part.status.caught_up() {
            let every = self.cluster.options.anti_entropy_interval;
            part.next_anti_entropy = Instant::now() + every.mul_f64(rand::random_range(0.8..1.2));
            let repaired = self.anti_entropy(partition, &part.volume).await?;
            if repaired > 0 {
                tracing::warn!(partition, peer = %self.peer, repaired, "anti-entropy copied what this replica lacked");
            }
        }
        Ok(())
    }

    /// Tries again the owed entries whose time has come (a few per round); applied ones are
    /// settled, failed ones rescheduled with a longer back-off.
    async fn retry_owed(&self, part: &mut PartitionPull) -> Result<(), String> {
        let now = now_ms();
        let due: Vec<usize> = part
            .owed
            .iter()
            .enumerate()
            .filter(|(_, (_, e))| e.next_retry_ms <= now)
            .map(|(i, _)| i)
            .take(20)
            .collect();
        let mut settled = Vec::new();
        for i in due {
            let (seq, entry) = part.owed[i].clone();
            let result = self.apply_entry(&part.volume, &entry.id, EntryKind::parse(&entry.kind)).await;
            let still = match result {
                Ok(()) => {
                    tracing::info!(partition = part.status.partition, peer = %self.peer, id = %entry.id, attempts = entry.attempts, "owed entry applied");
                    settled.push(i);
                    None
                }
                Err(ApplyError::Peer(e)) => return Err(e),
                Err(ApplyError::Entry(e)) => {
                    let attempts = entry.attempts + 1;
                    let next_retry_ms = now_ms() + retry_delay(attempts).as_millis() as u64;
                    let again = OwedEntry { last_error: e, attempts, next_retry_ms, ..entry };
                    part.owed[i].1 = again.clone();
                    Some(again)
                }
            };
            let (volume, peer) = (part.volume.clone(), self.peer.to_owned());
            tokio::task::spawn_blocking(move || volume.settle_owed(&peer, seq, still.as_ref()))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        for i in settled.into_iter().rev() {
            part.owed.remove(i);
        }
        Ok(())
    }

    /// Asks the peer for every blob recovery found damaged here; what it has comes back as a
    /// normal put (which clears the damage). A blob that every other replica says it never had
    /// was never acknowledged (a write quorum of 2 or more puts it on another replica): it is
    /// forgotten.
    async fn repair_damaged(&self, partition: u32, volume: &Arc<Volume>) -> Result<(), String> {
        let damaged = {
            let volume = volume.clone();
            tokio::task::spawn_blocking(move || volume.damaged()).await.map_err(|e| e.to_string())?
        }
        .map_err(|e| e.to_string())?;
        let snapshot = self.cluster.snapshot();
        for (id, record) in damaged {
            match self.fetch_blob(volume, id).await {
                Ok(Fetched::Stored) => {
                    tracing::info!(%id, peer = %self.peer, segment = record.segment, offset = record.offset, "damaged blob repaired")
                }
                Ok(Fetched::Gone) => {
                    tracing::info!(%id, peer = %self.peer, "damaged blob was deleted there; tombstone kept")
                }
                Ok(Fetched::Absent) => {
                    let (v, peer) = (volume.clone(), self.peer.to_owned());
                    let absent = tokio::task::spawn_blocking(move || v.note_damaged_absent(id, &peer))
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                    let others: Vec<&str> = snapshot
                        .topology
                        .partitions
                        .get(&partition)
                        .map(|p| {
                            p.replicas
                                .iter()
                                .map(|r| r.node.as_str())
                                .filter(|n| *n != self.cluster.node_id())
                                .collect()
                        })
                        .unwrap_or_default();
                    let quorum = snapshot.topology.config.as_ref().map(|c| c.write_quorum).unwrap_or(1);
                    if quorum >= 2 && !others.is_empty() && others.iter().all(|n| absent.iter().any(|a| a == n)) {
                        let v = volume.clone();
                        tokio::task::spawn_blocking(move || v.forget_damaged(id))
                            .await
                            .map_err(|e| e.to_string())?
                            .map_err(|e| e.to_string())?;
                        tracing::warn!(%id, partition, "damaged blob no replica has: never acknowledged, forgotten");
                    }
                }
                Err(e) => tracing::warn!(%id, peer = %self.peer, error = %e, "damaged blob not repaired yet"),
            }
        }
        Ok(())
    }

    /// Compares this replica's bucket digests with the peer's and, in every bucket that differs,
    /// copies what the peer has and this replica lacks: a blob (fetched as replication does) or
    /// a tombstone. What only this replica has is the peer's to copy (its own anti-entropy).
    /// The number of blobs and tombstones copied.
    async fn anti_entropy(&self, partition: u32, volume: &Arc<Volume>) -> Result<u64, String> {
        let timeout = self.cluster.options.peer_timeout * 10;
        let response = self
            .send("digest", self.cluster.http.get(self.url(&format!("partitions/{partition}/digest"))).timeout(timeout))
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("digest of {}: {}", self.peer, response.status()));
        }
        let theirs: DigestAnswer = response.json().await.map_err(|e| e.to_string())?;
        check_version(theirs.version).map_err(|e| e.to_string())?;
        let ours = {
            let volume = volume.clone();
            tokio::task::spawn_blocking(move || volume.digest()).await.map_err(|e| e.to_string())?
        }
        .map_err(|e| e.to_string())?;
        let differing: Vec<usize> = ours
            .iter()
            .zip(&theirs.buckets)
            .enumerate()
            .filter(|(_, (mine, other))| hex(&mine[..]) != **other)
            .map(|(bucket, _)| bucket)
            .collect();
        self.sync_buckets(partition, volume, differing).await
    }

    /// For each of `buckets`, lists what the peer holds there and copies what this replica
    /// lacks: a blob (fetched as a put entry would be) or a tombstone. What only this replica
    /// has is for the peer to copy. The number of blobs and tombstones copied.
    async fn sync_buckets(&self, partition: u32, volume: &Arc<Volume>, buckets: Vec<usize>) -> Result<u64, String> {
        let timeout = self.cluster.options.peer_timeout * 10;
        let mut repaired = 0;
        for bucket in buckets {
            let path = format!("partitions/{partition}/buckets/{bucket}");
            let response = self
                .send("bucket", self.cluster.http.get(self.url(&path)).timeout(timeout))
                .await
                .map_err(|e| e.to_string())?;
            if !response.status().is_success() {
                return Err(format!("bucket {bucket} of {}: {}", self.peer, response.status()));
            }
            let theirs: BucketEntries = response.json().await.map_err(|e| e.to_string())?;
            check_version(theirs.version).map_err(|e| e.to_string())?;
            let held: HashMap<BlobId, bool> = {
                let volume = volume.clone();
                tokio::task::spawn_blocking(move || volume.bucket(bucket as u8)).await.map_err(|e| e.to_string())?
            }
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|h| (h.id, h.deleted))
            .collect();
            for entry in theirs.entries {
                let Ok(id) = entry.id.parse::<BlobId>() else { continue };
                if id.partition() != partition {
                    continue;
                }
                let copied = match (entry.deleted, held.get(&id)) {
                    (true, Some(true)) | (false, Some(_)) => continue,
                    (true, _) => volume.tombstone(id).await.map(|_| true).map_err(|e| e.to_string())?,
                    (false, None) => match self.fetch_blob(volume, id).await {
                        Ok(Fetched::Stored | Fetched::Gone) => true,
                        Ok(Fetched::Absent) => false,
                        Err(e) => {
                            tracing::warn!(%id, peer = %self.peer, error = %e, "could not copy a blob");
                            false
                        }
                    },
                };
                if copied {
                    repaired += 1;
                    let node = NodeLabels { peer: self.peer.to_owned() };
                    self.cluster.store.metrics().anti_entropy_repaired.get_or_create(&node).inc();
                }
            }
        }
        Ok(repaired)
    }
}

/// A peer's answer that is neither the blob nor a sign of its absence. Only 421 (it holds no
/// replica of the partition now) waits for the peer; any other (a 500 for this blob, say) is
/// this entry's: owed, and the ones after it go on.
fn peer_status(peer: &str, status: u16) -> ApplyError {
    let message = format!("{peer} answered {status}");
    if status == 421 {
        ApplyError::Peer(message)
    } else {
        ApplyError::Entry(message)
    }
}

/// Before the `attempts`+1-th try of an owed entry: 1 s doubling to 5 min, with jitter so that
/// the replicas of a partition do not retry in step.
fn retry_delay(attempts: u32) -> Duration {
    backoff::delay(attempts, Duration::from_secs(1), Duration::from_secs(300))
}

/// Takes a peer's expiry, set at `set_ms`, if it is the later one ([`Volume::merge_ttl`]); a blob
/// deleted, expired or gone here meanwhile needs none.
async fn take_peer_expiry(volume: &Volume, id: BlobId, expiry_ms: Option<u64>, set_ms: u64) -> Result<(), ApplyError> {
    // Owed (and reported) until this node's clock is near: the peer's clock may be the wrong one.
    let now = crate::engine::now_ms();
    if super::stamp_too_far_ahead(set_ms, now) {
        return Err(ApplyError::Entry(format!(
            "the peer's expiry of {id} is stamped {set_ms}, more than an hour ahead of this node's clock ({now}): the nodes' clocks disagree"
        )));
    }
    match volume.merge_ttl(id, expiry_ms, set_ms).await {
        Ok(_) | Err(VolumeError::Deleted | VolumeError::Expired | VolumeError::NotFound) => Ok(()),
        Err(e) => Err(ApplyError::Entry(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancelled_puller_leaves_no_progress_behind() {
        let replication = Replication::new(Arc::new(Metrics::default()));
        let live = CancellationToken::new();
        let status = PeerStatus { partition: 0, peer: "m0".into(), lag_entries: 3, ..PeerStatus::default() };
        replication.update(&status, None, None, &live);
        assert_eq!(replication.list().len(), 1);
        // The peer left the partition: the puller is cancelled, then forgotten; the request it
        // had in flight ends in an error that must not come back as lag.
        live.cancel();
        replication.forget_peer("m0");
        let late = PeerStatus { last_error: Some("journal of m0: 421 Misdirected Request".into()), ..status };
        replication.update(&late, None, None, &live);
        assert!(replication.list().is_empty(), "{:?}", replication.list());
    }

    /// A puller on a long poll reports seldom: the ages in the report count on between reports.
    #[test]
    fn ages_count_on_between_reports() {
        let replication = Replication::new(Arc::new(Metrics::default()));
        let live = CancellationToken::new();
        let status = PeerStatus { partition: 0, peer: "m0".into(), owed_entries: 1, ..PeerStatus::default() };
        let since = Instant::now() - Duration::from_secs(5);
        replication.update(&status, Some(since), Some(now_ms() - 7000), &live);
        let first = replication.list()[0].clone();
        std::thread::sleep(Duration::from_millis(300));
        let later = replication.list()[0].clone();
        assert!(first.lag_seconds >= 5.0 && first.oldest_owed_seconds >= 7.0, "{first:?}");
        assert!(later.lag_seconds >= first.lag_seconds + 0.25, "{first:?} then {later:?}");
        assert!(later.oldest_owed_seconds >= first.oldest_owed_seconds + 0.2, "{first:?} then {later:?}");
    }

    #[test]
    fn only_a_peer_that_cannot_answer_holds_the_journal_up() {
        assert!(matches!(peer_status("m", 421), ApplyError::Peer(_)));
        // A blob the peer cannot send, a request it refuses: this entry's problem, owed.
        assert!(matches!(peer_status("m", 500), ApplyError::Entry(_)));
        assert!(matches!(peer_status("m", 507), ApplyError::Entry(_)));
        assert!(matches!(peer_status("m", 400), ApplyError::Entry(_)));
    }
}
