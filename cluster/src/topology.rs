//! The cluster's shape, as stored in etcd (one JSON value per key, docs/etcd-layout.md).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `config`: fixed per cluster, except that partitions may be added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub replication_factor: u32,
    /// Replicas that must acknowledge a write (PUT, DELETE, TTL update).
    pub write_quorum: u32,
    pub partitions: u32,
    pub volume_size_bytes: u64,
    pub segment_size_bytes: u64,
}

impl ClusterConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.replication_factor == 0 {
            return Err("replication_factor must be at least 1".into());
        }
        if self.write_quorum == 0 || self.write_quorum > self.replication_factor {
            return Err(format!(
                "write_quorum {} must be between 1 and replication_factor {}",
                self.write_quorum, self.replication_factor
            ));
        }
        if self.partitions == 0 {
            return Err("partitions must be at least 1".into());
        }
        if self.segment_size_bytes == 0 || !self.volume_size_bytes.is_multiple_of(self.segment_size_bytes) {
            return Err(format!(
                "volume_size_bytes {} must be a positive multiple of segment_size_bytes {}",
                self.volume_size_bytes, self.segment_size_bytes
            ));
        }
        if self.volume_size_bytes == 0 {
            return Err("volume_size_bytes must be positive".into());
        }
        Ok(())
    }
}

/// `nodes/<id>`: a machine that may hold replicas, with the disks it offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub id: String,
    #[serde(default)]
    pub zone: String,
    /// host:port of the node's datanode API.
    pub address: String,
    pub disks: Vec<DiskSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub id: String,
    /// Bytes Cairn may use on the disk (the disk agent's allocatable figure).
    pub capacity_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PartitionState {
    /// Takes new blobs.
    #[default]
    Writable,
    /// Serves reads, deletes and TTL updates; no new blobs (e.g. its volumes are full).
    ReadOnly,
    /// Being emptied: no new blobs.
    Draining,
}

impl PartitionState {
    /// As etcd and the API spell it: `writable`, `read_only`, `draining`.
    pub fn as_str(self) -> &'static str {
        match self {
            PartitionState::Writable => "writable",
            PartitionState::ReadOnly => "read_only",
            PartitionState::Draining => "draining",
        }
    }
}

/// `partitions/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionSpec {
    pub id: u32,
    #[serde(default)]
    pub state: PartitionState,
    pub replicas: Vec<ReplicaSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSpec {
    pub node: String,
    pub disk: String,
}

/// `live/<node>`: a running datanode, under a lease (service discovery).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveNode {
    pub node: String,
    pub address: String,
    #[serde(default)]
    pub zone: String,
    pub started_ms: u64,
    /// Free bytes of each replica on the node, by partition (refreshed every few seconds), so
    /// that writers can prefer partitions with room.
    #[serde(default)]
    pub free_bytes: BTreeMap<u32, u64>,
}

/// Everything but the live registrations.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Topology {
    pub config: Option<ClusterConfig>,
    pub nodes: BTreeMap<String, NodeSpec>,
    pub partitions: BTreeMap<u32, PartitionSpec>,
}

impl Topology {
    /// The name of the volume that holds `partition` on `node`: `<cluster>-p<partition>-<node>`
    /// (a DNS label; the node part shortened to a hash when the whole would pass 63 characters).
    /// The node is part of the name so that machines sharing a disk agent (local mode) never clash.
    pub fn volume_name(cluster: &str, partition: u32, node: &str) -> String {
        let base = format!("{cluster}-p{partition}-");
        let node: String =
            node.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
        if base.len() + node.len() <= 63 {
            return format!("{base}{node}");
        }
        let hash = node.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        format!("{base}{:08x}", hash as u32)
    }

    /// Whether a volume name is one of `cluster`'s (`<cluster>-p<digits>` then nothing or `-…`).
    pub fn is_volume_of(cluster: &str, name: &str) -> bool {
        let Some(rest) = name.strip_prefix(cluster).and_then(|r| r.strip_prefix("-p")) else { return false };
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        digits > 0 && (rest.len() == digits || rest[digits..].starts_with('-'))
    }

    /// Partitions with a replica on `node`.
    pub fn partitions_of<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a PartitionSpec> + 'a {
        self.partitions.values().filter(move |p| p.replicas.iter().any(|r| r.node == node))
    }
}

/// `cluster.yaml` for `cairn topology apply`: a static list of nodes and disks.
///
/// ```yaml
/// replication_factor: 3
/// write_quorum: 2
/// partitions: 8
/// volume_size: 1GiB
/// segment_size: 64MiB
/// nodes:
///   - id: n1
///     zone: a
///     address: 10.0.0.1:7480
///     disks: [{id: d1, capacity: 100GiB}]
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyFile {
    pub replication_factor: u32,
    pub write_quorum: u32,
    pub partitions: u32,
    pub volume_size: bytesize::ByteSize,
    pub segment_size: bytesize::ByteSize,
    pub nodes: Vec<NodeFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    pub id: String,
    #[serde(default)]
    pub zone: String,
    pub address: String,
    pub disks: Vec<DiskFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskFile {
    pub id: String,
    pub capacity: bytesize::ByteSize,
}

impl TopologyFile {
    pub fn parse(text: &str) -> Result<(ClusterConfig, Vec<NodeSpec>), String> {
        let file: Self = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let config = ClusterConfig {
            replication_factor: file.replication_factor,
            write_quorum: file.write_quorum,
            partitions: file.partitions,
            volume_size_bytes: file.volume_size.as_u64(),
            segment_size_bytes: file.segment_size.as_u64(),
        };
        config.validate()?;
        let mut ids = std::collections::BTreeSet::new();
        let nodes = file
            .nodes
            .into_iter()
            .map(|n| {
                if !ids.insert(n.id.clone()) {
                    return Err(format!("node {} is listed twice", n.id));
                }
                Ok(NodeSpec {
                    id: n.id,
                    zone: n.zone,
                    address: n.address,
                    disks: n
                        .disks
                        .into_iter()
                        .map(|d| DiskSpec { id: d.id, capacity_bytes: d.capacity.as_u64() })
                        .collect(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok((config, nodes))
    }
}

#[cfg(test)]
mod tests {
    use super::PartitionState;

    #[test]
    fn partition_state_names_are_its_serde_names() {
        for state in [PartitionState::Writable, PartitionState::ReadOnly, PartitionState::Draining] {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
    }

    use super::*;

    #[test]
    fn volume_names_are_dns_labels_and_belong_to_their_cluster() {
        assert_eq!(Topology::volume_name("c1", 7, "node-A.example"), "c1-p7-node-a-example");
        let long = Topology::volume_name("blobs", 12, &"x".repeat(80));
        assert!(long.len() <= 63 && long.starts_with("blobs-p12-"), "{long}");
        assert!(Topology::is_volume_of("c1", "c1-p7-n0"));
        assert!(Topology::is_volume_of("c1", "c1-p7"));
        assert!(!Topology::is_volume_of("c1", "c1-px"));
        assert!(!Topology::is_volume_of("a", "a-pp-p0-n0"), "cluster a-pp's volume is not a's");
        assert!(!Topology::is_volume_of("c1", "c12-p0-n0"));
    }
}
