//! The replica API: what datanodes ask each other, under `/replica/v1/`, apart from the public
//! API and served only by nodes of a cluster. Writes here go to this node's own replica only;
//! they never fan out. The bodies are the typed, versioned ones of [`cairn_cluster::replica`].

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use cairn_cluster::replica::{
    check_version, hex, BatchAnswer, BatchOutcome, BlobBatch, BlobFrame, BucketEntries, BucketEntry,
    CurrentNamesAnswer, CurrentNamesQuery, DigestAnswer, EntryKind, JournalBatch, JournalItem, JournalPage,
    JournalRequest, NameVersionsAnswer, NameVersionsQuery, ReplicaBlob, TombstoneAnswer, TtlAnswer, TtlBody, WireError,
    DIGEST_BUCKETS, WIRE_VERSION,
};
use cairn_common::BlobId;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::blobs::{parse_id, stream_payload};
use super::error::{ApiError, ErrorBody};
use super::upload::{read_small, UploadBudget};
use crate::cluster::names::{current_answer, versions_answer, MAX_PAGE};
use crate::cluster::Cluster;
use crate::engine::record::RecordKind;
use crate::engine::{BlobMeta, PutRequest, TtlMerge, Volume, VolumeError};

/// The content type of a [`BlobFrame`] body.
pub const FRAME_CONTENT_TYPE: &str = "application/x-cairn-blob-frame";

/// How long a journal request woken by a commit waits for the commits right behind it.
const JOURNAL_LINGER: Duration = Duration::from_millis(20);

/// The longest a journal request waits for an entry.
const MAX_JOURNAL_WAIT: Duration = Duration::from_secs(30);

/// What the replica routes need: this node's cluster (its store, its settings) and the memory
/// for replica writes, kept apart from the public uploads' so that neither can starve the other.
#[derive(Clone)]
pub struct ReplicaState {
    pub cluster: Arc<Cluster>,
    pub uploads: Arc<UploadBudget>,
    /// Cancelled at shutdown: waiting journal requests answer at once.
    pub shutdown: CancellationToken,
    /// The S3 front, when this node serves S3: it coordinates the writes other nodes pass on.
    pub s3: Option<Arc<super::s3::S3State>>,
}

pub fn routes(state: ReplicaState) -> Router {
    let s3_forwarded = match state.s3.clone() {
        Some(s3) => Router::new()
            .route(super::s3::forward::PREFIX, any(super::s3::handle_forwarded))
            .route(super::s3::forward::DELETE_KEY_ROUTE, post(super::s3::forward::handle_delete_key))
            .with_state(s3),
        None => Router::new(),
    };
    Router::new()
        .route("/replica/v1/blobs", post(put_batch))
        .route("/replica/v1/blobs/{id}", put(put_replica).get(get_replica).delete(delete_replica))
        .route("/replica/v1/blobs/{id}/meta", get(meta_replica))
        .route("/replica/v1/blobs/{id}/ttl", put(ttl_replica))
        .route("/replica/v1/journal", post(journal_batch))
        .route("/replica/v1/partitions/{partition}/journal", get(journal_page))
        .route("/replica/v1/partitions/{partition}/digest", get(digest))
        .route("/replica/v1/partitions/{partition}/buckets/{bucket}", get(bucket))
        .route("/replica/v1/partitions/{partition}/names/versions", post(name_versions))
        .route("/replica/v1/partitions/{partition}/names/current", post(current_names))
        .with_state(state)
        .merge(s3_forwarded)
}

impl From<WireError> for ApiError {
    fn from(e: WireError) -> Self {
        ApiError::InvalidBody(e.to_string())
    }
}

/// A small JSON body (at most 4 MiB), whatever its content type says: anything else is 400.
async fn json_body<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let body = read_small(body, 4 << 20).await?;
    serde_json::from_slice(&body).map_err(|e| ApiError::InvalidBody(e.to_string()))
}

fn local_volume(state: &ReplicaState, partition: u32) -> Result<Arc<Volume>, ApiError> {
    state.cluster.store.volume(partition).ok_or(ApiError::NoReplica(partition))
}

