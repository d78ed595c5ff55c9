//! Compaction: copies the records the index still needs out of several sparse sealed segments
//! into one fresh segment, switches the index in one durable transaction, then deletes the old
//! segments. Each pass frees at least one segment.
//!
//! Phases and what a crash in each leaves (recovery in [`resolve_interrupted`]):
//! 1. `begin`: durable `Copying{sources, target}`, then the target file is created.
//!    Crash → the target is deleted; the index never pointed into it (rolled back).
//! 2. `copy`: verified records are copied verbatim, then the target is fdatasync'ed.
//!    Crash → as in 1.
//! 3. `switch`: one durable transaction repoints every entry that still points at its old
//!    record, and records `Switched{sources, target}`. Crash → the sources are deleted (finished).
//! 4. `finish`: the sources are unlinked and the state cleared. Crash → as in 3.

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cairn_common::blob_id::BlobId;
use cairn_common::volume_layout::{self as layout, SEGMENT_HEADER_LEN};
use redb::{ReadableDatabase, ReadableTable};

use super::{begin_write, read_verified_record, Shared, VolumeHealth};
use crate::engine::index::{
    self, BlobState, CompactionState, JournalEntry, Location, SegmentInfo, BLOBS, COMPACTION, JOURNAL, META, SEGMENTS,
};
use crate::engine::record::SEAL_LEN;
use crate::engine::segments::write_all_vectored_at;
use crate::engine::{now_ms, VolumeError};

#[derive(Debug, Clone)]
pub struct CompactionConfig {
    pub enabled: bool,
    /// How often the background compactor looks for work.
    pub interval: Duration,
    /// A sealed segment is compacted when at most this share of it is still needed.
    pub max_live_ratio: f64,
    /// Copy rate limit, bytes per second.
    pub bytes_per_sec: u64,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        Self { enabled: true, interval: Duration::from_secs(60), max_live_ratio: 0.5, bytes_per_sec: 64 << 20 }
    }
}

/// The records of one sealed segment that compaction has to keep or drop.
#[derive(Debug, Clone)]
pub struct CompactionPlan {
    /// Sealed segments to empty, in the order their records are copied.
    pub sources: Vec<u32>,
    /// Records the index still needs (puts of live blobs, tombstones), in log order.
    pub keep: Vec<(BlobId, Location)>,
    /// Puts of blobs whose time is up: dropped, their entries marked expired.
    pub expired: Vec<(BlobId, Location)>,
}

/// An in-flight compaction between `begin` and `switch`.
pub struct CompactionJob {
    pub plan: CompactionPlan,
    /// None when no record needs keeping.
    pub target: Option<u32>,
    file: Option<File>,
    offset: u64,
    next: usize,
    copied: Vec<(BlobId, Location, Location)>,
}

