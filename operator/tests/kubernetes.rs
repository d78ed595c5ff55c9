//! The operator's Kubernetes side against an in-memory API server, with a real etcd.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use cairn_common::agent_api::DiskReport;
use cairn_operator::kubernetes::KubernetesPlatform;
use cairn_operator::reconcile::{reconcile, Context, FINALIZER};
use cairn_resources::{StoreCluster, StoreNode, StoreNodeSpec, StoreNodeStatus};
use cairn_testkit::etcd::EtcdServer;
use cairn_testkit::rbac::{operator_user, rendered_chart, Rbac};
use cairn_testkit::MemoryApi;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::ResourceExt;

use serde_json::json;

const GIB: u64 = 1 << 30;

async fn machine(kube: &kube::Client, name: &str, zone: &str) {
    let nodes: Api<Node> = Api::all(kube.clone());
    let node = json!({"apiVersion": "v1", "kind": "Node",
                      "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone, "cairn.dev/storage": "true"}}});
    nodes.patch(name, &PatchParams::apply("test"), &Patch::Apply(node)).await.unwrap();
    let store_nodes: Api<StoreNode> = Api::all(kube.clone());
    let sn = StoreNode::new(name, StoreNodeSpec { node_name: name.into() });
    store_nodes.patch(name, &PatchParams::apply("test"), &Patch::Apply(&sn)).await.unwrap();
    let disk = DiskReport {
        id: format!("{name}-disk"),
        device: "/dev/nvme0n1".into(),
        fs_type: "xfs".into(),
        canonical_mount: "/mnt/disk0".into(),
        total_bytes: 200 * GIB,
        available_bytes: 190 * GIB,
        allocatable_bytes: 180 * GIB,
        usable: true,
        ..DiskReport::default()
    };
    let status = StoreNodeStatus { disks: vec![disk], ..StoreNodeStatus::default() };
    let patch = json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "StoreNode", "status": status});
    store_nodes.patch_status(name, &PatchParams::apply("test"), &Patch::Apply(patch)).await.unwrap();
}

/// The volumes a machine's disk agent reports in its StoreNode (as the agent publishes them).
async fn volumes_on(kube: &kube::Client, node: &str, names: &[&str]) {
    let store_nodes: Api<StoreNode> = Api::all(kube.clone());
    let mut status = store_nodes.get(node).await.unwrap().status.unwrap();
    status.disks[0].volumes = names
        .iter()
        .map(|n| cairn_common::agent_api::VolumeInfo { name: n.to_string(), ..Default::default() })
        .collect();
    let patch = json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "StoreNode", "status": status});
    store_nodes.patch_status(node, &PatchParams::apply("test"), &Patch::Apply(patch)).await.unwrap();
}

/// One reconcile of c1, if it still exists.
async fn reconcile_once_if_present(api: &Api<StoreCluster>, ctx: &Arc<Context>) {
    if let Some(sc) = api.get_opt("c1").await.unwrap() {
        ctx.caches.machines.synced_with(&ctx.client).await;
        reconcile(Arc::new(sc), ctx.clone()).await.unwrap();
    }
}

/// The test API with the chart's RBAC: the operator runs as its ServiceAccount, so a verb the chart
/// does not grant is a 403 here as on a real cluster. (Test setup uses an admin client.)
fn strict_api() -> MemoryApi {
    use kube::CustomResourceExt;
    MemoryApi::new()
        .with_rbac(Rbac::from_manifests(&rendered_chart()))
        .with_crd(&StoreCluster::crd())
        .with_crd(&StoreNode::crd())
        .with_crd(&cairn_resources::StoreAccessKey::crd())
}

/// The strict API with these machines (name, zone): their Nodes and StoreNodes; and an admin client.
async fn strict_api_with(machines: impl IntoIterator<Item = (&str, &str)>) -> (MemoryApi, kube::Client) {
    let memory = strict_api();
    let kube = memory.client();
    for (name, zone) in machines {
        machine(&kube, name, zone).await;
    }
    (memory, kube)
}

/// The operator's context, its client authenticated as the chart's operator ServiceAccount.
fn operator_context(memory: &MemoryApi) -> Arc<Context> {
    Arc::new(Context::new(memory.client_as(&operator_user())))
}

fn cluster_yaml(etcd: &str, rf: u32) -> serde_json::Value {
    json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "StoreCluster",
           "metadata": {"name": "c1", "namespace": "store"},
           "spec": {"image": "cairn:1", "volumeSize": "16Gi", "segmentSize": "1Gi", "replicationFactor": rf,
                    "writeQuorum": 2, "partitionsPerDisk": 2, "nodeSelector": {"cairn.dev/storage": "true"},
                    "priorityClassName": "cairn-datanode", "etcd": {"endpoints": [etcd]}}})
}

/// The machines the Kubernetes platform sees for `sc` now (Nodes and StoreNodes listed).
async fn machines_now(client: &kube::Client, sc: &StoreCluster) -> Vec<cairn_operator::desired::Machine> {
    use cairn_operator::platform::Platform;
    KubernetesPlatform { client: client.clone(), cluster: sc, caches: None }.machines().await.unwrap()
}

async fn reconcile_once(api: &Api<StoreCluster>, ctx: &Arc<Context>) {
    let sc = api.get("c1").await.unwrap();
    // A single pass sees the Nodes and StoreNodes the test just wrote, as the watches will.
    ctx.caches.machines.synced_with(&ctx.client).await;
    reconcile(Arc::new(sc), ctx.clone()).await.unwrap();
}

