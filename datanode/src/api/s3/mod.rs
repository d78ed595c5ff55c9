//! The S3-compatible API (docs/s3.md): AWS Signature V4 with Cairn's access keys, buckets, and
//! objects stored as blobs named by name records (`engine::names`).
//!
//! - [`sigv4`], [`chunked`], [`checksum`]: what a request proves and carries.
//! - [`model`]: what is stored for a bucket and an object.
//! - [`buckets`], [`objects`]: the operations.
//! - [`error`]: S3's error codes, the one place they become HTTP; [`xml`]: S3's documents.
//!
//! Every request passes [`handle`]: addressing (path-style, or virtual-host-style under the
//! configured domain), authentication, the key's scope, then the operation.

pub mod buckets;
pub mod checksum;
pub mod chunked;
pub mod error;
pub mod forward;
pub mod model;
pub mod multipart;
pub mod objects;
pub mod sigv4;
pub mod xml;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use cairn_cluster::access::{AccessKey, Scope, Secret};
use cairn_cluster::AuthMode;
use percent_encoding::percent_decode_str;

use crate::front::{Front, FrontError};
use error::S3Error;

/// A key the S3 front can check signatures of: its secret and what it may do.
#[derive(Clone)]
pub struct S3Key {
    pub secret: Secret,
    pub key: Arc<AccessKey>,
}

/// Who signed a request, and so what it may do: the one place S3 requests are authorized.
#[derive(Clone)]
pub enum Access {
    /// Unsigned, on a node without auth: objects are anyone's; buckets stay the admin's.
    Anyone,
    Key(Arc<AccessKey>),
}

impl Access {
    /// Whether the request may do `scope` in `bucket` (`None`: the service, i.e. ListBuckets).
    pub fn check(&self, bucket: Option<&str>, scope: Scope) -> Result<(), S3Error> {
        let allowed = match (self, bucket) {
            (Access::Anyone, _) => scope != Scope::Admin,
            // The service is ListBuckets: a key limited to buckets lists those it may read.
            (Access::Key(key), None) if key.buckets.is_some() => scope == Scope::Read && key.lists_buckets(),
            (Access::Key(key), None) => key.allows(scope),
            (Access::Key(key), Some(bucket)) => key.allows_in_bucket(bucket, scope),
        };
        match (allowed, bucket) {
            (true, _) => Ok(()),
            (false, _) if scope == Scope::Admin => {
                Err(S3Error::access_denied("access denied: creating and deleting buckets needs an admin key"))
            }
            (false, Some(bucket)) => Err(S3Error {
                resource: Some(bucket.to_owned()),
                ..S3Error::access_denied(format!("access denied: the key has no {scope} permission in bucket {bucket}"))
            }),
            (false, None) => Err(S3Error::access_denied(format!(
                "access denied: the key lacks the {scope} scope this operation needs"
            ))),
        }
    }

    /// Whether ListBuckets shows `bucket`.
    pub fn sees_bucket(&self, bucket: &str) -> bool {
        match self {
            Access::Anyone => true,
            Access::Key(key) => key.sees_bucket(bucket),
        }
    }
}

/// The S3 front's settings.
#[derive(Clone)]
pub struct S3Options {
    /// The region requests are signed for (and `GetBucketLocation` answers).
    pub region: String,
    /// Virtual-host-style addressing: a request to `<bucket>.<domain>` names the bucket.
    pub domain: Option<String>,
    /// `AuthMode::None`: unsigned requests are served (a playground). A cluster's mode is its
    /// config's.
    pub auth: AuthMode,
    /// A standalone node's keys by id (its root key); a cluster's are its etcd's (see
    /// [`S3State::key`]).
    pub keys: BTreeMap<String, S3Key>,
    /// Bytes of an object stored per blob (and held in memory per upload at once).
    pub piece_bytes: u64,
    /// Objects up to this size are kept inside their name record: one write, one read.
    pub inline_bytes: u64,
    /// The largest object a single PutObject takes (S3's limit is 5 GiB), and the largest part.
    pub max_object_bytes: u64,
    /// The largest blob: a multipart object's record, which lists its pieces, fits in one.
    pub max_blob_bytes: u64,
}