/// Picks the sparsest sealed segments whose needed records fit together in one segment.
/// Worth doing only when it frees a segment: two or more sources, or one with nothing to keep.
pub(crate) fn plan(shared: &Shared) -> Result<Option<CompactionPlan>, VolumeError> {
    let txn = shared.db.begin_read()?;
    let segments = txn.open_table(SEGMENTS)?;
    let mut sealed = std::collections::HashMap::new();
    for item in segments.iter()? {
        let (k, v) = item?;
        let info: SegmentInfo = index::decode(v.value())?;
        if info.sealed {
            sealed.insert(k.value(), (info, Vec::new(), Vec::new()));
        }
    }
    if sealed.is_empty() {
        return Ok(None);
    }
    let now = now_ms();
    let blobs = txn.open_table(BLOBS)?;
    for item in blobs.iter()? {
        let (k, v) = item?;
        let entry = index::decode_entry(v.value())?;
        let Some(location) = entry.location else { continue };
        if let Some((_, keep, expired)) = sealed.get_mut(&location.segment) {
            let id = BlobId::from_bytes(&k.value()).map_err(|e| VolumeError::Corrupt(e.to_string()))?;
            if entry.state == BlobState::Live && entry.is_expired(now) {
                expired.push((id, location));
            } else {
                keep.push((id, location));
            }
        }
    }
    let max_live_ratio =
        if shared.health() == VolumeHealth::Full { 1.0 } else { shared.config.compaction.max_live_ratio };
    let mut candidates: Vec<_> = sealed
        .into_iter()
        .map(|(segment, (info, keep, expired))| {
            let used = info.end.saturating_sub(SEGMENT_HEADER_LEN).max(1);
            let needed: u64 = keep.iter().map(|(_, l): &(BlobId, Location)| l.len).sum();
            (needed as f64 / used as f64, segment, needed, keep, expired)
        })
        // A full volume takes any merge that frees a segment: its deletes may be spread thin.
        .filter(|(ratio, ..)| *ratio <= max_live_ratio)
        .collect();
    candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let room = shared.marker.segment_size - SEGMENT_HEADER_LEN - SEAL_LEN;
    let mut plan = CompactionPlan { sources: Vec::new(), keep: Vec::new(), expired: Vec::new() };
    let mut total = 0u64;
    for (_, segment, needed, mut keep, expired) in candidates {
        if total + needed > room {
            continue;
        }
        total += needed;
        keep.sort_by_key(|(_, l)| l.offset);
        plan.sources.push(segment);
        plan.keep.extend(keep);
        plan.expired.extend(expired);
    }
    let frees_a_segment = plan.sources.len() >= 2 || (plan.sources.len() == 1 && plan.keep.is_empty());
    Ok(frees_a_segment.then_some(plan))
}

/// Phase 1: records the intent durably, then creates the target segment.
pub(crate) fn begin(shared: &Shared, plan: CompactionPlan) -> Result<CompactionJob, VolumeError> {
    let target = (!plan.keep.is_empty()).then(|| shared.next_segment.fetch_add(1, Ordering::SeqCst));
    set_state(shared, Some(CompactionState::Copying { sources: plan.sources.clone(), target }))?;
    let file = match target.map(|t| layout::create_segment(&shared.dir, &shared.marker, t, shared.config.preallocation))
    {
        None => None,
        Some(Ok(file)) => Some(file),
        Some(Err(e)) => {
            set_state(shared, None)?;
            return Err(e.into());
        }
    };
    Ok(CompactionJob { plan, target, file, offset: SEGMENT_HEADER_LEN, next: 0, copied: Vec::new() })
}

impl CompactionJob {
    /// Phase 2: copies up to `max_records` more records; true when all are copied and synced.
    pub(crate) fn copy(&mut self, shared: &Shared, max_records: usize) -> Result<bool, VolumeError> {
        let started = Instant::now();
        let mut bytes = 0u64;
        let end = (self.next + max_records).min(self.plan.keep.len());
        while self.next < end {
            let (id, old) = self.plan.keep[self.next];
            let (Some(target), Some(file)) = (self.target, &self.file) else { break };
            let source = shared
                .segments
                .get(old.segment)
                .ok_or_else(|| VolumeError::Corrupt(format!("segment {} is not open", old.segment)))?;
            // Verify before copying: compaction must never spread a corrupt record.
            let (data, header, _) = read_verified_record(&source, old.offset, shared.marker.segment_size)?;
            if header.blob_id != id || header.record_len() != old.len {
                return Err(VolumeError::Integrity(format!("record of {id} does not match the index")));
            }
            write_all_vectored_at(file, self.offset, &[&data])?;
            self.copied.push((id, old, Location { segment: target, offset: self.offset, len: old.len }));
            self.offset += old.len;
            self.next += 1;
            bytes += old.len;
            throttle(shared.config.compaction.bytes_per_sec, bytes, started);
        }
        if self.next < self.plan.keep.len() {
            return Ok(false);
        }
        if let Some(file) = &self.file {
            file.sync_data()?;
        }
        Ok(true)
    }

