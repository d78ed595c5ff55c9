//! Real block devices for tests (run as root): sparse images on loop devices with real
//! filesystems, mounts and bind mounts, all undone when the [`Machine`] is dropped, also when
//! a test panics.

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A scratch directory with the devices and mounts a test made in it.
pub struct Machine {
    pub base: PathBuf,
    _dir: tempfile::TempDir,
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
}

impl Default for Machine {
    fn default() -> Self {
        Self::new()
    }
}

impl Machine {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("cairn-disks-").tempdir_in("/tmp").unwrap();
        Self { base: dir.path().to_owned(), _dir: dir, mounts: Vec::new(), loops: Vec::new() }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.base.join(name)
    }

    /// A loop device over a sparse image of `size` bytes, formatted by `mkfs` with `args`.
    pub fn loop_fs(&mut self, name: &str, size: u64, mkfs: &str, args: &[&str]) -> String {
        let image = self.path(&format!("{name}.img"));
        std::fs::File::create(&image).unwrap().set_len(size).unwrap();
        let dev = sh("losetup", &["-f", "--show", image.to_str().unwrap()]);
        self.loops.push(dev.clone());
        let mut all = args.to_vec();
        all.push(&dev);
        sh(mkfs, &all);
        dev
    }

    /// A loop device over an existing image (a copy of another disk).
    pub fn loop_image(&mut self, image: &Path) -> String {
        let dev = sh("losetup", &["-f", "--show", image.to_str().unwrap()]);
        self.loops.push(dev.clone());
        dev
    }

    pub fn mount(&mut self, source: &str, name: &str, args: &[&str]) -> PathBuf {
        let point = self.path(name);
        std::fs::create_dir_all(&point).unwrap();
        let mut all = args.to_vec();
        all.push(source);
        all.push(point.to_str().unwrap());
        sh("mount", &all);
        self.mounts.push(point.clone());
        point
    }

    pub fn bind(&mut self, from: &Path, name: &str) -> PathBuf {
        self.mount(from.to_str().unwrap(), name, &["--bind"])
    }

    pub fn unmount(&mut self, point: &Path) {
        sh("umount", &[point.to_str().unwrap()]);
        self.mounts.retain(|m| m != point);
    }

    /// A disk agent configuration that selects only this machine's ext4 and xfs mounts.
    pub fn agent_config(&self, extra: &str) -> PathBuf {
        self.agent_config_for(&["ext4", "xfs"], extra)
    }

    /// A disk agent configuration that selects only this machine's mounts of these types.
    pub fn agent_config_for(&self, fs_types: &[&str], extra: &str) -> PathBuf {
        let path = self.path(&format!("agent-{}.yaml", fs_types.join("-")));
        let text = format!(
            "selector:\n  mount_paths: ['{}/*']\n  min_size: 1MiB\n  fs_types: [{}]\n{extra}",
            self.base.display(),
            fs_types.join(", ")
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        for point in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(point).status();
        }
        for dev in self.loops.iter().rev() {
            let _ = Command::new("losetup").arg("-d").arg(dev).status();
        }
    }
}

pub struct Fs {
    pub total: u64,
    pub free: u64,
    pub available: u64,
}

pub fn statvfs(path: &Path) -> Fs {
    let s = rustix::fs::statvfs(path).unwrap();
    Fs { total: s.f_blocks * s.f_frsize, free: s.f_bfree * s.f_frsize, available: s.f_bavail * s.f_frsize }
}

/// Bytes allocated to every file under `path`, as du(1) counts them (blocks, not lengths).
pub fn du(path: &Path) -> u64 {
    let out = sh("du", &["-s", "--block-size=1", path.to_str().unwrap()]);
    out.split_whitespace().next().unwrap().parse().unwrap()
}
