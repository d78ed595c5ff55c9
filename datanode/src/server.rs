//! Runs a datanode: opens the store, serves the API, shuts down cleanly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::cluster::{Cluster, ClusterOptions};
use crate::engine::VolumeConfig;
use crate::metrics::Metrics;
use crate::store::{StandaloneLayout, Store};

pub struct StandaloneOptions {
    pub volumes: VolumeSource,
    pub listen: SocketAddr,
    pub layout: StandaloneLayout,
    pub volume: VolumeConfig,
}

/// Where a node's volumes come from.
#[derive(Debug, Clone)]
pub enum VolumeSource {
    /// Made by the node itself under `DIR/volumes/`, growing segment by segment.
    DataDir(PathBuf),
    /// Asked of the machine's disk agent (fully preallocated, on a disk it reports): one volume
    /// `<prefix>-p<partition>` per partition, on `disk` or else the disk with most room.
    DiskAgent { socket: PathBuf, disk: Option<String>, prefix: String },
}

/// Gets (creating idempotently) this node's volumes from the disk agent: their directories.
async fn volumes_from_agent(
    socket: &std::path::Path,
    disk: Option<&str>,
    prefix: &str,
    layout: &StandaloneLayout,
) -> anyhow::Result<Vec<PathBuf>> {
    use cairn_common::agent_api::CreateVolumeRequest;
    let agent = cairn_common::agent_client::AgentClient::new(socket);
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
    let mut dirs = Vec::new();
    for partition in 0..layout.partitions {
        let name = format!("{prefix}-p{partition}");
        let request = CreateVolumeRequest {
            disk: disk.clone(),
            capacity_bytes: layout.volume_size,
            segment_size_bytes: layout.segment_size,
            partition,
        };
        let answer = agent.create_volume(&name, &request).await?;
        tracing::info!(volume = %name, disk = %disk, created = answer.created, "volume from the disk agent");
        dirs.push(PathBuf::from(answer.volume.path));
    }
    Ok(dirs)
}

/// Serves until `shutdown` is cancelled, then drains requests and checkpoints every volume.
pub async fn run_standalone(options: StandaloneOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let store = match &options.volumes {
        VolumeSource::DataDir(dir) => {
            std::fs::create_dir_all(dir)?;
            let (dir, layout, volume, metrics) =
                (dir.clone(), options.layout.clone(), options.volume.clone(), metrics.clone());
            tokio::task::spawn_blocking(move || Store::open_standalone(&dir, &layout, &volume, metrics)).await??
        }
        VolumeSource::DiskAgent { socket, disk, prefix } => {
            let dirs = volumes_from_agent(socket, disk.as_deref(), prefix, &options.layout).await?;
            let (volume, metrics) = (options.volume.clone(), metrics.clone());
            tokio::task::spawn_blocking(move || Store::open_dirs(&dirs, &volume, metrics)).await??
        }
    };
    let store = Arc::new(store);
    let state =
        AppState { store: store.clone(), metrics, max_blob_bytes: options.volume.max_blob_bytes, cluster: None };
    serve(state, options.listen, shutdown).await
}

/// Serves a node of a cluster: binds first (peers may call as soon as it registers), then joins.
pub async fn run_cluster(
    options: ClusterOptions,
    listen: SocketAddr,
    volume: VolumeConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let store = Arc::new(Store::empty(metrics.clone()));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let cluster = Cluster::start(options, volume.clone(), store.clone(), shutdown.child_token()).await?;
    let state = AppState { store, metrics, max_blob_bytes: volume.max_blob_bytes, cluster: Some(cluster) };
    serve_on(listener, state, shutdown).await
}

async fn serve(state: AppState, listen: SocketAddr, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    serve_on(listener, state, shutdown).await
}

/// Serves until `shutdown`, then drains requests and checkpoints every volume.
async fn serve_on(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let store = state.store.clone();
    tracing::info!(addr = %listener.local_addr()?, cluster = state.cluster.is_some(), "cairn-datanode serving");
    axum::serve(listener, api::router(state)).with_graceful_shutdown(async move { shutdown.cancelled().await }).await?;
    tokio::task::spawn_blocking(move || store.close()).await?;
    tracing::info!("cairn-datanode stopped");
    Ok(())
}
