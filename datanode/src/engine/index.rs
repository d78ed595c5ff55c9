//! The per-volume redb database: typed tables and their versioned values.
//!
//! One database holds the index, the replication journal, the segment table and the log tail, so
//! that one transaction moves them together. Every value starts with a format byte.

use cairn_common::blob_id::{BlobId, BLOB_ID_BYTES};
use redb::{ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::record::RecordKind;
use super::VolumeError;

/// blob id → [`IndexEntry`]
pub const BLOBS: TableDefinition<[u8; BLOB_ID_BYTES], &[u8]> = TableDefinition::new("blobs");
/// journal sequence number → [`JournalEntry`]
pub const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
/// segment number → [`SegmentInfo`] for every segment that holds records
pub const SEGMENTS: TableDefinition<u32, &[u8]> = TableDefinition::new("segments");
/// singletons: [`LOG_TAIL`], [`COMPACTION`]
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Replication: peer node id → the next journal sequence to pull from that peer's replica.
pub const REPLICATION: TableDefinition<&str, u64> = TableDefinition::new("replication");

/// Put records recovery found damaged, by blob id → [`DamagedRecord`]. The blob is not in
/// `blobs`; it waits for a replica to send it again (replication does), which removes it here.
pub const DAMAGED: TableDefinition<[u8; BLOB_ID_BYTES], &[u8]> = TableDefinition::new("damaged");

/// Replication entries this replica could not apply yet, by (peer node id, the entry's sequence
/// in that peer's journal) → [`OwedEntry`]. Written in the transaction that moves the peer's
/// token past them, so an entry is always either still ahead of the token or owed.
pub const OWED: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("owed");

/// Name records (`engine::names`) by (space, name, version) → [`NameEntry`](super::names::NameEntry):
/// every version this replica holds or held, a deleted one kept as dead.
pub const NAMES: TableDefinition<(&str, &str, u128), &[u8]> = TableDefinition::new("names");
/// Before [`ENTRY_FORMAT`] 2: a name record's id → [`NameKey`]. Opening a volume moves its rows
/// into the [`IndexEntry::name`] of their `blobs` entries and drops it (a random-key insert per
/// name record was the dearest part of an S3 PUT in the writer).
pub const LEGACY_NAME_IDS: TableDefinition<[u8; BLOB_ID_BYTES], &[u8]> = TableDefinition::new("name_ids");

/// Every version of `name` in `space` that `names` holds, oldest first.
pub fn name_versions(
    names: &impl ReadableTable<(&'static str, &'static str, u128), &'static [u8]>,
    space: &str,
    name: &str,
) -> Result<Vec<(u128, super::names::NameEntry)>, VolumeError> {
    let mut out = Vec::new();
    for row in names.range((space, name, 0u128)..=(space, name, u128::MAX))? {
        let (key, value) = row?;
        out.push((key.value().2, decode(value.value())?));
    }
    Ok(out)
}

/// Where a name record is in [`NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameKey {
    pub space: String,
    pub name: String,
    pub version: u128,
}

/// A peer's journal entry not applied yet: retried with back-off until it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwedEntry {
    /// The blob id as the peer's journal gave it (kept as text: a corrupt entry is owed too).
    pub id: String,
    pub kind: String,
    pub last_error: String,
    pub attempts: u32,
    pub first_failed_ms: u64,
    pub next_retry_ms: u64,
}

/// Key of the [`LogTail`] in [`META`]: the durable mark recovery replays from.
pub const LOG_TAIL: &str = "log_tail";
/// Key of the in-flight [`CompactionState`] in [`META`].
pub const COMPACTION: &str = "compaction";
/// Key of the number of live blobs (`u64`) in [`META`], moved in the transaction that changes it.
/// A volume written before the count existed has no key: recovery counts once and stores it.
pub const LIVE_BLOBS: &str = "live_blobs";

/// Key of the journal head (`u64`) in [`META`]: entries below it were truncated (every peer had
/// them, or they fell out of the retained journal). No key: nothing was ever truncated.
pub const JOURNAL_HEAD: &str = "journal_head";

/// Adds `delta` to the [`LIVE_BLOBS`] count.
pub fn add_live_blobs(meta: &mut redb::Table<'_, &'static str, &'static [u8]>, delta: i64) -> Result<(), VolumeError> {
    if delta == 0 {
        return Ok(());
    }
    let count: u64 = get(&*meta, LIVE_BLOBS)?.unwrap_or(0);
    meta.insert(LIVE_BLOBS, encode(&count.saturating_add_signed(delta)).as_slice())?;
    Ok(())
}

const VALUE_FORMAT: u8 = 1;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    super::versioned::encode(VALUE_FORMAT, value)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, VolumeError> {
    super::versioned::decode(VALUE_FORMAT, bytes).map_err(|e| VolumeError::Corrupt(format!("index value: {e}")))
}

