//! The agent's configuration file (YAML): which mounts may hold Cairn volumes, how much to keep free.
//!
//! ```yaml
//! selector:
//!   mount_paths: ["/mnt/disks/*", "/var/lib/cairn"]   # globs; default: every path
//!   fs_types: [ext4, xfs]                             # default: ext4, xfs, btrfs
//!   devices: ["/dev/nvme*", "/dev/sd*"]               # globs on the mount source; default: any
//!   min_size: 10GiB                                   # default: 1GiB
//!   allow_tmpfs: false                                # default: false
//! headroom: 5%                                        # or bytes, e.g. 20GiB; default 5%
//! zero_fill_fallback: false                           # write zeros where fallocate is missing
//! directories:                                        # directories as disks, with a quota
//!   - {path: /var/lib/cairn/local/d0, capacity: 2GiB}
//! ```

use std::path::Path;

use bytesize::ByteSize;
use globset::{GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub selector: DiskSelector,
    pub headroom: Headroom,
    pub zero_fill_fallback: bool,
    /// Directories offered as disks with a fixed capacity, for machines without spare disks
    /// (`cairn local up`). Each is its own disk; several may share one filesystem.
    pub directories: Vec<DirectoryDisk>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryDisk {
    pub path: std::path::PathBuf,
    pub capacity: ByteSize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            selector: DiskSelector::default(),
            headroom: Headroom::Percent(5.0),
            zero_fill_fallback: false,
            directories: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiskSelector {
    pub mount_paths: Vec<String>,
    pub fs_types: Vec<String>,
    pub devices: Vec<String>,
    pub min_size: ByteSize,
    pub allow_tmpfs: bool,
}

impl Default for DiskSelector {
    fn default() -> Self {
        Self {
            mount_paths: vec![],
            fs_types: vec!["ext4".into(), "xfs".into(), "btrfs".into()],
            devices: vec![],
            min_size: ByteSize::gib(1),
            allow_tmpfs: false,
        }
    }
}

/// Space left free on every disk: a share of the total, or a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Headroom {
    Percent(f64),
    Bytes(u64),
}

impl Headroom {
    pub fn bytes_of(&self, total: u64) -> u64 {
        match *self {
            Self::Percent(p) => (total as f64 * p / 100.0).ceil() as u64,
            Self::Bytes(b) => b,
        }
    }
}

impl std::str::FromStr for Headroom {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| format!("headroom {s:?}: not a percentage"))?;
            if !(0.0..=100.0).contains(&p) {
                return Err(format!("headroom {s:?}: must be between 0% and 100%"));
            }
            return Ok(Self::Percent(p));
        }
        s.parse::<ByteSize>()
            .map(|b| Self::Bytes(b.as_u64()))
            .map_err(|_| format!("headroom {s:?}: use e.g. 5% or 20GiB"))
    }
}

impl Serialize for Headroom {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Percent(p) => s.serialize_str(&format!("{p}%")),
            Self::Bytes(b) => s.serialize_str(&ByteSize(*b).to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Headroom {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Self::Bytes(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let config: Self = serde_yaml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        config.selector.compile().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(config)
    }
}

/// The selector with its globs compiled.
pub struct CompiledSelector {
    pub mount_paths: Option<GlobSet>,
    pub devices: Option<GlobSet>,
    pub fs_types: Vec<String>,
    pub min_size: u64,
    pub allow_tmpfs: bool,
}

impl DiskSelector {
    pub fn compile(&self) -> Result<CompiledSelector, String> {
        let set = |globs: &[String], what: &str| -> Result<Option<GlobSet>, String> {
            if globs.is_empty() {
                return Ok(None);
            }
            let mut builder = GlobSetBuilder::new();
            for g in globs {
                // '*' must not cross '/', as in a shell.
                let glob = globset::GlobBuilder::new(g)
                    .literal_separator(true)
                    .build()
                    .map_err(|e| format!("{what} glob {g:?}: {e}"))?;
                builder.add(glob);
            }
            builder.build().map(Some).map_err(|e| format!("{what} globs: {e}"))
        };
        Ok(CompiledSelector {
            mount_paths: set(&self.mount_paths, "mount_paths")?,
            devices: set(&self.devices, "devices")?,
            fs_types: self.fs_types.clone(),
            min_size: self.min_size.as_u64(),
            allow_tmpfs: self.allow_tmpfs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file_and_rejects_typos() {
        let c: AgentConfig = serde_yaml::from_str(
            "selector:\n  mount_paths: ['/mnt/*']\n  fs_types: [xfs]\n  min_size: 2GiB\n  allow_tmpfs: true\nheadroom: 10GiB\n",
        )
        .unwrap();
        assert_eq!(c.selector.min_size.as_u64(), 2 << 30);
        assert_eq!(c.headroom, Headroom::Bytes(10 << 30));
        assert!(c.selector.allow_tmpfs);
        let e = serde_yaml::from_str::<AgentConfig>("selector:\n  mount_path: ['/mnt/*']\n").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        assert!(serde_yaml::from_str::<AgentConfig>("headroom: 150%\n").is_err());
        assert!(serde_yaml::from_str::<AgentConfig>("headroom: lots\n").is_err());
    }

    #[test]
    fn the_example_file_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/disk-agent.yaml");
        let c: AgentConfig = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(c.selector.mount_paths, ["/mnt/disks/*"]);
        assert_eq!(c.selector.min_size.as_u64(), 10 << 30);
    }

    #[test]
    fn headroom_figures() {
        assert_eq!("5%".parse::<Headroom>().unwrap().bytes_of(1000), 50);
        assert_eq!("0%".parse::<Headroom>().unwrap().bytes_of(1000), 0);
        assert_eq!("1KiB".parse::<Headroom>().unwrap().bytes_of(10), 1024);
    }

    #[test]
    fn globs_do_not_cross_directories() {
        let s = DiskSelector { mount_paths: vec!["/mnt/*".into()], ..Default::default() }.compile().unwrap();
        let set = s.mount_paths.unwrap();
        assert!(set.is_match("/mnt/a"));
        assert!(!set.is_match("/mnt/a/b"));
        assert!(DiskSelector { devices: vec!["/dev/[".into()], ..Default::default() }.compile().is_err());
    }
}
