//! Every object size reads back exactly through the S3 front of a real node: put whole and by
//! multipart upload, read whole and by random ranges, then again after a restart. Sizes are drawn
//! with emphasis on every boundary the front and the engine have: empty, one byte, the inline
//! limit ± 1, a piece ± 1 and n pieces ± 1, a verified chunk ± 1 (the piece size is not a
//! multiple of it, so chunk and piece boundaries fall apart), the largest object; parts of
//! multipart uploads around the 5 MiB minimum and around piece boundaries, the last part empty
//! or one byte. The oracle is the bytes sent: no expectation of Cairn's own.

mod support;

use axum::http::Method;
use cairn_datanode::engine::record::CHUNK_LEN;
use proptest::prelude::*;
use support::s3::S3;
use support::Datanode;

const INLINE: u64 = 1000;
/// Two chunks and three bytes: piece boundaries never meet chunk boundaries.
const PIECE: u64 = 2 * CHUNK_LEN + 3;
/// Above the largest part drawn below (a part is at most the largest object).
const MAX_OBJECT: u64 = 5 * PIECE + 17;
const MIN_PART: u64 = 5 << 20;

fn start(dir: &std::path::Path) -> (Datanode, S3) {
    let s3_addr = format!("127.0.0.1:{}", support::free_port());
    let piece = format!("{PIECE}B");
    let inline = format!("{INLINE}B");
    let max = format!("{MAX_OBJECT}B");
    let node = Datanode::start(
        dir,
        &[
            "--partitions",
            "2",
            "--volume-size",
            "1GiB",
            "--segment-size",
            "64MiB",
            "--max-blob-size",
            "8MiB",
            "--s3-listen",
            &s3_addr,
            "--s3-piece-size",
            &piece,
            "--s3-inline-size",
            &inline,
            "--s3-max-object-size",
            &max,
        ],
    );
    (node, S3::new(&s3_addr, "sizes"))
}

fn boundary_sizes() -> Vec<u64> {
    let mut sizes = vec![0, 1, 2, INLINE - 1, INLINE, INLINE + 1, MAX_OBJECT - 1, MAX_OBJECT];
    for n in 1..=5u64 {
        sizes.extend([n * PIECE - 1, n * PIECE, n * PIECE + 1]);
        sizes.extend([n * CHUNK_LEN - 1, n * CHUNK_LEN, n * CHUNK_LEN + 1]);
    }
    sizes.retain(|s| *s <= MAX_OBJECT);
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

fn data_of(len: u64, seed: u64) -> Vec<u8> {
    cairn_testkit::payload(seed, len as usize)
}

/// The object whole, and at each range (clamped to it), is `data`.
fn check(s3: &S3, key: &str, data: &[u8], ranges: &[(u64, u64)]) -> Result<(), TestCaseError> {
    let whole = s3.get(key, None);
    prop_assert!(whole == data, "{key}: {} bytes back of {}", whole.len(), data.len());
    for &(a, b) in ranges {
        if data.is_empty() {
            break;
        }
        let len = data.len() as u64;
        let (a, b) = (a % len, b % len);
        let (a, b) = (a.min(b), a.max(b));
        let got = s3.get(key, Some((a, b)));
        prop_assert!(got == data[a as usize..=b as usize], "{key}: range {a}-{b} of {len} differs");
    }
    Ok(())
}

#[test]
fn every_object_size_reads_back_put_whole_or_in_parts() {
    let dir = tempfile::tempdir().unwrap();
    let (mut node, s3) = start(&dir.path().join("node"));
    s3.ok(s3.request(Method::PUT, "/sizes", &[]));
    // proptest's closures are `Fn`: what they keep goes through cells.
    let written: std::cell::RefCell<Vec<(String, Vec<u8>)>> = Default::default();
    let n = std::cell::Cell::new(0);
    let config = ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() };
    let sizes = prop_oneof![3 => proptest::sample::select(boundary_sizes()), 1 => 0..=MAX_OBJECT];
    let ranges = proptest::collection::vec((any::<u64>(), any::<u64>()), 3);
    proptest!(config, |(size in sizes, seed in any::<u64>(), ranges in ranges.clone())| {
        n.set(n.get() + 1);
        let key = format!("whole/{}", n.get());
        let data = data_of(size, seed);
        s3.put(&key, &data);
        check(&s3, &key, &data, &ranges)?;
        written.borrow_mut().push((key, data));
    });
    // Multipart: parts at and around the minimum and piece boundaries; the last one any size
    // (empty, one byte, around a piece).
    let part_sizes = prop_oneof![
        3 => proptest::sample::select(vec![MIN_PART, MIN_PART + 1, 3 * PIECE - 1, 3 * PIECE, 3 * PIECE + 1]),
        1 => MIN_PART..MIN_PART + 2 * PIECE,
    ];
    let last_sizes = prop_oneof![
        3 => proptest::sample::select(vec![0, 1, PIECE - 1, PIECE, PIECE + 1]),
        1 => 0..=2 * PIECE,
    ];
    let config = ProptestConfig { cases: 6, failure_persistence: None, ..ProptestConfig::default() };
    proptest!(config, |(firsts in proptest::collection::vec(part_sizes, 1..3), last in last_sizes, seed in any::<u64>(), ranges in ranges)| {
        n.set(n.get() + 1);
        let key = format!("parts/{}", n.get());
        let mut parts: Vec<Vec<u8>> = firsts.iter().enumerate().map(|(i, len)| data_of(*len, seed.wrapping_add(i as u64))).collect();
        parts.push(data_of(last, seed ^ 0xabc));
        let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
        s3.put_multipart(&key, &refs);
        let data = parts.concat();
        check(&s3, &key, &data, &ranges)?;
        written.borrow_mut().push((key, data));
    });
    // After a restart (every record replayed or read from its index), all of them again.
    node.restart();
    for (key, data) in written.borrow().iter() {
        let back = s3.get(key, None);
        assert!(back == *data, "{key} after a restart: {} bytes back of {}", back.len(), data.len());
    }
}

