//! The agent: scans the node, claims disks, creates and deletes volumes. Everything that changes
//! a disk runs under one lock, so concurrent calls see each other's effects in order.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, RwLock};

use cairn_common::agent_api::{
    CreateVolumeRequest, CreateVolumeResponse, DeleteVolumeResponse, DiskCapacity, DiskReport, MissingDisk, MountAlias,
    NodeReport, VolumeInfo,
};
use cairn_common::volume_layout::{LayoutError, Preallocation};

use crate::config::{AgentConfig, CompiledSelector};
use crate::discovery::{discover, Disk};
use crate::error::AgentError;
use crate::identity::{self, cairn_dir, DiskIdentity, RecordedDisk, RecordedDisks};
use crate::metrics::AgentMetrics;
use crate::owners::{Caller, Owners};
use crate::probe::SystemProbe;
use crate::volumes;

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub node_name: String,
    pub mountinfo: PathBuf,
    /// Where the host's `/dev` is seen (`/dev`, or `/host/dev` in a container that keeps its own).
    pub host_dev: PathBuf,
    pub config: AgentConfig,
    /// Where the agent records which disk it found at which mount; `None` records nothing.
    pub state_dir: Option<PathBuf>,
}

pub struct Agent {
    options: AgentOptions,
    selector: CompiledSelector,
    probe: SystemProbe,
    /// Held by everything that changes a disk.
    lock: Mutex<()>,
    /// Changed only under `lock`; read alone (briefly) for what the node socket lists.
    owners: Mutex<Owners>,
    last: RwLock<NodeReport>,
    changed: tokio::sync::Notify,
    pub metrics: AgentMetrics,
}

impl Agent {
    pub fn new(options: AgentOptions) -> anyhow::Result<Self> {
        let selector = options.config.selector.compile().map_err(anyhow::Error::msg)?;
        let probe = SystemProbe::new(&options.host_dev);
        let owners = Owners::load(options.state_dir.as_deref())?;
        Ok(Self {
            options,
            selector,
            probe,
            lock: Mutex::new(()),
            owners: Mutex::new(owners),
            last: RwLock::default(),
            changed: tokio::sync::Notify::new(),
            metrics: AgentMetrics::default(),
        })
    }

    /// Notified after a volume was created or deleted, so the report is published at once.
    pub fn changed(&self) -> &tokio::sync::Notify {
        &self.changed
    }

    pub fn options(&self) -> &AgentOptions {
        &self.options
    }

    /// One report, changing nothing on any disk (`cairn-disk-agent scan`).
    pub fn scan(&self) -> anyhow::Result<NodeReport> {
        let _guard = self.lock.lock().expect("agent lock");
        self.inventory(false)
    }

    /// Scans, claims newly selected disks (identity file, record) and clears leftovers of
    /// interrupted creates and deletes. Returns the report and whether it differs from the last.
    pub fn refresh(&self) -> anyhow::Result<(NodeReport, bool)> {
        let _guard = self.lock.lock().expect("agent lock");
        self.refresh_locked()
    }

    fn refresh_locked(&self) -> anyhow::Result<(NodeReport, bool)> {
        let report = self.inventory(true)?;
        self.metrics.observe(&report);
        let mut last = self.last.write().expect("report lock");
        let changed = *last != report;
        *last = report.clone();
        Ok((report, changed))
    }

    /// The report of the last refresh.
    pub fn report(&self) -> NodeReport {
        self.last.read().expect("report lock").clone()
    }

    /// The report as a datanode on the node socket sees it: only its own cluster's volumes
    /// (none without a credential).
    pub fn report_for(&self, caller: Option<&Caller>) -> NodeReport {
        let mut report = self.report();
        let owners = self.owners.lock().expect("owners lock");
        for disk in &mut report.disks {
            disk.volumes.retain(|v| caller.is_some_and(|c| owners.owns(c, &v.name)));
        }
        report
    }

