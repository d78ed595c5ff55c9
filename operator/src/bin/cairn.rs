//! `cairn`: the command-line tool, also installed as the kubectl plugin `kubectl-cairn`.
//! `status`, `disks` and `topology` read a cluster (on Kubernetes, or `--local`); `local up`
//! runs one on this machine; `topology apply` and `volumes purge` act without Kubernetes.
//!
//! Exit status: 0, 1 on an error, 2 when the cluster is Degraded (`status`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cairn_cluster::etcd::ClusterStore;
use cairn_cluster::topology::TopologyFile;
use cairn_operator::inspect::{self, render, Selection, Source};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "cairn", version, about = "Cairn distributed blob store")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which cluster, and how to reach it.
#[derive(clap::Args)]
struct Select {
    /// Kubernetes namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// kubeconfig context.
    #[arg(long)]
    context: Option<String>,
    /// kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// A `cairn local up` cluster instead of Kubernetes (its directory, default .cairn-local).
    #[arg(long, num_args = 0..=1, default_missing_value = ".cairn-local", value_name = "DIR")]
    local: Option<PathBuf>,
    /// etcd endpoints instead of the StoreCluster's, e.g. through `kubectl port-forward`.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    #[command(flatten)]
    tls: cairn_cluster::etcd::EtcdTlsArgs,
}