/// An object's last piece goes with its name record, to the key's partition; when that volume
/// has no room for the piece (though it has for the record), the piece goes to a volume that has,
/// and the object reads back whole, before and after a restart.
#[test]
fn a_last_piece_the_keys_volume_has_no_room_for_goes_to_another() {
    use cairn_datanode::api::s3::model::partition_of;
    let dir = tempfile::tempdir().unwrap();
    let s3_addr = format!("127.0.0.1:{}", support::free_port());
    let mut node = Datanode::start(
        &dir.path().join("node"),
        &[
            "--partitions",
            "2",
            "--volume-size",
            "16MiB",
            "--segment-size",
            "2MiB",
            "--max-blob-size",
            "1MiB",
            "--s3-listen",
            &s3_addr,
            "--s3-piece-size",
            "512KiB",
            "--s3-inline-size",
            "64KiB",
        ],
    );
    let s3 = S3::new(&s3_addr, "full");
    s3.ok(s3.request(Method::PUT, "/full", &[]));
    let keys_of_partition_0 = (0..).map(|i| format!("k{i}")).filter(|k| partition_of(&[0, 1], k) == 0);
    let mut keys = keys_of_partition_0.into_iter();
    // Objects inline in their records (60 KiB each) fill partition 0 until one is refused.
    let mut stored = 0;
    let refused = loop {
        let key = keys.next().unwrap();
        let response = s3.request(Method::PUT, &format!("/full/{key}"), &[]).body(vec![3u8; 60 << 10]).send().unwrap();
        if !response.status().is_success() {
            break response.status();
        }
        stored += 1;
        assert!(stored < 1000, "partition 0 never filled");
    };
    assert!(refused.is_server_error(), "{refused}");
    // 300 KB (one piece, not inline) under a key of the full partition.
    let key = keys.next().unwrap();
    let data = support::payload(7, 300_000);
    s3.put(&key, &data);
    assert!(s3.get(&key, None) == data);
    node.restart();
    assert!(s3.get(&key, None) == data, "after a restart");
}