/// `operator.secretNamespaces`: the operator's Secrets only there, by a Role in each; without
/// it, everywhere by its ClusterRole. Nothing else it may do changes.
#[test]
fn secret_namespaces_narrow_the_operators_secrets_to_roles() {
    use cairn_testkit::rbac::{rendered_chart_with, Access};
    let access = |namespace: &str, verb: &str, resource: &str| Access {
        user: operator_user(),
        verb: verb.into(),
        group: String::new(),
        resource: resource.into(),
        namespace: namespace.into(),
    };
    let everywhere = Rbac::from_manifests(&rendered_chart());
    let narrowed = Rbac::from_manifests(&rendered_chart_with(&["--set", "operator.secretNamespaces={store,apps}"]));
    for verb in ["get", "create", "patch"] {
        for ns in ["store", "apps", "elsewhere"] {
            assert!(everywhere.allows(&access(ns, verb, "secrets")), "{verb} secrets in {ns} by default");
        }
        assert!(narrowed.allows(&access("store", verb, "secrets")), "{verb} in store");
        assert!(narrowed.allows(&access("apps", verb, "secrets")), "{verb} in apps");
        assert!(!narrowed.allows(&access("elsewhere", verb, "secrets")), "{verb} secrets outside the list");
    }
    for verb in ["list", "watch", "delete"] {
        assert!(
            !narrowed.allows(&access("store", verb, "secrets"))
                && !everywhere.allows(&access("store", verb, "secrets"))
        );
    }
    let others = |rbac: &Rbac| -> std::collections::BTreeSet<_> {
        rbac.granted(&operator_user())
            .into_iter()
            .filter(|(_, _, _, r)| r != "secrets")
            .map(|(_, v, g, r)| (v, g, r))
            .collect()
    };
    assert_eq!(others(&everywhere), others(&narrowed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_creates_owned_objects_writes_nothing_when_converged_and_cleans_up() {
    let etcd = EtcdServer::start();
    let (memory, kube) = strict_api_with([("n0", "a"), ("n1", "b"), ("n2", "c")]).await;
    let api: Api<StoreCluster> = Api::namespaced(kube.clone(), "store");
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(cluster_yaml(&etcd.endpoint(), 3))).await.unwrap();
    let ctx = operator_context(&memory);

    reconcile_once(&api, &ctx).await; // adds the finalizer
    assert_eq!(api.get("c1").await.unwrap().finalizers(), [FINALIZER.to_string()]);
    reconcile_once(&api, &ctx).await; // creates everything

    let pods: Api<Pod> = Api::namespaced(kube.clone(), "store");
    let sc = api.get("c1").await.unwrap();
    for node in ["n0", "n1", "n2"] {
        let pod = pods.get(&format!("c1-{node}")).await.unwrap();
        // Pinned to its machine by node affinity (the scheduler still checks taints and room).
        let spec = pod.spec.as_ref().unwrap();
        assert!(spec.node_name.is_none(), "not placed by nodeName");
        let terms = &spec.affinity.as_ref().unwrap().node_affinity.as_ref().unwrap();
        let term = &terms.required_during_scheduling_ignored_during_execution.as_ref().unwrap().node_selector_terms[0];
        let field = &term.match_fields.as_ref().unwrap()[0];
        assert_eq!((field.key.as_str(), field.values.clone().unwrap()), ("metadata.name", vec![node.to_string()]));
        assert_eq!(spec.automount_service_account_token, Some(false));
        let container = &spec.containers[0];
        assert!(container.startup_probe.is_some() && container.resources.as_ref().unwrap().requests.is_some());
        // Least privilege (docs/security.md): no new privileges, no capabilities, a read-only
        // root filesystem, the runtime's seccomp profile.
        let hardened = container.security_context.as_ref().unwrap();
        assert_eq!(
            (hardened.allow_privilege_escalation, hardened.read_only_root_filesystem),
            (Some(false), Some(true))
        );
        assert_eq!(hardened.capabilities.as_ref().unwrap().drop, Some(vec!["ALL".to_string()]));
        let seccomp = spec.security_context.as_ref().unwrap().seccomp_profile.as_ref().unwrap();
        assert_eq!(seccomp.type_, "RuntimeDefault");
        assert_eq!(spec.termination_grace_period_seconds, Some(60));
        assert_eq!(spec.priority_class_name.as_deref(), Some("cairn-datanode"), "spec.priorityClassName");
        // A node NotReady or unreachable does not evict it (the operator decides, later).
        let tolerations = spec.tolerations.clone().unwrap_or_default();
        for key in ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"] {
            assert!(
                tolerations.iter().any(|t| t.key.as_deref() == Some(key) && t.toleration_seconds.is_none()),
                "{key}: {tolerations:?}"
            );
        }
        let owner = &pod.owner_references()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("StoreCluster", sc.uid().unwrap().as_str()));
        let args = pod.spec.unwrap().containers[0].args.clone().unwrap();
        assert!(args.windows(2).any(|w| w[0] == "--node-id" && w[1] == node), "{args:?}");
        // The name the datanode advertises to its peers exists in DNS, as CoreDNS makes it.
        let advertised = args.windows(2).find(|w| w[0] == "--advertise").map(|w| w[1].clone()).unwrap();
        let host = advertised.rsplit_once(':').unwrap().0;
        assert!(memory.resolves(host), "{host} does not resolve");
    }
    for (plural, name) in [("services", "c1"), ("services", "c1-nodes"), ("configmaps", "c1-config")] {
        assert_eq!(memory.writes(plural, "store", name), 1, "{plural}/{name}");
    }
    assert_eq!(memory.writes("poddisruptionbudgets", "store", "c1"), 1);

    // etcd holds the topology: 3 nodes, 2 partitions per disk, zones distinct.
    let store = cairn_cluster::etcd::ClusterStore::connect(&[etcd.endpoint()], "store", "c1").await.unwrap();
    let snapshot = store.load().await.unwrap();
    assert_eq!(snapshot.topology.nodes.len(), 3);
    assert_eq!(snapshot.topology.partitions.len(), 6);

    // The PodDisruptionBudget: an integer minAvailable (a maxUnavailable on Pods whose owner
    // has no /scale blocks every eviction), over datanode Pods only; the Services route to them only.
    let pdbs: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> = Api::namespaced(kube.clone(), "store");
    let pdb = pdbs.get("c1").await.unwrap().spec.unwrap();
    assert_eq!(pdb.min_available, Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(2)));
    assert!(pdb.max_unavailable.is_none());
    let datanode = pdb.selector.unwrap().match_labels.unwrap();
    assert_eq!(datanode.get("app.kubernetes.io/component").map(String::as_str), Some("datanode"));
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(kube.clone(), "store");
    for name in ["c1", "c1-nodes"] {
        assert_eq!(services.get(name).await.unwrap().spec.unwrap().selector.unwrap(), datanode, "{name}");
    }
    let pod_labels = pods.get("c1-n0").await.unwrap().metadata.labels.unwrap();
    assert!(datanode.iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "the PDB selects datanode Pods");

    // Status: conditions for kstatus readers, observedGeneration, counts.
    let status = api.get("c1").await.unwrap().status.unwrap();
    assert_eq!(status.observed_generation, sc.metadata.generation);
    assert_eq!((status.nodes_total, status.partitions.total), (3, 6));
    let types: Vec<&str> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(types, ["Ready", "Progressing", "Degraded", "Reconciling", "Stalled"]);
    assert_eq!(status.conditions[0].status, "False", "no datanode is live yet");

    // Converged: a reconcile makes zero write calls, to the API server or to etcd.
    let writes = ctx.writes.load(Ordering::SeqCst);
    let status_writes = memory.status_writes("storeclusters", "store", "c1");
    let revision = store.load().await.unwrap().revision;
    reconcile_once(&api, &ctx).await;
    reconcile_once(&api, &ctx).await;
    assert_eq!(ctx.writes.load(Ordering::SeqCst), writes, "no writes when converged");
    assert_eq!(store.load().await.unwrap().revision, revision);
    assert_eq!(memory.status_writes("storeclusters", "store", "c1"), status_writes, "status unchanged, not rewritten");
    for node in ["n0", "n1", "n2"] {
        assert_eq!(memory.writes("pods", "store", &format!("c1-{node}")), 1);
    }
    // The spec is never written by the operator: only the user's apply and the finalizer touched it.
    assert_eq!(api.get("c1").await.unwrap().spec.image, "cairn:1");

    // A datanode Pod evicted (Failed, as the kubelet reports it) is made again.
    let evicted = json!({"apiVersion": "v1", "kind": "Pod", "status": {"phase": "Failed", "reason": "Evicted"}});
    pods.patch_status("c1-n1", &PatchParams::apply("kubelet"), &Patch::Apply(evicted)).await.unwrap();
    reconcile_once(&api, &ctx).await;
    assert!(pods.get_opt("c1-n1").await.unwrap().is_none(), "the ended Pod is deleted");
    reconcile_once(&api, &ctx).await;
    let again = pods.get("c1-n1").await.unwrap();
    assert_eq!(again.status.unwrap().phase.as_deref(), Some("Pending"), "and made anew");

    // Upgrade: a new image replaces one Pod per pass, and only while the others are Ready and
    // every datanode is registered. With none registered here (no datanode runs), nothing moves.
    let mut upgraded = cluster_yaml(&etcd.endpoint(), 3);
    upgraded["spec"]["image"] = json!("cairn:2");
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(upgraded)).await.unwrap();
    reconcile_once(&api, &ctx).await;
    let images =
        |pods: Vec<Pod>| pods.iter().filter_map(|p| p.spec.as_ref()?.containers[0].image.clone()).collect::<Vec<_>>();
    let all = pods.list(&Default::default()).await.unwrap().items;
    assert_eq!(images(all), ["cairn:1", "cairn:1", "cairn:1"], "unsettled cluster: no replacement");
    // Datanodes registered, caught up (a stand-in answers their replication progress) and Pods
    // Ready: one Pod per pass.
    let progress = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let progress_addr = progress.local_addr().unwrap().to_string();
    let app = axum::Router::new().route(
        "/v1/admin/replicas",
        axum::routing::get(|| async {
            let caught_up: Vec<serde_json::Value> = (0..6)
                .map(|p| json!({"partition": p, "peer": "x", "lag_entries": 0, "last_error": null, "peer_tail": 5}))
                .collect();
            axum::Json(caught_up)
        }),
    );
    tokio::spawn(async move { axum::serve(progress, app).await });
    let live_cancel = tokio_util::sync::CancellationToken::new();
    let mut registrations = Vec::new();
    for node in ["n0", "n1", "n2"] {
        let live = cairn_cluster::LiveNode {
            tls: false,
            node: node.into(),
            address: progress_addr.clone(),
            peer_address: None,
            peer_tls: false,
            zone: String::new(),
            started_ms: 0,
            free_bytes: Default::default(),
            unopened: Default::default(),
        };
        let (tx, rx) = tokio::sync::watch::channel(live);
        registrations.push(tx);
        let (store, cancel) = (store.clone(), live_cancel.clone());
        tokio::spawn(async move { store.keep_registered(rx, 10, cancel).await });
    }
    // Wait until etcd holds all three registrations (no fixed sleep: CI machines are slower).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while store.load().await.unwrap().live.len() < 3 {
        assert!(std::time::Instant::now() < deadline, "registrations did not appear");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mark_ready = |name: String| {
        let pods = pods.clone();
        async move {
            let ready = json!({"apiVersion": "v1", "kind": "Pod", "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
            pods.patch_status(&name, &PatchParams::apply("kubelet"), &Patch::Apply(ready)).await.unwrap();
        }
    };
    for node in ["n0", "n1", "n2"] {
        mark_ready(format!("c1-{node}")).await;
    }
    for round in 0..3 {
        reconcile_once(&api, &ctx).await; // replaces one
        let remaining = pods.list(&Default::default()).await.unwrap().items.len();
        assert_eq!(remaining, 2, "round {round}: exactly one Pod replaced at a time");
        reconcile_once(&api, &ctx).await; // creates it with the new image
        for pod in pods.list(&Default::default()).await.unwrap().items {
            mark_ready(pod.name_any()).await;
        }
    }
    let all = pods.list(&Default::default()).await.unwrap().items;
    assert_eq!(images(all), ["cairn:2", "cairn:2", "cairn:2"]);
    // Ready needs every datanode Pod Ready too (the Services route to no other): registered in
    // etcd is not enough, a Pod's readiness probe may still be failing.
    let ready_condition = || async {
        reconcile_once(&api, &ctx).await;
        let status = api.get("c1").await.unwrap().status.unwrap();
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap().clone();
        let progressing = status.conditions.iter().find(|c| c.type_ == "Progressing").unwrap().clone();
        (ready.status, progressing.message)
    };
    assert_eq!(ready_condition().await.0, "True", "registered, caught up and every Pod Ready");
    let unready =
        json!({"apiVersion": "v1", "kind": "Pod", "status": {"conditions": [{"type": "Ready", "status": "False"}]}});
    pods.patch_status("c1-n1", &PatchParams::apply("kubelet"), &Patch::Apply(unready)).await.unwrap();
    let (ready, progress) = ready_condition().await;
    assert_eq!(ready, "False", "one Pod not Ready");
    assert!(progress.contains("1 datanode Pod(s) not Ready yet"), "{progress}");
    mark_ready("c1-n1".to_string()).await;
    assert_eq!(ready_condition().await.0, "True");

    // Converged under traffic: datanodes rewrite their registrations as blobs arrive (etcd's
    // revision moves), and the operator still writes nothing.
    reconcile_once(&api, &ctx).await;
    let (writes, status_writes) =
        (ctx.writes.load(Ordering::SeqCst), memory.status_writes("storeclusters", "store", "c1"));
    for round in 1..=3u64 {
        let before = store.load().await.unwrap().revision;
        for tx in &registrations {
            tx.send_modify(|l| {
                l.free_bytes.insert(0, round << 20);
            });
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.load().await.unwrap().revision < before + 3 {
            assert!(std::time::Instant::now() < deadline, "registrations not rewritten");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        reconcile_once(&api, &ctx).await;
    }
    assert_eq!(ctx.writes.load(Ordering::SeqCst), writes, "no writes under traffic");
    assert_eq!(memory.status_writes("storeclusters", "store", "c1"), status_writes, "no status writes under traffic");
    live_cancel.cancel();

    // Retain: deleting leaves the topology in etcd.
    api.delete("c1", &DeleteParams::default()).await.unwrap();
    reconcile_once(&api, &ctx).await;
    assert!(api.get_opt("c1").await.unwrap().is_none(), "finalizer removed, object gone");
    assert_eq!(store.load().await.unwrap().topology.nodes.len(), 3, "Retain keeps the topology");

    // Re-created over the retained data, then deleted with a confirmed Delete: etcd is emptied.
    let mut again = cluster_yaml(&etcd.endpoint(), 3);
    again["spec"]["deletionPolicy"] = json!("Delete");
    again["spec"]["confirmDelete"] = json!("c1");
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(again)).await.unwrap();
    reconcile_once(&api, &ctx).await;
    reconcile_once(&api, &ctx).await;
    assert_eq!(store.load().await.unwrap().topology.partitions.len(), 6, "the same placement found again");
    // The disk agents report the cluster's volumes; a fourth Node has no disk agent (no StoreNode).
    for node in ["n0", "n1", "n2"] {
        volumes_on(&kube, node, &[&format!("c1-p0-{node}"), &format!("c1-p1-{node}")]).await;
    }
    let nodes: Api<Node> = Api::all(kube.clone());
    let bare = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n3"}});
    nodes.patch("n3", &PatchParams::apply("test"), &Patch::Apply(bare)).await.unwrap();
    // The datanodes run (scheduled, started, as a kubelet would have them): deleted, they stay
    // Terminating through their grace period.
    for pod in pods.list(&Default::default()).await.unwrap().items {
        let node = pod.annotations()["cairn.dev/node"].clone();
        let name = pod.name_any();
        pods.patch(&name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"nodeName": node}}))).await.unwrap();
        let running = json!({"status": {"phase": "Running"}});
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(running)).await.unwrap();
    }
    memory.hold_pod_deletions();
    api.delete("c1", &DeleteParams::default()).await.unwrap();
    let pass = || async {
        let sc = api.get("c1").await.unwrap();
        ctx.caches.machines.synced_with(&ctx.client).await;
        reconcile(Arc::new(sc), ctx.clone()).await
    };
    let purge_pod = |node: &str| {
        let command =
            cairn_operator::kubernetes::purge_command("c1", node, None, cairn_common::agent_api::ADMIN_SOCKET);
        cairn_operator::kubernetes::purge_pod_name("c1", node, &command)
    };
    // First the datanodes stop; no purge while one is still Terminating (it may still write).
    assert!(pass().await.is_err(), "in progress");
    assert!(pods.get("c1-n0").await.unwrap().metadata.deletion_timestamp.is_some(), "datanodes stopping");
    assert!(pods.get_opt(&purge_pod("n0")).await.unwrap().is_none(), "no purge while a datanode terminates");
    memory.finish_pod_deletions();
    // Then one purge Pod per machine that holds volumes (none on n3); the finalizer waits.
    assert!(pass().await.is_err(), "in progress");
    assert!(pods.get_opt(&purge_pod("n3")).await.unwrap().is_none(), "no disk agent, nothing to purge on n3");
    for node in ["n0", "n1", "n2"] {
        let purge = pods.get(&purge_pod(node)).await.unwrap();
        let command = purge.spec.as_ref().unwrap().containers[0].command.clone().unwrap();
        assert_eq!(command[..3], ["cairn", "volumes", "purge"]);
        assert!(command.windows(2).any(|w| w[0] == "--cluster" && w[1] == "c1"), "{command:?}");
        assert_eq!(purge.spec.unwrap().node_name.as_deref(), Some(node));
    }
    let succeed = |node: &'static str| {
        let (pods, kube, name) = (pods.clone(), kube.clone(), purge_pod(node));
        async move {
            let done = json!({"apiVersion": "v1", "kind": "Pod", "status": {"phase": "Succeeded"}});
            pods.patch_status(&name, &PatchParams::apply("kubelet"), &Patch::Apply(done)).await.unwrap();
            volumes_on(&kube, node, &[]).await; // the agent reports its volumes gone
        }
    };
    // Purges finish at different times: a machine done is not purged again.
    succeed("n0").await;
    assert!(pass().await.is_err(), "n1 and n2 still purging");
    memory.finish_pod_deletions();
    assert!(pods.get_opt(&purge_pod("n0")).await.unwrap().is_none(), "n0's purge Pod removed, not made again");
    assert!(pass().await.is_err(), "n1 and n2 still purging");
    assert!(pods.get_opt(&purge_pod("n0")).await.unwrap().is_none(), "n0 is not purged a second time");
    assert_eq!(store.load().await.unwrap().topology.partitions.len(), 6, "etcd waits for the volumes");
    succeed("n1").await;
    succeed("n2").await;
    pass().await.unwrap();
    memory.finish_pod_deletions();
    reconcile_once_if_present(&api, &ctx).await;
    assert!(api.get_opt("c1").await.unwrap().is_none());
    assert!(store.load().await.unwrap().topology.nodes.is_empty(), "Delete removed the topology");
    // The objects it owned follow it (the API's garbage collector, by ownerReference).
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(kube.clone(), "store");
    assert!(services.list(&Default::default()).await.unwrap().items.is_empty(), "owned Services collected");
    let configs: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(kube.clone(), "store");
    assert!(configs.list(&Default::default()).await.unwrap().items.is_empty(), "owned ConfigMap collected");
    let left = pods.list(&kube::api::ListParams::default().labels("cairn.dev/purge")).await.unwrap();
    assert!(left.items.is_empty(), "purge Pods cleaned up");

    // What the chart grants the operator and this whole flow did not use: only what other code
    // paths need (named here), so that a grant nothing needs cannot slip in.
    let used: std::collections::BTreeSet<(String, String, String)> = memory.accessed(&operator_user());
    let unused: Vec<String> = Rbac::from_manifests(&rendered_chart())
        .granted(&operator_user())
        .into_iter()
        .filter(|(_, verb, group, resource)| !used.contains(&(verb.clone(), group.clone(), resource.clone())))
        .map(|(_, verb, group, resource)| format!("{verb} {group}/{resource}"))
        .collect();
    let elsewhere = [
        // StoreAccessKeys: store_access_keys_become_etcd_keys_with_their_token_in_a_secret.
        "get cairn.dev/storeclusters",
        "list cairn.dev/storeaccesskeys",
        "watch cairn.dev/storeaccesskeys",
        "patch cairn.dev/storeaccesskeys",
        "patch cairn.dev/storeaccesskeys/status",
        "patch /secrets",               // a peer certificate renewed, a key's Secret told a new endpoint
        "list cairn.dev/storeclusters", // the controller's watches (run_controller), exercised by
        "watch cairn.dev/storeclusters", // the_controller_follows_watches_and_recovers_from_410
        "list cairn.dev/storenodes",
        "watch cairn.dev/storenodes",
        "watch /pods",
        "patch events.k8s.io/events",     // the event recorder, when an Event repeats
        "get coordination.k8s.io/leases", // leader election (leader.rs)
        "create coordination.k8s.io/leases",
        "update coordination.k8s.io/leases",
    ];
    let unexplained: Vec<&String> = unused.iter().filter(|u| !elsewhere.contains(&u.as_str())).collect();
    assert!(unexplained.is_empty(), "granted to the operator and used by no code path: {unexplained:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_and_unreachable_etcd_degrade_without_tearing_down() {
    let etcd = EtcdServer::start();
    let (memory, kube) = strict_api_with([("n0", "a"), ("n1", "b")]).await;
    let api: Api<StoreCluster> = Api::namespaced(kube.clone(), "store");
    let ctx = operator_context(&memory);
    // Replication 3 on two machines: impossible.
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(cluster_yaml(&etcd.endpoint(), 3))).await.unwrap();
    reconcile_once(&api, &ctx).await;
    reconcile_once(&api, &ctx).await;
    let status = api.get("c1").await.unwrap().status.unwrap();
    assert_eq!(status.phase, "Degraded");
    let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "NotEnoughMachines"));
    // One Warning event, not one per retry.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(kube.clone(), "store");
    let list = events.list(&Default::default()).await.unwrap().items;
    let warnings: Vec<_> = list.iter().filter(|e| e.reason.as_deref() == Some("NotEnoughMachines")).collect();
    assert_eq!(warnings.len(), 1, "{list:?}");
    assert_eq!(warnings[0].type_.as_deref(), Some("Warning"));
    assert!(degraded.message.contains("replicationFactor 3 needs 3 machines"), "{}", degraded.message);
    assert_eq!(memory.writes("pods", "store", "c1-n0"), 0, "nothing created for a bad spec");

    // Paused: nothing is done while paused.
    let mut paused = cluster_yaml(&etcd.endpoint(), 2);
    paused["spec"]["paused"] = json!(true);
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(paused)).await.unwrap();
    reconcile_once(&api, &ctx).await;
    assert_eq!(api.get("c1").await.unwrap().status.unwrap().phase, "Paused");
    assert_eq!(memory.writes("pods", "store", "c1-n0"), 0, "paused: nothing created");

    // Unreachable etcd: Degraded with the endpoint in the message; nothing torn down.
    let mut unreachable = cluster_yaml("http://127.0.0.1:9", 2);
    unreachable["spec"]["writeQuorum"] = json!(2);
    unreachable["spec"]["paused"] = json!(false); // (the in-memory apply merges; it does not drop fields)
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(unreachable)).await.unwrap();
    reconcile_once(&api, &ctx).await;
    let status = api.get("c1").await.unwrap().status.unwrap();
    let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!(degraded.reason, "EtcdUnreachable");
    assert!(degraded.message.contains("127.0.0.1:9"), "{}", degraded.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_through_the_named_secret() {
    let etcd = EtcdServer::start_tls();
    let (memory, kube) = strict_api_with([("n0", "a"), ("n1", "b"), ("n2", "c")]).await;
    let api: Api<StoreCluster> = Api::namespaced(kube.clone(), "store");
    let ctx = operator_context(&memory);
    let mut sc = cluster_yaml(&etcd.endpoint(), 3);
    sc["spec"]["etcd"]["tlsSecret"] = json!("etcd-tls");
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(sc)).await.unwrap();

    // The Secret is missing: Degraded, nothing created.
    reconcile_once(&api, &ctx).await;
    reconcile_once(&api, &ctx).await;
    let status = api.get("c1").await.unwrap().status.unwrap();
    let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "EtcdTlsUnavailable"));

    let files = etcd.tls_files();
    let read = |p: &std::path::Path| k8s_openapi::ByteString(std::fs::read(p).unwrap());
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(kube.clone(), "store");
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "etcd-tls"},
        "data": {"ca.crt": read(&files.ca), "tls.crt": read(&files.cert), "tls.key": read(&files.key)}});
    secrets.patch("etcd-tls", &PatchParams::apply("user"), &Patch::Apply(secret)).await.unwrap();
    reconcile_once(&api, &ctx).await;

    let tls = cairn_cluster::etcd::EtcdTls::from_files(&files.ca, Some(&files.cert), Some(&files.key)).unwrap();
    let store =
        cairn_cluster::etcd::ClusterStore::connect_tls(&[etcd.endpoint()], "store", "c1", Some(&tls)).await.unwrap();
    assert_eq!(store.load().await.unwrap().topology.nodes.len(), 3, "the operator reached etcd over TLS");
    let pods: Api<Pod> = Api::namespaced(kube.clone(), "store");
    let pod = pods.get("c1-n0").await.unwrap();
    let spec = pod.spec.unwrap();
    let args = spec.containers[0].args.clone().unwrap();
    assert!(args.windows(2).any(|w| w[0] == "--etcd-ca" && w[1] == "/etc/cairn/etcd-tls/ca.crt"), "{args:?}");
    let volumes = spec.volumes.unwrap();
    assert!(volumes.iter().any(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("etcd-tls")));
}

