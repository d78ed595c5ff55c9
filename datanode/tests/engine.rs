//! Storage engine tests against real files: recovery, integrity, compaction phases, capacity.

mod support;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_common::volume_layout::{self as layout, VolumeMarker, SEGMENT_HEADER_LEN};
use cairn_common::BlobId;
use cairn_datanode::engine::record::{RecordHeader, RecordKind, HEADER_LEN};
use cairn_datanode::engine::{
    now_ms, BlobMeta, BlobState, ChunkCache, CompactionConfig, PutRequest, TtlMerge, Volume, VolumeConfig, VolumeError,
    VolumeHealth,
};
use cairn_datanode::metrics::EngineMetrics;

const SEG: u64 = 128 * 1024;

fn config() -> VolumeConfig {
    VolumeConfig {
        max_blob_bytes: 32 * 1024,
        compaction: CompactionConfig { enabled: false, ..CompactionConfig::default() },
        ..VolumeConfig::default()
    }
}

fn open(dir: &Path, segments: u64) -> Volume {
    let marker = if dir.join(layout::MARKER_FILE).exists() {
        VolumeMarker::read(dir).unwrap()
    } else {
        VolumeMarker::new(7, SEG, SEG * segments).unwrap()
    };
    Volume::create_or_open(dir, &marker, config(), Arc::new(EngineMetrics::default())).unwrap()
}

fn payload(seed: u64, len: usize) -> Bytes {
    Bytes::from(support::payload(seed, len))
}

async fn put(volume: &Volume, seed: u64, len: usize) -> Result<(BlobId, Bytes), VolumeError> {
    let id = BlobId::generate(volume.partition());
    let data = payload(seed, len);
    let meta = BlobMeta { content_type: "application/x-test".into(), user: vec![("seed".into(), seed.to_string())] };
    volume.put(PutRequest { blob_id: id, meta, payload: data.clone(), created_ms: now_ms(), expiry_ms: None }).await?;
    Ok((id, data))
}

fn read_all(volume: &Volume, id: BlobId) -> Result<Vec<u8>, VolumeError> {
    let reader = volume.open_blob(id)?;
    reader.read_range(0, reader.len())
}

fn segment_files(dir: &Path) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_dir(layout::segments_dir(dir))
        .unwrap()
        .filter_map(|e| layout::parse_segment_file_name(e.unwrap().file_name().to_str()?))
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_delete_ttl_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), 4);
    let (id, data) = put(&volume, 1, 5000).await.unwrap();
    assert_eq!(read_all(&volume, id).unwrap(), data);
    let reader = volume.open_blob(id).unwrap();
    assert_eq!(reader.meta.content_type, "application/x-test");
    assert_eq!(reader.read_range(10, 20).unwrap(), data[10..20].to_vec());

    // TTL update, then back to permanent.
    volume.update_ttl(id, Some(now_ms() + 60_000)).await.unwrap();
    assert!(volume.entry(id).unwrap().expiry_ms.is_some());
    volume.update_ttl(id, None).await.unwrap();
    assert_eq!(volume.entry(id).unwrap().expiry_ms, None);
    // A client setting what is already set is still its latest word: a record, with a later
    // stamp (so that it wins over an older expiry another replica may hold).
    let written = volume.stats().unwrap().written_bytes;
    let stamp = volume.entry(id).unwrap().expiry_set_ms;
    volume.update_ttl(id, None).await.unwrap();
    assert!(volume.stats().unwrap().written_bytes > written);
    assert!(volume.entry(id).unwrap().expiry_set_ms > stamp);

    volume.delete(id).await.unwrap();
    volume.delete(id).await.unwrap(); // idempotent
    assert!(matches!(volume.open_blob(id), Err(VolumeError::Deleted)));
    assert!(matches!(volume.update_ttl(id, None).await, Err(VolumeError::Deleted)));
    let unknown = BlobId::generate(7);
    assert!(matches!(volume.open_blob(unknown), Err(VolumeError::NotFound)));
    assert!(matches!(volume.delete(unknown).await, Err(VolumeError::NotFound)));

    // The journal holds put, two TTL updates and the delete, in order.
    let kinds: Vec<RecordKind> = volume.journal(0, 100).unwrap().into_iter().map(|(_, e)| e.kind).collect();
    let ttl = RecordKind::TtlUpdate;
    assert_eq!(kinds, [RecordKind::Put, ttl, ttl, ttl, RecordKind::Delete]);
    assert_eq!(volume.journal(2, 100).unwrap().len(), 3);
}

/// A blob's expiry in `volume`, and the stamp it was set at.
fn expiry_and_stamp(volume: &Volume, id: BlobId) -> (Option<u64>, u64) {
    let entry = volume.entry(id).unwrap();
    (entry.expiry_ms, entry.expiry_set_ms)
}

/// Replicas agree on a blob's expiry by its stamp: another replica's expiry replaces this one's
/// only if its stamp is later (or, stamps equal, the expiry is later), so that two replicas never
/// copy each other's back and forth; a client's change always replaces it, with a stamp just
/// above; and the stamps survive a crash (the records replay to the same state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expiry_with_the_latest_stamp_wins_and_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), 4);
    let (id, _) = put(&volume, 1, 100).await.unwrap();
    let t = volume.entry(id).unwrap().created_ms;
    assert_eq!(volume.entry(id).unwrap().expiry_set_ms, t, "a put sets the expiry at its own time");
    let (x, y, z) = (t + 3_600_000, t + 1_800_000, t + 7_200_000);
    volume.set_ttl(id, Some(x), t + 100).await.unwrap();
    let state = |volume: &Volume| expiry_and_stamp(volume, id);
    assert_eq!(state(&volume), (Some(x), t + 100));
    let kept = |stamp| TtlMerge::Kept { stamp };
    assert_eq!(volume.merge_ttl(id, None, t + 50).await.unwrap(), kept(t + 100), "an older stamp loses");
    assert_eq!(volume.merge_ttl(id, Some(y), t + 100).await.unwrap(), kept(t + 100), "same stamp, earlier expiry");
    assert_eq!(volume.merge_ttl(id, Some(x), t + 100).await.unwrap(), TtlMerge::AlreadySo, "the same state");
    assert_eq!(state(&volume), (Some(x), t + 100));
    let written = volume.stats().unwrap().written_bytes;
    assert_eq!(volume.merge_ttl(id, Some(z), t + 99).await.unwrap(), kept(t + 100));
    assert_eq!(volume.stats().unwrap().written_bytes, written, "a losing expiry writes nothing");
    assert_eq!(volume.merge_ttl(id, None, t + 100).await.unwrap(), TtlMerge::Taken, "same stamp, never expiring: wins");
    assert_eq!(state(&volume), (None, t + 100));
    assert_eq!(volume.merge_ttl(id, Some(z), t + 200).await.unwrap(), TtlMerge::Taken, "a later stamp wins");
    assert_eq!(state(&volume), (Some(z), t + 200));
    // A client's change stamped by a clock behind this replica's still wins here.
    volume.set_ttl(id, Some(y), t + 150).await.unwrap();
    assert_eq!(state(&volume), (Some(y), t + 201));
    volume.abandon(); // no final checkpoint: the TTL records replay
    drop(volume);
    let volume = open(dir.path(), 4);
    assert_eq!(state(&volume), (Some(y), t + 201));
    assert_eq!(volume.merge_ttl(id, Some(z), t + 200).await.unwrap(), kept(t + 201), "the replayed stamp decides");
}

