//! Name records on a cluster (the S3 front's object names, `engine::names`): written at write
//! quorum like any blob (their ids are fixed by space, name and version), and read at read
//! quorum, so that a read meets every write a client was answered for.
//!
//! A read asks `R = N - W + 1` replicas of the partition for the name's versions (or a page of
//! current names) and takes their union, the newest version current. A replica that lags lacks
//! a version; one that took a delete the others have not yet holds a tombstone for it. So a
//! version that some replicas answered and others did not is asked about once more: it counts
//! unless one of those holds it deleted. A delete acknowledged at quorum meets every read quorum,
//! as a write does.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use cairn_cluster::replica::{
    check_version, hex, unhex, CurrentNamesAnswer, CurrentNamesQuery, NameVersionsAnswer, NameVersionsQuery, WireName,
    WIRE_VERSION,
};
use cairn_cluster::topology::PartitionSpec;
use cairn_common::BlobId;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::router::RouteError;
use super::Cluster;
use crate::engine::names::{CurrentName, NameEntry, NameRecord};
use crate::engine::{Volume, VolumeError};

/// A replica's versions of one name, by version.
type Versions = BTreeMap<u128, NameEntry>;

impl Cluster {
    /// Stores a name record (its id fixed by what it records) at write quorum.
    pub async fn put_name(self: &Arc<Self>, id: BlobId, payload: Bytes, created_ms: u64) -> Result<(), RouteError> {
        self.put_at(id, NameRecord::blob_meta(), payload, created_ms).await
    }

    /// Every version of a name in `partition`, oldest first, as a read quorum of its replicas
    /// holds them.
    pub async fn name_versions(
        self: &Arc<Self>,
        partition: u32,
        space: &str,
        name: &str,
    ) -> Result<Vec<(u128, NameEntry)>, RouteError> {
        let spec = self.partition_spec(partition)?;
        let query = |ask: Vec<String>| NameVersionsQuery {
            version: WIRE_VERSION,
            space: space.to_string(),
            name: name.to_string(),
            ask,
        };
        let answers = self.read_quorum(&spec, query(Vec::new())).await?;
        let answers: Vec<(String, Versions)> = answers
            .into_iter()
            .map(|(node, answer)| versions_of(answer).map(|v| (node, v)))
            .collect::<Result<_, _>>()?;
        let mut deleted = HashSet::new();
        for (node, lacking) in disputed(answers.iter().map(|(_, v)| v)) {
            let node = &answers[node].0;
            let ask = lacking.iter().map(|id| id.to_string()).collect();
            let answer = self.ask_replica(node, partition, query(ask)).await?;
            check_version(answer.version).map_err(|e| RouteError::NoQuorum(format!("{node}: {e}")))?;
            for id in answer.deleted {
                deleted.insert(parse_id(&id)?);
            }
        }
        Ok(merge(answers.iter().map(|(_, v)| v), &deleted))
    }

