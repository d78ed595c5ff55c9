//! The volumes a datanode serves, keyed by partition.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cairn_common::volume_layout::{VolumeMarker, MARKER_FILE};
use rand::Rng;

use crate::engine::{Volume, VolumeConfig, VolumeError, VolumeHealth};
use crate::metrics::{Metrics, VolumeLabels};

/// Geometry of the volumes a standalone node creates.
#[derive(Debug, Clone)]
pub struct StandaloneLayout {
    /// `--partitions`: `None` opens what the node already has (one partition for a new node).
    pub partitions: Option<u32>,
    pub segment_size: u64,
    pub volume_size: u64,
}

/// `DATA_DIR/node.json`: what a standalone node's data directory holds, so that a restart opens
/// every volume whatever its command line says.
pub const NODE_FILE: &str = "node.json";
const NODE_FORMAT: u32 = 1;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct NodeFile {
    format: u32,
    partitions: u32,
}

/// The partitions of a standalone node: those its data directory records (or, for a directory
/// made before the record existed, the volumes it holds), else `--partitions`, else one. A
/// `--partitions` that contradicts the directory is refused: partitions are fixed once created.
/// Where a node's volumes come from.
#[derive(Debug, Clone)]
pub enum VolumeSource {
    /// Made by the node itself under `DIR/volumes/`, growing segment by segment.
    DataDir(PathBuf),
    /// Asked of the machine's disk agent (fully preallocated, on a disk it reports): one volume
    /// `<prefix>-p<partition>` per partition, on `disk` or else the disk with most room.
    DiskAgent { socket: PathBuf, disk: Option<String>, prefix: String },
}

