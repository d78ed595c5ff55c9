//! The Argo CD health check shipped with the chart (charts/cairn/argocd/storecluster-health.lua),
//! run by a real Lua 5.1 interpreter (Argo CD's gopher-lua speaks Lua 5.1) against statuses the
//! operator itself writes (`status::next_status`).

use cairn_operator::platform::Outcome;
use cairn_operator::status::{next_status, Observation};
use cairn_resources::{StoreCluster, StoreClusterStatus};
use serde_json::Value;

/// A JSON value as a Lua table literal.
fn lua(value: &Value) -> String {
    match value {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(items) => format!("{{{}}}", items.iter().map(lua).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => {
            let fields: Vec<String> = map.iter().map(|(k, v)| format!("[{k:?}] = {}", lua(v))).collect();
            format!("{{{}}}", fields.join(", "))
        }
    }
}

/// (health status, message) as Argo CD would get them for this object.
fn health(object: &StoreCluster) -> (String, String) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/cairn/argocd/storecluster-health.lua");
    let object = lua(&serde_json::to_value(object).unwrap());
    let harness = format!(
        "obj = {object}\nlocal hs = assert(loadfile({script:?}))()\nio.write(hs.status, '\\n', hs.message or '')"
    );
    let out = std::process::Command::new("lua5.1")
        .args(["-e", &harness])
        .output()
        .unwrap_or_else(|e| panic!("lua5.1: {e} (scripts/install-deps.sh installs it)"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, message) = text.split_once('\n').unwrap();
    (status.to_owned(), message.to_owned())
}

fn cluster(generation: i64, status: Option<StoreClusterStatus>, paused: bool) -> StoreCluster {
    let mut spec: cairn_resources::StoreClusterSpec = serde_json::from_value(serde_json::json!({
        "image": "cairn:1", "volumeSize": "64Gi", "segmentSize": "1Gi", "etcd": {"endpoints": ["http://e:2379"]}
    }))
    .unwrap();
    spec.paused = paused;
    let mut sc = StoreCluster::new("blobs", spec);
    sc.metadata.generation = Some(generation);
    sc.status = status;
    sc
}

fn outcome(ready: bool, degraded: Option<(&'static str, String)>) -> Outcome {
    let status = StoreClusterStatus { nodes_total: 3, nodes_ready: if ready { 3 } else { 1 }, ..Default::default() };
    Outcome { status, ready, changes: vec![], degraded, progress: vec![] }
}

#[test]
fn argo_cd_reads_what_the_operator_writes() {
    let none = StoreClusterStatus::default();
    let ready = next_status(&none, Some(2), Observation::Pass(&outcome(true, None)));
    assert_eq!(health(&cluster(2, Some(ready.clone()), false)).0, "Healthy");

    let creating = next_status(&none, Some(2), Observation::Pass(&outcome(false, None)));
    let (status, message) = health(&cluster(2, Some(creating), false));
    assert_eq!(status, "Progressing");
    assert!(message.contains("1/3 datanodes live"), "{message}");

    let reason = ("NotEnoughMachines", "replicationFactor 3 needs 3 machines".to_string());
    let degraded = next_status(&ready, Some(2), Observation::Pass(&outcome(false, Some(reason))));
    let (status, message) = health(&cluster(2, Some(degraded), false));
    assert_eq!(status, "Degraded");
    assert!(message.starts_with("NotEnoughMachines: replicationFactor 3"), "{message}");

    // A spec the operator has not seen yet is not Healthy, whatever the last status says.
    assert_eq!(health(&cluster(3, Some(ready.clone()), false)).0, "Progressing");
    assert_eq!(health(&cluster(1, None, false)).0, "Progressing");
    let paused = next_status(&ready, Some(2), Observation::Paused);
    assert_eq!(health(&cluster(2, Some(paused), true)).0, "Suspended");
}
