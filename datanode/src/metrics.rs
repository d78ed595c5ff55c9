//! Prometheus metrics: HTTP requests, engine internals, volume fill.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Metrics the storage engine records.
pub struct EngineMetrics {
    /// Requests per group commit.
    pub batch_records: Histogram,
    /// Time to write and fdatasync one batch.
    pub fsync_seconds: Histogram,
    /// Whole group commit: stage, write, fdatasync, index commit.
    pub commit_seconds: Histogram,
    /// Checksum mismatches found while reading.
    pub integrity_errors: Counter,
    /// Large-blob chunks served from, or read into, the node's chunk cache.
    pub chunk_cache_hits: Counter,
    pub chunk_cache_misses: Counter,
    /// Compaction progress: passes finished, segments they freed, record bytes they copied.
    pub compactions: Counter,
    pub compaction_segments_freed: Counter,
    pub compaction_copied_bytes: Counter,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self {
            batch_records: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            fsync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            commit_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            integrity_errors: Counter::default(),
            chunk_cache_hits: Counter::default(),
            chunk_cache_misses: Counter::default(),
            compactions: Counter::default(),
            compaction_segments_freed: Counter::default(),
            compaction_copied_bytes: Counter::default(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

/// Why a request was refused by authentication: missing, invalid, forbidden or blocked.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthFailureLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    pub partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct Metrics {
    pub registry: Registry,
    pub engine: std::sync::Arc<EngineMetrics>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: HistogramFamily<RequestLabels>,
    pub bytes: Family<DirectionLabels, Counter>,
    pub volume_fill: Family<VolumeLabels, Gauge<f64, AtomicU64>>,
    pub volume_live_bytes: Family<VolumeLabels, Gauge>,
    pub volume_reclaimable_bytes: Family<VolumeLabels, Gauge>,
    pub volume_blobs: Family<VolumeLabels, Gauge>,
    pub volume_writable: Family<VolumeLabels, Gauge>,
    /// Replication lag of each local replica behind each peer.
    pub replication_lag_entries: Family<PeerLabels, Gauge>,
    pub replication_lag_bytes: Family<PeerLabels, Gauge>,
    pub replication_lag_seconds: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    /// Entries of a peer's journal a replica could not apply yet (retried with back-off).
    pub replication_owed_entries: Family<PeerLabels, Gauge>,
    /// Journal entries applied from each peer node, their record bytes, and failures.
    pub replication_applied_entries: Family<NodeLabels, Counter>,
    pub replication_applied_bytes: Family<NodeLabels, Counter>,
    pub replication_errors: Family<NodeLabels, Counter>,
    /// Differences anti-entropy found and repaired, by the peer node that had them.
    pub anti_entropy_repaired: Family<NodeLabels, Counter>,
    /// Requests refused by authentication (401, 403, 429), by reason.
    pub auth_failures: Family<AuthFailureLabels, Counter>,
    /// Latency of calls to other datanodes.
    pub peer_request_seconds: HistogramFamily<PeerCallLabels>,
    /// Latency of calls to etcd.
    pub etcd_request_seconds: HistogramFamily<EtcdCallLabels>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EtcdCallLabels {
    /// `load`, `write`, `register`, `keep_alive`, `update_live`.
    pub call: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerCallLabels {
    pub peer: String,
    /// `journal`, `fetch`, `meta`, `digest`, `bucket`.
    pub call: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub partition: String,
    pub peer: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let engine = std::sync::Arc::new(EngineMetrics::default());
        let mut registry = Registry::with_prefix("cairn");
        let requests = Family::<RequestLabels, Counter>::default();
        let request_seconds: HistogramFamily<RequestLabels> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_1, 2.0, 16)));
        let bytes = Family::<DirectionLabels, Counter>::default();
        let volume_fill = Family::<VolumeLabels, Gauge<f64, AtomicU64>>::default();
        let volume_live_bytes = Family::<VolumeLabels, Gauge>::default();
        let volume_reclaimable_bytes = Family::<VolumeLabels, Gauge>::default();
        let volume_blobs = Family::<VolumeLabels, Gauge>::default();
        let volume_writable = Family::<VolumeLabels, Gauge>::default();
        let replication_lag_entries = Family::<PeerLabels, Gauge>::default();
        let replication_lag_bytes = Family::<PeerLabels, Gauge>::default();
        let replication_lag_seconds = Family::<PeerLabels, Gauge<f64, AtomicU64>>::default();
        let replication_owed_entries = Family::<PeerLabels, Gauge>::default();
        let replication_applied_entries = Family::<NodeLabels, Counter>::default();
        let replication_applied_bytes = Family::<NodeLabels, Counter>::default();
        let replication_errors = Family::<NodeLabels, Counter>::default();
        let anti_entropy_repaired = Family::<NodeLabels, Counter>::default();
        let auth_failures = Family::<AuthFailureLabels, Counter>::default();
        registry.register(
            "auth_failures",
            "Requests refused by authentication (401 missing or invalid, 403 forbidden, 429 blocked)",
            auth_failures.clone(),
        );
        let peer_request_seconds: HistogramFamily<PeerCallLabels> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_1, 2.0, 16)));
        registry.register(
            "replication_applied_entries",
            "Journal entries applied from a peer node",
            replication_applied_entries.clone(),
        );
        registry.register(
            "replication_applied_bytes",
            "Record bytes of the journal entries applied from a peer node",
            replication_applied_bytes.clone(),
        );
        registry.register(
            "replication_errors",
            "Journal requests or entries from a peer node that failed",
            replication_errors.clone(),
        );
        registry.register(
            "anti_entropy_repaired",
            "Blobs and tombstones anti-entropy found missing and copied from a peer node",
            anti_entropy_repaired.clone(),
        );
        let etcd_request_seconds: HistogramFamily<EtcdCallLabels> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_1, 2.0, 16)));
        registry.register("etcd_request_duration_seconds", "Latency of calls to etcd", etcd_request_seconds.clone());
        registry.register(
            "peer_request_duration_seconds",
            "Latency of replication calls to another datanode",
            peer_request_seconds.clone(),
        );
        registry.register(
            "replication_owed_entries",
            "Journal entries of a peer a replica could not apply yet (retried with back-off)",
            replication_owed_entries.clone(),
        );
        registry.register(
            "replication_lag_entries",
            "Journal entries a replica has yet to pull from a peer",
            replication_lag_entries.clone(),
        );
        registry.register(
            "replication_lag_bytes",
            "Bytes of records a replica has yet to pull from a peer",
            replication_lag_bytes.clone(),
        );
        registry.register(
            "replication_lag_seconds",
            "How long a replica has been behind a peer",
            replication_lag_seconds.clone(),
        );
        registry.register("http_requests", "HTTP requests by route and status", requests.clone());
        registry.register("http_request_duration_seconds", "HTTP request latency", request_seconds.clone());
        registry.register("blob_bytes", "Blob payload bytes received (in) and sent (out)", bytes.clone());
        registry.register(
            "group_commit_batch_records",
            "Write requests per group commit",
            engine.batch_records.clone(),
        );
        registry.register(
            "fsync_duration_seconds",
            "Segment write + fdatasync per group commit",
            engine.fsync_seconds.clone(),
        );
        registry.register("group_commit_duration_seconds", "Whole group commit", engine.commit_seconds.clone());
        registry.register("integrity_errors", "Checksum mismatches found on read", engine.integrity_errors.clone());
        registry.register("chunk_cache_hits", "Verified chunks served from memory", engine.chunk_cache_hits.clone());
        registry.register(
            "chunk_cache_misses",
            "Chunks read and verified from a segment",
            engine.chunk_cache_misses.clone(),
        );
        registry.register("compactions", "Compaction passes finished", engine.compactions.clone());
        registry.register(
            "compaction_segments_freed",
            "Segments compaction emptied and gave back",
            engine.compaction_segments_freed.clone(),
        );
        registry.register(
            "compaction_copied_bytes",
            "Record bytes compaction copied out of the segments it freed",
            engine.compaction_copied_bytes.clone(),
        );
        registry.register("volume_fill_ratio", "Allocated segment bytes / volume capacity", volume_fill.clone());
        registry.register("volume_live_bytes", "Bytes of records the index points at", volume_live_bytes.clone());
        registry.register(
            "volume_reclaimable_bytes",
            "Bytes written but no longer needed, which compaction can reclaim",
            volume_reclaimable_bytes.clone(),
        );
        registry.register("volume_blobs", "Blobs stored and not deleted", volume_blobs.clone());
        registry.register("volume_writable", "1 when the volume accepts new blobs", volume_writable.clone());
        Self {
            registry,
            engine,
            requests,
            request_seconds,
            bytes,
            volume_fill,
            volume_live_bytes,
            volume_reclaimable_bytes,
            volume_blobs,
            volume_writable,
            replication_lag_entries,
            replication_lag_bytes,
            replication_lag_seconds,
            replication_owed_entries,
            replication_applied_entries,
            replication_applied_bytes,
            replication_errors,
            anti_entropy_repaired,
            auth_failures,
            peer_request_seconds,
            etcd_request_seconds,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
