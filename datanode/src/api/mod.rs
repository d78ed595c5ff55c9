//! The datanode's HTTP API.

pub mod auth;
pub mod blobs;
pub mod error;
pub mod limits;
pub mod replica;
pub mod s3;
pub mod serve;
pub mod upload;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Serialize;
use tracing::Instrument;
use utoipa::OpenApi;

use crate::engine::VolumeHealth;
use crate::front::Front;
use crate::metrics::{Metrics, RequestLabels};
use crate::store::Store;
use error::ApiError;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// The largest blob of a standalone node (a cluster's comes from its configuration).
    pub max_blob_bytes: u64,
    /// Memory for request bodies of the public API (replica writes from other datanodes have a
    /// budget of their own, [`replica::ReplicaState`], so that uploads waiting on their replicas
    /// can never starve the replica writes they wait for, on this node or a peer).
    pub uploads: Arc<upload::UploadBudget>,
    /// A standalone store, or a cluster that routes requests across replicas.
    pub front: Front,
    /// Who may call which route ([`auth::authorize`]).
    pub auth: Arc<auth::Auth>,
    /// Whether this listener serves the replica routes (set by [`router`]).
    pub serves_replica_routes: bool,
}

impl AppState {
    /// The largest blob accepted now (see [`Front::max_blob_bytes`]).
    pub fn max_blob_bytes(&self) -> u64 {
        self.front.max_blob_bytes(self.max_blob_bytes)
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Cairn datanode API",
        description = "Immutable blob storage. Errors are JSON: {\"error\": {\"code\", \"message\"}}."
    ),
    paths(
        blobs::put_blob,
        blobs::get_blob,
        blobs::head_blob,
        blobs::delete_blob,
        blobs::blob_info,
        blobs::update_ttl,
        admin_replicas,
        admin_usage,
        healthz,
        readyz,
        metrics,
        openapi_json,
        replica::put_batch,
        replica::put_replica,
        replica::get_replica,
        replica::meta_replica,
        replica::delete_replica,
        replica::ttl_replica,
        replica::journal_batch,
        replica::journal_page,
        replica::digest,
        replica::name_versions,
        replica::current_names,
        replica::bucket
    ),
    components(schemas(
        blobs::PutResponse,
        blobs::BlobInfo,
        blobs::TtlUpdate,
        error::ErrorBody,
        error::ErrorDetail,
        Readiness,
        VolumeReadiness
    )),
    modifiers(&SecuritySchemes),
    security(("bearer" = []))
)]
pub struct ApiDoc;

/// The schemes of docs/security.md: an access key's bearer token on the blob API, the node token
/// (or an admin key) on admin routes; routes marked `security(())` are open.
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("<key id>.<secret>")
                    .description(Some(
                        "An access key's token (docs/security.md): 401 without it, 403 without the route's scope",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "node_token",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                cairn_cluster::access::NODE_TOKEN_HEADER,
                "The cluster's node token: datanodes, the operator and `cairn status`",
            ))),
        );
        // Every route that takes credentials may answer 429 (too many failed authentications
        // from the caller's address or for the key it names, docs/security.md), and 401.
        use utoipa::openapi::{Content, Ref, ResponseBuilder};
        let refusal = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content("application/json", Content::new(Some(Ref::from_schema_name("ErrorBody"))))
                .build()
        };
        let open = utoipa::openapi::security::SecurityRequirement::default();
        for item in openapi.paths.paths.values_mut() {
            let operations =
                [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.head, &mut item.patch];
            for operation in operations.into_iter().flatten() {
                if operation.security.as_ref().is_some_and(|s| s.contains(&open)) {
                    continue;
                }
                let responses = &mut operation.responses.responses;
                responses.entry("401".into()).or_insert_with(|| refusal("No valid credentials").into());
                responses.entry("429".into()).or_insert_with(|| {
                    refusal("Too many failed authentications from this address or for this key (Retry-After)").into()
                });
            }
        }
    }
}

