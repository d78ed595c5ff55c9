//! The Kubernetes platform: machines from Nodes and StoreNodes; one datanode Pod per chosen
//! machine (pinned to it, named after it), Services, a ConfigMap and a PodDisruptionBudget, all
//! owned by the StoreCluster and applied with one field manager only when they differ.

use std::collections::BTreeMap;
use std::time::Duration;

use std::sync::Arc;

use cairn_common::agent_api::DiskReport;
use cairn_resources::{StoreCluster, StoreNode};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{reflector::reflector, watcher, WatchStreamExt};
use kube::{Resource, ResourceExt};
use serde_json::{json, Value};

use crate::desired::Machine;
use crate::platform::{Applied, PlatformError};

pub const FIELD_MANAGER: &str = "cairn-operator";
pub const API_PORT: u16 = 7480;
/// The datanodes' replica port (`--peer-listen`): for the cluster's datanodes only.
pub const PEER_PORT: u16 = 7481;
/// The datanodes' S3 port, when the StoreCluster has `spec.s3` (`--s3-listen`).
pub const S3_PORT: u16 = 7680;
/// The uid and gid a cluster's datanodes run as: one of their own per cluster (from a hash of its
/// namespace and name, in 100000..2^31), so that on a machine shared by clusters one cluster's
/// datanode cannot open another's volume files (the disk agent hands each volume to its caller's
/// uid, mode 0700). Not root, and not the image's default user (65532).
pub fn datanode_uid(namespace: &str, cluster: &str) -> i64 {
    let hash = format!("{namespace}/{cluster}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    100_000 + (hash % (i32::MAX as u64 - 100_000)) as i64
}
/// Where a datanode Pod has the Secret of `spec.tls.secretName` mounted.
const BLOB_TLS_PATH: &str = "/etc/cairn/tls";

/// Label selecting a cluster's objects.
pub fn labels(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "cairn".to_string()),
        ("app.kubernetes.io/instance".to_string(), cluster.to_string()),
        ("app.kubernetes.io/managed-by".to_string(), FIELD_MANAGER.to_string()),
    ])
}

/// The labels of a datanode Pod: the cluster's, and its role. Services and the
/// PodDisruptionBudget select these, so that a purge Pod is never counted or routed to.
pub fn datanode_labels(cluster: &str) -> BTreeMap<String, String> {
    let mut l = labels(cluster);
    l.insert("app.kubernetes.io/component".into(), "datanode".into());
    l
}

pub fn selector(cluster: &str) -> String {
    label_selector(&labels(cluster))
}

/// `k=v,k2=v2`.
fn label_selector(labels: &BTreeMap<String, String>) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// The Node label that decommissions a machine: its replicas move to the others, then its
/// volumes are purged. (A cordon is not a decommission: `kubectl drain` for maintenance cordons
/// a node, and its data must stay.)
pub const DECOMMISSION_LABEL: &str = "cairn.dev/decommission";

/// Whether the StoreCluster's node selector takes `node` (labels only: decommission and
/// readiness are judged by [`machines_of`]).
pub fn selects(sc: &StoreCluster, node_labels: &BTreeMap<String, String>) -> bool {
    sc.spec.node_selector.iter().all(|(k, v)| node_labels.get(k) == Some(v))
}

/// The machines: every Node, with its StoreNode's disks (`disks` by node name), selected when its
/// labels match the node selector and it is neither decommissioned nor away too long.
pub fn machines_of<'a>(
    sc: &StoreCluster,
    nodes: impl IntoIterator<Item = &'a Node>,
    disks: &BTreeMap<String, Vec<DiskReport>>,
) -> Vec<Machine> {
    let namespace = sc.namespace().unwrap_or_default();
    let cluster = sc.name_any();
    let mut out = Vec::new();
    for node in nodes {
        let node_labels = node.labels();
        // A machine leaving the selector (label removed) or labelled for decommission is drained;
        // so is one NotReady for longer than the spec allows (its data is read from the others).
        let down = down_for(node, sc.spec.down_machine_grace());
        let chosen =
            selects(sc, node_labels) && node_labels.get(DECOMMISSION_LABEL).map(String::as_str) != Some("true");
        let selected = chosen && down.is_none();
        let name = node.name_any();
        let machine = Machine {
            zone: node_labels.get(&sc.spec.zone_topology_key).cloned().unwrap_or_default(),
            address: format!("{}.{cluster}-nodes.{namespace}.svc:{API_PORT}", pod_name(&cluster, &name)),
            disks: disks.get(&name).cloned().unwrap_or_default(),
            name,
            selected,
            down,
        };
        out.push((machine, chosen));
    }
    out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    // More than one machine away at once is an outage of the network, a zone or the control
    // plane, not of the machines: moving all their replicas onto the rest would fill it. Only a
    // single machine away is replaced; several are waited for (as Kubernetes' node lifecycle
    // stops evicting in a large disruption).
    let away = out.iter().filter(|(m, _)| m.down.is_some()).count();
    out.into_iter()
        .map(|(mut m, chosen)| {
            if away > 1 && m.down.is_some() {
                m.down = m.down.map(|why| format!("{why}, one of {away} machines away: waited for"));
                m.selected = chosen;
            }
            m
        })
        .collect()
}

/// Each StoreNode's disks, by node name.
fn disks_by_node<'a>(store_nodes: impl IntoIterator<Item = &'a StoreNode>) -> BTreeMap<String, Vec<DiskReport>> {
    store_nodes
        .into_iter()
        .map(|s| (s.name_any(), s.status.as_ref().map(|s| s.disks.clone()).unwrap_or_default()))
        .collect()
}

/// Nodes and StoreNodes as watches keep them (kube-runtime reflectors), for the operator: a pass
/// reads its machines from memory instead of listing Nodes and getting every StoreNode. The
/// watches stop when the last clone is dropped.
#[derive(Clone)]
pub struct MachineCache {
    nodes: Store<Node>,
    store_nodes: Store<StoreNode>,
    _watches: Arc<[AbortOnDrop; 2]>,
}

