//! The S3 front's writers leave nothing behind: racing PutObjects and CompleteMultipartUploads
//! of one key, once the key is deleted, leave no blob (piece or record) stored; and a multipart
//! upload's lifecycle holds against misuse (a completed upload takes no part; a completion
//! retried answers the same object). The oracle is the node's own count of live blobs before
//! and after (`/v1/admin/usage`), and the bytes sent.

mod support;

use std::time::{Duration, Instant};

use axum::http::Method;
use support::s3::S3;
use support::Datanode;

const PIECE: u64 = 256 << 10;
const PART: usize = 5 << 20;

fn start(dir: &std::path::Path) -> (Datanode, S3) {
    let s3_addr = format!("127.0.0.1:{}", support::free_port());
    let piece = format!("{PIECE}B");
    let node = Datanode::start(
        dir,
        &["--partitions", "2", "--volume-size", "1GiB", "--segment-size", "64MiB", "--max-blob-size", "8MiB"]
            .into_iter()
            .chain(["--s3-listen", &s3_addr, "--s3-piece-size", &piece])
            .collect::<Vec<_>>(),
    );
    let s3 = S3::new(&s3_addr, "race");
    s3.ok(s3.request(Method::PUT, "/race", &[]));
    (node, s3)
}

/// Blobs the node holds, live (pieces and name records alike).
fn live_blobs(node: &Datanode) -> u64 {
    let usage: serde_json::Value = support::client().get(node.url("/v1/admin/usage")).send().unwrap().json().unwrap();
    usage.as_array().unwrap().iter().map(|v| v["blobs"].as_u64().unwrap()).sum()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn writers_racing_on_one_key_leave_no_blob_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (node, s3) = start(&dir.path().join("node"));
    let baseline = live_blobs(&node);
    // Overwrites racing: 8 writers of 1 MiB objects (4 pieces each), 8 rounds.
    for round in 0..8u8 {
        std::thread::scope(|scope| {
            for writer in 0..8u8 {
                let s3 = &s3;
                scope.spawn(move || s3.put("k", &vec![round ^ writer; 1 << 20]));
            }
        });
    }
    // Completions racing: 4 uploads of the key completed at once, 3 rounds.
    for round in 0..3u8 {
        let uploads: Vec<(String, Vec<String>)> = (0..4u8)
            .map(|u| {
                let id = s3.create_upload("k");
                let etags = vec![
                    s3.upload_part("k", &id, 1, &vec![round ^ u; PART]),
                    s3.upload_part("k", &id, 2, &vec![u; 1000]),
                ];
                (id, etags)
            })
            .collect();
        std::thread::scope(|scope| {
            for (id, etags) in &uploads {
                let s3 = &s3;
                scope.spawn(move || {
                    let done = s3.complete("k", id, etags);
                    assert!(done.status().is_success(), "{}", done.text().unwrap_or_default());
                });
            }
        });
        let got = s3.get("k", None);
        assert_eq!(got.len(), PART + 1000, "one of the completed objects, whole");
        assert!(
            (0..4u8).any(|u| got[..PART].iter().all(|b| *b == round ^ u) && got[PART..].iter().all(|b| *b == u)),
            "the object is one upload's parts, not a mix"
        );
    }
    wait_for("the completed uploads' records go", || s3.uploads().is_empty());
    s3.ok(s3.request(Method::DELETE, "/race/k", &[]));
    wait_for("every piece and record of every version is deleted", || live_blobs(&node) == baseline);
}

#[test]
fn a_completed_upload_takes_no_part_and_a_retried_completion_answers_the_same_object() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, s3) = start(&dir.path().join("node"));
    let id = s3.create_upload("obj");
    let etags = vec![s3.upload_part("obj", &id, 1, &vec![7u8; PART]), s3.upload_part("obj", &id, 2, b"tail")];
    let first = s3.complete("obj", &id, &etags);
    assert_eq!(first.status(), 200);
    let body = first.text().unwrap();
    assert!(body.contains("<ETag>&quot;") || body.contains("<ETag>\""), "{body}");
    // Gone for parts and listings; a second completion is NoSuchUpload once it is cleaned up.
    let late = s3.try_upload_part("obj", &id, 1, b"late");
    assert_eq!(late.status(), 404);
    assert!(late.text().unwrap().contains("NoSuchUpload"));
    wait_for("the completed upload is forgotten", || s3.uploads().is_empty());
    let again = s3.complete("obj", &id, &etags);
    assert_eq!(again.status(), 404);
    let mut want = vec![7u8; PART];
    want.extend_from_slice(b"tail");
    assert!(s3.get("obj", None) == want, "the object is whole after all of that");
}