pub fn standalone_partitions(data_dir: &Path, flag: Option<u32>) -> Result<u32, VolumeError> {
    let path = data_dir.join(NODE_FILE);
    let recorded = match std::fs::read(&path) {
        Ok(bytes) => {
            let file: NodeFile =
                serde_json::from_slice(&bytes).map_err(|e| VolumeError::Corrupt(format!("{}: {e}", path.display())))?;
            if file.format != NODE_FORMAT {
                return Err(VolumeError::Corrupt(format!(
                    "{}: format {} is not supported (this build reads format {NODE_FORMAT})",
                    path.display(),
                    file.format
                )));
            }
            Some(file.partitions)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Volumes made before node.json existed: partitions 0.. as far as they go.
            let existing = (0..).take_while(|p| volume_dir(data_dir, *p).join(MARKER_FILE).exists()).count() as u32;
            (existing > 0).then_some(existing)
        }
        Err(e) => return Err(e.into()),
    };
    let partitions = match (recorded, flag) {
        (Some(n), Some(asked)) if n != asked => {
            return Err(VolumeError::Layout(cairn_common::volume_layout::LayoutError::Geometry(format!(
                "{} holds {n} partition(s); --partitions {asked} contradicts it (partitions are fixed once \
                 created: leave the flag out, or give {n})",
                data_dir.display()
            ))))
        }
        (Some(n), _) => n,
        (None, asked) => asked.unwrap_or(1),
    };
    if partitions == 0 {
        return Err(VolumeError::Layout(cairn_common::volume_layout::LayoutError::Geometry(
            "--partitions must be at least 1".into(),
        )));
    }
    if recorded.is_none() || !path.exists() {
        let tmp = data_dir.join(format!("{NODE_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(&NodeFile { format: NODE_FORMAT, partitions }).expect("serializes");
        std::fs::write(&tmp, text)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(data_dir)?.sync_all()?;
    }
    Ok(partitions)
}

/// The volumes a node serves, by partition. A cluster node adds and removes volumes as its
/// assignments change; a standalone node opens them all at start.
pub struct Store {
    volumes: RwLock<BTreeMap<u32, Arc<Volume>>>,
    metrics: Arc<Metrics>,
    affinity: WriteAffinity,
}

impl Store {
    /// Opens (creating on first start) one volume per partition under `data_dir/volumes/`.
    /// Existing volumes keep the geometry in their marker.
    pub fn open_standalone(
        data_dir: &Path,
        layout: &StandaloneLayout,
        config: &VolumeConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, VolumeError> {
        let mut dirs = Vec::new();
        for partition in 0..standalone_partitions(data_dir, layout.partitions)? {
            let dir = volume_dir(data_dir, partition);
            if !dir.join(MARKER_FILE).exists() {
                let marker = VolumeMarker::new(partition, layout.segment_size, layout.volume_size)?;
                Volume::create(&dir, &marker, config)?;
            }
            dirs.push(dir);
        }
        Self::open_dirs(&dirs, config, metrics)
    }

    /// Opens existing volume directories (made by the disk agent or by `open_standalone`); the
    /// partition of each comes from its marker.
    pub fn open_dirs(dirs: &[PathBuf], config: &VolumeConfig, metrics: Arc<Metrics>) -> Result<Self, VolumeError> {
        let mut volumes = BTreeMap::new();
        for dir in dirs {
            let volume = Volume::open(dir, config.clone(), metrics.engine.clone())?;
            let partition = volume.partition();
            tracing::info!(partition, dir = %dir.display(), "volume open");
            if volumes.insert(partition, Arc::new(volume)).is_some() {
                return Err(VolumeError::Corrupt(format!("two volumes of partition {partition}")));
            }
        }
        Ok(Self { volumes: RwLock::new(volumes), metrics, affinity: WriteAffinity::default() })
    }

    /// A store with no volumes yet.
    pub fn empty(metrics: Arc<Metrics>) -> Self {
        Self { volumes: RwLock::default(), metrics, affinity: WriteAffinity::default() }
    }

    pub fn volume(&self, partition: u32) -> Option<Arc<Volume>> {
        self.volumes.read().expect("store lock").get(&partition).cloned()
    }

    pub fn volumes(&self) -> Vec<Arc<Volume>> {
        self.volumes.read().expect("store lock").values().cloned().collect()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Starts serving a volume.
    pub fn insert(&self, volume: Arc<Volume>) {
        self.volumes.write().expect("store lock").insert(volume.partition(), volume);
    }

    /// Stops serving a partition's volume (its data stays on disk).
    pub fn remove(&self, partition: u32) -> Option<Arc<Volume>> {
        self.volumes.write().expect("store lock").remove(&partition)
    }

    /// A writable volume for a new blob, chosen at random weighted by free capacity (and kept
    /// for a short hold, see [`WriteAffinity`]), other than the `excluded` partitions (tried
    /// already).
    pub fn pick_for_put(&self, excluded: &[u32]) -> Result<Arc<Volume>, VolumeError> {
        let volumes: Vec<Arc<Volume>> =
            self.volumes().into_iter().filter(|v| !excluded.contains(&v.partition())).collect();
        let mut candidates = Vec::new();
        let mut stalled = Vec::new();
        let mut failed = None;
        for volume in &volumes {
            match volume.health() {
                VolumeHealth::Writable => {
                    let stats = volume.stats()?;
                    let free = stats.capacity_bytes.saturating_sub(stats.live_bytes).max(1);
                    candidates.push((volume, free));
                }
                // Tried only when nothing else is writable: that try is how they recover.
                VolumeHealth::Stalled(_) => stalled.push((volume, 1)),
                VolumeHealth::Full => {}
                VolumeHealth::Failed(reason) => failed = Some(reason),
            }
        }
        if candidates.is_empty() {
            candidates = stalled;
        }
        let weights: Vec<(u32, u64)> = candidates.iter().map(|(v, free)| (v.partition(), *free)).collect();
        match self.affinity.pick(&weights) {
            Some(partition) => Ok(candidates
                .into_iter()
                .find(|(v, _)| v.partition() == partition)
                .map(|(v, _)| v.clone())
                .expect("the pick is a candidate")),
            None => Err(match failed {
                Some(reason) if volumes.iter().all(|v| v.health() != VolumeHealth::Full) => VolumeError::Failed(reason),
                _ => VolumeError::Full,
            }),
        }
    }

    /// Refreshes the per-volume gauges (called when /metrics is scraped).
    pub fn update_gauges(&self) {
        for volume in self.volumes() {
            let labels = VolumeLabels { partition: volume.partition().to_string() };
            if let Ok(stats) = volume.stats() {
                self.metrics
                    .volume_fill
                    .get_or_create(&labels)
                    .set(stats.allocated_bytes as f64 / stats.capacity_bytes as f64);
                self.metrics.volume_live_bytes.get_or_create(&labels).set(stats.live_bytes as i64);
                self.metrics.volume_reclaimable_bytes.get_or_create(&labels).set(stats.reclaimable_bytes as i64);
                self.metrics.volume_blobs.get_or_create(&labels).set(stats.blobs as i64);
                self.metrics
                    .volume_writable
                    .get_or_create(&labels)
                    .set(i64::from(stats.health == VolumeHealth::Writable));
            }
        }
    }

    /// Reopens the volumes that failed only because their index could not grow on a full disk,
    /// once room is back (every other failure waits for a person). The partitions healed.
    pub fn heal(&self) -> Vec<u32> {
        let mut healed = Vec::new();
        let candidates: Vec<u32> = self.volumes().iter().filter(|v| v.can_heal()).map(|v| v.partition()).collect();
        for partition in candidates {
            // The volume must be closed for good (its index file released) before it is opened
            // again: it is taken out of service, and healed only if no request still holds it.
            let Some(volume) = self.volumes.write().expect("store lock").remove(&partition) else { continue };
            let volume = match Arc::try_unwrap(volume) {
                Ok(volume) => volume,
                Err(in_use) => {
                    self.volumes.write().expect("store lock").insert(partition, in_use);
                    continue;
                }
            };
            let (dir, config, metrics) = volume.reopen_parts();
            drop(volume);
            match Volume::open(&dir, config, metrics) {
                Ok(reopened) => {
                    self.volumes.write().expect("store lock").insert(partition, Arc::new(reopened));
                    tracing::info!(partition, "volume reopened: room is back on its disk");
                    healed.push(partition);
                }
                // Out of service until it opens: a restart (or the next try) runs recovery.
                Err(e) => tracing::error!(partition, error = %e, "reopening a volume failed"),
            }
        }
        healed
    }

    /// Stops every volume; each commits a final durable checkpoint.
    pub fn close(&self) {
        for volume in self.volumes() {
            volume.close();
        }
    }
}

pub fn volume_dir(data_dir: &Path, partition: u32) -> PathBuf {
    data_dir.join("volumes").join(format!("p{partition:08}"))
}

/// How long new blobs keep going to the volume (or partition) last drawn for them. Writes that
/// arrive together then share one group commit on each replica, and one replica batch per
/// peer, instead of spreading one or two per commit over every volume: measured on 3 nodes ×
/// 6 partitions, 2.4 records per commit at random and ≈5 with a 10 ms hold, 5,300 → 8,300
/// routed 4 KiB PUT/s (docs/benchmarks.md). Over many holds each volume still gets its share
/// by weight, and a hold is short enough that no volume runs ahead of the free-space weights.
pub const WRITE_AFFINITY_HOLD: Duration = Duration::from_millis(10);

/// A weighted random choice among writable volumes (or partitions) that sticks for
/// [`WRITE_AFFINITY_HOLD`] while the one chosen stays a candidate.
#[derive(Debug, Default)]
pub struct WriteAffinity {
    held: Mutex<Option<(u32, Instant)>>,
}

impl WriteAffinity {
    /// Among `candidates` (id, weight), the one held if it is still one, else one drawn by
    /// weight (held from now on); `None` when no candidate has a weight.
    pub fn pick(&self, candidates: &[(u32, u64)]) -> Option<u32> {
        self.pick_at(candidates, Instant::now())
    }

    fn pick_at(&self, candidates: &[(u32, u64)], now: Instant) -> Option<u32> {
        let mut held = self.held.lock().expect("affinity lock");
        if let Some((id, until)) = *held {
            if now < until && candidates.iter().any(|&(c, weight)| c == id && weight > 0) {
                return Some(id);
            }
        }
        let id = weighted_pick(candidates)?;
        *held = Some((id, now + WRITE_AFFINITY_HOLD));
        Some(id)
    }
}

/// One of `candidates` (id, weight) at random, each with a chance proportional to its weight.
fn weighted_pick(candidates: &[(u32, u64)]) -> Option<u32> {
    let total: u64 = candidates.iter().map(|&(_, weight)| weight).sum();
    if total == 0 {
        return None;
    }
    let mut pick = rand::rng().random_range(0..total);
    for &(id, weight) in candidates {
        if pick < weight {
            return Some(id);
        }
        pick -= weight;
    }
    unreachable!("the pick is below the total")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pick_is_held_while_it_stays_a_candidate() {
        let affinity = WriteAffinity::default();
        let now = Instant::now();
        let candidates = [(1, 10), (2, 10), (3, 10)];
        let first = affinity.pick_at(&candidates, now).unwrap();
        for ms in [0, 1, 5, 9] {
            assert_eq!(affinity.pick_at(&candidates, now + Duration::from_millis(ms)), Some(first));
        }
        // Excluded (tried and failed) or out of room: never picked again while held.
        let others: Vec<(u32, u64)> = candidates.iter().map(|&(id, w)| (id, if id == first { 0 } else { w })).collect();
        let next = affinity.pick_at(&others, now + Duration::from_millis(1)).unwrap();
        assert_ne!(next, first);
        let without: Vec<(u32, u64)> = others.iter().copied().filter(|&(id, _)| id != next).collect();
        assert_ne!(affinity.pick_at(&without, now + Duration::from_millis(2)), Some(next));
        assert_eq!(affinity.pick_at(&[(7, 0)], now), None);
        assert_eq!(affinity.pick_at(&[], now), None);
    }

    #[test]
    fn over_many_holds_each_candidate_gets_its_share_by_weight() {
        let affinity = WriteAffinity::default();
        let candidates = [(0, 1), (1, 2), (2, 7), (3, 0)];
        let start = Instant::now();
        let mut counts = [0u32; 4];
        let draws = 20_000u32;
        for i in 0..draws {
            let now = start + WRITE_AFFINITY_HOLD * i;
            counts[affinity.pick_at(&candidates, now).unwrap() as usize] += 1;
        }
        assert_eq!(counts[3], 0, "a weight of 0 is never drawn");
        // Binomial standard deviations are below 70 here; 5 of them apart is a broken draw.
        for (id, weight) in [(0usize, 1u32), (1, 2), (2, 7)] {
            let expected = draws * weight / 10;
            assert!(counts[id].abs_diff(expected) < 350, "{id}: {} draws, {expected} expected", counts[id]);
        }
    }
}
