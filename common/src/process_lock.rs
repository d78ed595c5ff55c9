//! An exclusive lock on a file, held by one process at a time (flock), naming its holder's pid.
//! The lock goes with the process: one that is killed holds nothing. Used for a volume (open by
//! one datanode) and for the directory of `cairn local up` (run by one process).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct ProcessLock {
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process (or another open in this one) holds it.
    #[error("{path}: held by {holder}")]
    Held { path: PathBuf, holder: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl ProcessLock {
    /// Takes the lock at `path` (created if missing) without waiting.
    pub fn acquire(path: &Path) -> Result<Self, LockError> {
        let io_error = |source| LockError::Io { path: path.to_owned(), source };
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io_error)?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let holder = std::fs::read_to_string(path).unwrap_or_default().trim().to_owned();
                let holder = if holder.is_empty() { "pid unknown".to_owned() } else { holder };
                return Err(LockError::Held { path: path.to_owned(), holder });
            }
            Err(e) => return Err(io_error(e.into())),
        }
        // Who holds it, for the message others get; best effort.
        let _ = file.set_len(0).and_then(|()| file.write_all_at(format!("pid {}\n", std::process::id()).as_bytes(), 0));
        let _ = file.flush();
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_names_its_holder_and_is_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let lock = ProcessLock::acquire(&path).unwrap();
        match ProcessLock::acquire(&path) {
            Err(LockError::Held { holder, .. }) => assert_eq!(holder, format!("pid {}", std::process::id())),
            other => panic!("a second lock was granted: {other:?}"),
        }
        drop(lock);
        ProcessLock::acquire(&path).unwrap();
    }
}
