//! The group-commit writer: plans each queued write against the index, appends the batch with
//! one pwritev, syncs once, and applies it to the index in one redb transaction.

use super::*;

/// The writer's position in the log.
pub(super) struct LogPosition {
    pub(super) segment: u32,
    pub(super) file: Arc<File>,
    pub(super) offset: u64,
    pub(super) next_seq: u64,
}

/// Segment stats touched by one transaction, written back once at its end.
pub(super) struct SegmentStats<'t, 'a> {
    pub(super) table: &'a mut Table<'t, u32, &'static [u8]>,
    pub(super) cache: HashMap<u32, SegmentInfo>,
    /// Each touched segment as it was before, for the change in usage.
    original: HashMap<u32, SegmentInfo>,
}

impl<'t, 'a> SegmentStats<'t, 'a> {
    pub(super) fn new(table: &'a mut Table<'t, u32, &'static [u8]>) -> Self {
        Self { table, cache: HashMap::new(), original: HashMap::new() }
    }

    pub(super) fn get(&mut self, segment: u32) -> Result<&mut SegmentInfo, VolumeError> {
        if !self.cache.contains_key(&segment) {
            let info = index::get(&*self.table, segment)?.unwrap_or(SegmentInfo {
                live_bytes: 0,
                end: SEGMENT_HEADER_LEN,
                sealed: false,
            });
            self.original.insert(segment, info);
            self.cache.insert(segment, info);
        }
        Ok(self.cache.get_mut(&segment).expect("just inserted"))
    }

    pub(super) fn is_sealed(&self, segment: u32) -> Result<bool, VolumeError> {
        Ok(match self.cache.get(&segment) {
            Some(info) => info.sealed,
            None => index::get::<_, SegmentInfo>(&*self.table, segment)?.is_some_and(|info| info.sealed),
        })
    }

    /// Writes the touched segments back; how the volume's usage changed.
    pub(super) fn flush(self) -> Result<UsageDelta, VolumeError> {
        let mut delta = UsageDelta::default();
        for (segment, info) in self.cache {
            let before = &self.original[&segment];
            delta.live_bytes += info.live_bytes as i64 - before.live_bytes as i64;
            delta.written_bytes += info.end as i64 - before.end as i64;
            self.table.insert(segment, index::encode(&info).as_slice())?;
        }
        Ok(delta)
    }
}

/// The tables one write transaction updates.
pub(super) struct Tables<'t, 'a> {
    pub(super) blobs: Table<'t, [u8; 21], &'static [u8]>,
    pub(super) journal: Table<'t, u64, &'static [u8]>,
    pub(super) damaged: Table<'t, [u8; 21], &'static [u8]>,
    pub(super) segments: SegmentStats<'t, 'a>,
    /// Change of the live blob count ([`index::LIVE_BLOBS`]) in this transaction.
    pub(super) live_blobs: i64,
    txn: &'t WriteTransaction,
    /// [`index::NAMES`], opened when a name record comes.
    names: Option<NamesTable<'t>>,
}

type NamesTable<'t> = Table<'t, (&'static str, &'static str, u128), &'static [u8]>;

impl<'t, 'a> Tables<'t, 'a> {
    /// The tables of a write transaction; `segments` is opened by the caller, who keeps it.
    pub(super) fn open(
        txn: &'t WriteTransaction,
        segments: &'a mut Table<'t, u32, &'static [u8]>,
    ) -> Result<Self, VolumeError> {
        Ok(Self {
            blobs: txn.open_table(BLOBS)?,
            journal: txn.open_table(JOURNAL)?,
            damaged: txn.open_table(DAMAGED)?,
            segments: SegmentStats::new(segments),
            live_blobs: 0,
            txn,
            names: None,
        })
    }

