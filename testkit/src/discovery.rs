//! What a real client such as `kubectl` needs beyond objects: the resources the API serves
//! (discovery, `/api` and `/apis`), an OpenAPI v3 index that says every resource takes
//! `fieldValidation` (so kubectl leaves validation to the server), server-side printing
//! (`as=Table`, with a CRD's `additionalPrinterColumns`), and a custom resource's structural
//! schema: unknown fields pruned, or refused with `fieldValidation=Strict`.

use k8s_openapi::jiff;
use serde_json::{json, Value};

/// One resource the API serves.
#[derive(Debug, Clone)]
pub struct Resource {
    /// `v1` or `group/version`.
    pub group_version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    /// Subresources served (`status`, `eviction`).
    pub subresources: Vec<String>,
    /// Printer columns beyond Name: (name, type, JSONPath), as a CRD declares them.
    pub columns: Vec<(String, String, String)>,
}

impl Resource {
    pub fn group(&self) -> &str {
        self.group_version.rsplit_once('/').map(|(g, _)| g).unwrap_or_default()
    }

    pub fn version(&self) -> &str {
        self.group_version.rsplit_once('/').map(|(_, v)| v).unwrap_or(&self.group_version)
    }
}

/// The built-in resources Cairn, its chart and kubectl use.
pub fn builtin() -> Vec<Resource> {
    let r = |gv: &str, plural: &str, kind: &str, namespaced: bool, short: &[&str], sub: &[&str]| Resource {
        group_version: gv.into(),
        plural: plural.into(),
        singular: kind.to_lowercase(),
        kind: kind.into(),
        namespaced,
        short_names: short.iter().map(|s| s.to_string()).collect(),
        subresources: sub.iter().map(|s| s.to_string()).collect(),
        columns: Vec::new(),
    };
    vec![
        r("v1", "pods", "Pod", true, &["po"], &["status", "eviction", "proxy"]),
        r("v1", "services", "Service", true, &["svc"], &["status"]),
        r("v1", "endpoints", "Endpoints", true, &["ep"], &[]),
        r("v1", "configmaps", "ConfigMap", true, &["cm"], &[]),
        r("v1", "secrets", "Secret", true, &[], &[]),
        r("v1", "serviceaccounts", "ServiceAccount", true, &["sa"], &[]),
        r("v1", "events", "Event", true, &["ev"], &[]),
        r("v1", "namespaces", "Namespace", false, &["ns"], &["status"]),
        r("v1", "nodes", "Node", false, &["no"], &["status"]),
        r("apps/v1", "deployments", "Deployment", true, &["deploy"], &["status"]),
        r("apps/v1", "daemonsets", "DaemonSet", true, &["ds"], &["status"]),
        r("apps/v1", "statefulsets", "StatefulSet", true, &["sts"], &["status", "scale"]),
        r("apps/v1", "replicasets", "ReplicaSet", true, &["rs"], &["status", "scale"]),
        r("policy/v1", "poddisruptionbudgets", "PodDisruptionBudget", true, &["pdb"], &["status"]),
        r("networking.k8s.io/v1", "networkpolicies", "NetworkPolicy", true, &["netpol"], &[]),
        r("coordination.k8s.io/v1", "leases", "Lease", true, &[], &[]),
        r("events.k8s.io/v1", "events", "Event", true, &["ev"], &[]),
        r("scheduling.k8s.io/v1", "priorityclasses", "PriorityClass", false, &["pc"], &[]),
        r("rbac.authorization.k8s.io/v1", "clusterroles", "ClusterRole", false, &[], &[]),
        r("rbac.authorization.k8s.io/v1", "clusterrolebindings", "ClusterRoleBinding", false, &[], &[]),
        r("rbac.authorization.k8s.io/v1", "roles", "Role", true, &[], &[]),
        r("rbac.authorization.k8s.io/v1", "rolebindings", "RoleBinding", true, &[], &[]),
        r(
            "apiextensions.k8s.io/v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            &["crd", "crds"],
            &["status"],
        ),
    ]
}

/// The resources a stored CustomResourceDefinition adds, one per served version.
pub fn from_crd(crd: &Value) -> Vec<Resource> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["served"] != false)
        .map(|v| Resource {
            group_version: format!("{}/{}", text(&spec["group"]), text(&v["name"])),
            plural: text(&names["plural"]),
            singular: text(&names["singular"]),
            kind: text(&names["kind"]),
            namespaced: spec["scope"] == "Namespaced",
            short_names: names["shortNames"].as_array().into_iter().flatten().map(text).collect(),
            subresources: v["subresources"].as_object().map(|s| s.keys().cloned().collect()).unwrap_or_default(),
            columns: v["additionalPrinterColumns"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| (text(&c["name"]), text(&c["type"]), text(&c["jsonPath"])))
                .collect(),
        })
        .collect()
}