/// A spawned task, aborted when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl MachineCache {
    /// Starts the two watches on the current tokio runtime.
    pub fn start(client: &kube::Client) -> Self {
        // Kept without what no pass reads (managed fields; a Node's image list), which would
        // otherwise be most of the memory of a large cluster's Nodes.
        fn keep<K>(client: &kube::Client, strip: fn(&mut K)) -> (Store<K>, AbortOnDrop)
        where
            K: Resource<DynamicType = ()>
                + Clone
                + serde::de::DeserializeOwned
                + std::fmt::Debug
                + Send
                + Sync
                + 'static,
        {
            use futures::StreamExt;
            let (store, writer) = reflector::store();
            let events = watcher(Api::<K>::all(client.clone()), watcher::Config::default()).modify(move |object| {
                object.meta_mut().managed_fields = None;
                strip(object);
            });
            let stream = reflector(writer, events).default_backoff().for_each(|_| std::future::ready(()));
            (store, AbortOnDrop(tokio::spawn(stream)))
        }
        let (nodes, a) = keep::<Node>(client, |node| {
            if let Some(status) = node.status.as_mut() {
                status.images = None;
            }
        });
        let (store_nodes, b) = keep::<StoreNode>(client, |_| {});
        Self { nodes, store_nodes, _watches: Arc::new([a, b]) }
    }

    /// The machines of `sc`, once both watches have listed everything.
    async fn machines(&self, sc: &StoreCluster) -> Result<Vec<Machine>, PlatformError> {
        let ready = async {
            self.nodes.wait_until_ready().await?;
            self.store_nodes.wait_until_ready().await
        };
        let not_ready = |why: String| PlatformError::NotReady(format!("the Node and StoreNode watches {why}"));
        tokio::time::timeout(Duration::from_secs(30), ready)
            .await
            .map_err(|_| not_ready("have not listed everything after 30 s".into()))?
            .map_err(|e| not_ready(format!("stopped: {e}")))?;
        let (nodes, store_nodes) = (self.nodes.state(), self.store_nodes.state());
        Ok(machines_of(sc, nodes.iter().map(|n| &**n), &disks_by_node(store_nodes.iter().map(|s| &**s))))
    }

    /// How many Nodes the cache holds.
    pub fn node_count(&self) -> usize {
        self.nodes.state().len()
    }

    /// The labels of the Node `name`, as last seen.
    pub fn node_labels(&self, name: &str) -> Option<BTreeMap<String, String>> {
        self.nodes.get(&ObjectRef::new(name)).map(|n| n.labels().clone())
    }

    /// Waits until the caches hold what `client` lists now (every Node and StoreNode at its
    /// current resourceVersion): for tests, which change Nodes and then run a single pass.
    pub async fn synced_with(&self, client: &kube::Client) {
        let versions = |items: Vec<(String, Option<String>)>| items.into_iter().collect::<BTreeMap<_, _>>();
        for _ in 0..200 {
            let nodes = Api::<Node>::all(client.clone()).list(&ListParams::default()).await.expect("list Nodes");
            let store_nodes =
                Api::<StoreNode>::all(client.clone()).list(&ListParams::default()).await.expect("list StoreNodes");
            let want = (
                versions(nodes.items.iter().map(|n| (n.name_any(), n.resource_version())).collect()),
                versions(store_nodes.items.iter().map(|n| (n.name_any(), n.resource_version())).collect()),
            );
            let have = (
                versions(self.nodes.state().iter().map(|n| (n.name_any(), n.resource_version())).collect()),
                versions(self.store_nodes.state().iter().map(|n| (n.name_any(), n.resource_version())).collect()),
            );
            if want == have {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the machine caches did not catch up with the API in 4 s");
    }
}

/// "NotReady for 42m" when the Node's Ready condition has not been True for longer than `grace`.
fn down_for(node: &Node, grace: Option<Duration>) -> Option<String> {
    let grace = grace?;
    let ready = node.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == "Ready")?;
    if ready.status == "True" {
        return None;
    }
    let since = ready.last_transition_time.as_ref()?.0;
    let away = k8s_openapi::jiff::Timestamp::now().duration_since(since);
    let away = Duration::from_secs(away.as_secs().max(0) as u64);
    (away > grace).then(|| format!("NotReady for {}m", away.as_secs() / 60))
}

/// The name and hostname of the datanode Pod of `node`: a DNS label (a node name may have dots,
/// as on EKS, or be longer than a label may be), so that `<pod>.<cluster>-nodes.<ns>.svc` exists.
pub fn pod_name(cluster: &str, node: &str) -> String {
    dns_label(&format!("{cluster}-{node}"))
}

/// `text` as a DNS label (RFC 1123, at most 63 characters): lower case, anything else than letters,
/// digits and `-` made `-`, and a long one cut with a hash of the whole so that names stay distinct.
pub fn dns_label(text: &str) -> String {
    let clean: String =
        text.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let clean = clean.trim_matches('-').to_owned();
    if clean.len() <= 63 && clean == text {
        return clean;
    }
    // Changed or cut: a hash of the original keeps two names that clean up alike apart.
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("{}-{:08x}", clean[..clean.len().min(54)].trim_end_matches('-'), hash as u32)
}

/// A label value for `text` (at most 63 characters): the text, or a shortened one with its hash.
pub fn label_value(text: &str) -> String {
    if text.len() <= 63 {
        text.to_owned()
    } else {
        dns_label(text)
    }
}

