//! Disk identity: a file on each disk Cairn uses, and the agent's record of which disk it found
//! at which mount. A disk whose file disagrees with either is refused (DiskConflict), because
//! the volumes on it are not the ones the cluster expects there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cairn_common::volume_layout::write_atomic;
use serde::{Deserialize, Serialize};

/// Cairn's directory on a disk, under its canonical mount.
pub const CAIRN_DIR: &str = "cairn";
const IDENTITY_FILE: &str = "identity.json";
const RECORD_FILE: &str = "disks.json";
const FORMAT: u32 = 1;

pub fn cairn_dir(mount: &str) -> PathBuf {
    Path::new(mount).join(CAIRN_DIR)
}

/// `<mount>/cairn/identity.json`, written when the agent first uses a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIdentity {
    pub format: u32,
    pub disk_id: String,
    /// The filesystem the file was written on; a copy of the file on another filesystem
    /// (a cloned disk with a new UUID, files copied over) no longer matches.
    pub fs_uuid: Option<String>,
    /// The node whose agent wrote it.
    pub node: String,
}

impl DiskIdentity {
    pub fn new(fs_uuid: Option<String>, node: &str) -> Self {
        let disk_id = match &fs_uuid {
            Some(uuid) => uuid.clone(),
            None => format!("{:032x}", rand::random::<u128>()),
        };
        Self { format: FORMAT, disk_id, fs_uuid, node: node.to_owned() }
    }

    pub fn read(mount: &str) -> Result<Option<Self>, String> {
        let path = cairn_dir(mount).join(IDENTITY_FILE);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let identity: Self = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if identity.format != FORMAT {
            return Err(format!("{}: identity format {} is not supported", path.display(), identity.format));
        }
        Ok(Some(identity))
    }

    pub fn write(&self, mount: &str) -> Result<(), String> {
        let dir = cairn_dir(mount);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let body = serde_json::to_vec_pretty(self).expect("identity serializes");
        write_atomic(&dir.join(IDENTITY_FILE), &body).map_err(|e| e.to_string())
    }
}

/// The agent's own record (`<state-dir>/disks.json`): the disk it found at each canonical mount.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedDisks {
    pub format: u32,
    pub disks: BTreeMap<String, RecordedDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedDisk {
    pub disk_id: String,
    pub fs_uuid: Option<String>,
}

impl RecordedDisks {
    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let record = read_state_record(&state_dir.join(RECORD_FILE), |r: &Self| r.format, FORMAT)?;
        Ok(record.unwrap_or(Self { format: FORMAT, disks: BTreeMap::new() }))
    }

    pub fn save(&self, state_dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(state_dir).map_err(|e| anyhow::anyhow!("{}: {e}", state_dir.display()))?;
        let body = serde_json::to_vec_pretty(self).expect("record serializes");
        write_atomic(&state_dir.join(RECORD_FILE), &body)?;
        Ok(())
    }
}

