//! Bucket operations: ListBuckets, CreateBucket, DeleteBucket, HeadBucket, GetBucketLocation,
//! GetBucketVersioning, ListObjectsV2, ListObjects, DeleteObjects.
//!
//! A bucket is a name record in [`model::BUCKET_SPACE`] on the front's first partition; a
//! listing merges the sorted name ranges of the bucket's partitions.

use std::sync::Arc;

use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};

use super::error::S3Error;
use super::model::{self, BucketRecord, BUCKET_SPACE};
use super::objects;
use super::{small_body, xml, xml_response, S3Request, S3State, Target};
use crate::engine::names::{self, NameRecord};
use crate::engine::now_ms;

/// S3's most keys per listing page, and most keys per DeleteObjects.
const MAX_KEYS: usize = 1000;
pub const OWNER_ID: &str = "cairn";

/// How `encoding-type=url` encodes a key: everything but the unreserved characters and `/`.
const URL_KEY: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~').remove(b'/');

/// The partition bucket records live in: the front's first, fixed for the node's life.
pub async fn bucket_partition(state: &Arc<S3State>) -> Result<u32, S3Error> {
    state
        .front
        .name_partitions()?
        .first()
        .copied()
        .ok_or_else(|| S3Error::service_unavailable("this node has no partition"))
}

/// The bucket named `name`, or NoSuchBucket. A record read while the bucket was being created
/// or deleted is answered but not cached (the generation moved), so the cache never holds a
/// bucket that is gone. On a cluster, other nodes create and delete buckets too: a cached record
/// is taken for [`CLUSTER_BUCKET_TTL`] only.
pub async fn find(state: &Arc<S3State>, name: &str) -> Result<BucketRecord, S3Error> {
    let ttl = if state.front.cluster().is_some() { CLUSTER_BUCKET_TTL } else { std::time::Duration::MAX };
    let generation = {
        let cache = state.buckets.lock().expect("bucket cache");
        if let Some((record, at)) = cache.records.get(name) {
            if at.elapsed() < ttl {
                return Ok(record.clone());
            }
        }
        cache.generation
    };
    let record = lookup(state, name).await?.map(|(_, record)| record).ok_or_else(|| S3Error::no_such_bucket(name))?;
    let mut cache = state.buckets.lock().expect("bucket cache");
    if cache.generation == generation {
        cache.records.insert(name.to_string(), (record.clone(), std::time::Instant::now()));
    }
    Ok(record)
}

/// How long a cluster node takes a bucket it read as still there: a bucket deleted through
/// another node may take new objects here for that long (docs/s3.md).
pub const CLUSTER_BUCKET_TTL: std::time::Duration = std::time::Duration::from_secs(1);

async fn lookup(state: &Arc<S3State>, name: &str) -> Result<Option<(u128, BucketRecord)>, S3Error> {
    let partition = bucket_partition(state).await?;
    let Some((_, version, record)) = objects::current_record(state, partition, BUCKET_SPACE, name).await? else {
        return Ok(None);
    };
    Ok(Some((version, model::decode(&record.body)?)))
}

/// `GET /`: ListBuckets.
pub async fn service(state: &Arc<S3State>, request: S3Request) -> Result<Response, S3Error> {
    if request.method != Method::GET {
        return Err(S3Error::method_not_allowed("the specified method is not allowed against this resource"));
    }
    let partition = bucket_partition(state).await?;
    let mut buckets = Vec::new();
    let mut from = String::new();
    loop {
        let page = state.front.current_names(&[partition], BUCKET_SPACE, &from, true, "", MAX_KEYS).await?;
        let full = page.len() == MAX_KEYS;
        for name in page {
            from = name.name.clone();
            if !request.access.sees_bucket(&name.name) {
                continue;
            }
            buckets.push(BucketXml { name: name.name, creation_date: xml::timestamp(names::version_ms(name.version)) });
        }
        if !full {
            break;
        }
    }
    Ok(xml_response(&ListAllMyBucketsResult {
        xmlns: xml::NAMESPACE,
        owner: Owner::cairn(),
        buckets: BucketsXml { bucket: buckets },
    }))
}

