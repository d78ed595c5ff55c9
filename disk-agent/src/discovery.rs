//! From mountinfo to disks: leave out what cannot hold volumes, fold every mount of one
//! filesystem into one disk, apply the selector. Every mount that is not used ends up in
//! `excluded` with its reason.
//!
//! Folding: mounts with the same device (major:minor) are one filesystem, whatever their root
//! (bind mounts of subdirectories, the same device mounted twice). Different devices with the same
//! filesystem UUID are one filesystem seen through different device names; without a UUID on
//! both, an equal non-zero f_fsid together with equal block counts is taken as the same hint.

use std::collections::BTreeMap;

use cairn_common::agent_api::ExcludedMount;

use crate::config::CompiledSelector;
use crate::mountinfo::{MountEntry, ParseError};
use crate::probe::{FsStats, Probe};

/// Filesystems that never hold data of their own.
const PSEUDO: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "fusectl",
    "hugetlbfs",
    "mqueue",
    "nsfs",
    "overlay",
    "proc",
    "pstore",
    "ramfs",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "squashfs",
    "sysfs",
    "tracefs",
    "iso9660",
    "fuse.lxcfs",
    "aufs",
    "shiftfs",
    "erofs",
];
/// Filesystems whose space is not on this machine.
const NETWORK: &[&str] = &["nfs", "nfs4", "cifs", "smb3", "ceph", "glusterfs", "9p", "sshfs", "fuse.sshfs", "virtiofs"];

/// One filesystem and all the places it is mounted.
#[derive(Debug, Clone)]
pub struct Disk {
    pub canonical: MountEntry,
    pub aliases: Vec<MountEntry>,
    pub fs_uuid: Option<String>,
    pub stats: FsStats,
}

impl Disk {
    pub fn mounts(&self) -> impl Iterator<Item = &MountEntry> {
        std::iter::once(&self.canonical).chain(self.aliases.iter())
    }
}

#[derive(Debug, Default)]
pub struct Discovery {
    pub disks: Vec<Disk>,
    pub excluded: Vec<ExcludedMount>,
}

/// Records why a mount is not used; a path mounted over several times is said once per reason.
fn exclude(excluded: &mut Vec<ExcludedMount>, mount: &str, reason: impl Into<String>) {
    let entry = ExcludedMount { mount: mount.to_owned(), reason: reason.into() };
    if !excluded.contains(&entry) {
        excluded.push(entry);
    }
}

/// Why a mount cannot hold volumes whatever the selector says, if it cannot.
fn unusable_kind(entry: &MountEntry, selector: &CompiledSelector) -> Option<String> {
    let fs = entry.fs_type.as_str();
    let base = fs.split('.').next().unwrap_or(fs);
    if PSEUDO.contains(&fs) || PSEUDO.contains(&base) {
        return Some(format!("pseudo filesystem ({fs})"));
    }
    if NETWORK.contains(&fs) || NETWORK.contains(&base) {
        return Some(format!("network filesystem ({fs})"));
    }
    if fs == "tmpfs" && !selector.allow_tmpfs {
        return Some("tmpfs (set selector.allow_tmpfs to use it)".into());
    }
    if base == "fuse" {
        return Some(format!("FUSE filesystem ({fs})"));
    }
    None
}

/// Order of preference for the canonical mount: writable, whole filesystem (shortest root),
/// shortest path, then by path, so that the choice is the same on every scan.
fn canonical_order(a: &MountEntry, b: &MountEntry) -> std::cmp::Ordering {
    (a.is_read_only(), a.root.len(), a.mount_point.len(), &a.mount_point, a.mount_id).cmp(&(
        b.is_read_only(),
        b.root.len(),
        b.mount_point.len(),
        &b.mount_point,
        b.mount_id,
    ))
}

