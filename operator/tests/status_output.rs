//! `cairn status`, `cairn disks` and `cairn topology` output from known states, against golden
//! files in tests/golden/. After an intended change of the output, regenerate them with
//! `UPDATE_GOLDEN=1 cargo test -p cairn-operator --test status_output` and review the diff.

use std::collections::BTreeMap;
use std::path::PathBuf;

use cairn_cluster::etcd::Snapshot;
use cairn_cluster::{
    ClusterConfig, DiskSpec, LiveNode, NodeSpec, PartitionSpec, PartitionState, ReplicaSpec, Topology,
};
use cairn_common::agent_api::{DiskReport, ExcludedMount, MissingDisk, MountAlias};
use cairn_operator::inspect::render;
use cairn_operator::inspect::view::{
    CapacityView, ClusterView, ConditionView, EventView, MachineView, NodeDisks, PartitionIssue,
};
use cairn_resources::store_cluster::PartitionCounts;
use k8s_openapi::jiff::Timestamp;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if expected != actual {
        let first = expected.lines().zip(actual.lines()).position(|(a, b)| a != b);
        panic!(
            "{name} differs from {} (first differing line: {first:?})\n--- expected\n{expected}\n--- actual\n{actual}\n\
             (UPDATE_GOLDEN=1 rewrites it after an intended change)",
            path.display()
        );
    }
}

fn now() -> Timestamp {
    "2026-11-26T12:00:00Z".parse().unwrap()
}

fn condition(type_: &str, status: &str, reason: &str, message: &str, since: &str) -> ConditionView {
    ConditionView {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        since: since.into(),
    }
}

fn live(datanode: &str) -> bool {
    matches!(datanode, "ready" | "draining")
}

/// The capacity line of a view whose rows are set: their sums, as `cairn status` computes it.
fn add_up(v: &mut ClusterView) {
    let sum = |f: fn(&MachineView) -> u64| v.machines.iter().map(f).sum::<u64>();
    v.capacity = CapacityView {
        blobs: v.capacity.blobs,
        stored_bytes: Some(sum(|m| m.stored_bytes.unwrap_or(0))),
        reclaimable_bytes: Some(sum(|m| m.reclaimable_bytes.unwrap_or(0))),
        allocated_bytes: sum(|m| m.allocated_bytes),
        allocatable_bytes: sum(|m| m.allocatable_bytes),
        total_bytes: sum(|m| m.total_bytes),
    };
}

fn machine(name: &str, zone: &str, datanode: &str, replicas: u32) -> MachineView {
    MachineView {
        name: name.into(),
        zone: zone.into(),
        datanode: datanode.into(),
        address: format!("{name}.c1-nodes.store:7480"),
        disks: 2,
        stored_bytes: live(datanode).then_some(41 * GIB + 512 * MIB),
        reclaimable_bytes: live(datanode).then_some(2 * GIB),
        allocated_bytes: 128 * GIB,
        allocatable_bytes: 1650 * GIB,
        total_bytes: 1800 * GIB,
        replicas,
    }
}

fn ready_cluster() -> ClusterView {
    let mut v = ClusterView {
        name: "blobs".into(),
        namespace: "storage".into(),
        source: "kubernetes".into(),
        phase: "Ready".into(),
        image: "ghcr.io/example/cairn-datanode:0.1.0".into(),
        created: Some("2026-11-23T08:30:00Z".into()),
        generation: Some(3),
        observed_generation: Some(3),
        conditions: vec![
            condition("Ready", "True", "Converged", "3 datanodes, 8 partitions", "2026-11-26T10:00:00Z"),
            condition("Progressing", "False", "Idle", "", "2026-11-26T10:00:00Z"),
            condition("Degraded", "False", "Healthy", "", "2026-11-23T08:30:02Z"),
        ],
        capacity: CapacityView { blobs: Some(1_204_311), ..CapacityView::default() },
        partitions: PartitionCounts { total: 8, writable: 7, read_only: 1, under_replicated: 0 },
        topology_revision: 412,
        machines: vec![
            machine("n0", "eu-1a", "ready", 8),
            machine("n1", "eu-1b", "ready", 8),
            machine("n2", "eu-1c", "ready", 8),
        ],
        partition_issues: vec![],
        warnings: vec![],
        events: vec![EventView {
            time: "2026-11-26T10:00:00Z".into(),
            warning: false,
            reason: "Ready".into(),
            message: "3 datanodes, 8 partitions".into(),
            count: 1,
        }],
    };
    add_up(&mut v);
    v
}

