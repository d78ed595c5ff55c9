//! The `aws-chunked` content encoding of S3's streaming uploads: a body of chunks
//! `<hex size>[;chunk-signature=<sig>]\r\n<data>\r\n`, ended by a chunk of size 0, then (in
//! the trailer modes) headers such as `x-amz-checksum-crc32:<value>` and an empty line.
//!
//! [`ChunkedDecoder`] takes the body as it arrives, hands on the data, and checks each chunk's
//! signature (chained from the request's) and the trailer's when the mode signs them.

use bytes::{Buf, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use super::error::S3Error;
use super::sigv4::ChunkSigner;

/// Trailing headers of a body, names lower-cased.
pub type Trailers = Vec<(String, String)>;

/// Longest chunk header or trailer line accepted.
const MAX_LINE: usize = 4096;
/// Most trailing headers accepted.
const MAX_TRAILERS: usize = 16;

enum State {
    /// Reading a chunk's header line.
    Header,
    /// Reading this many more bytes of a chunk's data.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Reading trailing header lines, up to an empty one.
    Trailer,
    Done,
}

pub struct ChunkedDecoder {
    state: State,
    buf: BytesMut,
    /// Signed modes: checks each chunk (and the trailer when signed).
    signer: Option<ChunkSigner>,
    /// Whether a trailer follows the last chunk.
    trailer: bool,
    chunk_sha: Option<Sha256>,
    chunk_signature: Option<[u8; 32]>,
    trailers: Vec<(String, String)>,
    trailer_signature: Option<[u8; 32]>,
    decoded: u64,
}

impl ChunkedDecoder {
    pub fn new(signer: Option<ChunkSigner>, trailer: bool) -> Self {
        Self {
            state: State::Header,
            buf: BytesMut::new(),
            signer,
            trailer,
            chunk_sha: None,
            chunk_signature: None,
            trailers: Vec::new(),
            trailer_signature: None,
            decoded: 0,
        }
    }

    /// Feeds the next bytes of the body; the data they complete is pushed to `out`.
    pub fn push(&mut self, mut input: Bytes, out: &mut Vec<Bytes>) -> Result<(), S3Error> {
        loop {
            match self.state {
                State::Data(remaining) => {
                    if input.is_empty() {
                        return Ok(());
                    }
                    let take = remaining.min(input.len() as u64) as usize;
                    let data = input.split_to(take);
                    if let Some(sha) = &mut self.chunk_sha {
                        sha.update(&data);
                    }
                    self.decoded += take as u64;
                    out.push(data);
                    self.state =
                        if remaining == take as u64 { State::DataEnd } else { State::Data(remaining - take as u64) };
                }
                State::Done => {
                    return if input.is_empty() && self.buf.is_empty() {
                        Ok(())
                    } else {
                        Err(S3Error::invalid_request("bytes follow the end of the aws-chunked body"))
                    };
                }
                _ => {
                    self.buf.extend_from_slice(&input);
                    input = Bytes::new();
                    if !self.step_lines()? {
                        return Ok(());
                    }
                    // What is left in `buf` after a chunk header is data.
                    if let State::Data(_) = self.state {
                        input = self.buf.split().freeze();
                    }
                }
            }
        }
    }

    /// Runs the line states on `buf`; false when it needs more input.
    fn step_lines(&mut self) -> Result<bool, S3Error> {
        loop {
            match self.state {
                State::Data(_) => return Ok(true),
                State::Done => return Ok(true),
                State::DataEnd => {
                    if self.buf.len() < 2 {
                        return Ok(false);
                    }
                    if &self.buf[..2] != b"\r\n" {
                        return Err(S3Error::incomplete_body("an aws-chunked chunk is longer than its size says"));
                    }
                    self.buf.advance(2);
                    self.end_chunk()?;
                    self.state = State::Header;
                }
                State::Header => {
                    let Some(line) = self.line()? else { return Ok(false) };
                    let (size, signature) = parse_chunk_header(&line)?;
                    match (&self.signer, signature) {
                        (Some(_), None) => {
                            return Err(S3Error::incomplete_body(
                                "a chunk of a signed aws-chunked body has no signature",
                            ))
                        }
                        (None, Some(_)) => {
                            return Err(S3Error::invalid_request(
                                "a chunk of an unsigned aws-chunked body has a signature",
                            ))
                        }
                        _ => {}
                    }
                    self.chunk_signature = signature;
                    self.chunk_sha = self.signer.as_ref().map(|_| Sha256::new());
                    if size == 0 {
                        // The trailer state reads the empty line that ends a body without one.
                        self.end_chunk()?;
                        self.state = State::Trailer;
                    } else {
                        self.state = State::Data(size);
                    }
                }
                State::Trailer => {
                    let Some(line) = self.line()? else { return Ok(false) };
                    if line.is_empty() {
                        self.finish_trailer()?;
                        self.state = State::Done;
                        continue;
                    }
                    if !self.trailer {
                        return Err(S3Error::invalid_request(
                            "a trailer follows an aws-chunked body that announced none",
                        ));
                    }
                    let (name, value) = line
                        .split_once(':')
                        .ok_or_else(|| S3Error::invalid_request("an aws-chunked trailer line is not name:value"))?;
                    let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_string());
                    if name == "x-amz-trailer-signature" {
                        let mut sig = [0u8; 32];
                        hex::decode_to_slice(&value, &mut sig)
                            .map_err(|_| S3Error::invalid_request("x-amz-trailer-signature must be 64 hex digits"))?;
                        self.trailer_signature = Some(sig);
                    } else {
                        if self.trailers.len() >= MAX_TRAILERS {
                            return Err(S3Error::invalid_request("too many aws-chunked trailers"));
                        }
                        self.trailers.push((name, value));
                    }
                }
            }
        }
    }

    /// One CRLF-ended line from `buf`, without the CRLF.
    fn line(&mut self) -> Result<Option<String>, S3Error> {
        match memchr::memmem::find(&self.buf, b"\r\n") {
            Some(at) => {
                let line = self.buf.split_to(at + 2);
                String::from_utf8(line[..at].to_vec())
                    .map(Some)
                    .map_err(|_| S3Error::invalid_request("an aws-chunked line is not UTF-8"))
            }
            None if self.buf.len() > MAX_LINE => Err(S3Error::invalid_request("an aws-chunked line is too long")),
            None => Ok(None),
        }
    }

    fn end_chunk(&mut self) -> Result<(), S3Error> {
        if let (Some(signer), Some(sha), Some(signature)) =
            (&mut self.signer, self.chunk_sha.take(), self.chunk_signature.take())
        {
            signer.check_chunk(&sha.finalize().into(), &signature)?;
        }
        Ok(())
    }

    fn finish_trailer(&mut self) -> Result<(), S3Error> {
        let Some(signer) = &mut self.signer else { return Ok(()) };
        if !self.trailer {
            return Ok(());
        }
        let signature = self
            .trailer_signature
            .ok_or_else(|| S3Error::incomplete_body("the trailer of a signed aws-chunked body has no signature"))?;
        let canonical: String = self.trailers.iter().map(|(n, v)| format!("{n}:{v}\n")).collect();
        signer.check_trailer(&canonical, &signature)
    }

    /// The end of the body: the trailing headers, or an error if it stopped short.
    pub fn finish(self) -> Result<(Trailers, u64), S3Error> {
        match self.state {
            State::Done => Ok((self.trailers, self.decoded)),
            _ => Err(S3Error::incomplete_body("the aws-chunked body ended before its last chunk")),
        }
    }
}

