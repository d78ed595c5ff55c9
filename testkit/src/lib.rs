//! Test support shared by Cairn's crates.
//!
//! - [`etcd`]: a real etcd server on free loopback ports.
//! - [`machine`]: loop devices, filesystems and mounts that clean up after themselves.
//! - [`ports`]: loopback ports for child processes, reserved so no one takes them first.
//!
//! [`MemoryApi`]: an in-memory Kubernetes API server behind a real `kube::Client`, for tests
//! of the Kubernetes side (no API server can be installed where Cairn's tests run). It keeps
//! objects as JSON and implements what Cairn's controllers use: get, list, server-side apply
//! of objects and of the status subresource, merge patches, delete; resourceVersion,
//! generation (bumped when anything but status and metadata changes), uid, creationTimestamp,
//! JSON patches, deletion held by finalizers (deletionTimestamp), equality and existence label
//! selectors, the
//! defaults and admission a real API server applies to a Pod it creates ([`admission`]), the
//! CEL rules of installed CRDs on create and update ([`MemoryApi::with_crd`]), name and label
//! rules (422), Secret data keys and the keys typed Secrets need (422), graceful Pod deletion on demand, DNS names as CoreDNS makes them, watches of
//! collections (with 410 Gone after [`MemoryApi::compact_events`]), garbage collection of
//! objects whose owner is gone,
//! and namespaced as well as cluster-scoped resources (the scope is the request's). With
//! [`MemoryApi::with_rbac`], requests of a client made by [`MemoryApi::client_as`] are authorized
//! as the API server does ([`rbac`]): 403 unless a role grants the verb — `create` as well as
//! `patch` for a server-side apply that creates. Server-side apply keeps field ownership per
//! manager ([`ssa`]): a field a manager stops sending goes, a conflicting one is a 409 unless
//! forced. Every
//! write is counted per object so tests can prove that a converged controller writes nothing.

pub mod admission;
pub mod discovery;
pub mod etcd;
pub mod keys;
pub mod kubelet;
pub mod machine;
pub mod ports;
pub mod rbac;
pub mod secret_volume;
pub mod selector;
pub mod ssa;

/// Deterministic pseudo-random bytes (xorshift), the same for a seed everywhere.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

/// `group/version`, namespace (empty for cluster-scoped), plural, name.
type Key = (String, String, String, String);

#[derive(Default)]
struct State {
    objects: BTreeMap<Key, Value>,
    writes: BTreeMap<Key, u64>,
    status_writes: BTreeMap<Key, u64>,
    next_version: u64,
    next_uid: u64,
    rbac: Option<rbac::Rbac>,
    /// Deleted Pods stay, Terminating (deletionTimestamp set), until
    /// [`MemoryApi::finish_pod_deletions`]: the grace period of a real kubelet, as long as a test wants.
    hold_pod_deletions: bool,
    /// Every change, in resourceVersion order, for watches: (resourceVersion, key, type, object).
    events: Vec<(u64, Key, &'static str, Value)>,
    /// Watches from before this resourceVersion get 410 Gone (etcd compacted it).
    oldest_watchable: u64,
    /// Server-side apply's field owners, per object.
    owners: BTreeMap<Key, ssa::Owners>,
    /// The openAPIV3Schema of each custom resource registered with [`MemoryApi::with_crd`], by
    /// (group/version, plural): its CEL rules run on create and update, as an API server runs them.
    schemas: BTreeMap<(String, String), Value>,
    /// Every request RBAC allowed.
    accessed: std::collections::BTreeSet<rbac::Access>,
}

/// How long a watch that asked for bookmarks stays quiet before it gets one (a real API server
/// sends them about every minute; shorter here, so that tests see them).
const BOOKMARK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The header a [`MemoryApi::client_as`] client names its user in (as a token would).
const USER_HEADER: &str = "x-testkit-user";

#[derive(Clone, Default)]
pub struct MemoryApi {
    state: Arc<Mutex<State>>,
    /// Woken on every change, for watches.
    changed: Arc<tokio::sync::Notify>,
}

impl State {
    /// What the API serves: the built-in resources and those of every stored CRD.
    fn resources(&self) -> Vec<discovery::Resource> {
        let mut all = discovery::builtin();
        // The CRDs only (keys sort by group/version, namespace, plural), not every object.
        let (gv, plural) = ("apiextensions.k8s.io/v1".to_string(), "customresourcedefinitions".to_string());
        let first: Key = (gv.clone(), String::new(), plural.clone(), String::new());
        for (key, crd) in self.objects.range(first..) {
            if key.0 != gv || !key.1.is_empty() || key.2 != plural {
                break;
            }
            all.extend(discovery::from_crd(crd));
        }
        all
    }

    /// The resource served at `group_version`/`plural`, if any.
    fn resource(&self, group_version: &str, plural: &str) -> Option<discovery::Resource> {
        self.resources().into_iter().find(|r| r.group_version == group_version && r.plural == plural)
    }

