//! `cairn-bench datanode`: a real datanode process on this machine's disk.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_common::volume_layout::VolumeMarker;
use cairn_common::BlobId;
use cairn_datanode::engine::{now_ms, BlobMeta, CompactionConfig, PutRequest, Volume, VolumeConfig};
use cairn_datanode::metrics::EngineMetrics;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::reference;
use crate::Scenario;

#[derive(clap::Args)]
pub struct Options {
    /// One JSON object per scenario instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Directory on the filesystem to measure (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seconds per throughput scenario.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Blobs in the volume-open scenario.
    #[arg(long, default_value_t = 1_000_000)]
    open_blobs: u64,
    /// Only these groups of scenarios (comma-separated): base, auth, tls, s3, uncached, open.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// A GET that authenticates with the benchmark's key: the test key, a standalone node's root
/// key here, and put into a cluster's etcd by `cairn-bench cluster` (auth stays on, as users
/// run Cairn).
pub fn authorized_get(uri: hyper::Uri) -> hyper::Request<Full<Bytes>> {
    hyper::Request::get(uri)
        .header(hyper::header::AUTHORIZATION, cairn_testkit::keys::authorization())
        .body(Full::new(Bytes::new()))
        .expect("a valid request")
}

/// A datanode process on a fresh directory, with a client for it; killed when dropped.
pub struct NodeProcess {
    child: Child,
    pub client: HttpClient,
    pub addr: String,
}

impl NodeProcess {
    pub async fn start(dir: &Path, extra_args: &[&str]) -> anyhow::Result<Self> {
        let port = cairn_testkit::ports::free_port();
        Self::start_at(dir, &format!("127.0.0.1:{port}"), extra_args).await
    }

    /// Starts a datanode listening on `addr`.
    pub async fn start_at(dir: &Path, addr: &str, extra_args: &[&str]) -> anyhow::Result<Self> {
        let node = Self::spawn(dir, addr, extra_args)?;
        wait_healthy(&node.client, &node.addr).await?;
        Ok(node)
    }

    /// A standalone datanode serving HTTPS (`extra_args` has `--tls-cert` and `--tls-key`):
    /// ready once its port takes connections.
    pub async fn start_tls(dir: &Path, addr: &str, extra_args: &[&str]) -> anyhow::Result<Self> {
        let node = Self::spawn(dir, addr, extra_args)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "the TLS datanode did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(node)
    }

    fn spawn(dir: &Path, addr: &str, extra_args: &[&str]) -> anyhow::Result<Self> {
        // A standalone node's root key is the benchmark's (a cluster's keys are in etcd).
        let root_key = cairn_testkit::keys::root_key_env();
        let root_key: &[(&str, &str)] = if extra_args.contains(&"--etcd") { &[] } else { &root_key };
        let child = Command::new(datanode_binary()?)
            .args(["--data-dir", dir.to_str().expect("utf-8 path"), "--listen", addr])
            .args(["--segment-size", "1GiB", "--volume-size", "64GiB"])
            .envs(root_key.iter().copied())
            .args(extra_args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let client: HttpClient = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(256).build_http();
        Ok(Self { child, client, addr: addr.to_owned() })
    }
}

impl NodeProcess {
    /// CPU time the process has used so far (user + system), from /proc.
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        stat_cpu_time(&format!("/proc/{}/stat", self.child.id()))
    }

