//! Log record format (version 1).
//!
//! ```text
//! offset  size  field
//!      0     4  magic "CRec"
//!      4     1  format version (1)
//!      5     1  kind: 1 put, 2 delete, 3 ttl-update, 4 seal
//!      6     2  flags (none defined; non-zero is refused)
//!      8    21  blob id (binary form)
//!     29     8  created, ms since the Unix epoch
//!     37     8  expiry, ms since the Unix epoch; 0 = never (a real expiry is at least 1:
//!                see [`normalize_expiry`])
//!     45     4  metadata length M
//!     49     8  payload length P
//!     57     4  CRC32C of bytes 0..57          (lengths are trusted only after this)
//!     61     M  metadata (put: BlobMeta; seal: next segment number)
//!   61+M     P  payload
//!        4*C    CRC32C of each 1 MiB payload chunk, C = ceil(P / 1 MiB)
//!          4    CRC32C of metadata ++ chunk CRC table
//! ```
//!
//! Every byte is covered by a checksum, and a payload can be streamed one verified chunk at a time.
//! A record never spans segments.

use cairn_common::blob_id::{BlobId, BLOB_ID_BYTES};
use serde::{Deserialize, Serialize};

pub const RECORD_MAGIC: [u8; 4] = *b"CRec";
pub const RECORD_FORMAT: u8 = 1;
pub const HEADER_LEN: u64 = cairn_common::volume_layout::RECORD_HEADER_LEN;
/// Payload bytes covered by one chunk checksum.
pub const CHUNK_LEN: u64 = cairn_common::volume_layout::RECORD_CHUNK_LEN;
const HEADER_CRC_AT: usize = 57;

/// The one encoding of "never expires" is an expiry field of 0, so a real expiry is at least 1 ms
/// after the epoch: an expiry of 0 (already expired, as 1 is) would otherwise read back as never.
pub fn normalize_expiry(expiry_ms: Option<u64>) -> Option<u64> {
    expiry_ms.map(|t| t.max(1))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordKind {
    Put,
    Delete,
    TtlUpdate,
    /// Ends a segment; its metadata names the segment the log continues in.
    Seal,
}

impl RecordKind {
    fn code(self) -> u8 {
        match self {
            RecordKind::Put => 1,
            RecordKind::Delete => 2,
            RecordKind::TtlUpdate => 3,
            RecordKind::Seal => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => RecordKind::Put,
            2 => RecordKind::Delete,
            3 => RecordKind::TtlUpdate,
            4 => RecordKind::Seal,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("no record here (magic mismatch)")]
    NoRecord,
    #[error("record header checksum mismatch")]
    HeaderChecksum,
    #[error("record format {0} is not supported")]
    Format(u8),
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("unknown record flags {0:#x}")]
    Flags(u16),
    #[error("invalid blob id in record")]
    BlobId,
    #[error("record metadata is malformed: {0}")]
    Meta(String),
    #[error("payload chunk {0} checksum mismatch")]
    ChunkChecksum(u64),
    #[error("record trailer checksum mismatch")]
    TrailerChecksum,
    #[error("record is {found} bytes, its header says {expected}")]
    Length { expected: u64, found: u64 },
}

/// The fixed-size head of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub blob_id: BlobId,
    pub created_ms: u64,
    pub expiry_ms: Option<u64>,
    pub meta_len: u32,
    pub payload_len: u64,
}

impl RecordHeader {
    pub fn chunk_count(&self) -> u64 {
        self.payload_len.div_ceil(CHUNK_LEN)
    }

    /// Total bytes of the record on disk. Saturating: a header read from disk may carry any
    /// length (its checksum says only that it was written so), and no length may wrap around.
    pub fn record_len(&self) -> u64 {
        self.chunk_table_offset().saturating_add(self.chunk_count().saturating_mul(4)).saturating_add(4)
    }

    pub fn payload_offset(&self) -> u64 {
        HEADER_LEN + u64::from(self.meta_len)
    }

    pub fn chunk_table_offset(&self) -> u64 {
        self.payload_offset().saturating_add(self.payload_len)
    }

