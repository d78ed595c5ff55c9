//! Object operations: PutObject, GetObject, HeadObject, DeleteObject, CopyObject, and what they
//! share — reading a body in any payload mode, finding a key's current version, superseding.
//!
//! An object is written in two steps: its bytes as blobs (pieces of at most `piece_bytes`),
//! then its name record (a small object's bytes go inside the record: one step). The name record is the commit point: until it is durable the object
//! does not exist, and a failed upload deletes the pieces it stored. Then every older live
//! version of the key is deleted (record and pieces), so whichever writer finishes last
//! removes what the newest version superseded.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::body::{Body, BodyDataStream};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use cairn_common::BlobId;
use futures::StreamExt;
use serde::Serialize;

use super::checksum::{self, Algorithm, BodyDigests, Checksum};
use super::chunked::ChunkedDecoder;
use super::error::S3Error;
use super::model::{self, BucketRecord, ObjectRecord, ObjectSummary, Piece};
use super::sigv4::Payload;
use super::{buckets, xml, S3Request, S3State, Target};
use crate::engine::names::{self, NameRecord};
use crate::engine::{now_ms, BlobMeta, PairError, PutRequest, VolumeError};
use crate::front::{FrontError, PieceReader};

/// Stored headers a client gives at upload and gets back on reads.
const STORED_HEADERS: [&str; 5] =
    ["cache-control", "content-disposition", "content-encoding", "content-language", "expires"];
/// `response-*` query parameters of a GET that override a header of the answer.
const RESPONSE_OVERRIDES: [(&str, &str); 6] = [
    ("response-content-type", "content-type"),
    ("response-content-language", "content-language"),
    ("response-expires", "expires"),
    ("response-cache-control", "cache-control"),
    ("response-content-disposition", "content-disposition"),
    ("response-content-encoding", "content-encoding"),
];