/// The node's routes: the public API, and in a cluster the replica API (`replica`).
pub fn router(mut state: AppState, replica: Option<replica::ReplicaState>) -> Router {
    state.serves_replica_routes = replica.is_some();
    let replica_routes = replica.map(replica::routes).unwrap_or_default();
    Router::new()
        .route("/v1/blobs", post(blobs::put_blob))
        .route("/v1/blobs/{id}", get(blobs::get_blob).head(blobs::head_blob).delete(blobs::delete_blob))
        .route("/v1/blobs/{id}/info", get(blobs::blob_info))
        .route("/v1/blobs/{id}/ttl", put(blobs::update_ttl))
        .route("/v1/admin/replicas", get(admin_replicas))
        .route("/v1/admin/usage", get(admin_usage))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .fallback(|req: Request| async move {
            ApiError::RouteNotFound(format!("{} {}", method_label(req.method()), error::excerpt(req.uri().path())))
        })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state.clone())
        .merge(replica_routes)
        .layer(middleware::from_fn_with_state(state.clone(), auth::authorize))
        .layer(middleware::from_fn_with_state(state, track))
}

/// Counts and times every request by method, matched route and status.
async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route =
        request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let header_bytes: usize = request.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    let id = crate::request::id_from(request.headers().get(crate::request::HEADER).and_then(|v| v.to_str().ok()));
    let span = tracing::info_span!("request", id = %id, method = %method, route = %route);
    // An S3 request another node passed on was checked by the S3 port's own limits.
    let forwarded_s3 = route == s3::forward::PREFIX;
    let mut response =
        if !forwarded_s3 && (request.headers().len() > serve::MAX_HEADERS || header_bytes > serve::MAX_HEADER_BYTES) {
            ApiError::HeadersTooLarge(format!(
                "{} headers of {header_bytes} bytes; at most {} headers of {} bytes in all",
                request.headers().len(),
                serve::MAX_HEADERS,
                serve::MAX_HEADER_BYTES
            ))
            .into_response()
        } else {
            let served = crate::request::scope(id.clone(), next.run(request)).instrument(span.clone()).await;
            // S3 requests another node passed on answer S3's XML errors, as S3 clients expect.
            if forwarded_s3 {
                served
            } else {
                json_errors(served).await
            }
        };
    span.in_scope(|| {
        tracing::debug!(status = response.status().as_u16(), seconds = started.elapsed().as_secs_f64(), "served")
    });
    if let Ok(value) = header::HeaderValue::from_str(&id) {
        response.headers_mut().insert(crate::request::HEADER, value);
    }
    // Blob bytes are the client's: no browser may guess them into HTML.
    response.headers_mut().insert("x-content-type-options", header::HeaderValue::from_static("nosniff"));
    let labels = RequestLabels { method, route, status: response.status().as_u16() };
    state.metrics.requests.get_or_create(&labels).inc();
    state.metrics.request_seconds.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    response
}

/// Every error is JSON: a plain-text rejection from the framework (a path or query that does not
/// decode, say) becomes `{"error": {...}}` with the code its status stands for.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 4096).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => String::new(),
    };
    let message = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_owned() } else { text };
    let body = error::error_json(error::code_for_status(status), &message);
    parts.headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    parts.headers.insert(header::CONTENT_LENGTH, header::HeaderValue::from(body.len()));
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// The method as a metric label: any method the API does not know is "other", so that a client
/// cannot grow the metrics without bound.
fn method_label(method: &axum::http::Method) -> String {
    use axum::http::Method;
    match *method {
        Method::GET | Method::HEAD | Method::POST | Method::PUT | Method::DELETE | Method::OPTIONS | Method::PATCH => {
            method.as_str().to_owned()
        }
        _ => "other".to_owned(),
    }
}

