//! I/O faults injected where the engine meets the disk (`--features failpoints`): a failed
//! pwritev, fdatasync or index commit fails the volume (read-only until reopened) and fails the
//! writes of that commit — which were never acknowledged — while every write acknowledged before
//! it reads back byte for byte after a reopen, as after a crash. A segment that cannot be created
//! for want of room pauses new blobs; for an I/O error it fails the volume.
//!
//! Run: `cargo test -p cairn-datanode --features failpoints --test failpoints` (scripts/test.sh
//! does). Failpoints are process-wide: each test holds the scenario lock.
#![cfg(feature = "failpoints")]

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_common::volume_layout::{self as layout, VolumeMarker};
use cairn_common::BlobId;
use cairn_datanode::engine::{
    now_ms, BlobMeta, CompactionConfig, PutRequest, Volume, VolumeConfig, VolumeError, VolumeHealth,
};
use cairn_datanode::metrics::EngineMetrics;

const SEG: u64 = 128 * 1024;

fn open(dir: &Path) -> Volume {
    let marker = if dir.join(layout::MARKER_FILE).exists() {
        VolumeMarker::read(dir).unwrap()
    } else {
        VolumeMarker::new(3, SEG, SEG * 16).unwrap()
    };
    let config = VolumeConfig {
        max_blob_bytes: 32 * 1024,
        compaction: CompactionConfig { enabled: false, ..CompactionConfig::default() },
        ..VolumeConfig::default()
    };
    Volume::create_or_open(dir, &marker, config, Arc::new(EngineMetrics::default())).unwrap()
}

async fn put(volume: &Volume, seed: u64, len: usize) -> Result<(BlobId, Bytes), VolumeError> {
    let id = BlobId::generate(volume.partition());
    let data = Bytes::from(support::payload(seed, len));
    let meta = BlobMeta { content_type: "application/x-test".into(), user: vec![] };
    volume.put(PutRequest { blob_id: id, meta, payload: data.clone(), created_ms: now_ms(), expiry_ms: None }).await?;
    Ok((id, data))
}

fn read_all(volume: &Volume, id: BlobId) -> Result<Vec<u8>, VolumeError> {
    let reader = volume.open_blob(id)?;
    reader.read_range(0, reader.len())
}

