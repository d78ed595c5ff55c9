//! RBAC as the API server evaluates it, for [`MemoryApi`](crate::MemoryApi): the ClusterRoles,
//! Roles and their bindings of a rendered manifest (`helm template charts/cairn`), and the
//! question "may this user do this verb on this resource here". Only what Cairn's charts use:
//! rules by apiGroups / resources (with `resource/subresource`) / verbs / resourceNames and `*`,
//! ServiceAccount and User subjects. A request the rules do not allow is 403, as on a real
//! cluster; every allowed request is recorded, so a test can list what a chart grants in vain.

use std::collections::BTreeSet;

use serde_json::Value;

#[derive(Debug, Clone)]
struct Rule {
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    names: Vec<String>,
}

impl Rule {
    fn from(value: &Value) -> Self {
        let list = |key: &str| -> Vec<String> {
            value[key]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
                .unwrap_or_default()
        };
        Self {
            groups: list("apiGroups"),
            resources: list("resources"),
            verbs: list("verbs"),
            names: list("resourceNames"),
        }
    }

    fn allows(&self, verb: &str, group: &str, resource: &str, name: &str) -> bool {
        let any = |list: &[String], want: &str| list.iter().any(|v| v == "*" || v == want);
        any(&self.verbs, verb)
            && any(&self.groups, group)
            && any(&self.resources, resource)
            && (self.names.is_empty() || self.names.iter().any(|n| n == name))
    }
}

/// A role's rules, granted to `subjects` cluster-wide (`namespace` None) or in one namespace.
#[derive(Debug, Clone)]
struct Grant {
    subjects: Vec<String>,
    namespace: Option<String>,
    role: String,
    rules: Vec<Rule>,
}

/// One authorization question.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Access {
    pub user: String,
    pub verb: String,
    pub group: String,
    /// `pods`, or `pods/status` for a subresource.
    pub resource: String,
    /// Empty for cluster-scoped resources.
    pub namespace: String,
}

#[derive(Debug, Clone, Default)]
pub struct Rbac {
    grants: Vec<Grant>,
}

