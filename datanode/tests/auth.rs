//! Who gets in: a standalone datanode's routes with and without credentials (docs/security.md).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use cairn_testkit::keys::{TEST_KEY_ID, TEST_KEY_SECRET};
use reqwest::blocking::{Client, RequestBuilder};
use reqwest::StatusCode;
use serde_json::Value;
use support::Datanode;

/// Every route of the public API, as a request without credentials.
fn routes(client: &Client, node: &Datanode, id: &str) -> Vec<(String, RequestBuilder)> {
    let url = |p: &str| node.url(p);
    vec![
        ("POST /v1/blobs".into(), client.post(url("/v1/blobs")).body("x")),
        ("GET /v1/blobs/{id}".into(), client.get(url(&format!("/v1/blobs/{id}")))),
        ("HEAD /v1/blobs/{id}".into(), client.head(url(&format!("/v1/blobs/{id}")))),
        ("DELETE /v1/blobs/{id}".into(), client.delete(url(&format!("/v1/blobs/{id}")))),
        ("GET /v1/blobs/{id}/info".into(), client.get(url(&format!("/v1/blobs/{id}/info")))),
        ("PUT /v1/blobs/{id}/ttl".into(), client.put(url(&format!("/v1/blobs/{id}/ttl"))).body("{\"ttl_seconds\":5}")),
        ("GET /v1/admin/replicas".into(), client.get(url("/v1/admin/replicas"))),
        ("GET /v1/admin/usage".into(), client.get(url("/v1/admin/usage"))),
        ("GET /replica/v1/blobs/{id}".into(), client.get(url(&format!("/replica/v1/blobs/{id}")))),
        ("POST /replica/v1/journal".into(), client.post(url("/replica/v1/journal")).body("{}")),
        ("GET /no/such/route".into(), client.get(url("/no/such/route"))),
    ]
}

fn error_code(response: reqwest::blocking::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: Value = response.json().unwrap_or(Value::Null);
    (status, body["error"]["code"].as_str().unwrap_or_default().to_owned())
}

#[test]
fn every_route_refuses_a_caller_without_valid_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let node = Datanode::start(&dir.path().join("n"), &[]);
    let id = support::client().post(node.url("/v1/blobs")).body("secret data").send().unwrap().json::<Value>().unwrap()
        ["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let anonymous = Client::new();
    for (name, request) in routes(&anonymous, &node, &id) {
        let response = request.send().unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{name}");
        // A refused request with a body ends its connection (the body was never read).
        let closes = response.headers().get("connection").is_some_and(|v| v == "close");
        assert_eq!(closes, name.starts_with("POST") || name.starts_with("PUT"), "{name}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer realm=\"cairn\"", "{name}");
        if !name.starts_with("HEAD") {
            assert_eq!(error_code(response).1, "unauthenticated", "{name}");
        }
    }
    // Wrong secrets, unknown keys, malformed tokens and other schemes: the same 401, which does
    // not say whether the key id exists.
    let wrong = format!("{TEST_KEY_ID}.{}", "x".repeat(40));
    let unknown = format!("CKUNKNOWN00000000000.{TEST_KEY_SECRET}");
    let bad = [
        format!("Bearer {wrong}"),
        format!("Bearer {unknown}"),
        format!("Bearer {TEST_KEY_ID}"),
        format!("Bearer {TEST_KEY_ID}.{TEST_KEY_SECRET}x"),
        format!("Basic {TEST_KEY_ID}:{TEST_KEY_SECRET}"),
        "Bearer".into(),
        "".into(),
    ];
    for header in &bad {
        let r = anonymous.get(node.url(&format!("/v1/blobs/{id}"))).header("authorization", header).send().unwrap();
        let (status, code) = error_code(r);
        assert_eq!((status, code.as_str()), (StatusCode::UNAUTHORIZED, "unauthenticated"), "{header}");
    }
    let body = |header: &str| -> String {
        let r = anonymous.get(node.url(&format!("/v1/blobs/{id}"))).header("authorization", header).send().unwrap();
        r.json::<Value>().unwrap()["error"]["message"].as_str().unwrap().to_owned()
    };
    assert_eq!(body(&format!("Bearer {wrong}")), body(&format!("Bearer {unknown}")), "no key id probing");
    // A token sent without its scheme is not quoted back.
    assert!(!body(&format!("{TEST_KEY_ID}.{TEST_KEY_SECRET}")).contains(TEST_KEY_SECRET));
    // Open routes stay open; the right key gets in (any case of the scheme).
    for open in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(anonymous.get(node.url(open)).send().unwrap().status(), StatusCode::OK, "{open}");
    }
    let token = format!("bearer {TEST_KEY_ID}.{TEST_KEY_SECRET}");
    let r = anonymous.get(node.url(&format!("/v1/blobs/{id}"))).header("authorization", token).send().unwrap();
    assert_eq!(r.text().unwrap(), "secret data");
    // Counted, by reason; the secret never appears in the log.
    let metrics = anonymous.get(node.url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains("cairn_auth_failures_total{reason=\"missing\"}"), "{metrics}");
    assert!(metrics.contains("cairn_auth_failures_total{reason=\"invalid\"}"), "{metrics}");
    let log = std::fs::read_to_string(dir.path().join("n.log")).unwrap();
    assert!(!log.contains(TEST_KEY_SECRET), "a secret was logged");
}

