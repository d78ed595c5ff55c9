//! Text output of `cairn status`, `cairn disks` and `cairn topology`: compact enough for one
//! screen. Pure functions of the views and the current time (golden-file tests in
//! operator/tests/golden/).

use std::fmt::Write;

use cairn_cluster::etcd::Snapshot;
use k8s_openapi::jiff::Timestamp;

use cairn_common::text::{bytes, disk_table, table};

use super::view::{ClusterView, NodeDisks, PartitionIssue};

/// Partition issues listed before "… and N more".
const ISSUES_SHOWN: usize = 10;

/// `45s`, `12m`, `3h4m`, `2d5h`, like kubectl's AGE.
pub fn age(since: &str, now: Timestamp) -> String {
    let Ok(t) = since.parse::<Timestamp>() else { return "?".into() };
    let s = now.as_second().saturating_sub(t.as_second()).max(0);
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => match (s / 3600, s % 3600 / 60) {
            (h, 0) => format!("{h}h"),
            (h, m) => format!("{h}h{m}m"),
        },
        s => match (s / 86400, s % 86400 / 3600) {
            (d, 0) => format!("{d}d"),
            (d, h) => format!("{d}d{h}h"),
        },
    }
}

fn issue_line(issue: &PartitionIssue) -> Vec<String> {
    match issue {
        PartitionIssue::UnderReplicated { partition, state, live, wanted, not_live } => vec![
            format!("p{partition}"),
            "under-replicated".into(),
            format!("{live}/{wanted} live ({state}); not live: {}", not_live.join(", ")),
        ],
        PartitionIssue::Lagging { partition, node, peer, lag_entries, lag_seconds, error } => vec![
            format!("p{partition}"),
            "lagging".into(),
            match error {
                Some(e) => format!("{node} cannot pull from {peer}: {e}"),
                None => format!("{node} behind {peer} by {lag_entries} entries ({lag_seconds:.1} s)"),
            },
        ],
        PartitionIssue::Moving { partition, replicas } => {
            vec![format!("p{partition}"), "moving".into(), format!("replicas on {}", replicas.join(", "))]
        }
    }
}