impl Rbac {
    /// The roles and bindings among the YAML documents of `manifests` (other kinds are skipped).
    pub fn from_manifests(manifests: &str) -> Self {
        let docs: Vec<Value> = manifests
            .split("\n---")
            .filter_map(|d| serde_yaml::from_str::<Value>(d).ok())
            .filter(|d| d.is_object())
            .collect();
        let role = |kind: &str, name: &str, namespace: Option<&str>| -> Vec<Rule> {
            docs.iter()
                .find(|d| {
                    d["kind"] == kind
                        && d["metadata"]["name"] == name
                        && (kind == "ClusterRole" || d["metadata"]["namespace"].as_str() == namespace)
                })
                .map(|d| aggregated_rules(&docs, d, 0))
                .unwrap_or_default()
        };
        let mut grants = Vec::new();
        for d in &docs {
            let kind = d["kind"].as_str().unwrap_or_default();
            if kind != "ClusterRoleBinding" && kind != "RoleBinding" {
                continue;
            }
            let namespace = (kind == "RoleBinding").then(|| d["metadata"]["namespace"].as_str().unwrap_or_default());
            let role_kind = d["roleRef"]["kind"].as_str().unwrap_or_default();
            let role_name = d["roleRef"]["name"].as_str().unwrap_or_default();
            let subjects = d["subjects"]
                .as_array()
                .map(|s| {
                    s.iter()
                        .map(|s| match s["kind"].as_str() {
                            Some("ServiceAccount") => service_account(
                                s["namespace"].as_str().or(namespace).unwrap_or_default(),
                                s["name"].as_str().unwrap_or_default(),
                            ),
                            _ => s["name"].as_str().unwrap_or_default().to_owned(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            grants.push(Grant {
                subjects,
                namespace: namespace.map(String::from),
                role: role_name.to_owned(),
                rules: role(role_kind, role_name, namespace),
            });
        }
        Self { grants }
    }

    pub fn allows(&self, access: &Access) -> bool {
        let name = "";
        self.grants.iter().any(|g| {
            g.subjects.contains(&access.user)
                && g.namespace.as_deref().is_none_or(|ns| ns == access.namespace)
                && g.rules.iter().any(|r| r.allows(&access.verb, &access.group, &access.resource, name))
        })
    }

    /// Every (verb, group, resource) the rules grant `user`, with the role that grants it.
    pub fn granted(&self, user: &str) -> BTreeSet<(String, String, String, String)> {
        let mut out = BTreeSet::new();
        for g in self.grants.iter().filter(|g| g.subjects.iter().any(|s| s == user)) {
            for r in &g.rules {
                for verb in &r.verbs {
                    for group in &r.groups {
                        for resource in &r.resources {
                            out.insert((g.role.clone(), verb.clone(), group.clone(), resource.clone()));
                        }
                    }
                }
            }
        }
        out
    }
}

/// A role's rules; for a ClusterRole with an `aggregationRule`, only the rules of every
/// ClusterRole its selectors match (the aggregation controller overwrites the role's own), and
/// theirs, as it chains them: `view` into `edit` into `admin`.
fn aggregated_rules(docs: &[Value], role: &Value, depth: usize) -> Vec<Rule> {
    let selectors = role["aggregationRule"]["clusterRoleSelectors"].as_array().cloned().unwrap_or_default();
    if role["aggregationRule"].is_null() || depth > 8 {
        return role["rules"].as_array().into_iter().flatten().map(Rule::from).collect();
    }
    let mut rules = Vec::new();
    for other in docs.iter().filter(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] != role["metadata"]["name"])
    {
        let matches = selectors.iter().any(|sel| crate::selector::selector_matches(sel, &other["metadata"]["labels"]));
        if matches {
            rules.extend(aggregated_rules(docs, other, depth + 1));
        }
    }
    rules
}

/// Kubernetes' own user-facing roles, as an API server bootstraps them (the rules that matter
/// here): `view`, `edit` and `admin`, aggregating the ClusterRoles labelled for them.
pub const BUILTIN_USER_ROLES: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: view
  labels: {rbac.authorization.k8s.io/aggregate-to-edit: "true"}
aggregationRule:
  clusterRoleSelectors: [{matchLabels: {rbac.authorization.k8s.io/aggregate-to-view: "true"}}]
rules: []
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: system:aggregate-to-view
  labels: {rbac.authorization.k8s.io/aggregate-to-view: "true"}
rules:
  - apiGroups: [""]
    resources: [pods, pods/log, pods/status, services, endpoints, configmaps, events, persistentvolumeclaims, serviceaccounts]
    verbs: [get, list, watch]
  - apiGroups: [events.k8s.io]
    resources: [events]
    verbs: [get, list, watch]
  - apiGroups: [apps]
    resources: [deployments, daemonsets, statefulsets, replicasets]
    verbs: [get, list, watch]
  - apiGroups: [policy]
    resources: [poddisruptionbudgets]
    verbs: [get, list, watch]
  - apiGroups: [networking.k8s.io]
    resources: [networkpolicies]
    verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: edit
  labels: {rbac.authorization.k8s.io/aggregate-to-admin: "true"}
aggregationRule:
  clusterRoleSelectors: [{matchLabels: {rbac.authorization.k8s.io/aggregate-to-edit: "true"}}]
rules: []
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: system:aggregate-to-edit
  labels: {rbac.authorization.k8s.io/aggregate-to-edit: "true"}
rules:
  - apiGroups: [""]
    resources: [pods, pods/attach, pods/exec, pods/portforward, pods/proxy, services, services/proxy, configmaps, secrets, persistentvolumeclaims]
    verbs: [create, delete, deletecollection, patch, update, get, list, watch]
  - apiGroups: [""]
    resources: [pods/eviction]
    verbs: [create]
  - apiGroups: [apps]
    resources: [deployments, daemonsets, statefulsets, replicasets]
    verbs: [create, delete, deletecollection, patch, update]
  - apiGroups: [policy]
    resources: [poddisruptionbudgets]
    verbs: [create, delete, deletecollection, patch, update]
  - apiGroups: [networking.k8s.io]
    resources: [networkpolicies]
    verbs: [create, delete, deletecollection, patch, update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: admin
aggregationRule:
  clusterRoleSelectors: [{matchLabels: {rbac.authorization.k8s.io/aggregate-to-admin: "true"}}]
rules: []
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: system:aggregate-to-admin
  labels: {rbac.authorization.k8s.io/aggregate-to-admin: "true"}
rules:
  - apiGroups: [rbac.authorization.k8s.io]
    resources: [roles, rolebindings]
    verbs: [create, delete, get, list, patch, update, watch]
"#;

/// The chart's manifests as `helm template cairn charts/cairn --namespace cairn-system` renders
/// them (helm is the one `scripts/test-chart.sh` installs into `.tools/`).
pub fn rendered_chart() -> String {
    rendered_chart_with(&[])
}

/// The chart rendered with more `helm template` arguments (`--set key=value`).
pub fn rendered_chart_with(args: &[&str]) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let helm = root.join(".tools/bin/helm");
    let out = std::process::Command::new(&helm)
        .args(["template", "cairn", "charts/cairn", "--namespace", "cairn-system"])
        .args(args)
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/test-chart.sh once (it installs helm)", helm.display()));
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// The operator's user in the rendered chart.
pub fn operator_user() -> String {
    service_account("cairn-system", "cairn-operator")
}

/// The disk agent's user in the rendered chart.
pub fn disk_agent_user() -> String {
    service_account("cairn-system", "cairn-disk-agent")
}

/// `system:serviceaccount:<namespace>:<name>`, the user a ServiceAccount's token authenticates as.
pub fn service_account(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFESTS: &str = "
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: op}
rules:
  - {apiGroups: [''], resources: [pods], verbs: [get, patch]}
  - {apiGroups: [cairn.dev], resources: [storeclusters/status], verbs: [patch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: op}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: op}
subjects: [{kind: ServiceAccount, name: op, namespace: sys}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: leader, namespace: sys}
rules: [{apiGroups: [coordination.k8s.io], resources: [leases], verbs: ['*']}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: leader, namespace: sys}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: leader}
subjects: [{kind: ServiceAccount, name: op}]
";

    fn access(user: &str, verb: &str, group: &str, resource: &str, namespace: &str) -> Access {
        Access {
            user: user.into(),
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: namespace.into(),
        }
    }

    #[test]
    fn cluster_and_namespaced_grants_and_subresources() {
        let rbac = Rbac::from_manifests(MANIFESTS);
        let op = service_account("sys", "op");
        assert!(rbac.allows(&access(&op, "patch", "", "pods", "store")));
        assert!(!rbac.allows(&access(&op, "create", "", "pods", "store")), "create is not patch");
        assert!(!rbac.allows(&access(&op, "patch", "", "pods/status", "store")), "a subresource is its own");
        assert!(rbac.allows(&access(&op, "patch", "cairn.dev", "storeclusters/status", "x")));
        assert!(rbac.allows(&access(&op, "update", "coordination.k8s.io", "leases", "sys")));
        assert!(
            !rbac.allows(&access(&op, "update", "coordination.k8s.io", "leases", "other")),
            "a Role is its namespace's"
        );
        assert!(!rbac.allows(&access(&service_account("other", "op"), "get", "", "pods", "store")));
        assert_eq!(rbac.granted(&op).len(), 4);
    }
}