    /// Deletes an object: it stays, marked for deletion, while it has finalizers, and so does a
    /// Pod through its grace period (while deletions are held, unless `force`). Returns the
    /// object as it was or is now; `None` when there is no such object.
    fn delete(&mut self, key: &Key, grace: Option<u64>) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        *self.writes.entry(key.clone()).or_default() += 1;
        let has_finalizers = object["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty());
        // A Pod that never ran or has ended goes at once (no kubelet has anything to stop);
        // one running stays Terminating for its grace period.
        let phase = object["status"]["phase"].as_str().unwrap_or_default();
        let ran = !object["spec"]["nodeName"].is_null() && phase != "Succeeded" && phase != "Failed";
        let grace = grace.or(object["spec"]["terminationGracePeriodSeconds"].as_u64()).unwrap_or(30);
        let terminating = key.2 == "pods" && self.hold_pod_deletions && ran && grace > 0;
        if has_finalizers || terminating {
            if object["metadata"]["deletionTimestamp"].is_null() {
                let at =
                    k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(grace as i64);
                object["metadata"]["deletionTimestamp"] = json!(timestamp(at));
                if key.2 == "pods" {
                    object["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
                }
                self.next_version += 1;
                object["metadata"]["resourceVersion"] = json!(self.next_version.to_string());
                self.record(key, "MODIFIED", &object);
            }
            self.objects.insert(key.clone(), object.clone());
        } else {
            self.owners.remove(key);
            self.next_version += 1;
            self.record(key, "DELETED", &object);
            if let Some(uid) = object["metadata"]["uid"].as_str() {
                self.collect_garbage(uid);
            }
            // A CRD gone takes its objects and its schemas with it.
            if key.2 == "customresourcedefinitions" {
                for resource in discovery::from_crd(&object) {
                    self.schemas.remove(&(resource.group_version.clone(), resource.plural.clone()));
                    let objects: Vec<Key> = self
                        .objects
                        .keys()
                        .filter(|k| k.0 == resource.group_version && k.2 == resource.plural)
                        .cloned()
                        .collect();
                    for k in objects {
                        if let Some(gone) = self.objects.remove(&k) {
                            self.next_version += 1;
                            self.record(&k, "DELETED", &gone);
                        }
                    }
                }
            }
        }
        Some(object)
    }

    /// The Eviction API: a Pod is deleted (gracefully) unless a PodDisruptionBudget selecting it
    /// would be violated — 429, as the API server answers. A `maxUnavailable` budget over Pods
    /// whose owner has no `/scale` allows nothing: the disruption controller cannot count them.
    fn evict(&mut self, key: &Key) -> Result<Value, (StatusCode, &'static str, String)> {
        let pod = self.objects.get(key).cloned().ok_or((
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("pods \"{}\" not found", key.3),
        ))?;
        let ready = |p: &Value| p["metadata"]["deletionTimestamp"].is_null() && pod_ready(p);
        let selects =
            |pdb: &Value, p: &Value| selector::selector_matches(&pdb["spec"]["selector"], &p["metadata"]["labels"]);
        let too_many = |message: String| (StatusCode::TOO_MANY_REQUESTS, "TooManyRequests", message);
        let budgets: Vec<(&Key, &Value)> = self
            .objects
            .iter()
            .filter(|(k, pdb)| {
                k.0 == "policy/v1" && k.1 == key.1 && k.2 == "poddisruptionbudgets" && selects(pdb, &pod)
            })
            .collect();
        if budgets.len() > 1 {
            let message =
                "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.";
            return Err((StatusCode::INTERNAL_SERVER_ERROR, "InternalError", message.into()));
        }
        if let (Some((pdb_key, pdb)), true) = (budgets.first(), ready(&pod)) {
            let selected: Vec<&Value> = self
                .objects
                .iter()
                .filter(|(k, p)| k.1 == key.1 && k.2 == "pods" && selects(pdb, p))
                .map(|(_, p)| p)
                .collect();
            let healthy = selected.iter().filter(|p| ready(p)).count();
            // How many Pods there should be: the scale of their controllers, which only the
            // built-in ones (with `/scale`) report here; a budget that needs it for others
            // allows no disruption, as the disruption controller does.
            let scalable = |p: &&Value| {
                p["metadata"]["ownerReferences"].as_array().into_iter().flatten().any(|o| {
                    o["controller"] == true
                        && ["StatefulSet", "ReplicaSet", "ReplicationController"]
                            .contains(&o["kind"].as_str().unwrap_or_default())
                })
            };
            let expected = selected.iter().all(scalable).then_some(selected.len());
            // An integer or a percentage of the expected Pods (rounded up for minAvailable).
            let amount = |v: &Value, round_up: bool| -> Option<usize> {
                match v {
                    Value::Number(n) => n.as_u64().map(|n| n as usize),
                    Value::String(p) => {
                        let percent: usize = p.strip_suffix('%')?.parse().ok()?;
                        let of = expected? * percent;
                        Some(if round_up { of.div_ceil(100) } else { of / 100 })
                    }
                    _ => None,
                }
            };
            let spec = &pdb["spec"];
            let desired_healthy = if !spec["minAvailable"].is_null() {
                amount(&spec["minAvailable"], true)
            } else if !spec["maxUnavailable"].is_null() {
                expected.zip(amount(&spec["maxUnavailable"], false)).map(|(e, max)| e.saturating_sub(max))
            } else {
                Some(0)
            };
            match desired_healthy {
                Some(desired) if healthy > desired => {}
                Some(desired) => {
                    return Err(too_many(format!(
                        "Cannot evict pod as it would violate the pod's disruption budget. The disruption budget {} needs {desired} healthy pods and has {healthy} currently",
                        pdb_key.3
                    )))
                }
                None => {
                    return Err(too_many(format!(
                        "Cannot evict pod as it would violate the pod's disruption budget {}: its Pods' controller has no scale subresource, so a percentage or maxUnavailable allows no disruption",
                        pdb_key.3
                    )))
                }
            }
        }
        Ok(self.delete(key, None).expect("present"))
    }

    /// A custom resource as its structural schema has it: fields the schema does not declare
    /// are pruned, or, with `fieldValidation=Strict` (kubectl's default), refused.
    fn structural(&self, gv: &str, plural: &str, object: &mut Value, strict: bool) -> Result<(), String> {
        let Some(schema) = self.schemas.get(&(gv.to_owned(), plural.to_owned())) else { return Ok(()) };
        let mut checked = object.clone();
        let pruned = discovery::prune(schema, &mut checked);
        if strict && !pruned.is_empty() {
            let fields: Vec<String> = pruned.iter().map(|f| format!(".{f}: field not declared in schema")).collect();
            return Err(format!("failed to create typed patch object: {}", fields.join(", ")));
        }
        *object = checked;
        Ok(())
    }

    /// Whether the API serves this resource at this scope: a built-in one, or one of a stored
    /// CRD; a namespaced resource in a namespace (or listed across all), a cluster-scoped one
    /// without. Anything else is a 404, as before its CRD is applied on a real cluster.
    fn served(&self, key: &Key, collection: bool) -> Result<(), String> {
        let (gv, ns, plural, _) = key;
        let Some(resource) = self.resource(gv, plural) else {
            return Err(format!("the server could not find the requested resource ({gv} {plural})"));
        };
        match (resource.namespaced, ns.is_empty()) {
            (false, false) => Err(format!("{plural} is cluster-scoped: not in a namespace")),
            (true, true) if !collection => Err(format!("{plural} is namespaced: name a namespace")),
            _ => Ok(()),
        }
    }

    /// A stored CRD: its schemas validate (CEL rules) and prune its objects from now on, and its
    /// status says it is established, as the API server's CRD controller makes it.
    fn install_crd(&mut self, crd: &mut Value) {
        let group = crd["spec"]["group"].as_str().unwrap_or_default().to_owned();
        let plural = crd["spec"]["names"]["plural"].as_str().unwrap_or_default().to_owned();
        let mut stored = Vec::new();
        for version in crd["spec"]["versions"].as_array().into_iter().flatten() {
            let name = version["name"].as_str().unwrap_or_default();
            if version["storage"] == true {
                stored.push(json!(name));
            }
            let schema = &version["schema"]["openAPIV3Schema"];
            if !schema.is_null() {
                self.schemas.insert((format!("{group}/{name}"), plural.clone()), schema.clone());
            }
        }
        let condition = |kind: &str, reason: &str| json!({"type": kind, "status": "True", "reason": reason, "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"});
        crd["status"] = json!({"acceptedNames": crd["spec"]["names"], "storedVersions": stored,
            "conditions": [condition("NamesAccepted", "NoConflicts"), condition("Established", "InitialNamesAccepted")]});
    }

    /// Records a change for watches (`ADDED`, `MODIFIED`, `DELETED`) at the current version.
    fn record(&mut self, key: &Key, kind: &'static str, object: &Value) {
        let version = self.next_version;
        self.events.push((version, key.clone(), kind, object.clone()));
    }

    /// Garbage collection, as the API server's collector does it in the background: objects whose
    /// owner (by uid) is gone go too, and theirs after them.
    fn collect_garbage(&mut self, gone_uid: &str) {
        // Background deletion, as the garbage collector issues it: each dependent is deleted as
        // any client deletes it (its finalizers and a Pod's grace period count).
        let owned: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, v)| {
                v["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == gone_uid))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in owned {
            let already = self.objects.get(&key).is_some_and(|o| !o["metadata"]["deletionTimestamp"].is_null());
            if !already {
                self.delete(&key, None);
            }
        }
    }
}

/// The body of an answer: whole, or a watch's stream of events.
type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::convert::Infallible>;

/// A parsed request path.
struct Target {
    key: Key,
    sub: Subresource,
}

/// The subresource a request is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Subresource {
    None,
    Status,
    /// `pods/{name}/eviction`: the Eviction API.
    Eviction,
    /// `pods/{name}[:port]/proxy/{path}`: the API server's proxy to a Pod.
    Proxy,
}

impl MemoryApi {
    pub fn new() -> Self {
        Self::default()
    }

    /// This API with RBAC: requests of [`client_as`](Self::client_as) clients are authorized.
    pub fn with_rbac(self, rbac: rbac::Rbac) -> Self {
        self.state.lock().unwrap().rbac = Some(rbac);
        self
    }

    /// This API with a CustomResourceDefinition installed: creates and updates of its objects are
    /// refused (422) when its CEL rules (`x-kubernetes-validations`, transition rules with
    /// `oldSelf` included) do not hold.
    pub fn with_crd(
        self,
        crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    ) -> Self {
        {
            let mut state = self.state.lock().unwrap();
            let mut object = serde_json::to_value(crd).expect("CRD JSON");
            object["apiVersion"] = json!("apiextensions.k8s.io/v1");
            object["kind"] = json!("CustomResourceDefinition");
            state.next_uid += 1;
            state.next_version += 1;
            object["metadata"]["uid"] = json!(format!("00000000-0000-0000-0000-{:012}", state.next_uid));
            object["metadata"]["resourceVersion"] = json!(state.next_version.to_string());
            object["metadata"]["creationTimestamp"] = json!(now());
            object["metadata"]["generation"] = json!(1);
            state.install_crd(&mut object);
            let key = (
                "apiextensions.k8s.io/v1".into(),
                String::new(),
                "customresourcedefinitions".into(),
                crd.metadata.name.clone().unwrap_or_default(),
            );
            state.record(&key, "ADDED", &object);
            state.objects.insert(key, object);
        }
        self
    }

    /// A client whose requests this API answers, as a cluster admin (never refused).
    pub fn client(&self) -> kube::Client {
        self.client_for(None)
    }

    /// A client authenticated as `user` (e.g. [`rbac::service_account`]): with RBAC, refused (403)
    /// what its roles do not grant.
    pub fn client_as(&self, user: &str) -> kube::Client {
        self.client_for(Some(user.to_owned()))
    }

