//! A volume: one partition replica on one disk.
//!
//! Writes go through one writer thread that group-commits: it drains every queued request,
//! appends their records to the active segment with one pwritev, makes them durable with one
//! fdatasync, applies them to the index in one redb transaction, and only then answers. See
//! docs/design.md for why the redb transaction may be non-durable and how recovery replays the
//! tail past the last durable checkpoint.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;
use cairn_common::blob_id::BlobId;
use cairn_common::volume_layout::{self as layout, VolumeMarker, FIRST_SEGMENT, SEGMENT_HEADER_LEN};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table, TableDefinition,
    WriteTransaction,
};
use serde::Serialize;
use tokio::sync::oneshot;

use super::chunk_cache::VolumeChunks;
use super::compaction::{self, Compactor};
use super::index::{
    self, BlobState, DamagedRecord, IndexEntry, JournalEntry, Location, LogTail, OwedEntry, SegmentInfo, BLOBS,
    DAMAGED, JOURNAL, LOG_TAIL, META, SEGMENTS,
};
use super::record::{
    self, BlobMeta, EncodedRecord, RecordError, RecordHeader, RecordKind, CHUNK_LEN, HEADER_LEN, SEAL_LEN,
};
use super::segments::{read_at, write_all_vectored_at, SegmentFiles};
use super::{now_ms, VolumeConfig, VolumeError};
use crate::metrics::EngineMetrics;