pub struct S3State {
    pub front: Front,
    pub options: S3Options,
    /// Bucket creation and deletion exclude writes of objects (a bucket is deleted only empty,
    /// and no object is written into a bucket being deleted).
    pub buckets_lock: tokio::sync::RwLock<()>,
    /// Buckets as last read or written. A standalone node is the only writer of its bucket
    /// records, and changes them under `buckets_lock` (see [`buckets::find`]).
    pub buckets: std::sync::Mutex<BucketCache>,
    /// The node's memory for request bodies, shared with the blob API (`--upload-buffer`).
    pub uploads: Arc<crate::api::upload::UploadBudget>,
    /// One lock per name being committed or deleted (`objects::commit`).
    pub name_locks: NamedLocks,
    /// One lock per multipart upload being changed ([`multipart`]).
    pub upload_locks: NamedLocks,
}

/// Locks by name, made when first asked for and gone when no one holds or waits for them.
#[derive(Default)]
pub struct NamedLocks {
    locks: std::sync::Mutex<NamedLocksInner>,
}

#[derive(Default)]
struct NamedLocksInner {
    map: std::collections::HashMap<String, std::sync::Weak<tokio::sync::Mutex<()>>>,
    /// Size at which unused entries are swept (double the live ones at the last sweep).
    sweep_at: usize,
}

impl NamedLocks {
    pub async fn lock(&self, name: String) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut inner = self.locks.lock().expect("named locks");
            if inner.map.len() >= inner.sweep_at.max(1024) {
                inner.map.retain(|_, lock| lock.strong_count() > 0);
                inner.sweep_at = inner.map.len() * 2;
            }
            match inner.map.get(&name).and_then(std::sync::Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    inner.map.insert(name, Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }
}

impl S3State {
    pub fn new(front: Front, options: S3Options, uploads: Arc<crate::api::upload::UploadBudget>) -> Arc<Self> {
        Arc::new(S3State {
            front,
            options,
            buckets_lock: tokio::sync::RwLock::new(()),
            buckets: Default::default(),
            uploads,
            name_locks: NamedLocks::default(),
            upload_locks: NamedLocks::default(),
        })
    }

    /// The key with this id: a standalone node's own, or one of the cluster's, whose S3 secret
    /// is derived from it (`access::s3_secret`). A key limited to some partitions has none: an
    /// object's partition is its key's hash, not the key holder's choice.
    pub fn key(&self, id: &str) -> Option<S3Key> {
        match self.front.cluster() {
            None => self.options.keys.get(id).cloned(),
            Some(cluster) => {
                let snapshot = cluster.snapshot();
                let key = snapshot.keys.get(id).filter(|k| k.partitions.is_none())?;
                Some(S3Key { secret: cairn_cluster::access::s3_secret(key), key: Arc::new(key.clone()) })
            }
        }
    }

    /// Bytes of an object per stored blob: `--s3-piece-size`, but no more than the largest blob
    /// the front takes now (a cluster's config may allow less than this node's flag).
    pub fn piece_bytes(&self) -> u64 {
        self.options.piece_bytes.min(self.front.max_blob_bytes(self.options.max_blob_bytes)).max(1)
    }

    /// Whether requests must be signed: a standalone node's setting, or the cluster's.
    pub fn auth_mode(&self) -> AuthMode {
        match self.front.cluster() {
            None => self.options.auth,
            Some(cluster) => cluster.config().map(|c| c.auth).unwrap_or_default(),
        }
    }
}

/// The S3 API's routes (its own port).
pub fn router(state: Arc<S3State>) -> Router {
    Router::new().fallback(handle).with_state(state)
}

/// A request another node of the cluster passed on to this one, the coordinator of the key
/// it writes (`forward`): served as if it had come here, never passed on again.
pub async fn handle_forwarded(State(state): State<Arc<S3State>>, mut request: Request) -> Response {
    let uri = request.headers_mut().remove(forward::URI_HEADER);
    match uri.as_ref().and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()) {
        Some(uri) => *request.uri_mut() = uri,
        None => return S3Error::invalid_argument("a forwarded request's path is missing or malformed").into_response(),
    }
    let headers = request.headers_mut();
    match headers.remove(forward::HOST_HEADER) {
        Some(host) => {
            headers.insert(header::HOST, host);
        }
        None => {
            headers.remove(header::HOST);
        }
    }
    request.extensions_mut().insert(forward::Forwarded);
    handle(State(state), request).await
}

