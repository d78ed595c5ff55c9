//! Wire types of the replica API (`/replica/v1/`): what datanodes send each other. One place,
//! versioned like the on-disk encodings: every body carries the [`WIRE_VERSION`] it was written
//! in, a body without one is version 1, and a receiver refuses a version it does not know
//! (with [`WireError::Version`]) rather than guess.
//!
//! - Journal: [`JournalRequest`] asks one peer for the journals of many partitions at once and
//!   waits (long-polls) until one has something; [`JournalBatch`] answers a page per partition.
//! - Blobs: a replica write and a blob fetch carry a blob as a [`BlobFrame`]: typed metadata
//!   ([`ReplicaBlob`]) framed before the payload.
//! - Anti-entropy: [`DigestAnswer`] (a digest per id bucket) and [`BucketEntries`].

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// The version of every body below that this build writes.
pub const WIRE_VERSION: u32 = 1;

fn v1() -> u32 {
    1
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("replica wire version {0} is not supported (this datanode speaks {WIRE_VERSION})")]
    Version(u32),
    #[error("malformed replica frame: {0}")]
    Frame(String),
}

/// Bytes as lower-case hex, as the wire carries digests and the id bytes of a corrupt entry.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Refuses a body of a version this build does not know.
pub fn check_version(version: u32) -> Result<(), WireError> {
    if version == WIRE_VERSION {
        Ok(())
    } else {
        Err(WireError::Version(version))
    }
}

// ----- journal -----

/// `POST /replica/v1/journal`: the journals of several partitions of the answering node, each
/// from the caller's token on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalRequest {
    #[serde(default = "v1")]
    pub version: u32,
    /// The asking node: its cursors tell the answering node what it has applied, so that the
    /// journal can be truncated below what every replica has.
    #[serde(default)]
    pub node: String,
    pub cursors: Vec<JournalCursor>,
    /// Entries per partition at most.
    pub limit: usize,
    /// When no requested journal has an entry from its cursor on, wait up to this long for one
    /// (0: answer at once). The answering node caps it.
    #[serde(default)]
    pub wait_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalCursor {
    pub partition: u32,
    /// The next sequence the caller needs.
    pub from: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalBatch {
    #[serde(default = "v1")]
    pub version: u32,
    /// One page per requested partition, in the request's order.
    pub pages: Vec<JournalPage>,
}

/// One partition's page. `error` is set (and `entries` empty) when this node cannot answer for
/// the partition (it holds no replica of it, the volume failed): the other pages stand.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JournalPage {
    pub partition: u32,
    /// The next sequence this replica will write.
    pub tail: u64,
    /// The lowest sequence still kept: entries below it were truncated.
    #[serde(default)]
    pub head: u64,
    /// The cursor is below `head`: the entries it needs are gone. The asking replica bootstraps
    /// (compares every id bucket with this replica and copies what it lacks), then goes on from
    /// `tail` as it was when this page was made.
    #[serde(default)]
    pub truncated: bool,
    pub entries: Vec<JournalItem>,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalItem {
    pub seq: u64,
    /// The blob id; `corrupt:<hex>` when the journal holds bytes that are not one (the entry is
    /// reported by the replica that pulls it, never passed as an empty id).
    pub id: String,
    pub kind: EntryKind,
    /// Bytes of the record.
    pub len: u64,
}

/// What a journal entry records. A kind this version does not know reads as `Unknown` (a newer
/// peer), and the puller owes it rather than passing over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    Put,
    Delete,
    TtlUpdate,
    /// The end of a segment: nothing to copy.
    Seal,
    #[serde(other)]
    Unknown,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Put => "put",
            EntryKind::Delete => "delete",
            EntryKind::TtlUpdate => "ttl_update",
            EntryKind::Seal => "seal",
            EntryKind::Unknown => "unknown",
        }
    }

    /// The kind of its wire name (as an owed entry keeps it).
    pub fn parse(name: &str) -> Self {
        serde_json::from_value(serde_json::Value::String(name.to_owned())).unwrap_or(EntryKind::Unknown)
    }
}

impl std::fmt::Display for EntryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// ----- blobs -----

