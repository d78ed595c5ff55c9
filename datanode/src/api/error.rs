//! API errors: one enum, one place mapping each to a stable code and an HTTP status.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::cluster::router::RouteError;
use crate::engine::record::MetaError;
use crate::engine::VolumeError;
use crate::front::FrontError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid blob id: {0}")]
    InvalidBlobId(String),
    #[error("{0}")]
    InvalidHeader(String),
    #[error("{0}")]
    InvalidBody(String),
    #[error("{0}")]
    MetadataTooLarge(String),
    #[error("blob not found")]
    BlobNotFound,
    #[error("no route for {0}")]
    RouteNotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("a different blob with this id already exists")]
    Conflict,
    #[error("blob was deleted")]
    BlobDeleted,
    #[error("blob has expired")]
    BlobExpired,
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{message}")]
    RangeNotSatisfiable { message: String, blob_len: u64 },
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("{0}")]
    Unavailable(String),
    /// Passing overload (connections, file descriptors): try again shortly.
    #[error("{0}")]
    Busy(String),
    /// No room in the upload memory for this body (not read): try again shortly.
    #[error("{0}")]
    UploadBusy(String),
    /// A replica's volume is full (replica API only; the router then stops writing to it).
    #[error("volume of partition {0} is full")]
    VolumeFull(u32),
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{0}")]
    HeadersTooLarge(String),
    #[error("{0}")]
    Integrity(String),
    /// A replica call reached a node that holds no replica of the partition.
    #[error("no replica of partition {0} on this node")]
    NoReplica(u32),
    /// Too few replicas answered for a write quorum (or for any read).
    #[error("{0}")]
    NoQuorum(String),
    /// No credentials, or credentials that are not valid.
    #[error("{0}")]
    Unauthenticated(String),
    /// Valid credentials without the scope the route needs.
    #[error("{0}")]
    Forbidden(String),
    /// This client address failed authentication too often: try again after that many seconds.
    #[error("too many failed authentications from this address: try again in {0} s")]
    TooManyAuthFailures(u64),
    #[error("{0}")]
    Internal(String),
}

/// The JSON body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable code, e.g. `blob_not_found`.
    pub code: &'static str,
    pub message: String,
}

/// The stable code of an error that only has a status: a rejection by the HTTP framework (a path
/// or query that does not decode) or by hyper itself (a malformed request, headers too large).
pub fn code_for_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_request",
        401 => "unauthenticated",
        403 => "forbidden",
        404 => "route_not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        411 => "length_required",
        413 => "payload_too_large",
        414 => "uri_too_long",
        415 => "unsupported_media_type",
        422 => "invalid_body",
        429 => "too_many_requests",
        431 => "headers_too_large",
        503 => "unavailable",
        s if s >= 500 => "internal_error",
        _ => "invalid_request",
    }
}

/// The JSON body of an error response, for answers written outside the router.
pub fn error_json(code: &'static str, message: &str) -> Vec<u8> {
    let body = ErrorBody { error: ErrorDetail { code, message: message.to_owned() } };
    let mut out = serde_json::to_vec(&body).expect("serializes");
    out.push(b'\n');
    out
}

/// Error messages are cut at this many bytes.
const MAX_MESSAGE_BYTES: usize = 512;

