//! Access keys: who may call the blob API, and for what (docs/security.md).
//!
//! A key is an id (public, like an AWS access key id) and a secret shown once, when the key is
//! made. What is stored — in etcd for a cluster, in memory for a standalone node — is the key's
//! scopes and the SHA-256 of its secret, never the secret itself. A client sends both as one
//! bearer token, `Authorization: Bearer <id>.<secret>`; the `Bearer` scheme leaves the header
//! free for other schemes (AWS Signature V4) beside it.
//!
//! Secrets are 40 random alphanumeric characters (≈ 238 bits): no password-hashing function is
//! needed against guessing, one SHA-256 suffices, and comparisons are constant-time.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The header carrying the cluster's node token between datanodes and from the operator (not
/// `Authorization`: that stays the client's, and the Kubernetes API server's pod proxy passes
/// this one on).
pub const NODE_TOKEN_HEADER: &str = "x-cairn-node-token";

/// The stored record's format (absent = 1; a newer one is refused, not misread). A key limited to
/// some partitions is written as format 2, one limited to some S3 buckets as format 3, so that a
/// datanode that does not know the limit refuses the key instead of granting it everywhere; other
/// keys stay format 1.
pub const KEY_FORMAT: u32 = KEY_FORMAT_BUCKETS;
const KEY_FORMAT_UNLIMITED: u32 = 1;
const KEY_FORMAT_PARTITIONS: u32 = 2;
const KEY_FORMAT_BUCKETS: u32 = 3;
/// The most buckets one key is granted (a key record stays small: every datanode holds them all).
pub const MAX_BUCKET_GRANTS: usize = 1000;
/// Key ids: `CK` and 18 characters of `A-Z0-9`.
pub const ID_PREFIX: &str = "CK";
const ID_LEN: usize = 20;
const SECRET_LEN: usize = 40;
const ID_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
/// Names are for people (`cairn keys list`); bounded so a key record stays small.
pub const MAX_NAME_LEN: usize = 128;

pub use cairn_common::scope::Scope;

/// One access key as stored: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessKey {
    #[serde(default = "format_one")]
    pub format: u32,
    pub id: String,
    /// For people: what the key is for.
    pub name: String,
    pub scopes: BTreeSet<Scope>,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    pub created_ms: u64,
    /// The partitions whose blobs the key may touch (and where its new blobs go); `None`: all.
    /// Admin routes ignore it: an admin key limited to partitions is still an admin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<BTreeSet<u32>>,
    /// The S3 buckets the key may use, and what it may do in each (read, write, delete: within
    /// its `scopes`); `None`: every bucket. A key limited to buckets is an S3 key only: the blob
    /// API, whose blobs are in no bucket, refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buckets: Option<BucketGrants>,
}

/// Buckets by name, and the scopes a key has in each.
pub type BucketGrants = BTreeMap<String, BTreeSet<Scope>>;

fn format_one() -> u32 {
    1
}