/// An expiry changed by the release before the stamp existed (its entry reads as set at the
/// put's time) that a replica missed: a peer's expiry at that same stamp is taken, once, just
/// above it, whichever is later; from then on the stamps decide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_changed_before_stamps_existed_is_taken_from_a_peer() {
    use cairn_datanode::engine::index::{self, BLOBS};
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), 4);
    let (id, _) = put(&volume, 1, 100).await.unwrap();
    let t = volume.entry(id).unwrap().created_ms;
    let (shortened, original) = (t + 60_000, t + 7_200_000);
    volume.set_ttl(id, Some(original), t + 1).await.unwrap();
    volume.close();
    drop(volume);
    // As the release before wrote it: the expiry, no stamp.
    let db = redb::Database::open(dir.path().join(layout::INDEX_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut blobs = txn.open_table(BLOBS).unwrap();
        let entry = index::get_entry(&blobs, id.to_bytes()).unwrap().unwrap();
        blobs.insert(id.to_bytes(), index::encode_entry_v1(&entry).as_slice()).unwrap();
    }
    txn.commit().unwrap();
    drop(db);
    let volume = open(dir.path(), 4);
    let state = |volume: &Volume| expiry_and_stamp(volume, id);
    assert_eq!(state(&volume), (Some(original), t), "format 1: set at the put's time");
    // A peer that took the shortening the older release made: its expiry, at the put's time.
    assert_eq!(volume.merge_ttl(id, Some(shortened), t).await.unwrap(), TtlMerge::Taken, "an earlier expiry too");
    assert_eq!(state(&volume), (Some(shortened), t + 1));
    // Now stamped: the rule of stamps again (a peer still at the put's time loses).
    assert_eq!(volume.merge_ttl(id, Some(original), t).await.unwrap(), TtlMerge::Kept { stamp: t + 1 });
    assert_eq!(volume.merge_ttl(id, Some(shortened), t + 1).await.unwrap(), TtlMerge::AlreadySo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_are_all_durable_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let volume = Arc::new(open(dir.path(), 256));
    let mut tasks = Vec::new();
    for seed in 0..400u64 {
        let volume = volume.clone();
        tasks.push(tokio::spawn(async move { put(&volume, seed, 100 + (seed as usize * 37) % 3000).await.unwrap() }));
    }
    let mut written = Vec::new();
    for t in tasks {
        written.push(t.await.unwrap());
    }
    assert!(segment_files(dir.path()).len() > 1, "writes rolled over segments");
    volume.close();
    drop(volume);
    let volume = open(dir.path(), 64);
    for (id, data) in &written {
        assert_eq!(&read_all(&volume, *id).unwrap(), data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_replays_the_tail_and_erases_torn_records() {
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), 8);
    let mut written = Vec::new();
    for seed in 0..30 {
        written.push(put(&volume, seed, 2000).await.unwrap());
    }
    let tail_segment = *segment_files(dir.path()).last().unwrap();
    volume.abandon(); // no final checkpoint: the index tail must be replayed from the log
    drop(volume);

    // A torn write after the last acknowledged record: a valid header whose body never landed.
    let path = layout::segment_path(dir.path(), tail_segment);
    let file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let end = find_log_end(&file);
    let torn = RecordHeader {
        kind: RecordKind::Put,
        blob_id: BlobId::generate(7),
        created_ms: now_ms(),
        expiry_ms: None,
        meta_len: 0,
        payload_len: 4000,
    };
    file.write_all_at(&torn.encode(), end).unwrap();
    file.write_all_at(&[0xAB; 1000], end + HEADER_LEN).unwrap();
    drop(file);

    let volume = open(dir.path(), 8);
    for (id, data) in &written {
        assert_eq!(&read_all(&volume, *id).unwrap(), data, "acknowledged blob lost");
    }
    let file = OpenOptions::new().read(true).open(&path).unwrap();
    let mut buf = vec![0u8; 2000];
    file.read_exact_at(&mut buf, end).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "torn tail erased");

    // New writes land where the torn record was, and survive another crash.
    let (id, data) = put(&volume, 99, 100).await.unwrap();
    volume.abandon();
    drop(volume);
    let volume = open(dir.path(), 8);
    assert_eq!(read_all(&volume, id).unwrap(), data);
    assert_eq!(volume.journal(0, 1000).unwrap().len(), 31);
}

/// End of the record chain in a segment, found by walking headers.
fn find_log_end(file: &std::fs::File) -> u64 {
    let mut offset = SEGMENT_HEADER_LEN;
    loop {
        let mut head = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut head, offset).unwrap();
        match RecordHeader::decode(&head) {
            Ok(h) => offset += h.record_len(),
            Err(_) => return offset,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_give_integrity_errors_never_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), 4);
    let (a, _) = put(&volume, 1, 3000).await.unwrap();
    let (b, _) = put(&volume, 2, 3000).await.unwrap();
    let (c, c_data) = put(&volume, 3, 3000).await.unwrap();
    let loc_a = volume.entry(a).unwrap().location.unwrap();
    let loc_b = volume.entry(b).unwrap().location.unwrap();
    let file = OpenOptions::new().read(true).write(true).open(layout::segment_path(dir.path(), loc_a.segment)).unwrap();
    let flip = |offset: u64| {
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, offset).unwrap();
        file.write_all_at(&[byte[0] ^ 0x01], offset).unwrap();
    };
    flip(loc_a.offset + loc_a.len / 2); // payload of a
    flip(loc_b.offset + 20); // header of b
    for id in [a, b] {
        match read_all(&volume, id) {
            Err(VolumeError::Integrity(msg)) => assert!(msg.contains(&id.to_string()), "{msg}"),
            other => panic!("expected an integrity error, got {other:?}"),
        }
    }
    assert_eq!(read_all(&volume, c).unwrap(), c_data, "neighbours unaffected");
}

/// Fills several segments, deletes most blobs, and returns (live blobs, deleted ids).
async fn fill_and_delete(volume: &Volume) -> (Vec<(BlobId, Bytes)>, Vec<BlobId>) {
    let mut live = Vec::new();
    let mut deleted = Vec::new();
    for seed in 0..160u64 {
        let (id, data) = put(volume, seed, 3000).await.unwrap();
        if seed % 4 == 0 {
            live.push((id, data));
        } else {
            deleted.push(id);
        }
    }
    for id in &deleted {
        volume.delete(*id).await.unwrap();
    }
    volume.checkpoint().await.unwrap();
    (live, deleted)
}

fn check_contents(volume: &Volume, live: &[(BlobId, Bytes)], deleted: &[BlobId]) {
    for (id, data) in live {
        assert_eq!(&read_all(volume, *id).unwrap(), data);
    }
    for id in deleted {
        assert!(matches!(volume.open_blob(*id), Err(VolumeError::Deleted)), "deleted blob came back");
    }
}

