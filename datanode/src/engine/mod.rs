//! The storage engine: one [`Volume`] per partition replica.
//!
//! - [`record`]: the log record format.
//! - [`index`]: the redb tables (index, journal, segments, log tail, names).
//! - [`names`]: name records (blobs that record a name's version) and their index.
//! - [`versioned`]: the encoding of every stored value (a format byte, then postcard).
//! - [`segments`]: open segment files and positioned I/O.
//! - [`volume`]: open/recovery, the group-commit writer, reads.
//! - [`chunk_cache`]: verified chunks of large blobs kept in memory for repeated reads.
//! - [`compaction`] (part of the volume): reclaiming deleted and expired records, crash-safe in
//!   phases.
//!
//! docs/design.md explains the commit protocol and recovery.

pub mod chunk_cache;
pub mod index;
pub mod names;
pub mod record;
pub mod segments;
pub mod versioned;
pub mod volume;

pub use volume::compaction;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_common::volume_layout::{LayoutError, Preallocation};

pub use chunk_cache::ChunkCache;
pub use compaction::CompactionConfig;
pub use index::{BlobState, IndexEntry, JournalEntry, Location, OwedEntry};
pub use record::BlobMeta;
pub use volume::{BlobReader, HeldBlob, PairError, PutRequest, TtlMerge, Volume, VolumeHealth, VolumeStats};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("blob not found")]
    NotFound,
    #[error("blob was deleted")]
    Deleted,
    #[error("blob has expired")]
    Expired,
    #[error("a different blob with this id already exists")]
    Conflict,
    #[error("volume is full")]
    Full,
    /// This record does not fit, though smaller ones still do: the volume is not full.
    #[error("no room left in this volume for a record of {needed} bytes")]
    NoRoom { needed: u64 },
    /// New blobs are refused for a passing reason (no file descriptors, no disk space for the
    /// index); the next put tries again, so the volume recovers by itself.
    #[error("volume takes no new blobs for now: {reason}")]
    Paused { reason: String, no_space: bool },
    #[error("record of {size} bytes does not fit in a segment (at most {max})")]
    TooLarge { size: u64, max: u64 },
    #[error("volume has failed and is read-only: {0}")]
    Failed(String),
    #[error("integrity error: {0}")]
    Integrity(String),
    #[error("volume index is corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("index database error: {0}")]
    Db(String),
    #[error("volume is shut down")]
    Closed,
}

macro_rules! db_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for VolumeError {
            fn from(e: $t) -> Self {
                VolumeError::Db(e.to_string())
            }
        }
    )*};
}
db_error_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Tunables of a volume; geometry (segment size, capacity) lives in the volume's marker.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    pub preallocation: Preallocation,
    /// Largest payload accepted, bytes.
    pub max_blob_bytes: u64,
    /// Durable index checkpoint at least this often while writes flow...
    pub checkpoint_interval: Duration,
    /// ...and after this many log bytes: bounds the tail replayed after a crash.
    pub checkpoint_bytes: u64,
    /// Upper bounds of one group commit.
    pub max_batch_records: usize,
    pub max_batch_bytes: u64,
    /// Puts are refused while the volume's filesystem has less than this free, so that the index
    /// can still grow for deletes and TTL updates (and so that a full disk never fails a volume).
    pub index_reserve_bytes: u64,
    /// Room of the volume kept for what its peer replicas may still owe it (a replica of a
    /// cluster): a new blob is refused (`Full`, and the partition turns read-only) once less than
    /// this would be left, while blobs copied by replication may use it. Replicas pack the same
    /// blobs differently (segment ends, arrival order), so one that was away may need a little
    /// more room for what its peers took; 0 for a standalone volume.
    pub peer_reserve_bytes: u64,
    pub compaction: CompactionConfig,
    /// The node's cache of verified chunks; `None` reads every chunk from its segment.
    pub chunk_cache: Option<std::sync::Arc<ChunkCache>>,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        Self {
            preallocation: Preallocation::Fallocate,
            max_blob_bytes: 64 << 20,
            checkpoint_interval: Duration::from_secs(1),
            checkpoint_bytes: 128 << 20,
            max_batch_records: 4096,
            max_batch_bytes: 64 << 20,
            index_reserve_bytes: 16 << 20,
            peer_reserve_bytes: 0,
            compaction: CompactionConfig::default(),
            chunk_cache: None,
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
