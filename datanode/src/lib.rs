//! Cairn datanode: the storage engine ([`engine`]), the volumes a node serves ([`store`]), the
//! HTTP blob API ([`api`]) and, in a cluster, routing and replication ([`cluster`]).

pub mod api;
pub mod cluster;
pub mod engine;
pub mod metrics;
pub mod server;
pub mod store;