#[derive(Debug, Clone, Copy)]
enum StopAfter {
    Begin,
    PartialCopy,
    Copy,
    Switch,
    Finish,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_interrupted_at_each_phase_leaves_a_consistent_volume() {
    for stop in [StopAfter::Begin, StopAfter::PartialCopy, StopAfter::Copy, StopAfter::Switch, StopAfter::Finish] {
        let dir = tempfile::tempdir().unwrap();
        let volume = open(dir.path(), 64);
        let (live, deleted) = fill_and_delete(&volume).await;
        let before = segment_files(dir.path());
        let steps = volume.compaction();
        let plan = steps.plan().unwrap().expect("sealed segments are mostly garbage");
        let sources = plan.sources.clone();
        assert!(sources.len() >= 2, "several sparse segments merge into one");
        let mut job = steps.begin(plan).unwrap();
        let target = job.target.expect("live records to keep");
        let mut rolled_back = true;
        if !matches!(stop, StopAfter::Begin) {
            steps.copy(&mut job, 1).unwrap();
        }
        if matches!(stop, StopAfter::Copy | StopAfter::Switch | StopAfter::Finish) {
            while !steps.copy(&mut job, 1000).unwrap() {}
        }
        if matches!(stop, StopAfter::Switch | StopAfter::Finish) {
            let switched = steps.switch(job).unwrap();
            rolled_back = false;
            if matches!(stop, StopAfter::Finish) {
                steps.finish(&switched).unwrap();
            }
        } else {
            drop(job);
        }
        volume.abandon(); // crash
        drop(volume);

        let volume = open(dir.path(), 64);
        check_contents(&volume, &live, &deleted);
        let after = segment_files(dir.path());
        if rolled_back {
            assert_eq!(after, before, "{stop:?}: target removed, source kept");
        } else {
            assert!(sources.iter().all(|s| !after.contains(s)), "{stop:?}: sources removed");
            assert!(after.contains(&target), "{stop:?}: target kept");
        }
        // Compaction still works afterwards, and the volume survives another reopen.
        while volume.compaction().run_once().unwrap() {}
        check_contents(&volume, &live, &deleted);
        assert!(segment_files(dir.path()).len() < before.len(), "{stop:?}: space reclaimed");
        volume.close();
        drop(volume);
        check_contents(&open(dir.path(), 64), &live, &deleted);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_compaction_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), 64);
    let (mut live, mut deleted) = fill_and_delete(&volume).await;
    let steps = volume.compaction();
    let mut job = steps.begin(steps.plan().unwrap().unwrap()).unwrap();
    while !steps.copy(&mut job, 1000).unwrap() {}
    // A blob copied by the job is deleted before the switch: the switch must not revive it.
    let victim = job.plan.keep.iter().map(|(id, _)| *id).find(|id| live.iter().any(|(l, _)| l == id)).unwrap();
    volume.delete(victim).await.unwrap();
    live.retain(|(id, _)| *id != victim);
    deleted.push(victim);
    live.push(put(&volume, 1000, 500).await.unwrap());
    let sources = steps.switch(job).unwrap();
    steps.finish(&sources).unwrap();
    check_contents(&volume, &live, &deleted);
    volume.close();
    drop(volume);
    check_contents(&open(dir.path(), 64), &live, &deleted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_volume_refuses_puts_keeps_reads_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), 3);
    let mut written = Vec::new();
    let err = loop {
        match put(&volume, written.len() as u64, 20_000).await {
            Ok(w) => written.push(w),
            Err(e) => break e,
        }
    };
    // The 20 KB blob that no longer fits leaves the volume writable: smaller blobs still fit.
    assert!(matches!(err, VolumeError::NoRoom { .. }), "{err:?}");
    assert_eq!(volume.health(), VolumeHealth::Writable, "one large put does not make the volume full");
    let err = loop {
        match put(&volume, written.len() as u64, 1000).await {
            Ok(w) => written.push(w),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, VolumeError::Full), "{err:?}");
    assert_eq!(volume.health(), VolumeHealth::Full);
    assert!(matches!(put(&volume, 0, 10).await, Err(VolumeError::Full)), "read-only for new blobs");
    assert!(segment_files(dir.path()).len() <= 3, "capacity respected");
    for (id, data) in &written {
        assert_eq!(&read_all(&volume, *id).unwrap(), data);
    }
    // Deletes still fit (space is kept back for tombstones); compaction then frees room.
    for (id, _) in &written {
        volume.delete(*id).await.unwrap();
    }
    while volume.compaction().run_once().unwrap() {}
    assert_eq!(volume.health(), VolumeHealth::Writable);
    put(&volume, 1, 20_000).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_blobs_answer_expired_and_compaction_reclaims_them() {
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), 64);
    let mut short = Vec::new();
    for seed in 0..120u64 {
        let id = BlobId::generate(7);
        let expiry = now_ms() + 300;
        let req = PutRequest {
            blob_id: id,
            meta: BlobMeta::default(),
            payload: payload(seed, 3000),
            created_ms: now_ms(),
            expiry_ms: Some(expiry),
        };
        volume.put(req).await.unwrap();
        short.push(id);
    }
    let (keep, _) = put(&volume, 7, 100).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(matches!(volume.open_blob(short[0]), Err(VolumeError::Expired)));
    assert!(matches!(volume.update_ttl(short[0], None).await, Err(VolumeError::Expired)));
    while volume.compaction().run_once().unwrap() {}
    let reclaimed = short.iter().filter(|id| volume.entry(**id).unwrap().state == BlobState::Expired).count();
    assert!(reclaimed > 0, "compaction marked reclaimed blobs expired");
    assert!(matches!(volume.open_blob(short[0]), Err(VolumeError::Expired)));
    assert!(read_all(&volume, keep).is_ok());
}