/// Runs blocking engine work (redb reads, index scans) off the async runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, VolumeError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| ApiError::Internal(e.to_string()))?.map_err(ApiError::from)
}

/// Stores a blob in this node's replica, with the id, times and metadata its router chose (a
/// [`BlobFrame`]).
#[utoipa::path(put, path = "/replica/v1/blobs/{id}", tag = "replica", security(("node_token" = [])),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "A BlobFrame (application/x-cairn-blob-frame; the type is not checked): the blob's times and metadata, then its bytes"),
    params(("id" = String, Path, description = "Blob id: 28 characters of URL-safe base64", pattern = r"^A[Q-Za-f][A-Za-z0-9_-]{26}$")),
    responses((status = 204, description = "Stored in this replica"), (status = 401, description = "Without the cluster's node token (a standalone node has none, and no replica routes)", body = ErrorBody), (status = 404, description = "No such blob here, or a standalone node", body = ErrorBody), (status = 400, description = "Malformed id, parameter or body", body = ErrorBody), (status = 421, description = "No replica of that partition on this node", body = ErrorBody), (status = 410, description = "Deleted or expired here", body = ErrorBody)))]
async fn put_replica(
    State(state): State<ReplicaState>,
    Path(raw): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let blob_id = parse_id(&raw)?;
    let max_blob = max_blob(&state);
    // The frame's head is a few KiB of metadata at most.
    let body = state.uploads.read(&headers, body, max_blob.saturating_add(64 * 1024)).await?;
    let (blob, payload) = BlobFrame::split(body)?;
    store_blob(&state, blob_id, blob, payload, max_blob).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The largest blob a replica write may carry: the cluster's setting.
fn max_blob(state: &ReplicaState) -> u64 {
    state.cluster.config().map(|c| c.max_blob_bytes()).unwrap_or(u64::MAX)
}

/// One replica write, checked as the public API checks a blob.
async fn store_blob(
    state: &ReplicaState,
    blob_id: BlobId,
    blob: ReplicaBlob,
    payload: Bytes,
    max_blob: u64,
) -> Result<(), ApiError> {
    if payload.len() as u64 > max_blob {
        return Err(ApiError::PayloadTooLarge(format!(
            "blob of {} bytes exceeds the limit of {max_blob} bytes",
            payload.len()
        )));
    }
    let meta = BlobMeta::new(blob.content_type, blob.user)?;
    let volume = local_volume(state, blob_id.partition())?;
    let request = PutRequest { blob_id, meta, payload, created_ms: blob.created_ms, expiry_ms: blob.expires_ms };
    match volume.put(request).await {
        Ok(()) => Ok(()),
        // The router marks the partition read-only on this answer alone.
        Err(VolumeError::Full) => Err(ApiError::VolumeFull(blob_id.partition())),
        Err(e) => Err(e.into()),
    }
}

/// Several replica writes at once ([`BlobBatch`]): written concurrently, so that they share
/// group commits; one outcome each, as a single write would have answered.
#[utoipa::path(post, path = "/replica/v1/blobs", tag = "replica", security(("node_token" = [])),
    request_body(content = Option<Vec<u8>>, content_type = "application/octet-stream", description = "A BlobBatch: several BlobFrames (none: nothing to do)"),
    responses((status = 200, description = "One outcome per blob (BatchAnswer)", content_type = "application/json"), (status = 401, description = "Without the cluster's node token (a standalone node has none, and no replica routes)", body = ErrorBody), (status = 404, description = "No such blob here, or a standalone node", body = ErrorBody), (status = 400, description = "Malformed id, parameter or body", body = ErrorBody), (status = 421, description = "No replica of that partition on this node", body = ErrorBody), (status = 410, description = "Deleted or expired here", body = ErrorBody)))]
