//! Volumes on a disk: `<canonical mount>/cairn/volumes/<name>/`, in the datanode's layout
//! (cairn_common::volume_layout), with every segment preallocated when the volume is made.

use std::path::{Path, PathBuf};

use cairn_common::agent_api::{CreateVolumeRequest, VolumeInfo};
use cairn_common::volume_layout::{self as layout, LayoutError, Preallocation, VolumeMarker};

use crate::identity::cairn_dir;

const VOLUMES_DIR: &str = "volumes";
/// Prefix of a volume directory being deleted (renamed first, so it is never half a volume).
const DELETING_PREFIX: &str = ".deleting-";

pub fn volumes_dir(mount: &str) -> PathBuf {
    cairn_dir(mount).join(VOLUMES_DIR)
}

/// A volume directory found on a disk.
#[derive(Debug, Clone)]
pub struct FoundVolume {
    pub info: VolumeInfo,
    pub marker: VolumeMarker,
    /// Bytes of segment files (active and spare) that are allocated on disk.
    pub segment_bytes: u64,
}

/// What lies in a disk's volumes directory: complete volumes, and leftovers of interrupted
/// creates (no marker) or deletes.
#[derive(Debug, Default)]
pub struct DiskVolumes {
    pub volumes: Vec<FoundVolume>,
    pub leftovers: Vec<PathBuf>,
    pub unreadable: Vec<String>,
}

pub fn scan(mount: &str, disk_id: &str) -> DiskVolumes {
    let mut out = DiskVolumes::default();
    let Ok(entries) = std::fs::read_dir(volumes_dir(mount)) else {
        return out;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(DELETING_PREFIX) || !path.join(layout::MARKER_FILE).exists() {
            out.leftovers.push(path);
            continue;
        }
        match VolumeMarker::read(&path) {
            Ok(marker) => out.volumes.push(FoundVolume {
                info: volume_info(&name, disk_id, &path, &marker),
                segment_bytes: allocated_bytes(&layout::segments_dir(&path))
                    + allocated_bytes(&layout::spares_dir(&path)),
                marker,
            }),
            Err(e) => out.unreadable.push(format!("{name}: {e}")),
        }
    }
    out
}

/// The space a volume holds once all its segments exist.
pub fn promised_bytes(marker: &VolumeMarker) -> u64 {
    u64::from(marker.max_segments()) * marker.segment_size
}

pub use cairn_common::disk_space::allocated_bytes;

pub fn validate(request: &CreateVolumeRequest) -> Result<(), String> {
    if request.segment_size_bytes < layout::MIN_SEGMENT_SIZE {
        return Err(format!(
            "segment_size_bytes {} is below the minimum {}",
            request.segment_size_bytes,
            layout::MIN_SEGMENT_SIZE
        ));
    }
    if request.capacity_bytes == 0 || !request.capacity_bytes.is_multiple_of(request.segment_size_bytes) {
        return Err(format!(
            "capacity_bytes {} must be a positive multiple of segment_size_bytes {}",
            request.capacity_bytes, request.segment_size_bytes
        ));
    }
    Ok(())
}

/// Does an existing volume answer this request exactly (so that a retry is a no-op)?
pub fn matches(found: &FoundVolume, request: &CreateVolumeRequest) -> bool {
    found.info.disk == request.disk
        && found.marker.partition == request.partition
        && found.marker.segment_size == request.segment_size_bytes
        && found.info.capacity_bytes == request.capacity_bytes
}

/// Makes the volume: every segment preallocated, the marker written last. On failure nothing
/// is left behind.
pub fn create(
    mount: &str,
    disk_id: &str,
    name: &str,
    request: &CreateVolumeRequest,
    mode: Preallocation,
) -> Result<VolumeInfo, LayoutError> {
    let dir = volumes_dir(mount).join(name);
    let marker = VolumeMarker {
        preallocated: true,
        ..VolumeMarker::new(request.partition, request.segment_size_bytes, request.capacity_bytes)?
    };
    let result = std::fs::create_dir_all(&dir)
        .map_err(|e| LayoutError::Io { path: dir.clone(), source: e })
        .and_then(|()| layout::create_volume(&dir, &marker, mode));
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    layout::sync_dir(&volumes_dir(mount))?;
    Ok(volume_info(name, disk_id, &dir, &marker))
}

