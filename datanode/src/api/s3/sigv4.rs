//! AWS Signature Version 4, as S3 checks it: the `Authorization` header, presigned URLs
//! (`X-Amz-*` query parameters) and the payload modes (a signed SHA-256, `UNSIGNED-PAYLOAD`, and
//! the `aws-chunked` streaming modes whose chunks [`ChunkSigner`] checks).
//!
//! The canonical request is built from the request as received, re-encoded the way AWS encodes
//! it (so that `~` or `%7E` in a path sign alike): each path segment and query component
//! percent-decoded, then every byte but `A-Za-z0-9-_.~` encoded, `/` kept in the path.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, Method};
use chrono::{DateTime, NaiveDateTime, Utc};
use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};

use super::error::S3Error;

pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
pub const STREAMING_SIGNED: &str = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD";
pub const STREAMING_SIGNED_TRAILER: &str = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER";
pub const STREAMING_UNSIGNED_TRAILER: &str = "STREAMING-UNSIGNED-PAYLOAD-TRAILER";
/// How far a request's clock may be from ours (S3's figure).
pub const MAX_SKEW_SECONDS: i64 = 15 * 60;
/// The longest a presigned URL may live (S3's figure: seven days).
pub const MAX_PRESIGNED_SECONDS: i64 = 7 * 24 * 3600;

const AMZ_DATE_FORMAT: &str = "%Y%m%dT%H%M%SZ";

/// Every byte but the unreserved ones (RFC 3986), as AWS encodes query components.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

type HmacSha256 = Hmac<Sha256>;

/// What the client says about its payload (`x-amz-content-sha256`, or for a presigned URL
/// always unsigned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// The SHA-256 of the whole body, checked once it has been read.
    Sha256([u8; 32]),
    Unsigned,
    /// `aws-chunked` with a signature per chunk; `trailer`: trailing headers, signed too.
    StreamingSigned {
        trailer: bool,
    },
    /// `aws-chunked` without signatures, trailing headers (a checksum) at the end.
    StreamingUnsignedTrailer,
}

impl Payload {
    fn parse(value: &str) -> Result<Self, S3Error> {
        Ok(match value {
            UNSIGNED_PAYLOAD => Payload::Unsigned,
            STREAMING_SIGNED => Payload::StreamingSigned { trailer: false },
            STREAMING_SIGNED_TRAILER => Payload::StreamingSigned { trailer: true },
            STREAMING_UNSIGNED_TRAILER => Payload::StreamingUnsignedTrailer,
            hex_digest => {
                let mut digest = [0u8; 32];
                hex::decode_to_slice(hex_digest, &mut digest).map_err(|_| {
                    S3Error::invalid_argument(format!(
                        "x-amz-content-sha256 must be a hex SHA-256 or one of the payload modes, not {}",
                        short(hex_digest)
                    ))
                })?;
                Payload::Sha256(digest)
            }
        })
    }

    pub fn is_chunked(&self) -> bool {
        matches!(self, Payload::StreamingSigned { .. } | Payload::StreamingUnsignedTrailer)
    }
}

/// A request's signature as presented, not yet checked.
#[derive(Debug, Clone)]
pub struct Presented {
    pub key_id: String,
    /// `YYYYMMDD/region/service/aws4_request`.
    pub scope: CredentialScope,
    pub when: DateTime<Utc>,
    amz_date: String,
    signed_headers: Vec<String>,
    signature: [u8; 32],
    pub payload: Payload,
    /// The payload hash as it goes into the canonical request.
    payload_text: String,
    /// A presigned URL's lifetime, seconds.
    presigned_for: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialScope {
    pub date: String,
    pub region: String,
    pub service: String,
}

impl CredentialScope {
    fn parse(text: &str) -> Option<(String, Self)> {
        let mut parts = text.split('/');
        let (key_id, date, region, service, terminator) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || terminator != "aws4_request" || key_id.is_empty() {
            return None;
        }
        Some((key_id.to_string(), Self { date: date.into(), region: region.into(), service: service.into() }))
    }

