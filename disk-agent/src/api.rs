//! The node API on two unix sockets: JSON over HTTP/1.1. docs/disk-agent.md lists the routes.
//!
//! The **node socket** is mounted into datanode Pods: a datanode names its cluster and presents
//! the cluster's token, and sees and makes only its own cluster's volumes ([`crate::owners`]); it
//! never deletes. The **admin socket** (mode 0600 in a 0700 directory, mounted only into the
//! operator's purge Pods) may do everything. Which socket a call came in on is the whole of its
//! authority: the kernel's file permissions and the Pods' mounts decide who reaches it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use cairn_common::agent_api::{AgentInfo, CreateVolumeRequest, NodeReport};
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::error::AgentError;
use crate::owners::Caller;

/// Who is at the other end of a node-socket connection (the kernel's SO_PEERCRED): the uid and
/// gid a datanode's volumes are handed to, so that it need not run as root.
#[derive(Debug, Clone, Copy)]
pub struct PeerCredentials {
    pub uid: u32,
    pub gid: u32,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::UnixListener>>
    for PeerCredentials
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        // Unreadable credentials hand nothing over: as root's.
        match stream.io().peer_cred() {
            Ok(cred) => Self { uid: cred.uid(), gid: cred.gid() },
            Err(_) => Self { uid: 0, gid: 0 },
        }
    }
}

/// Which socket a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Socket {
    /// Datanodes': their own cluster's volumes, no deletes.
    Node,
    /// The operator's: everything.
    Admin,
}

pub fn router(agent: Arc<Agent>, socket: Socket) -> Router {
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
        .layer(Extension(socket))
        .with_state(agent)
}

/// Serves both sockets until `shutdown` is cancelled. A stale socket file from an earlier run is
/// replaced.
pub async fn serve(
    agent: Arc<Agent>,
    node_socket: &Path,
    admin_socket: &Path,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(node_socket != admin_socket, "the node and admin sockets must be two paths");
    // Anyone on the machine may connect to the node socket (a datanode need not run as root);
    // what it may do there is what its cluster's token allows.
    let node = bind(node_socket, None, 0o666)?;
    // The admin socket: the owner only, in a directory the agent makes for the owner only.
    let admin = bind(admin_socket, Some(0o700), 0o600)?;
    tracing::info!(node = %node_socket.display(), admin = %admin_socket.display(), "node API listening");
    let service = |socket| router(agent.clone(), socket).into_make_service_with_connect_info::<PeerCredentials>();
    let node = axum::serve(node, service(Socket::Node)).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let admin = axum::serve(admin, service(Socket::Admin)).with_graceful_shutdown(shutdown.cancelled_owned());
    let served =
        tokio::try_join!(std::future::IntoFuture::into_future(node), std::future::IntoFuture::into_future(admin));
    let _ = std::fs::remove_file(node_socket);
    let _ = std::fs::remove_file(admin_socket);
    served?;
    Ok(())
}

/// Binds a unix socket with `mode`; a parent directory it makes gets `dir_mode` (when given).
fn bind(path: &Path, dir_mode: Option<u32>, mode: u32) -> anyhow::Result<tokio::net::UnixListener> {
    let context = |e: std::io::Error| anyhow::anyhow!("{}: {e}", path.display());
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        std::fs::create_dir_all(parent).map_err(context)?;
        if let Some(dir_mode) = dir_mode {
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(dir_mode)).map_err(context)?;
        }
    }
    if path.exists() {
        std::fs::remove_file(path).map_err(context)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(context)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(context)?;
    Ok(listener)
}

/// The report a request may see: everything on the admin socket, on the node socket the calling
/// cluster's volumes only.
fn visible_report(agent: &Agent, socket: Socket, headers: &HeaderMap) -> Result<NodeReport, AgentError> {
    match socket {
        Socket::Admin => Ok(agent.report()),
        Socket::Node => Ok(agent.report_for(Caller::from_headers(headers)?.as_ref())),
    }
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

async fn report(
    State(agent): State<Arc<Agent>>,
    Extension(socket): Extension<Socket>,
    headers: HeaderMap,
) -> Result<Response, AgentError> {
    Ok(Json(visible_report(&agent, socket, &headers)?).into_response())
}

async fn capacity(State(agent): State<Arc<Agent>>) -> Response {
    Json(agent.capacity()).into_response()
}

async fn list_volumes(
    State(agent): State<Arc<Agent>>,
    Extension(socket): Extension<Socket>,
    headers: HeaderMap,
) -> Result<Response, AgentError> {
    let report = visible_report(&agent, socket, &headers)?;
    Ok(Json(report.disks.into_iter().flat_map(|d| d.volumes).collect::<Vec<_>>()).into_response())
}

async fn create_volume(
    State(agent): State<Arc<Agent>>,
    Extension(socket): Extension<Socket>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<PeerCredentials>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
    body: axum::body::Bytes,
) -> Result<Response, AgentError> {
    let caller = match socket {
        Socket::Admin => None,
        Socket::Node => Some(Caller::from_headers(&headers)?.ok_or_else(|| {
            AgentError::Unauthenticated(format!(
                "a volume is asked for with {}: <cluster> and Authorization: Bearer <the cluster's disk-agent token>",
                cairn_common::agent_api::CLUSTER_HEADER
            ))
        })?),
    };
    let request: CreateVolumeRequest = serde_json::from_slice(&body).map_err(|e| {
        AgentError::InvalidRequest(format!(
            "expected {{\"disk\", \"capacity_bytes\", \"partition\", \"segment_size_bytes\"?, \"node\"?}}: {e}"
        ))
    })?;
    // A datanode that is not root gets its volume's files (root's, as the agent made them).
    let owner = (socket == Socket::Node && peer.uid != 0).then_some((peer.uid, peer.gid));
    let response = blocking(move || agent.create_volume(&name, &request, caller.as_ref(), owner)).await?;
    let status = if response.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(response)).into_response())
}

async fn delete_volume(
    State(agent): State<Arc<Agent>>,
    Extension(socket): Extension<Socket>,
    UrlPath(name): UrlPath<String>,
) -> Result<Response, AgentError> {
    if socket == Socket::Node {
        return Err(AgentError::Forbidden(
            "volumes are deleted through the admin socket only (the operator's purge, `cairn volumes purge`)".into(),
        ));
    }
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
