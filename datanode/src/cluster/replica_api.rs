//! The replica API: what datanodes ask each other, under `/replica/v1/`, apart from the public
//! API. Writes here go to this node's own replica only; they never fan out.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, get, put};
use axum::{Json, Router};
use cairn_common::BlobId;
use serde::{Deserialize, Serialize};

use crate::api::blobs::parse_id;
use crate::api::error::ApiError;
use crate::api::limits::parse_put_headers;
use crate::api::AppState;
use crate::engine::record::RecordKind;
use crate::engine::{PutRequest, Volume, VolumeError};

pub const CREATED_HEADER: &str = "x-cairn-created-ms";
pub const EXPIRES_HEADER: &str = "x-cairn-expires-ms";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/replica/v1/blobs/{id}", put(put_replica).delete(delete(delete_replica)))
        .route("/replica/v1/blobs/{id}/ttl", put(ttl_replica))
        .route("/replica/v1/partitions/{partition}/journal", get(journal))
}

fn local_volume(state: &AppState, partition: u32) -> Result<Arc<Volume>, ApiError> {
    state.store.volume(partition).ok_or(ApiError::NoReplica(partition))
}

fn header_ms(headers: &HeaderMap, name: &str) -> Result<Option<u64>, ApiError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| ApiError::InvalidHeader(format!("{name} is not a number of milliseconds")))
        })
        .transpose()
}

/// Stores a blob in this node's replica, with the id, times and metadata the router chose.
async fn put_replica(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<StatusCode, ApiError> {
    let blob_id = parse_id(&raw)?;
    let (meta, _) = parse_put_headers(&headers)?;
    let payload = state.replica_uploads.read(&headers, body, state.max_blob_bytes()).await?;
    let created_ms =
        header_ms(&headers, CREATED_HEADER)?.ok_or_else(|| ApiError::InvalidHeader(CREATED_HEADER.into()))?;
    let expiry_ms = header_ms(&headers, EXPIRES_HEADER)?;
    let volume = local_volume(&state, blob_id.partition())?;
    match volume.put(PutRequest { blob_id, meta, payload, created_ms, expiry_ms }).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        // The router marks the partition read-only on this answer alone.
        Err(VolumeError::Full) => Err(ApiError::VolumeFull(blob_id.partition())),
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TombstoneAnswer {
    /// Whether this replica had the blob before.
    pub existed: bool,
}

#[derive(Debug, Deserialize)]
pub struct DeleteParams {
    /// Delete only a blob this replica has (or had); an unknown id leaves no tombstone.
    #[serde(default)]
    pub if_present: bool,
}

async fn delete_replica(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    Query(params): Query<DeleteParams>,
) -> Result<Json<TombstoneAnswer>, ApiError> {
    let blob_id = parse_id(&raw)?;
    let volume = local_volume(&state, blob_id.partition())?;
    let existed =
        if params.if_present { volume.delete_if_present(blob_id).await? } else { volume.tombstone(blob_id).await? };
    Ok(Json(TombstoneAnswer { existed }))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TtlBody {
    pub expires_ms: Option<u64>,
}

async fn ttl_replica(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    body: axum::body::Body,
) -> Result<StatusCode, ApiError> {
    let blob_id = parse_id(&raw)?;
    let body = crate::api::upload::read_small(body, 64 * 1024).await?;
    let body: TtlBody = serde_json::from_slice(&body).map_err(|e| ApiError::InvalidBody(e.to_string()))?;
    local_volume(&state, blob_id.partition())?.update_ttl(blob_id, body.expires_ms).await?;
    Ok(StatusCode::NO_CONTENT)
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

#[derive(Debug, Serialize, Deserialize)]
pub struct JournalPage {
    /// The next sequence this replica will write.
    pub tail: u64,
    pub entries: Vec<JournalItem>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JournalItem {
    pub seq: u64,
    pub id: String,
    /// put, delete or ttl_update.
    pub kind: String,
    /// Bytes of the record.
    pub len: u64,
}

/// A page of this replica's journal from `from` on.
async fn journal(
    State(state): State<AppState>,
    Path(partition): Path<u32>,
    Query(params): Query<JournalParams>,
) -> Result<Json<JournalPage>, ApiError> {
    let volume = local_volume(&state, partition)?;
    let limit = params.limit.clamp(1, 10_000);
    let page = tokio::task::spawn_blocking(move || -> Result<JournalPage, ApiError> {
        let tail = volume.journal_tail()?;
        let entries = volume
            .journal(params.from, limit)?
            .into_iter()
            .map(|(seq, e)| JournalItem {
                seq,
                id: BlobId::from_bytes(&e.blob_id).map(|id| id.to_string()).unwrap_or_default(),
                kind: match e.kind {
                    RecordKind::Put => "put",
                    RecordKind::Delete => "delete",
                    RecordKind::TtlUpdate => "ttl_update",
                    RecordKind::Seal => "seal",
                }
                .into(),
                len: e.location.len,
            })
            .collect();
        Ok(JournalPage { tail, entries })
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(Json(page))
}