    pub fn text(&self) -> String {
        format!("{}/{}/{}/aws4_request", self.date, self.region, self.service)
    }
}

/// The signature of a request, if it carries one: `Ok(None)` for an anonymous request.
pub fn presented(headers: &HeaderMap, query: &[(String, String)]) -> Result<Option<Presented>, S3Error> {
    let authorization = headers.get(axum::http::header::AUTHORIZATION);
    let presigned = query.iter().any(|(k, _)| k == "X-Amz-Algorithm");
    if !presigned && query.iter().any(|(k, _)| k == "AWSAccessKeyId") && query.iter().any(|(k, _)| k == "Signature") {
        return Err(S3Error::invalid_request(
            "the authorization mechanism you have provided is not supported: presign URLs with AWS4-HMAC-SHA256 \
             (boto3: Config(signature_version=\"s3v4\"))",
        ));
    }
    match (authorization, presigned) {
        (Some(_), true) => Err(S3Error::invalid_argument(
            "only one auth mechanism allowed; only the X-Amz-Algorithm query parameter or the Authorization header may be present",
        )),
        (None, false) => Ok(None),
        (Some(value), false) => {
            let value = value
                .to_str()
                .map_err(|_| S3Error::authorization_header_malformed("the Authorization header is not ASCII"))?;
            from_header(headers, value).map(Some)
        }
        (None, true) => from_query(query).map(Some),
    }
}

fn from_header(headers: &HeaderMap, value: &str) -> Result<Presented, S3Error> {
    let malformed = S3Error::authorization_header_malformed;
    let rest = value.strip_prefix(ALGORITHM).filter(|r| r.starts_with(' ')).ok_or_else(|| {
        if value.starts_with("AWS ") {
            S3Error::invalid_request("Signature Version 2 is not supported; sign requests with AWS4-HMAC-SHA256")
        } else {
            malformed("the Authorization header must use AWS4-HMAC-SHA256")
        }
    })?;
    let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
    for part in rest.split(',') {
        let (name, value) =
            part.trim().split_once('=').ok_or_else(|| malformed("the Authorization header is malformed"))?;
        if fields.insert(name, value).is_some() {
            return Err(malformed("the Authorization header names a field twice"));
        }
    }
    let field = |name: &str| {
        fields.get(name).copied().ok_or_else(|| malformed(&format!("the Authorization header has no {name}")))
    };
    let (key_id, scope) = CredentialScope::parse(field("Credential")?)
        .ok_or_else(|| malformed("the Credential is not <key id>/<date>/<region>/<service>/aws4_request"))?;
    let amz_date = header_text(headers, "x-amz-date")
        .or_else(|| header_text(headers, "date"))
        .ok_or_else(|| S3Error::access_denied("AWS authentication requires a valid Date or x-amz-date header"))?;
    let when = parse_amz_date(&amz_date)
        .ok_or_else(|| S3Error::access_denied("AWS authentication requires a valid Date or x-amz-date header"))?;
    let payload_text = header_text(headers, "x-amz-content-sha256")
        .ok_or_else(|| S3Error::invalid_request("missing required header for this request: x-amz-content-sha256"))?;
    Ok(Presented {
        key_id,
        scope,
        when,
        amz_date,
        signed_headers: signed_headers(field("SignedHeaders")?)?,
        signature: signature(field("Signature")?)?,
        payload: Payload::parse(&payload_text)?,
        payload_text,
        presigned_for: None,
    })
}

fn from_query(query: &[(String, String)]) -> Result<Presented, S3Error> {
    let malformed = S3Error::authorization_query_malformed;
    let get = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| malformed(&format!("query-string authentication requires the {name} parameter")))
    };
    if get("X-Amz-Algorithm")? != ALGORITHM {
        return Err(malformed("X-Amz-Algorithm only supports \"AWS4-HMAC-SHA256\""));
    }
    let (key_id, scope) = CredentialScope::parse(get("X-Amz-Credential")?)
        .ok_or_else(|| malformed("X-Amz-Credential is not <key id>/<date>/<region>/<service>/aws4_request"))?;
    let amz_date = get("X-Amz-Date")?.to_string();
    let when = parse_amz_date(&amz_date).ok_or_else(|| malformed("X-Amz-Date must be in the ISO8601 Long Format"))?;
    let expires: i64 = get("X-Amz-Expires")?
        .parse()
        .ok()
        .filter(|s| *s >= 0)
        .ok_or_else(|| malformed("X-Amz-Expires should be a number of seconds"))?;
    if expires > MAX_PRESIGNED_SECONDS {
        return Err(malformed("X-Amz-Expires must be less than a week (in seconds) that is 604800"));
    }
    // A presigned URL may still name a payload hash in the query; S3 reads it from there.
    let payload_text = query
        .iter()
        .find(|(k, _)| k == "X-Amz-Content-Sha256" || k == "x-amz-content-sha256")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| UNSIGNED_PAYLOAD.to_string());
    let payload = Payload::parse(&payload_text)?;
    if payload.is_chunked() {
        return Err(malformed("a presigned URL cannot stream an aws-chunked payload"));
    }
    Ok(Presented {
        key_id,
        scope,
        when,
        amz_date,
        signed_headers: signed_headers(get("X-Amz-SignedHeaders")?)?,
        signature: signature(get("X-Amz-Signature")?)?,
        payload,
        payload_text,
        presigned_for: Some(expires),
    })
}

