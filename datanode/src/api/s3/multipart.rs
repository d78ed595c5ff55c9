//! Multipart upload: CreateMultipartUpload, UploadPart, UploadPartCopy, CompleteMultipartUpload,
//! AbortMultipartUpload, ListParts, ListMultipartUploads.
//!
//! An upload is a name record ([`model::UploadRecord`]) and each part another (an
//! [`ObjectRecord`] whose bytes are pieces), both in the partition of the upload's key. A part
//! uploaded again supersedes the earlier one as an object's new version does. Completing
//! writes the object's record listing the parts' pieces in order — the commit point — then
//! deletes the upload's records but not the pieces the object took over. Aborting deletes the
//! upload's records and pieces.
//!
//! Completing, aborting and the commit of a part exclude one another for one upload (the upload's
//! own lock), so that no part's pieces are deleted while an object takes them over; and all of
//! them run under the bucket lock for reading, so that deleting a bucket (which aborts its
//! uploads) waits for them. A completion first marks its upload *completing*, naming the version
//! its object's record will have: a completing upload takes no part, and a completion retried
//! (its answer lost, or its cleanup cut by a crash) finds out by that record's id whether it
//! happened. Aborting keeps every piece the key's current object points at.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use super::error::S3Error;
use super::model::{self, BucketRecord, Completion, ObjectRecord, Piece, UploadRecord, MAX_PARTS, MIN_PART_BYTES};
use super::objects::{self, BodyReader};
use super::{buckets, small_body, xml, xml_response, S3Request, S3State};
use crate::engine::names::{self, NameRecord};
use crate::engine::now_ms;

/// An upload found by key and id.
struct Upload {
    partition: u32,
    record: UploadRecord,
}

/// The upload `upload_id` of `key`, still open to parts and listings (not completing), or
/// NoSuchUpload.
async fn find_open_upload(
    state: &Arc<S3State>,
    bucket: &BucketRecord,
    bucket_name: &str,
    key: &str,
    upload_id: &str,
) -> Result<Upload, S3Error> {
    let upload = find_upload(state, bucket, bucket_name, key, upload_id).await?;
    if upload.record.completing.is_some() {
        return Err(S3Error::no_such_upload(upload_id));
    }
    Ok(upload)
}

/// The upload `upload_id` of `key`, or NoSuchUpload.
async fn find_upload(
    state: &Arc<S3State>,
    bucket: &BucketRecord,
    bucket_name: &str,
    key: &str,
    upload_id: &str,
) -> Result<Upload, S3Error> {
    if !model::is_upload_id(upload_id) {
        return Err(S3Error::no_such_upload(upload_id));
    }
    let partition = model::partition_of(&bucket.partitions, key);
    let space = model::uploads_space(bucket_name);
    let name = model::upload_name(key, upload_id);
    let (_, _, record) = objects::current_record(state, partition, &space, &name)
        .await?
        .ok_or_else(|| S3Error::no_such_upload(upload_id))?;
    Ok(Upload { partition, record: model::decode(&record.body)? })
}

/// Requests to an object that belong to a multipart upload (`?uploads` or `?uploadId=`).
pub async fn object(state: &Arc<S3State>, request: S3Request, bucket: &str, key: &str) -> Result<Response, S3Error> {
    use axum::http::Method;
    let upload_id = request.param("uploadId").map(str::to_string);
    match (&request.method, upload_id) {
        (m, None) if m == Method::POST && request.has_param("uploads") => create(state, request, bucket, key).await,
        (m, Some(id)) if m == Method::PUT && request.has_param("partNumber") => {
            upload_part(state, request, bucket, key, &id).await
        }
        (m, Some(id)) if m == Method::POST => complete(state, request, bucket, key, &id).await,
        (m, Some(id)) if m == Method::DELETE => abort(state, bucket, key, &id).await,
        (m, Some(id)) if m == Method::GET => list_parts(state, request, bucket, key, &id).await,
        (m, Some(_)) if m == Method::PUT => {
            Err(S3Error::invalid_argument("an UploadPart request names its part with ?partNumber="))
        }
        _ => Err(S3Error::method_not_allowed("the specified method is not allowed against this resource")),
    }
}

// ---------------------------------------------------------------------------------------------
// CreateMultipartUpload

#[derive(Serialize)]
#[serde(rename = "InitiateMultipartUploadResult")]
struct InitiateMultipartUploadResult {
    #[serde(rename = "@xmlns")]
    xmlns: &'static str,
    #[serde(rename = "Bucket")]
    bucket: String,
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "UploadId")]
    upload_id: String,
}

async fn create(state: &Arc<S3State>, request: S3Request, bucket_name: &str, key: &str) -> Result<Response, S3Error> {
    let meta = objects::object_meta(&request.headers)?;
    let checksum = request.header("x-amz-checksum-algorithm").map(super::checksum::Algorithm::from_name).transpose()?;
    let record = UploadRecord {
        content_type: meta.content_type,
        user_meta: meta.user_meta,
        headers: meta.headers,
        checksum,
        initiated_ms: now_ms(),
        completing: None,
    };
    let upload_id = model::new_upload_id();
    let (state2, bucket_name2, key2, id2) =
        (state.clone(), bucket_name.to_string(), key.to_string(), upload_id.clone());
    tokio::spawn(async move {
        let _bucket_guard = state2.buckets_lock.read().await;
        let bucket = buckets::find(&state2, &bucket_name2).await?;
        let partition = model::partition_of(&bucket.partitions, &key2);
        write_upload(&state2, partition, &bucket_name2, &key2, &id2, &record).await
    })
    .await
    .map_err(|e| S3Error::internal(format!("the upload task failed: {e}")))??;
    let mut response = xml_response(&InitiateMultipartUploadResult {
        xmlns: xml::NAMESPACE,
        bucket: bucket_name.to_string(),
        key: key.to_string(),
        upload_id,
    });
    if let Some(algorithm) = checksum {
        response.headers_mut().insert("x-amz-checksum-algorithm", HeaderValue::from_static(algorithm.name()));
    }
    Ok(response)
}

