//! Crash and fault tests against real datanode processes: kill -9 under load, a full disk.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use cairn_testkit::machine::Machine;
use reqwest::StatusCode;
use serde_json::Value;
use support::{payload, Datanode};

#[test]
fn kill9_during_concurrent_puts_loses_no_acknowledged_blob() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Datanode::start(
        &dir.path().join("node"),
        &["--segment-size", "4MiB", "--volume-size", "1GiB", "--max-blob-size", "1MiB"],
    );
    let acked: Mutex<HashMap<String, u64>> = Mutex::new(HashMap::new());
    let stop = AtomicBool::new(false);
    let client = support::client_builder().timeout(Duration::from_secs(5)).build().unwrap();
    let put_url = node.url("/v1/blobs");
    std::thread::scope(|s| {
        for t in 0..12u64 {
            let (client, put_url, acked, stop) = (client.clone(), &put_url, &acked, &stop);
            s.spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let seed = t * 1_000_000 + i;
                    i += 1;
                    // Sizes from a few bytes to 300 KiB, so records straddle pages and segments roll.
                    let len = (seed * 7919 % 300_000) as usize + 1;
                    match client.post(put_url).body(payload(seed, len)).send() {
                        Ok(r) if r.status() == StatusCode::CREATED => {
                            let id = r.json::<Value>().map(|v| v["id"].as_str().unwrap().to_owned());
                            if let Ok(id) = id {
                                acked.lock().unwrap().insert(id, seed);
                            }
                        }
                        _ => {}
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(2500));
        node.kill9();
        stop.store(true, Ordering::Relaxed);
    });
    let acked = acked.into_inner().unwrap();
    assert!(acked.len() > 100, "only {} puts were acknowledged before the kill", acked.len());

    node.start_again();
    for (id, seed) in &acked {
        let len = (seed * 7919 % 300_000) as usize + 1;
        let r = client.get(node.url(&format!("/v1/blobs/{id}"))).send().unwrap();
        assert_eq!(r.status(), StatusCode::OK, "acknowledged blob {id} lost");
        assert!(r.bytes().unwrap().to_vec() == payload(*seed, len), "blob {id} differs");
    }
    // The node keeps working, and a clean restart after the recovery is clean too.
    let r = client.post(node.url("/v1/blobs")).body("after").send().unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    node.restart();
    let id = r.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();
    assert_eq!(client.get(node.url(&format!("/v1/blobs/{id}"))).send().unwrap().text().unwrap(), "after");
}

#[test]
fn full_disk_answers_507_keeps_deletes_and_recovers_by_itself() {
    // 4 MiB of tmpfs under a volume that believes it may grow to 64 MiB: the disk fills first.
    let mut machine = Machine::new();
    let mnt = machine.mount("tmpfs", "tmpfs", &["-t", "tmpfs", "-o", "size=4m"]);
    let ballast = mnt.join("ballast");
    std::fs::write(&ballast, vec![1u8; 1 << 20]).unwrap();
    let mut node = Datanode::start(
        &mnt.join("node"),
        &["--segment-size", "1MiB", "--volume-size", "64MiB", "--max-blob-size", "256KiB", "--index-reserve", "256KiB"],
    );
    let client = support::client();
    let mut stored = Vec::new();
    let mut refused = 0;
    for seed in 0..200u64 {
        let r = client.post(node.url("/v1/blobs")).body(payload(seed, 100_000)).send().unwrap();
        match r.status() {
            StatusCode::CREATED => stored.push((r.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned(), seed)),
            StatusCode::INSUFFICIENT_STORAGE => {
                let v: Value = r.json().unwrap();
                assert_eq!(v["error"]["code"], "insufficient_storage");
                refused += 1;
                if refused == 3 {
                    break;
                }
            }
            other => panic!("unexpected {other}: {}", r.text().unwrap()),
        }
    }
    assert!(refused == 3 && !stored.is_empty(), "stored {}, refused {refused}", stored.len());
    // Small blobs still fit in the active segment: the volume is not stalled until they do not.
    support::put_until_refused(&client, &node, 100, StatusCode::INSUFFICIENT_STORAGE, 100_000);
    let ready: Value = client.get(node.url("/readyz")).send().unwrap().json().unwrap();
    assert_eq!(ready["ready"], true, "a volume on a full disk still serves: {ready}");
    assert_eq!(ready["volumes"][0]["state"], "stalled", "a full disk is passing trouble, not a full volume: {ready}");
    let check = |node: &Datanode, stored: &[(String, u64)]| {
        for (id, seed) in stored {
            let r = client.get(node.url(&format!("/v1/blobs/{id}"))).send().unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            assert!(r.bytes().unwrap().to_vec() == payload(*seed, 100_000));
        }
    };
    check(&node, &stored);
    // Deletes still work on the full disk: the index has its reserve.
    for _ in 0..3 {
        let (gone, _) = stored.remove(0);
        let r = client.delete(node.url(&format!("/v1/blobs/{gone}"))).send().unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        assert_eq!(client.get(node.url(&format!("/v1/blobs/{gone}"))).send().unwrap().status(), StatusCode::GONE);
    }
    // Room comes back: the next put goes through, no restart needed.
    std::fs::remove_file(&ballast).unwrap();
    let r = client.post(node.url("/v1/blobs")).body(payload(500, 100_000)).send().unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "the volume recovers by itself: {}", r.text().unwrap());
    stored.push((r.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned(), 500));
    let ready: Value = client.get(node.url("/readyz")).send().unwrap().json().unwrap();
    assert_eq!(ready["volumes"][0]["state"], "writable", "{ready}");
    node.restart();
    check(&node, &stored);
    node.kill9();
    node.start_again();
    check(&node, &stored);
}