fn signed_headers(text: &str) -> Result<Vec<String>, S3Error> {
    let names: Vec<String> = text.split(';').map(str::to_string).collect();
    let sorted_lowercase = names.windows(2).all(|w| w[0] < w[1])
        && names.iter().all(|n| !n.is_empty() && n.bytes().all(|b| !b.is_ascii_uppercase()));
    if !sorted_lowercase {
        return Err(S3Error::authorization_header_malformed(
            "SignedHeaders must be lower-case names, sorted, each once",
        ));
    }
    if !names.iter().any(|n| n == "host") {
        return Err(S3Error::access_denied("the host header must be signed"));
    }
    Ok(names)
}

fn signature(text: &str) -> Result<[u8; 32], S3Error> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out)
        .map_err(|_| S3Error::authorization_header_malformed("the Signature must be 64 hex digits"))?;
    Ok(out)
}

fn parse_amz_date(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = NaiveDateTime::parse_from_str(text, AMZ_DATE_FORMAT) {
        return Some(t.and_utc());
    }
    // The `Date` header's HTTP form.
    httpdate::parse_http_date(text).ok().map(DateTime::<Utc>::from)
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

fn short(text: &str) -> String {
    text.chars().take(80).collect()
}

/// What a request is checked against: where it went and what it carried.
pub struct RequestParts<'a> {
    pub method: &'a Method,
    /// The path as received (percent-encoded), without the query.
    pub raw_path: &'a str,
    /// The query's pairs, percent-decoded, in the order received.
    pub query: &'a [(String, String)],
    pub headers: &'a HeaderMap,
}

/// A checked signature: what the chunks of an `aws-chunked` body are checked with.
#[derive(Clone)]
pub struct Verified {
    pub key_id: String,
    pub payload: Payload,
    signing_key: [u8; 32],
    amz_date: String,
    scope: String,
    seed_signature: [u8; 32],
}

impl std::fmt::Debug for Verified {
    // The signing key is a secret's derivative: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verified").field("key_id", &self.key_id).field("payload", &self.payload).finish_non_exhaustive()
    }
}

impl Verified {
    /// The checker of the body's chunk signatures (and trailer signature), chained from the
    /// request's.
    pub fn chunk_signer(&self) -> ChunkSigner {
        ChunkSigner {
            signing_key: self.signing_key,
            amz_date: self.amz_date.clone(),
            scope: self.scope.clone(),
            previous: self.seed_signature,
        }
    }
}