/// Requests to a bucket.
pub async fn bucket(state: &Arc<S3State>, request: S3Request) -> Result<Response, S3Error> {
    let Target::Bucket(name) = request.target.clone() else { unreachable!("a bucket request") };
    for unsupported in [
        "acl",
        "policy",
        "cors",
        "lifecycle",
        "tagging",
        "website",
        "logging",
        "notification",
        "replication",
        "encryption",
        "object-lock",
        "versions",
        "accelerate",
        "requestPayment",
        "ownershipControls",
        "publicAccessBlock",
        "analytics",
        "metrics",
        "inventory",
        "intelligent-tiering",
    ] {
        if request.has_param(unsupported) {
            return Err(S3Error::not_implemented(format!(
                "the ?{unsupported} subresource is not supported (docs/s3.md)"
            )));
        }
    }
    match request.method.clone() {
        Method::PUT if request.has_param("versioning") => {
            Err(S3Error::not_implemented("bucket versioning is not supported (docs/s3.md)"))
        }
        Method::PUT => create_bucket(state, request, &name).await,
        Method::DELETE => delete_bucket(state, &name).await,
        Method::HEAD => {
            find(state, &name).await?;
            let mut response = StatusCode::OK.into_response();
            response.headers_mut().insert("x-amz-bucket-region", header_value(&state.options.region));
            Ok(response)
        }
        Method::GET if request.has_param("location") => {
            find(state, &name).await?;
            // S3 answers an empty constraint for us-east-1.
            let region = if state.options.region == "us-east-1" { String::new() } else { state.options.region.clone() };
            Ok(xml_response(&LocationConstraint { xmlns: xml::NAMESPACE, region }))
        }
        Method::GET if request.has_param("versioning") => {
            find(state, &name).await?;
            Ok(xml_response(&VersioningConfiguration { xmlns: xml::NAMESPACE }))
        }
        Method::GET if request.has_param("uploads") => super::multipart::list_uploads(state, request, &name).await,
        Method::GET if request.param("list-type") == Some("2") => list_objects(state, request, &name, true).await,
        Method::GET if request.has_param("list-type") => {
            Err(S3Error::invalid_argument("list-type is 2 (ListObjectsV2), or absent (ListObjects)"))
        }
        Method::GET => list_objects(state, request, &name, false).await,
        Method::POST if request.has_param("delete") => delete_objects(state, request, &name).await,
        _ => Err(S3Error::method_not_allowed("the specified method is not allowed against this resource")),
    }
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[derive(Debug, Deserialize, Default)]
struct CreateBucketConfiguration {
    #[serde(rename = "LocationConstraint", default)]
    location_constraint: Option<String>,
}

async fn create_bucket(state: &Arc<S3State>, request: S3Request, name: &str) -> Result<Response, S3Error> {
    model::check_bucket_name(name)?;
    let region = state.options.region.clone();
    let body = small_body(request).await?;
    if !body.iter().all(u8::is_ascii_whitespace) {
        let config: CreateBucketConfiguration = xml::parse(&body)?;
        if let Some(asked) = config.location_constraint.filter(|c| !c.is_empty()) {
            if asked != region {
                return Err(S3Error {
                    code: "IllegalLocationConstraintException",
                    ..S3Error::invalid_request(format!(
                        "the {asked} location constraint is incompatible with the region this endpoint serves ({region})"
                    ))
                });
            }
        }
    }
    let created = |status| {
        let mut response = StatusCode::from_u16(status).expect("status").into_response();
        response.headers_mut().insert(header::LOCATION, header_value(&format!("/{name}")));
        response
    };
    // An existing bucket is answered without the lock (which waits for commits in flight).
    let exists = |found: bool| -> Result<Option<Response>, S3Error> {
        match (found, region == "us-east-1") {
            (false, _) => Ok(None),
            // S3's us-east-1 answers 200 to its owner creating a bucket again; other regions 409.
            (true, true) => Ok(Some(created(200))),
            (true, false) => Err(S3Error::bucket_already_owned_by_you(
                "the bucket you tried to create already exists, and you own it",
            )),
        }
    };
    if let Some(response) = exists(find(state, name).await.is_ok())? {
        return Ok(response);
    }
    let _guard = state.buckets_lock.write().await;
    if let Some(response) = exists(lookup(state, name).await?.is_some())? {
        return Ok(response);
    }
    let partitions = state.front.name_partitions()?;
    let record = BucketRecord { created_ms: now_ms(), partitions };
    let partition = bucket_partition(state).await?;
    let name_record =
        NameRecord::new(BUCKET_SPACE.into(), name.into(), names::new_version(), Vec::new(), model::encode(&record))
            .map_err(|e| S3Error::internal(e.to_string()))?;
    state.front.put_name(partition, &name_record, now_ms()).await?;
    state.buckets.lock().expect("bucket cache").changed(name);
    Ok(created(200))
}

async fn delete_bucket(state: &Arc<S3State>, name: &str) -> Result<Response, S3Error> {
    let _guard = state.buckets_lock.write().await;
    let (_, record) = lookup(state, name).await?.ok_or_else(|| S3Error::no_such_bucket(name))?;
    let any = state.front.current_names(&record.partitions, name, "", false, "", 1).await?;
    if !any.is_empty() {
        return Err(S3Error::bucket_not_empty("the bucket you tried to delete is not empty"));
    }
    // As S3 does: uploads in progress do not keep a bucket; they are aborted with it. Not on a
    // cluster: each upload's completion is decided at its key's coordinator, under locks this
    // node does not hold, so an abort from here could take the pieces of an object completing
    // there at the same time. The client aborts them first (each at its coordinator).
    if state.front.cluster().is_some() {
        let uploads =
            state.front.current_names(&record.partitions, &model::uploads_space(name), "", false, "", 1).await?;
        if !uploads.is_empty() {
            return Err(S3Error::bucket_not_empty(
                "the bucket has multipart uploads in progress: abort them first (on a cluster, DeleteBucket does not)",
            ));
        }
    } else {
        super::multipart::abort_all(state, &record, name).await?;
    }
    let partition = bucket_partition(state).await?;
    // Before the records go and after: a lookup in between caches nothing that outlives this.
    state.buckets.lock().expect("bucket cache").changed(name);
    let result = async {
        for (_, entry) in state.front.name_versions(partition, BUCKET_SPACE, name).await?.iter() {
            objects::delete_if_there(state, entry.blob_id()).await?;
        }
        Ok::<_, S3Error>(())
    }
    .await;
    state.buckets.lock().expect("bucket cache").changed(name);
    result?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---------------------------------------------------------------------------------------------
// Listing

/// Where a listing resumes: after a key, or past every key under a common prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resume {
    After(String),
    PastPrefix(String),
}

impl Resume {
    fn token(&self) -> String {
        let (tag, text) = match self {
            Resume::After(key) => (b'k', key),
            Resume::PastPrefix(prefix) => (b'p', prefix),
        };
        let mut bytes = vec![tag];
        bytes.extend_from_slice(text.as_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn from_token(token: &str) -> Result<Self, S3Error> {
        let invalid = || S3Error::invalid_argument("the continuation token provided is incorrect");
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
        let (tag, text) = bytes.split_first().ok_or_else(invalid)?;
        let text = String::from_utf8(text.to_vec()).map_err(|_| invalid())?;
        match tag {
            b'k' => Ok(Resume::After(text)),
            b'p' => Ok(Resume::PastPrefix(text)),
            _ => Err(invalid()),
        }
    }

    /// The name to read from, and whether that name itself is left out.
    fn from(&self) -> (String, bool) {
        match self {
            Resume::After(key) => (key.clone(), true),
            Resume::PastPrefix(prefix) => match successor(prefix) {
                Some(next) => (next, false),
                // Nothing sorts after the prefix's range: an empty range.
                None => (char::MAX.to_string().repeat(MAX_KEYS + 1), false),
            },
        }
    }
}

/// The least string greater than every string that starts with `prefix` (`None`: none is).
pub fn successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (last as u32 + 1..=char::MAX as u32).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// A key as `encoding-type=url` writes it.
pub fn url_encode(key: &str) -> String {
    utf8_percent_encode(key, URL_KEY).to_string()
}

struct Listing {
    contents: Vec<(String, u128, model::ObjectSummary)>,
    prefixes: Vec<String>,
    truncated: bool,
    /// Where the next page starts, when truncated.
    next: Option<Resume>,
}

/// The first `max_keys` keys and common prefixes of `space` under `prefix` from `resume` on.
async fn list(
    state: &Arc<S3State>,
    bucket: &BucketRecord,
    space: &str,
    prefix: &str,
    delimiter: Option<&str>,
    resume: Option<Resume>,
    max_keys: usize,
) -> Result<Listing, S3Error> {
    let mut listing = Listing { contents: Vec::new(), prefixes: Vec::new(), truncated: false, next: None };
    if max_keys == 0 {
        // S3 answers an empty page, not truncated.
        return Ok(listing);
    }
    let mut last: Option<Resume> = None;
    let (mut from, mut after) = resume.map(|r| r.from()).unwrap_or_default();
    loop {
        let want = (max_keys + 1 - listing.contents.len() - listing.prefixes.len()).clamp(1, MAX_KEYS + 1);
        let page = state.front.current_names(&bucket.partitions, space, &from, after, prefix, want).await?;
        let full = page.len() == want;
        let mut skipped_to_prefix = false;
        for name in page {
            if listing.contents.len() + listing.prefixes.len() == max_keys {
                listing.truncated = true;
                listing.next = last;
                return Ok(listing);
            }
            let common = delimiter.filter(|d| !d.is_empty()).and_then(|d| {
                name.name[prefix.len()..].find(d).map(|at| name.name[..prefix.len() + at + d.len()].to_string())
            });
            match common {
                Some(common) => {
                    listing.prefixes.push(common.clone());
                    let resume = Resume::PastPrefix(common);
                    (from, after) = resume.from();
                    last = Some(resume);
                    skipped_to_prefix = true;
                    break;
                }
                None => {
                    let summary = objects::summary_of(&name.summary)?;
                    from = name.name.clone();
                    after = true;
                    last = Some(Resume::After(name.name.clone()));
                    listing.contents.push((name.name, name.version, summary));
                }
            }
        }
        if !skipped_to_prefix && !full {
            return Ok(listing);
        }
    }
}

#[derive(Serialize)]
struct Owner {
    #[serde(rename = "ID")]
    id: &'static str,
    #[serde(rename = "DisplayName")]
    display_name: &'static str,
}

impl Owner {
    fn cairn() -> Self {
        Owner { id: OWNER_ID, display_name: OWNER_ID }
    }
}

#[derive(Serialize)]
struct ContentsXml {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "LastModified")]
    last_modified: String,
    #[serde(rename = "ETag")]
    etag: String,
    #[serde(rename = "Size")]
    size: u64,
    #[serde(rename = "Owner", skip_serializing_if = "Option::is_none")]
    owner: Option<Owner>,
    #[serde(rename = "StorageClass")]
    storage_class: &'static str,
}

#[derive(Serialize)]
struct PrefixXml {
    #[serde(rename = "Prefix")]
    prefix: String,
}

#[derive(Serialize)]
#[serde(rename = "ListBucketResult")]
struct ListBucketResult {
    #[serde(rename = "@xmlns")]
    xmlns: &'static str,
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Prefix")]
    prefix: String,
    #[serde(rename = "Marker", skip_serializing_if = "Option::is_none")]
    marker: Option<String>,
    #[serde(rename = "NextMarker", skip_serializing_if = "Option::is_none")]
    next_marker: Option<String>,
    #[serde(rename = "StartAfter", skip_serializing_if = "Option::is_none")]
    start_after: Option<String>,
    #[serde(rename = "ContinuationToken", skip_serializing_if = "Option::is_none")]
    continuation_token: Option<String>,
    #[serde(rename = "NextContinuationToken", skip_serializing_if = "Option::is_none")]
    next_continuation_token: Option<String>,
    #[serde(rename = "KeyCount", skip_serializing_if = "Option::is_none")]
    key_count: Option<usize>,
    #[serde(rename = "MaxKeys")]
    max_keys: usize,
    #[serde(rename = "Delimiter", skip_serializing_if = "Option::is_none")]
    delimiter: Option<String>,
    #[serde(rename = "EncodingType", skip_serializing_if = "Option::is_none")]
    encoding_type: Option<&'static str>,
    #[serde(rename = "IsTruncated")]
    is_truncated: bool,
    #[serde(rename = "Contents")]
    contents: Vec<ContentsXml>,
    #[serde(rename = "CommonPrefixes")]
    common_prefixes: Vec<PrefixXml>,
}

async fn list_objects(state: &Arc<S3State>, request: S3Request, name: &str, v2: bool) -> Result<Response, S3Error> {
    let bucket = find(state, name).await?;
    let prefix = request.param("prefix").unwrap_or("").to_string();
    let delimiter = request.param("delimiter").filter(|d| !d.is_empty()).map(str::to_string);
    let url = match request.param("encoding-type") {
        None => false,
        Some("url") => true,
        Some(_) => return Err(S3Error::invalid_argument("invalid encoding method specified in the request")),
    };
    let max_keys = match request.param("max-keys") {
        None => MAX_KEYS,
        Some(n) => n
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| S3Error::invalid_argument("max-keys must be a non-negative integer"))?
            .min(MAX_KEYS as i64) as usize,
    };
    let encode = |s: &str| if url { url_encode(s) } else { s.to_string() };
    let token = request.param("continuation-token").map(str::to_string);
    let start_after = request.param("start-after").map(str::to_string);
    let marker = request.param("marker").map(str::to_string);
    // A marker or start-after that is itself a common prefix (a v1 NextMarker is one) resumes
    // past every key under it, as S3 does.
    let after = |key: &str| match delimiter.as_deref().filter(|d| key.ends_with(*d) && key.starts_with(&prefix)) {
        Some(d) if key[prefix.len()..].find(d) == Some(key.len() - prefix.len() - d.len()) => {
            Resume::PastPrefix(key.to_string())
        }
        _ => Resume::After(key.to_string()),
    };
    let resume = if v2 {
        match (&token, &start_after) {
            (Some(t), _) => Some(Resume::from_token(t)?),
            (None, Some(s)) => Some(after(s)),
            (None, None) => None,
        }
    } else {
        marker.as_deref().filter(|m| !m.is_empty()).map(after)
    };
    let listing = list(state, &bucket, name, &prefix, delimiter.as_deref(), resume, max_keys).await?;
    let with_owner = !v2 || request.param("fetch-owner") == Some("true");
    let key_count = listing.contents.len() + listing.prefixes.len();
    let next_marker = match (&listing.next, &delimiter, v2) {
        (Some(Resume::After(k)) | Some(Resume::PastPrefix(k)), Some(_), false) => Some(encode(k)),
        _ => None,
    };
    let result = ListBucketResult {
        xmlns: xml::NAMESPACE,
        name: name.to_string(),
        prefix: encode(&prefix),
        marker: (!v2).then(|| encode(marker.as_deref().unwrap_or(""))),
        next_marker,
        start_after: if v2 { start_after.as_deref().map(encode) } else { None },
        continuation_token: if v2 { token } else { None },
        next_continuation_token: if v2 && listing.truncated { listing.next.as_ref().map(Resume::token) } else { None },
        key_count: v2.then_some(key_count),
        max_keys,
        delimiter: delimiter.as_deref().map(encode),
        encoding_type: url.then_some("url"),
        is_truncated: listing.truncated,
        contents: listing
            .contents
            .into_iter()
            .map(|(key, version, summary)| ContentsXml {
                key: encode(&key),
                last_modified: xml::timestamp(names::version_ms(version)),
                etag: format!("\"{}\"", summary.etag),
                size: summary.size,
                owner: with_owner.then(Owner::cairn),
                storage_class: "STANDARD",
            })
            .collect(),
        common_prefixes: listing.prefixes.iter().map(|p| PrefixXml { prefix: encode(p) }).collect(),
    };
    Ok(xml_response(&result))
}

