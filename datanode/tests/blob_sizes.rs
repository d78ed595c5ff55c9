//! Every payload size reads back exactly: whole, by random ranges, after a clean restart, after a
//! crash (tail replay), and after compaction moved the records. Sizes are drawn with emphasis on
//! every boundary of the record format: empty, one byte, one chunk ± 1, the small-read limit
//! (one chunk + 64 KiB) ± 1, n chunks ± 1 and the largest blob accepted.

mod support;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use cairn_common::volume_layout::{self as layout, VolumeMarker};
use cairn_common::BlobId;
use cairn_datanode::engine::record::CHUNK_LEN;
use cairn_datanode::engine::{
    now_ms, BlobMeta, ChunkCache, CompactionConfig, PutRequest, Volume, VolumeConfig, VolumeError,
};
use cairn_datanode::metrics::EngineMetrics;
use proptest::prelude::*;

const MAX_BLOB: u64 = 3 * CHUNK_LEN + 5;
const SEG: u64 = 8 << 20;
const SMALL_READ_LIMIT: u64 = CHUNK_LEN + 64 * 1024;

fn config(cache: bool) -> VolumeConfig {
    VolumeConfig {
        max_blob_bytes: MAX_BLOB,
        compaction: CompactionConfig { enabled: false, ..CompactionConfig::default() },
        chunk_cache: cache.then(|| Arc::new(ChunkCache::new(16 << 20))),
        ..VolumeConfig::default()
    }
}

fn open(dir: &Path, cache: bool) -> Volume {
    let marker = if dir.join(layout::MARKER_FILE).exists() {
        VolumeMarker::read(dir).unwrap()
    } else {
        VolumeMarker::new(3, SEG, SEG * 32).unwrap()
    };
    Volume::create_or_open(dir, &marker, config(cache), Arc::new(EngineMetrics::default())).unwrap()
}

/// Sizes on and around every boundary, up to the largest blob.
pub fn boundary_sizes() -> Vec<u64> {
    let mut sizes = vec![0, 1, 2, MAX_BLOB - 1, MAX_BLOB];
    for n in 1..=3u64 {
        let c = n * CHUNK_LEN;
        sizes.extend([c - 1, c, c + 1]);
    }
    for s in [SMALL_READ_LIMIT - 1, SMALL_READ_LIMIT, SMALL_READ_LIMIT + 1] {
        sizes.push(s);
        // The record (header, metadata, trailer) crosses the small-read limit before its payload.
        sizes.push(s - 200);
    }
    sizes.retain(|s| *s <= MAX_BLOB);
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

fn size_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => proptest::sample::select(boundary_sizes()),
        1 => 0..=MAX_BLOB,
    ]
}

