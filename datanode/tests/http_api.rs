//! The blob API of a real datanode process.

mod support;

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::os::unix::fs::FileExt;

use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::Value;
use support::{payload, Datanode};

fn small_node(dir: &std::path::Path) -> Datanode {
    Datanode::start(&dir.join("node"), &["--segment-size", "8MiB", "--volume-size", "64MiB", "--max-blob-size", "6MiB"])
}

fn put(client: &Client, node: &Datanode, body: Vec<u8>) -> String {
    let r = client.post(node.url("/v1/blobs")).body(body).send().unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let v: Value = r.json().unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/v1/blobs/{id}"));
    id
}

fn error_code(r: reqwest::blocking::Response) -> (StatusCode, String) {
    let status = r.status();
    let v: Value = r.json().expect("error bodies are JSON");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    (status, v["error"]["code"].as_str().unwrap().to_owned())
}

#[test]
fn round_trip_with_metadata_ranges_ttl_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let node = small_node(dir.path());
    let client = support::client();
    let data = payload(1, 10_000);
    let r = client
        .post(node.url("/v1/blobs"))
        .header("content-type", "image/png")
        .header("x-cairn-meta-Owner", "alice")
        .header("x-cairn-ttl", "3600")
        .body(data.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().unwrap();
    let id = v["id"].as_str().unwrap();
    assert_eq!(v["size"], 10_000);

    let r = client.get(node.url(&format!("/v1/blobs/{id}"))).send().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.headers()["x-cairn-meta-owner"], "alice");
    assert_eq!(r.headers()["content-length"], "10000");
    assert_eq!(r.bytes().unwrap().to_vec(), data);

    let r =
        client.get(node.url(&format!("/v1/blobs/{id}?local=true"))).header("range", "bytes=100-199").send().unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.headers()["content-range"], "bytes 100-199/10000");
    assert_eq!(r.bytes().unwrap().to_vec(), data[100..200].to_vec());
    let r = client.get(node.url(&format!("/v1/blobs/{id}"))).header("range", "bytes=-10").send().unwrap();
    assert_eq!(r.bytes().unwrap().to_vec(), data[9990..].to_vec());

    let r = client.head(node.url(&format!("/v1/blobs/{id}"))).send().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-length"], "10000");

    let info: Value = client.get(node.url(&format!("/v1/blobs/{id}/info"))).send().unwrap().json().unwrap();
    assert_eq!(info["size"], 10_000);
    assert_eq!(info["content_type"], "image/png");
    assert_eq!(info["metadata"]["owner"], "alice");
    assert!(info["expires_ms"].as_u64().unwrap() > info["created_ms"].as_u64().unwrap());

    let r = client.put(node.url(&format!("/v1/blobs/{id}/ttl"))).body(r#"{"ttl_seconds": null}"#).send().unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let info: Value = client.get(node.url(&format!("/v1/blobs/{id}/info"))).send().unwrap().json().unwrap();
    assert!(info["expires_ms"].is_null());

    assert_eq!(client.delete(node.url(&format!("/v1/blobs/{id}"))).send().unwrap().status(), StatusCode::NO_CONTENT);
    assert_eq!(client.delete(node.url(&format!("/v1/blobs/{id}"))).send().unwrap().status(), StatusCode::NO_CONTENT);
    let (status, code) = error_code(client.get(node.url(&format!("/v1/blobs/{id}"))).send().unwrap());
    assert_eq!((status, code.as_str()), (StatusCode::GONE, "blob_deleted"));
    let r = client.head(node.url(&format!("/v1/blobs/{id}"))).send().unwrap();
    assert_eq!(r.status(), StatusCode::GONE);
}

