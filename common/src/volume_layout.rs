//! The on-disk layout of a volume, shared by the datanode (which writes into volumes) and the disk
//! agent (which creates them). Every file carries a format version.
//!
//! ```text
//! <volume dir>/
//!   volume.json            marker: format, volume id, partition, geometry (written atomically)
//!   index.redb             index, replication journal, segment table, log tail (datanode)
//!   segments/
//!     00000001.seg         64-byte segment header, then records; preallocated with fallocate
//!     00000002.seg
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::FallocateFlags;
use serde::{Deserialize, Serialize};

pub const MARKER_FILE: &str = "volume.json";
pub const INDEX_FILE: &str = "index.redb";
/// Locked (flock, exclusive) by the process that has the volume open; holds its pid as text.
pub const LOCK_FILE: &str = "volume.lock";
pub const SEGMENTS_DIR: &str = "segments";
pub const SPARES_DIR: &str = "spares";
const SPARE_SUFFIX: &str = ".spare";
const SEGMENT_SUFFIX: &str = ".seg";

/// Version of the marker file and of the directory layout it describes.
pub const VOLUME_FORMAT: u32 = 1;
/// Version of the segment header.
pub const SEGMENT_FORMAT: u32 = 1;
pub const SEGMENT_MAGIC: [u8; 8] = *b"CAIRNSEG";
pub const SEGMENT_HEADER_LEN: u64 = 64;
/// The first segment of a fresh volume.
pub const FIRST_SEGMENT: u32 = 1;

/// Smallest segment we accept: large enough for a header and a handful of small records.
pub const MIN_SEGMENT_SIZE: u64 = 64 * 1024;

// Record geometry: what a segment must hold around a blob's bytes. The record format itself is
// the datanode's (datanode/src/engine/record.rs, which uses these constants); the sizes are here
// so that everything that picks a segment size (`cairn topology apply`, the operator, `cairn
// local up`) checks it the one way the datanode will.

/// Bytes of a record's fixed header.
pub const RECORD_HEADER_LEN: u64 = 61;
/// Payload bytes covered by one chunk checksum (4 bytes each).
pub const RECORD_CHUNK_LEN: u64 = 1 << 20;
/// Upper bound of a record's encoded metadata (content type and user metadata at their limits).
pub const MAX_RECORD_META_LEN: u64 = 32 * 1024;
/// The seal record that ends every segment, and that every segment keeps room for.
pub const SEAL_RECORD_LEN: u64 = RECORD_HEADER_LEN + 4 + 4;
/// The largest blob when a cluster does not say: 64 MiB, or what its segments hold if less.
pub const DEFAULT_MAX_BLOB_SIZE: u64 = 64 << 20;

/// The largest record a blob of `payload` bytes can need (metadata at its limit).
pub fn max_record_len(payload: u64) -> u64 {
    RECORD_HEADER_LEN + MAX_RECORD_META_LEN + payload + 4 * payload.div_ceil(RECORD_CHUNK_LEN) + 4
}

/// The largest blob whose record fits in a segment of `segment_size` bytes (beside the segment
/// header and the seal record); 0 when not even an empty one does.
pub fn largest_blob_for_segment(segment_size: u64) -> u64 {
    let room = segment_size.saturating_sub(SEGMENT_HEADER_LEN + SEAL_RECORD_LEN);
    if max_record_len(0) > room {
        return 0;
    }
    // Start below the answer (every chunk costs 4 bytes of checksum) and step up.
    let mut payload = (room - max_record_len(0)).saturating_sub(4 * room.div_ceil(RECORD_CHUNK_LEN));
    while max_record_len(payload + 1) <= room {
        payload += 1;
    }
    payload
}