/// Replication progress of each local replica behind each peer (empty on a standalone node).
#[utoipa::path(get, path = "/v1/admin/replicas", tag = "operations", security(("bearer" = []), ("node_token" = [])),
    responses((status = 200, description = "One entry per (partition, peer)", body = Vec<Object>)))]
async fn admin_replicas(State(state): State<AppState>) -> Response {
    let list = state.front.cluster().map(|c| c.replication.list()).unwrap_or_default();
    Json(list).into_response()
}

/// What each local replica holds: blobs, stored and reclaimable bytes (`cairn status` adds them up).
#[utoipa::path(get, path = "/v1/admin/usage", tag = "operations", security(("bearer" = []), ("node_token" = [])),
    responses((status = 200, description = "One entry per local replica", body = Vec<Object>)))]
async fn admin_usage(State(state): State<AppState>) -> Response {
    let volumes = state.store.volumes();
    // Reading the statistics opens an index transaction per volume: off the runtime threads.
    let usage = tokio::task::spawn_blocking(move || {
        volumes
            .iter()
            .filter_map(|v| v.stats().ok())
            .map(|s| cairn_cluster::admin::ReplicaUsage {
                partition: s.partition,
                blobs: s.blobs,
                stored_bytes: s.live_bytes,
                reclaimable_bytes: s.reclaimable_bytes,
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    Json(usage).into_response()
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", security(()), responses((status = 200, description = "Alive", body = String)))]
async fn healthz() -> &'static str {
    "ok\n"
}

#[derive(Serialize, utoipa::ToSchema)]
struct Readiness {
    ready: bool,
    volumes: Vec<VolumeReadiness>,
    /// In a cluster: replicas assigned here that could not be opened (partition → reason); the
    /// node keeps trying, and serves the others meanwhile.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    unopened: std::collections::BTreeMap<u32, String>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct VolumeReadiness {
    partition: u32,
    /// writable, full (reads only), stalled (no new blobs for a passing reason, retried by
    /// itself) or failed (reads only, needs attention)
    state: String,
    reason: Option<String>,
}

/// Ready when every volume is open and none has failed (a full volume still serves reads).
#[utoipa::path(get, path = "/readyz", tag = "operations", security(()),
    responses((status = 200, body = Readiness), (status = 503, description = "A volume failed", body = Readiness)))]
async fn readyz(State(state): State<AppState>) -> Response {
    let volumes: Vec<VolumeReadiness> = state
        .store
        .volumes()
        .iter()
        .map(|v| {
            let (state, reason) = match v.health() {
                VolumeHealth::Writable => ("writable", None),
                VolumeHealth::Full => ("full", None),
                VolumeHealth::Stalled(reason) => ("stalled", Some(reason)),
                VolumeHealth::Failed(reason) => ("failed", Some(reason)),
            };
            VolumeReadiness { partition: v.partition(), state: state.into(), reason }
        })
        .collect();
    let ready = !volumes.is_empty() && volumes.iter().all(|v| v.state != "failed");
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let unopened = state.front.cluster().map(|c| c.unopened()).unwrap_or_default();
    (status, Json(Readiness { ready, volumes, unopened })).into_response()
}

/// Prometheus metrics, text format.
#[utoipa::path(get, path = "/metrics", tag = "operations", security((), ("bearer" = []), ("node_token" = [])), responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String)))]
async fn metrics(State(state): State<AppState>) -> Response {
    state.store.update_gauges();
    let body = state.metrics.encode();
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
}

/// This document: the routes this node serves (the replica routes on a node of a cluster only).
#[utoipa::path(get, path = "/openapi.json", tag = "operations", security((), ("bearer" = []), ("node_token" = [])), responses((status = 200, description = "OpenAPI 3.1 document")))]
async fn openapi_json(State(state): State<AppState>) -> Json<utoipa::openapi::OpenApi> {
    let mut doc = ApiDoc::openapi();
    if !state.serves_replica_routes {
        doc.paths.paths.retain(|path, _| !path.starts_with("/replica/"));
    }
    Json(doc)
}