    fn names(&mut self) -> Result<&mut NamesTable<'t>, VolumeError> {
        if self.names.is_none() {
            self.names = Some(self.txn.open_table(index::NAMES)?);
        }
        Ok(self.names.as_mut().expect("just opened"))
    }

    /// Every version of `name` in `space`, oldest first, as this transaction sees them.
    fn name_versions(&mut self, space: &str, name: &str) -> Result<Vec<(u128, NameEntry)>, VolumeError> {
        index::name_versions(&*self.names()?, space, name)
    }
}

/// Keeps the name index in step with a name record's put or delete (`engine::names`): a put
/// inserts the record's row and answers where it is (kept in the record's `blobs` entry); a
/// delete removes the row at `row`, where the put said it was.
fn apply_to_names(
    tables: &mut Tables<'_, '_>,
    header: &RecordHeader,
    payload: &[u8],
    row: Option<NameKey>,
) -> Result<Option<NameKey>, VolumeError> {
    let id = header.blob_id;
    let names = tables.names()?;
    match header.kind {
        RecordKind::Put => {
            // Checked before it was written (plan_op); a record that does not decode now (a bug
            // of an older release) stays a blob without a name rather than failing the volume.
            let record = match NameRecordRef::decode_for(id, payload) {
                Ok(record) => record,
                Err(e) => {
                    tracing::error!(%id, error = %e, "a name record does not decode; it is not in the name index");
                    return Ok(None);
                }
            };
            let entry = NameEntry { id: id.to_bytes(), summary: record.summary.to_vec() };
            names.insert((record.space, record.name, record.version), index::encode(&entry).as_slice())?;
            Ok(Some(NameKey { space: record.space.to_owned(), name: record.name.to_owned(), version: record.version }))
        }
        RecordKind::Delete => {
            if let Some(key) = row {
                names.remove((key.space.as_str(), key.name.as_str(), key.version))?;
            }
            Ok(None)
        }
        _ => Ok(row),
    }
}

/// Applies one record to the index, journal and segment stats (and the name index, for a name
/// record: `payload` is the record's). The writer and recovery both use this, so replaying a
/// record gives exactly the state the writer produced.
pub(super) fn apply_record(
    tables: &mut Tables<'_, '_>,
    header: &RecordHeader,
    payload: &[u8],
    location: Location,
    crc: u32,
    next_seq: &mut u64,
) -> Result<(), VolumeError> {
    let key = header.blob_id.to_bytes();
    let existing = index::get_entry(&tables.blobs, key)?;
    let seq = *next_seq;
    if matches!(header.kind, RecordKind::Put | RecordKind::Delete) && !tables.damaged.is_empty()? {
        // The blob came again (repair) or was deleted: nothing is owed any more.
        tables.damaged.remove(key)?;
    }
    let mut entry = match (header.kind, existing) {
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
                name: None,
                expiry_set_ms: header.created_ms,
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
            name: None,
            expiry_set_ms: header.created_ms,
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
            entry.expiry_set_ms = header.created_ms;
            tables.journal.insert(seq, index::encode(&journal_entry(header, location)).as_slice())?;
            *next_seq += 1;
            tables.blobs.insert(key, index::encode_entry(&entry).as_slice())?;
            return Ok(());
        }
        // Nothing to do: a seal, or a record the current state already supersedes.
        _ => return Ok(()),
    };
    if header.blob_id.is_name() {
        // The entry's row is the one its put inserted (a delete's entry is the put's, changed).
        let row = entry.name.take();
        entry.name = apply_to_names(tables, header, payload, row)?;
    }
    tables.segments.get(location.segment)?.live_bytes += location.len;
    tables.journal.insert(seq, index::encode(&journal_entry(header, location)).as_slice())?;
    tables.blobs.insert(key, index::encode_entry(&entry).as_slice())?;
    *next_seq += 1;
    Ok(())
}

pub(super) fn journal_entry(header: &RecordHeader, location: Location) -> JournalEntry {
    JournalEntry { blob_id: header.blob_id.to_bytes(), kind: header.kind, location }
}

