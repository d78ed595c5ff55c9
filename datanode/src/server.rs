//! Runs a datanode: opens the store, serves the API, shuts down cleanly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::engine::VolumeConfig;
use crate::metrics::Metrics;
use crate::store::{StandaloneLayout, Store};

pub struct StandaloneOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub layout: StandaloneLayout,
    pub volume: VolumeConfig,
}

/// Serves until `shutdown` is cancelled, then drains requests and checkpoints every volume.
pub async fn run_standalone(options: StandaloneOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&options.data_dir)?;
    let metrics = Arc::new(Metrics::default());
    let store = {
        let (dir, layout, volume, metrics) =
            (options.data_dir.clone(), options.layout.clone(), options.volume.clone(), metrics.clone());
        tokio::task::spawn_blocking(move || Store::open_standalone(&dir, &layout, &volume, metrics)).await??
    };
    let store = Arc::new(store);
    let state = AppState { store: store.clone(), metrics, max_blob_bytes: options.volume.max_blob_bytes };
    let listener = tokio::net::TcpListener::bind(options.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, data_dir = %options.data_dir.display(), "cairn-datanode serving");
    axum::serve(listener, api::router(state)).with_graceful_shutdown(async move { shutdown.cancelled().await }).await?;
    tokio::task::spawn_blocking(move || store.close()).await?;
    tracing::info!("cairn-datanode stopped");
    Ok(())
}
