//! What the agent asks the running system: filesystem figures (statvfs) and filesystem UUIDs.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

/// statvfs(3) of a mounted filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsStats {
    /// f_frsize: the unit of the block counts.
    pub fragment_size: u64,
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_available: u64,
    pub fsid: u64,
}

impl FsStats {
    pub fn total_bytes(&self) -> u64 {
        self.blocks * self.fragment_size
    }
    pub fn free_bytes(&self) -> u64 {
        self.blocks_free * self.fragment_size
    }
    pub fn available_bytes(&self) -> u64 {
        self.blocks_available * self.fragment_size
    }
    /// Blocks only root may use: f_bfree − f_bavail.
    pub fn fs_reserved_bytes(&self) -> u64 {
        self.blocks_free.saturating_sub(self.blocks_available) * self.fragment_size
    }
}

/// The system as discovery sees it; [`SystemProbe`] asks the kernel and blkid.
pub trait Probe {
    fn statvfs(&self, mount_point: &str) -> Result<FsStats, String>;
    /// The filesystem UUID of the device `source` (`major:minor` = `dev`), if it has one.
    fn fs_uuid(&self, source: &str, dev: &str) -> Option<String>;
    /// Whether the filesystem mountinfo puts at `mount_point` (device `dev`) is the one this
    /// process sees there. In a container reading the host's mountinfo, a host mount that is not
    /// mounted into the container shows another filesystem at the same path (the container's
    /// own root, say): its figures and files would be the wrong ones.
    fn visible(&self, mount_point: &str, dev: &str) -> bool;
}

pub fn statvfs(path: &Path) -> Result<FsStats, String> {
    let s = rustix::fs::statvfs(path).map_err(|e| format!("statvfs {}: {e}", path.display()))?;
    Ok(FsStats {
        fragment_size: if s.f_frsize > 0 { s.f_frsize } else { s.f_bsize },
        blocks: s.f_blocks,
        blocks_free: s.f_bfree,
        blocks_available: s.f_bavail,
        fsid: s.f_fsid,
    })
}

/// Reads UUIDs from `<dev>/disk/by-uuid` when udev maintains it, else asks `blkid -p` (which
/// reads the superblock directly; inside containers there is often no udev). `dev` is where the
/// host's `/dev` is (`--host-dev`: `/host/dev` in the chart, so that the container keeps its own
/// `/dev`); device paths from mountinfo (`/dev/…`) are read under it.
#[derive(Default)]
pub struct SystemProbe {
    by_uuid: Option<HashMap<String, String>>,
    host_dev: std::path::PathBuf,
}

impl SystemProbe {
    pub fn new(host_dev: &Path) -> Self {
        Self { by_uuid: read_by_uuid(&host_dev.join("disk/by-uuid")), host_dev: host_dev.to_owned() }
    }
}

fn read_by_uuid(dir: &Path) -> Option<HashMap<String, String>> {
    let mut map = HashMap::new();
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let Ok(meta) = std::fs::metadata(entry.path()) else { continue };
        use std::os::unix::fs::MetadataExt;
        let rdev = meta.rdev();
        let dev = format!("{}:{}", rustix::fs::major(rdev), rustix::fs::minor(rdev));
        map.insert(dev, entry.file_name().to_string_lossy().into_owned());
    }
    Some(map)
}

impl Probe for SystemProbe {
    fn statvfs(&self, mount_point: &str) -> Result<FsStats, String> {
        statvfs(Path::new(mount_point))
    }

    fn visible(&self, mount_point: &str, dev: &str) -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(mount_point)
            .is_ok_and(|m| format!("{}:{}", rustix::fs::major(m.dev()), rustix::fs::minor(m.dev())) == dev)
    }

    fn fs_uuid(&self, source: &str, dev: &str) -> Option<String> {
        if let Some(uuid) = self.by_uuid.as_ref().and_then(|m| m.get(dev)) {
            return Some(uuid.clone());
        }
        let device = self.host_dev.join(source.strip_prefix("/dev/")?);
        if !device.exists() {
            return None;
        }
        let out = Command::new("blkid").args(["-p", "-s", "UUID", "-o", "value"]).arg(&device).output().ok()?;
        let uuid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !uuid.is_empty()).then_some(uuid)
    }
}
