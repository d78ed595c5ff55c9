//! Who may call which route (docs/security.md): every request passes [`authorize`] before its
//! handler runs.
//!
//! - The blob API needs `Authorization: Bearer <key id>.<secret>` of an access key with the
//!   route's scope (read; write for new blobs; delete for deletes and TTL changes, which can end
//!   a blob's life; admin for `/v1/admin/...` and any route not named here): 401 without valid
//!   credentials, 403 without the scope. A cluster whose config says `auth: none` (or a
//!   standalone node started with `--auth none`) lets anyone use the blob routes; admin routes
//!   and protected `/metrics`, `/openapi.json` still need credentials.
//! - Replica routes (`/replica/...`) take only the cluster's node token (header
//!   `X-Cairn-Node-Token`), whatever else a request carries; admin routes take it too (the
//!   operator and `cairn status` use it), and read routes (a router reads a peer's replica
//!   through `GET /v1/blobs/{id}?local=true`).
//! - `/healthz` and `/readyz` are open; `/metrics` and `/openapi.json` too unless the node is
//!   told to protect them.
//!
//! Valid credentials always pass. Failed authentications are counted per client address (an
//! IPv6 /64 counts as one) and per key id presented (whether or not the key exists, so the
//! answer tells nothing about which ids do); past either budget, failures answer 429 instead of
//! 401 until it refills — guessing one key's secret from many addresses is as slow as from one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use cairn_cluster::access::{self, AccessKey, Scope, Secret, NODE_TOKEN_HEADER};
use cairn_cluster::AuthMode;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::error::ApiError;
use super::AppState;
use crate::metrics::AuthFailureLabels;

/// Failed authentications a client address (or key id) may make at once, then
/// [`FAILURES_PER_SECOND`] (`--auth-failure-burst`).
pub const DEFAULT_FAILURE_BURST: u32 = 20;
const FAILURES_PER_SECOND: u32 = 2;
/// The failure counts of addresses that stopped failing are dropped every this many failures.
const PRUNE_EVERY: u64 = 1024;

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Nothing,
    Key(Scope),
    /// An admin key or the node token.
    AdminOrNode,
    NodeToken,
    /// A route that matches nothing: any valid key (an anonymous caller learns nothing, not
    /// even which paths exist; a key learns 404).
    AnyKey,
}

/// The keys and settings [`authorize`] checks against.
pub struct Auth {
    /// A standalone node's mode and keys (a cluster's come from its etcd snapshot).
    standalone: Option<(AuthMode, BTreeMap<String, AccessKey>)>,
    protect_metrics: bool,
    protect_openapi: bool,
    failures: DefaultKeyedRateLimiter<IpAddr>,
    key_failures: DefaultKeyedRateLimiter<String>,
    failure_count: AtomicU64,
}

/// What is protected beyond the blob API, and how many failures are let through at once.
#[derive(Debug, Clone)]
pub struct AuthOptions {
    /// Ask for an admin key (or the node token) on `/metrics`.
    pub protect_metrics: bool,
    /// Ask for an admin key (or the node token) on `/openapi.json`.
    pub protect_openapi: bool,
    /// Failed authentications an address or a key id may make at once.
    pub failure_burst: u32,
}

impl Default for AuthOptions {
    fn default() -> Self {
        Self { protect_metrics: false, protect_openapi: false, failure_burst: DEFAULT_FAILURE_BURST }
    }
}

impl Auth {
    /// A standalone node's: `keys` is usually its one root key.
    pub fn standalone(mode: AuthMode, keys: Vec<AccessKey>, options: &AuthOptions) -> Self {
        let keys = keys.into_iter().map(|k| (k.id.clone(), k)).collect();
        Self::new(Some((mode, keys)), options)
    }

    /// A cluster node's: the mode, keys and node token are the snapshot's.
    pub fn cluster(options: &AuthOptions) -> Self {
        Self::new(None, options)
    }

    fn new(standalone: Option<(AuthMode, BTreeMap<String, AccessKey>)>, options: &AuthOptions) -> Self {
        let quota = Quota::per_second(NonZeroU32::new(FAILURES_PER_SECOND).expect("non-zero"))
            .allow_burst(NonZeroU32::new(options.failure_burst).unwrap_or(NonZeroU32::MIN));
        Self {
            standalone,
            protect_metrics: options.protect_metrics,
            protect_openapi: options.protect_openapi,
            failures: RateLimiter::keyed(quota),
            key_failures: RateLimiter::keyed(quota),
            failure_count: AtomicU64::new(0),
        }
    }

