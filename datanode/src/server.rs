//! Runs a datanode: opens the store, serves the API, shuts down cleanly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use cairn_cluster::access::{AccessKey, Secret};
use cairn_cluster::AuthMode;

use crate::api::auth::{Auth, AuthOptions};
use crate::api::replica::ReplicaState;
use crate::api::serve::ServerLimits;
use crate::api::upload::UploadBudget;
use crate::api::{self, AppState};
use crate::cluster::{Cluster, ClusterOptions};
use crate::engine::VolumeConfig;
use crate::front::Front;
use crate::metrics::Metrics;
pub use crate::store::VolumeSource;
use crate::store::{StandaloneLayout, Store};

pub struct StandaloneOptions {
    pub volumes: VolumeSource,
    pub listen: SocketAddr,
    pub layout: StandaloneLayout,
    pub volume: VolumeConfig,
    pub http: HttpOptions,
    pub auth: StandaloneAuth,
    /// Serve the S3-compatible API too.
    pub s3: Option<S3Settings>,
}

/// Where and how a standalone node serves S3 (its keys are the node's).
#[derive(Debug, Clone)]
pub struct S3Settings {
    pub listen: SocketAddr,
    pub region: String,
    pub domain: Option<String>,
    pub piece_bytes: u64,
    pub inline_bytes: u64,
    pub max_object_bytes: u64,
}

impl S3Settings {
    /// The S3 front's options: `auth` and `keys` are a standalone node's (a cluster's are its
    /// etcd's).
    fn options(
        &self,
        auth: AuthMode,
        keys: std::collections::BTreeMap<String, crate::api::s3::S3Key>,
        max_blob_bytes: u64,
    ) -> crate::api::s3::S3Options {
        crate::api::s3::S3Options {
            region: self.region.clone(),
            domain: self.domain.clone(),
            auth,
            keys,
            piece_bytes: self.piece_bytes,
            inline_bytes: self.inline_bytes,
            max_object_bytes: self.max_object_bytes,
            max_blob_bytes,
        }
    }
}

async fn bind_s3(s3: &S3Settings) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = bind(s3.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, region = %s3.region, "S3 API serving");
    Ok(listener)
}

/// Who may call a standalone node (a cluster's keys and mode are in etcd).
#[derive(Debug, Clone, Default)]
pub struct StandaloneAuth {
    pub mode: AuthMode,
    /// The root key (admin) given by flags or environment, and its secret (S3 clients sign
    /// with it); without one, a node with a data directory makes its own (`DATA_DIR/root-token`).
    pub root_key: Option<(AccessKey, Secret)>,
    /// The token a node on disk-agent volumes presents to the agent (`--disk-agent-token`);
    /// without one, derived from the root key.
    pub disk_agent_token: Option<cairn_cluster::access::Secret>,
}

/// The HTTP side of a node: connection limits and the memory for request bodies.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub limits: ServerLimits,
    /// Bytes of request bodies held at once, across all uploads (and as much again for replica
    /// writes from other datanodes).
    pub upload_buffer_bytes: u64,
    /// How long an upload waits for room in that buffer before it gets 503.
    pub upload_wait: std::time::Duration,
    /// What is protected beyond the blob API.
    pub auth: AuthOptions,
    /// Serve HTTPS with this certificate chain and key (PEM files): a standalone node only.
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            limits: ServerLimits::default(),
            upload_buffer_bytes: 512 << 20,
            upload_wait: std::time::Duration::from_secs(10),
            auth: AuthOptions::default(),
            tls: None,
        }
    }
}

impl HttpOptions {
    /// The budgets for public uploads and for replica writes.
    fn budgets(&self, max_blob_bytes: u64) -> anyhow::Result<(Arc<UploadBudget>, Arc<UploadBudget>)> {
        anyhow::ensure!(
            self.upload_buffer_bytes >= max_blob_bytes,
            "the upload buffer ({} bytes) must hold at least one blob of the largest size ({max_blob_bytes} bytes)",
            self.upload_buffer_bytes
        );
        let budget = || Arc::new(UploadBudget::new(self.upload_buffer_bytes, self.upload_wait));
        Ok((budget(), budget()))
    }
}