/// The datanodes' NetworkPolicy: the blob port from `spec.networkPolicy.blobClients` (anyone
/// when none are named) and the operator; the replica port from the cluster's datanodes only.
fn network_policy(
    sc: &StoreCluster,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> k8s_openapi::api::networking::v1::NetworkPolicy {
    use k8s_openapi::api::networking::v1::{
        NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let cluster = sc.name_any();
    let port = |port: u16| NetworkPolicyPort {
        port: Some(IntOrString::Int(port as i32)),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    };
    let selector =
        |labels: BTreeMap<String, String>| LabelSelector { match_labels: Some(labels), ..Default::default() };
    let clients = sc.spec.network_policy.as_ref().map(|n| n.blob_clients.clone()).unwrap_or_default();
    let blob_from = if clients.is_empty() {
        None
    } else {
        // The operator's Pods (the chart labels them so), in its own namespace: pinned by the
        // label the API server sets on every namespace, which no one can put on another.
        let operator_namespace = std::env::var("POD_NAMESPACE")
            .ok()
            .map(|ns| selector(BTreeMap::from([("kubernetes.io/metadata.name".to_string(), ns)])));
        let operator = NetworkPolicyPeer {
            namespace_selector: Some(operator_namespace.unwrap_or_default()),
            pod_selector: Some(selector(BTreeMap::from([
                ("app.kubernetes.io/part-of".to_string(), "cairn".to_string()),
                ("app.kubernetes.io/component".to_string(), "operator".to_string()),
            ]))),
            ..NetworkPolicyPeer::default()
        };
        Some([clients, vec![operator]].concat())
    };
    let datanodes = NetworkPolicyPeer { pod_selector: Some(selector(datanode_labels(&cluster))), ..Default::default() };
    NetworkPolicy {
        metadata,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(selector(datanode_labels(&cluster))),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                // S3 is for the blob API's clients.
                NetworkPolicyIngressRule {
                    ports: Some(ports_of(sc).filter(|(name, _)| *name != "peer").map(|(_, p)| port(p)).collect()),
                    from: blob_from,
                },
                NetworkPolicyIngressRule { ports: Some(vec![port(PEER_PORT)]), from: Some(vec![datanodes]) },
            ]),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// A datanode's ports by name: the blob API, the replica port, and S3 when the spec asks for it.
fn ports_of(sc: &StoreCluster) -> impl Iterator<Item = (&'static str, u16)> {
    [("api", API_PORT), ("peer", PEER_PORT)].into_iter().chain(sc.spec.s3.as_ref().map(|_| ("s3", S3_PORT)))
}

/// Annotation of a datanode Pod: the machine it is for, whole (its label may be shortened).
pub const NODE_ANNOTATION: &str = "cairn.dev/node";

/// Every object the cluster needs, as (resource, name, body): typed Kubernetes objects, sent as
/// their JSON (what is applied, and what a datanode Pod's [`SPEC_HASH`] is taken over).
pub fn objects(sc: &StoreCluster, machines: &[Machine]) -> Vec<(ApiResource, String, Value)> {
    use k8s_openapi::api::core::v1::{
        Affinity, Capabilities, ConfigMap, Container, ContainerPort, HTTPGetAction, HostPathVolumeSource, NodeAffinity,
        NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod, PodSpec, Probe, ResourceRequirements,
        SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Toleration, Volume, VolumeMount,
    };
    use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    fn erased<K: Resource<DynamicType = ()> + serde::Serialize>(object: &K) -> (ApiResource, String, Value) {
        let name = object.meta().name.clone().unwrap_or_default();
        (ApiResource::erase::<K>(&()), name, serde_json::to_value(object).expect("JSON"))
    }
    let cluster = sc.name_any();
    let namespace = sc.namespace().unwrap_or_default();
    let owner = sc.controller_owner_ref(&()).expect("a StoreCluster from the API has a uid");
    let meta = |name: &str, extra: &BTreeMap<String, String>| {
        let mut l = labels(&cluster);
        l.extend(extra.clone());
        ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.clone()),
            labels: Some(l),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        }
    };
    let none = BTreeMap::new();
    let uid = datanode_uid(&namespace, &cluster);
    let mut out = Vec::new();
    let config = json!({"etcd": sc.spec.etcd.endpoints, "cluster": cluster, "namespace": namespace});
    out.push(erased(&ConfigMap {
        metadata: meta(&format!("{cluster}-config"), &none),
        data: Some(BTreeMap::from([("cluster.json".to_string(), config.to_string())])),
        ..ConfigMap::default()
    }));
    let api_port = API_PORT as i32;
    let service_port = |name: &str, port: u16| ServicePort {
        name: Some(name.into()),
        port: port as i32,
        target_port: Some(IntOrString::Int(port as i32)),
        ..ServicePort::default()
    };
    let mut ports = vec![service_port("api", API_PORT)];
    if sc.spec.s3.is_some() {
        ports.push(service_port("s3", S3_PORT));
    }
    out.push(erased(&Service {
        metadata: meta(&cluster, &none),
        spec: Some(ServiceSpec {
            selector: Some(datanode_labels(&cluster)),
            ports: Some(ports.clone()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }));
    let peer_port = service_port("peer", PEER_PORT);
    out.push(erased(&Service {
        metadata: meta(&format!("{cluster}-nodes"), &none),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(datanode_labels(&cluster)),
            ports: Some([ports, vec![peer_port]].concat()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }));
    out.push(erased(&network_policy(sc, meta(&cluster, &none))));
    out.push(erased(&PodDisruptionBudget {
        metadata: meta(&cluster, &none),
        // An integer minAvailable: a maxUnavailable on Pods whose owner has no /scale blocks
        // every eviction (node drains and upgrades would hang).
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(machines.len().saturating_sub(1) as i32)),
            selector: Some(LabelSelector { match_labels: Some(datanode_labels(&cluster)), ..LabelSelector::default() }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }));
    // The kubelet probes HTTPS without checking the certificate, as Kubernetes documents.
    let scheme = sc.spec.tls.as_ref().map(|_| "HTTPS".to_string());
    let http_get = |path: &str| {
        Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(api_port),
            scheme: scheme.clone(),
            ..HTTPGetAction::default()
        })
    };
    for machine in machines {
        let name = pod_name(&cluster, &machine.name);
        let node_label = BTreeMap::from([
            ("cairn.dev/node".to_string(), label_value(&machine.name)),
            ("app.kubernetes.io/component".to_string(), "datanode".to_string()),
        ]);
        // The disk agent's socket and every disk's Cairn directory, at the same paths as on the host.
        let host_path = |name: String, path: &str| Volume {
            name,
            host_path: Some(HostPathVolumeSource { path: path.into(), type_: Some("Directory".into()) }),
            ..Volume::default()
        };
        let mut mounts =
            vec![VolumeMount { name: "agent".into(), mount_path: "/run/cairn".into(), ..VolumeMount::default() }];
        let mut volumes = vec![host_path("agent".into(), "/run/cairn")];
        // The disks it may use or already uses: a refused disk has no `cairn/` directory, and
        // a `Directory` hostPath of it would keep the Pod from starting.
        let disks = machine.disks.iter().filter(|d| {
            d.usable
                || d.volumes.iter().any(|v| cairn_cluster::Topology::is_volume_of(&cluster, &machine.name, &v.name))
        });
        for (i, disk) in disks.enumerate() {
            let path = format!("{}/cairn", disk.canonical_mount.trim_end_matches('/'));
            mounts.push(VolumeMount {
                name: format!("disk{i}"),
                mount_path: path.clone(),
                mount_propagation: Some("HostToContainer".into()),
                ..VolumeMount::default()
            });
            // `Directory`: were the disk not mounted (yet), the Pod waits instead of writing into
            // a directory made on the root filesystem.
            volumes.push(host_path(format!("disk{i}"), &path));
        }
        let mut command = cairn_cluster::datanode_command::DatanodeCommand {
            tls: None,
            etcd: sc.spec.etcd.endpoints.clone(),
            cluster: cluster.clone(),
            namespace: namespace.clone(),
            node_id: machine.name.clone(),
            zone: machine.zone.clone(),
            disk_agent: cairn_common::agent_api::NODE_SOCKET.into(),
            listen: format!("0.0.0.0:{API_PORT}"),
            advertise: Some(machine.address.clone()),
            peer_listen: Some(format!("0.0.0.0:{PEER_PORT}")),
            etcd_tls: None,
            peer_tls: None,
            s3_listen: sc.spec.s3.as_ref().map(|_| format!("0.0.0.0:{S3_PORT}")),
            s3_region: sc.spec.s3.as_ref().and_then(|s3| s3.region.clone()),
            s3_domain: sc.spec.s3.as_ref().and_then(|s3| s3.domain.clone()),
            extra: Vec::new(),
        };
        // Its own peer certificate (crate::peer_certs), readable by the datanode's group only.
        mounts.push(VolumeMount {
            name: "peer-tls".into(),
            mount_path: crate::peer_certs::MOUNT_PATH.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "peer-tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(crate::peer_certs::node_secret_name(&cluster, &machine.name)),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        let peer_file = |name: &str| format!("{}/{name}", crate::peer_certs::MOUNT_PATH);
        command.peer_tls = Some(cairn_cluster::datanode_command::TlsFiles {
            ca: peer_file("ca.crt"),
            cert: peer_file("tls.crt"),
            key: peer_file("tls.key"),
        });
        // HTTPS on the blob API: the Secret the spec names, or the node's own certificate (it
        // names the Service too when the operator issues it).
        match sc.spec.tls.as_ref().map(|t| t.secret_name.as_ref()) {
            None => {}
            Some(None) => command.tls = Some((peer_file("tls.crt"), peer_file("tls.key"))),
            Some(Some(secret)) => {
                mounts.push(VolumeMount {
                    name: "blob-tls".into(),
                    mount_path: BLOB_TLS_PATH.into(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                });
                volumes.push(Volume {
                    name: "blob-tls".into(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(secret.clone()),
                        default_mode: Some(0o440),
                        ..SecretVolumeSource::default()
                    }),
                    ..Volume::default()
                });
                command.tls = Some((format!("{BLOB_TLS_PATH}/tls.crt"), format!("{BLOB_TLS_PATH}/tls.key")));
            }
        }
        if let Some(secret) = &sc.spec.etcd.tls_secret {
            mounts.push(VolumeMount {
                name: "etcd-tls".into(),
                mount_path: "/etc/cairn/etcd-tls".into(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
            volumes.push(Volume {
                name: "etcd-tls".into(),
                secret: Some(SecretVolumeSource { secret_name: Some(secret.clone()), ..SecretVolumeSource::default() }),
                ..Volume::default()
            });
            let file = |name: &str| format!("/etc/cairn/etcd-tls/{name}");
            command.etcd_tls = Some(cairn_cluster::datanode_command::TlsFiles {
                ca: file("ca.crt"),
                cert: file("tls.crt"),
                key: file("tls.key"),
            });
        }
        let args = command.to_args();
        let requests = BTreeMap::from([
            ("cpu".to_string(), Quantity("250m".into())),
            ("memory".to_string(), Quantity("512Mi".into())),
        ]);
        let container = Container {
            name: "datanode".into(),
            image: Some(sc.spec.image.clone()),
            args: Some(args),
            ports: Some(
                ports_of(sc)
                    .map(|(name, port)| ContainerPort {
                        name: Some(name.into()),
                        container_port: port as i32,
                        ..ContainerPort::default()
                    })
                    .collect(),
            ),
            readiness_probe: Some(Probe { http_get: http_get("/readyz"), ..Probe::default() }),
            // Opening large volumes (recovery replays their log tails) may take minutes: liveness
            // only counts once the process has answered once.
            startup_probe: Some(Probe {
                http_get: http_get("/healthz"),
                period_seconds: Some(5),
                failure_threshold: Some(120),
                ..Probe::default()
            }),
            // A storage process may pause a few seconds (an fsync, a compaction): not a death.
            liveness_probe: Some(Probe {
                http_get: http_get("/healthz"),
                timeout_seconds: Some(5),
                failure_threshold: Some(6),
                ..Probe::default()
            }),
            volume_mounts: Some(mounts),
            // Not root: the disk agent hands each volume's files to the uid that asks for it.
            security_context: Some(SecurityContext {
                run_as_user: Some(uid),
                run_as_group: Some(uid),
                run_as_non_root: Some(true),
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
                ..SecurityContext::default()
            }),
            resources: Some(
                sc.spec
                    .resources
                    .clone()
                    .unwrap_or(ResourceRequirements { requests: Some(requests), ..ResourceRequirements::default() }),
            ),
            ..Container::default()
        };
        // Pinned to its machine by node affinity (so the scheduler still checks taints and room,
        // which nodeName skips); a datanode never calls the Kubernetes API: no token. Its grace
        // period covers the drain of requests in flight and a final checkpoint.
        let affinity = Affinity {
            node_affinity: Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_fields: Some(vec![NodeSelectorRequirement {
                            key: "metadata.name".into(),
                            operator: "In".into(),
                            values: Some(vec![machine.name.clone()]),
                        }]),
                        ..NodeSelectorTerm::default()
                    }],
                }),
                ..NodeAffinity::default()
            }),
            ..Affinity::default()
        };
        // Like a DaemonSet's Pods: a node NotReady or unreachable does not evict its datanode (the
        // admission default would after 300 s); replacing its replicas is the operator's call
        // (replaceDownMachinesAfter).
        let mut tolerations = sc.spec.tolerations.clone();
        for key in ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"] {
            tolerations.push(Toleration {
                key: Some(key.into()),
                operator: Some("Exists".into()),
                effect: Some("NoExecute".into()),
                ..Toleration::default()
            });
        }
        let mut metadata = meta(&name, &node_label);
        metadata.annotations = Some(BTreeMap::from([(NODE_ANNOTATION.to_string(), machine.name.clone())]));
        let pod = Pod {
            metadata,
            // hostname and subdomain (the headless Service) give the Pod the DNS name it advertises.
            spec: Some(PodSpec {
                affinity: Some(affinity),
                // The container runtime's default seccomp profile (Pod Security "restricted"
                // asks for it; docs/security.md says which level the namespace needs).
                // fsGroup: the Secret volumes' files are the datanode's group's to read.
                security_context: Some(k8s_openapi::api::core::v1::PodSecurityContext {
                    fs_group: Some(uid),
                    ..runtime_default_seccomp()
                }),
                containers: vec![container],
                volumes: Some(volumes),
                restart_policy: Some("Always".into()),
                automount_service_account_token: Some(false),
                termination_grace_period_seconds: Some(60),
                hostname: Some(name.clone()),
                subdomain: Some(format!("{cluster}-nodes")),
                tolerations: Some(tolerations),
                priority_class_name: sc.spec.priority_class_name.clone(),
                ..PodSpec::default()
            }),
            ..Pod::default()
        };
        let (resource, name, mut body) = erased(&pod);
        let hash = spec_hash(&body);
        body["metadata"]["annotations"][SPEC_HASH] = json!(hash);
        out.push((resource, name, body));
    }
    out
}

