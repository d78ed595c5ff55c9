//! S3's rules for a bucket name, in one place: the S3 front refuses a bucket it would not
//! create, and an access key cannot be granted one (docs/s3.md, docs/security.md).

/// Why `name` is not a bucket name S3 would make (general purpose buckets): 3–63 characters of
/// `a-z0-9.-`, beginning and ending with a letter or digit, no `..`, not shaped like an IP
/// address, none of the reserved prefixes and suffixes. `None`: it is one.
pub fn problem(name: &str) -> Option<&'static str> {
    if !(3..=63).contains(&name.len()) {
        return Some("a bucket name has 3 to 63 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-') {
        return Some("a bucket name has only lower-case letters, digits, dots and hyphens");
    }
    let edge_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !edge_ok(name.as_bytes()[0]) || !edge_ok(name.as_bytes()[name.len() - 1]) {
        return Some("a bucket name begins and ends with a letter or digit");
    }
    if name.contains("..") || name.contains(".-") || name.contains("-.") {
        return Some("a bucket name has no two adjacent periods, nor a period beside a hyphen");
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Some("a bucket name is not an IP address");
    }
    if ["xn--", "sthree-", "amzn-s3-demo-"].iter().any(|p| name.starts_with(p))
        || ["-s3alias", "--ol-s3", "--x-s3", "--table-s3", ".mrap"].iter().any(|s| name.ends_with(s))
    {
        return Some("a bucket name does not use a reserved prefix or suffix");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_follow_s3s_rules() {
        for good in ["abc", "my-bucket.data", "a1b2c3", "x".repeat(63).as_str(), "192.168.5.4x"] {
            assert_eq!(problem(good), None, "{good}");
        }
        for bad in [
            "ab",
            &"x".repeat(64),
            "My-Bucket",
            "-abc",
            "abc-",
            "a..b",
            "a.-b",
            "192.168.5.4",
            "xn--abc",
            "abc-s3alias",
            "a_b",
            "ab c",
            "",
        ] {
            assert!(problem(bad).is_some(), "{bad}");
        }
    }
}
