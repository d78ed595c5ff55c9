//! `cairn-bench operator`: planning and reconciles for 100 machines in 3 zones and 10,000
//! partitions (simulated inventories in an in-memory Kubernetes API, a real etcd).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use cairn_cluster::topology::Topology;
use cairn_common::agent_api::DiskReport;
use cairn_operator::desired::{desired, Machine};
use cairn_operator::reconcile::{reconcile, Context};
use cairn_resources::{StoreCluster, StoreNode, StoreNodeSpec, StoreNodeStatus};
use cairn_testkit::etcd::EtcdServer;
use cairn_testkit::MemoryApi;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::Scenario;

#[derive(clap::Args)]
pub struct Options {
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value_t = 100)]
    machines: usize,
    #[arg(long, default_value_t = 100)]
    partitions_per_disk: u32,
}

const GIB: u64 = 1 << 30;

fn disk(machine: usize) -> DiskReport {
    DiskReport {
        id: format!("disk-{machine:03}"),
        device: "/dev/nvme0n1".into(),
        fs_type: "xfs".into(),
        canonical_mount: "/mnt/disk0".into(),
        total_bytes: 4096 * GIB,
        available_bytes: 4000 * GIB,
        allocatable_bytes: 3800 * GIB,
        usable: true,
        ..DiskReport::default()
    }
}

