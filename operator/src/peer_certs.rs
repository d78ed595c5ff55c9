//! The datanodes' mutual TLS on Kubernetes (docs/security.md): the operator is each cluster's CA.
//!
//! - Secret `<cluster>-peer-ca` holds the CA (`ca.crt`, `ca.key`; valid ten years), made once
//!   and read by the operator only.
//! - Secret `<pod>-peer-tls` per datanode holds its certificate (`tls.crt`, `tls.key`, `ca.crt`;
//!   valid 90 days, for the DNS names its peers dial), mounted into that datanode's Pod only.
//!   It is issued anew in the last third of its life, or at once when its names or its CA are
//!   not the cluster's.
//!
//! The kubelet updates a mounted Secret in place and a datanode rereads its certificate every 2 s
//! (datanode/src/tls.rs): a renewal restarts nothing. Both Secrets are owned by the StoreCluster
//! and go with it; the operator reads and writes them by name (it never lists Secrets).

use std::collections::BTreeMap;

use cairn_cluster::peer_tls::{renewal_reason, PeerCa};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};

use crate::desired::Machine;
use crate::kubernetes::{dns_label, labels, pod_name, FIELD_MANAGER};
use crate::platform::PlatformError;
use cairn_resources::StoreCluster;

/// How long a datanode's certificate is valid; it is renewed with a third of that left.
pub const NODE_CERTIFICATE_DAYS: i64 = 90;
/// Where a datanode Pod has its Secret mounted.
pub const MOUNT_PATH: &str = "/etc/cairn/peer-tls";

pub fn ca_secret_name(cluster: &str) -> String {
    dns_label(&format!("{cluster}-peer-ca"))
}

pub fn node_secret_name(cluster: &str, machine: &str) -> String {
    dns_label(&format!("{}-peer-tls", pod_name(cluster, machine)))
}

/// The names a datanode's certificate is for: the host its peers dial (the address it
/// advertises, `<pod>.<cluster>-nodes.<namespace>.svc`) and its fully qualified form.
/// When the operator issues the blob API's certificates (`spec.tls` without a Secret), the
/// same certificate serves it: it names the Service too, and `spec.tls.extraNames`.
pub fn node_hosts(sc: &StoreCluster, machine: &Machine) -> Vec<String> {
    let host = machine.address.rsplit_once(':').map_or(machine.address.as_str(), |(h, _)| h);
    let mut hosts = vec![host.to_owned(), format!("{host}.cluster.local")];
    if let Some(tls) = sc.spec.tls.as_ref().filter(|t| t.secret_name.is_none()) {
        let service = service_host(sc);
        hosts.extend([format!("{service}.cluster.local"), service]);
        hosts.extend(tls.extra_names.iter().cloned());
    }
    hosts
}

/// Makes the CA if there is none, and a certificate for every machine in `machines` that has
/// none or must have a new one. What was written, said for an Event.
pub async fn ensure(
    client: &kube::Client,
    sc: &StoreCluster,
    machines: &[Machine],
) -> Result<Vec<String>, PlatformError> {
    let namespace = sc.namespace().unwrap_or_default();
    let cluster = sc.name_any();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let (ca, made) = cluster_ca(client, sc, Some(machines)).await?;
    let mut changes: Vec<String> = made.into_iter().collect();
    let now = time::OffsetDateTime::now_utc();
    for machine in machines {
        let name = node_secret_name(&cluster, &machine.name);
        let hosts = node_hosts(sc, machine);
        let found = secrets.get_opt(&name).await?;
        if let Some(found) = &found {
            owned(sc, found)?;
        }
        let have = |key: &str| found.as_ref().and_then(|s| field(s, key));
        let (ca_pem, cert_pem) = (have("ca.crt"), have("tls.crt"));
        let reason = match (have("tls.key"), &cert_pem) {
            (None, _) => Some("no key yet".to_owned()),
            (Some(key), Some(cert)) if !cairn_cluster::peer_tls::key_matches(cert, &key) => {
                Some("its key is not its certificate's".to_owned())
            }
            (Some(_), _) => renewal_reason(&ca, ca_pem.as_deref(), cert_pem.as_deref(), &hosts, now),
        };
        let Some(reason) = reason else { continue };
        let issued = ca
            .issue(&machine.name, &hosts, NODE_CERTIFICATE_DAYS)
            .map_err(|e| PlatformError::Invalid(format!("issuing {}'s certificate: {e}", machine.name)))?;
        let data = [("tls.crt", issued.cert_pem.as_str()), ("tls.key", &issued.key_pem), ("ca.crt", ca.cert_pem())];
        let body = secret(sc, &name, "kubernetes.io/tls", "peer-tls", &data);
        match found {
            None => drop(secrets.create(&PostParams::default(), &body).await?),
            Some(_) => {
                drop(secrets.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await?)
            }
        }
        changes.push(format!("issued {}'s peer certificate ({reason})", machine.name));
    }
    Ok(changes)
}

