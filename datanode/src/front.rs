//! The one front the public API talks to: a standalone store, or a node of a cluster that
//! routes across replicas. Handlers call it without asking which it is.

use std::sync::Arc;

use bytes::Bytes;
use cairn_common::BlobId;

use crate::cluster::router::RouteError;
use crate::cluster::Cluster;
use crate::engine::{BlobMeta, PutRequest, Volume, VolumeError};
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

/// A standalone node holds every replica it knows; an unknown partition has no blob here.
fn standalone_volume(store: &Store, id: BlobId) -> Result<Arc<Volume>, FrontError> {
    store.volume(id.partition()).ok_or(FrontError::Route(RouteError::NotFound))
}