    pub fn capacity(&self) -> Vec<DiskCapacity> {
        self.report()
            .disks
            .iter()
            .filter(|d| d.usable)
            .map(|d| DiskCapacity {
                id: d.id.clone(),
                total_bytes: d.total_bytes,
                available_bytes: d.available_bytes,
                allocated_bytes: d.allocated_bytes,
                allocatable_bytes: d.allocatable_bytes,
            })
            .collect()
    }

    /// CreateVolume: idempotent by name; never promises more than a disk's allocatable bytes.
    /// `caller` is the datanode on the node socket (`None` on the admin socket): it may ask only
    /// for its own cluster's volumes, and becomes the owner of what it makes. `files_owner`
    /// (uid, gid): a datanode that is not root; the volume's files are made its own, whether
    /// just made or made before (a datanode upgraded to run as non-root).
    pub fn create_volume(
        &self,
        name: &str,
        request: &CreateVolumeRequest,
        caller: Option<&Caller>,
        files_owner: Option<(u32, u32)>,
    ) -> Result<CreateVolumeResponse, AgentError> {
        cairn_common::agent_api::validate_volume_name(name).map_err(AgentError::InvalidRequest)?;
        volumes::validate(request).map_err(AgentError::InvalidRequest)?;
        let _guard = self.lock.lock().expect("agent lock");
        if let Some(caller) = caller {
            self.owners.lock().expect("owners lock").authorize(caller, name, request)?;
        }
        let (report, _) = self.refresh_locked().map_err(|e| AgentError::Internal(format!("{e:#}")))?;
        if let Some(found) = self.find_volume(&report, name) {
            let existing = volumes::scan(&found.1, &found.0.disk).volumes.into_iter().find(|v| v.info.name == name);
            return match existing {
                Some(v) if volumes::matches(&v, request) => {
                    // A volume made before owners were recorded is adopted by its first opener.
                    if let Some(caller) = caller {
                        self.owners.lock().expect("owners lock").record(caller, name)?;
                    }
                    hand_over(&v.info.path, files_owner)?;
                    Ok(CreateVolumeResponse { created: false, volume: v.info })
                }
                _ => Err(AgentError::VolumeExists(format!(
                    "volume {name} already exists on disk {} with partition {}, capacity {} and segment size {}",
                    found.0.disk, found.0.partition, found.0.capacity_bytes, found.0.segment_size_bytes
                ))),
            };
        }
        let disk = report.disks.iter().find(|d| d.id == request.disk).ok_or_else(|| {
            AgentError::UnknownDisk(format!("no disk {} on node {}", request.disk, self.options.node_name))
        })?;
        if let Some(conflict) = &disk.conflict {
            return Err(AgentError::DiskConflict(format!("disk {}: {conflict}", disk.id)));
        }
        if request.capacity_bytes > disk.allocatable_bytes {
            self.metrics.volume_creates("no_capacity");
            return Err(AgentError::InsufficientCapacity(format!(
                "disk {} can promise {} more bytes, asked for {} (available {}, headroom {}, already promised {})",
                disk.id,
                disk.allocatable_bytes,
                request.capacity_bytes,
                disk.available_bytes,
                disk.headroom_bytes,
                disk.allocated_bytes
            )));
        }
        let mode = if self.options.config.zero_fill_fallback {
            Preallocation::FallocateOrZeroFill
        } else {
            Preallocation::Fallocate
        };
        let info = volumes::create(&disk.canonical_mount, &disk.id, name, request, mode).map_err(|e| {
            self.metrics.volume_creates("failed");
            match e {
                LayoutError::NoSpace { .. } => AgentError::InsufficientCapacity(format!("disk {}: {e}", disk.id)),
                LayoutError::FallocateUnsupported { .. } => AgentError::FallocateUnsupported(e.to_string()),
                LayoutError::Geometry(_) => AgentError::InvalidRequest(e.to_string()),
                e => AgentError::Internal(e.to_string()),
            }
        })?;
        self.metrics.volume_creates("created");
        tracing::info!(volume = name, disk = %disk.id, bytes = request.capacity_bytes, "volume created");
        if let Some(caller) = caller {
            self.owners.lock().expect("owners lock").record(caller, name)?;
        }
        hand_over(&info.path, files_owner)?;
        self.refresh_locked().map_err(|e| AgentError::Internal(format!("{e:#}")))?;
        self.changed.notify_one();
        Ok(CreateVolumeResponse { created: true, volume: info })
    }