// ---------------------------------------------------------------------------------------------
// UploadPart, UploadPartCopy

fn part_number(request: &S3Request) -> Result<u32, S3Error> {
    parse_part_number(request.param("partNumber").unwrap_or_default())
}

/// A part number: digits only, 1 to 10,000.
pub fn parse_part_number(text: &str) -> Result<u32, S3Error> {
    Some(text)
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse::<u32>().ok())
        .filter(|n| (1..=MAX_PARTS).contains(n))
        .ok_or_else(|| {
            S3Error::invalid_argument(format!("part number must be an integer between 1 and {MAX_PARTS}, inclusive"))
        })
}

async fn upload_part(
    state: &Arc<S3State>,
    mut request: S3Request,
    bucket_name: &str,
    key: &str,
    upload_id: &str,
) -> Result<Response, S3Error> {
    let number = part_number(&request)?;
    let bucket = buckets::find(state, bucket_name).await?;
    let upload = find_open_upload(state, &bucket, bucket_name, key, upload_id).await?;
    let copy = request.headers.contains_key("x-amz-copy-source");
    let part = if copy {
        copy_part(state, &request.headers, upload.record.checksum).await?
    } else {
        let mut reader = BodyReader::new(&request, state.options.max_object_bytes)?;
        let body = std::mem::replace(&mut request.body, Body::empty());
        // Never inline: the completed object's bytes are its parts' pieces.
        let objects::StoredBody { pieces, last, .. } =
            objects::store_body(state, &mut reader, body.into_data_stream(), 0).await?;
        // Until the part's commit takes them, the pieces go if anything fails or the request is
        // dropped.
        let mut pieces = objects::StoredPieces::holding(state, pieces);
        let read = reader.finish()?;
        // Stored now, where there is most room, not with the part's record: every part's record
        // lives in the upload's partition, and an upload's bytes would all go to one volume.
        if let Some(last) = last {
            pieces.push(last.store(state).await?);
        }
        // An upload created with a checksum algorithm takes parts that carry that checksum.
        if let Some(algorithm) = upload.record.checksum {
            if read.checksum.as_ref().map(|c| c.algorithm) != Some(algorithm) {
                return Err(S3Error::invalid_request(format!(
                    "the upload was created with checksum algorithm {}: each part carries its {}",
                    algorithm.name(),
                    algorithm.header()
                )));
            }
        }
        ObjectRecord {
            size: read.len,
            etag: hex::encode(read.md5),
            content_type: String::new(),
            user_meta: Vec::new(),
            headers: Vec::new(),
            checksum: read.checksum,
            pieces: pieces.take(),
            inline: Vec::new(),
            parts: Vec::new(),
        }
    };
    let version = commit_part(state, bucket_name, key, upload_id, number, part.clone()).await?;
    if copy {
        return Ok(objects::copy_result("CopyPartResult", version, &part.etag));
    }
    let mut response = StatusCode::OK.into_response();
    let h = response.headers_mut();
    h.insert(header::ETAG, objects::quoted(&part.etag));
    if let Some(c) = &part.checksum {
        h.insert(HeaderName::from_static(c.algorithm.header()), HeaderValue::from_str(&c.text()).expect("base64"));
    }
    Ok(response)
}

/// Makes `part` the upload's part `number`, in a task of its own (it and its cleanup run to
/// their end if the client goes away), with the bucket held and the upload locked: an upload
/// completed or aborted meanwhile takes no part after it (the pieces go; NoSuchUpload).
async fn commit_part(
    state: &Arc<S3State>,
    bucket_name: &str,
    key: &str,
    upload_id: &str,
    number: u32,
    part: ObjectRecord,
) -> Result<u128, S3Error> {
    let (state, bucket_name, key, upload_id) =
        (state.clone(), bucket_name.to_string(), key.to_string(), upload_id.to_string());
    tokio::spawn(async move {
        // The upload's lock first, then the bucket (see `complete`).
        let _upload_guard = state.upload_locks.lock(upload_id.clone()).await;
        let _bucket_guard = state.buckets_lock.read().await;
        let upload = async {
            let bucket = buckets::find(&state, &bucket_name).await?;
            find_open_upload(&state, &bucket, &bucket_name, &key, &upload_id).await
        }
        .await;
        let upload = match upload {
            Ok(upload) => upload,
            Err(e) => {
                objects::delete_pieces(&state, &part.pieces).await;
                return Err(e);
            }
        };
        let space = model::parts_space(&bucket_name);
        let name = model::part_name(&upload_id, number);
        Ok(objects::commit(&state, upload.partition, &space, &name, part, None, None).await?)
    })
    .await
    .map_err(|e| S3Error::internal(format!("the part's commit task failed: {e}")))?
}

