//! Publishes the node report as the status of this node's `StoreNode` (server-side apply, one
//! field manager), only when it differs from what the API server already holds.

use cairn_common::agent_api::NodeReport;
use cairn_resources::{StoreNode, StoreNodeSpec, StoreNodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource};

pub const FIELD_MANAGER: &str = "cairn-disk-agent";

pub struct StoreNodePublisher {
    api: Api<StoreNode>,
    node_name: String,
}

impl StoreNodePublisher {
    pub fn new(client: Client, node_name: &str) -> Self {
        Self { api: Api::all(client), node_name: node_name.to_owned() }
    }

    /// Creates the object if needed, then applies the status if it changed. Returns whether the
    /// status was written.
    pub async fn publish(&self, report: &NodeReport) -> Result<bool, kube::Error> {
        let object = match self.api.get_opt(&self.node_name).await? {
            Some(object) => object,
            None => {
                let object = StoreNode::new(&self.node_name, StoreNodeSpec { node_name: self.node_name.clone() });
                self.api.patch(&self.node_name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&object)).await?
            }
        };
        let previous = object.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
        let desired = status_for(report, object.metadata.generation, previous);
        if object.status.as_ref() == Some(&desired) {
            return Ok(false);
        }
        let patch = serde_json::json!({
            "apiVersion": StoreNode::api_version(&()),
            "kind": StoreNode::kind(&()),
            "status": desired,
        });
        self.api
            .patch_status(&self.node_name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
            .await?;
        tracing::info!(node = %self.node_name, disks = report.disks.len(), "StoreNode status updated");
        Ok(true)
    }
}

/// The status for a report. Conditions keep their lastTransitionTime while their status stays.
pub fn status_for(report: &NodeReport, generation: Option<i64>, previous: &[Condition]) -> StoreNodeStatus {
    let usable: Vec<_> = report.disks.iter().filter(|d| d.usable).collect();
    let conflicts: Vec<String> =
        report.disks.iter().filter_map(|d| d.conflict.as_ref().map(|c| format!("{}: {c}", d.id))).collect();
    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        cairn_resources::condition(previous, type_, ok, reason, message, generation)
    };
    let mut conditions = vec![
        if usable.is_empty() {
            condition(
                "Ready",
                false,
                "NoUsableDisk",
                format!("{} mounts considered, none usable", report.excluded.len()),
            )
        } else {
            condition("Ready", true, "DisksAvailable", format!("{} usable disks", usable.len()))
        },
        if conflicts.is_empty() {
            condition("DiskConflict", false, "IdentitiesMatch", "every disk matches its recorded identity".into())
        } else {
            condition("DiskConflict", true, "IdentityMismatch", conflicts.join("; "))
        },
    ];
    if !report.missing.is_empty() {
        let missing: Vec<String> = report.missing.iter().map(|m| format!("{} at {}", m.id, m.mount)).collect();
        conditions.push(condition("DiskMissing", true, "NotMounted", missing.join("; ")));
    }
    let allocatable: u64 = usable.iter().map(|d| d.allocatable_bytes).sum();
    StoreNodeStatus {
        conditions,
        observed_generation: generation,
        disks: report.disks.clone(),
        excluded: report.excluded.clone(),
        disk_count: usable.len() as u32,
        excluded_count: report.excluded.len() as u32,
        allocatable: bytesize::ByteSize(allocatable).display().iec().to_string(),
    }
}
