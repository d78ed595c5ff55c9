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
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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
use super::index::{
    self, BlobState, DamagedRecord, IndexEntry, JournalEntry, Location, LogTail, NameKey, OwedEntry, SegmentInfo,
    BLOBS, DAMAGED, JOURNAL, LOG_TAIL, META, SEGMENTS,
};
use super::names::{CurrentName, NameEntry, NameRecord, NameRecordRef};
use super::record::{
    self, BlobMeta, EncodedRecord, RecordError, RecordHeader, RecordKind, CHUNK_LEN, HEADER_LEN, SEAL_LEN,
};
use super::segments::{read_at, write_all_vectored_at, SegmentFiles};
use super::{now_ms, VolumeConfig, VolumeError};
use crate::metrics::EngineMetrics;
use compaction::Compactor;

pub mod compaction;
mod digest;
mod reader;
mod recovery;
mod writer;

pub use digest::HeldBlob;
pub use reader::BlobReader;
pub(crate) use recovery::read_verified_record;
use recovery::recover;
use writer::{LogPosition, Writer};

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

/// Whether a [`WriteOp::TtlUpdate`] is a change made now or a state copied from elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TtlRule {
    /// A change a client asked for: it replaces whatever expiry this replica has.
    Set,
    /// An expiry as another replica (or an earlier record) has it: it replaces this replica's
    /// only if it sorts above ([`index::ttl_order`]).
    IfNewer,
}

enum WriteOp {
    /// `replicated`: copied from a peer replica, so it may use the room kept for peers.
    /// `name`: what a name record's put carries besides the record.
    Put { record: EncodedRecord, replicated: bool, name: Option<Box<NamePut>> },
    /// `tombstone_unknown`: also record the deletion of a blob this volume never had (a
    /// replica learning of a delete before the put), so that the put never lands later.
    Delete { blob_id: BlobId, at_ms: u64, tombstone_unknown: bool },
    /// A new expiry stamped `at_ms` (see [`index::ttl_order`]).
    TtlUpdate { blob_id: BlobId, expiry_ms: Option<u64>, at_ms: u64, rule: TtlRule },
    /// Drops the journal entries below `below` (at most a bounded number per commit).
    TruncateJournal { below: u64 },
    /// Replication from `peer` moves on to `next_seq`, owing `owed`: written by the writer, so
    /// in the group commit of the entries queued before it (never ahead of them).
    Progress { peer: String, next_seq: u64, owed: Vec<(u64, OwedEntry)> },
}

/// A name record's put, besides the record.
struct NamePut {
    /// Its (space, name), whose versions the write answers ([`Written::versions_before`]).
    space: String,
    name: String,
    /// A blob that must be live here for the record to be written (the piece it holds, queued
    /// just before it).
    needs: Option<BlobId>,
}

impl NamePut {
    fn of(record: &NameRecord, needs: Option<BlobId>) -> Option<Box<Self>> {
        Some(Box::new(NamePut { space: record.space.clone(), name: record.name.clone(), needs }))
    }
}

/// What the writer answers for a write that went through.
#[derive(Debug, Default)]
struct Written {
    /// For a name record's put: every version of that name the volume held just before the
    /// put was applied, oldest first — read in the writer's transaction, so no other write of the
    /// name comes between.
    versions_before: Vec<(u128, NameEntry)>,
    /// Whether the operation wrote a record (rather than finding it had nothing to do).
    recorded: bool,
    /// For a stamped TTL update that sorted below the expiry there: that expiry's stamp.
    above: Option<u64>,
}

/// What a stamped expiry ([`Volume::merge_ttl`]) did to a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtlMerge {
    /// It sorted above the replica's expiry and replaced it.
    Taken,
    /// The replica had that very expiry, with that stamp.
    AlreadySo,
    /// The replica's expiry sorts above it (set at `stamp`): kept.
    Kept { stamp: u64 },
}

