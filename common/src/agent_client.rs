//! A client for the disk agent's unix-socket API (used by datanodes, the CLI and tests).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::agent_api::{
    AgentInfo, CreateVolumeRequest, CreateVolumeResponse, DeleteVolumeResponse, DiskCapacity, ErrorBody, NodeReport,
    VolumeInfo,
};

#[derive(Debug, thiserror::Error)]
pub enum AgentClientError {
    #[error("disk agent at {socket}: {source}")]
    Connect { socket: PathBuf, source: std::io::Error },
    #[error("disk agent: {0}")]
    Transport(String),
    /// The agent answered with an error: its stable code, the HTTP status and the message.
    #[error("disk agent refused ({status}, {code}): {message}")]
    Refused { status: u16, code: String, message: String },
}

/// A disk agent's two sockets: the datanodes' and the admin's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSockets {
    pub node: PathBuf,
    pub admin: PathBuf,
}

impl AgentSockets {
    /// `DIR/disk-agent.sock` and `DIR/disk-agent-admin.sock` (a local cluster's, a test's).
    pub fn in_dir(dir: &Path) -> Self {
        Self { node: dir.join("disk-agent.sock"), admin: dir.join("disk-agent-admin.sock") }
    }

    /// The agent's command-line flags for them.
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        vec!["--socket".into(), self.node.clone().into(), "--admin-socket".into(), self.admin.clone().into()]
    }
}

/// A client of one agent socket. On the admin socket it needs nothing more; on the node socket a
/// datanode names its cluster and presents the cluster's disk-agent token ([`Self::as_cluster`]).
pub struct AgentClient {
    socket: PathBuf,
    /// (cluster, token): sent as `x-cairn-cluster` and `Authorization: Bearer`.
    cluster: Option<(String, String)>,
}

impl AgentClient {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self { socket: socket.as_ref().to_owned(), cluster: None }
    }

    /// Calls as a datanode of `cluster`, holding the cluster's disk-agent `token`.
    pub fn as_cluster(mut self, cluster: &str, token: &str) -> Self {
        self.cluster = Some((cluster.to_owned(), token.to_owned()));
        self
    }

    pub async fn info(&self) -> Result<AgentInfo, AgentClientError> {
        self.call(Method::GET, "/v1/info", None::<&()>).await
    }

    pub async fn report(&self) -> Result<NodeReport, AgentClientError> {
        self.call(Method::GET, "/v1/report", None::<&()>).await
    }

    pub async fn capacity(&self) -> Result<Vec<DiskCapacity>, AgentClientError> {
        self.call(Method::GET, "/v1/capacity", None::<&()>).await
    }

    pub async fn list_volumes(&self) -> Result<Vec<VolumeInfo>, AgentClientError> {
        self.call(Method::GET, "/v1/volumes", None::<&()>).await
    }

    pub async fn create_volume(
        &self,
        name: &str,
        request: &CreateVolumeRequest,
    ) -> Result<CreateVolumeResponse, AgentClientError> {
        self.call(Method::PUT, &format!("/v1/volumes/{name}"), Some(request)).await
    }

    pub async fn delete_volume(&self, name: &str) -> Result<DeleteVolumeResponse, AgentClientError> {
        self.call(Method::DELETE, &format!("/v1/volumes/{name}"), None::<&()>).await
    }

    /// One request on a fresh connection (calls are rare; no pooling needed).
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, AgentClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| AgentClientError::Connect { socket: self.socket.clone(), source })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| AgentClientError::Transport(e.to_string()))?;
        tokio::spawn(connection);
        let body = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b).expect("request serializes")),
            None => Bytes::new(),
        };
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "disk-agent")
            .header("content-type", "application/json");
        if let Some((cluster, token)) = &self.cluster {
            request = request
                .header(crate::agent_api::CLUSTER_HEADER, cluster)
                .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request.body(Full::new(body)).map_err(|e| AgentClientError::Transport(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(|e| AgentClientError::Transport(e.to_string()))?;
        let status = response.status();
        let bytes =
            response.into_body().collect().await.map_err(|e| AgentClientError::Transport(e.to_string()))?.to_bytes();
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|e| AgentClientError::Transport(format!("unexpected answer ({e})")));
        }
        let detail = serde_json::from_slice::<ErrorBody>(&bytes).map(|b| b.error).unwrap_or_else(|_| {
            crate::agent_api::ErrorDetail {
                code: "unknown".into(),
                message: String::from_utf8_lossy(&bytes).into_owned(),
            }
        });
        Err(AgentClientError::Refused { status: status.as_u16(), code: detail.code, message: detail.message })
    }
}

impl AgentClientError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Refused { status, .. } => StatusCode::from_u16(*status).ok(),
            _ => None,
        }
    }
}
