//! Space on a filesystem as Cairn counts it: what files really hold (st_blocks, so sparse files
//! count as what they use) and what the filesystem can still give an unprivileged writer.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Bytes allocated on disk for everything under `path` (0 when it does not exist).
pub fn allocated_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    let children: u64 =
        std::fs::read_dir(path).map(|entries| entries.flatten().map(|e| allocated_bytes(&e.path())).sum()).unwrap_or(0);
    own + children
}

/// The filesystem that holds `path`, or would hold it once created: the device id and the free
/// bytes (f_bavail) of its nearest existing ancestor.
pub fn filesystem_of(path: &Path) -> std::io::Result<(u64, u64)> {
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let dev = std::fs::metadata(existing)?.dev();
    let s = rustix::fs::statvfs(existing)?;
    let unit = if s.f_frsize > 0 { s.f_frsize } else { s.f_bsize };
    Ok((dev, s.f_bavail * unit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocated_bytes_counts_blocks_not_lengths() {
        let dir = tempfile::tempdir().unwrap();
        let sparse = std::fs::File::create(dir.path().join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        std::fs::write(dir.path().join("full"), vec![1u8; 1 << 20]).unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("full"), vec![1u8; 1 << 20]).unwrap();
        sparse.sync_all().unwrap();
        let total = allocated_bytes(dir.path());
        assert!((2 << 20..(2 << 20) + (1 << 20)).contains(&total), "{total}");
        assert_eq!(allocated_bytes(&dir.path().join("missing")), 0);
    }

    #[test]
    fn a_path_not_yet_created_is_on_its_ancestors_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let (dev, free) = filesystem_of(dir.path()).unwrap();
        assert_eq!(filesystem_of(&dir.path().join("a/b/c")).unwrap().0, dev);
        assert!(free > 0);
    }
}