#[test]
fn the_example_storecluster_passes_the_crd_rules() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/storecluster.yaml")).unwrap();
    let sc: StoreCluster = serde_yaml::from_str(&text).unwrap();
    let spec = serde_json::to_value(&sc.spec).unwrap();
    cairn_resources::StoreClusterSpec::validate_cel(&spec, None).unwrap();
    assert_eq!(sc.spec.replication_factor, 3);
}

/// Runs `cairn ARGS` (with KUBECONFIG unset unless given) and returns (exit code, stdout, stderr).
async fn cairn(args: &[&str], kubeconfig_env: Option<&std::path::Path>) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_cairn"));
    command.args(args).env_remove("KUBECONFIG").env("HOME", "/nonexistent");
    if let Some(path) = kubeconfig_env {
        command.env("KUBECONFIG", path);
    }
    let out = command.output().await.unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cairn_status_disks_and_topology_read_kubernetes_through_the_kubeconfig() {
    let etcd = EtcdServer::start();
    let memory = strict_api();
    let kube = memory.client();
    let server = memory.serve_http().await;
    for (name, zone) in [("n0", "a"), ("n1", "b"), ("n2", "c")] {
        machine(&kube, name, zone).await;
    }
    let ctx = operator_context(&memory);
    let api: Api<StoreCluster> = Api::namespaced(kube.clone(), "store");
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(cluster_yaml(&etcd.endpoint(), 3))).await.unwrap();
    reconcile_once(&api, &ctx).await;
    reconcile_once(&api, &ctx).await;
    // A second namespace with a cluster that cannot converge (replication 5 on 3 machines).
    let other: Api<StoreCluster> = Api::namespaced(kube.clone(), "other");
    let mut bad = cluster_yaml(&etcd.endpoint(), 5);
    bad["metadata"] = json!({"name": "bad", "namespace": "other"});
    bad["spec"]["writeQuorum"] = json!(3);
    other.patch("bad", &PatchParams::apply("user"), &Patch::Apply(bad)).await.unwrap();
    for _ in 0..2 {
        ctx.caches.machines.synced_with(&ctx.client).await;
        reconcile(Arc::new(other.get("bad").await.unwrap()), ctx.clone()).await.unwrap();
    }

    // Two contexts: the current one points at nothing.
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("config");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: down\n\
             clusters:\n- name: mem\n  cluster: {{server: \"{server}\"}}\n- name: down\n  cluster: {{server: \"http://127.0.0.1:9\"}}\n\
             users:\n- name: me\n  user: {{}}\n\
             contexts:\n- name: mem\n  context: {{cluster: mem, user: me, namespace: store}}\n\
             - name: down\n  context: {{cluster: down, user: me}}\n"
        ),
    )
    .unwrap();
    let file = kubeconfig.to_str().unwrap();

    // The current context: the API server cannot be reached, said plainly.
    let (code, _, err) = cairn(&["status", "--kubeconfig", file], None).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach the Kubernetes API at http://127.0.0.1:9"), "{err}");

    // --context, with the context's namespace; the only StoreCluster there is chosen.
    let (code, out, err) = cairn(&["status", "--kubeconfig", file, "--context", "mem"], None).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("StoreCluster store/c1 (kubernetes)  phase Creating  image cairn:1"), "{out}");
    for node in ["n0", "n1", "n2"] {
        assert!(out.contains(&format!("\n{node} ")), "machine row {node}: {out}");
    }
    assert!(out.contains("datanode n0 is not registered in etcd"), "{out}");
    assert!(out.contains("Partitions: 6 (6 writable, 0 read-only, 6 under-replicated)"), "{out}");
    assert!(out.contains("Reconciled"), "events: {out}");

    // KUBECONFIG is honoured like kubectl does; -o json for scripts.
    let (code, out, _) = cairn(&["status", "c1", "--context", "mem", "-o", "json"], Some(&kubeconfig)).await;
    assert_eq!(code, 0);
    let view: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(view["source"], "kubernetes");
    assert_eq!(view["machines"].as_array().unwrap().len(), 3);
    assert_eq!(view["partitions"]["total"], 6);
    let issues = view["partitionIssues"].as_array().unwrap();
    assert_eq!(issues.len(), 6, "every partition short of live replicas");
    assert_eq!(issues[0]["kind"], "underReplicated");
    let (code, out, _) = cairn(&["status", "--context", "mem", "-o", "yaml"], Some(&kubeconfig)).await;
    assert_eq!(code, 0);
    let yaml: serde_json::Value = serde_yaml::from_str(&out).unwrap();
    assert_eq!(yaml["name"], "c1");

    // -n: the degraded cluster; the exit status says so.
    let (code, out, _) = cairn(&["status", "--kubeconfig", file, "--context", "mem", "-n", "other"], None).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("phase Degraded"), "{out}");
    assert!(out.contains("! Degraded (NotEnoughMachines): replicationFactor 5 needs 5 machines"), "{out}");
    assert!(out.contains("Warning  NotEnoughMachines"), "the Warning event: {out}");

    // Missing resources and unreachable etcd: clear errors, or warnings beside what is known.
    let (code, _, err) = cairn(&["status", "nope", "--kubeconfig", file, "--context", "mem"], None).await;
    assert_eq!(code, 1);
    assert!(err.contains("no StoreCluster \"nope\" in namespace \"store\" (there: c1)"), "{err}");
    let (code, _, err) = cairn(&["status", "--kubeconfig", file, "--context", "mem", "-n", "empty"], None).await;
    assert_eq!(code, 1);
    assert!(err.contains("no StoreCluster in namespace \"empty\""), "{err}");
    let (code, out, _) =
        cairn(&["status", "--kubeconfig", file, "--context", "mem", "--etcd", "http://127.0.0.1:9"], None).await;
    assert_eq!(code, 0, "the operator's status is still shown");
    assert!(out.contains("! etcd [\"http://127.0.0.1:9\"] unreachable"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("n0 ") && l.contains(" pod-not-ready ")), "from the Pods: {out}");
    let (code, _, err) =
        cairn(&["topology", "--kubeconfig", file, "--context", "mem", "--etcd", "http://127.0.0.1:9"], None).await;
    assert_eq!(code, 1);
    assert!(err.contains("unreachable"), "{err}");
    let (code, _, err) = cairn(&["status", "--kubeconfig", "/nonexistent/config"], None).await;
    assert_eq!(code, 1);
    assert!(err.contains("kubeconfig /nonexistent/config"), "{err}");

    // disks: every StoreNode, each disk once; topology: what etcd holds.
    let (code, out, _) = cairn(&["disks", "--kubeconfig", file, "--context", "mem"], None).await;
    assert_eq!(code, 0);
    for node in ["n0", "n1", "n2"] {
        assert!(out.contains(&format!("Node {node}: 1 disk(s)")), "{out}");
        assert!(out.contains(&format!("{node}-disk")), "{out}");
    }
    let (code, out, _) = cairn(&["topology", "--kubeconfig", file, "--context", "mem"], None).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("cluster c1 (etcd revision "), "{out}");
    assert!(out.contains("replication 3 quorum 2, 6 partitions"), "{out}");
}