/// A blob's metadata as replicas exchange it: with the id, times and metadata its router chose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaBlob {
    #[serde(default = "v1")]
    pub version: u32,
    pub content_type: String,
    /// User metadata, keys lower-cased and sorted.
    pub user: Vec<(String, String)>,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    /// When `expires_ms` was set (the stamp replicas compare to agree on one expiry); absent
    /// from older nodes and from puts, where it is `created_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry_set_ms: Option<u64>,
}

/// The body of `PUT /replica/v1/blobs/{id}` and of `GET /replica/v1/blobs/{id}`: the length of
/// the metadata (4 bytes, big-endian), the metadata as JSON ([`ReplicaBlob`]), then the payload.
pub struct BlobFrame;

/// Metadata above this is not a frame (a blob's metadata is a few KiB at most).
const MAX_FRAME_META: usize = 64 * 1024;

impl BlobFrame {
    /// What goes before the payload.
    pub fn head(blob: &ReplicaBlob) -> Bytes {
        let json = serde_json::to_vec(blob).expect("metadata serializes");
        let mut out = BytesMut::with_capacity(4 + json.len());
        out.put_u32(json.len() as u32);
        out.put_slice(&json);
        out.freeze()
    }

    /// The metadata and the payload of a whole frame (the payload shares `body`'s memory).
    pub fn split(mut body: Bytes) -> Result<(ReplicaBlob, Bytes), WireError> {
        if body.len() < 4 {
            return Err(WireError::Frame(format!("{} bytes, shorter than the length prefix", body.len())));
        }
        let len = u32::from_be_bytes(body[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME_META || body.len() - 4 < len {
            return Err(WireError::Frame(format!("metadata of {len} bytes in a body of {}", body.len())));
        }
        let meta = body.split_to(4 + len);
        let blob: ReplicaBlob =
            serde_json::from_slice(&meta[4..]).map_err(|e| WireError::Frame(format!("metadata: {e}")))?;
        check_version(blob.version)?;
        Ok((blob, body))
    }
}

/// `POST /replica/v1/blobs`: several replica writes in one request (a router batches the writes
/// it has for one peer at a moment, so that they cost one request and share a group commit).
/// The body is, for each blob, its id's length (2 bytes, big-endian), the id, the frame's length
/// (8 bytes, big-endian) and the [`BlobFrame`].
pub struct BlobBatch;

impl BlobBatch {
    /// The parts of one blob's entry in a batch body (the payload shared, not copied).
    pub fn entry(id: &str, blob: &ReplicaBlob, payload: &Bytes) -> [Bytes; 3] {
        let head = BlobFrame::head(blob);
        let mut prefix = BytesMut::with_capacity(2 + id.len() + 8);
        prefix.put_u16(id.len() as u16);
        prefix.put_slice(id.as_bytes());
        prefix.put_u64((head.len() + payload.len()) as u64);
        [prefix.freeze(), head, payload.clone()]
    }

    /// Every (id, metadata, payload) of a batch body.
    pub fn split(mut body: Bytes) -> Result<Vec<(String, ReplicaBlob, Bytes)>, WireError> {
        let mut out = Vec::new();
        while !body.is_empty() {
            let short = |what: &str| WireError::Frame(format!("batch cut short in {what}"));
            if body.len() < 2 {
                return Err(short("an id length"));
            }
            let id_len = u16::from_be_bytes([body[0], body[1]]) as usize;
            if body.len() < 2 + id_len + 8 {
                return Err(short("an id"));
            }
            let id = std::str::from_utf8(&body[2..2 + id_len])
                .map_err(|_| WireError::Frame("an id that is not UTF-8".into()))?
                .to_owned();
            let len = u64::from_be_bytes(body[2 + id_len..2 + id_len + 8].try_into().expect("8 bytes"));
            let _ = body.split_to(2 + id_len + 8);
            if (body.len() as u64) < len {
                return Err(short("a frame"));
            }
            let frame = body.split_to(len as usize);
            let (blob, payload) = BlobFrame::split(frame)?;
            out.push((id, blob, payload));
        }
        Ok(out)
    }
}

/// The answer to a [`BlobBatch`]: one outcome per blob, in the batch's order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchAnswer {
    #[serde(default = "v1")]
    pub version: u32,
    pub outcomes: Vec<BatchOutcome>,
}

/// What one write of a batch came to: the status and error code a single write would have had.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchOutcome {
    pub status: u16,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// `DELETE /replica/v1/blobs/{id}`: whether this replica had the blob before.
#[derive(Debug, Serialize, Deserialize)]
pub struct TombstoneAnswer {
    pub existed: bool,
}

/// `PUT /replica/v1/blobs/{id}/ttl`.
#[derive(Debug, Serialize, Deserialize)]
pub struct TtlBody {
    pub expires_ms: Option<u64>,
    /// When the node that took the client's request stamped the change (older nodes send none:
    /// the replica's own clock stamps it then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<u64>,
}

/// The answer to a [`TtlBody`] that changed nothing (200; a change that took is 204): the
/// replica's expiry sorts above it, set at `kept_stamp`.
#[derive(Debug, Serialize, Deserialize)]
pub struct TtlAnswer {
    pub version: u32,
    pub kept_stamp: u64,
}

// ----- anti-entropy -----

/// Buckets of a partition's ids in a digest: the first byte of an id's random part.
pub const DIGEST_BUCKETS: usize = 256;

/// `GET /replica/v1/partitions/{p}/digest`: the digest of every id bucket of a replica (equal
/// digests: the same ids, each deleted or not alike).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestAnswer {
    #[serde(default = "v1")]
    pub version: u32,
    /// [`DIGEST_BUCKETS`] digests, [`hex`].
    pub buckets: Vec<String>,
}

