//! HTTPS on a standalone datanode (`--tls-cert`, `--tls-key`), driven by curl as a user would.

mod support;

use std::path::Path;
use std::process::Command;

use cairn_testkit::keys::authorization;
use support::Datanode;

/// A self-signed certificate for 127.0.0.1 (and localhost) made with openssl: (cert, key).
fn certificate(dir: &Path) -> (String, String) {
    certificate_named(dir, "cairn-test")
}

/// As [`certificate`], with this common name, in `dir/<name>.cert.pem` and `dir/<name>.key.pem`.
fn certificate_named(dir: &Path, name: &str) -> (String, String) {
    let (cert, key) = (dir.join(format!("{name}.cert.pem")), dir.join(format!("{name}.key.pem")));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", &format!("/CN={name}"), "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    (cert.to_str().unwrap().to_owned(), key.to_str().unwrap().to_owned())
}

/// curl with these arguments: (exit code, stdout).
fn curl(args: &[&str]) -> (i32, String) {
    let out = Command::new("curl").args(["-sS", "--max-time", "10"]).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_standalone_node_serves_https_with_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    let node = Datanode::start_tls(&dir.path().join("n"), &["--tls-cert", &cert, "--tls-key", &key]);
    let url = |p: &str| format!("https://{}{p}", node.addr);
    let auth = format!("Authorization: {}", authorization());
    let (code, body) = curl(&["--cacert", &cert, "-H", &auth, "--data-binary", "over tls", &url("/v1/blobs")]);
    assert_eq!(code, 0, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"].as_str().unwrap().to_owned();
    let (code, body) = curl(&["--cacert", &cert, "-H", &auth, &url(&format!("/v1/blobs/{id}"))]);
    assert_eq!((code, body.as_str()), (0, "over tls"));
    // Without the key: the same 401 as over plain HTTP.
    let (_, body) = curl(&["--cacert", &cert, &url(&format!("/v1/blobs/{id}"))]);
    assert!(body.contains("unauthenticated"), "{body}");
    // A client that does not trust the certificate gets nothing (curl: 60, peer certificate).
    let (code, _) = curl(&["-H", &auth, &url(&format!("/v1/blobs/{id}"))]);
    assert_eq!(code, 60);
    // Plain HTTP to the TLS port gets no HTTP answer, and the node goes on serving.
    let (code, body) = curl(&["-H", &auth, &format!("http://{}/v1/blobs/{id}", node.addr)]);
    assert_ne!(code, 0, "{body}");
    let (code, _) = curl(&["--cacert", &cert, &url("/healthz")]);
    assert_eq!(code, 0);
}

#[test]
fn unusable_certificate_files_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = certificate(dir.path());
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a key").unwrap();
    let data = dir.path().join("n");
    for (cert, key, says) in [
        (cert.as_str(), garbage.to_str().unwrap(), "--tls-key"),
        (garbage.to_str().unwrap(), cert.as_str(), "--tls-cert"),
        ("/nonexistent/cert.pem", cert.as_str(), "--tls-cert"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_cairn-datanode"))
            .args([
                "--data-dir",
                data.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--tls-cert",
                cert,
                "--tls-key",
                key,
            ])
            .envs(cairn_testkit::keys::root_key_env())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{says}: {err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-datanode"))
        .args(["--etcd", "http://127.0.0.1:1", "--cluster", "c", "--node-id", "n", "--data-dir"])
        .arg(&data)
        .args(["--tls-cert", &cert, "--tls-key", &cert])
        .output()
        .unwrap();
    // In a cluster HTTPS on the blob port needs the peer port (the datanodes call each other there).
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-cert/--tls-key in a cluster need --peer-listen"), "{err}");
}

/// The subject of the certificate the node presents to a new connection.
fn presented_subject(addr: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("openssl s_client -connect {addr} </dev/null 2>/dev/null | openssl x509 -noout -subject"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A certificate rotated in place (new files over the old, as a Secret's update or cert-manager
/// does) is served to new connections within seconds, without a restart and without one failed
/// request meanwhile; files that do not load (a torn pair, garbage) leave the last good one in
/// service.
#[test]
fn a_rotated_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_a, key_a) = certificate_named(dir.path(), "cairn-a");
    let (cert_b, key_b) = certificate_named(dir.path(), "cairn-b");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(&cert_a, &cert).unwrap();
    std::fs::copy(&key_a, &key).unwrap();
    let both = dir.path().join("both.pem");
    std::fs::write(&both, [std::fs::read(&cert_a).unwrap(), std::fs::read(&cert_b).unwrap()].concat()).unwrap();
    let node = Datanode::start_tls(
        &dir.path().join("n"),
        &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()],
    );
    assert!(presented_subject(&node.addr).contains("cairn-a"));

    // Requests all along, from a client that trusts both certificates.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = std::thread::spawn({
        let (stop, both, url) = (stop.clone(), both.clone(), format!("https://{}/healthz", node.addr));
        move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match curl(&["--cacert", both.to_str().unwrap(), &url]) {
                    (0, _) => ok += 1,
                    (code, body) => failed.push(format!("curl {code}: {body}")),
                }
            }
            (ok, failed)
        }
    });
    let replace = |from: &str, to: &Path| {
        let staged = to.with_extension("new");
        std::fs::copy(from, &staged).unwrap();
        std::fs::rename(&staged, to).unwrap();
    };
    // The certificate first and the key a moment later: a torn pair in between.
    replace(&cert_b, &cert);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    replace(&key_b, &key);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !presented_subject(&node.addr).contains("cairn-b") {
        assert!(std::time::Instant::now() < deadline, "the new certificate is never served");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Garbage in place: the last good certificate stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(presented_subject(&node.addr).contains("cairn-b"));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = traffic.join().unwrap();
    assert!(failed.is_empty() && ok > 10, "{ok} answered, failed: {failed:?}");
    // A client that trusts only the old certificate is refused by new connections.
    let (code, _) = curl(&["--cacert", &cert_a, &format!("https://{}/healthz", node.addr)]);
    assert_eq!(code, 60);
}