/// Reads a versioned JSON record of the agent's state directory: `None` when there is none, an
/// error when it does not parse or has a format this build does not know.
pub fn read_state_record<T: serde::de::DeserializeOwned>(
    path: &Path,
    format_of: impl Fn(&T) -> u32,
    supported: u32,
) -> anyhow::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(text) => {
            let record: T = serde_json::from_slice(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let format = format_of(&record);
            anyhow::ensure!(format == supported, "{}: format {format} is not supported", path.display());
            Ok(Some(record))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

/// Where the agent records its disks unless told otherwise (`--state-dir`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cairn/disk-agent";

/// The command that accepts a different disk at `mount`, for an agent keeping its record in
/// `state_dir`.
pub fn forget_command(mount: &str, state_dir: Option<&Path>) -> String {
    match state_dir.filter(|d| *d != Path::new(DEFAULT_STATE_DIR)) {
        Some(dir) => format!("cairn-disk-agent forget --mount {mount} --state-dir {}", dir.display()),
        None => format!("cairn-disk-agent forget --mount {mount}"),
    }
}

/// Why a disk with this identity file, at this mount, may not be used; `None` when it may.
/// `state_dir`: where the record is kept, for the command that accepts a replacement.
pub fn conflict(
    mount: &str,
    fs_uuid: Option<&str>,
    identity: Option<&DiskIdentity>,
    recorded: Option<&RecordedDisk>,
    state_dir: Option<&Path>,
) -> Option<String> {
    if let (Some(identity), Some(actual)) = (identity, fs_uuid) {
        if let Some(written_on) = identity.fs_uuid.as_deref().filter(|u| *u != actual) {
            return Some(format!(
                "identity file of disk {} was written on filesystem {written_on}, but {mount} holds filesystem \
                 {actual}: a cloned or copied disk",
                identity.disk_id
            ));
        }
    }
    let recorded = recorded?;
    match identity {
        Some(identity) if identity.disk_id == recorded.disk_id => None,
        Some(identity) => Some(format!(
            "{mount} held disk {}, but the disk mounted there now is {}: wrong disk mounted at this path; \
             if the change is meant, accept it with `{}`",
            recorded.disk_id,
            identity.disk_id,
            forget_command(mount, state_dir)
        )),
        None => Some(format!(
            "{mount} held disk {}, but the disk mounted there now has no Cairn identity: wrong disk mounted or \
             the disk was wiped; if it is a replacement, accept it with `{}`",
            recorded.disk_id,
            forget_command(mount, state_dir)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(id: &str, uuid: Option<&str>) -> DiskIdentity {
        DiskIdentity { format: FORMAT, disk_id: id.into(), fs_uuid: uuid.map(Into::into), node: "n".into() }
    }

    #[test]
    fn conflicts() {
        let rec = RecordedDisk { disk_id: "a".into(), fs_uuid: Some("u1".into()) };
        assert_eq!(conflict("/m", Some("u1"), Some(&identity("a", Some("u1"))), Some(&rec), None), None);
        assert_eq!(conflict("/m", Some("u1"), None, None, None), None, "a new disk");
        let cloned = conflict("/m", Some("u2"), Some(&identity("a", Some("u1"))), None, None).unwrap();
        assert!(cloned.contains("cloned"), "{cloned}");
        let wrong = conflict("/m", Some("u9"), Some(&identity("b", Some("u9"))), Some(&rec), None).unwrap();
        assert!(wrong.contains("wrong disk"), "{wrong}");
        let wiped = conflict("/m", Some("u9"), None, Some(&rec), Some(Path::new(DEFAULT_STATE_DIR))).unwrap();
        assert!(wiped.contains("no Cairn identity"), "{wiped}");
        assert!(wiped.contains("`cairn-disk-agent forget --mount /m`"), "the way out is named: {wiped}");
        let elsewhere = conflict("/m", Some("u9"), None, Some(&rec), Some(Path::new("/srv/state"))).unwrap();
        assert!(elsewhere.contains("`cairn-disk-agent forget --mount /m --state-dir /srv/state`"), "{elsewhere}");
    }

    #[test]
    fn identity_and_record_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().to_str().unwrap();
        assert_eq!(DiskIdentity::read(mount).unwrap(), None);
        let id = DiskIdentity::new(Some("u1".into()), "node-a");
        id.write(mount).unwrap();
        assert_eq!(DiskIdentity::read(mount).unwrap(), Some(id));
        std::fs::write(cairn_dir(mount).join(IDENTITY_FILE), "{").unwrap();
        assert!(DiskIdentity::read(mount).is_err());

        let mut record = RecordedDisks::load(dir.path()).unwrap();
        record.disks.insert("/m".into(), RecordedDisk { disk_id: "a".into(), fs_uuid: None });
        record.save(dir.path()).unwrap();
        assert_eq!(RecordedDisks::load(dir.path()).unwrap(), record);
    }
}
