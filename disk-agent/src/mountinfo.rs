//! `/proc/<pid>/mountinfo` (proc(5)): one line per mount,
//!
//! ```text
//! 36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//! (1)(2) (3)   (4)      (5)        (6)        (7)   (8) (9)    (10)        (11)
//! ```
//!
//! mount id, parent id, major:minor, root (the directory of the filesystem mounted here),
//! mount point, per-mount options, zero or more optional fields (`shared:N`, `master:N`, …)
//! ended by a lone `-`, filesystem type (`type` or `type.subtype`), source, super options.
//! Paths escape space, tab, newline and backslash as octal (`\040`, `\011`, `\012`, `\134`).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    pub major: u32,
    pub minor: u32,
    /// Directory of the filesystem that appears at the mount point, unescaped.
    pub root: String,
    /// Unescaped.
    pub mount_point: String,
    pub mount_options: String,
    pub optional_fields: Vec<String>,
    pub fs_type: String,
    /// Unescaped; `none` or similar for pseudo filesystems.
    pub source: String,
    pub super_options: String,
}

impl MountEntry {
    pub fn dev(&self) -> String {
        format!("{}:{}", self.major, self.minor)
    }

    pub fn is_read_only(&self) -> bool {
        self.mount_options.split(',').any(|o| o == "ro")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based.
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mountinfo line {}: {}", self.line, self.reason)
    }
}

/// Parses every line; a malformed line is returned as an error in its place, so the caller can
/// report it instead of silently dropping a mount.
pub fn parse(text: &str) -> Vec<Result<MountEntry, ParseError>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| parse_line(line).map_err(|reason| ParseError { line: i + 1, reason }))
        .collect()
}

pub fn parse_line(line: &str) -> Result<MountEntry, String> {
    let fields: Vec<&str> = line.split(' ').collect();
    let separator = fields
        .iter()
        .skip(6)
        .position(|f| *f == "-")
        .map(|p| p + 6)
        .ok_or_else(|| "no ' - ' separator after the optional fields".to_string())?;
    if separator < 6 {
        return Err(format!("expected at least 6 fields before the separator, found {separator}"));
    }
    if fields.len() != separator + 4 {
        return Err(format!("expected 3 fields after the separator, found {}", fields.len() - separator - 1));
    }
    let number = |name: &str, s: &str| s.parse::<u32>().map_err(|_| format!("{name} {s:?} is not a number"));
    let (major, minor) = fields[2].split_once(':').ok_or_else(|| format!("major:minor {:?} has no ':'", fields[2]))?;
    let fs_type = fields[separator + 1];
    if fs_type.is_empty() {
        return Err("empty filesystem type".into());
    }
    Ok(MountEntry {
        mount_id: number("mount id", fields[0])?,
        parent_id: number("parent id", fields[1])?,
        major: number("major", major)?,
        minor: number("minor", minor)?,
        root: unescape(fields[3])?,
        mount_point: unescape(fields[4])?,
        mount_options: fields[5].to_owned(),
        optional_fields: fields[6..separator].iter().map(|s| s.to_string()).collect(),
        fs_type: fs_type.to_owned(),
        source: unescape(fields[separator + 2])?,
        super_options: fields[separator + 3].to_owned(),
    })
}

/// Undoes the kernel's octal escapes (`\NNN`); any other backslash is kept as it is.
pub fn unescape(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let value =
                (bytes[i + 1] - b'0') as u32 * 64 + (bytes[i + 2] - b'0') as u32 * 8 + (bytes[i + 3] - b'0') as u32;
            out.push(u8::try_from(value).map_err(|_| format!("escape \\{} is out of range", &s[i + 1..i + 4]))?);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("path {s:?} is not UTF-8 once unescaped"))
}

/// The kernel's escaping, for tests and for writing mountinfo fixtures.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            ' ' => out.push_str("\\040"),
            '\t' => out.push_str("\\011"),
            '\n' => out.push_str("\\012"),
            '\\' => out.push_str("\\134"),
            c => out.push(c),
        }
    }
    out
}