    fn need(&self, method: &Method, route: Option<&str>) -> Need {
        let Some(route) = route else { return Need::AnyKey };
        match route {
            "/healthz" | "/readyz" => Need::Nothing,
            "/metrics" if !self.protect_metrics => Need::Nothing,
            "/openapi.json" if !self.protect_openapi => Need::Nothing,
            r if r.starts_with("/replica/") => Need::NodeToken,
            "/v1/blobs" if *method == Method::POST => Need::Key(Scope::Write),
            "/v1/blobs/{id}" if *method == Method::DELETE => Need::Key(Scope::Delete),
            "/v1/blobs/{id}/ttl" => Need::Key(Scope::Delete),
            "/v1/blobs/{id}" | "/v1/blobs/{id}/info" if matches!(*method, Method::GET | Method::HEAD) => {
                Need::Key(Scope::Read)
            }
            // Admin routes, protected metrics, and whatever route is added later until it is
            // named here: the most, not the least.
            _ => Need::AdminOrNode,
        }
    }

    /// Counts a failed authentication from `ip` (naming the key `key`, when the token named
    /// one); past either budget, how long until it may fail again.
    fn failed(&self, ip: IpAddr, key: Option<&str>) -> Option<Duration> {
        if self.failure_count.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.failures.retain_recent();
            self.failures.shrink_to_fit();
            self.key_failures.retain_recent();
            self.key_failures.shrink_to_fit();
        }
        let now = DefaultClock::default().now();
        let by_address = self.failures.check_key(&address_key(ip)).err().map(|n| n.wait_time_from(now));
        let by_key = key.and_then(|k| self.key_failures.check_key(&k.to_owned()).err()).map(|n| n.wait_time_from(now));
        by_address.max(by_key)
    }
}

/// Failures count per IPv4 address and per IPv6 /64 (one host has a whole /64 to hop in);
/// an IPv4-mapped IPv6 address is its IPv4 address.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// What the node knows right now: the auth mode, the keys and the node tokens it accepts.
struct Credentials<'a> {
    mode: AuthMode,
    keys: KeysRef<'a>,
    /// The cluster's token in etcd, and the one this node was started with (the same, unless
    /// the record was deleted or replaced since).
    node_tokens: Vec<Secret>,
}

enum KeysRef<'a> {
    Standalone(&'a BTreeMap<String, AccessKey>),
    Cluster(Arc<cairn_cluster::etcd::Snapshot>),
}

impl KeysRef<'_> {
    fn get(&self, id: &str) -> Option<&AccessKey> {
        match self {
            KeysRef::Standalone(keys) => keys.get(id),
            KeysRef::Cluster(snapshot) => snapshot.keys.get(id),
        }
    }
}

fn credentials<'a>(state: &'a AppState) -> Credentials<'a> {
    match (&state.auth.standalone, state.front.cluster()) {
        (_, Some(cluster)) => {
            let snapshot = cluster.snapshot();
            let mode = snapshot.topology.config.as_ref().map(|c| c.auth).unwrap_or_default();
            let node_tokens = snapshot.node_token.iter().chain([cluster.node_token()]).cloned().collect();
            Credentials { mode, node_tokens, keys: KeysRef::Cluster(snapshot) }
        }
        (Some((mode, keys)), None) => {
            Credentials { mode: *mode, keys: KeysRef::Standalone(keys), node_tokens: Vec::new() }
        }
        (None, None) => unreachable!("a standalone node's Auth has its keys"),
    }
}

