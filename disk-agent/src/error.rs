//! Errors of the node API: one enum, one place mapping each to a stable code and an HTTP status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cairn_common::agent_api::{ErrorBody, ErrorDetail};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    UnknownDisk(String),
    #[error("{0}")]
    VolumeExists(String),
    /// A datanode has the volume open.
    #[error("{0}")]
    VolumeInUse(String),
    #[error("{0}")]
    DiskConflict(String),
    #[error("{0}")]
    InsufficientCapacity(String),
    #[error("{0}")]
    FallocateUnsupported(String),
    /// The node socket without a credential, or with a malformed one.
    #[error("{0}")]
    Unauthenticated(String),
    /// A credential that does not allow this (another cluster's volume, a delete).
    #[error("{0}")]
    Forbidden(String),
    #[error("no route for {0}")]
    RouteNotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::UnknownDisk(_) => "unknown_disk",
            Self::VolumeExists(_) => "volume_exists",
            Self::VolumeInUse(_) => "volume_in_use",
            Self::DiskConflict(_) => "disk_conflict",
            Self::InsufficientCapacity(_) => "insufficient_capacity",
            Self::FallocateUnsupported(_) => "fallocate_unsupported",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::Forbidden(_) => "forbidden",
            Self::RouteNotFound(_) => "route_not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::UnknownDisk(_) | Self::RouteNotFound(_) => StatusCode::NOT_FOUND,
            Self::VolumeExists(_) | Self::DiskConflict(_) | Self::VolumeInUse(_) => StatusCode::CONFLICT,
            Self::InsufficientCapacity(_) => StatusCode::INSUFFICIENT_STORAGE,
            Self::FallocateUnsupported(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorDetail { code: self.code().into(), message: self.to_string() } };
        (self.status(), axum::Json(body)).into_response()
    }
}
