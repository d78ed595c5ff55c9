//! The one front the public API talks to: a standalone store, or a node of a cluster that
//! routes across replicas. Handlers call it without asking which it is.

use std::sync::Arc;

use bytes::Bytes;
use cairn_common::BlobId;

use crate::cluster::router::RouteError;
use crate::cluster::Cluster;
use crate::engine::names::{CurrentName, NameEntry, NameRecord, NAME_RECORD_CONTENT_TYPE};
use crate::engine::{BlobMeta, BlobReader, PutRequest, Volume, VolumeError};
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

/// Name records are a standalone node's for now: a cluster's S3 front is not built yet.
const NAMES_ON_A_CLUSTER: &str = "name records (the S3 front) are served by a standalone node only, so far";

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

/// Name records (`engine::names`): written in a given partition, read by name.
impl Front {
    fn standalone(&self) -> Result<&Arc<Store>, FrontError> {
        match self {
            Front::Standalone(store) => Ok(store),
            Front::Cluster(_) => Err(FrontError::Unsupported(NAMES_ON_A_CLUSTER)),
        }
    }

    /// The partitions new names may be placed in (all this front has, in order).
    pub fn name_partitions(&self) -> Result<Vec<u32>, FrontError> {
        let mut partitions: Vec<u32> = self.standalone()?.volumes().iter().map(|v| v.partition()).collect();
        partitions.sort_unstable();
        Ok(partitions)
    }

    /// Stores `record` durably in `partition`; its id.
    pub async fn put_name(&self, partition: u32, record: &NameRecord, created_ms: u64) -> Result<BlobId, FrontError> {
        let store = self.standalone()?;
        let volume = standalone_volume(store, BlobId::new(partition, 0))?;
        let blob_id = record.id(partition);
        let meta = BlobMeta::new(NAME_RECORD_CONTENT_TYPE.into(), Vec::new()).expect("a valid content type");
        let request = PutRequest { blob_id, meta, payload: Bytes::from(record.encode()), created_ms, expiry_ms: None };
        volume.put(request).await?;
        Ok(blob_id)
    }

    /// Every version of a name in `partition`, oldest first.
    pub async fn name_versions(
        &self,
        partition: u32,
        space: &str,
        name: &str,
    ) -> Result<Vec<(u128, NameEntry)>, FrontError> {
        let volume = standalone_volume(self.standalone()?, BlobId::new(partition, 0))?;
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
        let store = self.standalone()?;
        let volumes: Vec<Arc<Volume>> =
            partitions.iter().map(|p| standalone_volume(store, BlobId::new(*p, 0))).collect::<Result<_, _>>()?;
        let (space, from, prefix) = (space.to_string(), from.to_string(), prefix.to_string());
        // Each partition's first `limit`, merged: the first `limit` of them all.
        Ok(blocking(move || {
            let mut all = Vec::new();
            for volume in volumes {
                all.extend(volume.current_names(&space, &from, after, &prefix, limit)?);
            }
            all.sort_by(|a, b| a.name.cmp(&b.name));
            all.truncate(limit);
            Ok(all)
        })
        .await?)
    }

    /// The record a name id holds.
    pub async fn name_record(&self, id: BlobId) -> Result<NameRecord, FrontError> {
        let volume = standalone_volume(self.standalone()?, id)?;
        Ok(blocking(move || volume.name_record(id)).await?)
    }

    /// A reader of a blob's payload.
    pub async fn open(&self, id: BlobId) -> Result<BlobReader, FrontError> {
        let volume = standalone_volume(self.standalone()?, id)?;
        Ok(blocking(move || volume.open_blob(id)).await?)
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
