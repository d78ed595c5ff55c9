use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use cairn_cluster::access::{AccessKey, Scope, Secret};
use cairn_cluster::AuthMode;
use cairn_common::volume_layout::Preallocation;
use cairn_datanode::api::auth::AuthOptions;
use cairn_datanode::api::serve::ServerLimits;
use cairn_datanode::cluster::ClusterOptions;
use cairn_datanode::engine::{ChunkCache, VolumeConfig};
use cairn_datanode::server::{
    run_cluster, run_standalone, HttpOptions, S3Settings, StandaloneAuth, StandaloneOptions, VolumeSource,
};
use cairn_datanode::store::StandaloneLayout;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Cairn datanode. With --data-dir and --listen alone it runs one standalone node.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// etcd endpoints (comma-separated): join a cluster instead of running standalone.
    #[arg(long, env = "CAIRN_ETCD", value_delimiter = ',', requires_all = ["cluster", "node_id"])]
    etcd: Vec<String>,
    /// The cluster's name.
    #[arg(long, env = "CAIRN_CLUSTER")]
    cluster: Option<String>,
    /// Namespace of the cluster in etcd (the Kubernetes namespace on Kubernetes).
    #[arg(long, env = "CAIRN_NAMESPACE", default_value = "default")]
    namespace: String,
    /// This node's id in the topology.
    #[arg(long, env = "CAIRN_NODE_ID")]
    node_id: Option<String>,
    /// This node's zone.
    #[arg(long, env = "CAIRN_ZONE", default_value = "")]
    zone: String,
    /// host:port other nodes reach this one at (default: the listen address).
    #[arg(long, env = "CAIRN_ADVERTISE")]
    advertise: Option<String>,
    /// Serve the replica routes (and peers' reads) on this address only, apart from the blob API
    /// on --listen, so that a firewall or NetworkPolicy can keep them to the cluster's datanodes.
    #[arg(long, env = "CAIRN_PEER_LISTEN", requires = "etcd")]
    peer_listen: Option<SocketAddr>,
    /// host:port peers reach --peer-listen at (default: --advertise's host and --peer-listen's port).
    #[arg(long, env = "CAIRN_PEER_ADVERTISE", requires = "peer_listen")]
    peer_advertise: Option<String>,
    /// Mutual TLS on the peer port and in calls to peers: the cluster CA's certificate (PEM).
    #[arg(long, env = "CAIRN_PEER_TLS_CA", requires_all = ["peer_listen", "peer_tls_cert", "peer_tls_key"])]
    peer_tls_ca: Option<PathBuf>,
    /// This node's certificate from the cluster CA (PEM; reloaded when the file changes).
    #[arg(long, env = "CAIRN_PEER_TLS_CERT", requires = "peer_tls_ca")]
    peer_tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "CAIRN_PEER_TLS_KEY", requires = "peer_tls_ca")]
    peer_tls_key: Option<PathBuf>,
    #[command(flatten)]
    etcd_tls: cairn_cluster::etcd::EtcdTlsArgs,
    /// Seconds between two anti-entropy passes of a replica against each peer (comparing id
    /// digests; cheap when they are equal). Each pass is jittered by ±20 %.
    #[arg(long, env = "CAIRN_ANTI_ENTROPY_INTERVAL", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    anti_entropy_interval_secs: u64,
    /// Journal entries each replica keeps at most, whatever its peers have pulled (entries every
    /// peer has pulled are dropped sooner); a peer further behind bootstraps from the index.
    #[arg(long, env = "CAIRN_JOURNAL_RETAIN_ENTRIES", default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    journal_retain_entries: u64,
    /// Timeout of one request to another datanode, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    peer_timeout_ms: u64,
    /// Directory holding this node's volumes (made by the node itself).
    #[arg(long, env = "CAIRN_DATA_DIR", required_unless_present = "disk_agent", conflicts_with = "disk_agent")]
    data_dir: Option<PathBuf>,
    /// Get the volumes from the machine's disk agent at this unix socket instead.
    #[arg(long, env = "CAIRN_DISK_AGENT")]
    disk_agent: Option<PathBuf>,
    /// With --disk-agent: the disk to ask for (default: the one with most allocatable space).
    #[arg(long, requires = "disk_agent")]
    disk: Option<String>,
    /// With --disk-agent: volumes are named <prefix>-p<partition>.
    #[arg(long, default_value = "datanode", requires = "disk_agent")]
    volume_prefix: String,
    /// With --disk-agent on a standalone node: the token its volumes are bound to at the agent
    /// (default: derived from the root key). A cluster's nodes take theirs from etcd.
    #[arg(long, env = "CAIRN_DISK_AGENT_TOKEN", requires = "disk_agent", hide_env_values = true)]
    disk_agent_token: Option<String>,
    /// Address of the blob API.
    #[arg(long, env = "CAIRN_LISTEN", default_value = "127.0.0.1:7480")]
    listen: SocketAddr,
    /// Partitions (one volume each) of a new standalone node (default 1); fixed once created:
    /// a restart opens what the node has, and a different number is refused.
    #[arg(long, env = "CAIRN_PARTITIONS")]
    partitions: Option<u32>,
    /// Capacity of each new volume.
    #[arg(long, env = "CAIRN_VOLUME_SIZE", default_value = "16GiB")]
    volume_size: ByteSize,
    /// Size of each preallocated log segment of a new volume.
    #[arg(long, env = "CAIRN_SEGMENT_SIZE", default_value = "1GiB")]
    segment_size: ByteSize,
    /// Largest blob accepted.
    #[arg(long, default_value = "64MiB")]
    max_blob_size: ByteSize,
    /// Write zeros where the filesystem has no fallocate (slow).
    #[arg(long)]
    zero_fill_fallback: bool,
    /// Compaction copy rate limit, per volume.
    #[arg(long, default_value = "64MiB")]
    compaction_rate: ByteSize,
    /// Memory for verified chunks of large blobs, shared by all volumes (0 turns it off):
    /// repeated GETs of a hot blob skip the read and checksum.
    #[arg(long, default_value = "256MiB")]
    chunk_cache_size: ByteSize,
    /// New blobs are refused while a volume's filesystem has less than this free, so that
    /// deletes and TTL updates still have room in the index; writes resume by themselves.
    #[arg(long, default_value = "16MiB")]
    index_reserve: ByteSize,
    /// Request bodies held in memory at once, across all uploads; an upload that finds no room
    /// within --upload-wait-ms gets 503 with Retry-After.
    #[arg(long, default_value = "512MiB")]
    upload_buffer: ByteSize,
    #[arg(long, default_value_t = 10_000)]
    upload_wait_ms: u64,
    /// Open connections at most (one more gets 503 and is closed).
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Seconds a client has to send a request's headers (also the keep-alive idle limit).
    #[arg(long, default_value_t = 30)]
    header_timeout_secs: u64,
    /// Longest pause, in seconds, between two pieces of a request body.
    #[arg(long, default_value_t = 30)]
    body_timeout_secs: u64,
    /// Seconds SIGTERM waits for requests in flight before closing their connections.
    #[arg(long, default_value_t = 20)]
    drain_timeout_secs: u64,
    /// The index is made durable at least this often while writes flow; a crash replays the
    /// log written since (at most this long, or 128 MiB).
    #[arg(long, default_value_t = 1000)]
    checkpoint_interval_ms: u64,
    /// Seconds between compaction passes.
    #[arg(long, default_value_t = 60)]
    compaction_interval_secs: u64,
    /// A standalone node's auth: `keys` (a bearer token of an access key on every blob route)
    /// or `none` (anyone: a playground only). A cluster's is in its config.
    #[arg(long, env = "CAIRN_AUTH", value_enum, default_value = "keys")]
    auth: AuthMode,
    /// A standalone node's root (admin) key id; without it the node makes one, kept in
    /// DATA_DIR/root-token.
    #[arg(long, env = "CAIRN_ROOT_KEY_ID", requires = "root_key_secret", conflicts_with = "root_key_file")]
    root_key_id: Option<String>,
    /// The root key's secret, 40 letters and digits (prefer the environment variable or
    /// --root-key-file: a command line is visible to every user of the machine).
    #[arg(long, env = "CAIRN_ROOT_KEY_SECRET", requires = "root_key_id", hide_env_values = true)]
    root_key_secret: Option<String>,
    /// A file holding the root key's token, `<key id>.<secret>` (e.g. a mounted Secret).
    #[arg(long, env = "CAIRN_ROOT_KEY_FILE")]
    root_key_file: Option<PathBuf>,
    /// Serve the blob API over HTTPS with this certificate chain (PEM, leaf first; reread every
    /// 2 s). In a cluster it needs --peer-listen.
    #[arg(long, env = "CAIRN_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "CAIRN_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Ask for an admin key (or the node token) on /metrics.
    #[arg(long, env = "CAIRN_PROTECT_METRICS")]
    protect_metrics: bool,
    /// Ask for an admin key (or the node token) on /openapi.json.
    #[arg(long, env = "CAIRN_PROTECT_OPENAPI")]
    protect_openapi: bool,
    /// Failed authentications an address (or a key id) may make at once before 429s; then 2 a
    /// second.
    #[arg(long, default_value_t = cairn_datanode::api::auth::DEFAULT_FAILURE_BURST)]
    auth_failure_burst: u32,
    /// Serve the S3-compatible API on this address too (a standalone node; docs/s3.md). It
    /// speaks HTTPS when the blob API does.
    #[arg(long, env = "CAIRN_S3_LISTEN")]
    s3_listen: Option<SocketAddr>,
    /// The region S3 clients sign for.
    #[arg(long, env = "CAIRN_S3_REGION", default_value = "us-east-1")]
    s3_region: String,
    /// Virtual-host-style addressing: `<bucket>.<domain>` names a bucket (path-style always works).
    #[arg(long, env = "CAIRN_S3_DOMAIN")]
    s3_domain: Option<String>,
    /// Bytes of an S3 object per stored blob (at most --max-blob-size).
    #[arg(long, default_value = "8MiB")]
    s3_piece_size: ByteSize,
    /// Objects up to this size are kept inside their name record (one write instead of two);
    /// at most --s3-piece-size.
    #[arg(long, default_value = "64KiB")]
    s3_inline_size: ByteSize,
    /// The largest object one PutObject takes.
    #[arg(long, default_value = "5GiB")]
    s3_max_object_size: ByteSize,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairn-datanode: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Lets glibc give the memory of large request bodies back to the system as soon as they are
