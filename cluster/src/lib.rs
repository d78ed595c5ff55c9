//! Cairn's cluster layer, shared by the datanode, the CLI and the operator.
//!
//! - [`access`]: access keys (id, scopes, hash of the secret) and bearer tokens.
//! - [`topology`]: what a cluster is made of (config, nodes, partitions and their replicas).
//! - [`planner`]: places partition replicas on nodes' disks (zone-aware, capacity-weighted,
//!   deterministic, minimal movement).
//! - [`etcd`]: the topology and live registrations in etcd (docs/etcd-layout.md).
//! - [`admin`]: what the datanode's admin API answers the operator and `cairn`.
//! - [`datanode_command`]: the datanode's command line, built one way by every platform.
//! - [`replica`]: what datanodes send each other (the replica API's wire types, versioned).
//! - [`peer_tls`]: the cluster CA and the node certificates of mutual TLS between datanodes.

pub mod access;
pub mod admin;
pub mod blob_tls;
pub mod datanode_command;
pub mod etcd;
pub mod peer_tls;
pub mod planner;
pub mod replica;
pub mod topology;

pub use topology::{
    AuthMode, BlobTls, ClusterConfig, DiskSpec, LiveNode, NodeSpec, PartitionSpec, PartitionState, ReplicaSpec,
    RetiredReplica, Topology,
};