    /// Phase 3: repoints the index in one durable transaction.
    pub(crate) fn switch(self, shared: &Shared) -> Result<Vec<u32>, VolumeError> {
        let (sources, target) = (self.plan.sources.clone(), self.target);
        // Readers must find the target file before they can see index entries pointing at it.
        if let (Some(target), Some(file)) = (target, self.file) {
            shared.segments.insert(target, file);
        }
        let txn = begin_write(&shared.db, true)?;
        {
            let mut blobs = txn.open_table(BLOBS)?;
            let mut journal = txn.open_table(JOURNAL)?;
            let mut segments = txn.open_table(SEGMENTS)?;
            let mut live = 0u64;
            for (id, old, new) in &self.copied {
                let key = id.to_bytes();
                let Some(mut entry) = index::get_entry(&blobs, key)? else {
                    continue;
                };
                // Deleted or changed since the plan: the copy is garbage in the target.
                if entry.location != Some(*old) {
                    continue;
                }
                entry.location = Some(*new);
                blobs.insert(key, index::encode_entry(&entry).as_slice())?;
                if let Some(mut j) = index::get::<_, JournalEntry>(&journal, entry.seq)? {
                    if j.location == *old {
                        j.location = *new;
                        journal.insert(entry.seq, index::encode(&j).as_slice())?;
                    }
                }
                live += new.len;
            }
            let mut expired = 0i64;
            for (id, old) in &self.plan.expired {
                let key = id.to_bytes();
                let Some(mut entry) = index::get_entry(&blobs, key)? else {
                    continue;
                };
                // Expired when planned, so not copied: it is reclaimed whatever the clock says
                // now (a clock stepped back must not leave an entry pointing into a removed
                // segment; a TTL change on an expired blob is refused).
                if entry.location == Some(*old) && entry.state == BlobState::Live {
                    entry.state = BlobState::Expired;
                    entry.location = None;
                    blobs.insert(key, index::encode_entry(&entry).as_slice())?;
                    expired += 1;
                }
            }
            for source in &sources {
                segments.remove(*source)?;
            }
            if let Some(target) = target {
                let info = SegmentInfo { live_bytes: live, end: self.offset, sealed: true };
                segments.insert(target, index::encode(&info).as_slice())?;
            }
            let state = CompactionState::Switched { sources: sources.clone(), target };
            let mut meta = txn.open_table(META)?;
            meta.insert(COMPACTION, index::encode(&state).as_slice())?;
            index::add_live_blobs(&mut meta, -expired)?;
        }
        txn.commit()?;
        shared.usage.stale.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(sources)
    }
}

/// Phase 4: deletes the source segment and clears the state.
pub(crate) fn finish(shared: &Shared, sources: &[u32]) -> Result<(), VolumeError> {
    for &source in sources {
        shared.segments.remove(source);
        remove_segment_file(shared, source)?;
    }
    set_state(shared, None)?;
    if shared.segments.count() < shared.marker.max_segments() {
        let mut health = shared.health.lock().expect("health lock");
        if *health == VolumeHealth::Full {
            *health = VolumeHealth::Writable;
        }
    }
    Ok(())
}

/// Rolls back an unfinished job (stop requested or an error while copying).
pub(crate) fn abort(shared: &Shared, job: CompactionJob) -> Result<(), VolumeError> {
    drop(job.file);
    if let Some(target) = job.target {
        remove_segment_file(shared, target)?;
    }
    set_state(shared, None)
}

/// All four phases.
pub(crate) fn run_once(shared: &Shared) -> Result<bool, VolumeError> {
    let Some(plan) = plan(shared)? else {
        return Ok(false);
    };
    let mut job = begin(shared, plan)?;
    loop {
        match job.copy(shared, 256) {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                abort(shared, job)?;
                return Err(e);
            }
        }
    }
    let target = job.target;
    let copied: u64 = job.copied.iter().map(|(_, _, new)| new.len).sum();
    let sources = job.switch(shared)?;
    finish(shared, &sources)?;
    shared.metrics.compactions.inc();
    shared.metrics.compaction_segments_freed.inc_by(sources.len() as u64);
    shared.metrics.compaction_copied_bytes.inc_by(copied);
    tracing::info!(volume = %shared.dir.display(), ?sources, ?target, "compacted segments");
    Ok(true)
}