#[test]
fn geometry_that_cannot_hold_the_largest_blob_is_refused_before_creating_anything() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("v");
    let marker = VolumeMarker::new(1, SEG, SEG * 4).unwrap();
    let config = VolumeConfig { max_blob_bytes: SEG, ..config() };
    let err = Volume::create_or_open(&vol, &marker, config, Arc::new(EngineMetrics::default())).err().unwrap();
    assert!(err.to_string().contains("segments"), "{err}");
    assert!(!vol.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_cache_serves_verified_chunks_and_follows_the_index() {
    const BIG_SEG: u64 = 8 << 20;
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(ChunkCache::new(64 << 20));
    let metrics = Arc::new(EngineMetrics::default());
    let config = VolumeConfig { max_blob_bytes: 2 << 20, chunk_cache: Some(cache.clone()), ..config() };
    let marker = VolumeMarker::new(7, BIG_SEG, BIG_SEG * 32).unwrap();
    let volume = Volume::create_or_open(dir.path(), &marker, config, metrics.clone()).unwrap();
    let mut blobs = Vec::new();
    for seed in 0..20u64 {
        blobs.push(put(&volume, seed, (3 << 19) + seed as usize).await.unwrap());
        // 1.5 MiB: 2 chunks
    }
    let (first, first_data) = blobs[0].clone();
    assert_eq!(read_all(&volume, first).unwrap(), first_data);
    assert_eq!((metrics.chunk_cache_misses.get(), metrics.chunk_cache_hits.get()), (2, 0));
    assert_eq!(read_all(&volume, first).unwrap(), first_data);
    assert_eq!((metrics.chunk_cache_misses.get(), metrics.chunk_cache_hits.get()), (2, 2), "second read from memory");

    // A blob never read is still verified from disk with the cache on.
    let (never_read, _) = blobs[1];
    let loc = volume.entry(never_read).unwrap().location.unwrap();
    let file = OpenOptions::new().read(true).write(true).open(layout::segment_path(dir.path(), loc.segment)).unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, loc.offset + loc.len - 4096).unwrap();
    file.write_all_at(&[byte[0] ^ 0x80], loc.offset + loc.len - 4096).unwrap();
    assert!(matches!(read_all(&volume, never_read), Err(VolumeError::Integrity(_))));
    // (Compaction refuses to copy a corrupt record; replication repairs those in a cluster.)
    volume.delete(never_read).await.unwrap();

    // The index decides, not the cache: a deleted blob is gone although its chunks are cached.
    volume.delete(first).await.unwrap();
    assert!(matches!(volume.open_blob(first), Err(VolumeError::Deleted)));

    // Compaction moves the survivors; their cached chunks at the old place are forgotten.
    let live: Vec<(BlobId, Bytes)> = blobs.iter().skip(2).step_by(4).cloned().collect();
    for (id, _) in blobs.iter().skip(2) {
        if !live.iter().any(|(l, _)| l == id) {
            volume.delete(*id).await.unwrap();
        }
    }
    for (id, data) in &live {
        assert_eq!(&read_all(&volume, *id).unwrap(), data);
    }
    volume.checkpoint().await.unwrap();
    let cached_before = cache.used_bytes();
    let misses_before = metrics.chunk_cache_misses.get();
    assert!(volume.compaction().run_once().unwrap(), "sparse segments compacted");
    while volume.compaction().run_once().unwrap() {}
    assert!(cache.used_bytes() < cached_before, "chunks of removed segments forgotten");
    let moved = live.iter().filter(|(id, _)| volume.entry(*id).unwrap().location.unwrap().segment > 4).count();
    assert!(moved > 0, "some live blobs moved");
    for (id, data) in &live {
        assert_eq!(&read_all(&volume, *id).unwrap(), data);
    }
    assert_eq!(metrics.chunk_cache_misses.get(), misses_before + 2 * moved as u64, "moved blobs re-read and verified");
    volume.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preallocated_volume_keeps_its_space_through_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let marker = VolumeMarker { preallocated: true, ..VolumeMarker::new(7, SEG, SEG * 16).unwrap() };
    let volume = Volume::create_or_open(dir.path(), &marker, config(), Arc::new(EngineMetrics::default())).unwrap();
    let files = |dir: &Path| segment_files(dir).len() + layout::spare_files(dir).unwrap().len();
    assert_eq!(files(dir.path()), 16, "every segment allocated up front");
    let (live, deleted) = fill_and_delete(&volume).await;
    let spares_before = layout::spare_files(dir.path()).unwrap().len();
    while volume.compaction().run_once().unwrap() {}
    assert!(layout::spare_files(dir.path()).unwrap().len() > spares_before, "compacted segments became spares");
    assert_eq!(files(dir.path()), 16, "the volume's space stays reserved");
    // New segments come from the spares and hold only new records.
    let mut more = Vec::new();
    for seed in 500..560u64 {
        more.push(put(&volume, seed, 3000).await.unwrap());
    }
    assert_eq!(files(dir.path()), 16);
    volume.abandon();
    drop(volume);
    let volume = open(dir.path(), 16);
    check_contents(&volume, &[live, more].concat(), &deleted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_for_unknown_blobs_and_replication_tokens_persist() {
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), 8);
    // A replica hears of a delete before the put: the put never lands afterwards.
    let id = BlobId::generate(volume.partition());
    assert!(!volume.tombstone(id).await.unwrap(), "did not exist before");
    let late_put = PutRequest {
        blob_id: id,
        meta: BlobMeta::default(),
        payload: payload(1, 100),
        created_ms: now_ms(),
        expiry_ms: None,
    };
    volume.put(late_put).await.unwrap();
    assert!(matches!(volume.open_blob(id), Err(VolumeError::Deleted)));
    let (known, _) = put(&volume, 99, 500).await.unwrap();
    assert!(volume.tombstone(known).await.unwrap(), "existed");
    assert!(matches!(volume.open_blob(known), Err(VolumeError::Deleted)));
    let tail = volume.journal_tail();
    assert_eq!(tail, 3, "tombstone, tombstone, put of the second blob");

    assert_eq!(volume.replication_token("n2").unwrap(), 0);
    // Progress goes through the writer: readable at once, durable at the next checkpoint.
    volume.advance_replication("n2", 41, vec![]).await.unwrap();
    volume.advance_replication("n3", 7, vec![]).await.unwrap();
    volume.advance_replication("n4", 12, vec![]).await.unwrap();
    assert_eq!(volume.replication_token("n4").unwrap(), 12);
    volume.checkpoint().await.unwrap();
    volume.abandon();
    drop(volume);
    let volume = open(dir.path(), 8);
    assert_eq!((volume.replication_token("n2").unwrap(), volume.replication_token("n3").unwrap()), (41, 7));
    assert!(matches!(volume.open_blob(id), Err(VolumeError::Deleted)), "survives recovery");
    assert_eq!(volume.journal_tail(), tail);
}

/// A crash as the disk sees it: the index as of the last durable checkpoint (a copy taken right
/// after `checkpoint()`), the log as written since. Closing a volume in-process keeps the index's
/// non-durable commits, so tests of replay put the durable copy back before reopening.
fn durable_index(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join(layout::INDEX_FILE)).unwrap()
}

fn crash_to(dir: &Path, volume: Volume, index: &[u8]) {
    volume.abandon();
    drop(volume);
    std::fs::write(dir.join(layout::INDEX_FILE), index).unwrap();
}