    /// CPU time its volume writers' threads have used so far.
    pub fn writer_cpu_time(&self) -> anyhow::Result<Duration> {
        let mut total = Duration::ZERO;
        for task in std::fs::read_dir(format!("/proc/{}/task", self.child.id()))? {
            let task = task?.path();
            if std::fs::read_to_string(task.join("comm")).is_ok_and(|c| c.starts_with("cairn-writer")) {
                total += stat_cpu_time(&task.join("stat").to_string_lossy())?;
            }
        }
        Ok(total)
    }
}

/// User + system CPU time of a process or thread, from its /proc `stat` file.
fn stat_cpu_time(path: &str) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(path)?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow::anyhow!("malformed stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(Duration::from_secs_f64(ticks as f64 / rustix::param::clock_ticks_per_second() as f64))
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GETs of one 5 MiB blob against the sendfile reference, in interleaved rounds of 50 each
/// (four rounds): the medians of the round p50s, the spread of the round ratios, and Cairn's p99.
async fn get_latency(
    node: &NodeProcess,
    name: &'static str,
    reference: &mut reference::SendfileReference,
    note: &str,
) -> anyhow::Result<Scenario> {
    let id = put_once(&node.client, &node.addr, Bytes::from(vec![0x42u8; 5 << 20])).await?;
    let (mut cairn, mut raw, mut all) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..4 {
        let (addr, id) = (node.addr.clone(), id.clone());
        let mut samples = tokio::task::spawn_blocking(move || raw_get_latency(&addr, &id, 5 << 20, 50)).await??;
        all.extend(samples.iter().copied());
        cairn.push(reference::percentiles(&mut samples).0);
        raw.push(reference::percentiles(&mut reference.samples(50)?).0);
    }
    let mut scenario = Scenario::rounds(name, &cairn, "ms", &raw, "ms", note);
    scenario.p99 = Some(reference::percentiles(&mut all).1);
    Ok(scenario)
}

fn datanode_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name("cairn-datanode");
    anyhow::ensure!(
        path.exists(),
        "{} not found: build it with `cargo build --release -p cairn-datanode`",
        path.display()
    );
    Ok(path)
}

pub async fn run(options: Options) -> anyhow::Result<Vec<Scenario>> {
    let base = options.dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = tempfile::tempdir_in(&base)?;
    let seconds = Duration::from_secs(options.seconds);
    let mut results = Vec::new();
    let want = |group: &str| options.only.is_empty() || options.only.iter().any(|g| g == group);

    let dir = work.path().to_owned();
    let raw_4k =
        tokio::task::spawn_blocking(move || reference::fdatasync_4k_rate(&dir, Duration::from_secs(3))).await??;
    let dir = work.path().to_owned();
    let raw_seq =
        tokio::task::spawn_blocking(move || reference::sequential_write_rate(&dir, seconds, 5 << 20)).await??;
    let mut sendfile = reference::SendfileReference::start(work.path(), 5 << 20)?;

    let node = NodeProcess::start(&work.path().join("node"), &[]).await?;
    let addrs = [node.addr.clone()];
    let reference = "raw sendfile of a synced, warm 5 MiB file over loopback TCP; interleaved rounds";
    if want("base") {
        let (ops, _) = put_throughput(&node.client, &addrs, 4096, 64, seconds).await?;
        results.push(Scenario::new("put_4k_c64", ops, "ops/s").against(
            raw_4k,
            "ops/s",
            "raw 4 KiB pwrite+fdatasync, one writer, same filesystem",
        ));
        let (ops, _) = put_throughput(&node.client, &addrs, 5 << 20, 4, seconds).await?;
        results.push(Scenario::new("put_5m", ops * 5.0 * 1048576.0 / 1e6, "MB/s").against(
            raw_seq,
            "MB/s",
            "raw sequential 5 MiB writes + fdatasync; Cairn with 4 concurrent clients",
        ));
        results.push(get_latency(&node, "get_5m_p50", &mut sendfile, reference).await?);
    }
    if want("auth") {
        results.extend(auth_cost(&node, &work.path().join("open-node"), seconds).await?);
    }
    if want("tls") {
        results.extend(tls_cost(&node, work.path(), seconds).await?);
    }
    drop(node);
    if want("s3") {
        results.extend(s3_cost(&work.path().join("s3-node"), seconds).await?);
    }
    if want("uncached") {
        // The same GETs with every chunk read from the segment and verified again.
        let node = NodeProcess::start(&work.path().join("node-uncached"), &["--chunk-cache-size", "0"]).await?;
        results.push(get_latency(&node, "get_5m_p50_uncached", &mut sendfile, reference).await?);
    }
    drop(sendfile);
    if !want("open") {
        return Ok(results);
    }

    let dir = work.path().join("open");
    let blobs = options.open_blobs;
    let (open_secs, fill_secs) = open_volume(&dir, blobs).await?;
    let mut open = Scenario::new("open_1m", open_secs, "s");
    open.note = Some(format!("{blobs} blobs written in-process in {fill_secs:.1} s; no reference (target < 1 s)"));
    results.push(open);
    Ok(results)
}

/// What access keys cost: the node (keys on, every request with a bearer token) against one
/// started with `--auth none` (requests without one).
async fn auth_cost(keyed: &NodeProcess, open_dir: &Path, seconds: Duration) -> anyhow::Result<Vec<Scenario>> {
    let open = NodeProcess::start(open_dir, &["--auth", "none"]).await?;
    let with_keys = raw_http::Target { addr: &keyed.addr, tls: None, authorized: true, api: raw_http::Api::Blob };
    let without = raw_http::Target { addr: &open.addr, tls: None, authorized: false, api: raw_http::Api::Blob };
    compare(
        [with_keys, without],
        ["auth_put_4k_c64", "auth_get_5m_p50"],
        "with access keys (a bearer token on every request) against --auth none",
        seconds,
        SECURITY_TARGETS,
    )
    .await
}

/// What the S3 front costs: PUTs and GETs through S3 (SigV4, `UNSIGNED-PAYLOAD` as SDKs send over
/// HTTPS) against the same through the blob API, on one node serving both.
async fn s3_cost(dir: &Path, seconds: Duration) -> anyhow::Result<Vec<Scenario>> {
    let s3_addr = format!("127.0.0.1:{}", cairn_testkit::ports::free_port());
    let node = NodeProcess::start(dir, &["--s3-listen", &s3_addr, "--s3-piece-size", "64MiB"]).await?;
    let s3 = raw_http::Target { addr: &s3_addr, tls: None, authorized: true, api: raw_http::Api::S3 };
    let blob = raw_http::Target { addr: &node.addr, tls: None, authorized: true, api: raw_http::Api::Blob };
    raw_http::create_bucket(&s3).await?;
    let what =
        "through S3 (SigV4, UNSIGNED-PAYLOAD, an MD5 ETag per object) against the blob API, one node serving both";
    let mut out = compare([s3, blob], ["s3_put_4k_c64", "s3_get_5m_p50"], what, seconds, S3_TARGETS).await?;
    let s3 = raw_http::Target { addr: &s3_addr, tls: None, authorized: true, api: raw_http::Api::S3 };
    let blob = raw_http::Target { addr: &node.addr, tls: None, authorized: true, api: raw_http::Api::Blob };
    let targets = [s3, blob];
    let mut puts = [Vec::new(), Vec::new()];
    for round in 0..3 {
        for i in [round % 2, 1 - round % 2] {
            let ops = raw_http::put_throughput(&targets[i], 5 << 20, 4, seconds).await?;
            puts[i].push(ops * 5.0 * 1048576.0 / 1e6);
        }
    }
    out.push(Scenario::rounds(
        "s3_put_5m",
        &puts[0],
        "MB/s",
        &puts[1],
        "MB/s",
        format!("{what}; 4 clients; 3 interleaved rounds (target ≥ {:.2})", S3_TARGETS.0),
    ));
    out.push(s3_put_4k_floor(&node, &targets[1], seconds).await?);
    Ok(out)
}

/// The least S3 must add to a 4 KiB PUT, against what the target allows it on this machine.
///
/// The least: the ETag's MD5 of the body, and for the signature one SHA-256 of the canonical
/// request and one HMAC of the string to sign, by the client and again by the server (the signing
/// key kept, as both do), timed here. The allowance: 1/0.83 − 1 of what a blob API PUT costs
/// outside the volume writer (its runtime workers and the client, by /proc), the writer's share
/// being the same whatever the rate (it commits as often as it can; docs/benchmarks.md). A ratio
/// above 1: the target is out of reach here, however lean the S3 front, while the writer works so.
async fn s3_put_4k_floor(
    node: &NodeProcess,
    blob: &raw_http::Target<'_>,
    seconds: Duration,
) -> anyhow::Result<Scenario> {
    let (node_before, writer_before, client_before) =
        (node.cpu_time()?, node.writer_cpu_time()?, stat_cpu_time("/proc/self/stat")?);
    let started = Instant::now();
    let rate = raw_http::put_throughput(blob, 4096, 64, seconds).await?;
    let puts = rate * started.elapsed().as_secs_f64();
    let outside_writer = (node.cpu_time()? - node_before) - (node.writer_cpu_time()? - writer_before)
        + (stat_cpu_time("/proc/self/stat")? - client_before);
    let blob_us = outside_writer.as_secs_f64() * 1e6 / puts;
    let allowance_us = blob_us * (1.0 / S3_TARGETS.0 - 1.0);
    let (md5_us, signature_us) = s3_put_least_us();
    let least_us = md5_us + 2.0 * signature_us;
    Ok(Scenario::new("s3_put_4k_floor", least_us, "µs").against(
        allowance_us,
        "µs",
        format!(
            "the least S3 adds per 4 KiB PUT (MD5 {md5_us:.2} µs; SHA-256 + HMAC {signature_us:.2} µs, client and server) \
             against what the target allows: 0.20 of {blob_us:.1} µs, a blob API PUT's CPU outside the volume writer \
             ({rate:.0} PUTs/s); above 1, out of reach here while the writer commits as often as it can"
        ),
    ))
}

/// Microseconds for the MD5 of 4 KiB, and for one signature's least (the SHA-256 of a canonical
/// request as the benchmark's PUTs have it, then the HMAC of its string to sign): the medians of
/// 15 runs of 2,000 each.
fn s3_put_least_us() -> (f64, f64) {
    use hmac::{Hmac, Mac};
    use md5::{Digest as _, Md5};
    use sha2::Sha256;
    const N: u32 = 2000;
    let median_us = |mut f: Box<dyn FnMut() -> u8>| {
        let mut runs: Vec<f64> = (0..15)
            .map(|_| {
                let started = Instant::now();
                let mut sink = 0u8;
                for _ in 0..N {
                    sink ^= f();
                }
                std::hint::black_box(sink);
                started.elapsed().as_secs_f64() * 1e6 / f64::from(N)
            })
            .collect();
        runs.sort_by(f64::total_cmp);
        runs[runs.len() / 2]
    };
    let body = vec![0x17u8; 4096];
    let md5 = median_us(Box::new(move || Md5::digest(std::hint::black_box(&body))[0]));
    let canonical = "PUT\n/bench/o-12-34-5678\n\nhost:127.0.0.1:40123\nx-amz-content-sha256:UNSIGNED-PAYLOAD\n\
                     x-amz-date:20261203T180000Z\n\nhost;x-amz-content-sha256;x-amz-date\nUNSIGNED-PAYLOAD";
    let key = [7u8; 32];
    let signature = median_us(Box::new(move || {
        let hash = hex::encode(Sha256::digest(std::hint::black_box(canonical.as_bytes())));
        let to_sign = format!("AWS4-HMAC-SHA256\n20261203T180000Z\n20261203/us-east-1/s3/aws4_request\n{hash}");
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
        mac.update(to_sign.as_bytes());
        mac.finalize().into_bytes()[0]
    }));
    (md5, signature)
}

/// What TLS costs: a node serving HTTPS (a self-signed certificate made here) against `plain`,
/// both with access keys.
async fn tls_cost(plain: &NodeProcess, work: &Path, seconds: Duration) -> anyhow::Result<Vec<Scenario>> {
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    let (cert, key) = (work.join("tls-cert.pem"), work.join("tls-key.pem"));
    std::fs::write(&cert, made.cert.pem())?;
    std::fs::write(&key, made.signing_key.serialize_pem())?;
    let port = cairn_testkit::ports::free_port();
    let tls_addr = format!("127.0.0.1:{port}");
    let _tls_node = NodeProcess::start_tls(
        &work.join("tls-node"),
        &tls_addr,
        &["--tls-cert", cert.to_str().expect("utf-8"), "--tls-key", key.to_str().expect("utf-8")],
    )
    .await?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(made.cert.der().clone())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = raw_http::Tls(tokio_rustls::TlsConnector::from(Arc::new(config)));
    let https = raw_http::Target { addr: &tls_addr, tls: Some(&tls), authorized: true, api: raw_http::Api::Blob };
    let http = raw_http::Target { addr: &plain.addr, tls: None, authorized: true, api: raw_http::Api::Blob };
    let mut out = compare(
        [https, http],
        ["tls_put_4k_c64", "tls_get_5m_p50"],
        "HTTPS (TLS 1.3, rustls) against plain HTTP, keys on both",
        seconds,
        SECURITY_TARGETS,
    )
    .await?;
    // The physical floor of that GET: what the record cipher alone takes for 5 MiB on this CPU,
    // against the plain GET's p50.
    let plain_get = out.iter().find(|s| s.scenario == "tls_get_5m_p50").and_then(|s| s.reference).unwrap_or(f64::NAN);
    let (seal, open) = aes_128_gcm_5m()?;
    out.push(Scenario::new("tls_cipher_5m_seal", seal, "ms").against(
        plain_get,
        "ms",
        "AES-128-GCM (ring, as rustls) sealing 5 MiB in 16 KiB TLS records, median of 30, against the plain GET p50: \
         what the server must add before the last byte leaves",
    ));
    out.push(Scenario::new("tls_cipher_5m_open", open, "ms").against(
        plain_get,
        "ms",
        "the same records opened (the client's share, on the same two cores)",
    ));
    Ok(out)
}

/// Milliseconds to seal and to open 5 MiB as TLS records (16 KiB each, AES-128-GCM, ring's
/// implementation, which rustls uses): the medians of 30 runs each.
fn aes_128_gcm_5m() -> anyhow::Result<(f64, f64)> {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).map_err(|_| anyhow::anyhow!("AES key"))?);
    const RECORD: usize = 16 * 1024;
    // 320 records of plaintext, each with room for its tag, sealed and opened in place.
    let mut records: Vec<Vec<u8>> = (0..(5 << 20) / RECORD)
        .map(|_| {
            let mut r = Vec::with_capacity(RECORD + AES_128_GCM.tag_len());
            r.resize(RECORD, 0x42);
            r
        })
        .collect();
    let nonce = |i: usize| {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&(i as u64).to_be_bytes());
        Nonce::assume_unique_for_key(n)
    };
    let (mut seals, mut opens) = (Vec::new(), Vec::new());
    for _ in 0..30 {
        let started = std::time::Instant::now();
        for (i, record) in records.iter_mut().enumerate() {
            key.seal_in_place_append_tag(nonce(i), Aad::empty(), record).map_err(|_| anyhow::anyhow!("seal"))?;
        }
        seals.push(started.elapsed().as_secs_f64() * 1e3);
        let started = std::time::Instant::now();
        for (i, record) in records.iter_mut().enumerate() {
            key.open_in_place(nonce(i), Aad::empty(), record).map_err(|_| anyhow::anyhow!("open"))?;
            record.truncate(RECORD);
        }
        opens.push(started.elapsed().as_secs_f64() * 1e3);
    }
    anyhow::ensure!(records.iter().flatten().all(|b| *b == 0x42), "the records did not open to what was sealed");
    Ok((crate::median(&seals), crate::median(&opens)))
}

