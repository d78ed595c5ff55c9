//! Parsing and limits of request headers: TTL, user metadata, content type, byte ranges.

use axum::http::HeaderMap;

use super::error::ApiError;
use crate::engine::BlobMeta;

pub const TTL_HEADER: &str = "x-cairn-ttl";
pub const META_PREFIX: &str = "x-cairn-meta-";
pub use crate::engine::record::{DEFAULT_CONTENT_TYPE, MAX_CONTENT_TYPE_BYTES, MAX_USER_META_BYTES};
/// Upper bound of an encoded [`BlobMeta`] within the limits above (postcard adds at most a few
/// bytes of length prefix per string); used to check volume geometry.
pub const MAX_META_RECORD_BYTES: u64 = cairn_common::volume_layout::MAX_RECORD_META_LEN;
/// About a century: longer TTLs are almost certainly a unit mistake.
pub const MAX_TTL_SECONDS: u64 = 100 * 365 * 24 * 3600;

pub fn parse_ttl_seconds(value: &str) -> Result<u64, ApiError> {
    let bad = || {
        ApiError::InvalidHeader(format!(
            "X-Cairn-TTL must be whole seconds from 1 to {MAX_TTL_SECONDS}, got {}",
            super::error::excerpt(value)
        ))
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match value.parse::<u64>() {
        Ok(n) if (1..=MAX_TTL_SECONDS).contains(&n) => Ok(n),
        _ => Err(bad()),
    }
}

/// Reads content type, TTL and `X-Cairn-Meta-*` from a request; the engine checks the metadata
/// against its limits ([`BlobMeta::new`]).
pub fn parse_put_headers(headers: &HeaderMap) -> Result<(BlobMeta, Option<u64>), ApiError> {
    let content_type = match headers.get(axum::http::header::CONTENT_TYPE) {
        None => DEFAULT_CONTENT_TYPE.to_owned(),
        Some(v) => {
            v.to_str().map_err(|_| ApiError::InvalidHeader("Content-Type must be visible ASCII".into()))?.to_owned()
        }
    };
    let ttl = match headers.get(TTL_HEADER) {
        None => None,
        Some(v) => Some(parse_ttl_seconds(v.to_str().unwrap_or("<not ascii>"))?),
    };
    let mut user = Vec::new();
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix(META_PREFIX) else {
            continue;
        };
        let value =
            value.to_str().map_err(|_| ApiError::InvalidHeader(format!("metadata {key:?} must be visible ASCII")))?;
        user.push((key.to_owned(), value.to_owned()));
    }
    Ok((BlobMeta::new(content_type, user)?, ttl))
}

/// A `Range` request resolved against a blob of `len` bytes: `Ok(None)` means the whole blob.
/// One `bytes` range is supported; any other unit is ignored (RFC 9110 §14.2).
pub fn parse_range(header: Option<&str>, len: u64) -> Result<Option<(u64, u64)>, ApiError> {
    let Some(header) = header else {
        return Ok(None);
    };
    let unsatisfiable = |message: String| ApiError::RangeNotSatisfiable { message, blob_len: len };
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Err(unsatisfiable("only a single byte range is supported".into()));
    }
    let quoted = super::error::excerpt(header);
    let malformed = || unsatisfiable(format!("malformed range {quoted}"));
    let (first, last) = spec.trim().split_once('-').ok_or_else(malformed)?;
    let number = |s: &str| -> Result<u64, ApiError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed());
        }
        s.parse().map_err(|_| malformed())
    };
    let (start, end) = match (first.trim(), last.trim()) {
        ("", suffix) => {
            let n = number(suffix)?;
            if n == 0 || len == 0 {
                return Err(unsatisfiable(format!("range {quoted} selects no bytes of a {len}-byte blob")));
            }
            (len.saturating_sub(n), len)
        }
        (from, "") => (number(from)?, len),
        (from, to) => {
            let (from, to) = (number(from)?, number(to)?);
            if to < from {
                return Err(malformed());
            }
            (from, to.saturating_add(1).min(len))
        }
    };
    if start >= len {
        return Err(unsatisfiable(format!("range {quoted} starts beyond the {len}-byte blob")));
    }
    Ok(Some((start, end)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10).unwrap(), None);
        assert_eq!(parse_range(Some("bytes=0-4"), 10).unwrap(), Some((0, 5)));
        assert_eq!(parse_range(Some("bytes=5-"), 10).unwrap(), Some((5, 10)));
        assert_eq!(parse_range(Some("bytes=-3"), 10).unwrap(), Some((7, 10)));
        assert_eq!(parse_range(Some("bytes=-30"), 10).unwrap(), Some((0, 10)));
        assert_eq!(parse_range(Some("bytes=8-100"), 10).unwrap(), Some((8, 10)));
        assert_eq!(parse_range(Some("items=0-1"), 10).unwrap(), None);
        for bad in
            ["bytes=10-", "bytes=10-12", "bytes=-0", "bytes=0-1,3-4", "bytes=5-2", "bytes=a-b", "bytes=-", "bytes=1"]
        {
            let err = parse_range(Some(bad), 10).unwrap_err();
            assert_eq!(err.code(), "range_not_satisfiable", "{bad}");
        }
        assert!(parse_range(Some("bytes=0-0"), 0).is_err());
    }

    #[test]
    fn ttl() {
        assert_eq!(parse_ttl_seconds("60").unwrap(), 60);
        for bad in ["0", "-1", "1.5", "", " 5", "99999999999999999999", &(MAX_TTL_SECONDS + 1).to_string()] {
            assert!(parse_ttl_seconds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn put_headers() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.insert("x-cairn-ttl", HeaderValue::from_static("30"));
        h.insert("x-cairn-meta-Owner", HeaderValue::from_static("alice"));
        h.insert("x-cairn-meta-app", HeaderValue::from_static("x"));
        let (meta, ttl) = parse_put_headers(&h).unwrap();
        assert_eq!(meta.content_type, "text/plain");
        assert_eq!(ttl, Some(30));
        assert_eq!(meta.user, vec![("app".into(), "x".into()), ("owner".into(), "alice".into())]);

        let mut big = HeaderMap::new();
        big.insert("x-cairn-meta-k", HeaderValue::from_str(&"v".repeat(MAX_USER_META_BYTES)).unwrap());
        assert_eq!(parse_put_headers(&big).unwrap_err().code(), "metadata_too_large");

        let (meta, ttl) = parse_put_headers(&HeaderMap::new()).unwrap();
        assert_eq!((meta.content_type.as_str(), ttl), (DEFAULT_CONTENT_TYPE, None));
    }

    #[test]
    fn metadata_bound_covers_the_worst_case() {
        // Many one-byte keys maximise the per-pair overhead.
        let user: Vec<(String, String)> =
            (0..MAX_USER_META_BYTES / 2).map(|i| (format!("{i}"), String::new())).collect();
        let meta = BlobMeta { content_type: "x".repeat(MAX_CONTENT_TYPE_BYTES), user };
        assert!((meta.encode().len() as u64) < MAX_META_RECORD_BYTES);
    }
}