/// Checks `presented` against `secret`: the scope (service `s3`, the node's `region`, the
/// date of the request), the clock, a presigned URL's expiry, the signature. Comparisons of
/// signatures are constant-time.
pub fn verify(
    presented: &Presented,
    secret: &str,
    region: &str,
    request: &RequestParts<'_>,
    now: DateTime<Utc>,
) -> Result<Verified, S3Error> {
    let scope = &presented.scope;
    if scope.service != "s3" {
        return Err(S3Error::authorization_header_malformed(&format!(
            "the service '{}' in the credential scope is wrong; expecting 's3'",
            short(&scope.service)
        )));
    }
    if scope.region != region {
        return Err(S3Error::authorization_header_malformed(&format!(
            "the region '{}' is wrong; expecting '{region}'",
            short(&scope.region)
        )));
    }
    if !is_date_of(&scope.date, presented.when) {
        return Err(S3Error::authorization_header_malformed(&format!(
            "the credential date '{}' is not the date of the request",
            short(&scope.date)
        )));
    }
    match presented.presigned_for {
        Some(expires) => {
            if now < presented.when - chrono::Duration::seconds(MAX_SKEW_SECONDS) {
                return Err(S3Error::access_denied("request is not valid yet"));
            }
            if now > presented.when + chrono::Duration::seconds(expires) {
                return Err(S3Error::access_denied("request has expired"));
            }
        }
        None => {
            if (now - presented.when).num_seconds().abs() > MAX_SKEW_SECONDS {
                return Err(S3Error::request_time_too_skewed());
            }
        }
    }
    let canonical = canonical_request(presented, request)?;
    let scope_text = scope.text();
    let mut string_to_sign = String::with_capacity(ALGORITHM.len() + presented.amz_date.len() + scope_text.len() + 67);
    for part in [ALGORITHM, "\n", &presented.amz_date, "\n", &scope_text, "\n"] {
        string_to_sign.push_str(part);
    }
    let mut digest_hex = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(canonical.as_bytes()), &mut digest_hex).expect("64 hex digits");
    string_to_sign.push_str(std::str::from_utf8(&digest_hex).expect("hex is ASCII"));
    let signing_key = remembered_signing_key(secret, scope);
    let expected = hmac(&signing_key, string_to_sign.as_bytes());
    if !constant_eq(&expected, &presented.signature) {
        return Err(S3Error::signature_does_not_match());
    }
    // An x-amz-* header the signature does not cover could change what the request does (a
    // copy source, a condition, metadata) under someone else's signature: refused, as S3 does.
    // A presigned URL's payload is unsigned whatever x-amz-content-sha256 says.
    let unsigned = request.headers.keys().map(|k| k.as_str()).find(|name| {
        name.starts_with("x-amz-")
            && !presented.signed_headers.iter().any(|s| s == name)
            && !(presented.presigned_for.is_some() && *name == "x-amz-content-sha256")
    });
    if let Some(name) = unsigned {
        return Err(S3Error::access_denied(format!(
            "there were headers present in the request which were not signed: {name}"
        )));
    }
    Ok(Verified {
        key_id: presented.key_id.clone(),
        payload: presented.payload.clone(),
        signing_key,
        amz_date: presented.amz_date.clone(),
        scope: scope_text,
        seed_signature: presented.signature,
    })
}

/// The canonical request of AWS's documentation.
fn canonical_request(presented: &Presented, request: &RequestParts<'_>) -> Result<String, S3Error> {
    canonical(request, &presented.signed_headers, presented.presigned_for.is_some(), &presented.payload_text)
}

fn canonical(
    request: &RequestParts<'_>,
    signed_headers: &[String],
    presigned: bool,
    payload_text: &str,
) -> Result<String, S3Error> {
    let mut out = String::with_capacity(512);
    out.push_str(request.method.as_str());
    out.push('\n');
    push_canonical_path(&mut out, request.raw_path);
    out.push('\n');
    let mut pairs: Vec<(String, String)> = request
        .query
        .iter()
        .filter(|(k, _)| !presigned || k != "X-Amz-Signature")
        .map(|(k, v)| (encode_component(k), encode_component(v)))
        .collect();
    pairs.sort();
    let query: Vec<String> = pairs.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    out.push_str(&query.join("&"));
    out.push('\n');
    for name in signed_headers {
        let values = request.headers.get_all(name.as_str());
        if values.iter().next().is_none() {
            return Err(S3Error::access_denied(format!("the signed header {name} is not in the request")));
        }
        out.push_str(name);
        out.push(':');
        for (i, value) in values.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_collapsed(&mut out, &String::from_utf8_lossy(value.as_bytes()));
        }
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&signed_headers.join(";"));
    out.push('\n');
    out.push_str(payload_text);
    Ok(out)
}