/// The cost issue 14 allows auth and TLS (15 %): PUT ratio ≥ 0.85, GET ratio ≤ 1.15.
const SECURITY_TARGETS: (f64, f64) = (0.85, 1.15);
/// The cost issue 15 allows S3 (20 % over the blob API): PUT ratio ≥ 1/1.2, GET ratio ≤ 1.20.
const S3_TARGETS: (f64, f64) = (0.83, 1.20);

/// `[measured, reference]` driven by the same minimal client, in interleaved rounds: 4 KiB PUTs
/// from 64 connections (3 rounds) and the p50 of 5 MiB GETs on one connection (4 rounds of 50),
/// against `targets` (least PUT ratio, most GET ratio). Scenarios named `names`.
async fn compare(
    targets: [raw_http::Target<'_>; 2],
    names: [&'static str; 2],
    what: &str,
    seconds: Duration,
    (put_target, get_target): (f64, f64),
) -> anyhow::Result<Vec<Scenario>> {
    let mut puts = [Vec::new(), Vec::new()];
    for round in 0..3 {
        // Alternating which goes first, so that both see the same machine.
        for i in [round % 2, 1 - round % 2] {
            puts[i].push(raw_http::put_throughput(&targets[i], 4096, 64, seconds).await?);
        }
    }
    let put = Scenario::rounds(
        names[0],
        &puts[0],
        "ops/s",
        &puts[1],
        "ops/s",
        format!("{what}; one minimal client; 3 interleaved rounds (target ≥ {put_target:.2})"),
    );
    let blob = vec![0x42u8; 5 << 20];
    let ids = [raw_http::put(&targets[0], &blob).await?, raw_http::put(&targets[1], &blob).await?];
    let mut gets = [Vec::new(), Vec::new()];
    for _ in 0..4 {
        for i in 0..2 {
            let mut samples = raw_http::get_latency(&targets[i], &ids[i], blob.len(), 50).await?;
            gets[i].push(reference::percentiles(&mut samples).0);
        }
    }
    let get = Scenario::rounds(
        names[1],
        &gets[0],
        "ms",
        &gets[1],
        "ms",
        format!("{what}; 4 interleaved rounds of 50 (target ≤ {get_target:.2})"),
    );
    Ok(vec![put, get])
}

/// A minimal HTTP/1.1 client over plain TCP or TLS (the same code either way, so that only the
/// transport differs): requests out, exactly Content-Length bytes in.
mod raw_http {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

    pub struct Tls(pub tokio_rustls::TlsConnector);

    /// Which API a target speaks: the blob API, or S3 (objects in the bucket [`BUCKET`]).
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub enum Api {
        Blob,
        S3,
    }

    pub const BUCKET: &str = "bench";

    /// A node as the client reaches it: over TLS or not, with the benchmark's key or without.
    pub struct Target<'a> {
        pub addr: &'a str,
        pub tls: Option<&'a Tls>,
        pub authorized: bool,
        pub api: Api,
    }

    impl Target<'_> {
        /// The head of a request for `path`: host and, if authorized, the key's bearer token
        /// (blob API) or a SigV4 signature of the request (S3, signed now).
        fn head(&self, method: &str, path: &str, content_length: Option<usize>) -> String {
            let mut lines = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.addr);
            if let Some(len) = content_length {
                lines += &format!("Content-Length: {len}\r\n");
            }
            match (self.authorized, self.api) {
                (false, _) => {}
                (true, Api::Blob) => lines += &format!("Authorization: {}\r\n", cairn_testkit::keys::authorization()),
                (true, Api::S3) => {
                    use axum::http::{HeaderMap, HeaderValue, Method};
                    let mut headers = HeaderMap::new();
                    let date = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
                    headers.insert("host", HeaderValue::from_str(self.addr).expect("ascii"));
                    headers.insert("x-amz-date", HeaderValue::from_str(&date).expect("ascii"));
                    headers.insert("x-amz-content-sha256", HeaderValue::from_static("UNSIGNED-PAYLOAD"));
                    let method = Method::from_bytes(method.as_bytes()).expect("a method");
                    let parts = cairn_datanode::api::s3::sigv4::RequestParts {
                        method: &method,
                        raw_path: path,
                        query: &[],
                        headers: &headers,
                    };
                    let (id, secret) = (cairn_testkit::keys::TEST_KEY_ID, cairn_testkit::keys::TEST_KEY_SECRET);
                    let auth = cairn_datanode::api::s3::sigv4::authorization(id, secret, "us-east-1", &parts)
                        .expect("signable");
                    lines += &format!(
                        "X-Amz-Date: {date}\r\nX-Amz-Content-Sha256: UNSIGNED-PAYLOAD\r\nAuthorization: {auth}\r\n"
                    );
                }
            }
            lines + "\r\n"
        }

        /// The head of a PUT of a new object (`n` makes its S3 key).
        fn put_head(&self, len: usize, n: &str) -> String {
            match self.api {
                Api::Blob => self.head("POST", "/v1/blobs", Some(len)),
                Api::S3 => self.head("PUT", &format!("/{BUCKET}/o-{n}"), Some(len)),
            }
        }

        fn put_status(&self) -> u16 {
            match self.api {
                Api::Blob => 201,
                Api::S3 => 200,
            }
        }
    }

    /// Creates the S3 target's bucket.
    pub async fn create_bucket(target: &Target<'_>) -> anyhow::Result<()> {
        let mut conn = connect(target).await?;
        let (status, answer) = exchange(&mut conn, &target.head("PUT", &format!("/{BUCKET}"), Some(0)), &[]).await?;
        anyhow::ensure!(status == 200, "CreateBucket answered {status}: {}", String::from_utf8_lossy(&answer));
        Ok(())
    }

    trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

    async fn connect(target: &Target<'_>) -> anyhow::Result<BufReader<Box<dyn Stream>>> {
        let tcp = tokio::net::TcpStream::connect(target.addr).await?;
        tcp.set_nodelay(true)?;
        let stream: Box<dyn Stream> = match target.tls {
            None => Box::new(tcp),
            Some(Tls(connector)) => {
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?.to_owned();
                Box::new(connector.connect(name, tcp).await?)
            }
        };
        Ok(BufReader::with_capacity(64 * 1024, stream))
    }

    /// One request on `conn`: (status, body).
    async fn exchange(
        conn: &mut BufReader<Box<dyn Stream>>,
        head: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        conn.get_mut().write_all(head.as_bytes()).await?;
        conn.get_mut().write_all(body).await?;
        conn.get_mut().flush().await?;
        let mut line = String::new();
        conn.read_line(&mut line).await?;
        let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut length = 0usize;
        loop {
            line.clear();
            anyhow::ensure!(conn.read_line(&mut line).await? > 0, "connection closed");
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse()?;
            }
        }
        let mut out = vec![0u8; length];
        conn.read_exact(&mut out).await?;
        Ok((status, out))
    }

    /// One PUT: the path to GET it from.
    pub async fn put(target: &Target<'_>, body: &[u8]) -> anyhow::Result<String> {
        let mut conn = connect(target).await?;
        let (status, answer) = exchange(&mut conn, &target.put_head(body.len(), "get"), body).await?;
        anyhow::ensure!(status == target.put_status(), "PUT answered {status}: {}", String::from_utf8_lossy(&answer));
        Ok(match target.api {
            Api::Blob => {
                let v: serde_json::Value = serde_json::from_slice(&answer)?;
                format!("/v1/blobs/{}", v["id"].as_str().unwrap_or_default())
            }
            Api::S3 => format!("/{BUCKET}/o-get"),
        })
    }

    /// Tells one run of [`put_throughput`] from another: each run PUTs new S3 keys (a blob PUT
    /// always makes a new blob; an overwrite is a different operation, with its own cost).
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    /// PUTs of `size` bytes from `clients` connections for `duration`: ops/s.
    pub async fn put_throughput(
        target: &Target<'_>,
        size: usize,
        clients: usize,
        duration: Duration,
    ) -> anyhow::Result<f64> {
        let body = vec![0x17u8; size];
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = Instant::now();
        let runs = (0..clients).map(|client| {
            let body = &body;
            async move {
                let mut conn = connect(target).await?;
                let mut done = 0u64;
                while started.elapsed() < duration {
                    let head = target.put_head(size, &format!("{run}-{client}-{done}"));
                    let (status, _) = exchange(&mut conn, &head, body).await?;
                    anyhow::ensure!(status == target.put_status(), "PUT answered {status}");
                    done += 1;
                }
                anyhow::Ok(done)
            }
        });
        let done: u64 = futures::future::try_join_all(runs).await?.into_iter().sum();
        Ok(done as f64 / started.elapsed().as_secs_f64())
    }

    /// `rounds` GETs of `path` on one connection: ms each (a request signed anew each time).
    pub async fn get_latency(target: &Target<'_>, path: &str, len: usize, rounds: usize) -> anyhow::Result<Vec<f64>> {
        let mut conn = connect(target).await?;
        let mut samples = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let started = Instant::now();
            let head = target.head("GET", path, None);
            let (status, body) = exchange(&mut conn, &head, &[]).await?;
            anyhow::ensure!(status == 200 && body.len() == len, "GET answered {status} with {} bytes", body.len());
            samples.push(started.elapsed().as_secs_f64() * 1e3);
        }
        Ok(samples)
    }
}

