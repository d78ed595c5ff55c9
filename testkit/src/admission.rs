//! What a real API server's admission and defaulting add to a Pod it creates, for
//! [`MemoryApi`](crate::MemoryApi): a controller that compares what it asked for with what it
//! reads back must cope with these, as on a real cluster.
//!
//! - the ServiceAccount token: a projected volume `kube-api-access-<suffix>` and its mount in
//!   every container, unless `automountServiceAccountToken: false`;
//! - the DefaultTolerationSeconds plugin: `node.kubernetes.io/not-ready` and `…/unreachable`
//!   (NoExecute, 300 s) unless the Pod tolerates them already;
//! - defaulted fields: restartPolicy, dnsPolicy, schedulerName, terminationGracePeriodSeconds,
//!   securityContext, serviceAccountName, enableServiceLinks, and per container
//!   terminationMessagePath/Policy and imagePullPolicy (Always for `:latest` or no tag);
//! - quantities in canonical form (`1024Mi` → `1Gi`);
//! - `status.phase: Pending`.
//!
//! And for Secrets: `stringData` folded into `data` ([`admit_secret`]).

use serde_json::{json, Value};

/// A Secret as the API server stores it: `stringData` merged into `data` (base64; a key in both
/// takes the `stringData` value) and never stored or returned itself.
pub fn admit_secret(secret: &mut Value) {
    use base64::Engine;
    let Some(string_data) = secret.as_object_mut().and_then(|o| o.remove("stringData")) else { return };
    let Some(string_data) = string_data.as_object().cloned() else { return };
    if !secret["data"].is_object() {
        secret["data"] = json!({});
    }
    for (key, value) in string_data {
        let text = value.as_str().unwrap_or_default();
        secret["data"][key] = json!(base64::engine::general_purpose::STANDARD.encode(text));
    }
}

