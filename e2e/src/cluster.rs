//! `cairn-bench cluster`: a local 3-node cluster (replication factor 3, write quorum 2, real
//! etcd) against one standalone node of the same run; and the catch-up rate of a node that
//! returns after missing writes, against the raw sequential write rate.

use std::path::Path;
use std::time::{Duration, Instant};

use cairn_testkit::etcd::EtcdServer;

use crate::datanode::{get_throughput, put_throughput, NodeProcess};
use crate::reference;
use crate::Scenario;

#[derive(clap::Args)]
pub struct Options {
    /// One JSON object per scenario instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Directory on the filesystem to measure (default: the system temp dir).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Seconds per throughput scenario and round.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds of the cluster and the single node, interleaved (the medians are reported, with
    /// the spread of the per-round ratios).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// MiB written while a node is down, for the catch-up scenario.
    #[arg(long, default_value_t = 1024)]
    catch_up_mib: u64,
    /// Partitions of the idle cluster whose datanodes' CPU is measured (0: skip).
    #[arg(long, default_value_t = 1000)]
    idle_partitions: u32,
    /// Seconds the idle cluster is watched.
    #[arg(long, default_value_t = 30)]
    idle_seconds: u64,
}

/// One of the figures, picked from a round's.
type Figure = fn(&Figures) -> f64;

struct Figures {
    put_4k: f64,
    get_4k: f64,
    put_5m: f64,
    get_5m: f64,
}

async fn measure(nodes: &[&NodeProcess], seconds: Duration) -> anyhow::Result<Figures> {
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let client = &nodes[0].client;
    let (put_4k, small) = put_throughput(client, &addrs, 4096, 64, seconds).await?;
    let (get_4k, _) = get_throughput(client, &addrs, &small, 64, seconds).await?;
    let (put_5m_ops, large) = put_throughput(client, &addrs, 5 << 20, 4, seconds).await?;
    let (_, get_5m_bytes) = get_throughput(client, &addrs, &large, 4, seconds).await?;
    Ok(Figures { put_4k, get_4k, put_5m: put_5m_ops * 5.0 * 1048576.0 / 1e6, get_5m: get_5m_bytes / 1e6 })
}

fn topology_yaml(ports: &[u16], partitions: u32, volume_size: &str, segment_size: &str) -> String {
    let mut yaml = format!(
        "replication_factor: 3\nwrite_quorum: 2\npartitions: {partitions}\nvolume_size: {volume_size}\nsegment_size: {segment_size}\nnodes:\n",
    );
    for (i, port) in ports.iter().enumerate() {
        yaml += &format!(
            "  - id: n{i}\n    zone: z{i}\n    address: 127.0.0.1:{port}\n    disks: [{{id: n{i}-d0, capacity: 1TiB}}]\n"
        );
    }
    yaml
}

