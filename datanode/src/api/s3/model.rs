//! What the S3 front stores: an object is a name record (space = its bucket, name = its key)
//! whose body is an [`ObjectRecord`] listing the blobs that hold its bytes; a bucket is a name
//! record in the bucket space ([`BUCKET_SPACE`]) whose body is a [`BucketRecord`]. Both
//! encodings are versioned (a format byte, then postcard).

use cairn_common::blob_id::{BlobId, BLOB_ID_BYTES};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::checksum::Checksum;
use super::error::S3Error;
use crate::engine::versioned;

const FORMAT: u8 = 1;

/// The space of bucket records: no bucket name is empty, so no bucket's objects share it.
pub const BUCKET_SPACE: &str = "";
/// S3's limit on a key, bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;
/// S3's limit on user metadata (`x-amz-meta-*` names and values), bytes.
pub const MAX_USER_META_BYTES: usize = 2048;

/// One blob holding a run of an object's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    pub id: [u8; BLOB_ID_BYTES],
    pub len: u64,
}

impl Piece {
    pub fn blob_id(&self) -> Result<BlobId, S3Error> {
        BlobId::from_bytes(&self.id).map_err(|e| S3Error::internal(format!("an object's piece id is invalid: {e}")))
    }
}

/// An object's record: format 2 ([`ObjectRecord::encode`]; format 1, before multipart uploads,
/// had no `parts` and still decodes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRecord {
    pub size: u64,
    /// Without quotes: hex MD5 of the bytes for an object put whole.
    pub etag: String,
    pub content_type: String,
    /// `x-amz-meta-*` pairs, names lower-cased, without the prefix.
    pub user_meta: Vec<(String, String)>,
    /// Content-Encoding, Content-Disposition, Cache-Control, Content-Language, Expires: given at
    /// upload, returned on reads.
    pub headers: Vec<(String, String)>,
    pub checksum: Option<Checksum>,
    /// The bytes, in order: in blobs of their own...
    pub pieces: Vec<Piece>,
    /// ...or, for a small object, here (`pieces` then empty).
    #[serde(with = "serde_bytes")]
    pub inline: Vec<u8>,
    /// A multipart object's parts' sizes, in order (`?partNumber` reads one); empty for an object
    /// put whole.
    pub parts: Vec<u64>,
}

/// An object's record as format 1 wrote it.
#[derive(Deserialize)]
struct ObjectRecordV1 {
    size: u64,
    etag: String,
    content_type: String,
    user_meta: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    checksum: Option<Checksum>,
    pieces: Vec<Piece>,
    #[serde(with = "serde_bytes")]
    inline: Vec<u8>,
}

const OBJECT_FORMAT: u8 = 2;