async fn put_batch(
    State(state): State<ReplicaState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<BatchAnswer>, ApiError> {
    let max_blob = max_blob(&state);
    let body = state.uploads.read(&headers, body, max_blob.saturating_add(BATCH_SLACK)).await?;
    let blobs = BlobBatch::split(body)?;
    let writes = blobs.into_iter().map(|(raw, blob, payload)| {
        let state = &state;
        async move {
            let stored = match parse_id(&raw) {
                Ok(id) => store_blob(state, id, blob, payload, max_blob).await,
                Err(e) => Err(e),
            };
            match stored {
                Ok(()) => BatchOutcome { status: 204, code: None, message: None },
                Err(e) => BatchOutcome {
                    status: e.status().as_u16(),
                    code: Some(e.code().to_owned()),
                    message: Some(e.to_string()),
                },
            }
        }
    });
    let outcomes = futures::future::join_all(writes).await;
    Ok(Json(BatchAnswer { version: WIRE_VERSION, outcomes }))
}

/// How much a batch may carry beyond one blob of the largest size (the router sends at most
/// about 1 MiB of small blobs together, or one large blob alone).
pub const BATCH_SLACK: u64 = 4 << 20;

fn replica_blob(reader: &crate::engine::BlobReader) -> ReplicaBlob {
    ReplicaBlob {
        version: WIRE_VERSION,
        content_type: reader.meta.content_type.clone(),
        user: reader.meta.user.clone(),
        created_ms: reader.entry.created_ms,
        expires_ms: reader.entry.expiry_ms,
        expiry_set_ms: Some(reader.entry.expiry_set_ms),
    }
}

async fn open_local(state: &ReplicaState, id: BlobId) -> Result<crate::engine::BlobReader, ApiError> {
    let volume = local_volume(state, id.partition())?;
    blocking(move || volume.open_blob(id)).await
}

/// This replica's blob as a [`BlobFrame`], for a replica that lacks it: 404 `blob_not_found`
/// when this replica never had it, 410 when it is deleted or expired here.
#[utoipa::path(get, path = "/replica/v1/blobs/{id}", tag = "replica", security(("node_token" = [])),
    params(("id" = String, Path, description = "Blob id: 28 characters of URL-safe base64", pattern = r"^A[Q-Za-f][A-Za-z0-9_-]{26}$")),
    responses((status = 200, description = "The blob as a BlobFrame", content_type = "application/x-cairn-blob-frame"), (status = 401, description = "Without the cluster's node token (a standalone node has none, and no replica routes)", body = ErrorBody), (status = 404, description = "No such blob here, or a standalone node", body = ErrorBody), (status = 400, description = "Malformed id, parameter or body", body = ErrorBody), (status = 421, description = "No replica of that partition on this node", body = ErrorBody), (status = 410, description = "Deleted or expired here", body = ErrorBody)))]
async fn get_replica(State(state): State<ReplicaState>, Path(raw): Path<String>) -> Result<Response, ApiError> {
    let id = parse_id(&raw)?;
    let reader = open_local(&state, id).await?;
    let head = BlobFrame::head(&replica_blob(&reader));
    let len = reader.len();
    let length = head.len() as u64 + len;
    let payload = stream_payload(reader, 0, len).await?;
    let stream = futures::StreamExt::chain(
        futures::stream::once(async move { Ok::<Bytes, axum::Error>(head) }),
        payload.into_data_stream(),
    );
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static(FRAME_CONTENT_TYPE)),
        (header::CONTENT_LENGTH, HeaderValue::from(length)),
    ];
    Ok((StatusCode::OK, headers, Body::from_stream(stream)).into_response())
}

/// This replica's metadata of a blob (its expiry, for a TTL update to copy).
#[utoipa::path(get, path = "/replica/v1/blobs/{id}/meta", tag = "replica", security(("node_token" = [])),
    params(("id" = String, Path, description = "Blob id: 28 characters of URL-safe base64", pattern = r"^A[Q-Za-f][A-Za-z0-9_-]{26}$")),
    responses((status = 200, description = "The blob's metadata here (ReplicaBlob)", content_type = "application/json"), (status = 401, description = "Without the cluster's node token (a standalone node has none, and no replica routes)", body = ErrorBody), (status = 404, description = "No such blob here, or a standalone node", body = ErrorBody), (status = 400, description = "Malformed id, parameter or body", body = ErrorBody), (status = 421, description = "No replica of that partition on this node", body = ErrorBody), (status = 410, description = "Deleted or expired here", body = ErrorBody)))]
