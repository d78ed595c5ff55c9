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

/// Reads UUIDs from `/dev/disk/by-uuid` when udev maintains it, else asks `blkid -p` (which
/// reads the superblock directly; inside containers there is often no udev).
#[derive(Default)]
pub struct SystemProbe {
    by_uuid: Option<HashMap<String, String>>,
}

impl SystemProbe {
    pub fn new() -> Self {
        Self { by_uuid: read_by_uuid(Path::new("/dev/disk/by-uuid")) }
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

    fn fs_uuid(&self, source: &str, dev: &str) -> Option<String> {
        if let Some(uuid) = self.by_uuid.as_ref().and_then(|m| m.get(dev)) {
            return Some(uuid.clone());
        }
        if !source.starts_with("/dev/") || !Path::new(source).exists() {
            return None;
        }
        let out = Command::new("blkid").args(["-p", "-s", "UUID", "-o", "value", source]).output().ok()?;
        let uuid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !uuid.is_empty()).then_some(uuid)
    }
}