pub fn discover(
    entries: Vec<Result<MountEntry, ParseError>>,
    selector: &CompiledSelector,
    probe: &dyn Probe,
) -> Discovery {
    let mut excluded = Vec::new();
    // Mounts hidden under a later mount at the same point are not reachable.
    let mut by_point: BTreeMap<String, MountEntry> = BTreeMap::new();
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                exclude(&mut excluded, &format!("(mountinfo line {})", e.line), format!("unparseable: {}", e.reason));
                continue;
            }
        };
        if let Some(reason) = unusable_kind(&entry, selector) {
            exclude(&mut excluded, &entry.mount_point, reason);
            continue;
        }
        if !probe.visible(&entry.mount_point, &entry.dev()) {
            let reason = format!(
                "not visible to the agent: it sees another filesystem than {} at this path (mount the host's \
                 path into its container)",
                entry.dev()
            );
            exclude(&mut excluded, &entry.mount_point, reason);
            continue;
        }
        if let Some(hidden) = by_point.insert(entry.mount_point.clone(), entry) {
            exclude(&mut excluded, &hidden.mount_point, format!("hidden by a later mount of {} over it", hidden.dev()));
        }
    }

    // Fold by device.
    let mut by_dev: BTreeMap<String, Vec<MountEntry>> = BTreeMap::new();
    for entry in by_point.into_values() {
        by_dev.entry(entry.dev()).or_default().push(entry);
    }
    let mut groups: Vec<(Vec<MountEntry>, Option<String>, FsStats)> = Vec::new();
    for (dev, mut mounts) in by_dev {
        mounts.sort_by(canonical_order);
        let first = &mounts[0];
        let stats = match probe.statvfs(&first.mount_point) {
            Ok(stats) => stats,
            Err(e) => {
                for m in &mounts {
                    exclude(&mut excluded, &m.mount_point, format!("cannot read filesystem figures: {e}"));
                }
                continue;
            }
        };
        let uuid = probe.fs_uuid(&first.source, &dev);
        groups.push((mounts, uuid, stats));
    }

    // Fold different devices that are one filesystem.
    let mut merged: Vec<(Vec<MountEntry>, Option<String>, FsStats)> = Vec::new();
    for (mounts, uuid, stats) in groups {
        let same = merged.iter_mut().find(|(_, other_uuid, other_stats)| match (&uuid, other_uuid) {
            (Some(a), Some(b)) => a == b,
            (None, None) => stats.fsid != 0 && stats.fsid == other_stats.fsid && stats.blocks == other_stats.blocks,
            _ => false,
        });
        match same {
            Some((existing, _, _)) => existing.extend(mounts),
            None => merged.push((mounts, uuid, stats)),
        }
    }

    let mut disks = Vec::new();
    for (mut mounts, fs_uuid, stats) in merged {
        mounts.sort_by(canonical_order);
        let describe = |m: &MountEntry| format!("{} ({} {})", m.mount_point, m.fs_type, m.source);
        let reason = select(&mounts, selector, &stats);
        match reason {
            Err(reason) => {
                for m in &mounts {
                    exclude(&mut excluded, &m.mount_point, reason.clone());
                }
            }
            Ok(canonical_index) => {
                let canonical = mounts.remove(canonical_index);
                tracing::debug!(canonical = %describe(&canonical), aliases = mounts.len(), "disk");
                disks.push(Disk { canonical, aliases: mounts, fs_uuid, stats });
            }
        }
    }
    disks.sort_by(|a, b| a.canonical.mount_point.cmp(&b.canonical.mount_point));
    excluded.sort_by(|a, b| a.mount.cmp(&b.mount));
    Discovery { disks, excluded }
}

