//! `/v1/blobs` handlers.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use cairn_common::BlobId;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::limits::{self, parse_put_headers, parse_range};
use super::AppState;
use crate::engine::record::CHUNK_LEN;
use crate::engine::{now_ms, BlobReader, VolumeError};
use crate::metrics::DirectionLabels;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PutResponse {
    /// The new blob's id (also in the Location header).
    pub id: String,
    pub size: u64,
    pub partition: u32,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BlobInfo {
    pub id: String,
    pub size: u64,
    pub content_type: String,
    pub partition: u32,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    /// `X-Cairn-Meta-*` pairs given at upload, keys lower-cased.
    pub metadata: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TtlUpdate {
    /// New time to live from now, in seconds; `null` makes the blob permanent. Required: a body
    /// without it is refused rather than read as "permanent".
    #[serde(deserialize_with = "present_or_null")]
    #[schema(required = true, minimum = 1, maximum = 3153600000_u64)]
    pub ttl_seconds: Option<u64>,
}

/// Deserializes a field that must be present but may be `null` (serde would read a missing
/// `Option` as `None`).
/// A whole number of seconds, or `null`. JSON has one number type: `60.0` is the integer 60 (as
/// JSON Schema's `integer` says), `60.5` is not.
fn present_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let Some(number) = Option::<serde_json::Number>::deserialize(d)? else { return Ok(None) };
    if let Some(n) = number.as_u64() {
        return Ok(Some(n));
    }
    match number.as_f64() {
        Some(x) if x >= 0.0 && x.fract() == 0.0 && x < u64::MAX as f64 => Ok(Some(x as u64)),
        _ => Err(serde::de::Error::custom(format!("ttl_seconds must be a whole number of seconds, got {number}"))),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct GetParams {
    /// Serve only this datanode's own replica (404 if it has none).
    #[serde(default)]
    pub local: bool,
}

/// Any id the storage holds: a blob's or a name record's (the replica routes copy both).
pub(crate) fn parse_id(raw: &str) -> Result<BlobId, ApiError> {
    raw.parse().map_err(|e| ApiError::InvalidBlobId(format!("{}: {e}", super::error::excerpt(raw))))
}

/// A blob's id, as the blob API takes it: a name record's id is the storage's own (the S3 front's
/// object names), never read or changed through the blob API.
pub(crate) fn parse_blob_id(raw: &str) -> Result<BlobId, ApiError> {
    let id = parse_id(raw)?;
    if id.is_name() {
        return Err(ApiError::InvalidBlobId(format!("{}: not a blob id", super::error::excerpt(raw))));
    }
    Ok(id)
}

fn volume_for(state: &AppState, id: BlobId) -> Result<Arc<crate::engine::Volume>, ApiError> {
    if let Some(volume) = state.store.volume(id.partition()) {
        return Ok(volume);
    }
    // A replica assigned here but not open yet (a node that has just started replays its log
    // first) cannot say the blob is absent: 404 there would be a false answer that a reader
    // (or a peer reading through `?local=true`) takes for "never written".
    if let Some(cluster) = state.front.cluster() {
        let partition = id.partition();
        if cluster.snapshot().topology.partitions_of(cluster.node_id()).any(|p| p.id == partition) {
            let why = cluster.unopened().remove(&partition).unwrap_or_else(|| "opening".into());
            return Err(ApiError::Unavailable(format!(
                "partition {partition}'s replica on this node is not open yet ({why})"
            )));
        }
    }
    // A standalone node holds every replica it knows; an unknown partition has no blob here.
    Err(ApiError::BlobNotFound)
}

/// Store a new blob.
///
/// User metadata rides in `X-Cairn-Meta-<name>: <value>` headers (4 KiB in all), returned as they
/// were given by GET and HEAD.
#[utoipa::path(post, path = "/v1/blobs", tag = "blobs",
    request_body(content = Option<Vec<u8>>, content_type = "application/octet-stream", description = "Blob bytes (none: an empty blob)"),
    params(
        ("X-Cairn-TTL" = Option<u64>, Header, nullable = false, description = "Time to live in seconds", minimum = 1, maximum = 3153600000.0),
    ),
    responses(
        (status = 401, description = "No valid access key", body = ErrorBody), (status = 403, description = "The key lacks the scope", body = ErrorBody),
        (status = 201, description = "Stored durably", body = PutResponse, headers(("Location" = String))),
        (status = 400, description = "Invalid header or metadata", body = ErrorBody),
        (status = 413, description = "Blob too large", body = ErrorBody),
        (status = 408, description = "The body stopped arriving", body = ErrorBody),
        (status = 503, description = "Volume failed, or busy (Retry-After)", body = ErrorBody),
        (status = 507, description = "No room", body = ErrorBody),
    ))]
pub async fn put_blob(
    State(state): State<AppState>,
    limit: Option<axum::Extension<super::auth::PartitionLimit>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (meta, ttl) = parse_put_headers(&headers)?;
    let payload = state.uploads.read(&headers, body, state.max_blob_bytes()).await?;
    let created_ms = now_ms();
    let expiry_ms = ttl.map(|t| created_ms + t * 1000);
    let size = payload.len() as u64;
    let reach = limit.as_ref().map(|l| l.0 .0.as_ref());
    let blob_id = state.front.put(meta, payload, created_ms, expiry_ms, reach).await?;
    state.metrics.bytes.get_or_create(&DirectionLabels { direction: "in" }).inc_by(size);
    let body = PutResponse {
        id: blob_id.to_string(),
        size,
        partition: blob_id.partition(),
        created_ms,
        expires_ms: expiry_ms,
    };
    let location = HeaderValue::from_str(&format!("/v1/blobs/{blob_id}")).expect("ids are URL-safe");
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(body)).into_response())
}

