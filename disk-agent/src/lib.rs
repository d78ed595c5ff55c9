//! cairn-disk-agent: finds the disks of one machine once each, prepares Cairn volumes on them
//! and reports their space honestly.
//!
//! - [`mountinfo`]: the mountinfo parser.
//! - [`config`]: the configuration file and the disk selector.
//! - [`probe`]: statvfs and filesystem UUIDs from the running system.
//! - [`discovery`]: pseudo filesystems out, duplicate mounts folded, selector applied.
//! - [`identity`]: identity files on disks and the agent's record of them.
//! - [`volumes`]: creating, listing and deleting volumes in the datanode's layout.
//! - [`owners`]: which cluster owns each volume, and the token it is bound to.
//! - [`agent`]: all of it together, behind one lock; the report.
//! - [`api`], [`error`], [`metrics`]: the node API on two unix sockets (datanodes', admin's).
//! - [`k8s`]: the `StoreNode` status.
//!
//! docs/disk-agent.md describes the behaviour and the API.

pub mod agent;
pub mod api;
pub mod config;
pub mod discovery;
pub mod error;
pub mod identity;
pub mod k8s;
pub mod metrics;
pub mod mountinfo;
pub mod owners;
pub mod probe;
pub mod volumes;

pub use agent::{Agent, AgentOptions};
