//! Bounded resources of a real datanode process: upload memory, connections, header and body
//! timeouts, shutdown with a request half sent, and running out of file descriptors.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use support::{payload, Datanode};

const MIB: u64 = 1 << 20;

/// Reads what the server sends until it closes the connection (or `limit` passes).
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    match stream.read_to_end(&mut out) {
        Ok(_) => Some(String::from_utf8_lossy(&out).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(String::from_utf8_lossy(&out).into_owned()),
        Err(_) => None, // still open at the limit
    }
}

#[test]
fn upload_memory_is_bounded_and_given_back() {
    let dir = tempfile::tempdir().unwrap();
    let node = Datanode::start(
        &dir.path().join("node"),
        &[
            "--segment-size",
            "128MiB",
            "--volume-size",
            "4GiB",
            "--max-blob-size",
            "64MiB",
            "--upload-buffer",
            "128MiB",
            "--upload-wait-ms",
            "60000",
            "--chunk-cache-size",
            "0",
        ],
    );
    let baseline = node.memory_kib("VmRSS:");
    // 12 clients × 60 MiB at once: 720 MiB of bodies, at most 128 MiB of them held.
    let blob = payload(1, 60 * MIB as usize);
    std::thread::scope(|s| {
        for _ in 0..12 {
            let (node, blob) = (&node, &blob);
            s.spawn(move || {
                let client = support::client_builder().timeout(Duration::from_secs(120)).build().unwrap();
                let r = client.post(node.url("/v1/blobs")).body(blob.clone()).send().unwrap();
                assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().unwrap());
            });
        }
    });
    let peak = node.memory_kib("VmHWM:");
    assert!(
        peak < baseline + (128 + 160) * 1024,
        "peak RSS {peak} KiB (baseline {baseline} KiB): uploads were not bounded"
    );

    // Many mid-sized uploads, then memory goes back.
    let five = payload(2, 5 * MIB as usize);
    std::thread::scope(|s| {
        for _ in 0..20 {
            let (node, five) = (&node, &five);
            s.spawn(move || {
                let client = support::client();
                for _ in 0..5 {
                    let r = client.post(node.url("/v1/blobs")).body(five.clone()).send().unwrap();
                    assert_eq!(r.status(), StatusCode::CREATED);
                }
            });
        }
    });
    let after = node.memory_kib("VmRSS:");
    assert!(after < baseline + 96 * 1024, "RSS {after} KiB after the uploads finished (baseline {baseline} KiB)");
}

