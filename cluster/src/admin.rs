//! Wire types of the datanode's admin API that the operator and `cairn` read.

use serde::{Deserialize, Serialize};

/// `GET /v1/admin/usage`: what one local replica holds (see docs/operations.md for the words).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaUsage {
    pub partition: u32,
    /// Blobs stored and not deleted (expired ones count until compaction reclaims them).
    pub blobs: u64,
    /// Bytes of the records the replica needs: its blobs (with their headers) and tombstones.
    pub stored_bytes: u64,
    /// Bytes written and no longer needed, which compaction gives back to the volume.
    pub reclaimable_bytes: u64,
}