/// UploadPartCopy: the part's bytes are a range of another object (`x-amz-copy-source`,
/// `x-amz-copy-source-range`), copied into pieces of the part's own.
async fn copy_part(
    state: &Arc<S3State>,
    headers: &HeaderMap,
    algorithm: Option<super::checksum::Algorithm>,
) -> Result<ObjectRecord, S3Error> {
    let (source_bucket, source_key) = objects::copy_source(headers)?;
    let from_bucket = buckets::find(state, &source_bucket).await?;
    let source = objects::current(state, &from_bucket, &source_bucket, &source_key)
        .await?
        .ok_or_else(|| S3Error::no_such_key(&source_key))?;
    objects::check_copy_source_conditions(headers, &source)?;
    let size = source.object.size;
    let (start, end) = match headers.get("x-amz-copy-source-range").and_then(|v| v.to_str().ok()) {
        None => (0, size),
        Some(value) => {
            let invalid = || {
                S3Error::invalid_argument(
                    "the x-amz-copy-source-range value must be of the form bytes=first-last where first and last are the zero-based offsets of the first and last bytes to copy",
                )
            };
            let (first, last) =
                value.trim().strip_prefix("bytes=").and_then(|r| r.split_once('-')).ok_or_else(invalid)?;
            let (first, last) = (
                first.trim().parse::<u64>().map_err(|_| invalid())?,
                last.trim().parse::<u64>().map_err(|_| invalid())?,
            );
            if first > last || last >= size {
                return Err(S3Error {
                    resource: Some(format!("bytes */{size}")),
                    ..S3Error::invalid_range("the requested range is not satisfiable")
                });
            }
            (first, last + 1)
        }
    };
    if end - start > state.options.max_object_bytes {
        return Err(S3Error::entity_too_large(format!(
            "a part copied is at most {} bytes",
            state.options.max_object_bytes
        )));
    }
    // The part's checksum is computed as it is copied when the upload names an algorithm.
    let (pieces, digests) = if source.object.pieces.is_empty() {
        // An inline source: its bytes are in its record.
        let data = bytes::Bytes::copy_from_slice(&source.object.inline[start as usize..end as usize]);
        let mut digests = super::checksum::BodyDigests::new(false, algorithm);
        digests.update(&data);
        let pieces = if data.is_empty() { Vec::new() } else { vec![objects::store_piece(state, data, None).await?] };
        (pieces, digests.finish())
    } else {
        objects::copy_range(state, &source.object.pieces, start, end, algorithm).await?
    };
    Ok(ObjectRecord {
        size: end - start,
        etag: hex::encode(digests.md5),
        content_type: String::new(),
        user_meta: Vec::new(),
        headers: Vec::new(),
        checksum: digests.checksum,
        pieces,
        inline: Vec::new(),
        parts: Vec::new(),
    })
}

// ---------------------------------------------------------------------------------------------
// CompleteMultipartUpload

#[derive(Debug, Deserialize)]
struct CompleteRequest {
    #[serde(rename = "Part", default)]
    parts: Vec<CompletedPart>,
}

#[derive(Debug, Deserialize)]
struct CompletedPart {
    #[serde(rename = "PartNumber")]
    number: u32,
    #[serde(rename = "ETag")]
    etag: String,
    #[serde(rename = "ChecksumCRC32")]
    crc32: Option<String>,
    #[serde(rename = "ChecksumCRC32C")]
    crc32c: Option<String>,
    #[serde(rename = "ChecksumCRC64NVME")]
    crc64nvme: Option<String>,
    #[serde(rename = "ChecksumSHA1")]
    sha1: Option<String>,
    #[serde(rename = "ChecksumSHA256")]
    sha256: Option<String>,
}

impl CompletedPart {
    /// The checksum the request gives for this part, if any.
    fn checksum(&self) -> Option<(super::checksum::Algorithm, &str)> {
        use super::checksum::Algorithm::*;
        [
            (Crc32, &self.crc32),
            (Crc32c, &self.crc32c),
            (Crc64Nvme, &self.crc64nvme),
            (Sha1, &self.sha1),
            (Sha256, &self.sha256),
        ]
        .into_iter()
        .find_map(|(a, v)| v.as_deref().map(|v| (a, v)))
    }
}

#[derive(Serialize)]
#[serde(rename = "CompleteMultipartUploadResult")]
struct CompleteMultipartUploadResult {
    #[serde(rename = "@xmlns")]
    xmlns: &'static str,
    #[serde(rename = "Location")]
    location: String,
    #[serde(rename = "Bucket")]
    bucket: String,
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "ETag")]
    etag: String,
}

/// S3's ETag of a multipart object: the MD5 of its parts' MD5s, a dash, the number of parts.
pub fn multipart_etag(part_md5s: &[[u8; 16]]) -> String {
    let mut md5 = Md5::new();
    for part in part_md5s {
        md5.update(part);
    }
    format!("{}-{}", hex::encode(md5.finalize()), part_md5s.len())
}