/// Where a record lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    pub segment: u32,
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobState {
    /// `location` is the put record.
    Live,
    /// `location` is the tombstone (kept so replication never resurrects the blob).
    Deleted,
    /// Expired and reclaimed by compaction; no record remains.
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub state: BlobState,
    pub location: Option<Location>,
    pub payload_len: u64,
    pub meta_len: u32,
    pub created_ms: u64,
    pub expiry_ms: Option<u64>,
    pub deleted_ms: Option<u64>,
    /// Trailer CRC of the put record: identifies the exact bytes (idempotent replays).
    pub crc: u32,
    /// Journal sequence of the record `location` points at.
    pub seq: u64,
    /// A live name record's row in [`NAMES`], so that deleting the record finds it.
    pub name: Option<NameKey>,
    /// When `expiry_ms` was set: the put's `created_ms`, then each TTL change's stamp. Replicas
    /// keep the expiry with the highest ([`ttl_order`]) stamp, so that they agree on one.
    pub expiry_set_ms: u64,
}

/// The order of two expiries set on replicas of one blob: the later stamp wins, and between
/// equal stamps the later expiry (never expiring above all), so that every replica picks alike.
pub fn ttl_order(set_ms: u64, expiry_ms: Option<u64>) -> (u64, u64) {
    (set_ms, expiry_ms.unwrap_or(u64::MAX))
}

/// An [`IndexEntry`] as format 1 stored it (before [`IndexEntry::name`]).
#[derive(Serialize, Deserialize)]
struct IndexEntryV1 {
    state: BlobState,
    location: Option<Location>,
    payload_len: u64,
    meta_len: u32,
    created_ms: u64,
    expiry_ms: Option<u64>,
    deleted_ms: Option<u64>,
    crc: u32,
    seq: u64,
}

impl IndexEntryV1 {
    fn of(entry: &IndexEntry) -> Self {
        let IndexEntry { state, location, payload_len, meta_len, created_ms, expiry_ms, deleted_ms, crc, seq, .. } =
            entry.clone();
        IndexEntryV1 { state, location, payload_len, meta_len, created_ms, expiry_ms, deleted_ms, crc, seq }
    }

    /// The entry with the fields format 2 added: format 1 kept no stamp of the expiry, so the
    /// put's time stands for it, below any change made since; its name row, if any, is still in
    /// [`LEGACY_NAME_IDS`] (moved over when the volume opens).
    fn upgrade(self) -> IndexEntry {
        let IndexEntryV1 { state, location, payload_len, meta_len, created_ms, expiry_ms, deleted_ms, crc, seq } = self;
        IndexEntry {
            state,
            location,
            payload_len,
            meta_len,
            created_ms,
            expiry_ms,
            deleted_ms,
            crc,
            seq,
            name: None,
            expiry_set_ms: created_ms,
        }
    }
}

/// The format of [`BLOBS`] values (format 1 added neither [`IndexEntry::name`] nor
/// [`IndexEntry::expiry_set_ms`]); [`decode_entry`] reads format 1 too.
const ENTRY_FORMAT: u8 = 2;

pub fn encode_entry(entry: &IndexEntry) -> Vec<u8> {
    super::versioned::encode(ENTRY_FORMAT, entry)
}

/// `entry` as format 1 wrote it (without its name): for tests of volumes that old.
#[doc(hidden)]
pub fn encode_entry_v1(entry: &IndexEntry) -> Vec<u8> {
    super::versioned::encode(VALUE_FORMAT, &IndexEntryV1::of(entry))
}

pub fn decode_entry(bytes: &[u8]) -> Result<IndexEntry, VolumeError> {
    let corrupt = |e: String| VolumeError::Corrupt(format!("blob index value: {e}"));
    match bytes.first() {
        Some(&VALUE_FORMAT) => {
            super::versioned::decode::<IndexEntryV1>(VALUE_FORMAT, bytes).map(IndexEntryV1::upgrade).map_err(corrupt)
        }
        _ => super::versioned::decode(ENTRY_FORMAT, bytes).map_err(corrupt),
    }
}

/// The [`BLOBS`] entry of `key`, if there is one.
pub fn get_entry(
    table: &impl ReadableTable<[u8; BLOB_ID_BYTES], &'static [u8]>,
    key: [u8; BLOB_ID_BYTES],
) -> Result<Option<IndexEntry>, VolumeError> {
    match table.get(key)? {
        Some(guard) => Ok(Some(decode_entry(guard.value())?)),
        None => Ok(None),
    }
}