/// Which put of [`Volume::put_name_with_piece`] failed (`E`: the error of the layer that
/// answers).
#[derive(Debug)]
pub enum PairError<E> {
    /// The piece's: the record was not written either (nor the piece, if it was refused).
    Piece(E),
    /// The record's, the piece stored: whoever deletes the record's pieces deletes it.
    Record(E),
}

impl<E> PairError<E> {
    /// The same failure, its error turned into another layer's.
    pub fn map<F>(self, f: impl FnOnce(E) -> F) -> PairError<F> {
        match self {
            PairError::Piece(e) => PairError::Piece(f(e)),
            PairError::Record(e) => PairError::Record(f(e)),
        }
    }
}

type Reply = oneshot::Sender<Result<Written, VolumeError>>;

enum WriterMsg {
    Write(WriteOp, Reply),
    /// Writes that go in one group commit, never split between two.
    Together(Vec<(WriteOp, Reply)>),
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
    /// What the volume holds, kept by whoever commits (see [`Usage`]): stats cost no redb read.
    pub usage: Usage,
    /// The next journal sequence, published by the writer after each commit: replicas waiting
    /// for this volume's journal to grow wake on it (no polling, no redb read).
    pub journal_tail: tokio::sync::watch::Sender<u64>,
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
    digest_cache: Mutex<Option<digest::DigestCache>>,
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
            journal_tail: tokio::sync::watch::Sender::new(0),
            usage: Usage::default(),
        });
        let (log, rewrite) = recover(&shared)?;
        shared.usage.recount(&shared.db)?;
        shared.journal_tail.send_replace(log.next_seq);
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
                _ => WriteOp::TtlUpdate {
                    blob_id: h.blob_id,
                    expiry_ms: h.expiry_ms,
                    at_ms: h.created_ms,
                    rule: TtlRule::IfNewer,
                },
            };
            let (reply, done) = oneshot::channel();
            let _ = tx.send(WriterMsg::Write(op, reply));
            match futures::executor::block_on(done) {
                Ok(Ok(_) | Err(VolumeError::Deleted | VolumeError::Expired | VolumeError::NotFound)) => {}
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
            digest_cache: Mutex::default(),
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

    fn submit<T>(
        &self,
        msg_for: impl FnOnce(oneshot::Sender<Result<T, VolumeError>>) -> WriterMsg,
    ) -> oneshot::Receiver<Result<T, VolumeError>> {
        let (tx, rx) = oneshot::channel();
        let guard = self.writer.lock().expect("writer lock");
        if let Some((sender, _)) = guard.as_ref() {
            // A send error drops `tx`, and the receiver reports Closed.
            let _ = sender.send(msg_for(tx));
        }
        rx
    }

    async fn write(&self, op: WriteOp) -> Result<Written, VolumeError> {
        self.submit(|reply| WriterMsg::Write(op, reply)).await.unwrap_or(Err(VolumeError::Closed))
    }

    fn check_writable_for_put(&self, payload_len: u64, replicated: bool) -> Result<(), VolumeError> {
        let max = self.shared.config.max_blob_bytes;
        if payload_len > max {
            return Err(VolumeError::TooLarge { size: payload_len, max });
        }
        match self.shared.health() {
            // A stalled volume lets the writer try again: that is how it recovers.
            VolumeHealth::Writable | VolumeHealth::Stalled(_) => Ok(()),
            // Full for new blobs; a copy from a peer may still fit in the room kept for it.
            VolumeHealth::Full if replicated => Ok(()),
            VolumeHealth::Full => Err(VolumeError::Full),
            VolumeHealth::Failed(reason) => Err(VolumeError::Failed(reason)),
        }
    }

    /// Stores a new blob; returns once its record and index entry are durable.
    pub async fn put(&self, req: PutRequest) -> Result<(), VolumeError> {
        self.store(req, false, None).await.map(drop)
    }

    /// Stores the name record `record` (as blob `blob_id`), and answers every version of its
    /// name this volume held just before it, oldest first (the record itself among them when
    /// it was stored already).
    pub async fn put_name(
        &self,
        blob_id: BlobId,
        record: &NameRecord,
        created_ms: u64,
    ) -> Result<Vec<(u128, NameEntry)>, VolumeError> {
        Ok(self.store(name_put(blob_id, record, created_ms), false, NamePut::of(record, None)).await?.versions_before)
    }

    /// Stores `piece` and the name record `record` (as blob `name_id`) that holds it in one
    /// writer step: one group commit (one writer round trip, not the piece's and then the
    /// record's in turn), the record after the piece and only if the piece was stored, and
    /// written only once the piece is durable (see `Writer::stage_and_commit`). Answers as
    /// [`Volume::put_name`], or which of the two failed.
    pub async fn put_name_with_piece(
        &self,
        piece: PutRequest,
        name_id: BlobId,
        record: &NameRecord,
        created_ms: u64,
    ) -> Result<Vec<(u128, NameEntry)>, PairError<VolumeError>> {
        let piece_id = piece.blob_id;
        let piece = self.encoded_put(piece, false).await.map_err(PairError::Piece)?;
        let name = self.encoded_put(name_put(name_id, record, created_ms), false).await.map_err(PairError::Piece)?;
        let (piece_tx, piece_written) = oneshot::channel();
        let (name_tx, name_written) = oneshot::channel();
        let both = vec![
            (WriteOp::Put { record: piece, replicated: false, name: None }, piece_tx),
            (WriteOp::Put { record: name, replicated: false, name: NamePut::of(record, Some(piece_id)) }, name_tx),
        ];
        if let Some((sender, _)) = self.writer.lock().expect("writer lock").as_ref() {
            // A send error drops the replies, and the receivers report Closed.
            let _ = sender.send(WriterMsg::Together(both));
        }
        piece_written.await.unwrap_or(Err(VolumeError::Closed)).map_err(PairError::Piece)?;
        let name_written = name_written.await.unwrap_or(Err(VolumeError::Closed)).map_err(PairError::Record)?;
        Ok(name_written.versions_before)
    }

    /// Stores a blob copied from a peer replica (replication, repair, anti-entropy): it may use
    /// the room kept for peers ([`VolumeConfig::peer_reserve_bytes`]) that new blobs may not.
    pub async fn put_replicated(&self, req: PutRequest) -> Result<(), VolumeError> {
        self.store(req, true, None).await.map(drop)
    }

    async fn store(
        &self,
        req: PutRequest,
        replicated: bool,
        name: Option<Box<NamePut>>,
    ) -> Result<Written, VolumeError> {
        let record = self.encoded_put(req, replicated).await?;
        self.write(WriteOp::Put { record, replicated, name }).await
    }

    /// A put checked against the volume's state and encoded as its record.
    async fn encoded_put(&self, req: PutRequest, replicated: bool) -> Result<EncodedRecord, VolumeError> {
        self.check_writable_for_put(req.payload.len() as u64, replicated)?;
        let req = PutRequest { expiry_ms: record::normalize_expiry(req.expiry_ms), ..req };
        // The CRC pass over a large payload runs off the async runtime: a 64 MiB blob takes
        // milliseconds, and every other request on that thread would wait.
        if req.payload.len() > INLINE_CRC_BYTES {
            tokio::task::spawn_blocking(move || encode_put(&req)).await.map_err(|e| VolumeError::Failed(e.to_string()))
        } else {
            Ok(encode_put(&req))
        }
    }

    /// Deletes a blob (idempotent); returns once the tombstone is durable.
    pub async fn delete(&self, blob_id: BlobId) -> Result<(), VolumeError> {
        self.write(WriteOp::Delete { blob_id, at_ms: now_ms(), tombstone_unknown: false }).await.map(drop)
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

    /// Moves the token of `peer` to `next_seq`, owing `owed` (entries before it that could not
    /// be applied). It goes through the writer after every write queued before it, so it
    /// commits with them or after them, never ahead of what it covers; lazily durable, as every
    /// index change: lost in a crash, token and owed entries go back together and the entries are
    /// pulled and applied again (idempotently).
    pub async fn advance_replication(
        &self,
        peer: &str,
        next_seq: u64,
        owed: Vec<(u64, OwedEntry)>,
    ) -> Result<(), VolumeError> {
        self.write(WriteOp::Progress { peer: peer.to_owned(), next_seq, owed }).await.map(drop)
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
    pub fn journal_tail(&self) -> u64 {
        *self.shared.journal_tail.borrow()
    }

    /// The lowest journal sequence still kept: entries below it were truncated.
    pub fn journal_head(&self) -> Result<u64, VolumeError> {
        let txn = self.shared.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(index::get::<_, u64>(&meta, index::JOURNAL_HEAD)?.unwrap_or(0))
    }

    /// Drops the journal entries below `below` (bounded per call: call again until
    /// [`Volume::journal_head`] reaches it). Entries are only needed by peers that have not
    /// pulled them; a peer that asks for one dropped learns it must bootstrap.
    pub async fn truncate_journal(&self, below: u64) -> Result<(), VolumeError> {
        self.write(WriteOp::TruncateJournal { below }).await.map(drop)
    }

    /// Wakes when the journal grows (see [`Shared::journal_tail`]).
    pub fn watch_journal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.journal_tail.subscribe()
    }

    /// Sets a new expiry (`None`: never expires), as a client asked for it now.
    pub async fn update_ttl(&self, blob_id: BlobId, expiry_ms: Option<u64>) -> Result<(), VolumeError> {
        self.set_ttl(blob_id, expiry_ms, now_ms()).await
    }

    /// Sets a new expiry a client asked for, stamped `at_ms`, on the only copy there is (a
    /// standalone node's, or a change from an older node that sends no stamp). It replaces the
    /// expiry even if that one's stamp is later (another clock); the record then takes a stamp
    /// just above it. A cluster's coordinator uses [`Volume::merge_ttl`] instead.
    pub async fn set_ttl(&self, blob_id: BlobId, expiry_ms: Option<u64>, at_ms: u64) -> Result<(), VolumeError> {
        let expiry_ms = record::normalize_expiry(expiry_ms);
        self.write(WriteOp::TtlUpdate { blob_id, expiry_ms, at_ms, rule: TtlRule::Set }).await.map(drop)
    }

    /// Takes an expiry set at `set_ms` — another replica's, or a change a cluster's coordinator
    /// stamped — if it sorts above this replica's ([`index::ttl_order`]).
    pub async fn merge_ttl(
        &self,
        blob_id: BlobId,
        expiry_ms: Option<u64>,
        set_ms: u64,
    ) -> Result<TtlMerge, VolumeError> {
        let expiry_ms = record::normalize_expiry(expiry_ms);
        let written =
            self.write(WriteOp::TtlUpdate { blob_id, expiry_ms, at_ms: set_ms, rule: TtlRule::IfNewer }).await?;
        Ok(match (written.recorded, written.above) {
            (true, _) => TtlMerge::Taken,
            (false, Some(stamp)) => TtlMerge::Kept { stamp },
            (false, None) => TtlMerge::AlreadySo,
        })
    }

    /// Makes everything written so far durable in the index (normally done periodically).
    pub async fn checkpoint(&self) -> Result<(), VolumeError> {
        self.submit(WriterMsg::Checkpoint).await.unwrap_or(Err(VolumeError::Closed))
    }

    /// The index entry of `blob_id`, whatever its state.
    pub fn entry(&self, blob_id: BlobId) -> Result<IndexEntry, VolumeError> {
        let txn = self.shared.db.begin_read()?;
        let blobs = txn.open_table(BLOBS)?;
        index::get_entry(&blobs, blob_id.to_bytes())?.ok_or(VolumeError::NotFound)
    }

    /// Every version of `name` in `space` this replica holds, oldest first (blocking).
    pub fn name_versions(&self, space: &str, name: &str) -> Result<Vec<(u128, NameEntry)>, VolumeError> {
        let txn = self.shared.db.begin_read()?;
        let names = match txn.open_table(index::NAMES) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        index::name_versions(&names, space, name)
    }

    /// The current names of `space` that start with `prefix`, from `from` on (`from` itself left
    /// out when `after`), in byte order: at most `limit` (blocking).
    pub fn current_names(
        &self,
        space: &str,
        from: &str,
        after: bool,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<CurrentName>, VolumeError> {
        let txn = self.shared.db.begin_read()?;
        let names = match txn.open_table(index::NAMES) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let start = if from < prefix { prefix } else { from };
        let mut out = Vec::new();
        // Rows come name by name, each name's versions oldest first: its last row is current.
        let mut newest: Option<(String, u128, NameEntry)> = None;
        let emit = |row: Option<(String, u128, NameEntry)>, out: &mut Vec<CurrentName>| {
            if let Some((name, version, entry)) = row {
                let skipped = (after && name == from) || entry.is_delete_marker();
                if !skipped {
                    out.push(CurrentName { name, version, id: entry.blob_id(), summary: entry.summary });
                }
            }
        };
        for row in names.range((space, start, 0u128)..)? {
            let (key, value) = row?;
            let (row_space, name, version) = key.value();
            if row_space != space || !name.starts_with(prefix) {
                break;
            }
            let entry: NameEntry = index::decode(value.value())?;
            match &mut newest {
                Some((current, v, e)) if current == name => {
                    *v = version;
                    *e = entry;
                }
                _ => {
                    emit(newest.take(), &mut out);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                    newest = Some((name.to_string(), version, entry));
                }
            }
        }
        emit(newest, &mut out);
        out.truncate(limit);
        Ok(out)
    }

    /// The name record a name id holds (blocking: it reads the record).
    pub fn name_record(&self, id: BlobId) -> Result<NameRecord, VolumeError> {
        let reader = self.open_blob(id)?;
        let payload = reader.read_range(0, reader.len())?;
        NameRecord::decode_for(id, &payload)
    }

    /// Which of `ids` the index holds (live, deleted or expired), in one read transaction
    /// (blocking: call off the async runtime).
    pub fn held(&self, ids: &[BlobId]) -> Result<std::collections::HashSet<BlobId>, VolumeError> {
        let txn = self.shared.db.begin_read()?;
        let blobs = txn.open_table(BLOBS)?;
        let mut out = std::collections::HashSet::new();
        for id in ids {
            if blobs.get(id.to_bytes())?.is_some() {
                out.insert(*id);
            }
        }
        Ok(out)
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

    /// What the volume holds: from counters the writer keeps (no redb read, cheap enough for
    /// every PUT's placement and every scrape), recounted once after compaction changed them.
    pub fn stats(&self) -> Result<VolumeStats, VolumeError> {
        if self.shared.usage.stale.swap(false, Ordering::SeqCst) {
            self.shared.usage.recount(&self.shared.db)?;
        }
        let usage = &self.shared.usage;
        let (live_bytes, written_bytes) =
            (usage.live_bytes.load(Ordering::SeqCst), usage.written_bytes.load(Ordering::SeqCst));
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
            blobs: usage.blobs.load(Ordering::SeqCst),
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
/// All the room a volume would have left after a record of `len` bytes (the rest of the active
/// segment and every segment it may still have, made or not); `None` when it cannot be placed.
/// What the room kept for peers is measured against: unlike a tombstone's, it need not be sure
/// now, only there by the time the peers' blobs come.
fn capacity_after(marker: &VolumeMarker, segments: u32, offset: u64, len: u64) -> Option<u64> {
    let usable = marker.segment_size - SEGMENT_HEADER_LEN - SEAL_LEN;
    let spare_segments = u64::from(marker.max_segments().saturating_sub(segments));
    if offset + len + SEAL_LEN <= marker.segment_size {
        Some(marker.segment_size - offset - len - SEAL_LEN + spare_segments * usable)
    } else if spare_segments > 0 && len <= usable {
        Some(usable - len + (spare_segments - 1) * usable)
    } else {
        None
    }
}

/// Whether a new blob's record of `len` bytes leaves the room kept for peers.
fn leaves_peer_reserve(marker: &VolumeMarker, segments: u32, offset: u64, len: u64, peer_reserve: u64) -> bool {
    peer_reserve == 0 || capacity_after(marker, segments, offset, len).is_some_and(|left| left >= peer_reserve)
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

/// Payloads up to this size are checksummed on the caller's thread.
const INLINE_CRC_BYTES: usize = 256 * 1024;

/// The record of a 4 KiB blob with a little metadata: a volume where this no longer fits is full.
const SMALL_PUT_RECORD: u64 = HEADER_LEN + 64 + 4096 + 4 + 4;

/// Refuses a maximum blob size whose records would not fit in one segment.
fn check_geometry(marker: &VolumeMarker, config: &VolumeConfig) -> Result<(), VolumeError> {
    Ok(layout::check_geometry(marker.capacity_bytes, marker.segment_size, config.max_blob_bytes)?)
}

/// The put of a name record, as blob `blob_id`.
fn name_put(blob_id: BlobId, record: &NameRecord, created_ms: u64) -> PutRequest {
    PutRequest {
        blob_id,
        meta: NameRecord::blob_meta(),
        payload: Bytes::from(record.encode()),
        created_ms,
        expiry_ms: None,
    }
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

fn integrity(e: RecordError) -> VolumeError {
    VolumeError::Integrity(e.to_string())
}

/// A change of [`Usage`] by one commit.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UsageDelta {
    pub live_bytes: i64,
    pub written_bytes: i64,
    pub blobs: i64,
}

/// Bytes and blobs a volume holds, as counters: set by a count of the index at open, moved by
/// the writer after each commit by what the commit changed, and counted again (on the next
/// [`Volume::stats`]) after compaction, which changes them in transactions of its own.
#[derive(Debug, Default)]
pub(crate) struct Usage {
    pub live_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub blobs: AtomicU64,
    /// Compaction committed: count again before the next answer.
    pub stale: std::sync::atomic::AtomicBool,
}

impl Usage {
    pub fn apply(&self, delta: UsageDelta) {
        let add = |counter: &AtomicU64, by: i64| {
            let _ = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| Some(v.saturating_add_signed(by)));
        };
        add(&self.live_bytes, delta.live_bytes);
        add(&self.written_bytes, delta.written_bytes);
        add(&self.blobs, delta.blobs);
    }

    /// Counts from the index: the segments' live bytes and ends, and the live blob count.
    pub fn recount(&self, db: &Database) -> Result<(), VolumeError> {
        let txn = db.begin_read()?;
        let segments = txn.open_table(SEGMENTS)?;
        let (mut live_bytes, mut written_bytes) = (0, 0);
        for item in segments.iter()? {
            let (_, value) = item?;
            let info = index::decode::<SegmentInfo>(value.value())?;
            live_bytes += info.live_bytes;
            written_bytes += info.end.saturating_sub(SEGMENT_HEADER_LEN);
        }
        let blobs = index::get(&txn.open_table(META)?, index::LIVE_BLOBS)?.unwrap_or(0);
        self.live_bytes.store(live_bytes, Ordering::SeqCst);
        self.written_bytes.store(written_bytes, Ordering::SeqCst);
        self.blobs.store(blobs, Ordering::SeqCst);
        Ok(())
    }
}
