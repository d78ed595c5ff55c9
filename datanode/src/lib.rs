//! Cairn datanode, in layers that import only downwards (a test checks it):
//!
//! engine ← store ← cluster ← front ← api ← server
//!
//! - [`engine`]: one volume per partition replica (log segments, redb index, group commit).
//! - [`store`]: the volumes a node serves.
//! - [`cluster`]: membership, routing across replicas, pull replication, anti-entropy.
//! - [`front`]: what the public API talks to, a standalone store or a cluster.
//! - [`api`]: HTTP: the public blob API, the replica API between datanodes, errors → statuses.
//! - [`server`]: runs a node.
//!
//! [`metrics`], [`request`] (the id that follows a request across nodes) and [`tls`] (certificate
//! files, reloaded) are beside them all.

pub mod api;
pub mod cluster;
pub mod engine;
pub mod front;
pub mod metrics;
pub mod request;
pub mod server;
pub mod store;
pub mod tls;
