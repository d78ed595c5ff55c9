//! `cairn-disk-agent`: `scan` prints one report; `serve` runs the node API (and, on Kubernetes,
//! keeps this node's StoreNode up to date); `forget` drops a recorded disk.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cairn_common::agent_api::NodeReport;
use cairn_disk_agent::config::AgentConfig;
use cairn_disk_agent::identity::RecordedDisks;
use cairn_disk_agent::k8s::StoreNodePublisher;
use cairn_disk_agent::{api, Agent, AgentOptions};
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "cairn-disk-agent",
    version,
    about = "Cairn disk agent: disks, the volumes on them, the space allocated to them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Common {
    /// mountinfo to read; inside a pod, the host's (/proc/1/mountinfo with hostPID, or a mount of it).
    #[arg(long, env = "CAIRN_MOUNTINFO", default_value = "/proc/1/mountinfo")]
    mountinfo: PathBuf,
    /// Where the host's /dev is (in a container: a mount of it, e.g. /host/dev; the container's
    /// own /dev stays its own).
    #[arg(long, env = "CAIRN_HOST_DEV", default_value = "/dev")]
    host_dev: PathBuf,
    /// Configuration file (YAML): disk selector, headroom.
    #[arg(long, env = "CAIRN_DISK_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Where the agent records which disk it found at which mount.
    #[arg(long, env = "CAIRN_STATE_DIR", default_value = cairn_disk_agent::identity::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// This node's name (on Kubernetes, the Node's name).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Print one report and exit; changes nothing.
    Scan {
        #[command(flatten)]
        common: Common,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Also list the pseudo filesystems (proc, sysfs, cgroup, …) in the table.
        #[arg(long)]
        all: bool,
    },
    /// Serve the node API on two unix sockets: datanodes' and the admin's.
    Serve {
        #[command(flatten)]
        common: Common,
        /// The datanodes' socket: each sees and makes only its own cluster's volumes, never deletes.
        #[arg(long, env = "CAIRN_AGENT_SOCKET", default_value = cairn_common::agent_api::NODE_SOCKET)]
        socket: PathBuf,
        /// The admin socket (mode 0600): everything, deletes too. Keep it out of datanode Pods.
        #[arg(long, env = "CAIRN_AGENT_ADMIN_SOCKET", default_value = cairn_common::agent_api::ADMIN_SOCKET)]
        admin_socket: PathBuf,
        /// Publish a StoreNode: `auto` does when running in a pod.
        #[arg(long, value_enum, default_value_t = Kubernetes::Auto)]
        kubernetes: Kubernetes,
        /// Seconds between rescans (a change is published at once).
        #[arg(long, default_value_t = 60)]
        interval_secs: u64,
    },
    /// Forget the disk recorded at a mount, to accept a different disk there.
    Forget {
        #[arg(long, env = "CAIRN_STATE_DIR", default_value = cairn_disk_agent::identity::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[arg(long)]
        mount: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Json,
    Table,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Kubernetes {
    Auto,
    On,
    Off,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        // Colours only on a terminal: log files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairn-disk-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn agent_options(common: Common, record: bool) -> anyhow::Result<AgentOptions> {
    let config = match &common.config {
        Some(path) => AgentConfig::load(path)?,
        None => AgentConfig::default(),
    };
    let node_name = match common.node_name {
        Some(name) => name,
        None => rustix::system::uname().nodename().to_string_lossy().into_owned(),
    };
    // `scan` reads the record when there is one, to report conflicts, but never writes it.
    let state_dir = (record || common.state_dir.exists()).then_some(common.state_dir);
    Ok(AgentOptions { node_name, mountinfo: common.mountinfo, host_dev: common.host_dev, config, state_dir })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Scan { common, output, all } => {
            let agent = Agent::new(agent_options(common, false)?)?;
            let report = agent.scan()?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Output::Table => print_table(&report, all),
            }
            Ok(())
        }
        Command::Serve { common, socket, admin_socket, kubernetes, interval_secs } => {
            let agent = Arc::new(Agent::new(agent_options(common, true)?)?);
            let runtime = tokio::runtime::Runtime::new()?;
            let sockets = Sockets { node: socket, admin: admin_socket };
            runtime.block_on(serve(agent, sockets, kubernetes, Duration::from_secs(interval_secs.max(1))))
        }
        Command::Forget { state_dir, mount } => {
            let mut record = RecordedDisks::load(&state_dir)?;
            match record.disks.remove(&mount) {
                Some(disk) => {
                    record.save(&state_dir)?;
                    println!("forgot disk {} at {mount}", disk.disk_id);
                    Ok(())
                }
                None => {
                    let recorded: Vec<&str> = record.disks.keys().map(String::as_str).collect();
                    anyhow::bail!(
                        "no disk is recorded at {mount} in the state directory {} (recorded: {})",
                        state_dir.display(),
                        if recorded.is_empty() { "none".to_owned() } else { recorded.join(", ") }
                    )
                }
            }
        }
    }
}

struct Sockets {
    node: PathBuf,
    admin: PathBuf,
}

async fn serve(agent: Arc<Agent>, sockets: Sockets, kubernetes: Kubernetes, interval: Duration) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let on_kubernetes = match kubernetes {
        Kubernetes::On => true,
        Kubernetes::Off => false,
        Kubernetes::Auto => std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
    };
    let publisher = if on_kubernetes {
        let client = kube::Client::try_default().await?;
        Some(StoreNodePublisher::new(client, &agent.options().node_name))
    } else {
        None
    };
    let first = tokio::task::spawn_blocking({
        let agent = agent.clone();
        move || agent.refresh()
    })
    .await??;
    tracing::info!(disks = first.0.disks.len(), excluded = first.0.excluded.len(), "first scan");

    let scanner = tokio::spawn({
        let (agent, shutdown) = (agent.clone(), shutdown.clone());
        async move {
            loop {
                let report = {
                    let agent = agent.clone();
                    tokio::task::spawn_blocking(move || agent.refresh()).await
                };
                match report {
                    Ok(Ok((report, _))) => {
                        // The publisher compares with the server's copy, so a periodic call
                        // writes nothing when nothing changed, and repairs a status edited by hand.
                        if let Some(publisher) = &publisher {
                            if let Err(e) = publisher.publish(&report).await {
                                tracing::warn!(error = %e, "publishing the StoreNode failed");
                            }
                        }
                    }
                    Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "scan failed"),
                    Err(e) => tracing::error!(error = %e, "scan task failed"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = agent.changed().notified() => {}
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        }
    });
    let signals = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            shutdown.cancel();
        }
    });
    let served = api::serve(agent, &sockets.node, &sockets.admin, shutdown.clone()).await;
    shutdown.cancel();
    let _ = scanner.await;
    signals.abort();
    served
}

fn print_table(report: &NodeReport, all: bool) {
    print!("{}", cairn_common::text::disk_table(&report.disks, &report.excluded, &report.missing, all, ""));
}