async fn meta_replica(
    State(state): State<ReplicaState>,
    Path(raw): Path<String>,
) -> Result<Json<ReplicaBlob>, ApiError> {
    let id = parse_id(&raw)?;
    Ok(Json(replica_blob(&open_local(&state, id).await?)))
}

#[derive(Debug, Deserialize)]
pub struct DeleteParams {
    /// Delete only a blob this replica has (or had); an unknown id leaves no tombstone.
    #[serde(default)]
    pub if_present: bool,
}

#[utoipa::path(delete, path = "/replica/v1/blobs/{id}", tag = "replica", security(("node_token" = [])),
    params(("id" = String, Path, description = "Blob id: 28 characters of URL-safe base64", pattern = r"^A[Q-Za-f][A-Za-z0-9_-]{26}$"), ("if_present" = Option<bool>, Query, description = "Only if this replica has the blob")),
    responses((status = 200, description = "The tombstone (TombstoneAnswer)", content_type = "application/json"), (status = 401, description = "Without the cluster's node token (a standalone node has none, and no replica routes)", body = ErrorBody), (status = 404, description = "No such blob here, or a standalone node", body = ErrorBody), (status = 400, description = "Malformed id, parameter or body", body = ErrorBody), (status = 421, description = "No replica of that partition on this node", body = ErrorBody), (status = 410, description = "Deleted or expired here", body = ErrorBody)))]
async fn delete_replica(
    State(state): State<ReplicaState>,
    Path(raw): Path<String>,
    Query(params): Query<DeleteParams>,
) -> Result<Json<TombstoneAnswer>, ApiError> {
    let blob_id = parse_id(&raw)?;
    let volume = local_volume(&state, blob_id.partition())?;
    let existed =
        if params.if_present { volume.delete_if_present(blob_id).await? } else { volume.tombstone(blob_id).await? };
    Ok(Json(TombstoneAnswer { existed }))
}

#[utoipa::path(put, path = "/replica/v1/blobs/{id}/ttl", tag = "replica", security(("node_token" = [])),
    request_body(content = Object, content_type = "application/json", description = "A TtlBody"),
    params(("id" = String, Path, description = "Blob id: 28 characters of URL-safe base64", pattern = r"^A[Q-Za-f][A-Za-z0-9_-]{26}$")),
    responses((status = 204, description = "Updated in this replica, or it already had that expiry with that stamp"), (status = 200, description = "Kept: this replica's expiry sorts above the change (a TtlAnswer with its stamp)", body = Object), (status = 401, description = "Without the cluster's node token (a standalone node has none, and no replica routes)", body = ErrorBody), (status = 404, description = "No such blob here, or a standalone node", body = ErrorBody), (status = 400, description = "Malformed id, parameter or body", body = ErrorBody), (status = 421, description = "No replica of that partition on this node", body = ErrorBody), (status = 410, description = "Deleted or expired here", body = ErrorBody)))]
