pub mod blob_id;
pub mod volume_layout;

pub use blob_id::BlobId;