/// Purge Pods run once (`restartPolicy: Never`) and are named for what they delete: a Pod made
/// for another set of volumes is removed and never counted as done for this one; a failed one is
/// removed and made again; a succeeded one is removed and reported done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_pods_are_made_for_one_set_of_volumes_and_run_once() {
    use cairn_operator::kubernetes::{purge_command, purge_pod_name};
    use cairn_operator::platform::Platform;
    let memory = strict_api();
    let kube = memory.client();
    machine(&kube, "n0", "a").await;
    let api: Api<StoreCluster> = Api::namespaced(kube.clone(), "store");
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(cluster_yaml("http://127.0.0.1:1", 3))).await.unwrap();
    let sc = api.get("c1").await.unwrap();
    let platform = KubernetesPlatform { client: memory.client_as(&operator_user()), cluster: &sc, caches: None };
    let machine = cairn_operator::desired::Machine {
        name: "n0".into(),
        zone: "a".into(),
        disks: vec![],
        address: String::new(),
        selected: true,
        down: None,
    };
    let pods: Api<Pod> = Api::namespaced(kube.clone(), "store");
    let name_for = |partitions: &[u32]| {
        purge_pod_name("c1", "n0", &purge_command("c1", "n0", Some(partitions), cairn_common::agent_api::ADMIN_SOCKET))
    };
    let phase = |name: String, phase: &str| {
        let pods = pods.clone();
        let status = json!({"apiVersion": "v1", "kind": "Pod", "status": {"phase": phase}});
        async move { pods.patch_status(&name, &PatchParams::apply("kubelet"), &Patch::Apply(status)).await.unwrap() }
    };

    assert!(!platform.purge_machine(&machine, Some(&[1])).await.unwrap());
    let first = pods.get(&name_for(&[1])).await.unwrap();
    let labels = first.metadata.labels.clone().unwrap();
    assert_eq!(labels.get("app.kubernetes.io/component").map(String::as_str), Some("purge"), "never a datanode's");
    let tolerations = first.spec.as_ref().unwrap().tolerations.clone().unwrap_or_default();
    assert!(
        tolerations.iter().any(|t| t.operator.as_deref() == Some("Exists") && t.effect.as_deref() == Some("NoExecute")),
        "runs on a node with NoExecute taints: {tolerations:?}"
    );
    assert_eq!(first.spec.as_ref().unwrap().restart_policy.as_deref(), Some("Never"));
    let seccomp = first.spec.as_ref().unwrap().security_context.as_ref().unwrap().seccomp_profile.clone();
    assert_eq!(seccomp.unwrap().type_, "RuntimeDefault");
    let hardened = first.spec.as_ref().unwrap().containers[0].security_context.clone().unwrap();
    assert_eq!(hardened.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
    let command = first.spec.unwrap().containers[0].command.clone().unwrap();
    assert!(command.windows(2).any(|w| w == ["--partition", "1"]), "{command:?}");
    // The set changed (p1 placed there again, p2 retired): the p1 Pod goes, even once succeeded.
    phase(name_for(&[1]), "Succeeded").await;
    assert!(!platform.purge_machine(&machine, Some(&[2])).await.unwrap(), "not done: its own Pod just started");
    assert!(pods.get_opt(&name_for(&[1])).await.unwrap().is_none(), "the stale Pod is removed");
    assert!(pods.get_opt(&name_for(&[2])).await.unwrap().is_some());
    // Failed (a volume still open): removed, and made again on a later pass.
    phase(name_for(&[2]), "Failed").await;
    assert!(!platform.purge_machine(&machine, Some(&[2])).await.unwrap());
    assert!(pods.get_opt(&name_for(&[2])).await.unwrap().is_none());
    assert!(!platform.purge_machine(&machine, Some(&[2])).await.unwrap());
    phase(name_for(&[2]), "Succeeded").await;
    assert!(platform.purge_machine(&machine, Some(&[2])).await.unwrap(), "done");
    assert!(pods.get_opt(&name_for(&[2])).await.unwrap().is_none(), "and cleaned up");
}

/// A pass that changes much (here the first of 90 partitions) says so in one Event whose note the
/// API accepts (at most 1 kB: a longer one is refused, and the Event lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_event_note_is_cut_to_what_the_api_accepts() {
    let etcd = EtcdServer::start();
    let (memory, kube) = strict_api_with([("n0", "a"), ("n1", "b"), ("n2", "c")]).await;
    let api: Api<StoreCluster> = Api::namespaced(kube.clone(), "store");
    let mut spec = cluster_yaml(&etcd.endpoint(), 3);
    spec["spec"]["volumeSize"] = json!("1Gi");
    spec["spec"]["segmentSize"] = json!("256Mi");
    spec["spec"]["partitionsPerDisk"] = json!(30);
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(spec)).await.unwrap();
    let ctx = operator_context(&memory);
    reconcile_once(&api, &ctx).await;
    reconcile_once(&api, &ctx).await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(kube.clone(), "store");
    let all = events.list(&Default::default()).await.unwrap().items;
    let reconciled = all.iter().find(|e| e.reason.as_deref() == Some("Reconciled")).expect("the Reconciled event");
    let note = reconciled.note.clone().unwrap();
    assert!(note.len() <= 1024 && note.ends_with("more bytes)"), "{} bytes: {note}", note.len());
    assert!(note.starts_with("topology: wrote config"), "{note}");
}