async fn ttl_replica(
    State(state): State<ReplicaState>,
    Path(raw): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let blob_id = parse_id(&raw)?;
    let body = read_small(body, 64 * 1024).await?;
    let body: TtlBody = serde_json::from_slice(&body).map_err(|e| ApiError::InvalidBody(e.to_string()))?;
    let volume = local_volume(&state, blob_id.partition())?;
    let now = crate::engine::now_ms();
    let Some(at_ms) = body.at_ms else {
        // An older coordinator: its change is made now, stamped by this node's clock.
        volume.set_ttl(blob_id, body.expires_ms, now).await?;
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    // A stamp far ahead would win over every later change until clocks caught up with it.
    if crate::cluster::stamp_too_far_ahead(at_ms, now) {
        return Err(ApiError::InvalidBody(format!(
            "at_ms {at_ms} is more than an hour ahead of this node's clock ({now}): the nodes' clocks disagree"
        )));
    }
    // The change replaces the expiry here only if it is the later one: a change still on its way
    // from an earlier request never overrides one acknowledged after it. A coordinator told the
    // stamp here tries again above it (its clock was behind).
    match volume.merge_ttl(blob_id, body.expires_ms, at_ms).await? {
        TtlMerge::Taken | TtlMerge::AlreadySo => Ok(StatusCode::NO_CONTENT.into_response()),
        TtlMerge::Kept { stamp } => Ok(Json(TtlAnswer { version: WIRE_VERSION, kept_stamp: stamp }).into_response()),
    }
}

/// A page of `volume`'s journal from `from` on (blocking: a redb read).
fn page_of(partition: u32, volume: &Volume, from: u64, limit: usize) -> Result<JournalPage, VolumeError> {
    let tail = volume.journal_tail();
    let head = volume.journal_head()?;
    if from >= tail {
        return Ok(JournalPage { partition, tail, head, ..JournalPage::default() });
    }
    if from < head {
        return Ok(JournalPage { partition, tail, head, truncated: true, ..JournalPage::default() });
    }
    let entries = volume
        .journal(from, limit)?
        .into_iter()
        .map(|(seq, e)| JournalItem {
            seq,
            id: BlobId::from_bytes(&e.blob_id).map(|id| id.to_string()).unwrap_or_else(|_| {
                let bytes = hex(&e.blob_id);
                tracing::warn!(partition, seq, id = %bytes, "journal entry with a corrupt blob id");
                format!("corrupt:{bytes}")
            }),
            kind: match e.kind {
                RecordKind::Put => EntryKind::Put,
                RecordKind::Delete => EntryKind::Delete,
                RecordKind::TtlUpdate => EntryKind::TtlUpdate,
                RecordKind::Seal => EntryKind::Seal,
            },
            len: e.location.len,
        })
        .collect();
    Ok(JournalPage { partition, tail, head, entries, ..JournalPage::default() })
}

/// The journals of several partitions, each from the caller's cursor on; when none has an entry
/// yet, waits (up to the request's `wait_ms`, at most 30 s) until one has. One request per pair
/// of nodes stands in for one poll per partition: an idle cluster costs nothing.
#[utoipa::path(post, path = "/replica/v1/journal", tag = "replica", security(("node_token" = [])),
    request_body(content = Object, content_type = "application/json", description = "A JournalRequest: the caller's cursor per partition; waits up to wait_ms for an entry"),
    responses((status = 200, description = "The journals' pages (JournalBatch)", content_type = "application/json"), (status = 401, description = "Without the cluster's node token (a standalone node has none, and no replica routes)", body = ErrorBody), (status = 404, description = "No such blob here, or a standalone node", body = ErrorBody), (status = 400, description = "Malformed id, parameter or body", body = ErrorBody), (status = 421, description = "No replica of that partition on this node", body = ErrorBody), (status = 410, description = "Deleted or expired here", body = ErrorBody)))]
