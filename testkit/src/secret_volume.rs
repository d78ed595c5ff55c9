//! Secret volumes as the kubelet projects them: the files a `secret` volume source asks for
//! (all keys, or `items` mapped to paths; `defaultMode`/`mode`; `fsGroup` ownership), written
//! the way the kubelet's atomic writer does so that a process never reads half an update:
//!
//! ```text
//! DIR/..2026_12_01_10_40_00.123456789/tls.crt   the files of one version
//! DIR/..data -> ..2026_12_01_10_40_00.123456789 swapped by rename(2) on an update
//! DIR/tls.crt -> ..data/tls.crt                  what the container opens
//! ```
//!
//! A Secret's later changes reach a running Pod's volume (the kubelet's periodic sync); a Secret
//! deleted under a running Pod leaves its files as they were. A missing Secret (or key named in
//! `items`) keeps the Pod in `ContainerCreating`, unless the volume is `optional`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use base64::Engine;
use serde_json::Value;

/// A Secret's data, decoded: by namespace and name, key → bytes.
pub type Secrets = BTreeMap<(String, String), BTreeMap<String, Vec<u8>>>;

/// Decodes listed Secrets (their `data`, base64 as the API serves it).
pub fn decode(secrets: &[Value]) -> Secrets {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    secrets
        .iter()
        .map(|s| {
            let data = s["data"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| {
                    let bytes = base64::engine::general_purpose::STANDARD.decode(text(v)).unwrap_or_default();
                    (k.clone(), bytes)
                })
                .collect();
            ((text(&s["metadata"]["namespace"]), text(&s["metadata"]["name"])), data)
        })
        .collect()
}

/// A file to project: its path in the volume, bytes and mode.
#[derive(Debug, PartialEq, Eq)]
pub struct File {
    pub bytes: Vec<u8>,
    pub mode: u32,
}

/// The files `source` (a volume's `secret`) projects from `secrets` for a Pod in `namespace`;
/// `Ok(None)` for an optional volume whose Secret is missing; `Err` with the kubelet's message
/// when it cannot be mounted (yet).
pub fn files(namespace: &str, source: &Value, secrets: &Secrets) -> Result<Option<BTreeMap<String, File>>, String> {
    let name = source["secretName"].as_str().unwrap_or_default();
    let optional = source["optional"] == true;
    let default_mode = source["defaultMode"].as_u64().unwrap_or(0o644) as u32;
    let Some(data) = secrets.get(&(namespace.to_owned(), name.to_owned())) else {
        return if optional { Ok(None) } else { Err(format!("secret \"{name}\" not found")) };
    };
    let mut out = BTreeMap::new();
    match source["items"].as_array() {
        None => {
            for (key, bytes) in data {
                out.insert(key.clone(), File { bytes: bytes.clone(), mode: default_mode });
            }
        }
        Some(items) => {
            for item in items {
                let key = item["key"].as_str().unwrap_or_default();
                let path = item["path"].as_str().unwrap_or_default();
                if path.is_empty() || path.starts_with('/') || path.split('/').any(|c| c == "..") {
                    return Err(format!("invalid path {path:?} for key {key:?}"));
                }
                match data.get(key) {
                    Some(bytes) => {
                        let mode = item["mode"].as_u64().map_or(default_mode, |m| m as u32);
                        out.insert(path.to_owned(), File { bytes: bytes.clone(), mode });
                    }
                    None if optional => {}
                    None => return Err(format!("couldn't find key {key} in Secret {namespace}/{name}")),
                }
            }
        }
    }
    Ok(Some(out))
}

/// Writes `files` into `dir` as the atomic writer does (see the module), owned by root and, with
/// an `fs_group`, by that group with group read added. Unchanged files: nothing written. Whether
/// anything changed.
pub fn project(dir: &Path, files: &BTreeMap<String, File>, fs_group: Option<u32>) -> std::io::Result<bool> {
    std::fs::create_dir_all(dir)?;
    let data = dir.join("..data");
    let current: BTreeMap<String, File> = match std::fs::read_link(&data) {
        Ok(version) => {
            let mut found = BTreeMap::new();
            read_tree(&dir.join(version), "", &mut found)?;
            found
        }
        Err(_) => BTreeMap::new(),
    };
    let want: BTreeMap<&String, (&[u8], u32)> =
        files.iter().map(|(p, f)| (p, (f.bytes.as_slice(), effective_mode(f.mode, fs_group)))).collect();
    let have: BTreeMap<&String, (&[u8], u32)> =
        current.iter().map(|(p, f)| (p, (f.bytes.as_slice(), f.mode))).collect();
    if data.exists() && want == have {
        return Ok(false);
    }
    let stamp = chrono_like_stamp();
    let version = dir.join(&stamp);
    std::fs::create_dir(&version)?;
    for (path, file) in files {
        let target = version.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&target, &file.bytes)?;
        if let Some(group) = fs_group {
            rustix::fs::chown(&target, None, Some(rustix::fs::Gid::from_raw(group)))?;
        }
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(effective_mode(file.mode, fs_group)))?;
    }
    let old = std::fs::read_link(&data).ok();
    let staged = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&staged);
    std::os::unix::fs::symlink(&stamp, &staged)?;
    std::fs::rename(&staged, &data)?;
    // The names the container opens: one symlink per top-level entry, into `..data`.
    let top: std::collections::BTreeSet<&str> = files.keys().map(|p| p.split('/').next().unwrap_or(p)).collect();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !top.contains(name.as_str()) {
            std::fs::remove_file(entry.path())?;
        }
    }
    for name in top {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link)?;
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old))?;
    }
    Ok(true)
}