async fn wait_healthy(client: &HttpClient, addr: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let uri: hyper::Uri = format!("http://{addr}/healthz").parse()?;
        if let Ok(r) = client.get(uri).await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "datanode did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn put_once(client: &HttpClient, addr: &str, body: Bytes) -> anyhow::Result<String> {
    let request = hyper::Request::post(format!("http://{addr}/v1/blobs"))
        .header(hyper::header::AUTHORIZATION, cairn_testkit::keys::authorization())
        .body(Full::new(body))?;
    let response = client.request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    anyhow::ensure!(status == 201, "PUT answered {status}: {}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    Ok(v["id"].as_str().unwrap_or_default().to_owned())
}

/// GETs over one keep-alive connection with the same minimal client as the sendfile reference
/// (request out, exactly Content-Length bytes in), so that only the servers differ: ms each.
fn raw_get_latency(addr: &str, id: &str, len: usize, rounds: usize) -> anyhow::Result<Vec<f64>> {
    use std::io::{BufRead, BufReader, Read, Write};
    let stream = std::net::TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let request = format!(
        "GET /v1/blobs/{id} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {}\r\n\r\n",
        cairn_testkit::keys::authorization()
    );
    let mut body = vec![0u8; len];
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        writer.write_all(request.as_bytes())?;
        let mut content_length = None;
        let mut line = String::new();
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            if line == "\r\n" {
                break;
            }
            anyhow::ensure!(!line.is_empty(), "connection closed");
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                content_length = Some(v.trim().parse::<usize>()?);
            }
        }
        anyhow::ensure!(content_length == Some(len), "unexpected Content-Length {content_length:?}");
        reader.read_exact(&mut body)?;
        samples.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(samples)
}