async fn journal_batch(State(state): State<ReplicaState>, body: Body) -> Result<Json<JournalBatch>, ApiError> {
    let request: JournalRequest = json_body(body).await?;
    check_version(request.version)?;
    // What the asking replica has applied: the journal below every replica's cursor can go.
    state.cluster.journal_acks.note(&request.node, &request.cursors);
    let limit = request.limit.clamp(1, 10_000);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(request.wait_ms).min(MAX_JOURNAL_WAIT);
    let volumes: Vec<Option<Arc<Volume>>> =
        request.cursors.iter().map(|c| state.cluster.store.volume(c.partition)).collect();
    let mut waited = false;
    loop {
        // Subscribed before looking: an entry written in between still wakes the wait.
        let mut watches: Vec<_> = volumes.iter().flatten().map(|v| v.watch_journal()).collect();
        let ready =
            request.cursors.iter().zip(&volumes).any(|(c, v)| v.as_ref().is_some_and(|v| v.journal_tail() > c.from));
        if ready && waited {
            // Woken by a commit: let the writes right behind it in, so that a busy replica
            // answers with pages, not an entry at a time.
            tokio::time::sleep(JOURNAL_LINGER).await;
        }
        if ready || tokio::time::Instant::now() >= deadline || state.shutdown.is_cancelled() {
            break;
        }
        waited = true;
        let changed = async {
            if watches.is_empty() {
                std::future::pending::<()>().await;
            }
            let _ = futures::future::select_all(watches.iter_mut().map(|w| Box::pin(w.changed()))).await;
        };
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = state.shutdown.cancelled() => {}
        }
    }
    let cursors = request.cursors.clone();
    let pages = tokio::task::spawn_blocking(move || {
        cursors
            .iter()
            .zip(volumes)
            .map(|(c, volume)| {
                let Some(volume) = volume else {
                    return JournalPage {
                        partition: c.partition,
                        error: Some(format!("no replica of partition {} on this node", c.partition)),
                        ..JournalPage::default()
                    };
                };
                page_of(c.partition, &volume, c.from, limit).unwrap_or_else(|e| JournalPage {
                    partition: c.partition,
                    error: Some(e.to_string()),
                    ..JournalPage::default()
                })
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(JournalBatch { version: WIRE_VERSION, pages }))
}

#[derive(Debug, Deserialize)]
pub struct JournalParams {
    #[serde(default)]
    pub from: u64,
    #[serde(default = "default_limit")]
    pub limit: usize,
}

fn default_limit() -> usize {
    1000
}

/// One partition's journal page at once (the single-partition form, for tools and older peers).
#[utoipa::path(get, path = "/replica/v1/partitions/{partition}/journal", tag = "replica", security(("node_token" = [])),
    params(("partition" = u32, Path, description = "Partition"), ("from" = Option<u64>, Query, description = "First sequence number"), ("limit" = Option<u32>, Query, description = "At most this many entries")),
    responses((status = 200, description = "A page of the journal (JournalPage)", content_type = "application/json"), (status = 401, description = "Without the cluster's node token (a standalone node has none, and no replica routes)", body = ErrorBody), (status = 404, description = "No such blob here, or a standalone node", body = ErrorBody), (status = 400, description = "Malformed id, parameter or body", body = ErrorBody), (status = 421, description = "No replica of that partition on this node", body = ErrorBody), (status = 410, description = "Deleted or expired here", body = ErrorBody)))]
async fn journal_page(
    State(state): State<ReplicaState>,
    Path(partition): Path<u32>,
    Query(params): Query<JournalParams>,
) -> Result<Json<JournalPage>, ApiError> {
    let volume = local_volume(&state, partition)?;
    let limit = params.limit.clamp(1, 10_000);
    Ok(Json(blocking(move || page_of(partition, &volume, params.from, limit)).await?))
}

/// The digest of each id bucket of this replica (anti-entropy).
#[utoipa::path(get, path = "/replica/v1/partitions/{partition}/digest", tag = "replica", security(("node_token" = [])),
    params(("partition" = u32, Path, description = "Partition")),
    responses((status = 200, description = "The digest of each id bucket (DigestAnswer)", content_type = "application/json"), (status = 401, description = "Without the cluster's node token (a standalone node has none, and no replica routes)", body = ErrorBody), (status = 404, description = "No such blob here, or a standalone node", body = ErrorBody), (status = 400, description = "Malformed id, parameter or body", body = ErrorBody), (status = 421, description = "No replica of that partition on this node", body = ErrorBody), (status = 410, description = "Deleted or expired here", body = ErrorBody)))]
async fn digest(State(state): State<ReplicaState>, Path(partition): Path<u32>) -> Result<Json<DigestAnswer>, ApiError> {
    let volume = local_volume(&state, partition)?;
    let buckets = blocking(move || volume.digest()).await?;
    debug_assert_eq!(buckets.len(), DIGEST_BUCKETS);
    Ok(Json(DigestAnswer { version: WIRE_VERSION, buckets: buckets.iter().map(|d| hex(d)).collect() }))
}

