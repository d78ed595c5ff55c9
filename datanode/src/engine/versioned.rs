//! The one encoding of the versioned values the engine and the fronts store (index values, blob
//! metadata, name records, S3 records): a format byte, then postcard. A reader refuses a format
//! it does not know rather than guess.

use serde::{Deserialize, Serialize};

pub fn encode<T: Serialize>(format: u8, value: &T) -> Vec<u8> {
    // Sized first, then written once: growing the buffer as postcard writes copied a value with
    // a few KiB of bytes (an inline S3 object) several times over.
    let size = postcard::experimental::serialized_size(value).expect("stored values serialize");
    let mut out = Vec::with_capacity(1 + size);
    out.push(format);
    postcard::to_extend(value, out).expect("stored values serialize")
}

/// `bytes` as a value of `format`, or why not (the caller names what it was reading).
/// `T` may borrow from `bytes` (strings and byte fields read in place).
pub fn decode<'a, T: Deserialize<'a>>(format: u8, bytes: &'a [u8]) -> Result<T, String> {
    match bytes.split_first() {
        Some((&f, rest)) if f == format => postcard::from_bytes(rest).map_err(|e| e.to_string()),
        Some((f, _)) => Err(format!("format {f} is not supported by this release")),
        None => Err("empty".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        version: u128,
    }

    /// The bytes are postcard's own, after the format byte, written into one exact allocation.
    #[test]
    fn encode_is_the_format_byte_then_postcard_in_one_buffer() {
        for len in [0, 1, 127, 128, 4096, 70_000] {
            let value = Sample { name: "k".repeat(len % 300), bytes: vec![7; len], version: u128::MAX - len as u128 };
            let out = encode(9, &value);
            assert_eq!(out[0], 9);
            assert_eq!(out[1..], postcard::to_stdvec(&value).unwrap()[..]);
            assert_eq!(out.capacity(), out.len(), "sized once");
            assert_eq!(decode::<Sample>(9, &out).unwrap(), value);
        }
    }
}
