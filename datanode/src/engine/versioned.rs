//! The one encoding of the versioned values the engine and the fronts store (index values, blob
//! metadata, name records, S3 records): a format byte, then postcard. A reader refuses a format
//! it does not know rather than guess.

use serde::de::DeserializeOwned;
use serde::Serialize;

pub fn encode<T: Serialize>(format: u8, value: &T) -> Vec<u8> {
    let mut out = vec![format];
    out.extend(postcard::to_stdvec(value).expect("stored values serialize"));
    out
}

/// `bytes` as a value of `format`, or why not (the caller names what it was reading).
pub fn decode<T: DeserializeOwned>(format: u8, bytes: &[u8]) -> Result<T, String> {
    match bytes.split_first() {
        Some((&f, rest)) if f == format => postcard::from_bytes(rest).map_err(|e| e.to_string()),
        Some((f, _)) => Err(format!("format {f} is not supported by this release")),
        None => Err("empty".into()),
    }
}
