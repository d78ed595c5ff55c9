//! S3's errors: each a status and one of S3's codes, answered in S3's XML shape. The one place
//! an S3 failure becomes HTTP.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Error {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Extra elements some codes carry (e.g. the bucket name).
    pub resource: Option<String>,
}

impl std::fmt::Display for S3Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for S3Error {}

macro_rules! s3_errors {
    ($($fn:ident => $status:ident, $code:literal;)*) => {
        impl S3Error {
            $(
                pub fn $fn(message: impl Into<String>) -> Self {
                    Self { status: StatusCode::$status, code: $code, message: message.into(), resource: None }
                }
            )*
        }
    };
}

s3_errors! {
    access_denied => FORBIDDEN, "AccessDenied";
    authorization_header_malformed_ => BAD_REQUEST, "AuthorizationHeaderMalformed";
    authorization_query_malformed_ => BAD_REQUEST, "AuthorizationQueryParametersError";
    bad_digest => BAD_REQUEST, "BadDigest";
    bucket_already_owned_by_you => CONFLICT, "BucketAlreadyOwnedByYou";
    bucket_not_empty => CONFLICT, "BucketNotEmpty";
    entity_too_large => BAD_REQUEST, "EntityTooLarge";
    entity_too_small => BAD_REQUEST, "EntityTooSmall";
    incomplete_body => BAD_REQUEST, "IncompleteBody";
    internal => INTERNAL_SERVER_ERROR, "InternalError";
    invalid_access_key_id => FORBIDDEN, "InvalidAccessKeyId";
    invalid_argument => BAD_REQUEST, "InvalidArgument";
    invalid_bucket_name => BAD_REQUEST, "InvalidBucketName";
    invalid_digest => BAD_REQUEST, "InvalidDigest";
    invalid_part => BAD_REQUEST, "InvalidPart";
    invalid_part_order => BAD_REQUEST, "InvalidPartOrder";
    invalid_part_number => RANGE_NOT_SATISFIABLE, "InvalidPartNumber";
    invalid_range => RANGE_NOT_SATISFIABLE, "InvalidRange";
    invalid_request => BAD_REQUEST, "InvalidRequest";
    key_too_long => BAD_REQUEST, "KeyTooLongError";
    malformed_xml => BAD_REQUEST, "MalformedXML";
    metadata_too_large => BAD_REQUEST, "MetadataTooLarge";
    method_not_allowed => METHOD_NOT_ALLOWED, "MethodNotAllowed";
    missing_content_length => LENGTH_REQUIRED, "MissingContentLength";
    no_such_bucket_ => NOT_FOUND, "NoSuchBucket";
    no_such_key_ => NOT_FOUND, "NoSuchKey";
    no_such_upload_ => NOT_FOUND, "NoSuchUpload";
    not_implemented => NOT_IMPLEMENTED, "NotImplemented";
    precondition_failed => PRECONDITION_FAILED, "PreconditionFailed";
    service_unavailable => SERVICE_UNAVAILABLE, "ServiceUnavailable";
    slow_down => SERVICE_UNAVAILABLE, "SlowDown";
    content_sha256_mismatch => BAD_REQUEST, "XAmzContentSHA256Mismatch";
    signature_does_not_match_ => FORBIDDEN, "SignatureDoesNotMatch";
    request_time_too_skewed_ => FORBIDDEN, "RequestTimeTooSkewed";
}

impl S3Error {
    pub fn authorization_header_malformed(message: &str) -> Self {
        Self::authorization_header_malformed_(message)
    }

    pub fn authorization_query_malformed(message: &str) -> Self {
        Self::authorization_query_malformed_(message)
    }

    pub fn signature_does_not_match() -> Self {
        Self::signature_does_not_match_(
            "the request signature we calculated does not match the signature you provided; check your key and signing method",
        )
    }

    pub fn request_time_too_skewed() -> Self {
        Self::request_time_too_skewed_("the difference between the request time and the server's time is too large")
    }

    pub fn no_such_bucket(bucket: &str) -> Self {
        Self { resource: Some(bucket.to_string()), ..Self::no_such_bucket_("the specified bucket does not exist") }
    }

    pub fn no_such_key(key: &str) -> Self {
        Self { resource: Some(key.to_string()), ..Self::no_such_key_("the specified key does not exist") }
    }

    pub fn no_such_upload(upload_id: &str) -> Self {
        Self {
            resource: Some(upload_id.chars().take(80).collect()),
            ..Self::no_such_upload_(
                "the specified multipart upload does not exist: its id may be wrong, or it was completed or aborted",
            )
        }
    }

    /// A body too short for what its headers announced (or cut off).
    pub fn body_cut(message: impl Into<String>) -> Self {
        Self::incomplete_body(message)
    }
}

#[derive(Serialize)]
#[serde(rename = "Error")]
struct ErrorXml<'a> {
    #[serde(rename = "Code")]
    code: &'a str,
    #[serde(rename = "Message")]
    message: &'a str,
    #[serde(rename = "Resource", skip_serializing_if = "Option::is_none")]
    resource: Option<&'a str>,
}

impl IntoResponse for S3Error {
    fn into_response(self) -> Response {
        let body = super::xml::document(&ErrorXml {
            code: self.code,
            message: &self.message,
            resource: self.resource.as_deref(),
        });
        let mut response = (self.status, body).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/xml"));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn errors_are_s3s_xml() {
        let response = S3Error::no_such_key("a<b").into_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(text.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>"), "{text}");
        assert!(text.contains("<Code>NoSuchKey</Code>"), "{text}");
        assert!(text.contains("<Resource>a&lt;b</Resource>"), "{text}");
    }
}