/// `GET /replica/v1/partitions/{p}/buckets/{b}`: what a replica holds in one id bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BucketEntries {
    #[serde(default = "v1")]
    pub version: u32,
    pub entries: Vec<BucketEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketEntry {
    pub id: String,
    pub deleted: bool,
}

// ----- names (the S3 front on a cluster) -----

/// `POST /replica/v1/partitions/{p}/names/versions`: a replica's versions of one name, and
/// which of the ids in `ask` it holds as deleted (the second round of a quorum read, for
/// versions the replicas asked first disagreed on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameVersionsQuery {
    #[serde(default = "v1")]
    pub version: u32,
    pub space: String,
    pub name: String,
    #[serde(default)]
    pub ask: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameVersionsAnswer {
    #[serde(default = "v1")]
    pub version: u32,
    /// Oldest first.
    pub versions: Vec<WireName>,
    /// The ids of `ask` this replica holds deleted (or expired).
    #[serde(default)]
    pub deleted: Vec<String>,
}

/// `POST /replica/v1/partitions/{p}/names/current`: a page of a replica's current names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentNamesQuery {
    #[serde(default = "v1")]
    pub version: u32,
    pub space: String,
    pub from: String,
    pub after: bool,
    pub prefix: String,
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentNamesAnswer {
    #[serde(default = "v1")]
    pub version: u32,
    /// In byte order of their names.
    pub names: Vec<WireName>,
}

/// One version of a name a replica holds: the version as a decimal (a u128), its record's id,
/// and its summary in [`hex`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireName {
    #[serde(default)]
    pub name: String,
    pub version: String,
    pub id: String,
    pub summary: String,
}

/// `POST /replica/v1/s3-delete-key`: one key of an S3 DeleteObjects, passed on to the key's
/// coordinator (authorized where the request arrived).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3DeleteKey {
    #[serde(default = "v1")]
    pub version: u32,
    pub bucket: String,
    pub key: String,
}