fn check_blob(volume: &Volume, id: BlobId, data: &[u8], ranges: &[(u64, u64)]) -> Result<(), TestCaseError> {
    let reader = volume.open_blob(id).map_err(|e| TestCaseError::fail(format!("{} bytes: {e}", data.len())))?;
    prop_assert_eq!(reader.len(), data.len() as u64);
    prop_assert_eq!(reader.chunk_count(), (data.len() as u64).div_ceil(CHUNK_LEN));
    let whole = reader.read_range(0, reader.len()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(whole == data, "{} bytes: whole read differs", data.len());
    // Chunk by chunk, as the HTTP API streams it.
    for index in 0..reader.chunk_count() {
        let chunk = reader.read_chunk(index).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let start = (index * CHUNK_LEN) as usize;
        let end = (start + CHUNK_LEN as usize).min(data.len());
        prop_assert!(chunk[..] == data[start..end], "{} bytes: chunk {} differs", data.len(), index);
    }
    prop_assert!(reader.read_chunk(reader.chunk_count()).is_err(), "a chunk past the end is an error");
    for &(a, b) in ranges {
        let len = data.len() as u64;
        let (start, end) = if len == 0 { (0, 0) } else { (a % len, (a % len + b % (len + 1)).min(len)) };
        let got = reader.read_range(start, end).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(got[..] == data[start as usize..end as usize], "{} bytes: range {}..{} differs", len, start, end);
    }
    Ok(())
}

/// Cases in which compaction moved a kept record (the test below checks it is most of them).
static MOVED_BY_COMPACTION: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[test]
fn every_size_reads_back_exactly_through_restart_crash_and_compaction() {
    // A fixed seed by default, so that how often compaction moves records (checked below) does
    // not vary from run to run; CAIRN_TEST_SEED explores others (and replays a failure).
    let seed: u64 = std::env::var("CAIRN_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_b10b);
    println!("CAIRN_TEST_SEED={seed}");
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = proptest::test_runner::TestRng::from_seed(proptest::test_runner::RngAlgorithm::ChaCha, &seed_bytes);
    let config = ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() };
    let mut runner = proptest::test_runner::TestRunner::new_with_rng(config, rng);
    let strategy = (
        proptest::collection::vec(size_strategy(), 1..6),
        proptest::collection::vec((any::<u64>(), any::<u64>()), 4),
        any::<bool>(),
    );
    runner.run(&strategy, |(sizes, ranges, cache)| one_case(&sizes, &ranges, cache)).unwrap();
    let moved = MOVED_BY_COMPACTION.load(std::sync::atomic::Ordering::Relaxed);
    println!("compaction moved kept records in {moved} of 24 cases");
    assert!(moved >= 6, "compaction moved kept records in only {moved} of 24 cases: the test lost its teeth");
}

fn one_case(sizes: &[u64], ranges: &[(u64, u64)], cache: bool) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), cache);
    let mut kept: Vec<(BlobId, Bytes)> = Vec::new();
    let mut dropped = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        for keep in [true, false] {
            let id = BlobId::generate(volume.partition());
            let data = Bytes::from(support::payload(i as u64 * 2 + keep as u64, *size as usize));
            let meta = BlobMeta { content_type: "application/x-test".into(), user: vec![] };
            let request =
                PutRequest { blob_id: id, meta, payload: data.clone(), created_ms: now_ms(), expiry_ms: None };
            runtime.block_on(volume.put(request)).unwrap();
            if keep {
                kept.push((id, data))
            } else {
                dropped.push(id)
            }
        }
        // Fill the rest of the segment with garbage, so that compaction has work.
        let id = BlobId::generate(volume.partition());
        let filler = Bytes::from(vec![7u8; 2 << 20]);
        let meta = BlobMeta::default();
        runtime
            .block_on(volume.put(PutRequest {
                blob_id: id,
                meta,
                payload: filler,
                created_ms: now_ms(),
                expiry_ms: None,
            }))
            .unwrap();
        dropped.push(id);
    }
    let check_all = |volume: &Volume| -> Result<(), TestCaseError> {
        for (id, data) in &kept {
            check_blob(volume, *id, data, ranges)?;
        }
        Ok(())
    };
    check_all(&volume)?;

    // Clean restart.
    volume.close();
    drop(volume);
    let volume = open(dir.path(), cache);
    check_all(&volume)?;

    // Crash: the records past the durable mark are replayed from the log.
    for id in &dropped {
        runtime.block_on(volume.delete(*id)).unwrap();
    }
    volume.abandon();
    drop(volume);
    let volume = open(dir.path(), cache);
    check_all(&volume)?;
    for id in &dropped {
        prop_assert!(matches!(volume.open_blob(*id), Err(VolumeError::Deleted)));
    }

    // Compaction moves the kept records into new segments.
    let before: Vec<_> = kept.iter().map(|(id, _)| volume.entry(*id).unwrap().location).collect();
    while volume.compaction().run_once().unwrap() {}
    let after: Vec<_> = kept.iter().map(|(id, _)| volume.entry(*id).unwrap().location).collect();
    if before != after {
        MOVED_BY_COMPACTION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    check_all(&volume)?;
    volume.close();
    drop(volume);
    let volume = open(dir.path(), cache);
    check_all(&volume)?;
    Ok(())
}

/// The blob from the report: 1,049,600 bytes was stored but every read failed its checksum.
#[tokio::test]
async fn a_blob_just_over_one_chunk_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path(), false);
    let id = BlobId::generate(volume.partition());
    let data = Bytes::from(support::payload(1, 1_049_600));
    let meta = BlobMeta::default();
    volume
        .put(PutRequest { blob_id: id, meta, payload: data.clone(), created_ms: now_ms(), expiry_ms: None })
        .await
        .unwrap();
    let reader = volume.open_blob(id).unwrap();
    assert_eq!(reader.read_range(0, reader.len()).unwrap(), data);
    assert_eq!(&reader.read_chunk(1).unwrap()[..], &data[CHUNK_LEN as usize..]);
}