/// Flips one byte of the segment file at `at`.
fn flip_byte(dir: &Path, segment: u32, at: u64) {
    let file = OpenOptions::new().read(true).write(true).open(layout::segment_path(dir, segment)).unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x40], at).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_in_the_middle_of_the_log_tail_keeps_every_later_record() {
    // Damage in a put's payload, in a put's header, and in a delete's trailer, all in the tail
    // that recovery replays: the records after each are acknowledged and must all survive.
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), 8);
    volume.checkpoint().await.unwrap();
    let index = durable_index(dir.path());
    let mut blobs = Vec::new();
    for seed in 0..12u64 {
        blobs.push(put(&volume, seed, 3000 + seed as usize).await.unwrap());
    }
    let doomed = blobs[7].0;
    volume.delete(doomed).await.unwrap();
    let (after_delete, after_delete_data) = put(&volume, 99, 700).await.unwrap();
    let location = |id| volume.entry(id).unwrap().location.unwrap();
    let payload_hit = location(blobs[2].0);
    let header_hit = location(blobs[5].0);
    let tombstone = location(doomed);
    crash_to(dir.path(), volume, &index); // everything above is past the durable mark
    flip_byte(dir.path(), payload_hit.segment, payload_hit.offset + payload_hit.len / 2);
    flip_byte(dir.path(), header_hit.segment, header_hit.offset + 30);
    flip_byte(dir.path(), tombstone.segment, tombstone.offset + tombstone.len - 2);

    let volume = open(dir.path(), 8);
    for (i, (id, data)) in blobs.iter().enumerate() {
        match i {
            2 => match volume.open_blob(*id) {
                Err(VolumeError::Integrity(msg)) => assert!(msg.contains("damaged"), "{msg}"),
                other => panic!("damaged payload: expected an integrity error, got {:?}", other.map(|_| ())),
            },
            5 => assert!(volume.open_blob(*id).is_err(), "a record with a damaged header is not served"),
            7 => assert!(matches!(volume.open_blob(*id), Err(VolumeError::Deleted)), "the delete's header is applied"),
            _ => assert_eq!(&read_all(&volume, *id).unwrap(), data, "blob {i} after the damage lost"),
        }
    }
    assert_eq!(read_all(&volume, after_delete).unwrap(), after_delete_data);
    let damaged: Vec<BlobId> = volume.damaged().unwrap().into_iter().map(|(id, _)| id).collect();
    assert_eq!(damaged, vec![blobs[2].0], "the damaged put waits for repair");
    // The damaged tombstone was written again intact: compaction is not stopped by it.
    while volume.compaction().run_once().unwrap() {}
    assert!(matches!(volume.open_blob(doomed), Err(VolumeError::Deleted)));

    // A replica sends the blob again: it is stored anew, and nothing is owed any more.
    let repair = PutRequest {
        blob_id: blobs[2].0,
        meta: BlobMeta { content_type: "application/x-test".into(), user: vec![("seed".into(), "2".into())] },
        payload: blobs[2].1.clone(),
        created_ms: now_ms(),
        expiry_ms: None,
    };
    volume.put(repair).await.unwrap();
    assert_eq!(read_all(&volume, blobs[2].0).unwrap(), blobs[2].1);
    assert!(volume.damaged().unwrap().is_empty());
    // New writes go after the end of the log, not over anything kept.
    let (late, late_data) = put(&volume, 1234, 5000).await.unwrap();
    volume.abandon();
    drop(volume);
    let volume = open(dir.path(), 8);
    assert_eq!(read_all(&volume, late).unwrap(), late_data);
    assert_eq!(read_all(&volume, blobs[2].0).unwrap(), blobs[2].1);
    assert_eq!(read_all(&volume, blobs[11].0).unwrap(), blobs[11].1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_of_zero_stays_expired_through_crash_replay() {
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), 4);
    volume.checkpoint().await.unwrap();
    let index = durable_index(dir.path());
    let id = BlobId::generate(volume.partition());
    let request = PutRequest {
        blob_id: id,
        meta: BlobMeta::default(),
        payload: payload(3, 10),
        created_ms: now_ms(),
        expiry_ms: Some(0),
    };
    volume.put(request).await.unwrap();
    assert!(matches!(volume.open_blob(id), Err(VolumeError::Expired)));
    crash_to(dir.path(), volume, &index);
    let volume = open(dir.path(), 4);
    assert_eq!(volume.entry(id).unwrap().expiry_ms, Some(1), "replayed from the log: 1 ms after the epoch");
    assert!(matches!(volume.open_blob(id), Err(VolumeError::Expired)), "an expiry of 0 is not 'never'");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_seal_does_not_lose_the_segment_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), 8);
    volume.checkpoint().await.unwrap();
    let index = durable_index(dir.path());
    let mut blobs = Vec::new();
    for seed in 0..60u64 {
        blobs.push(put(&volume, seed, 3000).await.unwrap());
    }
    let first = volume.entry(blobs[0].0).unwrap().location.unwrap().segment;
    let last = volume.entry(blobs[59].0).unwrap().location.unwrap().segment;
    assert!(last > first, "the records span a segment roll");
    crash_to(dir.path(), volume, &index);
    // The seal at the end of the first segment is damaged, header and all.
    let file = OpenOptions::new().read(true).open(layout::segment_path(dir.path(), first)).unwrap();
    let seal_at = find_log_end(&file) - cairn_datanode::engine::record::SEAL_LEN;
    drop(file);
    flip_byte(dir.path(), first, seal_at + 20);
    let volume = open(dir.path(), 8);
    for (i, (id, data)) in blobs.iter().enumerate() {
        assert_eq!(&read_all(&volume, *id).unwrap(), data, "blob {i} lost with the seal");
    }
    let (late, late_data) = put(&volume, 999, 3000).await.unwrap();
    volume.close();
    drop(volume);
    let volume = open(dir.path(), 8);
    assert_eq!(read_all(&volume, late).unwrap(), late_data);
    assert!(!dir.path().join(cairn_datanode::engine::volume::QUARANTINE_DIR).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_image_inside_a_damaged_blob_is_never_replayed() {
    use cairn_datanode::engine::record::EncodedRecord;
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), 8);
    let (victim, victim_data) = put(&volume, 1, 2000).await.unwrap();
    volume.checkpoint().await.unwrap();
    let index = durable_index(dir.path());
    // A blob that carries, in its payload, the image of a valid delete of the victim.
    let tombstone = RecordHeader {
        kind: RecordKind::Delete,
        blob_id: victim,
        created_ms: now_ms(),
        expiry_ms: None,
        meta_len: 0,
        payload_len: 0,
    };
    let image = EncodedRecord::new(tombstone, &[], Bytes::new(), &[]);
    let mut carrier = vec![0x55u8; 1000];
    carrier.extend_from_slice(&image.head);
    carrier.extend_from_slice(&image.trailer);
    carrier.extend(vec![0x66u8; 1000]);
    let carrier_id = BlobId::generate(volume.partition());
    let request = PutRequest {
        blob_id: carrier_id,
        meta: BlobMeta::default(),
        payload: Bytes::from(carrier),
        created_ms: now_ms(),
        expiry_ms: None,
    };
    volume.put(request).await.unwrap();
    let at = volume.entry(carrier_id).unwrap().location.unwrap();
    crash_to(dir.path(), volume, &index);
    flip_byte(dir.path(), at.segment, at.offset + at.len - 100); // the carrier's payload, past the image
    let volume = open(dir.path(), 8);
    assert_eq!(read_all(&volume, victim).unwrap(), victim_data, "a record image inside a blob was replayed");
    while volume.compaction().run_once().unwrap() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_blob_of_a_full_volume_can_be_deleted_and_ttl_updates_cannot_take_their_room() {
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), 3);
    let mut written = Vec::new();
    loop {
        match put(&volume, written.len() as u64, 200).await {
            Ok(w) => written.push(w),
            Err(VolumeError::Full) => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(written.len() > 500, "{} small blobs", written.len());
    // TTL updates, however many, are refused before they eat the room deletes need.
    let (first, _) = written[0];
    let mut ttl_refused = false;
    for i in 0..5000u64 {
        match volume.update_ttl(first, Some(now_ms() + 3_600_000 + i)).await {
            Ok(()) => {}
            Err(VolumeError::NoRoom { .. }) => {
                ttl_refused = true;
                break;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(ttl_refused, "TTL updates never stopped on a full volume");
    // Every blob can be deleted, in any order.
    for (i, (id, _)) in written.iter().enumerate().rev() {
        volume.delete(*id).await.unwrap_or_else(|e| panic!("delete {i} of {}: {e:?}", written.len()));
    }
    volume.checkpoint().await.unwrap();
    while volume.compaction().run_once().unwrap() {}
    assert_eq!(volume.health(), VolumeHealth::Writable, "compaction gave the room back");
    put(&volume, 1, 200).await.unwrap();
}

/// What the volume reports as blobs, live and reclaimable bytes, checked against what the index
/// entries and the segment files themselves say.
fn check_usage(dir: &Path, volume: &Volume, ids: &[BlobId]) {
    let stats = volume.stats().unwrap();
    let entries: Vec<_> = ids.iter().filter_map(|id| volume.entry(*id).ok()).collect();
    let live_blobs = entries.iter().filter(|e| e.state == BlobState::Live).count() as u64;
    let live_bytes: u64 = entries.iter().filter_map(|e| e.location).map(|l| l.len).sum();
    let written: u64 = segment_files(dir)
        .into_iter()
        .map(|s| find_log_end(&std::fs::File::open(layout::segment_path(dir, s)).unwrap()) - SEGMENT_HEADER_LEN)
        .sum();
    assert_eq!(stats.blobs, live_blobs, "blob count");
    assert_eq!(stats.live_bytes, live_bytes, "live bytes");
    assert_eq!(stats.written_bytes, written, "written bytes");
    assert_eq!(stats.reclaimable_bytes, written - live_bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_follows_puts_deletes_crashes_expiry_and_compaction() {
    // Compaction takes any sealed segments whose needed records fit in one.
    let open = |dir: &Path| {
        let marker = if dir.join(layout::MARKER_FILE).exists() {
            VolumeMarker::read(dir).unwrap()
        } else {
            VolumeMarker::new(7, SEG, SEG * 64).unwrap()
        };
        let mut config = config();
        config.compaction.max_live_ratio = 1.0;
        Volume::create_or_open(dir, &marker, config, Arc::new(EngineMetrics::default())).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path());
    volume.checkpoint().await.unwrap();
    let durable = durable_index(dir.path());
    let mut ids = Vec::new();
    // The expiring blobs first, so that they are in a sealed segment compaction takes.
    for seed in 0..8u64 {
        let id = BlobId::generate(7);
        let req = PutRequest {
            blob_id: id,
            meta: BlobMeta::default(),
            payload: payload(seed, 2500),
            created_ms: now_ms(),
            expiry_ms: Some(now_ms() + 300),
        };
        volume.put(req).await.unwrap();
        ids.push(id);
    }
    for seed in 0..60u64 {
        ids.push(put(&volume, seed, 1 + (seed as usize * 997) % 9000).await.unwrap().0);
    }
    for (i, id) in ids.iter().enumerate() {
        if i % 4 != 0 {
            volume.delete(*id).await.unwrap();
        }
    }
    // Deleting again changes nothing.
    volume.delete(ids[1]).await.unwrap();
    check_usage(dir.path(), &volume, &ids);
    let before_crash = volume.stats().unwrap();
    assert_eq!(before_crash.blobs, 17);
    assert!(before_crash.reclaimable_bytes > 0, "deleted blobs are reclaimable");

    // A crash back to an index that knew none of it: replay counts the same.
    crash_to(dir.path(), volume, &durable);
    let volume = open(dir.path());
    check_usage(dir.path(), &volume, &ids);
    assert_eq!(volume.stats().unwrap().blobs, before_crash.blobs);

    // Expired blobs count until compaction reclaims them; compaction gives back reclaimable bytes.
    tokio::time::sleep(Duration::from_millis(400)).await;
    while volume.compaction().run_once().unwrap() {}
    check_usage(dir.path(), &volume, &ids);
    let compacted = volume.stats().unwrap();
    assert!(compacted.blobs < before_crash.blobs, "expired blobs reclaimed: {}", compacted.blobs);
    assert!(compacted.reclaimable_bytes < before_crash.reclaimable_bytes);
    volume.close();
    drop(volume);

    // A volume written before the count existed has no count: opening counts once.
    let db = redb::Database::open(dir.path().join(layout::INDEX_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    assert!(txn.open_table(cairn_datanode::engine::index::META).unwrap().remove("live_blobs").unwrap().is_some());
    txn.commit().unwrap();
    drop(db);
    let volume = open(dir.path());
    check_usage(dir.path(), &volume, &ids);
    assert_eq!(volume.stats().unwrap().blobs, compacted.blobs);
}

/// The usage the writer keeps in counters (so that stats read no redb) is what a count of the
/// index says, after puts, deletes, TTL changes, a rolled segment and a compaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counters_match_a_count_of_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), 8);
    let (live, _) = fill_and_delete(&volume).await;
    volume.update_ttl(live[0].0, Some(now_ms() + 3_600_000)).await.unwrap();
    let usage = |s: &cairn_datanode::engine::VolumeStats| (s.live_bytes, s.written_bytes, s.blobs, s.segments);
    let before = volume.stats().unwrap();
    assert_eq!(before.blobs, live.len() as u64);
    assert!(before.segments > 1, "the workload rolled a segment");
    while volume.compaction().run_once().unwrap() {}
    let compacted = volume.stats().unwrap();
    assert!(compacted.reclaimable_bytes < before.reclaimable_bytes, "{before:?} then {compacted:?}");
    put(&volume, 9999, 2000).await.unwrap();
    let kept = volume.stats().unwrap();
    volume.checkpoint().await.unwrap();
    volume.close();
    drop(volume);
    // Opening counts from the index.
    let counted = open(dir.path(), 8).stats().unwrap();
    assert_eq!(usage(&kept), usage(&counted));
}

/// Name records (engine::names): the name index follows puts and deletes of name records (the
/// newest version held is current; a deleted one leaves the index), and a crash replays the
/// index from the log (name ids and all) exactly as the writer made it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_records_index_their_names_through_deletes_and_crash_replay() {
    use cairn_datanode::engine::names::NameRecord;
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), 16);
    let put_name = |space: &str, name: &str, version: u128| {
        let record =
            NameRecord::new(space.into(), name.into(), version, format!("s{version}").into_bytes(), vec![7; 100])
                .unwrap();
        let id = record.id(volume.partition());
        let meta = BlobMeta::new("application/vnd.cairn.name-record".into(), Vec::new()).unwrap();
        let request = PutRequest {
            blob_id: id,
            meta,
            payload: Bytes::from(record.encode()),
            created_ms: now_ms(),
            expiry_ms: None,
        };
        let volume = &volume;
        async move {
            volume.put(request).await.unwrap();
            id
        }
    };
    let current = |volume: &Volume, space: &str| -> Vec<(String, u128)> {
        volume.current_names(space, "", false, "", 100).unwrap().into_iter().map(|c| (c.name, c.version)).collect()
    };
    put_name("b", "k1", 1).await;
    let k1v2 = put_name("b", "k1", 2).await;
    put_name("b", "k2", 5).await;
    put_name("b", "dir/x", 3).await;
    put_name("other", "k1", 9).await;
    let checkpoint = durable_index(dir.path());
    let late = put_name("b", "late", 1).await;
    assert_eq!(
        current(&volume, "b"),
        vec![("dir/x".into(), 3), ("k1".into(), 2), ("k2".into(), 5), ("late".into(), 1)]
    );
    assert_eq!(current(&volume, "other"), vec![("k1".into(), 9)]);
    // A prefix, a start after a name, a limit.
    let page = volume.current_names("b", "k1", true, "k", 10).unwrap();
    assert_eq!(page.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), vec!["k2"]);
    assert_eq!(page[0].summary, b"s5");
    assert_eq!(volume.current_names("b", "", false, "", 2).unwrap().len(), 2);
    // The record a name id holds, and a payload that is not its record is refused.
    assert_eq!(volume.name_record(k1v2).unwrap().version, 2);
    let forged = NameRecord::new("b".into(), "k9".into(), 1, Vec::new(), Vec::new()).unwrap();
    let wrong_id = NameRecord::new("b".into(), "k8".into(), 1, Vec::new(), Vec::new()).unwrap().id(volume.partition());
    let meta = BlobMeta::new("application/vnd.cairn.name-record".into(), Vec::new()).unwrap();
    let request = PutRequest {
        blob_id: wrong_id,
        meta,
        payload: Bytes::from(forged.encode()),
        created_ms: now_ms(),
        expiry_ms: None,
    };
    assert!(matches!(volume.put(request).await, Err(VolumeError::Integrity(_))));

    // Deleting the newest version of k1 makes the one before it current; an older version put
    // afterwards does not.
    volume.delete(k1v2).await.unwrap();
    let versions = volume.name_versions("b", "k1").unwrap();
    assert_eq!(versions.iter().map(|(v, _)| *v).collect::<Vec<_>>(), vec![1]);
    put_name("b", "k1", 0).await;
    assert!(current(&volume, "b").contains(&("k1".into(), 1)));
    // A deleted record put again (a late copy from a replica) stays deleted: its tombstone holds.
    assert_eq!(put_name("b", "k1", 2).await, k1v2);
    assert_eq!(volume.name_versions("b", "k1").unwrap().iter().map(|(v, _)| *v).collect::<Vec<_>>(), vec![0, 1]);
    assert!(current(&volume, "b").contains(&("k1".into(), 1)));
    let state = |volume: &Volume| {
        (current(volume, "b"), volume.name_versions("b", "k1").unwrap(), volume.name_versions("b", "late").unwrap())
    };
    let before = state(&volume);

    // A crash: the index as of the checkpoint, the log since; replay rebuilds the name index.
    crash_to(dir.path(), volume, &checkpoint);
    let volume = open(dir.path(), 16);
    assert_eq!(state(&volume), before);
    assert!(volume.name_record(late).is_ok());
    // And a second reopen changes nothing.
    volume.close();
    drop(volume);
    let volume = open(dir.path(), 16);
    assert_eq!(state(&volume), before);
}

/// A piece and the name record that holds it, written in one writer step
/// (`Volume::put_name_with_piece`): both are there, through a crash replay; a piece the volume
/// has no room for leaves no record either, though the record alone would fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_piece_and_its_name_record_are_written_together_or_not_at_all() {
    use cairn_datanode::engine::names::NameRecord;
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), 3);
    let record = |name: &str| NameRecord::new("b".into(), name.into(), 1, b"s".to_vec(), vec![7; 50]).unwrap();
    let partition = volume.partition();
    let piece = |seed: u64, len: usize| {
        let meta = BlobMeta::new("application/octet-stream".into(), Vec::new()).unwrap();
        let blob_id = BlobId::generate(partition);
        PutRequest { blob_id, meta, payload: payload(seed, len), created_ms: now_ms(), expiry_ms: None }
    };
    let checkpoint = durable_index(dir.path());
    let first = piece(1, 20_000);
    let (first_id, first_data) = (first.blob_id, first.payload.clone());
    let named = record("k1");
    let before = volume.put_name_with_piece(first, named.id(volume.partition()), &named, now_ms()).await.unwrap();
    assert!(before.is_empty(), "no version of k1 before: {before:?}");
    assert_eq!(read_all(&volume, first_id).unwrap(), first_data);
    assert_eq!(volume.name_record(named.id(volume.partition())).unwrap(), named);
    // A crash before any checkpoint: replay brings back both.
    crash_to(dir.path(), volume, &checkpoint);
    let volume = open(dir.path(), 3);
    assert_eq!(read_all(&volume, first_id).unwrap(), first_data);
    assert_eq!(volume.name_versions("b", "k1").unwrap().len(), 1);

    // Filled until a 20 KB piece no longer fits (smaller blobs still do).
    let mut seed = 2;
    loop {
        match put(&volume, seed, 20_000).await {
            Ok(_) => seed += 1,
            Err(VolumeError::NoRoom { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    let refused = piece(seed, 20_000);
    let refused_id = refused.blob_id;
    let named = record("k2");
    let err = volume.put_name_with_piece(refused, named.id(volume.partition()), &named, now_ms()).await.unwrap_err();
    assert!(matches!(err, cairn_datanode::engine::PairError::Piece(VolumeError::NoRoom { .. })), "{err:?}");
    assert!(matches!(volume.entry(refused_id), Err(VolumeError::NotFound)));
    assert!(volume.name_versions("b", "k2").unwrap().is_empty(), "a record without its piece was written");
    // The record alone fits: it was refused for its piece, not for want of room.
    volume.put_name(named.id(volume.partition()), &named, now_ms()).await.unwrap();
    assert_eq!(volume.name_versions("b", "k2").unwrap().len(), 1);
}

/// A piece that fits with a record behind it that does not (the piece takes the last room): the
/// pair answers the record's refusal as the record's (`PairError::Record`), never as the
/// piece's, which would tell the caller that nothing was written and leave the piece behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_whose_record_is_refused_after_its_piece_says_so() {
    use cairn_datanode::engine::names::NameRecord;
    use cairn_datanode::engine::PairError;
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), 3);
    let mut seed = 2;
    while put(&volume, seed, 20_000).await.is_ok() {
        seed += 1;
    }
    // Pieces ever smaller, until the volume is full: some piece takes the room its record needed.
    let mut record_refused = 0;
    for (i, size) in (8..20_000usize).rev().step_by(8).enumerate() {
        let named = NameRecord::new("b".into(), format!("k{i}"), 1, b"s".to_vec(), vec![7; 200]).unwrap();
        let meta = BlobMeta::new("application/octet-stream".into(), Vec::new()).unwrap();
        let piece_id = BlobId::generate(volume.partition());
        let piece =
            PutRequest { blob_id: piece_id, meta, payload: payload(seed, size), created_ms: now_ms(), expiry_ms: None };
        let answer = volume.put_name_with_piece(piece, named.id(volume.partition()), &named, now_ms()).await;
        let piece_live = volume.entry(piece_id).is_ok_and(|e| e.state == BlobState::Live);
        match answer {
            Ok(_) => assert!(piece_live),
            Err(PairError::Piece(e)) => assert!(!piece_live, "piece refused ({e:?}) yet stored, size {size}"),
            Err(PairError::Record(_)) => {
                assert!(piece_live);
                assert!(volume.name_versions("b", &format!("k{i}")).unwrap().is_empty());
                record_refused += 1;
            }
        }
        if volume.health() == VolumeHealth::Full {
            break;
        }
    }
    assert!(record_refused > 0, "no piece ever took its record's room: the case was not reached");
}

/// A volume written before name records' rows lived in their `blobs` entries (index values of
/// format 1, a `name_ids` table): opening it moves the rows over, and deleting such a record
/// afterwards still takes its name out of the name index.
#[tokio::test]
async fn a_volume_with_the_legacy_name_id_table_is_migrated_when_opened() {
    use cairn_datanode::engine::index::{self, IndexEntry, NameKey, BLOBS, LEGACY_NAME_IDS};
    use cairn_datanode::engine::names::NameRecord;
    use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), 16);
    let mut ids = Vec::new();
    for (name, version) in [("k", 1), ("k", 2), ("j", 1)] {
        let record = NameRecord::new("b".into(), name.into(), version, Vec::new(), vec![1; 10]).unwrap();
        let id = record.id(volume.partition());
        volume.put_name(id, &record, now_ms()).await.unwrap();
        ids.push(id);
    }
    let plain = put(&volume, 1, 100).await.unwrap().0;
    volume.close();
    drop(volume);

    // Rewrite the index as the release before wrote it.
    let db = redb::Database::open(dir.path().join(layout::INDEX_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut blobs = txn.open_table(BLOBS).unwrap();
        let mut legacy = txn.open_table(LEGACY_NAME_IDS).unwrap();
        let rows: Vec<([u8; 21], IndexEntry)> = blobs
            .iter()
            .unwrap()
            .map(|r| r.unwrap())
            .map(|(k, v)| (k.value(), index::decode_entry(v.value()).unwrap()))
            .collect();
        assert_eq!(rows.iter().filter(|(_, e)| e.name.is_some()).count(), 3);
        for (key, e) in rows {
            if let Some(name) = &e.name {
                legacy.insert(key, index::encode(name).as_slice()).unwrap();
            }
            blobs.insert(key, index::encode_entry_v1(&e).as_slice()).unwrap();
        }
    }
    txn.commit().unwrap();
    drop(db);

    let volume = open(dir.path(), 16);
    assert_eq!(volume.entry(ids[1]).unwrap().name, Some(NameKey { space: "b".into(), name: "k".into(), version: 2 }));
    assert_eq!(volume.entry(plain).unwrap().name, None);
    volume.delete(ids[1]).await.unwrap();
    volume.delete(ids[2]).await.unwrap();
    let versions = |name| volume.name_versions("b", name).unwrap().into_iter().map(|(v, _)| v).collect::<Vec<_>>();
    assert_eq!(versions("k"), vec![1]);
    assert_eq!(versions("j"), Vec::<u128>::new());
    volume.close();
    drop(volume);
    let db = redb::Database::open(dir.path().join(layout::INDEX_FILE)).unwrap();
    let txn = db.begin_read().unwrap();
    assert!(matches!(txn.open_table(LEGACY_NAME_IDS), Err(redb::TableError::TableDoesNotExist(_))));
    // Every entry is written in the current format once rewritten; the rest still read.
    assert_eq!(txn.open_table(BLOBS).unwrap().len().unwrap(), 4);
}