#[test]
fn every_bad_input_gets_a_json_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = small_node(dir.path());
    let client = support::client();
    let id = put(&client, &node, b"keep me".to_vec());
    let url = |p: &str| node.url(p);
    let unknown = cairn_common::BlobId::generate(0).to_string();
    let cases: Vec<(reqwest::blocking::RequestBuilder, StatusCode, &str)> = vec![
        (client.get(url("/v1/blobs/not-an-id")), StatusCode::BAD_REQUEST, "invalid_blob_id"),
        (client.get(url(&format!("/v1/blobs/{}", &id[..27]))), StatusCode::BAD_REQUEST, "invalid_blob_id"),
        (client.delete(url("/v1/blobs/%2B%2B")), StatusCode::BAD_REQUEST, "invalid_blob_id"),
        (client.get(url(&format!("/v1/blobs/{unknown}"))), StatusCode::NOT_FOUND, "blob_not_found"),
        (client.get(url(&format!("/v1/blobs/{unknown}/info"))), StatusCode::NOT_FOUND, "blob_not_found"),
        (client.delete(url(&format!("/v1/blobs/{unknown}"))), StatusCode::NOT_FOUND, "blob_not_found"),
        (
            client.post(url("/v1/blobs")).header("x-cairn-meta-big", "v".repeat(5000)).body("x"),
            StatusCode::BAD_REQUEST,
            "metadata_too_large",
        ),
        (
            client.post(url("/v1/blobs")).header("x-cairn-ttl", "soon").body("x"),
            StatusCode::BAD_REQUEST,
            "invalid_header",
        ),
        (client.post(url("/v1/blobs")).header("x-cairn-ttl", "0").body("x"), StatusCode::BAD_REQUEST, "invalid_header"),
        (
            client.get(url(&format!("/v1/blobs/{id}"))).header("range", "bytes=100-"),
            StatusCode::RANGE_NOT_SATISFIABLE,
            "range_not_satisfiable",
        ),
        (
            client.get(url(&format!("/v1/blobs/{id}"))).header("range", "bytes=0-1,3-4"),
            StatusCode::RANGE_NOT_SATISFIABLE,
            "range_not_satisfiable",
        ),
        (
            client.put(url(&format!("/v1/blobs/{id}/ttl"))).body("{\"ttl_seconds\": \"x\"}"),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (client.get(url("/v2/blobs")), StatusCode::NOT_FOUND, "route_not_found"),
        (client.put(url("/v1/blobs")), StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        (client.post(url(&format!("/v1/blobs/{id}"))), StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
    ];
    for (request, status, code) in cases {
        let r = request.send().unwrap();
        if status == StatusCode::RANGE_NOT_SATISFIABLE {
            assert_eq!(r.headers()["content-range"], "bytes */7");
        }
        assert_eq!(error_code(r), (status, code.to_owned()));
    }
    // A declared Content-Length over the limit is refused before the body is read.
    let mut stream = std::net::TcpStream::connect(&node.addr).unwrap();
    stream.write_all(b"POST /v1/blobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer CKTESTROOT0000000000.testsecrettestsecrettestsecrettestsecret\r\nContent-Length: 7000000\r\n\r\n").unwrap();
    let mut response = String::new();
    std::io::BufReader::new(stream).read_line(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    // A streamed body (no Content-Length) is cut off at the limit.
    let body = reqwest::blocking::Body::new(ChunkReader(std::io::Cursor::new(vec![1u8; (6 << 20) + 1])));
    let (status, code) = error_code(client.post(url("/v1/blobs")).body(body).send().unwrap());
    assert_eq!((status, code.as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"));

    // Nothing was stored by the refused requests; the good blob is intact.
    let stats: Value = client.get(url("/readyz")).send().unwrap().json().unwrap();
    assert_eq!(stats["ready"], true);
    assert_eq!(client.get(url(&format!("/v1/blobs/{id}"))).send().unwrap().bytes().unwrap().as_ref(), b"keep me");
    let metrics = client.get(url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains("cairn_blob_bytes_total{direction=\"in\"} 7\n"), "only the good blob was stored");
}

/// A reader without a known length, so reqwest sends the body chunked.
struct ChunkReader(std::io::Cursor<Vec<u8>>);
impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

#[test]
fn large_blobs_stream_in_verified_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let node = small_node(dir.path());
    let client = support::client();
    let data = payload(7, 5 * 1024 * 1024 + 123);
    let id = put(&client, &node, data.clone());
    assert_eq!(client.get(node.url(&format!("/v1/blobs/{id}"))).send().unwrap().bytes().unwrap().to_vec(), data);
    let r = client.get(node.url(&format!("/v1/blobs/{id}"))).header("range", "bytes=1048000-3145800").send().unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().unwrap().to_vec(), data[1048000..=3145800].to_vec());
}

#[test]
fn flipped_byte_is_an_integrity_error_never_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let node = small_node(dir.path());
    let client = support::client();
    let small = payload(1, 4000);
    let large = payload(2, 3 * 1024 * 1024);
    let small_id = put(&client, &node, small.clone());
    let large_id = put(&client, &node, large.clone());
    let segment = node.data_dir.join("volumes/p00000000/segments/00000001.seg");
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&segment).unwrap();
    // Find each payload in the segment and flip one byte in it (in the third MiB for the large one).
    let mut content = vec![0u8; 8 * 1024 * 1024];
    file.read_exact_at(&mut content, 0).unwrap();
    let find = |needle: &[u8]| content.windows(needle.len()).position(|w| w == needle).unwrap() as u64;
    let small_at = find(&small[..64]) + 100;
    let large_at = find(&large[..64]) + 2 * 1024 * 1024 + 5;
    for at in [small_at, large_at] {
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, at).unwrap();
        file.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    }
    let (status, code) = error_code(client.get(node.url(&format!("/v1/blobs/{small_id}"))).send().unwrap());
    assert_eq!((status, code.as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "integrity_error"));
    // The large blob's first chunks are fine, so the response starts; it must break off rather
    // than deliver the corrupt chunk.
    let result = client.get(node.url(&format!("/v1/blobs/{large_id}"))).send().and_then(|r| r.bytes());
    match result {
        Err(_) => {}
        Ok(body) => {
            assert!(body.len() < large.len(), "corrupt bytes were served");
            assert_eq!(&body[..], &large[..body.len()], "served bytes are a prefix of the original");
        }
    }
    // Ranges that avoid the corrupt chunk still work.
    let r = client.get(node.url(&format!("/v1/blobs/{large_id}"))).header("range", "bytes=0-1048575").send().unwrap();
    assert_eq!(r.bytes().unwrap().to_vec(), large[..1048576].to_vec());
    let metrics = client.get(node.url("/metrics")).send().unwrap().text().unwrap();
    assert!(!metrics.contains("cairn_integrity_errors_total 0\n"), "integrity errors are counted");
}

