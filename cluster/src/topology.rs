//! The cluster's shape, as stored in etcd (one JSON value per key, docs/etcd-layout.md).

use std::collections::BTreeMap;

use cairn_common::volume_layout::{check_geometry, largest_blob_for_segment, DEFAULT_MAX_BLOB_SIZE};
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
    /// The largest blob the cluster accepts, the same on every datanode (a router must never
    /// accept what a replica would refuse). Unset: [`DEFAULT_MAX_BLOB_SIZE`], or what a segment
    /// holds if less.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_blob_size_bytes: Option<u64>,
    /// Who may call the blob API: access keys (the default), or anyone (`none`, for a
    /// playground only). Replica routes always need the cluster's node token.
    #[serde(default, skip_serializing_if = "AuthMode::is_keys")]
    pub auth: AuthMode,
    /// The blob API speaks HTTPS: who vouches for the datanodes' certificates, and the name they
    /// carry, for the operator's and `cairn status`'s calls to them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob_tls: Option<BlobTls>,
}

/// How a cluster's blob API certificates are verified: against `ca_pem` (one or more PEM
/// certificates), for the name `server_name` (every datanode's certificate carries it: the
/// cluster's Service), whatever address a datanode is reached at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlobTls {
    pub ca_pem: String,
    pub server_name: String,
}

/// Who may call a cluster's (or a standalone node's) blob API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// A bearer token of an access key with the scope the request needs.
    #[default]
    Keys,
    /// Anyone who can reach the node: for a laptop, never for data that matters.
    None,
}

impl AuthMode {
    pub fn is_keys(&self) -> bool {
        *self == AuthMode::Keys
    }
}

/// Partitions a cluster may have: each costs every replica a volume and the planner memory.
pub const MAX_PARTITIONS: u32 = 100_000;
/// Replicas of a partition at most.
pub const MAX_REPLICATION_FACTOR: u32 = 7;

impl ClusterConfig {
    /// The largest blob this cluster accepts.
    pub fn max_blob_bytes(&self) -> u64 {
        self.max_blob_size_bytes
            .unwrap_or_else(|| DEFAULT_MAX_BLOB_SIZE.min(largest_blob_for_segment(self.segment_size_bytes)))
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.replication_factor == 0 || self.replication_factor > MAX_REPLICATION_FACTOR {
            return Err(format!(
                "replication_factor must be from 1 to {MAX_REPLICATION_FACTOR}, got {}",
                self.replication_factor
            ));
        }
        if self.write_quorum == 0 || self.write_quorum > self.replication_factor {
            return Err(format!(
                "write_quorum {} must be between 1 and replication_factor {}",
                self.write_quorum, self.replication_factor
            ));
        }
        if self.partitions == 0 || self.partitions > MAX_PARTITIONS {
            return Err(format!("partitions must be from 1 to {MAX_PARTITIONS}, got {}", self.partitions));
        }
        if self.max_blob_size_bytes == Some(0) {
            return Err("max_blob_size must be at least 1 byte".into());
        }
        check_geometry(self.volume_size_bytes, self.segment_size_bytes, self.max_blob_bytes().max(1))
            .map_err(|e| e.to_string())
    }
}

/// Node and disk ids become etcd keys, volume names and directory names: letters, digits,
/// `.`, `_` and `-`, starting with a letter or digit, at most 253 characters (a Kubernetes node
/// name fits), never `..`.
pub fn validate_id(what: &str, id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 253
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && !id.contains("..");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {id:?} is not a valid id: use letters, digits, '.', '_' and '-', starting with a letter or digit, \
             at most 253 characters"
        ))
    }
}

/// `host:port`, the host a DNS name, an IPv4 address or a bracketed IPv6 address.
pub fn validate_address(address: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("address {address:?} is not host:port ({why})"));
    if address.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = address.rsplit_once(':') else { return bad("no port") };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return bad("the port must be a number from 1 to 65535"),
    }
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if host_ok {
        Ok(())
    } else {
        bad("the host must be a DNS name or an IP address")
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveNode {
    pub node: String,
    pub address: String,
    /// Where its peers reach its replica routes, when they are on a port of their own
    /// (`--peer-listen`); otherwise at `address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_address: Option<String>,
    /// Whether the peer port speaks mutual TLS (`https://`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub peer_tls: bool,
    /// Whether the blob API at `address` speaks HTTPS.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
    #[serde(default)]
    pub zone: String,
    pub started_ms: u64,
    /// Free bytes of each replica on the node, by partition (refreshed every few seconds), so
    /// that writers can prefer partitions with room.
    #[serde(default)]
    pub free_bytes: BTreeMap<u32, u64>,
    /// Replicas assigned to the node that it cannot open, by partition, with the reason (it keeps
    /// trying); the operator reports them as Degraded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unopened: BTreeMap<u32, String>,
}

/// Everything but the live registrations.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Topology {
    pub config: Option<ClusterConfig>,
    pub nodes: BTreeMap<String, NodeSpec>,
    pub partitions: BTreeMap<u32, PartitionSpec>,
    /// Replicas a completed move dropped, whose volumes are still to be removed, by
    /// [`RetiredReplica::key`]. Only these volumes are ever removed from a node that stays: a
    /// volume the topology merely does not mention (a topology rewritten by hand, or etcd
    /// restored from an old backup) is kept.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub retired: BTreeMap<String, RetiredReplica>,
}

