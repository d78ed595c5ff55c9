//! Opening a volume after a crash: the index is brought up to date with the log past its last
//! durable checkpoint; damaged records are found, counted and set aside.

use super::writer::{apply_record, SegmentStats, Tables};
use super::*;
use redb::TableHandle;

/// Brings the index up to date with the log; returns the writer's position, and the damaged
/// deletes and TTL updates (header intact) to write again once the writer runs.
pub(super) fn recover(shared: &Shared) -> Result<(LogPosition, Vec<RecordHeader>), VolumeError> {
    compaction::resolve_interrupted(shared)?;
    let dir = &shared.dir;
    let marker = &shared.marker;
    let txn = begin_write(&shared.db, true)?;
    migrate_legacy_name_ids(&txn)?;
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
        let mut tables = Tables::open(&txn, &mut segments_table)?;
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
                            if index::get_entry(&tables.blobs, h.blob_id.to_bytes())?.is_none() {
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
                    let payload = &bytes[header.payload_offset() as usize..header.chunk_table_offset() as usize];
                    apply_record(&mut tables, &header, payload, location, crc, &mut next_seq)?;
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
        let Tables { blobs, journal, damaged, segments: stats, live_blobs, .. } = tables;
        stats.flush()?;
        if index::get::<_, u64>(&meta, index::LIVE_BLOBS)?.is_some() {
            index::add_live_blobs(&mut meta, live_blobs)?;
        } else {
            // Written before the count existed: count once.
            let mut count = 0u64;
            for item in blobs.iter()? {
                let (_, value) = item?;
                count += u64::from(index::decode_entry(value.value())?.state == BlobState::Live);
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
    let count = shared.segments.count();
    if placement(marker, count, position.offset, SMALL_PUT_RECORD, reserve).is_none()
        || !leaves_peer_reserve(marker, count, position.offset, SMALL_PUT_RECORD, shared.config.peer_reserve_bytes)
    {
        shared.set_health(VolumeHealth::Full);
    }
    Ok((position, rewrite))
}

/// A volume written before [`IndexEntry::name`] keeps its name records' rows in
/// [`index::LEGACY_NAME_IDS`]: they move into the records' `blobs` entries, and the table goes,
/// in the transaction recovery commits (before replay, which may delete such a record).
fn migrate_legacy_name_ids(txn: &redb::WriteTransaction) -> Result<(), VolumeError> {
    // (`open_table` of a write transaction would create it.)
    if !txn.list_tables()?.any(|table| table.name() == index::LEGACY_NAME_IDS.name()) {
        return Ok(());
    }
    let legacy = txn.open_table(index::LEGACY_NAME_IDS)?;
    let mut blobs = txn.open_table(BLOBS)?;
    let mut moved = 0u64;
    for row in legacy.iter()? {
        let (id, key) = row?;
        let key: index::NameKey = index::decode(key.value())?;
        if let Some(mut entry) = index::get_entry(&blobs, id.value())? {
            entry.name = Some(key);
            blobs.insert(id.value(), index::encode_entry(&entry).as_slice())?;
            moved += 1;
        }
    }
    drop((legacy, blobs));
    txn.delete_table(index::LEGACY_NAME_IDS)?;
    tracing::info!(moved, "name records' rows moved into their blob index entries");
    Ok(())
}

/// Where the log went on when its seal record in `segment` is unreadable: the lowest-numbered
/// later segment file that no sealed table entry claims and whose first record verifies.
pub(super) fn lost_continuation(
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
pub(super) struct Damage {
    /// Its header, when that alone verifies.
    header: Option<RecordHeader>,
    /// Where the next intact record starts.
    next: u64,
}

/// Looks past a record at `offset` that did not verify: `None` when no intact record follows
/// before `limit` (the torn end of the log), else where the next record starts. A record whose
/// header verifies is skipped by its length; otherwise the bytes are searched for the next record
/// whose header and whole body verify.
pub(super) fn inspect_damage(
    file: &File,
    offset: u64,
    limit: u64,
    partition: u32,
) -> Result<Option<Damage>, VolumeError> {
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
pub(super) fn find_intact_record(
    file: &File,
    from: u64,
    limit: u64,
    partition: u32,
) -> Result<Option<u64>, VolumeError> {
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

pub(super) fn list_segment_files(dir: &Path) -> Result<Vec<u32>, VolumeError> {
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
