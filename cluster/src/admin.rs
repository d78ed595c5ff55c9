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

/// `GET /v1/admin/replicas`: one local replica's progress behind one peer replica. The datanode
/// writes it and the operator and `cairn status` read it: one type for both.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaProgress {
    pub partition: u32,
    pub peer: String,
    /// Next journal sequence to pull from the peer.
    #[serde(default)]
    pub token: u64,
    /// The peer's journal tail when last asked.
    pub peer_tail: u64,
    pub lag_entries: u64,
    /// Bytes of the records in the last page still to apply (a lower bound when further behind).
    #[serde(default)]
    pub lag_bytes: u64,
    /// How long this replica has been behind the peer.
    #[serde(default)]
    pub lag_seconds: f64,
    #[serde(default)]
    pub applied: u64,
    #[serde(default)]
    pub last_error: Option<String>,
    /// Entries passed over because they could not be applied, retried with back-off.
    #[serde(default)]
    pub owed_entries: u64,
    /// How long the oldest of them has been owed.
    #[serde(default)]
    pub oldest_owed_seconds: f64,
    /// Why the oldest could not be applied, the last time it was tried.
    #[serde(default)]
    pub owed_error: Option<String>,
}

impl ReplicaProgress {
    /// Pulled everything the peer had when last asked, and owes nothing.
    pub fn caught_up(&self) -> bool {
        self.lag_entries == 0 && self.last_error.is_none() && self.owed_entries == 0
    }
}
