//! The disk agent's node API: what it reports and the volume calls, as JSON over a unix socket.
//!
//! These types are the one description of a node's disks: `cairn-disk-agent scan -o json`
//! prints a [`NodeReport`], the socket API serves it, and the `StoreNode` resource's status
//! carries it. Field names are snake_case everywhere so that one schema fits all three.
//! docs/disk-agent.md describes every route.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One scan of a node: the disks Cairn may use, and every mount it considered and left out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NodeReport {
    pub disks: Vec<DiskReport>,
    pub excluded: Vec<ExcludedMount>,
    /// Disks the agent used before that are no longer mounted where it found them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<MissingDisk>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MissingDisk {
    pub id: String,
    pub mount: String,
}

/// One filesystem, however many times it is mounted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DiskReport {
    /// Stable identity: the one in the disk's identity file, else derived from the filesystem UUID.
    pub id: String,
    /// Mount source of the canonical mount, e.g. `/dev/nvme0n1p1`.
    pub device: String,
    /// `major:minor` of the canonical mount.
    pub dev: String,
    pub fs_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_uuid: Option<String>,
    /// Where Cairn keeps its files on this disk (`<canonical_mount>/cairn`).
    pub canonical_mount: String,
    /// Every other mount of the same filesystem.
    pub aliases: Vec<MountAlias>,
    /// f_blocks × f_frsize.
    pub total_bytes: u64,
    /// f_bavail × f_frsize: free space usable by unprivileged writers.
    pub available_bytes: u64,
    /// (f_bfree − f_bavail) × f_frsize: blocks the filesystem keeps for root.
    pub fs_reserved_bytes: u64,
    /// Space in use by files that are not Cairn's.
    pub used_by_others_bytes: u64,
    /// Configured space left free on purpose.
    pub headroom_bytes: u64,
    /// Capacity promised to Cairn volumes on this disk.
    pub allocated_bytes: u64,
    /// What CreateVolume may still promise.
    pub allocatable_bytes: u64,
    /// Whether Cairn may create volumes here; false with a reason in `conflict` otherwise.
    pub usable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<String>,
    pub volumes: Vec<VolumeInfo>,
}

/// Another mount point of a disk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MountAlias {
    pub mount: String,
    /// The directory of the filesystem that is mounted there (`/` for the whole filesystem).
    pub root: String,
    pub device: String,
}

/// A mount the agent considered and did not use.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ExcludedMount {
    pub mount: String,
    pub reason: String,
}

/// A volume on one of the node's disks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VolumeInfo {
    pub name: String,
    pub disk: String,
    /// The volume directory, to hand to a datanode.
    pub path: String,
    pub volume_id: String,
    pub partition: u32,
    pub capacity_bytes: u64,
    pub segment_size_bytes: u64,
}

/// `PUT /v1/volumes/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeRequest {
    /// Disk id from the report.
    pub disk: String,
    /// A multiple of `segment_size_bytes`.
    pub capacity_bytes: u64,
    #[serde(default = "default_segment_size")]
    pub segment_size_bytes: u64,
    pub partition: u32,
    /// The node of a cluster's replica; absent for a standalone datanode's volume. With the
    /// calling cluster, it fixes the only name the volume may have ([`cluster_volume_name`],
    /// [`standalone_volume_name`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

pub fn default_segment_size() -> u64 {
    1 << 30
}

/// Answer to CreateVolume: `created` is false when the volume already existed as asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CreateVolumeResponse {
    pub created: bool,
    pub volume: VolumeInfo,
}

/// Answer to DeleteVolume: `deleted` is false when there was no such volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeleteVolumeResponse {
    pub deleted: bool,
}

/// `GET /v1/info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentInfo {
    pub node: String,
    pub version: String,
    pub mountinfo: String,
}

/// `GET /v1/capacity`: the capacity figures of each usable disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DiskCapacity {
    pub id: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub allocated_bytes: u64,
    pub allocatable_bytes: u64,
}

/// The JSON body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// Where the disk agent serves datanodes (mounted into datanode Pods).
pub const NODE_SOCKET: &str = "/run/cairn/disk-agent.sock";
/// Where the disk agent serves the admin (mounted only into the operator's purge Pods).
pub const ADMIN_SOCKET: &str = "/run/cairn-admin/disk-agent.sock";
/// The directory of [`ADMIN_SOCKET`] (the agent makes it 0700).
pub const ADMIN_SOCKET_DIR: &str = "/run/cairn-admin";

/// The header by which a datanode names its cluster on the node socket, next to
/// `Authorization: Bearer <the cluster's disk-agent token>`.
pub const CLUSTER_HEADER: &str = "x-cairn-cluster";

/// The name of the volume that holds `partition` on `node` for `cluster`:
/// `<cluster>-p<partition>-<node>` (a DNS label; the node part shortened to a hash when the whole
/// would pass 63 characters). The node is part of the name so that machines sharing a disk agent
/// (local mode) never clash.
pub fn cluster_volume_name(cluster: &str, partition: u32, node: &str) -> String {
    let base = format!("{cluster}-p{partition}-");
    let node: String =
        node.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    if base.len() + node.len() <= 63 {
        return format!("{base}{node}");
    }
    let hash = node.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("{base}{:08x}", hash as u32)
}

/// The name of a standalone datanode's volume for `partition`: `<prefix>-p<partition>`.
pub fn standalone_volume_name(prefix: &str, partition: u32) -> String {
    format!("{prefix}-p{partition}")
}

/// Volume names: lower-case letters, digits and '-', 1 to 63 characters, starting and ending
/// with a letter or digit (a DNS label, so that names can come from Kubernetes objects).
pub fn validate_volume_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid volume name {name:?}: use 1-63 of [a-z0-9-], starting and ending with [a-z0-9]"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_socket_is_in_its_directory() {
        assert_eq!(std::path::Path::new(ADMIN_SOCKET).parent(), Some(std::path::Path::new(ADMIN_SOCKET_DIR)));
    }

    #[test]
    fn volume_names() {
        for good in ["a", "p0-r1", "0", &"x".repeat(63)] {
            assert!(validate_volume_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a/b", "..", &"x".repeat(64)] {
            assert!(validate_volume_name(bad).is_err(), "{bad}");
        }
    }
}
