//! `StoreCluster`: a Cairn cluster as users declare it; the operator reconciles it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A Cairn cluster: which machines run datanodes, which disks they use, and how data is replicated.
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "cairn.dev",
    version = "v1alpha1",
    kind = "StoreCluster",
    plural = "storeclusters",
    shortname = "sc",
    namespaced,
    status = "StoreClusterStatus",
    derive = "PartialEq",
    validation = Rule::new("self.spec.deletionPolicy != 'Delete' || (has(self.spec.confirmDelete) && self.spec.confirmDelete == self.metadata.name)")
        .message("deletionPolicy Delete needs confirmDelete set to the cluster's name"),
    // The name becomes Service names (`<name>`, `<name>-nodes`: DNS-1035 labels), label values and
    // volume names (`<name>-p<N>-<node>`, at most 63 characters).
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 40")
        .message("the name must be a DNS-1035 label of at most 40 characters (lower-case letters, digits, '-', starting with a letter)"),
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Nodes","type":"string","jsonPath":".status.nodesSummary"}"#,
    printcolumn = r#"{"name":"Partitions","type":"integer","jsonPath":".status.partitions.total"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    cel,
    validation = Rule::new("self.writeQuorum <= self.replicationFactor").message("writeQuorum must not exceed replicationFactor"),
    validation = Rule::new("!isQuantity(self.segmentSize) || quantity(self.segmentSize).compareTo(quantity('1Mi')) >= 0")
        .message("segmentSize must be at least 1Mi"),
    validation = Rule::new("!isQuantity(self.volumeSize) || !isQuantity(self.segmentSize) || quantity(self.volumeSize).compareTo(quantity(self.segmentSize)) >= 0")
        .message("volumeSize must hold at least one segment (volumeSize >= segmentSize)"),
    validation = Rule::new("!has(self.maxBlobSize) || !isQuantity(self.maxBlobSize) || !isQuantity(self.segmentSize) || quantity(self.segmentSize).compareTo(quantity(self.maxBlobSize).add(quantity('64Ki'))) >= 0")
        .message("maxBlobSize must fit in a segment with its record's overhead (segmentSize >= maxBlobSize + 64Ki)")
)]
#[serde(rename_all = "camelCase")]
pub struct StoreClusterSpec {
    /// Datanode image.
    pub image: String,
    /// Labels a machine must carry to run a datanode.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node label that names a machine's zone.
    #[serde(default = "default_zone_key")]
    pub zone_topology_key: String,
    /// Which of a machine's disks (as its StoreNode reports them) hold volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_selector: Option<DiskSelectorSpec>,
    /// Capacity of each volume (one partition replica), e.g. 64Gi. Fixed once set.
    #[x_kube(validation = Rule::new("self == oldSelf").message("volumeSize is immutable"))]
    #[x_kube(validation = Rule::new("isQuantity(self)").message("volumeSize must be a quantity, e.g. 64Gi"))]
    pub volume_size: String,
    /// Log segment size inside volumes, e.g. 1Gi; divides volumeSize. Fixed once set.
    #[x_kube(validation = Rule::new("self == oldSelf").message("segmentSize is immutable"))]
    #[x_kube(validation = Rule::new("isQuantity(self)").message("segmentSize must be a quantity, e.g. 1Gi"))]
    pub segment_size: String,
    /// The largest blob the cluster accepts, e.g. 64Mi (default: 64Mi, or what a segment holds
    /// if less). Every datanode applies the same limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).compareTo(quantity('1')) >= 0 && quantity(self).compareTo(quantity('4Gi')) <= 0").message("maxBlobSize must be a quantity from 1 to 4Gi"))]
    pub max_blob_size: Option<String>,
    /// Who may call the blob API: `Keys` (default; access keys with scopes, see
    /// docs/security.md) or `None` (anyone who can reach a datanode: a playground only).
    #[serde(default)]
    pub auth: ClusterAuth,
    /// The datanodes' NetworkPolicy (the operator makes one per cluster): who may reach the blob
    /// API. The replica port is for the cluster's datanodes only, whatever this says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicySpec>,
    /// HTTPS on the blob API (port 7480). Present: every datanode serves it, with a certificate
    /// the operator issues from the cluster's CA (for the Service `<name>.<namespace>.svc`, the
    /// datanode's own name and `extraNames`), or the one in `secretName`. Absent: plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<BlobTlsSpec>,
    /// The S3-compatible API (docs/s3.md). Present: every datanode serves it on port 7680 (HTTPS
    /// when `tls` is set), the cluster's Services carry it as port `s3`, and StoreAccessKeys'
    /// Secrets get AWS_ENDPOINT_URL_S3. Absent: no S3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Spec>,
    /// Namespaces besides the cluster's own whose StoreAccessKeys may make keys to it (never
    /// `admin` keys): where its applications run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_key_namespaces: Vec<String>,
    #[serde(default = "default_replication")]
    #[schemars(range(min = 1, max = 7))]
    pub replication_factor: u32,
    #[serde(default = "default_quorum")]
    #[schemars(range(min = 1, max = 7))]
    pub write_quorum: u32,
    /// Writable partitions to keep per usable disk, while space allows.
    #[serde(default = "default_partitions_per_disk")]
    #[schemars(range(min = 1, max = 1024))]
    pub partitions_per_disk: u32,
    /// Space kept free on every disk: a percentage ("5%") or a size ("20Gi").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headroom: Option<String>,
    pub etcd: EtcdSpec,
    /// Resources of each datanode container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// PriorityClass of the datanode Pods (the chart installs `cairn-datanode`), so that a datanode
    /// deleted for an upgrade finds its room on its machine again, and is not the first preempted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// What deleting the StoreCluster does to the data: Retain (default) keeps topology and volumes.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Must equal the cluster's name for deletionPolicy Delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm_delete: Option<String>,
    /// Stop reconciling (nothing is changed while true).
    #[serde(default)]
    pub paused: bool,
    /// How long a machine may be NotReady before its replicas are placed on the others (as a
    /// drain, each new replica filled from its peers), e.g. `30m`, `2h`; `never` keeps waiting.
    /// Default 30m. Its volumes are removed only once it is back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == 'never' || self.matches('^[0-9]+(s|m|h)$')").message("replaceDownMachinesAfter is a duration like 30m or 2h, or never"))]
    pub replace_down_machines_after: Option<String>,
    /// A replica that has owed a peer's journal entries (entries it could not apply, retried
    /// with back-off) for longer than this makes the cluster Degraded (`ReplicationStalled`), with
    /// the entry and its error. Default 10m; `never` only reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == 'never' || self.matches('^[0-9]+(s|m|h)$')").message("replicationStalledAfter is a duration like 10m or 1h, or never"))]
    pub replication_stalled_after: Option<String>,
}

