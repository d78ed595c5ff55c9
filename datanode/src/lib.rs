//! Cairn datanode: the storage engine ([`engine`]), the volumes a node serves ([`store`]) and
//! the HTTP blob API ([`api`]).

pub mod api;
pub mod engine;
pub mod metrics;
pub mod server;
pub mod store;
