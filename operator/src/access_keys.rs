//! The StoreAccessKey controller: a key in the cluster's etcd, its token in a Secret beside the
//! StoreAccessKey (docs/security.md, "On Kubernetes").
//!
//! The Secret is where the secret lives: it is written first, and the etcd record is made from
//! it (its SHA-256), so a pass interrupted between the two finishes on the next. A missing Secret
//! means a new key (and the old one revoked): deleting the Secret rotates the key. The operator
//! never lists or watches Secrets (it has no such right); it reads the one Secret it names, on
//! every change of the StoreAccessKey or its cluster and every minute.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use cairn_cluster::access::{self, AccessKey, Scope, Secret};
use cairn_resources::{StoreAccessKey, StoreAccessKeyStatus, StoreCluster};
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::{Resource, ResourceExt};

use crate::kubernetes::{KubernetesPlatform, API_PORT, FIELD_MANAGER, S3_PORT};
use crate::reconcile::{Context, Error};

/// Kept on a StoreAccessKey until its key is revoked in etcd.
pub const KEY_FINALIZER: &str = "cairn.dev/revoke-key";
/// The Secret's keys.
pub const SECRET_KEY_ID: &str = "CAIRN_KEY_ID";
pub const SECRET_KEY_SECRET: &str = "CAIRN_KEY_SECRET";
pub const SECRET_TOKEN: &str = "CAIRN_TOKEN";
pub const SECRET_ENDPOINT: &str = "CAIRN_ENDPOINT";
/// The CA that vouches for the endpoint's certificate (PEM), when the cluster serves HTTPS.
pub const SECRET_CA: &str = "CAIRN_CA_CERT";
/// For S3 clients, when the cluster serves S3 (the names the AWS SDKs and CLI read from their
/// environment): the key id and its S3 secret, the endpoint and the region.
pub const SECRET_AWS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
pub const SECRET_AWS_SECRET: &str = "AWS_SECRET_ACCESS_KEY";
pub const SECRET_AWS_ENDPOINT: &str = "AWS_ENDPOINT_URL_S3";
pub const SECRET_AWS_REGION: &str = "AWS_REGION";
/// The region again, by the name botocore (boto3, the AWS CLI) reads.
pub const SECRET_AWS_DEFAULT_REGION: &str = "AWS_DEFAULT_REGION";
/// A deleted Secret (a rotation) is noticed within this, or at once on a change to the key.
const RESYNC: Duration = Duration::from_secs(60);