/// The cluster's CA, made (and said so) when there is none and `machines` are given — unless a
/// datanode certificate of one of them exists: then the CA was lost (deleted by hand), and a new
/// one made silently would have peers refuse each other; the pass fails saying what to do.
/// `None`: only read (a StoreAccessKey's pass).
pub async fn cluster_ca(
    client: &kube::Client,
    sc: &StoreCluster,
    machines: Option<&[Machine]>,
) -> Result<(PeerCa, Option<String>), PlatformError> {
    let namespace = sc.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let ca_name = ca_secret_name(&sc.name_any());
    match secrets.get_opt(&ca_name).await? {
        Some(found) => {
            owned(sc, &found)?;
            let (Some(cert), Some(key)) = (field(&found, "ca.crt"), field(&found, "ca.key")) else {
                return Err(PlatformError::Invalid(format!(
                    "Secret {namespace}/{ca_name} holds no ca.crt and ca.key: delete it to have a new CA made \
                     (every datanode's certificate is then issued anew)"
                )));
            };
            let ca = PeerCa::from_pem(&cert, &key).map_err(|e| {
                PlatformError::Invalid(format!("Secret {namespace}/{ca_name}: {e}: delete it to have a new CA made"))
            })?;
            Ok((ca, None))
        }
        None => {
            let Some(machines) = machines else {
                return Err(PlatformError::NotReady(format!(
                    "Secret {namespace}/{ca_name}: the cluster's CA is not made yet"
                )));
            };
            for machine in machines {
                let node = node_secret_name(&sc.name_any(), &machine.name);
                if secrets.get_opt(&node).await?.is_some_and(|s| owned(sc, &s).is_ok()) {
                    return Err(PlatformError::Invalid(format!(
                        "Secret {namespace}/{ca_name} (the cluster's CA) is gone while datanode certificates from it \
                         remain ({node}): restore it from a backup, or delete the peer-tls Secrets too to start a new \
                         CA (docs/security.md, \"Replacing the CA\")"
                    )));
                }
            }
            let ca =
                PeerCa::generate(&sc.name_any()).map_err(|e| PlatformError::Invalid(format!("making the CA: {e}")))?;
            let data = [("ca.crt", ca.cert_pem()), ("ca.key", ca.key_pem())];
            secrets.create(&PostParams::default(), &secret(sc, &ca_name, "Opaque", "peer-ca", &data)).await?;
            Ok((ca, Some(format!("made the cluster's CA (Secret {ca_name})"))))
        }
    }
}

/// How the blob API's certificates are checked (`spec.tls`): against the CA in the Secret the
/// spec names (its `ca.crt`, else the chain in `tls.crt`), or the cluster's own CA; for the name
/// `<cluster>.<namespace>.svc`, which the certificates must carry.
pub async fn blob_tls(
    client: &kube::Client,
    sc: &StoreCluster,
    machines: Option<&[Machine]>,
) -> Result<Option<cairn_cluster::BlobTls>, PlatformError> {
    let Some(tls) = &sc.spec.tls else { return Ok(None) };
    let namespace = sc.namespace().unwrap_or_default();
    let ca_pem = match &tls.secret_name {
        Some(name) => {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
            let found = secrets
                .get_opt(name)
                .await?
                .ok_or_else(|| PlatformError::Invalid(format!("TLS Secret {namespace}/{name} not found")))?;
            if field(&found, "tls.key").is_none() {
                return Err(PlatformError::Invalid(format!("TLS Secret {namespace}/{name} has no tls.key")));
            }
            let cert = field(&found, "tls.crt")
                .ok_or_else(|| PlatformError::Invalid(format!("TLS Secret {namespace}/{name} has no tls.crt")))?;
            // The name every caller checks: said here, not as datanodes that "do not answer".
            let names = cairn_cluster::peer_tls::certificate_names(&cert)
                .map_err(|e| PlatformError::Invalid(format!("TLS Secret {namespace}/{name}: tls.crt: {e}")))?;
            let service = service_host(sc);
            if !names.iter().any(|n| {
                n.eq_ignore_ascii_case(&service) || n.eq_ignore_ascii_case(&format!("{service}.cluster.local"))
            }) {
                return Err(PlatformError::Invalid(format!(
                    "TLS Secret {namespace}/{name}: its certificate names {names:?}, not {service}, which clients and the operator check"
                )));
            }
            field(&found, "ca.crt").filter(|c| !c.trim().is_empty()).unwrap_or(cert)
        }
        None => cluster_ca(client, sc, machines).await?.0.cert_pem().to_owned(),
    };
    Ok(Some(cairn_cluster::BlobTls { ca_pem, server_name: service_host(sc) }))
}