/// `cairn status`.
pub fn status(v: &ClusterView, now: Timestamp) -> String {
    let mut out = String::new();
    let created = v.created.as_deref().map(|c| age(c, now)).unwrap_or_else(|| "?".into());
    let _ = writeln!(
        out,
        "StoreCluster {}/{} ({})  phase {}  image {}  age {created}",
        v.namespace, v.name, v.source, v.phase, v.image
    );
    let mut rows: Vec<Vec<String>> = v
        .conditions
        .iter()
        // Reconciling and Stalled mirror Progressing and Degraded (for kstatus): shown once.
        .filter(|c| c.type_ != "Reconciling" && c.type_ != "Stalled")
        .map(|c| {
            let message = if c.message.is_empty() { "-".to_string() } else { c.message.clone() };
            vec![format!("  {}", c.type_), c.status.clone(), c.reason.clone(), age(&c.since, now), message]
        })
        .collect();
    if rows.is_empty() {
        rows.push(vec!["  (no conditions)".into()]);
    }
    table(&mut out, &rows);
    let c = &v.capacity;
    let known = |b: Option<u64>| b.map(bytes).unwrap_or_else(|| "?".into());
    let _ = writeln!(
        out,
        "Capacity: {} blob(s); {} stored, {} reclaimable (all replicas); {} allocated to volumes, {} allocatable, of {} total",
        c.blobs.map(|b| b.to_string()).unwrap_or_else(|| "?".into()),
        known(c.stored_bytes),
        known(c.reclaimable_bytes),
        bytes(c.allocated_bytes),
        bytes(c.allocatable_bytes),
        bytes(c.total_bytes)
    );
    let p = &v.partitions;
    let _ = writeln!(
        out,
        "Partitions: {} ({} writable, {} read-only, {} under-replicated); topology revision {}",
        p.total, p.writable, p.read_only, p.under_replicated, v.topology_revision
    );

    out.push('\n');
    let header = ["MACHINE", "ZONE", "DATANODE", "DISKS", "STORED", "RECLAIMABLE", "ALLOCATED", "ALLOCATABLE", "TOTAL"];
    let mut rows = vec![header.iter().map(|h| h.to_string()).chain([String::from("REPLICAS")]).collect::<Vec<_>>()];
    let known = |b: Option<u64>| b.map(bytes).unwrap_or_else(|| "-".into());
    for m in &v.machines {
        rows.push(vec![
            m.name.clone(),
            m.zone.clone(),
            m.datanode.clone(),
            m.disks.to_string(),
            known(m.stored_bytes),
            known(m.reclaimable_bytes),
            bytes(m.allocated_bytes),
            bytes(m.allocatable_bytes),
            bytes(m.total_bytes),
            m.replicas.to_string(),
        ]);
    }
    if v.machines.is_empty() {
        rows.push(vec!["(none)".into()]);
    }
    table(&mut out, &rows);

    out.push('\n');
    if v.partition_issues.is_empty() {
        out.push_str("Replication: every replica live and caught up\n");
    } else {
        out.push_str("Replication:\n");
        let rows: Vec<Vec<String>> = v
            .partition_issues
            .iter()
            .take(ISSUES_SHOWN)
            .map(|i| {
                let mut row = issue_line(i);
                row[0] = format!("  {}", row[0]);
                row
            })
            .collect();
        table(&mut out, &rows);
        if v.partition_issues.len() > ISSUES_SHOWN {
            let _ = writeln!(out, "  … and {} more (-o yaml lists all)", v.partition_issues.len() - ISSUES_SHOWN);
        }
    }
    if !v.warnings.is_empty() {
        out.push_str("\nWarnings:\n");
        for w in &v.warnings {
            let _ = writeln!(out, "  ! {w}");
        }
    }
    if !v.events.is_empty() {
        out.push_str("\nEvents:\n");
        let rows: Vec<Vec<String>> = v
            .events
            .iter()
            .map(|e| {
                let count = if e.count > 1 { format!(" (×{})", e.count) } else { String::new() };
                vec![
                    format!("  {}", age(&e.time, now)),
                    if e.warning { "Warning" } else { "Normal" }.into(),
                    e.reason.clone(),
                    format!("{}{count}", e.message),
                ]
            })
            .collect();
        table(&mut out, &rows);
    }
    out
}

/// One line for `cairn status --watch`: the phase and what is under way.
pub fn progress_line(v: &ClusterView) -> String {
    let ready = v.conditions.iter().find(|c| c.type_ == "Ready");
    let message = ready.map(|c| c.message.as_str()).filter(|m| !m.is_empty()).unwrap_or("-");
    let live = v.machines.iter().filter(|m| m.datanode == "ready").count();
    let lagging = v.partition_issues.iter().filter(|i| matches!(i, PartitionIssue::Lagging { .. })).count();
    format!(
        "{}: {message} [{live}/{} datanodes registered, {} under-replicated, {lagging} lagging replica(s)]",
        v.phase,
        v.machines.len(),
        v.partitions.under_replicated
    )
}

/// `cairn disks`: each disk once, its other mounts as aliases; excluded mounts with the reason.
/// Pseudo filesystems (proc, sysfs, cgroup, …) are counted, not listed, unless `all`.
pub fn disks(nodes: &[NodeDisks], all: bool) -> String {
    let mut out = String::new();
    for (i, n) in nodes.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let ready = match n.ready {
            Some(true) => " (Ready)",
            Some(false) => " (not Ready)",
            None => "",
        };
        let _ =
            writeln!(out, "Node {}{ready}: {} disk(s), {} excluded mount(s)", n.node, n.disks.len(), n.excluded.len());
        out += &disk_table(&n.disks, &n.excluded, &n.missing, all, "  ");
    }
    if nodes.is_empty() {
        out.push_str("no StoreNodes: is the disk agent DaemonSet running?\n");
    }
    out
}

