//! Open segment files and positioned I/O on them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, IoSlice};
use std::sync::{Arc, RwLock};

use super::chunk_cache::VolumeChunks;

/// The segment files of one volume, shared by the writer, readers and compaction. Readers hold
/// an `Arc<File>`, so a segment that compaction unlinks stays readable until they finish.
pub struct SegmentFiles {
    files: RwLock<BTreeMap<u32, Arc<File>>>,
    /// Verified chunks read from these files, if the node caches them.
    chunks: Option<Arc<VolumeChunks>>,
}

impl SegmentFiles {
    pub fn new(chunks: Option<VolumeChunks>) -> Self {
        Self { files: RwLock::default(), chunks: chunks.map(Arc::new) }
    }

    pub fn chunks(&self) -> Option<Arc<VolumeChunks>> {
        self.chunks.clone()
    }

    pub fn get(&self, segment: u32) -> Option<Arc<File>> {
        self.files.read().expect("segment map lock").get(&segment).cloned()
    }

    pub fn insert(&self, segment: u32, file: File) -> Arc<File> {
        let file = Arc::new(file);
        self.files.write().expect("segment map lock").insert(segment, file.clone());
        file
    }

    /// Forgets a segment that is about to be deleted, with its cached chunks.
    pub fn remove(&self, segment: u32) -> Option<Arc<File>> {
        let file = self.files.write().expect("segment map lock").remove(&segment);
        if let Some(chunks) = &self.chunks {
            chunks.forget_segment(segment);
        }
        file
    }

    pub fn count(&self) -> u32 {
        self.files.read().expect("segment map lock").len() as u32
    }

    pub fn numbers(&self) -> Vec<u32> {
        self.files.read().expect("segment map lock").keys().copied().collect()
    }
}

/// Writes every slice at `offset` onwards, retrying short writes (pwritev).
pub fn write_all_vectored_at(file: &File, mut offset: u64, slices: &[&[u8]]) -> io::Result<()> {
    fail::fail_point!("segment-pwritev", |_| Err(io::Error::from_raw_os_error(rustix::io::Errno::IO.raw_os_error())));
    // IOV_MAX is 1024 on Linux.
    for group in slices.chunks(1024) {
        let mut bufs: Vec<IoSlice<'_>> = group.iter().filter(|s| !s.is_empty()).map(|s| IoSlice::new(s)).collect();
        let mut rest: &mut [IoSlice<'_>] = &mut bufs;
        while !rest.is_empty() {
            let n = rustix::io::pwritev(file, rest, offset).map_err(io::Error::from)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev wrote nothing"));
            }
            offset += n as u64;
            IoSlice::advance_slices(&mut rest, n);
        }
    }
    Ok(())
}

/// Reads exactly `len` bytes at `offset`, into fresh memory that is never zero-filled first
/// (GETs read megabytes at a time; zeroing would double the memory traffic).
pub fn read_at(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        // Extends `buf` by the bytes read; anything read past `len` is truncated below.
        let at = offset + buf.len() as u64;
        let n = rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of a segment"));
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// fdatasync of a segment file.
pub fn sync_segment(file: &File) -> io::Result<()> {
    fail::fail_point!("segment-fdatasync", |_| Err(io::Error::from_raw_os_error(rustix::io::Errno::IO.raw_os_error())));
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectored_write_covers_many_slices() {
        let file = tempfile::tempfile().unwrap();
        let parts: Vec<Vec<u8>> = (0..3000u32).map(|i| vec![(i % 251) as u8; (i % 7) as usize]).collect();
        let slices: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
        write_all_vectored_at(&file, 10, &slices).unwrap();
        let expected: Vec<u8> = parts.concat();
        assert_eq!(read_at(&file, 10, expected.len()).unwrap(), expected);
    }
}