/// A secret, as the one who made the key gets it once; never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: String) -> Self {
        Self(secret)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Whether `presented` is `expected`: SHA-256 digests compared in constant time (so neither
/// the length nor the first difference shows in the time taken); an empty secret never matches.
pub fn secret_matches(expected: &Secret, presented: &str) -> bool {
    if expected.0.is_empty() || presented.is_empty() {
        return false;
    }
    hash_secret(presented).as_bytes().ct_eq(hash_secret(&expected.0).as_bytes()).into()
}

/// Node tokens: 43 letters and digits, 256 random bits.
pub const NODE_TOKEN_LEN: usize = 43;

/// A new cluster node token.
pub fn new_node_token() -> Secret {
    let mut rng = rand::rng();
    Secret((0..NODE_TOKEN_LEN).map(|_| rng.sample(rand::distr::Alphanumeric) as char).collect())
}

/// Whether `token` has a node token's shape (anything else stored in etcd is ignored).
pub fn is_node_token(token: &str) -> bool {
    token.len() == NODE_TOKEN_LEN && token.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A token for `purpose` derived from `key` (from its secret's digest, so the secret is not
/// needed): stable as long as the key is. A standalone node on a disk agent derives its
/// disk-agent token from its root key this way.
pub fn derived_token(key: &AccessKey, purpose: &str) -> Secret {
    let digest = Sha256::new()
        .chain_update(b"cairn derived token\0")
        .chain_update(purpose.as_bytes())
        .chain_update([0])
        .chain_update(key.secret_sha256.as_bytes())
        .finalize();
    Secret(crate::replica::hex(&digest))
}

/// The secret S3 clients sign with (AWS Signature V4) for a cluster's key: derived from what
/// etcd stores of the key, since SigV4 needs the secret itself on the server, and etcd keeps only
/// a digest of the key's secret. Whoever holds the key's token computes it too (`cairn keys
/// s3-secret`); whoever can read etcd could, as they could take the node token (docs/security.md).
pub fn s3_secret(key: &AccessKey) -> Secret {
    derived_token(key, "s3")
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// Why a key or a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("a key needs at least one scope (read, write, delete, admin)")]
    NoScope,
    #[error("a key limited to partitions needs at least one")]
    NoPartition,
    #[error("a key's name must be 1 to {MAX_NAME_LEN} printable characters")]
    BadName,
    #[error("key format {0} is newer than this build understands")]
    NewerFormat(u32),
    #[error("not a Cairn key id: {0}")]
    BadId(String),
    #[error("malformed bearer token: expected <key id>.<secret>")]
    BadToken,
    #[error("a key limited to buckets needs at least one")]
    NoBucket,
    #[error("a key is granted at most {MAX_BUCKET_GRANTS} buckets")]
    TooManyBuckets,
    #[error("bucket {0:?}: {1}")]
    BadBucket(String, &'static str),
    #[error("bucket {0:?}: {1}")]
    BadGrant(String, String),
    #[error("a key limited to buckets cannot be an admin (an admin may do everything, everywhere)")]
    AdminInBuckets,
    #[error("a key is limited to partitions (blob API) or to buckets (S3), not both")]
    PartitionsAndBuckets,
}

/// A new key id and its secret.
pub fn new_credentials() -> (String, Secret) {
    let mut rng = rand::rng();
    let id: String = ID_PREFIX
        .chars()
        .chain((ID_PREFIX.len()..ID_LEN).map(|_| ID_ALPHABET[rng.random_range(0..ID_ALPHABET.len())] as char))
        .collect();
    let secret: String = (0..SECRET_LEN).map(|_| rng.sample(rand::distr::Alphanumeric) as char).collect();
    (id, Secret(secret))
}

impl AccessKey {
    /// A new key and its secret (shown once: only its hash is kept).
    pub fn generate(name: &str, scopes: BTreeSet<Scope>, created_ms: u64) -> Result<(AccessKey, Secret), AccessError> {
        if scopes.is_empty() {
            return Err(AccessError::NoScope);
        }
        if name.is_empty() || name.chars().count() > MAX_NAME_LEN || name.chars().any(char::is_control) {
            return Err(AccessError::BadName);
        }
        let (id, Secret(secret)) = new_credentials();
        let key = AccessKey {
            format: KEY_FORMAT_UNLIMITED,
            id,
            name: name.to_owned(),
            scopes,
            secret_sha256: hash_secret(&secret),
            created_ms,
            partitions: None,
            buckets: None,
        };
        Ok((key, Secret(secret)))
    }

    /// A key whose id and secret are given (a standalone node's root key from its
    /// environment); `secret` must look like a generated one.
    pub fn from_parts(id: &str, secret: &str, name: &str, scopes: BTreeSet<Scope>) -> Result<AccessKey, AccessError> {
        check_id(id)?;
        if !is_secret(secret) {
            return Err(AccessError::BadToken);
        }
        Ok(AccessKey {
            format: KEY_FORMAT_UNLIMITED,
            id: id.to_owned(),
            name: name.to_owned(),
            scopes,
            secret_sha256: hash_secret(secret),
            created_ms: 0,
            partitions: None,
            buckets: None,
        })
    }

    /// The key limited to `partitions` (`None`: all), with the record format that says so.
    pub fn limited_to(mut self, partitions: Option<BTreeSet<u32>>) -> Result<AccessKey, AccessError> {
        if partitions.as_ref().is_some_and(BTreeSet::is_empty) {
            return Err(AccessError::NoPartition);
        }
        if partitions.is_some() && self.buckets.is_some() {
            return Err(AccessError::PartitionsAndBuckets);
        }
        self.partitions = partitions;
        self.settle_format();
        Ok(self)
    }

    /// The key limited to the buckets of `grants` (`None`: every bucket), each with the scopes
    /// it grants there: read, write or delete, among the key's own.
    pub fn limited_to_buckets(mut self, grants: Option<BucketGrants>) -> Result<AccessKey, AccessError> {
        if let Some(grants) = &grants {
            if grants.is_empty() {
                return Err(AccessError::NoBucket);
            }
            if grants.len() > MAX_BUCKET_GRANTS {
                return Err(AccessError::TooManyBuckets);
            }
            if self.partitions.is_some() {
                return Err(AccessError::PartitionsAndBuckets);
            }
            if self.scopes.contains(&Scope::Admin) {
                return Err(AccessError::AdminInBuckets);
            }
            for (bucket, scopes) in grants {
                if let Some(why) = cairn_common::bucket_name::problem(bucket) {
                    return Err(AccessError::BadBucket(bucket.chars().take(80).collect(), why));
                }
                if scopes.is_empty() {
                    return Err(AccessError::BadGrant(bucket.clone(), "a bucket is granted at least one scope".into()));
                }
                if let Some(scope) = scopes.iter().find(|s| !self.scopes.contains(s)) {
                    return Err(AccessError::BadGrant(
                        bucket.clone(),
                        format!("{scope} is not among the key's scopes ({})", scope_list(&self.scopes)),
                    ));
                }
            }
        }
        self.buckets = grants;
        self.settle_format();
        Ok(self)
    }

    /// The oldest format that carries what the key holds (older builds refuse the limits they
    /// do not know).
    fn settle_format(&mut self) {
        self.format = match (&self.partitions, &self.buckets) {
            (_, Some(_)) => KEY_FORMAT_BUCKETS,
            (Some(_), None) => KEY_FORMAT_PARTITIONS,
            (None, None) => KEY_FORMAT_UNLIMITED,
        };
    }

    /// Whether the key may do `scope` in S3 bucket `bucket` (its grant there, if it has grants;
    /// a grant never goes beyond the key's scopes, nor to admin, whatever a record says).
    pub fn allows_in_bucket(&self, bucket: &str, scope: Scope) -> bool {
        match &self.buckets {
            None => self.allows(scope),
            Some(grants) => {
                scope != Scope::Admin
                    && self.scopes.contains(&scope)
                    && grants.get(bucket).is_some_and(|scopes| scopes.contains(&scope))
            }
        }
    }

    /// Whether ListBuckets shows `bucket` to the key: every bucket to a key with `read`, only
    /// those it may read to a key limited to buckets.
    pub fn sees_bucket(&self, bucket: &str) -> bool {
        self.buckets.is_none() || self.allows_in_bucket(bucket, Scope::Read)
    }

    /// Whether the key may list buckets at all (it sees some of them, or all).
    pub fn lists_buckets(&self) -> bool {
        match &self.buckets {
            None => self.allows(Scope::Read),
            Some(grants) => grants.keys().any(|bucket| self.allows_in_bucket(bucket, Scope::Read)),
        }
    }

    /// Whether the key may touch blobs of `partition`.
    pub fn reaches(&self, partition: u32) -> bool {
        self.partitions.as_ref().is_none_or(|p| p.contains(&partition))
    }

    /// A stored record, checked: a newer format or a foreign id is refused.
    pub fn decode(bytes: &[u8]) -> Result<AccessKey, String> {
        let key: AccessKey = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if key.format > KEY_FORMAT {
            return Err(AccessError::NewerFormat(key.format).to_string());
        }
        check_id(&key.id).map_err(|e| e.to_string())?;
        Ok(key)
    }

    /// Whether `secret` is this key's, in time independent of where they differ.
    pub fn verify(&self, secret: &str) -> bool {
        hash_secret(secret).as_bytes().ct_eq(self.secret_sha256.as_bytes()).into()
    }

    /// Whether the key may do what `scope` stands for.
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope)
    }
}

/// Scopes as `read,write`.
pub fn scope_list(scopes: &BTreeSet<Scope>) -> String {
    scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")
}

/// A grant as a person writes it (`cairn keys create --bucket`): `NAME` (the key's scopes) or
/// `NAME=read,write`.
pub fn parse_grant(text: &str, key_scopes: &BTreeSet<Scope>) -> Result<(String, BTreeSet<Scope>), String> {
    match text.split_once('=') {
        None => Ok((text.to_owned(), key_scopes.clone())),
        Some((bucket, scopes)) => {
            let scopes = scopes.split(',').map(|s| s.trim().parse::<Scope>()).collect::<Result<BTreeSet<_>, _>>()?;
            Ok((bucket.to_owned(), scopes))
        }
    }
}

/// An admin key whose token is kept in the file `path` (one line, readable by its owner only): the
/// one the file holds, else a new one made there (a standalone node's root key, `cairn local up`'s
/// admin key). The key, its secret (an S3 client signs with it), and whether it was just made.
pub fn admin_key_file(path: &std::path::Path, name: &str) -> anyhow::Result<(AccessKey, Secret, bool)> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let admin = || [Scope::Admin].into_iter().collect();
    match std::fs::read_to_string(path) {
        Ok(text) => {
            if std::fs::metadata(path)?.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %path.display(), "a key's token file is readable by others: chmod 600 it");
            }
            let (id, secret) = parse_token(text.trim())
                .map_err(|e| anyhow::anyhow!("{}: {e} (delete it to have a new key made)", path.display()))?;
            Ok((AccessKey::from_parts(id, secret, name, admin())?, Secret::new(secret.to_string()), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
            let (key, secret) = AccessKey::generate(name, admin(), now_ms)?;
            let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
            file.write_all(format!("{}\n", token(&key.id, &secret)).as_bytes())?;
            file.sync_all()?;
            Ok((key, secret, true))
        }
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

/// The bearer token of a key: `<id>.<secret>`.
pub fn token(id: &str, secret: &Secret) -> String {
    format!("{id}.{}", secret.0)
}

/// A bearer token split into key id and secret (both checked for shape only).
pub fn parse_token(token: &str) -> Result<(&str, &str), AccessError> {
    let (id, secret) = token.split_once('.').ok_or(AccessError::BadToken)?;
    check_id(id).map_err(|_| AccessError::BadToken)?;
    if !is_secret(secret) {
        return Err(AccessError::BadToken);
    }
    Ok((id, secret))
}

/// A key id's shape: `CK` and 18 of `A-Z0-9`.
pub fn check_id(id: &str) -> Result<(), AccessError> {
    let ok = id.len() == ID_LEN && id.starts_with(ID_PREFIX) && id.bytes().all(|b| ID_ALPHABET.contains(&b));
    if ok {
        Ok(())
    } else {
        Err(AccessError::BadId(format!("{:?}", id.chars().take(32).collect::<String>())))
    }
}

fn is_secret(secret: &str) -> bool {
    secret.len() == SECRET_LEN && secret.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// SHA-256 of a secret, hex: what a key record keeps.
pub fn hash_secret(secret: &str) -> String {
    crate::replica::hex(&Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scopes(list: &[Scope]) -> BTreeSet<Scope> {
        list.iter().copied().collect()
    }

    #[test]
    fn a_generated_key_verifies_its_own_secret_only() {
        let (key, secret) = AccessKey::generate("app", scopes(&[Scope::Read]), 1).unwrap();
        assert!(key.verify(secret.expose()));
        let (_, other) = AccessKey::generate("app", scopes(&[Scope::Read]), 1).unwrap();
        assert!(!key.verify(other.expose()));
        assert!(!key.verify(""));
        // The record holds no secret, and Debug prints none.
        let stored = serde_json::to_string(&key).unwrap();
        assert!(!stored.contains(secret.expose()));
        assert!(!format!("{secret:?}").contains(secret.expose()));
        let token = token(&key.id, &secret);
        assert_eq!(parse_token(&token).unwrap(), (key.id.as_str(), secret.expose()));
        assert_eq!(AccessKey::decode(stored.as_bytes()).unwrap(), key);
    }

    #[test]
    fn scopes_allow_what_they_name_and_admin_everything() {
        let (reader, _) = AccessKey::generate("r", scopes(&[Scope::Read]), 0).unwrap();
        assert!(reader.allows(Scope::Read));
        assert!(!reader.allows(Scope::Write) && !reader.allows(Scope::Delete) && !reader.allows(Scope::Admin));
        let (admin, _) = AccessKey::generate("a", scopes(&[Scope::Admin]), 0).unwrap();
        for scope in [Scope::Read, Scope::Write, Scope::Delete, Scope::Admin] {
            assert!(admin.allows(scope));
        }
        assert_eq!(AccessKey::generate("x", BTreeSet::new(), 0).unwrap_err(), AccessError::NoScope);
        assert_eq!(AccessKey::generate("", scopes(&[Scope::Read]), 0).unwrap_err(), AccessError::BadName);
        assert_eq!(AccessKey::generate("a\nb", scopes(&[Scope::Read]), 0).unwrap_err(), AccessError::BadName);
        // The bound counts characters, not bytes: 128 two-byte characters are a name, 129 are not.
        for (name, ok) in [
            ("x".repeat(MAX_NAME_LEN), true),
            ("é".repeat(MAX_NAME_LEN), true),
            ("é".repeat(MAX_NAME_LEN + 1), false),
            ("x".repeat(MAX_NAME_LEN + 1), false),
        ] {
            assert_eq!(
                AccessKey::generate(&name, scopes(&[Scope::Read]), 0).is_ok(),
                ok,
                "{} characters",
                name.chars().count()
            );
        }
    }

    #[test]
    fn a_key_limited_to_partitions_is_a_record_older_builds_refuse() {
        let (key, _) = AccessKey::generate("t", scopes(&[Scope::Read]), 0).unwrap();
        assert_eq!(key.format, 1);
        assert!(key.reaches(7));
        let limited = key.clone().limited_to(Some([1, 2].into())).unwrap();
        assert_eq!(limited.format, 2, "a build that knows no reach refuses format 2");
        assert!(limited.reaches(2) && !limited.reaches(3));
        let text = serde_json::to_vec(&limited).unwrap();
        assert_eq!(AccessKey::decode(&text).unwrap(), limited);
        assert_eq!(key.clone().limited_to(Some(BTreeSet::new())).unwrap_err(), AccessError::NoPartition);
        assert!(!String::from_utf8(serde_json::to_vec(&key).unwrap()).unwrap().contains("partitions"));
    }

    #[test]
    fn a_key_limited_to_buckets_grants_each_its_own_scopes() {
        let (key, _) = AccessKey::generate("t", scopes(&[Scope::Read, Scope::Write]), 0).unwrap();
        assert!(key.allows_in_bucket("any", Scope::Write) && key.sees_bucket("any"));
        let grants: BucketGrants = [
            ("photos".to_owned(), scopes(&[Scope::Read, Scope::Write])),
            ("shared".to_owned(), scopes(&[Scope::Read])),
        ]
        .into();
        let limited = key.clone().limited_to_buckets(Some(grants.clone())).unwrap();
        assert_eq!(limited.format, 3, "a build that knows no bucket grants refuses format 3");
        assert!(limited.allows_in_bucket("photos", Scope::Write) && limited.allows_in_bucket("shared", Scope::Read));
        assert!(!limited.allows_in_bucket("shared", Scope::Write));
        assert!(!limited.allows_in_bucket("other", Scope::Read) && !limited.sees_bucket("other"));
        assert!(limited.sees_bucket("shared") && limited.lists_buckets());
        let writer = AccessKey::generate("w", scopes(&[Scope::Write]), 0).unwrap().0;
        let writer = writer.limited_to_buckets(Some([("drop".to_owned(), scopes(&[Scope::Write]))].into())).unwrap();
        assert!(!writer.lists_buckets() && !writer.sees_bucket("drop"), "listing buckets is reading");
        // A record granting more than the key's scopes (written by hand) grants no more.
        let mut forged = limited.clone();
        forged.buckets.as_mut().unwrap().insert("photos".into(), scopes(&[Scope::Delete, Scope::Admin]));
        assert!(!forged.allows_in_bucket("photos", Scope::Delete) && !forged.allows_in_bucket("photos", Scope::Admin));
        let text = serde_json::to_vec(&limited).unwrap();
        assert_eq!(AccessKey::decode(&text).unwrap(), limited);
        // Back to every bucket: format 1 again.
        assert_eq!(limited.clone().limited_to_buckets(None).unwrap().format, 1);

        let refused = |k: &AccessKey, grants: BucketGrants| k.clone().limited_to_buckets(Some(grants)).unwrap_err();
        assert_eq!(refused(&key, BucketGrants::new()), AccessError::NoBucket);
        let one = |bucket: &str, list: &[Scope]| -> BucketGrants { [(bucket.to_owned(), scopes(list))].into() };
        assert!(matches!(refused(&key, one("Bad_Name", &[Scope::Read])), AccessError::BadBucket(..)));
        assert!(matches!(refused(&key, one("photos", &[])), AccessError::BadGrant(..)));
        let beyond = refused(&key, one("photos", &[Scope::Delete]));
        assert!(beyond.to_string().contains("delete is not among the key's scopes (read,write)"), "{beyond}");
        let (admin, _) = AccessKey::generate("a", scopes(&[Scope::Admin]), 0).unwrap();
        assert_eq!(refused(&admin, one("photos", &[Scope::Admin])), AccessError::AdminInBuckets);
        let tenant = key.clone().limited_to(Some([1].into())).unwrap();
        assert_eq!(refused(&tenant, one("photos", &[Scope::Read])), AccessError::PartitionsAndBuckets);
        assert_eq!(limited.clone().limited_to(Some([1].into())).unwrap_err(), AccessError::PartitionsAndBuckets);
        let many: BucketGrants =
            (0..=MAX_BUCKET_GRANTS).map(|i| (format!("bucket-{i}"), scopes(&[Scope::Read]))).collect();
        assert_eq!(refused(&key, many), AccessError::TooManyBuckets);
    }

    #[test]
    fn grants_parse_as_people_write_them() {
        let own = scopes(&[Scope::Read, Scope::Write]);
        assert_eq!(parse_grant("photos", &own).unwrap(), ("photos".to_owned(), own.clone()));
        assert_eq!(parse_grant("logs=read", &own).unwrap(), ("logs".to_owned(), scopes(&[Scope::Read])));
        assert_eq!(
            parse_grant("logs=read, write", &own).unwrap(),
            ("logs".to_owned(), scopes(&[Scope::Read, Scope::Write]))
        );
        assert!(parse_grant("logs=", &own).unwrap_err().contains("unknown scope"));
        assert!(parse_grant("logs=owner", &own).unwrap_err().contains("unknown scope"));
    }

    #[test]
    fn a_record_of_a_newer_format_is_refused() {
        let (key, _) = AccessKey::generate("app", scopes(&[Scope::Read]), 1).unwrap();
        let mut value = serde_json::to_value(&key).unwrap();
        value["format"] = (KEY_FORMAT + 1).into();
        assert!(AccessKey::decode(value.to_string().as_bytes()).unwrap_err().contains("newer"));
        value["format"] = 1.into();
        value["id"] = "../../config".into();
        assert!(AccessKey::decode(value.to_string().as_bytes()).is_err());
    }

    proptest! {
        /// Whatever a client sends as a token, parsing never panics, and only the exact shape
        /// `CK` + 18 of A-Z0-9, a dot, 40 alphanumerics is accepted.
        #[test]
        fn any_token_parses_or_is_refused(token in ".{0,80}") {
            if let Ok((id, secret)) = parse_token(&token) {
                prop_assert_eq!(format!("{id}.{secret}"), token.clone());
                prop_assert!(check_id(id).is_ok());
                prop_assert_eq!(secret.len(), SECRET_LEN);
            }
        }

        #[test]
        fn tokens_of_the_right_shape_parse(id in "CK[A-Z0-9]{18}", secret in "[A-Za-z0-9]{40}") {
            let token = format!("{id}.{secret}");
            prop_assert_eq!(parse_token(&token).unwrap(), (id.as_str(), secret.as_str()));
            let longer = format!("{token}x");
            prop_assert!(parse_token(&longer).is_err());
            prop_assert!(parse_token(&token[1..]).is_err());
        }
    }
}
