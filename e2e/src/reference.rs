//! Physical references: what the disk and the loopback network do without Cairn.

use std::fs::OpenOptions;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// 4 KiB pwrite + fdatasync by one writer into a preallocated file, ops/s.
pub fn fdatasync_4k_rate(dir: &Path, duration: Duration) -> anyhow::Result<f64> {
    let path = dir.join("ref-4k");
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
    rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, 1 << 30)?;
    let buf = vec![0x5au8; 4096];
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < duration {
        file.write_all_at(&buf, n * 4096)?;
        file.sync_data()?;
        n += 1;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    std::fs::remove_file(path)?;
    Ok(rate)
}

/// Sequential `chunk`-sized writes, each followed by fdatasync, into a preallocated file for
/// `duration` (the same time the Cairn scenario runs, so that both see the disk's sustained rate,
/// not a burst absorbed by a cache below): MB/s.
pub fn sequential_write_rate(dir: &Path, duration: Duration, chunk: usize) -> anyhow::Result<f64> {
    const FILE_LEN: u64 = 8 << 30;
    let path = dir.join("ref-seq");
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
    rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, FILE_LEN)?;
    let buf = vec![0xa5u8; chunk];
    let started = Instant::now();
    let mut written = 0u64;
    while started.elapsed() < duration && written + chunk as u64 <= FILE_LEN {
        file.write_all_at(&buf, written)?;
        file.sync_data()?;
        written += chunk as u64;
    }
    let rate = written as f64 / 1e6 / started.elapsed().as_secs_f64();
    std::fs::remove_file(path)?;
    Ok(rate)
}

/// sendfile(2) of a `len`-byte file over a loopback TCP socket, for reads to be measured against.
/// The file is written, synced and read once before any sample (a file written just before, not
/// yet synced, made this reference range from 0.5 to 4 ms), and samples are taken on demand, so
/// that Cairn and the reference can be measured in interleaved rounds.
pub struct SendfileReference {
    path: std::path::PathBuf,
    client: Option<TcpStream>,
    server: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    buf: Vec<u8>,
}

impl SendfileReference {
    pub fn start(dir: &Path, len: usize) -> anyhow::Result<Self> {
        let path = dir.join("ref-sendfile");
        std::fs::write(&path, vec![0x33u8; len])?;
        let file = std::fs::File::open(&path)?;
        file.sync_all()?;
        // Warm: in the page cache, as a blob read twice is.
        std::io::copy(&mut &file, &mut std::io::sink())?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let server_path = path.clone();
        let server = std::thread::spawn(move || -> std::io::Result<()> {
            let (mut conn, _) = listener.accept()?;
            let file = std::fs::File::open(server_path)?;
            let mut request = [0u8; 1];
            // One byte from the client asks for one transfer, as a GET would.
            while conn.read_exact(&mut request).is_ok() {
                let mut offset = 0u64;
                while (offset as usize) < len {
                    let remaining = len - offset as usize;
                    let n = rustix::fs::sendfile(&conn, &file, Some(&mut offset), remaining)?;
                    if n == 0 {
                        break;
                    }
                }
            }
            Ok(())
        });
        let client = TcpStream::connect(addr)?;
        client.set_nodelay(true)?;
        Ok(Self { path, client: Some(client), server: Some(server), buf: vec![0u8; len] })
    }

    /// `rounds` transfers, each timed until the reader has every byte: ms each.
    pub fn samples(&mut self, rounds: usize) -> anyhow::Result<Vec<f64>> {
        let client = self.client.as_mut().expect("open until dropped");
        let mut samples = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let started = Instant::now();
            std::io::Write::write_all(client, b"g")?;
            client.read_exact(&mut self.buf)?;
            samples.push(started.elapsed().as_secs_f64() * 1e3);
        }
        Ok(samples)
    }
}

impl Drop for SendfileReference {
    fn drop(&mut self) {
        drop(self.client.take());
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// (p50, p99) of the samples.
pub fn percentiles(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}