pub async fn object(state: &Arc<S3State>, request: S3Request) -> Result<Response, S3Error> {
    let Target::Object { bucket, key } = request.target.clone() else { unreachable!("an object request") };
    model::check_key(&key)?;
    if let Some(version) = request.param("versionId").filter(|v| *v != "null") {
        return Err(S3Error::invalid_argument(format!(
            "invalid version id {:?}: versioning is not supported, only the null version exists",
            version.chars().take(60).collect::<String>()
        )));
    }
    if request.has_param("uploads") || request.has_param("uploadId") {
        return super::multipart::object(state, request, &bucket, &key).await;
    }
    if request.has_param("partNumber") && request.method != Method::GET && request.method != Method::HEAD {
        return Err(S3Error::invalid_request("?partNumber without ?uploadId reads a part: GET or HEAD only"));
    }
    for unsupported in ["acl", "tagging", "retention", "legal-hold", "torrent", "restore", "select", "attributes"] {
        if request.has_param(unsupported) {
            return Err(S3Error::not_implemented(format!(
                "the ?{unsupported} subresource is not supported (docs/s3.md)"
            )));
        }
    }
    match request.method {
        Method::PUT if request.headers.contains_key("x-amz-copy-source") => {
            copy_object(state, request, &bucket, &key).await
        }
        Method::PUT => put_object(state, request, &bucket, &key).await,
        Method::GET | Method::HEAD => get_object(state, request, &bucket, &key).await,
        Method::DELETE => {
            let record = buckets::find(state, &bucket).await?;
            delete_key(state, &record, &bucket, &key).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        _ => Err(S3Error::method_not_allowed("the specified method is not allowed against this resource")),
    }
}

/// A key's current version: its name record's id, version and object.
pub struct Current {
    pub id: BlobId,
    pub version: u128,
    pub object: ObjectRecord,
}

impl Current {
    fn last_modified_ms(&self) -> u64 {
        names::version_ms(self.version)
    }
}

/// The current version of `key`, if it has one.
pub async fn current(
    state: &Arc<S3State>,
    bucket: &BucketRecord,
    space: &str,
    key: &str,
) -> Result<Option<Current>, S3Error> {
    let partition = model::partition_of(&bucket.partitions, key);
    let Some((id, version, record)) = current_record(state, partition, space, key).await? else { return Ok(None) };
    Ok(Some(Current { id, version, object: ObjectRecord::decode(&record.body)? }))
}

/// The newest name record of `name` in `partition`: its id, version and record. A record
/// deleted between the index read and the record read was superseded or deleted meanwhile:
/// the versions are read again (a few times; then the name is as if absent).
pub async fn current_record(
    state: &Arc<S3State>,
    partition: u32,
    space: &str,
    name: &str,
) -> Result<Option<(BlobId, u128, NameRecord)>, S3Error> {
    for _ in 0..3 {
        let versions = state.front.name_versions(partition, space, name).await?;
        // A name whose newest version is a delete marker is deleted.
        let Some((version, entry)) = versions.last().filter(|(_, e)| !e.is_delete_marker()) else { return Ok(None) };
        match state.front.name_record(entry.blob_id()).await {
            Ok(record) => return Ok(Some((entry.blob_id(), *version, record))),
            Err(e) if e.is_deleted() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// Deletes every version of `key` (records, then their pieces), under the name's lock. On a
/// cluster a fresh delete marker above them goes first (also above an older marker: a failed
/// write newer than that one may be out there): a version only a replica that was down holds
/// may come back with it, and must not become current.
pub async fn delete_key(state: &Arc<S3State>, bucket: &BucketRecord, space: &str, key: &str) -> Result<(), S3Error> {
    let partition = model::partition_of(&bucket.partitions, key);
    let mut garbage = Vec::new();
    {
        let _name = lock_name(state, space, key).await;
        let versions = state.front.name_versions(partition, space, key).await?;
        if let (Some(_), Some((newest, _))) = (state.front.cluster(), versions.last()) {
            names::observe_version(*newest);
            let marker = NameRecord::delete_marker(space.to_string(), key.to_string(), names::new_version())
                .map_err(|e| S3Error::internal(e.to_string()))?;
            match state.front.put_name(partition, &marker, now_ms()).await {
                Ok(_) => {}
                // A full partition takes no new record, but must still free space: the delete
                // goes on without its marker (docs/s3.md).
                Err(e) if e.is_no_room() => {
                    tracing::warn!(key, error = %e, "no room for a delete marker: deleting without one");
                }
                Err(e) => return Err(e.into()),
            }
        }
        for (_, entry) in versions {
            garbage.extend(delete_record(state, entry.blob_id()).await?);
        }
    }
    delete_pieces(state, &garbage).await;
    Ok(())
}

/// The lock of one name in one space: every commit and delete of it holds it.
fn name_lock(space: &str, name: &str) -> String {
    format!("{space}\0{name}")
}

/// Deletes one version: its record first (the object is gone at once), then its pieces, but
/// none of `keep` (pieces another record still points at: a multipart object's, which its
/// upload's part records shared until they went).
pub async fn delete_version(state: &Arc<S3State>, id: BlobId, keep: &[Piece]) -> Result<(), S3Error> {
    let pieces = delete_record(state, id).await?;
    delete_pieces(state, &without(pieces, keep)).await;
    Ok(())
}

/// Deletes a name record of an object or a part; the pieces it pointed at (to be deleted next,
/// once nothing else can point at them).
pub async fn delete_record(state: &Arc<S3State>, id: BlobId) -> Result<Vec<Piece>, S3Error> {
    let record = match state.front.name_record(id).await {
        Ok(record) => Some(record),
        Err(e) if e.is_deleted() || e.is_not_found() => None,
        Err(e) => return Err(e.into()),
    };
    delete_if_there(state, id).await?;
    Ok(record.and_then(|r| ObjectRecord::decode(&r.body).ok()).map(|o| o.pieces).unwrap_or_default())
}

/// Deletes a blob; one that is gone already (two cleanups of one record) is as good.
pub async fn delete_if_there(state: &Arc<S3State>, id: BlobId) -> Result<(), S3Error> {
    match state.front.delete(id).await {
        Ok(()) => Ok(()),
        Err(e) if e.is_not_found() || e.is_deleted() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The pieces of the key's current object (none if it has none), read under the key's lock:
/// what a cleanup of parts that may share them must keep.
pub async fn current_pieces(
    state: &Arc<S3State>,
    bucket: &BucketRecord,
    space: &str,
    key: &str,
) -> Result<Vec<Piece>, S3Error> {
    let _name = lock_name(state, space, key).await;
    Ok(current(state, bucket, space, key).await?.map(|c| c.object.pieces).unwrap_or_default())
}

/// `pieces` but none of `keep`.
pub fn without(pieces: Vec<Piece>, keep: &[Piece]) -> Vec<Piece> {
    let keep: std::collections::HashSet<&[u8]> = keep.iter().map(|p| &p.id[..]).collect();
    pieces.into_iter().filter(|p| !keep.contains(&p.id[..])).collect()
}

/// Pieces stored for a write that has not committed: deleted (in a task of their own) if the
/// write is dropped before it hands them on — a client that goes away mid-upload or mid-copy
/// leaves nothing behind.
pub struct StoredPieces {
    state: Arc<S3State>,
    pieces: Vec<Piece>,
}

impl StoredPieces {
    pub fn new(state: &Arc<S3State>) -> Self {
        Self::holding(state, Vec::new())
    }

    pub fn holding(state: &Arc<S3State>, pieces: Vec<Piece>) -> Self {
        Self { state: state.clone(), pieces }
    }

    pub fn push(&mut self, piece: Piece) {
        self.pieces.push(piece);
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The pieces, now the caller's to commit or delete.
    pub fn take(mut self) -> Vec<Piece> {
        std::mem::take(&mut self.pieces)
    }
}

impl Drop for StoredPieces {
    fn drop(&mut self) {
        let pieces = std::mem::take(&mut self.pieces);
        if pieces.is_empty() {
            return;
        }
        let state = self.state.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { delete_pieces(&state, &pieces).await });
        }
    }
}

/// Deletes blobs no name record will point at (best effort: a piece left behind is space, not
/// data, and compaction never reclaims what is still referenced).
pub async fn delete_pieces(state: &Arc<S3State>, pieces: &[Piece]) {
    for piece in pieces {
        let Ok(id) = piece.blob_id() else { continue };
        match state.front.delete(id).await {
            // Gone already, or never written (a commit refused before its last piece was).
            Err(e) if e.is_not_found() => {}
            Err(e) => tracing::warn!(%id, error = %e, "a piece of a superseded or failed object was not deleted"),
            Ok(()) => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading a request body

/// A request body decoded from its payload mode, with the digests and checks S3 makes.
pub struct BodyReader {
    chunked: Option<ChunkedDecoder>,
    ready: VecDeque<Bytes>,
    ended: bool,
    digests: BodyDigests,
    expected_sha256: Option<[u8; 32]>,
    /// The length announced (Content-Length, or x-amz-decoded-content-length of a chunked body).
    announced: Option<u64>,
    max: u64,
    content_md5: Option<[u8; 16]>,
    /// A checksum value the headers carry.
    header_checksum: Option<Checksum>,
    /// The checksum a trailer carries (x-amz-trailer).
    trailer_algorithm: Option<Algorithm>,
}

/// What a body was, once read and checked.
pub struct ReadBody {
    pub md5: [u8; 16],
    pub checksum: Option<Checksum>,
    pub len: u64,
}

impl BodyReader {
    pub fn new(request: &S3Request, max: u64) -> Result<Self, S3Error> {
        let payload = match &request.signature {
            Some(signature) => signature.payload.clone(),
            // Anonymous (a node without auth): the payload mode the headers name, which must be
            // one that needs no signature (a signed stream's chunks cannot be checked).
            None => match request.header("x-amz-content-sha256") {
                Some(super::sigv4::STREAMING_UNSIGNED_TRAILER) => Payload::StreamingUnsignedTrailer,
                Some(super::sigv4::STREAMING_SIGNED | super::sigv4::STREAMING_SIGNED_TRAILER) => {
                    return Err(S3Error::invalid_request("a signed aws-chunked body needs a signed request"))
                }
                _ if request.header("content-encoding").is_some_and(|e| e.contains("aws-chunked")) => {
                    return Err(S3Error::invalid_request(
                        "an aws-chunked body needs x-amz-content-sha256 naming its streaming mode",
                    ))
                }
                _ => Payload::Unsigned,
            },
        };
        let content_length = request
            .header("content-length")
            .map(|v| v.parse::<u64>())
            .transpose()
            .map_err(|_| S3Error::invalid_argument("Content-Length is not a number"))?;
        let chunked = match &payload {
            Payload::StreamingSigned { trailer } => {
                Some(ChunkedDecoder::new(request.signature.as_ref().map(|s| s.chunk_signer()), *trailer))
            }
            Payload::StreamingUnsignedTrailer => Some(ChunkedDecoder::new(None, true)),
            _ => None,
        };
        let announced = if chunked.is_some() {
            Some(
                request
                    .header("x-amz-decoded-content-length")
                    .ok_or_else(|| {
                        S3Error::missing_content_length("an aws-chunked body needs x-amz-decoded-content-length")
                    })?
                    .parse::<u64>()
                    .map_err(|_| S3Error::invalid_argument("x-amz-decoded-content-length is not a number"))?,
            )
        } else {
            content_length
        };
        // S3 needs the length up front: no Content-Length with a chunked transfer is a 411; with
        // neither, HTTP says there is no body.
        let announced = match announced {
            Some(n) => Some(n),
            None if request.headers.contains_key(header::TRANSFER_ENCODING) => {
                return Err(S3Error::missing_content_length("you must provide the Content-Length HTTP header"))
            }
            None => Some(0),
        };
        if let Some(n) = announced {
            if n > max {
                return Err(S3Error::entity_too_large(format!(
                    "your proposed upload of {n} bytes exceeds the maximum allowed size of {max} bytes"
                )));
            }
        }
        let content_md5 = request.header("content-md5").map(checksum::parse_content_md5).transpose()?;
        let mut header_checksum = None;
        for algorithm in Algorithm::ALL {
            if let Some(value) = request.header(algorithm.header()) {
                if header_checksum.is_some() {
                    return Err(S3Error::invalid_request(
                        "expecting a single x-amz-checksum- header; multiple checksum types are not allowed",
                    ));
                }
                header_checksum = Some(Checksum::parse(algorithm, value)?);
            }
        }
        let trailer_algorithm = match request.header("x-amz-trailer") {
            None => None,
            Some(name) if chunked.is_some() => Some(Algorithm::from_header(name.trim()).ok_or_else(|| {
                S3Error::invalid_request(format!(
                    "the trailer {:?} is not a checksum this server knows",
                    name.chars().take(60).collect::<String>()
                ))
            })?),
            Some(_) => return Err(S3Error::invalid_request("x-amz-trailer needs an aws-chunked body")),
        };
        let named = request
            .header("x-amz-sdk-checksum-algorithm")
            .or_else(|| request.header("x-amz-checksum-algorithm"))
            .map(Algorithm::from_name)
            .transpose()?;
        if let (Some(given), Some(trailer)) = (&header_checksum, trailer_algorithm) {
            if given.algorithm != trailer {
                return Err(S3Error::invalid_request(
                    "a checksum header and a checksum trailer name different algorithms",
                ));
            }
        }
        let algorithm = header_checksum.as_ref().map(|c| c.algorithm).or(trailer_algorithm).or(named);
        if let (Some(named), Some(algorithm)) = (named, algorithm) {
            if named != algorithm {
                return Err(S3Error::invalid_request("the checksum algorithm named does not match the checksum given"));
            }
        }
        let expected_sha256 = match payload {
            Payload::Sha256(digest) => Some(digest),
            _ => None,
        };
        Ok(Self {
            chunked,
            ready: VecDeque::new(),
            ended: false,
            digests: BodyDigests::new(expected_sha256.is_some(), algorithm),
            expected_sha256,
            announced,
            max,
            content_md5,
            header_checksum,
            trailer_algorithm,
        })
    }

    /// Whether every byte the body announced has come (what follows can only be its end).
    pub fn all_read(&self) -> bool {
        self.announced.is_some_and(|n| self.digests.len >= n)
    }

    /// Bytes the body announced and has not delivered yet.
    pub fn remaining(&self) -> u64 {
        self.announced.unwrap_or(self.max).saturating_sub(self.digests.len)
    }

    /// The next decoded bytes of the body, or `None` at its end.
    pub async fn next(&mut self, body: &mut BodyDataStream) -> Result<Option<Bytes>, S3Error> {
        loop {
            if let Some(data) = self.ready.pop_front() {
                self.digests.update(&data);
                if self.digests.len > self.max || self.announced.is_some_and(|n| self.digests.len > n) {
                    return Err(match self.announced {
                        Some(n) if n <= self.max => {
                            S3Error::invalid_request("the body is longer than its announced length")
                        }
                        _ => S3Error::entity_too_large(format!(
                            "the object exceeds the maximum allowed size of {} bytes",
                            self.max
                        )),
                    });
                }
                return Ok(Some(data));
            }
            if self.ended {
                return Ok(None);
            }
            match body.next().await {
                Some(Ok(data)) => match &mut self.chunked {
                    Some(decoder) => {
                        let mut out = Vec::new();
                        decoder.push(data, &mut out)?;
                        self.ready.extend(out.into_iter().filter(|b| !b.is_empty()));
                    }
                    None => self.ready.push_back(data),
                },
                Some(Err(e)) => return Err(S3Error::body_cut(format!("the request body could not be read: {e}"))),
                None => self.ended = true,
            }
        }
    }

    /// Checks what only the whole body tells: its length, SHA-256, MD5 and checksum.
    pub fn finish(self) -> Result<ReadBody, S3Error> {
        let trailers = match self.chunked {
            Some(decoder) => decoder.finish()?.0,
            None => Vec::new(),
        };
        let digests = self.digests.finish();
        if let Some(n) = self.announced {
            if digests.len != n {
                return Err(S3Error::body_cut(format!(
                    "you did not provide the number of bytes specified ({} of {n})",
                    digests.len
                )));
            }
        }
        if let (Some(expected), Some(actual)) = (self.expected_sha256, digests.sha256) {
            if expected != actual {
                return Err(S3Error::content_sha256_mismatch(
                    "the provided x-amz-content-sha256 header does not match what was computed",
                ));
            }
        }
        if let Some(expected) = self.content_md5 {
            if expected != digests.md5 {
                return Err(S3Error::bad_digest("the Content-MD5 you specified did not match what we received"));
            }
        }
        let claimed = match (self.header_checksum, self.trailer_algorithm) {
            (Some(c), _) => Some(c),
            (None, Some(algorithm)) => {
                let value =
                    trailers.iter().find(|(n, _)| n == algorithm.header()).map(|(_, v)| v.as_str()).ok_or_else(
                        || {
                            S3Error::invalid_request(format!(
                                "the trailer {} announced by x-amz-trailer is missing",
                                algorithm.header()
                            ))
                        },
                    )?;
                Some(Checksum::parse(algorithm, value)?)
            }
            (None, None) => None,
        };
        if let (Some(claimed), Some(computed)) = (&claimed, &digests.checksum) {
            if claimed != computed {
                return Err(S3Error::bad_digest(format!(
                    "the {} you specified did not match the calculated checksum",
                    claimed.algorithm.header()
                )));
            }
        }
        Ok(ReadBody { md5: digests.md5, checksum: digests.checksum, len: digests.len })
    }
}

// ---------------------------------------------------------------------------------------------
// PutObject, CopyObject

/// What a new object's request says of it besides its bytes.
pub struct NewObjectMeta {
    pub content_type: String,
    pub user_meta: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
}

/// Content type, user metadata and stored headers of a new object, from its request.
pub fn object_meta(headers: &HeaderMap) -> Result<NewObjectMeta, S3Error> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().map(str::to_string))
        .transpose()
        .map_err(|_| S3Error::invalid_argument("Content-Type is not visible ASCII"))?
        .unwrap_or_else(|| "binary/octet-stream".to_string());
    let mut user = Vec::new();
    let mut total = 0;
    for (name, value) in headers {
        if let Some(key) = name.as_str().strip_prefix("x-amz-meta-") {
            let value = value.to_str().map_err(|_| {
                S3Error::invalid_argument(format!("the value of x-amz-meta-{key} is not visible ASCII"))
            })?;
            total += key.len() + value.len();
            user.push((key.to_string(), value.to_string()));
        }
    }
    if total > model::MAX_USER_META_BYTES {
        return Err(S3Error::metadata_too_large(format!(
            "your metadata headers are {total} bytes; the limit is {} bytes",
            model::MAX_USER_META_BYTES
        )));
    }
    user.sort();
    let stored = STORED_HEADERS
        .iter()
        .filter_map(|name| headers.get(*name).and_then(|v| v.to_str().ok()).map(|v| (name.to_string(), v.to_string())))
        .filter_map(|(name, value)| match name.as_str() {
            // aws-chunked names the upload's framing, not the object's encoding: S3 drops it.
            "content-encoding" => {
                let kept: Vec<&str> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|t| !t.eq_ignore_ascii_case("aws-chunked") && !t.is_empty())
                    .collect();
                (!kept.is_empty()).then(|| (name, kept.join(",")))
            }
            _ => Some((name, value)),
        })
        .collect();
    Ok(NewObjectMeta { content_type, user_meta: user, headers: stored })
}

/// A conditional write's terms, checked again once its record is durable.
#[derive(Debug, Clone, Copy)]
pub struct WriteCondition {
    /// `If-None-Match: *`: no other object may be current.
    none_match: bool,
    /// `If-Match`: the version it matched must still be current.
    matched: Option<u128>,
}

/// A write's conditions checked against the key's current version, if it has any.
pub async fn write_condition(
    state: &Arc<S3State>,
    headers: &HeaderMap,
    bucket: &BucketRecord,
    bucket_name: &str,
    key: &str,
) -> Result<Option<WriteCondition>, S3Error> {
    if !headers.contains_key(header::IF_NONE_MATCH) && !headers.contains_key(header::IF_MATCH) {
        return Ok(None);
    }
    let current = current(state, bucket, bucket_name, key).await?;
    check_write_conditions(headers, current.as_ref()).map(Some)
}

/// PutObject's conditional writes: `If-None-Match: *` (only if the key has no object) and
/// `If-Match: <etag>` (only over that version).
fn check_write_conditions(headers: &HeaderMap, current: Option<&Current>) -> Result<WriteCondition, S3Error> {
    let mut condition = WriteCondition { none_match: false, matched: None };
    let failed = || S3Error::precondition_failed("at least one of the pre-conditions you specified did not hold");
    if let Some(value) = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        if value.trim() != "*" {
            return Err(S3Error::not_implemented("If-None-Match on a write takes only *"));
        }
        if current.is_some() {
            return Err(failed());
        }
        condition.none_match = true;
    }
    if let Some(value) = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()) {
        match current {
            None => return Err(S3Error::no_such_key("the key has no object for If-Match to compare")),
            Some(c) if !etag_matches(value, &c.object.etag) => return Err(failed()),
            Some(c) => condition.matched = Some(c.version),
        }
    }
    Ok(condition)
}

async fn put_object(
    state: &Arc<S3State>,
    mut request: S3Request,
    bucket_name: &str,
    key: &str,
) -> Result<Response, S3Error> {
    let bucket = buckets::find(state, bucket_name).await?;
    let NewObjectMeta { content_type, user_meta, headers } = object_meta(&request.headers)?;
    let condition = write_condition(state, &request.headers, &bucket, bucket_name, key).await?;
    let mut reader = BodyReader::new(&request, state.options.max_object_bytes)?;
    let body = std::mem::replace(&mut request.body, Body::empty());
    let inline_max = state.options.inline_bytes;
    let StoredBody { pieces, inline, last } =
        store_body(state, &mut reader, body.into_data_stream(), inline_max).await?;
    // Until the commit takes them, the pieces go if anything fails or the request is dropped.
    let pieces = StoredPieces::holding(state, pieces);
    let read = reader.finish()?;
    let pieces = pieces.take();
    let object = ObjectRecord {
        size: read.len,
        etag: hex::encode(read.md5),
        content_type,
        user_meta,
        headers,
        checksum: read.checksum,
        pieces,
        inline: Vec::from(inline),
        parts: Vec::new(),
    };
    // What the answer needs, taken before the record (and its inline bytes) goes to the commit.
    let (etag, checksum) = (object.etag.clone(), object.checksum.clone());
    commit_in_bucket(state, bucket_name, key, object, last, condition).await?;
    let mut response = StatusCode::OK.into_response();
    let h = response.headers_mut();
    h.insert(header::ETAG, quoted(&etag));
    if let Some(c) = &checksum {
        h.insert(HeaderName::from_static(c.algorithm.header()), HeaderValue::from_str(&c.text()).expect("base64"));
    }
    Ok(response)
}

/// A body as [`store_body`] leaves it.
pub struct StoredBody {
    /// The pieces stored, the caller's to commit or delete.
    pub pieces: Vec<Piece>,
    /// The whole body, when it is small enough to go inside the name record.
    pub inline: Bytes,
    /// The last piece, read but not stored: the commit stores it with the record.
    pub last: Option<LastPiece>,
}

/// The last piece of a body, read but not stored yet: [`commit`] writes it with the name record
/// that holds it, in one step where the store can (one group commit, rather than the piece's and
/// then the record's in turn), or else just before the record.
pub struct LastPiece {
    payload: Bytes,
    /// Its room in the node's upload budget, held until it is stored.
    room: Option<crate::api::upload::Room>,
}

impl LastPiece {
    pub fn size(&self) -> u64 {
        self.payload.len() as u64
    }

    /// Stores it as a piece of its own (anywhere there is room).
    pub async fn store(self, state: &Arc<S3State>) -> Result<Piece, S3Error> {
        store_piece(state, self.payload, self.room).await
    }
}

impl std::fmt::Debug for LastPiece {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LastPiece").field("len", &self.payload.len()).finish()
    }
}

/// Reads a body: into pieces (blobs of at most `piece_bytes`), the last one left for the commit
/// to store, or, when the whole body is at most `inline_max` bytes, kept to go inside the name
/// record. On any failure deletes what it stored.
pub async fn store_body(
    state: &Arc<S3State>,
    reader: &mut BodyReader,
    mut body: BodyDataStream,
    inline_max: u64,
) -> Result<StoredBody, S3Error> {
    let mut pieces = StoredPieces::new(state);
    let piece_bytes = state.piece_bytes();
    let outcome = async {
        let mut buffer = BytesMut::new();
        // The memory a piece takes while it is gathered counts against the node's upload budget.
        let mut room = None;
        loop {
            if room.is_none() {
                let want = piece_bytes.min(reader.remaining()).max(1);
                room = Some(state.uploads.reserve(want).await.ok_or_else(|| {
                    S3Error::slow_down("the node is receiving as many uploads as its memory allows; try again shortly")
                })?);
                // The piece's whole room at once (the budget holds it anyway): growing the buffer
                // step by step copied a 5 MiB body about twice over.
                buffer.reserve((want as usize).saturating_sub(buffer.len()));
            }
            let next = reader.next(&mut body).await?;
            let done = next.is_none();
            if let Some(data) = next {
                buffer.extend_from_slice(&data);
            }
            if done && pieces.is_empty() && buffer.len() as u64 <= inline_max {
                return Ok::<_, S3Error>((buffer.freeze(), None));
            }
            // A full piece that ends the announced body waits for the end, to be the last one.
            while (buffer.len() as u64 >= piece_bytes && !reader.all_read()) || (done && !buffer.is_empty()) {
                let take = (piece_bytes as usize).min(buffer.len());
                let payload = buffer.split_to(take).freeze();
                // The room goes with the piece: held until it is stored, even if this request is
                // dropped meanwhile.
                if done && buffer.is_empty() {
                    return Ok((Bytes::new(), Some(LastPiece { payload, room: room.take() })));
                }
                pieces.push(store_piece(state, payload, room.take()).await?);
            }
            if done {
                return Ok((Bytes::new(), None));
            }
        }
    }
    .await;
    // On an error the guard deletes what was stored.
    outcome.map(|(inline, last)| StoredBody { pieces: pieces.take(), inline, last })
}

/// What a piece is stored with: bytes of no type of their own (the object's are in its record).
fn piece_meta() -> BlobMeta {
    BlobMeta::new(crate::engine::record::DEFAULT_CONTENT_TYPE.into(), Vec::new()).expect("valid metadata")
}

/// Stores one piece, in a task of its own: a writer that goes away while its piece is being
/// stored does not leave it behind (the task deletes what no one took).
pub async fn store_piece(
    state: &Arc<S3State>,
    payload: Bytes,
    room: Option<crate::api::upload::Room>,
) -> Result<Piece, S3Error> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let state = state.clone();
    tokio::spawn(async move {
        let _room = room;
        let len = payload.len() as u64;
        let stored = state.front.put(piece_meta(), payload, now_ms(), None, None).await;
        let result = stored.map(|id| Piece { id: id.to_bytes(), len }).map_err(S3Error::from);
        if let Err(Ok(piece)) = reply.send(result) {
            delete_pieces(&state, &[piece]).await;
        }
    });
    answer.await.map_err(|_| S3Error::internal("the task storing a piece failed"))?
}

/// [`commit`] in a task of its own, so that it and the cleanup after it run to their end even if
/// the client goes away, with the bucket held (it is not deleted meanwhile; if it was deleted
/// during the upload, the pieces go and the answer is NoSuchBucket).
async fn commit_in_bucket(
    state: &Arc<S3State>,
    bucket_name: &str,
    key: &str,
    object: ObjectRecord,
    last: Option<LastPiece>,
    condition: Option<WriteCondition>,
) -> Result<u128, S3Error> {
    let (state, bucket_name, key) = (state.clone(), bucket_name.to_string(), key.to_string());
    tokio::spawn(async move {
        let _bucket_guard = state.buckets_lock.read().await;
        let bucket = match buckets::find(&state, &bucket_name).await {
            Ok(bucket) => bucket,
            Err(e) => {
                delete_pieces(&state, &object.pieces).await;
                return Err(e);
            }
        };
        let partition = model::partition_of(&bucket.partitions, &key);
        Ok(commit(&state, partition, &bucket_name, &key, object, last, condition).await?)
    })
    .await
    .map_err(|e| S3Error::internal(format!("the commit task failed: {e}")))?
}

/// A commit that failed, and whether its record may be live all the same (its put failed, yet
/// may have reached the disk).
#[derive(Debug)]
pub struct CommitError {
    pub error: S3Error,
    pub record_may_live: bool,
    /// The last piece written with the record was refused (no room for it there): neither was
    /// written, and the piece may go elsewhere.
    pub piece_refused: bool,
}

impl CommitError {
    fn new(error: S3Error, record_may_live: bool) -> Self {
        Self { error, record_may_live, piece_refused: false }
    }
}

impl From<CommitError> for S3Error {
    fn from(e: CommitError) -> Self {
        e.error
    }
}

/// Makes `object` the current version of `key` in `space` (on `partition`), with `last` its
/// last piece: [`commit_locked`] under the name's lock, then the superseded pieces are deleted.
/// The object's pieces are the write's own: a commit that fails with no record that may live
/// deletes them.
///
/// A standalone node writes the last piece with the record, in the record's partition, in one
/// group commit; if that volume has no room for it, it goes where there is, before the record. A
/// cluster stores it first (a piece's replicas and a record's are chosen apart).
pub async fn commit(
    state: &Arc<S3State>,
    partition: u32,
    space: &str,
    key: &str,
    mut object: ObjectRecord,
    mut last: Option<LastPiece>,
    condition: Option<WriteCondition>,
) -> Result<u128, CommitError> {
    if state.front.cluster().is_some() {
        if let Some(piece) = last.take() {
            object.pieces.push(piece.store(state).await.map_err(|e| CommitError::new(e, false))?);
        }
    }
    let name_guard = lock_name(state, space, key).await;
    let committed = async {
        let with = last.as_ref().map(|piece| {
            let id = BlobId::generate(partition);
            object.pieces.push(Piece { id: id.to_bytes(), len: piece.size() });
            (id, piece.payload.clone())
        });
        match commit_locked(state, partition, space, key, &object, condition, None, with).await {
            Err(CommitError { piece_refused: true, .. }) => {
                let piece = last.take().expect("a piece was refused");
                object.pieces.pop();
                object.pieces.push(piece.store(state).await.map_err(|e| CommitError::new(e, false))?);
                commit_locked(state, partition, space, key, &object, condition, None, None).await
            }
            committed => committed,
        }
    }
    .await;
    drop(name_guard);
    // Its room in the upload budget is given back once it is stored (or not).
    drop(last);
    match committed {
        Ok((version, garbage)) => {
            delete_pieces(state, &garbage).await;
            Ok(version)
        }
        Err(e) => {
            if !e.record_may_live {
                delete_pieces(state, &object.pieces).await;
            }
            Err(e)
        }
    }
}

/// The lock of one name: every commit and delete of it holds it, so each sees what the one
/// before it left (a standalone node is the only writer of its names).
pub async fn lock_name(state: &Arc<S3State>, space: &str, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
    state.name_locks.lock(name_lock(space, name)).await
}

/// With the name's lock held: checks a write's condition against the versions there, writes
/// the record at a version above all of them (`version`, when the caller chose it so under the
/// same lock), then deletes the superseded records. The pieces they held, but none the new
/// version holds, are returned: the caller deletes them once the lock is released. Nothing is
/// written that could be withdrawn later, so no reader ever sees a version that does not stay.
///
/// The versions there are read before the write when a condition must be checked first or the
/// store cannot tell them with the write (a cluster's quorum read); otherwise the write answers
/// them, read in the volume writer's transaction (one step, no read of its own).
///
/// `with`: the last piece of `object` (its id, on `partition`, among the object's pieces) and its
/// bytes, written with the record ([`Front::put_name_with_piece`](crate::front::Front)). If the
/// volume refuses the piece, nothing is written and the error says so (`piece_refused`).
#[allow(clippy::too_many_arguments)]
pub async fn commit_locked(
    state: &Arc<S3State>,
    partition: u32,
    space: &str,
    key: &str,
    object: &ObjectRecord,
    condition: Option<WriteCondition>,
    version: Option<u128>,
    mut with: Option<(BlobId, Bytes)>,
) -> Result<(u128, Vec<Piece>), CommitError> {
    let before = |error: S3Error| CommitError::new(error, false);
    // Never a record that could not read back whole: its bytes are its pieces' and its own.
    let held = object.pieces.iter().map(|p| p.len).sum::<u64>() + object.inline.len() as u64;
    if held != object.size {
        return Err(before(S3Error::internal(format!(
            "an object of {} bytes was about to be committed with {held} bytes stored",
            object.size
        ))));
    }
    let read_first = condition.is_some() || state.front.cluster().is_some();
    let mut known = match read_first {
        true => Some(state.front.name_versions(partition, space, key).await.map_err(|e| before(e.into()))?),
        false => None,
    };
    if let (Some(condition), Some(versions)) = (condition, &known) {
        let failed =
            || before(S3Error::precondition_failed("at least one of the pre-conditions you specified did not hold"));
        // A delete marker is no object: If-None-Match: * writes over it, If-Match matches nothing.
        let newest = versions.last().filter(|(_, e)| !e.is_delete_marker()).map(|(v, _)| *v);
        if condition.none_match && newest.is_some() {
            return Err(failed());
        }
        if condition.matched.is_some() && condition.matched != newest {
            return Err(failed());
        }
    }
    // Above every version there, whatever the clock did (it may have stepped back across a
    // restart).
    let newest_known = known.as_ref().and_then(|v| v.last()).map(|(v, _)| *v);
    if let Some(newest) = newest_known {
        names::observe_version(newest);
    }
    let mut version =
        version.filter(|v| newest_known.is_none_or(|newest| *v > newest)).unwrap_or_else(names::new_version);
    let mut record =
        NameRecord::new(space.to_string(), key.to_string(), version, model::encode(&object.summary()), object.encode())
            .map_err(|e| before(S3Error::internal(e.to_string())))?;
    loop {
        // A put that failed may still have reached the disk (a volume that failed after
        // writing): its record may be live after a restart, unless the volume refused it first.
        let put = match with.take() {
            Some((blob_id, payload)) => {
                let piece = PutRequest { blob_id, meta: piece_meta(), payload, created_ms: now_ms(), expiry_ms: None };
                match state.front.put_name_with_piece(partition, &record, piece).await {
                    Ok(versions) => Ok(Some(versions)),
                    // Neither written: the piece may go elsewhere.
                    Err(PairError::Piece(e)) if refused_before_writing(&e) => {
                        return Err(CommitError { piece_refused: true, ..CommitError::new(e.into(), false) })
                    }
                    // The piece may be stored: it is among the object's pieces, which go with a
                    // record that cannot live.
                    Err(PairError::Piece(e) | PairError::Record(e)) => Err(e),
                }
            }
            None => state.front.put_name(partition, &record, now_ms()).await,
        };
        let answered = put.map_err(|e| {
            let may_live = !refused_before_writing(&e);
            CommitError::new(e.into(), may_live)
        })?;
        let others: Vec<(u128, names::NameEntry)> =
            known.take().or(answered).unwrap_or_default().into_iter().filter(|(v, _)| *v != version).collect();
        // Not read first, a version above this one (made before a restart by a clock that was
        // ahead) shows only now: this record would never be current. It is withdrawn (it was
        // never acknowledged, and is older than what readers see) and written again above.
        if let Some(newest) = others.iter().map(|(v, _)| *v).filter(|newest| *newest > version).max() {
            names::observe_version(newest);
            state.front.delete(record.id(partition)).await.map_err(|e| CommitError::new(e.into(), true))?;
            version = names::new_version();
            record = NameRecord::new(record.space, record.name, version, record.summary, record.body)
                .map_err(|e| before(S3Error::internal(e.to_string())))?;
            continue;
        }
        // Committed: whatever happens to the cleanup, the write succeeded (what it could not
        // delete stays unreferenced, as after a crash). A version that shares pieces with this
        // one (a multipart upload completed again) keeps them.
        let mut garbage = Vec::new();
        for (_, entry) in others {
            match delete_record(state, entry.blob_id()).await {
                Ok(pieces) => garbage.extend(without(pieces, &object.pieces)),
                Err(e) => {
                    tracing::warn!(key, error = %e, "deleting a superseded version failed; it stays, unreferenced")
                }
            }
        }
        return Ok((version, garbage));
    }
}

/// Whether a volume refused a put before writing anything (no room, paused, a record that does
/// not fit or conflicts), so that no record of it can be live after a restart.
fn refused_before_writing(error: &FrontError) -> bool {
    matches!(
        error,
        FrontError::Volume(
            VolumeError::Full
                | VolumeError::NoRoom { .. }
                | VolumeError::Paused { .. }
                | VolumeError::TooLarge { .. }
                | VolumeError::Conflict
                | VolumeError::Integrity(_)
        )
    )
}

/// What CopyObject (`CopyObjectResult`) and UploadPartCopy (`CopyPartResult`) answer.
#[derive(Serialize)]
struct CopyResult {
    #[serde(rename = "@xmlns")]
    xmlns: &'static str,
    #[serde(rename = "LastModified")]
    last_modified: String,
    #[serde(rename = "ETag")]
    etag: String,
}

/// A copy's answer: `root` names the document, `version` gives its time.
pub fn copy_result(root: &str, version: u128, etag: &str) -> Response {
    let result = CopyResult {
        xmlns: xml::NAMESPACE,
        last_modified: xml::timestamp(names::version_ms(version)),
        etag: format!("\"{etag}\""),
    };
    let mut response = (StatusCode::OK, xml::document_as(root, &result)).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/xml"));
    response
}

/// The object `x-amz-copy-source` names: `<bucket>/<key>[?versionId=null]`.
pub fn copy_source(headers: &HeaderMap) -> Result<(String, String), S3Error> {
    // `<bucket>/<key>[?versionId=…]`, the key percent-encoded: the query is split off before
    // decoding, so a key that holds `?` (sent as %3F) stays whole.
    let raw = headers.get("x-amz-copy-source").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let (raw_source, query) = raw.split_once('?').map_or((raw, None), |(s, q)| (s, Some(q)));
    for (name, value) in super::sigv4::parse_query(query)? {
        match name.as_str() {
            "versionId" if value == "null" => {}
            "versionId" => return Err(S3Error::invalid_argument(
                "invalid version id in x-amz-copy-source: versioning is not supported, only the null version exists",
            )),
            _ => return Err(S3Error::invalid_argument("x-amz-copy-source takes only a versionId after the key")),
        }
    }
    let source = percent_encoding::percent_decode_str(raw_source)
        .decode_utf8()
        .map_err(|_| S3Error::invalid_argument("x-amz-copy-source is not UTF-8 once decoded"))?
        .into_owned();
    let (source_bucket, source_key) = source
        .trim_start_matches('/')
        .split_once('/')
        .filter(|(b, k)| !b.is_empty() && !k.is_empty())
        .ok_or_else(|| S3Error::invalid_argument("copy source must be <bucket>/<key>"))?;
    model::check_key(source_key)?;
    Ok((source_bucket.to_string(), source_key.to_string()))
}

/// A copy's `x-amz-copy-source-if-*` conditions against its source.
pub fn check_copy_source_conditions(headers: &HeaderMap, source: &Current) -> Result<(), S3Error> {
    check_read_conditions(headers, source, "x-amz-copy-source-").map(|_| ())
}

async fn copy_object(
    state: &Arc<S3State>,
    request: S3Request,
    bucket_name: &str,
    key: &str,
) -> Result<Response, S3Error> {
    let (source_bucket, source_key) = copy_source(&request.headers)?;
    let (source_bucket, source_key) = (source_bucket.as_str(), source_key.as_str());
    let from_bucket = buckets::find(state, source_bucket).await?;
    let bucket = buckets::find(state, bucket_name).await?;
    // The destination's own conditions (If-None-Match: *, If-Match), as for PutObject.
    let condition = write_condition(state, &request.headers, &bucket, bucket_name, key).await?;
    let source_object = current(state, &from_bucket, source_bucket, source_key)
        .await?
        .ok_or_else(|| S3Error::no_such_key(source_key))?;
    check_copy_source_conditions(&request.headers, &source_object)?;
    let replace = match request.header("x-amz-metadata-directive").unwrap_or("COPY") {
        "COPY" => false,
        "REPLACE" => true,
        _ => return Err(S3Error::invalid_argument("x-amz-metadata-directive is COPY or REPLACE")),
    };
    if !replace && source_bucket == bucket_name && source_key == key {
        return Err(S3Error::invalid_request(
            "this copy request is illegal because it is trying to copy an object to itself without changing the object's metadata",
        ));
    }
    let mut object = source_object.object.clone();
    if replace {
        let meta = object_meta(&request.headers)?;
        object.content_type = meta.content_type;
        object.user_meta = meta.user_meta;
        object.headers = meta.headers;
    }
    // The bytes are copied: every version owns its pieces, so deleting one never touches another's.
    let (pieces, digests) = copy_range(state, &source_object.object.pieces, 0, source_object.object.size, None).await?;
    if object.inline.is_empty() {
        // A copy is one object put whole: its ETag is its MD5 (a multipart source's was not).
        object.etag = hex::encode(digests.md5);
    }
    object.parts = Vec::new();
    object.pieces = pieces;
    let etag = object.etag.clone();
    let version = commit_in_bucket(state, bucket_name, key, object, None, condition).await?;
    Ok(copy_result("CopyObjectResult", version, &etag))
}

/// Copies the bytes `[start, end)` of an object stored in `pieces` into new pieces (none of
/// them longer than a source piece); their MD5 and, when asked, their checksum. On failure (or
/// if dropped) deletes what it stored.
pub async fn copy_range(
    state: &Arc<S3State>,
    pieces: &[Piece],
    start: u64,
    end: u64,
    algorithm: Option<Algorithm>,
) -> Result<(Vec<Piece>, checksum::FinishedDigests), S3Error> {
    let mut copied = StoredPieces::new(state);
    let mut digests = BodyDigests::new(false, algorithm);
    let mut at = 0u64;
    for piece in pieces {
        let (from, to) = (start.max(at), end.min(at + piece.len));
        at += piece.len;
        if from >= to {
            continue;
        }
        let (from, to) = (from - (at - piece.len), to - (at - piece.len));
        // The bytes are held in memory while copied: counted as an upload's would be.
        let room = state.uploads.reserve(to - from).await.ok_or_else(|| {
            S3Error::slow_down("the node is receiving as many uploads as its memory allows; try again shortly")
        })?;
        let reader = state.front.open(piece.blob_id()?).await.map_err(|e| {
            if e.is_deleted() {
                S3Error::service_unavailable("the copy's source was overwritten or deleted during the copy; try again")
            } else {
                e.into()
            }
        })?;
        let data = reader.read(from, to).await?;
        digests.update(&data);
        copied.push(store_piece(state, data, Some(room)).await?);
    }
    Ok((copied.take(), digests.finish()))
}

// ---------------------------------------------------------------------------------------------
// GetObject, HeadObject

/// Whether an `If-Match` / `If-None-Match` list names `etag` (`*` names any).
fn etag_matches(list: &str, etag: &str) -> bool {
    list.split(',').map(|t| t.trim().trim_start_matches("W/").trim_matches('"')).any(|t| t == "*" || t == etag)
}

fn http_date_secs(value: Option<&HeaderValue>) -> Option<u64> {
    let text = value?.to_str().ok()?;
    let time = httpdate::parse_http_date(text).ok()?;
    Some(time.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs())
}

/// RFC 7232's evaluation order, as S3 applies it (`prefix`: `""` for a GET, `x-amz-copy-source-`
/// for a copy's source, where 304 becomes 412).
fn check_read_conditions(headers: &HeaderMap, current: &Current, prefix: &str) -> Result<Option<StatusCode>, S3Error> {
    let get = |name: &str| headers.get(format!("{prefix}{name}").as_str());
    let modified_secs = current.last_modified_ms() / 1000;
    let failed = || S3Error::precondition_failed("at least one of the pre-conditions you specified did not hold");
    let if_match = get("if-match").and_then(|v| v.to_str().ok());
    let if_none_match = get("if-none-match").and_then(|v| v.to_str().ok());
    if let Some(list) = if_match {
        if !etag_matches(list, &current.object.etag) {
            return Err(failed());
        }
    } else if let Some(since) = http_date_secs(get("if-unmodified-since")) {
        if modified_secs > since {
            return Err(failed());
        }
    }
    let not_modified = if let Some(list) = if_none_match {
        etag_matches(list, &current.object.etag)
    } else if let Some(since) = http_date_secs(get("if-modified-since")) {
        // S3 reads If-Modified-Since when If-Match, if given, held.
        modified_secs <= since
    } else {
        false
    };
    if not_modified {
        if prefix.is_empty() {
            return Ok(Some(StatusCode::NOT_MODIFIED));
        }
        return Err(failed());
    }
    Ok(None)
}

/// A single `bytes=` range over `len` bytes: `[start, end)`, `None` for the whole object.
/// S3 serves one range; a list of ranges is served whole, as S3 does.
fn parse_range(value: Option<&str>, len: u64) -> Result<Option<(u64, u64)>, S3Error> {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else { return Ok(None) };
    if spec.contains(',') {
        return Ok(None);
    }
    let unsatisfiable = || S3Error {
        resource: Some(format!("bytes */{len}")),
        ..S3Error::invalid_range("the requested range is not satisfiable")
    };
    // A range that does not parse is ignored (RFC 9110 §14.2): the whole object.
    let Some((first, last)) = spec.split_once('-') else { return Ok(None) };
    let parse = |s: &str| s.trim().parse::<u64>().ok();
    let number = |s: &str| parse(s).ok_or_else(unsatisfiable);
    if (!first.trim().is_empty() && parse(first).is_none()) || (!last.trim().is_empty() && parse(last).is_none()) {
        return Ok(None);
    }
    let (start, end) = match (first.trim().is_empty(), last.trim().is_empty()) {
        (true, true) => return Ok(None),
        (true, false) => {
            let suffix = number(last)?;
            if suffix == 0 {
                return Err(unsatisfiable());
            }
            (len.saturating_sub(suffix), len)
        }
        (false, true) => (number(first)?, len),
        (false, false) => {
            let (a, b) = (number(first)?, number(last)?);
            if b < a {
                // Not a valid range: ignored (RFC 9110), the whole object.
                return Ok(None);
            }
            (a, b.saturating_add(1).min(len))
        }
    };
    if start >= len {
        return Err(unsatisfiable());
    }
    Ok(Some((start, end)))
}

async fn get_object(
    state: &Arc<S3State>,
    request: S3Request,
    bucket_name: &str,
    key: &str,
) -> Result<Response, S3Error> {
    // A version overwritten or deleted between reading its record and opening its pieces is
    // gone: read the key again (its new version, or NoSuchKey). The same version twice with a
    // piece gone is an object that lost bytes: a 500, not a retry.
    let mut last_version = None;
    for _ in 0..3 {
        // A request without its (empty) body, owned by each try.
        let attempt = S3Request {
            method: request.method.clone(),
            target: request.target.clone(),
            query: request.query.clone(),
            headers: request.headers.clone(),
            body: Body::empty(),
            signature: request.signature.clone(),
            access: request.access.clone(),
        };
        match get_object_once(state, attempt, bucket_name, key).await? {
            Ok(response) => return Ok(response),
            Err(version) if last_version == Some(version) => {
                return Err(S3Error::internal(format!(
                    "a piece of the current version of {key:?} is missing: the object cannot be read"
                )))
            }
            Err(version) => last_version = Some(version),
        }
    }
    Err(S3Error::service_unavailable("the object changed under every read; try again"))
}

/// GetObject / HeadObject of the key's current version; `Err(version)` if a piece of that
/// version was deleted (it was superseded meanwhile, or lost).
async fn get_object_once(
    state: &Arc<S3State>,
    request: S3Request,
    bucket_name: &str,
    key: &str,
) -> Result<Result<Response, u128>, S3Error> {
    let bucket = buckets::find(state, bucket_name).await?;
    let current = current(state, &bucket, bucket_name, key).await?.ok_or_else(|| S3Error::no_such_key(key))?;
    let object = &current.object;
    // `?partNumber=N`: the bytes of part N of a multipart object (part 1 of an object put whole
    // is all of it), as S3 serves them.
    let part = match request.param("partNumber") {
        None => None,
        Some(text) => {
            let n = super::multipart::parse_part_number(text)?;
            if object.parts.is_empty() && object.etag.contains('-') {
                return Err(S3Error::not_implemented(
                    "this multipart object was stored before parts were recorded: read its byte range",
                ));
            }
            if request.headers.contains_key(header::RANGE) {
                return Err(S3Error::invalid_request("a request takes a Range header or ?partNumber, not both"));
            }
            let count = object.parts.len().max(1);
            if n as usize > count {
                return Err(S3Error::invalid_part_number(format!(
                    "the object has {count} part(s); part {n} is not satisfiable"
                )));
            }
            let start: u64 = object.parts.iter().take(n as usize - 1).sum();
            Some((start, start + object.parts.get(n as usize - 1).copied().unwrap_or(object.size)))
        }
    };
    let mut headers = HeaderMap::new();
    if part.is_some() && !object.parts.is_empty() {
        headers.insert("x-amz-mp-parts-count", HeaderValue::from(object.parts.len()));
    }
    headers.insert(header::ETAG, quoted(&object.etag));
    headers.insert(
        header::LAST_MODIFIED,
        HeaderValue::from_str(&xml::http_date(current.last_modified_ms())).expect("ascii"),
    );
    if let Some(status) = check_read_conditions(&request.headers, &current, "")? {
        return Ok(Ok((status, headers).into_response()));
    }
    let len = object.size;
    let range = match part {
        // A part of a multipart object is a range of it (206); part 1 of an object put whole is
        // all of it (200); an empty part has no range to name (206, no Content-Range).
        Some(bounds) if !object.parts.is_empty() => Ok(Some(bounds)),
        Some(_) => Ok(None),
        None => parse_range(request.header("range"), len),
    };
    let range = match range {
        Ok(range) => range,
        Err(e) => {
            let mut response = e.into_response();
            response
                .headers_mut()
                .insert(header::CONTENT_RANGE, HeaderValue::from_str(&format!("bytes */{len}")).expect("ascii"));
            return Ok(Ok(response));
        }
    };
    let (start, end) = range.unwrap_or((0, len));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    let set = |h: &mut HeaderMap, name: &str, value: &str| {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            h.insert(n, v);
        }
    };
    set(&mut headers, "content-type", &object.content_type);
    for (name, value) in &object.headers {
        set(&mut headers, name, value);
    }
    for (name, value) in &object.user_meta {
        set(&mut headers, &format!("x-amz-meta-{name}"), value);
    }
    if request.method == Method::GET {
        for (param, name) in RESPONSE_OVERRIDES {
            if let Some(value) = request.param(param) {
                set(&mut headers, name, value);
            }
        }
    }
    if let (Some(c), None, Some("ENABLED")) = (&object.checksum, range, request.header("x-amz-checksum-mode")) {
        set(&mut headers, c.algorithm.header(), &c.text());
        headers.insert("x-amz-checksum-type", HeaderValue::from_static("FULL_OBJECT"));
    }
    let status = match range {
        // (An empty part: no byte to name in a Content-Range.)
        Some(_) if start == end => StatusCode::PARTIAL_CONTENT,
        Some(_) => {
            set(&mut headers, "content-range", &format!("bytes {start}-{}/{len}", end - 1));
            StatusCode::PARTIAL_CONTENT
        }
        None => StatusCode::OK,
    };
    if request.method == Method::HEAD {
        return Ok(Ok((status, headers).into_response()));
    }
    let body = if object.pieces.is_empty() {
        Body::from(Bytes::copy_from_slice(object.inline.get(start as usize..end as usize).unwrap_or_default()))
    } else {
        match object_body(state, &object.pieces, start, end).await? {
            Some(body) => body,
            None => return Ok(Err(current.version)),
        }
    };
    Ok(Ok((status, headers, body).into_response()))
}