/// What this replica holds in one id bucket (anti-entropy).
#[utoipa::path(get, path = "/replica/v1/partitions/{partition}/buckets/{bucket}", tag = "replica", security(("node_token" = [])),
    params(("partition" = u32, Path, description = "Partition"), ("bucket" = u8, Path, description = "Id bucket")),
    responses((status = 200, description = "The bucket's entries (BucketEntries)", content_type = "application/json"), (status = 401, description = "Without the cluster's node token (a standalone node has none, and no replica routes)", body = ErrorBody), (status = 404, description = "No such blob here, or a standalone node", body = ErrorBody), (status = 400, description = "Malformed id, parameter or body", body = ErrorBody), (status = 421, description = "No replica of that partition on this node", body = ErrorBody), (status = 410, description = "Deleted or expired here", body = ErrorBody)))]
async fn bucket(
    State(state): State<ReplicaState>,
    Path((partition, bucket)): Path<(u32, u8)>,
) -> Result<Json<BucketEntries>, ApiError> {
    let volume = local_volume(&state, partition)?;
    let held = blocking(move || volume.bucket(bucket)).await?;
    let entries = held.into_iter().map(|h| BucketEntry { id: h.id.to_string(), deleted: h.deleted }).collect();
    Ok(Json(BucketEntries { version: WIRE_VERSION, entries }))
}

/// This replica's versions of one name, and which of the ids asked about it holds deleted (a
/// quorum read of a name, `cluster::names`).
#[utoipa::path(post, path = "/replica/v1/partitions/{partition}/names/versions", tag = "replica", security(("node_token" = [])),
    params(("partition" = u32, Path, description = "Partition")),
    request_body(content = String, content_type = "application/json", description = "NameVersionsQuery"),
    responses((status = 200, description = "The name's versions here (NameVersionsAnswer)", content_type = "application/json"), (status = 401, description = "Without the cluster's node token (a standalone node has none, and no replica routes)", body = ErrorBody), (status = 404, description = "No such blob here, or a standalone node", body = ErrorBody), (status = 400, description = "Malformed id, parameter or body", body = ErrorBody), (status = 421, description = "No replica of that partition on this node", body = ErrorBody), (status = 410, description = "Deleted or expired here", body = ErrorBody)))]
async fn name_versions(
    State(state): State<ReplicaState>,
    Path(partition): Path<u32>,
    body: Body,
) -> Result<Json<NameVersionsAnswer>, ApiError> {
    let query: NameVersionsQuery = json_body(body).await?;
    check_version(query.version)?;
    if query.ask.len() > MAX_PAGE {
        return Err(ApiError::InvalidBody(format!("at most {MAX_PAGE} ids may be asked about")));
    }
    for raw in &query.ask {
        let id = parse_id(raw)?;
        if id.partition() != partition {
            return Err(ApiError::InvalidBody(format!("{id} is not in partition {partition}")));
        }
    }
    let volume = local_volume(&state, partition)?;
    Ok(Json(blocking(move || versions_answer(&volume, query)).await?))
}

/// A page of this replica's current names of a space (a quorum listing, `cluster::names`).
#[utoipa::path(post, path = "/replica/v1/partitions/{partition}/names/current", tag = "replica", security(("node_token" = [])),
    params(("partition" = u32, Path, description = "Partition")),
    request_body(content = String, content_type = "application/json", description = "CurrentNamesQuery"),
    responses((status = 200, description = "The page (CurrentNamesAnswer)", content_type = "application/json"), (status = 401, description = "Without the cluster's node token (a standalone node has none, and no replica routes)", body = ErrorBody), (status = 404, description = "No such blob here, or a standalone node", body = ErrorBody), (status = 400, description = "Malformed id, parameter or body", body = ErrorBody), (status = 421, description = "No replica of that partition on this node", body = ErrorBody), (status = 410, description = "Deleted or expired here", body = ErrorBody)))]
async fn current_names(
    State(state): State<ReplicaState>,
    Path(partition): Path<u32>,
    body: Body,
) -> Result<Json<CurrentNamesAnswer>, ApiError> {
    let query: CurrentNamesQuery = json_body(body).await?;
    check_version(query.version)?;
    let volume = local_volume(&state, partition)?;
    Ok(Json(blocking(move || current_answer(&volume, query)).await?))
}
