//! The platform-agnostic core: from a StoreCluster's spec and the machines' disk inventories,
//! the desired cluster config and nodes (the planner then places replicas with minimal movement).

use cairn_cluster::{ClusterConfig, DiskSpec, NodeSpec, Topology};
use cairn_common::agent_api::DiskReport;
use cairn_resources::store_cluster::{DiskSelectorSpec, StoreClusterSpec};

/// A machine that may run a datanode: its zone and what its disk agent reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Machine {
    pub name: String,
    pub zone: String,
    pub disks: Vec<DiskReport>,
    /// Address its datanode will be reached at.
    pub address: String,
    /// Chosen by the spec (node selector, not being drained). An unselected machine that still
    /// holds replicas keeps its datanode until they have moved.
    pub selected: bool,
    /// Away (NotReady) longer than the spec allows, and for how long, said plainly: unselected, so
    /// its replicas are placed elsewhere; its volumes are removed only once it is back.
    pub down: Option<String>,
}

impl Machine {
    /// Whether any of its disks holds a volume of `cluster`'s replicas on this machine.
    pub fn holds_volumes_of(&self, cluster: &str) -> bool {
        self.disks.iter().flat_map(|d| &d.volumes).any(|v| Topology::is_volume_of(cluster, &self.name, &v.name))
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("no usable disk matches the disk selector on the {machines} selected machine(s)")]
    NoDisks { machines: usize },
    #[error("replicationFactor {rf} needs {rf} machines with usable disks, found {found}")]
    TooFewMachines { rf: u32, found: usize },
}

/// A Kubernetes quantity or a byte size ("64Gi", "64GiB", "1048576").
pub fn parse_size(field: &'static str, text: &str) -> Result<u64, SpecError> {
    let t = text.trim();
    let quantity = ["Ki", "Mi", "Gi", "Ti", "Pi"].iter().any(|suffix| t.ends_with(suffix));
    let normalized = if quantity { format!("{t}B") } else { t.to_owned() };
    normalized
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|_| SpecError::Invalid { field, reason: format!("{text:?} is not a size (e.g. 64Gi)") })
}

/// What can be checked of a spec without the machines: sizes, replication, and a geometry every
/// datanode can open (the same check `cairn topology apply` and the datanode make). Volume size,
/// segment size and the largest blob, when it holds.
pub fn check_spec(spec: &StoreClusterSpec) -> Result<(u64, u64, Option<u64>), SpecError> {
    let volume = parse_size("volumeSize", &spec.volume_size)?;
    if volume == 0 {
        return Err(SpecError::Invalid { field: "volumeSize", reason: "must be more than 0 bytes".into() });
    }
    let segment = parse_size("segmentSize", &spec.segment_size)?;
    let max_blob = spec.max_blob_size.as_deref().map(|s| parse_size("maxBlobSize", s)).transpose()?;
    let config = ClusterConfig {
        blob_tls: None,
        replication_factor: spec.replication_factor,
        write_quorum: spec.write_quorum,
        partitions: 1,
        volume_size_bytes: volume,
        segment_size_bytes: segment,
        max_blob_size_bytes: max_blob,
        auth: match spec.auth {
            cairn_resources::store_cluster::ClusterAuth::Keys => cairn_cluster::AuthMode::Keys,
            cairn_resources::store_cluster::ClusterAuth::None => cairn_cluster::AuthMode::None,
        },
    };
    config.validate().map_err(|reason| SpecError::Invalid { field: "spec", reason })?;
    Ok((volume, segment, max_blob))
}

pub struct Desired {
    pub config: ClusterConfig,
    pub nodes: Vec<NodeSpec>,
}

fn glob_set(field: &'static str, globs: &[String]) -> Result<Option<globset::GlobSet>, SpecError> {
    if globs.is_empty() {
        return Ok(None);
    }
    let mut builder = globset::GlobSetBuilder::new();
    for g in globs {
        let glob = globset::GlobBuilder::new(g)
            .literal_separator(true)
            .build()
            .map_err(|e| SpecError::Invalid { field, reason: e.to_string() })?;
        builder.add(glob);
    }
    builder.build().map(Some).map_err(|e| SpecError::Invalid { field, reason: e.to_string() })
}

