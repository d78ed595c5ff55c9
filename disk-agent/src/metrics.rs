//! Prometheus metrics: per-disk capacity figures, excluded mounts, volume creates.

use cairn_common::agent_api::NodeReport;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DiskLabels {
    pub disk: String,
    pub mount: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

type DiskGauge = Family<DiskLabels, Gauge<u64, AtomicU64>>;

#[derive(Default)]
pub struct AgentMetrics {
    total: DiskGauge,
    available: DiskGauge,
    fs_reserved: DiskGauge,
    headroom: DiskGauge,
    allocated: DiskGauge,
    allocatable: DiskGauge,
    usable: DiskGauge,
    volumes: DiskGauge,
    excluded: Gauge,
    creates: Family<ResultLabels, Counter>,
}

impl AgentMetrics {
    /// Replaces every per-disk figure with the report's (disks that went away disappear).
    pub fn observe(&self, report: &NodeReport) {
        let families = [
            &self.total,
            &self.available,
            &self.fs_reserved,
            &self.headroom,
            &self.allocated,
            &self.allocatable,
            &self.usable,
            &self.volumes,
        ];
        for family in families {
            family.clear();
        }
        for d in &report.disks {
            let labels = DiskLabels { disk: d.id.clone(), mount: d.canonical_mount.clone() };
            self.total.get_or_create(&labels).set(d.total_bytes);
            self.available.get_or_create(&labels).set(d.available_bytes);
            self.fs_reserved.get_or_create(&labels).set(d.fs_reserved_bytes);
            self.headroom.get_or_create(&labels).set(d.headroom_bytes);
            self.allocated.get_or_create(&labels).set(d.allocated_bytes);
            self.allocatable.get_or_create(&labels).set(d.allocatable_bytes);
            self.usable.get_or_create(&labels).set(u64::from(d.usable));
            self.volumes.get_or_create(&labels).set(d.volumes.len() as u64);
        }
        self.excluded.set(report.excluded.len() as i64);
    }

    pub fn volume_creates(&self, result: &str) {
        self.creates.get_or_create(&ResultLabels { result: result.into() }).inc();
    }

    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("cairn_disk");
        r.register("total_bytes", "Filesystem size (f_blocks × f_frsize)", self.total.clone());
        r.register("available_bytes", "Free space for unprivileged writers (f_bavail)", self.available.clone());
        r.register(
            "fs_reserved_bytes",
            "Blocks reserved by the filesystem (f_bfree − f_bavail)",
            self.fs_reserved.clone(),
        );
        r.register("headroom_bytes", "Space kept free by configuration", self.headroom.clone());
        r.register("allocated_bytes", "Capacity promised to Cairn volumes", self.allocated.clone());
        r.register("allocatable_bytes", "What CreateVolume may still promise", self.allocatable.clone());
        r.register("usable", "1 when Cairn may create volumes on the disk", self.usable.clone());
        r.register("volumes", "Cairn volumes on the disk", self.volumes.clone());
        r.register("excluded_mounts", "Mounts considered and not used", self.excluded.clone());
        r.register("volume_creates", "CreateVolume calls that allocated, by result", self.creates.clone());
        r
    }
}