    fn client_for(&self, user: Option<String>) -> kube::Client {
        let api = self.clone();
        let service = tower::service_fn(move |request: Request<kube::client::Body>| {
            let (api, user) = (api.clone(), user.clone());
            async move {
                let (mut parts, body) = request.into_parts();
                if let Some(user) = user {
                    parts.headers.insert(USER_HEADER, http::HeaderValue::from_str(&user).expect("user"));
                }
                let body = body.collect().await.map_err(tower::BoxError::from)?.to_bytes();
                Ok::<_, tower::BoxError>(api.answer(parts.method, parts.uri, &parts.headers, &body).await)
            }
        });
        kube::Client::new(service, "default")
    }

    /// A request's answer: a watch streams its events; anything else is answered whole.
    async fn answer(&self, method: Method, uri: http::Uri, headers: &http::HeaderMap, body: &Bytes) -> Response<Body> {
        if let Some((target, https, port, path)) = parse_pod_proxy(uri.path()) {
            let to = (target, https, port);
            return self.proxy(method, to, path, uri.query(), headers, body).await.map(|b| b.boxed_unsync());
        }
        if method == Method::GET {
            let path = uri.path();
            let document = if path == "/version" {
                Some(
                    json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-cairn-testkit", "platform": "linux/amd64"}),
                )
            } else {
                let resources = self.state.lock().unwrap().resources();
                discovery::document(path, &resources).or_else(|| discovery::openapi(path, &resources))
            };
            if let Some(document) = document {
                return ok(document).map(|b| b.boxed_unsync());
            }
        }
        let query = uri.query().unwrap_or_default().to_owned();
        let watching = method == Method::GET && query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1");
        if watching {
            if let Some((target, true)) = parse_path(uri.path()) {
                if let Err(message) = self.state.lock().unwrap().served(&target.key, true) {
                    return status(StatusCode::NOT_FOUND, "NotFound", &message).map(|b| b.boxed_unsync());
                }
                // Authorized as any request (verb `watch`).
                let user = headers.get(USER_HEADER).and_then(|v| v.to_str().ok());
                let denied = Self::authorize(&mut self.state.lock().unwrap(), user, &["watch"], &target).err();
                if let Some(message) = denied {
                    return status(StatusCode::FORBIDDEN, "Forbidden", &message).map(|b| b.boxed_unsync());
                }
                return self.watch(target.key, &query);
            }
        }
        self.handle(method, uri, headers, body).map(|b| b.boxed_unsync())
    }

