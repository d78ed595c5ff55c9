//! Replica placement. A pure function of the config, the nodes with their disks, and the
//! previous placement, so the operator, the CLI and tests all get the same answer.
//!
//! Rules:
//! - never two replicas of a partition on one node;
//! - no two replicas of a partition in one zone while there are enough zones for all of them
//!   (otherwise spread over as many zones as there are);
//! - a disk holds at most `capacity / volume_size` replicas, and replicas go where the load
//!   (replicas ÷ that number) is lowest, so bigger disks get proportionally more;
//! - minimal movement: a replica stays where it is while its node and disk exist and still have
//!   room; only missing replicas are placed;
//! - deterministic: ties are broken by node id, then disk id, never by input order.

use std::collections::{BTreeMap, BTreeSet};

use crate::topology::{ClusterConfig, NodeSpec, PartitionSpec, PartitionState, ReplicaSpec};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("invalid cluster config: {0}")]
    Config(String),
    #[error("partition {partition}: no room for replica {replica} of {wanted} ({reason})")]
    NoRoom { partition: u32, replica: usize, wanted: u32, reason: String },
    #[error("partitions cannot be removed: {existing} exist, config asks for {asked}")]
    Shrink { existing: u32, asked: u32 },
}

struct Slot {
    zone: String,
    capacity: u64,
    used: u64,
}

impl Slot {
    /// Load after adding one more replica, as a fraction; compared across disks.
    fn load_after(&self) -> (u64, u64) {
        (self.used + 1, self.capacity)
    }
}