/// freed. By default its mmap threshold grows to the largest block freed so far (up to 32 MiB),
/// after which bodies come from the heap and a burst of uploads leaves the process large for
/// good. A fixed threshold just above one verified read chunk (1 MiB, cached and reused) keeps
/// chunks on the heap and every larger body in its own mapping, which goes back when freed.
fn return_large_blocks_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1152 * 1024);
        // Fixing the mmap threshold also fixes the trim threshold (128 KiB by default): keep
        // freed heap memory for reuse up to 64 MiB, so that reading 1 MiB chunks does not give
        // pages back and fault them in again on every GET.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

fn run() -> anyhow::Result<()> {
    // Tests built with the `failpoints` feature set faults by the FAILPOINTS environment
    // variable (datanode/tests/failpoints.rs); no build users run has it.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    return_large_blocks_to_the_system();
    // Colours only on a terminal: log files stay plain text.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let args = Args::parse();
    let mut volume = VolumeConfig {
        max_blob_bytes: args.max_blob_size.as_u64(),
        index_reserve_bytes: args.index_reserve.as_u64(),
        checkpoint_interval: Duration::from_millis(args.checkpoint_interval_ms.max(1)),
        ..VolumeConfig::default()
    };
    if args.zero_fill_fallback {
        volume.preallocation = Preallocation::FallocateOrZeroFill;
    }
    volume.compaction.bytes_per_sec = args.compaction_rate.as_u64();
    volume.compaction.interval = std::time::Duration::from_secs(args.compaction_interval_secs);
    if args.chunk_cache_size.as_u64() > 0 {
        volume.chunk_cache = Some(std::sync::Arc::new(ChunkCache::new(args.chunk_cache_size.as_u64())));
    }
    let volume_source = match (args.data_dir, args.disk_agent) {
        (Some(dir), _) => VolumeSource::DataDir(dir),
        (None, Some(socket)) => VolumeSource::DiskAgent { socket, disk: args.disk, prefix: args.volume_prefix },
        (None, None) => unreachable!("clap requires one of them"),
    };
    let cluster = if args.etcd.is_empty() {
        None
    } else {
        Some(ClusterOptions {
            blob_tls: false, // set by run_cluster from --tls-cert
            etcd: args.etcd,
            namespace: args.namespace,
            cluster: args.cluster.expect("clap requires --cluster with --etcd"),
            node_id: args.node_id.expect("clap requires --node-id with --etcd"),
            zone: args.zone,
            peer_advertise: args.peer_listen.map(|peer| {
                args.peer_advertise.clone().unwrap_or_else(|| {
                    let advertise = args.advertise.clone().unwrap_or_else(|| args.listen.to_string());
                    let host = advertise.rsplit_once(':').map_or(advertise.as_str(), |(host, _)| host).to_owned();
                    format!("{host}:{}", peer.port())
                })
            }),
            peer_listen: args.peer_listen,
            peer_tls: match (args.peer_tls_ca, args.peer_tls_cert, args.peer_tls_key) {
                (Some(ca), Some(cert), Some(key)) => Some(cairn_datanode::cluster::PeerTlsFiles { ca, cert, key }),
                _ => None,
            },
            advertise: args.advertise.unwrap_or_else(|| args.listen.to_string()),
            volumes: volume_source.clone(),
            peer_timeout: std::time::Duration::from_millis(args.peer_timeout_ms),
            lease_ttl_secs: 5,
            anti_entropy_interval: std::time::Duration::from_secs(args.anti_entropy_interval_secs),
            journal_retain_entries: args.journal_retain_entries,
            etcd_tls: args.etcd_tls.load()?,
        })
    };
    let admin = || [Scope::Admin].into_iter().collect();
    let root_key = match (args.root_key_id, args.root_key_secret, &args.root_key_file) {
        (Some(id), Some(secret), _) => Some((
            AccessKey::from_parts(&id, &secret, "root", admin()).map_err(|e| {
                anyhow::anyhow!(
                    "--root-key-id/--root-key-secret: {e} (an id is CK and 18 of A-Z0-9, a secret 40 letters and digits)"
                )
            })?,
            Secret::new(secret),
        )),
        (_, _, Some(file)) => {
            let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let (id, secret) = cairn_cluster::access::parse_token(text.trim())
                .map_err(|e| anyhow::anyhow!("--root-key-file {}: {e}", file.display()))?;
            Some((AccessKey::from_parts(id, secret, "root", admin())?, Secret::new(secret.to_string())))
        }
        _ => None,
    };
    let s3 = match args.s3_listen {
        Some(listen) => {
            let piece_bytes = args.s3_piece_size.as_u64();
            anyhow::ensure!(
                (1..=args.max_blob_size.as_u64()).contains(&piece_bytes),
                "--s3-piece-size must be between 1 byte and --max-blob-size ({})",
                args.max_blob_size
            );
            // A name record holds the inline bytes beside the key and metadata (a few KiB).
            anyhow::ensure!(
                args.s3_inline_size.as_u64() <= piece_bytes
                    && args.s3_inline_size.as_u64() + (64 << 10) <= args.max_blob_size.as_u64(),
                "--s3-inline-size must be at most --s3-piece-size ({}) and 64 KiB less than --max-blob-size ({})",
                args.s3_piece_size,
                args.max_blob_size
            );
            Some(S3Settings {
                inline_bytes: args.s3_inline_size.as_u64(),
                listen,
                region: args.s3_region,
                domain: args.s3_domain,
                piece_bytes,
                max_object_bytes: args.s3_max_object_size.as_u64(),
            })
        }
        None => None,
    };
    if cluster.is_some() && (root_key.is_some() || args.auth != AuthMode::Keys) {
        // A cluster's keys and mode are in etcd (`cairn keys`, the config's `auth`).
        tracing::warn!("--auth and --root-key-* are for a standalone node: ignored in a cluster");
    }
    let options = StandaloneOptions {
        volumes: volume_source,
        listen: args.listen,
        layout: StandaloneLayout {
            partitions: args.partitions,
            segment_size: args.segment_size.as_u64(),
            volume_size: args.volume_size.as_u64(),
        },
        volume,
        http: HttpOptions {
            limits: ServerLimits {
                max_connections: args.max_connections.max(1),
                header_timeout: Duration::from_secs(args.header_timeout_secs.max(1)),
                body_timeout: Duration::from_secs(args.body_timeout_secs.max(1)),
                drain_timeout: Duration::from_secs(args.drain_timeout_secs),
            },
            upload_buffer_bytes: args.upload_buffer.as_u64(),
            upload_wait: Duration::from_millis(args.upload_wait_ms),
            auth: AuthOptions {
                protect_metrics: args.protect_metrics,
                protect_openapi: args.protect_openapi,
                failure_burst: args.auth_failure_burst.max(1),
            },
            tls: args.tls_cert.zip(args.tls_key),
        },
        auth: StandaloneAuth {
            mode: args.auth,
            root_key,
            disk_agent_token: args.disk_agent_token.map(cairn_cluster::access::Secret::new),
        },
        s3,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
            signal.cancel();
        });
        match cluster {
            None => run_standalone(options, shutdown).await,
            Some(cluster) => {
                run_cluster(cluster, options.listen, options.volume, options.http, options.s3, shutdown).await
            }
        }
    })
}
