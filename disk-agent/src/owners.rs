//! Who may open which volume through the node socket.
//!
//! A datanode names its cluster and presents that cluster's disk-agent token. The first cluster
//! to make (or, for a volume made before the agent recorded owners, first open) a volume owns it;
//! the agent keeps the owner and the SHA-256 of its token in `<state-dir>/volume-owners.json`.
//! A cluster's token is bound to it on this machine while it owns a volume here: another token
//! under the same name is refused, and a cluster may only ask for the names its own replicas
//! have. Deleting is for the admin socket alone, which also drops the owner.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use axum::http::HeaderMap;
use cairn_common::agent_api::{cluster_volume_name, standalone_volume_name, CreateVolumeRequest, CLUSTER_HEADER};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::AgentError;

const FILE: &str = "volume-owners.json";
const FORMAT: u32 = 1;
/// A token longer than this is not one the operator or a datanode made.
const MAX_TOKEN_LEN: usize = 256;

/// A datanode on the node socket: its cluster and the digest of the token it presented.
#[derive(Clone)]
pub struct Caller {
    pub cluster: String,
    token_sha256: [u8; 32],
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller").field("cluster", &self.cluster).finish_non_exhaustive()
    }
}

impl Caller {
    /// The caller named by the request's headers; `None` when it presents no credential at all.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, AgentError> {
        let cluster = headers.get(CLUSTER_HEADER);
        let token = headers.get(axum::http::header::AUTHORIZATION);
        let (cluster, token) = match (cluster, token) {
            (None, None) => return Ok(None),
            (Some(c), Some(t)) => (c, t),
            _ => {
                return Err(AgentError::Unauthenticated(format!(
                    "send both {CLUSTER_HEADER}: <cluster> and Authorization: Bearer <the cluster's disk-agent token>"
                )))
            }
        };
        let cluster = cluster
            .to_str()
            .ok()
            .filter(|c| cairn_common::agent_api::validate_volume_name(c).is_ok())
            .ok_or_else(|| AgentError::Unauthenticated(format!("{CLUSTER_HEADER} is not a cluster name")))?;
        let token = token
            .to_str()
            .ok()
            .and_then(|t| t.strip_prefix("Bearer "))
            .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_LEN)
            .ok_or_else(|| AgentError::Unauthenticated("Authorization is not `Bearer <token>`".into()))?;
        Ok(Some(Self { cluster: cluster.to_owned(), token_sha256: Sha256::digest(token.as_bytes()).into() }))
    }

    fn token_hex(&self) -> String {
        self.token_sha256.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Owner {
    cluster: String,
    token_sha256: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    format: u32,
    volumes: BTreeMap<String, Owner>,
}

/// The owners of this machine's volumes (kept under the agent's lock).
#[derive(Debug, Default)]
pub struct Owners {
    /// `None`: nothing is persisted (an agent without a state directory, in unit tests).
    path: Option<PathBuf>,
    record: Record,
}

impl Owners {
    pub fn load(state_dir: Option<&Path>) -> anyhow::Result<Self> {
        let Some(dir) = state_dir else {
            return Ok(Self::default());
        };
        let path = dir.join(FILE);
        let record = crate::identity::read_state_record(&path, |r: &Record| r.format, FORMAT)?
            .unwrap_or(Record { format: FORMAT, ..Record::default() });
        Ok(Self { path: Some(path), record })
    }

    /// Whether `caller` may make or open the volume `name` as `request` asks: the name is the
    /// one its cluster's replica (or standalone datanode) has for that partition, no other
    /// cluster owns the volume, and the token is the one bound to the cluster here.
    pub fn authorize(&self, caller: &Caller, name: &str, request: &CreateVolumeRequest) -> Result<(), AgentError> {
        let expected = match &request.node {
            Some(node) => cluster_volume_name(&caller.cluster, request.partition, node),
            None => standalone_volume_name(&caller.cluster, request.partition),
        };
        if name != expected {
            return Err(AgentError::Forbidden(format!(
                "cluster {} may not ask for volume {name}: its volume for partition {} is {expected}",
                caller.cluster, request.partition
            )));
        }
        if let Some(owner) = self.record.volumes.get(name) {
            if owner.cluster != caller.cluster {
                return Err(AgentError::Forbidden(format!("volume {name} belongs to another cluster")));
            }
        }
        self.check_token(caller)
    }

    /// The token is the one bound to the caller's cluster, or the cluster owns nothing here.
    fn check_token(&self, caller: &Caller) -> Result<(), AgentError> {
        let presented = caller.token_hex();
        let bound = self.record.volumes.values().find(|o| o.cluster == caller.cluster);
        match bound {
            Some(owner) if !bool::from(owner.token_sha256.as_bytes().ct_eq(presented.as_bytes())) => {
                Err(AgentError::Forbidden(format!(
                    "the volumes of cluster {} on this machine were made with another token (an admin's \
                     `cairn volumes purge` releases them)",
                    caller.cluster
                )))
            }
            _ => Ok(()),
        }
    }

    /// Whether `caller` owns `name` (for what the node socket lists).
    pub fn owns(&self, caller: &Caller, name: &str) -> bool {
        let presented = caller.token_hex();
        self.record.volumes.get(name).is_some_and(|o| {
            o.cluster == caller.cluster && bool::from(o.token_sha256.as_bytes().ct_eq(presented.as_bytes()))
        })
    }

    /// Records `caller` as the owner of `name` (idempotent).
    pub fn record(&mut self, caller: &Caller, name: &str) -> Result<(), AgentError> {
        let owner = Owner { cluster: caller.cluster.clone(), token_sha256: caller.token_hex() };
        if self.record.volumes.get(name) == Some(&owner) {
            return Ok(());
        }
        self.record.volumes.insert(name.to_owned(), owner);
        self.save()
    }

    /// Drops the owner of a deleted volume.
    pub fn forget(&mut self, name: &str) -> Result<(), AgentError> {
        if self.record.volumes.remove(name).is_some() {
            self.save()?;
        }
        Ok(())
    }

    fn save(&self) -> Result<(), AgentError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| AgentError::Internal(format!("{}: {e}", dir.display())))?;
        }
        let record = Record { format: FORMAT, volumes: self.record.volumes.clone() };
        let body = serde_json::to_vec_pretty(&record).expect("owners serialize");
        cairn_common::volume_layout::write_atomic(path, &body).map_err(|e| AgentError::Internal(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(cluster: &str, token: &str) -> Caller {
        let mut headers = HeaderMap::new();
        headers.insert(CLUSTER_HEADER, cluster.parse().unwrap());
        headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
        Caller::from_headers(&headers).unwrap().unwrap()
    }

    fn request(partition: u32, node: Option<&str>) -> CreateVolumeRequest {
        CreateVolumeRequest {
            disk: "d".into(),
            capacity_bytes: 1 << 20,
            segment_size_bytes: 1 << 20,
            partition,
            node: node.map(str::to_owned),
        }
    }

    #[test]
    fn a_cluster_may_ask_only_for_its_own_names() {
        let owners = Owners::default();
        let a = caller("a", "ta");
        assert!(owners.authorize(&a, "a-p1-n1", &request(1, Some("n1"))).is_ok());
        assert!(owners.authorize(&a, "a-p1", &request(1, None)).is_ok());
        // Another partition's name, another node's, another cluster's.
        for (name, req) in [
            ("a-p2-n1", request(1, Some("n1"))),
            ("a-p1-n2", request(1, Some("n1"))),
            ("b-p1-n1", request(1, Some("n1"))),
            ("a-p1-p0-n1", request(0, Some("n1"))),
        ] {
            let e = owners.authorize(&a, name, &req).unwrap_err();
            assert_eq!(e.code(), "forbidden", "{name}");
        }
    }

    #[test]
    fn a_volume_stays_its_owners_and_a_clusters_token_stays_bound() {
        let mut owners = Owners::default();
        let (a, b) = (caller("a", "ta"), caller("a-p1", "tb"));
        owners.record(&a, "a-p1-p0-n1").unwrap();
        // Cluster a-p1's replica of partition 0 on node n1 has the same name: refused, it is a's.
        let e = owners.authorize(&b, "a-p1-p0-n1", &request(0, Some("n1"))).unwrap_err();
        assert!(e.to_string().contains("another cluster"), "{e}");
        // Cluster a with another token: refused, even for a volume it does not have yet.
        let forged = caller("a", "forged");
        let e = owners.authorize(&forged, "a-p2-n1", &request(2, Some("n1"))).unwrap_err();
        assert!(e.to_string().contains("another token"), "{e}");
        assert!(owners.owns(&a, "a-p1-p0-n1") && !owners.owns(&forged, "a-p1-p0-n1"));
        // Once its volumes are gone, the name may be bound to a new token.
        owners.forget("a-p1-p0-n1").unwrap();
        assert!(owners.authorize(&forged, "a-p2-n1", &request(2, Some("n1"))).is_ok());
    }

    #[test]
    fn half_a_credential_or_a_malformed_one_is_refused() {
        let mut headers = HeaderMap::new();
        assert!(Caller::from_headers(&headers).unwrap().is_none());
        headers.insert(CLUSTER_HEADER, "a".parse().unwrap());
        assert_eq!(Caller::from_headers(&headers).unwrap_err().code(), "unauthenticated");
        for bad in ["Basic eA==", "Bearer ", "token"] {
            headers.insert("authorization", bad.parse().unwrap());
            assert_eq!(Caller::from_headers(&headers).unwrap_err().code(), "unauthenticated", "{bad}");
        }
        headers.insert("authorization", format!("Bearer {}", "x".repeat(MAX_TOKEN_LEN + 1)).parse().unwrap());
        assert!(Caller::from_headers(&headers).is_err());
        headers.insert("authorization", "Bearer t".parse().unwrap());
        headers.insert(CLUSTER_HEADER, "Not_A_Name".parse().unwrap());
        assert!(Caller::from_headers(&headers).is_err());
    }

    #[test]
    fn owners_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let a = caller("a", "ta");
        let mut owners = Owners::load(Some(dir.path())).unwrap();
        owners.record(&a, "a-p0-n1").unwrap();
        let owners = Owners::load(Some(dir.path())).unwrap();
        assert!(owners.owns(&a, "a-p0-n1"));
        std::fs::write(dir.path().join(FILE), r#"{"format": 2, "volumes": {}}"#).unwrap();
        assert!(Owners::load(Some(dir.path())).is_err());
    }
}
