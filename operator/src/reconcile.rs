//! Reconciling a StoreCluster: a function of what is observed (spec, machines, etcd), applied
//! with as few writes as possible — none when nothing changed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cairn_resources::{StoreCluster, StoreClusterStatus};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::{Resource, ResourceExt};

use crate::kubernetes::{self, FIELD_MANAGER};
use crate::platform::{converge, delete_cluster};
use crate::status::{next_status, notes, Observation};

pub const FINALIZER: &str = "cairn.dev/cleanup";

pub struct Context {
    pub client: kube::Client,
    /// Write calls made by reconciles (API objects, status, etcd transactions), for the zero-writes check.
    pub writes: std::sync::atomic::AtomicU64,
    pub metrics: OperatorMetrics,
    /// Nodes and StoreNodes as watches keep them (what each pass reads its machines from), and
    /// one etcd client per cluster.
    pub caches: kubernetes::OperatorCaches,
    /// One recorder for the controller's life: it remembers the Events it wrote, so that a
    /// repeated one is counted in its series (a patch) instead of written again.
    recorder: kube::runtime::events::Recorder,
}

/// The longest Event note the API accepts (events.k8s.io: 1 kB).
pub const EVENT_NOTE_MAX: usize = 1024;

/// `message` as an Event note: whole when it fits, else cut at a character boundary with how much
/// was left out (the status conditions and `cairn status` have the whole story).
pub fn event_note(message: &str) -> String {
    if message.len() <= EVENT_NOTE_MAX {
        return message.to_owned();
    }
    let suffix = |left: usize| format!(" … ({left} more bytes)");
    let mut end = EVENT_NOTE_MAX - suffix(message.len()).len();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{}", &message[..end], suffix(message.len() - end))
}

impl Context {
    pub fn new(client: kube::Client) -> Self {
        use kube::runtime::events::{Recorder, Reporter};
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        let recorder = Recorder::new(client.clone(), reporter);
        let caches = kubernetes::OperatorCaches::start(&client);
        Self { client, writes: Default::default(), metrics: OperatorMetrics::default(), caches, recorder }
    }

    /// Records a Kubernetes Event on the StoreCluster (failures to record are only logged).
    async fn event(&self, sc: &StoreCluster, warning: bool, reason: &str, action: &str, note: String) {
        use kube::runtime::events::{Event, EventType};
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(event_note(&note)),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &sc.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "recording an event failed");
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// Reconcile counts by result, their durations, and whether this replica leads.
pub struct OperatorMetrics {
    pub reconciles:
        prometheus_client::metrics::family::Family<ResultLabels, prometheus_client::metrics::counter::Counter>,
    pub duration: prometheus_client::metrics::histogram::Histogram,
    pub leader: prometheus_client::metrics::gauge::Gauge,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self {
            reconciles: Default::default(),
            duration: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 14),
            ),
            leader: Default::default(),
        }
    }
}