async fn complete(
    state: &Arc<S3State>,
    request: S3Request,
    bucket_name: &str,
    key: &str,
    upload_id: &str,
) -> Result<Response, S3Error> {
    buckets::find(state, bucket_name).await?;
    let headers = request.headers.clone();
    let body = small_body(request).await?;
    let asked: CompleteRequest = xml::parse(&body)?;
    if asked.parts.is_empty() {
        return Err(S3Error::malformed_xml("a CompleteMultipartUpload request names at least one part"));
    }
    if asked.parts.len() > MAX_PARTS as usize {
        return Err(S3Error::malformed_xml(format!("an upload has at most {MAX_PARTS} parts")));
    }
    if let Some(part) = asked.parts.iter().find(|p| !(1..=MAX_PARTS).contains(&p.number)) {
        return Err(S3Error::invalid_argument(format!(
            "part number {} is not an integer between 1 and {MAX_PARTS}, inclusive",
            part.number
        )));
    }
    if asked.parts.windows(2).any(|w| w[0].number >= w[1].number) {
        return Err(S3Error::invalid_part_order(
            "the list of parts was not in ascending order: parts must be ordered by part number",
        ));
    }
    let location = format!("/{bucket_name}/{}", percent_encoding::utf8_percent_encode(key, PATH));
    let result_names = (bucket_name.to_string(), key.to_string());
    let (state, bucket_name, key, upload_id) =
        (state.clone(), bucket_name.to_string(), key.to_string(), upload_id.to_string());
    let etag = tokio::spawn(async move {
        // The upload's lock, then the bucket, then the key's name: nothing waits for an
        // upload's lock while it holds the bucket (a bucket being created or deleted would stall
        // every writer behind it), and no other writer of the key comes between the marker and
        // the object's record.
        let upload_guard = state.upload_locks.lock(upload_id.clone()).await;
        let bucket_guard = state.buckets_lock.read().await;
        let bucket = buckets::find(&state, &bucket_name).await?;
        let upload = find_upload(&state, &bucket, &bucket_name, &key, &upload_id).await?;
        let name_guard = objects::lock_name(&state, &bucket_name, &key).await;
        if let Some(completion) = &upload.record.completing {
            // A completion was here before: its answer lost, or cut by a crash. Its object's
            // record id is known (the version was chosen before the marker was written): if it
            // was written — whether current still or superseded since — the upload completed
            // and this retry gets the same answer; if never, this completion goes on afresh.
            let id = names::name_id(upload.partition, &bucket_name, &key, completion.version);
            let committed = match state.front.name_record(id).await {
                Ok(_) => true,
                Err(e) if e.is_deleted() => true,
                Err(e) if e.is_not_found() => false,
                Err(e) => return Err(e.into()),
            };
            if committed {
                drop(name_guard);
                let keep = objects::current_pieces(&state, &bucket, &bucket_name, &key).await?;
                drop((bucket_guard, upload_guard));
                forget_later(&state, &bucket_name, &key, &upload_id, upload.partition, keep);
                return Ok(completion.etag.clone());
            }
        }
        // The destination's conditions, as for PutObject (checked here, so that a retried
        // completion answers above before they are; the commit checks them again).
        let condition = objects::write_condition(&state, &headers, &bucket, &bucket_name, &key).await?;
        let object = assemble(&state, &bucket_name, &upload_id, &upload, &asked.parts).await?;
        if upload.record.completing.is_some() {
            // Marked and never committed (as far as the index still remembers: a tombstone
            // compaction purged looks the same): the parts must all be there still.
            for piece in &object.pieces {
                if let Err(e) = state.front.open(piece.blob_id()?).await {
                    tracing::warn!(upload_id, error = %e, "a marked upload lost a piece; it is over");
                    drop(name_guard);
                    let keep = objects::current_pieces(&state, &bucket, &bucket_name, &key).await?;
                    drop((bucket_guard, upload_guard));
                    forget_later(&state, &bucket_name, &key, &upload_id, upload.partition, keep);
                    return Err(S3Error::no_such_upload(&upload_id));
                }
            }
        }
        // The record lists every piece: it must fit in a blob.
        let record_bytes = object.encode().len() as u64 + 4096;
        let max_blob = state.front.max_blob_bytes(state.options.max_blob_bytes);
        if record_bytes > max_blob {
            return Err(S3Error::entity_too_large(format!(
                "the object would need a record of {record_bytes} bytes to list its {} pieces; the largest blob is {max_blob} bytes (raise --max-blob-size or --s3-piece-size)",
                object.pieces.len()
            )));
        }
        // From here the parts' pieces may become the object's: the upload says so, durably, with
        // the version the object's record will have (above every version of the key: the name
        // is locked), before that record is written; and it takes no part after.
        if let Some((newest, _)) = state.front.name_versions(upload.partition, &bucket_name, &key).await?.last() {
            names::observe_version(*newest);
        }
        let version = names::new_version();
        let open = UploadRecord { completing: None, ..upload.record.clone() };
        let marked = UploadRecord { completing: Some(Completion { etag: object.etag.clone(), version }), ..open.clone() };
        write_upload(&state, upload.partition, &bucket_name, &key, &upload_id, &marked).await?;
        let committed =
            objects::commit_locked(&state, upload.partition, &bucket_name, &key, &object, condition, Some(version), None)
                .await;
        drop(name_guard);
        let garbage = match committed {
            Ok((_, garbage)) => garbage,
            Err(e) => {
                // Refused before its record was written (a precondition, no room): the upload is
                // open again, for another try. (If its record may be live, or reopening fails,
                // it stays marked: a retry finds out which, by the record's id.)
                if !e.record_may_live {
                    if let Err(reopen) = write_upload(&state, upload.partition, &bucket_name, &key, &upload_id, &open).await {
                        tracing::warn!(upload_id, error = %reopen, "a refused completion's upload stays marked; completing it again goes on");
                    }
                }
                return Err(e.error);
            }
        };
        // A crash here (a test's failpoint) leaves the object committed and the upload marked.
        fail::fail_point!("s3-complete-committed", |_| -> Result<String, S3Error> { std::process::abort() });
        // Committed. The upload's records go after the answer, the pieces of parts the object
        // did not take with them.
        drop((bucket_guard, upload_guard));
        objects::delete_pieces(&state, &garbage).await;
        forget_later(&state, &bucket_name, &key, &upload_id, upload.partition, object.pieces.clone());
        Ok::<_, S3Error>(object.etag)
    })
    .await
    .map_err(|e| S3Error::internal(format!("the completion task failed: {e}")))??;
    Ok(xml_response(&CompleteMultipartUploadResult {
        xmlns: xml::NAMESPACE,
        location,
        bucket: result_names.0,
        key: result_names.1,
        etag: format!("\"{etag}\""),
    }))
}

