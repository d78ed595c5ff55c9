//! cairn-operator: reconciles StoreCluster resources into an etcd topology and datanodes.
//!
//! - [`desired`]: the platform-agnostic core (config and nodes from spec and inventories).
//! - [`kubernetes`]: machines from Nodes/StoreNodes; Pods, Services, ConfigMap, PDB.
//! - [`platform`]: the platform-agnostic reconcile pass and the interface platforms implement.
//! - [`local`]: the Local platform: datanode processes on this machine.
//! - [`local_up`]: `cairn local up`, a whole cluster on this machine.
//! - [`leader`]: leader election on a Lease.
//! - [`inspect`]: what `cairn status`, `cairn disks` and `cairn topology` read and print.
//! - [`reconcile`]: the Kubernetes controller's reconcile function, status, finalizer.
//! - [`access_keys`]: the StoreAccessKey controller (a key in etcd, its token in a Secret).
//! - [`status`]: a StoreCluster's status and Events from one pass (both platforms).

pub mod access_keys;
pub mod desired;
pub mod inspect;
pub mod kubernetes;
pub mod leader;
pub mod local;
pub mod local_up;
pub mod peer_certs;
pub mod platform;
pub mod reconcile;
pub mod status;