/// Finishes or rolls back a compaction that a crash interrupted (called when opening).
pub(crate) fn resolve_interrupted(shared: &Shared) -> Result<(), VolumeError> {
    let state: Option<CompactionState> = {
        let txn = shared.db.begin_read()?;
        match txn.open_table(META) {
            Ok(meta) => index::get(&meta, COMPACTION)?,
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        }
    };
    match state {
        None => return Ok(()),
        Some(CompactionState::Copying { sources, target }) => {
            tracing::warn!(?sources, ?target, "rolling back an interrupted compaction");
            if let Some(target) = target {
                remove_segment_file(shared, target)?;
            }
        }
        Some(CompactionState::Switched { sources, target }) => {
            tracing::warn!(?sources, ?target, "finishing an interrupted compaction");
            for source in sources {
                remove_segment_file(shared, source)?;
            }
        }
    }
    set_state(shared, None)
}

fn remove_segment_file(shared: &Shared, segment: u32) -> Result<(), VolumeError> {
    layout::retire_segment(&shared.dir, &shared.marker, segment)?;
    Ok(())
}

fn set_state(shared: &Shared, state: Option<CompactionState>) -> Result<(), VolumeError> {
    let txn = begin_write(&shared.db, true)?;
    {
        let mut meta = txn.open_table(META)?;
        match state {
            Some(s) => {
                meta.insert(COMPACTION, index::encode(&s).as_slice())?;
            }
            None => {
                meta.remove(COMPACTION)?;
            }
        }
    }
    txn.commit()?;
    shared.usage.stale.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

fn throttle(bytes_per_sec: u64, bytes: u64, started: Instant) {
    if bytes_per_sec == 0 {
        return;
    }
    let due = Duration::from_secs_f64(bytes as f64 / bytes_per_sec as f64);
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        std::thread::sleep(wait);
    }
}

/// The phases of one volume's compaction, for callers that stop between them (crash tests).
pub struct CompactionSteps<'v> {
    pub(crate) shared: &'v Shared,
}

impl CompactionSteps<'_> {
    pub fn plan(&self) -> Result<Option<CompactionPlan>, VolumeError> {
        plan(self.shared)
    }

    pub fn begin(&self, plan: CompactionPlan) -> Result<CompactionJob, VolumeError> {
        begin(self.shared, plan)
    }

    pub fn copy(&self, job: &mut CompactionJob, max_records: usize) -> Result<bool, VolumeError> {
        job.copy(self.shared, max_records)
    }

    /// Returns the source segments, for [`Self::finish`].
    pub fn switch(&self, job: CompactionJob) -> Result<Vec<u32>, VolumeError> {
        job.switch(self.shared)
    }

    pub fn finish(&self, sources: &[u32]) -> Result<(), VolumeError> {
        finish(self.shared, sources)
    }

    /// All phases; false when no segment needs compaction.
    pub fn run_once(&self) -> Result<bool, VolumeError> {
        run_once(self.shared)
    }
}

/// The background compactor of one volume.
pub struct Compactor {
    stop: Arc<(Mutex<bool>, Condvar)>,
    handle: Option<JoinHandle<()>>,
}

impl Compactor {
    pub(crate) fn start(shared: Arc<Shared>) -> Self {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        if !shared.config.compaction.enabled {
            return Self { stop, handle: None };
        }
        let signal = stop.clone();
        let handle = std::thread::Builder::new()
            .name(format!("cairn-compactor-{}", shared.marker.partition))
            .spawn(move || loop {
                let (lock, cvar) = &*signal;
                let guard = lock.lock().expect("stop lock");
                let (guard, _) = cvar
                    .wait_timeout_while(guard, shared.config.compaction.interval, |stopped| !*stopped)
                    .expect("stop lock");
                if *guard {
                    return;
                }
                drop(guard);
                if matches!(shared.health(), VolumeHealth::Failed(_)) {
                    continue;
                }
                if let Err(e) = run_once(&shared) {
                    tracing::error!(volume = %shared.dir.display(), error = %e, "compaction failed");
                }
            })
            .expect("spawn compactor");
        Self { stop, handle: Some(handle) }
    }

    pub fn stop(mut self) {
        let (lock, cvar) = &*self.stop;
        *lock.lock().expect("stop lock") = true;
        cvar.notify_all();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}
