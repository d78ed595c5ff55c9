//! On a cluster, every node serves S3, and a write is served by the *coordinator* of the name it
//! writes: the first live replica (in the topology's order) of the name's partition. The node a
//! client reached passes the request on, as it came (signature, body streamed), to the
//! coordinator's replica routes (`/replica/v1/s3/...`, node token or mutual TLS), which serves it
//! with its own name locks — so that conditional writes, multipart completions and aborts of one
//! key are decided in one place, as on a standalone node. Reads are served where they land (at
//! read quorum). A coordinator that stops is replaced when its lease ends (docs/s3.md).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, request::Parts, Method, StatusCode};

use crate::api::blobs::HOP_BY_HOP;
use axum::response::Response;

use super::error::S3Error;
use super::{buckets, model, S3State, Target};

/// Where a forwarded request arrives on the coordinator (a replica route).
pub const PREFIX: &str = "/replica/v1/s3";
/// The `Host` the client sent (it is signed, and may name the bucket).
pub const HOST_HEADER: &str = "x-cairn-s3-host";
/// The path and query the client sent, byte for byte (they are signed): in a header, since a URL
/// library would normalize them (`a/../b`, escapes) on the way.
pub const URI_HEADER: &str = "x-cairn-s3-uri";

/// Marks a request this node is the coordinator for (it came forwarded): never passed on again.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded;

/// The node that must serve this request, when it is another: a write of an object (or of a
/// bucket) on a cluster. `None`: serve it here.
pub async fn coordinator_of(state: &Arc<S3State>, target: &Target, method: &Method) -> Result<Option<String>, S3Error> {
    let Some(cluster) = state.front.cluster() else { return Ok(None) };
    let partition = match target {
        _ if method == Method::GET || method == Method::HEAD => return Ok(None),
        Target::Object { bucket, key } => model::partition_of(&buckets::find(state, bucket).await?.partitions, key),
        Target::Bucket(_) if method == Method::PUT || method == Method::DELETE => {
            buckets::bucket_partition(state).await?
        }
        _ => return Ok(None),
    };
    Ok(coordinator_of_partition(cluster, partition))
}

/// The coordinator of `partition`'s names when it is another node than this one.
fn coordinator_of_partition(cluster: &crate::cluster::Cluster, partition: u32) -> Option<String> {
    let snapshot = cluster.snapshot();
    let spec = snapshot.topology.partitions.get(&partition)?;
    let coordinator = spec.replicas.iter().map(|r| r.node.as_str()).find(|node| snapshot.live.contains_key(*node));
    coordinator.filter(|node| *node != cluster.node_id()).map(str::to_string)
}

/// The answer when `node`, a coordinator, cannot take what is passed on to it.
fn unreachable(node: &str, why: String) -> S3Error {
    S3Error::service_unavailable(format!("{node}, which coordinates writes of this name, cannot be reached: {why}"))
}

/// The base URL of `node`'s replica routes.
fn peer_base(cluster: &crate::cluster::Cluster, node: &str) -> Result<String, S3Error> {
    cluster.peer_base_of(&cluster.snapshot(), node).ok_or_else(|| unreachable(node, "no address".into()))
}

/// Where a key of DeleteObjects is deleted on its coordinator (a replica route).
pub const DELETE_KEY_ROUTE: &str = "/replica/v1/s3-delete-key";

/// One key of a DeleteObjects (already authorized where it arrived), deleted at the key's
/// coordinator, under the key's lock there — as a DeleteObject would be.
pub async fn delete_key(
    state: &Arc<S3State>,
    bucket: &model::BucketRecord,
    bucket_name: &str,
    key: &str,
) -> Result<(), S3Error> {
    let coordinator = state
        .front
        .cluster()
        .and_then(|cluster| coordinator_of_partition(cluster, model::partition_of(&bucket.partitions, key)));
    let Some(node) = coordinator else {
        return super::objects::delete_key(state, bucket, bucket_name, key).await;
    };
    let cluster = state.front.cluster().expect("a coordinator is a cluster's");
    let unreachable = |why: String| unreachable(&node, why);
    let base = peer_base(cluster, &node)?;
    let body = cairn_cluster::replica::S3DeleteKey {
        version: cairn_cluster::replica::WIRE_VERSION,
        bucket: bucket_name.to_string(),
        key: key.to_string(),
    };
    let response = crate::cluster::router::with_request_id(cluster.http.post(format!("{base}{DELETE_KEY_ROUTE}")))
        .json(&body)
        .timeout(cluster.options.peer_timeout * 10)
        .send()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    match response.status() {
        status if status.is_success() => Ok(()),
        status => {
            let text = response.text().await.unwrap_or_default();
            Err(unreachable(format!("it answered {status}: {}", text.chars().take(300).collect::<String>())))
        }
    }
}

/// The coordinator's side of [`delete_key`].
pub async fn handle_delete_key(
    axum::extract::State(state): axum::extract::State<Arc<S3State>>,
    body: Body,
) -> Response {
    use axum::response::IntoResponse;
    let deleted = async {
        let body = axum::body::to_bytes(body, 64 << 10).await.map_err(|e| S3Error::invalid_argument(e.to_string()))?;
        let asked: cairn_cluster::replica::S3DeleteKey =
            serde_json::from_slice(&body).map_err(|e| S3Error::invalid_argument(e.to_string()))?;
        cairn_cluster::replica::check_version(asked.version).map_err(|e| S3Error::invalid_argument(e.to_string()))?;
        let bucket = buckets::find(&state, &asked.bucket).await?;
        super::objects::delete_key(&state, &bucket, &asked.bucket, &asked.key).await
    }
    .await;
    match deleted {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

/// Passes the request on to `node` and its answer back, both streamed.
pub async fn forward(state: &Arc<S3State>, node: &str, parts: Parts, body: Body) -> Result<Response, S3Error> {
    let cluster = state.front.cluster().expect("only a cluster forwards");
    let unreachable = |why: String| unreachable(node, why);
    let base = peer_base(cluster, node)?;
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request =
        crate::cluster::router::with_request_id(cluster.http.request(parts.method.clone(), format!("{base}{PREFIX}")))
            .header(URI_HEADER, path_and_query);
    for (name, value) in &parts.headers {
        // A client's own `x-cairn-*` (the node token's header among them) and request id would
        // stand before ours, or replace them: never passed on.
        if !HOP_BY_HOP.contains(name) && !name.as_str().starts_with("x-cairn-") && name != crate::request::HEADER {
            request = request.header(name, value);
        }
    }
    if let Some(host) = parts.headers.get(header::HOST) {
        request = request.header(HOST_HEADER, host);
    }
    let response = request
        .body(reqwest::Body::wrap_stream(body.into_data_stream()))
        .send()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    // Every answer of an S3 front says so (`Server: Cairn`); any other came from a node that
    // does not serve S3 (a cluster serves S3 on every node or on none).
    if response.headers().get(header::SERVER).is_none_or(|v| v != "Cairn") {
        return Err(unreachable(format!("it answered {} without serving S3 (--s3-listen)", response.status())));
    }
    Ok(crate::api::blobs::relay(response))
}
