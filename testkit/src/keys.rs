//! The access key tests authenticate with: a standalone node under test is started with it as
//! its root key (`CAIRN_ROOT_KEY_ID`, `CAIRN_ROOT_KEY_SECRET`), a cluster under test gets it in etcd.

/// An admin key's id (`CK` and 18 of A-Z0-9).
pub const TEST_KEY_ID: &str = "CKTESTROOT0000000000";
/// Its secret (40 letters and digits).
pub const TEST_KEY_SECRET: &str = "testsecrettestsecrettestsecrettestsecret";

/// The `Authorization` header value of the test key.
pub fn authorization() -> String {
    format!("Bearer {TEST_KEY_ID}.{TEST_KEY_SECRET}")
}

/// The environment that makes the test key a standalone node's root key (not flags: a command
/// line is visible to every user of the machine).
pub fn root_key_env() -> [(&'static str, &'static str); 2] {
    [("CAIRN_ROOT_KEY_ID", TEST_KEY_ID), ("CAIRN_ROOT_KEY_SECRET", TEST_KEY_SECRET)]
}