/// A client's side: the `Authorization` header that signs `request` with every header it
/// carries (which must include `host`, `x-amz-date` and `x-amz-content-sha256`). The benchmark
/// signs with it; the tests' signers are boto3, the AWS CLI and rclone.
pub fn authorization(key_id: &str, secret: &str, region: &str, request: &RequestParts<'_>) -> Result<String, S3Error> {
    let text = |name: &str| {
        request
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| S3Error::invalid_request(format!("{name} is needed to sign")))
    };
    let amz_date = text("x-amz-date")?;
    let payload_text = text("x-amz-content-sha256")?;
    let date = amz_date.get(..8).ok_or_else(|| S3Error::invalid_request("x-amz-date is malformed"))?;
    let mut signed: Vec<String> = request.headers.keys().map(|k| k.as_str().to_string()).collect();
    signed.sort();
    signed.dedup();
    let canonical = canonical(request, &signed, false, payload_text)?;
    let scope = CredentialScope { date: date.into(), region: region.into(), service: "s3".into() };
    let string_to_sign =
        format!("{ALGORITHM}\n{amz_date}\n{}\n{}", scope.text(), hex::encode(Sha256::digest(canonical.as_bytes())));
    let signature = hmac(&signing_key(secret, date, region, "s3"), string_to_sign.as_bytes());
    Ok(format!(
        "{ALGORITHM} Credential={key_id}/{},SignedHeaders={},Signature={}",
        scope.text(),
        signed.join(";"),
        hex::encode(signature)
    ))
}

/// The path, each segment decoded then encoded as AWS encodes it (S3 encodes once; `/` kept).
#[cfg(test)]
fn canonical_path(raw: &str) -> String {
    let mut out = String::new();
    push_canonical_path(&mut out, raw);
    out
}

/// [`canonical_path`] onto `out` (a segment without `%` decodes to itself: no copy).
fn push_canonical_path(out: &mut String, raw: &str) {
    use std::fmt::Write;
    if raw.is_empty() {
        out.push('/');
        return;
    }
    for (i, segment) in raw.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        let decoded: std::borrow::Cow<[u8]> = percent_decode_str(segment).into();
        write!(out, "{}", percent_encoding::percent_encode(&decoded, COMPONENT)).expect("a String takes any text");
    }
}

fn encode_component(text: &str) -> String {
    utf8_percent_encode(text, COMPONENT).to_string()
}

/// A header value trimmed, runs of spaces made one (SigV4's canonical header value), onto `out`.
fn push_collapsed(out: &mut String, value: &str) {
    for (i, word) in value.split_whitespace().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(word);
    }
}

/// Whether `date` is `when`'s day as a credential scope writes it (`YYYYMMDD`).
fn is_date_of(date: &str, when: DateTime<Utc>) -> bool {
    use chrono::Datelike;
    let day = when.date_naive();
    let expected = day.year() as i64 * 10_000 + day.month() as i64 * 100 + day.day() as i64;
    date.len() == 8 && date.bytes().all(|b| b.is_ascii_digit()) && date.parse::<i64>() == Ok(expected)
}

/// [`signing_key`], remembered for the last scope and secret each thread saw: a key signs every
/// request of a day with the same one, and deriving it takes four HMACs. The secret is kept as
/// its digest only.
fn remembered_signing_key(secret: &str, scope: &CredentialScope) -> [u8; 32] {
    type Remembered = Option<([u8; 32], CredentialScope, [u8; 32])>;
    thread_local! {
        static LAST: std::cell::RefCell<Remembered> = const { std::cell::RefCell::new(None) };
    }
    let secret_digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    LAST.with_borrow_mut(|last| match last {
        Some((digest, remembered, key)) if *digest == secret_digest && remembered == scope => *key,
        _ => {
            let key = signing_key(secret, &scope.date, &scope.region, &scope.service);
            *last = Some((secret_digest, scope.clone(), key));
            key
        }
    })
}

pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    hmac(&k_service, b"aws4_request")
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn constant_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Checks the signatures of an `aws-chunked` body's chunks, each chained to the one before.
pub struct ChunkSigner {
    signing_key: [u8; 32],
    amz_date: String,
    scope: String,
    previous: [u8; 32],
}