/// PUTs of `size` bytes from `clients` concurrent connections for `duration`, spread over
/// `addrs`: ops/s, and the ids stored.
pub async fn put_throughput(
    client: &HttpClient,
    addrs: &[String],
    size: usize,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<(f64, Vec<String>)> {
    let body = Bytes::from(vec![0x17u8; size]);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (client, addr, body) = (client.clone(), addrs[c % addrs.len()].clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while started.elapsed() < duration {
                ids.push(put_once(&client, &addr, body.clone()).await?);
            }
            anyhow::Ok(ids)
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await??);
    }
    Ok((ids.len() as f64 / started.elapsed().as_secs_f64(), ids))
}

/// GETs of random ids from `clients` concurrent connections for `duration`, spread over
/// `addrs`: (ops/s, bytes/s).
pub async fn get_throughput(
    client: &HttpClient,
    addrs: &[String],
    ids: &[String],
    clients: usize,
    duration: Duration,
) -> anyhow::Result<(f64, f64)> {
    let ids = Arc::new(ids.to_vec());
    let done = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (client, addr, ids, done, bytes) =
            (client.clone(), addrs[c % addrs.len()].clone(), ids.clone(), done.clone(), bytes.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = c * 7919;
            while started.elapsed() < duration {
                i = (i + 104_729) % ids.len();
                let uri: hyper::Uri = format!("http://{addr}/v1/blobs/{}", ids[i]).parse()?;
                let response = client.request(authorized_get(uri)).await?;
                anyhow::ensure!(response.status() == 200, "GET answered {}", response.status());
                let body = response.into_body().collect().await?.to_bytes();
                bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok((done.load(Ordering::Relaxed) as f64 / secs, bytes.load(Ordering::Relaxed) as f64 / secs))
}

/// Fills a volume with `blobs` small blobs in-process, closes it, and times the reopen.
async fn open_volume(dir: &Path, blobs: u64) -> anyhow::Result<(f64, f64)> {
    let marker = VolumeMarker::new(0, 1 << 30, 64 << 30)?;
    let config = VolumeConfig {
        compaction: CompactionConfig { enabled: false, ..CompactionConfig::default() },
        ..VolumeConfig::default()
    };
    let volume = Arc::new(Volume::create_or_open(dir, &marker, config.clone(), Arc::new(EngineMetrics::default()))?);
    let fill_started = Instant::now();
    let payload = Bytes::from_static(b"0123456789abcdef");
    let mut written = 0u64;
    while written < blobs {
        let batch = (blobs - written).min(4096);
        let mut tasks = Vec::with_capacity(batch as usize);
        for _ in 0..batch {
            let (volume, payload) = (volume.clone(), payload.clone());
            tasks.push(tokio::spawn(async move {
                let req = PutRequest {
                    blob_id: BlobId::generate(0),
                    meta: BlobMeta::default(),
                    payload,
                    created_ms: now_ms(),
                    expiry_ms: None,
                };
                volume.put(req).await
            }));
        }
        for t in tasks {
            t.await??;
        }
        written += batch;
    }
    let fill_secs = fill_started.elapsed().as_secs_f64();
    volume.close();
    drop(volume);
    let dir = dir.to_owned();
    let open_secs = tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let started = Instant::now();
        let volume = Volume::open(&dir, config, Arc::new(EngineMetrics::default()))?;
        let secs = started.elapsed().as_secs_f64();
        volume.close();
        Ok(secs)
    })
    .await??;
    Ok((open_secs, fill_secs))
}