/// What a write operation turns into once checked against the index.
pub(super) enum Planned {
    Record(EncodedRecord),
    /// Already in the requested state (idempotent retry).
    Nothing,
    /// A peer's or a coordinator's expiry that sorts below the one here, set at `stamp`:
    /// nothing is written.
    Below {
        stamp: u64,
    },
}

pub(super) fn plan_op(blobs: &Table<'_, [u8; 21], &'static [u8]>, op: WriteOp) -> Result<Planned, VolumeError> {
    let now = now_ms();
    let (blob_id, kind, at_ms, expiry_ms) = match op {
        WriteOp::Put { record, name, .. } => {
            // What it needs is not there (refused just before it): neither is written.
            if let Some(needed) = name.and_then(|n| n.needs) {
                if !index::get_entry(blobs, needed.to_bytes())?.is_some_and(|e| e.state == BlobState::Live) {
                    return Err(VolumeError::NotFound);
                }
            }
            if record.header.blob_id.is_name() {
                NameRecordRef::decode_for(record.header.blob_id, &record.payload)?;
            }
            return match index::get_entry(blobs, record.header.blob_id.to_bytes())? {
                None => Ok(Planned::Record(record)),
                Some(e) if e.state == BlobState::Live && e.crc == record.trailer_crc() => Ok(Planned::Nothing),
                // A put never resurrects a deleted blob.
                Some(e) if e.state != BlobState::Live => Ok(Planned::Nothing),
                Some(_) => Err(VolumeError::Conflict),
            };
        }
        WriteOp::Delete { blob_id, at_ms, tombstone_unknown } => match index::get_entry(blobs, blob_id.to_bytes())? {
            None if tombstone_unknown => (blob_id, RecordKind::Delete, at_ms, None),
            None => return Err(VolumeError::NotFound),
            Some(e) if e.state != BlobState::Live => return Ok(Planned::Nothing),
            Some(_) => (blob_id, RecordKind::Delete, at_ms, None),
        },
        // Handled by the writer before planning: no record.
        WriteOp::Progress { .. } | WriteOp::TruncateJournal { .. } => return Ok(Planned::Nothing),
        WriteOp::TtlUpdate { blob_id, expiry_ms, at_ms, rule } => match index::get_entry(blobs, blob_id.to_bytes())? {
            None => return Err(VolumeError::NotFound),
            Some(e) if e.state == BlobState::Deleted => return Err(VolumeError::Deleted),
            Some(e) if e.is_expired(now) => return Err(VolumeError::Expired),
            // A change made now wins here, whatever the clock that stamped it says; its record
            // carries the stamp that makes it win, which the peers compare theirs with.
            Some(e) if rule == TtlRule::Set => {
                (blob_id, RecordKind::TtlUpdate, at_ms.max(e.expiry_set_ms.saturating_add(1)), expiry_ms)
            }
            // A stamped expiry (a peer's, or a coordinator's change) replaces this one only if it
            // sorts above it, so that every replica ends with the highest and none copies back
            // and forth.
            Some(e) if (at_ms, expiry_ms) == (e.expiry_set_ms, e.expiry_ms) => return Ok(Planned::Nothing),
            // Entries from before the stamp existed read as set at the put's time, and every
            // change since is stamped above it: two expiries that differ at that very stamp
            // differ by a change the older release made and one replica missed. The one sent
            // here is taken (its replica announced a change, as the older release copied it),
            // just above that stamp, so that the stamps decide from then on and two such
            // replicas never trade theirs.
            Some(e) if at_ms == e.created_ms && e.expiry_set_ms == e.created_ms => {
                (blob_id, RecordKind::TtlUpdate, e.created_ms.saturating_add(1), expiry_ms)
            }
            Some(e) if index::ttl_order(at_ms, expiry_ms) < index::ttl_order(e.expiry_set_ms, e.expiry_ms) => {
                return Ok(Planned::Below { stamp: e.expiry_set_ms })
            }
            Some(_) => (blob_id, RecordKind::TtlUpdate, at_ms, expiry_ms),
        },
    };
    let header = RecordHeader { kind, blob_id, created_ms: at_ms, expiry_ms, meta_len: 0, payload_len: 0 };
    Ok(Planned::Record(EncodedRecord::new(header, &[], Bytes::new(), &[])))
}