/// A key in a path: every byte but the unreserved ones and `/` percent-encoded.
const PATH: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~').remove(b'/');

/// Writes a new version of an upload's record (above every version it has, whatever the
/// clock), then deletes the older ones.
async fn write_upload(
    state: &Arc<S3State>,
    partition: u32,
    bucket_name: &str,
    key: &str,
    upload_id: &str,
    record: &UploadRecord,
) -> Result<(), S3Error> {
    let space = model::uploads_space(bucket_name);
    let name = model::upload_name(key, upload_id);
    let older = state.front.name_versions(partition, &space, &name).await?;
    if let Some((newest, _)) = older.last() {
        names::observe_version(*newest);
    }
    let summary = model::encode(&record.initiated_ms);
    let record = NameRecord::new(space, name, names::new_version(), summary, model::encode(record))
        .map_err(|e| S3Error::internal(e.to_string()))?;
    state.front.put_name(partition, &record, now_ms()).await?;
    for (_, entry) in older {
        if let Err(e) = state.front.delete(entry.blob_id()).await {
            tracing::warn!(upload_id, error = %e, "an upload record's older version was not deleted");
        }
    }
    Ok(())
}

/// [`forget_upload`] in a task of its own, under the upload's lock: a completion answers once
/// its object is committed, however many parts there are to delete after.
fn forget_later(state: &Arc<S3State>, bucket_name: &str, key: &str, upload_id: &str, partition: u32, keep: Vec<Piece>) {
    let (state, bucket_name, key, upload_id) =
        (state.clone(), bucket_name.to_string(), key.to_string(), upload_id.to_string());
    tokio::spawn(async move {
        let _upload_guard = state.upload_locks.lock(upload_id.clone()).await;
        if let Err(e) = forget_upload(&state, &bucket_name, &key, &upload_id, partition, &keep).await {
            tracing::warn!(upload_id, error = %e, "a completed upload's records were not all deleted; it still lists, and aborting it finishes the work");
        }
    });
}

/// The object the listed parts make, each checked against what was uploaded.
async fn assemble(
    state: &Arc<S3State>,
    bucket_name: &str,
    upload_id: &str,
    upload: &Upload,
    asked: &[CompletedPart],
) -> Result<ObjectRecord, S3Error> {
    let space = model::parts_space(bucket_name);
    let mut pieces: Vec<Piece> = Vec::new();
    let mut md5s = Vec::with_capacity(asked.len());
    let mut sizes = Vec::with_capacity(asked.len());
    let mut size = 0u64;
    for (i, given) in asked.iter().enumerate() {
        let invalid = |why: &str| {
            S3Error::invalid_part(format!(
                "part {} {why}: one or more of the specified parts could not be found, or its entity tag did not match",
                given.number
            ))
        };
        let name = model::part_name(upload_id, given.number);
        let (_, _, record) = objects::current_record(state, upload.partition, &space, &name)
            .await?
            .ok_or_else(|| invalid("was not uploaded"))?;
        let part = ObjectRecord::decode(&record.body)?;
        let etag = given.etag.trim().trim_matches('"');
        if etag != part.etag {
            return Err(invalid("has another entity tag"));
        }
        if let Some((algorithm, value)) = given.checksum() {
            let given = super::checksum::Checksum::parse(algorithm, value)?;
            if part.checksum.as_ref().is_some_and(|c| *c != given) {
                return Err(invalid(&format!("has another {}", algorithm.header())));
            }
        }
        if i + 1 < asked.len() && part.size < MIN_PART_BYTES {
            return Err(S3Error::entity_too_small(format!(
                "part {} is {} bytes: every part but the last is at least {MIN_PART_BYTES} bytes",
                given.number, part.size
            )));
        }
        let md5: [u8; 16] = hex::decode(&part.etag)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| S3Error::internal("a part's entity tag is not an MD5"))?;
        md5s.push(md5);
        sizes.push(part.size);
        size += part.size;
        pieces.extend(part.pieces);
    }
    Ok(ObjectRecord {
        size,
        etag: multipart_etag(&md5s),
        content_type: upload.record.content_type.clone(),
        user_meta: upload.record.user_meta.clone(),
        headers: upload.record.headers.clone(),
        // A multipart object has no full-object checksum here; each part's was checked.
        checksum: None,
        pieces,
        inline: Vec::new(),
        parts: sizes,
    })
}

