//! The node API on a unix socket: JSON over HTTP/1.1. docs/disk-agent.md lists the routes.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cairn_common::agent_api::{AgentInfo, CreateVolumeRequest};
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::error::AgentError;

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/info", get(info))
        .route("/v1/report", get(report))
        .route("/v1/capacity", get(capacity))
        .route("/v1/volumes", get(list_volumes))
        .route("/v1/volumes/{name}", axum::routing::put(create_volume).delete(delete_volume))
        .route("/metrics", get(metrics))
        .fallback(|uri: Uri| async move { AgentError::RouteNotFound(uri.path().to_owned()) })
        .method_not_allowed_fallback(|| async { AgentError::MethodNotAllowed })
        .with_state(agent)
}

/// Serves until `shutdown` is cancelled. A stale socket file from an earlier run is replaced.
pub async fn serve(agent: Arc<Agent>, socket: &Path, shutdown: CancellationToken) -> anyhow::Result<()> {
    if socket.exists() {
        std::fs::remove_file(socket)?;
    }
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let listener = tokio::net::UnixListener::bind(socket)?;
    tracing::info!(socket = %socket.display(), "node API listening");
    axum::serve(listener, router(agent)).with_graceful_shutdown(async move { shutdown.cancelled().await }).await?;
    let _ = std::fs::remove_file(socket);
    Ok(())
}

/// Runs a blocking agent call off the async threads (scans and fallocate touch disks).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| AgentError::Internal(e.to_string()))?
}

async fn info(State(agent): State<Arc<Agent>>) -> Json<AgentInfo> {
    let options = agent.options();
    Json(AgentInfo {
        node: options.node_name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        mountinfo: options.mountinfo.display().to_string(),
    })
}

async fn report(State(agent): State<Arc<Agent>>) -> Response {
    Json(agent.report()).into_response()
}

async fn capacity(State(agent): State<Arc<Agent>>) -> Response {
    Json(agent.capacity()).into_response()
}

async fn list_volumes(State(agent): State<Arc<Agent>>) -> Response {
    Json(agent.list_volumes()).into_response()
}

async fn create_volume(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
    body: axum::body::Bytes,
) -> Result<Response, AgentError> {
    let request: CreateVolumeRequest = serde_json::from_slice(&body).map_err(|e| {
        AgentError::InvalidRequest(format!(
            "expected {{\"disk\", \"capacity_bytes\", \"partition\", \"segment_size_bytes\"?}}: {e}"
        ))
    })?;
    let response = blocking(move || agent.create_volume(&name, &request)).await?;
    let status = if response.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(response)).into_response())
}

async fn delete_volume(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> Result<Response, AgentError> {
    let response = blocking(move || agent.delete_volume(&name)).await?;
    Ok(Json(response).into_response())
}

async fn metrics(State(agent): State<Arc<Agent>>) -> Response {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &agent.metrics.registry()) {
        return AgentError::Internal(e.to_string()).into_response();
    }
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}