/// Node names with dots (EKS) or longer than a DNS label: every Pod name, hostname and label the
/// operator makes from them is one the API accepts, and the advertised names resolve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_names_with_dots_or_too_long_give_valid_resolvable_pods() {
    let etcd = EtcdServer::start();
    let memory = strict_api();
    let kube = memory.client();
    // A valid Node name (a DNS subdomain) longer than a DNS label.
    let long = format!("node-{}.pool-{}.example.internal", "x".repeat(50), "y".repeat(50));
    let names = ["ip-10-0-1-7.eu-west-1.compute.internal", "ip-10-0-1-8.eu-west-1.compute.internal", long.as_str()];
    for (name, zone) in names.iter().zip(["a", "b", "c"]) {
        machine(&kube, name, zone).await;
    }
    let api: Api<StoreCluster> = Api::namespaced(kube.clone(), "store");
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(cluster_yaml(&etcd.endpoint(), 3))).await.unwrap();
    let ctx = operator_context(&memory);
    reconcile_once(&api, &ctx).await;
    reconcile_once(&api, &ctx).await;
    let status = api.get("c1").await.unwrap().status.unwrap();
    assert!(status.conditions.iter().all(|c| c.reason != "WorkloadsFailed"), "{:?}", status.conditions);
    let pods: Api<Pod> = Api::namespaced(kube.clone(), "store");
    let all = pods.list(&Default::default()).await.unwrap().items;
    assert_eq!(all.len(), 3);
    for pod in all {
        let args = pod.spec.unwrap().containers[0].args.clone().unwrap();
        let advertised = args.windows(2).find(|w| w[0] == "--advertise").map(|w| w[1].clone()).unwrap();
        assert!(memory.resolves(advertised.rsplit_once(':').unwrap().0), "{advertised}");
    }
}

/// An object under a name the cluster needs that this StoreCluster does not own (same name,
/// no controller reference to it) is never adopted, changed or deleted: the cluster says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_of_someone_else_are_never_adopted() {
    let etcd = EtcdServer::start();
    let (memory, kube) = strict_api_with([("n0", "a"), ("n1", "b"), ("n2", "c")]).await;
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(kube.clone(), "store");
    let theirs = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c1", "labels": {"team": "web"}},
                        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}});
    services.patch("c1", &PatchParams::apply("someone"), &Patch::Apply(theirs)).await.unwrap();
    let api: Api<StoreCluster> = Api::namespaced(kube.clone(), "store");
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(cluster_yaml(&etcd.endpoint(), 3))).await.unwrap();
    let ctx = operator_context(&memory);
    reconcile_once(&api, &ctx).await;
    reconcile_once(&api, &ctx).await;
    let service = services.get("c1").await.unwrap();
    assert_eq!(service.spec.unwrap().selector.unwrap()["app"], "web", "untouched");
    assert!(service.metadata.owner_references.is_none());
    let status = api.get("c1").await.unwrap().status.unwrap();
    let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "ForeignObjects"));
    assert!(degraded.message.contains("Service store/c1"), "{}", degraded.message);
    // Everything else is made.
    assert!(services.get_opt("c1-nodes").await.unwrap().is_some());
}

/// The peer CA and certificates: made once, owned by the cluster; a CA Secret lost while node
/// certificates from it remain is never silently replaced (peers would refuse each other);
/// deleting the node Secrets too starts a new CA. A Secret of that name someone else made is
/// never used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_peer_ca_is_not_replaced_behind_the_datanodes_backs() {
    use k8s_openapi::api::core::v1::Secret;
    let etcd = EtcdServer::start();
    let (memory, kube) = strict_api_with([("n0", "a"), ("n1", "b"), ("n2", "c")]).await;
    let api: Api<StoreCluster> = Api::namespaced(kube.clone(), "store");
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(cluster_yaml(&etcd.endpoint(), 3))).await.unwrap();
    let ctx = operator_context(&memory);
    reconcile_once(&api, &ctx).await; // the finalizer
    reconcile_once(&api, &ctx).await;
    let secrets: Api<Secret> = Api::namespaced(kube.clone(), "store");
    let ca = secrets.get("c1-peer-ca").await.unwrap();
    let nodes = ["c1-n0-peer-tls", "c1-n1-peer-tls", "c1-n2-peer-tls"];
    for name in nodes {
        let node = secrets.get(name).await.unwrap();
        assert_eq!(node.data.as_ref().unwrap()["ca.crt"], ca.data.as_ref().unwrap()["ca.crt"], "{name}");
    }
    let degraded = |status: cairn_resources::StoreClusterStatus| {
        status.conditions.iter().find(|c| c.type_ == "Degraded" && c.status == "True").map(|c| c.message.clone())
    };
    secrets.delete("c1-peer-ca", &DeleteParams::default()).await.unwrap();
    reconcile_once(&api, &ctx).await;
    let message = degraded(api.get("c1").await.unwrap().status.unwrap()).expect("Degraded");
    assert!(message.contains("is gone while datanode certificates from it remain"), "{message}");
    assert!(secrets.get_opt("c1-peer-ca").await.unwrap().is_none(), "no new CA behind the datanodes' backs");
    // Deliberately: the node Secrets go too, and a new CA issues them all anew.
    for name in nodes {
        secrets.delete(name, &DeleteParams::default()).await.unwrap();
    }
    reconcile_once(&api, &ctx).await;
    let new_ca = secrets.get("c1-peer-ca").await.unwrap();
    assert_ne!(new_ca.data.as_ref().unwrap()["ca.crt"], ca.data.as_ref().unwrap()["ca.crt"]);
    assert!(secrets.get_opt("c1-n0-peer-tls").await.unwrap().is_some());
    // Someone else's Secret under the CA's name: never used or replaced.
    let api2: Api<StoreCluster> = Api::namespaced(kube.clone(), "store");
    let mut other = cluster_yaml(&etcd.endpoint(), 3);
    other["metadata"]["name"] = json!("c2");
    let theirs =
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "c2-peer-ca"}, "data": {"x": "eA=="}});
    secrets.patch("c2-peer-ca", &PatchParams::apply("someone"), &Patch::Apply(theirs)).await.unwrap();
    api2.patch("c2", &PatchParams::apply("user"), &Patch::Apply(other)).await.unwrap();
    for _ in 0..2 {
        let sc = api2.get("c2").await.unwrap();
        reconcile(Arc::new(sc), ctx.clone()).await.unwrap();
    }
    let message = degraded(api2.get("c2").await.unwrap().status.unwrap()).expect("Degraded");
    assert!(message.contains("is not this StoreCluster's"), "{message}");
    assert_eq!(secrets.get("c2-peer-ca").await.unwrap().data.unwrap().keys().collect::<Vec<_>>(), ["x"]);
}

/// A cordon (`kubectl drain` for maintenance) keeps the machine and its data; the
/// `cairn.dev/decommission=true` label drains it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cordon_is_not_a_decommission() {
    let (memory, kube) = strict_api_with([("n0", "a"), ("n1", "b"), ("n2", "c")]).await;
    let api: Api<StoreCluster> = Api::namespaced(kube.clone(), "store");
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(cluster_yaml("http://127.0.0.1:1", 3))).await.unwrap();
    let sc = api.get("c1").await.unwrap();
    let client = memory.client_as(&operator_user());
    let nodes: Api<Node> = Api::all(kube.clone());
    let cordon = json!({"apiVersion": "v1", "kind": "Node", "spec": {"unschedulable": true}});
    nodes.patch("n1", &PatchParams::apply("kubectl"), &Patch::Apply(cordon)).await.unwrap();
    let selected = |machines: Vec<cairn_operator::desired::Machine>| -> Vec<(String, bool)> {
        machines.into_iter().map(|m| (m.name, m.selected)).collect()
    };
    let found = machines_now(&client, &sc).await;
    assert!(selected(found).iter().all(|(_, s)| *s), "cordoned n1 stays selected");
    let decommission =
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"labels": {"cairn.dev/decommission": "true"}}});
    nodes.patch("n1", &PatchParams::apply("admin"), &Patch::Apply(decommission)).await.unwrap();
    let found = machines_now(&client, &sc).await;
    assert_eq!(
        selected(found),
        [("n0".to_string(), true), ("n1".to_string(), false), ("n2".to_string(), true)],
        "labelled for decommission: drained"
    );
}

/// After an operator upgrade, a field the operator used to apply and no longer sends goes from
/// its objects (server-side apply removes what a manager stops sending): a PodDisruptionBudget
/// written with `maxUnavailable` by an older operator ends with `minAvailable` alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_an_older_operator_applied_are_removed() {
    let etcd = EtcdServer::start();
    let (memory, kube) = strict_api_with([("n0", "a"), ("n1", "b"), ("n2", "c")]).await;
    let api: Api<StoreCluster> = Api::namespaced(kube.clone(), "store");
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(cluster_yaml(&etcd.endpoint(), 3))).await.unwrap();
    let sc = api.get("c1").await.unwrap();
    let owner = serde_json::to_value(kube::Resource::controller_owner_ref(&sc, &()).unwrap()).unwrap();
    let pdbs: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> = Api::namespaced(kube.clone(), "store");
    let old = json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "c1", "ownerReferences": [owner]},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/instance": "c1"}}}});
    pdbs.patch("c1", &PatchParams::apply("cairn-operator").force(), &Patch::Apply(old)).await.unwrap();
    let ctx = operator_context(&memory);
    reconcile_once(&api, &ctx).await;
    reconcile_once(&api, &ctx).await;
    let spec = pdbs.get("c1").await.unwrap().spec.unwrap();
    assert!(spec.max_unavailable.is_none(), "{spec:?}");
    assert_eq!(spec.min_available, Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(2)));
}

/// The API refuses what the CRD's own rules refuse, on create and on update (transition rules
/// with `oldSelf`): the operator never sees such a spec.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_what_the_crd_rules_refuse() {
    let memory = strict_api();
    let api: Api<StoreCluster> = Api::namespaced(memory.client(), "store");
    let refused = |result: Result<StoreCluster, kube::Error>, what: &str| match result {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422, "{what}: {e:?}");
            e.message
        }
        other => panic!("{what}: accepted: {other:?}"),
    };
    let mut bad = cluster_yaml("http://e:2379", 3);
    bad["spec"]["writeQuorum"] = json!(3);
    bad["spec"]["replicationFactor"] = json!(2);
    let message = refused(api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(bad)).await, "quorum");
    assert!(message.contains("writeQuorum must not exceed replicationFactor"), "{message}");
    let mut named = cluster_yaml("http://e:2379", 3);
    // Not a name at all: refused as every object's name is.
    named["metadata"]["name"] = json!("Bad.Name");
    let message =
        refused(api.patch("Bad.Name", &PatchParams::apply("user"), &Patch::Apply(named.clone())).await, "name");
    assert!(message.contains("RFC 1123 subdomain"), "{message}");
    // A name, but not one a Service or label can take: refused by the CRD's rule.
    named["metadata"]["name"] = json!("blobs.v2");
    let message = refused(api.patch("blobs.v2", &PatchParams::apply("user"), &Patch::Apply(named)).await, "name");
    assert!(message.contains("DNS-1035"), "{message}");
    // Created, then an immutable field changed: refused, the stored object unchanged.
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(cluster_yaml("http://e:2379", 3))).await.unwrap();
    let mut resized = cluster_yaml("http://e:2379", 3);
    resized["spec"]["segmentSize"] = json!("2Gi");
    let message = refused(api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(resized)).await, "resize");
    assert!(message.contains("segmentSize is immutable"), "{message}");
    assert_eq!(api.get("c1").await.unwrap().spec.segment_size, "1Gi");
}