/// `30s`, `10m`, `2h` as a duration; `never` (or something else): `None`.
fn duration(text: &str) -> Option<std::time::Duration> {
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = number.parse().ok()?;
    Some(std::time::Duration::from_secs(match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return None,
    }))
}

impl StoreClusterSpec {
    /// [`replace_down_machines_after`](Self::replace_down_machines_after) as a duration; `None`: never.
    pub fn down_machine_grace(&self) -> Option<std::time::Duration> {
        duration(self.replace_down_machines_after.as_deref().unwrap_or("30m"))
    }

    /// [`replication_stalled_after`](Self::replication_stalled_after) as a duration; `None`: never.
    pub fn replication_stall_grace(&self) -> Option<std::time::Duration> {
        duration(self.replication_stalled_after.as_deref().unwrap_or("10m"))
    }
}

fn default_zone_key() -> String {
    "topology.kubernetes.io/zone".into()
}
fn default_replication() -> u32 {
    3
}
fn default_quorum() -> u32 {
    2
}
fn default_partitions_per_disk() -> u32 {
    4
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskSelectorSpec {
    /// Globs on the disk's canonical mount path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fs_types: Vec<String>,
    /// Globs on the device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// Smallest disk to use, e.g. 100Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_size: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Who may reach the blob API (port 7480), as NetworkPolicy peers (pod and namespace
    /// selectors, IP blocks). Empty (the default): anyone. The operator's own Pods are always
    /// let in (it reads the datanodes' admin routes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blob_clients: Vec<k8s_openapi::api::networking::v1::NetworkPolicyPeer>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Spec {
    /// The region clients sign requests for (and GetBucketLocation answers); default us-east-1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32), regex(pattern = r"^[a-z0-9][a-z0-9-]*$"))]
    pub region: Option<String>,
    /// Virtual-host-style addressing: a request to `<bucket>.<domain>` names the bucket (route
    /// `*.<domain>` to the Service; path-style always works).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub domain: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlobTlsSpec {
    /// A `kubernetes.io/tls` Secret in the cluster's namespace (cert-manager's, or your own):
    /// `tls.crt` (chain, naming `<name>.<namespace>.svc`), `tls.key`, and `ca.crt` when the chain's
    /// root is not in `tls.crt`. Every datanode serves it; a renewed Secret is served within
    /// about a minute, without restarts. Unset: the operator issues the certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// More DNS names for the certificates the operator issues (an Ingress host, say).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub extra_names: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EtcdSpec {
    #[schemars(length(min = 1))]
    pub endpoints: Vec<String>,
    /// Secret with `ca.crt`, `tls.crt`, `tls.key` for a TLS etcd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum ClusterAuth {
    #[default]
    Keys,
    None,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum DeletionPolicy {
    #[default]
    Retain,
    Delete,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreClusterStatus {
    /// Ready, Progressing, Degraded (and Reconciling / Stalled for kstatus readers).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// For humans: Pending, Creating, Ready, Degraded, Paused, Deleting.
    #[serde(default)]
    pub phase: String,
    #[serde(default)]
    pub nodes_ready: u32,
    #[serde(default)]
    pub nodes_total: u32,
    /// "ready/total", for the printer column.
    #[serde(default)]
    pub nodes_summary: String,
    /// Disk space (what the volumes hold is read from the datanodes by `cairn status`: it
    /// changes with every write, and the status is written only when something else changes).
    #[serde(default)]
    pub capacity: CapacityStatus,
    #[serde(default)]
    pub partitions: PartitionCounts,
    /// The topology's revision: the newest mod_revision of its keys in etcd (datanode
    /// registrations do not move it).
    #[serde(default)]
    pub topology_revision: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CapacityStatus {
    /// Space of the usable disks allocated to Cairn volumes (preallocated: it is taken on the
    /// disks whatever the volumes hold).
    #[serde(default)]
    pub allocated_bytes: u64,
    /// What the usable disks can still allocate to new volumes.
    #[serde(default)]
    pub allocatable_bytes: u64,
    /// Size of the usable disks.
    #[serde(default)]
    pub total_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionCounts {
    pub total: u32,
    pub writable: u32,
    pub read_only: u32,
    pub under_replicated: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(spec: serde_json::Value) -> StoreCluster {
        let mut base = serde_json::json!({
            "image": "cairn:1", "volumeSize": "64Gi", "segmentSize": "1Gi", "etcd": {"endpoints": ["http://e:2379"]}
        });
        base.as_object_mut().unwrap().extend(spec.as_object().unwrap().clone());
        StoreCluster::new("blobs", serde_json::from_value(base).unwrap())
    }

    #[test]
    fn down_machine_grace_reads_durations() {
        let grace = |text: Option<&str>| {
            let mut sc = cluster(serde_json::json!({}));
            sc.spec.replace_down_machines_after = text.map(String::from);
            sc.spec.down_machine_grace()
        };
        use std::time::Duration;
        assert_eq!(grace(None), Some(Duration::from_secs(1800)), "30m by default");
        assert_eq!(grace(Some("90s")), Some(Duration::from_secs(90)));
        assert_eq!(grace(Some("2h")), Some(Duration::from_secs(7200)));
        assert_eq!(grace(Some("never")), None);
        let mut sc = cluster(serde_json::json!({}));
        assert_eq!(sc.spec.replication_stall_grace(), Some(Duration::from_secs(600)), "10m by default");
        sc.spec.replication_stalled_after = Some("45s".into());
        assert_eq!(sc.spec.replication_stall_grace(), Some(Duration::from_secs(45)));
    }

    /// The CRD's CEL rules, run by kube's client-side CEL validator (the same rules a real API
    /// server runs on create and update).
    #[test]
    fn cel_rules_refuse_a_geometry_no_datanode_could_open() {
        let ok = |spec: serde_json::Value| kube::core::cel::validate_cel(&cluster(spec));
        ok(serde_json::json!({})).unwrap();
        for bad in ["1blobs", "Blobs", "blobs.example", "b-", &"b".repeat(41)] {
            let mut named = cluster(serde_json::json!({}));
            named.metadata.name = Some(bad.to_string());
            let err = kube::core::cel::validate_cel(&named).expect_err(bad).to_string();
            assert!(err.contains("DNS-1035 label"), "{bad}: {err}");
        }
        ok(serde_json::json!({"maxBlobSize": "64Mi"})).unwrap();
        ok(serde_json::json!({"volumeSize": "1Gi", "segmentSize": "1Gi"})).unwrap();
        for (spec, message) in [
            (serde_json::json!({"segmentSize": "512Ki"}), "segmentSize must be at least 1Mi"),
            (serde_json::json!({"volumeSize": "512Mi"}), "volumeSize must hold at least one segment"),
            (serde_json::json!({"segmentSize": "8Mi", "maxBlobSize": "8Mi"}), "maxBlobSize must fit in a segment"),
            (serde_json::json!({"maxBlobSize": "8Gi"}), "maxBlobSize must be a quantity from 1 to 4Gi"),
            (serde_json::json!({"volumeSize": "lots"}), "volumeSize must be a quantity"),
            (serde_json::json!({"writeQuorum": 3, "replicationFactor": 2}), "writeQuorum must not exceed"),
        ] {
            let err = ok(spec.clone()).expect_err(message).to_string();
            assert!(err.contains(message), "{spec}: {err}");
        }
    }
}
