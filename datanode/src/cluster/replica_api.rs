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
    /// The blob id; `corrupt:<hex>` when the journal holds bytes that are not one (the entry is
    /// reported by the replica that pulls it, never passed as an empty id).
    pub id: String,
    pub kind: EntryKind,
    /// Bytes of the record.
    pub len: u64,
}

/// What a journal entry records. A kind this version does not know reads as `Unknown` (a newer
/// peer), and the puller owes it rather than passing over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    Put,
    Delete,
    TtlUpdate,
    /// The end of a segment: nothing to copy.
    Seal,
    #[serde(other)]
    Unknown,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Put => "put",
            EntryKind::Delete => "delete",
            EntryKind::TtlUpdate => "ttl_update",
            EntryKind::Seal => "seal",
            EntryKind::Unknown => "unknown",
        }
    }

    /// The kind of its wire name (as an owed entry keeps it).
    pub fn parse(name: &str) -> Self {
        serde_json::from_value(serde_json::Value::String(name.to_owned())).unwrap_or(EntryKind::Unknown)
    }
}

impl std::fmt::Display for EntryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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
                id: BlobId::from_bytes(&e.blob_id).map(|id| id.to_string()).unwrap_or_else(|_| {
                    let hex: String = e.blob_id.iter().map(|b| format!("{b:02x}")).collect();
                    tracing::warn!(partition, seq, id = %hex, "journal entry with a corrupt blob id");
                    format!("corrupt:{hex}")
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
        Ok(JournalPage { tail, entries })
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(Json(page))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The journal's wire: every kind by its name both ways, and a kind this version does not
    /// know (a newer peer's) reads as `Unknown` without failing the page around it.
    #[test]
    fn journal_kinds_are_typed_and_an_unknown_one_does_not_break_the_page() {
        for kind in [EntryKind::Put, EntryKind::Delete, EntryKind::TtlUpdate, EntryKind::Seal] {
            assert_eq!(EntryKind::parse(kind.as_str()), kind);
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
        let page: JournalPage = serde_json::from_str(
            r#"{"tail": 3, "entries": [{"seq": 1, "id": "x", "kind": "put", "len": 9},
                                        {"seq": 2, "id": "y", "kind": "rename_v2", "len": 9}]}"#,
        )
        .unwrap();
        assert_eq!(page.entries.iter().map(|e| e.kind).collect::<Vec<_>>(), [EntryKind::Put, EntryKind::Unknown]);
        assert_eq!(EntryKind::parse("rename_v2"), EntryKind::Unknown);
    }
}
