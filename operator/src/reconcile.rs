//! Reconciling a StoreCluster: a function of what is observed (spec, machines, etcd), applied
//! with as few writes as possible — none when nothing changed.

use std::sync::Arc;
use std::time::Duration;

use cairn_cluster::etcd::{ClusterStore, Snapshot};
use cairn_cluster::PartitionState;
use cairn_resources::store_cluster::{CapacityStatus, DeletionPolicy, PartitionCounts};
use cairn_resources::{StoreCluster, StoreClusterStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::ResourceExt;

use crate::desired::{desired, Machine};
use crate::kubernetes::{self, FIELD_MANAGER};

pub const FINALIZER: &str = "cairn.dev/cleanup";

pub struct Context {
    pub client: kube::Client,
    /// Write calls made by reconciles (API objects, status, etcd transactions), for the zero-writes check.
    pub writes: std::sync::atomic::AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
}

pub async fn reconcile(sc: Arc<StoreCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<StoreCluster> = Api::namespaced(ctx.client.clone(), &sc.namespace().unwrap_or_default());
    finalizer(&api, FINALIZER, sc, |event| async {
        match event {
            Finalizer::Apply(sc) => apply(&sc, &ctx).await,
            Finalizer::Cleanup(sc) => cleanup(&sc, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(e.to_string()))
}

/// Requeue with backoff on errors; the controller's error policy.
pub fn error_policy(_sc: Arc<StoreCluster>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

async fn store_for(sc: &StoreCluster) -> Result<ClusterStore, String> {
    let (namespace, name) = (sc.namespace().unwrap_or_default(), sc.name_any());
    let connect = ClusterStore::connect(&sc.spec.etcd.endpoints, &namespace, &name);
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(store)) => Ok(store),
        Ok(Err(e)) => Err(format!("etcd {:?} unreachable: {e}", sc.spec.etcd.endpoints)),
        Err(_) => Err(format!("etcd {:?} unreachable: timed out", sc.spec.etcd.endpoints)),
    }
}

async fn apply(sc: &StoreCluster, ctx: &Context) -> Result<Action, kube::Error> {
    let namespace = sc.namespace().unwrap_or_default();
    if sc.spec.paused {
        set_status(
            sc,
            ctx,
            |s| {
                s.phase = "Paused".into();
            },
            ("Progressing", false, "Paused", "reconciling is paused".into()),
            None,
        )
        .await?;
        return Ok(Action::requeue(Duration::from_secs(300)));
    }
    let machines = kubernetes::machines(&ctx.client, sc).await?;
    let store = match store_for(sc).await {
        Ok(store) => store,
        Err(message) => return degraded(sc, ctx, "EtcdUnreachable", message).await,
    };
    let snapshot = match store.load().await {
        Ok(s) => s,
        Err(e) => return degraded(sc, ctx, "EtcdUnreachable", e.to_string()).await,
    };
    let plan = match desired(&sc.name_any(), &sc.spec, &machines, &snapshot.topology) {
        Ok(plan) => plan,
        Err(e) => return degraded(sc, ctx, "InvalidSpec", e.to_string()).await,
    };
    let before = snapshot.revision;
    if let Err(e) = store.apply_topology(&plan.config, &plan.nodes).await {
        return degraded(sc, ctx, "PlacementFailed", e.to_string()).await;
    }
    let snapshot = store.load().await.unwrap_or(snapshot);
    if snapshot.revision != before {
        ctx.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let chosen: Vec<Machine> = machines.into_iter().filter(|m| plan.nodes.iter().any(|n| n.id == m.name)).collect();
    let writes = kubernetes::apply(&ctx.client, &namespace, &sc.name_any(), &kubernetes::objects(sc, &chosen)).await?;
    ctx.writes.fetch_add(u64::from(writes), std::sync::atomic::Ordering::Relaxed);
    let status = observed(&snapshot, &chosen, plan.config.replication_factor);
    let ready = status.nodes_ready == status.nodes_total && status.partitions.under_replicated == 0 && writes == 0;
    let (condition, phase) = if ready {
        (
            (
                "Ready",
                true,
                "Converged",
                format!("{} datanodes, {} partitions", status.nodes_total, status.partitions.total),
            ),
            "Ready",
        )
    } else {
        (
            (
                "Ready",
                false,
                "Progressing",
                format!(
                    "{}/{} datanodes live, {} partitions under-replicated",
                    status.nodes_ready, status.nodes_total, status.partitions.under_replicated
                ),
            ),
            "Creating",
        )
    };
    set_status(
        sc,
        ctx,
        |s| {
            *s = StoreClusterStatus {
                phase: phase.into(),
                conditions: std::mem::take(&mut s.conditions),
                ..status.clone()
            };
        },
        condition,
        None,
    )
    .await?;
    Ok(Action::requeue(Duration::from_secs(if ready { 60 } else { 5 })))
}

/// Counts from etcd: live datanodes, partition states, replicas not live.
fn observed(snapshot: &Snapshot, machines: &[Machine], rf: u32) -> StoreClusterStatus {
    let t = &snapshot.topology;
    let total = machines.len() as u32;
    let ready = machines.iter().filter(|m| snapshot.live.contains_key(&m.name)).count() as u32;
    let mut partitions = PartitionCounts { total: t.partitions.len() as u32, ..PartitionCounts::default() };
    for p in t.partitions.values() {
        match p.state {
            PartitionState::Writable => partitions.writable += 1,
            _ => partitions.read_only += 1,
        }
        let live = p.replicas.iter().filter(|r| snapshot.live.contains_key(&r.node)).count() as u32;
        if live < rf {
            partitions.under_replicated += 1;
        }
    }
    let disks = machines.iter().flat_map(|m| &m.disks).filter(|d| d.usable);
    let mut capacity = CapacityStatus::default();
    for d in disks {
        capacity.total_bytes += d.total_bytes;
        capacity.allocated_bytes += d.allocated_bytes;
        capacity.allocatable_bytes += d.allocatable_bytes;
    }
    StoreClusterStatus {
        nodes_ready: ready,
        nodes_total: total,
        nodes_summary: format!("{ready}/{total}"),
        capacity,
        partitions,
        topology_revision: snapshot.revision,
        ..StoreClusterStatus::default()
    }
}

async fn degraded(sc: &StoreCluster, ctx: &Context, reason: &str, message: String) -> Result<Action, kube::Error> {
    tracing::warn!(cluster = %sc.name_any(), reason, %message, "degraded");
    set_status(
        sc,
        ctx,
        |s| s.phase = "Degraded".into(),
        ("Ready", false, reason, message.clone()),
        Some((reason, message)),
    )
    .await?;
    Ok(Action::requeue(Duration::from_secs(30)))
}

/// Writes the status only when it differs; conditions keep their transition time while their
/// status is unchanged. Ready/Progressing/Degraded are always all present (kstatus readers).
async fn set_status(
    sc: &StoreCluster,
    ctx: &Context,
    update: impl FnOnce(&mut StoreClusterStatus),
    ready: (&str, bool, &str, String),
    degraded: Option<(&str, String)>,
) -> Result<(), kube::Error> {
    let old = sc.status.clone().unwrap_or_default();
    let mut new = old.clone();
    update(&mut new);
    new.observed_generation = sc.metadata.generation;
    let previous = old.conditions.clone();
    let condition = |type_: &str, on: bool, reason: &str, message: String| {
        let status = if on { "True" } else { "False" };
        let since = previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now()));
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: sc.metadata.generation,
            last_transition_time: since,
        }
    };
    let (ready_type, ready_on, ready_reason, ready_message) = ready;
    let progressing = !ready_on && degraded.is_none();
    new.conditions = vec![
        condition(ready_type, ready_on, ready_reason, ready_message.clone()),
        condition(
            "Progressing",
            progressing,
            if progressing { "Reconciling" } else { "Idle" },
            if progressing { ready_message } else { String::new() },
        ),
        match &degraded {
            Some((reason, message)) => condition("Degraded", true, reason, message.clone()),
            None => condition("Degraded", false, "Healthy", String::new()),
        },
    ];
    if new == old {
        return Ok(());
    }
    let api: Api<StoreCluster> = Api::namespaced(ctx.client.clone(), &sc.namespace().unwrap_or_default());
    let patch = serde_json::json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "StoreCluster", "status": new});
    api.patch_status(&sc.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    ctx.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Deletion: owned objects go with the StoreCluster (owner references). With `Delete` (confirmed
/// by the schema's rule) the topology leaves etcd too; with `Retain` etcd keeps it, so a
/// StoreCluster re-created under the same name finds its data.
async fn cleanup(sc: &StoreCluster, _ctx: &Context) -> Result<Action, kube::Error> {
    if sc.spec.deletion_policy == DeletionPolicy::Delete && sc.spec.confirm_delete.as_deref() == Some(&sc.name_any()) {
        match store_for(sc).await {
            Ok(store) => {
                if let Err(e) = store.delete_all().await {
                    tracing::warn!(error = %e, "removing the topology from etcd failed; retrying");
                    return Ok(Action::requeue(Duration::from_secs(10)));
                }
                tracing::info!(cluster = %sc.name_any(), "topology removed from etcd (deletionPolicy Delete)");
            }
            Err(message) => {
                tracing::warn!(%message, "cannot remove the topology yet");
                return Ok(Action::requeue(Duration::from_secs(10)));
            }
        }
    }
    Ok(Action::await_change())
}