#[test]
fn no_room_for_an_upload_is_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let node = Datanode::start(
        &dir.path().join("node"),
        &["--max-blob-size", "8MiB", "--upload-buffer", "8MiB", "--upload-wait-ms", "200"],
    );
    // One upload holds the whole buffer: it declared 8 MiB and sends them slowly.
    let mut slow = TcpStream::connect(&node.addr).unwrap();
    slow.write_all(b"POST /v1/blobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer CKTESTROOT0000000000.testsecrettestsecrettestsecrettestsecret\r\nContent-Length: 8388608\r\n\r\nfirst bytes").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let r = support::client().post(node.url("/v1/blobs")).body(vec![1u8; 1000]).send().unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"]["code"], "busy");
    drop(slow);
    // Its room comes back when it goes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = support::client().post(node.url("/v1/blobs")).body(vec![1u8; 1000]).send().unwrap();
        if r.status() == StatusCode::CREATED {
            break;
        }
        assert!(Instant::now() < deadline, "the buffer never came back: {}", r.status());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn idle_and_half_sent_connections_are_closed_and_capped() {
    let dir = tempfile::tempdir().unwrap();
    let node = Datanode::start(
        &dir.path().join("node"),
        &[
            "--header-timeout-secs",
            "1",
            "--body-timeout-secs",
            "1",
            "--max-connections",
            "40",
            "--max-blob-size",
            "64MiB",
        ],
    );
    // Connections that send nothing, or half a header, are closed after the header timeout.
    let mut idle: Vec<TcpStream> = (0..30).map(|_| TcpStream::connect(&node.addr).unwrap()).collect();
    idle[0].write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Half: ").unwrap();
    // Over the cap: answered 503 and closed at once.
    let mut over: Vec<TcpStream> = (0..15).map(|_| TcpStream::connect(&node.addr).unwrap()).collect();
    let mut refused = 0;
    for stream in &mut over {
        // Refused ones answer at once; the others are closed empty by the header timeout.
        let answer = read_until_closed(stream, Duration::from_secs(3)).expect("closed, one way or the other");
        if !answer.is_empty() {
            assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
            assert!(answer.contains("\"code\":\"busy\""), "{answer}");
            refused += 1;
        }
    }
    assert!(refused >= 5, "{refused} of 15 connections over a cap of 40 were refused");
    let started = Instant::now();
    for stream in &mut idle {
        assert!(read_until_closed(stream, Duration::from_secs(5)).is_some(), "an idle connection stayed open");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // A body that stops arriving gets 408.
    let mut stalled = TcpStream::connect(&node.addr).unwrap();
    stalled.write_all(b"POST /v1/blobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer CKTESTROOT0000000000.testsecrettestsecrettestsecrettestsecret\r\nContent-Length: 1000\r\n\r\nonly a little").unwrap();
    let answer = read_until_closed(&mut stalled, Duration::from_secs(5)).expect("a stalled body is cut off");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    // The same for a TTL update's body.
    let mut stalled = TcpStream::connect(&node.addr).unwrap();
    let id = cairn_common::BlobId::generate(0);
    stalled
        .write_all(format!("PUT /v1/blobs/{id}/ttl HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer CKTESTROOT0000000000.testsecrettestsecrettestsecrettestsecret\r\nContent-Length: 100\r\n\r\n{{").as_bytes())
        .unwrap();
    let answer = read_until_closed(&mut stalled, Duration::from_secs(5)).expect("a stalled body is cut off");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // A client that asks for a large blob and never reads the answer is cut off too.
    let big = support::client().post(node.url("/v1/blobs")).body(payload(5, 48 << 20)).send().unwrap();
    assert_eq!(big.status(), StatusCode::CREATED);
    let id = big.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();
    let mut reader = TcpStream::connect(&node.addr).unwrap();
    reader.write_all(format!("GET /v1/blobs/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer CKTESTROOT0000000000.testsecrettestsecrettestsecrettestsecret\r\n\r\n").as_bytes()).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let started = Instant::now();
    let mut got = Vec::new();
    reader.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let ended = loop {
        let mut buf = vec![0u8; 1 << 20];
        match reader.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    assert!(ended && got.len() < 48 << 20, "a response nobody read held its connection ({} bytes)", got.len());
    assert!(started.elapsed() < Duration::from_secs(5));
    // With the old connections gone, the node serves as before.
    assert_eq!(support::client().get(node.url("/healthz")).send().unwrap().status(), StatusCode::OK);
}

#[test]
fn sigterm_with_a_request_half_sent_exits_within_the_drain_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Datanode::start(
        &dir.path().join("node"),
        &["--drain-timeout-secs", "2", "--body-timeout-secs", "300", "--header-timeout-secs", "300"],
    );
    let id = support::client().post(node.url("/v1/blobs")).body("kept").send().unwrap().json::<Value>().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut half = TcpStream::connect(&node.addr).unwrap();
    half.write_all(b"POST /v1/blobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer CKTESTROOT0000000000.testsecrettestsecrettestsecrettestsecret\r\nContent-Length: 100000\r\n\r\nsome").unwrap();
    let _idle = TcpStream::connect(&node.addr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let took = node.stop_timed(Duration::from_secs(10)).expect("shutdown hung on a half-sent request");
    assert!(took < Duration::from_secs(6), "shutdown took {took:?}");
    // The clean shutdown checkpointed: the blob is there after a restart.
    node.start_again();
    assert_eq!(support::client().get(node.url(&format!("/v1/blobs/{id}"))).send().unwrap().text().unwrap(), "kept");
}

#[test]
fn running_out_of_file_descriptors_pauses_writes_and_they_resume() {
    let dir = tempfile::tempdir().unwrap();
    let node = Datanode::start(
        &dir.path().join("node"),
        &["--segment-size", "1MiB", "--volume-size", "64MiB", "--max-blob-size", "256KiB"],
    );
    let client = support::client_builder().pool_max_idle_per_host(1).build().unwrap();
    // Fill most of the first segment over one kept-alive connection.
    let mut stored = Vec::new();
    for seed in 0..3 {
        let r = client.post(node.url("/v1/blobs")).body(payload(seed, 256 * 1024)).send().unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        stored.push((r.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned(), seed));
    }
    // Lower the node's file limit to what it has open, and take the rest with idle connections.
    let pid = node.pid() as i32;
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64;
    let mut original = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    assert_eq!(unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut original) }, 0);
    let limit = libc::rlimit { rlim_cur: open + 8, rlim_max: original.rlim_max };
    assert_eq!(unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) }, 0);
    let hogs: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(&node.addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    // The next put needs a new segment file: no descriptor for it. Not a failure of the volume.
    let r = client.post(node.url("/v1/blobs")).body(payload(9, 256 * 1024)).send().unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{}", r.text().unwrap());
    assert_eq!(r.headers()["retry-after"], "1");
    // Blobs that still fit in the active segment go on; once they do not, the volume is stalled.
    let small = support::put_until_refused(&client, &node, 1000, StatusCode::SERVICE_UNAVAILABLE, 10_000);
    assert!(small > 0, "small blobs were refused while they fit");
    let ready: Value = client.get(node.url("/readyz")).send().unwrap().json().unwrap();
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["volumes"][0]["state"], "stalled", "{ready}");
    for (id, seed) in &stored {
        let r = client.get(node.url(&format!("/v1/blobs/{id}"))).send().unwrap();
        assert!(r.bytes().unwrap().to_vec() == payload(*seed, 256 * 1024), "reads go on");
    }
    // Descriptors come back: writes resume by themselves.
    drop(hogs);
    assert_eq!(unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &original, std::ptr::null_mut()) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client.post(node.url("/v1/blobs")).body(payload(10, 256 * 1024)).send().unwrap();
        if r.status() == StatusCode::CREATED {
            break;
        }
        assert!(Instant::now() < deadline, "writes never resumed: {}", r.status());
        std::thread::sleep(Duration::from_millis(100));
    }
    let ready: Value = client.get(node.url("/readyz")).send().unwrap().json().unwrap();
    assert_eq!(ready["volumes"][0]["state"], "writable", "{ready}");
}
