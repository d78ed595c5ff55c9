//! The checksums of S3's flexible-checksum feature (CRC32, CRC32C, CRC64NVME, SHA-1, SHA-256),
//! and MD5 for `Content-MD5` and ETags: computed as the body streams, compared with what the
//! client sent (a header, or a trailer of an `aws-chunked` body), stored with the object.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use md5::Md5;
use serde::{Deserialize, Serialize};
use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::error::S3Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algorithm {
    Crc32,
    Crc32c,
    Crc64Nvme,
    Sha1,
    Sha256,
}

const CRC64_NVME: crc::Crc<u64, crc::Table<16>> = crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_NVME);

impl Algorithm {
    pub const ALL: [Algorithm; 5] =
        [Algorithm::Crc32, Algorithm::Crc32c, Algorithm::Crc64Nvme, Algorithm::Sha1, Algorithm::Sha256];

    /// The name S3 uses (`x-amz-sdk-checksum-algorithm`, `ChecksumAlgorithm`).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Crc32 => "CRC32",
            Algorithm::Crc32c => "CRC32C",
            Algorithm::Crc64Nvme => "CRC64NVME",
            Algorithm::Sha1 => "SHA1",
            Algorithm::Sha256 => "SHA256",
        }
    }

    /// The header (and trailer) that carries the value.
    pub fn header(self) -> &'static str {
        match self {
            Algorithm::Crc32 => "x-amz-checksum-crc32",
            Algorithm::Crc32c => "x-amz-checksum-crc32c",
            Algorithm::Crc64Nvme => "x-amz-checksum-crc64nvme",
            Algorithm::Sha1 => "x-amz-checksum-sha1",
            Algorithm::Sha256 => "x-amz-checksum-sha256",
        }
    }

    pub fn from_name(name: &str) -> Result<Self, S3Error> {
        Self::ALL.into_iter().find(|a| a.name().eq_ignore_ascii_case(name)).ok_or_else(|| {
            S3Error::invalid_request(format!(
                "checksum algorithm {:?} is not supported (CRC32, CRC32C, CRC64NVME, SHA1, SHA256)",
                name.chars().take(40).collect::<String>()
            ))
        })
    }

    pub fn from_header(header: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.header().eq_ignore_ascii_case(header))
    }

    fn digest_len(self) -> usize {
        match self {
            Algorithm::Crc32 | Algorithm::Crc32c => 4,
            Algorithm::Crc64Nvme => 8,
            Algorithm::Sha1 => 20,
            Algorithm::Sha256 => 32,
        }
    }

    pub fn hasher(self) -> Hasher {
        match self {
            Algorithm::Crc32 => Hasher::Crc32(crc32fast::Hasher::new()),
            Algorithm::Crc32c => Hasher::Crc32c(0),
            Algorithm::Crc64Nvme => Hasher::Crc64Nvme(CRC64_NVME.digest()),
            Algorithm::Sha1 => Hasher::Sha1(Sha1::new()),
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
        }
    }
}

pub enum Hasher {
    Crc32(crc32fast::Hasher),
    Crc32c(u32),
    Crc64Nvme(crc::Digest<'static, u64, crc::Table<16>>),
    Sha1(Sha1),
    Sha256(Sha256),
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Crc32(h) => h.update(data),
            Hasher::Crc32c(c) => *c = crc32c::crc32c_append(*c, data),
            Hasher::Crc64Nvme(h) => h.update(data),
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Vec<u8> {
        match self {
            Hasher::Crc32(h) => h.finalize().to_be_bytes().to_vec(),
            Hasher::Crc32c(c) => c.to_be_bytes().to_vec(),
            Hasher::Crc64Nvme(h) => h.finalize().to_be_bytes().to_vec(),
            Hasher::Sha1(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
        }
    }
}

/// A checksum of an object: the algorithm and its digest (shown base64-encoded, as S3 does).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checksum {
    pub algorithm: Algorithm,
    pub digest: Vec<u8>,
}

impl Checksum {
    pub fn parse(algorithm: Algorithm, text: &str) -> Result<Self, S3Error> {
        let digest =
            BASE64.decode(text.trim()).ok().filter(|d| d.len() == algorithm.digest_len()).ok_or_else(|| {
                S3Error::invalid_request(format!("value for {} header is invalid", algorithm.header()))
            })?;
        Ok(Self { algorithm, digest })
    }