/// A replica's answer to a quorum read of a name (`cluster::names::versions_answer`) never takes
/// a version that is being written for a deleted one: a reader asks, again and again, about the
/// ids of versions a writer is putting meanwhile; none is ever reported deleted (none is). A
/// version that lands between the answer's two index reads must read as held-and-live or not
/// held, or the quorum read drops an acknowledged write (two conditional writes then both win).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_written_during_a_name_query_is_never_reported_deleted() {
    use cairn_cluster::replica::{NameVersionsQuery, WIRE_VERSION};
    use cairn_datanode::cluster::names::versions_answer;
    use cairn_datanode::engine::names::NameRecord;
    let dir = tempfile::tempdir().unwrap();
    let volume = Arc::new(open(dir.path(), 256));
    const VERSIONS: u128 = 1000;
    let ids: Vec<BlobId> = (1..=VERSIONS)
        .map(|v| NameRecord::new("b".into(), "k".into(), v, Vec::new(), Vec::new()).unwrap().id(volume.partition()))
        .collect();
    let reader = {
        let (volume, ids) = (volume.clone(), ids.clone());
        std::thread::spawn(move || {
            let mut asked = 0;
            loop {
                let held = volume.name_versions("b", "k").unwrap().len();
                if held as u128 == VERSIONS {
                    return asked;
                }
                // The next few versions, about to be written.
                let ask = ids[held..(held + 4).min(ids.len())].iter().map(|id| id.to_string()).collect();
                let query = NameVersionsQuery { version: WIRE_VERSION, space: "b".into(), name: "k".into(), ask };
                let answer = versions_answer(&volume, query).unwrap();
                assert!(answer.deleted.is_empty(), "reported deleted while being written: {:?}", answer.deleted);
                asked += 1;
            }
        })
    };
    for version in 1..=VERSIONS {
        let record = NameRecord::new("b".into(), "k".into(), version, Vec::new(), Vec::new()).unwrap();
        let meta = BlobMeta::new("application/vnd.cairn.name-record".into(), Vec::new()).unwrap();
        let blob_id = record.id(volume.partition());
        let payload = Bytes::from(record.encode());
        volume.put(PutRequest { blob_id, meta, payload, created_ms: now_ms(), expiry_ms: None }).await.unwrap();
    }
    let asked = reader.join().unwrap();
    assert!(asked > 100, "the reader asked {asked} times only");
}

