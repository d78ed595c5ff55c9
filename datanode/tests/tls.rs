//! HTTPS on a standalone datanode (`--tls-cert`, `--tls-key`), driven by curl as a user would.

mod support;

use std::path::Path;
use std::process::Command;

use cairn_testkit::keys::authorization;
use support::Datanode;

/// A self-signed certificate for 127.0.0.1 (and localhost) made with openssl: (cert, key).
fn certificate(dir: &Path) -> (String, String) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=cairn-test", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
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
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("standalone"), "{}", String::from_utf8_lossy(&out.stderr));
}
