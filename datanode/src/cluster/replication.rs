//! Pull replication: every replica reads each peer replica's journal from a token persisted in
//! its own redb, fetches what it lacks (blobs, tombstones, TTL changes) and applies it
//! idempotently. This also fills a new replica and heals one that was down.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_common::BlobId;
use tokio_util::sync::CancellationToken;

use super::replica_api::{EntryKind, JournalPage, CREATED_HEADER, EXPIRES_HEADER};
use super::Cluster;
use crate::engine::{now_ms, BlobMeta, OwedEntry, PutRequest, Volume, VolumeError};
use crate::metrics::{Metrics, PeerLabels};

const PAGE: usize = 500;
const IDLE_POLL: Duration = Duration::from_millis(200);

/// Progress of one local replica behind one peer (`GET /v1/admin/replicas`): the wire type the
/// operator reads.
pub use cairn_cluster::admin::ReplicaProgress as PeerStatus;

pub struct Replication {
    metrics: Arc<Metrics>,
    status: Mutex<BTreeMap<(u32, String), PeerStatus>>,
}

impl Replication {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics, status: Mutex::default() }
    }

    pub fn list(&self) -> Vec<PeerStatus> {
        self.status.lock().expect("status lock").values().cloned().collect()
    }

    pub fn forget(&self, partition: u32, peer: &str) {
        self.status.lock().expect("status lock").remove(&(partition, peer.to_owned()));
        let labels = PeerLabels { partition: partition.to_string(), peer: peer.to_owned() };
        self.metrics.replication_lag_entries.remove(&labels);
        self.metrics.replication_lag_bytes.remove(&labels);
        self.metrics.replication_lag_seconds.remove(&labels);
        self.metrics.replication_owed_entries.remove(&labels);
    }

    /// Records a puller's progress — unless it was cancelled: a page in flight when the peer
    /// left the partition ends in an error (421 from the peer), and writing that back after
    /// `forget` would leave a stale entry that reads as lag forever. The cancel is checked under
    /// the status lock, and [`Cluster`] cancels before it forgets, so the two cannot interleave.
    fn update(&self, status: &PeerStatus, cancel: &CancellationToken) {
        let mut all = self.status.lock().expect("status lock");
        if cancel.is_cancelled() {
            return;
        }
        let labels = PeerLabels { partition: status.partition.to_string(), peer: status.peer.clone() };
        self.metrics.replication_lag_entries.get_or_create(&labels).set(status.lag_entries as i64);
        self.metrics.replication_lag_bytes.get_or_create(&labels).set(status.lag_bytes as i64);
        self.metrics.replication_lag_seconds.get_or_create(&labels).set(status.lag_seconds);
        self.metrics.replication_owed_entries.get_or_create(&labels).set(status.owed_entries as i64);
        all.insert((status.partition, status.peer.clone()), status.clone());
    }
}

/// How often a puller asks its peer for the blobs recovery found damaged here.
const REPAIR_EVERY: Duration = Duration::from_secs(30);