fn effective_mode(mode: u32, fs_group: Option<u32>) -> u32 {
    match fs_group {
        Some(_) => mode | 0o440,
        None => mode,
    }
}

fn read_tree(dir: &Path, prefix: &str, out: &mut BTreeMap<String, File>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        let meta = entry.metadata()?;
        if meta.is_dir() {
            read_tree(&entry.path(), &format!("{name}/"), out)?;
        } else {
            out.insert(name, File { bytes: std::fs::read(entry.path())?, mode: meta.permissions().mode() & 0o7777 });
        }
    }
    Ok(())
}

/// `..YYYY_MM_DD_HH_MM_SS.NNNNNNNNN`-like: unique and ordered (the kubelet's names are times).
fn chrono_like_stamp() -> String {
    static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let n = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("..{}.{:09}{n}", now.as_secs(), now.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn secrets() -> Secrets {
        let data =
            BTreeMap::from([("tls.crt".to_string(), b"cert".to_vec()), ("tls.key".to_string(), b"key".to_vec())]);
        BTreeMap::from([(("ns".to_string(), "s".to_string()), data)])
    }

    #[test]
    fn all_keys_or_the_items_asked_for_with_their_modes() {
        let all = files("ns", &json!({"secretName": "s"}), &secrets()).unwrap().unwrap();
        assert_eq!(all.keys().collect::<Vec<_>>(), ["tls.crt", "tls.key"]);
        assert_eq!(all["tls.key"].mode, 0o644);
        let some = json!({"secretName": "s", "defaultMode": 0o440, "items": [{"key": "tls.key", "path": "k/key.pem", "mode": 0o400}, {"key": "tls.crt", "path": "c.pem"}]});
        let some = files("ns", &some, &secrets()).unwrap().unwrap();
        assert_eq!(some["k/key.pem"], File { bytes: b"key".to_vec(), mode: 0o400 });
        assert_eq!(some["c.pem"].mode, 0o440);
    }

    #[test]
    fn a_missing_secret_or_key_keeps_the_pod_waiting_unless_optional() {
        let err = files("other", &json!({"secretName": "s"}), &secrets()).unwrap_err();
        assert_eq!(err, "secret \"s\" not found");
        assert_eq!(files("other", &json!({"secretName": "s", "optional": true}), &secrets()), Ok(None));
        let missing_key = json!({"secretName": "s", "items": [{"key": "ca.crt", "path": "ca.crt"}]});
        assert!(files("ns", &missing_key, &secrets()).is_err());
        let escaping = json!({"secretName": "s", "items": [{"key": "tls.key", "path": "../x"}]});
        assert!(files("ns", &escaping, &secrets()).is_err());
    }

    #[test]
    fn an_update_swaps_all_files_at_once_and_leaves_no_old_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut want = files("ns", &json!({"secretName": "s"}), &secrets()).unwrap().unwrap();
        assert!(project(dir.path(), &want, None).unwrap());
        assert_eq!(std::fs::read(dir.path().join("tls.key")).unwrap(), b"key");
        assert!(std::fs::symlink_metadata(dir.path().join("tls.key")).unwrap().file_type().is_symlink());
        assert!(!project(dir.path(), &want, None).unwrap(), "unchanged: nothing written");
        let first = std::fs::read_link(dir.path().join("..data")).unwrap();
        want.insert("tls.key".into(), File { bytes: b"new key".to_vec(), mode: 0o644 });
        want.remove("tls.crt");
        assert!(project(dir.path(), &want, None).unwrap());
        assert_eq!(std::fs::read(dir.path().join("tls.key")).unwrap(), b"new key");
        assert!(std::fs::symlink_metadata(dir.path().join("tls.crt")).is_err(), "a key gone is gone");
        assert!(!dir.path().join(first).exists(), "the old version is removed");
        let entries: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        assert_eq!(entries.len(), 3, "{entries:?}");
    }

    #[test]
    fn fs_group_owns_the_files_and_may_read_them() {
        let dir = tempfile::tempdir().unwrap();
        let want = BTreeMap::from([("k".to_string(), File { bytes: b"x".to_vec(), mode: 0o400 })]);
        project(dir.path(), &want, Some(65532)).unwrap();
        let meta = std::fs::metadata(dir.path().join("k")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o440);
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 65532);
        assert!(!project(dir.path(), &want, Some(65532)).unwrap());
    }
}