/// Applies the selector to one filesystem (its mounts in canonical order): the index of the
/// mount to use, or why none is.
fn select(mounts: &[MountEntry], selector: &CompiledSelector, stats: &FsStats) -> Result<usize, String> {
    let first = &mounts[0];
    let tmpfs_allowed = first.fs_type == "tmpfs" && selector.allow_tmpfs;
    if !tmpfs_allowed && !selector.fs_types.contains(&first.fs_type) {
        return Err(format!("filesystem type {} not in selector.fs_types {:?}", first.fs_type, selector.fs_types));
    }
    if let Some(devices) = &selector.devices {
        if !mounts.iter().any(|m| devices.is_match(&m.source)) {
            return Err(format!("device {} does not match selector.devices", first.source));
        }
    }
    let index = match &selector.mount_paths {
        None => 0,
        Some(paths) => mounts
            .iter()
            .position(|m| paths.is_match(&m.mount_point))
            .ok_or_else(|| "mount path does not match selector.mount_paths".to_string())?,
    };
    if mounts[index].is_read_only() {
        return Err("mounted read-only".into());
    }
    if stats.total_bytes() < selector.min_size {
        return Err(format!(
            "{} is smaller than selector.min_size ({})",
            bytesize::ByteSize(stats.total_bytes()),
            bytesize::ByteSize(selector.min_size)
        ));
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiskSelector;
    use crate::mountinfo;
    use std::collections::HashMap;

    /// Figures for made-up mount points: discovery's folding rules are pure logic over them.
    #[derive(Default)]
    struct Figures {
        stats: HashMap<&'static str, FsStats>,
        uuids: HashMap<&'static str, &'static str>,
        /// Mount points the agent would see another filesystem at.
        hidden: Vec<&'static str>,
    }

    impl Figures {
        fn with(mut self, mount: &'static str, stats: FsStats) -> Self {
            self.stats.insert(mount, stats);
            self
        }
        fn uuid(mut self, source: &'static str, uuid: &'static str) -> Self {
            self.uuids.insert(source, uuid);
            self
        }
    }

    impl Probe for Figures {
        fn statvfs(&self, mount_point: &str) -> Result<FsStats, String> {
            self.stats.get(mount_point).copied().ok_or_else(|| "no such mount".into())
        }
        fn fs_uuid(&self, source: &str, _dev: &str) -> Option<String> {
            self.uuids.get(source).map(|u| u.to_string())
        }
        fn visible(&self, mount_point: &str, _dev: &str) -> bool {
            !self.hidden.contains(&mount_point)
        }
    }

    fn stats(blocks: u64, fsid: u64) -> FsStats {
        FsStats { fragment_size: 4096, blocks, blocks_free: blocks / 2, blocks_available: blocks / 3, fsid }
    }

    #[test]
    fn folds_bind_mounts_and_reports_every_exclusion() {
        let text = "\
22 1 0:21 / /proc rw - proc proc rw
23 1 8:1 / / rw - ext4 /dev/sda1 rw
40 23 8:16 / /mnt/data rw - xfs /dev/sdb rw
41 23 8:16 /sub /var/lib/bind rw - xfs /dev/sdb rw
42 23 8:16 / /mnt/data-again rw - xfs /dev/sdb rw
43 23 0:50 / /run/tmp rw - tmpfs tmpfs rw
44 23 7:0 / /snap/core ro - squashfs /dev/loop0 ro
45 23 8:32 / /mnt/ro ro - ext4 /dev/sdc ro
46 23 8:48 / /mnt/small rw - ext4 /dev/sdd rw
garbage line
";
        let figures = Figures::default()
            .with("/", stats(1 << 20, 1))
            .with("/mnt/data", stats(1 << 22, 2))
            .with("/mnt/ro", stats(1 << 22, 3))
            .with("/mnt/small", stats(16, 4));
        let selector = DiskSelector::default().compile().unwrap();
        let d = discover(mountinfo::parse(text), &selector, &figures);
        let points: Vec<&str> = d.disks.iter().map(|d| d.canonical.mount_point.as_str()).collect();
        assert_eq!(points, vec!["/", "/mnt/data"]);
        let data = &d.disks[1];
        let aliases: Vec<&str> = data.aliases.iter().map(|a| a.mount_point.as_str()).collect();
        assert_eq!(aliases, vec!["/mnt/data-again", "/var/lib/bind"], "root '/' first, then shorter path");
        let reasons: HashMap<&str, &str> = d.excluded.iter().map(|e| (e.mount.as_str(), e.reason.as_str())).collect();
        assert!(reasons["/proc"].contains("pseudo"));
        assert!(reasons["/run/tmp"].contains("tmpfs"));
        assert!(reasons["/snap/core"].contains("pseudo"));
        assert!(reasons["/mnt/ro"].contains("read-only"));
        assert!(reasons["/mnt/small"].contains("smaller"));
        assert!(reasons["(mountinfo line 10)"].contains("unparseable"));
        assert_eq!(d.excluded.len(), 6, "{:?}", d.excluded);
    }

    #[test]
    fn a_mount_the_agent_cannot_see_is_excluded() {
        let text = "\
23 1 8:1 / / rw - ext4 /dev/sda1 rw
40 23 8:16 / /mnt/data rw - xfs /dev/sdb rw
";
        let mut figures = Figures::default().with("/", stats(1 << 22, 1)).with("/mnt/data", stats(1 << 22, 2));
        figures.hidden.push("/");
        let selector = DiskSelector::default().compile().unwrap();
        let d = discover(mountinfo::parse(text), &selector, &figures);
        assert_eq!(d.disks.len(), 1);
        assert_eq!(d.disks[0].canonical.mount_point, "/mnt/data");
        let root = d.excluded.iter().find(|e| e.mount == "/").unwrap();
        assert!(root.reason.starts_with("not visible to the agent"), "{}", root.reason);
    }

    #[test]
    fn a_path_mounted_over_is_excluded_once() {
        let text = "\
30 1 0:60 / /dev/shm rw - tmpfs shm rw
31 30 0:61 / /dev/shm rw - tmpfs tmpfs rw
";
        let selector = DiskSelector::default().compile().unwrap();
        let d = discover(mountinfo::parse(text), &selector, &Figures::default());
        assert_eq!(d.excluded.len(), 1, "{:?}", d.excluded);
    }

    #[test]
    fn selector_picks_the_canonical_mount_among_matching_paths() {
        let text = "\
40 1 8:16 / /mnt/data rw - xfs /dev/sdb rw
41 1 8:16 / /var/lib/kubelet/x rw - xfs /dev/sdb rw
";
        let figures = Figures::default().with("/mnt/data", stats(1 << 22, 2));
        let selector =
            DiskSelector { mount_paths: vec!["/var/lib/kubelet/*".into()], ..Default::default() }.compile().unwrap();
        let d = discover(mountinfo::parse(text), &selector, &figures);
        assert_eq!(d.disks[0].canonical.mount_point, "/var/lib/kubelet/x");
        assert_eq!(d.disks[0].aliases[0].mount_point, "/mnt/data");

        let selector = DiskSelector { devices: vec!["/dev/nvme*".into()], ..Default::default() }.compile().unwrap();
        let d = discover(mountinfo::parse(text), &selector, &figures);
        assert!(d.disks.is_empty());
        assert_eq!(d.excluded.len(), 2);
        assert!(d.excluded.iter().all(|e| e.reason.contains("selector.devices")));
    }

    #[test]
    fn same_fsid_and_size_without_uuid_fold_into_one_disk() {
        let text = "\
40 1 0:51 / /mnt/a rw - btrfs /dev/sdb rw,subvolid=5
41 1 0:52 /home /mnt/b rw - btrfs /dev/sdb rw,subvolid=256
42 1 0:53 / /mnt/c rw - btrfs /dev/sdc rw
";
        let figures = Figures::default()
            .with("/mnt/a", stats(1 << 22, 77))
            .with("/mnt/b", stats(1 << 22, 77))
            .with("/mnt/c", stats(1 << 22, 78));
        let selector = DiskSelector::default().compile().unwrap();
        let d = discover(mountinfo::parse(text), &selector, &figures);
        assert_eq!(d.disks.len(), 2);
        assert_eq!(d.disks[0].aliases.len(), 1);
    }

    #[test]
    fn one_uuid_through_two_device_names_is_one_disk() {
        let text = "\
40 1 7:1 / /mnt/one rw - ext4 /dev/loop1 rw
41 1 7:2 / /mnt/two rw - ext4 /dev/loop2 rw
42 1 7:3 / /mnt/three rw - ext4 /dev/loop3 rw
";
        let figures = Figures::default()
            .with("/mnt/one", stats(1 << 22, 1))
            .with("/mnt/two", stats(1 << 22, 2))
            .with("/mnt/three", stats(1 << 22, 3))
            .uuid("/dev/loop1", "u-1")
            .uuid("/dev/loop2", "u-1")
            .uuid("/dev/loop3", "u-3");
        let selector = DiskSelector::default().compile().unwrap();
        let d = discover(mountinfo::parse(text), &selector, &figures);
        assert_eq!(d.disks.len(), 2);
        assert_eq!(d.disks[0].canonical.mount_point, "/mnt/one");
        assert_eq!(d.disks[0].aliases[0].source, "/dev/loop2");
        assert_eq!(d.disks[0].fs_uuid.as_deref(), Some("u-1"));
    }
}