/// Checks that volumes of this geometry can be opened by a datanode accepting blobs up to
/// `max_blob` bytes: the volume holds at least one segment and whole segments, and a segment
/// holds the largest record.
pub fn check_geometry(volume_size: u64, segment_size: u64, max_blob: u64) -> Result<(), LayoutError> {
    if segment_size < MIN_SEGMENT_SIZE {
        return Err(LayoutError::Geometry(format!(
            "segment size {segment_size} is below the minimum of {MIN_SEGMENT_SIZE} bytes"
        )));
    }
    if volume_size < segment_size || !volume_size.is_multiple_of(segment_size) {
        return Err(LayoutError::Geometry(format!(
            "volume size {volume_size} must be a whole number (at least one) of segments of {segment_size} bytes"
        )));
    }
    let fits = largest_blob_for_segment(segment_size);
    if max_blob > fits {
        return Err(LayoutError::Geometry(format!(
            "a {max_blob}-byte blob needs a {}-byte record, but segments of {segment_size} bytes hold blobs of at \
             most {fits} bytes; use larger segments or a smaller maximum blob size",
            max_record_len(max_blob)
        )));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a Cairn volume marker: {reason}")]
    BadMarker { path: PathBuf, reason: String },
    #[error("{path}: volume format {found} is not supported (this build reads format {VOLUME_FORMAT})")]
    UnsupportedFormat { path: PathBuf, found: u32 },
    #[error("{path}: bad segment header: {reason}")]
    BadSegmentHeader { path: PathBuf, reason: String },
    #[error("invalid volume geometry: {0}")]
    Geometry(String),
    #[error("{path}: the filesystem does not support fallocate (enable the zero-fill fallback to use it anyway)")]
    FallocateUnsupported { path: PathBuf },
    #[error("{path}: no space left to preallocate {bytes} bytes")]
    NoSpace { path: PathBuf, bytes: u64 },
    #[error("{path}: the volume is open in another process ({holder}); stop it first")]
    InUse { path: PathBuf, holder: String },
}

impl LayoutError {
    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io { path: path.to_owned(), source }
    }

    /// Out of disk space (or quota).
    pub fn is_no_space(&self) -> bool {
        match self {
            LayoutError::NoSpace { .. } => true,
            LayoutError::Io { source, .. } => [rustix::io::Errno::NOSPC, rustix::io::Errno::DQUOT]
                .map(|e| Some(e.raw_os_error()))
                .contains(&source.raw_os_error()),
            _ => false,
        }
    }

    /// Trouble that passes by itself: no disk space, no file descriptors left (process or
    /// system). Worth trying again later, never a reason to fail a volume for good.
    pub fn is_transient(&self) -> bool {
        self.is_no_space()
            || matches!(self, LayoutError::Io { source, .. }
                if [rustix::io::Errno::MFILE, rustix::io::Errno::NFILE].map(|e| Some(e.raw_os_error())).contains(&source.raw_os_error()))
    }
}

/// Contents of `volume.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMarker {
    pub format: u32,
    /// Random 128-bit id as 32 hex digits; also written into every segment header.
    pub volume_id: String,
    pub partition: u32,
    pub segment_size: u64,
    /// Most bytes the volume's segments may occupy together.
    pub capacity_bytes: u64,
    /// Every segment was preallocated when the volume was made (by the disk agent): segments
    /// that compaction frees are kept as spares, so the volume's space stays reserved. Otherwise
    /// segments are allocated as the log grows and freed ones go back to the filesystem.
    #[serde(default)]
    pub preallocated: bool,
}

impl VolumeMarker {
    pub fn new(partition: u32, segment_size: u64, capacity_bytes: u64) -> Result<Self, LayoutError> {
        let marker = Self {
            format: VOLUME_FORMAT,
            volume_id: format!("{:032x}", rand::random::<u128>()),
            partition,
            segment_size,
            capacity_bytes,
            preallocated: false,
        };
        marker.validate_geometry()?;
        Ok(marker)
    }

    pub fn validate_geometry(&self) -> Result<(), LayoutError> {
        if self.segment_size < MIN_SEGMENT_SIZE {
            return Err(LayoutError::Geometry(format!(
                "segment size {} is below the minimum {MIN_SEGMENT_SIZE}",
                self.segment_size
            )));
        }
        if self.capacity_bytes < self.segment_size {
            return Err(LayoutError::Geometry(format!(
                "capacity {} is smaller than one segment ({})",
                self.capacity_bytes, self.segment_size
            )));
        }
        Ok(())
    }

    /// How many segment files the volume may hold at once.
    pub fn max_segments(&self) -> u32 {
        u32::try_from(self.capacity_bytes / self.segment_size).unwrap_or(u32::MAX)
    }

    pub fn volume_id_u128(&self) -> u128 {
        u128::from_str_radix(&self.volume_id, 16).unwrap_or(0)
    }

