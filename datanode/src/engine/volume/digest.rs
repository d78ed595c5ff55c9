//! Anti-entropy digests: what a replica holds, summed per id bucket, so that two replicas can
//! find where they differ by comparing 256 hashes, and list only the buckets that differ.
//!
//! A bucket is the first byte of an id's random part, so each bucket is one key range of the
//! index. Its digest is SHA-256 (first 16 bytes) over its ids in key order, each with whether it
//! is deleted. Expired blobs are left out: replicas reclaim them at different times, and the
//! difference means nothing.

use cairn_common::blob_id::{BLOB_ID_BYTES, BLOB_ID_VERSION};
use sha2::{Digest, Sha256};

use super::*;

/// Byte of the index key that picks the bucket: after the id version and the partition.
const BUCKET_BYTE: usize = 5;

/// One id's state as anti-entropy compares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldBlob {
    pub id: BlobId,
    pub deleted: bool,
}

/// The digests of every bucket, as of the journal tail they were computed at.
#[derive(Debug, Clone)]
pub(super) struct DigestCache {
    tail: u64,
    at: Instant,
    buckets: Arc<Vec<[u8; 16]>>,
}

/// A digest stays good this long while the journal does not move (expiry changes what it covers).
const DIGEST_CACHE_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether the entry counts (deleted or not), or is left out (expired).
fn held(entry: &IndexEntry, now: u64) -> Option<bool> {
    match entry.state {
        BlobState::Deleted => Some(true),
        BlobState::Live if !entry.is_expired(now) => Some(false),
        _ => None,
    }
}

impl Volume {
    /// The digest of each of the [`DIGEST_BUCKETS`](cairn_cluster::replica::DIGEST_BUCKETS)
    /// buckets. One scan of the index (blocking: call off the async runtime), reused while the
    /// journal stands still.
    pub fn digest(&self) -> Result<Arc<Vec<[u8; 16]>>, VolumeError> {
        let tail = self.journal_tail();
        if let Some(cache) = self.digest_cache.lock().expect("digest lock").as_ref() {
            if cache.tail == tail && cache.at.elapsed() < DIGEST_CACHE_FOR {
                return Ok(cache.buckets.clone());
            }
        }
        let now = now_ms();
        let txn = self.shared.db.begin_read()?;
        let blobs = txn.open_table(BLOBS)?;
        let mut hashers: Vec<Sha256> = (0..256).map(|_| Sha256::new()).collect();
        for item in blobs.iter()? {
            let (key, value) = item?;
            let key = key.value();
            let entry = index::decode_entry(value.value())?;
            if let Some(deleted) = held(&entry, now) {
                let hasher = &mut hashers[key[BUCKET_BYTE] as usize];
                hasher.update(key);
                hasher.update([deleted as u8]);
            }
        }
        let buckets: Arc<Vec<[u8; 16]>> =
            Arc::new(hashers.into_iter().map(|h| h.finalize()[..16].try_into().expect("16 bytes")).collect());
        *self.digest_cache.lock().expect("digest lock") =
            Some(DigestCache { tail, at: Instant::now(), buckets: buckets.clone() });
        Ok(buckets)
    }

    /// Every id this replica holds in `bucket` (blocking).
    pub fn bucket(&self, bucket: u8) -> Result<Vec<HeldBlob>, VolumeError> {
        let now = now_ms();
        let mut start = [0u8; BLOB_ID_BYTES];
        start[0] = BLOB_ID_VERSION;
        start[1..BUCKET_BYTE].copy_from_slice(&self.partition().to_be_bytes());
        start[BUCKET_BYTE] = bucket;
        let mut end = start;
        end[BUCKET_BYTE + 1..].fill(0xff);
        let txn = self.shared.db.begin_read()?;
        let blobs = txn.open_table(BLOBS)?;
        let mut out = Vec::new();
        for item in blobs.range(start..=end)? {
            let (key, value) = item?;
            let key = key.value();
            let entry = index::decode_entry(value.value())?;
            if let (Some(deleted), Ok(id)) = (held(&entry, now), BlobId::from_bytes(&key)) {
                out.push(HeldBlob { id, deleted });
            }
        }
        Ok(out)
    }
}
