//! Types shared by Cairn's binaries: blob ids, the on-disk volume layout, and the disk agent's
//! API with its client.

pub mod agent_api;
pub mod agent_client;
pub mod backoff;
pub mod blob_id;
pub mod bucket_name;
pub mod disk_space;
pub mod process_lock;
pub mod scope;
pub mod text;
pub mod volume_layout;

pub use blob_id::BlobId;