/// Gets (creating idempotently) this node's volumes from the disk agent: their directories.
async fn volumes_from_agent(
    socket: &std::path::Path,
    disk: Option<&str>,
    prefix: &str,
    layout: &StandaloneLayout,
    token: &cairn_cluster::access::Secret,
) -> anyhow::Result<Vec<PathBuf>> {
    use cairn_common::agent_api::CreateVolumeRequest;
    let agent = cairn_common::agent_client::AgentClient::new(socket).as_cluster(prefix, token.expose());
    let disk = match disk {
        Some(disk) => disk.to_owned(),
        None => {
            let capacity = agent.capacity().await?;
            capacity
                .iter()
                .max_by_key(|d| d.allocatable_bytes)
                .map(|d| d.id.clone())
                .ok_or_else(|| anyhow::anyhow!("the disk agent at {} reports no usable disk", socket.display()))?
        }
    };
    // The node's volumes are those the agent has under the prefix; --partitions may only agree.
    let existing = agent
        .list_volumes()
        .await?
        .iter()
        .filter(|v| cairn_cluster::Topology::is_standalone_volume(prefix, &v.name))
        .count() as u32;
    let partitions = match (existing, layout.partitions) {
        (0, asked) => asked.unwrap_or(1),
        (n, Some(asked)) if asked != n => anyhow::bail!(
            "the disk agent holds {n} volume(s) named {prefix}-p*; --partitions {asked} contradicts it \
             (partitions are fixed once created: leave the flag out, or give {n})"
        ),
        (n, _) => n,
    };
    let mut dirs = Vec::new();
    for partition in 0..partitions {
        let name = cairn_common::agent_api::standalone_volume_name(prefix, partition);
        let request = CreateVolumeRequest {
            disk: disk.clone(),
            capacity_bytes: layout.volume_size,
            segment_size_bytes: layout.segment_size,
            partition,
            node: None,
        };
        let answer = agent.create_volume(&name, &request).await?;
        tracing::info!(volume = %name, disk = %disk, created = answer.created, "volume from the disk agent");
        dirs.push(PathBuf::from(answer.volume.path));
    }
    Ok(dirs)
}