impl IndexEntry {
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.state == BlobState::Expired || self.expiry_ms.is_some_and(|e| e <= now_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub blob_id: [u8; BLOB_ID_BYTES],
    pub kind: RecordKind,
    /// Where the record was written; compaction updates it when it moves a still-current record.
    pub location: Location,
}

impl JournalEntry {
    pub fn blob_id(&self) -> BlobId {
        BlobId::from_bytes(&self.blob_id).expect("journal holds valid ids")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentInfo {
    /// Bytes of records the index still points at.
    pub live_bytes: u64,
    /// End of the last record (the write position for the active segment).
    pub end: u64,
    pub sealed: bool,
}

/// A damaged put record: where it was and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamagedRecord {
    pub segment: u32,
    pub offset: u64,
    pub reason: String,
    pub found_ms: u64,
    /// Peers that answered they never had the blob.
    pub absent_on: Vec<String>,
}

/// The durable mark: everything before it is reflected in the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogTail {
    pub segment: u32,
    pub offset: u64,
    pub next_seq: u64,
    pub next_segment: u32,
}

/// Compaction progress that must survive a crash (see docs/design.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompactionState {
    /// Needed records are being copied from `sources` into `target`; on restart: delete `target`.
    Copying { sources: Vec<u32>, target: Option<u32> },
    /// The index points into `target`; on restart: delete the `sources`.
    Switched { sources: Vec<u32>, target: Option<u32> },
}

pub fn get<K, T>(table: &impl ReadableTable<K, &'static [u8]>, key: K::SelfType<'_>) -> Result<Option<T>, VolumeError>
where
    K: redb::Key + 'static,
    T: DeserializeOwned,
{
    // Decode copies the value out of the transaction's page before the guard is dropped.
    match table.get(key)? {
        Some(guard) => Ok(Some(decode(guard.value())?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever bytes an index value holds (a rotten page, a hostile file), decoding answers
        /// an error or a value, never a panic.
        #[test]
        fn hostile_index_values_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_entry(&bytes);
            let _ = decode::<JournalEntry>(&bytes);
            let _ = decode::<SegmentInfo>(&bytes);
            let _ = decode::<DamagedRecord>(&bytes);
            let _ = decode::<LogTail>(&bytes);
        }
    }

    #[test]
    fn values_are_versioned() {
        let tail = LogTail { segment: 3, offset: 99, next_seq: 7, next_segment: 4 };
        let bytes = encode(&tail);
        assert_eq!(bytes[0], VALUE_FORMAT);
        assert_eq!(decode::<LogTail>(&bytes).unwrap(), tail);
        let mut future = bytes.clone();
        future[0] = 2;
        assert!(matches!(decode::<LogTail>(&future), Err(VolumeError::Corrupt(_))));
        assert!(decode::<LogTail>(&[]).is_err());
    }

    /// Every format of `blobs` values still reads, and formats without a stamp take the put's
    /// time for it.
    #[test]
    fn blob_entries_of_every_format_read() {
        let entry = IndexEntry {
            state: BlobState::Live,
            location: Some(Location { segment: 1, offset: 64, len: 300 }),
            payload_len: 200,
            meta_len: 20,
            created_ms: 1_000,
            expiry_ms: Some(9_000),
            deleted_ms: None,
            crc: 7,
            seq: 3,
            name: Some(NameKey { space: "space".into(), name: "name".into(), version: 5 }),
            expiry_set_ms: 4_000,
        };
        let v2 = encode_entry(&entry);
        assert_eq!(v2[0], 2);
        assert_eq!(decode_entry(&v2).unwrap(), entry);
        // Format 1 as the release that wrote it declared it.
        #[derive(Serialize)]
        struct WrittenAsV1 {
            state: BlobState,
            location: Option<Location>,
            payload_len: u64,
            meta_len: u32,
            created_ms: u64,
            expiry_ms: Option<u64>,
            deleted_ms: Option<u64>,
            crc: u32,
            seq: u64,
        }
        let e = entry.clone();
        let v1 = super::super::versioned::encode(
            VALUE_FORMAT,
            &WrittenAsV1 {
                state: e.state,
                location: e.location,
                payload_len: e.payload_len,
                meta_len: e.meta_len,
                created_ms: e.created_ms,
                expiry_ms: e.expiry_ms,
                deleted_ms: e.deleted_ms,
                crc: e.crc,
                seq: e.seq,
            },
        );
        let upgraded = IndexEntry { expiry_set_ms: 1_000, name: None, ..entry.clone() };
        assert_eq!(decode_entry(&v1).unwrap(), upgraded);
        assert_eq!(encode_entry_v1(&entry), v1, "the test helper writes what format 1 wrote");
        let mut future = v2.clone();
        future[0] = 3;
        assert!(decode_entry(&future).is_err());
    }

    #[test]
    fn the_later_stamp_wins_then_the_later_expiry() {
        assert!(ttl_order(2, Some(1)) > ttl_order(1, None));
        assert!(ttl_order(2, None) > ttl_order(2, Some(u64::MAX - 1)));
        assert!(ttl_order(2, Some(5)) > ttl_order(2, Some(4)));
    }
}