/// Acknowledged writes, then `point` fails once: the write in flight fails, the volume fails, and
/// after a reopen (the fault gone) every acknowledged write is there and the volume takes writes.
async fn a_fault_fails_the_volume_and_loses_nothing_acknowledged(point: &str) {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path());
    let mut acknowledged = Vec::new();
    for seed in 0..20 {
        acknowledged.push(put(&volume, seed, 3000 + seed as usize * 100).await.unwrap());
    }
    fail::cfg(point, "return").unwrap();
    let refused = put(&volume, 99, 5000).await;
    fail::remove(point);
    assert!(matches!(refused, Err(VolumeError::Failed(_))), "{point}: {refused:?}");
    assert!(matches!(volume.health(), VolumeHealth::Failed(_)), "{point}: {:?}", volume.health());
    // Read-only until reopened: the fault is gone, the volume stays failed.
    assert!(matches!(put(&volume, 100, 100).await, Err(VolumeError::Failed(_))), "{point}");
    for (id, data) in &acknowledged {
        assert_eq!(read_all(&volume, *id).unwrap(), data.as_ref(), "{point}: readable while failed");
    }
    volume.abandon();
    drop(volume);
    let volume = open(dir.path());
    assert_eq!(volume.health(), VolumeHealth::Writable, "{point}");
    for (id, data) in &acknowledged {
        assert_eq!(read_all(&volume, *id).unwrap(), data.as_ref(), "{point}: acknowledged before the fault");
    }
    let (id, data) = put(&volume, 101, 4000).await.unwrap();
    assert_eq!(read_all(&volume, id).unwrap(), data.as_ref());
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pwritev_fails_the_volume_and_loses_nothing_acknowledged() {
    a_fault_fails_the_volume_and_loses_nothing_acknowledged("segment-pwritev").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fdatasync_fails_the_volume_and_loses_nothing_acknowledged() {
    a_fault_fails_the_volume_and_loses_nothing_acknowledged("segment-fdatasync").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_index_commit_fails_the_volume_and_loses_nothing_acknowledged() {
    a_fault_fails_the_volume_and_loses_nothing_acknowledged("index-commit").await;
}

/// Segment creation: no room is passing (new blobs wait, the volume stays writable for what fits
/// and recovers by itself); an I/O error fails the volume. Acknowledged writes survive both.
/// A name record written with its piece (`Volume::put_name_with_piece`) is written only once the
/// piece is durable: the piece's fdatasync fails, and the record's bytes never reached the file
/// (a power loss could otherwise keep the record and tear the piece, and replay would bring back a
/// record without its piece).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_record_is_written_only_once_its_piece_is_durable() {
    use cairn_datanode::engine::names::NameRecord;
    use cairn_datanode::engine::PairError;
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path());
    let kept = put(&volume, 1, 4000).await.unwrap();
    const NAME: &str = "written-only-after-its-piece";
    let record = NameRecord::new("b".into(), NAME.into(), 1, Vec::new(), vec![5; 40]).unwrap();
    let meta = BlobMeta { content_type: "application/octet-stream".into(), user: vec![] };
    let piece_id = BlobId::generate(volume.partition());
    let payload = Bytes::from(support::payload(2, 9000));
    let piece = PutRequest { blob_id: piece_id, meta, payload, created_ms: now_ms(), expiry_ms: None };
    fail::cfg("segment-fdatasync", "return").unwrap();
    let failed = volume.put_name_with_piece(piece, record.id(volume.partition()), &record, now_ms()).await;
    fail::remove("segment-fdatasync");
    assert!(matches!(failed, Err(PairError::Piece(VolumeError::Failed(_)))), "{failed:?}");
    let in_segments = std::fs::read_dir(layout::segments_dir(dir.path()))
        .unwrap()
        .map(|f| std::fs::read(f.unwrap().path()).unwrap())
        .any(|bytes| bytes.windows(NAME.len()).any(|w| w == NAME.as_bytes()));
    assert!(!in_segments, "the record was written before its piece was durable");
    volume.abandon();
    drop(volume);
    let volume = open(dir.path());
    assert!(volume.name_versions("b", NAME).unwrap().is_empty());
    assert_eq!(read_all(&volume, kept.0).unwrap(), kept.1.as_ref());
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_that_cannot_be_created_pauses_or_fails_and_loses_nothing_acknowledged() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let volume = open(dir.path());
    let mut acknowledged = Vec::new();
    // Fill the first segment until the next put needs a new one.
    fail::cfg("segment-create", "return(enospc)").unwrap();
    let refusal = loop {
        match put(&volume, acknowledged.len() as u64, 20_000).await {
            Ok(written) => acknowledged.push(written),
            Err(e) => break e,
        }
    };
    assert!(matches!(refusal, VolumeError::Paused { no_space: true, .. }), "{refusal:?}");
    assert_ne!(volume.health(), VolumeHealth::Full);
    assert!(!matches!(volume.health(), VolumeHealth::Failed(_)));
    // Room is back: the next put makes the segment.
    fail::remove("segment-create");
    acknowledged.push(put(&volume, 500, 20_000).await.unwrap());
    // Fill that one too; then an I/O error creating the next fails the volume.
    fail::cfg("segment-create", "return(eio)").unwrap();
    let refusal = loop {
        match put(&volume, 600 + acknowledged.len() as u64, 20_000).await {
            Ok(written) => acknowledged.push(written),
            Err(e) => break e,
        }
    };
    fail::remove("segment-create");
    assert!(matches!(refusal, VolumeError::Failed(_)), "{refusal:?}");
    assert!(matches!(volume.health(), VolumeHealth::Failed(_)));
    volume.abandon();
    drop(volume);
    let volume = open(dir.path());
    for (id, data) in &acknowledged {
        assert_eq!(read_all(&volume, *id).unwrap(), data.as_ref());
    }
    scenario.teardown();
}