/// Bytes from [`hex`].
pub fn unhex(text: &str) -> Result<Vec<u8>, WireError> {
    hex::decode(text)
        .map_err(|e| WireError::Frame(format!("not hex ({e}): {:?}", text.chars().take(40).collect::<String>())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The journal's wire: every kind by its name both ways, and a kind this version does not
    /// know (a newer peer's) reads as `Unknown` without failing the page around it.
    #[test]
    fn journal_kinds_are_typed_and_an_unknown_one_does_not_break_the_page() {
        for kind in [EntryKind::Put, EntryKind::Delete, EntryKind::TtlUpdate, EntryKind::Seal] {
            assert_eq!(EntryKind::parse(kind.as_str()), kind);
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
        let page: JournalPage = serde_json::from_str(
            r#"{"partition": 0, "tail": 3, "entries": [{"seq": 1, "id": "x", "kind": "put", "len": 9},
                                        {"seq": 2, "id": "y", "kind": "rename_v2", "len": 9}]}"#,
        )
        .unwrap();
        assert_eq!(page.entries.iter().map(|e| e.kind).collect::<Vec<_>>(), [EntryKind::Put, EntryKind::Unknown]);
        assert_eq!(EntryKind::parse("rename_v2"), EntryKind::Unknown);
    }

    #[test]
    fn a_body_without_a_version_is_version_1_and_a_later_one_is_refused() {
        let batch: JournalBatch = serde_json::from_str(r#"{"pages": []}"#).unwrap();
        assert_eq!(batch.version, 1);
        assert_eq!(check_version(batch.version), Ok(()));
        assert_eq!(check_version(2), Err(WireError::Version(2)));
        let blob = ReplicaBlob {
            version: 2,
            content_type: "a/b".into(),
            user: vec![],
            created_ms: 1,
            expires_ms: None,
            expiry_set_ms: None,
        };
        let mut body = BlobFrame::head(&blob).to_vec();
        body.extend_from_slice(b"payload");
        assert_eq!(BlobFrame::split(body.into()).unwrap_err(), WireError::Version(2));
    }

    fn blob() -> impl Strategy<Value = ReplicaBlob> {
        (".{0,40}", proptest::collection::vec(("[a-z-]{1,10}", ".{0,20}"), 0..4), any::<u64>(), any::<Option<u64>>())
            .prop_map(|(content_type, user, created_ms, expires_ms)| ReplicaBlob {
                version: WIRE_VERSION,
                content_type,
                user,
                created_ms,
                expires_ms,
                expiry_set_ms: None,
            })
    }

    proptest! {
        /// A batch splits back into its blobs, in order; any cut of it is an error.
        #[test]
        fn a_batch_round_trips_and_a_cut_one_is_refused(
            blobs in proptest::collection::vec((blob(), "[A-Za-z0-9]{1,40}", proptest::collection::vec(any::<u8>(), 0..300)), 0..5),
            cut in any::<usize>(),
        ) {
            let mut body = Vec::new();
            for (blob, id, payload) in &blobs {
                for part in BlobBatch::entry(id, blob, &Bytes::from(payload.clone())) {
                    body.extend_from_slice(&part);
                }
            }
            let back = BlobBatch::split(Bytes::from(body.clone())).unwrap();
            prop_assert_eq!(back.len(), blobs.len());
            for ((blob, id, payload), (bid, bblob, bpayload)) in blobs.iter().zip(&back) {
                prop_assert_eq!(id, bid);
                prop_assert_eq!(blob, bblob);
                prop_assert_eq!(&payload[..], &bpayload[..]);
            }
            if !body.is_empty() {
                let cut = cut % body.len();
                prop_assert!(BlobBatch::split(Bytes::from(body[..cut].to_vec())).map(|b| b.len() < blobs.len()).unwrap_or(true));
            }
        }

        /// Any bytes at all: an error or blobs, never a panic.
        #[test]
        fn hostile_batches_are_errors(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = BlobBatch::split(bytes.into());
        }

        /// A frame splits back into what was framed, for any metadata and payload.
        #[test]
        fn a_frame_round_trips(blob in blob(), payload in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut body = BlobFrame::head(&blob).to_vec();
            body.extend_from_slice(&payload);
            let (back, rest) = BlobFrame::split(body.into()).unwrap();
            prop_assert_eq!(back, blob);
            prop_assert_eq!(&rest[..], &payload[..]);
        }

        /// Any bytes at all: an error or a frame, never a panic.
        #[test]
        fn hostile_frames_are_errors(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = BlobFrame::split(bytes.into());
        }

        /// A truncated frame is an error, never a shorter payload taken for the blob's metadata.
        #[test]
        fn a_cut_frame_is_refused(blob in blob(), cut in 0usize..1000) {
            let head = BlobFrame::head(&blob);
            let cut = cut % head.len();
            prop_assert!(BlobFrame::split(head.slice(..cut)).is_err());
        }
    }
}
