//! Request bodies held in memory, under one budget for the whole node.
//!
//! A blob is written as one record, so its bytes are in memory from the first byte received until
//! the last replica has written them. Every such buffer is counted against [`UploadBudget`]: a
//! request waits for room (up to a deadline, then 503 with Retry-After), and the room comes back
//! when the last reference to the buffer is gone, also when a replica write outlives the response.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap};
use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;

/// The budget is kept in units of this many bytes (a semaphore counts in u32 per acquire).
const UNIT: u64 = 1024;
/// A body of unknown length takes room this much at a time.
const STEP: u64 = 1 << 20;

/// Room reserved in the upload budget, given back when dropped.
pub type Room = OwnedSemaphorePermit;

pub struct UploadBudget {
    permits: Arc<Semaphore>,
    total_bytes: u64,
    wait: Duration,
}

/// A body's bytes and the room they take; the room is given back when the bytes are dropped.
struct Budgeted {
    bytes: Vec<u8>,
    _room: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Budgeted {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl UploadBudget {
    /// `total_bytes` of bodies at once; a request waits at most `wait` for room.
    pub fn new(total_bytes: u64, wait: Duration) -> Self {
        // Rounded up, so that a body of exactly `total_bytes` always fits.
        let units = total_bytes.div_ceil(UNIT).clamp(1, Semaphore::MAX_PERMITS as u64) as usize;
        Self { permits: Arc::new(Semaphore::new(units)), total_bytes, wait }
    }

    async fn take(&self, bytes: u64) -> Result<OwnedSemaphorePermit, ApiError> {
        let units = u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX);
        match tokio::time::timeout(self.wait, self.permits.clone().acquire_many_owned(units)).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(ApiError::UploadBusy(format!(
                "the node is receiving {} bytes of uploads, its limit; try again shortly",
                self.total_bytes
            ))),
        }
    }

    /// Room for `bytes` of a body another front holds (the S3 front's pieces), given back when
    /// the permit drops; `None` when none came within the wait.
    pub async fn reserve(&self, bytes: u64) -> Option<Room> {
        self.take(bytes.clamp(1, self.total_bytes)).await.ok()
    }

    /// Reads a request body of at most `max` bytes into one buffer counted against the budget.
    /// A body that says its length takes its room up front; one that does not, step by step.
    pub async fn read(&self, headers: &HeaderMap, body: Body, max: u64) -> Result<Bytes, ApiError> {
        // A blob larger than the whole buffer could never get room.
        let max = max.min(self.total_bytes);
        let too_large =
            |size: String| ApiError::PayloadTooLarge(format!("blob of {size} bytes exceeds the limit of {max} bytes"));
        let declared = match headers.get(header::CONTENT_LENGTH) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| ApiError::InvalidHeader("Content-Length is not a number".into()))?,
            ),
        };
        if let Some(len) = declared.filter(|len| *len > max) {
            return Err(too_large(len.to_string()));
        }
        let mut reserved = declared.unwrap_or(STEP.min(max));
        let mut room = self.take(reserved.max(1)).await?;
        let mut bytes = Vec::with_capacity(reserved as usize);
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(read_error)?;
            let Ok(data) = frame.into_data() else { continue };
            let needed = bytes.len() as u64 + data.len() as u64;
            if needed > max {
                return Err(too_large(format!("more than {max}")));
            }
            if needed > reserved {
                let more = (needed - reserved).max(STEP).min(max - reserved);
                room.merge(self.take(more).await?);
                reserved += more;
                bytes.reserve_exact((reserved as usize).saturating_sub(bytes.capacity()));
            }
            bytes.extend_from_slice(&data);
        }
        Ok(Bytes::from_owner(Budgeted { bytes, _room: room }))
    }
}

/// Reads a small request body (a JSON document), at most `max` bytes; a body that stops arriving
/// is a 408, as for uploads.
pub async fn read_small(body: Body, max: usize) -> Result<Bytes, ApiError> {
    match http_body_util::Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::PayloadTooLarge(format!("the body is larger than {max} bytes")))
        }
        Err(e) => Err(read_error(axum::Error::new(e))),
    }
}

fn read_error(e: axum::Error) -> ApiError {
    let source = e.into_inner();
    let first: &(dyn std::error::Error + 'static) = source.as_ref();
    let timed_out =
        std::iter::successors(Some(first), |c| c.source()).any(|c| c.is::<tower_http::timeout::TimeoutError>());
    if timed_out {
        ApiError::RequestTimeout("the request body stopped arriving".into())
    } else {
        ApiError::InvalidBody(format!("reading the request body: {source}"))
    }
}