/// A node that dies right after a multipart completion committed its object, before the upload's
/// records went: after the restart the object reads whole; the upload still lists, takes no
/// part, and a retried completion answers the same object (then the upload is gone). If the
/// object was deleted in between, the retry still answers the completion that happened and
/// brings nothing back; aborting (204, or NoSuchUpload once the retry's cleanup finished)
/// touches no object.
#[test]
fn a_crash_between_a_completions_commit_and_its_cleanup_loses_nothing() {
    use axum::http::Method;
    let dir = tempfile::tempdir().unwrap();
    let s3_addr = format!("127.0.0.1:{}", support::free_port());
    let flags = ["--partitions", "2", "--volume-size", "1GiB", "--segment-size", "64MiB", "--max-blob-size", "8MiB"];
    let flags: Vec<&str> = flags.into_iter().chain(["--s3-listen", &s3_addr, "--s3-piece-size", "256KiB"]).collect();
    let crash = [("FAILPOINTS", "s3-complete-committed=return")];
    let mut node = support::Datanode::start_env(&dir.path().join("node"), &flags, &crash);
    let s3 = support::s3::S3::new(&s3_addr, "crash");
    s3.ok(s3.request(Method::PUT, "/crash", &[]));
    let part_one = vec![1u8; 5 << 20];
    let mut whole = part_one.clone();
    whole.extend_from_slice(b"two");
    for (key, delete_between) in [("kept", false), ("deleted", true)] {
        let id = s3.create_upload(key);
        let etags = vec![s3.upload_part(key, &id, 1, &part_one), s3.upload_part(key, &id, 2, b"two")];
        // The node aborts inside the completion: no answer.
        assert!(s3.request(Method::POST, &format!("/crash/{key}"), &[("uploadId", &id)]).body(format!(
            "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>{}</ETag></Part><Part><PartNumber>2</PartNumber><ETag>{}</ETag></Part></CompleteMultipartUpload>",
            etags[0], etags[1]
        )).send().is_err());
        node.wait_exit(Duration::from_secs(20));
        if key == "deleted" {
            node.env.clear();
        }
        node.start_again();
        assert!(s3.get(key, None) == whole, "{key}: the committed object reads whole after the crash");
        assert!(s3.uploads().contains(&id), "{key}: the upload still lists");
        let part = s3.try_upload_part(key, &id, 1, b"overwrite part one");
        assert_eq!(part.status(), 404, "{key}: a completing upload takes no part");
        assert!(s3.get(key, None) == whole, "{key}: and its object is untouched");
        if delete_between {
            s3.ok(s3.request(Method::DELETE, &format!("/crash/{key}"), &[]));
            // The completion did happen: its retry says so, and brings nothing back.
            assert_eq!(s3.complete(key, &id, &etags).status(), 200, "a retry after the object was deleted");
            let gone = s3.request(Method::GET, &format!("/crash/{key}"), &[]).send().unwrap();
            assert_eq!(gone.status(), 404, "the deleted object stays deleted");
            let abort = s3.request(Method::DELETE, &format!("/crash/{key}"), &[("uploadId", &id)]).send().unwrap();
            assert!(
                abort.status() == 204 || abort.status() == 404,
                "a listed upload can be aborted: {}",
                abort.status()
            );
        } else {
            let retry = s3.complete(key, &id, &etags);
            assert_eq!(retry.status(), 200, "a retried completion answers the object it committed");
            assert!(s3.get(key, None) == whole);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while s3.uploads().contains(&id) {
            assert!(std::time::Instant::now() < deadline, "{key}: the upload is forgotten");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(s3.get("kept", None) == whole, "the first object survived the second crash and all the cleanup");
}
