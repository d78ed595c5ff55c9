//! Cairn's Kubernetes resources (StoreCluster, StoreNode, StoreAccessKey), group `cairn.dev`, version `v1alpha1`.
//!
//! The CustomResourceDefinitions in crds/ are generated from these types by `crdgen`
//! (`cargo run -p cairn-operator --bin cairn-operator -- crdgen crds`); a test fails when crds/ is stale.

pub mod store_access_key;
pub mod store_cluster;
pub mod store_node;

pub use store_access_key::{ClusterRef, StoreAccessKey, StoreAccessKeySpec, StoreAccessKeyStatus};
pub use store_cluster::{DeletionPolicy, StoreCluster, StoreClusterSpec, StoreClusterStatus};
pub use store_node::{StoreNode, StoreNodeSpec, StoreNodeStatus};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResourceExt;

/// A condition that keeps its lastTransitionTime from `previous` while its status stays the same,
/// so that an unchanged state produces an identical status (and no write).
pub fn condition(
    previous: &[Condition],
    type_: &str,
    on: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    let status = if on { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now()));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// Every CRD, as (file name, YAML).
pub fn crds() -> Vec<(&'static str, String)> {
    let yaml = |crd| serde_yaml::to_string(&crd).expect("CRD serializes");
    vec![
        ("storeclusters.cairn.dev.yaml", yaml(StoreCluster::crd())),
        ("storenodes.cairn.dev.yaml", yaml(StoreNode::crd())),
        ("storeaccesskeys.cairn.dev.yaml", yaml(StoreAccessKey::crd())),
    ]
}