    /// DeleteVolume: idempotent; `deleted` is false when there was no such volume.
    pub fn delete_volume(&self, name: &str) -> Result<DeleteVolumeResponse, AgentError> {
        cairn_common::agent_api::validate_volume_name(name).map_err(AgentError::InvalidRequest)?;
        let _guard = self.lock.lock().expect("agent lock");
        let (report, _) = self.refresh_locked().map_err(|e| AgentError::Internal(format!("{e:#}")))?;
        let Some((info, _)) = self.find_volume(&report, name) else {
            self.owners.lock().expect("owners lock").forget(name)?;
            return Ok(DeleteVolumeResponse { deleted: false });
        };
        // A datanode holds the volume's lock while it has it open (the lock goes with the
        // process, so a crashed datanode holds nothing). Held here through the delete, so no
        // datanode can open the volume half-way through.
        let path = std::path::Path::new(&info.path);
        let _lock = match cairn_common::volume_layout::VolumeLock::acquire(path) {
            Ok(lock) => lock,
            Err(e @ cairn_common::volume_layout::LayoutError::InUse { .. }) => {
                return Err(AgentError::VolumeInUse(format!("volume {name} is in use and was not deleted: {e}")))
            }
            Err(e) => return Err(AgentError::Internal(format!("locking {}: {e}", info.path))),
        };
        volumes::delete(path).map_err(|e| AgentError::Internal(format!("deleting {}: {e}", info.path)))?;
        self.owners.lock().expect("owners lock").forget(name)?;
        tracing::info!(volume = name, disk = %info.disk, "volume deleted");
        self.refresh_locked().map_err(|e| AgentError::Internal(format!("{e:#}")))?;
        self.changed.notify_one();
        Ok(DeleteVolumeResponse { deleted: true })
    }

    fn find_volume(&self, report: &NodeReport, name: &str) -> Option<(VolumeInfo, String)> {
        report
            .disks
            .iter()
            .find_map(|d| d.volumes.iter().find(|v| v.name == name).map(|v| (v.clone(), d.canonical_mount.clone())))
    }

