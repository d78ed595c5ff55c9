//! What the CRDs promise: validation rules that work, and no defaults inside lists.

use cairn_resources::store_cluster::StoreClusterSpec;
use kube::CustomResourceExt;
use serde_json::{json, Value};

fn spec(rf: u32, quorum: u32, volume: &str) -> Value {
    json!({
        "image": "cairn:1", "volumeSize": volume, "segmentSize": "1Gi",
        "replicationFactor": rf, "writeQuorum": quorum,
        "etcd": {"endpoints": ["http://etcd:2379"]}
    })
}

#[test]
fn cel_rules_hold() {
    assert!(StoreClusterSpec::validate_cel(&spec(3, 2, "64Gi"), None).is_ok());
    let err = StoreClusterSpec::validate_cel(&spec(3, 4, "64Gi"), None).unwrap_err();
    assert!(format!("{err:?}").contains("writeQuorum must not exceed replicationFactor"), "{err:?}");
}

fn defaults_in_lists(value: &Value, in_list: bool, path: &str, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if in_list && map.contains_key("default") {
                found.push(path.to_owned());
            }
            for (k, v) in map {
                defaults_in_lists(v, in_list || k == "items", &format!("{path}.{k}"), found);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| defaults_in_lists(v, in_list, path, found)),
        _ => {}
    }
}

#[test]
fn no_defaults_inside_lists_and_rules_are_in_the_crd() {
    for crd in [
        serde_json::to_value(cairn_resources::StoreCluster::crd()).unwrap(),
        serde_json::to_value(cairn_resources::StoreNode::crd()).unwrap(),
    ] {
        let mut found = Vec::new();
        defaults_in_lists(&crd, false, "", &mut found);
        assert!(found.is_empty(), "defaults inside lists make GitOps tools see drift: {found:?}");
    }
    let text = serde_json::to_string(&cairn_resources::StoreCluster::crd()).unwrap();
    for rule in ["self.writeQuorum <= self.replicationFactor", "volumeSize is immutable", "confirmDelete"] {
        assert!(text.contains(rule), "{rule}");
    }
}