/// A machine NotReady for longer than `replaceDownMachinesAfter` (30m by default) is no longer
/// selected: its replicas are placed elsewhere; `never` keeps waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_down_too_long_has_its_replicas_placed_elsewhere() {
    let (memory, kube) = strict_api_with([("n0", "a"), ("n1", "b"), ("n2", "c"), ("n3", "a")]).await;
    let nodes: Api<Node> = Api::all(kube.clone());
    let not_ready = |minutes_ago: i64| {
        let since = k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_mins(minutes_ago);
        json!({"apiVersion": "v1", "kind": "Node", "status": {"conditions": [
            {"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown", "lastTransitionTime": since.to_string()}]}})
    };
    let api: Api<StoreCluster> = Api::namespaced(kube.clone(), "store");
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(cluster_yaml("http://127.0.0.1:1", 3))).await.unwrap();
    let client = memory.client_as(&operator_user());
    let down = |machines: Vec<cairn_operator::desired::Machine>| -> Vec<(String, bool, Option<String>)> {
        machines.into_iter().filter(|m| m.name == "n3").map(|m| (m.name, m.selected, m.down)).collect()
    };
    // Away for 10 minutes: still waited for.
    nodes.patch_status("n3", &PatchParams::apply("kubelet"), &Patch::Apply(not_ready(10))).await.unwrap();
    let sc = api.get("c1").await.unwrap();
    let found = down(machines_now(&client, &sc).await);
    assert_eq!(found, [("n3".to_string(), true, None)]);
    // Away for an hour: placed elsewhere.
    nodes.patch_status("n3", &PatchParams::apply("kubelet"), &Patch::Apply(not_ready(60))).await.unwrap();
    let found = down(machines_now(&client, &sc).await);
    assert!(!found[0].1, "{found:?}");
    assert!(found[0].2.as_deref().is_some_and(|why| why.starts_with("NotReady for 6")), "{found:?}");
    // Two machines away at once is an outage, not two broken machines: both are waited for.
    nodes.patch_status("n2", &PatchParams::apply("kubelet"), &Patch::Apply(not_ready(60))).await.unwrap();
    let both: Vec<_> = machines_now(&client, &sc)
        .await
        .into_iter()
        .filter(|m| m.down.is_some())
        .map(|m| (m.name, m.selected, m.down.unwrap()))
        .collect();
    assert_eq!(both.len(), 2, "{both:?}");
    assert!(both.iter().all(|(_, selected, why)| *selected && why.ends_with("waited for")), "{both:?}");
    nodes.patch_status("n2", &PatchParams::apply("kubelet"), &Patch::Apply(not_ready(0))).await.unwrap();
    // `never`: waited for, however long.
    let mut patient = cluster_yaml("http://127.0.0.1:1", 3);
    patient["spec"]["replaceDownMachinesAfter"] = json!("never");
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(patient)).await.unwrap();
    let sc = api.get("c1").await.unwrap();
    let found = down(machines_now(&client, &sc).await);
    assert_eq!(found, [("n3".to_string(), true, None)]);
    // A bad duration is refused by the CRD's rule.
    let mut bad = cluster_yaml("http://127.0.0.1:1", 3);
    bad["spec"]["replaceDownMachinesAfter"] = json!("soon");
    assert!(api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(bad)).await.is_err());
}

/// The real controller, driven by watches of the test API (not single reconcile calls): a new
/// StoreCluster is reconciled, a change to its spec is seen and acted on, and after etcd
/// compacted the watch's history (410 Gone) the controller lists again and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_follows_watches_and_recovers_from_410() {
    let etcd = EtcdServer::start();
    let (memory, kube) = strict_api_with([("n0", "a"), ("n1", "b"), ("n2", "c")]).await;
    let ctx = operator_context(&memory);
    let controller =
        tokio::spawn(cairn_operator::reconcile::run_controller(memory.client_as(&operator_user()), ctx.clone()));
    let api: Api<StoreCluster> = Api::namespaced(kube.clone(), "store");
    let phase = |want: &'static str| {
        let api = api.clone();
        async move {
            // A minute: far less than the 5 minutes a paused cluster is requeued after, and room
            // for the watcher's back-off after a 410 on a loaded machine (CI saw > 20 s).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                let sc = api.get("c1").await.unwrap();
                let phase = sc.status.map(|s| s.phase).unwrap_or_default();
                if phase == want {
                    return;
                }
                assert!(std::time::Instant::now() < deadline, "phase {phase}, waiting for {want}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(cluster_yaml(&etcd.endpoint(), 3))).await.unwrap();
    phase("Creating").await;
    let pods: Api<Pod> = Api::namespaced(kube.clone(), "store");
    assert_eq!(pods.list(&Default::default()).await.unwrap().items.len(), 3, "Pods made from the watch event");
    // A spec change is a watch event; the controller acts on it.
    let mut paused = cluster_yaml(&etcd.endpoint(), 3);
    paused["spec"]["paused"] = json!(true);
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(paused)).await.unwrap();
    phase("Paused").await;
    // History compacted: the watch answers 410 Gone, the controller lists again and still acts —
    // within the wait, far shorter than the 5 minutes a paused cluster is requeued after, so it
    // was the watch that brought the change.
    memory.compact_events();
    let mut resumed = cluster_yaml(&etcd.endpoint(), 3);
    resumed["spec"]["paused"] = json!(false);
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(resumed)).await.unwrap();
    phase("Updating").await;
    controller.abort();
}

/// A machine's StoreNode changing (here: a third machine's disks appear) wakes the controller for
/// every cluster at once, not at its next requeue (30 s while Degraded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_reacts_to_storenodes_at_once() {
    let etcd = EtcdServer::start();
    let (memory, kube) = strict_api_with([("n0", "a"), ("n1", "b")]).await;
    let ctx = operator_context(&memory);
    let controller =
        tokio::spawn(cairn_operator::reconcile::run_controller(memory.client_as(&operator_user()), ctx.clone()));
    let api: Api<StoreCluster> = Api::namespaced(kube.clone(), "store");
    api.patch("c1", &PatchParams::apply("user"), &Patch::Apply(cluster_yaml(&etcd.endpoint(), 3))).await.unwrap();
    let reason = |api: Api<StoreCluster>| async move {
        let status = api.get("c1").await.unwrap().status.unwrap_or_default();
        status.conditions.iter().find(|c| c.type_ == "Degraded" && c.status == "True").map(|c| c.reason.clone())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while reason(api.clone()).await.as_deref() != Some("NotEnoughMachines") {
        assert!(std::time::Instant::now() < deadline, "never Degraded");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    machine(&kube, "n2", "c").await;
    let started = std::time::Instant::now();
    while reason(api.clone()).await.is_some() {
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "the new machine was not seen at once");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    controller.abort();
}

fn access_key_yaml(namespace: &str, name: &str, scopes: &[&str], extra: serde_json::Value) -> serde_json::Value {
    let mut spec = json!({"cluster": {"name": "c1", "namespace": "store"}, "scopes": scopes});
    spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "StoreAccessKey",
           "metadata": {"name": name, "namespace": namespace}, "spec": spec})
}

