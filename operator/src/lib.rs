//! cairn-operator: reconciles StoreCluster resources into an etcd topology and datanodes.
//!
//! - [`desired`]: the platform-agnostic core (config and nodes from spec and inventories).
//! - [`kubernetes`]: machines from Nodes/StoreNodes; Pods, Services, ConfigMap, PDB.
//! - [`reconcile`]: the reconcile function, status, finalizer.

pub mod desired;
pub mod kubernetes;
pub mod reconcile;