async fn open(state: &AppState, id: BlobId) -> Result<BlobReader, ApiError> {
    let volume = volume_for(state, id)?;
    // Opening reads the record head from disk.
    tokio::task::spawn_blocking(move || volume.open_blob(id))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::from)
}

fn blob_headers(reader: &BlobReader) -> HeaderMap {
    let mut h = HeaderMap::new();
    let set = |h: &mut HeaderMap, name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    };
    set(&mut h, "content-type", reader.meta.content_type.clone());
    set(&mut h, "etag", format!("\"{:08x}\"", reader.entry.crc));
    set(&mut h, "accept-ranges", "bytes".into());
    set(&mut h, "x-cairn-created-ms", reader.entry.created_ms.to_string());
    if let Some(expiry) = reader.entry.expiry_ms {
        set(&mut h, "x-cairn-expires-ms", expiry.to_string());
    }
    for (k, v) in &reader.meta.user {
        if let Ok(name) = header::HeaderName::from_bytes(format!("{}{k}", limits::META_PREFIX).as_bytes()) {
            if let Ok(value) = HeaderValue::from_str(v) {
                h.insert(name, value);
            }
        }
    }
    h
}

/// Read a blob, or one byte range of it.
#[utoipa::path(get, path = "/v1/blobs/{id}", tag = "blobs",
    params(("id" = String, Path, description = "Blob id: 28 characters of URL-safe base64", pattern = r"^A[Q-Za-f][A-Za-z0-9_-]{26}$"), GetParams,
        ("Range" = Option<String>, Header, nullable = false, description = "One byte range, e.g. bytes=0-1023 (a value that is not bytes=… is ignored, as RFC 9110 says)")),
    responses(
        (status = 401, description = "No valid access key", body = ErrorBody), (status = 403, description = "The key lacks the scope", body = ErrorBody),
        (status = 200, description = "The blob", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "The requested range", body = Vec<u8>),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such blob", body = ErrorBody),
        (status = 410, description = "Deleted or expired", body = ErrorBody),
        (status = 416, description = "Range not satisfiable", body = ErrorBody),
        (status = 500, description = "Stored bytes failed their checksum", body = ErrorBody),
        (status = 503, description = "No replica could answer, or (with local=true) this node's replica is not open yet", body = ErrorBody),
    ))]
pub async fn get_blob(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    Query(params): Query<GetParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_blob_id(&raw)?;
    routed(&state, id, params.local, Method::GET, "", &headers, serve_get(&state, id, &headers)).await
}

/// In a cluster (unless `?local=true`): the local replica's answer if it has the blob (or
/// knows it is gone), else the other replicas'. Standalone: the local answer.
async fn routed(
    state: &AppState,
    id: BlobId,
    local_only: bool,
    method: Method,
    suffix: &str,
    headers: &HeaderMap,
    local: impl std::future::Future<Output = Result<Response, ApiError>>,
) -> Result<Response, ApiError> {
    let Some(cluster) = state.front.cluster().filter(|_| !local_only) else {
        return local.await;
    };
    if state.store.volume(id.partition()).is_some() {
        match local.await {
            Ok(response) => return Ok(response),
            Err(e @ (ApiError::BlobDeleted | ApiError::BlobExpired | ApiError::RangeNotSatisfiable { .. })) => {
                return Err(e)
            }
            Err(e) => tracing::debug!(%id, error = %e, "local replica cannot answer; asking the others"),
        }
    }
    let range = headers.get(header::RANGE).map(|v| v.as_bytes());
    Ok(relay(cluster.read_from_peers(id, method, suffix, range).await?))
}