fn parse_chunk_header(line: &str) -> Result<(u64, Option<[u8; 32]>), S3Error> {
    let bad = || S3Error::invalid_request("an aws-chunked chunk header is malformed");
    let (size, extension) = match line.split_once(';') {
        Some((size, ext)) => (size, Some(ext)),
        None => (line, None),
    };
    if size.is_empty() || size.len() > 16 {
        return Err(bad());
    }
    let size = u64::from_str_radix(size, 16).map_err(|_| bad())?;
    let signature = match extension {
        None => None,
        Some(ext) => {
            let value = ext.strip_prefix("chunk-signature=").ok_or_else(bad)?;
            let mut sig = [0u8; 32];
            hex::decode_to_slice(value, &mut sig).map_err(|_| bad())?;
            Some(sig)
        }
    };
    Ok((size, signature))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode(body: &[u8], split: &[usize], trailer: bool) -> Result<(Vec<u8>, Trailers), S3Error> {
        let mut decoder = ChunkedDecoder::new(None, trailer);
        let mut out = Vec::new();
        let mut at = 0;
        for &s in split.iter().chain(std::iter::once(&body.len())) {
            let s = s.clamp(at, body.len());
            decoder.push(Bytes::copy_from_slice(&body[at..s]), &mut out)?;
            at = s;
        }
        let (trailers, decoded) = decoder.finish()?;
        let data: Vec<u8> = out.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(decoded, data.len() as u64);
        Ok((data, trailers))
    }

    fn encode(data: &[u8], chunk: usize, trailer: Option<&str>) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in data.chunks(chunk.max(1)) {
            out.extend(format!("{:x}\r\n", piece.len()).as_bytes());
            out.extend(piece);
            out.extend(b"\r\n");
        }
        out.extend(b"0\r\n");
        if let Some(t) = trailer {
            out.extend(format!("{t}\r\n").as_bytes());
        }
        out.extend(b"\r\n");
        out
    }

    proptest! {
        /// Whatever the chunk size and however the body is cut into reads, the data comes out
        /// whole and the trailer is read.
        #[test]
        fn any_chunking_and_any_reads_decode_the_same(
            data in proptest::collection::vec(any::<u8>(), 0..3000),
            chunk in 1usize..700,
            split in proptest::collection::vec(0usize..4000, 0..6),
        ) {
            let mut split = split;
            split.sort();
            let body = encode(&data, chunk, Some("x-amz-checksum-crc32:i9aeUg=="));
            let (decoded, trailers) = decode(&body, &split, true).unwrap();
            prop_assert_eq!(decoded, data);
            prop_assert_eq!(trailers, vec![("x-amz-checksum-crc32".to_string(), "i9aeUg==".to_string())]);
        }

        /// Hostile bodies answer an error or data, never a panic.
        #[test]
        fn hostile_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&body, &[], true);
            let _ = decode(&body, &[], false);
        }
    }

    #[test]
    fn cut_or_padded_bodies_are_refused() {
        let body = encode(b"hello", 5, None);
        assert!(decode(&body, &[], false).is_ok());
        assert_eq!(decode(&body[..body.len() - 1], &[], false).unwrap_err().code, "IncompleteBody");
        assert_eq!(decode(&body[..4], &[], false).unwrap_err().code, "IncompleteBody");
        let mut longer = body.clone();
        longer.extend(b"x");
        assert!(decode(&longer, &[], false).is_err());
        // A chunk with more data than its size.
        assert!(decode(b"2\r\nabc\r\n0\r\n\r\n", &[], false).is_err());
        // A signature on an unsigned body; a size that is not hex.
        assert!(decode(
            &format!("5;chunk-signature={}\r\nhello\r\n0\r\n\r\n", "0".repeat(64)).into_bytes(),
            &[],
            false
        )
        .is_err());
        assert!(decode(b"zz\r\nhello\r\n0\r\n\r\n", &[], false).is_err());
    }
}
