//! Name records: a blob whose id is a name id (`BlobId::is_name`) and whose payload says which
//! name, in which space, it records, at which version (the S3 front's object names: space =
//! bucket, name = key). Everything else about them is a blob's — they are written, replicated,
//! repaired and compacted as blobs are — and the volume keeps an index of them by name
//! ([`index::NAMES`](super::index::NAMES)), moved in the same transaction as the blob index.
//!
//! A name's current record is its newest version the volume holds; deleting a record takes it
//! out of the index. A front that must order deletes against late older writes (a cluster's: a
//! version only a replica that was down holds comes back with it) writes a newer record that says
//! so, a **delete marker** ([`NameRecord::delete_marker`]), rather than relying on what is absent:
//! a name whose newest version is a marker has no current record.
//!
//! Payload (format 1): a format byte, then postcard of [`NameRecord`].

use cairn_common::BlobId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::VolumeError;

const NAME_RECORD_FORMAT: u8 = 1;
/// The longest name (S3's key limit is 1,024 bytes, and a multipart upload's name is a key and
/// an upload id) and space (a bucket name is at most 63).
pub const MAX_NAME_BYTES: usize = 1024 + 64;
pub const MAX_SPACE_BYTES: usize = 255;
/// The most bytes of a record's summary, which the name index keeps beside it.
pub const MAX_SUMMARY_BYTES: usize = 256;
/// The summary of a delete marker. A front's own summaries never begin with 0xFF (they begin
/// with their format byte, or are empty).
pub const DELETE_MARKER: &[u8] = b"\xffdeleted";
/// The content type a name record is stored with.
pub const NAME_RECORD_CONTENT_TYPE: &str = "application/vnd.cairn.name-record";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameRecord {
    pub space: String,
    pub name: String,
    /// Newer is greater; writers make it from the time and a random tie-breaker, so that
    /// concurrent writers of one name are ordered alike on every replica.
    pub version: u128,
    /// A few bytes the name index keeps (a listing reads them without reading the record).
    #[serde(with = "serde_bytes")]
    pub summary: Vec<u8>,
    /// What the name stands for: the front's, opaque here.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

impl NameRecord {
    /// A record within the limits, or why not.
    pub fn new(
        space: String,
        name: String,
        version: u128,
        summary: Vec<u8>,
        body: Vec<u8>,
    ) -> Result<Self, VolumeError> {
        within_limits(&space, &name, &summary)?;
        Ok(Self { space, name, version, summary, body })
    }

    /// A delete marker: `name` is deleted at `version`, whatever older versions turn up later.
    pub fn delete_marker(space: String, name: String, version: u128) -> Result<Self, VolumeError> {
        Self::new(space, name, version, DELETE_MARKER.to_vec(), Vec::new())
    }

    /// The id of this record in `partition`: a digest of space, name and version, the same on
    /// every replica and for every writer.
    pub fn id(&self, partition: u32) -> BlobId {
        name_id(partition, &self.space, &self.name, self.version)
    }

    pub fn encode(&self) -> Vec<u8> {
        super::versioned::encode(NAME_RECORD_FORMAT, self)
    }

    /// The blob metadata every name record is stored with.
    pub fn blob_meta() -> super::BlobMeta {
        super::BlobMeta::new(NAME_RECORD_CONTENT_TYPE.into(), Vec::new()).expect("a valid content type")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, VolumeError> {
        NameRecordRef::decode(bytes).map(NameRecordRef::to_record)
    }

    /// Decodes the record a name id's put carries, and checks that the id is its id.
    pub fn decode_for(id: BlobId, payload: &[u8]) -> Result<Self, VolumeError> {
        NameRecordRef::decode_for(id, payload).map(NameRecordRef::to_record)
    }
}

/// A [`NameRecord`] read in place from its payload: what the volume's writer checks and indexes
/// without copying the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct NameRecordRef<'a> {
    pub space: &'a str,
    pub name: &'a str,
    pub version: u128,
    #[serde(with = "serde_bytes")]
    pub summary: &'a [u8],
    #[serde(with = "serde_bytes")]
    pub body: &'a [u8],
}

impl<'a> NameRecordRef<'a> {
    /// The record `bytes` hold, within the limits, or why not.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, VolumeError> {
        let record: NameRecordRef<'a> = super::versioned::decode(NAME_RECORD_FORMAT, bytes)
            .map_err(|e| VolumeError::Integrity(format!("name record: {e}")))?;
        within_limits(record.space, record.name, record.summary)?;
        Ok(record)
    }

    /// Decodes the record a name id's put carries, and checks that the id is its id.
    pub fn decode_for(id: BlobId, payload: &'a [u8]) -> Result<Self, VolumeError> {
        let record = Self::decode(payload)?;
        if name_id(id.partition(), record.space, record.name, record.version) != id {
            return Err(VolumeError::Integrity(format!("name record {id} does not record the name its id names")));
        }
        Ok(record)
    }

    /// The record with its own copies of the fields.
    pub fn to_record(self) -> NameRecord {
        NameRecord {
            space: self.space.to_owned(),
            name: self.name.to_owned(),
            version: self.version,
            summary: self.summary.to_vec(),
            body: self.body.to_vec(),
        }
    }
}