    /// The current names of `space` in `partition` that start with `prefix`, from `from` on
    /// (without `from` itself when `after`), in byte order: at most `limit`, as a read quorum
    /// of its replicas holds them.
    pub async fn current_names(
        self: &Arc<Self>,
        partition: u32,
        space: &str,
        from: &str,
        after: bool,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<CurrentName>, RouteError> {
        let spec = self.partition_spec(partition)?;
        // A replica's page holds at most MAX_PAGE names: a larger limit would take a full page
        // for the end.
        let limit = limit.clamp(1, MAX_PAGE);
        let (mut from, mut after) = (from.to_string(), after);
        let mut out = Vec::new();
        loop {
            let query = CurrentNamesQuery {
                version: WIRE_VERSION,
                space: space.to_string(),
                from: from.clone(),
                after,
                prefix: prefix.to_string(),
                limit: limit.min(u32::MAX as usize) as u32,
            };
            let pages: Vec<Vec<CurrentName>> = self
                .read_quorum(&spec, query)
                .await?
                .into_iter()
                .map(|(_, answer)| page_of(answer))
                .collect::<Result<_, _>>()?;
            let merged = merge_pages(&pages, limit);
            out.extend(merged.agreed);
            for name in merged.disputed {
                let versions = self.name_versions(partition, space, &name).await?;
                // A name whose newest version is a delete marker is not current.
                if let Some((version, entry)) = versions.into_iter().last().filter(|(_, e)| !e.is_delete_marker()) {
                    out.push(CurrentName { name, version, id: entry.blob_id(), summary: entry.summary });
                }
            }
            match merged.complete_to {
                Some(last) if out.len() < limit => (from, after) = (last, true),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.truncate(limit);
        Ok(out)
    }

    /// The whole payload of a blob or name record: the local replica's if it has it, else a
    /// peer's.
    pub async fn read_payload(self: &Arc<Self>, id: BlobId) -> Result<Bytes, RouteError> {
        if let Some(volume) = self.store.volume(id.partition()) {
            let read = tokio::task::spawn_blocking(move || {
                let reader = volume.open_blob(id)?;
                reader.read_range(0, reader.len())
            })
            .await
            .map_err(|e| RouteError::NoQuorum(format!("blocking task: {e}")))?;
            match read {
                Ok(payload) => return Ok(Bytes::from(payload)),
                Err(VolumeError::Deleted | VolumeError::Expired) => return Err(RouteError::Deleted),
                Err(e) => tracing::debug!(%id, error = %e, "local replica cannot answer; asking the others"),
            }
        }
        self.fetch_from_peers(id).await
    }

    fn partition_spec(&self, partition: u32) -> Result<PartitionSpec, RouteError> {
        self.snapshot().topology.partitions.get(&partition).cloned().ok_or(RouteError::NotFound)
    }

    /// Asks every replica of `spec` at once and answers with the first `N - W + 1` answers.
    async fn read_quorum<Q: NameQuery>(
        self: &Arc<Self>,
        spec: &PartitionSpec,
        query: Q,
    ) -> Result<Vec<(String, Q::Answer)>, RouteError> {
        let config = self.config().ok_or_else(|| RouteError::NoQuorum("no cluster config".into()))?;
        let total = spec.replicas.len();
        let quorum = (total + 1).saturating_sub(config.write_quorum as usize).clamp(1, total.max(1));
        let mut asks: FuturesUnordered<_> = spec
            .replicas
            .iter()
            .map(|replica| {
                let (cluster, node, query) = (self.clone(), replica.node.clone(), query.clone());
                async move {
                    let answer = cluster.ask_replica(&node, spec.id, query).await;
                    (node, answer)
                }
            })
            .collect();
        let mut answers = Vec::new();
        let mut failures = Vec::new();
        while let Some((node, answer)) = asks.next().await {
            match answer {
                Ok(answer) => answers.push((node, answer)),
                Err(e) => failures.push(e.to_string()),
            }
            if answers.len() >= quorum {
                return Ok(answers);
            }
        }
        Err(RouteError::NoQuorum(format!(
            "{} of {total} replicas of partition {} answered, {quorum} needed: {}",
            answers.len(),
            spec.id,
            failures.join("; ")
        )))
    }

    /// One replica's answer to a name query: a peer's through its route, this node's own in
    /// process.
    async fn ask_replica<Q: NameQuery>(
        self: &Arc<Self>,
        node: &str,
        partition: u32,
        query: Q,
    ) -> Result<Q::Answer, RouteError> {
        let failed = |e: String| RouteError::NoQuorum(format!("{node}: {e}"));
        if node == self.node_id() {
            let volume = self
                .store
                .volume(partition)
                .ok_or_else(|| failed(format!("partition {partition}'s replica is not open here")))?;
            return tokio::task::spawn_blocking(move || query.answer(&volume))
                .await
                .map_err(|e| failed(e.to_string()))?
                .map_err(|e| failed(e.to_string()));
        }
        let snapshot = self.snapshot();
        if !snapshot.live.contains_key(node) {
            return Err(failed("not live".into()));
        }
        let address = self.peer_base_of(&snapshot, node).ok_or_else(|| failed("no address".into()))?;
        let response = super::router::with_request_id(
            self.http.post(format!("{address}/replica/v1/partitions/{partition}/{}", Q::ROUTE)),
        )
        .json(&query)
        .timeout(self.options.peer_timeout)
        .send()
        .await
        .map_err(|e| failed(e.to_string()))?;
        if !response.status().is_success() {
            return Err(failed(format!("answered {}", response.status())));
        }
        response.json::<Q::Answer>().await.map_err(|e| failed(e.to_string()))
    }

    /// A blob's whole payload (any id, name records too) from the first peer replica that has it.
    async fn fetch_from_peers(self: &Arc<Self>, id: BlobId) -> Result<Bytes, RouteError> {
        let response =
            self.first_peer_answer(id, |address| self.http.get(format!("{address}/replica/v1/blobs/{id}"))).await?;
        match response.status().as_u16() {
            200 => {}
            410 => return Err(RouteError::Deleted),
            status => return Err(RouteError::NoQuorum(format!("a replica answered {status} to a read of {id}"))),
        }
        let body =
            response.bytes().await.map_err(|e| RouteError::NoQuorum(format!("reading {id} from a peer: {e}")))?;
        let (_, payload) = cairn_cluster::replica::BlobFrame::split(body)
            .map_err(|e| RouteError::NoQuorum(format!("reading {id} from a peer: {e}")))?;
        Ok(payload)
    }
}

/// A query of one replica's names: a peer answers it at `/replica/v1/partitions/{p}/ROUTE`
/// (api/replica.rs), this node in process.
pub trait NameQuery: Serialize + Clone + Send + 'static {
    type Answer: DeserializeOwned + Send + 'static;
    const ROUTE: &'static str;
    /// This replica's answer (blocking: it reads the index).
    fn answer(self, volume: &Volume) -> Result<Self::Answer, VolumeError>;
}

impl NameQuery for NameVersionsQuery {
    type Answer = NameVersionsAnswer;
    const ROUTE: &'static str = "names/versions";
    fn answer(self, volume: &Volume) -> Result<NameVersionsAnswer, VolumeError> {
        versions_answer(volume, self)
    }
}

impl NameQuery for CurrentNamesQuery {
    type Answer = CurrentNamesAnswer;
    const ROUTE: &'static str = "names/current";
    fn answer(self, volume: &Volume) -> Result<CurrentNamesAnswer, VolumeError> {
        current_answer(volume, self)
    }
}

/// One replica's answer to a [`NameVersionsQuery`] (blocking: it reads the index).
pub fn versions_answer(volume: &Volume, query: NameVersionsQuery) -> Result<NameVersionsAnswer, VolumeError> {
    let ask: Vec<BlobId> = query
        .ask
        .iter()
        .map(|raw| raw.parse::<BlobId>().map_err(|e| VolumeError::Integrity(format!("{raw}: {e}"))))
        .collect::<Result<_, _>>()?;
    // What the index holds first, its live versions second: a version written between the two
    // reads is then held-and-live or not held — never taken for deleted (the other order would
    // report a write landing in between as a delete, and a quorum read would drop it).
    let held = volume.held(&ask)?;
    let versions = volume.name_versions(&query.space, &query.name)?;
    let live: HashSet<BlobId> = versions.iter().map(|(_, e)| e.blob_id()).collect();
    let deleted = ask.iter().filter(|id| held.contains(id) && !live.contains(id)).map(|id| id.to_string()).collect();
    let versions = versions
        .into_iter()
        .map(|(version, entry)| WireName {
            name: String::new(),
            version: version.to_string(),
            id: entry.blob_id().to_string(),
            summary: hex(&entry.summary),
        })
        .collect();
    Ok(NameVersionsAnswer { version: WIRE_VERSION, versions, deleted })
}

/// One replica's answer to a [`CurrentNamesQuery`] (blocking: it reads the index).
pub fn current_answer(volume: &Volume, query: CurrentNamesQuery) -> Result<CurrentNamesAnswer, VolumeError> {
    let limit = (query.limit as usize).clamp(1, MAX_PAGE);
    let names = volume.current_names(&query.space, &query.from, query.after, &query.prefix, limit)?;
    let names = names
        .into_iter()
        .map(|n| WireName {
            name: n.name,
            version: n.version.to_string(),
            id: n.id.to_string(),
            summary: hex(&n.summary),
        })
        .collect();
    Ok(CurrentNamesAnswer { version: WIRE_VERSION, names })
}

/// Most names one page holds (and most ids one query asks about).
pub const MAX_PAGE: usize = 10_000;

fn parse_id(raw: &str) -> Result<BlobId, RouteError> {
    raw.parse().map_err(|e| RouteError::NoQuorum(format!("a replica answered a malformed id {raw:?}: {e}")))
}

fn entry_of(wire: &WireName) -> Result<(u128, NameEntry), RouteError> {
    let malformed = |what: &str| RouteError::NoQuorum(format!("a replica answered a malformed {what}"));
    let version = wire.version.parse::<u128>().map_err(|_| malformed("version"))?;
    let summary = unhex(&wire.summary).map_err(|_| malformed("summary"))?;
    Ok((version, NameEntry { id: parse_id(&wire.id)?.to_bytes(), summary }))
}

fn versions_of(answer: NameVersionsAnswer) -> Result<Versions, RouteError> {
    check_version(answer.version).map_err(|e| RouteError::NoQuorum(e.to_string()))?;
    answer.versions.iter().map(entry_of).collect()
}

fn page_of(answer: CurrentNamesAnswer) -> Result<Vec<CurrentName>, RouteError> {
    check_version(answer.version).map_err(|e| RouteError::NoQuorum(e.to_string()))?;
    answer
        .names
        .into_iter()
        .map(|wire| {
            let (version, entry) = entry_of(&wire)?;
            Ok(CurrentName { name: wire.name, version, id: entry.blob_id(), summary: entry.summary })
        })
        .collect()
}

/// For each answer (by index), the ids of versions another answer holds and it does not.
fn disputed<'a>(answers: impl Iterator<Item = &'a Versions> + Clone) -> Vec<(usize, Vec<BlobId>)> {
    let all: BTreeMap<u128, BlobId> = answers.clone().flat_map(|v| v.iter().map(|(k, e)| (*k, e.blob_id()))).collect();
    answers
        .enumerate()
        .filter_map(|(i, versions)| {
            let lacking: Vec<BlobId> =
                all.iter().filter(|(version, _)| !versions.contains_key(version)).map(|(_, id)| *id).collect();
            (!lacking.is_empty()).then_some((i, lacking))
        })
        .collect()
}

/// The union of the answers' versions but those a replica holds deleted, oldest first.
fn merge<'a>(answers: impl Iterator<Item = &'a Versions>, deleted: &HashSet<BlobId>) -> Vec<(u128, NameEntry)> {
    let mut all = BTreeMap::new();
    for versions in answers {
        for (version, entry) in versions {
            all.entry(*version).or_insert_with(|| entry.clone());
        }
    }
    all.into_iter().filter(|(_, entry)| !deleted.contains(&entry.blob_id())).collect()
}

