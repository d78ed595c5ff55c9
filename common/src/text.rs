//! Plain-text tables shared by the command-line tools (`cairn`, `cairn-disk-agent`), so that
//! one concept has one column name and one format everywhere.

use std::fmt::Write;

use crate::agent_api::{DiskReport, ExcludedMount, MissingDisk};

/// Bytes in IEC units: `4.5 GiB`.
pub fn bytes(b: u64) -> String {
    bytesize::ByteSize(b).display().iec().to_string()
}

/// Columns padded to their widest cell; the last column is not padded.
pub fn table(out: &mut String, rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line += cell;
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// Whether an excluded mount is a pseudo filesystem (proc, sysfs, cgroup, …): counted, not listed,
/// unless asked for.
fn is_pseudo(e: &ExcludedMount) -> bool {
    e.reason.starts_with("pseudo filesystem")
}

/// One node's disks: each disk once with its other mounts as aliases, then the excluded mounts
/// with the reason and the disks that went missing. Each line starts with `indent`.
///
/// The space columns: TOTAL the filesystem's size; AVAILABLE what unprivileged writers may still
/// use; FS-RESERVED the blocks the filesystem keeps for root; ALLOCATED what Cairn volumes hold
/// (preallocated); ALLOCATABLE what new volumes may still get.
pub fn disk_table(
    disks: &[DiskReport],
    excluded: &[ExcludedMount],
    missing: &[MissingDisk],
    all: bool,
    indent: &str,
) -> String {
    let mut out = String::new();
    let header = ["DISK", "FS", "MOUNT", "TOTAL", "AVAILABLE", "FS-RESERVED", "ALLOCATED", "ALLOCATABLE", "VOLUMES"];
    let mut rows = vec![header.iter().map(|h| h.to_string()).chain([String::from("ALIASES")]).collect::<Vec<_>>()];
    for d in disks {
        let mut aliases: Vec<String> = d.aliases.iter().map(|a| a.mount.clone()).collect();
        if aliases.is_empty() {
            aliases.push("-".into());
        }
        let mut last = aliases.join(", ");
        if let Some(conflict) = &d.conflict {
            last += &format!("  CONFLICT: {conflict}");
        } else if !d.usable {
            last += "  (not usable)";
        }
        rows.push(vec![
            d.id.clone(),
            d.fs_type.clone(),
            d.canonical_mount.clone(),
            bytes(d.total_bytes),
            bytes(d.available_bytes),
            bytes(d.fs_reserved_bytes),
            bytes(d.allocated_bytes),
            bytes(d.allocatable_bytes),
            d.volumes.len().to_string(),
            last,
        ]);
    }
    let shown: Vec<_> = excluded.iter().filter(|e| all || !is_pseudo(e)).collect();
    let mut notes: Vec<Vec<String>> =
        shown.iter().map(|e| vec!["excluded".into(), e.mount.clone(), e.reason.clone()]).collect();
    notes.extend(missing.iter().map(|m| vec!["missing".into(), m.id.clone(), format!("last seen at {}", m.mount)]));
    for rows in [rows, notes] {
        let mut text = String::new();
        table(&mut text, &rows);
        for line in text.lines() {
            let _ = writeln!(out, "{indent}{line}");
        }
    }
    let hidden = excluded.len() - shown.len();
    if hidden > 0 {
        let _ = writeln!(out, "{indent}({hidden} pseudo filesystem(s) not listed; --all lists them)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_do_not_pad_the_last_column() {
        let mut out = String::new();
        table(&mut out, &[vec!["a".into(), "long".into(), "x".into()], vec!["bbb".into(), "c".into(), "yy".into()]]);
        assert_eq!(out, "a    long  x\nbbb  c     yy\n");
    }

    #[test]
    fn disk_rows_align_whatever_the_id_length_and_pseudo_mounts_are_counted() {
        let disk = |id: &str| DiskReport {
            id: id.into(),
            fs_type: "ext4".into(),
            canonical_mount: format!("/mnt/{id}/cairn"),
            total_bytes: 10 << 30,
            usable: true,
            ..DiskReport::default()
        };
        let excluded = [
            ExcludedMount { mount: "/proc".into(), reason: "pseudo filesystem proc".into() },
            ExcludedMount { mount: "/boot".into(), reason: "not selected".into() },
        ];
        let text = disk_table(&[disk("a"), disk(&"b".repeat(70))], &excluded, &[], false, "  ");
        let lines: Vec<&str> = text.lines().collect();
        let column = |line: &str| line.find("ext4").or_else(|| line.find("FS"));
        assert_eq!(column(lines[0]), column(lines[1]));
        assert_eq!(column(lines[1]), column(lines[2]), "{text}");
        assert!(text.contains("excluded  /boot  not selected"), "{text}");
        assert!(!text.contains("/proc"), "{text}");
        assert!(text.contains("(1 pseudo filesystem(s) not listed; --all lists them)"), "{text}");
        assert!(disk_table(&[], &excluded, &[], true, "").contains("/proc"));
    }
}