/// The middleware: lets the request through, or answers 401, 403 or 429.
pub async fn authorize(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let need = state.auth.need(request.method(), route.as_deref());
    if need == Need::Nothing {
        return next.run(request).await;
    }
    let verdict = {
        // A header that is not text is no credential (never an empty one).
        let text = |name| request.headers().get(name).map(|v: &HeaderValue| v.to_str().unwrap_or("\u{0}"));
        check(&credentials(&state), need, text(NODE_TOKEN_HEADER), text(header::AUTHORIZATION.as_str()))
            .and_then(|limit| within(limit, need, route.as_deref(), request.uri().path()))
    };
    let refusal = match verdict {
        Ok(limit) => {
            if let Some(limit) = limit {
                request.extensions_mut().insert(PartitionLimit(Arc::new(limit)));
            }
            return next.run(request).await;
        }
        Err(refusal) => refusal,
    };
    // A refusal leaves the body unread: the connection cannot carry another request.
    let has_body = request.headers().get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0")
        || request.headers().contains_key(header::TRANSFER_ENCODING);
    let ip = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let count = |reason: &'static str| state.metrics.auth_failures.get_or_create(&AuthFailureLabels { reason }).inc();
    let limited = match (&refusal, ip) {
        (Refusal::Invalid(_, key), Some(ip)) => state.auth.failed(ip, key.as_deref()),
        _ => None,
    };
    let mut response = match limited {
        Some(wait) => {
            count("blocked");
            ApiError::TooManyAuthFailures(wait.as_secs().max(1)).into_response()
        }
        None => {
            count(refusal.reason());
            let challenge = refusal.challenge(need);
            let mut response = refusal.into_error().into_response();
            if let Some(challenge) = challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
            }
            response
        }
    };
    if has_body {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Why a request was refused.
enum Refusal {
    /// No credentials at all.
    Missing(String),
    /// Credentials that are not valid (malformed, unknown key, wrong secret or token), and the
    /// key id the token named, if it had the shape of one.
    Invalid(String, Option<String>),
    /// A valid key without the scope.
    Forbidden(String, Scope),
}

impl Refusal {
    fn reason(&self) -> &'static str {
        match self {
            Refusal::Missing(_) => "missing",
            Refusal::Invalid(..) => "invalid",
            Refusal::Forbidden(..) => "forbidden",
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750 §3): for the Bearer routes only.
    fn challenge(&self, need: Need) -> Option<String> {
        if need == Need::NodeToken {
            return None;
        }
        Some(match self {
            Refusal::Missing(_) => "Bearer realm=\"cairn\"".to_owned(),
            Refusal::Invalid(..) => "Bearer realm=\"cairn\", error=\"invalid_token\"".to_owned(),
            Refusal::Forbidden(_, scope) => {
                format!("Bearer realm=\"cairn\", error=\"insufficient_scope\", scope=\"{scope}\"")
            }
        })
    }

    fn into_error(self) -> ApiError {
        match self {
            Refusal::Missing(m) | Refusal::Invalid(m, _) => ApiError::Unauthenticated(m),
            Refusal::Forbidden(m, _) => ApiError::Forbidden(m),
        }
    }
}

fn check(
    credentials: &Credentials<'_>,
    need: Need,
    node: Option<&str>,
    authorization: Option<&str>,
) -> Result<Option<BTreeSet<u32>>, Refusal> {
    if need == Need::NodeToken {
        // Replica routes look at nothing else; an anonymous caller learns nothing from them.
        return match node {
            Some(token) if valid_node_token(credentials, token) => Ok(None),
            Some(_) => Err(Refusal::Invalid("not a datanode of this cluster".into(), None)),
            None => Err(Refusal::Missing("not a datanode of this cluster".into())),
        };
    }
    if let Some(token) = node {
        return match (valid_node_token(credentials, token), need) {
            (false, _) => Err(Refusal::Invalid("the node token is not this cluster's".into(), None)),
            (true, Need::AdminOrNode | Need::AnyKey | Need::Key(Scope::Read)) => Ok(None),
            // Not a credential for this route at all: unauthenticated, as without one.
            (true, Need::Key(_)) => Err(Refusal::Missing(
                "this route takes an access key: the node token is for replica, admin and read routes only".into(),
            )),
            (true, Need::Nothing | Need::NodeToken) => Ok(None),
        };
    }
    let Some(authorization) = authorization else {
        return match need {
            Need::Key(_) | Need::AnyKey if credentials.mode == AuthMode::None => Ok(None),
            _ => Err(Refusal::Missing("this route needs credentials: Authorization: Bearer <key id>.<secret>".into())),
        };
    };
    let (scheme, token) = authorization.trim().split_once(' ').unwrap_or((authorization, ""));
    if !scheme.eq_ignore_ascii_case("Bearer") {
        // The "scheme" may be a token sent without one: never quoted back.
        return Err(Refusal::Invalid("unsupported authorization scheme: use Bearer <key id>.<secret>".into(), None));
    }
    let (id, secret) = access::parse_token(token.trim()).map_err(|e| Refusal::Invalid(e.to_string(), None))?;
    // One answer, and one hash, for an unknown key and a wrong secret: key ids cannot be probed.
    let key = match credentials.keys.get(id) {
        Some(key) => Some(key).filter(|key| key.verify(secret)),
        None => {
            std::hint::black_box(access::hash_secret(secret));
            None
        }
    };
    let key = key.ok_or_else(|| Refusal::Invalid("unknown key or wrong secret".into(), Some(id.to_owned())))?;
    let scope = match need {
        Need::Key(scope) => scope,
        Need::AdminOrNode => Scope::Admin,
        Need::AnyKey | Need::Nothing | Need::NodeToken => return Ok(None),
    };
    if key.buckets.is_some() {
        // Blobs are in no bucket: a key limited to buckets is an S3 key only.
        return Err(Refusal::Forbidden(
            format!("key {} is limited to S3 buckets: the blob API is not open to it", key.id),
            scope,
        ));
    }
    if key.allows(scope) {
        // The blob routes honour a key's partitions; the admin routes are an admin's anyway.
        Ok(if matches!(need, Need::Key(_)) { key.partitions.clone() } else { None })
    } else {
        Err(Refusal::Forbidden(format!("key {} has no {scope} scope", key.id), scope))
    }
}

/// The partitions a key limited to some may put new blobs in (an extension of its requests).
#[derive(Debug, Clone)]
pub struct PartitionLimit(pub Arc<BTreeSet<u32>>);

/// A key limited to some partitions, on a route naming a blob: the blob (its id percent-decoded,
/// as the handler reads it) must be in one of them; what is no id at all is refused too.
fn within(
    limit: Option<BTreeSet<u32>>,
    need: Need,
    route: Option<&str>,
    path: &str,
) -> Result<Option<BTreeSet<u32>>, Refusal> {
    let (Some(partitions), Need::Key(scope)) = (&limit, need) else { return Ok(limit) };
    if !route.is_some_and(|r| r.starts_with("/v1/blobs/{id}")) {
        return Ok(limit);
    }
    // The id as the handler will see it: percent-decoded (`%41Q…` is `AQ…`).
    let raw = path.strip_prefix("/v1/blobs/").and_then(|rest| rest.split('/').next()).unwrap_or_default();
    let id = percent_encoding::percent_decode_str(raw).decode_utf8().ok();
    match id.as_deref().map(str::parse::<cairn_common::BlobId>) {
        Some(Ok(id)) if partitions.contains(&id.partition()) => Ok(limit),
        Some(Ok(id)) => Err(Refusal::Forbidden(
            format!("the key reaches partitions {partitions:?} only; this blob is in partition {}", id.partition()),
            scope,
        )),
        // Not an id at all: refused here too, so that no spelling of one slips past.
        _ => Err(Refusal::Forbidden("the key reaches some partitions only, and this is no blob id".into(), scope)),
    }
}

fn valid_node_token(credentials: &Credentials<'_>, presented: &str) -> bool {
    credentials.node_tokens.iter().any(|t| access::secret_matches(t, presented))
}

/// A standalone node's root key file in its data directory: the bearer token, one line,
/// readable by the owner only.
pub const ROOT_TOKEN_FILE: &str = "root-token";

/// The root key of a standalone node that was given none: the one in `DATA_DIR/root-token`,
/// made there (mode 0600) on the first start. The key, its secret, the path, and whether it was
/// just made.
pub fn root_key_in(data_dir: &std::path::Path) -> anyhow::Result<(AccessKey, Secret, std::path::PathBuf, bool)> {
    let path = data_dir.join(ROOT_TOKEN_FILE);
    let (key, secret, made) = access::admin_key_file(&path, "root")?;
    Ok((key, secret, path, made))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_needs_what_docs_security_md_says() {
        let auth = Auth::standalone(AuthMode::Keys, Vec::new(), &AuthOptions::default());
        let need = |m: Method, r: &str| auth.need(&m, Some(r));
        assert_eq!(need(Method::POST, "/v1/blobs"), Need::Key(Scope::Write));
        for m in [Method::GET, Method::HEAD] {
            assert_eq!(need(m.clone(), "/v1/blobs/{id}"), Need::Key(Scope::Read));
            assert_eq!(need(m, "/v1/blobs/{id}/info"), Need::Key(Scope::Read));
        }
        assert_eq!(need(Method::DELETE, "/v1/blobs/{id}"), Need::Key(Scope::Delete));
        assert_eq!(need(Method::PUT, "/v1/blobs/{id}/ttl"), Need::Key(Scope::Delete));
        for r in ["/v1/admin/replicas", "/v1/admin/usage", "/v1/admin/anything-new", "/v2/new"] {
            assert_eq!(need(Method::GET, r), Need::AdminOrNode, "{r}");
        }
        // A method a blob route does not serve is the admin's (the answer is then 405).
        assert_eq!(need(Method::OPTIONS, "/v1/blobs/{id}"), Need::AdminOrNode);
        for r in ["/replica/v1/journal", "/replica/v1/blobs/{id}", "/replica/v1/partitions/{partition}/digest"] {
            assert_eq!(need(Method::POST, r), Need::NodeToken, "{r}");
        }
        for r in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
            assert_eq!(need(Method::GET, r), Need::Nothing, "{r}");
        }
        assert_eq!(auth.need(&Method::GET, None), Need::AnyKey);
        let protected = Auth::standalone(
            AuthMode::Keys,
            Vec::new(),
            &AuthOptions { protect_metrics: true, protect_openapi: true, ..AuthOptions::default() },
        );
        assert_eq!(protected.need(&Method::GET, Some("/metrics")), Need::AdminOrNode);
        assert_eq!(protected.need(&Method::GET, Some("/openapi.json")), Need::AdminOrNode);
    }

    #[test]
    fn addresses_count_per_ipv4_host_and_ipv6_64() {
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(address_key(v4), v4);
        assert_eq!(address_key("::ffff:192.0.2.7".parse().unwrap()), v4);
        let a = address_key("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = address_key("2001:db8:1:2:bbbb:cccc:dddd:eeee".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, address_key("2001:db8:1:3::1".parse().unwrap()));
    }

    #[test]
    fn a_failing_address_is_limited_and_others_are_not() {
        let auth = Auth::standalone(AuthMode::Keys, Vec::new(), &AuthOptions::default());
        let bad: IpAddr = "192.0.2.1".parse().unwrap();
        let limited = (0..DEFAULT_FAILURE_BURST + 5).filter(|_| auth.failed(bad, None).is_some()).count();
        assert_eq!(limited, 5, "the burst is allowed, then each failure is limited");
        assert!(auth.failed("192.0.2.2".parse().unwrap(), None).is_none());
    }

    #[test]
    fn guesses_at_one_key_are_limited_across_addresses() {
        let auth = Auth::standalone(AuthMode::Keys, Vec::new(), &AuthOptions::default());
        let address = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0xc000_0200 + i));
        // One guess from each of many addresses: the key's budget runs out, no address's does.
        let limited =
            (0..DEFAULT_FAILURE_BURST + 5).filter(|i| auth.failed(address(*i), Some("CKAAAA")).is_some()).count();
        assert_eq!(limited, 5);
        assert!(auth.failed(address(100), Some("CKBBBB")).is_none(), "another key id is not limited");
        assert!(auth.failed(address(101), None).is_none());
    }

    #[test]
    fn a_key_limited_to_buckets_opens_no_blob_route() {
        let reader = [Scope::Read, Scope::Write].into_iter().collect();
        let (key, secret) = AccessKey::generate("s3", reader, 0).unwrap();
        let key = key.limited_to_buckets(Some([("photos".to_owned(), [Scope::Read].into())].into())).unwrap();
        let bearer = format!("Bearer {}", access::token(&key.id, &secret));
        let keys = BTreeMap::from([(key.id.clone(), key)]);
        let credentials = Credentials { mode: AuthMode::Keys, keys: KeysRef::Standalone(&keys), node_tokens: vec![] };
        for scope in [Scope::Read, Scope::Write] {
            match check(&credentials, Need::Key(scope), None, Some(&bearer)) {
                Err(Refusal::Forbidden(message, _)) => assert!(message.contains("limited to S3 buckets"), "{message}"),
                other => panic!("{scope}: {:?}", other.map_err(|r| r.reason())),
            }
        }
        // Routes any valid key may call (a 404 of an unknown route) still know it.
        assert!(check(&credentials, Need::AnyKey, None, Some(&bearer)).is_ok());
    }

    #[test]
    fn node_tokens_are_checked_whole_and_never_empty() {
        let (_, token) = AccessKey::generate("x", [Scope::Read].into_iter().collect(), 0).unwrap();
        let none = BTreeMap::new();
        let credentials =
            Credentials { mode: AuthMode::Keys, keys: KeysRef::Standalone(&none), node_tokens: vec![token.clone()] };
        assert!(check(&credentials, Need::NodeToken, Some(token.expose()), None).is_ok());
        for wrong in ["", "\u{0}", &token.expose()[1..], &format!("{}x", token.expose())] {
            assert!(check(&credentials, Need::NodeToken, Some(wrong), None).is_err(), "{wrong:?}");
        }
        // An admin key's header does not open a replica route, nor does auth: none.
        let open = Credentials { mode: AuthMode::None, keys: KeysRef::Standalone(&none), node_tokens: vec![] };
        assert!(check(&open, Need::NodeToken, None, Some("Bearer x")).is_err());
        assert!(check(&open, Need::NodeToken, Some(""), None).is_err());
        assert!(check(&open, Need::AdminOrNode, None, None).is_err(), "admin routes need credentials even then");
        assert!(check(&open, Need::Key(Scope::Delete), None, None).is_ok());
    }
}