#[test]
fn a_standalone_node_has_no_replica_routes_and_no_node_token() {
    let dir = tempfile::tempdir().unwrap();
    let node = Datanode::start(&dir.path().join("n"), &[]);
    // Only a key learns that the route does not exist here.
    let r = support::client().post(node.url("/replica/v1/journal")).body("{}").send().unwrap();
    assert_eq!(error_code(r), (StatusCode::NOT_FOUND, "route_not_found".into()));
    let r = Client::new().post(node.url("/replica/v1/journal")).header("x-cairn-node-token", "guess").send().unwrap();
    assert_eq!(error_code(r), (StatusCode::UNAUTHORIZED, "unauthenticated".into()));
}

#[test]
fn an_address_that_keeps_failing_is_limited_and_valid_keys_still_pass() {
    let dir = tempfile::tempdir().unwrap();
    let node = Datanode::start(&dir.path().join("n"), &[]);
    let anonymous = Client::new();
    let wrong = format!("Bearer {TEST_KEY_ID}.{}", "w".repeat(40));
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses
            .push(anonymous.get(node.url("/v1/admin/usage")).header("authorization", &wrong).send().unwrap().status());
    }
    let limited = statuses.iter().position(|s| *s == StatusCode::TOO_MANY_REQUESTS).expect("limited at some point");
    assert!((15..=25).contains(&limited), "limited after {limited} failures: {statuses:?}");
    let r = anonymous.get(node.url("/v1/admin/usage")).header("authorization", &wrong).send().unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(error_code(r).1, "too_many_auth_failures");
    // A client that shares the address (a NAT, a node's loopback) is not locked out by it.
    assert_eq!(support::client().get(node.url("/v1/admin/usage")).send().unwrap().status(), StatusCode::OK);
    // Missing credentials are not guesses: they are not limited.
    for _ in 0..30 {
        assert_eq!(anonymous.get(node.url("/v1/admin/usage")).send().unwrap().status(), StatusCode::UNAUTHORIZED);
    }
    // The budget refills (2 per second).
    std::thread::sleep(Duration::from_millis(1200));
    let r = anonymous.get(node.url("/v1/admin/usage")).header("authorization", &wrong).send().unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"cairn\", error=\"invalid_token\"");
    let metrics = anonymous.get(node.url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains("cairn_auth_failures_total{reason=\"blocked\"}"), "{metrics}");
}

#[test]
fn a_node_without_a_root_key_makes_one_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    std::fs::create_dir_all(&data).unwrap();
    // Started without --root-key-*: the support module passes them, so start by hand.
    let port = support::free_port();
    let start = || {
        let log = std::fs::File::create(dir.path().join("own.log")).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_cairn-datanode"))
            .args(["--data-dir", data.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    };
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    let wait = || {
        for _ in 0..300 {
            if Client::new().get(url("/healthz")).send().is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no datanode");
    };
    let mut child = start();
    wait();
    let file = data.join("root-token");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let token = std::fs::read_to_string(&file).unwrap().trim().to_owned();
    let with = |t: &str| Client::new().post(url("/v1/blobs")).header("authorization", format!("Bearer {t}"));
    assert_eq!(with(&token).body("a").send().unwrap().status(), StatusCode::CREATED);
    assert_eq!(Client::new().post(url("/v1/blobs")).body("a").send().unwrap().status(), StatusCode::UNAUTHORIZED);
    child.kill().unwrap();
    child.wait().unwrap();
    let mut child = start();
    wait();
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), token, "the same key after a restart");
    assert_eq!(with(&token).body("b").send().unwrap().status(), StatusCode::CREATED);
    child.kill().unwrap();
    child.wait().unwrap();
    let log = std::fs::read_to_string(dir.path().join("own.log")).unwrap();
    assert!(!log.contains(token.split_once('.').unwrap().1), "the secret is in the file, not the log");
}

