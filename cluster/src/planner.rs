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
            blob_tls: None,
            replication_factor: rf,
            write_quorum: rf.div_ceil(2).max(1),
            partitions,
            volume_size_bytes: GIB,
            segment_size_bytes: GIB / 4,
            max_blob_size_bytes: None,
            auth: Default::default(),
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
        fn rebalancing_after_adding_nodes_keeps_the_rules(nodes in nodes_strategy(), rf in 1u32..4, partitions in 1u32..24, extra in 1usize..3) {
            prop_assume!(nodes.len() as u32 >= rf);
            let c = config(rf, partitions);
            let before = plan(&c, &nodes, &BTreeMap::new()).unwrap();
            let mut more = nodes.clone();
            for i in 0..extra {
                more.push(node(&format!("zz{i}"), ["a", "b", "c", "d"][i % 4], &[40]));
            }
            let balanced = rebalance(&c, &more, &before, 1000);
            check_rules(&c, &more, &balanced);
            // Deterministic, and a fixed point.
            prop_assert_eq!(&rebalance(&c, &more, &before, 1000), &balanced);
            prop_assert_eq!(&rebalance(&c, &more, &balanced, 1000), &balanced);
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

/// Moves replicas, at most `max_moves` per call: first to give partitions zones they lack (new
/// zones appeared), then from the most loaded disks to the least loaded (replicas ÷ slots against
/// each disk's fair share), never breaking a placement rule.
/// Used after adding machines so that they take over a share of the existing replicas; the
/// caller keeps each moved replica in place until its replacement has caught up.
pub fn rebalance(
    config: &ClusterConfig,
    nodes: &[NodeSpec],
    placement: &BTreeMap<u32, PartitionSpec>,
    max_moves: usize,
) -> BTreeMap<u32, PartitionSpec> {
    let mut placement = placement.clone();
    let mut slots: BTreeMap<(String, String), (String, u64)> = BTreeMap::new();
    for node in nodes {
        for disk in &node.disks {
            let capacity = disk.capacity_bytes / config.volume_size_bytes.max(1);
            if capacity > 0 {
                slots.insert((node.id.clone(), disk.id.clone()), (node.zone.clone(), capacity));
            }
        }
    }
    let total_slots: u64 = slots.values().map(|(_, c)| c).sum();
    if total_slots == 0 {
        return placement;
    }
    let zone_count = slots.values().map(|(z, _)| z.as_str()).collect::<BTreeSet<_>>().len();
    let wanted_zones = (config.replication_factor as usize).min(zone_count);
    for _ in 0..max_moves {
        if repair_zones(&mut placement, &slots, wanted_zones) {
            continue;
        }
        let mut used: BTreeMap<(String, String), u64> = slots.keys().map(|k| (k.clone(), 0)).collect();
        for p in placement.values() {
            for r in &p.replicas {
                if let Some(u) = used.get_mut(&(r.node.clone(), r.disk.clone())) {
                    *u += 1;
                }
            }
        }
        let replicas: u64 = used.values().sum();
        // Imbalance in replicas × total_slots units (integers): used·T − replicas·capacity.
        let excess = |key: &(String, String)| -> i128 {
            i128::from(used[key]) * i128::from(total_slots) - i128::from(replicas) * i128::from(slots[key].1)
        };
        let mut order: Vec<&(String, String)> = slots.keys().collect();
        order.sort_by_key(|k| (std::cmp::Reverse(excess(k)), (*k).clone()));
        // Which partitions have a replica on each disk.
        let mut on_disk: BTreeMap<(String, String), Vec<u32>> = BTreeMap::new();
        for p in placement.values() {
            for r in &p.replicas {
                on_disk.entry((r.node.clone(), r.disk.clone())).or_default().push(p.id);
            }
        }
        let zone_of = |r: &ReplicaSpec| slots.get(&(r.node.clone(), r.disk.clone())).map(|(z, _)| z.clone());
        let mut chosen: Option<(u32, usize, (String, String))> = None;
        'search: for from in order.iter().copied() {
            for to in order.iter().rev().copied() {
                // Only when the move brings both sides closer to their share by at least one replica.
                if excess(from) - excess(to) < 2 * i128::from(total_slots) {
                    break;
                }
                if used[to] >= slots[to].1 {
                    continue;
                }
                for id in on_disk.get(from).map(Vec::as_slice).unwrap_or_default() {
                    let p = &placement[id];
                    let Some(i) = p.replicas.iter().position(|r| r.node == from.0 && r.disk == from.1) else {
                        continue;
                    };
                    if p.replicas.iter().any(|r| r.node == to.0) {
                        continue;
                    }
                    let other_zones: BTreeSet<String> = p
                        .replicas
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .filter_map(|(_, r)| zone_of(r))
                        .collect();
                    let zones_after = other_zones.len() + usize::from(!other_zones.contains(&slots[to].0));
                    let zones_before = p.replicas.iter().filter_map(zone_of).collect::<BTreeSet<_>>().len();
                    // Never fewer zones for the partition than before.
                    if zones_after < zones_before {
                        continue;
                    }
                    chosen = Some((*id, i, to.clone()));
                    break 'search;
                }
            }
        }
        let moved = chosen.is_some();
        if let Some((id, i, to)) = chosen {
            placement.get_mut(&id).expect("chosen from placement").replicas[i] = ReplicaSpec { node: to.0, disk: to.1 };
        }
        if !moved {
            break;
        }
    }
    placement
}