/// The discovery document at `path` (`/api`, `/api/v1`, `/apis`, `/apis/{group}/{version}`), as
/// the legacy (unaggregated) discovery a real API server also serves.
pub fn document(path: &str, resources: &[Resource]) -> Option<Value> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let verbs = json!(["create", "delete", "get", "list", "patch", "update", "watch"]);
    let list = |gv: &str| {
        let mut out = Vec::new();
        for r in resources.iter().filter(|r| r.group_version == gv) {
            out.push(json!({"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
                            "kind": r.kind, "verbs": verbs, "shortNames": r.short_names}));
            for sub in &r.subresources {
                let mut entry = json!({"name": format!("{}/{sub}", r.plural), "singularName": "", "namespaced": r.namespaced,
                                       "kind": r.kind, "verbs": ["get", "patch", "update"]});
                // kubectl drain looks for this entry's group and version before it evicts
                // (without them it deletes, and no PodDisruptionBudget is asked).
                match sub.as_str() {
                    "eviction" => {
                        entry["kind"] = json!("Eviction");
                        entry["verbs"] = json!(["create"]);
                        entry["group"] = json!("policy");
                        entry["version"] = json!("v1");
                    }
                    "scale" => {
                        entry["kind"] = json!("Scale");
                        entry["group"] = json!("autoscaling");
                        entry["version"] = json!("v1");
                    }
                    "proxy" => {
                        entry["kind"] = json!("PodProxyOptions");
                        entry["verbs"] = json!(["create", "delete", "get", "patch", "update"]);
                    }
                    _ => {}
                }
                out.push(entry);
            }
        }
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out})
    };
    match parts[..] {
        ["api"] => Some(json!({"kind": "APIVersions", "versions": ["v1"],
                              "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})),
        ["api", "v1"] => Some(list("v1")),
        ["apis"] => {
            let mut groups: Vec<(String, Vec<String>)> = Vec::new();
            for r in resources.iter().filter(|r| r.group_version.contains('/')) {
                let (group, version) = (r.group().to_owned(), r.version().to_owned());
                match groups.iter_mut().find(|(g, _)| *g == group) {
                    Some((_, versions)) if !versions.contains(&version) => versions.push(version),
                    Some(_) => {}
                    None => groups.push((group, vec![version])),
                }
            }
            let groups: Vec<Value> = groups
                .into_iter()
                .map(|(group, versions)| {
                    let versions: Vec<Value> = versions
                        .iter()
                        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
                        .collect();
                    json!({"name": group, "versions": versions, "preferredVersion": versions[0]})
                })
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        ["apis", group, version] => {
            let gv = format!("{group}/{version}");
            resources.iter().any(|r| r.group_version == gv).then(|| list(&gv))
        }
        _ => None,
    }
}

/// `/openapi/v3`: one document per group-version; `/openapi/v3/{api/v1 | apis/g/v}`: its PATCH
/// operations, each taking `fieldValidation`, which is what kubectl looks for before leaving
/// validation to the server.
pub fn openapi(path: &str, resources: &[Resource]) -> Option<Value> {
    let rest = path.trim_matches('/').strip_prefix("openapi/v3")?.trim_start_matches('/');
    let prefix = |gv: &str| if gv.contains('/') { format!("apis/{gv}") } else { format!("api/{gv}") };
    if rest.is_empty() {
        let mut paths = serde_json::Map::new();
        for r in resources {
            let p = prefix(&r.group_version);
            paths.insert(p.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash=0")}));
        }
        return Some(json!({"paths": paths}));
    }
    let matching: Vec<&Resource> = resources.iter().filter(|r| prefix(&r.group_version) == rest).collect();
    if matching.is_empty() {
        return None;
    }
    let mut paths = serde_json::Map::new();
    for r in matching {
        let gvk = json!([{"group": r.group(), "version": r.version(), "kind": r.kind}]);
        let params = json!([
            {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
            {"name": "force", "in": "query", "schema": {"type": "boolean"}},
        ]);
        let scope = if r.namespaced { "namespaces/{namespace}/" } else { "" };
        let item = format!("/{rest}/{scope}{}/{{name}}", r.plural);
        paths.insert(
            item,
            json!({"patch": {"operationId": format!("patch{}", r.kind), "parameters": params,
                             "x-kubernetes-group-version-kind": gvk[0],
                             "responses": {"200": {"description": "OK"}}}}),
        );
    }
    Some(json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"}, "paths": paths,
                "components": {"schemas": {}}}))
}

/// Whether a request asks for server-side printing (`Accept: application/json;as=Table;…`).
pub fn wants_table(accept: &str) -> bool {
    accept.split(',').next().is_some_and(|first| first.contains("as=Table"))
}

/// A `meta.k8s.io/v1` Table of `items`: Name, then the resource's printer columns (a Pod's
/// READY, STATUS, RESTARTS, AGE, IP, NODE as the API server prints them), dates as ages.
pub fn table(resource: &Resource, items: &[Value], resource_version: &str, now: jiff::Timestamp) -> Value {
    let age = |v: &Value| {
        let Some(t) = v.as_str().and_then(|s| s.parse::<jiff::Timestamp>().ok()) else { return json!("<unknown>") };
        json!(human_duration(now.duration_since(t).as_secs()))
    };
    let pod = resource.group_version == "v1" && resource.plural == "pods";
    let mut columns = vec![json!({"name": "Name", "type": "string", "format": "name", "priority": 0,
                                  "description": "Name must be unique within a namespace."})];
    let column = |name: &str, kind: &str, priority: u8| json!({"name": name, "type": kind, "format": "", "priority": priority, "description": ""});
    if pod {
        for (name, kind, priority) in [
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "string", 0),
            ("Age", "string", 0),
            ("IP", "string", 1),
            ("Node", "string", 1),
        ] {
            columns.push(column(name, kind, priority));
        }
    } else if resource.columns.is_empty() {
        columns.push(column("Age", "date", 0));
    } else {
        for (name, kind, _) in &resource.columns {
            columns.push(column(name, kind, 0));
        }
    }
    let rows: Vec<Value> = items
        .iter()
        .map(|item| {
            let mut cells = vec![item["metadata"]["name"].clone()];
            let created = &item["metadata"]["creationTimestamp"];
            if pod {
                let statuses = item["status"]["containerStatuses"].as_array().cloned().unwrap_or_default();
                let containers = item["spec"]["containers"].as_array().map(Vec::len).unwrap_or(0);
                let ready = statuses.iter().filter(|s| s["ready"] == true).count();
                let restarts: u64 = statuses.iter().filter_map(|s| s["restartCount"].as_u64()).sum();
                // As kubectl's printPod: the phase, or the Pod's reason, or a container's
                // waiting or terminated reason; Terminating while being deleted.
                let mut phase = item["status"]["reason"]
                    .as_str()
                    .or(item["status"]["phase"].as_str())
                    .unwrap_or("Pending")
                    .to_owned();
                for status in &statuses {
                    let state = &status["state"];
                    if let Some(reason) = state["waiting"]["reason"].as_str().or(state["terminated"]["reason"].as_str())
                    {
                        phase = reason.to_owned();
                    }
                }
                if !item["metadata"]["deletionTimestamp"].is_null() {
                    phase = "Terminating".to_owned();
                }
                cells.extend([
                    json!(format!("{ready}/{containers}")),
                    json!(phase),
                    json!(restarts.to_string()),
                    age(created),
                    json!(item["status"]["podIP"].as_str().unwrap_or("<none>")),
                    json!(item["spec"]["nodeName"].as_str().unwrap_or("<none>")),
                ]);
            } else if resource.columns.is_empty() {
                cells.push(age(created));
            } else {
                for (_, kind, path) in &resource.columns {
                    let found = jsonpath_rust::JsonPath::query(item, &format!("${path}"))
                        .ok()
                        .and_then(|found| found.first().map(|v| (*v).clone()));
                    cells.push(match (kind.as_str(), found) {
                        ("date", Some(v)) => age(&v),
                        (_, Some(v)) => v,
                        (_, None) => Value::Null,
                    });
                }
            }
            let metadata = item["metadata"].clone();
            json!({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                              "metadata": metadata}})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
           "columnDefinitions": columns, "rows": rows})
}

/// A duration as kubectl shows ages (apimachinery's `duration.HumanDuration`): `45s`, `2m5s`,
/// `150m`, `5h30m`, `3d4h`, `2y10d`.
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    let s = seconds.max(0);
    let (minutes, hours) = (s / 60, s / 3600);
    let with = |big: i64, unit: &str, small: i64, small_unit: &str| {
        if small == 0 {
            format!("{big}{unit}")
        } else {
            format!("{big}{unit}{small}{small_unit}")
        }
    };
    match () {
        _ if s < 120 => format!("{s}s"),
        _ if minutes < 10 => with(minutes, "m", s % 60, "s"),
        _ if minutes < 180 => format!("{minutes}m"),
        _ if hours < 8 => with(hours, "h", minutes % 60, "m"),
        _ if hours < 48 => format!("{hours}h"),
        _ if hours < 24 * 8 => with(hours / 24, "d", hours % 24, "h"),
        _ if hours < 24 * 365 * 2 => format!("{}d", hours / 24),
        _ if hours < 24 * 365 * 8 => with(hours / 24 / 365, "y", (hours / 24) % 365, "d"),
        _ => format!("{}y", hours / 24 / 365),
    }
}