    pub fn read(dir: &Path) -> Result<Self, LayoutError> {
        let path = dir.join(MARKER_FILE);
        let text = fs::read(&path).map_err(|e| LayoutError::io(&path, e))?;
        // Check the format before the rest, so that a newer marker gets the right message.
        #[derive(Deserialize)]
        struct Probe {
            format: u32,
        }
        let probe: Probe = serde_json::from_slice(&text)
            .map_err(|e| LayoutError::BadMarker { path: path.clone(), reason: e.to_string() })?;
        if probe.format != VOLUME_FORMAT {
            return Err(LayoutError::UnsupportedFormat { path, found: probe.format });
        }
        let marker: Self = serde_json::from_slice(&text)
            .map_err(|e| LayoutError::BadMarker { path: path.clone(), reason: e.to_string() })?;
        if u128::from_str_radix(&marker.volume_id, 16).is_err() || marker.volume_id.len() != 32 {
            return Err(LayoutError::BadMarker { path, reason: "volume_id is not 32 hex digits".into() });
        }
        marker.validate_geometry()?;
        Ok(marker)
    }

    /// Writes the marker atomically.
    pub fn write(&self, dir: &Path) -> Result<(), LayoutError> {
        let mut body = serde_json::to_vec_pretty(self).expect("marker serializes");
        body.push(b'\n');
        write_atomic(&dir.join(MARKER_FILE), &body)
    }
}

/// The fixed header at the start of every segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub volume_id: u128,
    pub segment: u32,
    pub segment_size: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN as usize] {
        let mut b = [0u8; SEGMENT_HEADER_LEN as usize];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&SEGMENT_FORMAT.to_le_bytes());
        b[12..16].copy_from_slice(&self.segment.to_le_bytes());
        b[16..32].copy_from_slice(&self.volume_id.to_le_bytes());
        b[32..40].copy_from_slice(&self.segment_size.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; SEGMENT_HEADER_LEN as usize]) -> Result<Self, String> {
        if b[0..8] != SEGMENT_MAGIC {
            return Err("wrong magic".into());
        }
        let crc = u32::from_le_bytes(b[60..64].try_into().expect("4 bytes"));
        if crc != crc32c::crc32c(&b[..60]) {
            return Err("checksum mismatch".into());
        }
        let format = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if format != SEGMENT_FORMAT {
            return Err(format!("segment format {format} is not supported"));
        }
        Ok(Self {
            segment: u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")),
            volume_id: u128::from_le_bytes(b[16..32].try_into().expect("16 bytes")),
            segment_size: u64::from_le_bytes(b[32..40].try_into().expect("8 bytes")),
        })
    }
}

/// How to reserve space for a segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// fallocate(2); a filesystem without it is an error.
    #[default]
    Fallocate,
    /// fallocate(2), or writing zeros where the filesystem lacks it (slow; opt-in).
    FallocateOrZeroFill,
}

pub fn spares_dir(volume_dir: &Path) -> PathBuf {
    volume_dir.join(SPARES_DIR)
}

fn spare_path(volume_dir: &Path, spare: u32) -> PathBuf {
    spares_dir(volume_dir).join(format!("{spare:08}{SPARE_SUFFIX}"))
}