/// Annotation of a datanode Pod: a hash of the Pod the operator asked for. The API server adds to
/// a Pod (a token volume, default tolerations, defaulted fields, canonical quantities), so what
/// is read back is never what was sent; the hash says whether the Pod is the one wanted now.
pub const SPEC_HASH: &str = "cairn.dev/spec-hash";

/// FNV-1a of the JSON text of `body` (serde_json writes object keys sorted).
pub fn spec_hash(body: &Value) -> String {
    let text = body.to_string();
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("{hash:016x}")
}

/// Whether the object read back is the one wanted: for a Pod, the same [`SPEC_HASH`]; for the
/// others, every field of `want` with the same value in `have` ([`contains`]).
pub fn up_to_date(kind: &str, have: &Value, want: &Value) -> bool {
    match kind {
        "Pod" => {
            let hash = |v: &Value| v["metadata"]["annotations"][SPEC_HASH].as_str().map(String::from);
            hash(have).is_some() && hash(have) == hash(want)
        }
        _ => contains(have, want),
    }
}

/// Whether every field of `want` has the same value in `have`: objects as subsets (the API
/// server adds defaults), lists element by element with the same length.
pub fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w.iter().all(|(k, v)| h.get(k).is_some_and(|hv| contains(hv, v))),
        (Value::Array(h), Value::Array(w)) => h.len() == w.len() && h.iter().zip(w).all(|(hv, wv)| contains(hv, wv)),
        (h, w) => h == w,
    }
}