/// The OpenAPI value checks the API server runs on a custom resource before its CEL rules
/// (k8s.io/apiextensions-apiserver validation): type, `nullable`, `enum`, `required`,
/// min/max of items, length and value, `x-kubernetes-list-type: set` (no duplicates) and
/// `map` (no two items with the same keys). Messages as the API server words them.
pub fn validate_values(schema: &Value, object: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    if let Value::Object(map) = object {
        // apiVersion, kind and metadata are the API server's own business.
        for (key, child) in map {
            if let Some(child_schema) = schema["properties"].get(key) {
                if !["apiVersion", "kind", "metadata"].contains(&key.as_str()) {
                    check_value(child_schema, child, key, &mut errors);
                }
            }
        }
        required_fields(schema, map, "", &mut errors);
    }
    errors
}

fn required_fields(schema: &Value, map: &serde_json::Map<String, Value>, path: &str, errors: &mut Vec<String>) {
    for field in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        if !map.contains_key(field) {
            let at = if path.is_empty() { field.to_owned() } else { format!("{path}.{field}") };
            errors.push(format!("{at}: Required value"));
        }
    }
}

fn shown(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

fn check_value(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    if value.is_null() {
        if schema["nullable"] != true {
            errors.push(format!(
                "{path}: Invalid value: \"null\": {path} in body must be of type {}: \"null\"",
                schema["type"].as_str().unwrap_or("object")
            ));
        }
        return;
    }
    if schema["x-kubernetes-int-or-string"] == true {
        if !(value.is_string() || value.is_i64() || value.is_u64()) {
            errors.push(format!(
                "{path}: Invalid value: {}: {path} in body must be of type integer or string",
                shown(value)
            ));
        }
        return;
    }
    let kind = match value {
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
        Value::Null => unreachable!("handled above"),
    };
    if let Some(expected) = schema["type"].as_str() {
        let fits = expected == kind || (expected == "number" && kind == "integer");
        if !fits {
            errors.push(format!(
                "{path}: Invalid value: \"{kind}\": {path} in body must be of type {expected}: \"{kind}\""
            ));
            return;
        }
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            let list: Vec<String> = allowed.iter().map(shown).collect();
            errors.push(format!("{path}: Unsupported value: {}: supported values: {}", shown(value), list.join(", ")));
        }
    }
    match value {
        Value::String(s) => {
            let length = s.chars().count() as u64;
            if let Some(max) = schema["maxLength"].as_u64().filter(|max| length > *max) {
                errors.push(format!("{path}: Too long: may not be more than {max} bytes"));
            }
            if let Some(min) = schema["minLength"].as_u64().filter(|min| length < *min) {
                errors.push(format!(
                    "{path}: Invalid value: {}: {path} in body should be at least {min} chars long",
                    shown(value)
                ));
            }
            // The API server's `pattern` is an ECMA-262 regular expression, unanchored.
            if let Some(pattern) = schema["pattern"].as_str() {
                let matches = regex::Regex::new(pattern)
                    .unwrap_or_else(|e| panic!("{path}: the CRD's pattern {pattern:?} does not compile: {e}"))
                    .is_match(s);
                if !matches {
                    errors.push(format!(
                        "{path}: Invalid value: {}: {path} in body should match '{pattern}'",
                        shown(value)
                    ));
                }
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or_default();
            if let Some(min) = schema["minimum"].as_f64().filter(|min| x < *min) {
                errors.push(format!(
                    "{path}: Invalid value: {n}: {path} in body should be greater than or equal to {min}"
                ));
            }
            if let Some(max) = schema["maximum"].as_f64().filter(|max| x > *max) {
                errors
                    .push(format!("{path}: Invalid value: {n}: {path} in body should be less than or equal to {max}"));
            }
        }
        Value::Array(items) => {
            if let Some(max) = schema["maxItems"].as_u64().filter(|max| items.len() as u64 > *max) {
                errors.push(format!("{path}: Too many: {}: must have at most {max} items", items.len()));
            }
            if let Some(min) = schema["minItems"].as_u64().filter(|min| (items.len() as u64) < *min) {
                errors.push(format!(
                    "{path}: Invalid value: {}: {path} in body should have at least {min} items",
                    items.len()
                ));
            }
            match schema["x-kubernetes-list-type"].as_str() {
                Some("set") => {
                    for (i, item) in items.iter().enumerate() {
                        if items[..i].contains(item) {
                            errors.push(format!("{path}[{i}]: Duplicate value: {}", shown(item)));
                        }
                    }
                }
                Some("map") => {
                    let keys: Vec<&str> = schema["x-kubernetes-list-map-keys"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    let key_of = |item: &Value| keys.iter().map(|k| item[*k].clone()).collect::<Vec<_>>();
                    for (i, item) in items.iter().enumerate() {
                        if items[..i].iter().any(|earlier| key_of(earlier) == key_of(item)) {
                            let shown_keys: Vec<String> =
                                keys.iter().map(|k| format!("{k}: {}", shown(&item[*k]))).collect();
                            errors.push(format!("{path}[{i}]: Duplicate value: map[{}]", shown_keys.join(" ")));
                        }
                    }
                }
                _ => {}
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check_value(item_schema, item, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::Object(map) => {
            if schema["x-kubernetes-preserve-unknown-fields"] == true && schema.get("properties").is_none() {
                return;
            }
            if let Some(properties) = schema["properties"].as_object() {
                for (key, child) in map {
                    if let Some(child_schema) = properties.get(key) {
                        check_value(child_schema, child, &format!("{path}.{key}"), errors);
                    }
                }
            } else if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for (key, child) in map {
                    check_value(additional, child, &format!("{path}[{key}]"), errors);
                }
            }
            if let Some(max) = schema["maxProperties"].as_u64().filter(|max| map.len() as u64 > *max) {
                errors.push(format!("{path}: Too many: {}: must have at most {max} items", map.len()));
            }
            required_fields(schema, map, path, errors);
        }
        _ => {}
    }
}

/// Prunes what a structural schema does not declare, as the API server does for custom
/// resources (`apiVersion`, `kind` and `metadata` are kept at the root); returns the paths of
/// what was pruned, for `fieldValidation=Strict`, which refuses them instead.
pub fn prune(schema: &Value, object: &mut Value) -> Vec<String> {
    let mut pruned = Vec::new();
    prune_at(schema, object, "", true, &mut pruned);
    pruned
}

fn prune_at(schema: &Value, value: &mut Value, path: &str, root: bool, pruned: &mut Vec<String>) {
    if schema["x-kubernetes-preserve-unknown-fields"] == true {
        return;
    }
    match value {
        Value::Object(map) => {
            if let Some(properties) = schema["properties"].as_object() {
                map.retain(|key, _| {
                    let keep = properties.contains_key(key)
                        || ((root || schema["x-kubernetes-embedded-resource"] == true)
                            && ["apiVersion", "kind", "metadata"].contains(&key.as_str()));
                    if !keep {
                        pruned.push(format!("{path}.{key}").trim_start_matches('.').to_owned());
                    }
                    keep
                });
                for (key, child) in map.iter_mut() {
                    if let Some(child_schema) = properties.get(key) {
                        prune_at(child_schema, child, &format!("{path}.{key}"), false, pruned);
                    }
                }
            } else if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for (key, child) in map.iter_mut() {
                    prune_at(additional, child, &format!("{path}.{key}"), false, pruned);
                }
            } else if schema["type"] == "object" && schema["x-kubernetes-int-or-string"] != true {
                for key in map.keys() {
                    pruned.push(format!("{path}.{key}").trim_start_matches('.').to_owned());
                }
                map.clear();
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    prune_at(item_schema, item, &format!("{path}[{i}]"), false, pruned);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_are_checked_as_the_api_server_checks_them() {
        let schema = serde_json::json!({"type": "object", "properties": {"spec": {"type": "object",
            "required": ["name", "scopes"],
            "properties": {
                "name": {"type": "string", "maxLength": 5},
                "scopes": {"type": "array", "minItems": 1, "maxItems": 2, "x-kubernetes-list-type": "set",
                           "items": {"type": "string", "enum": ["read", "write"]}},
                "count": {"type": "integer", "minimum": 1},
                "size": {"x-kubernetes-int-or-string": true},
                "note": {"type": "string", "nullable": true},
                "host": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}}}}});
        let check = |spec: serde_json::Value| super::validate_values(&schema, &serde_json::json!({"spec": spec}));
        assert!(check(serde_json::json!({"name": "a", "scopes": ["read"], "size": "1Gi", "note": null})).is_empty());
        assert_eq!(check(serde_json::json!({"scopes": ["read"]})), ["spec.name: Required value"]);
        assert!(check(serde_json::json!({"name": "a", "scopes": ["read"], "host": "s3.example.com"})).is_empty());
        assert_eq!(
            check(serde_json::json!({"name": "a", "scopes": ["read"], "host": "-s3"})),
            ["spec.host: Invalid value: \"-s3\": spec.host in body should match '^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$'"]
        );
        assert_eq!(
            check(serde_json::json!({"name": "toolong", "scopes": ["read", "read", "x"], "count": 0, "size": true})),
            [
                "spec.count: Invalid value: 0: spec.count in body should be greater than or equal to 1",
                "spec.name: Too long: may not be more than 5 bytes",
                "spec.scopes: Too many: 3: must have at most 2 items",
                "spec.scopes[1]: Duplicate value: \"read\"",
                "spec.scopes[2]: Unsupported value: \"x\": supported values: \"read\", \"write\"",
                "spec.size: Invalid value: true: spec.size in body must be of type integer or string",
            ]
        );
        assert_eq!(
            check(serde_json::json!({"name": 3, "scopes": []})),
            [
                "spec.name: Invalid value: \"integer\": spec.name in body must be of type string: \"integer\"",
                "spec.scopes: Invalid value: 0: spec.scopes in body should have at least 1 items",
            ]
        );
    }

    use super::*;

    #[test]
    fn pruning_keeps_what_the_schema_declares() {
        let schema = json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {
                "a": {"type": "integer"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "list": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "string"}}}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "empty": {"type": "object"}}},
            "status": {"type": "object", "properties": {"phase": {"type": "string"}}}}});
        let mut object = json!({"apiVersion": "g/v1", "kind": "K", "metadata": {"name": "n"},
            "spec": {"a": 1, "typo": 2, "labels": {"k": "v"}, "list": [{"x": "1", "y": "2"}],
                     "free": {"anything": {"goes": 1}}, "empty": {"gone": 1}},
            "status": {"phase": "Ready", "extra": true}, "top": 1});
        let pruned = prune(&schema, &mut object);
        assert_eq!(pruned, ["top", "spec.typo", "spec.empty.gone", "spec.list[0].y", "status.extra"]);
        assert_eq!(
            object,
            json!({"apiVersion": "g/v1", "kind": "K", "metadata": {"name": "n"},
                "spec": {"a": 1, "labels": {"k": "v"}, "list": [{"x": "1"}], "free": {"anything": {"goes": 1}}, "empty": {}},
                "status": {"phase": "Ready"}})
        );
    }

    #[test]
    fn tables_use_printer_columns_and_ages() {
        let crd: Value = serde_yaml::from_str(include_str!("../../crds/storeclusters.cairn.dev.yaml")).unwrap();
        let resource = from_crd(&crd).remove(0);
        let now: jiff::Timestamp = "2026-01-01T01:00:00Z".parse().unwrap();
        let item = json!({"metadata": {"name": "c", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": "Ready", "conditions": [{"type": "Degraded", "status": "False"}, {"type": "Ready", "status": "True"}],
                       "partitions": {"total": 6}}});
        let table = table(&resource, &[item], "7", now);
        let names: Vec<&str> =
            table["columnDefinitions"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["Name", "Phase", "Ready", "Nodes", "Partitions", "Age"]);
        assert_eq!(table["rows"][0]["cells"], json!(["c", "Ready", "True", null, 6, "60m"]));
        for (seconds, shown) in [
            (45, "45s"),
            (125, "2m5s"),
            (600, "10m"),
            (9000, "150m"),
            (19800, "5h30m"),
            (3 * 86400 + 4 * 3600, "3d4h"),
            (40 * 86400, "40d"),
            (2 * 365 * 86400 + 10 * 86400, "2y10d"),
        ] {
            assert_eq!(human_duration(seconds), shown, "{seconds}");
        }
    }
}
