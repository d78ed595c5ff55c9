//! Cairn's Kubernetes resources, group `cairn.dev`, version `v1alpha1`.
//!
//! The CustomResourceDefinitions in crds/ are generated from these types by `crdgen`
//! (`cargo run -p cairn-operator --bin cairn-operator -- crdgen crds`); a test fails when crds/ is stale.

pub mod store_cluster;
pub mod store_node;

pub use store_cluster::{DeletionPolicy, StoreCluster, StoreClusterSpec, StoreClusterStatus};
pub use store_node::{StoreNode, StoreNodeSpec, StoreNodeStatus};

use kube::CustomResourceExt;

/// Every CRD, as (file name, YAML).
pub fn crds() -> Vec<(&'static str, String)> {
    let yaml = |crd| serde_yaml::to_string(&crd).expect("CRD serializes");
    vec![
        ("storeclusters.cairn.dev.yaml", yaml(StoreCluster::crd())),
        ("storenodes.cairn.dev.yaml", yaml(StoreNode::crd())),
    ]
}