/// The bytes `[start, end)` of an object, streamed piece by piece. Every piece is opened before
/// the answer starts: a lost piece is a 500, not a cut body, and an overwrite or delete that
/// comes meanwhile (which deletes the old pieces) does not cut a read already answering — an
/// open piece stays readable. A piece that fails its checksum while streaming aborts the
/// connection: never wrong bytes.
/// `None` if a piece was deleted before it could be opened (the version was superseded).
async fn object_body(state: &Arc<S3State>, pieces: &[Piece], start: u64, end: u64) -> Result<Option<Body>, S3Error> {
    let mut opened = Vec::new();
    let mut at = 0u64;
    for piece in pieces {
        let (from, to) = (start.max(at), end.min(at + piece.len));
        if from < to {
            match state.front.open(piece.blob_id()?).await {
                Ok(reader) => opened.push((reader, from - at, to - at)),
                Err(e) if e.is_deleted() => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
        at += piece.len;
    }
    // The first piece's first chunk is read (and verified) before the answer starts, as the
    // blob API does: a checksum error there is a 500.
    let mut opened = opened.into_iter();
    let first = match opened.next() {
        Some((reader, from, to)) => {
            Some(stream_piece(reader, from, to).await.map_err(|e| S3Error::internal(e.to_string()))?)
        }
        None => None,
    };
    let first =
        futures::stream::iter(first).flat_map(|body| body.into_data_stream().map(|r| r.map_err(std::io::Error::other)));
    let rest = futures::stream::iter(opened)
        .then(|(reader, from, to)| async move {
            stream_piece(reader, from, to).await.map_err(|e| std::io::Error::other(e.to_string()))
        })
        .flat_map(|body| match body {
            Ok(body) => body.into_data_stream().map(|r| r.map_err(std::io::Error::other)).boxed(),
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        });
    let stream = first.chain(rest);
    Ok(Some(Body::from_stream(stream)))
}

/// A piece's bytes `[from, to)` as a body: a local one read and verified as the blob API reads
/// (its first chunk before the answer starts), a peer's streamed as it comes.
async fn stream_piece(reader: PieceReader, from: u64, to: u64) -> Result<Body, S3Error> {
    match reader {
        PieceReader::Local(reader) => {
            crate::api::blobs::stream_payload(*reader, from, to).await.map_err(|e| S3Error::internal(e.to_string()))
        }
        PieceReader::Remote { cluster, id, .. } => {
            let response = PieceReader::stream_remote(&cluster, id, from, to).await?;
            Ok(Body::from_stream(response.bytes_stream()))
        }
    }
}

pub fn quoted(etag: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{etag}\"")).expect("an etag is hex")
}