/// Bucket records as last read or written, and a generation that every creation and deletion
/// moves: a lookup that raced one of them does not put what it read into the cache.
#[derive(Default)]
pub struct BucketCache {
    pub records: std::collections::HashMap<String, (model::BucketRecord, std::time::Instant)>,
    pub generation: u64,
}

impl BucketCache {
    /// Forgets `name` and moves the generation (a creation or deletion of it).
    pub fn changed(&mut self, name: &str) {
        self.records.remove(name);
        self.generation += 1;
    }
}

/// What a request addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Service,
    Bucket(String),
    Object { bucket: String, key: String },
}

impl Target {
    /// The bucket addressed (`None`: the service).
    pub fn bucket(&self) -> Option<&str> {
        match self {
            Target::Service => None,
            Target::Bucket(bucket) | Target::Object { bucket, .. } => Some(bucket),
        }
    }
}

/// A request as the operations see it: authenticated, addressed, its query decoded.
pub struct S3Request {
    pub method: Method,
    pub target: Target,
    pub query: Vec<(String, String)>,
    pub headers: HeaderMap,
    pub body: Body,
    /// The checked signature (`None`: anonymous, on a node without auth).
    pub signature: Option<sigv4::Verified>,
    /// What the signer may do (checked once for the target before the operation is served).
    pub access: Access,
}