    /// The API server's proxy to a Pod: authorized as the `pods/proxy` subresource (`get` for a
    /// GET), forwarded over HTTP to the Pod's IP and port (HTTPS for `https:<pod>:<port>`,
    /// without checking the Pod's certificate, as kube-apiserver does); 503 while the Pod has no IP.
    async fn proxy(
        &self,
        method: Method,
        (target, https, port): (Target, bool, Option<u16>),
        path: String,
        query: Option<&str>,
        headers: &http::HeaderMap,
        body: &Bytes,
    ) -> Response<Full<Bytes>> {
        let verb = match method {
            Method::POST => "create",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE => "delete",
            _ => "get",
        };
        let address = {
            let mut state = self.state.lock().unwrap();
            let user = headers.get(USER_HEADER).and_then(|v| v.to_str().ok());
            if let Err(message) = Self::authorize(&mut state, user, &[verb], &target) {
                return status(StatusCode::FORBIDDEN, "Forbidden", &message);
            }
            let Some(pod) = state.objects.get(&target.key) else { return not_found(&target.key) };
            let port =
                port.or_else(|| pod["spec"]["containers"][0]["ports"][0]["containerPort"].as_u64().map(|p| p as u16));
            match (pod["status"]["podIP"].as_str(), port) {
                (Some(ip), Some(port)) => format!("{ip}:{port}"),
                _ => {
                    return status(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ServiceUnavailable",
                        "the pod has no IP address or port",
                    )
                }
            }
        };
        let path = match query {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        // As kube-apiserver: the client's headers go on, except hop-by-hop ones and the
        // credentials the API server itself consumed (its authentication filter deletes
        // `Authorization`; here the user header stands for it).
        let mut passed = String::new();
        for (name, value) in headers {
            let consumed = [
                "host",
                "content-length",
                "connection",
                "keep-alive",
                "proxy-authorization",
                "proxy-connection",
                "te",
                "trailer",
                "transfer-encoding",
                "upgrade",
                "authorization",
                USER_HEADER,
            ];
            if consumed.iter().any(|c| name.as_str().eq_ignore_ascii_case(c)) {
                continue;
            }
            if let Ok(value) = value.to_str() {
                passed += &format!("{name}: {value}\r\n");
            }
        }
        let forwarded = async {
            use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
            async fn exchange(
                mut stream: impl AsyncRead + AsyncWrite + Unpin,
                request: &[u8],
            ) -> std::io::Result<Vec<u8>> {
                stream.write_all(request).await?;
                let mut answer = Vec::new();
                // A TLS peer may close without close_notify after HTTP/1.0: what came is the answer.
                match stream.read_to_end(&mut answer).await {
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => {}
                    other => {
                        other?;
                    }
                }
                Ok(answer)
            }
            let stream = tokio::net::TcpStream::connect(&address).await?;
            let mut request = format!(
                "{method} {path} HTTP/1.0\r\nHost: {address}\r\n{passed}Content-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            request.extend_from_slice(body);
            if https {
                let ip = address.rsplit_once(':').map_or(address.as_str(), |(h, _)| h).to_owned();
                let name = rustls::pki_types::ServerName::try_from(ip).map_err(std::io::Error::other)?;
                let tls = tokio_rustls::TlsConnector::from(unchecked_tls_client()).connect(name, stream).await?;
                exchange(tls, &request).await
            } else {
                exchange(stream, &request).await
            }
        };
        let answer = match tokio::time::timeout(std::time::Duration::from_secs(10), forwarded).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                return status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    &format!("error trying to reach pod: {e}"),
                )
            }
            Err(_) => return status(StatusCode::GATEWAY_TIMEOUT, "Timeout", "the pod did not answer in time"),
        };
        let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(answer.len());
        let head = String::from_utf8_lossy(&answer[..split]).into_owned();
        let code = head.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok()).unwrap_or(502);
        let content_type = head
            .lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "application/octet-stream".into());
        Response::builder()
            .status(StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY))
            .header("content-type", content_type)
            .body(Full::new(Bytes::copy_from_slice(&answer[(split + 4).min(answer.len())..])))
            .expect("response")
    }

    /// Etcd compacted: watches from before now get 410 Gone, and must list again.
    pub fn compact_events(&self) {
        let mut state = self.state.lock().unwrap();
        state.events.clear();
        state.oldest_watchable = state.next_version + 1;
        drop(state);
        self.changed.notify_waiters();
    }

    /// A watch of a collection from `resourceVersion=`: the changes after it that match (label
    /// selector too), as they happen, one JSON event a line, until `timeoutSeconds`; an `ERROR`
    /// event with a 410 Status when that version is gone.
    fn watch(&self, key: Key, query: &str) -> Response<Body> {
        let param = |name: &str| query_param(query, name);
        let since: u64 = param("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let timeout = param("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(60u64);
        let bookmarks = param("allowWatchBookmarks").as_deref() == Some("true");
        let selector = match Selector::of(query, &key.2) {
            Ok(selector) => selector,
            Err(message) => return status(StatusCode::BAD_REQUEST, "BadRequest", &message).map(|b| b.boxed_unsync()),
        };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(timeout);
        // A bookmark names the kind and version of the watched resource, as the API server's do
        // (clients decode it as a typed object), and marks the end of initial events only when
        // they were asked for.
        let (gv, plural) = (key.0.clone(), key.2.clone());
        let kind = self.state.lock().unwrap().resource(&gv, &plural).map(|r| r.kind).unwrap_or_else(|| plural.clone());
        let initial_events = param("sendInitialEvents").as_deref() == Some("true");
        let api = self.clone();
        let first_bookmark = tokio::time::Instant::now() + BOOKMARK_INTERVAL;
        let stream = futures::stream::unfold(
            (since, false, first_bookmark),
            move |(mut last, done, mut next_bookmark)| {
                let (api, key, selector, kind, api_version) =
                    (api.clone(), key.clone(), selector.clone(), kind.clone(), gv.clone());
                async move {
                    if done {
                        return None;
                    }
                    loop {
                        let notified = api.changed.notified();
                        tokio::pin!(notified);
                        notified.as_mut().enable();
                        {
                            let state = api.state.lock().unwrap();
                            if last + 1 < state.oldest_watchable && last != 0 {
                                let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                                "status": "Failure", "reason": "Expired", "code": 410,
                                "message": format!("too old resource version: {last} ({})", state.oldest_watchable)}});
                                let line = format!("{gone}\n");
                                return Some((
                                    Ok(http_body::Frame::data(Bytes::from(line))),
                                    (last, true, next_bookmark),
                                ));
                            }
                            let (gv, ns, plural, _) = &key;
                            let mut lines = String::new();
                            // Every change up to here is looked at under this one lock: a bookmark at
                            // `last` can never skip one that matches.
                            let from = last;
                            for (version, k, kind, object) in state.events.iter().filter(|e| e.0 > from) {
                                last = *version;
                                let matches = &k.0 == gv
                                    && &k.2 == plural
                                    && (ns.is_empty() || &k.1 == ns)
                                    && selector.matches(object);
                                if matches {
                                    lines += &format!("{}\n", json!({"type": kind, "object": object}));
                                }
                            }
                            let now = tokio::time::Instant::now();
                            if !lines.is_empty() {
                                return Some((
                                    Ok(http_body::Frame::data(Bytes::from(lines))),
                                    (last, false, next_bookmark),
                                ));
                            }
                            // Quiet for a while: a bookmark, so that the client's next watch starts
                            // from here and not from a version that may be compacted by then.
                            if bookmarks && now >= next_bookmark && now < deadline {
                                let mut metadata = json!({"resourceVersion": last.max(state.next_version).to_string()});
                                if initial_events {
                                    metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
                                }
                                let bookmark = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version, "metadata": metadata}});
                                last = last.max(state.next_version);
                                next_bookmark = now + BOOKMARK_INTERVAL;
                                let line = format!("{bookmark}\n");
                                return Some((
                                    Ok(http_body::Frame::data(Bytes::from(line))),
                                    (last, false, next_bookmark),
                                ));
                            }
                        }
                        let wake = if bookmarks { next_bookmark.min(deadline) } else { deadline };
                        if tokio::time::timeout_at(wake, notified).await.is_err()
                            && tokio::time::Instant::now() >= deadline
                        {
                            return None;
                        }
                    }
                }
            },
        );
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(http_body_util::StreamBody::new(stream).boxed_unsync())
            .expect("response")
    }

    /// From now on a deleted Pod stays Terminating until [`finish_pod_deletions`](Self::finish_pod_deletions),
    /// as a kubelet keeps it through its grace period.
    pub fn hold_pod_deletions(&self) {
        self.state.lock().unwrap().hold_pod_deletions = true;
    }

    /// The Terminating Pods are gone (their grace period is over).
    pub fn finish_pod_deletions(&self) {
        let mut state = self.state.lock().unwrap();
        let done: Vec<Key> = state
            .objects
            .iter()
            .filter(|(k, v)| k.2 == "pods" && !v["metadata"]["deletionTimestamp"].is_null())
            .filter(|(_, v)| v["metadata"]["finalizers"].as_array().is_none_or(|f| f.is_empty()))
            .map(|(k, _)| k.clone())
            .collect();
        for key in done {
            if let Some(object) = state.objects.remove(&key) {
                state.next_version += 1;
                state.record(&key, "DELETED", &object);
            }
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// Whether `host` resolves as CoreDNS would answer it: `<hostname>.<subdomain>.<namespace>.svc`
    /// (optionally `.cluster.local`) exists when a Pod in that namespace has that `spec.hostname`
    /// and `spec.subdomain`, and a headless Service of the subdomain's name selects it.
    pub fn resolves(&self, host: &str) -> bool {
        let host = host.trim_end_matches(".cluster.local");
        let parts: Vec<&str> = host.split('.').collect();
        let [hostname, subdomain, namespace, "svc"] = parts[..] else { return false };
        let state = self.state.lock().unwrap();
        let service = state.objects.get(&("v1".into(), namespace.into(), "services".into(), subdomain.into()));
        let Some(service) = service.filter(|s| s["spec"]["clusterIP"] == "None") else { return false };
        let selector = service["spec"]["selector"].as_object().cloned().unwrap_or_default();
        state.objects.iter().any(|(k, pod)| {
            k.1 == namespace
                && k.2 == "pods"
                && pod["spec"]["hostname"] == hostname
                && pod["spec"]["subdomain"] == subdomain
                && selector.iter().all(|(label, want)| &pod["metadata"]["labels"][label] == want)
        })
    }

    /// What RBAC allowed `user` so far: (verb, API group, resource).
    pub fn accessed(&self, user: &str) -> std::collections::BTreeSet<(String, String, String)> {
        let state = self.state.lock().unwrap();
        state
            .accessed
            .iter()
            .filter(|a| a.user == user)
            .map(|a| (a.verb.clone(), a.group.clone(), a.resource.clone()))
            .collect()
    }

    /// The verbs a request needs, as the API server authorizes them: a server-side apply (or a
    /// replace) that creates the object needs `create` too.
    fn verbs(method: &Method, collection: bool, query: &str, exists: bool, apply: bool) -> Vec<&'static str> {
        match (method, collection) {
            (&Method::GET, true) if query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1") => vec!["watch"],
            (&Method::GET, true) => vec!["list"],
            (&Method::POST, true) => vec!["create"],
            (&Method::GET, false) => vec!["get"],
            (&Method::POST, false) => vec!["create"],
            (&Method::DELETE, false) => vec!["delete"],
            (&Method::PATCH, false) if apply && !exists => vec!["patch", "create"],
            (&Method::PATCH, false) => vec!["patch"],
            (&Method::PUT, false) if !exists => vec!["update", "create"],
            (&Method::PUT, false) => vec!["update"],
            _ => vec![],
        }
    }

    /// Why the request is forbidden, unless RBAC allows every verb it needs (no RBAC, or an admin
    /// client: allowed).
    fn authorize(state: &mut State, user: Option<&str>, verbs: &[&str], target: &Target) -> Result<(), String> {
        let (Some(rbac), Some(user)) = (&state.rbac, user) else { return Ok(()) };
        let (gv, ns, plural, name) = &target.key;
        let group = gv.rsplit_once('/').map(|(g, _)| g).unwrap_or_default();
        let resource = match target.sub {
            Subresource::Status => format!("{plural}/status"),
            Subresource::Eviction => format!("{plural}/eviction"),
            Subresource::Proxy => format!("{plural}/proxy"),
            Subresource::None => plural.clone(),
        };
        let mut allowed = Vec::new();
        for verb in verbs {
            let access = rbac::Access {
                user: user.to_owned(),
                verb: (*verb).to_owned(),
                group: group.to_owned(),
                resource: resource.clone(),
                namespace: ns.clone(),
            };
            if !rbac.allows(&access) {
                let scope = if ns.is_empty() {
                    "at the cluster scope".to_owned()
                } else {
                    format!("in the namespace \"{ns}\"")
                };
                let message = format!(
                    "{plural} \"{name}\" is forbidden: User \"{user}\" cannot {verb} resource \"{resource}\" in API group \"{group}\" {scope}"
                );
                return Err(message);
            }
            allowed.push(access);
        }
        state.accessed.extend(allowed);
        Ok(())
    }

    /// Serves this API over HTTP on 127.0.0.1 (for a process that reads a kubeconfig, such as
    /// `cairn status`); returns `http://127.0.0.1:PORT`. Runs on the current tokio runtime.
    pub async fn serve_http(&self) -> String {
        self.serve_http_on("127.0.0.1").await
    }

    /// [`serve_http`](Self::serve_http) on `host` (e.g. a bridge address Pods reach).
    pub async fn serve_http_on(&self, host: &str) -> String {
        let api = self.clone();
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let api = api.clone();
            async move {
                let (mut parts, body) = request.into_parts();
                // Who the caller is: a bearer token names the user (as a ServiceAccount token
                // would: `system:serviceaccount:NS:NAME`), and so does impersonation (a
                // kubeconfig's `as:`, kubectl's `--as`; kubectl sends no token over plain HTTP),
                // which this API allows its unauthenticated callers, as to a cluster admin.
                parts.headers.remove(USER_HEADER);
                let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
                let token = header("authorization").and_then(|v| v.strip_prefix("Bearer ").map(str::to_owned));
                let impersonated = header("impersonate-user");
                // A caller with a token impersonates only what RBAC lets it (`impersonate` users).
                if let (Some(caller), Some(as_user)) = (&token, &impersonated) {
                    let target = Target {
                        key: ("v1".into(), String::new(), "users".into(), as_user.clone()),
                        sub: Subresource::None,
                    };
                    if let Err(message) =
                        Self::authorize(&mut api.state.lock().unwrap(), Some(caller), &["impersonate"], &target)
                    {
                        return status(StatusCode::FORBIDDEN, "Forbidden", &message).map(|b| b.boxed_unsync());
                    }
                }
                if let Some(user) = impersonated.or(token) {
                    parts.headers.insert(USER_HEADER, http::HeaderValue::from_str(&user).expect("a header value"));
                }
                match axum::body::to_bytes(body, usize::MAX).await {
                    Ok(body) => api.answer(parts.method, parts.uri, &parts.headers, &body).await,
                    Err(e) => status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()).map(|b| b.boxed_unsync()),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind((host, 0)).await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    /// Writes (creates, patches, deletes) of an object's main resource, by plural and name.
    pub fn writes(&self, plural: &str, namespace: &str, name: &str) -> u64 {
        self.count(|s| &s.writes, plural, namespace, name)
    }

    /// Writes of an object's status subresource.
    pub fn status_writes(&self, plural: &str, namespace: &str, name: &str) -> u64 {
        self.count(|s| &s.status_writes, plural, namespace, name)
    }

    fn count(&self, table: impl Fn(&State) -> &BTreeMap<Key, u64>, plural: &str, ns: &str, name: &str) -> u64 {
        let state = self.state.lock().unwrap();
        table(&state).iter().filter(|(k, _)| k.1 == ns && k.2 == plural && k.3 == name).map(|(_, n)| *n).sum()
    }

    fn handle(&self, method: Method, uri: http::Uri, headers: &http::HeaderMap, body: &Bytes) -> Response<Full<Bytes>> {
        let Some((target, collection)) = parse_path(uri.path()) else {
            return status(StatusCode::NOT_FOUND, "NotFound", &format!("no route {}", uri.path()));
        };
        if let Err(message) = self.state.lock().unwrap().served(&target.key, collection) {
            return status(StatusCode::NOT_FOUND, "NotFound", &message);
        }
        let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
        let mut state = self.state.lock().unwrap();
        let user = headers.get(USER_HEADER).and_then(|v| v.to_str().ok());
        let exists = state.objects.contains_key(&target.key);
        let verbs = Self::verbs(
            &method,
            collection,
            uri.query().unwrap_or_default(),
            exists,
            content_type.contains("apply-patch"),
        );
        if let Err(message) = Self::authorize(&mut state, user, &verbs, &target) {
            return status(StatusCode::FORBIDDEN, "Forbidden", &message);
        }
        if target.sub == Subresource::Eviction {
            if method != Method::POST {
                return status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "evictions are created");
            }
            let answer = match state.evict(&target.key) {
                Ok(_) => Response::builder()
                    .status(StatusCode::CREATED)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}).to_string(),
                    )))
                    .expect("response"),
                Err((code, reason, message)) => status(code, reason, &message),
            };
            self.changed.notify_waiters();
            return answer;
        }
        let strict = query_param(uri.query().unwrap_or_default(), "fieldValidation").as_deref() == Some("Strict");
        if collection {
            return match method {
                Method::GET => {
                    let (gv, ns, plural, _) = &target.key;
                    let selector = match Selector::of(uri.query().unwrap_or_default(), &target.key.2) {
                        Ok(selector) => selector,
                        Err(message) => return status(StatusCode::BAD_REQUEST, "BadRequest", &message),
                    };
                    let items: Vec<Value> = state
                        .objects
                        .iter()
                        .filter(|(k, _)| &k.0 == gv && &k.2 == plural && (ns.is_empty() || &k.1 == ns))
                        .filter(|(_, v)| selector.matches(v))
                        .map(|(_, v)| v.clone())
                        .collect();
                    let version = state.next_version.to_string();
                    if let Some(resource) = table_of(&state, headers, &target.key) {
                        return ok(discovery::table(&resource, &items, &version, k8s_openapi::jiff::Timestamp::now()));
                    }
                    // `<Kind>List`, as the API server names a collection (client-go decodes by it).
                    let kind =
                        state.resource(gv, plural).map(|r| format!("{}List", r.kind)).unwrap_or_else(|| "List".into());
                    ok(
                        json!({"apiVersion": gv, "kind": kind, "metadata": {"resourceVersion": version}, "items": items}),
                    )
                }
                Method::POST => {
                    // Create: the name comes from the body; an existing object is a conflict.
                    let Ok(mut object) = parse_body(body) else {
                        return status(StatusCode::BAD_REQUEST, "BadRequest", "body is not JSON or YAML");
                    };
                    // generateName: the prefix and five characters of the API server's choosing.
                    if object["metadata"]["name"].as_str().unwrap_or_default().is_empty() {
                        if let Some(mut prefix) = object["metadata"]["generateName"].as_str().map(str::to_owned) {
                            // As the API server: the prefix cut so that the name fits 63.
                            while prefix.len() > 58 {
                                prefix.pop();
                            }
                            let suffix: String = format!("{:05x}", (state.next_uid * 2_654_435_761) % 0xfffff);
                            object["metadata"]["name"] = json!(format!("{prefix}{suffix}"));
                        }
                    }
                    let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                    let (gv, ns, plural, _) = target.key.clone();
                    if let Err(message) = validate(&gv, &plural, &object) {
                        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &message);
                    }
                    if let Err(message) = state.structural(&gv, &plural, &mut object, strict) {
                        return status(StatusCode::BAD_REQUEST, "BadRequest", &message);
                    }
                    if let Err(message) = validate_custom(&state, &gv, &plural, &object, None) {
                        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &message);
                    }
                    if plural == "customresourcedefinitions" {
                        state.install_crd(&mut object);
                    }
                    let key = (gv, ns.clone(), plural, name);
                    if state.objects.contains_key(&key) {
                        return status(
                            StatusCode::CONFLICT,
                            "AlreadyExists",
                            &format!("{} \"{}\" already exists", key.2, key.3),
                        );
                    }
                    state.next_uid += 1;
                    state.next_version += 1;
                    object["metadata"]["uid"] = json!(format!("00000000-0000-0000-0000-{:012}", state.next_uid));
                    object["metadata"]["resourceVersion"] = json!(state.next_version.to_string());
                    object["metadata"]["generation"] = json!(1);
                    object["metadata"]["creationTimestamp"] = json!(now());
                    if !ns.is_empty() {
                        object["metadata"]["namespace"] = json!(ns);
                    }
                    if key.2 == "pods" {
                        admission::admit_pod(&mut object);
                    }
                    if key.2 == "secrets" {
                        admission::admit_secret(&mut object);
                        if object["type"].is_null() {
                            object["type"] = json!("Opaque");
                        }
                    }
                    *state.writes.entry(key.clone()).or_default() += 1;
                    state.record(&key, "ADDED", &object);
                    state.objects.insert(key, object.clone());
                    self.changed.notify_waiters();
                    Response::builder()
                        .status(StatusCode::CREATED)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(serde_json::to_vec(&object).expect("JSON"))))
                        .expect("response")
                }
                _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "collection writes are not supported"),
            };
        }
        let parsed: Result<Value, _> = if body.is_empty() { Ok(Value::Null) } else { parse_body(body) };
        let Ok(patch) = parsed else {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "body is not JSON or YAML");
        };
        let key = target.key.clone();
        match method {
            Method::GET => match state.objects.get(&key) {
                Some(object) => match table_of(&state, headers, &key) {
                    Some(resource) => {
                        let version = state.next_version.to_string();
                        let now = k8s_openapi::jiff::Timestamp::now();
                        ok(discovery::table(&resource, std::slice::from_ref(object), &version, now))
                    }
                    None => ok(object.clone()),
                },
                None => not_found(&key),
            },
            Method::DELETE => {
                // Grace period 0 (query or DeleteOptions): a force delete, or the kubelet
                // confirming that a Terminating Pod's containers are gone.
                let grace = query_param(uri.query().unwrap_or_default(), "gracePeriodSeconds")
                    .and_then(|g| g.parse::<u64>().ok())
                    .or(patch["gracePeriodSeconds"].as_u64());
                // Preconditions: the object deleted must be the one meant (not one re-created
                // under its name meanwhile).
                if let Some(uid) = patch["preconditions"]["uid"].as_str() {
                    let stored = state.objects.get(&key).and_then(|o| o["metadata"]["uid"].as_str().map(str::to_owned));
                    if stored.as_deref().is_some_and(|stored| stored != uid) {
                        let message = format!(
                            "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                            stored.unwrap_or_default()
                        );
                        return status(StatusCode::CONFLICT, "Conflict", &message);
                    }
                }
                let answer = match state.delete(&key, grace) {
                    Some(object) => ok(object),
                    None => not_found(&key),
                };
                self.changed.notify_waiters();
                answer
            }
            Method::PATCH | Method::PUT => {
                let apply = content_type.contains("apply-patch");
                let existing = state.objects.get(&key).cloned();
                // Optimistic concurrency: a replace naming an old resourceVersion conflicts.
                if method == Method::PUT {
                    let expected = patch["metadata"]["resourceVersion"].as_str();
                    let stored = existing.as_ref().and_then(|o| o["metadata"]["resourceVersion"].as_str());
                    if expected.is_some() && expected != stored {
                        return status(StatusCode::CONFLICT, "Conflict", "the object has been modified");
                    }
                }
                let created = existing.is_none();
                let mut object = match (existing, target.sub == Subresource::Status, apply) {
                    (Some(object), _, _) => object,
                    (None, false, _) if method == Method::PUT || apply => {
                        state.next_uid += 1;
                        let mut fresh = json!({"metadata": {
                            "name": key.3,
                            "uid": format!("00000000-0000-0000-0000-{:012}", state.next_uid),
                            "creationTimestamp": now(),
                            "generation": 0,
                        }});
                        if !key.1.is_empty() {
                            fresh["metadata"]["namespace"] = json!(key.1);
                        }
                        fresh
                    }
                    _ => return not_found(&key),
                };
                let before = object.clone();
                // A patch naming a uid is for that object only (a kubelet's status patch).
                if let (Some(meant), Some(stored)) =
                    (patch["metadata"]["uid"].as_str(), before["metadata"]["uid"].as_str())
                {
                    if meant != stored && !created {
                        return status(
                            StatusCode::CONFLICT,
                            "Conflict",
                            &format!("Precondition failed: UID in precondition: {meant}, UID in object meta: {stored}"),
                        );
                    }
                }
                if target.sub == Subresource::Status {
                    let new_status = patch.get("status").cloned().unwrap_or(Value::Null);
                    if apply || method == Method::PUT {
                        object["status"] = new_status;
                    } else {
                        json_patch::merge(&mut object["status"], &new_status);
                    }
                } else {
                    let mut patch = patch.clone();
                    if let Some(map) = patch.as_object_mut() {
                        map.remove("status");
                    }
                    if content_type.contains("json-patch") {
                        // As the API server does: testing a missing field against null passes.
                        let mut raw_ops = patch.as_array().cloned().unwrap_or_default();
                        raw_ops.retain(|op| {
                            !(op["op"] == "test" && op["value"].is_null() && {
                                let path = op["path"].as_str().unwrap_or_default();
                                object.pointer(path).is_none()
                            })
                        });
                        let ops: json_patch::Patch = match serde_json::from_value(Value::Array(raw_ops)) {
                            Ok(ops) => ops,
                            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
                        };
                        if let Err(e) = json_patch::patch(&mut object, &ops) {
                            return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &e.to_string());
                        }
                    } else if method == Method::PUT {
                        let metadata = object["metadata"].clone();
                        let status = object.get("status").cloned();
                        object = patch;
                        object["metadata"] = metadata;
                        if let Some(status) = status {
                            object["status"] = status;
                        }
                    } else if apply {
                        let query = uri.query().unwrap_or_default();
                        let manager = query_param(query, "fieldManager").unwrap_or_else(|| "unknown".into());
                        let force = query_param(query, "force").as_deref() == Some("true");
                        let owners = state.owners.entry(key.clone()).or_default();
                        if let Err(message) = ssa::apply(&mut object, &patch, &manager, force, owners) {
                            return status(StatusCode::CONFLICT, "Conflict", &message);
                        }
                    } else {
                        json_patch::merge(&mut object, &patch);
                    }
                }
                if created && key.2 == "pods" {
                    admission::admit_pod(&mut object);
                }
                if key.2 == "secrets" {
                    admission::admit_secret(&mut object);
                    // A Secret's type defaults to Opaque and never changes; an immutable one's
                    // data neither.
                    if object["type"].is_null() {
                        object["type"] = json!("Opaque");
                    }
                    if !created && object["type"] != before["type"] {
                        return status(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Invalid",
                            "type: Invalid value: field is immutable",
                        );
                    }
                    if !created
                        && before["immutable"] == true
                        && (object["data"] != before["data"] || object["immutable"] != true)
                    {
                        return status(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Invalid",
                            "data: Forbidden: field is immutable when `immutable` is set",
                        );
                    }
                }
                if let Err(message) = state.structural(&key.0, &key.2, &mut object, strict) {
                    return status(StatusCode::BAD_REQUEST, "BadRequest", &message);
                }
                if key.2 == "customresourcedefinitions" && target.sub != Subresource::Status {
                    state.install_crd(&mut object);
                }
                if let Err(message) = validate(&key.0, &key.2, &object) {
                    return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &message);
                }
                // A status write is checked against the schema too (its CEL rules are the
                // spec's, which a status write does not change).
                let old = (!created && target.sub != Subresource::Status).then_some(&before);
                if let Err(message) = validate_custom(&state, &key.0, &key.2, &object, old) {
                    return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &message);
                }
                if object == before {
                    return ok(object);
                }
                // The last finalizer removed from an object marked for deletion: it goes.
                let finalizers_done = object["metadata"]["finalizers"].as_array().is_none_or(|f| f.is_empty());
                if !object["metadata"]["deletionTimestamp"].is_null() && finalizers_done {
                    state.objects.remove(&key);
                    state.next_version += 1;
                    state.record(&key, "DELETED", &object);
                    *state.writes.entry(key).or_default() += 1;
                    if let Some(uid) = object["metadata"]["uid"].as_str() {
                        state.collect_garbage(uid);
                    }
                    self.changed.notify_waiters();
                    return ok(object);
                }
                let spec_changed = {
                    let strip = |v: &Value| {
                        let mut v = v.clone();
                        if let Some(m) = v.as_object_mut() {
                            m.remove("metadata");
                            m.remove("status");
                        }
                        v
                    };
                    strip(&object) != strip(&before)
                };
                if spec_changed || before.get("metadata").and_then(|m| m.get("resourceVersion")).is_none() {
                    let generation = object["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
                    object["metadata"]["generation"] = json!(generation);
                }
                state.next_version += 1;
                object["metadata"]["resourceVersion"] = json!(state.next_version.to_string());
                let table =
                    if target.sub == Subresource::Status { &mut state.status_writes } else { &mut state.writes };
                *table.entry(key.clone()).or_default() += 1;
                state.record(&key, if created { "ADDED" } else { "MODIFIED" }, &object);
                state.objects.insert(key, object.clone());
                self.changed.notify_waiters();
                ok(object)
            }
            _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "unsupported method"),
        }
    }
}