/// Whether a volume takes writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum VolumeHealth {
    Writable,
    /// No room for new blobs; reads, deletes and TTL updates go on.
    Full,
    /// New blobs refused for a passing reason (file descriptors exhausted, filesystem nearly
    /// full); reads, deletes and TTL updates go on, and the next put tries again.
    Stalled(String),
    /// An I/O error made the volume read-only until it is reopened.
    Failed(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct VolumeStats {
    pub partition: u32,
    pub volume_id: String,
    pub health: VolumeHealth,
    pub capacity_bytes: u64,
    /// Bytes of segment files (each preallocated to the segment size).
    pub allocated_bytes: u64,
    /// Bytes of records the index points at: live blobs (with their headers) and tombstones.
    pub live_bytes: u64,
    /// Bytes appended to the segments.
    pub written_bytes: u64,
    /// Written but no longer needed (deleted, expired, superseded): what compaction can give
    /// back to the volume.
    pub reclaimable_bytes: u64,
    /// Blobs stored and not deleted (expired ones count until compaction reclaims them).
    pub blobs: u64,
    pub segments: u32,
}

/// A new blob for [`Volume::put`].
#[derive(Debug, Clone)]
pub struct PutRequest {
    pub blob_id: BlobId,
    pub meta: BlobMeta,
    pub payload: Bytes,
    pub created_ms: u64,
    pub expiry_ms: Option<u64>,
}

enum WriteOp {
    Put(EncodedRecord),
    /// `tombstone_unknown`: also record the deletion of a blob this volume never had (a
    /// replica learning of a delete before the put), so that the put never lands later.
    Delete {
        blob_id: BlobId,
        at_ms: u64,
        tombstone_unknown: bool,
    },
    TtlUpdate {
        blob_id: BlobId,
        expiry_ms: Option<u64>,
        at_ms: u64,
    },
}

enum WriterMsg {
    Write(WriteOp, oneshot::Sender<Result<(), VolumeError>>),
    /// Commit durably now (used by tests and before compaction).
    Checkpoint(oneshot::Sender<Result<(), VolumeError>>),
    /// Stop without a final checkpoint, as a crash would (tests only).
    Abandon,
}

/// State shared by the writer, readers and compaction.
pub(crate) struct Shared {
    pub dir: PathBuf,
    pub marker: VolumeMarker,
    pub config: VolumeConfig,
    pub db: Database,
    pub segments: SegmentFiles,
    pub health: Mutex<VolumeHealth>,
    /// Allocator of segment numbers, for the writer and compaction alike.
    pub next_segment: AtomicU32,
    pub metrics: Arc<EngineMetrics>,
    /// The volume is stalled for want of disk space (which the writer can see come back), not for
    /// want of file descriptors (which only the next try can tell).
    stalled_for_space: std::sync::atomic::AtomicBool,
    /// The volume failed because its index could not grow on a full disk: reopened (healed) by
    /// the store once room is back, unlike every other failure.
    failed_for_space: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub fn health(&self) -> VolumeHealth {
        self.health.lock().expect("health lock").clone()
    }

    pub fn set_health(&self, new: VolumeHealth) {
        let mut health = self.health.lock().expect("health lock");
        // Failed is final until the volume is reopened.
        if !matches!(*health, VolumeHealth::Failed(_)) {
            if let VolumeHealth::Failed(reason) = &new {
                tracing::error!(volume = %self.dir.display(), %reason, "volume failed; it is read-only now");
            }
            *health = new;
        }
    }

    /// Refuses new blobs for a passing reason; `no_space` tells a full disk from other trouble.
    pub fn stall(&self, reason: String, no_space: bool) -> VolumeError {
        let mut health = self.health.lock().expect("health lock");
        if matches!(*health, VolumeHealth::Writable | VolumeHealth::Stalled(_)) {
            if *health == VolumeHealth::Writable {
                tracing::warn!(volume = %self.dir.display(), %reason, "volume takes no new blobs until this passes");
            }
            *health = VolumeHealth::Stalled(reason.clone());
            self.stalled_for_space.store(no_space, Ordering::SeqCst);
        }
        VolumeError::Paused { reason, no_space }
    }

    /// A put went through: whatever stalled the volume has passed.
    fn unstall(&self) {
        let mut health = self.health.lock().expect("health lock");
        if let VolumeHealth::Stalled(reason) = &*health {
            tracing::info!(volume = %self.dir.display(), %reason, "volume takes new blobs again");
            *health = VolumeHealth::Writable;
        }
    }

    /// Bytes free on the volume's filesystem (for unprivileged writers), and the index reserve
    /// there: the configured one, but at most 1% of the filesystem, so that a small disk whose
    /// space the disk agent has promised to volumes is not full from the start. `None` if unknown.
    fn disk_room(&self) -> Option<(u64, u64)> {
        let st = rustix::fs::statvfs(&self.dir).ok()?;
        let total = st.f_blocks.saturating_mul(st.f_frsize);
        Some((st.f_bavail.saturating_mul(st.f_frsize), self.config.index_reserve_bytes.min(total / 100)))
    }

    /// Whether a stall for disk space has passed: room for the index reserve, and for a new
    /// segment where the volume grows on demand.
    fn room_is_back(&self) -> bool {
        let segment = if self.marker.preallocated { 0 } else { self.marker.segment_size };
        self.disk_room().is_some_and(|(free, reserve)| free >= reserve + segment)
    }

    /// Free space of the volume's filesystem must stay above the index reserve for puts.
    fn check_disk_room(&self) -> Result<(), VolumeError> {
        match self.disk_room() {
            Some((_, 0)) => Ok(()),
            Some((free, reserve)) => {
                if free < reserve {
                    return Err(self.stall(
                        format!(
                            "the filesystem of {} has {free} bytes free, less than the {reserve} kept for the index",
                            self.dir.display()
                        ),
                        true,
                    ));
                }
                Ok(())
            }
            // Not knowing is no reason to refuse: the write itself will tell.
            None => Ok(()),
        }
    }

    pub fn fail(&self, what: &str, err: impl std::fmt::Display) -> VolumeError {
        let reason = format!("{what}: {err}");
        self.set_health(VolumeHealth::Failed(reason.clone()));
        VolumeError::Failed(reason)
    }

    /// Fails the volume for an index error; when the error is the disk being full (the index
    /// could not grow), the failure is one that reopening heals once room is back: redb wants a
    /// reopen after any I/O error, and recovery then replays the log past the durable mark.
    fn fail_index(&self, what: &str, err: impl std::fmt::Display) -> VolumeError {
        let text = err.to_string();
        // io::Error's Display ends with the OS error number; redb keeps it in its own errors.
        let no_space = ["(os error 28)", "(os error 122)"].iter().any(|code| text.contains(code));
        if no_space && !matches!(self.health(), VolumeHealth::Failed(_)) {
            self.failed_for_space.store(true, Ordering::SeqCst);
        }
        self.fail(what, text)
    }
}

pub struct Volume {
    shared: Arc<Shared>,
    writer: Mutex<Option<(mpsc::Sender<WriterMsg>, JoinHandle<()>)>>,
    compactor: Mutex<Option<Compactor>>,
    /// Held from open to close: no second process (or second open) can use the volume, and the
    /// disk agent refuses to delete it. Released by `close`, not by the last reader going away.
    lock: Mutex<Option<layout::VolumeLock>>,
}

impl Volume {
    /// Creates the volume directory if needed (layout shared with the disk agent) and opens it.
    pub fn create_or_open(
        dir: &Path,
        marker: &VolumeMarker,
        config: VolumeConfig,
        metrics: Arc<EngineMetrics>,
    ) -> Result<Self, VolumeError> {
        Self::create(dir, marker, &config)?;
        Self::open(dir, config, metrics)
    }

    /// Creates the volume directory unless it exists; refuses a geometry that cannot hold the
    /// configured largest blob before anything is created.
    pub fn create(dir: &Path, marker: &VolumeMarker, config: &VolumeConfig) -> Result<(), VolumeError> {
        if !dir.join(layout::MARKER_FILE).exists() {
            check_geometry(marker, config)?;
            layout::create_volume(dir, marker, config.preallocation)?;
        }
        Ok(())
    }

    /// Opens an existing volume: resolves an interrupted compaction, replays the log tail past
    /// the durable mark, erases a torn tail, then starts the writer and the compactor.
    pub fn open(dir: &Path, config: VolumeConfig, metrics: Arc<EngineMetrics>) -> Result<Self, VolumeError> {
        let marker = VolumeMarker::read(dir)?;
        check_geometry(&marker, &config)?;
        let lock = layout::VolumeLock::acquire(dir)?;
        let db = Database::builder().create(dir.join(layout::INDEX_FILE))?;
        let segments = SegmentFiles::new(config.chunk_cache.as_ref().map(|cache| cache.for_volume()));
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            marker,
            config,
            db,
            segments,
            health: Mutex::new(VolumeHealth::Writable),
            next_segment: AtomicU32::new(FIRST_SEGMENT + 1),
            metrics,
            stalled_for_space: Default::default(),
            failed_for_space: Default::default(),
        });
        let (log, rewrite) = recover(&shared)?;
        let (tx, rx) = mpsc::channel();
        let writer_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("cairn-writer-{}", shared.marker.partition))
            .spawn(move || Writer::new(writer_shared, log).run(rx))?;
        // Damaged deletes and TTL updates are written again, intact, before the volume serves.
        for h in rewrite {
            let op = match h.kind {
                RecordKind::Delete => {
                    WriteOp::Delete { blob_id: h.blob_id, at_ms: h.created_ms, tombstone_unknown: true }
                }
                _ => WriteOp::TtlUpdate { blob_id: h.blob_id, expiry_ms: h.expiry_ms, at_ms: h.created_ms },
            };
            let (reply, done) = oneshot::channel();
            let _ = tx.send(WriterMsg::Write(op, reply));
            match futures::executor::block_on(done) {
                Ok(Ok(()) | Err(VolumeError::Deleted | VolumeError::Expired | VolumeError::NotFound)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(VolumeError::Closed),
            }
        }
        let compactor = Compactor::start(shared.clone());
        Ok(Self {
            shared,
            writer: Mutex::new(Some((tx, handle))),
            compactor: Mutex::new(Some(compactor)),
            lock: Mutex::new(Some(lock)),
        })
    }

    pub fn partition(&self) -> u32 {
        self.shared.marker.partition
    }

    pub fn marker(&self) -> &VolumeMarker {
        &self.shared.marker
    }

    pub fn health(&self) -> VolumeHealth {
        self.shared.health()
    }

    pub fn max_blob_bytes(&self) -> u64 {
        self.shared.config.max_blob_bytes
    }

    fn submit(
        &self,
        msg_for: impl FnOnce(oneshot::Sender<Result<(), VolumeError>>) -> WriterMsg,
    ) -> oneshot::Receiver<Result<(), VolumeError>> {
        let (tx, rx) = oneshot::channel();
        let guard = self.writer.lock().expect("writer lock");
        if let Some((sender, _)) = guard.as_ref() {
            // A send error drops `tx`, and the receiver reports Closed.
            let _ = sender.send(msg_for(tx));
        }
        rx
    }

    async fn write(&self, op: WriteOp) -> Result<(), VolumeError> {
        self.submit(|reply| WriterMsg::Write(op, reply)).await.unwrap_or(Err(VolumeError::Closed))
    }

    fn check_writable_for_put(&self, payload_len: u64) -> Result<(), VolumeError> {
        let max = self.shared.config.max_blob_bytes;
        if payload_len > max {
            return Err(VolumeError::TooLarge { size: payload_len, max });
        }
        match self.shared.health() {
            // A stalled volume lets the writer try again: that is how it recovers.
            VolumeHealth::Writable | VolumeHealth::Stalled(_) => Ok(()),
            VolumeHealth::Full => Err(VolumeError::Full),
            VolumeHealth::Failed(reason) => Err(VolumeError::Failed(reason)),
        }
    }

    /// Stores a new blob; returns once its record and index entry are durable.
    pub async fn put(&self, req: PutRequest) -> Result<(), VolumeError> {
        self.check_writable_for_put(req.payload.len() as u64)?;
        let req = PutRequest { expiry_ms: record::normalize_expiry(req.expiry_ms), ..req };
        let record = encode_put(&req);
        self.write(WriteOp::Put(record)).await
    }

    /// Deletes a blob (idempotent); returns once the tombstone is durable.
    pub async fn delete(&self, blob_id: BlobId) -> Result<(), VolumeError> {
        self.write(WriteOp::Delete { blob_id, at_ms: now_ms(), tombstone_unknown: false }).await
    }

    /// Deletes a blob whether or not this replica has it yet; durable on return. Returns whether
    /// the blob was known here before.
    pub async fn tombstone(&self, blob_id: BlobId) -> Result<bool, VolumeError> {
        let existed = match self.entry(blob_id) {
            Ok(_) => true,
            Err(VolumeError::NotFound) => false,
            Err(e) => return Err(e),
        };
        self.write(WriteOp::Delete { blob_id, at_ms: now_ms(), tombstone_unknown: true }).await?;
        Ok(existed)
    }

    /// Where replication from `peer` goes on: the next journal sequence to pull.
    pub fn replication_token(&self, peer: &str) -> Result<u64, VolumeError> {
        let txn = self.shared.db.begin_read()?;
        let Some(table) = open_if_made(&txn, index::REPLICATION)? else { return Ok(0) };
        Ok(table.get(peer)?.map(|v| v.value()).unwrap_or(0))
    }

    /// Records replication progress. Written lazily (made durable by the next checkpoint): a
    /// token lost in a crash only makes replication pull entries again, which applies idempotently.
    pub fn set_replication_token(&self, peer: &str, next_seq: u64) -> Result<(), VolumeError> {
        let mut txn = self.shared.db.begin_write()?;
        txn.set_durability(redb::Durability::None)?;
        txn.open_table(index::REPLICATION)?.insert(peer, next_seq)?;
        txn.commit()?;
        Ok(())
    }

    /// Moves the token of `peer` to `next_seq` and records, in the same transaction, the entries
    /// before it that could not be applied (lazily durable, as the token: lost in a crash, both
    /// go back and the entries are pulled and tried again).
    pub fn advance_replication(&self, peer: &str, next_seq: u64, owed: &[(u64, OwedEntry)]) -> Result<(), VolumeError> {
        let txn = begin_write(&self.shared.db, false)?;
        txn.open_table(index::REPLICATION)?.insert(peer, next_seq)?;
        {
            let mut table = txn.open_table(index::OWED)?;
            for (seq, entry) in owed {
                table.insert((peer, *seq), index::encode(entry).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Every entry owed to this replica, as (peer, sequence, entry).
    pub fn owed(&self) -> Result<Vec<(String, u64, OwedEntry)>, VolumeError> {
        let txn = self.shared.db.begin_read()?;
        let Some(table) = open_if_made(&txn, index::OWED)? else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            let (peer, seq) = k.value();
            out.push((peer.to_owned(), seq, index::decode(v.value())?));
        }
        Ok(out)
    }

    /// An owed entry applied at last (`None`), or failed again (its new state).
    pub fn settle_owed(&self, peer: &str, seq: u64, still: Option<&OwedEntry>) -> Result<(), VolumeError> {
        let txn = begin_write(&self.shared.db, false)?;
        {
            let mut table = txn.open_table(index::OWED)?;
            match still {
                Some(entry) => {
                    table.insert((peer, seq), index::encode(entry).as_slice())?;
                }
                None => {
                    table.remove((peer, seq))?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// The next journal sequence this volume will write (entries below it exist).
    pub fn journal_tail(&self) -> Result<u64, VolumeError> {
        let txn = self.shared.db.begin_read()?;
        let journal = txn.open_table(JOURNAL)?;
        let tail = journal.last()?.map(|(k, _)| k.value() + 1).unwrap_or(0);
        Ok(tail)
    }

    /// Sets a new expiry (`None`: never expires).
    pub async fn update_ttl(&self, blob_id: BlobId, expiry_ms: Option<u64>) -> Result<(), VolumeError> {
        let expiry_ms = record::normalize_expiry(expiry_ms);
        self.write(WriteOp::TtlUpdate { blob_id, expiry_ms, at_ms: now_ms() }).await
    }

    /// Makes everything written so far durable in the index (normally done periodically).
    pub async fn checkpoint(&self) -> Result<(), VolumeError> {
        self.submit(WriterMsg::Checkpoint).await.unwrap_or(Err(VolumeError::Closed))
    }

    /// The index entry of `blob_id`, whatever its state.
    pub fn entry(&self, blob_id: BlobId) -> Result<IndexEntry, VolumeError> {
        let txn = self.shared.db.begin_read()?;
        let blobs = txn.open_table(BLOBS)?;
        index::get(&blobs, blob_id.to_bytes())?.ok_or(VolumeError::NotFound)
    }

    /// Whether this volume failed only because its index could not grow on a full disk, and room
    /// is back: then closing it and opening it again heals it (`Store::heal`).
    pub fn can_heal(&self) -> bool {
        matches!(self.health(), VolumeHealth::Failed(_))
            && self.shared.failed_for_space.load(Ordering::SeqCst)
            && self.shared.room_is_back()
    }

    /// What [`Volume::open`] needs to open this volume again once it is dropped.
    pub fn reopen_parts(&self) -> (PathBuf, VolumeConfig, Arc<EngineMetrics>) {
        (self.shared.dir.clone(), self.shared.config.clone(), self.shared.metrics.clone())
    }

    /// Blobs whose put record recovery found damaged: they wait for a replica to send them again.
    pub fn damaged(&self) -> Result<Vec<(BlobId, DamagedRecord)>, VolumeError> {
        let txn = self.shared.db.begin_read()?;
        let Some(table) = open_if_made(&txn, DAMAGED)? else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            let id = BlobId::from_bytes(&k.value()).map_err(|e| VolumeError::Corrupt(e.to_string()))?;
            out.push((id, index::decode(v.value())?));
        }
        Ok(out)
    }

    /// Notes that `peer` never had a damaged blob; returns every peer that said so.
    pub fn note_damaged_absent(&self, blob_id: BlobId, peer: &str) -> Result<Vec<String>, VolumeError> {
        let txn = begin_write(&self.shared.db, false)?;
        let absent = {
            let mut table = txn.open_table(DAMAGED)?;
            let Some(mut record) = index::get::<_, DamagedRecord>(&table, blob_id.to_bytes())? else {
                return Ok(Vec::new());
            };
            if !record.absent_on.iter().any(|p| p == peer) {
                record.absent_on.push(peer.to_owned());
                table.insert(blob_id.to_bytes(), index::encode(&record).as_slice())?;
            }
            record.absent_on
        };
        txn.commit()?;
        Ok(absent)
    }

    /// Drops a damaged blob no replica has: it was never acknowledged (a write a crash tore).
    pub fn forget_damaged(&self, blob_id: BlobId) -> Result<(), VolumeError> {
        let txn = begin_write(&self.shared.db, false)?;
        txn.open_table(DAMAGED)?.remove(blob_id.to_bytes())?;
        txn.commit()?;
        Ok(())
    }

    /// The damage recovery recorded for a blob the index does not know, if any.
    fn damaged_record(&self, blob_id: BlobId) -> Option<DamagedRecord> {
        let txn = self.shared.db.begin_read().ok()?;
        let table = txn.open_table(DAMAGED).ok()?;
        index::get::<_, DamagedRecord>(&table, blob_id.to_bytes()).ok()?
    }

    /// Deletes a blob this replica has, or had (also one recovery found damaged); leaves no
    /// tombstone for an id it never had. Whether it had the blob.
    pub async fn delete_if_present(&self, blob_id: BlobId) -> Result<bool, VolumeError> {
        match self.delete(blob_id).await {
            Ok(()) => Ok(true),
            Err(VolumeError::NotFound) if self.damaged_record(blob_id).is_some() => {
                self.tombstone(blob_id).await.map(|_| true)
            }
            Err(VolumeError::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Why a blob the index does not know is not here: unknown, or damaged and awaiting repair.
    fn missing(&self, blob_id: BlobId) -> VolumeError {
        match self.damaged_record(blob_id) {
            Some(d) => VolumeError::Integrity(format!(
                "blob {blob_id} was found damaged at segment {} offset {} ({}); it waits for another replica to send it again",
                d.segment, d.offset, d.reason
            )),
            None => VolumeError::NotFound,
        }
    }

    /// Opens a live blob for reading, with its metadata verified.
    pub fn open_blob(&self, blob_id: BlobId) -> Result<BlobReader, VolumeError> {
        // Compaction may move the record between the index lookup and the file lookup; the
        // second lookup then sees the new location.
        for _ in 0..3 {
            let entry = match self.entry(blob_id) {
                Err(VolumeError::NotFound) => return Err(self.missing(blob_id)),
                other => other?,
            };
            let now = now_ms();
            match entry.state {
                BlobState::Deleted => return Err(VolumeError::Deleted),
                BlobState::Expired => return Err(VolumeError::Expired),
                BlobState::Live if entry.is_expired(now) => return Err(VolumeError::Expired),
                BlobState::Live => {}
            }
            let location = entry.location.ok_or_else(|| VolumeError::Corrupt("live blob without location".into()))?;
            let Some(file) = self.shared.segments.get(location.segment) else {
                continue;
            };
            return BlobReader::open(&self.shared, blob_id, entry, location, file);
        }
        Err(VolumeError::Corrupt(format!("segment of blob {blob_id} vanished")))
    }

    /// Journal entries from `from_seq` on, at most `limit` (replication reads these).
    pub fn journal(&self, from_seq: u64, limit: usize) -> Result<Vec<(u64, JournalEntry)>, VolumeError> {
        let txn = self.shared.db.begin_read()?;
        let journal = txn.open_table(JOURNAL)?;
        let mut out = Vec::new();
        for item in journal.range(from_seq..)?.take(limit) {
            let (seq, value) = item?;
            out.push((seq.value(), index::decode(value.value())?));
        }
        Ok(out)
    }

    pub fn stats(&self) -> Result<VolumeStats, VolumeError> {
        let txn = self.shared.db.begin_read()?;
        let segments = txn.open_table(SEGMENTS)?;
        let (mut live_bytes, mut written_bytes) = (0, 0);
        for item in segments.iter()? {
            let (_, value) = item?;
            let info = index::decode::<SegmentInfo>(value.value())?;
            live_bytes += info.live_bytes;
            written_bytes += info.end.saturating_sub(SEGMENT_HEADER_LEN);
        }
        let blobs = index::get(&txn.open_table(META)?, index::LIVE_BLOBS)?.unwrap_or(0);
        let count = self.shared.segments.count();
        Ok(VolumeStats {
            partition: self.shared.marker.partition,
            volume_id: self.shared.marker.volume_id.clone(),
            health: self.shared.health(),
            capacity_bytes: self.shared.marker.capacity_bytes,
            allocated_bytes: u64::from(count) * self.shared.marker.segment_size,
            live_bytes,
            written_bytes,
            reclaimable_bytes: written_bytes.saturating_sub(live_bytes),
            blobs,
            segments: count,
        })
    }

    /// Compaction of this volume, phase by phase (normally the background compactor runs it).
    pub fn compaction(&self) -> compaction::CompactionSteps<'_> {
        compaction::CompactionSteps { shared: &self.shared }
    }

    /// Stops the compactor and the writer; the writer commits a final durable checkpoint.
    pub fn close(&self) {
        if let Some(compactor) = self.compactor.lock().expect("compactor lock").take() {
            compactor.stop();
        }
        if let Some((sender, handle)) = self.writer.lock().expect("writer lock").take() {
            drop(sender);
            let _ = handle.join();
        }
        self.lock.lock().expect("volume lock").take();
    }

    /// Stops as a crash would: no final checkpoint (tests of recovery).
    pub fn abandon(&self) {
        if let Some(compactor) = self.compactor.lock().expect("compactor lock").take() {
            compactor.stop();
        }
        if let Some((sender, handle)) = self.writer.lock().expect("writer lock").take() {
            let _ = sender.send(WriterMsg::Abandon);
            let _ = handle.join();
            self.lock.lock().expect("volume lock").take();
        }
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        self.close();
    }
}

/// The shortest record there is (no metadata, no payload): bounds how many records damaged
/// bytes of unknown content held.
const MIN_RECORD_LEN: u64 = HEADER_LEN + 4;
/// A tombstone is the shortest record.
const TOMBSTONE_LEN: u64 = MIN_RECORD_LEN;

/// Room that is sure to be there after a record of `len` bytes is placed in a volume of
/// `segments` segments with its log at `offset`, and whether the record needs a new segment;
/// `None` when it cannot be placed at all. Sure room is what is left of the active segment, plus
/// the spare segments of a preallocated volume; a volume that grows on demand may not get its
/// next segment (the disk may be full), so its spares do not count.
fn room_after(marker: &VolumeMarker, segments: u32, offset: u64, len: u64) -> Option<(u64, bool)> {
    let usable = marker.segment_size - SEGMENT_HEADER_LEN - SEAL_LEN;
    let spare_segments = u64::from(marker.max_segments().saturating_sub(segments));
    let sure_spares = |n: u64| if marker.preallocated { n * usable } else { 0 };
    if offset + len + SEAL_LEN <= marker.segment_size {
        Some((marker.segment_size - offset - len - SEAL_LEN + sure_spares(spare_segments), false))
    } else if spare_segments > 0 && len <= usable {
        Some((usable - len + sure_spares(spare_segments - 1), true))
    } else {
        None
    }
}
/// Where a record of `len` bytes goes while `reserve` bytes of sure room stay after it: in the
/// active segment (`Some(false)`), in a new segment (`Some(true)`), or nowhere (`None`).
fn placement(marker: &VolumeMarker, segments: u32, offset: u64, len: u64, reserve: u64) -> Option<bool> {
    let usable = marker.segment_size - SEGMENT_HEADER_LEN - SEAL_LEN;
    match room_after(marker, segments, offset, len) {
        Some((left, roll)) if left >= reserve => Some(roll),
        _ if segments < marker.max_segments() && len + reserve <= usable => Some(true),
        _ => None,
    }
}

/// Where recovery sets aside segment files that hold records but that the index does not know.
pub const QUARANTINE_DIR: &str = "quarantine";

/// The record of a 4 KiB blob with a little metadata: a volume where this no longer fits is full.
const SMALL_PUT_RECORD: u64 = HEADER_LEN + 64 + 4096 + 4 + 4;

/// Refuses a maximum blob size whose records would not fit in one segment.
fn check_geometry(marker: &VolumeMarker, config: &VolumeConfig) -> Result<(), VolumeError> {
    Ok(layout::check_geometry(marker.capacity_bytes, marker.segment_size, config.max_blob_bytes)?)
}

fn encode_put(req: &PutRequest) -> EncodedRecord {
    let meta = req.meta.encode();
    let header = RecordHeader {
        kind: RecordKind::Put,
        blob_id: req.blob_id,
        created_ms: req.created_ms,
        expiry_ms: req.expiry_ms,
        meta_len: meta.len() as u32,
        payload_len: req.payload.len() as u64,
    };
    EncodedRecord::new(header, &meta, req.payload.clone(), &record::chunk_crcs(&req.payload))
}

/// The writer's position in the log.
pub(crate) struct LogPosition {
    segment: u32,
    file: Arc<File>,
    offset: u64,
    next_seq: u64,
}

/// Segment stats touched by one transaction, written back once at its end.
struct SegmentStats<'t, 'a> {
    table: &'a mut Table<'t, u32, &'static [u8]>,
    cache: HashMap<u32, SegmentInfo>,
}

impl<'t, 'a> SegmentStats<'t, 'a> {
    fn new(table: &'a mut Table<'t, u32, &'static [u8]>) -> Self {
        Self { table, cache: HashMap::new() }
    }

    fn get(&mut self, segment: u32) -> Result<&mut SegmentInfo, VolumeError> {
        if !self.cache.contains_key(&segment) {
            let info = index::get(&*self.table, segment)?.unwrap_or(SegmentInfo {
                live_bytes: 0,
                end: SEGMENT_HEADER_LEN,
                sealed: false,
            });
            self.cache.insert(segment, info);
        }
        Ok(self.cache.get_mut(&segment).expect("just inserted"))
    }

    fn is_sealed(&self, segment: u32) -> Result<bool, VolumeError> {
        Ok(match self.cache.get(&segment) {
            Some(info) => info.sealed,
            None => index::get::<_, SegmentInfo>(&*self.table, segment)?.is_some_and(|info| info.sealed),
        })
    }

    fn flush(self) -> Result<(), VolumeError> {
        for (segment, info) in self.cache {
            self.table.insert(segment, index::encode(&info).as_slice())?;
        }
        Ok(())
    }
}

/// The tables one write transaction updates.
struct Tables<'t, 'a> {
    blobs: Table<'t, [u8; 21], &'static [u8]>,
    journal: Table<'t, u64, &'static [u8]>,
    damaged: Table<'t, [u8; 21], &'static [u8]>,
    segments: SegmentStats<'t, 'a>,
    /// Change of the live blob count ([`index::LIVE_BLOBS`]) in this transaction.
    live_blobs: i64,
}

/// Applies one record to the index, journal and segment stats. The writer and recovery both
/// use this, so replaying a record gives exactly the state the writer produced.
fn apply_record(
    tables: &mut Tables<'_, '_>,
    header: &RecordHeader,
    location: Location,
    crc: u32,
    next_seq: &mut u64,
) -> Result<(), VolumeError> {
    let key = header.blob_id.to_bytes();
    let existing: Option<IndexEntry> = index::get(&tables.blobs, key)?;
    let seq = *next_seq;
    if matches!(header.kind, RecordKind::Put | RecordKind::Delete) && !tables.damaged.is_empty()? {
        // The blob came again (repair) or was deleted: nothing is owed any more.
        tables.damaged.remove(key)?;
    }
    let entry = match (header.kind, existing) {
        (RecordKind::Put, None) => {
            tables.live_blobs += 1;
            IndexEntry {
                state: BlobState::Live,
                location: Some(location),
                payload_len: header.payload_len,
                meta_len: header.meta_len,
                created_ms: header.created_ms,
                expiry_ms: header.expiry_ms,
                deleted_ms: None,
                crc,
                seq,
            }
        }
        (RecordKind::Delete, None) => IndexEntry {
            state: BlobState::Deleted,
            location: Some(location),
            payload_len: 0,
            meta_len: 0,
            created_ms: header.created_ms,
            expiry_ms: None,
            deleted_ms: Some(header.created_ms),
            crc,
            seq,
        },
        (RecordKind::Delete, Some(mut entry)) if entry.state != BlobState::Deleted => {
            if let (BlobState::Live, Some(old)) = (entry.state, entry.location) {
                let info = tables.segments.get(old.segment)?;
                info.live_bytes = info.live_bytes.saturating_sub(old.len);
            }
            if entry.state == BlobState::Live {
                tables.live_blobs -= 1;
            }
            entry.state = BlobState::Deleted;
            entry.location = Some(location);
            entry.deleted_ms = Some(header.created_ms);
            entry.seq = seq;
            entry
        }
        (RecordKind::TtlUpdate, Some(mut entry)) if entry.state == BlobState::Live => {
            // The entry keeps pointing at the put record; this record is garbage once applied.
            entry.expiry_ms = header.expiry_ms;
            tables.journal.insert(seq, index::encode(&journal_entry(header, location)).as_slice())?;
            *next_seq += 1;
            tables.blobs.insert(key, index::encode(&entry).as_slice())?;
            return Ok(());
        }
        // Nothing to do: a seal, or a record the current state already supersedes.
        _ => return Ok(()),
    };
    tables.segments.get(location.segment)?.live_bytes += location.len;
    tables.journal.insert(seq, index::encode(&journal_entry(header, location)).as_slice())?;
    tables.blobs.insert(key, index::encode(&entry).as_slice())?;
    *next_seq += 1;
    Ok(())
}

fn journal_entry(header: &RecordHeader, location: Location) -> JournalEntry {
    JournalEntry { blob_id: header.blob_id.to_bytes(), kind: header.kind, location }
}

/// What a write operation turns into once checked against the index.
enum Planned {
    Record(EncodedRecord),
    /// Already in the requested state (idempotent retry).
    Nothing,
}

fn plan_op(blobs: &Table<'_, [u8; 21], &'static [u8]>, op: WriteOp) -> Result<Planned, VolumeError> {
    let now = now_ms();
    let (blob_id, kind, at_ms, expiry_ms) = match op {
        WriteOp::Put(record) => {
            return match index::get::<_, IndexEntry>(blobs, record.header.blob_id.to_bytes())? {
                None => Ok(Planned::Record(record)),
                Some(e) if e.state == BlobState::Live && e.crc == record.trailer_crc() => Ok(Planned::Nothing),
                // A put never resurrects a deleted blob.
                Some(e) if e.state != BlobState::Live => Ok(Planned::Nothing),
                Some(_) => Err(VolumeError::Conflict),
            };
        }
        WriteOp::Delete { blob_id, at_ms, tombstone_unknown } => {
            match index::get::<_, IndexEntry>(blobs, blob_id.to_bytes())? {
                None if tombstone_unknown => (blob_id, RecordKind::Delete, at_ms, None),
                None => return Err(VolumeError::NotFound),
                Some(e) if e.state != BlobState::Live => return Ok(Planned::Nothing),
                Some(_) => (blob_id, RecordKind::Delete, at_ms, None),
            }
        }
        WriteOp::TtlUpdate { blob_id, expiry_ms, at_ms } => {
            match index::get::<_, IndexEntry>(blobs, blob_id.to_bytes())? {
                None => return Err(VolumeError::NotFound),
                Some(e) if e.state == BlobState::Deleted => return Err(VolumeError::Deleted),
                Some(e) if e.is_expired(now) => return Err(VolumeError::Expired),
                // Already so: no record, so that replicas copying each other's expiry settle
                // (each update is a journal entry the peers pull and apply in turn).
                Some(e) if e.expiry_ms == expiry_ms => return Ok(Planned::Nothing),
                Some(_) => (blob_id, RecordKind::TtlUpdate, at_ms, expiry_ms),
            }
        }
    };
    let header = RecordHeader { kind, blob_id, created_ms: at_ms, expiry_ms, meta_len: 0, payload_len: 0 };
    Ok(Planned::Record(EncodedRecord::new(header, &[], Bytes::new(), &[])))
}

struct Writer {
    shared: Arc<Shared>,
    log: LogPosition,
    last_checkpoint: Instant,
    bytes_since_checkpoint: u64,
    dirty: bool,
}

/// Bytes of one pending segment write.
struct PendingWrite {
    file: Arc<File>,
    offset: u64,
    parts: Vec<Bytes>,
}

impl Writer {
    fn new(shared: Arc<Shared>, log: LogPosition) -> Self {
        Self { shared, log, last_checkpoint: Instant::now(), bytes_since_checkpoint: 0, dirty: false }
    }

    fn run(mut self, rx: mpsc::Receiver<WriterMsg>) {
        let interval = self.shared.config.checkpoint_interval;
        loop {
            let first = match rx.recv_timeout(interval) {
                Ok(msg) => msg,
                Err(RecvTimeoutError::Timeout) => {
                    if self.dirty {
                        let _ = self.commit_batch(Vec::new(), true);
                    }
                    // A volume stalled for disk space says so while it lasts, and only then.
                    match self.shared.health() {
                        VolumeHealth::Stalled(_)
                            if self.shared.stalled_for_space.load(Ordering::SeqCst) && self.shared.room_is_back() =>
                        {
                            self.shared.unstall()
                        }
                        VolumeHealth::Writable => {
                            let _ = self.shared.check_disk_room();
                        }
                        _ => {}
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = Vec::new();
            let mut checkpoints = Vec::new();
            let mut bytes = 0u64;
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    WriterMsg::Write(op, reply) => {
                        bytes += match &op {
                            WriteOp::Put(r) => r.record_len(),
                            _ => HEADER_LEN,
                        };
                        batch.push((op, reply));
                    }
                    WriterMsg::Checkpoint(reply) => checkpoints.push(reply),
                    WriterMsg::Abandon => return,
                }
                if batch.len() < self.shared.config.max_batch_records && bytes < self.shared.config.max_batch_bytes {
                    next = rx.try_recv().ok();
                }
            }
            let durable = !checkpoints.is_empty()
                || self.last_checkpoint.elapsed() >= interval
                || self.bytes_since_checkpoint + bytes >= self.shared.config.checkpoint_bytes;
            let result = self.commit_batch(batch, durable);
            for reply in checkpoints {
                let _ = reply.send(result.as_ref().map(|_| ()).map_err(clone_failure));
            }
        }
        if self.dirty {
            let _ = self.commit_batch(Vec::new(), true);
        }
    }

    /// One group commit. Per-request errors (not found, full, ...) go to that request alone; an
    /// I/O error fails the volume and every request of the batch.
    fn commit_batch(
        &mut self,
        batch: Vec<(WriteOp, oneshot::Sender<Result<(), VolumeError>>)>,
        durable: bool,
    ) -> Result<(), VolumeError> {
        if let VolumeHealth::Failed(reason) = self.shared.health() {
            for (_, reply) in batch {
                let _ = reply.send(Err(VolumeError::Failed(reason.clone())));
            }
            return Err(VolumeError::Failed(reason));
        }
        let started = Instant::now();
        let records_in_batch = batch.len();
        let outcome = self.stage_and_commit(batch, durable);
        match outcome {
            Ok((replies, bytes)) => {
                self.dirty = !durable;
                if durable {
                    self.last_checkpoint = Instant::now();
                    self.bytes_since_checkpoint = 0;
                } else {
                    self.bytes_since_checkpoint += bytes;
                }
                if records_in_batch > 0 {
                    self.shared.metrics.batch_records.observe(records_in_batch as f64);
                    self.shared.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
                }
                for (reply, result) in replies {
                    let _ = reply.send(result);
                }
                Ok(())
            }
            Err((replies, err)) => {
                let reason = match &err {
                    VolumeError::Failed(r) => r.clone(),
                    other => other.to_string(),
                };
                for reply in replies {
                    let _ = reply.send(Err(VolumeError::Failed(reason.clone())));
                }
                Err(err)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn stage_and_commit(
        &mut self,
        batch: Vec<(WriteOp, oneshot::Sender<Result<(), VolumeError>>)>,
        durable: bool,
    ) -> Result<
        (Vec<(oneshot::Sender<Result<(), VolumeError>>, Result<(), VolumeError>)>, u64),
        (Vec<oneshot::Sender<Result<(), VolumeError>>>, VolumeError),
    > {
        let shared = self.shared.clone();
        let mut replies = Vec::with_capacity(batch.len());
        let txn = match begin_write(&shared.db, durable) {
            Ok(txn) => txn,
            Err(e) => {
                return Err((batch.into_iter().map(|(_, r)| r).collect(), shared.fail_index("index transaction", e)))
            }
        };
        let mut writes: Vec<PendingWrite> = Vec::new();
        let mut written = 0u64;
        let mut put_stored = false;
        // One look at the filesystem per batch: puts wait while the index reserve is short.
        let disk_room =
            if batch.iter().any(|(op, _)| matches!(op, WriteOp::Put(_))) { shared.check_disk_room() } else { Ok(()) };
        let staged: Result<(), VolumeError> = (|| {
            let mut segments_table = txn.open_table(SEGMENTS)?;
            let mut tables = Tables {
                blobs: txn.open_table(BLOBS)?,
                journal: txn.open_table(JOURNAL)?,
                damaged: txn.open_table(DAMAGED)?,
                segments: SegmentStats::new(&mut segments_table),
                live_blobs: 0,
            };
            for (op, reply) in batch {
                let is_put = matches!(op, WriteOp::Put(_));
                if let (true, Err(VolumeError::Paused { reason, no_space })) = (is_put, &disk_room) {
                    replies.push((reply, Err(VolumeError::Paused { reason: reason.clone(), no_space: *no_space })));
                    continue;
                }
                let planned = match plan_op(&tables.blobs, op) {
                    Ok(p) => p,
                    Err(e) => {
                        replies.push((reply, Err(e)));
                        continue;
                    }
                };
                let Planned::Record(record) = planned else {
                    replies.push((reply, Ok(())));
                    continue;
                };
                match self.place(&mut tables, &mut writes, record.record_len(), record.header.kind) {
                    Ok(location) => {
                        apply_record(
                            &mut tables,
                            &record.header,
                            location,
                            record.trailer_crc(),
                            &mut self.log.next_seq,
                        )?;
                        push_write(&mut writes, &self.log.file, location.offset, &record);
                        written += location.len;
                        put_stored |= is_put;
                        replies.push((reply, Ok(())));
                    }
                    Err(VolumeError::Full) => {
                        if is_put {
                            shared.set_health(VolumeHealth::Full);
                        }
                        replies.push((reply, Err(VolumeError::Full)));
                    }
                    // This request alone is refused; the volume goes on.
                    Err(
                        e @ (VolumeError::NoRoom { .. } | VolumeError::Paused { .. } | VolumeError::TooLarge { .. }),
                    ) => replies.push((reply, Err(e))),
                    Err(e) => return Err(e),
                }
            }
            tables.segments.get(self.log.segment)?.end = self.log.offset;
            tables.segments.flush()?;
            let tail = LogTail {
                segment: self.log.segment,
                offset: self.log.offset,
                next_seq: self.log.next_seq,
                next_segment: shared.next_segment.load(Ordering::SeqCst),
            };
            let mut meta = txn.open_table(META)?;
            meta.insert(LOG_TAIL, index::encode(&tail).as_slice())?;
            index::add_live_blobs(&mut meta, tables.live_blobs)?;
            Ok(())
        })();
        let fail_all =
            |replies: Vec<(oneshot::Sender<_>, _)>, err| Err((replies.into_iter().map(|(r, _)| r).collect(), err));
        if let Err(e) = staged {
            return fail_all(replies, shared.fail_index("staging batch", e));
        }
        // Durability order: records (fdatasync) before the index that points at them.
        let sync_started = Instant::now();
        for w in &writes {
            let slices: Vec<&[u8]> = w.parts.iter().map(|p| p.as_ref()).collect();
            if let Err(e) = write_all_vectored_at(&w.file, w.offset, &slices) {
                return fail_all(replies, shared.fail("segment write", e));
            }
        }
        let mut synced: Vec<*const File> = Vec::new();
        for w in &writes {
            let ptr = Arc::as_ptr(&w.file);
            if synced.contains(&ptr) {
                continue;
            }
            synced.push(ptr);
            // An fsync error is never retried: the page cache state is unknown afterwards.
            if let Err(e) = w.file.sync_data() {
                return fail_all(replies, shared.fail("fdatasync", e));
            }
        }
        if !writes.is_empty() {
            shared.metrics.fsync_seconds.observe(sync_started.elapsed().as_secs_f64());
        }
        if let Err(e) = txn.commit() {
            return fail_all(replies, shared.fail_index("index commit", e));
        }
        if put_stored {
            shared.unstall();
        }
        Ok((replies, written))
    }

    /// Finds room for a record of `len` bytes, rolling to a new segment when the active one
    /// is full. Puts and TTL updates leave room for a tombstone of every blob the index knows
    /// (and one more), so that every blob can always be deleted, however full the volume.
    fn place(
        &mut self,
        tables: &mut Tables<'_, '_>,
        writes: &mut Vec<PendingWrite>,
        len: u64,
        kind: RecordKind,
    ) -> Result<Location, VolumeError> {
        let shared = self.shared.clone();
        let segment_size = shared.marker.segment_size;
        if len + SEAL_LEN + SEGMENT_HEADER_LEN > segment_size {
            return Err(VolumeError::TooLarge { size: len, max: segment_size - SEAL_LEN - SEGMENT_HEADER_LEN });
        }
        let reserve = match kind {
            RecordKind::Delete => 0,
            _ => TOMBSTONE_LEN * (tables.blobs.len()? + 1),
        };
        // In the active segment if the reserve stays sure; else in a new segment if it fits there.
        let place = |len| placement(&shared.marker, shared.segments.count(), self.log.offset, len, reserve);
        let roll = match place(len) {
            Some(roll) => roll,
            None => {
                // Full only when a small blob no longer fits: one large upload that does not fit
                // leaves the volume writable for everything smaller.
                let small_fits = place(SMALL_PUT_RECORD).is_some();
                return Err(match kind {
                    RecordKind::Put if small_fits => VolumeError::NoRoom { needed: len },
                    RecordKind::Put | RecordKind::Delete => VolumeError::Full,
                    _ => VolumeError::NoRoom { needed: len },
                });
            }
        };
        if roll {
            let next = shared.next_segment.fetch_add(1, Ordering::SeqCst);
            let file = match layout::create_segment(&shared.dir, &shared.marker, next, shared.config.preallocation) {
                Ok(file) => shared.segments.insert(next, file),
                // Out of file descriptors or disk space: passing trouble, tried again by the
                // next put; the log stays where it was.
                Err(e) if e.is_transient() => {
                    let reason = format!("creating segment {next}: {e}");
                    // The volume stalls only when small blobs no longer fit either.
                    let small_fits = place(SMALL_PUT_RECORD) == Some(false);
                    // A tombstone that finds no new segment is the one write that must not fail:
                    // its room was kept in the active segment, so this only happens to puts.
                    return Err(if small_fits {
                        VolumeError::Paused { reason, no_space: e.is_no_space() }
                    } else {
                        shared.stall(reason, e.is_no_space())
                    });
                }
                Err(e) => return Err(shared.fail("creating segment", e)),
            };
            let seal = EncodedRecord::seal(next, now_ms());
            push_write(writes, &self.log.file, self.log.offset, &seal);
            let old = tables.segments.get(self.log.segment)?;
            old.sealed = true;
            old.end = self.log.offset + SEAL_LEN;
            self.log = LogPosition { segment: next, file, offset: SEGMENT_HEADER_LEN, next_seq: self.log.next_seq };
            tables.segments.get(next)?;
        }
        let location = Location { segment: self.log.segment, offset: self.log.offset, len };
        self.log.offset += len;
        Ok(location)
    }
}

fn push_write(writes: &mut Vec<PendingWrite>, file: &Arc<File>, offset: u64, record: &EncodedRecord) {
    let parts = [Bytes::copy_from_slice(&record.head), record.payload.clone(), Bytes::copy_from_slice(&record.trailer)];
    if let Some(last) = writes.last_mut() {
        let end = last.offset + last.parts.iter().map(|p| p.len() as u64).sum::<u64>();
        if Arc::ptr_eq(&last.file, file) && end == offset {
            last.parts.extend(parts);
            return;
        }
    }
    writes.push(PendingWrite { file: file.clone(), offset, parts: parts.to_vec() });
}

fn clone_failure(e: &VolumeError) -> VolumeError {
    VolumeError::Failed(e.to_string())
}

/// A table for reading; `None` while no write has made it (a volume from before it existed).
fn open_if_made<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    table: TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, VolumeError> {
    match txn.open_table(table) {
        Ok(table) => Ok(Some(table)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn begin_write(db: &Database, durable: bool) -> Result<WriteTransaction, VolumeError> {
    let mut txn = db.begin_write()?;
    if durable {
        // Saves allocator state so that opening after a crash needs no full repair.
        txn.set_quick_repair(true);
    } else {
        txn.set_durability(Durability::None)?;
    }
    Ok(txn)
}

/// Brings the index up to date with the log; returns the writer's position, and the damaged
/// deletes and TTL updates (header intact) to write again once the writer runs.
fn recover(shared: &Shared) -> Result<(LogPosition, Vec<RecordHeader>), VolumeError> {
    compaction::resolve_interrupted(shared)?;
    let dir = &shared.dir;
    let marker = &shared.marker;
    let txn = begin_write(&shared.db, true)?;
    let position = {
        let mut meta = txn.open_table(META)?;
        let mut segments_table = txn.open_table(SEGMENTS)?;
        let tail: LogTail = index::get(&meta, LOG_TAIL)?.unwrap_or(LogTail {
            segment: FIRST_SEGMENT,
            offset: SEGMENT_HEADER_LEN,
            next_seq: 0,
            next_segment: FIRST_SEGMENT + 1,
        });
        let known: Vec<u32> = segments_table.iter()?.map(|r| r.map(|(k, _)| k.value())).collect::<Result<_, _>>()?;

        // Open the segments the index knows, plus the one the tail is in.
        for &segment in known.iter().chain(std::iter::once(&tail.segment)) {
            if shared.segments.get(segment).is_none() {
                shared.segments.insert(segment, layout::open_segment(dir, marker, segment)?);
            }
        }
        let on_disk = list_segment_files(dir)?;
        let mut tables = Tables {
            blobs: txn.open_table(BLOBS)?,
            journal: txn.open_table(JOURNAL)?,
            damaged: txn.open_table(DAMAGED)?,
            segments: SegmentStats::new(&mut segments_table),
            live_blobs: 0,
        };
        let mut segment = tail.segment;
        let mut offset = tail.offset;
        let mut next_seq = tail.next_seq;
        let mut replayed = 0u64;
        // Valid records can only lie within the log written since the durable mark: at most a
        // checkpoint's worth and one batch.
        let window = shared.config.checkpoint_bytes.max(128 << 20) + shared.config.max_batch_bytes;
        let mut replayed_bytes = 0u64;
        // Damaged deletes and TTL updates to write again, by their place in the log; a later
        // intact record of the same blob supersedes them.
        let mut rewrite: Vec<(u64, RecordHeader)> = Vec::new();
        let mut last_record_of: HashMap<BlobId, u64> = HashMap::new();
        loop {
            let file = shared.segments.get(segment).expect("opened above");
            match read_verified_record(&file, offset, marker.segment_size) {
                Err(VolumeError::Integrity(reason)) => {
                    // The torn end of the log, or damage in its middle? Damage has intact
                    // records after it, and those were acknowledged: keep them.
                    let limit = (offset + window.saturating_sub(replayed_bytes)).min(marker.segment_size);
                    let Some(damage) = inspect_damage(&file, offset, limit, marker.partition)? else {
                        // The end of the log in this segment. If a later segment that no sealed
                        // entry claims holds records, the seal that pointed there was lost: the
                        // log goes on there.
                        let Some(next) = lost_continuation(shared, segment, &on_disk, &tables.segments)? else { break };
                        tracing::error!(volume = %dir.display(), segment, offset, %reason, next,
                            "the log's seal record is unreadable; following the log into the next segment");
                        shared.metrics.integrity_errors.inc();
                        layout::zero_range(
                            &file,
                            &layout::segment_path(dir, segment),
                            offset,
                            marker.segment_size - offset,
                        )?;
                        let info = tables.segments.get(segment)?;
                        info.sealed = true;
                        info.end = offset;
                        tables.segments.get(next)?;
                        segment = next;
                        offset = SEGMENT_HEADER_LEN;
                        continue;
                    };
                    shared.metrics.integrity_errors.inc();
                    let len = damage.next - offset;
                    // The writer gave every record but a seal one journal sequence. The records
                    // after the damage keep numbers at or above those peers have seen (a gap is
                    // harmless; a number given twice would make a peer skip an entry).
                    match damage.header {
                        Some(h) if h.kind == RecordKind::Put => {
                            next_seq += 1;
                            tracing::error!(volume = %dir.display(), segment, offset, %reason, blob = %h.blob_id,
                                "damaged blob in the log tail; it waits for another replica to send it again");
                            if index::get::<_, IndexEntry>(&tables.blobs, h.blob_id.to_bytes())?.is_none() {
                                let record = DamagedRecord {
                                    segment,
                                    offset,
                                    reason,
                                    found_ms: now_ms(),
                                    absent_on: Vec::new(),
                                };
                                tables.damaged.insert(h.blob_id.to_bytes(), index::encode(&record).as_slice())?;
                            }
                        }
                        // A delete or TTL update says all it has to say in its header: it is
                        // written again, intact, once the writer runs (pointing the index at
                        // damaged bytes would stop compaction of the segment for good).
                        Some(h) if matches!(h.kind, RecordKind::Delete | RecordKind::TtlUpdate) => {
                            next_seq += 1;
                            tracing::error!(volume = %dir.display(), segment, offset, %reason, blob = %h.blob_id,
                                "damaged record in the log tail; its header is intact, so it is written again");
                            rewrite.push((replayed_bytes, h));
                        }
                        _ => {
                            next_seq += len.div_ceil(MIN_RECORD_LEN);
                            tracing::error!(volume = %dir.display(), segment, offset, len, %reason,
                                "damaged bytes in the log tail, header unreadable; the records after them are kept");
                        }
                    }
                    replayed_bytes += len;
                    offset = damage.next;
                    continue;
                }
                Err(e) => return Err(e),
                Ok((bytes, header, crc)) => {
                    let location = Location { segment, offset, len: header.record_len() };
                    if header.kind == RecordKind::Seal {
                        let meta = &bytes[HEADER_LEN as usize..header.payload_offset() as usize];
                        let next =
                            u32::from_le_bytes(meta.try_into().map_err(|_| VolumeError::Corrupt("bad seal".into()))?);
                        let info = tables.segments.get(segment)?;
                        info.sealed = true;
                        info.end = offset + SEAL_LEN;
                        if shared.segments.get(next).is_none() {
                            shared.segments.insert(next, layout::open_segment(dir, marker, next)?);
                        }
                        tables.segments.get(next)?;
                        segment = next;
                        offset = SEGMENT_HEADER_LEN;
                        continue;
                    }
                    apply_record(&mut tables, &header, location, crc, &mut next_seq)?;
                    last_record_of.insert(header.blob_id, replayed_bytes);
                    offset += location.len;
                    replayed_bytes += location.len;
                    replayed += 1;
                }
            }
        }
        // Whatever follows the last valid record was never acknowledged: erase it, so that a
        // later record can never be followed by stale bytes that parse.
        let file = shared.segments.get(segment).expect("opened above");
        let path = layout::segment_path(dir, segment);
        layout::zero_range(&file, &path, offset, marker.segment_size - offset)?;
        file.sync_data()?;
        tables.segments.get(segment)?.end = offset;
        let Tables { blobs, journal, damaged, segments: stats, live_blobs } = tables;
        stats.flush()?;
        if index::get::<_, u64>(&meta, index::LIVE_BLOBS)?.is_some() {
            index::add_live_blobs(&mut meta, live_blobs)?;
        } else {
            // Written before the count existed: count once.
            let mut count = 0u64;
            for item in blobs.iter()? {
                let (_, value) = item?;
                count += u64::from(index::decode::<IndexEntry>(value.value())?.state == BlobState::Live);
            }
            meta.insert(index::LIVE_BLOBS, index::encode(&count).as_slice())?;
        }
        let entries = blobs.len()?;
        drop((blobs, journal, damaged));

        // Segment files nothing refers to were created by a roll that never committed. One that
        // holds a record that verifies is never erased: it is set aside for a person to look at.
        let referenced: Vec<u32> =
            segments_table.iter()?.map(|r| r.map(|(k, _)| k.value())).collect::<Result<_, _>>()?;
        for number in &on_disk {
            if !referenced.contains(number) {
                let holds_records = match layout::open_segment(dir, marker, *number) {
                    Ok(file) => read_verified_record(&file, SEGMENT_HEADER_LEN, marker.segment_size).is_ok(),
                    Err(_) => false,
                };
                shared.segments.remove(*number);
                if holds_records {
                    let aside = dir.join(QUARANTINE_DIR);
                    fs::create_dir_all(&aside)?;
                    fs::rename(layout::segment_path(dir, *number), aside.join(format!("{number:08}.seg")))?;
                    tracing::error!(segment = number, volume = %dir.display(),
                        "a segment no index entry refers to holds records: moved to quarantine/, not erased");
                } else {
                    tracing::warn!(segment = number, volume = %dir.display(), "removing unreferenced segment file");
                    layout::retire_segment(dir, marker, *number)?;
                }
            }
        }
        let max_seen = on_disk.iter().chain(referenced.iter()).copied().max().unwrap_or(FIRST_SEGMENT);
        let next_segment = tail.next_segment.max(max_seen + 1);
        shared.next_segment.store(next_segment, Ordering::SeqCst);
        meta.insert(LOG_TAIL, index::encode(&LogTail { segment, offset, next_seq, next_segment }).as_slice())?;
        if replayed > 0 {
            tracing::info!(replayed, volume = %dir.display(), "replayed log tail past the durable mark");
        }
        let rewrite = rewrite
            .into_iter()
            .filter(|(at, h)| last_record_of.get(&h.blob_id).is_none_or(|later| later < at))
            .map(|(_, h)| h)
            .collect();
        (LogPosition { segment, file, offset, next_seq }, rewrite, entries)
    };
    txn.commit()?;
    layout::sync_dir(&layout::segments_dir(dir))?;
    let (position, rewrite, entries) = position;
    let reserve = TOMBSTONE_LEN * (entries + 1);
    if placement(marker, shared.segments.count(), position.offset, SMALL_PUT_RECORD, reserve).is_none() {
        shared.set_health(VolumeHealth::Full);
    }
    Ok((position, rewrite))
}

/// Where the log went on when its seal record in `segment` is unreadable: the lowest-numbered
/// later segment file that no sealed table entry claims and whose first record verifies.
fn lost_continuation(
    shared: &Shared,
    segment: u32,
    on_disk: &[u32],
    segments: &SegmentStats<'_, '_>,
) -> Result<Option<u32>, VolumeError> {
    for &candidate in on_disk.iter().filter(|n| **n > segment) {
        if segments.is_sealed(candidate)? {
            continue;
        }
        let file = match shared.segments.get(candidate) {
            Some(file) => file,
            None => match layout::open_segment(&shared.dir, &shared.marker, candidate) {
                Ok(file) => shared.segments.insert(candidate, file),
                Err(_) => continue,
            },
        };
        if read_verified_record(&file, SEGMENT_HEADER_LEN, shared.marker.segment_size).is_ok() {
            return Ok(Some(candidate));
        }
    }
    Ok(None)
}

/// A record that failed its checks, with intact records after it.
struct Damage {
    /// Its header, when that alone verifies.
    header: Option<RecordHeader>,
    /// Where the next intact record starts.
    next: u64,
}

/// Looks past a record at `offset` that did not verify: `None` when no intact record follows
/// before `limit` (the torn end of the log), else where the next record starts. A record whose
/// header verifies is skipped by its length; otherwise the bytes are searched for the next record
/// whose header and whole body verify.
fn inspect_damage(file: &File, offset: u64, limit: u64, partition: u32) -> Result<Option<Damage>, VolumeError> {
    if offset + HEADER_LEN <= limit {
        let head = read_at(file, offset, HEADER_LEN as usize)?;
        if let Ok(header) = RecordHeader::decode(head.as_slice().try_into().expect("header length")) {
            if header.kind == RecordKind::Seal || header.blob_id.partition() == partition {
                // Its length is known: never look inside its payload, where a blob may hold
                // anything, record images included.
                let next = offset + header.record_len();
                let follows = next <= limit && find_intact_record(file, next, limit, partition)?.is_some();
                return Ok(follows.then_some(Damage { header: Some(header), next }));
            }
        }
    }
    Ok(find_intact_record(file, offset + 1, limit, partition)?.map(|next| Damage { header: None, next }))
}

/// The first offset in `[from, limit)` where a whole record of this partition verifies.
fn find_intact_record(file: &File, from: u64, limit: u64, partition: u32) -> Result<Option<u64>, VolumeError> {
    const BLOCK: u64 = 4 << 20;
    let magic_len = record::RECORD_MAGIC.len() as u64;
    let finder = memchr::memmem::Finder::new(&record::RECORD_MAGIC);
    let mut from = from;
    while from + HEADER_LEN <= limit {
        let len = BLOCK.min(limit - from);
        let block = read_at(file, from, len as usize)?;
        for at in finder.find_iter(&block) {
            let candidate = from + at as u64;
            match read_verified_record(file, candidate, limit) {
                Ok((_, h, _)) if h.kind == RecordKind::Seal || h.blob_id.partition() == partition => {
                    return Ok(Some(candidate))
                }
                Ok(_) | Err(VolumeError::Integrity(_)) => {}
                Err(e) => return Err(e),
            }
        }
        // Overlap by the magic's length less one, so that a magic across two blocks is found.
        from += if len > magic_len { len - (magic_len - 1) } else { len };
    }
    Ok(None)
}

fn list_segment_files(dir: &Path) -> Result<Vec<u32>, VolumeError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(layout::segments_dir(dir))? {
        let name = entry?.file_name();
        if let Some(n) = name.to_str().and_then(layout::parse_segment_file_name) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Reads and fully verifies the record at `offset` with one read; returns its bytes, header and
/// trailer CRC.
pub(crate) fn read_verified_record(
    file: &File,
    offset: u64,
    segment_size: u64,
) -> Result<(Vec<u8>, RecordHeader, u32), VolumeError> {
    if offset + HEADER_LEN > segment_size {
        return Err(VolumeError::Integrity("no room for a record".into()));
    }
    let head = read_at(file, offset, HEADER_LEN as usize)?;
    let header = RecordHeader::decode(head.as_slice().try_into().expect("header length")).map_err(integrity)?;
    if offset + header.record_len() > segment_size {
        return Err(VolumeError::Integrity("record runs past the segment end".into()));
    }
    let bytes = read_at(file, offset, header.record_len() as usize)?;
    let (header, crc) = record::verify_record(&bytes).map_err(integrity)?;
    Ok((bytes, header, crc))
}

fn integrity(e: RecordError) -> VolumeError {
    VolumeError::Integrity(e.to_string())
}

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
const SMALL_RECORD: u64 = CHUNK_LEN + 64 * 1024;

impl BlobReader {
    fn open(
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