/// `cairn topology`: the config, the nodes with their live registrations, the partitions.
pub fn topology(cluster: &str, s: &Snapshot) -> String {
    let mut out = String::new();
    let t = &s.topology;
    match &t.config {
        Some(c) => {
            let _ = writeln!(
                out,
                "cluster {cluster} (etcd revision {}): replication {} quorum {}, {} partitions, volume {}, segment {}",
                s.revision,
                c.replication_factor,
                c.write_quorum,
                c.partitions,
                bytes(c.volume_size_bytes),
                bytes(c.segment_size_bytes)
            );
        }
        None => {
            let _ = writeln!(out, "cluster {cluster}: no topology in etcd (etcd revision {})", s.revision);
        }
    }
    let mut rows = vec![["NODE", "ZONE", "ADDRESS", "LIVE", "REPLICAS", "DISKS"].map(String::from).to_vec()];
    for n in t.nodes.values() {
        let disks: Vec<String> = n.disks.iter().map(|d| format!("{} ({})", d.id, bytes(d.capacity_bytes))).collect();
        let live = match s.live.get(&n.id) {
            Some(l) if l.address == n.address => "yes".to_string(),
            Some(l) => format!("yes at {}", l.address),
            None => "no".into(),
        };
        let replicas = t.partitions_of(&n.id).count().to_string();
        rows.push(vec![n.id.clone(), n.zone.clone(), n.address.clone(), live, replicas, disks.join(", ")]);
    }
    table(&mut out, &rows);
    out.push('\n');
    let mut rows = vec![["PARTITION", "STATE", "REPLICAS (node/disk)"].map(String::from).to_vec()];
    for p in t.partitions.values() {
        let replicas: Vec<String> = p
            .replicas
            .iter()
            .map(|r| {
                let mark = match s.live.get(&r.node) {
                    None => " (not live)",
                    Some(l) if l.unopened.contains_key(&p.id) => " (cannot open)",
                    Some(_) => "",
                };
                format!("{}/{}{mark}", r.node, r.disk)
            })
            .collect();
        rows.push(vec![p.id.to_string(), p.state.as_str().to_string(), replicas.join(" ")]);
    }
    table(&mut out, &rows);
    // What the nodes say they cannot open, and who registers without being in the topology.
    let unopened: Vec<String> = s
        .live
        .values()
        .flat_map(|l| l.unopened.iter().map(move |(p, why)| format!("  {} cannot open partition {p}: {why}", l.node)))
        .collect();
    if !unopened.is_empty() {
        out.push_str("\nReplicas not open:\n");
        out.push_str(&unopened.join("\n"));
        out.push('\n');
    }
    let strangers: Vec<String> = s
        .live
        .values()
        .filter(|l| !t.nodes.contains_key(&l.node))
        .map(|l| format!("  {} at {} (zone {:?})", l.node, l.address, l.zone))
        .collect();
    if !strangers.is_empty() {
        out.push_str("\nLive nodes not in the topology:\n");
        out.push_str(&strangers.join("\n"));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_kubectl() {
        let now: Timestamp = "2026-11-26T12:00:00Z".parse().unwrap();
        let cases = [
            ("2026-11-26T11:59:15Z", "45s"),
            ("2026-11-26T11:48:00Z", "12m"),
            ("2026-11-26T09:00:00Z", "3h"),
            ("2026-11-26T08:56:00Z", "3h4m"),
            ("2026-11-24T07:00:00Z", "2d5h"),
            ("2026-11-26T12:00:05Z", "0s"),
            ("not a time", "?"),
        ];
        for (since, want) in cases {
            assert_eq!(age(since, now), want, "{since}");
        }
    }
}