impl S3Request {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn has_param(&self, name: &str) -> bool {
        self.query.iter().any(|(k, _)| k == name)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn handle(State(state): State<Arc<S3State>>, request: Request) -> Response {
    let is_head = request.method() == Method::HEAD;
    // A request refused before its body was read leaves the body on the connection, where it
    // would be read as the start of the next request: such a connection is closed.
    let has_body = request.headers().contains_key(header::TRANSFER_ENCODING)
        || request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim() != "0");
    let mut response = match serve(&state, request).await {
        Ok(response) => response,
        Err(e) => {
            if e.status.is_server_error() && e.status != StatusCode::NOT_IMPLEMENTED {
                tracing::error!(code = e.code, error = %e.message, "S3 request failed");
            }
            e.into_response()
        }
    };
    if is_head {
        // A HEAD answer has headers only, errors included (S3 sends no body).
        *response.body_mut() = Body::empty();
    }
    if has_body && !response.status().is_success() {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let headers = response.headers_mut();
    headers.insert("x-amz-request-id", HeaderValue::from_str(&request_id()).expect("hex"));
    headers.insert(header::SERVER, HeaderValue::from_static("Cairn"));
    response
}

fn request_id() -> String {
    format!("{:016X}", rand::random::<u64>())
}

async fn serve(state: &Arc<S3State>, request: Request) -> Result<Response, S3Error> {
    let forwarded = request.extensions().get::<forward::Forwarded>().is_some();
    let (parts, body) = request.into_parts();
    let query = sigv4::parse_query(parts.uri.query())?;
    let raw_path = parts.uri.path();
    let host = parts.headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let target = target_of(raw_path, host, state.options.domain.as_deref())?;
    let signed = authenticate(state, &parts.method, raw_path, &query, &parts.headers)?;
    let access = match &signed {
        Some((_, key)) => Access::Key(key.key.clone()),
        None => Access::Anyone,
    };
    access.check(target.bucket(), scope_of(&target, &parts.method, &query))?;
    // A copy (CopyObject, UploadPartCopy) reads its source: the source's bucket must allow it.
    if parts.method == Method::PUT && parts.headers.contains_key("x-amz-copy-source") {
        if let Target::Object { .. } = target {
            let (source_bucket, _) = objects::copy_source(&parts.headers)?;
            access.check(Some(&source_bucket), Scope::Read)?;
        }
    }
    // On a cluster, a write is served by the coordinator of the name it writes.
    if !forwarded {
        if let Some(coordinator) = forward::coordinator_of(state, &target, &parts.method).await? {
            tracing::debug!(%coordinator, path = raw_path, "an S3 write passed on to its coordinator");
            let answer = forward::forward(state, &coordinator, parts, body).await;
            if let Target::Bucket(name) = &target {
                // What this node cached of the bucket is not what the coordinator made of it.
                state.buckets.lock().expect("bucket cache").changed(name);
            }
            return answer;
        }
    }
    if parts.method != Method::GET && parts.method != Method::HEAD {
        tracing::debug!(path = raw_path, forwarded, "an S3 write served here");
    }
    let signature = signed.map(|(verified, _)| verified);
    let request = S3Request { method: parts.method, target, query, headers: parts.headers, body, signature, access };
    match &request.target {
        Target::Service => buckets::service(state, request).await,
        Target::Bucket(_) => buckets::bucket(state, request).await,
        Target::Object { .. } => objects::object(state, request).await,
    }
}

/// The scope an operation needs: reads read, writes write, deletes delete; creating and
/// deleting buckets is the admin's.
fn scope_of(target: &Target, method: &Method, query: &[(String, String)]) -> Scope {
    let has_param = |name: &str| query.iter().any(|(k, _)| k == name);
    match (target, method) {
        (_, m) if m == Method::GET || m == Method::HEAD => Scope::Read,
        (Target::Bucket(_), m) if m == Method::PUT || m == Method::DELETE => Scope::Admin,
        (Target::Bucket(_), m) if m == Method::POST && has_param("delete") => Scope::Delete,
        // Aborting an upload deletes no object: the writer's, as uploading is.
        (Target::Object { .. }, m) if m == Method::DELETE && has_param("uploadId") => Scope::Write,
        (_, m) if m == Method::DELETE => Scope::Delete,
        (Target::Object { .. }, _) => Scope::Write,
        _ => Scope::Admin,
    }
}

/// The request's signature checked, and the key that made it (`None`: unsigned, where allowed).
fn authenticate(
    state: &S3State,
    method: &Method,
    raw_path: &str,
    query: &[(String, String)],
    headers: &HeaderMap,
) -> Result<Option<(sigv4::Verified, S3Key)>, S3Error> {
    let Some(presented) = sigv4::presented(headers, query)? else {
        return match state.auth_mode() {
            AuthMode::None => Ok(None),
            AuthMode::Keys => {
                Err(S3Error::access_denied("access denied: sign the request (AWS Signature V4) with an access key"))
            }
        };
    };
    let key = state.key(&presented.key_id).ok_or_else(|| {
        S3Error::invalid_access_key_id("the AWS access key id you provided does not exist in our records")
    })?;
    let parts = sigv4::RequestParts { method, raw_path, query, headers };
    let verified = sigv4::verify(&presented, key.secret.expose(), &state.options.region, &parts, chrono::Utc::now())?;
    Ok(Some((verified, key)))
}

/// Path-style `/<bucket>/<key>`, or virtual-host-style `<bucket>.<domain>` with the key the
/// whole path. The key is percent-decoded once.
fn target_of(raw_path: &str, host: Option<&str>, domain: Option<&str>) -> Result<Target, S3Error> {
    let decode = |s: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| S3Error::invalid_argument("the request path is not UTF-8 once decoded"))
    };
    let path = raw_path.strip_prefix('/').unwrap_or(raw_path);
    let host = host.map(|h| {
        h.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())).map_or(h, |(name, _)| name)
    });
    if let (Some(host), Some(domain)) = (host, domain) {
        if let Some(bucket) = host.strip_suffix(domain).and_then(|b| b.strip_suffix('.')).filter(|b| !b.is_empty()) {
            let bucket = bucket.to_ascii_lowercase();
            return Ok(if path.is_empty() {
                Target::Bucket(bucket)
            } else {
                Target::Object { bucket, key: decode(path)? }
            });
        }
    }
    match path.split_once('/') {
        None if path.is_empty() => Ok(Target::Service),
        None => Ok(Target::Bucket(decode(path)?)),
        Some((bucket, "")) => Ok(Target::Bucket(decode(bucket)?)),
        Some((bucket, key)) => Ok(Target::Object { bucket: decode(bucket)?, key: decode(key)? }),
    }
}