pub async fn run(options: Options) -> anyhow::Result<Vec<Scenario>> {
    let base = options.dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = tempfile::tempdir_in(&base)?;
    let seconds = Duration::from_secs(options.seconds);
    // The disk's sustained rate, measured first while nothing else writes.
    let dir = work.path().to_owned();
    let raw = tokio::task::spawn_blocking(move || reference::sequential_write_rate(&dir, seconds, 5 << 20)).await??;

    // The single node stays up (idle) while the cluster runs, and the other way round: each
    // round measures both, in alternating order, so that both see the same machine.
    let single = NodeProcess::start(&work.path().join("single"), &["--partitions", "6"]).await?;
    let etcd = tokio::task::spawn_blocking(EtcdServer::start).await?;
    let ports: Vec<u16> = (0..3).map(|_| cairn_testkit::ports::free_port()).collect();
    let mut nodes =
        start_cluster(work.path(), &etcd, "bench", &ports, (6, "16GiB", "256MiB"), &|_| Ok(Vec::new())).await?;
    wait_caught_up(&nodes[0], Duration::from_secs(60)).await?;
    let (mut singles, mut clusters) = (Vec::new(), Vec::new());
    for round in 0..options.rounds.max(1) {
        let members: Vec<&NodeProcess> = nodes.iter().collect();
        if round % 2 == 0 {
            singles.push(measure(&[&single], seconds).await?);
            clusters.push(measure(&members, seconds).await?);
        } else {
            clusters.push(measure(&members, seconds).await?);
            singles.push(measure(&[&single], seconds).await?);
        }
    }
    drop(single);
    // What each part wrote goes once it is measured: the whole run would need ~50 GB otherwise.
    std::fs::remove_dir_all(work.path().join("single"))?;

    let mut results = Vec::new();
    let note = format!(
        "single node, {} interleaved rounds of {} s; 3 nodes, replication 3, quorum 2, one machine: every byte is written three times",
        options.rounds.max(1),
        options.seconds
    );
    let pick = |figures: &[Figures], f: Figure| figures.iter().map(f).collect::<Vec<f64>>();
    let pairs: [(&'static str, Figure, &'static str); 4] = [
        ("cluster_put_4k", |f| f.put_4k, "ops/s"),
        ("cluster_get_4k", |f| f.get_4k, "ops/s"),
        ("cluster_put_5m", |f| f.put_5m, "MB/s"),
        ("cluster_get_5m", |f| f.get_5m, "MB/s"),
    ];
    for (name, figure, unit) in pairs {
        results.push(Scenario::rounds(
            name,
            &pick(&clusters, figure),
            unit,
            &pick(&singles, figure),
            unit,
            note.clone(),
        ));
    }

    // Catch-up: node n2 misses `catch_up_mib` of 5 MiB blobs, then returns.
    drop(nodes.pop());
    let blobs = (options.catch_up_mib / 5).max(1);
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let body = bytes::Bytes::from(vec![0x3cu8; 5 << 20]);
    for i in 0..blobs {
        crate::datanode::put_once(&nodes[0].client, &addrs[i as usize % 2], body.clone()).await?;
    }
    let started = Instant::now();
    let returned = start_member(work.path(), &etcd, "bench", 2, ports[2], &[]).await?;
    wait_caught_up(&returned, Duration::from_secs(600)).await?;
    let secs = started.elapsed().as_secs_f64();
    // The disk again, right after: the reference before and after the catch-up, as two rounds.
    let dir = work.path().to_owned();
    let raw_after =
        tokio::task::spawn_blocking(move || reference::sequential_write_rate(&dir, seconds, 5 << 20)).await??;
    let rate = (blobs * 5 * 1048576) as f64 / 1e6 / secs;
    results.push(Scenario::rounds(
        "catch_up",
        &[rate, rate],
        "MB/s",
        &[raw, raw_after],
        "MB/s",
        format!(
            "{} MiB missed by one node, pulled from two peers (includes its restart); raw sequential write + fdatasync, before and after",
            blobs * 5
        ),
    ));
    drop(returned);
    drop(nodes);
    for i in 0..3 {
        std::fs::remove_dir_all(work.path().join(format!("n{i}")))?;
    }

    results.extend(peer_tls_cost(work.path(), &etcd, seconds, options.rounds.max(1)).await?);

    if options.idle_partitions > 0 {
        results.push(
            idle_cpu(work.path(), &etcd, options.idle_partitions, Duration::from_secs(options.idle_seconds)).await?,
        );
    }
    drop(etcd);
    Ok(results)
}

/// Three datanodes of a cluster of `partitions` partitions, every replica open and caught up,
/// with no traffic at all: the CPU the busiest of them uses, in % of one core.
async fn idle_cpu(root: &Path, etcd: &EtcdServer, partitions: u32, watch: Duration) -> anyhow::Result<Scenario> {
    let ports: Vec<u16> = (0..3).map(|_| cairn_testkit::ports::free_port()).collect();
    let nodes =
        start_cluster(&root.join("idle"), etcd, "idle", &ports, (partitions, "64MiB", "2MiB"), &|_| Ok(Vec::new()))
            .await?;
    for node in &nodes {
        wait_caught_up(node, Duration::from_secs(600)).await?;
    }
    // Settled: replicas opened, first pulls and repair passes done.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before: Vec<Duration> = nodes.iter().map(NodeProcess::cpu_time).collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    tokio::time::sleep(watch).await;
    let elapsed = started.elapsed().as_secs_f64();
    let mut busiest: f64 = 0.0;
    for (node, before) in nodes.iter().zip(before) {
        let used = (node.cpu_time()? - before).as_secs_f64();
        busiest = busiest.max(used / elapsed * 100.0);
    }
    Ok(Scenario::new("cluster_idle_cpu", busiest, "% of a core").against(
        100.0,
        "% of a core",
        format!(
            "busiest of 3 datanodes, {partitions} partitions × 3 replicas, no traffic, {:.0} s (target < 2 %)",
            watch.as_secs_f64()
        ),
    ))
}

/// Applies a 3-node topology of `partitions` partitions under `cluster` and starts its nodes
/// (node `i` with the flags `extra(i)`).
async fn start_cluster(
    root: &Path,
    etcd: &EtcdServer,
    cluster: &str,
    ports: &[u16],
    (partitions, volume_size, segment_size): (u32, &str, &str),
    extra: &dyn Fn(usize) -> anyhow::Result<Vec<String>>,
) -> anyhow::Result<Vec<NodeProcess>> {
    let store = cairn_cluster::etcd::ClusterStore::connect(&[etcd.endpoint()], "default", cluster).await?;
    let yaml = topology_yaml(ports, partitions, volume_size, segment_size);
    let (config, specs) = cairn_cluster::topology::TopologyFile::parse(&yaml).map_err(anyhow::Error::msg)?;
    store.apply_topology(&config, &specs).await?;
    use cairn_cluster::access::{AccessKey, Scope};
    use cairn_testkit::keys::{TEST_KEY_ID, TEST_KEY_SECRET};
    let key = AccessKey::from_parts(TEST_KEY_ID, TEST_KEY_SECRET, "bench", [Scope::Admin].into_iter().collect())?;
    store.create_key(&key).await?;
    let mut nodes = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        nodes.push(start_member(root, etcd, cluster, i, *port, &extra(i)?).await?);
    }
    Ok(nodes)
}

