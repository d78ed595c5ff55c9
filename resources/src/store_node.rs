//! `StoreNode`: one per Kubernetes node, written by the disk agent that runs there.

use cairn_common::agent_api::{DiskReport, ExcludedMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The disks of one node as its disk agent sees them. The agent owns the whole object: users read it.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cairn.dev",
    version = "v1alpha1",
    kind = "StoreNode",
    plural = "storenodes",
    shortname = "sn",
    status = "StoreNodeStatus",
    derive = "Default",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Disks","type":"integer","jsonPath":".status.diskCount"}"#,
    printcolumn = r#"{"name":"Excluded","type":"integer","jsonPath":".status.excludedCount"}"#,
    printcolumn = r#"{"name":"Allocatable","type":"string","jsonPath":".status.allocatable"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct StoreNodeSpec {
    /// The Kubernetes node this object describes.
    pub node_name: String,
}

/// Top-level fields follow Kubernetes conventions (camelCase, `observedGeneration`, conditions)
/// so that kubectl, Argo CD and Flux read them; each disk and excluded mount is the agent's
/// report entry exactly as `cairn-disk-agent scan -o json` prints it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreNodeStatus {
    /// Ready: the agent scanned and has at least one usable disk. DiskConflict: a disk was
    /// refused because its identity file disagrees with what was recorded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub disks: Vec<DiskReport>,
    #[serde(default)]
    pub excluded: Vec<ExcludedMount>,
    /// Summaries for `kubectl get storenodes`.
    #[serde(default)]
    pub disk_count: u32,
    #[serde(default)]
    pub excluded_count: u32,
    /// Sum of the usable disks' allocatable bytes, human-readable (e.g. "1.8 TiB").
    #[serde(default)]
    pub allocatable: String,
}