/// Cluster config and nodes for the topology. A disk's capacity is what its agent can still
/// promise plus what this cluster's volumes already hold there, so placement stays stable as
/// volumes are created, rounded down to whole volumes — the only unit placement uses — so the
/// index and replication log growing on the disk as blobs arrive do not rewrite the topology on
/// every pass. Partitions: `partitionsPerDisk` per usable disk while space allows for
/// all their replicas, and never fewer than exist.
pub fn desired(
    cluster: &str,
    spec: &StoreClusterSpec,
    machines: &[Machine],
    current: &Topology,
) -> Result<Desired, SpecError> {
    let (volume, segment, max_blob) = check_spec(spec)?;
    let selector = spec.disk_selector.clone().unwrap_or_default();
    let DiskSelectorSpec { mount_paths, fs_types, devices, min_size } = &selector;
    let paths = glob_set("diskSelector.mountPaths", mount_paths)?;
    let device_globs = glob_set("diskSelector.devices", devices)?;
    let min = min_size.as_deref().map(|m| parse_size("diskSelector.minSize", m)).transpose()?.unwrap_or(0);
    // The cluster's own reserve on each disk, on top of the disk agent's headroom.
    let headroom = |total: u64| -> Result<u64, SpecError> {
        match spec.headroom.as_deref().map(str::trim) {
            None => Ok(0),
            Some(h) if h.ends_with('%') => h[..h.len() - 1]
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|p| (0.0..=100.0).contains(p))
                .map(|p| (total as f64 * p / 100.0).ceil() as u64)
                .ok_or_else(|| SpecError::Invalid { field: "headroom", reason: format!("{h:?} is not a percentage") }),
            Some(h) => parse_size("headroom", h),
        }
    };
    let mut nodes = Vec::new();
    for machine in machines.iter().filter(|m| m.selected) {
        let disks: Vec<DiskSpec> = machine
            .disks
            .iter()
            .filter(|d| d.usable)
            .filter(|d| paths.as_ref().is_none_or(|g| g.is_match(&d.canonical_mount)))
            .filter(|d| device_globs.as_ref().is_none_or(|g| g.is_match(&d.device)))
            .filter(|d| fs_types.is_empty() || fs_types.contains(&d.fs_type))
            .filter(|d| d.total_bytes >= min)
            .map(|d| {
                let ours: u64 = d
                    .volumes
                    .iter()
                    .filter(|v| Topology::is_volume_of(cluster, &machine.name, &v.name))
                    .map(|v| v.capacity_bytes)
                    .sum();
                let reserve = headroom(d.total_bytes)?;
                let bytes = (d.allocatable_bytes + ours).saturating_sub(reserve);
                Ok(DiskSpec { id: d.id.clone(), capacity_bytes: bytes - bytes % volume })
            })
            .collect::<Result<Vec<_>, SpecError>>()?
            .into_iter()
            .filter(|d| d.capacity_bytes >= volume)
            .collect();
        if !disks.is_empty() {
            nodes.push(NodeSpec {
                id: machine.name.clone(),
                zone: machine.zone.clone(),
                address: machine.address.clone(),
                disks,
            });
        }
    }
    let disk_count: usize = nodes.iter().map(|n| n.disks.len()).sum();
    if disk_count == 0 {
        return Err(SpecError::NoDisks { machines: machines.iter().filter(|m| m.selected).count() });
    }
    if nodes.len() < spec.replication_factor as usize {
        return Err(SpecError::TooFewMachines { rf: spec.replication_factor, found: nodes.len() });
    }
    let slots: u64 = nodes.iter().flat_map(|n| &n.disks).map(|d| d.capacity_bytes / volume).sum();
    let by_space = (slots / u64::from(spec.replication_factor.max(1))) as u32;
    // Full partitions turned read-only do not count: new writable ones replace them while space allows.
    let read_only =
        current.partitions.values().filter(|p| p.state != cairn_cluster::PartitionState::Writable).count() as u32;
    let wanted = spec.partitions_per_disk.saturating_mul(disk_count as u32).saturating_add(read_only).min(by_space);
    let existing = current.partitions.keys().max().map(|m| m + 1).unwrap_or(0);
    let config = ClusterConfig {
        blob_tls: None,
        replication_factor: spec.replication_factor,
        write_quorum: spec.write_quorum,
        partitions: wanted.max(existing).clamp(1, cairn_cluster::topology::MAX_PARTITIONS),
        volume_size_bytes: volume,
        segment_size_bytes: segment,
        max_blob_size_bytes: max_blob,
        auth: match spec.auth {
            cairn_resources::store_cluster::ClusterAuth::Keys => cairn_cluster::AuthMode::Keys,
            cairn_resources::store_cluster::ClusterAuth::None => cairn_cluster::AuthMode::None,
        },
    };
    config.validate().map_err(|reason| SpecError::Invalid { field: "spec", reason })?;
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Desired { config, nodes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_common::agent_api::VolumeInfo;
    use cairn_resources::store_cluster::EtcdSpec;

    const GIB: u64 = 1 << 30;

    fn spec(rf: u32) -> StoreClusterSpec {
        serde_json::from_value(serde_json::json!({
            "image": "cairn:1", "volumeSize": "10Gi", "segmentSize": "1Gi", "replicationFactor": rf,
            "writeQuorum": 1, "partitionsPerDisk": 4, "etcd": EtcdSpec { endpoints: vec!["x".into()], tls_secret: None }
        }))
        .unwrap()
    }

    fn machine(name: &str, allocatable: u64, ours: u64) -> Machine {
        let volumes = (ours > 0)
            .then(|| VolumeInfo { name: format!("c1-p0-{name}"), capacity_bytes: ours, ..VolumeInfo::default() })
            .into_iter()
            .collect();
        let disk = DiskReport {
            id: format!("{name}-d"),
            usable: true,
            fs_type: "xfs".into(),
            canonical_mount: "/mnt/a".into(),
            total_bytes: 1000 * GIB,
            allocatable_bytes: allocatable,
            volumes,
            ..DiskReport::default()
        };
        Machine { name: name.into(), disks: vec![disk], selected: true, ..Machine::default() }
    }

    #[test]
    fn sizes_partitions_and_stable_capacity() {
        assert_eq!(parse_size("x", "64Gi").unwrap(), 64 * GIB);
        assert_eq!(parse_size("x", "1GiB").unwrap(), GIB);
        assert!(parse_size("x", "lots").is_err());
        let machines = vec![machine("a", 100 * GIB, 0), machine("b", 90 * GIB, 10 * GIB), machine("c", 15 * GIB, 0)];
        let d = desired("c1", &spec(1), &machines, &Topology::default()).unwrap();
        // A disk's capacity counts the volumes this cluster already has there.
        assert_eq!(d.nodes[1].disks[0].capacity_bytes, 100 * GIB);
        // 4 per disk = 12 wanted; space: 10 + 10 + 1 slots = 21 at rf 1.
        assert_eq!(d.config.partitions, 12);
        let tight = desired("c1", &spec(3), &machines, &Topology::default()).unwrap();
        assert_eq!(tight.config.partitions, 7, "21 slots / 3 replicas");
        let err = desired("c1", &spec(3), &machines[..2], &Topology::default()).err().unwrap();
        assert!(matches!(err, SpecError::TooFewMachines { rf: 3, found: 2 }));
        let none = desired("c1", &spec(1), &[], &Topology::default()).err().unwrap();
        assert!(matches!(none, SpecError::NoDisks { .. }));

        // The cluster's headroom comes off every disk (1000 GiB total: 5% = 50 GiB).
        let mut reserved = spec(1);
        reserved.headroom = Some("5%".into());
        assert_eq!(
            desired("c1", &reserved, &machines, &Topology::default()).unwrap().nodes[0].disks[0].capacity_bytes,
            50 * GIB
        );
        reserved.headroom = Some("lots".into());
        assert!(desired("c1", &reserved, &machines, &Topology::default()).is_err());

        // Whole volumes only: a disk whose free space shrinks as its index grows keeps its
        // capacity (and the topology its keys) until a whole volume no longer fits.
        let mut filling = machines.clone();
        filling[0].disks[0].allocatable_bytes = 105 * GIB;
        let before = desired("c1", &spec(1), &filling, &Topology::default()).unwrap();
        assert_eq!(before.nodes[0].disks[0].capacity_bytes, 100 * GIB);
        filling[0].disks[0].allocatable_bytes -= 300 << 20;
        assert_eq!(desired("c1", &spec(1), &filling, &Topology::default()).unwrap().nodes, before.nodes);
        filling[0].disks[0].allocatable_bytes -= 5 * GIB;
        let smaller = desired("c1", &spec(1), &filling, &Topology::default()).unwrap();
        assert_eq!(smaller.nodes[0].disks[0].capacity_bytes, 90 * GIB, "99.7 GiB holds 9 volumes of 10 GiB");
        let mut zero = spec(1);
        zero.volume_size = "0".into();
        assert!(matches!(
            desired("c1", &zero, &machines, &Topology::default()),
            Err(SpecError::Invalid { field: "volumeSize", .. })
        ));

        // Two partitions filled up: two more writable ones, space allowing.
        let mut current = Topology::default();
        for id in 0..12 {
            let state =
                if id < 2 { cairn_cluster::PartitionState::ReadOnly } else { cairn_cluster::PartitionState::Writable };
            current.partitions.insert(id, cairn_cluster::PartitionSpec { id, state, replicas: vec![] });
        }
        assert_eq!(desired("c1", &spec(1), &machines, &current).unwrap().config.partitions, 14);
    }

    #[test]
    fn a_geometry_no_datanode_could_open_is_refused() {
        let mut tiny = spec(3);
        tiny.segment_size = "64Mi".into();
        tiny.max_blob_size = Some("64Mi".into());
        let err = check_spec(&tiny).unwrap_err().to_string();
        assert!(err.contains("hold blobs of at most"), "{err}");
        let mut small_volume = spec(3);
        small_volume.volume_size = "512Mi".into();
        assert!(check_spec(&small_volume).unwrap_err().to_string().contains("at least one"));
        let mut fits = spec(3);
        fits.max_blob_size = Some("100Mi".into());
        assert_eq!(check_spec(&fits).unwrap(), (10 * GIB, GIB, Some(100 << 20)));
        assert!(desired("c1", &tiny, &[], &Topology::default()).is_err());
    }
}