#[test]
fn an_index_that_cannot_grow_on_a_full_disk_heals_when_room_is_back() {
    let mut machine = Machine::new();
    let mnt = machine.mount("tmpfs", "tmpfs", &["-t", "tmpfs", "-o", "size=16m"]);
    // No index reserve: nothing keeps the disk from filling under the index.
    let mut node = Datanode::start(
        &mnt.join("node"),
        &["--segment-size", "4MiB", "--volume-size", "8MiB", "--max-blob-size", "256KiB", "--index-reserve", "0"],
    );
    let client = support::client();
    let mut stored = Vec::new();
    for seed in 0..5u64 {
        let r = client.post(node.url("/v1/blobs")).body(payload(seed, 1000)).send().unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        stored.push((r.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned(), seed));
    }
    // Something else takes every free byte.
    let filler = mnt.join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![7u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let _ = file.write_all(&[7u8; 4096]);
        let _ = file.sync_all();
    }
    // Writes go on until the index cannot grow: the volume fails (503), reads go on.
    let mut failed = false;
    for seed in 100..20_000u64 {
        let meta = "m".repeat(1000);
        let r =
            client.post(node.url("/v1/blobs")).header("x-cairn-meta-k", meta).body(payload(seed, 100)).send().unwrap();
        match r.status() {
            StatusCode::CREATED => stored.push((r.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned(), seed)),
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::INSUFFICIENT_STORAGE => {
                let ready: Value = client.get(node.url("/readyz")).send().unwrap().json().unwrap();
                if ready["volumes"][0]["state"] == "failed" {
                    failed = true;
                    break;
                }
            }
            other => panic!("{other}: {}", r.text().unwrap()),
        }
    }
    assert!(failed, "the index never ran out of room");
    // Room comes back: the node reopens the volume by itself, and nothing acknowledged is lost.
    std::fs::remove_file(&filler).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ready: Value = client.get(node.url("/readyz")).send().unwrap().json().unwrap();
        if ready["ready"] == true {
            break;
        }
        if std::time::Instant::now() > deadline {
            let log = std::fs::read_to_string(mnt.join("node.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let df = std::process::Command::new("df").arg(&mnt).output().unwrap();
            panic!("the volume never healed: {ready}\n{}\n{tail:#?}", String::from_utf8_lossy(&df.stdout));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = client.post(node.url("/v1/blobs")).body("after").send().unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let check = |node: &Datanode| {
        for (id, seed) in &stored {
            let r = client.get(node.url(&format!("/v1/blobs/{id}"))).send().unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{id}");
            let len = if *seed < 100 { 1000 } else { 100 };
            assert!(r.bytes().unwrap().to_vec() == payload(*seed, len));
        }
    };
    check(&node);
    node.kill9();
    node.start_again();
    check(&node);
}