/// Headers of one connection, not of the message: never passed on by a node that relays.
pub(crate) const HOP_BY_HOP: [header::HeaderName; 7] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::HOST,
    header::PROXY_AUTHORIZATION,
];

/// A peer's answer passed on as it is, the body streamed.
pub(crate) fn relay(response: reqwest::Response) -> Response {
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut builder = Response::builder().status(status);
    for (name, value) in response.headers() {
        if !HOP_BY_HOP.contains(name) {
            builder = builder.header(name, value);
        }
    }
    builder.body(Body::from_stream(response.bytes_stream())).expect("valid response")
}

async fn serve_get(state: &AppState, id: BlobId, headers: &HeaderMap) -> Result<Response, ApiError> {
    let reader = open(state, id).await?;
    let len = reader.len();
    let range = parse_range(headers.get(header::RANGE).and_then(|v| v.to_str().ok()), len)?;
    let (start, end) = range.unwrap_or((0, len));
    let mut response_headers = blob_headers(&reader);
    response_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    let status = if range.is_some() {
        let value = format!("bytes {start}-{}/{len}", end.saturating_sub(1));
        response_headers.insert(header::CONTENT_RANGE, HeaderValue::from_str(&value).expect("ascii"));
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    state.metrics.bytes.get_or_create(&DirectionLabels { direction: "out" }).inc_by(end - start);
    let body = stream_payload(reader, start, end).await?;
    Ok((status, response_headers, body).into_response())
}

/// The payload bytes `[start, end)` as a body. The first chunk is read (and verified) before
/// the response starts, so that a checksum error there is a proper 500; later chunks are read
/// one ahead of the socket, and a checksum error aborts the connection: never wrong bytes.
pub(crate) async fn stream_payload(reader: BlobReader, start: u64, end: u64) -> Result<Body, ApiError> {
    if start >= end {
        return Ok(Body::empty());
    }
    let first_chunk = start / CHUNK_LEN;
    let last_chunk = (end - 1) / CHUNK_LEN;
    let slice = move |index: u64, data: Bytes| -> Bytes {
        let base = index * CHUNK_LEN;
        let from = start.saturating_sub(base) as usize;
        let to = ((end - base) as usize).min(data.len());
        data.slice(from..to)
    };
    // A hot blob: every chunk is in memory, already verified.
    let cached: Option<Vec<Bytes>> = (first_chunk..=last_chunk).map(|i| reader.cached_chunk(i)).collect();
    if let Some(chunks) = cached {
        let chunks = (first_chunk..).zip(chunks).map(move |(index, data)| Ok::<_, VolumeError>(slice(index, data)));
        return Ok(Body::from_stream(futures::stream::iter(chunks)));
    }
    let reader = Arc::new(reader);
    let first = {
        let reader = reader.clone();
        tokio::task::spawn_blocking(move || reader.read_chunk(first_chunk))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??
    };
    let first = slice(first_chunk, first);
    if first_chunk == last_chunk {
        return Ok(Body::from(first));
    }
    // Read-ahead of two chunks: the disk works while the socket drains.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, VolumeError>>(2);
    tokio::task::spawn_blocking(move || {
        for index in first_chunk + 1..=last_chunk {
            let item = reader.read_chunk(index).map(|data| slice(index, data));
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
        }
    });
    let rest = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let stream = futures::StreamExt::chain(futures::stream::once(async move { Ok::<_, VolumeError>(first) }), rest);
    Ok(Body::from_stream(stream))
}

/// Blob headers without the body.
#[utoipa::path(head, path = "/v1/blobs/{id}", tag = "blobs",
    params(("id" = String, Path, description = "Blob id: 28 characters of URL-safe base64", pattern = r"^A[Q-Za-f][A-Za-z0-9_-]{26}$")),
    responses((status = 401), (status = 403), (status = 200, description = "Headers of the blob"), (status = 400), (status = 404), (status = 410)))]
pub async fn head_blob(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    Query(params): Query<GetParams>,
    request_headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_blob_id(&raw)?;
    let local = async {
        let reader = open(&state, id).await?;
        let mut headers = blob_headers(&reader);
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(reader.len()));
        Ok((StatusCode::OK, headers).into_response())
    };
    routed(&state, id, params.local, Method::HEAD, "", &request_headers, local).await
}