/// A drain in progress with an etcd problem: n3 leaving, a partition short of a live replica,
/// replicas behind their peers, one failing to pull.
fn degraded_cluster() -> ClusterView {
    let mut v = ready_cluster();
    v.phase = "Degraded".into();
    v.conditions = vec![
        condition("Ready", "False", "PlacementFailed", "etcd transaction failed: timed out", "2026-11-26T11:58:00Z"),
        condition("Progressing", "False", "Idle", "", "2026-11-26T11:58:00Z"),
        condition("Degraded", "True", "PlacementFailed", "etcd transaction failed: timed out", "2026-11-26T11:58:00Z"),
    ];
    v.partitions.under_replicated = 1;
    v.machines.push(machine("n3", "eu-1a", "draining", 3));
    v.machines[1] = machine("n1", "eu-1b", "not-registered", 8);
    add_up(&mut v);
    v.partition_issues = vec![
        PartitionIssue::UnderReplicated {
            partition: 2,
            state: "writable".into(),
            live: 2,
            wanted: 3,
            not_live: vec!["n1".into()],
        },
        PartitionIssue::Lagging {
            partition: 4,
            node: "n0".into(),
            peer: "n3".into(),
            lag_entries: 1520,
            lag_seconds: 12.25,
            error: None,
        },
        PartitionIssue::Lagging {
            partition: 5,
            node: "n2".into(),
            peer: "n1".into(),
            lag_entries: 3,
            lag_seconds: 40.0,
            error: Some("connection refused".into()),
        },
        PartitionIssue::Moving { partition: 4, replicas: vec!["n0".into(), "n2".into(), "n3".into(), "n1".into()] },
    ];
    v.warnings = vec![
        "Degraded (PlacementFailed): etcd transaction failed: timed out".into(),
        "datanode n1 is not registered in etcd (not running, or cannot reach etcd)".into(),
    ];
    v.events = vec![
        EventView {
            time: "2026-11-26T11:40:00Z".into(),
            warning: false,
            reason: "Reconciled".into(),
            message:
                "topology: wrote partitions/00000003, partitions/00000005 (draining n3: 3 replica(s) still to move)"
                    .into(),
            count: 4,
        },
        EventView {
            time: "2026-11-26T11:58:00Z".into(),
            warning: true,
            reason: "PlacementFailed".into(),
            message: "etcd transaction failed: timed out".into(),
            count: 1,
        },
    ];
    v
}

#[test]
fn status_of_a_ready_cluster() {
    let v = ready_cluster();
    assert!(v.ready() && !v.degraded());
    golden("status-ready.txt", &render::status(&v, now()));
}

#[test]
fn status_of_a_degraded_cluster_in_the_middle_of_a_drain() {
    let v = degraded_cluster();
    assert!(v.degraded(), "cairn status exits non-zero");
    golden("status-degraded.txt", &render::status(&v, now()));
    golden("status-degraded.json", &(serde_json::to_string_pretty(&v).unwrap() + "\n"));
    golden("status-degraded-watch.txt", &(render::progress_line(&v) + "\n"));
    // -o json round-trips, so scripts can rely on the fields.
    let back: ClusterView = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
    assert_eq!(back, v);
}

#[test]
fn status_with_many_issues_lists_the_first_and_counts_the_rest() {
    let mut v = degraded_cluster();
    v.partition_issues = (0..14)
        .map(|p| PartitionIssue::UnderReplicated {
            partition: p,
            state: "writable".into(),
            live: 1,
            wanted: 3,
            not_live: vec!["n1".into(), "n2".into()],
        })
        .collect();
    let text = render::status(&v, now());
    assert!(text.contains("  p9 "), "{text}");
    assert!(!text.contains("  p10 "), "{text}");
    assert!(text.contains("… and 4 more (-o yaml lists all)"), "{text}");
}

