//! The one front the public API talks to: a standalone store, or a node of a cluster that
//! routes across replicas. Handlers call it without asking which it is.

use std::sync::Arc;

use bytes::Bytes;
use cairn_common::BlobId;
use futures::StreamExt;

use crate::cluster::router::RouteError;
use crate::cluster::Cluster;
use crate::engine::names::{CurrentName, NameEntry, NameRecord};
use crate::engine::{BlobMeta, BlobReader, PairError, PutRequest, Volume, VolumeError};
use crate::store::Store;

#[derive(Clone)]
pub enum Front {
    /// Every replica is here.
    Standalone(Arc<Store>),
    Cluster(Arc<Cluster>),
}

/// Why the front could not do what was asked: a local volume's answer or the cluster's.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Route(#[from] RouteError),
    /// What a cluster's front does not do yet.
    #[error("{0}")]
    Unsupported(&'static str),
}

impl Front {
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        match self {
            Front::Cluster(cluster) => Some(cluster),
            Front::Standalone(_) => None,
        }
    }

    /// The largest blob accepted now: the cluster's setting (the same on every datanode, so that
    /// no replica refuses what a router accepted), or `standalone` for a standalone node.
    pub fn max_blob_bytes(&self, standalone: u64) -> u64 {
        self.cluster().and_then(|c| c.config()).map(|c| c.max_blob_bytes()).unwrap_or(standalone)
    }

    /// Stores a new blob durably (at write quorum in a cluster), in one of the `reach` partitions
    /// when given (a key limited to them); its id.
    pub async fn put(
        &self,
        meta: BlobMeta,
        payload: Bytes,
        created_ms: u64,
        expiry_ms: Option<u64>,
        reach: Option<&std::collections::BTreeSet<u32>>,
    ) -> Result<BlobId, FrontError> {
        let store = match self {
            Front::Cluster(cluster) => return Ok(cluster.put(meta, payload, created_ms, expiry_ms, reach).await?),
            Front::Standalone(store) => store,
        };
        // A volume without room for this blob (or stalled) does not stop the others taking it;
        // the partitions out of reach are as if tried.
        let mut tried: Vec<u32> = match reach {
            Some(reach) => store.volumes().iter().map(|v| v.partition()).filter(|p| !reach.contains(p)).collect(),
            None => Vec::new(),
        };
        let mut last_refusal = None;
        loop {
            let volume = match (store.pick_for_put(&tried), last_refusal) {
                (Ok(volume), _) => volume,
                (Err(_), Some(refusal)) => return Err(FrontError::Volume(refusal)),
                (Err(e), None) => return Err(e.into()),
            };
            let blob_id = BlobId::generate(volume.partition());
            let request = PutRequest { blob_id, meta: meta.clone(), payload: payload.clone(), created_ms, expiry_ms };
            match volume.put(request).await {
                Ok(()) => return Ok(blob_id),
                Err(e @ (VolumeError::NoRoom { .. } | VolumeError::Paused { .. } | VolumeError::Full)) => {
                    tried.push(volume.partition());
                    last_refusal = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Deletes a blob (at write quorum in a cluster).
    pub async fn delete(&self, id: BlobId) -> Result<(), FrontError> {
        match self {
            Front::Cluster(cluster) => Ok(cluster.delete(id).await?),
            Front::Standalone(store) => Ok(standalone_volume(store, id)?.delete(id).await?),
        }
    }

    /// Sets a blob's expiry (at write quorum in a cluster).
    pub async fn update_ttl(&self, id: BlobId, expiry_ms: Option<u64>) -> Result<(), FrontError> {
        match self {
            Front::Cluster(cluster) => Ok(cluster.update_ttl(id, expiry_ms).await?),
            Front::Standalone(store) => Ok(standalone_volume(store, id)?.update_ttl(id, expiry_ms).await?),
        }
    }
}

/// Name records (`engine::names`): written in a given partition, read by name. A cluster
/// writes and reads them at quorum (`cluster::names`).
impl Front {
    /// The partitions new names may be placed in (all this front has, in order).
    pub fn name_partitions(&self) -> Result<Vec<u32>, FrontError> {
        let mut partitions: Vec<u32> = match self {
            Front::Standalone(store) => store.volumes().iter().map(|v| v.partition()).collect(),
            Front::Cluster(cluster) => cluster.snapshot().topology.partitions.keys().copied().collect(),
        };
        partitions.sort_unstable();
        Ok(partitions)
    }

    /// Stores `record` durably in `partition`. Answers the versions of its name the store held
    /// just before, oldest first, when it can tell them in the same step — a standalone volume's
    /// writer reads them in the transaction of the put — and `None` on a cluster, where they are
    /// a quorum read of their own ([`Front::name_versions`]).
    pub async fn put_name(
        &self,
        partition: u32,
        record: &NameRecord,
        created_ms: u64,
    ) -> Result<Option<Vec<(u128, NameEntry)>>, FrontError> {
        let blob_id = record.id(partition);
        match self {
            Front::Cluster(cluster) => {
                cluster.put_name(blob_id, Bytes::from(record.encode()), created_ms).await?;
                Ok(None)
            }
            Front::Standalone(store) => {
                Ok(Some(standalone_volume(store, blob_id)?.put_name(blob_id, record, created_ms).await?))
            }
        }
    }

    /// Stores `record` in `partition` together with `piece` (a piece the record holds, on the
    /// same partition; the record is stamped with the piece's time): a standalone volume writes
    /// both in one group commit ([`Volume::put_name_with_piece`]). A cluster writes a piece and a
    /// record to replicas of their own, so there the caller stores the piece first (this answers
    /// the piece Unsupported, nothing written).
    pub async fn put_name_with_piece(
        &self,
        partition: u32,
        record: &NameRecord,
        piece: PutRequest,
    ) -> Result<Vec<(u128, NameEntry)>, PairError<FrontError>> {
        let store = match self {
            Front::Cluster(_) => {
                return Err(PairError::Piece(FrontError::Unsupported("a piece written with its name record")))
            }
            Front::Standalone(store) => store,
        };
        let volume = standalone_volume(store, record.id(partition)).map_err(PairError::Piece)?;
        let created_ms = piece.created_ms;
        volume.put_name_with_piece(piece, record.id(partition), record, created_ms).await.map_err(|e| e.map(Into::into))
    }

    /// Every version of a name in `partition`, oldest first.
    pub async fn name_versions(
        &self,
        partition: u32,
        space: &str,
        name: &str,
    ) -> Result<Vec<(u128, NameEntry)>, FrontError> {
        let store = match self {
            Front::Cluster(cluster) => return Ok(cluster.name_versions(partition, space, name).await?),
            Front::Standalone(store) => store,
        };
        let volume = standalone_volume(store, BlobId::new(partition, 0))?;
        let (space, name) = (space.to_string(), name.to_string());
        Ok(blocking(move || volume.name_versions(&space, &name)).await?)
    }

    /// The current names of `space` across `partitions` that start with `prefix`, from `from`
    /// on (without `from` itself when `after`), in byte order: at most `limit`.
    pub async fn current_names(
        &self,
        partitions: &[u32],
        space: &str,
        from: &str,
        after: bool,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<CurrentName>, FrontError> {
        // Each partition's first `limit`, merged: the first `limit` of them all.
        let mut all = match self {
            Front::Cluster(cluster) => {
                let asks: Vec<_> = partitions
                    .iter()
                    .map(|&partition| {
                        let (cluster, space, from, prefix) =
                            (cluster.clone(), space.to_string(), from.to_string(), prefix.to_string());
                        async move { cluster.current_names(partition, &space, &from, after, &prefix, limit).await }
                    })
                    .collect();
                let pages: Vec<Result<Vec<CurrentName>, RouteError>> =
                    futures::stream::iter(asks).buffer_unordered(PARTITIONS_LISTED_AT_ONCE).collect().await;
                let mut all = Vec::new();
                for page in pages {
                    all.extend(page?);
                }
                all
            }
            Front::Standalone(store) => {
                let volumes: Vec<Arc<Volume>> = partitions
                    .iter()
                    .map(|p| standalone_volume(store, BlobId::new(*p, 0)))
                    .collect::<Result<_, _>>()?;
                let (space, from, prefix) = (space.to_string(), from.to_string(), prefix.to_string());
                blocking(move || {
                    let mut all = Vec::new();
                    for volume in volumes {
                        all.extend(volume.current_names(&space, &from, after, &prefix, limit)?);
                    }
                    Ok(all)
                })
                .await?
            }
        };
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all.truncate(limit);
        Ok(all)
    }

    /// The record a name id holds.
    pub async fn name_record(&self, id: BlobId) -> Result<NameRecord, FrontError> {
        match self {
            Front::Cluster(cluster) => Ok(NameRecord::decode_for(id, &cluster.read_payload(id).await?)?),
            Front::Standalone(store) => {
                let volume = standalone_volume(store, id)?;
                Ok(blocking(move || volume.name_record(id)).await?)
            }
        }
    }

    /// A reader of a blob's payload: the local replica's when it has the blob, else (in a
    /// cluster) one that reads from a peer replica.
    pub async fn open(&self, id: BlobId) -> Result<PieceReader, FrontError> {
        let cluster = match self {
            Front::Standalone(store) => {
                let volume = standalone_volume(store, id)?;
                return Ok(PieceReader::Local(Box::new(blocking(move || volume.open_blob(id)).await?)));
            }
            Front::Cluster(cluster) => cluster,
        };
        if let Some(volume) = cluster.store.volume(id.partition()) {
            match blocking(move || volume.open_blob(id)).await {
                Ok(reader) => return Ok(PieceReader::Local(Box::new(reader))),
                Err(e @ (VolumeError::Deleted | VolumeError::Expired)) => return Err(e.into()),
                Err(e) => tracing::debug!(%id, error = %e, "local replica cannot answer; asking the others"),
            }
        }
        let response = cluster.read_from_peers(id, reqwest::Method::HEAD, "", None).await?;
        match response.status().as_u16() {
            200 => {}
            410 => return Err(RouteError::Deleted.into()),
            status => return Err(RouteError::NoQuorum(format!("a replica answered {status} to a HEAD of {id}")).into()),
        }
        let len = response
            .headers()
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .ok_or_else(|| RouteError::NoQuorum(format!("a replica answered a HEAD of {id} without a length")))?;
        Ok(PieceReader::Remote { cluster: cluster.clone(), id, len })
    }
}

/// How many partitions a cluster's listing asks at once.
const PARTITIONS_LISTED_AT_ONCE: usize = 16;

/// An opened blob: here, or on a peer replica.
pub enum PieceReader {
    Local(Box<BlobReader>),
    Remote { cluster: Arc<Cluster>, id: BlobId, len: u64 },
}

impl PieceReader {
    pub fn len(&self) -> u64 {
        match self {
            PieceReader::Local(reader) => reader.len(),
            PieceReader::Remote { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A peer replica's bytes `[from, to)`, streamed (a local reader is the API's to stream:
    /// the blob routes' streaming, which checks chunks as they go).
    pub async fn stream_remote(
        cluster: &Cluster,
        id: BlobId,
        from: u64,
        to: u64,
    ) -> Result<reqwest::Response, FrontError> {
        let range = format!("bytes={from}-{}", to.saturating_sub(1));
        let response = cluster.read_from_peers(id, reqwest::Method::GET, "", Some(range.as_bytes())).await?;
        match response.status().as_u16() {
            200 | 206 => Ok(response),
            410 => Err(RouteError::Deleted.into()),
            status => Err(RouteError::NoQuorum(format!("a replica answered {status} to a read of {id}")).into()),
        }
    }

    /// The bytes `[from, to)` in memory.
    pub async fn read(self, from: u64, to: u64) -> Result<Bytes, FrontError> {
        match self {
            PieceReader::Local(reader) => Ok(Bytes::from(blocking(move || reader.read_range(from, to)).await?)),
            PieceReader::Remote { cluster, id, .. } => {
                let bytes = Self::stream_remote(&cluster, id, from, to)
                    .await?
                    .bytes()
                    .await
                    .map_err(|e| RouteError::NoQuorum(format!("reading a peer's replica: {e}")))?;
                if bytes.len() as u64 != to - from {
                    return Err(RouteError::NoQuorum("a peer's replica answered a short read".into()).into());
                }
                Ok(bytes)
            }
        }
    }
}

impl FrontError {
    /// The blob (or record) was deleted, here or at the replica that answered.
    pub fn is_deleted(&self) -> bool {
        matches!(
            self,
            FrontError::Volume(VolumeError::Deleted | VolumeError::Expired) | FrontError::Route(RouteError::Deleted)
        )
    }

    /// No room is left for the write (a full volume or partition).
    pub fn is_no_room(&self) -> bool {
        matches!(
            self,
            FrontError::Volume(VolumeError::Full | VolumeError::NoRoom { .. })
                | FrontError::Volume(VolumeError::Paused { no_space: true, .. })
                | FrontError::Route(RouteError::NoRoom(_))
        )
    }

    /// No replica knows the blob.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FrontError::Volume(VolumeError::NotFound) | FrontError::Route(RouteError::NotFound))
    }
}

/// Runs blocking engine work (redb reads, disk reads) off the async runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, VolumeError> + Send + 'static,
) -> Result<T, VolumeError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| VolumeError::Failed(format!("blocking task: {e}")))?
}

/// A standalone node holds every replica it knows; an unknown partition has no blob here.
fn standalone_volume(store: &Store, id: BlobId) -> Result<Arc<Volume>, FrontError> {
    store.volume(id.partition()).ok_or(FrontError::Route(RouteError::NotFound))
}