    pub fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..4].copy_from_slice(&RECORD_MAGIC);
        b[4] = RECORD_FORMAT;
        b[5] = self.kind.code();
        b[6..8].copy_from_slice(&0u16.to_le_bytes());
        b[8..29].copy_from_slice(&self.blob_id.to_bytes());
        b[29..37].copy_from_slice(&self.created_ms.to_le_bytes());
        b[37..45].copy_from_slice(&normalize_expiry(self.expiry_ms).unwrap_or(0).to_le_bytes());
        b[45..49].copy_from_slice(&self.meta_len.to_le_bytes());
        b[49..57].copy_from_slice(&self.payload_len.to_le_bytes());
        let crc = crc32c::crc32c(&b[..HEADER_CRC_AT]);
        b[57..61].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN as usize]) -> Result<Self, RecordError> {
        if b[0..4] != RECORD_MAGIC {
            return Err(RecordError::NoRecord);
        }
        let crc = u32::from_le_bytes(b[57..61].try_into().expect("4 bytes"));
        if crc != crc32c::crc32c(&b[..HEADER_CRC_AT]) {
            return Err(RecordError::HeaderChecksum);
        }
        if b[4] != RECORD_FORMAT {
            return Err(RecordError::Format(b[4]));
        }
        let kind = RecordKind::from_code(b[5]).ok_or(RecordError::Kind(b[5]))?;
        let flags = u16::from_le_bytes(b[6..8].try_into().expect("2 bytes"));
        if flags != 0 {
            return Err(RecordError::Flags(flags));
        }
        let id: [u8; BLOB_ID_BYTES] = b[8..29].try_into().expect("21 bytes");
        let expiry = u64::from_le_bytes(b[37..45].try_into().expect("8 bytes"));
        Ok(Self {
            kind,
            blob_id: BlobId::from_bytes(&id).map_err(|_| RecordError::BlobId)?,
            created_ms: u64::from_le_bytes(b[29..37].try_into().expect("8 bytes")),
            expiry_ms: (expiry != 0).then_some(expiry),
            meta_len: u32::from_le_bytes(b[45..49].try_into().expect("4 bytes")),
            payload_len: u64::from_le_bytes(b[49..57].try_into().expect("8 bytes")),
        })
    }
}

/// Content type and user metadata of a blob, stored in its put record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobMeta {
    pub content_type: String,
    /// `X-Cairn-Meta-*` pairs, keys lower-cased, sorted.
    pub user: Vec<(String, String)>,
}

const META_FORMAT: u8 = 1;

/// Sum of the lengths of all user metadata keys and values.
pub const MAX_USER_META_BYTES: usize = 4096;
pub const MAX_CONTENT_TYPE_BYTES: usize = 256;
pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// Metadata a blob cannot have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooLarge(String),
}

