//! schemathesis, a property-based fuzzer driven by the OpenAPI document, against a standalone
//! datanode: with an access key every documented route answers as documented (no 5xx, documented
//! statuses, content types and bodies; schema-valid requests accepted, invalid ones refused;
//! `ignored_auth`: every route that takes credentials refuses requests without or with wrong
//! ones); without credentials every such route is a 401. A cluster node's replica routes are in
//! tests/cluster.rs.

mod support;

use support::free_port;

#[test]
fn schemathesis_finds_nothing_against_a_standalone_node() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let data = dir.path().join("n");
    // The fuzzer sends wrong credentials by the thousand (ignored_auth): past the default budget
    // they would be 429s, which it does not count as refusals.
    let flags = [
        "--data-dir",
        data.to_str().unwrap(),
        "--volume-size",
        "64MiB",
        "--segment-size",
        "16MiB",
        "--max-blob-size",
        "1MiB",
    ];
    let _node = support::standalone_datanode(&addr, &[&flags[..], &["--auth-failure-burst", "1000000"]].concat());
    let base = format!("http://{addr}");
    let key = format!("Authorization: {}", cairn_testkit::keys::authorization());
    let (ok, report) = support::schemathesis(&base, &[key], &[], 60);
    assert!(ok, "{report}");
    let (ok, report) = support::schemathesis(&base, &[], &[], 20);
    assert!(ok, "without credentials: {report}");
}