/// Whether `existing` has the controller owner `want` names (the StoreCluster's uid).
fn owned_like(existing: &DynamicObject, want: &Value) -> bool {
    let uid = want["metadata"]["ownerReferences"][0]["uid"].as_str();
    existing.owner_references().iter().any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid)
}

/// Applies each object that is missing or differs; deletes the cluster's Pods no longer wanted.
/// Returns the number of write calls made (0 when converged).
pub async fn apply(
    client: &kube::Client,
    namespace: &str,
    cluster: &str,
    objects: &[(ApiResource, String, Value)],
    settled: bool,
) -> Result<Applied, kube::Error> {
    let mut changes = Vec::new();
    let mut outdated = 0;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    // A rolling change replaces one datanode Pod per pass, and only while every datanode Pod is
    // Ready and the cluster is settled (all registered, no partition short of replicas).
    let pods = pods_api(client, namespace);
    let current_pods = pods.list(&ListParams::default().labels(&selector(cluster))).await?;
    let all_ready = current_pods.iter().filter(|p| p.labels().get(PURGE_LABEL).is_none()).all(pod_ready);
    // The datanode Pods this pass wants that are missing or not Ready (counted before any is
    // created, so that the pass creating them already says so).
    let unready = objects
        .iter()
        .filter(|(r, _, _)| r.kind == "Pod")
        .filter(|(_, name, _)| !current_pods.iter().any(|p| p.name_any() == *name && pod_ready(p)))
        .count() as u32;
    let all_present = objects
        .iter()
        .filter(|(r, _, _)| r.kind == "Pod")
        .all(|(_, name, _)| current_pods.iter().any(|p| p.name_any() == *name));
    // One at a time: not while a datanode Pod is still terminating.
    let terminating =
        current_pods.iter().any(|p| p.labels().get(PURGE_LABEL).is_none() && p.metadata.deletion_timestamp.is_some());
    let mut may_replace = settled && all_ready && all_present && !terminating;
    let mut foreign = Vec::new();
    for (resource, name, body) in objects {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, resource);
        let existing = api.get_opt(name).await?;
        // Someone else's object under the name: never adopted, changed or deleted.
        if let Some(other) = existing.as_ref().filter(|o| !owned_like(o, body)) {
            foreign.push(format!("{} {namespace}/{}", resource.kind, other.name_any()));
            continue;
        }
        let current = existing.as_ref().map(|o| serde_json::to_value(o).expect("JSON"));
        // A datanode Pod that ended (Failed: evicted, or its node lost; Succeeded) never runs
        // again: it goes, and the next pass makes it anew.
        let ended = resource.kind == "Pod"
            && current.as_ref().is_some_and(|c| matches!(c["status"]["phase"].as_str(), Some("Failed" | "Succeeded")));
        if ended && current.as_ref().is_some_and(|c| c["metadata"]["deletionTimestamp"].is_null()) {
            api.delete(name, &DeleteParams::default()).await?;
            changes.push(format!("deleted Pod {name} (it ended; made again on the next pass)"));
            continue;
        }
        if current.as_ref().is_some_and(|c| up_to_date(&resource.kind, c, body)) {
            continue;
        }
        if resource.kind == "Pod" && existing.is_some() {
            // A Pod's spec cannot change in place: replace it (the next reconcile creates it).
            outdated += 1;
            if !may_replace {
                continue;
            }
            may_replace = false;
            api.delete(name, &DeleteParams::default()).await?;
            changes.push(format!("replacing Pod {name} (rolling update)"));
        } else {
            api.patch(name, &params, &Patch::Apply(body)).await?;
            let verb = if existing.is_some() { "updated" } else { "created" };
            changes.push(format!("{verb} {} {name}", resource.kind));
        }
    }
    let owner_uid = objects.first().and_then(|(_, _, b)| b["metadata"]["ownerReferences"][0]["uid"].as_str());
    for pod in current_pods {
        let name = pod.name_any();
        let ours =
            pod.owner_references().iter().any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == owner_uid);
        if ours
            && pod.labels().get(PURGE_LABEL).is_none()
            && !objects.iter().any(|(r, n, _)| r.kind == "Pod" && *n == name)
        {
            pods.delete(&name, &DeleteParams::default()).await?;
            changes.push(format!("deleted Pod {name} (no datanode wanted there)"));
        }
    }
    Ok(Applied { changes, outdated, failing: Vec::new(), foreign, unready })
}

/// What the operator keeps for its life: Nodes and StoreNodes as watches keep them, and one
/// etcd client per cluster.
pub struct OperatorCaches {
    pub machines: MachineCache,
    pub etcd: crate::platform::EtcdClients,
}

impl OperatorCaches {
    /// Starts the watches on the current tokio runtime.
    pub fn start(client: &kube::Client) -> Self {
        Self { machines: MachineCache::start(client), etcd: Default::default() }
    }
}

/// The Kubernetes platform for one StoreCluster.
pub struct KubernetesPlatform<'a> {
    pub client: kube::Client,
    pub cluster: &'a StoreCluster,
    /// The operator's caches; none for the command line, which runs once (it lists Nodes and
    /// StoreNodes, and connects to etcd).
    pub caches: Option<&'a OperatorCaches>,
}