/// Characters of an HTTP header value a blob's metadata may hold: visible ASCII and spaces.
fn is_visible_ascii(s: &str) -> bool {
    s.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// Characters of a metadata key: those of an HTTP header name, lower-cased.
fn is_key(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl BlobMeta {
    /// Metadata within the limits every blob keeps to, whichever way it arrives (headers of the
    /// public API, the typed body of a replica write): keys sorted, each once.
    pub fn new(content_type: String, mut user: Vec<(String, String)>) -> Result<Self, MetaError> {
        if content_type.len() > MAX_CONTENT_TYPE_BYTES {
            return Err(MetaError::Invalid(format!("Content-Type is longer than {MAX_CONTENT_TYPE_BYTES} bytes")));
        }
        if !is_visible_ascii(&content_type) {
            return Err(MetaError::Invalid("Content-Type must be visible ASCII".into()));
        }
        let mut total = 0usize;
        for (key, value) in &user {
            if key.is_empty() {
                return Err(MetaError::Invalid("X-Cairn-Meta- needs a name after the prefix".into()));
            }
            if !is_key(key) {
                return Err(MetaError::Invalid(format!("metadata key {key:?} is not a lower-case header name")));
            }
            if !is_visible_ascii(value) {
                return Err(MetaError::Invalid(format!("metadata {key:?} must be visible ASCII")));
            }
            total += key.len() + value.len();
        }
        if total > MAX_USER_META_BYTES {
            return Err(MetaError::TooLarge(format!(
                "user metadata is {total} bytes; the limit is {MAX_USER_META_BYTES} (keys plus values)"
            )));
        }
        user.sort();
        if user.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(MetaError::Invalid("a metadata key appears more than once".into()));
        }
        Ok(Self { content_type, user })
    }

    pub fn encode(&self) -> Vec<u8> {
        super::versioned::encode(META_FORMAT, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        super::versioned::decode(META_FORMAT, bytes).map_err(RecordError::Meta)
    }
}

/// CRC32C of every `CHUNK_LEN` slice of `payload`.
pub fn chunk_crcs(payload: &[u8]) -> Vec<u32> {
    payload.chunks(CHUNK_LEN as usize).map(crc32c::crc32c).collect()
}

/// Everything that follows the payload: the chunk CRC table and the trailer CRC.
pub fn encode_trailer(meta: &[u8], chunk_crcs: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunk_crcs.len() * 4 + 4);
    for crc in chunk_crcs {
        out.extend_from_slice(&crc.to_le_bytes());
    }
    let trailer_crc = crc32c::crc32c_append(crc32c::crc32c(meta), &out);
    out.extend_from_slice(&trailer_crc.to_le_bytes());
    out
}

/// Checks metadata and chunk table against the trailer CRC; returns the chunk CRCs.
pub fn verify_trailer(meta: &[u8], trailer: &[u8]) -> Result<Vec<u32>, RecordError> {
    // A table of 4-byte CRCs and the trailer's own: anything else is not a trailer.
    if trailer.len() < 4 || !trailer.len().is_multiple_of(4) {
        return Err(RecordError::TrailerChecksum);
    }
    let (table, crc) = trailer.split_at(trailer.len() - 4);
    let expected = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    if crc32c::crc32c_append(crc32c::crc32c(meta), table) != expected {
        return Err(RecordError::TrailerChecksum);
    }
    Ok(table.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
}

/// Checks one payload chunk against its CRC.
pub fn verify_chunk(index: u64, data: &[u8], expected: u32) -> Result<(), RecordError> {
    if crc32c::crc32c(data) == expected {
        Ok(())
    } else {
        Err(RecordError::ChunkChecksum(index))
    }
}

/// Verifies a whole record held in memory (header, trailer and every chunk); returns its header
/// and trailer CRC.
pub fn verify_record(bytes: &[u8]) -> Result<(RecordHeader, u32), RecordError> {
    let head: &[u8; HEADER_LEN as usize] =
        bytes.get(..HEADER_LEN as usize).and_then(|h| h.try_into().ok()).ok_or(RecordError::NoRecord)?;
    let header = RecordHeader::decode(head)?;
    if bytes.len() as u64 != header.record_len() {
        return Err(RecordError::Length { expected: header.record_len(), found: bytes.len() as u64 });
    }
    let meta = &bytes[HEADER_LEN as usize..header.payload_offset() as usize];
    let payload = &bytes[header.payload_offset() as usize..header.chunk_table_offset() as usize];
    let crcs = verify_trailer(meta, &bytes[header.chunk_table_offset() as usize..])?;
    for (i, (chunk, expected)) in payload.chunks(CHUNK_LEN as usize).zip(&crcs).enumerate() {
        verify_chunk(i as u64, chunk, *expected)?;
    }
    let crc = u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().expect("4 bytes"));
    Ok((header, crc))
}

/// A record ready to be appended: header, metadata, payload, trailer.
#[derive(Debug, Clone)]
pub struct EncodedRecord {
    pub header: RecordHeader,
    pub head: Vec<u8>,
    pub payload: bytes::Bytes,
    pub trailer: Vec<u8>,
}

impl EncodedRecord {
    pub fn new(header: RecordHeader, meta: &[u8], payload: bytes::Bytes, chunk_crcs: &[u32]) -> Self {
        debug_assert_eq!(header.meta_len as usize, meta.len());
        debug_assert_eq!(header.payload_len as usize, payload.len());
        let mut head = Vec::with_capacity(HEADER_LEN as usize + meta.len());
        head.extend_from_slice(&header.encode());
        head.extend_from_slice(meta);
        Self { header, head, payload, trailer: encode_trailer(meta, chunk_crcs) }
    }

    pub fn record_len(&self) -> u64 {
        self.header.record_len()
    }

    /// CRC32C of the trailer: identifies this exact record in the index.
    pub fn trailer_crc(&self) -> u32 {
        u32::from_le_bytes(self.trailer[self.trailer.len() - 4..].try_into().expect("4 bytes"))
    }

    /// Seal record pointing to the segment the log continues in.
    pub fn seal(next_segment: u32, now_ms: u64) -> Self {
        let meta = next_segment.to_le_bytes();
        let header = RecordHeader {
            kind: RecordKind::Seal,
            blob_id: BlobId::new(0, 0),
            created_ms: now_ms,
            expiry_ms: None,
            meta_len: meta.len() as u32,
            payload_len: 0,
        };
        Self::new(header, &meta, bytes::Bytes::new(), &[])
    }
}

/// The length of a seal record, which every segment keeps room for.
pub const SEAL_LEN: u64 = cairn_common::volume_layout::SEAL_RECORD_LEN;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(kind: RecordKind, payload_len: u64, meta_len: u32) -> RecordHeader {
        RecordHeader {
            kind,
            blob_id: BlobId::new(5, 77),
            created_ms: 1_700_000_000_000,
            expiry_ms: Some(1_800_000_000_000),
            meta_len,
            payload_len,
        }
    }

    #[test]
    fn header_round_trip_and_every_byte_protected() {
        let h = header(RecordKind::Put, 3 * CHUNK_LEN + 5, 17);
        let b = h.encode();
        assert_eq!(RecordHeader::decode(&b).unwrap(), h);
        assert_eq!(h.chunk_count(), 4);
        assert_eq!(h.record_len(), HEADER_LEN + 17 + 3 * CHUNK_LEN + 5 + 16 + 4);
        for i in 0..HEADER_LEN as usize {
            let mut c = b;
            c[i] ^= 0x20;
            assert!(RecordHeader::decode(&c).is_err(), "flip at {i} undetected");
        }
        assert_eq!(RecordHeader::decode(&[0u8; HEADER_LEN as usize]), Err(RecordError::NoRecord));
    }

    #[test]
    fn an_expiry_of_zero_is_not_never() {
        for (given, stored) in [(None, None), (Some(0), Some(1)), (Some(1), Some(1)), (Some(u64::MAX), Some(u64::MAX))]
        {
            let h = RecordHeader { expiry_ms: given, ..header(RecordKind::Put, 10, 0) };
            assert_eq!(RecordHeader::decode(&h.encode()).unwrap().expiry_ms, stored);
            assert_eq!(normalize_expiry(given), stored, "the writer indexes what recovery will read");
        }
    }

    #[test]
    fn seal_has_fixed_length() {
        let seal = EncodedRecord::seal(9, 1);
        assert_eq!(seal.record_len(), SEAL_LEN);
        let bytes = [seal.head.as_slice(), &seal.payload, &seal.trailer].concat();
        assert_eq!(bytes.len() as u64, SEAL_LEN);
        assert_eq!(verify_record(&bytes).unwrap(), (seal.header, seal.trailer_crc()));
    }

    #[test]
    fn meta_round_trip_and_versioning() {
        let m = BlobMeta { content_type: "text/plain".into(), user: vec![("a".into(), "b".into())] };
        assert_eq!(BlobMeta::decode(&m.encode()).unwrap(), m);
        let mut bad = m.encode();
        bad[0] = 9;
        assert!(BlobMeta::decode(&bad).is_err());
    }

    #[test]
    fn verify_record_detects_any_flip_and_wrong_length() {
        let payload = bytes::Bytes::from((0..(CHUNK_LEN as usize + 300)).map(|i| i as u8).collect::<Vec<u8>>());
        let meta = BlobMeta { content_type: "x".into(), user: vec![] }.encode();
        let h = RecordHeader {
            meta_len: meta.len() as u32,
            payload_len: payload.len() as u64,
            ..header(RecordKind::Put, 0, 0)
        };
        let rec = EncodedRecord::new(h, &meta, payload.clone(), &chunk_crcs(&payload));
        let bytes = [rec.head.as_slice(), &rec.payload, &rec.trailer].concat();
        assert_eq!(verify_record(&bytes).unwrap(), (h, rec.trailer_crc()));
        for at in [3, HEADER_LEN as usize + 1, 70_000, CHUNK_LEN as usize + 100, bytes.len() - 9, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x08;
            assert!(verify_record(&bad).is_err(), "flip at {at} undetected");
        }
        assert!(matches!(verify_record(&bytes[..bytes.len() - 1]), Err(RecordError::Length { .. })));
    }

    /// A header with a valid checksum over whatever fields: what a hostile or rotten disk can
    /// hold and a CRC does not catch.
    fn crafted_header(
        kind: u8,
        flags: u16,
        id: [u8; 21],
        created: u64,
        expiry: u64,
        meta_len: u32,
        payload_len: u64,
    ) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..4].copy_from_slice(&RECORD_MAGIC);
        b[4] = RECORD_FORMAT;
        b[5] = kind;
        b[6..8].copy_from_slice(&flags.to_le_bytes());
        b[8..29].copy_from_slice(&id);
        b[29..37].copy_from_slice(&created.to_le_bytes());
        b[37..45].copy_from_slice(&expiry.to_le_bytes());
        b[45..49].copy_from_slice(&meta_len.to_le_bytes());
        b[49..57].copy_from_slice(&payload_len.to_le_bytes());
        let crc = crc32c::crc32c(&b[..HEADER_CRC_AT]);
        b[57..61].copy_from_slice(&crc.to_le_bytes());
        b
    }

    proptest! {
        /// Any bytes at all: the decoders answer (mostly an error), never panic.
        #[test]
        fn hostile_bytes_never_panic_a_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = verify_record(&bytes);
            let _ = BlobMeta::decode(&bytes);
            let _ = verify_trailer(&bytes[..bytes.len() / 2], &bytes[bytes.len() / 2..]);
            if let Some(head) = bytes.get(..HEADER_LEN as usize) {
                let _ = RecordHeader::decode(head.try_into().unwrap());
            }
        }

        /// A header whose checksum holds but whose fields are anything (lengths up to u64::MAX):
        /// decoding and verifying never panic or overflow, and a record never claims more bytes
        /// than it has.
        #[test]
        fn crafted_headers_never_panic(kind in any::<u8>(), flags in any::<u16>(), id in any::<[u8; 21]>(),
                                       created in any::<u64>(), expiry in any::<u64>(), meta_len in any::<u32>(),
                                       payload_len in any::<u64>(), tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            let head = crafted_header(kind, flags, id, created, expiry, meta_len, payload_len);
            if let Ok(header) = RecordHeader::decode(&head) {
                let _ = (header.record_len(), header.chunk_count(), header.chunk_table_offset());
            }
            let mut bytes = head.to_vec();
            bytes.extend(tail);
            if let Ok((header, _)) = verify_record(&bytes) {
                prop_assert_eq!(header.record_len(), bytes.len() as u64);
            }
        }

        /// A valid header with any one bit flipped is refused.
        #[test]
        fn any_flip_of_a_header_is_refused(payload_len in 0u64..1 << 40, meta_len in 0u32..1 << 20, bit in 0usize..HEADER_LEN as usize * 8) {
            let mut b = header(RecordKind::Put, payload_len, meta_len).encode();
            prop_assert!(RecordHeader::decode(&b).is_ok());
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(RecordHeader::decode(&b).is_err());
        }

        #[test]
        fn trailer_detects_any_flip(payload in proptest::collection::vec(any::<u8>(), 0..3000), flip in any::<usize>()) {
            let meta = b"meta";
            let crcs: Vec<u32> = payload.chunks(1000).map(crc32c::crc32c).collect();
            let trailer = encode_trailer(meta, &crcs);
            prop_assert_eq!(verify_trailer(meta, &trailer).unwrap(), crcs);
            let mut t = trailer.clone();
            let i = flip % t.len();
            t[i] ^= 1;
            prop_assert!(verify_trailer(meta, &t).is_err());
        }
    }
}