#[test]
fn disks_once_with_aliases_and_excluded_mounts() {
    let disk = |id: &str, mount: &str, aliases: &[&str]| DiskReport {
        id: id.into(),
        device: "/dev/nvme0n1p1".into(),
        dev: "259:1".into(),
        fs_type: "xfs".into(),
        canonical_mount: mount.into(),
        aliases: aliases
            .iter()
            .map(|a| MountAlias { mount: (*a).into(), root: "/".into(), device: "/dev/nvme0n1p1".into() })
            .collect(),
        total_bytes: 900 * GIB,
        available_bytes: 830 * GIB,
        allocated_bytes: 64 * GIB,
        allocatable_bytes: 760 * GIB,
        usable: true,
        ..DiskReport::default()
    };
    let mut conflicted = disk("d-3", "/mnt/disks/c", &[]);
    conflicted.usable = false;
    conflicted.conflict = Some("identity file names node n7, recorded for n2: a disk moved between machines".into());
    let nodes = vec![
        NodeDisks {
            node: "n0".into(),
            ready: Some(true),
            disks: vec![
                disk("d-1", "/mnt/disks/a", &["/var/lib/kubelet/pods/x/volumes/a", "/srv/a"]),
                disk("d-2", "/mnt/disks/b", &[]),
            ],
            excluded: vec![
                ExcludedMount {
                    mount: "/".into(),
                    reason: "filesystem type ext4 not in selector.fs_types [xfs]".into(),
                },
                ExcludedMount {
                    mount: "/boot/efi".into(),
                    reason: "smaller than selector.min_size (100.0 GiB)".into(),
                },
                ExcludedMount { mount: "/proc".into(), reason: "pseudo filesystem (proc)".into() },
                ExcludedMount { mount: "/sys/fs/cgroup".into(), reason: "pseudo filesystem (cgroup2)".into() },
            ],
            missing: vec![],
        },
        NodeDisks {
            node: "n2".into(),
            ready: Some(false),
            disks: vec![conflicted],
            excluded: vec![],
            missing: vec![MissingDisk { id: "d-9".into(), mount: "/mnt/disks/old".into() }],
        },
    ];
    golden("disks.txt", &render::disks(&nodes, false));
    golden("disks-all.txt", &render::disks(&nodes, true));
    assert_eq!(render::disks(&[], false), "no StoreNodes: is the disk agent DaemonSet running?\n");
}

#[test]
fn topology_as_the_datanodes_see_it() {
    let node = |id: &str, zone: &str| NodeSpec {
        id: id.into(),
        zone: zone.into(),
        address: format!("{id}.c1-nodes.store:7480"),
        disks: vec![DiskSpec { id: format!("{id}-d1"), capacity_bytes: 900 * GIB }],
    };
    let replicas =
        |nodes: &[&str]| nodes.iter().map(|n| ReplicaSpec { node: (*n).into(), disk: format!("{n}-d1") }).collect();
    let topology = Topology {
        config: Some(ClusterConfig {
            blob_tls: None,
            replication_factor: 3,
            write_quorum: 2,
            partitions: 3,
            volume_size_bytes: 64 * GIB,
            segment_size_bytes: GIB,
            max_blob_size_bytes: None,
            auth: Default::default(),
        }),
        nodes: [node("n0", "a"), node("n1", "b"), node("n2", "c")].into_iter().map(|n| (n.id.clone(), n)).collect(),
        partitions: BTreeMap::from([
            (0, PartitionSpec { id: 0, state: PartitionState::Writable, replicas: replicas(&["n0", "n1", "n2"]) }),
            (1, PartitionSpec { id: 1, state: PartitionState::ReadOnly, replicas: replicas(&["n1", "n2", "n0"]) }),
            (2, PartitionSpec { id: 2, state: PartitionState::Writable, replicas: replicas(&["n2", "n0", "n1"]) }),
        ]),
        ..Topology::default()
    };
    let live = |id: &str, address: &str| LiveNode {
        tls: false,
        node: id.into(),
        address: address.into(),
        peer_address: None,
        peer_tls: false,
        zone: String::new(),
        started_ms: 0,
        free_bytes: BTreeMap::new(),
        unopened: Default::default(),
    };
    let mut snapshot = Snapshot::default();
    snapshot.topology = topology;
    let mut n2 = live("n2", "10.0.3.7:7480");
    n2.unopened = BTreeMap::from([(1, "the disk agent knows no disk n2-d1".to_string())]);
    snapshot.live = BTreeMap::from([
        ("n0".to_string(), live("n0", "n0.c1-nodes.store:7480")),
        ("n2".to_string(), n2),
        ("n9".to_string(), live("n9", "10.0.9.9:7480")),
    ]);
    snapshot.revision = 412;
    golden("topology.txt", &render::topology("c1", &snapshot));
    let empty = Snapshot::default();
    assert_eq!(
        render::topology("c9", &empty).lines().next(),
        Some("cluster c9: no topology in etcd (etcd revision 0)")
    );
}