impl ObjectRecord {
    pub fn encode(&self) -> Vec<u8> {
        versioned::encode(OBJECT_FORMAT, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, S3Error> {
        let old = |v: ObjectRecordV1| ObjectRecord {
            size: v.size,
            etag: v.etag,
            content_type: v.content_type,
            user_meta: v.user_meta,
            headers: v.headers,
            checksum: v.checksum,
            pieces: v.pieces,
            inline: v.inline,
            parts: Vec::new(),
        };
        match bytes.first() {
            Some(&FORMAT) => versioned::decode::<ObjectRecordV1>(FORMAT, bytes).map(old),
            _ => versioned::decode(OBJECT_FORMAT, bytes),
        }
        .map_err(|e| S3Error::internal(format!("an object's record does not decode: {e}")))
    }
}

/// What a listing shows of an object, kept in the name index beside its name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectSummary {
    pub size: u64,
    pub etag: String,
}

impl ObjectRecord {
    pub fn summary(&self) -> ObjectSummary {
        ObjectSummary { size: self.size, etag: self.etag.clone() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketRecord {
    pub created_ms: u64,
    /// The partitions the bucket's object names are spread over, fixed at its creation (a
    /// key's is `partitions[hash(key) % len]`), so that a node given more partitions later
    /// still finds every name.
    pub partitions: Vec<u32>,
}

/// A multipart upload in progress: a name record in [`uploads_space`] named
/// [`upload_name`]`(key, upload id)`, in the partition of its key. Its parts are name records
/// in [`parts_space`] named [`part_name`], in the same partition, each an [`ObjectRecord`]
/// (never inline) whose pieces the completed object takes over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRecord {
    pub content_type: String,
    pub user_meta: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    /// The checksum algorithm named at creation: every part uploaded carries its checksum.
    pub checksum: Option<super::checksum::Algorithm>,
    /// When it was created (ListMultipartUploads' `Initiated`; also the record's summary).
    pub initiated_ms: u64,
    /// Set before a completion commits its object: from then on the upload takes no change,
    /// and its parts' pieces may be the object's.
    pub completing: Option<Completion>,
}

/// What a completion commits (a retried completion that finds this object current answers its
/// ETag again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    pub etag: String,
    /// The version of the object's record, chosen before the marker is written: a retried
    /// completion looks that record up by its id to learn whether it was written.
    pub version: u128,
}

/// S3's most parts per upload, and their numbers' range.
pub const MAX_PARTS: u32 = 10_000;
/// S3's least size of a part that is not the last.
pub const MIN_PART_BYTES: u64 = 5 << 20;

/// The space of a bucket's multipart uploads. No bucket name holds `+`, so no bucket's objects
/// share it.
pub fn uploads_space(bucket: &str) -> String {
    format!("+uploads/{bucket}")
}

/// The space of the parts of a bucket's multipart uploads.
pub fn parts_space(bucket: &str) -> String {
    format!("+parts/{bucket}")
}

/// An upload's name: its key, a NUL (which sorts below every other character, so uploads list
/// in key order), its id.
pub fn upload_name(key: &str, upload_id: &str) -> String {
    format!("{key}\0{upload_id}")
}

/// The key and upload id an upload's name holds.
pub fn split_upload_name(name: &str) -> Option<(&str, &str)> {
    name.rsplit_once('\0')
}

/// The name of a part of an upload; all of an upload's parts share the prefix
/// [`parts_prefix`] and list in part-number order.
pub fn part_name(upload_id: &str, part_number: u32) -> String {
    format!("{upload_id}/{part_number:05}")
}

pub fn parts_prefix(upload_id: &str) -> String {
    format!("{upload_id}/")
}

/// A new upload id: 32 hex digits, the time in milliseconds then 80 random bits, so that one
/// key's uploads list by age as S3 lists them.
pub fn new_upload_id() -> String {
    let random = rand::random::<u128>() & ((1u128 << 80) - 1);
    format!("{:012x}{random:020x}", crate::engine::now_ms() & ((1u64 << 48) - 1))
}

/// Whether `text` is shaped like an upload id this server gives (any other is NoSuchUpload).
pub fn is_upload_id(text: &str) -> bool {
    text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    versioned::encode(FORMAT, value)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, S3Error> {
    versioned::decode(FORMAT, bytes).map_err(|e| S3Error::internal(format!("an S3 record does not decode: {e}")))
}

/// The partition of `key` among a bucket's.
pub fn partition_of(partitions: &[u32], key: &str) -> u32 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    let n = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    partitions[(n % partitions.len() as u64) as usize]
}

/// S3's rules for a bucket name (`cairn_common::bucket_name`), as S3's error.
pub fn check_bucket_name(name: &str) -> Result<(), S3Error> {
    match cairn_common::bucket_name::problem(name) {
        None => Ok(()),
        Some(why) => Err(S3Error {
            resource: Some(name.chars().take(80).collect()),
            ..S3Error::invalid_bucket_name(format!("the specified bucket is not valid: {why}"))
        }),
    }
}

/// A key S3 accepts: 1 to 1,024 bytes of UTF-8, without the control characters XML 1.0
/// cannot carry (every listing and multipart answer holding such a key would break its
/// client's parser; NUL also separates a key from an upload id in upload names).
pub fn check_key(key: &str) -> Result<(), S3Error> {
    if key.is_empty() {
        return Err(S3Error::invalid_argument("an object key cannot be empty"));
    }
    if key.chars().any(|c| c < ' ' && !matches!(c, '\t' | '\n' | '\r')) {
        return Err(S3Error::invalid_argument(
            "an object key cannot hold control characters other than tab, line feed and carriage return (XML 1.0 cannot carry them)",
        ));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(S3Error::key_too_long(format!("your key is {} bytes; the limit is {MAX_KEY_BYTES}", key.len())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_bucket_name_is_s3s_error() {
        assert!(check_bucket_name("abc").is_ok());
        let refused = check_bucket_name("My-Bucket").unwrap_err();
        assert_eq!((refused.code, refused.resource.as_deref()), ("InvalidBucketName", Some("My-Bucket")));
    }

    #[test]
    fn keys_are_1_to_1024_bytes() {
        assert!(check_key(&"k".repeat(1024)).is_ok());
        assert_eq!(check_key(&"k".repeat(1025)).unwrap_err().code, "KeyTooLongError");
        // 1,024 bytes, not characters: 342 three-byte characters are 1,026 bytes.
        assert!(check_key(&"€".repeat(341)).is_ok());
        assert!(check_key(&"€".repeat(342)).is_err());
        assert!(check_key("").is_err());
        assert!(check_key("a\tb\nc\r").is_ok());
        for bad in ["a\0b", "\u{1}", "x\u{1f}"] {
            assert_eq!(check_key(bad).unwrap_err().code, "InvalidArgument", "{bad:?}");
        }
    }

    #[test]
    fn objects_written_before_multipart_still_read() {
        #[derive(Serialize)]
        struct V1<'a> {
            size: u64,
            etag: &'a str,
            content_type: &'a str,
            user_meta: Vec<(String, String)>,
            headers: Vec<(String, String)>,
            checksum: Option<Checksum>,
            pieces: Vec<Piece>,
            #[serde(with = "serde_bytes")]
            inline: Vec<u8>,
        }
        let piece = Piece { id: [7; BLOB_ID_BYTES], len: 9 };
        let v1 = V1 {
            size: 9,
            etag: "abc",
            content_type: "text/plain",
            user_meta: vec![("a".into(), "1".into())],
            headers: vec![],
            checksum: None,
            pieces: vec![piece.clone()],
            inline: vec![],
        };
        let read = ObjectRecord::decode(&versioned::encode(1, &v1)).unwrap();
        assert_eq!(
            (read.size, read.etag.as_str(), read.pieces.clone(), read.parts.clone()),
            (9, "abc", vec![piece], vec![])
        );
        let now = ObjectRecord { parts: vec![5, 4], ..read };
        let bytes = now.encode();
        assert_eq!(bytes[0], 2);
        assert_eq!(ObjectRecord::decode(&bytes).unwrap(), now);
        // Read as another record's format, it is refused, not misread.
        assert!(decode::<BucketRecord>(&bytes).is_err());
    }

    #[test]
    fn records_are_versioned() {
        let bucket = BucketRecord { created_ms: 5, partitions: vec![0, 1] };
        let bytes = encode(&bucket);
        assert_eq!(bytes[0], FORMAT);
        assert_eq!(decode::<BucketRecord>(&bytes).unwrap(), bucket);
        let mut future = bytes;
        future[0] = 2;
        assert!(decode::<BucketRecord>(&future).is_err());
    }

    #[test]
    fn keys_spread_over_every_partition() {
        let partitions = [3, 5, 9];
        let hit: std::collections::BTreeSet<u32> =
            (0..300).map(|i| partition_of(&partitions, &format!("key-{i}"))).collect();
        assert_eq!(hit.into_iter().collect::<Vec<_>>(), partitions);
        assert_eq!(partition_of(&partitions, "same"), partition_of(&partitions, "same"));
    }
}