// ---------------------------------------------------------------------------------------------
// DeleteObjects

#[derive(Debug, Deserialize)]
struct DeleteRequest {
    #[serde(rename = "Object", default)]
    objects: Vec<ObjectIdentifier>,
    #[serde(rename = "Quiet", default)]
    quiet: bool,
}

#[derive(Debug, Deserialize)]
struct ObjectIdentifier {
    #[serde(rename = "Key")]
    key: String,
}

#[derive(Serialize)]
struct DeletedXml {
    #[serde(rename = "Key")]
    key: String,
}

#[derive(Serialize)]
struct DeleteErrorXml {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "Code")]
    code: &'static str,
    #[serde(rename = "Message")]
    message: String,
}

#[derive(Serialize)]
#[serde(rename = "DeleteResult")]
struct DeleteResult {
    #[serde(rename = "@xmlns")]
    xmlns: &'static str,
    #[serde(rename = "Deleted")]
    deleted: Vec<DeletedXml>,
    #[serde(rename = "Error")]
    errors: Vec<DeleteErrorXml>,
}

async fn delete_objects(state: &Arc<S3State>, request: S3Request, name: &str) -> Result<Response, S3Error> {
    let bucket = find(state, name).await?;
    let body = small_body(request).await?;
    let asked: DeleteRequest = xml::parse(&body)?;
    if asked.objects.is_empty() || asked.objects.len() > MAX_KEYS {
        return Err(S3Error::malformed_xml(format!("a DeleteObjects request names 1 to {MAX_KEYS} keys")));
    }
    let mut result = DeleteResult { xmlns: xml::NAMESPACE, deleted: Vec::new(), errors: Vec::new() };
    for object in asked.objects {
        let outcome = match model::check_key(&object.key) {
            Ok(()) => super::forward::delete_key(state, &bucket, name, &object.key).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) if asked.quiet => {}
            Ok(()) => result.deleted.push(DeletedXml { key: object.key }),
            Err(e) => result.errors.push(DeleteErrorXml { key: object.key, code: e.code, message: e.message }),
        }
    }
    Ok(xml_response(&result))
}