/// A StoreAccessKey becomes a key in its cluster's etcd, its token in a Secret it owns: the record
/// holds the hash of exactly the Secret's secret; scopes follow the spec; a deleted Secret is a
/// new key and the old one revoked; deleting the resource revokes the key. Keys from another
/// namespace need the cluster's leave and are never admin keys; a Secret the key did not make is
/// never overwritten. The operator runs as the chart's ServiceAccount (no list/watch of Secrets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_access_keys_become_etcd_keys_with_their_token_in_a_secret() {
    use cairn_cluster::access::Scope;
    use cairn_operator::access_keys::{
        reconcile_key, SECRET_CA, SECRET_ENDPOINT, SECRET_KEY_ID, SECRET_KEY_SECRET, SECRET_TOKEN,
    };
    use cairn_resources::StoreAccessKey;
    use k8s_openapi::api::core::v1::Secret;
    let etcd = EtcdServer::start();
    let memory = strict_api();
    let kube = memory.client();
    let mut cluster = cluster_yaml(&etcd.endpoint(), 3);
    cluster["spec"]["accessKeyNamespaces"] = json!(["apps"]);
    let clusters: Api<StoreCluster> = Api::namespaced(kube.clone(), "store");
    clusters.patch("c1", &PatchParams::apply("user"), &Patch::Apply(cluster)).await.unwrap();
    let ctx = operator_context(&memory);
    let store = cairn_cluster::etcd::ClusterStore::connect(&[etcd.endpoint()], "store", "c1").await.unwrap();
    let keys = |ns: &str| Api::<StoreAccessKey>::namespaced(kube.clone(), ns);
    let secrets = |ns: &str| Api::<Secret>::namespaced(kube.clone(), ns);
    let apply = |ns: &str, name: &str, scopes: &[&str], extra: serde_json::Value| {
        let (api, body) = (keys(ns), access_key_yaml(ns, name, scopes, extra));
        let name = name.to_owned();
        async move { api.patch(&name, &PatchParams::apply("user"), &Patch::Apply(body)).await }
    };
    let pass = |ns: &str, name: &str| {
        let (api, ctx, name) = (keys(ns), ctx.clone(), name.to_owned());
        async move { reconcile_key(Arc::new(api.get(&name).await.unwrap()), ctx).await.unwrap() }
    };
    let field = |s: &Secret, k: &str| String::from_utf8(s.data.as_ref().unwrap()[k].0.clone()).unwrap();
    let ready = |k: &StoreAccessKey| {
        let c = k.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "Ready").unwrap().clone();
        (c.status, c.reason)
    };

    // The schema is the API server's: a scope twice, or one that does not exist, is refused.
    for bad in [&["read", "read"][..], &["root"], &[]] {
        let err = apply("apps", "bad", bad, json!({})).await.unwrap_err().to_string();
        assert!(err.contains("is invalid"), "{bad:?}: {err}");
    }

    apply("apps", "uploader", &["read", "write"], json!({})).await.unwrap();
    pass("apps", "uploader").await; // the finalizer
    pass("apps", "uploader").await;
    let secret = secrets("apps").get("uploader").await.unwrap();
    let (id, secret_text) = (field(&secret, SECRET_KEY_ID), field(&secret, SECRET_KEY_SECRET));
    assert_eq!(field(&secret, SECRET_TOKEN), format!("{id}.{secret_text}"));
    assert_eq!(field(&secret, SECRET_ENDPOINT), "http://c1.store.svc:7480");
    let key = keys("apps").get("uploader").await.unwrap();
    assert_eq!(secret.owner_references()[0].uid, key.metadata.uid.clone().unwrap(), "goes with its key");
    let record = store.get_key(&id).await.unwrap().expect("the key is in etcd");
    assert!(record.verify(&secret_text), "etcd holds the hash of the Secret's secret");
    assert!(!record.verify("x".repeat(40).as_str()));
    let scopes = |r: &cairn_cluster::access::AccessKey| r.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>();
    assert_eq!(scopes(&record), ["read", "write"]);
    assert_eq!(record.name, "StoreAccessKey apps/uploader");
    assert_eq!(ready(&key), ("True".into(), "KeyReady".into()));
    assert_eq!(key.status.as_ref().unwrap().key_id.as_deref(), Some(id.as_str()));

    // Converged: a pass writes nothing.
    let before = ctx.writes.load(Ordering::Relaxed);
    pass("apps", "uploader").await;
    assert_eq!(ctx.writes.load(Ordering::Relaxed), before, "nothing written when nothing changed");

    // Scopes follow the spec; the key and its secret stay.
    apply("apps", "uploader", &["read"], json!({})).await.unwrap();
    pass("apps", "uploader").await;
    assert_eq!(scopes(&store.get_key(&id).await.unwrap().unwrap()), ["read"]);
    // A reach limited to partitions is written as a format-2 record (an older datanode refuses
    // it rather than granting it everywhere).
    apply("apps", "uploader", &["read"], json!({"partitions": [3, 1]})).await.unwrap();
    pass("apps", "uploader").await;
    let limited = store.get_key(&id).await.unwrap().unwrap();
    assert_eq!((limited.format, limited.partitions.clone()), (2, Some([1, 3].into())));
    apply("apps", "uploader", &["read"], json!({})).await.unwrap();
    pass("apps", "uploader").await;
    let unlimited = store.get_key(&id).await.unwrap().unwrap();
    assert_eq!((unlimited.format, unlimited.partitions), (1, None));
    assert_eq!(field(&secrets("apps").get("uploader").await.unwrap(), SECRET_KEY_ID), id);

    // The cluster turns HTTPS on: the same key, its Secret told the https endpoint and the CA to
    // trust (the cluster's own, made by the pass); turned off again, the CA goes from the Secret.
    let mut with_tls = cluster_yaml(&etcd.endpoint(), 3);
    with_tls["spec"]["accessKeyNamespaces"] = json!(["apps"]);
    with_tls["spec"]["tls"] = json!({});
    clusters.patch("c1", &PatchParams::apply("user"), &Patch::Apply(with_tls)).await.unwrap();
    // The key's pass only reads the CA: until the cluster's pass has made it, the key waits.
    pass("apps", "uploader").await;
    assert_eq!(ready(&keys("apps").get("uploader").await.unwrap()), ("False".into(), "TlsUnavailable".into()));
    assert_eq!(field(&secrets("apps").get("uploader").await.unwrap(), SECRET_ENDPOINT), "http://c1.store.svc:7480");
    for _ in 0..2 {
        let _ = reconcile(Arc::new(clusters.get("c1").await.unwrap()), ctx.clone()).await;
    }
    pass("apps", "uploader").await;
    let told = secrets("apps").get("uploader").await.unwrap();
    assert_eq!(field(&told, SECRET_ENDPOINT), "https://c1.store.svc:7480");
    let ca = secrets("store").get("c1-peer-ca").await.unwrap();
    assert_eq!(field(&told, SECRET_CA), field(&ca, "ca.crt"));
    assert_eq!(field(&told, SECRET_KEY_ID), id, "the same key");
    let before = ctx.writes.load(Ordering::Relaxed);
    pass("apps", "uploader").await;
    assert_eq!(ctx.writes.load(Ordering::Relaxed), before, "told once");
    let mut without = cluster_yaml(&etcd.endpoint(), 3);
    without["spec"]["accessKeyNamespaces"] = json!(["apps"]);
    clusters.patch("c1", &PatchParams::apply("user"), &Patch::Apply(without)).await.unwrap();
    pass("apps", "uploader").await;
    let untold = secrets("apps").get("uploader").await.unwrap();
    assert_eq!(field(&untold, SECRET_ENDPOINT), "http://c1.store.svc:7480");
    assert!(!untold.data.as_ref().unwrap().contains_key(SECRET_CA), "the CA is gone with HTTPS");
    let before = ctx.writes.load(Ordering::Relaxed);
    pass("apps", "uploader").await;
    assert_eq!(ctx.writes.load(Ordering::Relaxed), before, "told once");

    // Rotation: the Secret deleted, a new key made and the old one revoked.
    secrets("apps").delete("uploader", &DeleteParams::default()).await.unwrap();
    pass("apps", "uploader").await;
    let rotated = secrets("apps").get("uploader").await.unwrap();
    let new_id = field(&rotated, SECRET_KEY_ID);
    assert_ne!(new_id, id);
    assert!(store.get_key(&id).await.unwrap().is_none(), "the old key is revoked");
    assert!(store.get_key(&new_id).await.unwrap().unwrap().verify(&field(&rotated, SECRET_KEY_SECRET)));

    // Refusals, as conditions; nothing made.
    apply("apps", "root", &["admin"], json!({})).await.unwrap();
    apply("web", "site", &["read"], json!({})).await.unwrap();
    let user_secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "taken", "namespace": "apps"},
                             "stringData": {"mine": "do not touch"}});
    secrets("apps").patch("taken", &PatchParams::apply("user"), &Patch::Apply(user_secret)).await.unwrap();
    apply("apps", "squatter", &["read"], json!({"secretName": "taken"})).await.unwrap();
    for (ns, name, reason) in [
        ("apps", "root", "AdminNotAllowed"),
        ("web", "site", "NamespaceNotAllowed"),
        ("apps", "squatter", "SecretConflict"),
    ] {
        pass(ns, name).await;
        pass(ns, name).await;
        assert_eq!(ready(&keys(ns).get(name).await.unwrap()), ("False".into(), reason.into()), "{ns}/{name}");
    }
    assert!(secrets("apps").get_opt("root").await.unwrap().is_none());
    assert!(secrets("web").get_opt("site").await.unwrap().is_none());
    let taken = secrets("apps").get("taken").await.unwrap();
    assert_eq!(field(&taken, "mine"), "do not touch");
    assert!(taken.data.as_ref().unwrap().get(SECRET_KEY_ID).is_none(), "a Secret it did not make is left alone");

    // A Secret of the key's that no longer holds a key (edited by hand) gets a new one.
    let broken = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "uploader", "namespace": "apps"},
                        "data": {SECRET_KEY_SECRET: null}});
    secrets("apps").patch("uploader", &PatchParams::default(), &Patch::Merge(broken)).await.unwrap();
    pass("apps", "uploader").await;
    let repaired = secrets("apps").get("uploader").await.unwrap();
    let (repaired_id, repaired_secret) = (field(&repaired, SECRET_KEY_ID), field(&repaired, SECRET_KEY_SECRET));
    assert!(store.get_key(&repaired_id).await.unwrap().unwrap().verify(&repaired_secret));
    assert!(store.get_key(&new_id).await.unwrap().is_none(), "the key whose secret was lost is revoked");
    let new_id = repaired_id;

    // The controller itself, on watches: a key waiting for its cluster is made once the cluster
    // appears (a StoreCluster event wakes the keys naming it), not at its next resync.
    let controller =
        tokio::spawn(cairn_operator::access_keys::run_key_controller(memory.client_as(&operator_user()), ctx.clone()));
    let late = json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "StoreAccessKey",
                      "metadata": {"name": "late", "namespace": "store"},
                      "spec": {"cluster": {"name": "c2"}, "scopes": ["admin"]}});
    keys("store").patch("late", &PatchParams::apply("user"), &Patch::Apply(late)).await.unwrap();
    let wait_for = |want: &'static str| {
        let api = keys("store");
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
            loop {
                let key = api.get("late").await.unwrap();
                let reason = key.status.as_ref().and_then(|s| s.conditions.first()).map(|c| c.reason.clone());
                if reason.as_deref() == Some(want) {
                    return;
                }
                assert!(std::time::Instant::now() < deadline, "{reason:?}, waiting for {want}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };
    wait_for("ClusterNotFound").await;
    let mut c2 = cluster_yaml(&etcd.endpoint(), 3);
    c2["metadata"]["name"] = json!("c2");
    clusters.patch("c2", &PatchParams::apply("user"), &Patch::Apply(c2)).await.unwrap();
    wait_for("KeyReady").await;
    let late_secret = secrets("store").get("late").await.unwrap();
    let c2_store = cairn_cluster::etcd::ClusterStore::connect(&[etcd.endpoint()], "store", "c2").await.unwrap();
    let late_key = c2_store.get_key(&field(&late_secret, SECRET_KEY_ID)).await.unwrap().unwrap();
    assert!(late_key.verify(&field(&late_secret, SECRET_KEY_SECRET)) && scopes(&late_key) == ["admin"]);
    controller.abort();

    // Every grant the chart gives the operator for keys is used here (the other test accounts for
    // the rest).
    let used = memory.accessed(&operator_user());
    for (verb, group, resource) in [
        ("get", "cairn.dev", "storeclusters"),
        ("list", "cairn.dev", "storeaccesskeys"),
        ("watch", "cairn.dev", "storeaccesskeys"),
        ("patch", "cairn.dev", "storeaccesskeys"),
        ("patch", "cairn.dev", "storeaccesskeys/status"),
        ("create", "", "secrets"),
        ("patch", "", "secrets"),
    ] {
        assert!(used.contains(&(verb.into(), group.into(), resource.into())), "{verb} {group}/{resource} unused");
    }

    // An id written into the key's Secret by hand (another key's) takes nothing over.
    let (victim, _) = cairn_cluster::access::AccessKey::generate("victim", [Scope::Read].into(), 1).unwrap();
    store.put_key(&victim).await.unwrap();
    let hijack = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "uploader", "namespace": "apps"},
                        "stringData": {SECRET_KEY_ID: victim.id.clone()}});
    secrets("apps").patch("uploader", &PatchParams::default(), &Patch::Merge(hijack)).await.unwrap();
    pass("apps", "uploader").await;
    assert_eq!(ready(&keys("apps").get("uploader").await.unwrap()), ("False".into(), "KeyConflict".into()));
    assert_eq!(store.get_key(&victim.id).await.unwrap().as_ref(), Some(&victim), "untouched");
    let restore = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "uploader", "namespace": "apps"},
                         "stringData": {SECRET_KEY_ID: new_id.clone()}});
    secrets("apps").patch("uploader", &PatchParams::default(), &Patch::Merge(restore)).await.unwrap();
    pass("apps", "uploader").await;
    assert_eq!(ready(&keys("apps").get("uploader").await.unwrap()).0, "True");

    // Deleting the resource revokes the key; the Secret goes with it.
    keys("apps").delete("uploader", &DeleteParams::default()).await.unwrap();
    pass("apps", "uploader").await;
    assert!(keys("apps").get_opt("uploader").await.unwrap().is_none(), "the finalizer is done");
    assert!(store.get_key(&new_id).await.unwrap().is_none(), "revoked");
    assert!(secrets("apps").get_opt("uploader").await.unwrap().is_none(), "garbage collected");
    assert!(store.get_key(&victim.id).await.unwrap().is_some(), "revoking revokes only the key's own");

    // A cluster that no longer lets a namespace in: that namespace's keys are revoked at once.
    apply("apps", "tenant", &["read"], json!({})).await.unwrap();
    pass("apps", "tenant").await;
    pass("apps", "tenant").await;
    let tenant_id = field(&secrets("apps").get("tenant").await.unwrap(), SECRET_KEY_ID);
    assert!(store.get_key(&tenant_id).await.unwrap().is_some());
    let mut closed = cluster_yaml(&etcd.endpoint(), 3);
    closed["spec"]["accessKeyNamespaces"] = json!([]);
    clusters.patch("c1", &PatchParams::apply("user"), &Patch::Apply(closed)).await.unwrap();
    pass("apps", "tenant").await;
    assert_eq!(ready(&keys("apps").get("tenant").await.unwrap()), ("False".into(), "NamespaceNotAllowed".into()));
    assert!(store.get_key(&tenant_id).await.unwrap().is_none(), "revoked, not only reported");
}