impl crate::platform::Platform for KubernetesPlatform<'_> {
    fn etcd_clients(&self) -> Option<&crate::platform::EtcdClients> {
        self.caches.map(|c| &c.etcd)
    }

    async fn machines(&self) -> Result<Vec<Machine>, PlatformError> {
        match self.caches {
            Some(caches) => caches.machines.machines(self.cluster).await,
            None => {
                let nodes = Api::<Node>::all(self.client.clone()).list(&ListParams::default()).await;
                let store_nodes = Api::<StoreNode>::all(self.client.clone()).list(&ListParams::default()).await;
                let (nodes, store_nodes) = (nodes?, store_nodes?);
                Ok(machines_of(self.cluster, &nodes.items, &disks_by_node(&store_nodes.items)))
            }
        }
    }

    async fn apply(&self, chosen: &[Machine], settled: bool) -> Result<Applied, PlatformError> {
        let namespace = self.cluster.namespace().unwrap_or_default();
        // Certificates first: a datanode Pod waits for its Secret (ContainerCreating).
        let issued = crate::peer_certs::ensure(&self.client, self.cluster, chosen).await?;
        let mut applied =
            apply(&self.client, &namespace, &self.cluster.name_any(), &objects(self.cluster, chosen), settled).await?;
        applied.changes.splice(0..0, issued);
        Ok(applied)
    }

    async fn stop(&self) -> Result<(), PlatformError> {
        // With no machine chosen, every datanode Pod of the cluster goes.
        let namespace = self.cluster.namespace().unwrap_or_default();
        let pods = pods_api(&self.client, &namespace);
        for pod in pods.list(&ListParams::default().labels(&selector(&self.cluster.name_any()))).await? {
            // One already Terminating is on its way (its grace period).
            if pod.labels().get(PURGE_LABEL).is_none() && pod.metadata.deletion_timestamp.is_none() {
                pods.delete(&pod.name_any(), &DeleteParams::default()).await?;
            }
        }
        Ok(())
    }

    async fn blob_tls(&self, machines: &[Machine]) -> Result<Option<cairn_cluster::BlobTls>, PlatformError> {
        crate::peer_certs::blob_tls(&self.client, self.cluster, Some(machines)).await
    }

    /// The Secret named by `spec.etcd.tlsSecret`: `ca.crt`, and `tls.crt` + `tls.key` if present.
    async fn etcd_tls(&self) -> Result<Option<cairn_cluster::etcd::EtcdTls>, PlatformError> {
        let Some(secret_name) = &self.cluster.spec.etcd.tls_secret else { return Ok(None) };
        let namespace = self.cluster.namespace().unwrap_or_default();
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(self.client.clone(), &namespace);
        let secret = secrets
            .get_opt(secret_name)
            .await?
            .ok_or_else(|| PlatformError::Invalid(format!("etcd TLS secret {namespace}/{secret_name} not found")))?;
        let data = secret.data.unwrap_or_default();
        let field = |k: &str| data.get(k).map(|b| b.0.clone());
        let ca =
            field("ca.crt").ok_or_else(|| PlatformError::Invalid(format!("secret {secret_name} has no ca.crt")))?;
        Ok(Some(cairn_cluster::etcd::EtcdTls { ca, cert: field("tls.crt"), key: field("tls.key") }))
    }

    /// One purge Pod per machine (see [`purge_machine`](Self::purge_machine)); done when all have.
    /// Purge Pods once no datanode Pod is left (a Terminating one may still write), and only on
    /// machines whose disk agent reports volumes of this cluster: not on Nodes without a disk
    /// agent, and not again on a machine already purged (its StoreNode lists none any more).
    async fn delete_volumes(&self) -> Result<bool, PlatformError> {
        let cluster = self.cluster.name_any();
        let pods = pods_api(&self.client, &self.cluster.namespace().unwrap_or_default());
        let all = self.machines().await?;
        // A machine that is away can neither end its datanode Pod nor run a purge: its volumes
        // are left (`cairn volumes purge` there once it is back), and the deletion goes on.
        let away: Vec<&str> = all.iter().filter(|m| m.down.is_some()).map(|m| m.name.as_str()).collect();
        let datanodes = ListParams::default().labels(&label_selector(&datanode_labels(&cluster)));
        let running = pods
            .list(&datanodes)
            .await?
            .items
            .into_iter()
            .any(|p| p.annotations().get(NODE_ANNOTATION).is_none_or(|node| !away.contains(&node.as_str())));
        if running {
            return Ok(false);
        }
        for name in &away {
            tracing::warn!(cluster = %cluster, machine = %name, "machine away: its volumes of the cluster are left");
        }
        let mut done = true;
        let mut purging = Vec::new();
        for machine in all.into_iter().filter(|m| m.down.is_none()) {
            if machine.holds_volumes_of(&cluster) {
                done &= self.purge_machine(&machine, None).await?;
                purging.push(label_value(&machine.name));
            }
        }
        // The purge Pod of a machine that holds nothing any more has done its work.
        let all_purges = ListParams::default().labels(&format!("{},{PURGE_LABEL}", selector(&cluster)));
        for pod in pods.list(&all_purges).await? {
            let machine = pod.labels().get(PURGE_LABEL).cloned().unwrap_or_default();
            if !purging.contains(&machine) && pod.metadata.deletion_timestamp.is_none() {
                pods.delete(&pod.name_any(), &DeleteParams::default()).await?;
            }
        }
        Ok(done)
    }

    /// A purge Pod on the machine (pinned, the disk agent's socket mounted) runs
    /// `cairn volumes purge --cluster <cluster> --node <machine> [--partition P]…` once
    /// (`restartPolicy: Never`); true once it succeeded (it is then removed). The Pod is named for
    /// what it deletes ([`purge_pod_name`]): one made for another set of volumes — the set changed
    /// since, say a replica was placed there again — is removed, never taken for this one. A Pod
    /// that failed (a volume still open) is removed and made again on a later pass.
    async fn purge_machine(&self, machine: &Machine, partitions: Option<&[u32]>) -> Result<bool, PlatformError> {
        let sc = self.cluster;
        let namespace = sc.namespace().unwrap_or_default();
        let cluster = sc.name_any();
        let pods = pods_api(&self.client, &namespace);
        let command = purge_command(&cluster, &machine.name, partitions, cairn_common::agent_api::ADMIN_SOCKET);
        let name = purge_pod_name(&cluster, &machine.name, &command);
        let mine = format!("{},{PURGE_LABEL}={}", selector(&cluster), label_value(&machine.name));
        for pod in pods.list(&ListParams::default().labels(&mine)).await? {
            if pod.name_any() != name {
                pods.delete(&pod.name_any(), &DeleteParams::default()).await?;
            }
        }
        if let Some(pod) = pods.get_opt(&name).await? {
            return match pod.data["status"]["phase"].as_str() {
                Some("Succeeded") => {
                    pods.delete(&name, &DeleteParams::default()).await?;
                    Ok(true)
                }
                Some("Failed") => {
                    pods.delete(&name, &DeleteParams::default()).await?;
                    Ok(false)
                }
                _ => Ok(false),
            };
        }
        let owner = sc.controller_owner_ref(&()).expect("a StoreCluster from the API has a uid");
        let mut l = labels(&cluster);
        l.insert(PURGE_LABEL.into(), label_value(&machine.name));
        l.insert("app.kubernetes.io/component".into(), "purge".into());
        use k8s_openapi::api::core::v1::{Container, HostPathVolumeSource, Pod, PodSpec, Volume, VolumeMount};
        let purge = Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                labels: Some(l),
                owner_references: Some(vec![owner]),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(machine.name.clone()),
                restart_policy: Some("Never".into()),
                automount_service_account_token: Some(false),
                tolerations: Some(purge_tolerations(sc)),
                security_context: Some(runtime_default_seccomp()),
                containers: vec![Container {
                    name: "purge".into(),
                    image: Some(sc.spec.image.clone()),
                    command: Some(command),
                    // It only talks to the disk agent's admin socket, which is root's (mode 0600):
                    // root, and nothing more.
                    security_context: Some(k8s_openapi::api::core::v1::SecurityContext {
                        run_as_user: Some(0),
                        allow_privilege_escalation: Some(false),
                        read_only_root_filesystem: Some(true),
                        capabilities: Some(k8s_openapi::api::core::v1::Capabilities {
                            drop: Some(vec!["ALL".into()]),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    // The agent's admin socket: only purge Pods have it (datanodes get the node
                    // socket, which never deletes).
                    volume_mounts: Some(vec![VolumeMount {
                        name: "agent-admin".into(),
                        mount_path: cairn_common::agent_api::ADMIN_SOCKET_DIR.into(),
                        ..VolumeMount::default()
                    }]),
                    ..Container::default()
                }],
                volumes: Some(vec![Volume {
                    name: "agent-admin".into(),
                    host_path: Some(HostPathVolumeSource {
                        path: cairn_common::agent_api::ADMIN_SOCKET_DIR.into(),
                        type_: Some("Directory".into()),
                    }),
                    ..Volume::default()
                }]),
                ..PodSpec::default()
            }),
            ..Pod::default()
        };
        let body = serde_json::to_value(&purge).expect("JSON");
        pods.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(body)).await?;
        Ok(false)
    }
}