/// How often an idle writable volume looks at its disk's room.
const IDLE_CHECK: std::time::Duration = std::time::Duration::from_secs(10);

pub(super) struct Writer {
    shared: Arc<Shared>,
    log: LogPosition,
    last_checkpoint: Instant,
    bytes_since_checkpoint: u64,
    dirty: bool,
}

/// Bytes of one pending segment write.
pub(super) struct PendingWrite {
    file: Arc<File>,
    offset: u64,
    parts: Vec<Bytes>,
}

impl Writer {
    pub(super) fn new(shared: Arc<Shared>, log: LogPosition) -> Self {
        Self { shared, log, last_checkpoint: Instant::now(), bytes_since_checkpoint: 0, dirty: false }
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<WriterMsg>) {
        let interval = self.shared.config.checkpoint_interval;
        loop {
            // Idle and writable, nothing to checkpoint: look at the disk seldom (a node holds
            // hundreds of volumes; each waking every second costs CPU for nothing). A put looks
            // at the disk itself before it is written.
            let idle = !self.dirty && self.shared.health() == VolumeHealth::Writable;
            let wait = if idle { interval.max(IDLE_CHECK) } else { interval };
            let first = match rx.recv_timeout(wait) {
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
                let op_len = |op: &WriteOp| match op {
                    WriteOp::Put { record, .. } => record.record_len(),
                    _ => HEADER_LEN,
                };
                match msg {
                    WriterMsg::Write(op, reply) => {
                        bytes += op_len(&op);
                        batch.push((op, reply));
                    }
                    WriterMsg::Together(ops) => {
                        bytes += ops.iter().map(|(op, _)| op_len(op)).sum::<u64>();
                        batch.extend(ops);
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
        batch: Vec<(WriteOp, oneshot::Sender<Result<Written, VolumeError>>)>,
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
                let tail = self.log.next_seq;
                self.shared.journal_tail.send_if_modified(|t| std::mem::replace(t, tail) != tail);
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
        batch: Vec<(WriteOp, oneshot::Sender<Result<Written, VolumeError>>)>,
        durable: bool,
    ) -> Result<
        (Vec<(oneshot::Sender<Result<Written, VolumeError>>, Result<Written, VolumeError>)>, u64),
        (Vec<oneshot::Sender<Result<Written, VolumeError>>>, VolumeError),
    > {
        let shared = self.shared.clone();
        // Every request's reply is kept apart from its op, so that a failure anywhere in the
        // batch answers each of them (a dropped reply would read as "closed", not "failed").
        let (ops, senders): (Vec<WriteOp>, Vec<_>) = batch.into_iter().unzip();
        let mut results: Vec<Result<Written, VolumeError>> = Vec::with_capacity(ops.len());
        let txn = match begin_write(&shared.db, durable) {
            Ok(txn) => txn,
            Err(e) => return Err((senders, shared.fail_index("index transaction", e))),
        };
        // Records in log order, in two phases: a record that needs another (a name record and
        // the piece it holds) and every one after it wait until those before are durable, so
        // that no power loss tearing this batch can leave it without what it needs (recovery
        // replays an intact record after a torn one).
        let mut writes: [Vec<PendingWrite>; 2] = [Vec::new(), Vec::new()];
        let mut phase = 0;
        let mut usage = UsageDelta::default();
        let mut written = 0u64;
        let mut put_stored = false;
        // One look at the filesystem per batch: puts wait while the index reserve is short.
        let disk_room =
            if ops.iter().any(|op| matches!(op, WriteOp::Put { .. })) { shared.check_disk_room() } else { Ok(()) };
        let staged: Result<(), VolumeError> = (|| {
            let mut segments_table = txn.open_table(SEGMENTS)?;
            let mut tables = Tables::open(&txn, &mut segments_table)?;
            for op in ops {
                if let WriteOp::Progress { peer, next_seq, owed } = &op {
                    txn.open_table(index::REPLICATION)?.insert(peer.as_str(), *next_seq)?;
                    let mut table = txn.open_table(index::OWED)?;
                    for (seq, entry) in owed {
                        table.insert((peer.as_str(), *seq), index::encode(entry).as_slice())?;
                    }
                    results.push(Ok(Written::default()));
                    continue;
                }
                if let WriteOp::TruncateJournal { below } = &op {
                    truncate_journal(&txn, &mut tables.journal, (*below).min(self.log.next_seq))?;
                    results.push(Ok(Written::default()));
                    continue;
                }
                let is_put = matches!(op, WriteOp::Put { .. });
                // New blobs leave the room kept for peers; copies from peers may use it.
                let peer_reserve = match op {
                    WriteOp::Put { replicated: false, .. } => shared.config.peer_reserve_bytes,
                    _ => 0,
                };
                if let (true, Err(VolumeError::Paused { reason, no_space })) = (is_put, &disk_room) {
                    results.push(Err(VolumeError::Paused { reason: reason.clone(), no_space: *no_space }));
                    continue;
                }
                if matches!(&op, WriteOp::Put { name: Some(n), .. } if n.needs.is_some()) {
                    phase = 1;
                }
                let versions_before = match &op {
                    WriteOp::Put { name: Some(of), .. } => tables.name_versions(&of.space, &of.name)?,
                    _ => Vec::new(),
                };
                let mut done = Written { versions_before, ..Written::default() };
                let planned = match plan_op(&tables.blobs, op) {
                    Ok(p) => p,
                    Err(e) => {
                        results.push(Err(e));
                        continue;
                    }
                };
                let record = match planned {
                    Planned::Record(record) => record,
                    Planned::Nothing => {
                        results.push(Ok(done));
                        continue;
                    }
                    Planned::Below { stamp } => {
                        done.above = Some(stamp);
                        results.push(Ok(done));
                        continue;
                    }
                };
                match self.place(&mut tables, &mut writes[phase], record.record_len(), record.header.kind, peer_reserve)
                {
                    Ok(location) => {
                        apply_record(
                            &mut tables,
                            &record.header,
                            &record.payload,
                            location,
                            record.trailer_crc(),
                            &mut self.log.next_seq,
                        )?;
                        push_write(&mut writes[phase], &self.log.file, location.offset, &record);
                        written += location.len;
                        put_stored |= is_put;
                        done.recorded = true;
                        results.push(Ok(done));
                    }
                    Err(VolumeError::Full) => {
                        if is_put {
                            shared.set_health(VolumeHealth::Full);
                        }
                        results.push(Err(VolumeError::Full));
                    }
                    // This request alone is refused; the volume goes on.
                    Err(
                        e @ (VolumeError::NoRoom { .. } | VolumeError::Paused { .. } | VolumeError::TooLarge { .. }),
                    ) => results.push(Err(e)),
                    Err(e) => return Err(e),
                }
            }
            tables.segments.get(self.log.segment)?.end = self.log.offset;
            let live_blobs = tables.live_blobs;
            usage = tables.segments.flush()?;
            usage.blobs = live_blobs;
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
        let fail_all = |senders, err| Err((senders, err));
        if let Err(e) = staged {
            let e = match e {
                failed @ VolumeError::Failed(_) => failed,
                e => shared.fail_index("staging batch", e),
            };
            return fail_all(senders, e);
        }
        // Durability order: records (fdatasync) before the index that points at them, and the
        // second phase's records after the first's.
        let sync_started = Instant::now();
        for writes in writes.iter().filter(|w| !w.is_empty()) {
            if let Err((what, e)) = write_and_sync(writes) {
                return fail_all(senders, shared.fail(what, e));
            }
        }
        if !writes[0].is_empty() || !writes[1].is_empty() {
            shared.metrics.fsync_seconds.observe(sync_started.elapsed().as_secs_f64());
        }
        let injected = injected_commit_failure();
        if let Some(e) = injected {
            return fail_all(senders, shared.fail_index("index commit", e));
        }
        if let Err(e) = txn.commit() {
            return fail_all(senders, shared.fail_index("index commit", e));
        }
        shared.usage.apply(usage);
        if put_stored {
            shared.unstall();
        }
        Ok((senders.into_iter().zip(results).collect(), written))
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
        peer_reserve: u64,
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
        // In the active segment if the reserve stays sure; else in a new segment if it fits there;
        // and a new blob only while the room kept for peers stays.
        let (count, offset) = (shared.segments.count(), self.log.offset);
        let place = |len| {
            placement(&shared.marker, count, offset, len, reserve)
                .filter(|_| leaves_peer_reserve(&shared.marker, count, offset, len, peer_reserve))
        };
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
            let created = create_segment(&shared, next);
            let file = match created {
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

/// Writes `writes` and makes them durable (one fdatasync per file). An fsync error is never
/// retried: the page cache state is unknown afterwards.
fn write_and_sync(writes: &[PendingWrite]) -> Result<(), (&'static str, std::io::Error)> {
    for w in writes {
        let slices: Vec<&[u8]> = w.parts.iter().map(|p| p.as_ref()).collect();
        write_all_vectored_at(&w.file, w.offset, &slices).map_err(|e| ("segment write", e))?;
    }
    let mut synced: Vec<*const File> = Vec::new();
    for w in writes {
        let ptr = Arc::as_ptr(&w.file);
        if !synced.contains(&ptr) {
            synced.push(ptr);
            crate::engine::segments::sync_segment(&w.file).map_err(|e| ("fdatasync", e))?;
        }
    }
    Ok(())
}

pub(super) fn push_write(writes: &mut Vec<PendingWrite>, file: &Arc<File>, offset: u64, record: &EncodedRecord) {
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

pub(super) fn clone_failure(e: &VolumeError) -> VolumeError {
    VolumeError::Failed(e.to_string())
}

/// Journal rows dropped in one commit at most: a long truncation is spread over commits, so that
/// writes queued behind it do not wait.
const TRUNCATE_PER_COMMIT: u64 = 50_000;

/// Drops journal rows from the head up to `below` (bounded per commit) and moves the head.
fn truncate_journal(
    txn: &redb::WriteTransaction,
    journal: &mut Table<'_, u64, &'static [u8]>,
    below: u64,
) -> Result<(), VolumeError> {
    let mut meta = txn.open_table(META)?;
    let head: u64 = index::get(&meta, index::JOURNAL_HEAD)?.unwrap_or(0);
    if below <= head {
        return Ok(());
    }
    let until = below.min(head.saturating_add(TRUNCATE_PER_COMMIT));
    journal.retain_in(head..until, |_, _| false)?;
    meta.insert(index::JOURNAL_HEAD, index::encode(&until).as_slice())?;
    Ok(())
}

/// A failure of the index commit injected by a test (`failpoints` feature), if any.
fn injected_commit_failure() -> Option<&'static str> {
    fail::fail_point!("index-commit", |_| Some("injected index commit failure"));
    None
}

fn create_segment(shared: &Shared, next: u32) -> Result<File, layout::LayoutError> {
    // `enospc` injects a full disk (passing), anything else an I/O error (fatal).
    fail::fail_point!("segment-create", |arg| {
        let errno = if arg.as_deref() == Some("enospc") { rustix::io::Errno::NOSPC } else { rustix::io::Errno::IO };
        Err(layout::LayoutError::Io {
            path: shared.dir.clone(),
            source: std::io::Error::from_raw_os_error(errno.raw_os_error()),
        })
    });
    layout::create_segment(&shared.dir, &shared.marker, next, shared.config.preallocation)
}
