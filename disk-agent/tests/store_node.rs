//! The StoreNode status, published against an in-memory Kubernetes API (no API server can run
//! here), from a real scan of a real loop device.

mod support;

use std::sync::Arc;

use cairn_common::agent_api::CreateVolumeRequest;
use cairn_disk_agent::config::AgentConfig;
use cairn_disk_agent::k8s::StoreNodePublisher;
use cairn_disk_agent::{Agent, AgentOptions};
use cairn_resources::StoreNode;
use cairn_testkit::rbac::{disk_agent_user, rendered_chart, Rbac};
use cairn_testkit::MemoryApi;
use kube::Api;
use support::Machine;

#[tokio::test]
async fn status_follows_the_disks_and_is_written_only_on_change() {
    let mut m = Machine::new();
    let dev = m.loop_fs("ext4", 128 << 20, "mkfs.ext4", &["-q"]);
    let mount = m.mount(&dev, "a", &[]);
    let config = AgentConfig::load(&m.agent_config("headroom: 0%\n")).unwrap();
    let agent = Arc::new(
        Agent::new(AgentOptions {
            node_name: "node-1".into(),
            mountinfo: "/proc/self/mountinfo".into(),
            host_dev: "/dev".into(),
            config,
            state_dir: Some(m.path("state")),
        })
        .unwrap(),
    );

    // The agent runs as its ServiceAccount under the chart's RBAC (403 for what is not granted).
    use kube::CustomResourceExt;
    let kubernetes = MemoryApi::new().with_rbac(Rbac::from_manifests(&rendered_chart())).with_crd(&StoreNode::crd());
    let status_writes = || kubernetes.status_writes("storenodes", "", "node-1");
    let publisher = StoreNodePublisher::new(kubernetes.client_as(&disk_agent_user()), "node-1");
    let api: Api<StoreNode> = Api::all(kubernetes.client());

    let (report, _) = agent.refresh().unwrap();
    assert!(publisher.publish(&report).await.unwrap(), "first publish creates and writes");
    let node = api.get("node-1").await.unwrap();
    assert_eq!(node.spec.node_name, "node-1");
    let status = node.status.clone().unwrap();
    assert_eq!(status.disks, report.disks);
    assert_eq!(status.disks[0].canonical_mount, mount.to_str().unwrap());
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.status, "True");
    let conflict = status.conditions.iter().find(|c| c.type_ == "DiskConflict").unwrap();
    assert_eq!(conflict.status, "False");
    assert_eq!(status.disk_count, 1);
    assert_eq!(status.observed_generation, node.metadata.generation);
    assert_eq!(status_writes(), 1);

    // Periodic rescans with nothing changed write nothing.
    for _ in 0..3 {
        let (report, changed) = agent.refresh().unwrap();
        assert!(!changed);
        assert!(!publisher.publish(&report).await.unwrap());
    }
    assert_eq!(status_writes(), 1, "no write when nothing changed");

    // A volume changes the figures: one write; Ready keeps its transition time.
    let disk = report.disks[0].id.clone();
    let request =
        CreateVolumeRequest { disk, capacity_bytes: 16 << 20, segment_size_bytes: 16 << 20, partition: 0, node: None };
    agent.create_volume("v1", &request, None, None).unwrap();
    let (report, changed) = agent.refresh().unwrap();
    assert!(!changed, "create_volume already refreshed the report");
    assert!(publisher.publish(&report).await.unwrap());
    let after = api.get("node-1").await.unwrap().status.unwrap();
    assert_eq!(after.disks[0].volumes.len(), 1);
    assert_eq!(after.disks[0].allocated_bytes, 16 << 20);
    let ready_after = after.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready_after.last_transition_time, ready.last_transition_time);
    assert_eq!(status_writes(), 2);

    // A status edited by someone else is put back.
    let (report, _) = agent.refresh().unwrap();
    let mut wrong = report.clone();
    wrong.disks.clear();
    assert!(publisher.publish(&wrong).await.unwrap());
    let not_ready = api.get("node-1").await.unwrap().status.unwrap();
    assert_eq!(not_ready.conditions.iter().find(|c| c.type_ == "Ready").unwrap().status, "False");
    assert!(publisher.publish(&report).await.unwrap());
    assert_eq!(api.get("node-1").await.unwrap().status.unwrap().disks, report.disks);

    // The chart grants the agent exactly what it used.
    let used: Vec<String> = kubernetes
        .accessed(&disk_agent_user())
        .into_iter()
        .map(|(verb, _, resource)| format!("{verb} {resource}"))
        .collect();
    let granted: Vec<String> = Rbac::from_manifests(&rendered_chart())
        .granted(&disk_agent_user())
        .into_iter()
        .map(|(_, verb, _, resource)| format!("{verb} {resource}"))
        .collect();
    let mut used_sorted = used.clone();
    used_sorted.sort();
    let mut granted_sorted = granted.clone();
    granted_sorted.sort();
    assert_eq!(granted_sorted, used_sorted, "granted vs used");
}