impl ChunkSigner {
    /// Checks one chunk's signature given the SHA-256 of its data.
    pub fn check_chunk(&mut self, data_sha256: &[u8; 32], presented: &[u8; 32]) -> Result<(), S3Error> {
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256-PAYLOAD\n{}\n{}\n{}\n{EMPTY_SHA256}\n{}",
            self.amz_date,
            self.scope,
            hex::encode(self.previous),
            hex::encode(data_sha256)
        );
        self.check(string_to_sign, presented)
    }

    /// Checks the trailer's signature given its canonical text (`name:value\n` per header).
    pub fn check_trailer(&mut self, canonical_trailer: &str, presented: &[u8; 32]) -> Result<(), S3Error> {
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256-TRAILER\n{}\n{}\n{}\n{}",
            self.amz_date,
            self.scope,
            hex::encode(self.previous),
            hex::encode(Sha256::digest(canonical_trailer.as_bytes()))
        );
        self.check(string_to_sign, presented)
    }

    fn check(&mut self, string_to_sign: String, presented: &[u8; 32]) -> Result<(), S3Error> {
        let expected = hmac(&self.signing_key, string_to_sign.as_bytes());
        if !constant_eq(&expected, presented) {
            return Err(S3Error::signature_does_not_match());
        }
        self.previous = expected;
        Ok(())
    }
}