/// Places every partition's replicas; `previous` is what etcd holds now.
pub fn plan(
    config: &ClusterConfig,
    nodes: &[NodeSpec],
    previous: &BTreeMap<u32, PartitionSpec>,
) -> Result<BTreeMap<u32, PartitionSpec>, PlanError> {
    config.validate().map_err(PlanError::Config)?;
    let existing = previous.keys().max().map(|m| m + 1).unwrap_or(0);
    if existing > config.partitions {
        return Err(PlanError::Shrink { existing, asked: config.partitions });
    }
    // (node, disk) → slot; BTreeMap so that iteration order is by id.
    let mut slots: BTreeMap<(String, String), Slot> = BTreeMap::new();
    for node in nodes {
        for disk in &node.disks {
            let capacity = disk.capacity_bytes / config.volume_size_bytes;
            if capacity > 0 {
                slots.insert((node.id.clone(), disk.id.clone()), Slot { zone: node.zone.clone(), capacity, used: 0 });
            }
        }
    }
    let zones: BTreeSet<&str> = slots.values().map(|s| s.zone.as_str()).collect();
    let zone_count = zones.len();

    // Keep what can stay, in partition order so that a disk that shrank drops its last ones.
    let mut planned: BTreeMap<u32, PartitionSpec> = BTreeMap::new();
    for id in 0..config.partitions {
        let before = previous.get(&id);
        let mut replicas: Vec<ReplicaSpec> = Vec::new();
        for replica in before.map(|p| p.replicas.as_slice()).unwrap_or_default() {
            if replicas.len() as u32 >= config.replication_factor || replicas.iter().any(|r| r.node == replica.node) {
                continue;
            }
            if let Some(slot) = slots.get_mut(&(replica.node.clone(), replica.disk.clone())) {
                if slot.used < slot.capacity {
                    slot.used += 1;
                    replicas.push(replica.clone());
                }
            }
        }
        let state = before.map(|p| p.state).unwrap_or(PartitionState::Writable);
        planned.insert(id, PartitionSpec { id, state, replicas });
    }

    // Fill what is missing.
    for id in 0..config.partitions {
        let partition = planned.get_mut(&id).expect("planned above");
        while (partition.replicas.len() as u32) < config.replication_factor {
            let used_nodes: BTreeSet<&str> = partition.replicas.iter().map(|r| r.node.as_str()).collect();
            let used_zones: BTreeSet<&str> = partition
                .replicas
                .iter()
                .filter_map(|r| slots.get(&(r.node.clone(), r.disk.clone())).map(|s| s.zone.as_str()))
                .collect();
            let open = |(key, slot): &(&(String, String), &Slot)| {
                slot.used < slot.capacity && !used_nodes.contains(key.0.as_str())
            };
            let candidates: Vec<(&(String, String), &Slot)> = slots.iter().filter(|c| open(c)).collect();
            let new_zone: Vec<_> =
                candidates.iter().filter(|(_, s)| !used_zones.contains(s.zone.as_str())).cloned().collect();
            // While some zone has no replica of this partition, only such zones qualify.
            let pool = if !new_zone.is_empty() && used_zones.len() < zone_count { new_zone } else { candidates };
            let best = pool.into_iter().min_by(|(ka, a), (kb, b)| {
                let (na, da) = a.load_after();
                let (nb, db) = b.load_after();
                // na/da vs nb/db without floating point.
                (u128::from(na) * u128::from(db)).cmp(&(u128::from(nb) * u128::from(da))).then_with(|| ka.cmp(kb))
            });
            let Some((key, _)) = best else {
                return Err(PlanError::NoRoom {
                    partition: id,
                    replica: partition.replicas.len() + 1,
                    wanted: config.replication_factor,
                    reason: format!(
                        "{} node(s) with free disk slots outside this partition's nodes",
                        slots.iter().filter(|(k, s)| s.used < s.capacity && !used_nodes.contains(k.0.as_str())).count()
                    ),
                });
            };
            let key = key.clone();
            slots.get_mut(&key).expect("chosen from slots").used += 1;
            partition.replicas.push(ReplicaSpec { node: key.0, disk: key.1 });
        }
    }
    Ok(planned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::DiskSpec;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn config(rf: u32, partitions: u32) -> ClusterConfig {
        ClusterConfig {
            replication_factor: rf,
            write_quorum: rf.div_ceil(2).max(1),
            partitions,
            volume_size_bytes: GIB,
            segment_size_bytes: GIB / 4,
        }
    }

    fn node(id: &str, zone: &str, disks: &[u64]) -> NodeSpec {
        NodeSpec {
            id: id.into(),
            zone: zone.into(),
            address: format!("{id}:7480"),
            disks: disks
                .iter()
                .enumerate()
                .map(|(i, c)| DiskSpec { id: format!("d{i}"), capacity_bytes: c * GIB })
                .collect(),
        }
    }

    fn check_rules(config: &ClusterConfig, nodes: &[NodeSpec], plan: &BTreeMap<u32, PartitionSpec>) {
        let zone_of: BTreeMap<&str, &str> = nodes.iter().map(|n| (n.id.as_str(), n.zone.as_str())).collect();
        let zones: BTreeSet<&str> = nodes.iter().map(|n| n.zone.as_str()).collect();
        let mut used: BTreeMap<(String, String), u64> = BTreeMap::new();
        assert_eq!(plan.len() as u32, config.partitions);
        for p in plan.values() {
            assert_eq!(p.replicas.len() as u32, config.replication_factor, "partition {} {:?}", p.id, p.replicas);
            let nodes_of: BTreeSet<&str> = p.replicas.iter().map(|r| r.node.as_str()).collect();
            assert_eq!(nodes_of.len(), p.replicas.len(), "two replicas on one node: {:?}", p.replicas);
            let zones_of: BTreeSet<&str> = p.replicas.iter().map(|r| zone_of[r.node.as_str()]).collect();
            let expected = (config.replication_factor as usize).min(zones.len());
            assert!(zones_of.len() >= expected, "partition {} uses zones {zones_of:?}", p.id);
            for r in &p.replicas {
                *used.entry((r.node.clone(), r.disk.clone())).or_default() += 1;
            }
        }
        for n in nodes {
            for d in &n.disks {
                let u = used.get(&(n.id.clone(), d.id.clone())).copied().unwrap_or(0);
                assert!(u <= d.capacity_bytes / config.volume_size_bytes, "disk {}/{} over capacity", n.id, d.id);
            }
        }
    }

    #[test]
    fn five_nodes_three_zones() {
        let nodes = vec![
            node("n1", "a", &[10]),
            node("n2", "a", &[10]),
            node("n3", "b", &[10]),
            node("n4", "b", &[10]),
            node("n5", "c", &[10]),
        ];
        let c = config(3, 8);
        let p = plan(&c, &nodes, &BTreeMap::new()).unwrap();
        check_rules(&c, &nodes, &p);
        // Zone c has one node: it holds a replica of every partition.
        assert!(p.values().all(|p| p.replicas.iter().any(|r| r.node == "n5")));
    }

    #[test]
    fn capacity_weighting_and_errors() {
        let nodes = vec![node("big", "a", &[30]), node("small1", "a", &[10]), node("small2", "a", &[10])];
        let c = config(1, 25);
        let p = plan(&c, &nodes, &BTreeMap::new()).unwrap();
        let on = |n: &str| p.values().filter(|p| p.replicas[0].node == n).count();
        assert_eq!((on("big"), on("small1"), on("small2")), (15, 5, 5));
        let err = plan(&config(3, 1), &nodes[..2], &BTreeMap::new()).unwrap_err();
        assert!(matches!(err, PlanError::NoRoom { partition: 0, replica: 3, .. }), "{err}");
        let err = plan(&config(1, 60), &nodes, &BTreeMap::new()).unwrap_err();
        assert!(matches!(err, PlanError::NoRoom { .. }));
        let p2 = plan(&config(1, 2), &nodes, &BTreeMap::new()).unwrap();
        assert!(matches!(plan(&config(1, 1), &nodes, &p2), Err(PlanError::Shrink { existing: 2, asked: 1 })));
        let bad = ClusterConfig { write_quorum: 4, ..config(3, 1) };
        assert!(matches!(plan(&bad, &nodes, &BTreeMap::new()), Err(PlanError::Config(_))));
    }

    /// Every node has room for a replica of every partition, so a plan always exists.
    fn nodes_strategy() -> impl Strategy<Value = Vec<NodeSpec>> {
        proptest::collection::vec((0..4usize, proptest::collection::vec(24u64..60, 1..3)), 3..9).prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (zone, disks))| node(&format!("n{i:02}"), ["a", "b", "c", "d"][zone], &disks))
                .collect()
        })
    }

    proptest! {
        #[test]
        fn placement_rules_hold(nodes in nodes_strategy(), rf in 1u32..4, partitions in 1u32..24) {
            prop_assume!(nodes.len() as u32 >= rf);
            let c = config(rf, partitions);
            let p = plan(&c, &nodes, &BTreeMap::new()).unwrap();
            check_rules(&c, &nodes, &p);
        }

        #[test]
        fn deterministic_whatever_the_input_order(nodes in nodes_strategy(), rf in 1u32..4, partitions in 1u32..24) {
            prop_assume!(nodes.len() as u32 >= rf);
            let c = config(rf, partitions);
            let mut reversed = nodes.clone();
            reversed.reverse();
            prop_assert_eq!(plan(&c, &nodes, &BTreeMap::new()).unwrap(), plan(&c, &reversed, &BTreeMap::new()).unwrap());
        }

        #[test]
        fn adding_a_node_moves_nothing(nodes in nodes_strategy(), rf in 1u32..4, partitions in 1u32..24, zone in 0..4usize) {
            prop_assume!(nodes.len() as u32 >= rf);
            let c = config(rf, partitions);
            let before = plan(&c, &nodes, &BTreeMap::new()).unwrap();
            let mut more = nodes.clone();
            more.push(node("zz-new", ["a", "b", "c", "d"][zone], &[40]));
            let after = plan(&c, &more, &before).unwrap();
            prop_assert_eq!(&after, &before);
            // Adding partitions places only the new ones.
            let grown = plan(&config(rf, partitions + 4), &more, &before).unwrap();
            for (id, p) in &before {
                prop_assert_eq!(&grown[id], p);
            }
        }

        #[test]
        fn removing_a_node_moves_only_its_replicas(nodes in nodes_strategy(), rf in 1u32..3, partitions in 1u32..16, victim in 0..8usize) {
            prop_assume!(nodes.len() as u32 > rf);
            let victim = victim % nodes.len();
            let c = config(rf, partitions);
            let before = plan(&c, &nodes, &BTreeMap::new()).unwrap();
            let mut fewer = nodes.clone();
            let gone = fewer.remove(victim).id;
            if let Ok(after) = plan(&c, &fewer, &before) {
                for (id, p) in &before {
                    for r in p.replicas.iter().filter(|r| r.node != gone) {
                        prop_assert!(after[id].replicas.contains(r), "replica {:?} of {} moved", r, id);
                    }
                    prop_assert!(after[id].replicas.iter().all(|r| r.node != gone));
                }
            }
        }
    }
}
