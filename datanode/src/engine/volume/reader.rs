//! Reading a live blob: metadata verified at open, payload one verified chunk at a time.

use super::*;

/// A live blob opened for reading: metadata verified, payload read one verified chunk at a time.
pub struct BlobReader {
    pub blob_id: BlobId,
    pub entry: IndexEntry,
    pub meta: BlobMeta,
    file: Arc<File>,
    segment: u32,
    payload_offset: u64,
    chunk_crcs: Vec<u32>,
    /// The whole payload, for blobs small enough to read in one go.
    small_payload: Option<Bytes>,
    chunks: Option<Arc<VolumeChunks>>,
    metrics: Arc<EngineMetrics>,
}

/// Records up to this size are read with one pread when opened.
pub(super) const SMALL_RECORD: u64 = CHUNK_LEN + 64 * 1024;

impl BlobReader {
    pub(super) fn open(
        shared: &Shared,
        blob_id: BlobId,
        entry: IndexEntry,
        location: Location,
        file: Arc<File>,
    ) -> Result<Self, VolumeError> {
        let describe = |e: VolumeError| {
            shared.metrics.integrity_errors.inc();
            VolumeError::Integrity(format!(
                "blob {blob_id} at segment {} offset {}: {e}",
                location.segment, location.offset
            ))
        };
        let small = location.len <= SMALL_RECORD;
        let head_len = if small { location.len } else { HEADER_LEN + u64::from(entry.meta_len) };
        let head = read_at(&file, location.offset, head_len as usize)?;
        let header = RecordHeader::decode(head[..HEADER_LEN as usize].try_into().expect("header length"))
            .map_err(|e| describe(integrity(e)))?;
        if header.blob_id != blob_id || header.kind != RecordKind::Put || header.record_len() != location.len {
            return Err(describe(VolumeError::Integrity("record does not match the index".into())));
        }
        let meta_bytes = &head[HEADER_LEN as usize..header.payload_offset() as usize];
        let trailer = if small {
            head[header.chunk_table_offset() as usize..].to_vec()
        } else {
            let len = 4 * header.chunk_count() + 4;
            read_at(&file, location.offset + header.chunk_table_offset(), len as usize)?
        };
        let chunk_crcs = record::verify_trailer(meta_bytes, &trailer).map_err(|e| describe(integrity(e)))?;
        let meta = BlobMeta::decode(meta_bytes).map_err(|e| describe(integrity(e)))?;
        let small_payload = if small {
            // A small record may still hold two chunks (up to CHUNK_LEN + 64 KiB): verify each.
            let payload =
                Bytes::copy_from_slice(&head[header.payload_offset() as usize..header.chunk_table_offset() as usize]);
            if chunk_crcs.len() as u64 != header.chunk_count() {
                return Err(describe(VolumeError::Integrity("chunk table length does not match the payload".into())));
            }
            for (i, (chunk, &expected)) in payload.chunks(CHUNK_LEN as usize).zip(&chunk_crcs).enumerate() {
                record::verify_chunk(i as u64, chunk, expected).map_err(|e| describe(integrity(e)))?;
            }
            Some(payload)
        } else {
            None
        };
        Ok(Self {
            blob_id,
            entry,
            meta,
            file,
            segment: location.segment,
            payload_offset: location.offset + header.payload_offset(),
            chunk_crcs,
            small_payload,
            chunks: shared.segments.chunks(),
            metrics: shared.metrics.clone(),
        })
    }

    pub fn len(&self) -> u64 {
        self.entry.payload_len
    }

    pub fn is_empty(&self) -> bool {
        self.entry.payload_len == 0
    }

    pub fn chunk_count(&self) -> u64 {
        self.chunk_crcs.len() as u64
    }

    /// Payload chunk `index` (of [`CHUNK_LEN`] bytes, the last one shorter), verified.
    pub fn read_chunk(&self, index: u64) -> Result<Bytes, VolumeError> {
        if index >= self.chunk_count() {
            return Err(VolumeError::Integrity(format!(
                "blob {}: chunk {index} asked of a payload of {} chunks",
                self.blob_id,
                self.chunk_count()
            )));
        }
        let start = index * CHUNK_LEN;
        let len = CHUNK_LEN.min(self.len() - start);
        if let Some(payload) = &self.small_payload {
            return Ok(payload.slice(start as usize..(start + len) as usize));
        }
        let offset = self.payload_offset + start;
        if let Some(chunk) = self.cached_chunk(index) {
            return Ok(chunk);
        }
        let data = read_at(&self.file, offset, len as usize)?;
        let expected = self.chunk_crcs[index as usize];
        record::verify_chunk(index, &data, expected).map_err(|e| {
            self.metrics.integrity_errors.inc();
            VolumeError::Integrity(format!("blob {}: {e}", self.blob_id))
        })?;
        let chunk = Bytes::from(data);
        if let Some(chunks) = &self.chunks {
            self.metrics.chunk_cache_misses.inc();
            chunks.insert(self.segment, offset, chunk.clone());
        }
        Ok(chunk)
    }

    /// Payload chunk `index` if the node's chunk cache holds it (memory only, never blocks).
    pub fn cached_chunk(&self, index: u64) -> Option<Bytes> {
        let chunk = self.chunks.as_ref()?.get(self.segment, self.payload_offset + index * CHUNK_LEN)?;
        self.metrics.chunk_cache_hits.inc();
        Some(chunk)
    }

    /// Payload bytes `[start, end)`, verified chunk by chunk (used for small reads and tests).
    pub fn read_range(&self, start: u64, end: u64) -> Result<Vec<u8>, VolumeError> {
        let mut out = Vec::with_capacity((end - start) as usize);
        if start >= end {
            return Ok(out);
        }
        for chunk in start / CHUNK_LEN..end.div_ceil(CHUNK_LEN) {
            let data = self.read_chunk(chunk)?;
            let base = chunk * CHUNK_LEN;
            let from = start.saturating_sub(base) as usize;
            let to = ((end - base) as usize).min(data.len());
            out.extend_from_slice(&data[from..to]);
        }
        Ok(out)
    }
}