fn volume_info(name: &str, disk_id: &str, dir: &Path, marker: &VolumeMarker) -> VolumeInfo {
    VolumeInfo {
        name: name.to_owned(),
        disk: disk_id.to_owned(),
        path: dir.display().to_string(),
        volume_id: marker.volume_id.clone(),
        partition: marker.partition,
        capacity_bytes: promised_bytes(marker),
        segment_size_bytes: marker.segment_size,
    }
}

/// Removes a volume directory: renamed aside first (one atomic step after which it is no longer
/// a volume), then deleted.
pub fn delete(volume_dir: &Path) -> std::io::Result<()> {
    let parent = volume_dir.parent().expect("volume dirs have a parent");
    let name = volume_dir.file_name().expect("volume dirs have a name").to_string_lossy();
    let aside = parent.join(format!("{DELETING_PREFIX}{name}-{:08x}", rand::random::<u32>()));
    std::fs::rename(volume_dir, &aside)?;
    std::fs::File::open(parent)?.sync_all()?;
    std::fs::remove_dir_all(&aside)
}

/// Removes what an interrupted create or delete left.
pub fn remove_leftover(path: &Path) -> std::io::Result<()> {
    tracing::warn!(path = %path.display(), "removing a volume directory left by an interrupted create or delete");
    std::fs::remove_dir_all(path)
}

/// Gives `dir` and everything under it to `uid`:`gid`, and closes `dir` to everyone else (0700:
/// another cluster's datanode, under another uid, cannot enter it); what already belongs to them
/// is left alone. The walk goes by directory descriptors opened with `O_NOFOLLOW` and changes
/// entries with `AT_SYMLINK_NOFOLLOW`: the files' new owner cannot swap a directory for a symlink
/// mid-walk and have the agent (root) give away what lies outside the volume.
pub fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    use rustix::fs::{Mode, OFlags, CWD};
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(CWD, dir, flags, Mode::empty())?;
    if rustix::fs::fstat(&fd)?.st_mode & 0o7777 != 0o700 {
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700))?;
    }
    chown_dir(fd, uid, gid)
}

fn chown_dir(fd: rustix::fd::OwnedFd, uid: u32, gid: u32) -> std::io::Result<()> {
    use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Uid};
    let (owner, group) = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
    let stat = rustix::fs::fstat(&fd)?;
    if stat.st_uid != uid || stat.st_gid != gid {
        rustix::fs::fchown(&fd, owner, group)?;
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    for entry in rustix::fs::Dir::read_from(&fd)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        let at = rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(at.st_mode) == FileType::Directory {
            chown_dir(rustix::fs::openat(&fd, name, flags, Mode::empty())?, uid, gid)?;
        } else if at.st_uid != uid || at.st_gid != gid {
            rustix::fs::chownat(&fd, name, owner, group, AtFlags::SYMLINK_NOFOLLOW)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    /// Symlinks inside a volume are changed themselves, never what they point to (tests run as
    /// root, as the agent does).
    #[test]
    fn handing_a_volume_over_never_follows_its_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let (volume, outside) = (dir.path().join("v"), dir.path().join("outside"));
        std::fs::create_dir_all(volume.join("segments")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(volume.join("segments/1.seg"), b"x").unwrap();
        std::fs::write(outside.join("secret"), b"root's").unwrap();
        std::os::unix::fs::symlink(&outside, volume.join("link-dir")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), volume.join("segments/link-file")).unwrap();
        super::chown_tree(&volume, 65532, 65532).unwrap();
        for inside in [&volume, &volume.join("segments"), &volume.join("segments/1.seg"), &volume.join("link-dir")] {
            assert_eq!(std::fs::symlink_metadata(inside).unwrap().uid(), 65532, "{}", inside.display());
        }
        assert_eq!(std::fs::metadata(&outside).unwrap().uid(), 0, "a symlinked directory's target is not given away");
        assert_eq!(std::fs::metadata(outside.join("secret")).unwrap().uid(), 0, "nor a symlinked file's");
        assert_eq!(std::fs::metadata(&volume).unwrap().mode() & 0o777, 0o700, "closed to other uids");
        assert_eq!(std::fs::metadata(&outside).unwrap().mode() & 0o777, 0o755, "nothing outside changes mode");
    }
}