/// Serves until `shutdown` is cancelled, then drains requests and checkpoints every volume.
pub async fn run_standalone(options: StandaloneOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Before any volume is asked for: one the flags could not serve is never created.
    let layout = &options.layout;
    cairn_common::volume_layout::check_geometry(layout.volume_size, layout.segment_size, options.volume.max_blob_bytes)
        .map_err(|e| anyhow::anyhow!("{e} (--volume-size, --segment-size, --max-blob-size)"))?;
    let metrics = Arc::new(Metrics::default());
    let store = match &options.volumes {
        VolumeSource::DataDir(dir) => {
            std::fs::create_dir_all(dir)?;
            let (dir, layout, volume, metrics) =
                (dir.clone(), options.layout.clone(), options.volume.clone(), metrics.clone());
            tokio::task::spawn_blocking(move || Store::open_standalone(&dir, &layout, &volume, metrics)).await??
        }
        VolumeSource::DiskAgent { socket, disk, prefix } => {
            let token = match (&options.auth.disk_agent_token, &options.auth.root_key) {
                (Some(token), _) => token.clone(),
                (None, Some((root, _))) => cairn_cluster::access::derived_token(root, "disk-agent"),
                (None, None) => anyhow::bail!(
                    "a node on disk-agent volumes presents a token to the agent: give --disk-agent-token \
                     (or a root key, which it is then derived from)"
                ),
            };
            let dirs = volumes_from_agent(socket, disk.as_deref(), prefix, &options.layout, &token).await?;
            let (volume, metrics) = (options.volume.clone(), metrics.clone());
            tokio::task::spawn_blocking(move || Store::open_dirs(&dirs, &volume, metrics)).await??
        }
    };
    let store = Arc::new(store);
    let (uploads, _) = options.http.budgets(options.volume.max_blob_bytes)?;
    // The root key serves the admin routes in either mode (with `--auth none` the blob routes
    // are open, the admin routes are not).
    let keys: Vec<(AccessKey, Secret)> = match (&options.auth.root_key, &options.volumes) {
        (Some(key), _) => vec![key.clone()],
        (None, VolumeSource::DataDir(dir)) => {
            let (key, secret, path, made) = crate::api::auth::root_key_in(dir)?;
            let verb = if made { "made" } else { "found" };
            tracing::info!(key = %key.id, file = %path.display(), "root key {verb}: send Authorization: Bearer <the file's token>");
            vec![(key, secret)]
        }
        (None, VolumeSource::DiskAgent { .. }) if options.auth.mode == AuthMode::None => Vec::new(),
        (None, VolumeSource::DiskAgent { .. }) => anyhow::bail!(
            "a node on disk-agent volumes has no data directory for its root key: give --root-key-id and \
             --root-key-secret or --root-key-file (or --auth none for a playground)"
        ),
    };
    if options.auth.mode == AuthMode::None {
        tracing::warn!("--auth none: anyone who can reach this node may read, write and delete blobs");
    }
    let tls = https(&options.http, &shutdown)?;
    let listener = bind(options.listen).await?;
    let front = Front::Standalone(store.clone());
    let mut listeners = Vec::new();
    if let Some(s3) = &options.s3 {
        let keys = keys
            .iter()
            .map(|(key, secret)| {
                (key.id.clone(), crate::api::s3::S3Key { secret: secret.clone(), key: Arc::new(key.clone()) })
            })
            .collect();
        let s3_options = s3.options(options.auth.mode, keys, options.volume.max_blob_bytes);
        let s3_state = crate::api::s3::S3State::new(front.clone(), s3_options, uploads.clone());
        listeners.push((bind_s3(s3).await?, crate::api::s3::router(s3_state), tls.clone()));
    }
    let state = AppState {
        front,
        store,
        metrics,
        max_blob_bytes: options.volume.max_blob_bytes,
        uploads,
        auth: Arc::new(Auth::standalone(
            options.auth.mode,
            keys.into_iter().map(|(k, _)| k).collect(),
            &options.http.auth,
        )),
        serves_replica_routes: false,
    };
    listeners.insert(0, (listener, api::router(state.clone(), None), tls));
    serve_on(listeners, state.store, &options.http.limits, shutdown).await
}