    /// Builds the report. With `claim`, also writes identity files and the record, and removes
    /// leftovers; without, it only reads.
    fn inventory(&self, claim: bool) -> anyhow::Result<NodeReport> {
        let path = &self.options.mountinfo;
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let discovery = discover(crate::mountinfo::parse(&text), &self.selector, &self.probe);
        let mut recorded = match &self.options.state_dir {
            Some(dir) => RecordedDisks::load(dir)?,
            None => RecordedDisks::default(),
        };
        let mut record_changed = false;
        let mut seen: HashMap<String, String> = HashMap::new();
        let mut disks = Vec::new();
        for disk in &discovery.disks {
            let mount = disk.canonical.mount_point.as_str();
            let (identity, mut conflict) = match DiskIdentity::read(mount) {
                Ok(identity) => {
                    let conflict = identity::conflict(
                        mount,
                        disk.fs_uuid.as_deref(),
                        identity.as_ref(),
                        recorded.disks.get(mount),
                        self.options.state_dir.as_deref(),
                    );
                    (identity, conflict)
                }
                Err(e) => (None, Some(format!("unreadable identity file: {e}"))),
            };
            let mut id = match (&identity, &disk.fs_uuid) {
                (Some(identity), _) => identity.disk_id.clone(),
                (None, Some(uuid)) => uuid.clone(),
                (None, None) => format!("dev-{}-{}", disk.canonical.major, disk.canonical.minor),
            };
            if conflict.is_none() {
                if let Some(other) = seen.get(&id) {
                    conflict = Some(format!("disk identity {id} is also on {other}: a cloned disk"));
                }
            }
            seen.entry(id.clone()).or_insert_with(|| mount.to_owned());
            if claim && conflict.is_none() {
                if identity.is_none() {
                    // The volumes directory comes with the claim, so that a refused create
                    // later leaves nothing behind, not even a directory.
                    let new = DiskIdentity::new(disk.fs_uuid.clone(), &self.options.node_name);
                    let claimed = new
                        .write(mount)
                        .and_then(|()| std::fs::create_dir_all(volumes::volumes_dir(mount)).map_err(|e| e.to_string()));
                    match claimed {
                        Ok(()) => id = new.disk_id,
                        Err(e) => conflict = Some(format!("cannot claim the disk: {e}")),
                    }
                }
                if conflict.is_none() && !recorded.disks.contains_key(mount) {
                    recorded
                        .disks
                        .insert(mount.to_owned(), RecordedDisk { disk_id: id.clone(), fs_uuid: disk.fs_uuid.clone() });
                    record_changed = true;
                }
            }
            disks.push(self.disk_report(disk, id, conflict, claim));
        }
        if record_changed {
            if let Some(dir) = &self.options.state_dir {
                recorded.save(dir)?;
            }
        }
        for directory in &self.options.config.directories {
            disks.push(self.directory_disk(directory, claim, &mut recorded, &mut record_changed));
        }
        if record_changed {
            if let Some(dir) = &self.options.state_dir {
                recorded.save(dir)?;
            }
        }
        // Recorded disks found neither among the mounts nor among the configured directories.
        let missing = recorded
            .disks
            .iter()
            .filter(|(mount, _)| !disks.iter().any(|d| d.canonical_mount == **mount))
            .map(|(mount, r)| MissingDisk { id: r.disk_id.clone(), mount: mount.clone() })
            .collect();
        Ok(NodeReport { disks, excluded: discovery.excluded, missing })
    }

    /// A configured directory as a disk: its capacity is the configured quota, never more than
    /// its filesystem has free (volumes are preallocated, so what one promises leaves the others).
    fn directory_disk(
        &self,
        directory: &crate::config::DirectoryDisk,
        claim: bool,
        recorded: &mut RecordedDisks,
        record_changed: &mut bool,
    ) -> DiskReport {
        let path = directory.path.display().to_string();
        if claim {
            let _ = std::fs::create_dir_all(&directory.path);
        }
        let mut conflict = None;
        let identity = match DiskIdentity::read(&path) {
            Ok(identity) => identity,
            Err(e) => {
                conflict = Some(format!("unreadable identity file: {e}"));
                None
            }
        };
        if conflict.is_none() {
            conflict = identity::conflict(
                &path,
                None,
                identity.as_ref(),
                recorded.disks.get(&path),
                self.options.state_dir.as_deref(),
            );
        }
        let mut id = identity.as_ref().map(|i| i.disk_id.clone()).unwrap_or_default();
        if claim && conflict.is_none() && identity.is_none() {
            let new = DiskIdentity::new(None, &self.options.node_name);
            match new
                .write(&path)
                .and_then(|()| std::fs::create_dir_all(volumes::volumes_dir(&path)).map_err(|e| e.to_string()))
            {
                Ok(()) => id = new.disk_id,
                Err(e) => conflict = Some(format!("cannot claim the directory: {e}")),
            }
        }
        if claim && conflict.is_none() && !recorded.disks.contains_key(&path) {
            recorded.disks.insert(path.clone(), RecordedDisk { disk_id: id.clone(), fs_uuid: None });
            *record_changed = true;
        }
        if id.is_empty() {
            id = format!("dir-{}", path.trim_start_matches('/').replace('/', "-"));
        }
        let found = volumes::scan(&path, &id);
        let quota = directory.capacity.as_u64();
        let fs = crate::probe::statvfs(&directory.path).unwrap_or_default();
        let allocated: u64 = found.volumes.iter().map(|v| v.info.capacity_bytes).sum();
        let pending: u64 = found.volumes.iter().map(|v| v.info.capacity_bytes.saturating_sub(v.segment_bytes)).sum();
        let headroom = self.options.config.headroom.bytes_of(quota);
        let in_quota = quota.saturating_sub(allocated).saturating_sub(headroom);
        let on_fs = fs.available_bytes().saturating_sub(pending);
        if fs.total_bytes() == 0 && conflict.is_none() {
            conflict = Some(format!("{path} does not exist"));
        }
        let usable = conflict.is_none();
        DiskReport {
            id,
            device: "directory".into(),
            dev: String::new(),
            fs_type: "directory".into(),
            fs_uuid: None,
            canonical_mount: path,
            aliases: Vec::new(),
            total_bytes: quota,
            available_bytes: quota.saturating_sub(allocated).min(fs.available_bytes()),
            fs_reserved_bytes: 0,
            used_by_others_bytes: 0,
            headroom_bytes: headroom,
            allocated_bytes: allocated,
            allocatable_bytes: if usable { in_quota.min(on_fs) } else { 0 },
            usable,
            conflict,
            volumes: found.volumes.into_iter().map(|v| v.info).collect(),
        }
    }