/// At most 64 characters of what a client sent, for an error message: a hostile 8 KB id is not
/// echoed back (nor logged) whole.
pub fn excerpt(text: &str) -> String {
    const MAX: usize = 64;
    match text.char_indices().nth(MAX) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &text[..cut], text.len()),
    }
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidBlobId(_) => "invalid_blob_id",
            ApiError::InvalidHeader(_) => "invalid_header",
            ApiError::InvalidBody(_) => "invalid_body",
            ApiError::MetadataTooLarge(_) => "metadata_too_large",
            ApiError::BlobNotFound => "blob_not_found",
            ApiError::RouteNotFound(_) => "route_not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Conflict => "blob_conflict",
            ApiError::BlobDeleted => "blob_deleted",
            ApiError::BlobExpired => "blob_expired",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::RangeNotSatisfiable { .. } => "range_not_satisfiable",
            ApiError::InsufficientStorage(_) => "insufficient_storage",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Busy(_) | ApiError::UploadBusy(_) => "busy",
            ApiError::VolumeFull(_) => "volume_full",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::HeadersTooLarge(_) => "headers_too_large",
            ApiError::Integrity(_) => "integrity_error",
            ApiError::NoReplica(_) => "no_replica_here",
            ApiError::NoQuorum(_) => "no_quorum",
            ApiError::Unauthenticated(_) => "unauthenticated",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::TooManyAuthFailures(_) => "too_many_auth_failures",
            ApiError::Internal(_) => "internal_error",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidBlobId(_)
            | ApiError::InvalidHeader(_)
            | ApiError::InvalidBody(_)
            | ApiError::MetadataTooLarge(_) => StatusCode::BAD_REQUEST,
            ApiError::BlobNotFound | ApiError::RouteNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict => StatusCode::CONFLICT,
            ApiError::BlobDeleted | ApiError::BlobExpired => StatusCode::GONE,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiError::InsufficientStorage(_) | ApiError::VolumeFull(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Unavailable(_) | ApiError::NoQuorum(_) | ApiError::Busy(_) | ApiError::UploadBusy(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::NoReplica(_) => StatusCode::MISDIRECTED_REQUEST,
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::TooManyAuthFailures(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Integrity(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<VolumeError> for ApiError {
    fn from(e: VolumeError) -> Self {
        match e {
            VolumeError::NotFound => ApiError::BlobNotFound,
            VolumeError::Deleted => ApiError::BlobDeleted,
            VolumeError::Expired => ApiError::BlobExpired,
            VolumeError::Conflict => ApiError::Conflict,
            VolumeError::Full => ApiError::InsufficientStorage("the volume is full (deletes still fit)".into()),
            e @ VolumeError::NoRoom { .. } => ApiError::InsufficientStorage(e.to_string()),
            VolumeError::Paused { reason, no_space: true } => ApiError::InsufficientStorage(reason),
            VolumeError::Paused { reason, no_space: false } => ApiError::Busy(reason),
            VolumeError::TooLarge { size, max } => {
                ApiError::PayloadTooLarge(format!("blob of {size} bytes exceeds the limit of {max} bytes"))
            }
            VolumeError::Failed(reason) => ApiError::Unavailable(format!("volume failed: {reason}")),
            VolumeError::Closed => ApiError::Unavailable("volume is shutting down".into()),
            VolumeError::Integrity(msg) => ApiError::Integrity(msg),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // Whatever a message quotes of the request, it stays short (and so does the log line).
        let mut message = self.to_string();
        if message.len() > MAX_MESSAGE_BYTES {
            let cut = (0..=MAX_MESSAGE_BYTES).rev().find(|i| message.is_char_boundary(*i)).unwrap_or(0);
            message.truncate(cut);
            message.push('…');
        }
        if status.is_server_error() {
            tracing::error!(code = self.code(), error = %message, "request failed");
        }
        let body = ErrorBody { error: ErrorDetail { code: self.code(), message } };
        let mut response = (status, axum::Json(body)).into_response();
        match self {
            ApiError::RangeNotSatisfiable { blob_len, .. } => {
                let value = HeaderValue::from_str(&format!("bytes */{blob_len}")).expect("ascii");
                response.headers_mut().insert(axum::http::header::CONTENT_RANGE, value);
            }
            ApiError::Busy(_) | ApiError::UploadBusy(_) => {
                response.headers_mut().insert(axum::http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::TooManyAuthFailures(seconds) => {
                response.headers_mut().insert(axum::http::header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            _ => {}
        }
        // Refused before its body was read: the connection cannot be reused (the rest of the body
        // would be read as the next request), so say so, and clients do not send on it again.
        // (Authentication's refusals say so themselves when the request had a body.)
        if matches!(self, ApiError::PayloadTooLarge(_) | ApiError::RequestTimeout(_) | ApiError::UploadBusy(_)) {
            response.headers_mut().insert(axum::http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<MetaError> for ApiError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::Invalid(m) => ApiError::InvalidHeader(m),
            MetaError::TooLarge(m) => ApiError::MetadataTooLarge(m),
        }
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::NotFound => ApiError::BlobNotFound,
            RouteError::Deleted => ApiError::BlobDeleted,
            RouteError::NoRoom(m) => ApiError::InsufficientStorage(m),
            RouteError::NoQuorum(m) => ApiError::NoQuorum(m),
        }
    }
}

impl From<FrontError> for ApiError {
    fn from(e: FrontError) -> Self {
        match e {
            FrontError::Volume(e) => e.into(),
            FrontError::Route(e) => e.into(),
            FrontError::Unsupported(m) => ApiError::Unavailable(m.into()),
        }
    }
}