/// What the API server validates that Cairn could get wrong: an Event's note is at most 1 kB; a
/// Service's name is a DNS-1035 label; a Pod's hostname and subdomain are DNS labels; label
/// values are at most 63 characters of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
fn validate(group_version: &str, plural: &str, object: &Value) -> Result<(), String> {
    if group_version == "events.k8s.io/v1" && plural == "events" {
        let note = object["note"].as_str().unwrap_or_default();
        if note.len() > 1024 {
            return Err(format!("note: Too long: may not be more than 1024 bytes (got {})", note.len()));
        }
    }
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    // Object names are DNS subdomains; RBAC objects' are path segments (`system:…` allowed).
    if group_version.starts_with("rbac.authorization.k8s.io/") {
        if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('%') {
            return Err(format!(
                "metadata.name: Invalid value: \"{name}\": may not be '.' or '..' and may not contain '/' or '%'"
            ));
        }
    } else if !is_dns_subdomain(name) {
        return Err(format!("metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"));
    }
    if plural == "customresourcedefinitions" {
        let wanted = format!(
            "{}.{}",
            object["spec"]["names"]["plural"].as_str().unwrap_or_default(),
            object["spec"]["group"].as_str().unwrap_or_default()
        );
        if name != wanted {
            return Err(format!(
                "metadata.name: Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group ({wanted})"
            ));
        }
    }
    if plural == "namespaces" && !is_dns_label(name) {
        return Err(format!("metadata.name: Invalid value: \"{name}\": a namespace name must be a DNS label"));
    }
    if plural == "services" && !(is_dns_label(name) && name.starts_with(|c: char| c.is_ascii_lowercase())) {
        return Err(format!("metadata.name: Invalid value: \"{name}\": a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character"));
    }
    if plural == "secrets" {
        // Secret data keys, and what the typed Secrets must hold (the API server's validation).
        for key in object["data"].as_object().into_iter().flatten().map(|(k, _)| k) {
            let ok = !key.is_empty()
                && key.len() <= 253
                && key != "."
                && key != ".."
                && !key.starts_with("..")
                && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok {
                return Err(format!("data[{key}]: Invalid value: \"{key}\": a valid config key must consist of alphanumeric characters, '-', '_' or '.'"));
            }
        }
        let required: &[&str] = match object["type"].as_str() {
            Some("kubernetes.io/tls") => &["tls.crt", "tls.key"],
            Some("kubernetes.io/basic-auth") => &[],
            Some("kubernetes.io/ssh-auth") => &["ssh-privatekey"],
            Some("kubernetes.io/dockerconfigjson") => &[".dockerconfigjson"],
            _ => &[],
        };
        for key in required {
            if object["data"][key].is_null() {
                return Err(format!("data[{key}]: Required value"));
            }
        }
    }
    if plural == "pods" {
        for field in ["hostname", "subdomain"] {
            if let Some(value) = object["spec"][field].as_str() {
                if !is_dns_label(value) {
                    return Err(format!("spec.{field}: Invalid value: \"{value}\": must be a DNS label"));
                }
            }
        }
    }
    if let Some(labels) = object["metadata"]["labels"].as_object() {
        for (key, value) in labels {
            let value = value.as_str().unwrap_or_default();
            let ok = value.len() <= 63
                && value.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                && (value.is_empty()
                    || (value.starts_with(|c: char| c.is_ascii_alphanumeric())
                        && value.ends_with(|c: char| c.is_ascii_alphanumeric())));
            if !ok {
                return Err(format!("metadata.labels: Invalid value: \"{value}\" (label {key}): must be at most 63 characters, alphanumeric, '-', '_' or '.', starting and ending alphanumeric"));
            }
        }
    }
    Ok(())
}