/// Replicas' pages of current names, merged.
#[derive(Debug, PartialEq, Eq)]
struct MergedPages {
    /// Names every page holds at the same version.
    agreed: Vec<CurrentName>,
    /// Names the pages disagree on: some lack them, or hold other versions.
    disputed: Vec<String>,
    /// When a page was full: the last name every page covered (the next page starts after it).
    complete_to: Option<String>,
}

fn merge_pages(pages: &[Vec<CurrentName>], limit: usize) -> MergedPages {
    // A full page may have stopped before names another page shows: only names up to the
    // smallest last name of the full pages are known from every replica.
    let complete_to = pages.iter().filter(|p| p.len() >= limit).filter_map(|p| p.last()).map(|n| n.name.clone()).min();
    let mut by_name: BTreeMap<&str, Vec<&CurrentName>> = BTreeMap::new();
    for page in pages {
        // A replica of an older build lists a name whose newest version is a delete marker: as
        // this build's replicas do, it is left out (a replica holding a newer version disputes it).
        for name in page.iter().filter(|n| n.summary != crate::engine::names::DELETE_MARKER) {
            if complete_to.as_ref().is_none_or(|last| name.name <= *last) {
                by_name.entry(&name.name).or_default().push(name);
            }
        }
    }
    let (mut agreed, mut disputed) = (Vec::new(), Vec::new());
    for (name, held) in by_name {
        if held.len() == pages.len() && held.iter().all(|n| n.version == held[0].version) {
            agreed.push(held[0].clone());
        } else {
            disputed.push(name.to_string());
        }
    }
    MergedPages { agreed, disputed, complete_to }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(version: u128) -> NameEntry {
        NameEntry { id: crate::engine::names::name_id(1, "s", "n", version).to_bytes(), summary: vec![version as u8] }
    }

    fn current(name: &str, version: u128) -> CurrentName {
        CurrentName { name: name.into(), version, id: entry(version).blob_id(), summary: entry(version).summary }
    }

    /// A model of three replicas of one name: each version written reached some of them, each
    /// delete reached some of them (a tombstone), the rest in flight. A read of any two, then
    /// the second round, finds exactly the versions that a quorum (two) acknowledged and no
    /// quorum deleted — whatever the lagging replicas hold.
    #[derive(Debug, Clone)]
    struct Replica {
        live: BTreeMap<u128, NameEntry>,
        tombstones: HashSet<BlobId>,
    }

    fn read(replicas: &[Replica; 3], pair: (usize, usize)) -> Vec<u128> {
        let asked = [&replicas[pair.0], &replicas[pair.1]];
        let answers: Vec<Versions> = asked.iter().map(|r| r.live.clone()).collect();
        let mut deleted = HashSet::new();
        for (i, lacking) in disputed(answers.iter()) {
            deleted.extend(lacking.into_iter().filter(|id| asked[i].tombstones.contains(id)));
        }
        merge(answers.iter(), &deleted).into_iter().map(|(v, _)| v).collect()
    }

    proptest! {
        #[test]
        fn a_quorum_read_sees_every_acknowledged_write_and_delete(
            writes in proptest::collection::vec((1u128..50, 0u8..8, any::<bool>(), 0u8..8), 0..12),
            pair in prop_oneof![Just((0, 1)), Just((0, 2)), Just((1, 2))],
        ) {
            let mut replicas: [Replica; 3] = std::array::from_fn(|_| Replica { live: BTreeMap::new(), tombstones: HashSet::new() });
            let mut acknowledged = BTreeMap::new();
            for (version, reached, delete, delete_reached) in writes {
                // `reached`: which replicas the write got to (bits); acknowledged at two.
                let id = entry(version).blob_id();
                if replicas.iter().any(|r| r.tombstones.contains(&id)) || acknowledged.contains_key(&version) {
                    continue;
                }
                for (i, replica) in replicas.iter_mut().enumerate() {
                    if reached & (1 << i) != 0 {
                        replica.live.insert(version, entry(version));
                    }
                }
                let written = reached.count_ones() >= 2;
                if written {
                    acknowledged.insert(version, true);
                }
                if delete && written {
                    // A delete tombstones every replica it reaches (the write may land later,
                    // but a tombstone refuses it: the model leaves it out).
                    for (i, replica) in replicas.iter_mut().enumerate() {
                        if delete_reached & (1 << i) != 0 {
                            replica.live.remove(&version);
                            replica.tombstones.insert(id);
                        }
                    }
                    if delete_reached.count_ones() >= 2 {
                        acknowledged.insert(version, false);
                    } else {
                        // A delete that failed may be seen or not.
                        acknowledged.remove(&version);
                    }
                }
            }
            let seen = read(&replicas, pair);
            for (version, live) in acknowledged {
                prop_assert_eq!(seen.contains(&version), live, "version {} (live: {})", version, live);
            }
        }
    }

    #[test]
    fn pages_agree_only_up_to_what_every_full_page_covered() {
        let a = vec![current("a", 1), current("b", 1), current("c", 1)];
        let b = vec![current("a", 1), current("b", 2), current("d", 1)];
        let merged = merge_pages(&[a.clone(), b], 3);
        // Both pages are full: "c" is the smaller last name, so "d" is not known from every
        // replica yet; "b" differs, so it is disputed; "c" is on one page only.
        assert_eq!(merged.complete_to.as_deref(), Some("c"));
        assert_eq!(merged.agreed, vec![current("a", 1)]);
        assert_eq!(merged.disputed, vec!["b".to_string(), "c".to_string()]);
        // Pages that are not full cover everything after `from`.
        let merged = merge_pages(&[a.clone(), a], 10);
        assert_eq!(merged.complete_to, None);
        assert_eq!(merged.agreed.len(), 3);
        assert!(merged.disputed.is_empty());
    }

    #[test]
    fn a_name_older_replicas_list_at_a_delete_marker_is_not_listed() {
        let marker = |name: &str, version: u128| CurrentName {
            summary: crate::engine::names::DELETE_MARKER.to_vec(),
            ..current(name, version)
        };
        // Two replicas of an older build, both listing "k" at its marker: left out, and the full
        // pages still end where they did (a marker counts toward what a page covered).
        let old = vec![current("a", 1), marker("k", 2), current("z", 1)];
        let merged = merge_pages(&[old.clone(), old], 3);
        assert_eq!(merged.complete_to.as_deref(), Some("z"));
        assert_eq!(merged.agreed, vec![current("a", 1), current("z", 1)]);
        assert!(merged.disputed.is_empty());
        // One replica holds a newer version than the other's marker: disputed, asked about again.
        let merged = merge_pages(&[vec![marker("k", 2)], vec![current("k", 3)]], 10);
        assert_eq!(merged.disputed, vec!["k".to_string()]);
    }

    #[test]
    fn wire_names_round_trip() {
        let name = current("key", u128::MAX - 3);
        let wire = WireName {
            name: name.name.clone(),
            version: name.version.to_string(),
            id: name.id.to_string(),
            summary: hex(&name.summary),
        };
        let page = page_of(CurrentNamesAnswer { version: WIRE_VERSION, names: vec![wire.clone()] }).unwrap();
        assert_eq!(page, vec![name]);
        let bad = WireName { summary: "zz".into(), ..wire };
        assert!(page_of(CurrentNamesAnswer { version: WIRE_VERSION, names: vec![bad] }).is_err());
    }
}