/// `seccompProfile: RuntimeDefault` for a Pod.
fn runtime_default_seccomp() -> k8s_openapi::api::core::v1::PodSecurityContext {
    k8s_openapi::api::core::v1::PodSecurityContext {
        seccomp_profile: Some(k8s_openapi::api::core::v1::SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

/// A purge Pod runs where the datanode ran (nodeName skips the scheduler, not the kubelet's
/// NoExecute taints): the cluster's tolerations, and any NoExecute taint for its short life.
fn purge_tolerations(sc: &StoreCluster) -> Vec<k8s_openapi::api::core::v1::Toleration> {
    let mut tolerations = sc.spec.tolerations.clone();
    tolerations.push(k8s_openapi::api::core::v1::Toleration {
        operator: Some("Exists".into()),
        effect: Some("NoExecute".into()),
        ..Default::default()
    });
    tolerations
}

/// `<cluster>-purge-<machine>-<hash of the command>`: a purge Pod's name says what it deletes.
pub fn purge_pod_name(cluster: &str, machine: &str, command: &[String]) -> String {
    let fnv = |text: &str| {
        text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
    };
    let hash = fnv(&command.join("\0")) as u32;
    let name = format!("{cluster}-purge-{machine}-{hash:08x}");
    if name.len() <= 253 {
        name
    } else {
        format!("{cluster}-purge-{:08x}-{hash:08x}", fnv(machine) as u32)
    }
}

/// The command of a purge Pod: the volumes of `cluster`'s replicas on `node` (only of
/// `partitions`, when given), through the disk agent at `socket`.
pub fn purge_command(cluster: &str, node: &str, partitions: Option<&[u32]>, socket: &str) -> Vec<String> {
    let mut command: Vec<String> =
        ["cairn", "volumes", "purge", "--disk-agent", socket, "--cluster", cluster, "--node", node]
            .into_iter()
            .map(String::from)
            .collect();
    for p in partitions.unwrap_or_default() {
        command.extend(["--partition".into(), p.to_string()]);
    }
    command.push("--yes".into());
    command
}

/// Label of the Pods that remove a deleted cluster's volumes.
pub const PURGE_LABEL: &str = "cairn.dev/purge";

/// The Pod's Ready condition is True.
fn pod_ready(pod: &DynamicObject) -> bool {
    pod.data["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// The cluster's datanode Pods by machine: whether each is Ready.
pub async fn datanode_pods(sc: &StoreCluster, client: &kube::Client) -> Result<BTreeMap<String, bool>, kube::Error> {
    let pods = pods_api(client, &sc.namespace().unwrap_or_default());
    let list = pods.list(&ListParams::default().labels(&selector(&sc.name_any()))).await?;
    Ok(list
        .iter()
        .filter(|p| p.labels().get(PURGE_LABEL).is_none())
        // By the machine it is pinned to (spec.nodeName is set only once scheduled).
        .filter_map(|p| Some((p.annotations().get(NODE_ANNOTATION)?.clone(), pod_ready(p))))
        .collect())
}

fn pods_api(client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "Pod")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_made_from_node_names_are_dns_labels_and_stay_distinct() {
        assert_eq!(pod_name("c1", "n0"), "c1-n0");
        let eks = pod_name("c1", "ip-10-0-1-7.eu-west-1.compute.internal");
        let other = pod_name("c1", "ip-10-0-1-7-eu-west-1-compute-internal");
        for name in [&eks, &other, &pod_name("c1", &"x".repeat(250))] {
            assert!(name.len() <= 63, "{name}");
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'), "{name}");
            assert!(!name.starts_with('-') && !name.ends_with('-'), "{name}");
        }
        assert_ne!(eks, other, "two node names that clean up alike stay apart");
        assert_eq!(label_value("n0"), "n0");
        assert!(label_value(&"n".repeat(100)).len() <= 63);
    }

    /// `spec.tls`: HTTPS on the blob port from the node's own certificate, or from the Secret the
    /// spec names (mounted read-only for the datanode's group); the probes speak HTTPS.
    #[test]
    fn the_blob_port_speaks_https_with_the_certificate_the_spec_asks_for() {
        let pod_of = |tls: Value| -> Value {
            let sc: StoreCluster = serde_json::from_value(json!({
                "apiVersion": "cairn.dev/v1alpha1", "kind": "StoreCluster",
                "metadata": {"name": "c1", "namespace": "store", "uid": "u1"},
                "spec": {"image": "cairn:1", "volumeSize": "1Gi", "segmentSize": "64Mi", "replicationFactor": 1,
                         "writeQuorum": 1, "etcd": {"endpoints": ["http://etcd:2379"]}, "tls": tls}}))
            .unwrap();
            let machine = Machine {
                name: "m1".into(),
                zone: "a".into(),
                disks: Vec::new(),
                address: "c1-m1.c1-nodes.store.svc:7480".into(),
                selected: true,
                down: None,
            };
            objects(&sc, &[machine]).into_iter().find(|(r, _, _)| r.kind == "Pod").unwrap().2
        };
        let flag = |pod: &Value, name: &str| -> Option<String> {
            let args = pod["spec"]["containers"][0]["args"].as_array().unwrap();
            args.iter().position(|a| a == name).map(|i| args[i + 1].as_str().unwrap().to_owned())
        };
        let plain = pod_of(Value::Null);
        assert_eq!(flag(&plain, "--tls-cert"), None);
        assert!(plain["spec"]["containers"][0]["readinessProbe"]["httpGet"]["scheme"].is_null());
        assert_eq!(flag(&plain, "--peer-tls-cert").as_deref(), Some("/etc/cairn/peer-tls/tls.crt"));
        let issued = pod_of(json!({}));
        assert_eq!(flag(&issued, "--tls-cert").as_deref(), Some("/etc/cairn/peer-tls/tls.crt"));
        assert_eq!(flag(&issued, "--tls-key").as_deref(), Some("/etc/cairn/peer-tls/tls.key"));
        for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
            assert_eq!(issued["spec"]["containers"][0][probe]["httpGet"]["scheme"], "HTTPS", "{probe}");
        }
        let own = pod_of(json!({"secretName": "blob-cert"}));
        assert_eq!(flag(&own, "--tls-cert").as_deref(), Some("/etc/cairn/tls/tls.crt"));
        let volume = own["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "blob-tls").unwrap();
        assert_eq!(volume["secret"], json!({"secretName": "blob-cert", "defaultMode": 0o440}));
        let mount = own["spec"]["containers"][0]["volumeMounts"].as_array().unwrap();
        assert!(mount
            .iter()
            .any(|m| m["name"] == "blob-tls" && m["readOnly"] == true && m["mountPath"] == "/etc/cairn/tls"));
        let uid = datanode_uid("store", "c1");
        assert_eq!(own["spec"]["securityContext"]["fsGroup"], uid);
        assert_eq!(own["spec"]["containers"][0]["securityContext"]["runAsUser"], uid);
        assert_ne!(uid, datanode_uid("store", "c2"), "clusters run as uids of their own");
        assert_ne!(uid, datanode_uid("store2", "c1"));
        for (ns, name) in [("a", "b"), ("", ""), ("x".repeat(63).as_str(), "y".repeat(63).as_str())] {
            let uid = datanode_uid(ns, name);
            assert!((100_000..i64::from(i32::MAX)).contains(&uid), "{uid}");
        }
    }

    /// What the operator applies, byte for byte: the datanode Pods' spec hashes (a change to
    /// them restarts every datanode of every cluster on an operator upgrade) and every object.
    /// A change here must be meant; then update the figures.
    #[test]
    fn the_replica_port_is_for_datanodes_and_the_blob_port_for_the_named_clients() {
        let sc = |policy: Value| -> StoreCluster {
            serde_json::from_value(json!({
                "apiVersion": "cairn.dev/v1alpha1", "kind": "StoreCluster",
                "metadata": {"name": "c1", "namespace": "store", "uid": "u1"},
                "spec": {"image": "cairn:1", "volumeSize": "16Gi", "segmentSize": "1Gi",
                         "etcd": {"endpoints": ["http://etcd:2379"]}, "networkPolicy": policy}}))
            .unwrap()
        };
        let rules = |sc: &StoreCluster| -> Value {
            serde_json::to_value(network_policy(sc, Default::default()).spec.unwrap()).unwrap()
        };
        let open = rules(&sc(json!({})));
        assert_eq!(open["podSelector"]["matchLabels"]["app.kubernetes.io/component"], "datanode");
        assert_eq!(open["policyTypes"], json!(["Ingress"]));
        assert_eq!(open["ingress"][0], json!({"ports": [{"port": 7480, "protocol": "TCP"}]}), "anyone");
        let peers = &open["ingress"][1];
        assert_eq!(peers["ports"], json!([{"port": 7481, "protocol": "TCP"}]));
        assert_eq!(peers["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"], "c1");
        assert!(peers["from"][0].get("namespaceSelector").is_none(), "the cluster's own namespace only");
        let named = rules(&sc(json!({"blobClients": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]})));
        let from = named["ingress"][0]["from"].as_array().unwrap();
        assert_eq!(from[0]["namespaceSelector"]["matchLabels"]["team"], "apps");
        assert_eq!(from[1]["podSelector"]["matchLabels"]["app.kubernetes.io/component"], "operator", "{from:?}");
    }

    #[test]
    fn the_applied_objects_are_stable() {
        let sc: StoreCluster = serde_json::from_value(json!({
            "apiVersion": "cairn.dev/v1alpha1", "kind": "StoreCluster",
            "metadata": {"name": "c1", "namespace": "store", "uid": "00000000-0000-0000-0000-000000000001"},
            "spec": {"image": "cairn:1", "volumeSize": "16Gi", "segmentSize": "1Gi", "replicationFactor": 3,
                     "writeQuorum": 2, "partitionsPerDisk": 2, "priorityClassName": "cairn-datanode",
                     "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "storage", "effect": "NoSchedule"}],
                     "etcd": {"endpoints": ["http://etcd:2379"], "tlsSecret": "etcd-tls"}}}))
        .unwrap();
        let disk = |mount: &str| DiskReport {
            id: format!("disk-{mount}"),
            canonical_mount: mount.into(),
            usable: true,
            ..DiskReport::default()
        };
        let machine = |name: &str| Machine {
            name: name.into(),
            zone: "a".into(),
            disks: vec![disk("/mnt/disks/a"), disk("/mnt/disks/b")],
            address: format!("c1-{name}.c1-nodes.store.svc:7480"),
            selected: true,
            down: None,
        };
        let objects = objects(&sc, &[machine("n0"), machine("ip-10-0-1-7.eu-west-1.compute.internal")]);
        let hashes: Vec<&str> = objects
            .iter()
            .filter(|(r, _, _)| r.kind == "Pod")
            .map(|(_, _, body)| body["metadata"]["annotations"][SPEC_HASH].as_str().unwrap())
            .collect();
        assert_eq!(hashes, ["97f9e7c1c2c44c6d", "f7048797fe715ef3"]);
        let all: Vec<&Value> = objects.iter().map(|(_, _, body)| body).collect();
        assert_eq!(spec_hash(&json!(all)), "e146a2adc43f09e1");
    }

    #[test]
    fn defaults_added_by_the_server_are_not_a_difference() {
        let want = json!({"spec": {"containers": [{"name": "d", "image": "a"}]}});
        let have = json!({"spec": {"containers": [{"name": "d", "image": "a", "imagePullPolicy": "IfNotPresent"}], "dnsPolicy": "x"}});
        assert!(contains(&have, &want));
        let upgraded = json!({"spec": {"containers": [{"name": "d", "image": "b"}]}});
        assert!(!contains(&have, &upgraded));
        let more = json!({"spec": {"containers": [{"name": "d", "image": "a"}, {"name": "e"}]}});
        assert!(!contains(&have, &more));
    }
}