fn within_limits(space: &str, name: &str, summary: &[u8]) -> Result<(), VolumeError> {
    if space.len() > MAX_SPACE_BYTES || name.len() > MAX_NAME_BYTES || summary.len() > MAX_SUMMARY_BYTES {
        return Err(VolumeError::Integrity(format!(
            "a name record's space is at most {MAX_SPACE_BYTES} bytes, its name {MAX_NAME_BYTES}, its summary {MAX_SUMMARY_BYTES}"
        )));
    }
    Ok(())
}

pub fn name_id(partition: u32, space: &str, name: &str, version: u128) -> BlobId {
    let mut sha = Sha256::new();
    for part in [space.as_bytes(), name.as_bytes()] {
        sha.update((part.len() as u64).to_be_bytes());
        sha.update(part);
    }
    sha.update(version.to_be_bytes());
    let digest = sha.finalize();
    BlobId::name(partition, u128::from_be_bytes(digest[..16].try_into().expect("16 bytes")))
}

/// A new version for a record written now: milliseconds since the epoch, then 64 random bits;
/// above every version this process made before, so that of two writes of a name the later one
/// is the newer even within a millisecond or across a step back of the clock.
pub fn new_version() -> u128 {
    let fresh = (u128::from(super::now_ms()) << 64) | u128::from(rand::random::<u64>());
    let mut last = LAST_VERSION.lock().expect("version clock");
    *last = fresh.max(*last + 1);
    *last
}

static LAST_VERSION: std::sync::Mutex<u128> = std::sync::Mutex::new(0);

/// Tells the version clock of a version seen in the store (made before a restart by a clock that
/// was ahead): every version made afterwards is above it.
pub fn observe_version(seen: u128) {
    let mut last = LAST_VERSION.lock().expect("version clock");
    *last = (*last).max(seen);
}

/// The milliseconds since the epoch a version was made at.
pub fn version_ms(version: u128) -> u64 {
    (version >> 64) as u64
}

/// One version of a name in the index (a record the volume holds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameEntry {
    pub id: [u8; cairn_common::blob_id::BLOB_ID_BYTES],
    #[serde(with = "serde_bytes")]
    pub summary: Vec<u8>,
}

impl NameEntry {
    pub fn blob_id(&self) -> BlobId {
        BlobId::from_bytes(&self.id).expect("the name index holds valid ids")
    }

    /// Whether this version is a delete marker (the name has no current record at it).
    pub fn is_delete_marker(&self) -> bool {
        self.summary == DELETE_MARKER
    }
}

/// A name's current version (its newest, if that one is live and not a delete marker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentName {
    pub name: String,
    pub version: u128,
    pub id: BlobId,
    pub summary: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn records_round_trip_and_ids_bind_them(space in "[a-z0-9.-]{0,63}", name in "\\PC{0,100}", version: u128, body in proptest::collection::vec(any::<u8>(), 0..100)) {
            let record = NameRecord::new(space, name, version, body.iter().take(10).copied().collect(), body).unwrap();
            let id = record.id(9);
            prop_assert!(id.is_name());
            prop_assert_eq!(NameRecord::decode_for(id, &record.encode()).unwrap(), record.clone());
            // Read in place, the record is the same, field by field.
            let encoded = record.encode();
            let view = NameRecordRef::decode_for(id, &encoded).unwrap();
            prop_assert_eq!((view.space, view.name, view.version), (record.space.as_str(), record.name.as_str(), version));
            prop_assert_eq!((view.summary, view.body), (record.summary.as_slice(), record.body.as_slice()));
            // Another version or name is another id, and the record is not its record; the same
            // record in another partition is another id too (a record does not say where it is).
            let other = name_id(9, &record.space, &record.name, version.wrapping_add(1));
            prop_assert!(NameRecord::decode_for(other, &record.encode()).is_err());
            prop_assert_ne!(record.id(10), id);
        }

        #[test]
        fn hostile_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = NameRecord::decode(&bytes);
        }
    }

    #[test]
    fn space_and_name_are_not_confused_at_their_boundary() {
        assert_ne!(name_id(0, "ab", "c", 1), name_id(0, "a", "bc", 1));
    }

    #[test]
    fn versions_made_one_after_another_increase() {
        let versions: Vec<u128> = (0..10_000).map(|_| new_version()).collect();
        assert!(versions.windows(2).all(|w| w[0] < w[1]));
        // A version from a clock ahead of this one (an hour): the next is above it.
        let ahead = (u128::from(super::super::now_ms() + 3_600_000) << 64) | 5;
        observe_version(ahead);
        assert!(new_version() > ahead);
    }

    #[test]
    fn versions_order_by_time_first() {
        let v = new_version();
        assert!(version_ms(v) >= 1_700_000_000_000);
        assert!((u128::from(version_ms(v) + 1) << 64) > v);
    }
}
