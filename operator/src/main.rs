//! `cairn-operator run` reconciles StoreClusters; `cairn-operator crdgen [DIR]` writes the CRDs.

use std::sync::Arc;

use cairn_operator::reconcile::{error_policy, reconcile, Context};
use cairn_resources::StoreCluster;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use kube::runtime::{watcher, Controller};
use kube::Api;

#[derive(Parser)]
#[command(name = "cairn-operator", version, about = "Cairn operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile StoreClusters in every namespace.
    Run,
    /// Write every CRD into DIR (default crds/), or print them with `-`.
    Crdgen { dir: Option<String> },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
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
        Command::Run => tokio::runtime::Runtime::new()?.block_on(async {
            let client = kube::Client::try_default().await?;
            let context = Arc::new(Context { client: client.clone(), writes: Default::default() });
            Controller::new(Api::<StoreCluster>::all(client), watcher::Config::default())
                .shutdown_on_signal()
                .run(reconcile, error_policy, context)
                .for_each(|result| async move {
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "reconcile error");
                    }
                })
                .await;
            Ok(())
        }),
    }
}