impl From<FrontError> for S3Error {
    fn from(e: FrontError) -> Self {
        use crate::cluster::router::RouteError;
        use crate::engine::VolumeError;
        match e {
            e if e.is_no_room() => S3Error {
                status: StatusCode::INSUFFICIENT_STORAGE,
                code: "InsufficientStorage",
                message: "no room is left to store this object".into(),
                resource: None,
            },
            FrontError::Volume(e @ VolumeError::TooLarge { .. }) => S3Error::entity_too_large(e.to_string()),
            FrontError::Volume(VolumeError::Paused { reason, .. }) => S3Error::slow_down(reason),
            FrontError::Volume(e @ (VolumeError::Failed(_) | VolumeError::Closed)) => {
                S3Error::service_unavailable(e.to_string())
            }
            FrontError::Route(e @ RouteError::NoQuorum(_)) => S3Error::service_unavailable(e.to_string()),
            FrontError::Unsupported(m) => S3Error::not_implemented(m),
            other => S3Error::internal(other.to_string()),
        }
    }
}

/// An XML document as a 200 response.
pub fn xml_response<T: serde::Serialize>(value: &T) -> Response {
    let mut response = (StatusCode::OK, xml::document(value)).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/xml"));
    response
}

/// Reads a small body (an XML request) whole, signed payload checked.
pub async fn small_body(request: S3Request) -> Result<bytes::Bytes, S3Error> {
    let mut pieces = objects::BodyReader::new(&request, xml::MAX_REQUEST_BYTES as u64)?;
    let mut out = bytes::BytesMut::new();
    let mut body = request.body.into_data_stream();
    while let Some(data) = pieces.next(&mut body).await? {
        out.extend_from_slice(&data);
    }
    pieces.finish()?;
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_named_lock_excludes_its_holders_only_and_is_forgotten_when_unused() {
        let locks = NamedLocks::default();
        let a = locks.lock("a".into()).await;
        // Another name: not blocked.
        let b = locks.lock("b".into()).await;
        // The same name waits for its holder.
        let again = tokio::time::timeout(std::time::Duration::from_millis(50), locks.lock("a".into())).await;
        assert!(again.is_err(), "a second holder of one name");
        drop(a);
        let a = locks.lock("a".into()).await;
        drop((a, b));
        // Unused entries are swept once the map grows.
        for i in 0..3000 {
            drop(locks.lock(format!("n{i}")).await);
        }
        assert!(locks.locks.lock().unwrap().map.len() < 2100, "unused locks are swept");
    }

    #[test]
    fn path_style_and_virtual_host_style_name_the_same_things() {
        let t = |path, host| target_of(path, host, Some("s3.example.com")).unwrap();
        assert_eq!(t("/", None), Target::Service);
        assert_eq!(t("/b", None), Target::Bucket("b".into()));
        assert_eq!(t("/b/", None), Target::Bucket("b".into()));
        assert_eq!(t("/b/a/b%20c/", None), Target::Object { bucket: "b".into(), key: "a/b c/".into() });
        assert_eq!(t("/b//x", None), Target::Object { bucket: "b".into(), key: "/x".into() });
        assert_eq!(t("/", Some("b.s3.example.com:9000")), Target::Bucket("b".into()));
        assert_eq!(t("/k%2Fey", Some("b.s3.example.com")), Target::Object { bucket: "b".into(), key: "k/ey".into() });
        // The domain itself, or another host: path-style.
        assert_eq!(t("/b/k", Some("s3.example.com")), Target::Object { bucket: "b".into(), key: "k".into() });
        assert_eq!(t("/b/k", Some("127.0.0.1:9000")), Target::Object { bucket: "b".into(), key: "k".into() });
        assert!(target_of("/b/%FF", None, None).is_err());
    }
}
