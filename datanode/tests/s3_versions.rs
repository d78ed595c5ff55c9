//! Versions of an S3 key on a standalone node, where the volume's writer tells a PUT which
//! versions were there (no read before the write): a version made by a clock that was ahead
//! before a restart still gives way to every later PUT.

mod support;

use std::sync::Arc;

use axum::http::Method;
use cairn_datanode::engine::names::{version_ms, NameRecord};
use cairn_datanode::engine::{now_ms, Volume, VolumeConfig};
use cairn_datanode::metrics::EngineMetrics;
use cairn_datanode::store::volume_dir;
use support::s3::S3;
use support::Datanode;

fn start(dir: &std::path::Path, s3_addr: &str) -> Datanode {
    Datanode::start(
        dir,
        &[
            "--partitions",
            "1",
            "--volume-size",
            "256MiB",
            "--segment-size",
            "16MiB",
            "--max-blob-size",
            "1MiB",
            "--s3-piece-size",
            "512KiB",
            "--s3-listen",
            s3_addr,
        ],
    )
}

/// The key's versions in the volume (offline), newest last.
fn versions(dir: &std::path::Path, space: &str, key: &str) -> Vec<u128> {
    let volume = open(dir);
    let versions = volume.name_versions(space, key).unwrap().into_iter().map(|(v, _)| v).collect();
    volume.close();
    versions
}

fn open(dir: &std::path::Path) -> Volume {
    let dir = volume_dir(dir, 0);
    let marker = cairn_common::volume_layout::VolumeMarker::read(&dir).unwrap();
    Volume::create_or_open(
        &dir,
        &marker,
        VolumeConfig { max_blob_bytes: 1 << 20, ..VolumeConfig::default() },
        Arc::new(EngineMetrics::default()),
    )
    .unwrap()
}

#[test]
fn a_put_after_a_version_from_a_clock_ahead_still_becomes_current() {
    let dir = tempfile::tempdir().unwrap();
    let s3_addr = format!("127.0.0.1:{}", support::free_port());
    let (bucket, key) = ("clock", "k");
    let mut node = start(dir.path(), &s3_addr);
    let s3 = S3::new(&s3_addr, bucket);
    s3.ok(s3.request(Method::PUT, "/clock", &[]));
    s3.put(key, b"first");
    node.stop();

    // The only version, written again an hour ahead: as if the clock had been an hour fast
    // before the restart.
    let [now] = versions(dir.path(), bucket, key)[..] else { panic!("one version") };
    {
        let volume = open(dir.path());
        let id = volume.name_versions(bucket, key).unwrap()[0].1.blob_id();
        let record = volume.name_record(id).unwrap();
        let ahead = now + (3_600_000u128 << 64);
        let ahead_record = NameRecord::new(record.space, record.name, ahead, record.summary, record.body).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(volume.put_name(ahead_record.id(0), &ahead_record, now_ms())).unwrap();
        runtime.block_on(volume.delete(id)).unwrap();
        volume.close();
    }
    assert!(version_ms(versions(dir.path(), bucket, key)[0]) > now_ms() + 3_000_000);

    node.start_again();
    s3.put(key, b"second");
    assert_eq!(s3.get(key, None), b"second", "the PUT after the restart is the current version");
    s3.put(key, b"third");
    assert_eq!(s3.get(key, None), b"third");
    node.stop();
    // One version is left, above the one from the clock ahead.
    let left = versions(dir.path(), bucket, key);
    assert_eq!(left.len(), 1, "superseded versions are deleted: {left:?}");
    assert!(version_ms(left[0]) > now_ms() + 3_000_000);
}