/// What mutual TLS between the datanodes costs: two 3-node clusters with the replica routes on
/// peer ports of their own, one over mutual TLS (certificates from a cluster CA, as the operator
/// issues them), one over plain HTTP; measured in interleaved rounds by the same client.
async fn peer_tls_cost(
    root: &Path,
    etcd: &EtcdServer,
    seconds: Duration,
    rounds: usize,
) -> anyhow::Result<Vec<Scenario>> {
    let ca = cairn_cluster::peer_tls::PeerCa::generate("bench-mtls")?;
    let tls_dir = root.join("peer-tls");
    std::fs::create_dir_all(&tls_dir)?;
    std::fs::write(tls_dir.join("ca.crt"), ca.cert_pem())?;
    let mut clusters = Vec::new();
    for (cluster, tls) in [("bench-peer-http", false), ("bench-peer-mtls", true)] {
        let ports: Vec<u16> = (0..3).map(|_| cairn_testkit::ports::free_port()).collect();
        let flags = |i: usize| -> anyhow::Result<Vec<String>> {
            let mut extra =
                vec!["--peer-listen".to_owned(), format!("127.0.0.1:{}", cairn_testkit::ports::free_port())];
            if tls {
                let issued = ca.issue(&format!("n{i}"), &["127.0.0.1".into()], 1)?;
                let (cert, key) = (tls_dir.join(format!("n{i}.crt")), tls_dir.join(format!("n{i}.key")));
                std::fs::write(&cert, &issued.cert_pem)?;
                std::fs::write(&key, &issued.key_pem)?;
                for (flag, path) in
                    [("--peer-tls-ca", tls_dir.join("ca.crt")), ("--peer-tls-cert", cert), ("--peer-tls-key", key)]
                {
                    extra.extend([flag.to_owned(), path.display().to_string()]);
                }
            }
            Ok(extra)
        };
        let nodes = start_cluster(&root.join(cluster), etcd, cluster, &ports, (6, "4GiB", "256MiB"), &flags).await?;
        wait_caught_up(&nodes[0], Duration::from_secs(60)).await?;
        clusters.push(nodes);
    }
    let (mut plain, mut mtls) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let members = |i: usize| clusters[i].iter().collect::<Vec<&NodeProcess>>();
        if round % 2 == 0 {
            plain.push(measure(&members(0), seconds).await?);
            mtls.push(measure(&members(1), seconds).await?);
        } else {
            mtls.push(measure(&members(1), seconds).await?);
            plain.push(measure(&members(0), seconds).await?);
        }
    }
    let note = format!(
        "3 nodes, replication 3, quorum 2, replica routes on peer ports: mutual TLS (TLS 1.3, rustls) against plain HTTP; \
         {rounds} interleaved rounds of {} s (target ≥ 0.85 for PUTs)",
        seconds.as_secs()
    );
    let pick = |figures: &[Figures], f: Figure| figures.iter().map(f).collect::<Vec<f64>>();
    let pairs: [(&'static str, Figure, &'static str); 2] =
        [("peer_mtls_put_4k", |f| f.put_4k, "ops/s"), ("peer_mtls_put_5m", |f| f.put_5m, "MB/s")];
    Ok(pairs
        .into_iter()
        .map(|(name, figure, unit)| {
            Scenario::rounds(name, &pick(&mtls, figure), unit, &pick(&plain, figure), unit, note.clone())
        })
        .collect())
}

async fn start_member(
    root: &Path,
    etcd: &EtcdServer,
    cluster: &str,
    i: usize,
    port: u16,
    extra: &[String],
) -> anyhow::Result<NodeProcess> {
    let (id, endpoint, listen) = (format!("n{i}"), etcd.endpoint(), format!("127.0.0.1:{port}"));
    let mut args = vec!["--etcd", &endpoint, "--cluster", cluster, "--node-id", &id, "--max-blob-size", "8MiB"];
    args.extend(extra.iter().map(String::as_str));
    NodeProcess::start_at(&root.join(&id), &listen, &args).await
}

/// Until this node's replicas have nothing left to pull from any peer.
async fn wait_caught_up(node: &NodeProcess, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let uri: hyper::Uri = format!("http://{}/v1/admin/replicas", node.addr).parse()?;
    loop {
        let response = node.client.request(crate::datanode::authorized_get(uri.clone())).await?;
        let body = http_body_util::BodyExt::collect(response.into_body()).await?.to_bytes();
        let list: Vec<serde_json::Value> = serde_json::from_slice(&body)?;
        let settled = !list.is_empty()
            && list
                .iter()
                .all(|p| p["lag_entries"] == 0 && p["last_error"].is_null() && p["peer_tail"].as_u64().is_some());
        if settled {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "replication did not catch up in {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