// ---------------------------------------------------------------------------------------------
// Small documents

#[derive(Serialize)]
struct BucketXml {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "CreationDate")]
    creation_date: String,
}

#[derive(Serialize)]
struct BucketsXml {
    #[serde(rename = "Bucket")]
    bucket: Vec<BucketXml>,
}

#[derive(Serialize)]
#[serde(rename = "ListAllMyBucketsResult")]
struct ListAllMyBucketsResult {
    #[serde(rename = "@xmlns")]
    xmlns: &'static str,
    #[serde(rename = "Owner")]
    owner: Owner,
    #[serde(rename = "Buckets")]
    buckets: BucketsXml,
}

#[derive(Serialize)]
#[serde(rename = "LocationConstraint")]
struct LocationConstraint {
    #[serde(rename = "@xmlns")]
    xmlns: &'static str,
    #[serde(rename = "$text")]
    region: String,
}

#[derive(Serialize)]
#[serde(rename = "VersioningConfiguration")]
struct VersioningConfiguration {
    #[serde(rename = "@xmlns")]
    xmlns: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_successor_of_a_prefix_bounds_its_range() {
        assert_eq!(successor("a/").as_deref(), Some("a0"));
        assert_eq!(successor("ab").as_deref(), Some("ac"));
        assert_eq!(successor("a\u{D7FF}").as_deref(), Some("a\u{E000}"));
        assert_eq!(successor("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(successor("\u{10FFFF}"), None);
        for key in ["a/", "a/b", "a/\u{10FFFF}\u{10FFFF}"] {
            assert!(key < successor("a/").unwrap().as_str(), "{key}");
        }
    }

    #[test]
    fn continuation_tokens_round_trip_and_refuse_garbage() {
        for resume in [Resume::After("k€y".into()), Resume::PastPrefix("p/".into())] {
            assert_eq!(Resume::from_token(&resume.token()).unwrap(), resume);
        }
        assert!(Resume::from_token("!!").is_err());
        assert!(Resume::from_token(&URL_SAFE_NO_PAD.encode(b"zabc")).is_err());
        assert!(Resume::from_token("").is_err());
    }
}