#[test]
fn concurrent_puts_deletes_and_gets_on_the_same_ids_stay_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = small_node(dir.path());
    let client = support::client();
    let blobs: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| {
            let data = payload(i, 1000 + i as usize * 10);
            (put(&client, &node, data.clone()), data)
        })
        .collect();
    std::thread::scope(|s| {
        for t in 0..8 {
            let (client, node, blobs) = (client.clone(), &node, &blobs);
            s.spawn(move || {
                for round in 0..30 {
                    let (id, data) = &blobs[(t * 7 + round) % blobs.len()];
                    let url = node.url(&format!("/v1/blobs/{id}"));
                    if (t + round) % 5 == 0 && (t * 7 + round) % blobs.len() % 2 == 0 {
                        let status = client.delete(&url).send().unwrap().status();
                        assert_eq!(status, StatusCode::NO_CONTENT);
                    } else {
                        let r = client.get(&url).send().unwrap();
                        match r.status() {
                            StatusCode::OK => assert_eq!(&r.bytes().unwrap().to_vec(), data),
                            StatusCode::GONE => {}
                            other => panic!("unexpected {other}"),
                        }
                    }
                    put(&client, node, payload(1000 + round as u64, 500));
                }
            });
        }
    });
    // After a restart every blob is either intact or deleted; never anything else.
    node.restart();
    let mut gone = HashSet::new();
    for (id, data) in &blobs {
        let r = client.get(node.url(&format!("/v1/blobs/{id}"))).send().unwrap();
        match r.status() {
            StatusCode::OK => assert_eq!(&r.bytes().unwrap().to_vec(), data),
            StatusCode::GONE => {
                gone.insert(id.clone());
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(!gone.is_empty() && gone.len() < blobs.len());
}

#[test]
fn metrics_openapi_and_probes() {
    let dir = tempfile::tempdir().unwrap();
    let node = small_node(dir.path());
    let client = support::client();
    std::thread::scope(|s| {
        for t in 0..16 {
            let (client, node) = (client.clone(), &node);
            s.spawn(move || {
                for i in 0..20 {
                    put(&client, node, payload(t * 100 + i, 4096));
                }
            });
        }
    });
    let metrics = client.get(node.url("/metrics")).send().unwrap().text().unwrap();
    for needle in [
        "cairn_http_requests_total{method=\"POST\",route=\"/v1/blobs\",status=\"201\"} 320",
        "cairn_http_request_duration_seconds_bucket",
        "cairn_fsync_duration_seconds_count",
        "cairn_volume_fill_ratio{partition=\"0\"}",
        "cairn_volume_writable{partition=\"0\"} 1",
        "cairn_blob_bytes_total{direction=\"in\"} 1310720",
        "cairn_volume_blobs{partition=\"0\"} 320",
        "cairn_volume_reclaimable_bytes{partition=\"0\"} 0",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    // What the volume holds: 320 blobs of 4 KiB and their record headers, nothing to reclaim.
    let usage: Value = client.get(node.url("/v1/admin/usage")).send().unwrap().json().unwrap();
    assert_eq!(usage[0]["partition"], 0);
    assert_eq!(usage[0]["blobs"], 320);
    let stored = usage[0]["stored_bytes"].as_u64().unwrap();
    assert!(stored > 320 * 4096 && stored < 320 * 4096 * 11 / 10, "{usage}");
    assert_eq!(usage[0]["reclaimable_bytes"], 0);
    // Group commit: 320 concurrent puts took fewer commits than puts.
    let value = |name: &str| -> f64 {
        metrics.lines().find(|l| l.starts_with(name)).unwrap().rsplit(' ').next().unwrap().parse().unwrap()
    };
    let (batches, records) =
        (value("cairn_group_commit_batch_records_count"), value("cairn_group_commit_batch_records_sum"));
    assert_eq!(records, 320.0);
    assert!(batches < records, "{batches} commits for {records} puts: no batching");

    let doc: Value = client.get(node.url("/openapi.json")).send().unwrap().json().unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for (path, methods) in [
        ("/v1/blobs", &["post"][..]),
        ("/v1/blobs/{id}", &["get", "head", "delete"][..]),
        ("/v1/blobs/{id}/info", &["get"][..]),
        ("/v1/blobs/{id}/ttl", &["put"][..]),
        ("/v1/admin/replicas", &["get"][..]),
        ("/v1/admin/usage", &["get"][..]),
        ("/healthz", &["get"][..]),
        ("/readyz", &["get"][..]),
        ("/metrics", &["get"][..]),
        ("/openapi.json", &["get"][..]),
    ] {
        for m in methods {
            assert!(paths[path][m].is_object(), "openapi lacks {m} {path}");
        }
    }
    assert_eq!(paths.len(), 10, "openapi describes exactly the routes served");
    assert_eq!(client.get(node.url("/healthz")).send().unwrap().status(), StatusCode::OK);
    let ready: Value = client.get(node.url("/readyz")).send().unwrap().json().unwrap();
    assert_eq!(ready["volumes"][0]["state"], "writable");
}

/// Sizes on every boundary of the record format, through the HTTP API: PUT, GET whole, HEAD,
/// /info, and ranges that start, end and straddle chunk boundaries.
#[test]
fn every_size_boundary_round_trips_over_http() {
    const CHUNK: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let node = Datanode::start(
        &dir.path().join("node"),
        &["--segment-size", "8MiB", "--volume-size", "256MiB", "--max-blob-size", "6MiB"],
    );
    let client = support::client();
    let max = 6 * CHUNK;
    let mut sizes = vec![0, 1, 2, max - 1, max, CHUNK + 64 * 1024 - 1, CHUNK + 64 * 1024, CHUNK + 64 * 1024 + 1];
    for n in 1..=5 {
        sizes.extend([n * CHUNK - 1, n * CHUNK, n * CHUNK + 1]);
    }
    sizes.push(1_049_600); // the size from the report
    for (seed, size) in sizes.into_iter().enumerate() {
        let data = payload(seed as u64, size);
        let id = put(&client, &node, data.clone());
        let url = node.url(&format!("/v1/blobs/{id}"));
        let r = client.get(&url).send().unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{size} bytes");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        assert!(r.bytes().unwrap().to_vec() == data, "{size} bytes: GET differs");
        let head = client.head(&url).send().unwrap();
        assert_eq!(head.status(), StatusCode::OK);
        assert_eq!(head.headers()["content-length"], size.to_string().as_str());
        let info: Value = client.get(format!("{url}/info")).send().unwrap().json().unwrap();
        assert_eq!(info["size"], size as u64);
        if size == 0 {
            continue;
        }
        let mut ranges = vec![(0, 0), (size - 1, size - 1), (0, size - 1)];
        for boundary in (CHUNK..size).step_by(CHUNK) {
            ranges.extend([(boundary - 1, boundary), (boundary, boundary), (boundary - 10, boundary + 10)]);
        }
        for (start, end) in ranges {
            let end = end.min(size - 1);
            let r = client.get(&url).header("range", format!("bytes={start}-{end}")).send().unwrap();
            assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT, "{size} bytes, {start}-{end}");
            assert_eq!(r.headers()["content-range"], format!("bytes {start}-{end}/{size}").as_str());
            assert!(r.bytes().unwrap().to_vec() == data[start..=end], "{size} bytes: range {start}-{end} differs");
        }
    }
}

/// Whatever refuses a request, the answer is JSON with a stable code: the framework's path and
/// query rejections, hyper's own answers to requests it cannot parse, and bodies of the wrong shape.
#[test]
fn framework_and_transport_errors_are_json_too() {
    let dir = tempfile::tempdir().unwrap();
    let node = small_node(dir.path());
    let client = support::client();
    let id = put(&client, &node, b"keep me".to_vec());
    let url = |p: &str| node.url(p);
    let cases: Vec<(reqwest::blocking::RequestBuilder, StatusCode, &str)> = vec![
        (client.get(url(&format!("/v1/blobs/{id}?local=maybe"))), StatusCode::BAD_REQUEST, "invalid_request"),
        (client.get(url("/v1/blobs/%FF%FE")), StatusCode::BAD_REQUEST, "invalid_request"),
        (client.put(url(&format!("/v1/blobs/{id}/ttl"))).body("{}"), StatusCode::BAD_REQUEST, "invalid_body"),
        (client.put(url(&format!("/v1/blobs/{id}/ttl"))).body(""), StatusCode::BAD_REQUEST, "invalid_body"),
        (
            client.put(url(&format!("/v1/blobs/{id}/ttl"))).body(r#"{"ttl_seconds": 0}"#),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            client.put(url(&format!("/v1/blobs/{id}/ttl"))).body(r#"{"ttl_seconds": 5, "ttl": 9}"#),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
    ];
    for (request, status, code) in cases {
        let r = request.send().unwrap();
        assert_eq!(r.headers()["content-type"], "application/json");
        let (got_status, body) = (r.status(), r.text().unwrap());
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
        assert_eq!((got_status, v["error"]["code"].as_str().unwrap()), (status, code), "{body}");
        assert!(!body.contains("X-Cairn-TTL"), "the TTL body is refused in its own words: {body}");
    }
    // A TTL body without the field is refused, not read as "permanent".
    let info: Value = client.get(url(&format!("/v1/blobs/{id}/info"))).send().unwrap().json().unwrap();
    assert_eq!(info["expires_ms"], Value::Null);
    let r = client.put(url(&format!("/v1/blobs/{id}/ttl"))).body(r#"{"ttl_seconds": 60}"#).send().unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);

    // What a client sent is cut short in messages: ids, paths, headers, bodies.
    let long = "1".repeat(5000);
    let requests = [
        client.get(url(&format!("/v1/blobs/{long}"))),
        client.get(url(&format!("/nothing/{long}"))),
        client.post(url("/v1/blobs")).header("x-cairn-ttl", long.as_str()).body("x"),
        client.get(url(&format!("/v1/blobs/{id}"))).header("range", format!("bytes={long}")),
        client.put(url(&format!("/v1/blobs/{id}/ttl"))).body(format!("{{\"x{long}\": 1}}")),
        client.put(url(&format!("/v1/blobs/{id}/ttl"))).body(format!("{{\"ttl_seconds\": \"{long}\"}}")),
    ];
    for request in requests {
        let body = request.send().unwrap().text().unwrap();
        assert!(body.len() < 600, "a {}-byte message echoes the request: {body:.200}", body.len());
    }

    // hyper's own answers: a malformed header line, headers too large.
    let raw = |request: &[u8]| -> (String, Value) {
        let mut stream = std::net::TcpStream::connect(&node.addr).unwrap();
        stream.write_all(request).unwrap();
        let mut response = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stream, &mut response);
        let response = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        (head.to_owned(), serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {response:.300}")))
    };
    let (head, v) = raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert_eq!(v["error"]["code"], "invalid_request");
    let huge =
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nx-big: {}\r\n\r\n", "v".repeat(600 * 1024));
    let (head, v) = raw(huge.as_bytes());
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    assert_eq!(v["error"]["code"], "headers_too_large");
    // The node is unharmed.
    assert_eq!(client.get(url(&format!("/v1/blobs/{id}"))).send().unwrap().text().unwrap(), "keep me");
}

/// Unknown methods are one metric label: a client cannot grow /metrics without bound.
#[test]
fn unknown_methods_share_one_metric_label() {
    let dir = tempfile::tempdir().unwrap();
    let node = small_node(dir.path());
    let client = support::client();
    let send = |i: usize| {
        let method = reqwest::Method::from_bytes(format!("X{i}").as_bytes()).unwrap();
        let r = client.request(method, node.url(&format!("/v1/blobs/x{i}"))).send().unwrap();
        assert!(r.status().is_client_error());
    };
    for i in 0..10 {
        send(i);
    }
    // Twice: the first scrape adds its own series to the second.
    client.get(node.url("/metrics")).send().unwrap();
    let before = client.get(node.url("/metrics")).send().unwrap().text().unwrap().len();
    for i in 10..500 {
        send(i);
    }
    let metrics = client.get(node.url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains("method=\"other\""), "{metrics}");
    assert!(!metrics.contains("method=\"X1"), "a client's method became a label");
    assert!(metrics.len() < before + 500, "/metrics grew from {before} to {} bytes", metrics.len());
}

/// A standalone node's partitions are its data directory's: a restart without `--partitions`
/// opens them all, and a contradicting `--partitions` is refused with the reason.
#[test]
fn a_restart_opens_every_partition_the_node_has() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let flags = ["--segment-size", "8MiB", "--volume-size", "64MiB", "--max-blob-size", "6MiB"];
    let mut node = Datanode::start(&data, &[&flags[..], &["--partitions", "4"]].concat());
    let client = support::client();
    let ids: Vec<String> = (0..40u64).map(|seed| put(&client, &node, payload(seed, 100))).collect();
    let partitions: HashSet<u32> =
        ids.iter().map(|id| id.parse::<cairn_common::BlobId>().unwrap().partition()).collect();
    assert!(partitions.len() > 1, "blobs spread over the partitions");
    node.stop();
    let node = Datanode::start(&data, &flags);
    for (seed, id) in ids.iter().enumerate() {
        let r = client.get(node.url(&format!("/v1/blobs/{id}"))).send().unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{id}");
        assert!(r.bytes().unwrap().to_vec() == payload(seed as u64, 100));
    }
    let ready: Value = client.get(node.url("/readyz")).send().unwrap().json().unwrap();
    assert_eq!(ready["volumes"].as_array().unwrap().len(), 4, "{ready}");
    drop(node);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn-datanode"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{}", support::free_port()), "--partitions", "2"])
        .args(flags)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds 4 partition(s); --partitions 2 contradicts it"), "{err}");
    // Its log (not a terminal) is plain text.
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    assert!(log.contains("cairn-datanode serving") && !log.contains('\u{1b}'), "{log:.500}");
}