impl OperatorMetrics {
    pub fn registry(&self) -> prometheus_client::registry::Registry {
        let mut r = prometheus_client::registry::Registry::with_prefix("cairn_operator");
        r.register("reconciles", "Reconciles by result (ok, error)", self.reconciles.clone());
        r.register("reconcile_duration_seconds", "Time of one reconcile", self.duration.clone());
        r.register("leader", "1 while this replica leads", self.leader.clone());
        r
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
}

#[tracing::instrument(skip_all, fields(cluster = %sc.name_any(), namespace = %sc.namespace().unwrap_or_default()))]
pub async fn reconcile(sc: Arc<StoreCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let api: Api<StoreCluster> = Api::namespaced(ctx.client.clone(), &sc.namespace().unwrap_or_default());
    let result = finalizer(&api, FINALIZER, sc, |event| async {
        match event {
            Finalizer::Apply(sc) => apply(&sc, &ctx).await,
            Finalizer::Cleanup(sc) => cleanup(&sc, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(e.to_string()));
    ctx.metrics.duration.observe(started.elapsed().as_secs_f64());
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics.reconciles.get_or_create(&ResultLabels { result: label.into() }).inc();
    result
}

/// Each Node's cordon and readiness (as text) and labels, as the controller last saw them.
type NodesSeen = BTreeMap<String, (String, BTreeMap<String, String>)>;

/// The controller: a reconcile of a StoreCluster on each change to it, to a Pod it owns, to the
/// StoreNode of a machine its node selector takes (new disks, volumes gone), to such a Node's
/// labels, cordon or readiness (a decommission label, a machine away), and on each requeue, until
/// the watch streams end. The operator runs it while it leads.
pub async fn run_controller(client: kube::Client, ctx: Arc<Context>) {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Node;
    use kube::runtime::reflector::ObjectRef;
    use kube::runtime::{watcher, Controller};
    // The StoreNode and Node watches that wake a reconcile are not the caches it reads its
    // machines from: a second's debounce lets the caches take the same change first.
    let config = kube::runtime::controller::Config::default().debounce(Duration::from_secs(1));
    let controller =
        Controller::new(Api::<StoreCluster>::all(client.clone()), watcher::Config::default()).with_config(config);
    let clusters = controller.store();
    // The clusters whose node selector takes a Node with any of these labels (all, when unknown).
    let selecting = move |labels: &[Option<BTreeMap<String, String>>]| -> Vec<ObjectRef<StoreCluster>> {
        clusters
            .state()
            .iter()
            .filter(|sc| labels.iter().any(|l| l.as_ref().is_none_or(|l| kubernetes::selects(sc, l))))
            .map(|sc| ObjectRef::from_obj(&**sc))
            .collect()
    };
    let by_store_node = {
        let (selecting, cache) = (selecting.clone(), ctx.caches.machines.clone());
        move |sn: cairn_resources::StoreNode| selecting(&[cache.node_labels(&sn.name_any())])
    };
    // A Node's status is rewritten by its kubelet's heartbeats: only what a pass reads wakes it
    // (labels, cordon, readiness), for the clusters selecting it before or after the change.
    let seen: std::sync::Mutex<NodesSeen> = Default::default();
    let nodes = ctx.caches.machines.clone();
    let by_node = move |node: Node| {
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready").map(|c| c.status.clone()));
        let key = format!("{:?}/{:?}", node.spec.as_ref().and_then(|s| s.unschedulable), ready);
        let labels = node.labels().clone();
        let before = {
            let mut seen = seen.lock().expect("seen");
            let before = seen.insert(node.name_any(), (key.clone(), labels.clone()));
            // Nodes gone from the cluster are forgotten (a deleted Node wakes no one: its
            // machine is seen gone at the next pass).
            if seen.len() > nodes.node_count() + 16 {
                seen.retain(|name, _| nodes.node_labels(name).is_some());
            }
            before
        };
        match before {
            Some((was, old)) if was == key && old == labels => Vec::new(),
            Some((_, old)) => selecting(&[Some(old), Some(labels)]),
            None => selecting(&[Some(labels)]),
        }
    };
    let ours = watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={FIELD_MANAGER}"));
    controller
        .owns(Api::<k8s_openapi::api::core::v1::Pod>::all(client.clone()), ours)
        .watches(Api::<cairn_resources::StoreNode>::all(client.clone()), watcher::Config::default(), by_store_node)
        .watches(Api::<Node>::all(client), watcher::Config::default(), by_node)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::warn!(error = %e, "reconcile error");
            }
        })
        .await
}

/// Requeue after a while on errors; the controller's error policy.
pub fn error_policy(_sc: Arc<StoreCluster>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

async fn apply(sc: &StoreCluster, ctx: &Context) -> Result<Action, kube::Error> {
    let namespace = sc.namespace().unwrap_or_default();
    let old = sc.status.clone().unwrap_or_default();
    if sc.spec.paused {
        write_status(sc, ctx, &old, next_status(&old, sc.metadata.generation, Observation::Paused)).await?;
        return Ok(Action::requeue(Duration::from_secs(300)));
    }
    let platform =
        kubernetes::KubernetesPlatform { client: ctx.client.clone(), cluster: sc, caches: Some(&ctx.caches) };
    // Boxed: a pass's future is large (every platform call it awaits), too large for the stack of
    // a test's thread in a debug build.
    let outcome = Box::pin(converge(&sc.name_any(), &namespace, &sc.spec, &platform)).await;
    ctx.writes.fetch_add(outcome.changes.len() as u64, std::sync::atomic::Ordering::Relaxed);
    if let Some((reason, message)) = &outcome.degraded {
        tracing::warn!(cluster = %sc.name_any(), reason, %message, "degraded");
    }
    for note in notes(&old, &outcome) {
        ctx.event(sc, note.warning, &note.reason, note.action, note.message).await;
    }
    write_status(sc, ctx, &old, next_status(&old, sc.metadata.generation, Observation::Pass(&outcome))).await?;
    let requeue = match (&outcome.degraded, outcome.ready) {
        (Some(_), _) => 30,
        (None, true) => 60,
        (None, false) => 5,
    };
    Ok(Action::requeue(Duration::from_secs(requeue)))
}

/// Writes the status (server-side apply of the status subresource) only when it differs.
async fn write_status(
    sc: &StoreCluster,
    ctx: &Context,
    old: &StoreClusterStatus,
    new: StoreClusterStatus,
) -> Result<(), kube::Error> {
    if new == *old {
        return Ok(());
    }
    let api: Api<StoreCluster> = Api::namespaced(ctx.client.clone(), &sc.namespace().unwrap_or_default());
    let patch = serde_json::json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "StoreCluster", "status": new});
    api.patch_status(&sc.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    ctx.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Deletion (docs/operator.md): datanodes stop; a confirmed `Delete` removes the volumes (purge
/// Pods on every machine) and then the topology in etcd; `Retain` keeps both, so a StoreCluster
/// re-created under the same name finds its data. The finalizer stays until that is done.
async fn cleanup(sc: &StoreCluster, ctx: &Context) -> Result<Action, kube::Error> {
    let platform =
        kubernetes::KubernetesPlatform { client: ctx.client.clone(), cluster: sc, caches: Some(&ctx.caches) };
    match Box::pin(delete_cluster(&sc.name_any(), &sc.namespace().unwrap_or_default(), &sc.spec, &platform)).await {
        Ok(true) => Ok(Action::await_change()),
        Ok(false) => Err(kube::Error::Service(Box::from("volumes are still being removed"))),
        Err(message) => Err(kube::Error::Service(Box::from(message))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_event_notes_are_cut_to_what_the_api_accepts() {
        assert_eq!(event_note("short"), "short");
        let long = "é".repeat(800); // 1600 bytes, two per character
        let note = event_note(&long);
        assert!(note.len() <= EVENT_NOTE_MAX, "{}", note.len());
        assert!(note.ends_with("more bytes)"), "{note}");
        assert!(note.starts_with("éé"));
        let exact = "x".repeat(EVENT_NOTE_MAX);
        assert_eq!(event_note(&exact), exact);
    }
}
