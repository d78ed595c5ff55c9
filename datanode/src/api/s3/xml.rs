//! S3's XML bodies: documents written from serde types (quick-xml), request bodies read into them.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::error::S3Error;

/// The namespace of S3's documents.
pub const NAMESPACE: &str = "http://s3.amazonaws.com/doc/2006-03-01/";
/// The largest XML request body read (a DeleteObjects of 1,000 long keys fits).
pub const MAX_REQUEST_BYTES: usize = 2 << 20;

/// `value` as an XML document with its declaration.
pub fn document<T: Serialize>(value: &T) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    quick_xml::se::to_writer(&mut out, value).expect("S3 documents serialize");
    out
}

/// `value` as a document whose root element is `root` (one type for documents that differ only
/// in their root's name).
pub fn document_as<T: Serialize>(root: &str, value: &T) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    quick_xml::se::to_writer_with_root(&mut out, root, value).expect("S3 documents serialize");
    out
}

/// A request body read as `T`, or S3's MalformedXML.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, S3Error> {
    let text = std::str::from_utf8(body).map_err(|_| S3Error::malformed_xml("the XML body is not UTF-8"))?;
    quick_xml::de::from_str(text).map_err(|e| {
        S3Error::malformed_xml(format!(
            "the XML you provided was not well-formed or did not validate against our published schema: {}",
            e.to_string().chars().take(200).collect::<String>()
        ))
    })
}

/// A time as S3's documents write it: `2009-10-12T17:50:30.000Z`.
pub fn timestamp(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64).unwrap_or_default().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// A time as HTTP headers write it (`Last-Modified`).
pub fn http_date(ms: u64) -> String {
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_written_as_s3_writes_them() {
        assert_eq!(timestamp(1_255_369_830_000), "2009-10-12T17:50:30.000Z");
        assert_eq!(http_date(1_255_369_830_999), "Mon, 12 Oct 2009 17:50:30 GMT");
    }
}
