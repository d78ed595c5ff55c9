//! `cairn-operator run` reconciles StoreClusters; `cairn-operator crdgen [DIR]` writes the CRDs.

use std::sync::Arc;

use std::time::Duration;

use cairn_operator::leader::LeaderElection;
use cairn_operator::reconcile::{run_controller, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cairn-operator", version, about = "Cairn operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile StoreClusters in every namespace, while this replica holds the leader lease.
    Run {
        /// Namespace of the leader Lease.
        #[arg(long, env = "POD_NAMESPACE", default_value = "cairn-system")]
        lease_namespace: String,
        /// This replica's identity in the Lease.
        #[arg(long, env = "POD_NAME", default_value = "cairn-operator")]
        identity: String,
        /// /metrics and /healthz.
        #[arg(long, default_value = "0.0.0.0:8080")]
        metrics_addr: std::net::SocketAddr,
    },
    /// Write every CRD into DIR (default crds/), or print them with `-`.
    Crdgen { dir: Option<String> },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        // Colours only on a terminal: log files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    match Cli::parse().command {
        Command::Crdgen { dir } => {
            let target = dir.unwrap_or_else(|| "crds".into());
            for (name, yaml) in cairn_resources::crds() {
                if target == "-" {
                    print!("---\n{yaml}");
                } else {
                    std::fs::create_dir_all(&target)?;
                    std::fs::write(std::path::Path::new(&target).join(name), yaml)?;
                }
            }
            Ok(())
        }
        Command::Run { lease_namespace, identity, metrics_addr } => {
            tokio::runtime::Runtime::new()?.block_on(run(lease_namespace, identity, metrics_addr))
        }
    }
}

async fn run(lease_namespace: String, identity: String, metrics_addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    let context = Arc::new(Context::new(client.clone()));
    let registry = Arc::new(context.metrics.registry());
    let listener = tokio::net::TcpListener::bind(metrics_addr).await?;
    let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" })).route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let mut text = String::new();
                let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
                text
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });

    let election =
        LeaderElection::new(client.clone(), &lease_namespace, "cairn-operator", &identity, Duration::from_secs(15));
    // The operator is its container's PID 1: SIGTERM (Pod deletion) as well as Ctrl-C stop it,
    // and the lease is released on the way out so that another replica leads at once.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    tokio::pin!(stop);
    loop {
        loop {
            match election.try_lead().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "taking the leader lease failed"),
            }
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = tokio::time::sleep(election.retry_every()) => {}
            }
        }
        tracing::info!(%identity, "leading: reconciling StoreClusters and StoreAccessKeys");
        context.metrics.leader.set(1);
        let controller = async {
            tokio::join!(
                run_controller(client.clone(), context.clone()),
                cairn_operator::access_keys::run_key_controller(client.clone(), context.clone())
            )
        };
        tokio::select! {
            _ = controller => return Ok(()),
            _ = election.keep_leading() => tracing::warn!("lost the leader lease; stopping until it is ours again"),
            _ = &mut stop => {
                if let Err(e) = election.release().await {
                    tracing::warn!(error = %e, "releasing the leader lease failed");
                }
                tracing::info!("stopped; leader lease released");
                return Ok(());
            }
        }
        context.metrics.leader.set(0);
    }
}