/// Why a key is not ready: the condition's reason and message.
type NotReady = (&'static str, String);

#[tracing::instrument(skip_all, fields(key = %key.name_any(), namespace = %key.namespace().unwrap_or_default()))]
pub async fn reconcile_key(key: Arc<StoreAccessKey>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<StoreAccessKey> = Api::namespaced(ctx.client.clone(), &key.namespace().unwrap_or_default());
    finalizer(&api, KEY_FINALIZER, key, |event| async {
        match event {
            // Boxed: a pass's future is large, too large for a test thread's stack in a debug build.
            Finalizer::Apply(key) => Box::pin(apply(&key, &ctx)).await,
            Finalizer::Cleanup(key) => Box::pin(revoke(&key, &ctx)).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(e.to_string()))
}

/// The controller, while the operator leads: a pass on each change of a StoreAccessKey or of the
/// StoreCluster it names, and every [`RESYNC`].
pub async fn run_key_controller(client: kube::Client, ctx: Arc<Context>) {
    use futures::StreamExt;
    use kube::runtime::reflector::ObjectRef;
    use kube::runtime::{watcher, Controller};
    let controller = Controller::new(Api::<StoreAccessKey>::all(client.clone()), watcher::Config::default());
    let keys = controller.store();
    let naming = move |sc: StoreCluster| -> Vec<ObjectRef<StoreAccessKey>> {
        let (name, namespace) = (sc.name_any(), sc.namespace().unwrap_or_default());
        keys.state()
            .iter()
            .filter(|k| {
                k.spec.cluster.name == name && k.spec.cluster_namespace(&k.namespace().unwrap_or_default()) == namespace
            })
            .map(|k| ObjectRef::from_obj(&**k))
            .collect()
    };
    controller
        .watches(Api::<StoreCluster>::all(client), watcher::Config::default(), naming)
        .run(
            reconcile_key,
            |_, error, _| {
                tracing::warn!(%error, "StoreAccessKey reconcile failed");
                Action::requeue(Duration::from_secs(15))
            },
            ctx,
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::warn!(error = %e, "StoreAccessKey reconcile error");
            }
        })
        .await
}

async fn apply(key: &StoreAccessKey, ctx: &Context) -> Result<Action, kube::Error> {
    let old = key.status.clone().unwrap_or_default();
    let outcome = ensure(key, ctx, old.key_id.as_deref()).await?;
    let generation = key.metadata.generation;
    let previous = &old.conditions;
    let (ready, key_id) = match &outcome {
        Ok(id) => {
            let message = format!("key {id} is in the cluster's etcd, its token in the Secret");
            (cairn_resources::condition(previous, "Ready", true, "KeyReady", message, generation), Some(id.clone()))
        }
        Err((reason, message)) => {
            tracing::warn!(reason, %message, "access key not ready");
            (
                cairn_resources::condition(previous, "Ready", false, reason, message.clone(), generation),
                old.key_id.clone(),
            )
        }
    };
    let new = StoreAccessKeyStatus {
        conditions: vec![ready],
        observed_generation: generation,
        key_id,
        secret_name: Some(secret_name(key)),
    };
    if new != old {
        let api: Api<StoreAccessKey> = Api::namespaced(ctx.client.clone(), &key.namespace().unwrap_or_default());
        let patch = serde_json::json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "StoreAccessKey", "status": new});
        api.patch_status(&key.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
        ctx.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(Action::requeue(if outcome.is_ok() { RESYNC } else { Duration::from_secs(15) }))
}

fn secret_name(key: &StoreAccessKey) -> String {
    key.spec.secret_name.clone().unwrap_or_else(|| key.name_any())
}

/// What `cairn keys list` shows for the key: the resource it comes from.
pub fn record_name(namespace: &str, name: &str) -> String {
    format!("StoreAccessKey {namespace}/{name}").chars().take(access::MAX_NAME_LEN).collect()
}

/// The StoreCluster the key names (`Err` when there is none), and why the key may not open it,
/// if it may not.
async fn cluster_of(
    key: &StoreAccessKey,
    ctx: &Context,
) -> Result<Result<(StoreCluster, Option<NotReady>), NotReady>, kube::Error> {
    let own = key.namespace().unwrap_or_default();
    let namespace = key.spec.cluster_namespace(&own);
    let name = &key.spec.cluster.name;
    let Some(sc) = Api::<StoreCluster>::namespaced(ctx.client.clone(), namespace).get_opt(name).await? else {
        return Ok(Err(("ClusterNotFound", format!("no StoreCluster {namespace}/{name}"))));
    };
    let refusal = if namespace == own {
        None
    } else if !sc.spec.access_key_namespaces.contains(&own) {
        Some((
            "NamespaceNotAllowed",
            format!("StoreCluster {namespace}/{name} does not list namespace {own} in spec.accessKeyNamespaces"),
        ))
    } else if key.spec.scopes.contains(&Scope::Admin) {
        Some((
            "AdminNotAllowed",
            format!("an admin key to StoreCluster {namespace}/{name} is made in namespace {namespace} only"),
        ))
    } else {
        None
    };
    Ok(Ok((sc, refusal)))
}

/// Whether the Secret is this key's (it owns it).
fn made_by(secret: &KubeSecret, key: &StoreAccessKey) -> bool {
    let uid = key.metadata.uid.as_deref().unwrap_or_default();
    secret.owner_references().iter().any(|o| o.uid == uid)
}

/// One of the Secret's values, as text.
fn field(secret: &KubeSecret, name: &str) -> Option<String> {
    secret.data.as_ref()?.get(name).and_then(|v| String::from_utf8(v.0.clone()).ok())
}

/// The ids this key may have made: its status's and its own Secret's.
async fn own_ids(key: &StoreAccessKey, ctx: &Context) -> Result<BTreeSet<String>, kube::Error> {
    let mut ids: BTreeSet<String> = key.status.as_ref().and_then(|s| s.key_id.clone()).into_iter().collect();
    let secrets: Api<KubeSecret> = Api::namespaced(ctx.client.clone(), &key.namespace().unwrap_or_default());
    if let Some(id) =
        secrets.get_opt(&secret_name(key)).await?.filter(|s| made_by(s, key)).and_then(|s| field(&s, SECRET_KEY_ID))
    {
        ids.insert(id);
    }
    Ok(ids)
}

/// Revokes those of `ids` whose etcd record is this key's (its name says so): an id written into
/// the Secret by hand never takes another key down with it.
async fn revoke_own(
    key: &StoreAccessKey,
    store: &cairn_cluster::etcd::ClusterStore,
    ids: &BTreeSet<String>,
    ctx: &Context,
) -> Result<(), cairn_cluster::etcd::StoreError> {
    let name = record_name(&key.namespace().unwrap_or_default(), &key.name_any());
    for id in ids {
        if store.get_key(id).await?.is_some_and(|k| k.name == name) && store.delete_key(id).await? {
            ctx.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(key = %id, "access key revoked");
        }
    }
    Ok(())
}

/// The etcd client of a StoreCluster.
async fn store_of(sc: &StoreCluster, ctx: &Context) -> Result<cairn_cluster::etcd::ClusterStore, String> {
    let namespace = sc.namespace().unwrap_or_default();
    let platform = KubernetesPlatform { client: ctx.client.clone(), cluster: sc, caches: Some(&ctx.caches) };
    crate::platform::cluster_store(&platform, &sc.spec, &namespace, &sc.name_any()).await
}

/// Makes the world match the key: Secret, then etcd record, then the previous key revoked.
/// Kubernetes errors fail the pass; what the user must fix is a condition.
async fn ensure(
    key: &StoreAccessKey,
    ctx: &Context,
    previous_id: Option<&str>,
) -> Result<Result<String, NotReady>, kube::Error> {
    let sc = match cluster_of(key, ctx).await? {
        Ok((sc, None)) => sc,
        Ok((sc, Some(refusal))) => return refuse(key, &sc, ctx, refusal).await,
        Err(not_ready) => return Ok(Err(not_ready)),
    };
    let own = key.namespace().unwrap_or_default();
    let scopes: BTreeSet<Scope> = key.spec.scopes.iter().copied().collect();
    let reach: Option<BTreeSet<u32>> = key.spec.partitions.as_ref().map(|p| p.iter().copied().collect());
    let grants: Option<access::BucketGrants> = key.spec.buckets.as_ref().map(|buckets| {
        buckets
            .iter()
            .map(|b| {
                (b.name.clone(), b.scopes.as_ref().map_or_else(|| scopes.clone(), |s| s.iter().copied().collect()))
            })
            .collect()
    });
    // A spec the key cannot have is refused before anything is made; the key it had goes (a
    // spec meant to narrow it must not leave it wider).
    let limited = |key: AccessKey| key.limited_to(reach.clone()).and_then(|k| k.limited_to_buckets(grants.clone()));
    if let Err(e) = AccessKey::generate("check", scopes.clone(), 0).and_then(|(k, _)| limited(k)) {
        return refuse(key, &sc, ctx, ("InvalidSpec", e.to_string())).await;
    }
    let (id, secret) = match credentials(key, ctx, &sc).await? {
        Ok(credentials) => credentials,
        Err(not_ready) => return Ok(Err(not_ready)),
    };
    let store = match store_of(&sc, ctx).await {
        Ok(store) => store,
        Err(message) => return Ok(Err(("EtcdUnreachable", message))),
    };
    let etcd = |e: cairn_cluster::etcd::StoreError| Ok(Err(("EtcdUnreachable", e.to_string())));
    let existing = match store.get_key(&id).await {
        Ok(existing) => existing,
        Err(e) => return etcd(e),
    };
    let name = record_name(&own, &key.name_any());
    if let Some(other) = existing.as_ref().filter(|e| e.name != name) {
        return Ok(Err((
            "KeyConflict",
            format!("key {id} in etcd is {:?}'s, not this key's: delete the Secret to have a new key made", other.name),
        )));
    }
    let mut desired = match AccessKey::from_parts(&id, secret.expose(), &name, scopes).and_then(limited) {
        Ok(desired) => desired,
        Err(e) => return Ok(Err(("InvalidSpec", e.to_string()))),
    };
    desired.created_ms = existing.as_ref().map(|e| e.created_ms).unwrap_or_else(now_ms);
    if existing.as_ref() != Some(&desired) {
        if let Err(e) = store.put_key(&desired).await {
            return etcd(e);
        }
        ctx.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(key = %id, "access key written to etcd");
    }
    if let Some(old) = previous_id.filter(|old| *old != id) {
        // The Secret was replaced: the key it held goes (if it is this key's).
        if let Err(e) = revoke_own(key, &store, &[old.to_owned()].into(), ctx).await {
            return etcd(e);
        }
    }
    Ok(Ok(id))
}

/// A key that may not be (no longer allowed, or a spec it cannot have): the keys it made are
/// revoked, not only the condition set.
async fn refuse(
    key: &StoreAccessKey,
    sc: &StoreCluster,
    ctx: &Context,
    refusal: NotReady,
) -> Result<Result<String, NotReady>, kube::Error> {
    let store = match store_of(sc, ctx).await {
        Ok(store) => store,
        Err(message) => return Ok(Err(("EtcdUnreachable", message))),
    };
    if let Err(e) = revoke_own(key, &store, &own_ids(key, ctx).await?, ctx).await {
        return Ok(Err(("EtcdUnreachable", e.to_string())));
    }
    Ok(Err(refusal))
}

/// The key's id and secret from its Secret; a new pair (Secret written) when there is none or
/// it does not hold one. A Secret of that name this key did not make is left alone.
async fn credentials(
    key: &StoreAccessKey,
    ctx: &Context,
    sc: &StoreCluster,
) -> Result<Result<(String, Secret), NotReady>, kube::Error> {
    let own = key.namespace().unwrap_or_default();
    let name = secret_name(key);
    let secrets: Api<KubeSecret> = Api::namespaced(ctx.client.clone(), &own);
    let found = secrets.get_opt(&name).await?;
    // Where the application connects, and the CA to trust when the cluster serves HTTPS.
    let endpoint = match crate::peer_certs::blob_tls(&ctx.client, sc, None).await {
        Ok(tls) => {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let host = crate::peer_certs::service_host(sc);
            Endpoint {
                url: format!("{scheme}://{host}:{API_PORT}"),
                ca_pem: tls.map(|t| t.ca_pem),
                // A key limited to partitions cannot sign S3 requests (docs/security.md).
                s3: sc.spec.s3.as_ref().filter(|_| key.spec.partitions.is_none()).map(|s3| S3Endpoint {
                    url: format!("{scheme}://{host}:{S3_PORT}"),
                    region: s3.region.clone().unwrap_or_else(|| DEFAULT_S3_REGION.to_owned()),
                }),
            }
        }
        Err(e) => return Ok(Err(("TlsUnavailable", e.to_string()))),
    };
    if let Some(found) = &found {
        if !made_by(found, key) {
            return Ok(Err((
                "SecretConflict",
                format!("Secret {own}/{name} exists and was not made for this key: name another in spec.secretName"),
            )));
        }
        if let (Some(id), Some(secret)) = (field(found, SECRET_KEY_ID), field(found, SECRET_KEY_SECRET)) {
            if access::parse_token(&format!("{id}.{secret}")).is_ok() {
                let secret = Secret::new(secret);
                // The cluster turned HTTPS or S3 on or off, or its CA changed: the same key, told
                // anew.
                let told = endpoint.fields(&id, &secret);
                if told.iter().any(|(k, v)| field(found, k) != *v) {
                    // A merge patch of `data`: a field no longer wanted goes (null), which an
                    // apply of `stringData` could not say.
                    use base64::Engine;
                    let b64 = |v: &String| base64::engine::general_purpose::STANDARD.encode(v);
                    let data: serde_json::Map<String, serde_json::Value> =
                        told.iter().map(|(k, v)| (k.to_string(), v.as_ref().map(b64).into())).collect();
                    let patch = serde_json::json!({ "data": data });
                    secrets.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
                    ctx.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                return Ok(Ok((id, secret)));
            }
        }
        tracing::warn!(secret = %name, "the key's Secret holds no key: a new key is made");
    }
    let (id, secret) = access::new_credentials();
    let body = secret_object(key, &name, &id, &secret, &endpoint);
    match found {
        None => {
            secrets.create(&PostParams::default(), &body).await?;
        }
        Some(_) => {
            secrets.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await?;
        }
    }
    ctx.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(key = %id, secret = %name, "access key made");
    Ok(Ok((id, secret)))
}

/// Where an application reaches the cluster: the Service's URL, the CA to trust for HTTPS, and
/// S3's endpoint when the cluster serves S3 (and the key may sign for it).
struct Endpoint {
    url: String,
    ca_pem: Option<String>,
    s3: Option<S3Endpoint>,
}

struct S3Endpoint {
    url: String,
    region: String,
}

/// The datanode's own default (`--s3-region`).
const DEFAULT_S3_REGION: &str = "us-east-1";

impl Endpoint {
    /// The Secret's fields that follow the cluster rather than the key (`None`: absent), for key
    /// `id` with `secret`.
    fn fields(&self, id: &str, secret: &Secret) -> BTreeMap<&'static str, Option<String>> {
        let s3 = self.s3.as_ref();
        // The S3 secret is derived from the key's (`access::s3_secret`), as every datanode derives it.
        let s3_secret = s3.and_then(|_| AccessKey::from_parts(id, secret.expose(), "s3", BTreeSet::new()).ok());
        BTreeMap::from([
            (SECRET_ENDPOINT, Some(self.url.clone())),
            (SECRET_CA, self.ca_pem.clone()),
            (SECRET_AWS_KEY_ID, s3.map(|_| id.to_owned())),
            (SECRET_AWS_SECRET, s3_secret.map(|k| access::s3_secret(&k).expose().to_owned())),
            (SECRET_AWS_ENDPOINT, s3.map(|s3| s3.url.clone())),
            (SECRET_AWS_REGION, s3.map(|s3| s3.region.clone())),
            (SECRET_AWS_DEFAULT_REGION, s3.map(|s3| s3.region.clone())),
        ])
    }
}

/// The Secret an application mounts or takes its environment from; owned by the key, so it goes
/// with it.
fn secret_object(key: &StoreAccessKey, name: &str, id: &str, secret: &Secret, endpoint: &Endpoint) -> KubeSecret {
    let mut data = BTreeMap::from([
        (SECRET_KEY_ID.to_owned(), id.to_owned()),
        (SECRET_KEY_SECRET.to_owned(), secret.expose().to_owned()),
        (SECRET_TOKEN.to_owned(), access::token(id, secret)),
    ]);
    data.extend(endpoint.fields(id, secret).into_iter().filter_map(|(k, v)| Some((k.to_owned(), v?))));
    let labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "cairn".to_owned()),
        ("app.kubernetes.io/managed-by".to_owned(), FIELD_MANAGER.to_owned()),
        ("app.kubernetes.io/component".to_owned(), "access-key".to_owned()),
    ]);
    KubeSecret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: key.namespace(),
            labels: Some(labels),
            owner_references: Some(vec![key
                .controller_owner_ref(&())
                .expect("a StoreAccessKey from the API has a uid")]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        string_data: Some(data),
        ..Default::default()
    }
}

/// Deletion: the key (and a newer one its Secret may hold) revoked in etcd, whether or not it is
/// still allowed; the Secret goes with its owner. A cluster that is gone has nothing to revoke.
async fn revoke(key: &StoreAccessKey, ctx: &Context) -> Result<Action, kube::Error> {
    let sc = match cluster_of(key, ctx).await? {
        Ok((sc, _)) => sc,
        Err((reason, message)) => {
            tracing::info!(reason, %message, "nothing to revoke");
            return Ok(Action::await_change());
        }
    };
    let store = store_of(&sc, ctx).await.map_err(|e| kube::Error::Service(Box::from(e)))?;
    revoke_own(key, &store, &own_ids(key, ctx).await?, ctx).await.map_err(|e| kube::Error::Service(Box::new(e)))?;
    Ok(Action::await_change())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_names_fit_a_key_record() {
        assert_eq!(record_name("apps", "uploader"), "StoreAccessKey apps/uploader");
        let long = record_name(&"n".repeat(63), &"k".repeat(253));
        assert_eq!(long.chars().count(), access::MAX_NAME_LEN);
    }
}