/// Numbers of the spare files of a volume, ascending.
pub fn spare_files(volume_dir: &Path) -> Result<Vec<u32>, LayoutError> {
    let dir = spares_dir(volume_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LayoutError::io(&dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LayoutError::io(&dir, e))?;
        let name = entry.file_name();
        let digits = name.to_str().and_then(|n| n.strip_suffix(SPARE_SUFFIX));
        if let Some(n) = digits.filter(|d| d.len() == 8).and_then(|d| d.parse().ok()) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

pub fn segments_dir(volume_dir: &Path) -> PathBuf {
    volume_dir.join(SEGMENTS_DIR)
}

pub fn segment_path(volume_dir: &Path, segment: u32) -> PathBuf {
    segments_dir(volume_dir).join(format!("{segment:08}{SEGMENT_SUFFIX}"))
}

/// Parses a segment file name back into its number; `None` for anything else.
pub fn parse_segment_file_name(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Reserves `len` bytes for `file` without changing what reads return (zeros).
pub fn preallocate(file: &File, path: &Path, len: u64, mode: Preallocation) -> Result<(), LayoutError> {
    match rustix::fs::fallocate(file, FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::NOSPC) => Err(LayoutError::NoSpace { path: path.to_owned(), bytes: len }),
        Err(rustix::io::Errno::OPNOTSUPP) if mode == Preallocation::FallocateOrZeroFill => {
            zero_fill(file, path, 0, len)
        }
        Err(rustix::io::Errno::OPNOTSUPP) => Err(LayoutError::FallocateUnsupported { path: path.to_owned() }),
        Err(e) => Err(LayoutError::io(path, e.into())),
    }
}

/// Makes `[offset, offset+len)` read as zeros again while keeping it allocated: used to erase a
/// torn tail. Tries ZERO_RANGE, then PUNCH_HOLE followed by a fresh fallocate (tmpfs), then
/// plain writes.
pub fn zero_range(file: &File, path: &Path, offset: u64, len: u64) -> Result<(), LayoutError> {
    if len == 0 {
        return Ok(());
    }
    if rustix::fs::fallocate(file, FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE, offset, len).is_ok() {
        return Ok(());
    }
    if rustix::fs::fallocate(file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len).is_ok() {
        return match rustix::fs::fallocate(file, FallocateFlags::KEEP_SIZE, offset, len) {
            Ok(()) | Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
            Err(rustix::io::Errno::NOSPC) => Err(LayoutError::NoSpace { path: path.to_owned(), bytes: len }),
            Err(e) => Err(LayoutError::io(path, e.into())),
        };
    }
    zero_fill(file, path, offset, len)
}

fn zero_fill(file: &File, path: &Path, offset: u64, len: u64) -> Result<(), LayoutError> {
    const CHUNK: usize = 1 << 20;
    let zeros = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = CHUNK.min((len - done) as usize);
        file.write_all_at(&zeros[..n], offset + done).map_err(|e| match e.raw_os_error() {
            Some(code) if code == rustix::io::Errno::NOSPC.raw_os_error() => {
                LayoutError::NoSpace { path: path.to_owned(), bytes: len }
            }
            _ => LayoutError::io(path, e),
        })?;
        done += n as u64;
    }
    Ok(())
}

/// Creates segment file `segment`: preallocated to the full segment size, header written and
/// synced, directory entry synced. Leaves nothing behind on failure.
pub fn create_segment(
    volume_dir: &Path,
    marker: &VolumeMarker,
    segment: u32,
    mode: Preallocation,
) -> Result<File, LayoutError> {
    let path = segment_path(volume_dir, segment);
    if let Some(&spare) = spare_files(volume_dir)?.first() {
        // A spare is preallocated and reads as zeros: renaming it is the allocation.
        if path.exists() {
            return Err(LayoutError::io(&path, io::Error::from(io::ErrorKind::AlreadyExists)));
        }
        fs::rename(spare_path(volume_dir, spare), &path).map_err(|e| LayoutError::io(&path, e))?;
        let opened = (|| {
            sync_dir(&spares_dir(volume_dir))?;
            let file = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| LayoutError::io(&path, e))?;
            let header =
                SegmentHeader { volume_id: marker.volume_id_u128(), segment, segment_size: marker.segment_size };
            file.write_all_at(&header.encode(), 0).map_err(|e| LayoutError::io(&path, e))?;
            file.sync_all().map_err(|e| LayoutError::io(&path, e))?;
            sync_dir(&segments_dir(volume_dir))?;
            Ok(file)
        })();
        if opened.is_err() {
            // Out of file descriptors, say: the spare goes back, so the volume keeps its room.
            // Its header is zeros again or was never written; a spare with a header is erased
            // like any retired segment on the next open.
            let _ = fs::rename(&path, spare_path(volume_dir, spare));
        }
        return opened;
    }
    let result = (|| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| LayoutError::io(&path, e))?;
        preallocate(&file, &path, marker.segment_size, mode)?;
        let header = SegmentHeader { volume_id: marker.volume_id_u128(), segment, segment_size: marker.segment_size };
        file.write_all_at(&header.encode(), 0).map_err(|e| LayoutError::io(&path, e))?;
        file.sync_all().map_err(|e| LayoutError::io(&path, e))?;
        sync_dir(&segments_dir(volume_dir))?;
        Ok(file)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&path);
    }
    result
}