/// Serves a node of a cluster: binds first (peers may call as soon as it registers), then joins.
pub async fn run_cluster(
    options: ClusterOptions,
    listen: SocketAddr,
    volume: VolumeConfig,
    http: HttpOptions,
    s3: Option<S3Settings>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Peers never call the blob port when they have one of their own (they are its clients
    // without a certificate to check it by): HTTPS on the blob port needs --peer-listen.
    anyhow::ensure!(
        http.tls.is_none() || options.peer_listen.is_some(),
        "--tls-cert/--tls-key in a cluster need --peer-listen: the datanodes call each other on the peer port"
    );
    let mut options = options;
    options.blob_tls = http.tls.is_some();
    let tls = https(&http, &shutdown)?;
    let metrics = Arc::new(Metrics::default());
    let store = Arc::new(Store::empty(metrics.clone()));
    let (uploads, replica_uploads) = http.budgets(volume.max_blob_bytes)?;
    let listener = bind(listen).await?;
    let peer_listener = match options.peer_listen {
        Some(peer) => Some(bind(peer).await?),
        None => None,
    };
    let peer_tls = match &options.peer_tls {
        Some(files) => {
            let tls = crate::tls::peer_tls(&files.ca, &files.cert, &files.key)?;
            // A renewed node certificate (or CA) is taken within seconds, for serving and for calling.
            tokio::spawn(tls.files.clone().watch(std::time::Duration::from_secs(2), shutdown.clone()));
            tokio::spawn(tls.trust.clone().watch(std::time::Duration::from_secs(2), shutdown.clone()));
            Some(tls)
        }
        None => None,
    };
    let client_tls = peer_tls.as_ref().map(|t| t.client.clone());
    let cluster = Cluster::start(options, volume.clone(), store.clone(), client_tls, shutdown.child_token()).await?;
    let front = Front::Cluster(cluster.clone());
    // Every node serves S3; writes pass on to their name's coordinator (`api::s3::forward`).
    let s3 = match &s3 {
        Some(settings) => {
            let options = settings.options(AuthMode::Keys, Default::default(), volume.max_blob_bytes);
            let state = crate::api::s3::S3State::new(front.clone(), options, uploads.clone());
            Some((bind_s3(settings).await?, state))
        }
        None => None,
    };
    let replica = ReplicaState {
        cluster,
        uploads: replica_uploads,
        shutdown: shutdown.clone(),
        s3: s3.as_ref().map(|(_, state)| state.clone()),
    };
    let state = AppState {
        store,
        metrics,
        max_blob_bytes: volume.max_blob_bytes,
        uploads,
        front,
        auth: Arc::new(Auth::cluster(&http.auth)),
        serves_replica_routes: false,
    };
    let mut listeners = match peer_listener {
        // The blob API without the replica routes; the peer port with everything.
        Some(peer) => vec![
            (listener, api::router(state.clone(), None), tls.clone()),
            (peer, api::router(state.clone(), Some(replica)), peer_tls.map(|t| t.acceptor)),
        ],
        None => vec![(listener, api::router(state.clone(), Some(replica)), tls.clone())],
    };
    if let Some((listener, s3_state)) = s3 {
        listeners.push((listener, crate::api::s3::router(s3_state), tls));
    }
    serve_on(listeners, state.store, &http.limits, shutdown).await
}

/// The blob API's TLS (`--tls-cert`, `--tls-key`), if asked for: a rotated certificate (new
/// files in place) is served within seconds, no restart.
fn https(http: &HttpOptions, shutdown: &CancellationToken) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
    let Some((cert, key)) = &http.tls else { return Ok(None) };
    let (acceptor, files) = crate::tls::tls_acceptor(cert, key)?;
    tokio::spawn(files.watch(std::time::Duration::from_secs(2), shutdown.clone()));
    Ok(Some(acceptor))
}

async fn bind(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))
}

/// Serves each listener its routes until `shutdown`, then drains requests (up to the drain
/// timeout) and checkpoints every volume.
async fn serve_on(
    listeners: Vec<(tokio::net::TcpListener, axum::Router, Option<tokio_rustls::TlsAcceptor>)>,
    store: Arc<Store>,
    limits: &ServerLimits,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Volumes that failed for a full disk are reopened once room is back.
    tokio::spawn({
        let (store, shutdown) = (store.clone(), shutdown.clone());
        async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                }
                let store = store.clone();
                let _ = tokio::task::spawn_blocking(move || store.heal()).await;
            }
        }
    });
    let mut served = Vec::new();
    for (listener, router, tls) in listeners {
        tracing::info!(addr = %listener.local_addr()?, tls = tls.is_some(), "cairn-datanode serving");
        served.push(api::serve::serve(listener, router, limits, tls, shutdown.clone()));
    }
    futures::future::try_join_all(served).await?;
    tokio::task::spawn_blocking(move || store.close()).await?;
    tracing::info!("cairn-datanode stopped");
    Ok(())
}