/// A name whose newest version is a delete marker has no current record, in listings too, and
/// a version older than the marker that arrives late (replicated from a replica that was down)
/// stays below it; a newer version is current again.
#[tokio::test]
async fn a_delete_marker_hides_its_name_and_every_older_version() {
    use cairn_datanode::engine::names::NameRecord;
    let dir = tempfile::tempdir().unwrap();
    let volume = Arc::new(open(dir.path(), 256));
    let put = |record: NameRecord| {
        let volume = volume.clone();
        async move {
            let meta = NameRecord::blob_meta();
            let (blob_id, payload) = (record.id(volume.partition()), Bytes::from(record.encode()));
            volume.put(PutRequest { blob_id, meta, payload, created_ms: now_ms(), expiry_ms: None }).await.unwrap();
        }
    };
    let object =
        |name: &str, version: u128| NameRecord::new("b".into(), name.into(), version, vec![1], vec![1]).unwrap();
    let marker = |name: &str, version: u128| NameRecord::delete_marker("b".into(), name.into(), version).unwrap();
    let listed =
        || volume.current_names("b", "", false, "", 10).unwrap().into_iter().map(|n| n.name).collect::<Vec<_>>();
    put(object("a", 5)).await;
    put(object("k", 5)).await;
    put(object("z", 5)).await;
    put(marker("k", 7)).await;
    assert_eq!(listed(), ["a", "z"]);
    // A page of one after "a" skips the marker's name and still fills.
    let page = volume.current_names("b", "a", true, "", 1).unwrap();
    assert_eq!(page.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["z"]);
    let versions = volume.name_versions("b", "k").unwrap();
    assert!(versions.last().unwrap().1.is_delete_marker() && !versions[0].1.is_delete_marker());
    // An older write arriving late stays buried.
    put(object("k", 6)).await;
    assert_eq!(listed(), ["a", "z"]);
    // A newer one is the name's current record again.
    put(object("k", 8)).await;
    assert_eq!(listed(), ["a", "k", "z"]);
    assert!(!volume.name_versions("b", "k").unwrap().last().unwrap().1.is_delete_marker());
}