/// A query string's pairs, percent-decoded (`+` stays `+`: S3 clients encode a space as `%20`).
pub fn parse_query(raw: Option<&str>) -> Result<Vec<(String, String)>, S3Error> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else { return Ok(Vec::new()) };
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_decode_str(s)
                    .decode_utf8()
                    .map(|c| c.into_owned())
                    .map_err(|_| S3Error::invalid_argument("the query string is not UTF-8 once decoded"))
            };
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    //! Oracles: the worked examples of AWS's S3 documentation ("Signature Calculations for the
    //! Authorization Header", "Authenticating Requests: Using Query Parameters", "Transferring
    //! Payload in Multiple Chunks"), whose signatures were computed by AWS.
    use super::*;
    use axum::http::HeaderValue;

    const KEY_ID: &str = "AKIAIOSFODNN7EXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn at(text: &str) -> DateTime<Utc> {
        parse_amz_date(text).unwrap()
    }

    fn check(method: Method, path: &str, query: &str, headers: &HeaderMap, now: &str) -> Result<Verified, S3Error> {
        let query = parse_query(Some(query)).unwrap();
        let presented = presented(headers, &query)?.expect("signed");
        let parts = RequestParts { method: &method, raw_path: path, query: &query, headers };
        verify(&presented, SECRET, "us-east-1", &parts, at(now))
    }

    fn get_object_headers(signature: &str) -> HeaderMap {
        headers(&[
            ("host", "examplebucket.s3.amazonaws.com"),
            ("range", "bytes=0-9"),
            ("x-amz-content-sha256", EMPTY_SHA256),
            ("x-amz-date", "20130524T000000Z"),
            ("authorization", &format!("AWS4-HMAC-SHA256 Credential={KEY_ID}/20130524/us-east-1/s3/aws4_request,SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,Signature={signature}")),
        ])
    }

    #[test]
    fn awss_get_object_example_verifies() {
        let good = get_object_headers("f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41");
        let verified = check(Method::GET, "/test.txt", "", &good, "20130524T000500Z").unwrap();
        assert_eq!(verified.key_id, KEY_ID);
        // One bit off, another path, another method, a changed signed header: refused.
        let bad = get_object_headers("f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb40");
        assert_eq!(
            check(Method::GET, "/test.txt", "", &bad, "20130524T000500Z").unwrap_err().code,
            "SignatureDoesNotMatch"
        );
        assert!(check(Method::GET, "/test.txt2", "", &good, "20130524T000500Z").is_err());
        assert!(check(Method::HEAD, "/test.txt", "", &good, "20130524T000500Z").is_err());
        let mut other_range = good.clone();
        other_range.insert("range", HeaderValue::from_static("bytes=0-10"));
        assert!(check(Method::GET, "/test.txt", "", &other_range, "20130524T000500Z").is_err());
        // An unsigned header may change, unless it is an x-amz-* one.
        let mut extra = good.clone();
        extra.insert("user-agent", HeaderValue::from_static("anything"));
        assert!(check(Method::GET, "/test.txt", "", &extra, "20130524T000500Z").is_ok());
        extra.insert("x-amz-copy-source", HeaderValue::from_static("bucket/secret"));
        assert_eq!(check(Method::GET, "/test.txt", "", &extra, "20130524T000500Z").unwrap_err().code, "AccessDenied");
        // The clock: 15 minutes either way.
        assert_eq!(
            check(Method::GET, "/test.txt", "", &good, "20130524T001600Z").unwrap_err().code,
            "RequestTimeTooSkewed"
        );
        assert!(check(Method::GET, "/test.txt", "", &good, "20130523T234600Z").is_ok());
    }

    #[test]
    fn the_signer_signs_as_aws_does_and_verifies() {
        let mut h = get_object_headers("0");
        h.remove("authorization");
        let parts = RequestParts { method: &Method::GET, raw_path: "/test.txt", query: &[], headers: &h };
        let auth = authorization(KEY_ID, SECRET, "us-east-1", &parts).unwrap();
        assert!(auth.ends_with("Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"), "{auth}");
        h.insert("authorization", HeaderValue::from_str(&auth).unwrap());
        check(Method::GET, "/test.txt", "", &h, "20130524T000000Z").unwrap();
    }

    #[test]
    fn awss_put_object_example_verifies() {
        let body = "Welcome to Amazon S3.";
        let sha = hex::encode(Sha256::digest(body.as_bytes()));
        assert_eq!(sha, "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072");
        let h = headers(&[
            ("host", "examplebucket.s3.amazonaws.com"),
            ("date", "Fri, 24 May 2013 00:00:00 GMT"),
            ("x-amz-date", "20130524T000000Z"),
            ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
            ("x-amz-content-sha256", &sha),
            ("authorization", &format!("AWS4-HMAC-SHA256 Credential={KEY_ID}/20130524/us-east-1/s3/aws4_request,SignedHeaders=date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class,Signature=98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd")),
        ]);
        let verified = check(Method::PUT, "/test%24file.text", "", &h, "20130524T000000Z").unwrap();
        assert!(matches!(verified.payload, Payload::Sha256(d) if hex::encode(d) == sha));
    }

    #[test]
    fn awss_list_objects_example_verifies() {
        let h = headers(&[
            ("host", "examplebucket.s3.amazonaws.com"),
            ("x-amz-date", "20130524T000000Z"),
            ("x-amz-content-sha256", EMPTY_SHA256),
            ("authorization", &format!("AWS4-HMAC-SHA256 Credential={KEY_ID}/20130524/us-east-1/s3/aws4_request,SignedHeaders=host;x-amz-content-sha256;x-amz-date,Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7")),
        ]);
        // The query in another order (and `max-keys` before `prefix`) canonicalizes alike.
        check(Method::GET, "/", "prefix=J&max-keys=2", &h, "20130524T000000Z").unwrap();
        check(Method::GET, "/", "max-keys=2&prefix=J", &h, "20130524T000000Z").unwrap();
        assert!(check(Method::GET, "/", "max-keys=3&prefix=J", &h, "20130524T000000Z").is_err());
    }

    #[test]
    fn awss_presigned_url_example_verifies_until_it_expires() {
        let query = "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404";
        let h = headers(&[("host", "examplebucket.s3.amazonaws.com")]);
        let verified = check(Method::GET, "/test.txt", query, &h, "20130524T120000Z").unwrap();
        assert_eq!(verified.payload, Payload::Unsigned);
        // A presigned URL carries no x-amz-* header its signature does not name.
        let mut copy = h.clone();
        copy.insert("x-amz-copy-source", HeaderValue::from_static("bucket/secret"));
        assert_eq!(check(Method::GET, "/test.txt", query, &copy, "20130524T120000Z").unwrap_err().code, "AccessDenied");
        assert_eq!(check(Method::GET, "/test.txt", query, &h, "20130525T000001Z").unwrap_err().code, "AccessDenied");
        let tampered = query.replace("86400", "86401");
        assert!(check(Method::GET, "/test.txt", &tampered, &h, "20130524T120000Z").is_err());
    }

    #[test]
    fn awss_chunked_upload_example_verifies_chunk_by_chunk() {
        let h = headers(&[
            ("host", "s3.amazonaws.com"),
            ("x-amz-date", "20130524T000000Z"),
            ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
            ("x-amz-content-sha256", STREAMING_SIGNED),
            ("content-encoding", "aws-chunked"),
            ("x-amz-decoded-content-length", "66560"),
            ("content-length", "66824"),
            ("authorization", &format!("AWS4-HMAC-SHA256 Credential={KEY_ID}/20130524/us-east-1/s3/aws4_request,SignedHeaders=content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;x-amz-storage-class,Signature=4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9")),
        ]);
        let verified = check(Method::PUT, "/examplebucket/chunkObject.txt", "", &h, "20130524T000000Z").unwrap();
        let mut signer = verified.chunk_signer();
        let sig = |s: &str| {
            let mut out = [0u8; 32];
            hex::decode_to_slice(s, &mut out).unwrap();
            out
        };
        let sha = |len: usize| -> [u8; 32] { Sha256::digest(vec![b'a'; len]).into() };
        signer
            .check_chunk(&sha(65536), &sig("ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648"))
            .unwrap();
        signer
            .check_chunk(&sha(1024), &sig("0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497"))
            .unwrap();
        signer.check_chunk(&sha(0), &sig("b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9")).unwrap();
        // A chunk out of order breaks the chain.
        let mut signer = verified.chunk_signer();
        assert!(signer
            .check_chunk(&sha(1024), &sig("0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497"))
            .is_err());
    }

    #[test]
    fn malformed_authorization_is_refused_with_s3s_codes() {
        let with = |auth: &str| {
            let h = headers(&[
                ("host", "h"),
                ("x-amz-date", "20130524T000000Z"),
                ("x-amz-content-sha256", EMPTY_SHA256),
                ("authorization", auth),
            ]);
            check(Method::GET, "/", "", &h, "20130524T000000Z").unwrap_err().code
        };
        assert_eq!(with("AWS AKID:c2ln"), "InvalidRequest");
        // A Signature Version 2 presigned URL (boto3's default for a custom endpoint) is named as such.
        let query = parse_query(Some("AWSAccessKeyId=AKID&Signature=c2ln&Expires=1")).unwrap();
        assert_eq!(presented(&HeaderMap::new(), &query).unwrap_err().code, "InvalidRequest");
        assert_eq!(
            with("AWS4-HMAC-SHA256 Credential=A/20130524/us-east-1/s3/aws4_request"),
            "AuthorizationHeaderMalformed"
        );
        let sig = "0".repeat(64);
        assert_eq!(
            with(&format!(
                "AWS4-HMAC-SHA256 Credential=A/20130524/eu-west-1/s3/aws4_request,SignedHeaders=host,Signature={sig}"
            )),
            "AuthorizationHeaderMalformed"
        );
        assert_eq!(
            with(&format!("AWS4-HMAC-SHA256 Credential=A/20130524/us-east-1/s3/aws4_request,SignedHeaders=x-amz-date,Signature={sig}")),
            "AccessDenied"
        );
        assert_eq!(
            with(&format!(
                "AWS4-HMAC-SHA256 Credential=A/20130524/us-east-1/s3/aws4_request,SignedHeaders=host,Signature={sig}"
            )),
            "SignatureDoesNotMatch"
        );
    }

    #[test]
    fn a_credential_date_is_the_requests_day_in_eight_digits() {
        let when = at("20130524T000000Z");
        assert!(is_date_of("20130524", when));
        for other in ["20130525", "2013524", "+2013052", "2013-05-24", "201305240", "", "２0130524"] {
            assert!(!is_date_of(other, when), "{other}");
        }
        // The remembered signing key is the derived one, for each scope and secret in turn.
        let scope =
            |date: &str| CredentialScope { date: date.into(), region: "us-east-1".into(), service: "s3".into() };
        for (secret, date) in [("a", "20130524"), ("a", "20130524"), ("b", "20130524"), ("b", "20130525")] {
            assert_eq!(remembered_signing_key(secret, &scope(date)), signing_key(secret, date, "us-east-1", "s3"));
        }
    }

    #[test]
    fn paths_and_queries_canonicalize_as_aws_encodes_them() {
        assert_eq!(canonical_path("/a%7Eb/c~d/e%20f/g+h"), "/a~b/c~d/e%20f/g%2Bh");
        assert_eq!(canonical_path("/b/%E2%82%AC"), "/b/%E2%82%AC");
        assert_eq!(canonical_path(""), "/");
        let q = parse_query(Some("list-type=2&prefix=a%2Fb&delimiter=%2F&empty")).unwrap();
        assert_eq!(q[3], ("empty".to_string(), String::new()));
        assert_eq!(encode_component("a/b c+"), "a%2Fb%20c%2B");
    }
}