#[test]
fn auth_none_lets_anyone_in_and_protected_metrics_need_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let open = Datanode::start(&dir.path().join("open"), &["--auth", "none"]);
    let r = Client::new().post(open.url("/v1/blobs")).body("anyone").send().unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let id = r.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();
    assert_eq!(Client::new().get(open.url(&format!("/v1/blobs/{id}"))).send().unwrap().text().unwrap(), "anyone");
    // Credentials that are wrong are still refused: `none` is no reason to accept a bad key.
    let r = Client::new().get(open.url(&format!("/v1/blobs/{id}"))).header("authorization", "Bearer nonsense").send();
    assert_eq!(r.unwrap().status(), StatusCode::UNAUTHORIZED);
    // Nor does it open the admin routes: the root key does.
    assert_eq!(Client::new().get(open.url("/v1/admin/usage")).send().unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(support::client().get(open.url("/v1/admin/usage")).send().unwrap().status(), StatusCode::OK);

    let closed = Datanode::start(&dir.path().join("closed"), &["--protect-metrics", "--protect-openapi"]);
    for path in ["/metrics", "/openapi.json"] {
        assert_eq!(Client::new().get(closed.url(path)).send().unwrap().status(), StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(support::client().get(closed.url(path)).send().unwrap().status(), StatusCode::OK, "{path}");
    }
    assert_eq!(Client::new().get(closed.url("/healthz")).send().unwrap().status(), StatusCode::OK);
}

#[test]
fn bad_root_key_flags_are_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn-datanode"))
        .args(["--data-dir", "/nonexistent/never", "--root-key-id", "AKIA", "--root-key-secret", "short"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--root-key-id"), "{err}");
    assert!(!err.contains("short"), "the secret is not echoed: {err}");
}

/// Every route and method the OpenAPI document describes refuses a caller without credentials
/// (but the four open ones), and lets the root key in: a route added later and documented is
/// covered here without another line.
#[test]
fn every_documented_route_refuses_anonymous_callers() {
    let dir = tempfile::tempdir().unwrap();
    let node = Datanode::start(&dir.path().join("n"), &[]);
    let id = support::client().post(node.url("/v1/blobs")).body("x").send().unwrap().json::<Value>().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let doc: Value = Client::new().get(node.url("/openapi.json")).send().unwrap().json().unwrap();
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object(), "the scheme is described");
    let open = ["/healthz", "/readyz", "/metrics", "/openapi.json"];
    let mut checked = 0;
    for (path, methods) in doc["paths"].as_object().unwrap() {
        let url = node.url(&path.replace("{id}", &id).replace("{partition}", "0").replace("{bucket}", "0"));
        for method in methods.as_object().unwrap().keys() {
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let body = if method == reqwest::Method::PUT { "{\"ttl_seconds\": null}" } else { "" };
            let anonymous = Client::new().request(method.clone(), &url).body(body).send().unwrap().status();
            let keyed = support::client().request(method.clone(), &url).body(body).send().unwrap().status();
            if open.contains(&path.as_str()) {
                assert!(anonymous.is_success(), "{method} {path}: {anonymous}");
                assert!(!path.contains("{id}"));
            } else {
                assert_eq!(anonymous, StatusCode::UNAUTHORIZED, "{method} {path}");
                let secured = &methods[method.as_str().to_lowercase()]["security"];
                assert!(
                    !secured.as_array().is_some_and(|s| s.iter().any(|r| r.as_object().unwrap().is_empty())),
                    "{method} {path} is documented as open"
                );
            }
            assert!(keyed != StatusCode::UNAUTHORIZED && keyed != StatusCode::FORBIDDEN, "{method} {path}: {keyed}");
            checked += 1;
        }
    }
    assert!(checked >= 12, "{checked} routes checked");
}

/// Guesses at one key's secret spread over many client addresses are limited by the key's own
/// budget; other keys, and the key's holder, are not.
#[test]
fn guesses_at_one_key_from_many_addresses_are_limited() {
    let dir = tempfile::tempdir().unwrap();
    let node = Datanode::start(&dir.path().join("n"), &[]);
    let wrong = format!("Bearer {TEST_KEY_ID}.{}", "w".repeat(40));
    // 127.0.0.0/8 is all loopback: each client its own address, each well within its budget.
    let from = |i: u8| Client::builder().local_address(std::net::IpAddr::from([127, 0, 0, 10 + i])).build().unwrap();
    let mut statuses = Vec::new();
    for i in 0..30u8 {
        statuses
            .push(from(i).get(node.url("/v1/admin/usage")).header("authorization", &wrong).send().unwrap().status());
    }
    let limited = statuses.iter().position(|s| *s == StatusCode::TOO_MANY_REQUESTS).expect("limited at some point");
    assert!((15..=25).contains(&limited), "limited after {limited} guesses: {statuses:?}");
    // Another key id from a fresh address: an ordinary 401 (an id's budget says nothing of
    // whether it exists, and is its own).
    let other = format!("Bearer CKOTHERKEY0000000000.{}", "w".repeat(40));
    let r = from(100).get(node.url("/v1/admin/usage")).header("authorization", &other).send().unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // The key's holder passes.
    assert_eq!(support::client().get(node.url("/v1/admin/usage")).send().unwrap().status(), StatusCode::OK);
}
