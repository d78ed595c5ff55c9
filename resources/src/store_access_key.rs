//! `StoreAccessKey`: an access key declared as a resource; the operator makes the key in the
//! cluster's etcd and writes its token into a Secret beside it (docs/security.md).

use cairn_common::scope::Scope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// An access key to a StoreCluster, for the applications of this namespace: the operator makes
/// the key and writes its token into the Secret `spec.secretName` (default: the key's name).
/// Deleting the resource revokes the key (and the Secret goes with it); deleting the Secret makes
/// a new key and revokes the old one.
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "cairn.dev",
    version = "v1alpha1",
    kind = "StoreAccessKey",
    plural = "storeaccesskeys",
    shortname = "sak",
    namespaced,
    status = "StoreAccessKeyStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.cluster.name"}"#,
    printcolumn = r#"{"name":"Key","type":"string","jsonPath":".status.keyId"}"#,
    printcolumn = r#"{"name":"Secret","type":"string","jsonPath":".status.secretName"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("!has(self.buckets) || !has(self.partitions)").message("a key is limited to partitions (blob API) or to buckets (S3), not both"),
    validation = Rule::new("!has(self.buckets) || !('admin' in self.scopes)").message("a key limited to buckets cannot be an admin"),
    validation = Rule::new("!has(self.buckets) || self.buckets.all(b, !has(b.scopes) || b.scopes.all(s, s in self.scopes))").message("a bucket is granted only scopes among the key's")
)]
#[serde(rename_all = "camelCase")]
pub struct StoreAccessKeySpec {
    /// The StoreCluster the key opens. One in another namespace must list this namespace in its
    /// `spec.accessKeyNamespaces`, and never grants `admin` there.
    pub cluster: ClusterRef,
    /// What the key may do: read, write, delete, admin (everything).
    #[schemars(length(min = 1, max = 4), extend("x-kubernetes-list-type" = "set"))]
    pub scopes: Vec<Scope>,
    /// Limit the key to the blobs of these partitions (its new blobs go there); default: every
    /// partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096), extend("x-kubernetes-list-type" = "set"))]
    pub partitions: Option<Vec<u32>>,
    /// Limit the key to these S3 buckets, each with its own scopes (default: the key's). Such a
    /// key is for S3 only (the blob API refuses it), cannot be an admin, and excludes
    /// `partitions`; default: every bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 1000),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"])
    )]
    pub buckets: Option<Vec<BucketGrant>>,
    /// The Secret the operator writes (keys CAIRN_KEY_ID, CAIRN_KEY_SECRET, CAIRN_TOKEN,
    /// CAIRN_ENDPOINT); default: the StoreAccessKey's name. It must not exist already unless
    /// this key made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("secretName must be a DNS subdomain name"))]
    pub secret_name: Option<String>,
}

/// One bucket a key may use, and what it may do there.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BucketGrant {
    /// The bucket's name (S3's rules: 3–63 of a-z, 0-9, '.', '-').
    #[schemars(length(min = 3, max = 63), regex(pattern = r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$"))]
    #[x_kube(validation = Rule::new("!self.contains('..') && !self.contains('.-') && !self.contains('-.')").message("a bucket name has no two adjacent periods, nor a period beside a hyphen"))]
    pub name: String,
    /// read, write, delete (among the key's `scopes`); default: the key's scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 3), extend("x-kubernetes-list-type" = "set"))]
    pub scopes: Option<Vec<Scope>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRef {
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Default: the StoreAccessKey's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreAccessKeyStatus {
    /// Ready: the key is in the cluster's etcd and its token in the Secret; False with the
    /// reason (ClusterNotFound, NamespaceNotAllowed, AdminNotAllowed, SecretConflict,
    /// EtcdUnreachable, InvalidSpec) otherwise.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The key's id (never its secret): what `cairn keys list` shows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

impl StoreAccessKeySpec {
    /// The namespace of the cluster, given the key's own.
    pub fn cluster_namespace<'a>(&'a self, own: &'a str) -> &'a str {
        self.cluster.namespace.as_deref().unwrap_or(own)
    }
}