impl Select {
    fn selection(&self, name: Option<String>) -> anyhow::Result<Selection> {
        Ok(Selection {
            name,
            namespace: self.namespace.clone(),
            context: self.context.clone(),
            kubeconfig: self.kubeconfig.clone(),
            local: self.local.clone(),
            etcd: self.etcd.clone(),
            etcd_tls: self.tls.load()?,
        })
    }
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
    /// A cluster on one screen: phase, conditions, capacity, machines, replication, warnings,
    /// events. Exits 2 when the cluster is Degraded.
    Status {
        /// The StoreCluster (default: the only one in the namespace).
        name: Option<String>,
        #[command(flatten)]
        select: Select,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Follow a long operation (drain, upgrade, scale-out): a line whenever its progress
        /// changes, until the cluster is Ready.
        #[arg(short = 'w', long)]
        watch: bool,
        /// With --watch: give up (exit 1) after this many seconds.
        #[arg(long, requires = "watch")]
        timeout: Option<u64>,
    },
    /// Disk inventories: each disk once with its aliases, excluded mounts with the reason.
    Disks {
        #[command(flatten)]
        select: Select,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Also list the pseudo filesystems (proc, sysfs, cgroup, …) the agent passed over.
        #[arg(long)]
        all: bool,
    },
    /// The topology in etcd, as the datanodes see it; `topology apply` writes one. With a NAME
    /// and --etcd it reads etcd alone (`-n` is then the etcd namespace, default `default`).
    #[command(args_conflicts_with_subcommands = true)]
    Topology {
        #[command(subcommand)]
        command: Option<TopologyCommand>,
        /// The StoreCluster (default: the only one in the namespace).
        name: Option<String>,
        #[command(flatten)]
        select: Select,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
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
    /// Access keys of a cluster's blob API (kept in etcd as hashes; docs/security.md).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

/// Whose keys: a cluster's etcd, or a `cairn local up` cluster.
#[derive(clap::Args)]
struct KeysTarget {
    /// A `cairn local up` cluster (its directory, default .cairn-local) instead of --etcd and
    /// --cluster.
    #[arg(long, num_args = 0..=1, default_missing_value = ".cairn-local", value_name = "DIR", conflicts_with_all = ["etcd", "cluster"])]
    local: Option<PathBuf>,
    /// etcd endpoints, comma-separated.
    #[arg(long, env = "CAIRN_ETCD", value_delimiter = ',', required_unless_present = "local")]
    etcd: Vec<String>,
    #[arg(long, env = "CAIRN_CLUSTER", required_unless_present = "local")]
    cluster: Option<String>,
    #[arg(long, env = "CAIRN_NAMESPACE", default_value = "default")]
    namespace: String,
    #[command(flatten)]
    tls: cairn_cluster::etcd::EtcdTlsArgs,
}

impl KeysTarget {
    /// The cluster's etcd store, and its name.
    async fn store(&self) -> anyhow::Result<(ClusterStore, String)> {
        if let Some(dir) = &self.local {
            let state = cairn_operator::local_up::LocalState::load(dir)?;
            let name = kube::ResourceExt::name_any(&state.cluster);
            let endpoints = state.cluster.spec.etcd.endpoints.clone();
            let store = ClusterStore::connect(&endpoints, cairn_operator::local_up::NAMESPACE, &name).await?;
            return Ok((store, name));
        }
        let cluster = self.cluster.clone().expect("clap requires --cluster without --local");
        let tls = self.tls.load()?;
        Ok((ClusterStore::connect_tls(&self.etcd, &self.namespace, &cluster, tls.as_ref()).await?, cluster))
    }
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a key; its secret is printed once, and only its hash is kept.
    Create {
        #[command(flatten)]
        target: KeysTarget,
        /// What the key is for (shown by `keys list`).
        #[arg(long)]
        name: String,
        /// What it may do, comma-separated: read, write, delete, admin (everything).
        #[arg(long, value_delimiter = ',', required = true)]
        scope: Vec<cairn_cluster::access::Scope>,
        /// Limit the key to the blobs of these partitions (comma-separated, or repeated); its new
        /// blobs go there. Default: every partition.
        #[arg(long = "partition", value_name = "N", value_delimiter = ',')]
        partitions: Vec<u32>,
        /// Limit the key to this S3 bucket (repeat for more): `NAME` grants it the key's scopes
        /// there, `NAME=read` or `NAME=read,write` only those. Such a key is for S3 only (the
        /// blob API refuses it) and cannot be an admin. Default: every bucket.
        #[arg(long = "bucket", value_name = "NAME[=SCOPES]")]
        buckets: Vec<String>,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// The cluster's keys (never their secrets).
    List {
        #[command(flatten)]
        target: KeysTarget,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Revoke a key: every datanode refuses it within seconds.
    Revoke {
        #[command(flatten)]
        target: KeysTarget,
        /// The key's id (CK…).
        id: String,
    },
    /// The S3 access key id and secret access key of a cluster's key, computed here from its
    /// token (`CK….<secret>`, from the argument or standard input): nothing is sent anywhere.
    S3Secret {
        /// The key's token; read from standard input when left out (keeps it off the command line).
        token: Option<String>,
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
        /// A machine's disk: a directory, e.g. on a dedicated mount (once per machine; default
        /// DIR/disks/m<i>). Its quota is --disk-size.
        #[arg(long = "disk", value_name = "PATH")]
        disks: Vec<PathBuf>,
        /// Port of the first datanode's blob API; the others follow.
        #[arg(long, default_value_t = 7480)]
        port: u16,
        /// etcd's client port (the peer port is the next one).
        #[arg(long, default_value_t = 23790)]
        etcd_port: u16,
        /// Drain this machine (`m1`): its replicas move to the others, each new one caught up
        /// before the old goes, then its datanode stops. Repeat for more. (Starting with fewer
        /// --machines drains the machines left out the same way.)
        #[arg(long, value_name = "MACHINE")]
        drain: Vec<String>,
    },
}

#[derive(Subcommand)]
enum VolumesCommand {
    /// The volumes on this machine, as its disk agent has them (through its admin socket).
    List {
        #[arg(long, env = "CAIRN_DISK_AGENT_ADMIN", default_value = cairn_common::agent_api::ADMIN_SOCKET)]
        disk_agent: PathBuf,
        /// Only this cluster's (with --node: its replicas on that node).
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long, requires = "cluster")]
        node: Option<String>,
    },
    /// Delete the volumes of CLUSTER's replicas on NODE (this machine), as for a cluster deleted
    /// with deletionPolicy Delete. Names are matched exactly (`<cluster>-p<N>-<node>`); without
    /// --node, a standalone datanode's volumes (`<cluster>-p<N>`, `--volume-prefix`).
    Purge {
        /// The disk agent's admin socket (its node socket refuses deletes).
        #[arg(long, env = "CAIRN_DISK_AGENT_ADMIN", default_value = cairn_common::agent_api::ADMIN_SOCKET)]
        disk_agent: PathBuf,
        #[arg(long)]
        cluster: String,
        /// The machine whose replicas they are (its node name).
        #[arg(long)]
        node: Option<String>,
        /// Only the volumes of this partition (repeat for more): replicas that moved away.
        #[arg(long = "partition", value_name = "N")]
        partitions: Vec<u32>,
        /// Only say what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask for confirmation (needed when not on a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

/// Whether a volume is one `--cluster`/`--node` selects (exact names only).
fn selected_volume(cluster: &str, node: Option<&str>, name: &str) -> bool {
    match node {
        Some(node) => cairn_cluster::Topology::is_volume_of(cluster, node, name),
        None => cairn_cluster::Topology::is_standalone_volume(cluster, name),
    }
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
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

fn main() -> ExitCode {
    // Run as `kubectl cairn …`, help and errors say so.
    let invoked_as = std::env::args_os().next().map(PathBuf::from);
    let plugin = invoked_as.as_ref().and_then(|p| p.file_name()).is_some_and(|n| n == "kubectl-cairn");
    let command = if plugin { Cli::command().bin_name("kubectl cairn") } else { Cli::command() };
    let cli = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match tokio::runtime::Runtime::new().map_err(anyhow::Error::from).and_then(|rt| rt.block_on(run(cli))) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cairn: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a result; a closed stdout (`| head`) is not an error.
fn print(output: Output, value: &impl serde::Serialize, table: impl FnOnce() -> String) -> anyhow::Result<()> {
    let text = match output {
        Output::Json => serde_json::to_string_pretty(value)? + "\n",
        Output::Yaml => serde_yaml::to_string(value)?,
        Output::Table => table(),
    };
    let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
    Ok(())
}

/// `cairn status --watch`: a line whenever the progress changes, until Ready.
async fn watch(selection: &Selection, timeout: Option<u64>) -> anyhow::Result<ExitCode> {
    let deadline = timeout.map(|t| std::time::Instant::now() + Duration::from_secs(t));
    let mut last = String::new();
    let mut source = Source::open(selection).await?;
    loop {
        let sc = source.cluster(selection.name.as_deref()).await?;
        let view = inspect::status(&source, &sc, selection).await;
        let line = render::progress_line(&view);
        if line != last {
            let now = k8s_openapi::jiff::Timestamp::now().strftime("%H:%M:%S");
            let _ = std::io::Write::write_all(&mut std::io::stdout(), format!("{now} {line}\n").as_bytes());
            last = line;
        }
        let current = view.observed_generation.is_some() && view.observed_generation >= view.generation;
        if view.settled() && current {
            return Ok(ExitCode::SUCCESS);
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            anyhow::bail!("{}/{} not Ready after {} s", view.namespace, view.name, timeout.unwrap_or_default());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::FAILURE),
        }
        source.refresh()?;
    }
}

/// `cairn keys …`.
async fn keys(command: KeysCommand) -> anyhow::Result<ExitCode> {
    use cairn_cluster::access::{self, AccessKey};
    match command {
        KeysCommand::Create { target, name, scope, partitions, buckets, output } => {
            let scopes = scope.into_iter().collect();
            let mut grants = access::BucketGrants::new();
            for text in &buckets {
                let (bucket, granted) =
                    access::parse_grant(text, &scopes).map_err(|e| anyhow::anyhow!("--bucket {text}: {e}"))?;
                anyhow::ensure!(grants.insert(bucket.clone(), granted).is_none(), "--bucket {bucket} is given twice");
            }
            let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
            let (key, secret) = AccessKey::generate(&name, scopes, now_ms)?;
            let reach = (!partitions.is_empty()).then(|| partitions.into_iter().collect());
            let key = key.limited_to(reach)?.limited_to_buckets((!grants.is_empty()).then_some(grants))?;
            // Checked before etcd is reached: a refused key needs no cluster.
            let (store, _) = target.store().await?;
            anyhow::ensure!(store.create_key(&key).await?, "key id {} is taken: try again", key.id);
            let token = access::token(&key.id, &secret);
            let scopes: Vec<&str> = key.scopes.iter().map(|s| s.as_str()).collect();
            // A key limited to partitions cannot use S3 (an object's partition is its name's).
            let s3_secret = key.partitions.is_none().then(|| access::s3_secret(&key));
            let value = serde_json::json!({
                "id": key.id, "name": key.name, "scopes": scopes, "partitions": key.partitions,
                "buckets": key.buckets, "secret": secret.expose(), "token": token,
                "s3_secret_access_key": s3_secret.as_ref().map(|s| s.expose()),
            });
            print(output, &value, || {
                let s3 = match &s3_secret {
                    Some(s3) => {
                        format!("For S3 (docs/s3.md): access key id {}, secret access key {}\n", key.id, s3.expose())
                    }
                    None => "It cannot sign S3 requests: it is limited to some partitions.\n".into(),
                };
                let bearer = match key.buckets {
                    None => format!("Its secret is shown this once; send it as\n  Authorization: Bearer {token}\n"),
                    Some(_) => format!(
                        "Its token (for `cairn keys s3-secret`; the blob API refuses it) is shown this once: {token}\n"
                    ),
                };
                format!(
                    "key {} ({}) made, scopes {}, {}.\n{bearer}{s3}",
                    key.id,
                    key.name,
                    scopes.join(","),
                    reach_text(&key)
                )
            })?;
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::List { target, output } => {
            let snapshot = target.store().await?.0.load().await?;
            let keys: Vec<&AccessKey> = snapshot.keys.values().collect();
            let value: Vec<serde_json::Value> = keys
                .iter()
                .map(|k| {
                    serde_json::json!({"id": k.id, "name": k.name, "scopes": k.scopes, "partitions": k.partitions,
                                       "buckets": k.buckets, "created_ms": k.created_ms})
                })
                .collect();
            print(output, &value, || {
                let mut rows = vec![vec!["ID".to_string(), "NAME".into(), "SCOPES".into(), "REACH".into()]];
                for k in &keys {
                    let scopes: Vec<&str> = k.scopes.iter().map(|s| s.as_str()).collect();
                    rows.push(vec![k.id.clone(), k.name.clone(), scopes.join(","), reach_text(k)]);
                }
                let mut out = String::new();
                cairn_common::text::table(&mut out, &rows);
                out
            })?;
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::S3Secret { token } => {
            let token = match token {
                Some(token) => token,
                None => std::io::read_to_string(std::io::stdin())?,
            };
            let (id, secret) = access::parse_token(token.trim())?;
            let key = AccessKey::from_parts(id, secret, "s3", Default::default())?;
            println!("access key id:     {id}\nsecret access key: {}", access::s3_secret(&key).expose());
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::Revoke { target, id } => {
            access::check_id(&id)?;
            let (store, cluster) = target.store().await?;
            let managed =
                store.get_key(&id).await?.and_then(|k| k.name.strip_prefix("StoreAccessKey ").map(str::to_owned));
            anyhow::ensure!(store.delete_key(&id).await?, "no key {id} in cluster {cluster}");
            println!("key {id} revoked");
            if let Some(resource) = managed {
                eprintln!(
                    "note: the key comes from StoreAccessKey {resource}, whose operator puts it back within a \
                     minute: delete that resource to revoke it for good (or delete its Secret for a new key)"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// "every partition", "partitions 1,2", or "buckets logs=read photos=read,write".
fn reach_text(key: &cairn_cluster::access::AccessKey) -> String {
    use cairn_cluster::access::scope_list;
    match (&key.partitions, &key.buckets) {
        (_, Some(grants)) => {
            let list: Vec<String> = grants.iter().map(|(b, scopes)| format!("{b}={}", scope_list(scopes))).collect();
            format!("buckets {}", list.join(" "))
        }
        (None, None) => "every partition".into(),
        (Some(p), None) => format!("partitions {}", p.iter().map(u32::to_string).collect::<Vec<_>>().join(",")),
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Keys { command } => keys(command).await,
        Command::Status { name, select, watch: true, timeout, .. } => watch(&select.selection(name)?, timeout).await,
        Command::Status { name, select, output, watch: false, .. } => {
            let selection = select.selection(name)?;
            let source = Source::open(&selection).await?;
            let sc = source.cluster(selection.name.as_deref()).await?;
            let view = inspect::status(&source, &sc, &selection).await;
            print(output, &view, || render::status(&view, k8s_openapi::jiff::Timestamp::now()))?;
            Ok(if view.degraded() { ExitCode::from(2) } else { ExitCode::SUCCESS })
        }
        Command::Disks { select, output, all } => {
            let source = Source::open(&select.selection(None)?).await?;
            let nodes = source.disks().await?;
            print(output, &nodes, || render::disks(&nodes, all))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Topology { command: None, name, select, output } => {
            let selection = select.selection(name)?;
            let (name, snapshot) = match (&selection.name, selection.etcd.is_empty(), &selection.local) {
                // A NAME and --etcd: straight from etcd (also a cluster made with `topology apply`).
                (Some(name), false, None) => {
                    let namespace = selection.namespace.as_deref().unwrap_or("default");
                    let store = cairn_operator::platform::store_for(
                        &selection.etcd,
                        namespace,
                        name,
                        selection.etcd_tls.as_ref(),
                    )
                    .await
                    .map_err(anyhow::Error::msg)?;
                    (name.clone(), store.load().await?)
                }
                _ => {
                    let source = Source::open(&selection).await?;
                    let sc = source.cluster(selection.name.as_deref()).await?;
                    (kube::ResourceExt::name_any(&sc), inspect::snapshot(&source, &sc, &selection).await?)
                }
            };
            let value = serde_json::json!({"topology": snapshot.topology, "live": snapshot.live, "revision": snapshot.revision});
            print(output, &value, || render::topology(&name, &snapshot))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Topology { command: Some(TopologyCommand::Apply { target, file }), .. } => {
            let text = std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let (config, nodes) = TopologyFile::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let store = target.store().await?;
            let (topology, written) = store.apply_topology(&config, &nodes).await?;
            let what =
                if written.is_empty() { "unchanged".to_owned() } else { format!("wrote {}", written.join(", ")) };
            println!(
                "cluster {}: {} nodes, {} partitions × {} replicas placed; {what}",
                target.cluster,
                topology.nodes.len(),
                topology.partitions.len(),
                config.replication_factor
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Local {
            command: LocalCommand::Up { file, dir, machines, disk_size, disks, port, etcd_port, drain },
        } => {
            let text = std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let cluster: cairn_resources::StoreCluster = serde_yaml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: not a StoreCluster: {e}", file.display()))?;
            anyhow::ensure!(
                machines >= cluster.spec.replication_factor as usize,
                "replicationFactor {} needs at least that many --machines",
                cluster.spec.replication_factor
            );
            anyhow::ensure!(
                disks.is_empty() || disks.len() == machines,
                "--disk is given {} time(s) for {machines} machines: give one per machine, or none",
                disks.len()
            );
            let dir = std::path::absolute(&dir)?;
            let disks = disks.iter().map(std::path::absolute).collect::<Result<Vec<_>, _>>()?;
            let options =
                cairn_operator::local_up::LocalOptions { dir, machines, disk_size, disks, port, etcd_port, drain };
            cairn_operator::local_up::up(cluster, options).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Volumes { command: VolumesCommand::List { disk_agent, cluster, node } } => {
            let agent = cairn_common::agent_client::AgentClient::new(&disk_agent);
            let mut rows = vec![["NAME", "DISK", "PARTITION", "CAPACITY", "PATH"].map(String::from).to_vec()];
            for v in agent.list_volumes().await? {
                let shown = match (&cluster, &node) {
                    (None, _) => true,
                    (Some(c), Some(n)) => cairn_cluster::Topology::is_volume_of(c, n, &v.name),
                    (Some(c), None) => {
                        cairn_cluster::Topology::is_standalone_volume(c, &v.name)
                            || v.name.starts_with(&format!("{c}-p"))
                    }
                };
                if shown {
                    let capacity = cairn_common::text::bytes(v.capacity_bytes);
                    rows.push(vec![v.name, v.disk, v.partition.to_string(), capacity, v.path]);
                }
            }
            let widths: Vec<usize> = (0..5).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
            for row in rows {
                let line: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
                println!("{}", line.join("  ").trim_end());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Volumes { command: VolumesCommand::Purge { disk_agent, cluster, node, partitions, dry_run, yes } } => {
            let agent = cairn_common::agent_client::AgentClient::new(&disk_agent);
            let chosen: Vec<_> = agent
                .list_volumes()
                .await?
                .into_iter()
                .filter(|v| selected_volume(&cluster, node.as_deref(), &v.name))
                .filter(|v| partitions.is_empty() || partitions.contains(&v.partition))
                .collect();
            let whose = match &node {
                Some(node) => format!("cluster {cluster} on node {node}"),
                None => format!("standalone datanode {cluster}"),
            };
            if chosen.is_empty() {
                println!("no volume of {whose} on this machine");
                return Ok(ExitCode::SUCCESS);
            }
            for v in &chosen {
                println!(
                    "{} volume {} on disk {} ({})",
                    if dry_run { "would delete" } else { "to delete:" },
                    v.name,
                    v.disk,
                    v.path
                );
            }
            if dry_run {
                return Ok(ExitCode::SUCCESS);
            }
            if !yes {
                use std::io::IsTerminal;
                anyhow::ensure!(
                    std::io::stdin().is_terminal(),
                    "not deleting {} volume(s) of {whose} without confirmation: add --yes",
                    chosen.len()
                );
                print!(
                    "Delete these {} volume(s) and every blob in them? Type the cluster's name to confirm: ",
                    chosen.len()
                );
                std::io::Write::flush(&mut std::io::stdout())?;
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                anyhow::ensure!(answer.trim() == cluster, "not confirmed; nothing deleted");
            }
            let (mut deleted, mut refused) = (0, 0);
            for volume in chosen {
                // A volume a running datanode has open is refused by the agent; the others go on.
                match agent.delete_volume(&volume.name).await {
                    Ok(_) => {
                        println!("deleted volume {} on disk {}", volume.name, volume.disk);
                        deleted += 1;
                    }
                    Err(e) => {
                        eprintln!("cairn: volume {} on disk {} not deleted: {e}", volume.name, volume.disk);
                        refused += 1;
                    }
                }
            }
            println!("{deleted} volume(s) deleted");
            if refused > 0 {
                eprintln!(
                    "cairn: {refused} volume(s) not deleted; stop the datanodes that use them and run this again"
                );
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