/// Opens an existing segment file and checks that its header belongs to this volume.
pub fn open_segment(volume_dir: &Path, marker: &VolumeMarker, segment: u32) -> Result<File, LayoutError> {
    let path = segment_path(volume_dir, segment);
    let file = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| LayoutError::io(&path, e))?;
    let mut buf = [0u8; SEGMENT_HEADER_LEN as usize];
    file.read_exact_at(&mut buf, 0).map_err(|e| LayoutError::io(&path, e))?;
    let header =
        SegmentHeader::decode(&buf).map_err(|reason| LayoutError::BadSegmentHeader { path: path.clone(), reason })?;
    let expected = (marker.volume_id_u128(), segment, marker.segment_size);
    if (header.volume_id, header.segment, header.segment_size) != expected {
        return Err(LayoutError::BadSegmentHeader {
            path,
            reason: format!(
                "header says volume {:032x} segment {} size {}, expected volume {} segment {segment} size {}",
                header.volume_id, header.segment, header.segment_size, marker.volume_id, marker.segment_size
            ),
        });
    }
    Ok(file)
}

/// Gives up a segment that nothing refers to any more (compacted away, or created by a roll that
/// never committed). In a preallocated volume it is erased and kept as a spare, so the space stays
/// reserved and the next segment costs no allocation; otherwise the file is deleted.
pub fn retire_segment(volume_dir: &Path, marker: &VolumeMarker, segment: u32) -> Result<(), LayoutError> {
    let path = segment_path(volume_dir, segment);
    if !path.exists() {
        return Ok(());
    }
    if marker.preallocated {
        let file = OpenOptions::new().write(true).open(&path).map_err(|e| LayoutError::io(&path, e))?;
        // Erased before it is renamed: a spare never holds records that could parse later.
        zero_range(&file, &path, 0, marker.segment_size)?;
        file.sync_all().map_err(|e| LayoutError::io(&path, e))?;
        fs::create_dir_all(spares_dir(volume_dir)).map_err(|e| LayoutError::io(volume_dir, e))?;
        let spare = (1..).find(|n| !spare_path(volume_dir, *n).exists()).expect("a free spare number");
        fs::rename(&path, spare_path(volume_dir, spare)).map_err(|e| LayoutError::io(&path, e))?;
        sync_dir(&spares_dir(volume_dir))?;
    } else {
        fs::remove_file(&path).map_err(|e| LayoutError::io(&path, e))?;
    }
    sync_dir(&segments_dir(volume_dir))
}

/// Creates a volume directory: first segment, then (for a preallocated volume) every other
/// segment the capacity allows as a spare, then the marker. Idempotent for an identical marker,
/// so a retried create never allocates twice; refuses a directory that holds a different volume.
/// A create interrupted before the marker leaves files that the retry reuses or replaces.
pub fn create_volume(volume_dir: &Path, marker: &VolumeMarker, mode: Preallocation) -> Result<(), LayoutError> {
    marker.validate_geometry()?;
    if volume_dir.join(MARKER_FILE).exists() {
        let existing = VolumeMarker::read(volume_dir)?;
        if existing != *marker {
            return Err(LayoutError::BadMarker {
                path: volume_dir.join(MARKER_FILE),
                reason: format!("directory already holds volume {}", existing.volume_id),
            });
        }
    } else {
        fs::create_dir_all(segments_dir(volume_dir)).map_err(|e| LayoutError::io(volume_dir, e))?;
        if segment_path(volume_dir, FIRST_SEGMENT).exists() {
            // Left by a create that failed before writing the marker: nothing references it.
            fs::remove_file(segment_path(volume_dir, FIRST_SEGMENT)).map_err(|e| LayoutError::io(volume_dir, e))?;
        }
        create_segment(volume_dir, marker, FIRST_SEGMENT, mode)?;
        if marker.preallocated {
            // Numbered so that a retry after a crash tops the set up instead of adding to it.
            fs::create_dir_all(spares_dir(volume_dir)).map_err(|e| LayoutError::io(volume_dir, e))?;
            for spare in 1..marker.max_segments() {
                let path = spare_path(volume_dir, spare);
                let file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(|e| LayoutError::io(&path, e))?;
                preallocate(&file, &path, marker.segment_size, mode)?;
                file.sync_all().map_err(|e| LayoutError::io(&path, e))?;
            }
            sync_dir(&spares_dir(volume_dir))?;
        }
        // The marker goes last: a directory with a marker is a complete volume.
        marker.write(volume_dir)?;
    }
    Ok(())
}

/// Replaces `path` with `body` so that a crash leaves the old or the new file, never a mix:
/// temp file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, body: &[u8]) -> Result<(), LayoutError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut file = File::create(&tmp).map_err(|e| LayoutError::io(&tmp, e))?;
    file.write_all(body).map_err(|e| LayoutError::io(&tmp, e))?;
    file.sync_all().map_err(|e| LayoutError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| LayoutError::io(path, e))?;
    sync_dir(dir)
}

