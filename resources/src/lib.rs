//! Cairn's Kubernetes resources, group `cairn.dev`, version `v1alpha1`.
//!
//! The CustomResourceDefinitions in crds/ are generated from these types by `crdgen`
//! (`cargo run -p cairn-resources --bin crdgen -- crds/`); a test fails when crds/ is stale.

pub mod store_node;

pub use store_node::{StoreNode, StoreNodeSpec, StoreNodeStatus};

use kube::CustomResourceExt;

/// Every CRD, as (file name, YAML).
pub fn crds() -> Vec<(&'static str, String)> {
    let yaml = |crd| serde_yaml::to_string(&crd).expect("CRD serializes");
    vec![("storenodes.cairn.dev.yaml", yaml(StoreNode::crd()))]
}
