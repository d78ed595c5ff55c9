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
    let memory = MemoryApi::new();
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
    Ok(vec![plan_row, first_row, converged_row, writes_row])
}