/// Defaults `pod` as the API server does on create.
pub fn admit_pod(pod: &mut Value) {
    let spec = &mut pod["spec"];
    if !spec.is_object() {
        return;
    }
    let default = |spec: &mut Value, key: &str, value: Value| {
        if spec.get(key).is_none_or(Value::is_null) {
            spec[key] = value;
        }
    };
    default(spec, "restartPolicy", json!("Always"));
    default(spec, "dnsPolicy", json!("ClusterFirst"));
    default(spec, "schedulerName", json!("default-scheduler"));
    default(spec, "terminationGracePeriodSeconds", json!(30));
    default(spec, "securityContext", json!({}));
    default(spec, "serviceAccountName", json!("default"));
    default(spec, "enableServiceLinks", json!(true));
    spec["serviceAccount"] = spec["serviceAccountName"].clone();

    let mut tolerations = spec["tolerations"].as_array().cloned().unwrap_or_default();
    for key in ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"] {
        if !tolerations.iter().any(|t| t["key"] == key && t["effect"] == "NoExecute") {
            tolerations
                .push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}));
        }
    }
    spec["tolerations"] = Value::Array(tolerations);

    let token = spec["automountServiceAccountToken"] != json!(false);
    if token {
        let volume = json!({"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
        ]}});
        let mut volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
        volumes.push(volume);
        spec["volumes"] = Value::Array(volumes);
    }
    for kind in ["initContainers", "containers"] {
        let Some(containers) = spec[kind].as_array_mut() else { continue };
        for c in containers {
            let default = |c: &mut Value, key: &str, value: Value| {
                if c.get(key).is_none_or(Value::is_null) {
                    c[key] = value;
                }
            };
            default(c, "terminationMessagePath", json!("/dev/termination-log"));
            default(c, "terminationMessagePolicy", json!("File"));
            let image = c["image"].as_str().unwrap_or_default();
            let tag = image.rsplit('/').next().unwrap_or_default().split_once(':').map(|(_, t)| t.to_owned());
            let policy = if tag.is_none() || tag.as_deref() == Some("latest") { "Always" } else { "IfNotPresent" };
            default(c, "imagePullPolicy", json!(policy));
            default(c, "resources", json!({}));
            for section in ["requests", "limits"] {
                if let Some(map) = c["resources"][section].as_object_mut() {
                    for value in map.values_mut() {
                        if let Some(q) = value.as_str() {
                            *value = json!(canonical_quantity(q));
                        }
                    }
                }
            }
            if token {
                let mut mounts = c["volumeMounts"].as_array().cloned().unwrap_or_default();
                mounts.push(json!({"name": "kube-api-access-x7k2p", "readOnly": true,
                                   "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}));
                c["volumeMounts"] = Value::Array(mounts);
            }
        }
    }
    if pod["status"].is_null() {
        pod["status"] = json!({"phase": "Pending"});
    }
}

/// A quantity with a binary suffix in the form the API server writes back: the largest suffix
/// that keeps it whole (`1024Mi` → `1Gi`, `1536Mi` stays). Others are returned as given.
pub fn canonical_quantity(q: &str) -> String {
    const SUFFIXES: [(&str, u32); 6] = [("Ki", 1), ("Mi", 2), ("Gi", 3), ("Ti", 4), ("Pi", 5), ("Ei", 6)];
    let Some((suffix, power)) = SUFFIXES.iter().find(|(s, _)| q.ends_with(s)) else { return q.to_owned() };
    let Ok(number) = q[..q.len() - 2].parse::<u128>() else { return q.to_owned() };
    let mut value = number << (10 * power);
    let _ = suffix;
    let mut best = 0u32;
    for (i, _) in SUFFIXES.iter().enumerate() {
        let p = (i as u32 + 1) * 10;
        if value % (1u128 << p) == 0 {
            best = i as u32 + 1;
        }
    }
    if best == 0 {
        return value.to_string();
    }
    value >>= 10 * best;
    format!("{value}{}", SUFFIXES[best as usize - 1].0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_data_is_folded_into_data() {
        let mut secret = json!({"data": {"a": "b2xk", "keep": "eA=="}, "stringData": {"a": "new", "b": ""}});
        admit_secret(&mut secret);
        assert_eq!(secret, json!({"data": {"a": "bmV3", "keep": "eA==", "b": ""}}));
        let mut plain = json!({"data": {"k": "dg=="}});
        admit_secret(&mut plain);
        assert_eq!(plain, json!({"data": {"k": "dg=="}}));
    }

    #[test]
    fn quantities_come_back_canonical() {
        assert_eq!(canonical_quantity("1024Mi"), "1Gi");
        assert_eq!(canonical_quantity("1536Mi"), "1536Mi");
        assert_eq!(canonical_quantity("2048Ki"), "2Mi");
        assert_eq!(canonical_quantity("100m"), "100m");
        assert_eq!(canonical_quantity("1Gi"), "1Gi");
    }

    #[test]
    fn pods_get_token_tolerations_and_defaults() {
        let mut pod = json!({"spec": {"containers": [{"name": "c", "image": "x:1",
            "resources": {"limits": {"memory": "1024Mi"}}}]}});
        admit_pod(&mut pod);
        assert_eq!(pod["spec"]["tolerations"].as_array().unwrap().len(), 2);
        assert_eq!(pod["spec"]["volumes"].as_array().unwrap().len(), 1);
        assert_eq!(pod["spec"]["containers"][0]["volumeMounts"].as_array().unwrap().len(), 1);
        assert_eq!(pod["spec"]["containers"][0]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(pod["spec"]["containers"][0]["resources"]["limits"]["memory"], "1Gi");
        assert_eq!(pod["status"]["phase"], "Pending");
        let mut no_token =
            json!({"spec": {"automountServiceAccountToken": false, "containers": [{"name": "c", "image": "x"}]}});
        admit_pod(&mut no_token);
        assert!(no_token["spec"]["volumes"].is_null());
        assert_eq!(no_token["spec"]["containers"][0]["imagePullPolicy"], "Always");
    }
}
