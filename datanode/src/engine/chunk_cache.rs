//! A node-wide cache of verified payload chunks of large blobs.
//!
//! Every GET verifies each 1 MiB chunk against its CRC32C, which costs a copy out of the page
//! cache and a checksum pass per chunk. Records are immutable at their place in a segment for
//! as long as a volume is open (segments are append-only, numbers are never reused, torn tails
//! are zeroed only while opening), so a chunk that has been verified once can be served again
//! from memory. Entries are keyed by a per-open volume number, the segment and the file offset;
//! a segment removed by compaction forgets its chunks, and so does a closed volume.
//!
//! The cache never decides whether a blob exists: the index is consulted on every read, so a
//! deleted or expired blob answers 410 whether or not its chunks are still cached.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use quick_cache::sync::Cache;
use quick_cache::Weighter;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct ChunkKey {
    volume: u64,
    segment: u32,
    offset: u64,
}

#[derive(Clone)]
struct ByLength;

impl Weighter<ChunkKey, Bytes> for ByLength {
    fn weight(&self, _key: &ChunkKey, chunk: &Bytes) -> u64 {
        chunk.len().max(1) as u64
    }
}

/// Shared by the volumes of one node; bounded in bytes.
pub struct ChunkCache {
    chunks: Cache<ChunkKey, Bytes, ByLength>,
    capacity_bytes: u64,
    next_volume: AtomicU64,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache").field("capacity_bytes", &self.capacity_bytes).finish_non_exhaustive()
    }
}

impl ChunkCache {
    /// A cache of at most `capacity_bytes` of chunk data.
    pub fn new(capacity_bytes: u64) -> Self {
        let estimated_chunks = (capacity_bytes / super::record::CHUNK_LEN).max(16) as usize;
        Self {
            chunks: Cache::with_weighter(estimated_chunks, capacity_bytes, ByLength),
            capacity_bytes,
            next_volume: AtomicU64::new(0),
        }
    }

    /// Bytes of chunk data held now.
    pub fn used_bytes(&self) -> u64 {
        self.chunks.weight()
    }

    /// A view for one opened volume; its chunks are forgotten when the view is dropped.
    pub(crate) fn for_volume(self: &Arc<Self>) -> VolumeChunks {
        VolumeChunks { cache: self.clone(), volume: self.next_volume.fetch_add(1, Ordering::Relaxed) }
    }
}

/// One opened volume's part of the [`ChunkCache`].
pub struct VolumeChunks {
    cache: Arc<ChunkCache>,
    volume: u64,
}

impl VolumeChunks {
    fn key(&self, segment: u32, offset: u64) -> ChunkKey {
        ChunkKey { volume: self.volume, segment, offset }
    }

    pub fn get(&self, segment: u32, offset: u64) -> Option<Bytes> {
        self.cache.chunks.get(&self.key(segment, offset))
    }

    /// Stores a chunk that has just been verified.
    pub fn insert(&self, segment: u32, offset: u64, chunk: Bytes) {
        self.cache.chunks.insert(self.key(segment, offset), chunk);
    }

    /// Called when a segment file is removed.
    pub fn forget_segment(&self, segment: u32) {
        let volume = self.volume;
        self.cache.chunks.retain(|key, _| key.volume != volume || key.segment != segment);
    }
}

impl Drop for VolumeChunks {
    fn drop(&mut self) {
        let volume = self.volume;
        self.cache.chunks.retain(|key, _| key.volume != volume);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_in_bytes_and_scoped_to_volume_and_segment() {
        let cache = Arc::new(ChunkCache::new(4 << 20));
        let a = cache.for_volume();
        let b = cache.for_volume();
        a.insert(1, 0, Bytes::from(vec![1u8; 1 << 20]));
        b.insert(1, 0, Bytes::from(vec![2u8; 1 << 20]));
        a.insert(2, 64, Bytes::from(vec![3u8; 1 << 20]));
        assert_eq!(a.get(1, 0).unwrap()[0], 1);
        assert_eq!(b.get(1, 0).unwrap()[0], 2);
        assert!(a.get(1, 64).is_none());

        a.forget_segment(1);
        assert!(a.get(1, 0).is_none());
        assert!(a.get(2, 64).is_some());
        assert!(b.get(1, 0).is_some());

        drop(a);
        assert!(b.get(1, 0).is_some());
        assert_eq!(cache.used_bytes(), 1 << 20);

        for offset in 0..16 {
            b.insert(3, offset << 20, Bytes::from(vec![4u8; 1 << 20]));
        }
        assert!(cache.used_bytes() <= 4 << 20, "{} bytes held", cache.used_bytes());
    }
}