/// What a listing shows of a current name.
pub fn summary_of(bytes: &[u8]) -> Result<ObjectSummary, S3Error> {
    model::decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_9110_as_s3_serves_them() {
        let r = |v: &str, len| parse_range(Some(v), len);
        assert_eq!(r("bytes=0-9", 100).unwrap(), Some((0, 10)));
        assert_eq!(r("bytes=90-200", 100).unwrap(), Some((90, 100)));
        assert_eq!(r("bytes=-10", 100).unwrap(), Some((90, 100)));
        assert_eq!(r("bytes=-200", 100).unwrap(), Some((0, 100)));
        assert_eq!(r("bytes=10-", 100).unwrap(), Some((10, 100)));
        assert_eq!(r("bytes=99-99", 100).unwrap(), Some((99, 100)));
        assert_eq!(r("bytes=100-", 100).unwrap_err().code, "InvalidRange");
        assert_eq!(r("bytes=0-0", 0).unwrap_err().code, "InvalidRange");
        assert_eq!(r("bytes=-0", 100).unwrap_err().code, "InvalidRange");
        assert_eq!(r("bytes=5-2", 100).unwrap(), None);
        assert_eq!(r("bytes=0-1,5-6", 100).unwrap(), None);
        assert_eq!(parse_range(Some("items=0-1"), 100).unwrap(), None);
        // The largest numbers do not overflow; what does not parse is ignored.
        assert_eq!(r("bytes=0-18446744073709551615", 100).unwrap(), Some((0, 100)));
        assert_eq!(r("bytes=18446744073709551615-", 100).unwrap_err().code, "InvalidRange");
        assert_eq!(r("bytes=abc", 100).unwrap(), None);
        assert_eq!(r("bytes=1-x", 100).unwrap(), None);
        assert_eq!(r("bytes=-", 100).unwrap(), None);
    }

    #[test]
    fn aws_chunked_is_not_stored_as_the_objects_encoding() {
        let mut h = HeaderMap::new();
        h.insert("content-encoding", HeaderValue::from_static("gzip, aws-chunked"));
        assert_eq!(object_meta(&h).unwrap().headers, vec![("content-encoding".to_string(), "gzip".to_string())]);
        h.insert("content-encoding", HeaderValue::from_static("aws-chunked"));
        assert!(object_meta(&h).unwrap().headers.is_empty());
    }

    #[test]
    fn etag_lists_match_as_http_says() {
        assert!(etag_matches("\"abc\"", "abc"));
        assert!(etag_matches("\"x\", \"abc\"", "abc"));
        assert!(etag_matches("*", "abc"));
        assert!(etag_matches("W/\"abc\"", "abc"));
        assert!(!etag_matches("\"abd\"", "abc"));
    }
}
