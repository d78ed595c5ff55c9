//! What `cairn status`, `cairn disks` and `cairn topology` show: plain data, gathered once
//! (mod.rs), rendered as text (render.rs) or printed as JSON/YAML. Field names are camelCase like
//! the Kubernetes resources they come from.

use cairn_common::agent_api::{DiskReport, ExcludedMount, MissingDisk};
use cairn_resources::store_cluster::PartitionCounts;
use serde::{Deserialize, Serialize};

/// `cairn status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    pub name: String,
    pub namespace: String,
    /// `kubernetes` or `local`.
    pub source: String,
    pub phase: String,
    /// The datanode image (a local cluster: `local`).
    pub image: String,
    /// RFC 3339.
    pub created: Option<String>,
    pub generation: Option<i64>,
    pub observed_generation: Option<i64>,
    pub conditions: Vec<ConditionView>,
    pub capacity: CapacityView,
    pub partitions: PartitionCounts,
    pub topology_revision: i64,
    pub machines: Vec<MachineView>,
    /// Partitions short of live replicas, replicas behind a peer, moves in progress.
    pub partition_issues: Vec<PartitionIssue>,
    pub warnings: Vec<String>,
    /// Oldest first.
    pub events: Vec<EventView>,
}

impl ClusterView {
    /// The Degraded condition is True: `cairn status` exits non-zero.
    pub fn degraded(&self) -> bool {
        self.conditions.iter().any(|c| c.type_ == "Degraded" && c.status == "True")
    }

    pub fn ready(&self) -> bool {
        self.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
    }

    /// Ready, and nothing this view shows is still catching up: what `status --watch` waits for,
    /// so that it never stops on a line that reports lag.
    pub fn settled(&self) -> bool {
        self.ready()
            && self.partitions.under_replicated == 0
            && !self.partition_issues.iter().any(|i| matches!(i, PartitionIssue::Lagging { .. }))
    }
}

/// The Capacity line: the sums of the machine rows, and the blobs counted once. The words are
/// those of docs/operations.md.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CapacityView {
    /// Blobs stored and not deleted, each counted once (for each partition, the most any of its
    /// replicas that answered holds); `None` when no datanode answered.
    pub blobs: Option<u64>,
    /// Bytes the replicas hold for their blobs (with record headers) and tombstones, every replica
    /// counted; `None` when no datanode answered.
    pub stored_bytes: Option<u64>,
    /// Bytes written and no longer needed, which compaction gives back to the volumes.
    pub reclaimable_bytes: Option<u64>,
    /// Space of the usable disks allocated to Cairn volumes (preallocated).
    pub allocated_bytes: u64,
    /// What the usable disks can still allocate to new volumes.
    pub allocatable_bytes: u64,
    /// Size of the usable disks.
    pub total_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConditionView {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    /// RFC 3339.
    pub since: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineView {
    pub name: String,
    pub zone: String,
    /// `ready` (registered in etcd), `not-registered`, `draining` (unselected, replicas still
    /// there), `idle` (selected, not in the topology), `unselected` (not selected, holding
    /// nothing), `gone` (in the topology, no such machine), `not-in-topology` (a live datanode
    /// neither a machine nor in the topology); with etcd unreachable, from the
    /// datanode Pod on Kubernetes: `pod-ready`, `pod-not-ready`, `no-pod`; else `unknown`.
    pub datanode: String,
    pub address: String,
    /// Usable disks.
    pub disks: u32,
    /// What the datanode's replicas hold and what compaction can reclaim from them (see
    /// [`CapacityView`]); `None` when its datanode did not answer.
    pub stored_bytes: Option<u64>,
    pub reclaimable_bytes: Option<u64>,
    /// Allocated to Cairn volumes on the usable disks.
    pub allocated_bytes: u64,
    pub allocatable_bytes: u64,
    pub total_bytes: u64,
    /// Replicas the topology places here.
    pub replicas: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase", tag = "kind")]
pub enum PartitionIssue {
    /// Fewer live replicas than the replication factor.
    UnderReplicated { partition: u32, state: String, live: u32, wanted: u32, not_live: Vec<String> },
    /// A replica behind one of its peers (or failing to pull from it).
    Lagging { partition: u32, node: String, peer: String, lag_entries: u64, lag_seconds: f64, error: Option<String> },
    /// A replica beside its replacement while the replacement catches up.
    Moving { partition: u32, replicas: Vec<String> },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventView {
    /// RFC 3339.
    pub time: String,
    pub warning: bool,
    pub reason: String,
    pub message: String,
    /// Occurrences (a repeated event is counted, not listed again).
    pub count: u32,
}

/// `cairn disks`: one disk agent's inventory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeDisks {
    /// The Kubernetes node (its StoreNode), or `local`.
    pub node: String,
    /// The StoreNode's Ready condition (`None`: not reported).
    pub ready: Option<bool>,
    pub disks: Vec<DiskReport>,
    pub excluded: Vec<ExcludedMount>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<MissingDisk>,
}