pub async fn run(options: Options) -> anyhow::Result<Vec<Scenario>> {
    let etcd = tokio::task::spawn_blocking(EtcdServer::start).await?;
    let spec_json = json!({"image": "cairn:1", "volumeSize": "8Gi", "segmentSize": "1Gi", "replicationFactor": 3,
                           "writeQuorum": 2, "partitionsPerDisk": options.partitions_per_disk,
                           "etcd": {"endpoints": [etcd.endpoint()]}});
    let spec: cairn_resources::StoreClusterSpec = serde_json::from_value(spec_json.clone())?;
    let machines: Vec<Machine> = (0..options.machines)
        .map(|i| Machine {
            name: format!("node-{i:03}"),
            zone: ["a", "b", "c"][i % 3].into(),
            disks: vec![disk(i)],
            address: format!("node-{i:03}:7480"),
            selected: true,
            down: None,
        })
        .collect();

    // Planning alone: desired config and nodes, then placement.
    let started = Instant::now();
    let plan = desired("bench", &spec, &machines, &Topology::default()).map_err(anyhow::Error::msg)?;
    let placed = cairn_cluster::planner::plan(&plan.config, &plan.nodes, &Default::default())?;
    let plan_secs = started.elapsed().as_secs_f64();

    // The same through the controller's reconcile, against an in-memory API and real etcd.
    let memory = {
        use kube::CustomResourceExt;
        MemoryApi::new().with_crd(&StoreCluster::crd()).with_crd(&StoreNode::crd())
    };
    let kube = memory.client();
    let nodes: Api<Node> = Api::all(kube.clone());
    let store_nodes: Api<StoreNode> = Api::all(kube.clone());
    let apply = PatchParams::apply("bench");
    for (i, m) in machines.iter().enumerate() {
        let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": m.name,
                          "labels": {"topology.kubernetes.io/zone": m.zone}}});
        nodes.patch(&m.name, &apply, &Patch::Apply(node)).await?;
        let sn = StoreNode::new(&m.name, StoreNodeSpec { node_name: m.name.clone() });
        store_nodes.patch(&m.name, &apply, &Patch::Apply(&sn)).await?;
        let status = StoreNodeStatus { disks: vec![disk(i)], ..StoreNodeStatus::default() };
        let patch = json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "StoreNode", "status": status});
        store_nodes.patch_status(&m.name, &apply, &Patch::Apply(patch)).await?;
    }
    let clusters: Api<StoreCluster> = Api::namespaced(kube.clone(), "bench");
    let sc = json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "StoreCluster",
                    "metadata": {"name": "bench", "namespace": "bench"}, "spec": spec_json});
    clusters.patch("bench", &apply, &Patch::Apply(sc)).await?;
    let ctx = Arc::new(Context::new(kube.clone()));
    let once = |ctx: Arc<Context>| {
        let clusters = clusters.clone();
        async move {
            let sc = clusters.get("bench").await?;
            ctx.caches.machines.synced_with(&ctx.client).await;
            let started = Instant::now();
            reconcile(Arc::new(sc), ctx).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            anyhow::Ok(started.elapsed().as_secs_f64())
        }
    };
    once(ctx.clone()).await?; // finalizer
    let first = once(ctx.clone()).await?;
    let before = ctx.writes.load(Ordering::SeqCst);
    let converged = once(ctx.clone()).await?;
    let converged_writes = ctx.writes.load(Ordering::SeqCst) - before;
    let store = cairn_cluster::etcd::ClusterStore::connect(&[etcd.endpoint()], "bench", "bench").await?;
    let in_etcd = store.load().await?.topology.partitions.len();
    anyhow::ensure!(in_etcd == placed.len(), "etcd holds {in_etcd} partitions, planned {}", placed.len());

    // Under traffic: every datanode live and caught up, their registrations rewritten between
    // passes as blobs arrive (etcd's revision moves); a converged pass must still write nothing.
    let topology = store.load().await?.topology;
    let progress: std::collections::BTreeMap<String, Vec<u32>> =
        machines.iter().map(|m| (m.name.clone(), topology.partitions_of(&m.name).map(|p| p.id).collect())).collect();
    let progress = Arc::new(progress);
    let app = axum::Router::new().route(
        "/n/{node}/v1/admin/replicas",
        axum::routing::get(move |axum::extract::Path(node): axum::extract::Path<String>| {
            let progress = progress.clone();
            async move {
                let caught_up: Vec<serde_json::Value> = progress[&node]
                    .iter()
                    .map(|p| json!({"partition": p, "peer": "x", "peer_tail": 1, "lag_entries": 0}))
                    .collect();
                axum::Json(caught_up)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let stub = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut registrations = Vec::new();
    for m in &machines {
        let live = cairn_cluster::LiveNode {
            node: m.name.clone(),
            address: format!("{stub}/n/{}", m.name),
            zone: m.zone.clone(),
            ..cairn_cluster::LiveNode::default()
        };
        let (tx, rx) = tokio::sync::watch::channel(live);
        registrations.push(tx);
        let (store, cancel) = (store.clone(), cancel.clone());
        tokio::spawn(async move { store.keep_registered(rx, 10, cancel).await });
    }
    while store.load().await?.live.len() < machines.len() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    once(ctx.clone()).await?; // Ready now: the status says so once
    let (before, status_before) =
        (ctx.writes.load(Ordering::SeqCst), memory.status_writes("storeclusters", "bench", "bench"));
    let mut traffic_secs = 0.0;
    const ROUNDS: u64 = 3;
    for round in 1..=ROUNDS {
        let revision = store.load().await?.revision;
        for tx in &registrations {
            tx.send_modify(|l| {
                l.free_bytes.insert(0, round << 30);
            });
        }
        while store.load().await?.revision < revision + machines.len() as i64 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        traffic_secs += once(ctx.clone()).await?;
    }
    cancel.cancel();
    let traffic_writes = ctx.writes.load(Ordering::SeqCst) - before
        + (memory.status_writes("storeclusters", "bench", "bench") - status_before);
    let ready = clusters.get("bench").await?.status.map(|s| s.phase).unwrap_or_default();
    anyhow::ensure!(ready == "Ready", "under traffic the cluster is {ready}, not Ready");

    let what = format!("{} machines in 3 zones, {} partitions × 3 replicas", options.machines, placed.len());
    let mut plan_row = Scenario::new("plan_100x10k", plan_secs, "s");
    plan_row.note = Some(format!("{what}: desired state + placement (target < 1 s)"));
    let mut first_row = Scenario::new("reconcile_first", first, "s");
    first_row.note =
        Some(format!("{what}: placement written to etcd ({in_etcd} keys) and {} Pods created", options.machines));
    let mut converged_row = Scenario::new("reconcile_converged", converged, "s");
    converged_row.note = Some(format!("{what}: nothing to change (target < 1 s)"));
    let mut writes_row = Scenario::new("converged_writes", converged_writes as f64, "writes");
    writes_row.note = Some("API server and etcd write calls in a converged reconcile (target 0)".into());
    let mut traffic_row = Scenario::new("converged_writes_under_traffic", traffic_writes as f64, "writes");
    traffic_row.note = Some(format!(
        "{what}, every datanode live and caught up, registrations rewritten before each of {ROUNDS} passes: \
         write calls and status writes (target 0; a pass took {:.2} s)",
        traffic_secs / ROUNDS as f64
    ));
    Ok(vec![plan_row, first_row, converged_row, writes_row, traffic_row])
}