/// A registered custom resource's schema on `object`: its OpenAPI value checks, then its CEL
/// rules (with `old`, for transition rules), as the API server runs them on create and update.
fn validate_custom(state: &State, gv: &str, plural: &str, object: &Value, old: Option<&Value>) -> Result<(), String> {
    let Some(schema) = state.schemas.get(&(gv.to_owned(), plural.to_owned())) else { return Ok(()) };
    let errors = discovery::validate_values(schema, object);
    if !errors.is_empty() {
        let kind = object["kind"].as_str().unwrap_or_default();
        let group = gv.split('/').next().unwrap_or_default();
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let listed = if errors.len() == 1 { errors[0].clone() } else { format!("[{}]", errors.join(", ")) };
        return Err(format!("{kind}.{group} {name:?} is invalid: {listed}"));
    }
    kube::core::cel::Validator::new().validate(schema, object, old).map_err(|e| e.to_string())
}

/// An RFC 1123 subdomain as the API server checks it: at most 253 characters of lower-case
/// letters, digits, '-' and '.', each dot-separated part alphanumeric at both ends (the parts
/// have no length limit of their own there).
fn is_dns_subdomain(s: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !p.starts_with('-')
            && !p.ends_with('-')
    };
    !s.is_empty() && s.len() <= 253 && s.split('.').all(part_ok)
}