/// The cluster's Service, as clients in the cluster name it.
pub fn service_host(sc: &StoreCluster) -> String {
    format!("{}.{}.svc", sc.name_any(), sc.namespace().unwrap_or_default())
}

/// A Secret of the cluster's, owned by it (so it goes with it).
fn secret(sc: &StoreCluster, name: &str, kind: &str, component: &str, data: &[(&str, &str)]) -> Secret {
    let mut labels = labels(&sc.name_any());
    labels.insert("app.kubernetes.io/component".into(), component.into());
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: sc.namespace(),
            labels: Some(labels),
            owner_references: Some(vec![sc.controller_owner_ref(&()).expect("a StoreCluster from the API has a uid")]),
            ..ObjectMeta::default()
        },
        type_: Some(kind.into()),
        data: Some(
            data.iter().map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec()))).collect::<BTreeMap<_, _>>(),
        ),
        ..Secret::default()
    }
}

/// A Secret under one of the cluster's names that it does not own is someone else's: never used,
/// changed or replaced.
fn owned(sc: &StoreCluster, secret: &Secret) -> Result<(), PlatformError> {
    let uid = sc.uid().unwrap_or_default();
    if secret.owner_references().iter().any(|o| o.uid == uid) {
        return Ok(());
    }
    Err(PlatformError::Invalid(format!(
        "Secret {}/{} exists and is not this StoreCluster's: the operator neither uses nor replaces it",
        secret.namespace().unwrap_or_default(),
        secret.name_any()
    )))
}

fn field(secret: &Secret, key: &str) -> Option<String> {
    secret.data.as_ref()?.get(key).and_then(|v| String::from_utf8(v.0.clone()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels_and_hosts_are_what_peers_dial() {
        let long = "m".repeat(70);
        assert!(node_secret_name("c1", &long).len() <= 63);
        assert_ne!(node_secret_name("c1", &long), node_secret_name("c1", &format!("{long}x")));
        assert_eq!(ca_secret_name("c1"), "c1-peer-ca");
        let machine = Machine {
            name: "m1".into(),
            zone: "z".into(),
            disks: Vec::new(),
            address: "c1-m1.c1-nodes.store.svc:7480".into(),
            selected: true,
            down: None,
        };
        let sc = |tls: serde_json::Value| -> StoreCluster {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "cairn.dev/v1alpha1", "kind": "StoreCluster",
                "metadata": {"name": "c1", "namespace": "store", "uid": "u1"},
                "spec": {"image": "cairn:1", "volumeSize": "1Gi", "segmentSize": "64Mi", "replicationFactor": 3,
                         "writeQuorum": 2, "etcd": {"endpoints": ["http://etcd:2379"]}, "tls": tls}}))
            .unwrap()
        };
        let own = ["c1-m1.c1-nodes.store.svc", "c1-m1.c1-nodes.store.svc.cluster.local"];
        assert_eq!(node_hosts(&sc(serde_json::Value::Null), &machine), own);
        // A Secret of the user's serves the blob API: the node's certificate stays its own.
        assert_eq!(node_hosts(&sc(serde_json::json!({"secretName": "mine"})), &machine), own);
        // The operator's certificate serves the blob API too: the Service and the extra names.
        let issued = node_hosts(&sc(serde_json::json!({"extraNames": ["blobs.example.com"]})), &machine);
        assert_eq!(issued[2..], ["c1.store.svc.cluster.local", "c1.store.svc", "blobs.example.com"]);
    }
}