/// The exclusive lock on a volume: held by whoever has it open (a datanode) or is deleting it
/// (the disk agent), released when dropped or when the process dies, so a crashed datanode
/// never leaves its volumes locked.
#[derive(Debug)]
pub struct VolumeLock {
    _lock: crate::process_lock::ProcessLock,
}

impl VolumeLock {
    /// Takes the lock without waiting; `InUse` (naming the holder's pid) if another process, or
    /// another open of this volume, holds it.
    pub fn acquire(volume_dir: &Path) -> Result<Self, LayoutError> {
        use crate::process_lock::{LockError, ProcessLock};
        match ProcessLock::acquire(&volume_dir.join(LOCK_FILE)) {
            Ok(lock) => Ok(Self { _lock: lock }),
            Err(LockError::Held { path, holder }) => Err(LayoutError::InUse { path, holder }),
            Err(LockError::Io { path, source }) => Err(LayoutError::Io { path, source }),
        }
    }
}

pub fn sync_dir(dir: &Path) -> Result<(), LayoutError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| LayoutError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::MetadataExt;

    proptest! {
        /// A segment header: any 64 bytes decode to an error or a header, never a panic; any
        /// valid header round-trips, and any one bit flipped in it is refused.
        #[test]
        fn segment_headers_round_trip_and_refuse_any_flip(bytes in any::<[u8; 64]>(), volume_id in any::<u128>(),
                                                          segment in any::<u32>(), segment_size in any::<u64>(),
                                                          bit in 0usize..512) {
            let _ = SegmentHeader::decode(&bytes);
            let header = SegmentHeader { volume_id, segment, segment_size };
            let mut b = header.encode();
            prop_assert_eq!(SegmentHeader::decode(&b), Ok(header));
            b[bit / 8] ^= 1 << (bit % 8);
            // Bytes 40..60 are reserved (zero) and covered by the checksum too.
            prop_assert!(SegmentHeader::decode(&b).is_err());
        }
    }

    #[test]
    fn segment_header_round_trip_and_corruption() {
        let h = SegmentHeader { volume_id: 0xdead_beef, segment: 9, segment_size: 1 << 20 };
        let mut b = h.encode();
        assert_eq!(SegmentHeader::decode(&b).unwrap(), h);
        b[13] ^= 1;
        assert!(SegmentHeader::decode(&b).unwrap_err().contains("checksum"));
    }

    #[test]
    fn segment_names() {
        assert_eq!(parse_segment_file_name("00000012.seg"), Some(12));
        assert_eq!(parse_segment_file_name("12.seg"), None);
        assert_eq!(parse_segment_file_name("0000001x.seg"), None);
        assert_eq!(parse_segment_file_name("00000012.seg.tmp"), None);
    }

    #[test]
    fn create_volume_preallocates_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("v");
        let marker = VolumeMarker::new(3, 1 << 20, 8 << 20).unwrap();
        create_volume(&vol, &marker, Preallocation::Fallocate).unwrap();
        create_volume(&vol, &marker, Preallocation::Fallocate).unwrap();
        assert_eq!(VolumeMarker::read(&vol).unwrap(), marker);
        let meta = fs::metadata(segment_path(&vol, FIRST_SEGMENT)).unwrap();
        assert_eq!(meta.len(), 1 << 20);
        assert!(meta.blocks() * 512 >= 1 << 20, "segment is preallocated");
        open_segment(&vol, &marker, FIRST_SEGMENT).unwrap();

        let other = VolumeMarker::new(3, 1 << 20, 8 << 20).unwrap();
        assert!(create_volume(&vol, &other, Preallocation::Fallocate).is_err());
        assert!(open_segment(&vol, &other, FIRST_SEGMENT).is_err(), "header names another volume");
    }

    #[test]
    fn preallocated_volume_reserves_its_capacity_and_recycles_segments() {
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("v");
        let marker = VolumeMarker { preallocated: true, ..VolumeMarker::new(0, 1 << 20, 4 << 20).unwrap() };
        let allocated = |vol: &Path| -> u64 {
            [segments_dir(vol), spares_dir(vol)]
                .iter()
                .filter_map(|d| fs::read_dir(d).ok())
                .flatten()
                .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
                .sum()
        };
        create_volume(&vol, &marker, Preallocation::Fallocate).unwrap();
        assert_eq!(spare_files(&vol).unwrap(), vec![1, 2, 3]);
        assert!(allocated(&vol) >= 4 << 20, "whole capacity allocated");
        create_volume(&vol, &marker, Preallocation::Fallocate).unwrap();
        assert_eq!(spare_files(&vol).unwrap().len(), 3, "idempotent");

        // A segment taken from the spares reads as zeros past its header.
        let file = create_segment(&vol, &marker, 2, Preallocation::Fallocate).unwrap();
        assert_eq!(spare_files(&vol).unwrap().len(), 2);
        file.write_all_at(&[9u8; 4096], SEGMENT_HEADER_LEN).unwrap();
        open_segment(&vol, &marker, 2).unwrap();
        // Retired: erased and back among the spares; the space stays allocated.
        retire_segment(&vol, &marker, 2).unwrap();
        assert!(!segment_path(&vol, 2).exists());
        assert_eq!(spare_files(&vol).unwrap().len(), 3);
        assert!(allocated(&vol) >= 4 << 20);
        let file = create_segment(&vol, &marker, 3, Preallocation::Fallocate).unwrap();
        let mut buf = vec![1u8; 4096];
        file.read_exact_at(&mut buf, SEGMENT_HEADER_LEN).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "recycled segment was erased");

        // A volume that grows on demand gives retired segments back to the filesystem.
        let lazy_dir = dir.path().join("lazy");
        let lazy = VolumeMarker::new(0, 1 << 20, 4 << 20).unwrap();
        create_volume(&lazy_dir, &lazy, Preallocation::Fallocate).unwrap();
        create_segment(&lazy_dir, &lazy, 2, Preallocation::Fallocate).unwrap();
        retire_segment(&lazy_dir, &lazy, 2).unwrap();
        assert!(spare_files(&lazy_dir).unwrap().is_empty());
        assert!(allocated(&lazy_dir) < 2 << 20);
    }

    #[test]
    fn marker_rejects_future_format_and_bad_geometry() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(MARKER_FILE), r#"{"format": 2}"#).unwrap();
        assert!(matches!(VolumeMarker::read(dir.path()), Err(LayoutError::UnsupportedFormat { found: 2, .. })));
        assert!(VolumeMarker::new(0, 1024, 1 << 20).is_err());
        assert!(VolumeMarker::new(0, 1 << 20, 1 << 19).is_err());
    }

    #[test]
    fn zero_range_erases_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        preallocate(&file, &path, 1 << 16, Preallocation::Fallocate).unwrap();
        file.write_all_at(&[7u8; 8192], 0).unwrap();
        zero_range(&file, &path, 4096, 8192).unwrap();
        let mut buf = vec![0u8; 8192];
        file.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 7));
        assert!(buf[4096..].iter().all(|&b| b == 0));
        assert_eq!(file.metadata().unwrap().len(), 1 << 16);
    }

    #[test]
    fn a_volume_lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let lock = VolumeLock::acquire(dir.path()).unwrap();
        match VolumeLock::acquire(dir.path()) {
            Err(LayoutError::InUse { holder, .. }) => assert_eq!(holder, format!("pid {}", std::process::id())),
            other => panic!("a second lock was granted: {other:?}"),
        }
        drop(lock);
        VolumeLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn the_largest_blob_exactly_fills_a_segment() {
        for segment in [MIN_SEGMENT_SIZE, 1 << 20, (1 << 20) + 12345, 8 << 20, 1 << 30] {
            let largest = largest_blob_for_segment(segment);
            let room = segment - SEGMENT_HEADER_LEN - SEAL_RECORD_LEN;
            assert!(max_record_len(largest) <= room, "{segment}");
            assert!(max_record_len(largest + 1) > room, "{segment}: {largest} is not the largest");
            check_geometry(segment * 4, segment, largest).unwrap();
            assert!(check_geometry(segment * 4, segment, largest + 1).is_err());
        }
        assert_eq!(largest_blob_for_segment(1000), 0);
        assert!(check_geometry(1 << 20, 2 << 20, 1).is_err(), "volume smaller than a segment");
        assert!(check_geometry(3 << 20, 2 << 20, 1).is_err(), "volume not whole segments");
        assert!(check_geometry(1 << 20, 1 << 10, 1).is_err(), "segment below the minimum");
    }
}