/// One move that gives a partition a zone it lacks (new zones appeared): a replica in a zone the
/// partition uses twice goes to the least loaded disk with room in an unused zone.
fn repair_zones(
    placement: &mut BTreeMap<u32, PartitionSpec>,
    slots: &BTreeMap<(String, String), (String, u64)>,
    wanted_zones: usize,
) -> bool {
    let mut used: BTreeMap<(String, String), u64> = BTreeMap::new();
    for p in placement.values() {
        for r in &p.replicas {
            *used.entry((r.node.clone(), r.disk.clone())).or_default() += 1;
        }
    }
    let zone_of = |r: &ReplicaSpec| slots.get(&(r.node.clone(), r.disk.clone())).map(|(z, _)| z.clone());
    for p in placement.values_mut() {
        let zones: Vec<Option<String>> = p.replicas.iter().map(zone_of).collect();
        let distinct: BTreeSet<&Option<String>> = zones.iter().collect();
        if distinct.len() >= wanted_zones {
            continue;
        }
        // A replica sharing its zone with another of the partition.
        let Some(i) = (0..zones.len()).rev().find(|&i| zones.iter().filter(|z| **z == zones[i]).count() > 1) else {
            continue;
        };
        let target = slots
            .iter()
            .filter(|(k, (zone, cap))| {
                used.get(*k).copied().unwrap_or(0) < *cap
                    && !zones.contains(&Some(zone.clone()))
                    && !p.replicas.iter().any(|r| r.node == k.0)
            })
            .min_by(|(ka, (_, ca)), (kb, (_, cb))| {
                let la = u128::from(used.get(*ka).copied().unwrap_or(0) + 1) * u128::from(*cb);
                let lb = u128::from(used.get(*kb).copied().unwrap_or(0) + 1) * u128::from(*ca);
                la.cmp(&lb).then_with(|| ka.cmp(kb))
            });
        if let Some((key, _)) = target {
            p.replicas[i] = ReplicaSpec { node: key.0.clone(), disk: key.1.clone() };
            return true;
        }
    }
    false
}

#[cfg(test)]
mod rebalance_tests {
    use super::*;
    use crate::topology::DiskSpec;

    fn node(id: &str, zone: &str, gib: u64) -> NodeSpec {
        NodeSpec {
            id: id.into(),
            zone: zone.into(),
            address: String::new(),
            disks: vec![DiskSpec { id: "d".into(), capacity_bytes: gib << 30 }],
        }
    }

    #[test]
    fn a_new_machine_takes_over_its_share_without_breaking_rules() {
        let config = ClusterConfig {
            blob_tls: None,
            replication_factor: 3,
            write_quorum: 2,
            partitions: 12,
            volume_size_bytes: 1 << 30,
            segment_size_bytes: 1 << 28,
            max_blob_size_bytes: None,
            auth: Default::default(),
        };
        let three = vec![node("a", "z1", 20), node("b", "z2", 20), node("c", "z3", 20)];
        let before = plan(&config, &three, &BTreeMap::new()).unwrap();
        let mut four = three.clone();
        four.push(node("d", "z1", 20));
        let kept = plan(&config, &four, &before).unwrap();
        assert_eq!(kept, before, "placement alone never moves");
        let balanced = rebalance(&config, &four, &kept, 100);
        let on = |p: &BTreeMap<u32, PartitionSpec>, n: &str| {
            p.values().filter(|p| p.replicas.iter().any(|r| r.node == n)).count()
        };
        assert_eq!(on(&balanced, "d"), 6, "zone z1 is shared by a and d: half of its replicas each");
        assert_eq!((on(&balanced, "a"), on(&balanced, "b"), on(&balanced, "c")), (6, 12, 12));
        for p in balanced.values() {
            let nodes: BTreeSet<&str> = p.replicas.iter().map(|r| r.node.as_str()).collect();
            assert_eq!(nodes.len(), 3);
            let zones: BTreeSet<&str> =
                p.replicas.iter().map(|r| four.iter().find(|n| n.id == r.node).unwrap().zone.as_str()).collect();
            assert_eq!(zones.len(), 3, "zone rule kept: {:?}", p.replicas);
        }
        // One move per call when asked so; a balanced placement stays as it is.
        let one = rebalance(&config, &four, &kept, 1);
        let changed = one.iter().filter(|(id, p)| kept[id] != **p).count();
        assert_eq!(changed, 1);
        assert_eq!(rebalance(&config, &four, &balanced, 100), balanced);
    }
}