/// An RFC 1123 label: at most 63 lower-case letters, digits and `-`, alphanumeric at both ends.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A request body: JSON, or YAML (an apply patch may be either).
fn parse_body(body: &Bytes) -> Result<Value, ()> {
    serde_json::from_slice(body).or_else(|_| serde_yaml::from_slice(body)).map_err(|_| ())
}

/// The resource to print as a Table, when the request asks for one (`kubectl get`).
fn table_of(state: &State, headers: &http::HeaderMap, key: &Key) -> Option<discovery::Resource> {
    let accept = headers.get("accept").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !discovery::wants_table(accept) {
        return None;
    }
    state.resource(&key.0, &key.2)
}

/// A query parameter, decoded (`a%3Db` → `a=b`).
fn query_param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// What a list or watch selects: `labelSelector` terms (`a=b`, `a==b`, `a!=b`, `a`, `!a`) and
/// `fieldSelector` terms (`=`, `==`, `!=`) on `metadata.name` and `metadata.namespace`, and for
/// Pods `spec.nodeName`, `status.phase` and `status.podIP` (what `kubectl drain` and `delete
/// --wait` use). Set-based label terms (`in`, `notin`) are refused (400), not misread.
#[derive(Clone, Default)]
struct Selector {
    /// (label, wanted value or none for existence, whether the term is negated).
    labels: Vec<(String, Option<String>, bool)>,
    /// (JSON pointer of the field, value, whether negated).
    fields: Vec<(String, String, bool)>,
}

impl Selector {
    fn of(query: &str, plural: &str) -> Result<Self, String> {
        let terms = |name: &str| {
            query_param(query, name)
                .map(|v| v.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        // `key!=v`, `key==v`, `key=v`: (key, value, negated).
        let split = |term: &str| -> Option<(String, String, bool)> {
            if let Some((k, v)) = term.split_once("!=") {
                return Some((k.trim().to_owned(), v.trim().to_owned(), true));
            }
            let (k, v) = term.split_once('=')?;
            Some((k.trim().to_owned(), v.trim_start_matches('=').trim().to_owned(), false))
        };
        let mut labels = Vec::new();
        for term in terms("labelSelector") {
            if term.contains(" in ") || term.contains(" notin ") || term.contains('(') {
                return Err(format!("set-based label selector {term:?} is not supported by this test API"));
            }
            labels.push(match split(&term) {
                Some((k, v, negated)) => (k, Some(v), negated),
                None => match term.strip_prefix('!') {
                    Some(k) => (k.trim().to_owned(), None, true),
                    None => (term, None, false),
                },
            });
        }
        let mut fields = Vec::new();
        for term in terms("fieldSelector") {
            let Some((field, value, negated)) = split(&term) else {
                return Err(format!("invalid field selector {term:?}"));
            };
            let pointer = match (field.as_str(), plural) {
                ("metadata.name", _) => "/metadata/name",
                ("metadata.namespace", _) => "/metadata/namespace",
                ("spec.nodeName", "pods") => "/spec/nodeName",
                ("status.phase", "pods") => "/status/phase",
                ("status.podIP", "pods") => "/status/podIP",
                _ => return Err(format!("field label not supported: {field}")),
            };
            fields.push((pointer.to_owned(), value, negated));
        }
        Ok(Self { labels, fields })
    }

    fn matches(&self, object: &Value) -> bool {
        self.labels.iter().all(|(label, want, negated)| {
            let have = object["metadata"]["labels"][label].as_str();
            let holds = match want {
                Some(want) => have == Some(want.as_str()),
                None => have.is_some(),
            };
            // `a!=b` also selects objects without `a`, as Kubernetes does.
            holds != *negated
        }) && self.fields.iter().all(|(pointer, want, negated)| {
            let have = object.pointer(pointer).and_then(Value::as_str).unwrap_or_default();
            (have == want) != *negated
        })
    }
}

/// Whether a Pod's `Ready` condition is `True`.
fn pod_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// Now, as the API server writes times (RFC 3339, seconds).
fn now() -> String {
    timestamp(k8s_openapi::jiff::Timestamp::now())
}

/// A time as the API server writes it (RFC 3339, seconds).
fn timestamp(t: k8s_openapi::jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// `/api/v1/namespaces/{ns}/pods/{name}[:port]/proxy[/{path}]`: the Pod, its port if given, and
/// the path to forward.
/// A TLS client that does not check the server's certificate: kube-apiserver's proxy to a Pod
/// and the kubelet's HTTPS probes do not either.
pub(crate) fn unchecked_tls_client() -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    #[derive(Debug)]
    struct Unchecked(std::sync::Arc<rustls::crypto::CryptoProvider>);
    impl ServerCertVerifier for Unchecked {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(Unchecked(provider)))
        .with_no_client_auth();
    std::sync::Arc::new(config)
}

/// `pods/[scheme:]name[:port]/proxy/...`: the target, whether HTTPS, the port and the path.
fn parse_pod_proxy(path: &str) -> Option<(Target, bool, Option<u16>, String)> {
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(8, '/').collect();
    let ["api", "v1", "namespaces", ns, "pods", pod, "proxy", ref rest @ ..] = parts[..] else { return None };
    let (https, pod) = match pod.split_once(':') {
        Some(("https", rest)) => (true, rest),
        Some(("http", rest)) => (false, rest),
        _ => (false, pod),
    };
    let (name, port) = match pod.split_once(':') {
        Some((name, port)) => (name, Some(port.parse().ok()?)),
        None => (pod, None),
    };
    let key = ("v1".to_owned(), ns.to_owned(), "pods".to_owned(), name.to_owned());
    let path = format!("/{}", rest.first().copied().unwrap_or_default());
    Some((Target { key, sub: Subresource::Proxy }, https, port, path))
}

/// `/api/v1/...` or `/apis/{group}/{version}/...`, then `[namespaces/{ns}/]{plural}[/{name}[/status]]`.
/// Returns the target and whether it is a collection.
fn parse_path(path: &str) -> Option<(Target, bool)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match *parts.first()? {
        "api" => (parts.get(1)?.to_string(), &parts[2..]),
        "apis" => (format!("{}/{}", parts.get(1)?, parts.get(2)?), &parts[3..]),
        _ => return None,
    };
    let (ns, rest) = match rest {
        // `namespaces/{name}/status` is a Namespace's own status, not a collection in it.
        ["namespaces", _, "status"] => (String::new(), rest),
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (ns.to_string(), rest),
        _ => (String::new(), rest),
    };
    match rest {
        [plural] => Some((Target { key: (gv, ns, plural.to_string(), String::new()), sub: Subresource::None }, true)),
        [plural, name] => {
            Some((Target { key: (gv, ns, plural.to_string(), name.to_string()), sub: Subresource::None }, false))
        }
        [plural, name, "status"] => {
            Some((Target { key: (gv, ns, plural.to_string(), name.to_string()), sub: Subresource::Status }, false))
        }
        ["pods", name, "eviction"] => {
            Some((Target { key: (gv, ns, "pods".into(), name.to_string()), sub: Subresource::Eviction }, false))
        }
        _ => None,
    }
}

fn ok(object: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(&object).expect("JSON"))))
        .expect("response")
}