/// `spec.s3`: every datanode serves S3 on 7680 (its region and domain from the spec), the
/// Services and the NetworkPolicy's client rule carry the port, and StoreAccessKeys' Secrets tell
/// S3 clients what the AWS SDKs read (a key limited to partitions gets none: it cannot sign S3).
/// A key's `spec.buckets` becomes its grants in etcd; grants a key cannot have are `InvalidSpec`,
/// and names S3 would refuse are refused by the API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_is_served_on_kubernetes_and_keys_are_told_how_to_reach_it() {
    use cairn_cluster::access::Scope;
    use cairn_operator::access_keys::{
        reconcile_key, SECRET_AWS_DEFAULT_REGION, SECRET_AWS_ENDPOINT, SECRET_AWS_KEY_ID, SECRET_AWS_REGION,
        SECRET_AWS_SECRET, SECRET_KEY_ID, SECRET_KEY_SECRET,
    };
    use cairn_resources::StoreAccessKey;
    use k8s_openapi::api::core::v1::{Secret, Service};
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let etcd = EtcdServer::start();
    let (memory, kube) = strict_api_with([("n0", "a"), ("n1", "b"), ("n2", "c")]).await;
    let clusters: Api<StoreCluster> = Api::namespaced(kube.clone(), "store");
    let with_s3 = |s3: Option<serde_json::Value>| {
        let mut cluster = cluster_yaml(&etcd.endpoint(), 3);
        if let Some(s3) = s3 {
            cluster["spec"]["s3"] = s3;
        }
        cluster
    };
    // The API server holds the spec to the CRD's rules.
    for bad in [json!({"region": "EU West"}), json!({"domain": "-s3.example.com"})] {
        let err = clusters
            .patch("c1", &PatchParams::apply("user"), &Patch::Apply(with_s3(Some(bad.clone()))))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("is invalid"), "{bad}: {err}");
    }
    let s3 = json!({"region": "eu-west-3", "domain": "s3.example.com"});
    clusters.patch("c1", &PatchParams::apply("user"), &Patch::Apply(with_s3(Some(s3)))).await.unwrap();
    let ctx = operator_context(&memory);
    reconcile_once(&clusters, &ctx).await;
    reconcile_once(&clusters, &ctx).await;

    let pods: Api<Pod> = Api::namespaced(kube.clone(), "store");
    let pairs = |args: &[String]| args.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect::<Vec<_>>();
    for node in ["n0", "n1", "n2"] {
        let container = pods.get(&format!("c1-{node}")).await.unwrap().spec.unwrap().containers[0].clone();
        let args = pairs(&container.args.unwrap());
        for (flag, value) in
            [("--s3-listen", "0.0.0.0:7680"), ("--s3-region", "eu-west-3"), ("--s3-domain", "s3.example.com")]
        {
            assert!(args.contains(&(flag.into(), value.into())), "{flag} {value}: {args:?}");
        }
        let ports: Vec<_> =
            container.ports.unwrap().iter().map(|p| (p.name.clone().unwrap(), p.container_port)).collect();
        assert!(ports.contains(&("s3".into(), 7680)), "{ports:?}");
    }
    let services: Api<Service> = Api::namespaced(kube.clone(), "store");
    for name in ["c1", "c1-nodes"] {
        let ports = services.get(name).await.unwrap().spec.unwrap().ports.unwrap();
        assert!(ports.iter().any(|p| p.name.as_deref() == Some("s3") && p.port == 7680), "{name}: {ports:?}");
    }
    let policy = Api::<NetworkPolicy>::namespaced(kube.clone(), "store").get("c1").await.unwrap();
    let rules = policy.spec.unwrap().ingress.unwrap();
    let ports_of = |i: usize| -> Vec<String> {
        rules[i].ports.clone().unwrap().iter().map(|p| format!("{:?}", p.port.clone().unwrap())).collect()
    };
    assert_eq!(ports_of(0), ["Int(7480)", "Int(7680)"], "S3 is for the blob API's clients");
    assert_eq!(ports_of(1), ["Int(7481)"], "the peer port stays the datanodes'");

    // Keys: a read-write key limited to two buckets, and one limited to partitions.
    let keys = Api::<StoreAccessKey>::namespaced(kube.clone(), "store");
    let secrets = Api::<Secret>::namespaced(kube.clone(), "store");
    let apply = |name: &str, scopes: &[&str], extra: serde_json::Value| {
        let (api, body, name) = (keys.clone(), access_key_yaml("store", name, scopes, extra), name.to_owned());
        async move { api.patch(&name, &PatchParams::apply("user"), &Patch::Apply(body)).await }
    };
    let pass = |name: &str| {
        let (api, ctx, name) = (keys.clone(), ctx.clone(), name.to_owned());
        async move {
            let key = api.get(&name).await.unwrap();
            reconcile_key(Arc::new(key), ctx.clone()).await.unwrap();
            let key = api.get(&name).await.unwrap();
            reconcile_key(Arc::new(key), ctx).await.unwrap();
            let key = api.get(&name).await.unwrap();
            let c = key.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
            (c.reason, c.message)
        }
    };
    let field = |s: &Secret, k: &str| s.data.as_ref().unwrap().get(k).map(|v| String::from_utf8(v.0.clone()).unwrap());
    // Names S3 would refuse, and a bucket twice, are the API server's to refuse.
    for bad in [
        json!({"buckets": [{"name": "Photos"}]}),
        json!({"buckets": [{"name": "ab"}]}),
        json!({"buckets": [{"name": "photos"}, {"name": "photos", "scopes": ["read"]}]}),
        json!({"buckets": []}),
    ] {
        let err = apply("bad", &["read"], bad.clone()).await.unwrap_err().to_string();
        assert!(err.contains("is invalid") || err.contains("Duplicate"), "{bad}: {err}");
    }
    let grants = json!({"buckets": [{"name": "photos"}, {"name": "shared", "scopes": ["read"]}]});
    apply("web", &["read", "write"], grants).await.unwrap();
    assert_eq!(pass("web").await.0, "KeyReady");
    let secret = secrets.get("web").await.unwrap();
    let id = field(&secret, SECRET_KEY_ID).unwrap();
    let store = cairn_cluster::etcd::ClusterStore::connect(&[etcd.endpoint()], "store", "c1").await.unwrap();
    let record = store.get_key(&id).await.unwrap().unwrap();
    assert_eq!(record.format, 3);
    assert_eq!(
        record.buckets,
        Some([("photos".into(), [Scope::Read, Scope::Write].into()), ("shared".into(), [Scope::Read].into())].into())
    );
    // What the AWS SDKs read: the id, the S3 secret every datanode derives from the record, the
    // Service's S3 endpoint and the region.
    assert_eq!(field(&secret, SECRET_AWS_KEY_ID), Some(id.clone()));
    let expected = cairn_cluster::access::s3_secret(&record).expose().to_owned();
    assert_eq!(field(&secret, SECRET_AWS_SECRET), Some(expected));
    assert_eq!(field(&secret, SECRET_AWS_ENDPOINT).as_deref(), Some("http://c1.store.svc:7680"));
    assert_eq!(field(&secret, SECRET_AWS_REGION).as_deref(), Some("eu-west-3"));
    assert_eq!(field(&secret, SECRET_AWS_DEFAULT_REGION).as_deref(), Some("eu-west-3"), "what boto3 reads");
    assert!(record.verify(&field(&secret, SECRET_KEY_SECRET).unwrap()));

    apply("tenant", &["read"], json!({"partitions": [0]})).await.unwrap();
    assert_eq!(pass("tenant").await.0, "KeyReady");
    let tenant = secrets.get("tenant").await.unwrap();
    for aws in [SECRET_AWS_KEY_ID, SECRET_AWS_SECRET, SECRET_AWS_ENDPOINT, SECRET_AWS_REGION, SECRET_AWS_DEFAULT_REGION]
    {
        assert_eq!(field(&tenant, aws), None, "{aws}: a key limited to partitions cannot sign S3");
    }
    // Grants a key cannot have are the API server's to refuse (the CRD's rules)...
    for (scopes, extra, why) in [
        (&["read", "write"][..], json!({"buckets": [{"name": "photos", "scopes": ["delete"]}]}), "among the key's"),
        (&["admin"], json!({"buckets": [{"name": "photos"}]}), "cannot be an admin"),
        (&["read"], json!({"buckets": [{"name": "photos"}], "partitions": [1]}), "not both"),
        (&["read"], json!({"buckets": [{"name": "a..b"}]}), "two adjacent periods"),
    ] {
        let err = apply("web", scopes, extra.clone()).await.unwrap_err().to_string();
        assert!(err.contains(why), "{extra}: {err}");
    }
    assert_eq!(store.get_key(&id).await.unwrap().unwrap(), record, "a refused spec changes nothing");
    // ...and what only S3's rules know is the operator's: the key is revoked (a spec meant to
    // narrow it must not leave it wider), and comes back once the spec is one it can have.
    apply("web", &["read", "write"], json!({"buckets": [{"name": "192.168.5.4"}]})).await.unwrap();
    let (reason, message) = pass("web").await;
    assert_eq!(reason, "InvalidSpec", "{message}");
    assert!(message.contains("not an IP address"), "{message}");
    assert!(store.get_key(&id).await.unwrap().is_none(), "revoked, not left as it was");
    apply("web", &["read", "write"], json!({"buckets": [{"name": "photos"}, {"name": "shared", "scopes": ["read"]}]}))
        .await
        .unwrap();
    assert_eq!(pass("web").await.0, "KeyReady");
    let back = store.get_key(&id).await.unwrap().unwrap();
    assert_eq!(
        (back.buckets.clone(), back.verify(&field(&secret, SECRET_KEY_SECRET).unwrap())),
        (record.buckets.clone(), true)
    );

    // S3 turned off: the datanodes stop serving it and the Secrets forget it; the key stays.
    clusters.patch("c1", &PatchParams::apply("user"), &Patch::Apply(with_s3(None))).await.unwrap();
    reconcile_once(&clusters, &ctx).await;
    // Datanode Pods are replaced one at a time, each once its peers caught up: what they become.
    let sc = clusters.get("c1").await.unwrap();
    let desired = cairn_operator::kubernetes::objects(&sc, &machines_now(&kube, &sc).await);
    let pod = desired.iter().find(|(_, name, _)| name == "c1-n0").unwrap();
    let args = pod.2["spec"]["containers"][0]["args"].as_array().unwrap();
    assert!(!args.iter().any(|a| a.as_str().unwrap().starts_with("--s3")), "{args:?}");
    let ports = services.get("c1").await.unwrap().spec.unwrap().ports.unwrap();
    assert!(ports.iter().all(|p| p.name.as_deref() != Some("s3")), "{ports:?}");
    apply("web", &["read", "write"], json!({"buckets": [{"name": "photos"}]})).await.unwrap();
    assert_eq!(pass("web").await.0, "KeyReady");
    let untold = secrets.get("web").await.unwrap();
    assert_eq!(field(&untold, SECRET_KEY_ID), Some(id));
    for aws in [SECRET_AWS_KEY_ID, SECRET_AWS_SECRET, SECRET_AWS_ENDPOINT, SECRET_AWS_REGION, SECRET_AWS_DEFAULT_REGION]
    {
        assert_eq!(field(&untold, aws), None, "{aws} gone with S3");
    }
}
