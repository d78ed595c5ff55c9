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

/// Conditional writers racing unconditional ones on a new key: whatever the interleaving, the
/// key ends holding the bytes of a write that was answered 200 (none is lost because another
/// was withdrawn), and a withdrawn conditional completion leaves its upload whole, to complete
/// again.
#[test]
fn conditional_and_unconditional_writers_racing_lose_no_acknowledged_object() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, s3) = start(&dir.path().join("node"));
    for trial in 0..40 {
        let key = format!("cond-{trial}");
        let path = format!("/race/{key}");
        let (plain, conditional) = (vec![1u8; 3000], vec![2u8; 5000]);
        let id = s3.create_upload(&key);
        let etag = s3.upload_part(&key, &id, 1, &vec![3u8; 7000]);
        let mut answers = Vec::new();
        std::thread::scope(|scope| {
            let a = scope.spawn(|| s3.request(Method::PUT, &path, &[]).body(plain.clone()).send().unwrap().status());
            let b = scope.spawn(|| {
                s3.request(Method::PUT, &path, &[])
                    .header("if-none-match", "*")
                    .body(conditional.clone())
                    .send()
                    .unwrap()
                    .status()
            });
            let c = scope.spawn(|| {
                let body = format!("<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>{etag}</ETag></Part></CompleteMultipartUpload>");
                s3.request(Method::POST, &path, &[("uploadId", &id)]).header("if-none-match", "*").body(body).send().unwrap().status()
            });
            answers = vec![a.join().unwrap(), b.join().unwrap(), c.join().unwrap()];
        });
        assert_eq!(answers[0], 200, "an unconditional PUT succeeds");
        let acknowledged: Vec<Vec<u8>> = [plain.clone(), conditional.clone(), vec![3u8; 7000]]
            .into_iter()
            .zip(&answers)
            .filter(|(_, status)| status.as_u16() == 200)
            .map(|(body, _)| body)
            .collect();
        let held = s3.get(&key, None);
        assert!(
            acknowledged.contains(&held),
            "trial {trial}: answers {answers:?}, the key holds {} bytes of {}",
            held.len(),
            held.first().copied().unwrap_or(0)
        );
        if answers[2] != 200 {
            // Withdrawn: the upload is open and whole.
            s3.ok(s3.request(Method::DELETE, &path, &[]));
            let again = s3.complete(&key, &id, std::slice::from_ref(&etag));
            assert_eq!(again.status(), 200, "trial {trial}: the withdrawn upload completes");
            assert!(s3.get(&key, None) == vec![3u8; 7000], "trial {trial}: and reads whole");
        }
    }
}

/// A client that goes away in the middle of a long CopyObject leaves no piece behind.
#[test]
fn a_copy_cut_short_by_its_client_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (node, s3) = start(&dir.path().join("node"));
    s3.put("source", &vec![9u8; 40 << 20]);
    let baseline = live_blobs(&node);
    let impatient = reqwest::blocking::Client::builder().timeout(Duration::from_millis(100)).build().unwrap();
    let copy = s3.signed(Method::PUT, "/race/copy", &[], &[("x-amz-copy-source", "/race/source")]).build().unwrap();
    let cut = impatient.execute(copy);
    assert!(cut.is_err(), "the copy outlasts the client's 100 ms: {:?}", cut.map(|r| r.status()));
    // Whether the node noticed before the copy ended or not, once the copy (if it committed) is
    // deleted, nothing of it stays.
    std::thread::sleep(Duration::from_secs(2));
    wait_for("the cut copy settles", || {
        let before = live_blobs(&node);
        std::thread::sleep(Duration::from_millis(300));
        before == live_blobs(&node)
    });
    s3.ok(s3.request(Method::DELETE, "/race/copy", &[]));
    wait_for("no piece of the cut copy is left", || live_blobs(&node) == baseline);
}

/// `?partNumber` reads one part of a multipart object, an empty one included (206 without a
/// Content-Range: it names no byte).
#[test]
fn part_numbers_read_parts_and_an_empty_part_names_no_range() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, s3) = start(&dir.path().join("node"));
    let id = s3.create_upload("parts");
    let first = vec![4u8; PART];
    let etags = vec![s3.upload_part("parts", &id, 1, &first), s3.upload_part("parts", &id, 2, b"")];
    assert_eq!(s3.complete("parts", &id, &etags).status(), 200);
    let one = s3.ok(s3.request(Method::GET, "/race/parts", &[("partNumber", "1")]));
    assert_eq!(one.status(), 206);
    assert_eq!(one.headers()["content-range"], format!("bytes 0-{}/{PART}", PART - 1).as_str());
    assert_eq!(one.headers()["x-amz-mp-parts-count"], "2");
    assert!(one.bytes().unwrap().as_ref() == first.as_slice());
    let two = s3.ok(s3.request(Method::GET, "/race/parts", &[("partNumber", "2")]));
    assert_eq!(two.status(), 206);
    assert!(two.headers().get("content-range").is_none(), "an empty part names no byte");
    assert!(two.bytes().unwrap().is_empty());
    let three = s3.request(Method::GET, "/race/parts", &[("partNumber", "3")]).send().unwrap();
    assert_eq!(three.status(), 416);
}