    pub fn text(&self) -> String {
        BASE64.encode(&self.digest)
    }
}

/// Everything computed over a body as it streams: its MD5 (the ETag), its SHA-256 when the
/// signature covers it, and the flexible checksum the client asked for.
pub struct BodyDigests {
    md5: Md5,
    sha256: Option<Sha256>,
    checksum: Option<Hasher>,
    pub algorithm: Option<Algorithm>,
    pub len: u64,
}

impl BodyDigests {
    pub fn new(sha256: bool, algorithm: Option<Algorithm>) -> Self {
        Self {
            md5: Md5::new(),
            sha256: sha256.then(Sha256::new),
            checksum: algorithm.map(Algorithm::hasher),
            algorithm,
            len: 0,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.md5.update(data);
        if let Some(h) = &mut self.sha256 {
            h.update(data);
        }
        if let Some(h) = &mut self.checksum {
            h.update(data);
        }
        self.len += data.len() as u64;
    }

    pub fn finish(self) -> FinishedDigests {
        FinishedDigests {
            md5: self.md5.finalize().into(),
            sha256: self.sha256.map(|h| h.finalize().into()),
            checksum: match (self.algorithm, self.checksum) {
                (Some(algorithm), Some(h)) => Some(Checksum { algorithm, digest: h.finish() }),
                _ => None,
            },
            len: self.len,
        }
    }
}

pub struct FinishedDigests {
    pub md5: [u8; 16],
    pub sha256: Option<[u8; 32]>,
    pub checksum: Option<Checksum>,
    pub len: u64,
}

/// `Content-MD5`: base64 of 16 bytes, or S3's InvalidDigest.
pub fn parse_content_md5(text: &str) -> Result<[u8; 16], S3Error> {
    BASE64
        .decode(text.trim())
        .ok()
        .and_then(|d| <[u8; 16]>::try_from(d).ok())
        .ok_or_else(|| S3Error::invalid_digest("the Content-MD5 you specified was invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Oracles: the check values of each CRC's catalogue entry (over "123456789"), and digests
    /// from the AWS SDKs' own test suites for "Hello world".
    #[test]
    fn each_algorithm_matches_its_published_check_value() {
        let digest = |a: Algorithm, data: &[u8]| {
            let mut h = a.hasher();
            // Split in two: a streamed body arrives in pieces.
            h.update(&data[..3]);
            h.update(&data[3..]);
            h.finish()
        };
        assert_eq!(digest(Algorithm::Crc32, b"123456789"), 0xCBF4_3926u32.to_be_bytes());
        assert_eq!(digest(Algorithm::Crc32c, b"123456789"), 0xE306_9283u32.to_be_bytes());
        assert_eq!(digest(Algorithm::Crc64Nvme, b"123456789"), 0xAE8B_1486_0A79_9888u64.to_be_bytes());
        let text = |a| Checksum { algorithm: a, digest: digest(a, b"Hello world") }.text();
        assert_eq!(text(Algorithm::Crc32), "i9aeUg==");
        assert_eq!(text(Algorithm::Crc32c), "crUfeA==");
        assert_eq!(text(Algorithm::Crc64Nvme), "OOJZ0D8xKts=");
        assert_eq!(text(Algorithm::Sha1), "e1AsOh9IyGCa4hLN+2Od7jlnP14=");
        assert_eq!(text(Algorithm::Sha256), "ZOyIygCyaOW6GjVnihtTFtIS9PNmskdyMlNKiuyjfzw=");
    }

    #[test]
    fn checksum_values_of_the_wrong_length_are_refused() {
        assert!(Checksum::parse(Algorithm::Crc32, "i9aeUg==").is_ok());
        assert!(Checksum::parse(Algorithm::Crc32, "OOJZ0D8xKts=").is_err());
        assert!(Checksum::parse(Algorithm::Sha1, "not base64!").is_err());
        assert!(parse_content_md5("1B2M2Y8AsgTpgAmY7PhCfg==").is_ok());
        assert_eq!(parse_content_md5("AAAA").unwrap_err().code, "InvalidDigest");
        assert_eq!(Algorithm::from_name("crc32c").unwrap(), Algorithm::Crc32c);
        assert!(Algorithm::from_name("md5").is_err());
    }
}