    fn disk_report(&self, disk: &Disk, id: String, conflict: Option<String>, claim: bool) -> DiskReport {
        let mount = disk.canonical.mount_point.as_str();
        let found = volumes::scan(mount, &id);
        if claim && conflict.is_none() {
            for leftover in &found.leftovers {
                if let Err(e) = volumes::remove_leftover(leftover) {
                    tracing::warn!(path = %leftover.display(), error = %e, "cannot remove leftover");
                }
            }
        }
        // Fresh figures: claiming the disk just now wrote to it.
        let stats = crate::probe::statvfs(std::path::Path::new(mount)).unwrap_or(disk.stats);
        let total = stats.total_bytes();
        let cairn_bytes = volumes::allocated_bytes(&cairn_dir(mount));
        let allocated: u64 = found.volumes.iter().map(|v| v.info.capacity_bytes).sum();
        // Promised but not yet on disk (a volume whose create was interrupted, an old lazy volume).
        let pending: u64 = found.volumes.iter().map(|v| v.info.capacity_bytes.saturating_sub(v.segment_bytes)).sum();
        let headroom = self.options.config.headroom.bytes_of(total);
        let usable = conflict.is_none();
        let conflict = match (conflict, found.unreadable.is_empty()) {
            (Some(c), _) => Some(c),
            (None, false) => Some(format!("unreadable volume markers: {}", found.unreadable.join("; "))),
            (None, true) => None,
        };
        DiskReport {
            id,
            device: disk.canonical.source.clone(),
            dev: disk.canonical.dev(),
            fs_type: disk.canonical.fs_type.clone(),
            fs_uuid: disk.fs_uuid.clone(),
            canonical_mount: mount.to_owned(),
            aliases: disk
                .aliases
                .iter()
                .map(|a| MountAlias { mount: a.mount_point.clone(), root: a.root.clone(), device: a.source.clone() })
                .collect(),
            total_bytes: total,
            available_bytes: stats.available_bytes(),
            fs_reserved_bytes: stats.fs_reserved_bytes(),
            used_by_others_bytes: (total - stats.free_bytes().min(total)).saturating_sub(cairn_bytes),
            headroom_bytes: headroom,
            allocated_bytes: allocated,
            allocatable_bytes: if usable && conflict.is_none() {
                stats.available_bytes().saturating_sub(headroom).saturating_sub(pending)
            } else {
                0
            },
            usable: usable && conflict.is_none(),
            conflict,
            volumes: found.volumes.into_iter().map(|v| v.info).collect(),
        }
    }
}

/// Makes every file of the volume at `path` (and the directory) belong to `owner`, when given.
fn hand_over(path: &str, owner: Option<(u32, u32)>) -> Result<(), AgentError> {
    let Some((uid, gid)) = owner else { return Ok(()) };
    volumes::chown_tree(std::path::Path::new(path), uid, gid)
        .map_err(|e| AgentError::Internal(format!("handing volume {path} to uid {uid}: {e}")))
}
