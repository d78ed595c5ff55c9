//! Blob identifiers.
//!
//! A blob id is 21 bytes — a format version, the partition id (u32, big endian) and 128 bits —
//! written as 28 characters of unpadded URL-safe base64. The parser is strict: one canonical
//! spelling per id, so ids can be compared as strings.
//!
//! Version 1 is a blob's id (128 random bits). Version 2 is a *name record*'s id: its 128 bits
//! are a digest of the name and version it records (an object name of the S3 front), so every
//! replica gives the same record the same id. Name ids are the storage's own: the blob API
//! refuses them.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// The format of a blob's id.
pub const BLOB_ID_VERSION: u8 = 1;
/// The format of a name record's id.
pub const NAME_ID_VERSION: u8 = 2;
/// Encoded length in bytes.
pub const BLOB_ID_BYTES: usize = 21;
/// Length of the textual form.
pub const BLOB_ID_CHARS: usize = 28;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId {
    partition: u32,
    random: u128,
    name: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobIdError {
    #[error("a blob id has {BLOB_ID_CHARS} characters, this one has {0}")]
    Length(usize),
    #[error("a blob id is URL-safe base64 without padding")]
    Alphabet,
    #[error("unknown blob id version {0}")]
    Version(u8),
}

impl BlobId {
    pub fn new(partition: u32, random: u128) -> Self {
        Self { partition, random, name: false }
    }

    /// The id of a name record in `partition`, `digest` naming the record.
    pub fn name(partition: u32, digest: u128) -> Self {
        Self { partition, random: digest, name: true }
    }

    /// Whether this is a name record's id rather than a blob's.
    pub fn is_name(&self) -> bool {
        self.name
    }

    /// A fresh id in `partition`, with 128 bits from the OS-seeded thread RNG.
    pub fn generate(partition: u32) -> Self {
        Self::new(partition, rand::random())
    }

    pub fn partition(&self) -> u32 {
        self.partition
    }

    pub fn to_bytes(&self) -> [u8; BLOB_ID_BYTES] {
        let mut out = [0u8; BLOB_ID_BYTES];
        out[0] = if self.name { NAME_ID_VERSION } else { BLOB_ID_VERSION };
        out[1..5].copy_from_slice(&self.partition.to_be_bytes());
        out[5..].copy_from_slice(&self.random.to_be_bytes());
        out
    }

    pub fn from_bytes(bytes: &[u8; BLOB_ID_BYTES]) -> Result<Self, BlobIdError> {
        let name = match bytes[0] {
            BLOB_ID_VERSION => false,
            NAME_ID_VERSION => true,
            other => return Err(BlobIdError::Version(other)),
        };
        let partition = u32::from_be_bytes(bytes[1..5].try_into().expect("4 bytes"));
        let random = u128::from_be_bytes(bytes[5..].try_into().expect("16 bytes"));
        Ok(Self { partition, random, name })
    }
}

impl FromStr for BlobId {
    type Err = BlobIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != BLOB_ID_CHARS {
            return Err(BlobIdError::Length(s.len()));
        }
        // The engine rejects padding and non-zero trailing bits, so every id has one spelling.
        let decoded = URL_SAFE_NO_PAD.decode(s).map_err(|_| BlobIdError::Alphabet)?;
        let bytes: [u8; BLOB_ID_BYTES] = decoded.try_into().map_err(|_| BlobIdError::Alphabet)?;
        Self::from_bytes(&bytes)
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.to_bytes()))
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({self})")
    }
}

impl serde::Serialize for BlobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for BlobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn text_round_trip(partition: u32, random: u128) {
            let id = BlobId::new(partition, random);
            let text = id.to_string();
            prop_assert_eq!(text.len(), BLOB_ID_CHARS);
            prop_assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            prop_assert_eq!(text.parse::<BlobId>().unwrap(), id);
            // What the OpenAPI document says of an id: `^A[Q-Za-f][A-Za-z0-9_-]{26}$` (version 1).
            let b = text.as_bytes();
            prop_assert!(b[0] == b'A' && (b[1].is_ascii_uppercase() && b[1] >= b'Q' || (b'a'..=b'f').contains(&b[1])));
        }

        #[test]
        fn ids_outside_the_documented_pattern_are_refused_or_name_ids(second in "[A-Pg-z0-9_-]", rest in "[A-Za-z0-9_-]{26}") {
            let text = format!("A{second}{rest}");
            if let Ok(id) = text.parse::<BlobId>() {
                prop_assert!(id.is_name(), "{} is a blob id outside the pattern", text);
            }
        }

        #[test]
        fn name_ids_round_trip_apart_from_blob_ids(partition: u32, digest: u128) {
            let name = BlobId::name(partition, digest);
            let parsed: BlobId = name.to_string().parse().unwrap();
            prop_assert!(parsed.is_name());
            prop_assert_eq!(parsed, name);
            prop_assert_ne!(name, BlobId::new(partition, digest));
            prop_assert_eq!(BlobId::from_bytes(&name.to_bytes()).unwrap(), name);
        }

        #[test]
        fn parser_never_panics_and_accepts_only_canonical(s in "\\PC{0,40}") {
            if let Ok(id) = s.parse::<BlobId>() {
                prop_assert_eq!(id.to_string(), s);
            }
        }
    }

    #[test]
    fn rejects_malformed_ids() {
        let good = BlobId::new(7, 42).to_string();
        assert_eq!("".parse::<BlobId>(), Err(BlobIdError::Length(0)));
        assert_eq!(good[..27].parse::<BlobId>(), Err(BlobIdError::Length(27)));
        let mut bad_char = good.clone();
        bad_char.replace_range(3..4, "+");
        assert_eq!(bad_char.parse::<BlobId>(), Err(BlobIdError::Alphabet));
        let mut bytes = BlobId::new(7, 42).to_bytes();
        bytes[0] = 3;
        let v3 = URL_SAFE_NO_PAD.encode(bytes);
        assert_eq!(v3.parse::<BlobId>(), Err(BlobIdError::Version(3)));
        // 21 bytes encode to 28 characters with no spare bits, so no non-canonical form exists;
        // padding is still refused by length.
        assert!(format!("{}=", &good[..27]).parse::<BlobId>().is_err());
    }

    #[test]
    fn partition_is_encoded() {
        let id = BlobId::generate(123_456);
        assert_eq!(id.partition(), 123_456);
        assert_ne!(BlobId::generate(1), BlobId::generate(1));
    }
}