/// Delete a blob; later reads answer 410. Deleting twice is fine.
#[utoipa::path(delete, path = "/v1/blobs/{id}", tag = "blobs",
    params(("id" = String, Path, description = "Blob id: 28 characters of URL-safe base64", pattern = r"^A[Q-Za-f][A-Za-z0-9_-]{26}$")),
    responses(
        (status = 401, description = "No valid access key", body = ErrorBody), (status = 403, description = "The key lacks the scope", body = ErrorBody),
        (status = 204, description = "Deleted (durably)"),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such blob", body = ErrorBody),
        (status = 507, description = "No room even for the tombstone", body = ErrorBody),
    ))]
pub async fn delete_blob(State(state): State<AppState>, Path(raw): Path<String>) -> Result<StatusCode, ApiError> {
    let id = parse_blob_id(&raw)?;
    state.front.delete(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Size, content type, times and metadata of a blob.
#[utoipa::path(get, path = "/v1/blobs/{id}/info", tag = "blobs",
    params(("id" = String, Path, description = "Blob id: 28 characters of URL-safe base64", pattern = r"^A[Q-Za-f][A-Za-z0-9_-]{26}$")),
    responses((status = 401, description = "No valid access key", body = ErrorBody), (status = 403, description = "The key lacks the scope", body = ErrorBody), (status = 200, body = BlobInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 410, body = ErrorBody)))]
pub async fn blob_info(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    Query(params): Query<GetParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_blob_id(&raw)?;
    let local = async { local_info(&state, id).await.map(|info| Json(info).into_response()) };
    routed(&state, id, params.local, Method::GET, "/info", &headers, local).await
}

async fn local_info(state: &AppState, id: BlobId) -> Result<BlobInfo, ApiError> {
    let reader = open(state, id).await?;
    Ok(BlobInfo {
        id: id.to_string(),
        size: reader.len(),
        content_type: reader.meta.content_type.clone(),
        partition: id.partition(),
        created_ms: reader.entry.created_ms,
        expires_ms: reader.entry.expiry_ms,
        metadata: reader.meta.user.iter().cloned().collect(),
    })
}

/// Change a blob's time to live.
#[utoipa::path(put, path = "/v1/blobs/{id}/ttl", tag = "blobs",
    params(("id" = String, Path, description = "Blob id: 28 characters of URL-safe base64", pattern = r"^A[Q-Za-f][A-Za-z0-9_-]{26}$")),
    request_body = TtlUpdate,
    responses((status = 401, description = "No valid access key", body = ErrorBody), (status = 403, description = "The key lacks the scope", body = ErrorBody), (status = 204, description = "Updated durably"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 410, body = ErrorBody)))]
pub async fn update_ttl(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let id = parse_blob_id(&raw)?;
    let body = super::upload::read_small(body, 64 * 1024).await?;
    const EXPECTED: &str =
        "the body must be {\"ttl_seconds\": N} (whole seconds from now) or {\"ttl_seconds\": null} (never expires)";
    let update: TtlUpdate =
        serde_json::from_slice(&body).map_err(|e| ApiError::InvalidBody(format!("{EXPECTED}: {e}")))?;
    let expiry_ms = match update.ttl_seconds {
        None => None,
        Some(t) if (1..=limits::MAX_TTL_SECONDS).contains(&t) => Some(now_ms() + t * 1000),
        Some(t) => {
            return Err(ApiError::InvalidBody(format!(
                "ttl_seconds must be from 1 to {} (about a century), got {t}",
                limits::MAX_TTL_SECONDS
            )))
        }
    };
    state.front.update_ttl(id, expiry_ms).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::TtlUpdate;

    #[test]
    fn a_ttl_is_a_whole_number_of_seconds_however_json_writes_it() {
        let ttl =
            |body: &str| serde_json::from_str::<TtlUpdate>(body).map(|t| t.ttl_seconds).map_err(|e| e.to_string());
        assert_eq!(ttl(r#"{"ttl_seconds": 60}"#), Ok(Some(60)));
        assert_eq!(ttl(r#"{"ttl_seconds": 60.0}"#), Ok(Some(60)));
        assert_eq!(ttl(r#"{"ttl_seconds": 6e1}"#), Ok(Some(60)));
        assert_eq!(ttl(r#"{"ttl_seconds": null}"#), Ok(None));
        for bad in [
            r#"{"ttl_seconds": 60.5}"#,
            r#"{"ttl_seconds": -1}"#,
            r#"{"ttl_seconds": "60"}"#,
            r#"{}"#,
            r#"{"ttl_seconds": 1e30}"#,
        ] {
            assert!(ttl(bad).is_err(), "{bad}");
        }
    }
}