/// Deletes every version of every part of an upload, with their pieces but none of `keep`,
/// then the upload's record: a crash between leaves the upload listed, to be aborted again.
async fn forget_upload(
    state: &Arc<S3State>,
    bucket_name: &str,
    key: &str,
    upload_id: &str,
    partition: u32,
    keep: &[Piece],
) -> Result<(), S3Error> {
    let parts = model::parts_space(bucket_name);
    let prefix = model::parts_prefix(upload_id);
    loop {
        let page = state.front.current_names(&[partition], &parts, "", false, &prefix, 1000).await?;
        if page.is_empty() {
            break;
        }
        for name in page {
            for (_, entry) in state.front.name_versions(partition, &parts, &name.name).await? {
                objects::delete_version(state, entry.blob_id(), keep).await?;
            }
        }
    }
    let uploads = model::uploads_space(bucket_name);
    for (_, entry) in state.front.name_versions(partition, &uploads, &model::upload_name(key, upload_id)).await? {
        objects::delete_if_there(state, entry.blob_id()).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// AbortMultipartUpload

async fn abort(state: &Arc<S3State>, bucket_name: &str, key: &str, upload_id: &str) -> Result<Response, S3Error> {
    let (state, bucket_name, key, upload_id) =
        (state.clone(), bucket_name.to_string(), key.to_string(), upload_id.to_string());
    tokio::spawn(async move {
        // The upload's lock first, then the bucket (see `complete`).
        let _upload_guard = state.upload_locks.lock(upload_id.clone()).await;
        let _bucket_guard = state.buckets_lock.read().await;
        let bucket = buckets::find(&state, &bucket_name).await?;
        let upload = find_upload(&state, &bucket, &bucket_name, &key, &upload_id).await?;
        // A completing upload (its cleanup still running, or cut by a crash) is finished the
        // same way: every piece the key's current object holds is kept.
        abort_upload(&state, &bucket, &bucket_name, &key, &upload_id, upload.partition).await
    })
    .await
    .map_err(|e| S3Error::internal(format!("the abort task failed: {e}")))??;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Deletes an upload and its parts, keeping every piece the key's current object points at
/// (an upload whose completion committed before a crash cut its cleanup).
async fn abort_upload(
    state: &Arc<S3State>,
    bucket: &BucketRecord,
    bucket_name: &str,
    key: &str,
    upload_id: &str,
    partition: u32,
) -> Result<(), S3Error> {
    let keep = objects::current_pieces(state, bucket, bucket_name, key).await?;
    forget_upload(state, bucket_name, key, upload_id, partition, &keep).await
}

/// Aborts every upload of a bucket (which is being deleted: the caller holds the bucket lock for
/// writing).
pub async fn abort_all(state: &Arc<S3State>, bucket: &BucketRecord, bucket_name: &str) -> Result<(), S3Error> {
    let space = model::uploads_space(bucket_name);
    loop {
        let page = state.front.current_names(&bucket.partitions, &space, "", false, "", 1000).await?;
        if page.is_empty() {
            return Ok(());
        }
        for name in page {
            let Some((key, upload_id)) = model::split_upload_name(&name.name) else {
                objects::delete_if_there(state, name.id).await?;
                continue;
            };
            let partition = model::partition_of(&bucket.partitions, key);
            abort_upload(state, bucket, bucket_name, key, upload_id, partition).await?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ListParts

#[derive(Serialize)]
struct PartXml {
    #[serde(rename = "PartNumber")]
    number: u32,
    #[serde(rename = "LastModified")]
    last_modified: String,
    #[serde(rename = "ETag")]
    etag: String,
    #[serde(rename = "Size")]
    size: u64,
}

#[derive(Serialize)]
struct Initiator {
    #[serde(rename = "ID")]
    id: &'static str,
    #[serde(rename = "DisplayName")]
    display_name: &'static str,
}

const INITIATOR: Initiator = Initiator { id: buckets::OWNER_ID, display_name: buckets::OWNER_ID };

#[derive(Serialize)]
#[serde(rename = "ListPartsResult")]
struct ListPartsResult {
    #[serde(rename = "@xmlns")]
    xmlns: &'static str,
    #[serde(rename = "Bucket")]
    bucket: String,
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "UploadId")]
    upload_id: String,
    #[serde(rename = "Initiator")]
    initiator: Initiator,
    #[serde(rename = "Owner")]
    owner: Initiator,
    #[serde(rename = "StorageClass")]
    storage_class: &'static str,
    #[serde(rename = "PartNumberMarker")]
    part_number_marker: u32,
    #[serde(rename = "NextPartNumberMarker")]
    next_part_number_marker: u32,
    #[serde(rename = "MaxParts")]
    max_parts: usize,
    #[serde(rename = "IsTruncated")]
    is_truncated: bool,
    #[serde(rename = "ChecksumAlgorithm", skip_serializing_if = "Option::is_none")]
    checksum_algorithm: Option<&'static str>,
    #[serde(rename = "Part")]
    parts: Vec<PartXml>,
}

/// A count parameter (`max-parts`, `max-uploads`): at most 1,000 (S3's most per page).
fn max_param(request: &S3Request, name: &str) -> Result<usize, S3Error> {
    match request.param(name) {
        None => Ok(1000),
        Some(v) => v
            .parse::<usize>()
            .map(|n| n.min(1000))
            .map_err(|_| S3Error::invalid_argument(format!("{name} must be a non-negative integer"))),
    }
}

async fn list_parts(
    state: &Arc<S3State>,
    request: S3Request,
    bucket_name: &str,
    key: &str,
    upload_id: &str,
) -> Result<Response, S3Error> {
    let bucket = buckets::find(state, bucket_name).await?;
    let upload = find_open_upload(state, &bucket, bucket_name, key, upload_id).await?;
    let max_parts = max_param(&request, "max-parts")?;
    let marker = match request.param("part-number-marker") {
        None => 0,
        Some(v) => v
            .parse::<u32>()
            .map_err(|_| S3Error::invalid_argument("part-number-marker must be a non-negative integer"))?,
    };
    let prefix = model::parts_prefix(upload_id);
    let (from, after) = match marker {
        0 => (String::new(), false),
        n => (model::part_name(upload_id, n.min(MAX_PARTS)), true),
    };
    let space = model::parts_space(bucket_name);
    let page = match max_parts {
        // An empty page, not truncated (as S3): a client following the marker would loop.
        0 => Vec::new(),
        n => state.front.current_names(&[upload.partition], &space, &from, after, &prefix, n + 1).await?,
    };
    let is_truncated = page.len() > max_parts;
    let mut parts = Vec::new();
    for name in page.into_iter().take(max_parts) {
        let number = name.name[prefix.len()..]
            .parse::<u32>()
            .map_err(|_| S3Error::internal(format!("a part's name {:?} holds no number", name.name)))?;
        let summary = objects::summary_of(&name.summary)?;
        parts.push(PartXml {
            number,
            last_modified: xml::timestamp(names::version_ms(name.version)),
            etag: format!("\"{}\"", summary.etag),
            size: summary.size,
        });
    }
    Ok(xml_response(&ListPartsResult {
        xmlns: xml::NAMESPACE,
        bucket: bucket_name.to_string(),
        key: key.to_string(),
        upload_id: upload_id.to_string(),
        initiator: INITIATOR,
        owner: INITIATOR,
        storage_class: "STANDARD",
        part_number_marker: marker,
        next_part_number_marker: parts.last().map_or(marker, |p| p.number),
        max_parts,
        is_truncated,
        checksum_algorithm: upload.record.checksum.map(|a| a.name()),
        parts,
    }))
}

// ---------------------------------------------------------------------------------------------
// ListMultipartUploads

#[derive(Serialize)]
struct UploadXml {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "UploadId")]
    upload_id: String,
    #[serde(rename = "Initiator")]
    initiator: Initiator,
    #[serde(rename = "Owner")]
    owner: Initiator,
    #[serde(rename = "StorageClass")]
    storage_class: &'static str,
    #[serde(rename = "Initiated")]
    initiated: String,
}

#[derive(Serialize)]
struct PrefixXml {
    #[serde(rename = "Prefix")]
    prefix: String,
}

#[derive(Serialize)]
#[serde(rename = "ListMultipartUploadsResult")]
struct ListMultipartUploadsResult {
    #[serde(rename = "@xmlns")]
    xmlns: &'static str,
    #[serde(rename = "Bucket")]
    bucket: String,
    #[serde(rename = "KeyMarker")]
    key_marker: String,
    #[serde(rename = "UploadIdMarker")]
    upload_id_marker: String,
    #[serde(rename = "NextKeyMarker")]
    next_key_marker: String,
    #[serde(rename = "NextUploadIdMarker")]
    next_upload_id_marker: String,
    #[serde(rename = "Prefix")]
    prefix: String,
    #[serde(rename = "Delimiter", skip_serializing_if = "Option::is_none")]
    delimiter: Option<String>,
    #[serde(rename = "EncodingType", skip_serializing_if = "Option::is_none")]
    encoding_type: Option<&'static str>,
    #[serde(rename = "MaxUploads")]
    max_uploads: usize,
    #[serde(rename = "IsTruncated")]
    is_truncated: bool,
    #[serde(rename = "Upload")]
    uploads: Vec<UploadXml>,
    #[serde(rename = "CommonPrefixes")]
    common_prefixes: Vec<PrefixXml>,
}

/// `GET /<bucket>?uploads`: the bucket's uploads in progress, by key then age.
pub async fn list_uploads(state: &Arc<S3State>, request: S3Request, bucket_name: &str) -> Result<Response, S3Error> {
    let bucket = buckets::find(state, bucket_name).await?;
    let prefix = request.param("prefix").unwrap_or("").to_string();
    let delimiter = request.param("delimiter").filter(|d| !d.is_empty()).map(str::to_string);
    let url = match request.param("encoding-type") {
        None => false,
        Some("url") => true,
        Some(_) => return Err(S3Error::invalid_argument("invalid encoding method specified in the request")),
    };
    let max_uploads = max_param(&request, "max-uploads")?;
    let key_marker = request.param("key-marker").unwrap_or("").to_string();
    let upload_id_marker = request.param("upload-id-marker").unwrap_or("").to_string();
    // Names are `key NUL id`: after (key-marker, upload-id-marker), or past every upload of
    // key-marker (`key-marker \x01` sorts after `key-marker NUL *` and before every longer key).
    // A key-marker that is a common prefix of this listing (the previous page ended on it)
    // resumes past every key under it.
    let marker_is_prefix = delimiter.as_deref().is_some_and(|d| {
        key_marker.len() > prefix.len() && key_marker.starts_with(prefix.as_str()) && key_marker.ends_with(d)
    });
    let (mut from, mut after) = match (key_marker.is_empty(), upload_id_marker.is_empty()) {
        (true, _) => (String::new(), false),
        (false, _) if marker_is_prefix => match super::buckets::successor(&key_marker) {
            Some(next) => (next, false),
            None => (char::MAX.to_string().repeat(2), true),
        },
        (false, false) => (model::upload_name(&key_marker, &upload_id_marker), true),
        // No key holds a control character (`model::check_key`): `key-marker \x01` sorts after
        // every upload of key-marker and before every longer key.
        (false, true) => (format!("{key_marker}\u{1}"), false),
    };
    let space = model::uploads_space(bucket_name);
    let mut uploads = Vec::new();
    let mut prefixes: Vec<String> = Vec::new();
    let mut last: Option<(String, String)> = None;
    let mut is_truncated = false;
    'pages: loop {
        if max_uploads == 0 {
            // An empty page, not truncated (as S3): a client following the markers would loop.
            break;
        }
        let want = max_uploads + 1;
        let page = state.front.current_names(&bucket.partitions, &space, &from, after, &prefix, want).await?;
        let full = page.len() == want;
        let mut skipped = false;
        for name in page {
            let Some((key, id)) = model::split_upload_name(&name.name) else { continue };
            if uploads.len() + prefixes.len() == max_uploads {
                is_truncated = true;
                break 'pages;
            }
            let common = delimiter.as_deref().and_then(|d| {
                key.get(prefix.len()..)
                    .and_then(|rest| rest.find(d))
                    .map(|at| key[..prefix.len() + at + d.len()].to_string())
            });
            if let Some(common) = common {
                last = Some((common.clone(), String::new()));
                match super::buckets::successor(&common) {
                    Some(next) => (from, after) = (next, false),
                    None => {
                        prefixes.push(common);
                        break 'pages;
                    }
                }
                prefixes.push(common);
                skipped = true;
                break;
            }
            last = Some((key.to_string(), id.to_string()));
            uploads.push(UploadXml {
                key: key.to_string(),
                upload_id: id.to_string(),
                initiator: INITIATOR,
                owner: INITIATOR,
                storage_class: "STANDARD",
                initiated: xml::timestamp(
                    model::decode::<u64>(&name.summary).unwrap_or_else(|_| names::version_ms(name.version)),
                ),
            });
            from = name.name.clone();
            after = true;
        }
        if !skipped && !full {
            break;
        }
    }
    let encode = |text: &str| if url { buckets::url_encode(text) } else { text.to_string() };
    let (next_key, next_id) = if is_truncated { last.unwrap_or_default() } else { Default::default() };
    for upload in &mut uploads {
        upload.key = encode(&upload.key);
    }
    Ok(xml_response(&ListMultipartUploadsResult {
        xmlns: xml::NAMESPACE,
        bucket: bucket_name.to_string(),
        key_marker: encode(&key_marker),
        upload_id_marker,
        next_key_marker: encode(&next_key),
        next_upload_id_marker: next_id,
        prefix: encode(&prefix),
        delimiter: delimiter.as_deref().map(encode),
        encoding_type: url.then_some("url"),
        max_uploads,
        is_truncated,
        uploads,
        common_prefixes: prefixes.iter().map(|p| PrefixXml { prefix: encode(p) }).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multipart_etag_is_the_md5_of_the_parts_md5s() {
        // Two parts "a" and "b": md5(md5("a") ‖ md5("b")), then "-2".
        let a: [u8; 16] = Md5::digest(b"a").into();
        let b: [u8; 16] = Md5::digest(b"b").into();
        let mut joined = a.to_vec();
        joined.extend_from_slice(&b);
        assert_eq!(multipart_etag(&[a, b]), format!("{}-2", hex::encode(Md5::digest(&joined))));
    }

    #[test]
    fn upload_names_list_in_key_order_and_split_back() {
        let mut names = [
            model::upload_name("a/b", &"f".repeat(32)),
            model::upload_name("a", &"0".repeat(32)),
            model::upload_name("a!", &"1".repeat(32)),
            model::upload_name("a", &"e".repeat(32)),
        ];
        names.sort();
        let keys: Vec<&str> = names.iter().map(|n| model::split_upload_name(n).unwrap().0).collect();
        assert_eq!(keys, ["a", "a", "a!", "a/b"]);
        assert_eq!(model::split_upload_name(&names[1]).unwrap().1, "e".repeat(32));
        // Past every upload of "a" and before any longer key.
        let past = "a\u{1}".to_string();
        assert!(names[1] < past && past < names[2]);
    }

    #[test]
    fn upload_ids_are_what_this_server_gives() {
        let id = model::new_upload_id();
        assert!(model::is_upload_id(&id));
        assert!(!model::is_upload_id(&id.to_uppercase()));
        assert!(!model::is_upload_id("../../x"));
        assert!(!model::is_upload_id(&id[1..]));
    }
}