/// `retired/<partition>/<node>`: a replica a completed move dropped (its replacement had caught
/// up), written in the same transaction that dropped it; deleted once its volume is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetiredReplica {
    pub partition: u32,
    pub node: String,
    pub disk: String,
    /// When the move completed (ms since the epoch).
    pub retired_ms: u64,
}

impl RetiredReplica {
    pub fn key(partition: u32, node: &str) -> String {
        format!("{partition:08}/{node}")
    }
}

impl Topology {
    /// The name of the volume that holds `partition` on `node` ([`cairn_common::agent_api::cluster_volume_name`]).
    pub fn volume_name(cluster: &str, partition: u32, node: &str) -> String {
        cairn_common::agent_api::cluster_volume_name(cluster, partition, node)
    }

    /// Whether `name` is the volume of one of `cluster`'s replicas on `node`: exactly
    /// [`Topology::volume_name`] for some partition. Exact, so that cluster `a` never claims
    /// `a-p1-p0-n1`, a volume of cluster `a-p1`.
    pub fn is_volume_of(cluster: &str, node: &str, name: &str) -> bool {
        Self::partition_of_volume(cluster, name).is_some_and(|p| Self::volume_name(cluster, p, node) == name)
    }

    /// The partition in a name that starts `<cluster>-p<digits>` (then `-` or nothing).
    fn partition_of_volume(cluster: &str, name: &str) -> Option<u32> {
        let rest = name.strip_prefix(cluster)?.strip_prefix("-p")?;
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        let partition = rest[..digits].parse().ok()?;
        (rest.len() == digits || rest[digits..].starts_with('-')).then_some(partition)
    }

