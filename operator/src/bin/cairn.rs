//! `cairn`: the command-line tool. `cairn topology apply|show` manage a cluster's topology in
//! etcd directly (useful without Kubernetes).

use std::path::PathBuf;

use cairn_cluster::etcd::ClusterStore;
use cairn_cluster::topology::TopologyFile;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "cairn", version, about = "Cairn distributed blob store")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Target {
    /// etcd endpoints, comma-separated.
    #[arg(long, env = "CAIRN_ETCD", value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    #[arg(long, env = "CAIRN_CLUSTER")]
    cluster: String,
    #[arg(long, env = "CAIRN_NAMESPACE", default_value = "default")]
    namespace: String,
    #[command(flatten)]
    tls: cairn_cluster::etcd::EtcdTlsArgs,
}

impl Target {
    async fn store(&self) -> anyhow::Result<ClusterStore> {
        let tls = self.tls.load()?;
        Ok(ClusterStore::connect_tls(&self.etcd, &self.namespace, &self.cluster, tls.as_ref()).await?)
    }
}

#[derive(Subcommand)]
enum Command {
    /// The topology in etcd.
    Topology {
        #[command(subcommand)]
        command: TopologyCommand,
    },
    /// A whole cluster on this machine, without Kubernetes.
    Local {
        #[command(subcommand)]
        command: LocalCommand,
    },
    /// Volumes on this machine, through its disk agent.
    Volumes {
        #[command(subcommand)]
        command: VolumesCommand,
    },
}

#[derive(Subcommand)]
enum LocalCommand {
    /// Start etcd, a disk agent and the datanodes of the StoreCluster in FILE; Ctrl-C stops them.
    Up {
        #[arg(short = 'f', long, default_value = "examples/local.yaml")]
        file: PathBuf,
        /// Data, state and logs (a second start reuses them).
        #[arg(long, default_value = ".cairn-local")]
        dir: PathBuf,
        /// Local machines, one datanode each.
        #[arg(long, default_value_t = 3)]
        machines: usize,
        /// Quota of each machine's directory disk.
        #[arg(long, default_value = "2GiB")]
        disk_size: String,
        /// Port of the first datanode's blob API; the others follow.
        #[arg(long, default_value_t = 7480)]
        port: u16,
        /// etcd's client port (the peer port is the next one).
        #[arg(long, default_value_t = 23790)]
        etcd_port: u16,
    },
}

#[derive(Subcommand)]
enum VolumesCommand {
    /// Delete every volume of CLUSTER on this machine (a cluster deleted with deletionPolicy Delete).
    Purge {
        #[arg(long, env = "CAIRN_DISK_AGENT", default_value = "/run/cairn/disk-agent.sock")]
        disk_agent: PathBuf,
        #[arg(long)]
        cluster: String,
    },
}

#[derive(Subcommand)]
enum TopologyCommand {
    /// Plan replica placement for the nodes in FILE and write it (idempotent).
    Apply {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'f', long)]
        file: PathBuf,
    },
    /// Print what etcd holds.
    Show {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

fn main() -> std::process::ExitCode {
    match tokio::runtime::Runtime::new().map_err(anyhow::Error::from).and_then(|rt| rt.block_on(run(Cli::parse()))) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairn: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Topology { command: TopologyCommand::Apply { target, file } } => {
            let text = std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let (config, nodes) = TopologyFile::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let store = target.store().await?;
            let topology = store.apply_topology(&config, &nodes).await?;
            println!(
                "cluster {}: {} nodes, {} partitions × {} replicas placed",
                target.cluster,
                topology.nodes.len(),
                topology.partitions.len(),
                config.replication_factor
            );
            Ok(())
        }
        Command::Local { command: LocalCommand::Up { file, dir, machines, disk_size, port, etcd_port } } => {
            let text = std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let cluster: cairn_resources::StoreCluster = serde_yaml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: not a StoreCluster: {e}", file.display()))?;
            anyhow::ensure!(
                machines >= cluster.spec.replication_factor as usize,
                "replicationFactor {} needs at least that many --machines",
                cluster.spec.replication_factor
            );
            let dir = std::path::absolute(&dir)?;
            let options = cairn_operator::local_up::LocalOptions { dir, machines, disk_size, port, etcd_port };
            cairn_operator::local_up::up(cluster, options).await
        }
        Command::Volumes { command: VolumesCommand::Purge { disk_agent, cluster } } => {
            let agent = cairn_common::agent_client::AgentClient::new(&disk_agent);
            let mut deleted = 0;
            for volume in agent.list_volumes().await? {
                if cairn_cluster::Topology::is_volume_of(&cluster, &volume.name) {
                    agent.delete_volume(&volume.name).await?;
                    println!("deleted volume {} on disk {}", volume.name, volume.disk);
                    deleted += 1;
                }
            }
            println!("{deleted} volume(s) deleted");
            Ok(())
        }
        Command::Topology { command: TopologyCommand::Show { target, output } } => {
            let store = target.store().await?;
            let snapshot = store.load().await?;
            let value = serde_json::json!({"topology": snapshot.topology, "live": snapshot.live, "revision": snapshot.revision});
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&value)?),
                Output::Yaml => print!("{}", serde_yaml::to_string(&value)?),
                Output::Table => {
                    let t = &snapshot.topology;
                    match &t.config {
                        Some(c) => println!(
                            "cluster {} (revision {}): rf {} quorum {} partitions {} volume {} B segment {} B",
                            target.cluster,
                            snapshot.revision,
                            c.replication_factor,
                            c.write_quorum,
                            c.partitions,
                            c.volume_size_bytes,
                            c.segment_size_bytes
                        ),
                        None => println!("cluster {}: no topology in etcd", target.cluster),
                    }
                    println!("{:<16} {:<8} {:<24} {:<6} disks", "node", "zone", "address", "live");
                    for n in t.nodes.values() {
                        let disks: Vec<String> =
                            n.disks.iter().map(|d| format!("{}={}", d.id, d.capacity_bytes)).collect();
                        let live = if snapshot.live.contains_key(&n.id) { "yes" } else { "no" };
                        println!("{:<16} {:<8} {:<24} {:<6} {}", n.id, n.zone, n.address, live, disks.join(","));
                    }
                    println!("{:<10} {:<10} replicas", "partition", "state");
                    for p in t.partitions.values() {
                        let replicas: Vec<String> =
                            p.replicas.iter().map(|r| format!("{}/{}", r.node, r.disk)).collect();
                        println!("{:<10} {:<10} {}", p.id, format!("{:?}", p.state).to_lowercase(), replicas.join(" "));
                    }
                }
            }
            Ok(())
        }
    }
}