impl fmt::Display for MountEntry {
    /// The entry as the kernel writes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}:{} {} {} {}",
            self.mount_id,
            self.parent_id,
            self.major,
            self.minor,
            escape(&self.root),
            escape(&self.mount_point),
            self.mount_options
        )?;
        for field in &self.optional_fields {
            write!(f, " {field}")?;
        }
        write!(f, " - {} {} {}", self.fs_type, escape(&self.source), self.super_options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_man_page_example_and_real_lines() {
        let e =
            parse_line("36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue").unwrap();
        assert_eq!((e.mount_id, e.parent_id, e.major, e.minor), (36, 35, 98, 0));
        assert_eq!((e.root.as_str(), e.mount_point.as_str()), ("/mnt1", "/mnt/parent"));
        assert_eq!(e.optional_fields, vec!["master:1"]);
        assert_eq!((e.fs_type.as_str(), e.source.as_str()), ("ext3", "/dev/root"));
        assert_eq!(e.super_options, "rw,errors=continue");

        let none = parse_line("22 1 0:21 / /proc rw,nosuid - proc proc rw").unwrap();
        assert!(none.optional_fields.is_empty());
        let many = parse_line("30 22 0:26 / /sys/fs/cgroup rw shared:9 master:3 propagate_from:2 unbindable - cgroup2 cgroup2 rw,nsdelegate").unwrap();
        assert_eq!(many.optional_fields.len(), 4);
        let sub =
            parse_line("40 22 0:40 / /run/user/1000/gvfs rw - fuse.gvfsd-fuse gvfsd-fuse rw,user_id=1000").unwrap();
        assert_eq!(sub.fs_type, "fuse.gvfsd-fuse");
    }

    #[test]
    fn octal_escapes_in_paths_and_source() {
        let e = parse_line(r"50 22 7:3 /data\040dir /mnt/my\040disk\011x rw - ext4 /dev/loop3\134y rw").unwrap();
        assert_eq!(e.root, "/data dir");
        assert_eq!(e.mount_point, "/mnt/my disk\tx");
        assert_eq!(e.source, r"/dev/loop3\y");
        assert_eq!(unescape(r"a\012b").unwrap(), "a\nb");
        assert_eq!(unescape(r"trailing\04").unwrap(), r"trailing\04", "incomplete escape kept");
        assert!(unescape(r"\777").is_err(), "beyond one byte");
    }

    #[test]
    fn malformed_lines_are_errors_with_their_line_number() {
        let text = "22 1 0:21 / /proc rw - proc proc rw\n\
                    garbage\n\
                    23 1 0:22 / /sys rw shared:1 sysfs sysfs rw\n\
                    x 1 0:22 / /sys rw - sysfs sysfs rw\n\
                    24 1 022 / /sys rw - sysfs sysfs rw\n\
                    25 1 0:22 / /sys rw - sysfs sysfs\n";
        let parsed = parse(text);
        assert!(parsed[0].is_ok());
        let errors: Vec<usize> = parsed.iter().filter_map(|r| r.as_ref().err().map(|e| e.line)).collect();
        assert_eq!(errors, vec![2, 3, 4, 5, 6]);
    }

    fn path_strategy() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                Just(' '),
                Just('\t'),
                Just('\n'),
                Just('\\'),
                Just('-'),
                Just('é'),
                proptest::char::range('a', 'z')
            ],
            0..12,
        )
        .prop_map(|chars| format!("/{}", chars.into_iter().collect::<String>()))
    }

    proptest! {
        #[test]
        fn display_then_parse_round_trips(
            ids in (0u32..100_000, 0u32..100_000, 0u32..4096, 0u32..1_048_576),
            root in path_strategy(),
            mount_point in path_strategy(),
            source in path_strategy(),
            optional in proptest::collection::vec("(shared|master|propagate_from):[0-9]{1,4}|unbindable", 0..4),
            fs_type in "[a-z0-9]{1,8}(\\.[a-z]{1,6})?",
        ) {
            let entry = MountEntry {
                mount_id: ids.0, parent_id: ids.1, major: ids.2, minor: ids.3,
                root, mount_point, mount_options: "rw,relatime".into(), optional_fields: optional,
                fs_type, source, super_options: "rw".into(),
            };
            let line = entry.to_string();
            prop_assert!(!line.contains('\n'));
            prop_assert_eq!(parse_line(&line).unwrap(), entry);
        }

        #[test]
        fn arbitrary_input_never_panics(line in "\\PC{0,200}") {
            let _ = parse_line(&line);
            let _ = parse(&line);
        }
    }
}