/// Pulls `peer`'s journal of `partition` into the local replica until `cancel`. An entry that
/// cannot be applied (the peer cannot send its blob, the local volume refuses it, the entry is
/// corrupt) does not stop the ones after it: it is owed — recorded durably with its error — and
/// retried with back-off until it is applied.
pub async fn pull(cluster: Arc<Cluster>, partition: u32, peer: String, cancel: CancellationToken) {
    let mut status = PeerStatus { partition, peer: peer.clone(), ..PeerStatus::default() };
    let mut behind_since: Option<Instant> = None;
    let mut next_repair = Instant::now();
    // This puller is the only writer of its peer's owed entries: kept in memory, loaded once.
    let mut owed: Vec<(u64, OwedEntry)> = match cluster.store.volume(partition) {
        Some(volume) => tokio::task::spawn_blocking(move || volume.owed())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
            .into_iter()
            .filter(|(p, _, _)| *p == peer)
            .map(|(_, seq, entry)| (seq, entry))
            .collect(),
        None => Vec::new(),
    };
    loop {
        if Instant::now() >= next_repair {
            next_repair = Instant::now() + REPAIR_EVERY;
            if let Err(e) = repair_damaged(&cluster, partition, &peer).await {
                tracing::warn!(partition, %peer, error = %e, "repair of damaged blobs failed; trying again later");
            }
        }
        if let Err(e) = retry_owed(&cluster, partition, &peer, &mut owed).await {
            tracing::debug!(partition, %peer, error = %e, "owed entries not retried now");
        }
        let wait = match pull_page(&cluster, partition, &peer, &mut status, &mut owed).await {
            Ok(true) => Duration::ZERO,
            Ok(false) => IDLE_POLL,
            Err(e) => {
                status.last_error = Some(e);
                Duration::from_secs(1)
            }
        };
        behind_since = if status.lag_entries > 0 { Some(behind_since.unwrap_or_else(Instant::now)) } else { None };
        status.lag_seconds = behind_since.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        let oldest = owed.iter().min_by_key(|(_, e)| e.first_failed_ms);
        status.owed_entries = owed.len() as u64;
        status.oldest_owed_seconds =
            oldest.map(|(_, e)| now_ms().saturating_sub(e.first_failed_ms) as f64 / 1000.0).unwrap_or(0.0);
        status.owed_error = oldest
            .map(|(seq, e)| format!("{} {} (entry {seq}, {} attempts): {}", e.kind, e.id, e.attempts, e.last_error));
        cluster.replication.update(&status, &cancel);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One page: true if it moved on (so the next page follows at once). Entries that cannot be
/// applied are owed (added to `owed`, and recorded with the token that passes them).
async fn pull_page(
    cluster: &Cluster,
    partition: u32,
    peer: &str,
    status: &mut PeerStatus,
    owed: &mut Vec<(u64, OwedEntry)>,
) -> Result<bool, String> {
    let volume = cluster.store.volume(partition).ok_or("the local replica is not open")?;
    let snapshot = cluster.snapshot();
    if !snapshot.live.contains_key(peer) {
        return Err(format!("peer {peer} is not live"));
    }
    let address = Cluster::address_of(&snapshot, peer).ok_or_else(|| format!("no address for {peer}"))?;
    let token = {
        let (volume, peer) = (volume.clone(), peer.to_owned());
        tokio::task::spawn_blocking(move || volume.replication_token(&peer))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
    };
    let url = format!("http://{address}/replica/v1/partitions/{partition}/journal?from={token}&limit={PAGE}");
    let response = cluster
        .http
        .get(url)
        .timeout(cluster.options.peer_timeout)
        .send()
        .await
        .map_err(|e| format!("journal of {peer}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("journal of {peer}: {}", response.status()));
    }
    let page: JournalPage = response.json().await.map_err(|e| format!("journal of {peer}: {e}"))?;
    status.token = token;
    status.peer_tail = page.tail;
    status.lag_entries = page.tail.saturating_sub(token);
    status.lag_bytes = page.entries.iter().map(|e| e.len).sum();
    status.last_error = None;
    if page.entries.is_empty() {
        return Ok(false);
    }
    let mut next = token;
    let mut newly_owed = Vec::new();
    for entry in &page.entries {
        let applied = apply_entry(cluster, &volume, &address, &entry.id, entry.kind).await;
        match applied {
            Ok(()) => status.applied += 1,
            // The peer went away mid-page: the rest of the page waits for it, nothing is owed.
            Err(ApplyError::Peer(e)) if next == token => return Err(format!("{} {}: {e}", entry.kind, entry.id)),
            Err(ApplyError::Peer(_)) => break,
            Err(ApplyError::Entry(e)) => {
                tracing::warn!(partition, %peer, id = %entry.id, kind = %entry.kind, error = %e, "entry owed; the ones after it go on");
                let now = now_ms();
                newly_owed.push((
                    entry.seq,
                    OwedEntry {
                        id: entry.id.clone(),
                        kind: entry.kind.to_string(),
                        last_error: e,
                        attempts: 1,
                        first_failed_ms: now,
                        next_retry_ms: now + backoff_ms(1),
                    },
                ));
            }
        }
        next = entry.seq + 1;
    }
    let (volume, peer_owned, recorded) = (volume.clone(), peer.to_owned(), newly_owed.clone());
    tokio::task::spawn_blocking(move || volume.advance_replication(&peer_owned, next, &recorded))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    owed.extend(newly_owed);
    status.token = next;
    status.lag_entries = page.tail.saturating_sub(next);
    Ok(true)
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

/// How long before the `attempts`+1-th try of an owed entry: 1 s doubling to 5 min, with ±20 %
/// jitter so that the replicas of a partition do not retry in step.
fn backoff_ms(attempts: u32) -> u64 {
    use rand::Rng;
    let base = (1000u64 << attempts.saturating_sub(1).min(9)).min(300_000);
    base * rand::rng().random_range(80..=120) / 100
}

/// Tries again the owed entries whose time has come (a few per round); applied ones are settled,
/// failed ones rescheduled with a longer back-off.
async fn retry_owed(
    cluster: &Cluster,
    partition: u32,
    peer: &str,
    owed: &mut Vec<(u64, OwedEntry)>,
) -> Result<(), String> {
    let now = now_ms();
    if !owed.iter().any(|(_, e)| e.next_retry_ms <= now) {
        return Ok(());
    }
    let volume = cluster.store.volume(partition).ok_or("the local replica is not open")?;
    let snapshot = cluster.snapshot();
    let address = Cluster::address_of(&snapshot, peer).ok_or_else(|| format!("no address for {peer}"))?;
    let due: Vec<usize> =
        owed.iter().enumerate().filter(|(_, (_, e))| e.next_retry_ms <= now).map(|(i, _)| i).take(20).collect();
    let mut settled = Vec::new();
    for i in due {
        let (seq, entry) = owed[i].clone();
        let result = apply_entry(cluster, &volume, &address, &entry.id, EntryKind::parse(&entry.kind)).await;
        let still = match result {
            Ok(()) => {
                tracing::info!(partition, %peer, id = %entry.id, attempts = entry.attempts, "owed entry applied");
                settled.push(i);
                None
            }
            Err(ApplyError::Peer(e)) => return Err(e),
            Err(ApplyError::Entry(e)) => {
                let attempts = entry.attempts + 1;
                let again =
                    OwedEntry { last_error: e, attempts, next_retry_ms: now_ms() + backoff_ms(attempts), ..entry };
                owed[i].1 = again.clone();
                Some(again)
            }
        };
        let (volume, peer) = (volume.clone(), peer.to_owned());
        tokio::task::spawn_blocking(move || volume.settle_owed(&peer, seq, still.as_ref()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    for i in settled.into_iter().rev() {
        owed.remove(i);
    }
    Ok(())
}

/// Asks the peer for every blob recovery found damaged here; what it has comes back as a normal
/// put (which clears the damage). A blob that every other replica says it never had was never
/// acknowledged (a write quorum of 2 or more puts it on another replica): it is forgotten.
async fn repair_damaged(cluster: &Cluster, partition: u32, peer: &str) -> Result<(), String> {
    let Some(volume) = cluster.store.volume(partition) else { return Ok(()) };
    let damaged = {
        let volume = volume.clone();
        tokio::task::spawn_blocking(move || volume.damaged()).await.map_err(|e| e.to_string())?
    }
    .map_err(|e| e.to_string())?;
    if damaged.is_empty() {
        return Ok(());
    }
    let snapshot = cluster.snapshot();
    let address = Cluster::address_of(&snapshot, peer).ok_or_else(|| format!("no address for {peer}"))?;
    for (id, record) in damaged {
        match fetch_blob(cluster, &volume, &address, id).await {
            Ok(Fetched::Stored) => {
                tracing::info!(%id, %peer, segment = record.segment, offset = record.offset, "damaged blob repaired")
            }
            Ok(Fetched::Gone) => tracing::info!(%id, %peer, "damaged blob was deleted there; tombstone kept"),
            Ok(Fetched::Absent) => {
                let absent = volume.note_damaged_absent(id, peer).map_err(|e| e.to_string())?;
                let others: Vec<&str> = snapshot
                    .topology
                    .partitions
                    .get(&partition)
                    .map(|p| p.replicas.iter().map(|r| r.node.as_str()).filter(|n| *n != cluster.node_id()).collect())
                    .unwrap_or_default();
                let quorum = snapshot.topology.config.as_ref().map(|c| c.write_quorum).unwrap_or(1);
                if quorum >= 2 && !others.is_empty() && others.iter().all(|n| absent.iter().any(|a| a == n)) {
                    volume.forget_damaged(id).map_err(|e| e.to_string())?;
                    tracing::warn!(%id, partition, "damaged blob no replica has: never acknowledged, forgotten");
                }
            }
            Err(e) => tracing::warn!(%id, %peer, error = %e, "damaged blob not repaired yet"),
        }
    }
    Ok(())
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

/// Copies a blob from `address`'s own replica into the local one.
async fn fetch_blob(cluster: &Cluster, volume: &Volume, address: &str, id: BlobId) -> Result<Fetched, ApplyError> {
    let response = cluster
        .http
        .get(format!("http://{address}/v1/blobs/{id}?local=true"))
        .timeout(cluster.options.peer_timeout * 10)
        .send()
        .await
        .map_err(|e| ApplyError::Peer(e.to_string()))?;
    match response.status().as_u16() {
        200 => {
            let headers = response.headers().clone();
            let payload = response.bytes().await.map_err(|e| ApplyError::Peer(e.to_string()))?;
            let number = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            let content_type = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or(crate::api::limits::DEFAULT_CONTENT_TYPE)
                .to_owned();
            let user = headers
                .iter()
                .filter_map(|(k, v)| {
                    let key = k.as_str().strip_prefix(crate::api::limits::META_PREFIX)?;
                    Some((key.to_owned(), v.to_str().ok()?.to_owned()))
                })
                .collect();
            let request = PutRequest {
                blob_id: id,
                meta: BlobMeta { content_type, user },
                payload,
                created_ms: number(CREATED_HEADER).ok_or(ApplyError::Entry("peer sent no creation time".into()))?,
                expiry_ms: number(EXPIRES_HEADER),
            };
            match volume.put(request).await {
                Ok(()) | Err(VolumeError::Conflict) => Ok(Fetched::Stored),
                Err(e) => Err(ApplyError::Entry(e.to_string())),
            }
        }
        // Deleted or expired there: keep a tombstone so the put can never land later.
        410 => volume.tombstone(id).await.map(|_| Fetched::Gone).map_err(|e| ApplyError::Entry(e.to_string())),
        404 => Ok(Fetched::Absent),
        status => Err(ApplyError::Entry(format!("fetching from {address}: {status}"))),
    }
}

/// A journal entry as the peer sent it (its id still text): applied, or why not.
async fn apply_entry(
    cluster: &Cluster,
    volume: &Volume,
    address: &str,
    id: &str,
    kind: EntryKind,
) -> Result<(), ApplyError> {
    match id.parse::<BlobId>() {
        Ok(id) => apply(cluster, volume, address, id, kind).await,
        Err(e) => Err(ApplyError::Entry(format!("corrupt journal entry: bad blob id: {e}"))),
    }
}

/// Brings one journal entry of the peer into the local replica; applying twice changes nothing.
async fn apply(
    cluster: &Cluster,
    volume: &Volume,
    address: &str,
    id: BlobId,
    kind: EntryKind,
) -> Result<(), ApplyError> {
    let entry = |e: VolumeError| ApplyError::Entry(e.to_string());
    let known = match volume.entry(id) {
        Ok(_) => true,
        Err(VolumeError::NotFound) => false,
        Err(e) => return Err(entry(e)),
    };
    match kind {
        EntryKind::Put if known => Ok(()),
        // Gone from the peer entirely (compacted after a delete): its delete entry follows.
        EntryKind::Put => fetch_blob(cluster, volume, address, id).await.map(|_| ()),
        EntryKind::Delete => volume.tombstone(id).await.map(|_| ()).map_err(entry),
        EntryKind::TtlUpdate if !known => Ok(()), // the put, when it comes, carries the current expiry
        EntryKind::TtlUpdate => {
            let response = cluster
                .http
                .get(format!("http://{address}/v1/blobs/{id}/info?local=true"))
                .timeout(cluster.options.peer_timeout)
                .send()
                .await
                .map_err(|e| ApplyError::Peer(e.to_string()))?;
            if !response.status().is_success() {
                return Ok(()); // deleted or expired there: its delete entry follows
            }
            let info: crate::api::blobs::BlobInfo =
                response.json().await.map_err(|e| ApplyError::Entry(e.to_string()))?;
            match volume.update_ttl(id, info.expires_ms).await {
                Ok(()) | Err(VolumeError::Deleted | VolumeError::Expired | VolumeError::NotFound) => Ok(()),
                Err(e) => Err(entry(e)),
            }
        }
        // A segment boundary on the peer: nothing to copy.
        EntryKind::Seal => Ok(()),
        EntryKind::Unknown => Err(ApplyError::Entry("a journal entry of a kind this version does not know".into())),
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
        replication.update(&status, &live);
        assert_eq!(replication.list().len(), 1);
        // The peer left the partition: the puller is cancelled, then forgotten; the page it had
        // in flight ends in an error that must not come back as lag.
        live.cancel();
        replication.forget(0, "m0");
        let late = PeerStatus { last_error: Some("journal of m0: 421 Misdirected Request".into()), ..status };
        replication.update(&late, &live);
        assert!(replication.list().is_empty(), "{:?}", replication.list());
    }
}