fn not_found(key: &Key) -> Response<Full<Bytes>> {
    status(StatusCode::NOT_FOUND, "NotFound", &format!("{} \"{}\" not found", key.2, key.3))
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                      "reason": reason, "code": code.as_u16()});
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(&body).expect("JSON"))))
        .expect("response")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
    use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};

    fn config_map(data: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": data}})
    }

    #[test]
    fn apply_get_list_delete_with_versions_and_generations() {
        let rt = tokio_runtime();
        rt.block_on(async {
            let api = MemoryApi::new();
            let maps: Api<ConfigMap> = Api::namespaced(api.client(), "ns1");
            let apply = PatchParams::apply("test");
            assert!(maps.get_opt("c").await.unwrap().is_none());
            let created = maps.patch("c", &apply, &Patch::Apply(config_map("1"))).await.unwrap();
            assert_eq!(created.metadata.generation, Some(1));
            assert_eq!(created.metadata.namespace.as_deref(), Some("ns1"));
            let same = maps.patch("c", &apply, &Patch::Apply(config_map("1"))).await.unwrap();
            assert_eq!(same.metadata.resource_version, created.metadata.resource_version, "no-op apply");
            assert_eq!(api.writes("configmaps", "ns1", "c"), 1);
            let changed = maps.patch("c", &apply, &Patch::Apply(config_map("2"))).await.unwrap();
            assert_eq!(changed.metadata.generation, Some(2));
            assert_eq!(maps.get("c").await.unwrap().data.unwrap()["k"], "2");
            assert_eq!(maps.list(&ListParams::default()).await.unwrap().items.len(), 1);
            let other: Api<ConfigMap> = Api::namespaced(api.client(), "ns2");
            assert!(other.list(&ListParams::default()).await.unwrap().items.is_empty());
            maps.delete("c", &DeleteParams::default()).await.unwrap();
            assert!(maps.get_opt("c").await.unwrap().is_none());
            // Cluster-scoped objects live without a namespace.
            let namespaces: Api<Namespace> = Api::all(api.client());
            let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}});
            namespaces.patch("x", &apply, &Patch::Apply(ns)).await.unwrap();
            assert!(namespaces.get("x").await.unwrap().metadata.namespace.is_none());
            // Status of a missing object: 404, as a real API server answers.
            let status = json!({"apiVersion": "v1", "kind": "Namespace", "status": {"phase": "Active"}});
            assert!(namespaces.patch_status("y", &apply, &Patch::Apply(status.clone())).await.is_err());
            let with_status = namespaces.patch_status("x", &apply, &Patch::Apply(status)).await.unwrap();
            assert_eq!(with_status.status.unwrap().phase.as_deref(), Some("Active"));
            assert_eq!(with_status.metadata.generation, Some(1), "status writes keep the generation");
            assert_eq!(api.status_writes("namespaces", "", "x"), 1);
        });
    }

    #[test]
    fn typed_secrets_must_hold_their_keys_and_keys_must_be_valid() {
        let rt = tokio_runtime();
        rt.block_on(async {
            let api = MemoryApi::new();
            let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(api.client(), "ns1");
            let apply = PatchParams::apply("test");
            let secret = |kind: &str, data: Value| {
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "type": kind, "data": data})
            };
            let half = secret("kubernetes.io/tls", json!({"tls.crt": "eA=="}));
            let err = secrets.patch("s", &apply, &Patch::Apply(half)).await.unwrap_err().to_string();
            assert!(err.contains("data[tls.key]: Required value"), "{err}");
            let bad_key = secret("Opaque", json!({"a/b": "eA=="}));
            let err = secrets.patch("s", &apply, &Patch::Apply(bad_key)).await.unwrap_err().to_string();
            assert!(err.contains("config key"), "{err}");
            let whole = secret("kubernetes.io/tls", json!({"tls.crt": "eA==", "tls.key": "eA==", "ca.crt": "eA=="}));
            secrets.patch("s", &apply, &Patch::Apply(whole)).await.unwrap();
            let retyped = secret("Opaque", json!({"tls.crt": "eA==", "tls.key": "eA=="}));
            let err = secrets.patch("s", &apply, &Patch::Apply(retyped)).await.unwrap_err().to_string();
            assert!(err.contains("immutable"), "{err}");
            let untyped = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "u"}, "data": {"a": "eA=="}});
            let made = secrets.patch("u", &apply, &Patch::Apply(untyped)).await.unwrap();
            assert_eq!(made.type_.as_deref(), Some("Opaque"));
        });
    }

    /// kube-rs's watcher (which asks for bookmarks) reads this API's bookmarks as a real API
    /// server's: no error across a quiet spell, and a change after it is delivered.
    #[test]
    fn watchers_take_bookmarks_and_miss_nothing() {
        use futures::StreamExt;
        use kube::runtime::watcher;
        let rt = tokio_runtime();
        rt.block_on(async {
            let api = MemoryApi::new();
            let maps: Api<ConfigMap> = Api::namespaced(api.client(), "ns1");
            let apply = PatchParams::apply("test");
            maps.patch("c", &apply, &Patch::Apply(config_map("1"))).await.unwrap();
            let mut events = watcher(maps.clone(), watcher::Config::default()).boxed();
            let quiet_until = tokio::time::Instant::now() + BOOKMARK_INTERVAL + std::time::Duration::from_secs(2);
            let mut seen = Vec::new();
            while let Ok(Some(event)) = tokio::time::timeout_at(quiet_until, events.next()).await {
                seen.push(event.map(|_| ()).map_err(|e| e.to_string()));
            }
            assert!(seen.iter().all(Result::is_ok), "{seen:?}");
            maps.patch("c", &apply, &Patch::Apply(config_map("2"))).await.unwrap();
            let changed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                loop {
                    if let Some(Ok(watcher::Event::Apply(cm))) = events.next().await {
                        return cm.data.unwrap()["k"].clone();
                    }
                }
            });
            assert_eq!(changed.await.unwrap(), "2");
        });
    }

    fn tokio_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }
}