    /// Whether `name` is a volume a standalone datanode made with this prefix: `<prefix>-p<digits>`.
    pub fn is_standalone_volume(prefix: &str, name: &str) -> bool {
        Self::partition_of_volume(prefix, name)
            .is_some_and(|p| name == cairn_common::agent_api::standalone_volume_name(prefix, p))
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
    /// The largest blob (default: 64 MiB, or what a segment holds if less).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_blob_size: Option<bytesize::ByteSize>,
    /// `keys` (default): the blob API needs access keys; `none`: anyone (a playground).
    #[serde(default)]
    pub auth: AuthMode,
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
            blob_tls: None,
            replication_factor: file.replication_factor,
            write_quorum: file.write_quorum,
            partitions: file.partitions,
            volume_size_bytes: file.volume_size.as_u64(),
            segment_size_bytes: file.segment_size.as_u64(),
            max_blob_size_bytes: file.max_blob_size.map(|s| s.as_u64()),
            auth: file.auth,
        };
        config.validate()?;
        let mut ids = std::collections::BTreeSet::new();
        let mut disk_owners: BTreeMap<String, String> = BTreeMap::new();
        let nodes = file
            .nodes
            .into_iter()
            .map(|n| {
                validate_id("node id", &n.id)?;
                if !ids.insert(n.id.clone()) {
                    return Err(format!("node {} is listed twice", n.id));
                }
                validate_address(&n.address).map_err(|e| format!("node {}: {e}", n.id))?;
                if n.zone.len() > 63
                    || !n.zone.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
                {
                    return Err(format!(
                        "node {}: zone {:?} must be at most 63 letters, digits, '.', '_' or '-'",
                        n.id, n.zone
                    ));
                }
                if n.disks.is_empty() {
                    return Err(format!("node {} lists no disks", n.id));
                }
                for d in &n.disks {
                    validate_id("disk id", &d.id).map_err(|e| format!("node {}: {e}", n.id))?;
                    if let Some(other) = disk_owners.insert(d.id.clone(), n.id.clone()) {
                        return Err(if other == n.id {
                            format!("node {}: disk {} is listed twice", n.id, d.id)
                        } else {
                            format!("disk {} is listed on nodes {other} and {}: a disk belongs to one node", d.id, n.id)
                        });
                    }
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
        assert!(Topology::is_volume_of("c1", "n0", "c1-p7-n0"));
        assert!(!Topology::is_volume_of("c1", "n1", "c1-p7-n0"), "another node's");
        assert!(!Topology::is_volume_of("c1", "n0", "c1-px-n0"));
        assert!(!Topology::is_volume_of("a", "n1", "a-p1-p0-n1"), "cluster a-p1's volume is not a's");
        assert!(Topology::is_volume_of("a-p1", "n1", "a-p1-p0-n1"));
        assert!(!Topology::is_volume_of("c1", "n0", "c12-p0-n0"));
        let node = "x".repeat(80);
        assert!(Topology::is_volume_of("blobs", &node, &Topology::volume_name("blobs", 12, &node)), "hashed names");
        assert!(Topology::is_standalone_volume("datanode", "datanode-p3"));
        assert!(!Topology::is_standalone_volume("datanode", "datanode-p3-n1"));
        assert!(!Topology::is_standalone_volume("a", "a-p1-p0"));
    }

    fn topology_file(partitions: &str, segment: &str, max_blob: Option<&str>, nodes: &str) -> String {
        let max_blob = max_blob.map(|m| format!("max_blob_size: {m}\n")).unwrap_or_default();
        format!(
            "replication_factor: 3\nwrite_quorum: 2\npartitions: {partitions}\nvolume_size: 64MiB\n\
             segment_size: {segment}\n{max_blob}nodes:\n{nodes}"
        )
    }

    fn node(id: &str, address: &str, disk: &str) -> String {
        format!("  - id: \"{id}\"\n    address: \"{address}\"\n    disks: [{{id: \"{disk}\", capacity: 1GiB}}]\n")
    }

    #[test]
    fn topology_files_with_bad_values_are_refused_with_the_reason() {
        let good = [
            node("n1", "10.0.0.1:7480", "d1"),
            node("n2.example", "host-2.example:7480", "d2"),
            node("n3", "[::1]:7480", "d3"),
        ]
        .concat();
        let (config, nodes) = TopologyFile::parse(&topology_file("8", "8MiB", None, &good)).unwrap();
        assert_eq!(nodes.len(), 3);
        assert_eq!(config.max_blob_bytes(), largest_blob_for_segment(8 << 20), "default: what a segment holds");
        let big = ClusterConfig { segment_size_bytes: 256 << 20, volume_size_bytes: 1 << 30, ..config.clone() };
        assert_eq!(big.max_blob_bytes(), DEFAULT_MAX_BLOB_SIZE);
        big.validate().unwrap();

        let refused = |text: String, needle: &str| {
            let err = TopologyFile::parse(&text).expect_err(needle);
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        };
        refused(topology_file("4294967295", "8MiB", None, &good), "partitions must be from 1 to 100000");
        refused(topology_file("0", "8MiB", None, &good), "partitions must be from 1");
        refused(topology_file("8", "8MiB", Some("8MiB"), &good), "segments of 8388608 bytes hold blobs of at most");
        refused(topology_file("8", "128MiB", None, &good), "volume size 67108864 must be a whole number");
        refused(topology_file("8", "3MiB", None, &good), "must be a whole number");
        refused(topology_file("8", "32KiB", None, &good), "below the minimum");
        for bad_id in ["../../x", "a/b", "", ".hidden", "x y", &"n".repeat(254)] {
            refused(
                topology_file("8", "8MiB", None, &[node(bad_id, "h:1", "d1"), good.clone()].concat()),
                "is not a valid id",
            );
        }
        refused(topology_file("8", "8MiB", None, &[good.clone(), node("n4", "h:1", "../d")].concat()), "disk id");
        refused(
            topology_file("8", "8MiB", None, &[good.clone(), node("n4", "h:1", "d1")].concat()),
            "disk d1 is listed on nodes n1 and n4",
        );
        refused(topology_file("8", "8MiB", None, &[good.clone(), node("n1", "h:1", "d9")].concat()), "listed twice");
        for bad_address in ["nohost", "h:0", "h:70000", "h:port", ":7480", "bad_host:1", "-x.example:1", "a..b:1"] {
            refused(
                topology_file("8", "8MiB", None, &[good.clone(), node("n4", bad_address, "d4")].concat()),
                "is not host:port",
            );
        }
    }

    #[test]
    fn the_example_topology_file_is_valid() {
        let text = include_str!("../../examples/cluster.yaml");
        let (config, nodes) = TopologyFile::parse(text).unwrap();
        assert_eq!((config.replication_factor, nodes.len()), (3, 3));
    }
}
