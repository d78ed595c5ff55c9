//! A cluster of real datanode processes with a real etcd, on loopback.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use cairn_testkit::etcd::EtcdServer;
use cairn_testkit::payload;
use reqwest::blocking::Client;
use serde_json::{json, Value};
use support::{binary, free_port, wait_until};

struct Node {
    id: String,
    zone: String,
    port: u16,
    dir: PathBuf,
    etcd: String,
    max_blob: &'static str,
    /// More flags for the datanode.
    extra: Vec<String>,
    /// Where its log goes (debug level), when a test reads it.
    log: Option<PathBuf>,
    child: Option<Child>,
}

impl Node {
    fn new(id: &str, zone: &str, root: &Path, etcd: &EtcdServer) -> Self {
        Self {
            id: id.into(),
            zone: zone.into(),
            port: free_port(),
            dir: root.join(id),
            etcd: etcd.endpoint(),
            max_blob: "4MiB",
            extra: Vec::new(),
            log: None,
            child: None,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    fn start(&mut self) {
        let dir = self.dir.to_str().unwrap().to_owned();
        self.start_with(&["--data-dir", &dir]);
    }

    /// Starts with these volume flags (`--data-dir DIR` or `--disk-agent SOCKET`).
    fn start_with(&mut self, volumes: &[&str]) {
        let child = Command::new(binary("cairn-datanode"))
            .args(["--etcd", &self.etcd, "--cluster", "c1", "--node-id", &self.id, "--zone", &self.zone])
            .args(["--listen", &self.addr()])
            .args(volumes)
            .args(["--max-blob-size", self.max_blob, "--peer-timeout-ms", "1000"])
            .args(&self.extra)
            .env("RUST_LOG", if self.log.is_some() { "warn,cairn_datanode=debug" } else { "warn" })
            .stdout(match &self.log {
                Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
                None => Stdio::null(),
            })
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !reqwest::blocking::get(self.url("/healthz")).map(|r| r.status().is_success()).unwrap_or(false) {
            assert!(Instant::now() < deadline, "{} did not start", self.id);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill").args([signal, &pid]).status().unwrap().success());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
        }
        self.kill9();
    }
}

/// Writes cluster.yaml for these nodes and applies it with the `cairn` CLI.
fn apply_topology(etcd: &EtcdServer, root: &Path, nodes: &[&Node], partitions: u32) {
    let disks: Vec<(&Node, String)> = nodes.iter().map(|n| (*n, format!("{}-d0", n.id))).collect();
    apply_topology_with(etcd, root, &disks, partitions, "64MiB", "8MiB");
}

fn apply_topology_with(
    etcd: &EtcdServer,
    root: &Path,
    nodes: &[(&Node, String)],
    partitions: u32,
    volume_size: &str,
    segment_size: &str,
) {
    let mut yaml = format!(
        "replication_factor: 3\nwrite_quorum: 2\npartitions: {partitions}\nvolume_size: {volume_size}\n\
         segment_size: {segment_size}\nnodes:\n"
    );
    for (n, disk) in nodes {
        yaml += &format!(
            "  - id: {}\n    zone: {}\n    address: {}\n    disks: [{{id: \"{disk}\", capacity: 10GiB}}]\n",
            n.id,
            n.zone,
            n.addr()
        );
    }
    let file = root.join("cluster.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(binary("cairn"))
        .args(["topology", "apply", "--etcd", &etcd.endpoint(), "--cluster", "c1", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "cairn topology apply: {}", String::from_utf8_lossy(&out.stderr));
    support::install_test_key(&etcd.endpoint(), "default", "c1");
}

fn show(etcd: &EtcdServer) -> Value {
    let out = Command::new(binary("cairn"))
        .args(["topology", "c1", "--etcd", &etcd.endpoint(), "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "cairn topology: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every node has opened its replicas and sees every peer live: three replicas of each
/// partition, each pulling from its two peers.
fn wait_replicating(nodes: &[&Node], partitions: usize) {
    let client = support::client();
    wait_until("every replica replicating", Duration::from_secs(30), || {
        let mut pulls = 0;
        for node in nodes {
            let Ok(r) = client.get(node.url("/v1/admin/replicas")).send() else { return false };
            let Ok(list) = r.json::<Vec<Value>>() else { return false };
            if !list.iter().all(|p| p["last_error"].is_null()) {
                return false;
            }
            pulls += list.len();
        }
        pulls == partitions * 3 * 2
    });
}

fn put(client: &Client, node: &Node, data: &[u8]) -> Result<String, String> {
    let r = client.post(node.url("/v1/blobs")).body(data.to_vec()).send().map_err(|e| e.to_string())?;
    if r.status() != 201 {
        return Err(format!("{}: {}", r.status(), r.text().unwrap_or_default()));
    }
    Ok(r.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned())
}

/// Every node holds every blob in its own replica, byte-identical.
fn assert_converged(nodes: &[&Node], blobs: &BTreeMap<String, Vec<u8>>, limit: Duration) {
    let client = support::client();
    for node in nodes {
        wait_until(&format!("{} to hold every blob", node.id), limit, || {
            blobs.iter().all(|(id, data)| {
                client
                    .get(node.url(&format!("/v1/blobs/{id}?local=true")))
                    .send()
                    .ok()
                    .filter(|r| r.status() == 200)
                    .and_then(|r| r.bytes().ok())
                    .is_some_and(|b| b.as_ref() == data.as_slice())
            })
        });
    }
}

/// The next journal sequence of each node's replica of `partition`.
fn journal_tails(nodes: &[&Node], partition: u32) -> Vec<u64> {
    let client = support::node_client(&nodes[0].etcd, "default", "c1");
    nodes
        .iter()
        .map(|n| {
            let url = n.url(&format!("/replica/v1/partitions/{partition}/journal?from=0&limit=1"));
            client.get(url).send().unwrap().json::<Value>().unwrap()["tail"].as_u64().unwrap()
        })
        .collect()
}

/// Until `node`'s replicas of `partition` have pulled every peer's journal to its tail as it is
/// now (a caught-up puller asks again only after a pause, so the last writes may still be on
/// their way).
fn wait_pulled_to_tails(nodes: &[&Node], node: &Node, partition: u32) {
    let tails: BTreeMap<String, u64> =
        nodes.iter().map(|n| n.id.clone()).zip(journal_tails(nodes, partition)).collect();
    let client = support::client();
    wait_until(&format!("{} to pull its peers' journals to their tails", node.id), Duration::from_secs(30), || {
        let Ok(r) = client.get(node.url("/v1/admin/replicas")).send() else { return false };
        let Ok(list) = r.json::<Vec<Value>>() else { return false };
        let pulls: Vec<&Value> = list.iter().filter(|p| p["partition"] == partition).collect();
        pulls.len() == nodes.len() - 1
            && pulls.iter().all(|p| p["token"].as_u64() >= p["peer"].as_str().and_then(|peer| tails.get(peer)).copied())
    });
}

/// The sum of a metric's series (Prometheus text) whose labels contain `label`.
fn metric_sum(metrics: &str, metric: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.strip_prefix(metric).is_some_and(|rest| rest.starts_with('{')) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `count` nodes started on a topology of `partitions`, every replica open and replicating.
fn started_cluster(root: &Path, etcd: &EtcdServer, count: usize, partitions: u32) -> Vec<Node> {
    started_cluster_with(root, etcd, count, partitions, |_| {})
}

/// As [`started_cluster`], each node first set up by `setup` (more flags, a log file).
fn started_cluster_with(
    root: &Path,
    etcd: &EtcdServer,
    count: usize,
    partitions: u32,
    setup: impl FnMut(&mut Node),
) -> Vec<Node> {
    let mut nodes = cluster(root, etcd, count);
    nodes.iter_mut().for_each(setup);
    apply_topology(etcd, root, &nodes.iter().collect::<Vec<_>>(), partitions);
    for n in nodes.iter_mut() {
        n.start();
    }
    wait_replicating(&nodes.iter().collect::<Vec<_>>(), partitions as usize);
    nodes
}

/// [`started_cluster_with`], every node serving S3 too: the nodes and their S3 addresses.
fn started_s3_cluster(
    root: &Path,
    etcd: &EtcdServer,
    count: usize,
    partitions: u32,
    mut setup: impl FnMut(&mut Node),
) -> (Vec<Node>, Vec<String>) {
    let s3_addrs: Vec<String> = (0..count).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let mut next = s3_addrs.iter();
    let nodes = started_cluster_with(root, etcd, count, partitions, |node| {
        node.extra = vec!["--s3-listen".into(), next.next().unwrap().clone()];
        setup(node);
    });
    (nodes, s3_addrs)
}

/// Stores a blob in `node`'s own replica only, through the replica API, as a router's write to
/// one replica would (a write that missed its quorum elsewhere).
fn put_on_replica(node: &Node, id: cairn_common::BlobId, data: &[u8]) {
    let client = support::node_client(&node.etcd, "default", "c1");
    let mut frame = cairn_cluster::replica::BlobFrame::head(&cairn_cluster::replica::ReplicaBlob {
        version: cairn_cluster::replica::WIRE_VERSION,
        content_type: "application/octet-stream".into(),
        user: vec![],
        created_ms: 1,
        expires_ms: None,
        expiry_set_ms: None,
    })
    .to_vec();
    frame.extend_from_slice(data);
    let r = client.put(node.url(&format!("/replica/v1/blobs/{id}"))).body(frame).send().unwrap();
    assert_eq!(r.status(), 204);
}

fn cluster(root: &Path, etcd: &EtcdServer, count: usize) -> Vec<Node> {
    (0..count).map(|i| Node::new(&format!("n{i}"), &format!("z{}", i % 3), root, etcd)).collect()
}

#[test]
fn three_nodes_survive_a_kill_and_converge() {
    let root = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start();
    let mut nodes = started_cluster(root.path(), &etcd, 3, 4);

    let client = support::client();

    let mut blobs = BTreeMap::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let (client, nodes) = (client.clone(), &nodes);
                s.spawn(move || {
                    (0..250u64)
                        .map(|i| {
                            let seed = t * 1000 + i;
                            let data = payload(seed, 1000 + (seed as usize * 37) % 7000);
                            let id = put(&client, &nodes[(seed % 3) as usize], &data).expect("put at quorum");
                            (id, data)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            blobs.extend(h.join().unwrap());
        }
    });
    assert_eq!(blobs.len(), 1000);
    // A blob bigger than HTTP servers take by default crosses the replica API too.
    let big = payload(77, 3 << 20);
    blobs.insert(put(&client, &nodes[1], &big).expect("3 MiB put"), big);

    nodes[2].kill9();
    for (id, data) in &blobs {
        let r = client.get(nodes[0].url(&format!("/v1/blobs/{id}"))).send().unwrap();
        assert_eq!(r.status(), 200, "{id}");
        assert_eq!(r.bytes().unwrap().as_ref(), data.as_slice());
    }
    // Writes go on at quorum while one node is down; deletes too.
    for seed in 5000..5100u64 {
        let data = payload(seed, 2048);
        let id = put(&client, &nodes[(seed % 2) as usize], &data).expect("put with one node down");
        blobs.insert(id, data);
    }
    let victim = blobs.keys().next().unwrap().clone();
    assert_eq!(client.delete(nodes[1].url(&format!("/v1/blobs/{victim}"))).send().unwrap().status(), 204);
    blobs.remove(&victim);

    nodes[2].start();
    assert_converged(&nodes.iter().collect::<Vec<_>>(), &blobs, Duration::from_secs(90));
    for n in &nodes {
        let r = client.get(n.url(&format!("/v1/blobs/{victim}?local=true"))).send().unwrap();
        assert_eq!(r.status(), 410, "{}: the delete reached every replica", n.id);
    }
    // Lag is visible, and zero once caught up.
    let lag: Vec<Value> = client.get(nodes[2].url("/v1/admin/replicas")).send().unwrap().json().unwrap();
    assert!(lag.iter().all(|p| p["lag_entries"] == 0), "{lag:?}");
    let metrics = client.get(nodes[2].url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains("cairn_replication_lag_entries{"), "lag in /metrics");
}

#[test]
fn writes_fail_cleanly_without_quorum_and_a_frozen_node_is_skipped() {
    let root = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start();
    let mut nodes = started_cluster(root.path(), &etcd, 3, 2);
    let client = support::client_builder().timeout(Duration::from_secs(20)).build().unwrap();
    let stored = put(&client, &nodes[0], b"before").unwrap();

    // Frozen: still registered (its lease lives a while), but answers nothing.
    nodes[1].signal("-STOP");
    for i in 0..10u64 {
        let started = Instant::now();
        let id = put(&client, &nodes[0], &payload(i, 3000)).expect("quorum without the frozen node");
        let r = client.get(nodes[2].url(&format!("/v1/blobs/{id}"))).send().unwrap();
        assert_eq!(r.status(), 200);
        assert!(started.elapsed() < Duration::from_secs(5), "request took {:?}", started.elapsed());
    }
    let r = client.get(nodes[0].url(&format!("/v1/blobs/{stored}"))).send().unwrap();
    assert_eq!(r.bytes().unwrap().as_ref(), b"before");
    nodes[1].signal("-CONT");

    // Two of three down: no quorum, a clear 503, reads still served.
    nodes[1].kill9();
    nodes[2].kill9();
    let r = client.post(nodes[0].url("/v1/blobs")).body("x").send().unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().unwrap()["error"]["code"], "no_quorum");
    let r = client.get(nodes[0].url(&format!("/v1/blobs/{stored}"))).send().unwrap();
    assert_eq!(r.bytes().unwrap().as_ref(), b"before");
}

#[test]
fn etcd_restart_during_traffic_loses_no_acknowledged_write() {
    let root = tempfile::tempdir().unwrap();
    let mut etcd = EtcdServer::start();
    let nodes = started_cluster(root.path(), &etcd, 3, 3);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut blobs = BTreeMap::new();
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let client = support::client();
            let mut acked = Vec::new();
            let mut seed = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let data = payload(seed, 1500);
                if let Ok(id) = put(&client, &nodes[(seed % 3) as usize], &data) {
                    acked.push((id, data));
                }
                seed += 1;
            }
            acked
        });
        std::thread::sleep(Duration::from_secs(1));
        etcd.kill();
        std::thread::sleep(Duration::from_secs(7)); // longer than the registration lease
        etcd.restart();
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        blobs.extend(writer.join().unwrap());
    });
    assert!(blobs.len() > 50, "traffic flowed: {}", blobs.len());
    // Registrations and watches recovered: every node is live again and replication resumes.
    wait_until("all nodes live again", Duration::from_secs(30), || {
        show(&etcd)["live"].as_object().map(|m| m.len()) == Some(3)
    });
    assert_converged(&nodes.iter().collect::<Vec<_>>(), &blobs, Duration::from_secs(60));
}

#[test]
fn a_moved_replica_bootstraps_through_replication_then_serves() {
    let root = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start();
    let mut nodes = cluster(root.path(), &etcd, 4);
    apply_topology(&etcd, root.path(), &nodes[..3].iter().collect::<Vec<_>>(), 2);
    for n in nodes.iter_mut() {
        n.start();
    }
    wait_replicating(&nodes[..3].iter().collect::<Vec<_>>(), 2);
    let client = support::client();
    let mut blobs = BTreeMap::new();
    for seed in 0..200u64 {
        let data = payload(seed, 4000);
        blobs.insert(put(&client, &nodes[(seed % 3) as usize], &data).unwrap(), data);
    }
    // n2 leaves the topology, n3 takes its replicas.
    apply_topology(&etcd, root.path(), &[&nodes[0], &nodes[1], &nodes[3]], 2);
    let topology = show(&etcd);
    for p in topology["topology"]["partitions"].as_object().unwrap().values() {
        let on: Vec<&str> = p["replicas"].as_array().unwrap().iter().map(|r| r["node"].as_str().unwrap()).collect();
        assert!(on.contains(&"n3") && !on.contains(&"n2"), "{on:?}");
        assert!(on.contains(&"n0") && on.contains(&"n1"), "the other replicas stayed: {on:?}");
    }
    assert_converged(&[&nodes[3]], &blobs, Duration::from_secs(60));
    // n2 no longer serves its old replicas (their data stays on its disk).
    let (id, _) = blobs.iter().next().unwrap();
    wait_until("n2 to let go", Duration::from_secs(10), || {
        client.get(nodes[2].url(&format!("/v1/blobs/{id}?local=true"))).send().unwrap().status() == 404
    });
    assert!(nodes[2].dir.join("volumes/c1-p0-n2").exists());
}

#[test]
fn five_nodes_in_three_zones_follow_the_placement_rules() {
    let root = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start();
    let zones = ["a", "a", "b", "b", "c"];
    let nodes: Vec<Node> = (0..5).map(|i| Node::new(&format!("n{i}"), zones[i], root.path(), &etcd)).collect();
    apply_topology(&etcd, root.path(), &nodes.iter().collect::<Vec<_>>(), 12);
    let topology = show(&etcd);
    let partitions = topology["topology"]["partitions"].as_object().unwrap();
    assert_eq!(partitions.len(), 12);
    let zone_of = |n: &str| zones[n[1..].parse::<usize>().unwrap()];
    for p in partitions.values() {
        let on: Vec<&str> = p["replicas"].as_array().unwrap().iter().map(|r| r["node"].as_str().unwrap()).collect();
        let distinct_nodes: std::collections::BTreeSet<_> = on.iter().collect();
        let distinct_zones: std::collections::BTreeSet<_> = on.iter().map(|n| zone_of(n)).collect();
        assert_eq!((on.len(), distinct_nodes.len(), distinct_zones.len()), (3, 3, 3), "{on:?}");
    }
    // Applying again changes nothing.
    let revision = topology["revision"].clone();
    apply_topology(&etcd, root.path(), &nodes.iter().collect::<Vec<_>>(), 12);
    assert_eq!(show(&etcd)["revision"], revision);
}

#[test]
fn replicas_live_on_disk_agent_volumes_and_a_full_partition_turns_read_only() {
    use cairn_common::agent_client::AgentClient;
    let root = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start();
    let mut machine = cairn_testkit::machine::Machine::new();
    let mut nodes = cluster(root.path(), &etcd, 3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut agents = Vec::new();
    let mut disks = Vec::new();
    for node in &nodes {
        // One machine per node: its own disk and disk agent.
        let (agent, sockets) = support::disk_with_agent(&mut machine, &node.id, 64 << 20);
        agents.push(agent);
        let report = rt.block_on(AgentClient::new(&sockets.admin).report()).unwrap();
        disks.push((sockets, report.disks[0].id.clone()));
    }
    // The topology names each node's real disk, as the operator does from StoreNodes.
    let placed: Vec<(&Node, String)> = nodes.iter().zip(&disks).map(|(n, (_, d))| (n, d.clone())).collect();
    apply_topology_with(&etcd, root.path(), &placed, 1, "4MiB", "1MiB");
    for (node, (sockets, _)) in nodes.iter_mut().zip(&disks) {
        node.max_blob = "256KiB"; // must fit the 1 MiB segments
        node.start_with(&["--disk-agent", sockets.node.to_str().unwrap()]);
    }
    wait_replicating(&nodes.iter().collect::<Vec<_>>(), 1);
    for (sockets, disk) in &disks {
        let volumes = rt.block_on(AgentClient::new(&sockets.admin).list_volumes()).unwrap();
        assert_eq!(volumes.len(), 1);
        assert!(volumes[0].name.starts_with("c1-p0-"), "{}", volumes[0].name);
        assert_eq!(volumes[0].disk.as_str(), disk.as_str());
    }

    // Fill the only partition: 507, and etcd marks it read-only; reads go on.
    let client = support::client();
    let mut stored = Vec::new();
    let mut refused = None;
    for seed in 0..100u64 {
        let r = client.post(nodes[0].url("/v1/blobs")).body(payload(seed, 200_000)).send().unwrap();
        match r.status().as_u16() {
            201 => stored.push((r.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned(), seed)),
            status => {
                refused = Some((status, r.text().unwrap()));
                break;
            }
        }
    }
    let (status, body) = refused.expect("a 4 MiB partition fills up");
    assert!(status == 507 || status == 503, "{status} {body}");
    // A blob that no longer fits leaves the partition writable for smaller ones...
    assert_eq!(show(&etcd)["topology"]["partitions"]["0"]["state"], "writable");
    let mut small_refused = false;
    for seed in 1000..4000u64 {
        let r = client.post(nodes[0].url("/v1/blobs")).body(payload(seed, 2000)).send().unwrap();
        match r.status().as_u16() {
            201 => {}
            507 | 503 => {
                small_refused = true;
                break;
            }
            other => panic!("{other}: {}", r.text().unwrap()),
        }
    }
    assert!(small_refused, "small blobs fill the rest");
    // ...until even small ones do not: then it is full, and read-only in etcd.
    wait_until("partition 0 read-only in etcd", Duration::from_secs(10), || {
        show(&etcd)["topology"]["partitions"]["0"]["state"] == "read_only"
    });
    // A full cluster says so: 507 for every later PUT, not 503 no_quorum.
    for node in &nodes {
        let r = client.post(node.url("/v1/blobs")).body("more").send().unwrap();
        assert_eq!(r.status(), 507, "no writable partition left");
        assert_eq!(r.json::<Value>().unwrap()["error"]["code"], "insufficient_storage");
    }
    for (id, seed) in &stored {
        let r = client.get(nodes[2].url(&format!("/v1/blobs/{id}"))).send().unwrap();
        assert_eq!(r.bytes().unwrap().as_ref(), payload(*seed, 200_000).as_slice());
    }
    drop(nodes);
}

#[test]
fn datanodes_and_the_cli_reach_a_tls_etcd() {
    let root = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start_tls();
    let files = etcd.tls_files();
    let tls: Vec<String> = vec![
        "--etcd-ca".into(),
        files.ca.display().to_string(),
        "--etcd-cert".into(),
        files.cert.display().to_string(),
        "--etcd-key".into(),
        files.key.display().to_string(),
    ];
    let mut nodes = cluster(root.path(), &etcd, 3);
    let yaml = root.path().join("cluster.yaml");
    let mut text = String::from(
        "replication_factor: 3\nwrite_quorum: 2\npartitions: 2\nvolume_size: 64MiB\nsegment_size: 8MiB\nnodes:\n",
    );
    for n in &nodes {
        text +=
            &format!("  - id: {}\n    address: {}\n    disks: [{{id: {}-d0, capacity: 1GiB}}]\n", n.id, n.addr(), n.id);
    }
    std::fs::write(&yaml, text).unwrap();
    let out = Command::new(binary("cairn"))
        .args(["topology", "apply", "--etcd", &etcd.endpoint(), "--cluster", "c1", "-f"])
        .arg(&yaml)
        .args(&tls)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let etcd_tls =
        cairn_cluster::etcd::EtcdTls::from_files(&files.ca, Some(files.cert.as_path()), Some(files.key.as_path()))
            .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(support::install_test_key_tls(&etcd.endpoint(), "default", "c1", Some(&etcd_tls)));
    for n in nodes.iter_mut() {
        let dir = n.dir.display().to_string();
        let mut args: Vec<&str> = vec!["--data-dir", &dir];
        args.extend(tls.iter().map(String::as_str));
        n.start_with(&args);
    }
    wait_replicating(&nodes.iter().collect::<Vec<_>>(), 2);
    let client = support::client();
    let id = put(&client, &nodes[0], b"over tls").unwrap();
    let r = client.get(nodes[2].url(&format!("/v1/blobs/{id}"))).send().unwrap();
    assert_eq!(r.bytes().unwrap().as_ref(), b"over tls");
}

#[test]
fn every_size_boundary_replicates_and_unknown_ids_leave_no_tombstones() {
    const CHUNK: usize = 1 << 20;
    let root = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start();
    let mut nodes = started_cluster(root.path(), &etcd, 3, 2);
    let client = support::client();

    // n2 is away: everything it holds afterwards came through replication.
    nodes[2].kill9();
    let max = 4 * CHUNK;
    let mut sizes =
        vec![0, 1, 2, max - 1, max, CHUNK + 64 * 1024 - 1, CHUNK + 64 * 1024, CHUNK + 64 * 1024 + 1, 1_049_600];
    for n in 1..=3 {
        sizes.extend([n * CHUNK - 1, n * CHUNK, n * CHUNK + 1]);
    }
    // And sizes drawn at random (seed printed, so that a failure can be replayed).
    let seed: u64 = std::env::var("CAIRN_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("CAIRN_TEST_SEED={seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    sizes.extend((0..6).map(|_| rand::Rng::random_range(&mut rng, 0..=max)));
    let mut blobs = BTreeMap::new();
    for (seed, size) in sizes.iter().enumerate() {
        let data = payload(seed as u64, *size);
        blobs.insert(put(&client, &nodes[seed % 2], &data).expect("put at quorum"), data);
    }
    nodes[2].start();
    let all: Vec<&Node> = nodes.iter().collect();
    assert_converged(&all, &blobs, Duration::from_secs(60));
    // Ranges across chunk boundaries, read through the router from the node that was away.
    for (id, data) in blobs.iter().filter(|(_, d)| d.len() > CHUNK + 10) {
        let (start, end) = (CHUNK - 7, (CHUNK + 9).min(data.len() - 1));
        let r = client
            .get(nodes[2].url(&format!("/v1/blobs/{id}")))
            .header("range", format!("bytes={start}-{end}"))
            .send()
            .unwrap();
        assert_eq!(r.status(), 206);
        assert!(r.bytes().unwrap().as_ref() == &data[start..=end], "{} bytes: range differs", data.len());
    }

    // Deletes of ids no replica ever had: 404, and not one tombstone anywhere.
    let before: Vec<Vec<u64>> = (0..2).map(|p| journal_tails(&all, p)).collect();
    for i in 0..200u32 {
        let id = cairn_common::BlobId::generate(i % 2);
        let r = client.delete(nodes[(i % 3) as usize].url(&format!("/v1/blobs/{id}"))).send().unwrap();
        assert_eq!(r.status(), 404);
        assert_eq!(r.json::<Value>().unwrap()["error"]["code"], "blob_not_found");
    }
    let after: Vec<Vec<u64>> = (0..2).map(|p| journal_tails(&all, p)).collect();
    assert_eq!(before, after, "deletes of unknown ids wrote tombstones");
    // A real delete still reaches every replica.
    let (victim, _) = blobs.iter().next().map(|(k, v)| (k.clone(), v.clone())).unwrap();
    assert_eq!(client.delete(nodes[2].url(&format!("/v1/blobs/{victim}"))).send().unwrap().status(), 204);
    for n in &nodes {
        wait_until(&format!("{}: the delete arrived", n.id), Duration::from_secs(20), || {
            client.get(n.url(&format!("/v1/blobs/{victim}?local=true"))).send().unwrap().status() == 410
        });
    }
}

#[test]
fn a_blob_damaged_in_the_log_tail_is_repaired_from_a_peer() {
    let root = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start();
    let mut nodes = cluster(root.path(), &etcd, 3);
    // n2 keeps a long stretch of log past its durable mark: a crash makes it replay that.
    nodes[2].extra =
        ["--checkpoint-interval-ms", "600000", "--compaction-interval-secs", "3600"].map(String::from).to_vec();
    apply_topology(&etcd, root.path(), &nodes.iter().collect::<Vec<_>>(), 1);
    for n in nodes.iter_mut() {
        n.start();
    }
    wait_replicating(&nodes.iter().collect::<Vec<_>>(), 1);
    let client = support::client();
    let mut blobs = BTreeMap::new();
    let victim_data = payload(4242, 300_000);
    let victim = put(&client, &nodes[0], &victim_data).unwrap();
    blobs.insert(victim.clone(), victim_data.clone());
    for seed in 0..20u64 {
        let data = payload(seed, 5000);
        blobs.insert(put(&client, &nodes[(seed % 3) as usize], &data).unwrap(), data);
    }
    assert_converged(&nodes.iter().collect::<Vec<_>>(), &blobs, Duration::from_secs(30));
    // A write only n2 ever got (as when a PUT failed its quorum): never acknowledged. n0 and n1
    // are frozen meanwhile, so that they cannot pull it from n2's journal before n2 crashes.
    nodes[0].signal("-STOP");
    nodes[1].signal("-STOP");
    let orphan = cairn_common::BlobId::generate(0);
    let orphan_data = payload(777, 200_000);
    put_on_replica(&nodes[2], orphan, &orphan_data);

    // n2 crashes; one byte of each blob's record rots on its disk.
    nodes[2].kill9();
    nodes[0].signal("-CONT");
    nodes[1].signal("-CONT");
    for data in [&victim_data, &orphan_data] {
        let needle = &data[100_000..100_064];
        let mut flipped = false;
        for entry in walk(&nodes[2].dir) {
            if entry.extension().is_some_and(|e| e == "seg") {
                let mut bytes = std::fs::read(&entry).unwrap();
                if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
                    bytes[at + 10] ^= 0x01;
                    std::fs::write(&entry, bytes).unwrap();
                    flipped = true;
                }
            }
        }
        assert!(flipped, "the blob's record was found on n2's disk");
    }
    nodes[2].start();
    // Until n2 has replayed its log, its replica is not open and says so (503), never 404.
    let deadline = Instant::now() + Duration::from_secs(30);
    let local = loop {
        assert!(Instant::now() < deadline, "n2 never opened its replica");
        let local = client.get(nodes[2].url(&format!("/v1/blobs/{victim}?local=true"))).send().unwrap();
        if local.status() != 503 {
            break local;
        }
        assert!(local.text().unwrap().contains("not open yet"));
        std::thread::sleep(Duration::from_millis(20));
    };
    // Never wrong bytes: the damaged replica says so, the router serves the blob from a peer...
    if local.status() != 200 {
        // (200 only if replication already repaired it.)
        assert_eq!(local.status(), 500);
        let error = &local.json::<Value>().unwrap()["error"];
        assert_eq!(error["code"], "integrity_error");
        assert!(error["message"].as_str().unwrap().contains("damaged"), "found by recovery: {error}");
    }
    let routed = client.get(nodes[2].url(&format!("/v1/blobs/{victim}"))).send().unwrap();
    assert_eq!(routed.status(), 200);
    assert!(routed.bytes().unwrap().as_ref() == victim_data.as_slice());
    // ...and replication repairs the replica itself; the records after the damage were kept.
    assert_converged(&nodes.iter().collect::<Vec<_>>(), &blobs, Duration::from_secs(30));
    // The write no other replica ever had is forgotten, not an error forever.
    wait_until("the never-acknowledged write is forgotten", Duration::from_secs(20), || {
        client.get(nodes[2].url(&format!("/v1/blobs/{orphan}?local=true"))).send().unwrap().status() == 404
    });
}

/// One journal entry that cannot be applied (both peers answer 500 for its blob: a checksum
/// mismatch on their disks) does not stop the entries after it: the returning replica applies
/// them, owes that one (durably, with its error, in `/v1/admin/replicas` and the metrics), retries
/// it with back-off, and settles it once a peer can send the blob again.
#[test]
fn an_entry_that_cannot_be_applied_is_owed_and_the_rest_goes_on() {
    let root = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start();
    let mut nodes = started_cluster_with(root.path(), &etcd, 3, 1, |n| {
        // Checkpointed at once: the blob's journal entry and index entry are durable, so the
        // rot below is found only when its bytes are read.
        n.extra = ["--checkpoint-interval-ms", "100"].map(String::from).to_vec();
    });
    // n2 is away while the victim, then ten more, are written (quorum 2 on n0 and n1).
    nodes[2].kill9();
    let client = support::client();
    let victim_data = payload(9090, 300_000);
    let victim = put(&client, &nodes[0], &victim_data).unwrap();
    let mut others = BTreeMap::new();
    for seed in 0..10u64 {
        let data = payload(seed, 4000);
        others.insert(put(&client, &nodes[(seed % 2) as usize], &data).unwrap(), data);
    }
    std::thread::sleep(Duration::from_millis(500)); // a checkpoint
                                                    // The victim's bytes rot on n0 and n1 (n0's original kept, to heal it later).
    let needle = &victim_data[100_000..100_064];
    let mut n0_original = Vec::new();
    for i in [0, 1] {
        nodes[i].kill9();
        for entry in walk(&nodes[i].dir) {
            if entry.extension().is_some_and(|e| e == "seg") {
                let mut bytes = std::fs::read(&entry).unwrap();
                if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
                    if i == 0 {
                        n0_original.push((entry.clone(), bytes.clone()));
                    }
                    bytes[at + 10] ^= 0x01;
                    std::fs::write(&entry, bytes).unwrap();
                }
            }
        }
        nodes[i].start();
    }
    assert!(!n0_original.is_empty(), "the victim's record was found on n0's disk");
    let local = |node: &Node, id: &str| client.get(node.url(&format!("/v1/blobs/{id}?local=true"))).send().unwrap();
    assert_eq!(local(&nodes[0], &victim).status(), 500, "n0 cannot send the victim");

    // n2 returns: everything after the victim arrives; the victim is owed, with its error.
    nodes[2].start();
    assert_converged(&[&nodes[2]], &others, Duration::from_secs(30));
    let owed = |node: &Node| -> Vec<Value> {
        let list: Vec<Value> = client.get(node.url("/v1/admin/replicas")).send().unwrap().json().unwrap();
        list.into_iter().filter(|p| p["owed_entries"].as_u64() > Some(0)).collect()
    };
    wait_until("the victim owed to n2", Duration::from_secs(30), || !owed(&nodes[2]).is_empty());
    for p in owed(&nodes[2]) {
        let error = p["owed_error"].as_str().unwrap();
        assert!(error.contains(&victim) && error.contains("500"), "{p}");
    }
    // The operator reads the same report (its wire type), and past the grace it is a condition.
    let progress: Vec<cairn_operator::platform::ReplicaProgress> =
        client.get(nodes[2].url("/v1/admin/replicas")).send().unwrap().json().unwrap();
    assert!(progress.iter().any(|p| !p.caught_up()), "{progress:?}");
    let report = [("n2".to_string(), progress)];
    assert_eq!(cairn_operator::platform::stalled(&report, Duration::from_secs(600)), None, "within the grace");
    std::thread::sleep(Duration::from_millis(1100));
    let report = [("n2".to_string(), client.get(nodes[2].url("/v1/admin/replicas")).send().unwrap().json().unwrap())];
    let stalled = cairn_operator::platform::stalled(&report, Duration::from_secs(1))
        .unwrap_or_else(|| panic!("stalled past 1 s: {report:?}"));
    assert!(stalled.contains("partition 0 on n2 owes 1 entry of n") && stalled.contains(&victim), "{stalled}");
    let metrics = client.get(nodes[2].url("/metrics")).send().unwrap().text().unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("cairn_replication_owed_entries{") && l.ends_with(" 1")),
        "{metrics}"
    );
    assert_ne!(local(&nodes[2], &victim).status(), 200);

    // n0 healed (its disk as it was): a retry fetches the victim, and n2 owes nothing.
    nodes[0].kill9();
    for (path, bytes) in &n0_original {
        std::fs::write(path, bytes).unwrap();
    }
    nodes[0].start();
    wait_until("the owed entries settled", Duration::from_secs(60), || owed(&nodes[2]).is_empty());
    let back = local(&nodes[2], &victim);
    assert_eq!(back.status(), 200);
    assert!(back.bytes().unwrap().as_ref() == victim_data.as_slice());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn a_replica_that_cannot_be_opened_is_reported_and_retried() {
    let root = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start();
    let mut nodes = cluster(root.path(), &etcd, 3);
    apply_topology(&etcd, root.path(), &nodes.iter().collect::<Vec<_>>(), 2);
    // Something else sits where n2's replica of partition 0 would live.
    let blocker = nodes[2].dir.join("volumes").join("c1-p0-n2");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, "not a volume").unwrap();
    for n in nodes.iter_mut() {
        n.start();
    }
    let client = support::client();
    wait_until("n2 reports the replica it cannot open", Duration::from_secs(20), || {
        show(&etcd)["live"]["n2"]["unopened"]["0"].is_string()
    });
    let ready: Value = client.get(nodes[2].url("/readyz")).send().unwrap().json().unwrap();
    assert!(ready["unopened"]["0"].as_str().is_some(), "{ready}");
    assert_eq!(ready["volumes"].as_array().unwrap().len(), 1, "the other replica is served: {ready}");
    // The blob API works meanwhile (two replicas of partition 0 are a quorum).
    let id = put(&client, &nodes[2], b"while n2 lacks a replica").unwrap();
    // Once the obstacle is gone, the node opens the replica by itself and catches up.
    std::fs::remove_file(&blocker).unwrap();
    wait_until("n2 opens the replica", Duration::from_secs(20), || show(&etcd)["live"]["n2"]["unopened"].is_null());
    let blobs = BTreeMap::from([(id, b"while n2 lacks a replica".to_vec())]);
    assert_converged(&nodes.iter().collect::<Vec<_>>(), &blobs, Duration::from_secs(30));
}

/// A TTL change (and one that changes nothing) replicates once and the replicas settle: every
/// replica ends with the same expiry, nothing lags, and the journals stop growing. (Replicas
/// copied each other's current expiry as new entries, which the peers pulled back; now the
/// expiry with the latest stamp wins, so a copy never goes back.)
#[test]
fn ttl_changes_replicate_once_and_settle() {
    let etcd = EtcdServer::start();
    let root = tempfile::tempdir().unwrap();
    let nodes = started_cluster(root.path(), &etcd, 3, 1);
    let refs: Vec<&Node> = nodes.iter().collect();
    let client = support::client();
    let id = put(&client, &nodes[0], b"a blob whose expiry changes").unwrap();
    let ttl = |node: &Node, body: &str| {
        let r = client.put(node.url(&format!("/v1/blobs/{id}/ttl"))).body(body.to_owned()).send().unwrap();
        assert_eq!(r.status(), 204, "{}", r.text().unwrap());
    };
    let before = journal_tails(&refs, 0);
    ttl(&nodes[0], r#"{"ttl_seconds": 86400}"#);
    ttl(&nodes[1], r#"{"ttl_seconds": null}"#);
    ttl(&nodes[2], r#"{"ttl_seconds": null}"#); // already so
    let expiry = |node: &Node| -> Value {
        let info: Value =
            client.get(node.url(&format!("/v1/blobs/{id}/info?local=true"))).send().unwrap().json().unwrap();
        info["expires_ms"].clone()
    };
    // Every replica holds the same expiry, nothing lags, and the journals then stay as they are.
    // (Equal expiries are not yet the end: a replica may still take a peer's later stamp of the
    // same expiry, one more entry. So the journals must also stand still between two looks.)
    let settle = |when: &str| -> Vec<u64> {
        let mut last_tails = None;
        wait_until(&format!("the replicas to agree and catch up {when}"), Duration::from_secs(30), || {
            let tails = journal_tails(&refs, 0);
            let agree = refs.iter().all(|n| expiry(n) == expiry(&nodes[0]));
            let caught_up = refs.iter().all(|n| {
                let list: Vec<Value> = client.get(n.url("/v1/admin/replicas")).send().unwrap().json().unwrap();
                list.iter().all(|p| p["lag_entries"] == 0)
            });
            let still = last_tails.as_ref() == Some(&tails);
            last_tails = Some(tails);
            agree && caught_up && still
        });
        let settled = journal_tails(&refs, 0);
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(journal_tails(&refs, 0), settled, "the journals keep growing {when}");
        assert!(refs.iter().all(|n| expiry(n) == expiry(&nodes[0])), "the replicas agree {when}");
        settled
    };
    let settled = settle("after three changes");
    // Each replica took the three changes as their coordinators stamped them; a copy from a peer
    // adds an entry only where a replica had missed the latest.
    assert_eq!(expiry(&nodes[0]), Value::Null, "the last change wins");
    // At most: the put, if a replica copied it late, the three changes and a copy of each.
    let grown: Vec<u64> = settled.iter().zip(&before).map(|(s, b)| s - b).collect();
    assert!(grown.iter().all(|g| *g <= 7), "not a loop: {before:?} → {settled:?}");

    // Changes racing through two nodes at once, round after round: whichever wins, every
    // replica ends with the same one and the journals stop.
    for round in 0..10u64 {
        std::thread::scope(|s| {
            s.spawn(|| ttl(&nodes[1], &format!(r#"{{"ttl_seconds": {}}}"#, 3600 + round)));
            s.spawn(|| ttl(&nodes[2], &format!(r#"{{"ttl_seconds": {}}}"#, 7200 + round)));
        });
    }
    settle("after the races");

    // A stamp far ahead of a replica's clock is refused: it would win over every later change.
    let replica_client = support::node_client(&nodes[0].etcd, "default", "c1");
    let ahead = cairn_datanode::engine::now_ms() + 2 * 3_600_000;
    let r = replica_client
        .put(nodes[1].url(&format!("/replica/v1/blobs/{id}/ttl")))
        .json(&json!({"expires_ms": null, "at_ms": ahead}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("clocks disagree"));

    // A change still on its way from an earlier request (an older stamp) reaches one replica
    // after a later change was acknowledged: it is kept out, the replica answers its own stamp.
    let now = cairn_datanode::engine::now_ms();
    let current = expiry(&nodes[0]);
    let ttl_url = |node: &Node| node.url(&format!("/replica/v1/blobs/{id}/ttl"));
    let late = replica_client
        .put(ttl_url(&nodes[1]))
        .json(&json!({"expires_ms": now + 5 * 86_400_000, "at_ms": now - 60_000}))
        .send()
        .unwrap();
    assert_eq!(late.status(), 200, "kept, not taken");
    let answer: Value = late.json().unwrap();
    assert!(answer["kept_stamp"].as_u64().unwrap() > now - 60_000, "{answer}");
    settle("after a late change");
    assert!(refs.iter().all(|n| expiry(n) == current), "the acknowledged change stays everywhere");

    // Every replica holds an expiry set through a node whose clock was half an hour ahead: a
    // change made now through a node with the right clock still wins (stamped again above).
    let ahead_expiry = now + 10 * 86_400_000;
    for node in &nodes {
        let r = replica_client
            .put(ttl_url(node))
            .json(&json!({"expires_ms": ahead_expiry, "at_ms": now + 1_800_000}))
            .send()
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    ttl(&nodes[2], r#"{"ttl_seconds": 3600}"#);
    settle("after a change over a stamp from a clock ahead");
    let won = expiry(&nodes[0]).as_u64().unwrap();
    assert!(won < now + 2 * 3_600_000, "the change made now won: {won} (ahead: {ahead_expiry})");
}

/// A replica whose expiry was stamped by a clock hours ahead (here written into its volume while
/// it is stopped): its peers do not take that expiry — it would beat every later change until
/// the clocks met — but owe the entry, saying why, and keep their own.
#[test]
fn an_expiry_stamped_by_a_clock_far_ahead_is_owed_not_taken() {
    let etcd = EtcdServer::start();
    let root = tempfile::tempdir().unwrap();
    let mut nodes = started_cluster(root.path(), &etcd, 3, 1);
    let client = support::client();
    let id = put(&client, &nodes[0], b"a blob one clock disagrees about").unwrap();
    let local = |node: &Node| client.get(node.url(&format!("/v1/blobs/{id}/info?local=true"))).send().unwrap();
    wait_until("the blob on every replica", Duration::from_secs(30), || nodes.iter().all(|n| local(n).status() == 200));

    nodes[2].signal("-TERM");
    nodes[2].child.take().unwrap().wait().unwrap();
    let index = walk(&nodes[2].dir)
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == cairn_common::volume_layout::INDEX_FILE))
        .expect("n2's index");
    let volume_dir = index.parent().unwrap();
    let now = cairn_datanode::engine::now_ms();
    {
        use cairn_datanode::engine::{Volume, VolumeConfig};
        let marker = cairn_common::volume_layout::VolumeMarker::read(volume_dir).unwrap();
        let config = VolumeConfig { max_blob_bytes: 4 << 20, ..VolumeConfig::default() };
        let metrics = std::sync::Arc::new(cairn_datanode::metrics::EngineMetrics::default());
        let volume = Volume::create_or_open(volume_dir, &marker, config, metrics).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let blob: cairn_common::BlobId = id.parse().unwrap();
        runtime.block_on(volume.set_ttl(blob, Some(now + 86_400_000), now + 3 * 3_600_000)).unwrap();
        volume.close();
    }
    nodes[2].start();

    wait_until("n0 owing n2's entry, with the reason", Duration::from_secs(60), || {
        let list: Vec<Value> = client.get(nodes[0].url("/v1/admin/replicas")).send().unwrap().json().unwrap();
        list.iter().any(|p| {
            p["peer"] == "n2"
                && p["owed_entries"].as_u64() >= Some(1)
                && p["owed_error"].as_str().is_some_and(|e| e.contains("clocks disagree"))
        })
    });
    for node in &nodes[..2] {
        let info: Value = local(node).json().unwrap();
        assert_eq!(info["expires_ms"], Value::Null, "{} kept its own expiry", node.id);
    }
}

/// Anti-entropy: whatever makes a replica lose what its journal token says it has (here its
/// index loses two records by hand, offline: a live blob and a tombstone), replicas converge
/// again by comparing id digests, without any new write to replicate.
#[test]
fn a_record_lost_from_one_replicas_index_comes_back_by_anti_entropy() {
    let root = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start();
    let mut nodes = started_cluster_with(root.path(), &etcd, 3, 1, |n| {
        n.extra = ["--anti-entropy-interval-secs", "2", "--checkpoint-interval-ms", "100"].map(String::from).to_vec();
    });
    let client = support::client();
    let mut blobs = BTreeMap::new();
    for seed in 0..20u64 {
        let data = payload(seed, 3000 + seed as usize);
        blobs.insert(put(&client, &nodes[(seed % 3) as usize], &data).unwrap(), data);
    }
    let (lost, lost_data) = blobs.iter().next().map(|(k, v)| (k.clone(), v.clone())).unwrap();
    let deleted = blobs.keys().nth(1).unwrap().clone();
    assert_eq!(client.delete(nodes[0].url(&format!("/v1/blobs/{deleted}"))).send().unwrap().status(), 204);
    blobs.remove(&deleted);
    assert_converged(&nodes.iter().collect::<Vec<_>>(), &blobs, Duration::from_secs(30));
    let local = |node: &Node, id: &str| client.get(node.url(&format!("/v1/blobs/{id}?local=true"))).send().unwrap();
    wait_until("the tombstone on every replica", Duration::from_secs(30), || {
        nodes.iter().all(|n| local(n, &deleted).status() == 410)
    });

    // Its journal tokens past every entry: after the restart, pulling brings nothing back.
    wait_pulled_to_tails(&nodes.iter().collect::<Vec<_>>(), &nodes[2], 0);
    // n2 stops cleanly (its index checkpointed: nothing is replayed at restart), and its index
    // loses the lost blob's record and the tombstone.
    nodes[2].signal("-TERM");
    let mut child = nodes[2].child.take().unwrap();
    child.wait().unwrap();
    let index = walk(&nodes[2].dir)
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == cairn_common::volume_layout::INDEX_FILE))
        .expect("n2's index");
    {
        let db = redb::Database::open(&index).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(cairn_datanode::engine::index::BLOBS).unwrap();
            for id in [&lost, &deleted] {
                let id: cairn_common::BlobId = id.parse().unwrap();
                assert!(table.remove(id.to_bytes()).unwrap().is_some(), "{id} was in n2's index");
            }
        }
        txn.commit().unwrap();
    }
    nodes[2].start();
    // Nothing new is written: only anti-entropy can bring them back.
    wait_until("the lost blob back on n2", Duration::from_secs(60), || local(&nodes[2], &lost).status() == 200);
    assert!(local(&nodes[2], &lost).bytes().unwrap().as_ref() == lost_data.as_slice());
    wait_until("the lost tombstone back on n2", Duration::from_secs(60), || local(&nodes[2], &deleted).status() == 410);
    let metrics = client.get(nodes[2].url("/metrics")).send().unwrap().text().unwrap();
    let repaired = metric_sum(&metrics, "cairn_anti_entropy_repaired_total", "");
    assert!(repaired >= 2.0, "anti-entropy copied both: {metrics}");
    // The calls it made to its peers (the pass that copied them, to whichever peer it was) and to
    // etcd are timed, by kind.
    let timed = |prefix: &str, call: &str| {
        metrics.lines().any(|l| l.starts_with(prefix) && l.contains(&format!("call=\"{call}\"")))
    };
    for call in ["digest", "bucket", "journal"] {
        assert!(timed("cairn_peer_request_duration_seconds_count{", call), "{call} in {metrics}");
    }
    for call in ["register", "load"] {
        assert!(timed("cairn_etcd_request_duration_seconds_count{", call), "{call} in {metrics}");
    }
    assert_converged(&nodes.iter().collect::<Vec<_>>(), &blobs, Duration::from_secs(10));
}

/// The journal is bounded: a replica keeps at most `--journal-retain-entries` entries, and a peer
/// that fell behind what is kept (it was down) bootstraps from the index — every blob and every
/// tombstone it missed arrives — then goes on pulling the journal.
#[test]
fn a_replica_behind_the_retained_journal_bootstraps_from_the_index() {
    let root = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start();
    let mut nodes = started_cluster_with(root.path(), &etcd, 3, 1, |n| {
        n.extra = ["--journal-retain-entries", "30"].map(String::from).to_vec();
    });
    nodes[2].kill9();
    let client = support::client();
    let mut blobs = BTreeMap::new();
    let mut with_ttl = String::new();
    for seed in 0..100u64 {
        let data = payload(seed, 1000 + seed as usize);
        let id = put(&client, &nodes[(seed % 2) as usize], &data).unwrap();
        if seed == 10 {
            // A TTL change whose journal entry will be truncated before n2 returns.
            let r = client.put(nodes[0].url(&format!("/v1/blobs/{id}/ttl"))).body(r#"{"ttl_seconds": 86400}"#).send();
            assert_eq!(r.unwrap().status(), 204);
            with_ttl = id.clone();
        }
        blobs.insert(id, data);
    }
    let deleted: Vec<String> = blobs.keys().filter(|id| **id != with_ttl).take(5).cloned().collect();
    for id in &deleted {
        assert_eq!(client.delete(nodes[0].url(&format!("/v1/blobs/{id}"))).send().unwrap().status(), 204);
        blobs.remove(id);
    }
    let replica_client = support::node_client(&nodes[0].etcd, "default", "c1");
    let page = |node: &Node| -> Value {
        let url = node.url("/replica/v1/partitions/0/journal?from=0&limit=1");
        replica_client.get(url).send().unwrap().json().unwrap()
    };
    wait_until("n0's journal truncated to its last 30 entries", Duration::from_secs(40), || {
        let p = page(&nodes[0]);
        p["truncated"] == true && p["tail"].as_u64().unwrap() - p["head"].as_u64().unwrap() <= 30
    });
    wait_until("n1's journal truncated too", Duration::from_secs(40), || page(&nodes[1])["truncated"] == true);

    // n2 returns far behind what its peers kept: it bootstraps, and has everything.
    nodes[2].start();
    assert_converged(&[&nodes[2]], &blobs, Duration::from_secs(60));
    let local = |id: &str| client.get(nodes[2].url(&format!("/v1/blobs/{id}?local=true"))).send().unwrap().status();
    wait_until("the deletes on n2", Duration::from_secs(30), || deleted.iter().all(|id| local(id) == 410));
    // The copied blob has its expiry as set, with the stamp it was set at (not the put's time,
    // which would lose to any older change later).
    let meta = |node: &Node| -> Value {
        let url = node.url(&format!("/replica/v1/blobs/{with_ttl}/meta"));
        let m: Value = replica_client.get(url).send().unwrap().json().unwrap();
        json!([m["expires_ms"], m["expiry_set_ms"]])
    };
    assert!(meta(&nodes[0])[0].is_u64(), "{}", meta(&nodes[0]));
    assert_eq!(meta(&nodes[2]), meta(&nodes[0]));
    // ...and goes on with the journal: a new write reaches it by replication alone.
    let data = payload(5150, 2000);
    let id = put(&client, &nodes[0], &data).unwrap();
    blobs.insert(id, data);
    assert_converged(&nodes.iter().collect::<Vec<_>>(), &blobs, Duration::from_secs(30));
    let caught_up = || {
        let list: Vec<Value> = client.get(nodes[2].url("/v1/admin/replicas")).send().unwrap().json().unwrap();
        list.len() == 2 && list.iter().all(|p| p["lag_entries"] == 0 && p["last_error"].is_null())
    };
    wait_until("n2 caught up, no error", Duration::from_secs(30), caught_up);
}

/// A request's id (the client's `X-Request-Id`, or one made up) is answered back and follows
/// the request into the log of every replica it reached.
#[test]
fn a_request_id_follows_a_write_into_every_replicas_log() {
    let root = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start();
    let nodes = started_cluster_with(root.path(), &etcd, 3, 1, |n| {
        n.log = Some(root.path().join(format!("{}.log", n.id)));
    });
    let client = support::client();
    let r = client.post(nodes[0].url("/v1/blobs")).header("x-request-id", "trace-me-42").body("hello").send().unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-request-id"], "trace-me-42");
    let made_up = client.get(nodes[0].url("/healthz")).header("x-request-id", "no spaces").send().unwrap();
    let id = made_up.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    let logged =
        |n: &Node| std::fs::read_to_string(n.log.as_ref().unwrap()).unwrap_or_default().contains("trace-me-42");
    wait_until("the id in every replica's log", Duration::from_secs(10), || nodes.iter().all(logged));
}

/// A replica that has caught up with its peers asks them for their journals in pages, not once
/// per write: the router writes every replica itself, so a puller following each commit would
/// spend a request, a page and a progress write per write, for almost nothing to copy (it cost a
/// third of a cluster's small-PUT rate). A write that reached only one replica still arrives.
#[test]
fn a_caught_up_replica_pulls_its_peers_journals_in_pages_not_per_write() {
    let root = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start();
    let nodes = started_cluster(root.path(), &etcd, 3, 1);
    let client = support::client();
    let journal_calls = |node: &Node| -> u64 {
        let metrics = client.get(node.url("/metrics")).send().unwrap().text().unwrap();
        metric_sum(&metrics, "cairn_peer_request_duration_seconds_count", "call=\"journal\"") as u64
    };
    let before = journal_calls(&nodes[1]);
    let started = Instant::now();
    let mut blobs = BTreeMap::new();
    let mut seed = 0u64;
    while started.elapsed() < Duration::from_secs(3) {
        seed += 1;
        let data = payload(seed, 100 + (seed as usize * 37) % 4000);
        blobs.insert(put(&client, &nodes[(seed % 3) as usize], &data).expect("put at quorum"), data);
    }
    let calls = journal_calls(&nodes[1]) - before;
    // n1 follows two peers, each at most once per pause (the answer and its page take time too),
    // plus the request in flight when the window opened.
    let pause = cairn_datanode::cluster::replication::FOLLOW_PAUSE.as_millis();
    let bound = 2 * (started.elapsed().as_millis() / pause + 2) as u64;
    assert!(blobs.len() as u64 > 3 * bound, "{} writes: too few to tell pages from writes", blobs.len());
    assert!(
        calls <= bound,
        "{calls} journal requests for {} writes in {:?} (at most {bound})",
        blobs.len(),
        started.elapsed()
    );
    // Written on one replica alone (as when the router's write to the others failed): pulled.
    let id = cairn_common::BlobId::generate(0);
    let lone = payload(4242, 3000);
    put_on_replica(&nodes[2], id, &lone);
    blobs.insert(id.to_string(), lone);
    assert_converged(&nodes.iter().collect::<Vec<_>>(), &blobs, Duration::from_secs(20));
}

/// A partition that fills up while one replica is away must not leave that replica short of room
/// for what it missed: new blobs stop (the partition turns read-only) while each replica still
/// has room kept for its peers, and the returning replica takes every acknowledged blob — here
/// although it holds a write the others never had (room they did not spend).
#[test]
fn a_replica_away_while_its_partition_filled_takes_everything_it_missed() {
    let root = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start();
    let mut nodes = cluster(root.path(), &etcd, 3);
    for n in nodes.iter_mut() {
        n.max_blob = "256KiB"; // must fit the 1 MiB segments
    }
    let placed: Vec<(&Node, String)> = nodes.iter().map(|n| (n, format!("{}-d0", n.id))).collect();
    apply_topology_with(&etcd, root.path(), &placed, 1, "4MiB", "1MiB");
    for n in nodes.iter_mut() {
        n.start();
    }
    wait_replicating(&nodes.iter().collect::<Vec<_>>(), 1);
    let client = support::client();
    // A write only n2 got (its peers frozen meanwhile), then n2 is away.
    nodes[0].signal("-STOP");
    nodes[1].signal("-STOP");
    let orphan = cairn_common::BlobId::generate(0);
    put_on_replica(&nodes[2], orphan, &payload(4242, 120_000));
    nodes[2].kill9();
    nodes[0].signal("-CONT");
    nodes[1].signal("-CONT");

    // The partition fills on n0 and n1 (large blobs, then small ones in what is left) until it
    // is read-only.
    let mut stored = BTreeMap::new();
    for size in [40_000, 2_000] {
        for seed in 0..5000u64 {
            let data = payload(seed + size as u64, size);
            match put(&client, &nodes[(seed % 2) as usize], &data) {
                Ok(id) => {
                    stored.insert(id, data);
                }
                Err(_) => break,
            }
        }
    }
    wait_until("partition 0 read-only in etcd", Duration::from_secs(10), || {
        show(&etcd)["topology"]["partitions"]["0"]["state"] == "read_only"
    });
    assert!(stored.len() > 50, "{} blobs before the partition filled", stored.len());

    // n2 returns: it owes nothing, and has every acknowledged blob.
    nodes[2].start();
    assert_converged(&[&nodes[2]], &stored, Duration::from_secs(60));
    wait_until("n2 caught up, owing nothing", Duration::from_secs(30), || {
        let list: Vec<Value> = client.get(nodes[2].url("/v1/admin/replicas")).send().unwrap().json().unwrap();
        list.len() == 2 && list.iter().all(|p| p["lag_entries"] == 0 && p["owed_entries"] == 0)
    });
}

/// A key made with `cairn keys create`: its token.
fn create_key(etcd: &EtcdServer, name: &str, scopes: &str) -> String {
    create_key_with(etcd, name, scopes, &[])
}

fn create_key_with(etcd: &EtcdServer, name: &str, scopes: &str, more: &[&str]) -> String {
    create_key_made(etcd, name, scopes, more)["token"].as_str().unwrap().to_owned()
}

/// What `cairn keys create -o json` printed.
fn create_key_made(etcd: &EtcdServer, name: &str, scopes: &str, more: &[&str]) -> Value {
    let out = Command::new(binary("cairn"))
        .args(["keys", "create", "--etcd", &etcd.endpoint(), "--cluster", "c1", "--name", name, "--scope", scopes])
        .args(more)
        .args(["-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "cairn keys create: {}", String::from_utf8_lossy(&out.stderr));
    let made: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        made["token"].as_str().unwrap(),
        format!("{}.{}", made["id"].as_str().unwrap(), made["secret"].as_str().unwrap())
    );
    made
}

fn with_token(token: &str) -> Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    Client::builder().default_headers(headers).build().unwrap()
}

/// Keys made with the CLI work on every node within their scopes, and a revoked one stops
/// working everywhere within seconds; replica routes take only the node token.
#[test]
fn access_keys_work_cluster_wide_within_their_scopes_until_revoked() {
    let root = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start();
    let nodes = started_cluster(root.path(), &etcd, 3, 2);
    let (reader, writer, deleter) = (
        create_key(&etcd, "reader", "read"),
        create_key(&etcd, "writer", "write"),
        create_key(&etcd, "cleaner", "read,delete"),
    );
    let (reader_client, writer_client, deleter_client) =
        (with_token(&reader), with_token(&writer), with_token(&deleter));
    let status = |client: &Client, request: fn(&Client, String) -> reqwest::blocking::RequestBuilder, url: String| {
        request(client, url).send().unwrap().status().as_u16()
    };
    let get = |c: &Client, u: String| c.get(u);
    let post = |c: &Client, u: String| c.post(u).body("scoped");
    let delete = |c: &Client, u: String| c.delete(u);

    let id = put(&writer_client, &nodes[0], b"scoped").unwrap();
    let blob = |n: &Node| n.url(&format!("/v1/blobs/{id}"));
    for node in &nodes {
        assert_eq!(status(&reader_client, get, blob(node)), 200, "{} reads with a read key", node.id);
        assert_eq!(status(&writer_client, get, blob(node)), 403, "a write key cannot read");
        assert_eq!(status(&reader_client, post, node.url("/v1/blobs")), 403, "a read key cannot write");
        assert_eq!(status(&reader_client, delete, blob(node)), 403, "a read key cannot delete");
        assert_eq!(status(&reader_client, get, node.url("/v1/admin/replicas")), 403, "admin routes need admin");
        let ttl = writer_client.put(blob(node)).body("{\"ttl_seconds\": 1}").send().unwrap().status();
        let ttl_url = node.url(&format!("/v1/blobs/{id}/ttl"));
        let ttl_status = writer_client.put(ttl_url).body("{\"ttl_seconds\": 1}").send().unwrap().status();
        assert_eq!((ttl.as_u16(), ttl_status.as_u16()), (403, 403), "a TTL change can end a blob: delete scope");
        assert_eq!(status(&Client::new(), get, blob(node)), 401, "nobody without a key");
    }
    let r = writer_client.get(blob(&nodes[1])).send().unwrap().json::<Value>().unwrap();
    assert_eq!(r["error"]["code"], "forbidden");
    assert!(r["error"]["message"].as_str().unwrap().contains("no read scope"), "{r}");

    // `keys list` shows the keys, never a secret.
    let out = Command::new(binary("cairn"))
        .args(["keys", "list", "--etcd", &etcd.endpoint(), "--cluster", "c1"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    for token in [&reader, &writer, &deleter] {
        let (key_id, secret) = token.split_once('.').unwrap();
        assert!(list.contains(key_id) && !list.contains(secret), "{list}");
    }

    // Revoked: every node refuses the key within seconds (each watches etcd).
    let reader_id = reader.split_once('.').unwrap().0;
    let out = Command::new(binary("cairn"))
        .args(["keys", "revoke", "--etcd", &etcd.endpoint(), "--cluster", "c1", reader_id])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let revoked = Instant::now();
    wait_until("the revoked key refused by every node", Duration::from_secs(5), || {
        nodes.iter().all(|n| status(&reader_client, get, blob(n)) == 401)
    });
    eprintln!("revocation took effect on every node in {:?}", revoked.elapsed());
    // Revoking it again says there is no such key.
    let out = Command::new(binary("cairn"))
        .args(["keys", "revoke", "--etcd", &etcd.endpoint(), "--cluster", "c1", reader_id])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no key"));
    assert_eq!(status(&deleter_client, delete, blob(&nodes[2])), 204, "the delete key deletes");

    // Replica routes: the node token alone, whatever else is presented.
    let journal = |n: &Node| n.url("/replica/v1/partitions/0/journal?from=0&limit=1");
    let admin = support::client();
    for node in &nodes {
        assert_eq!(status(&admin, get, journal(node)), 401, "an admin key is no datanode");
        assert_eq!(status(&Client::new(), get, journal(node)), 401);
        let forged = Client::new().get(journal(node)).header("x-cairn-node-token", "forged").send().unwrap();
        assert_eq!(forged.status(), 401);
        let peer = support::node_client(&etcd.endpoint(), "default", "c1");
        assert_eq!(peer.get(journal(node)).send().unwrap().status(), 200);
        // A delete through the replica API is the one that would wipe a blob on every replica.
        let wipe = Client::new().delete(node.url(&format!("/replica/v1/blobs/{id}?if_present=false"))).send().unwrap();
        assert_eq!(wipe.status(), 401);
    }
}

/// schemathesis against a cluster node's OpenAPI document, which has the replica routes: the
/// blob API with an access key, the replica routes with the node token; nothing undocumented, no
/// 5xx, and every route refuses callers without (or with wrong) credentials (`ignored_auth`).
#[test]
fn schemathesis_finds_nothing_against_a_cluster_node() {
    let etcd = EtcdServer::start();
    let root = tempfile::tempdir().unwrap();
    let burst = ["--auth-failure-burst".to_owned(), "1000000".to_owned()];
    let nodes = started_cluster_with(root.path(), &etcd, 3, 2, |n| n.extra.extend(burst.clone()));
    let doc: Value = support::client().get(nodes[0].url("/openapi.json")).send().unwrap().json().unwrap();
    let replica_paths = doc["paths"].as_object().unwrap().keys().filter(|p| p.starts_with("/replica/")).count();
    assert!(replica_paths >= 8, "a cluster node documents its replica routes: {replica_paths}");
    let token = support::node_token(&etcd.endpoint(), "default", "c1");
    let base = nodes[0].url("");
    let key = format!("Authorization: {}", cairn_testkit::keys::authorization());
    let (ok, report) = support::schemathesis(&base, &[key], &["--exclude-path-regex", "^/replica/"], 40);
    assert!(ok, "the public API: {report}");
    let node = format!("{}: {token}", cairn_cluster::access::NODE_TOKEN_HEADER);
    let (ok, report) = support::schemathesis(&base, &[node], &["--include-path-regex", "^/replica/"], 40);
    assert!(ok, "the replica API: {report}");
}

/// `--peer-listen`: the replica routes live on a port of their own (for a NetworkPolicy to keep
/// to the cluster's datanodes); the blob port has none of them and does not document them; the
/// nodes register their peer address and replicate, route and read each other through it.
#[test]
fn replica_routes_on_a_peer_port_of_their_own() {
    let etcd = EtcdServer::start();
    let root = tempfile::tempdir().unwrap();
    let mut peer_ports = Vec::new();
    let nodes = started_cluster_with(root.path(), &etcd, 3, 2, |n| {
        let port = free_port();
        peer_ports.push(port);
        n.extra.extend(["--peer-listen".to_owned(), format!("127.0.0.1:{port}")]);
    });
    let node_client = support::node_client(&etcd.endpoint(), "default", "c1");
    let peer = |i: usize, path: &str| format!("http://127.0.0.1:{}{path}", peer_ports[i]);
    for (i, node) in nodes.iter().enumerate() {
        let r = node_client.get(node.url("/replica/v1/partitions/0/digest")).send().unwrap();
        assert_eq!(r.status(), 404, "{}: the blob port has no replica routes", node.id);
        let r = node_client.get(peer(i, "/replica/v1/partitions/0/digest")).send().unwrap();
        assert!(r.status() == 200 || r.status() == 421, "{}: {}", node.id, r.status());
        let documented = |url: String| -> usize {
            let doc: Value = support::client().get(url).send().unwrap().json().unwrap();
            doc["paths"].as_object().unwrap().keys().filter(|p| p.starts_with("/replica/")).count()
        };
        assert_eq!(documented(node.url("/openapi.json")), 0);
        assert!(documented(peer(i, "/openapi.json")) >= 8);
        // Without the node token the peer port's replica routes refuse, as anywhere.
        let r = Client::new().get(peer(i, "/replica/v1/partitions/0/digest")).send().unwrap();
        assert_eq!(r.status(), 401);
    }
    let live = show(&etcd)["live"].clone();
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(live[&node.id]["peer_address"], format!("127.0.0.1:{}", peer_ports[i]), "{live}");
    }
    // Writes through any node reach every replica (router → peers, pullers), by the peer ports.
    let client = support::client();
    let mut blobs = BTreeMap::new();
    for (i, node) in nodes.iter().enumerate() {
        for j in 0..5 {
            let data = cairn_testkit::payload((i * 10 + j) as u64, 3000 + j * 1000);
            blobs.insert(put(&client, node, &data).unwrap(), data);
        }
    }
    assert_converged(&nodes.iter().collect::<Vec<_>>(), &blobs, Duration::from_secs(30));
}

/// A key limited to some partitions: its new blobs go there, and it reaches no blob elsewhere
/// (403 on read, delete and TTL); `cairn keys list` says its reach.
#[test]
fn a_key_limited_to_partitions_reaches_only_them() {
    let etcd = EtcdServer::start();
    let root = tempfile::tempdir().unwrap();
    let nodes = started_cluster(root.path(), &etcd, 3, 4);
    let admin = support::client();
    let mut elsewhere = Vec::new();
    for i in 0..40 {
        let id = put(&admin, &nodes[i % 3], &cairn_testkit::payload(i as u64, 100)).unwrap();
        if !id.parse::<cairn_common::BlobId>().unwrap().partition().is_multiple_of(2) {
            elsewhere.push(id);
        }
    }
    assert!(!elsewhere.is_empty(), "blobs were spread over the partitions");
    let token = create_key_with(&etcd, "tenant", "read,write,delete", &["--partition", "0,2"]);
    let tenant = with_token(&token);
    let mut mine = Vec::new();
    for i in 0..20 {
        let id = put(&tenant, &nodes[i % 3], b"tenant's").unwrap();
        let partition = id.parse::<cairn_common::BlobId>().unwrap().partition();
        assert!(partition == 0 || partition == 2, "a new blob of the key went to partition {partition}");
        mine.push(id);
    }
    for id in &mine {
        assert_eq!(tenant.get(nodes[1].url(&format!("/v1/blobs/{id}"))).send().unwrap().status(), 200);
    }
    let other = &elsewhere[0];
    for (method, path, body) in [
        (reqwest::Method::GET, format!("/v1/blobs/{other}"), ""),
        (reqwest::Method::HEAD, format!("/v1/blobs/{other}"), ""),
        (reqwest::Method::GET, format!("/v1/blobs/{other}/info"), ""),
        (reqwest::Method::DELETE, format!("/v1/blobs/{other}"), ""),
        (reqwest::Method::PUT, format!("/v1/blobs/{other}/ttl"), "{\"ttl_seconds\": 60}"),
    ] {
        let r = tenant.request(method.clone(), nodes[0].url(&path)).body(body).send().unwrap();
        assert_eq!(r.status(), 403, "{method} {path}");
    }
    // Another spelling of the same id (percent-encoded, as the handler decodes it) is no way round.
    let encoded: String = other.chars().map(|c| format!("%{:02X}", c as u32)).collect();
    let r = tenant.get(nodes[0].url(&format!("/v1/blobs/{encoded}"))).send().unwrap();
    assert_eq!(r.status(), 403, "percent-encoded id");
    assert_eq!(admin.get(nodes[0].url(&format!("/v1/blobs/{other}"))).send().unwrap().status(), 200, "untouched");
    assert_eq!(tenant.delete(nodes[2].url(&format!("/v1/blobs/{}", mine[0]))).send().unwrap().status(), 204);
    let out = Command::new(binary("cairn"))
        .args(["keys", "list", "--etcd", &etcd.endpoint(), "--cluster", "c1"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.contains("REACH") && list.contains("partitions 0,2") && list.contains("every partition"), "{list}");
}

/// Mutual TLS on the peer port: certificates from the cluster CA (`cairn_cluster::peer_tls`);
/// replica routes refuse a caller without a certificate, or with one from another CA, before any
/// HTTP; the cluster replicates over it; node certificates rotated in place (new files, no
/// restart) are taken by every node while writes go on, none failing.
#[test]
fn peers_speak_mutual_tls_and_rotate_their_certificates_without_downtime() {
    use cairn_cluster::peer_tls::PeerCa;
    let etcd = EtcdServer::start();
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let ca = PeerCa::generate("c1").unwrap();
    std::fs::write(tls.join("ca.crt"), ca.cert_pem()).unwrap();
    let write_cert = |node: &str, ca: &PeerCa| {
        let made = ca.issue(node, &["127.0.0.1".into(), "localhost".into()], 30).unwrap();
        // The certificate, then the key: a rotation may be seen half done, and must survive it.
        for (name, pem) in [(format!("{node}.crt"), made.cert_pem), (format!("{node}.key"), made.key_pem)] {
            let staged = tls.join(format!("{name}.new"));
            std::fs::write(&staged, pem).unwrap();
            std::fs::rename(&staged, tls.join(name)).unwrap();
        }
    };
    let mut peer_ports = Vec::new();
    let nodes = started_cluster_with(root.path(), &etcd, 3, 2, |n| {
        write_cert(&n.id, &ca);
        let port = free_port();
        peer_ports.push(port);
        let file = |ext: &str| tls.join(format!("{}.{ext}", n.id)).display().to_string();
        n.extra.extend(["--peer-listen".to_owned(), format!("127.0.0.1:{port}")]);
        n.extra.extend(["--peer-tls-ca".to_owned(), tls.join("ca.crt").display().to_string()]);
        n.extra.extend(["--peer-tls-cert".to_owned(), file("crt"), "--peer-tls-key".to_owned(), file("key")]);
    });
    let live = show(&etcd)["live"].clone();
    assert_eq!(live["n0"]["peer_tls"], true, "{live}");

    // Who gets in: only a caller with a certificate from the cluster CA (and the node token).
    let token = support::node_token(&etcd.endpoint(), "default", "c1");
    let other_ca = PeerCa::generate("c1").unwrap();
    let stranger = other_ca.issue("n9", &["127.0.0.1".into()], 30).unwrap();
    std::fs::write(tls.join("stranger.crt"), &stranger.cert_pem).unwrap();
    std::fs::write(tls.join("stranger.key"), &stranger.key_pem).unwrap();
    let curl = |args: &[String]| -> (i32, String) {
        let out = Command::new("curl").args(["-sS", "--max-time", "10"]).args(args).output().unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let path = |s: &str| tls.join(s).display().to_string();
    let digest = format!("https://127.0.0.1:{}/replica/v1/partitions/0/digest", peer_ports[0]);
    let base = vec!["--cacert".to_owned(), path("ca.crt"), "-H".into(), format!("x-cairn-node-token: {token}")];
    let with =
        |cert: &str, key: &str| [base.clone(), vec!["--cert".into(), path(cert), "--key".into(), path(key)]].concat();
    let (code, body) =
        curl(&[with("n1.crt", "n1.key"), vec![digest.clone(), "-w".into(), "%{http_code}".into()]].concat());
    assert!(code == 0 && (body.ends_with("200") || body.ends_with("421")), "a peer gets in: {code} {body}");
    let (code, _) = curl(&[base.clone(), vec![digest.clone()]].concat());
    assert_ne!(code, 0, "no client certificate: refused in the handshake");
    let (code, _) = curl(&[with("stranger.crt", "stranger.key"), vec![digest.clone()]].concat());
    assert_ne!(code, 0, "a certificate of another CA: refused");
    let (code, _) = curl(&[format!("http://127.0.0.1:{}/replica/v1/partitions/0/digest", peer_ports[0])]);
    assert_ne!(code, 0, "plain HTTP to the peer port: nothing");

    // Writes replicate over it; then every node's certificate is renewed in place while writes go on.
    let serial = |port: u16, node: &str| -> String {
        let cmd = format!(
            "openssl s_client -connect 127.0.0.1:{port} -cert {} -key {} </dev/null 2>/dev/null | openssl x509 -noout -serial",
            path(&format!("{node}.crt")),
            path(&format!("{node}.key"))
        );
        let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let before: Vec<String> = (0..3).map(|i| serial(peer_ports[i], "n1")).collect();
    assert!(before.iter().all(|s| s.starts_with("serial=")), "{before:?}");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = std::thread::spawn({
        let (stop, urls) = (stop.clone(), nodes.iter().map(|n| n.url("/v1/blobs")).collect::<Vec<_>>());
        move || {
            let client = support::client();
            let (mut blobs, mut failed) = (BTreeMap::new(), Vec::new());
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let data = cairn_testkit::payload(i, 2000);
                match client.post(&urls[i as usize % 3]).body(data.clone()).send() {
                    Ok(r) if r.status() == 201 => {
                        blobs.insert(r.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned(), data);
                    }
                    Ok(r) => failed.push(format!("{}: {}", r.status(), r.text().unwrap_or_default())),
                    Err(e) => failed.push(e.to_string()),
                }
                i += 1;
            }
            (blobs, failed)
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    for node in &nodes {
        write_cert(&node.id, &ca);
    }
    let renewed = std::time::Instant::now();
    wait_until("every node serving its renewed certificate", Duration::from_secs(20), || {
        (0..3).all(|i| {
            let now = serial(peer_ports[i], "n1");
            now.starts_with("serial=") && now != before[i]
        })
    });
    let taken = renewed.elapsed();

    // A new CA, still while writes go on: the CA file becomes a bundle of the old and the new
    // (each node rereads it), then every node gets a certificate from the new CA, then the old
    // CA leaves the bundle — a certificate from it is refused from then on. No restart.
    let old_client = ca.issue("old-client", &["127.0.0.1".into()], 30).unwrap();
    std::fs::write(tls.join("old.crt"), &old_client.cert_pem).unwrap();
    std::fs::write(tls.join("old.key"), &old_client.key_pem).unwrap();
    let new_ca = PeerCa::generate("c1").unwrap();
    let set_trust = |pems: &[&str]| {
        std::fs::write(tls.join("ca.crt.new"), pems.concat()).unwrap();
        std::fs::rename(tls.join("ca.crt.new"), tls.join("ca.crt")).unwrap();
    };
    set_trust(&[ca.cert_pem(), new_ca.cert_pem()]);
    std::thread::sleep(Duration::from_secs(3));
    let before_new_ca: Vec<String> = (0..3).map(|i| serial(peer_ports[i], "n1")).collect();
    for node in &nodes {
        write_cert(&node.id, &new_ca);
    }
    wait_until("every node serving a certificate of the new CA", Duration::from_secs(20), || {
        (0..3).all(|i| {
            let now = serial(peer_ports[i], "n1");
            now.starts_with("serial=") && now != before_new_ca[i]
        })
    });
    set_trust(&[new_ca.cert_pem()]);
    wait_until("the old CA no longer trusted", Duration::from_secs(10), || {
        let (code, _) = curl(&[with("old.crt", "old.key"), vec![digest.clone()]].concat());
        code != 0
    });
    let (code, body) =
        curl(&[with("n1.crt", "n1.key"), vec![digest.clone(), "-w".into(), "%{http_code}".into()]].concat());
    assert!(code == 0 && (body.ends_with("200") || body.ends_with("421")), "the new CA's peer gets in: {code} {body}");
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (blobs, failed) = writer.join().unwrap();
    assert!(failed.is_empty(), "writes failed during the rotations: {failed:?}");
    assert!(blobs.len() > 20, "{} writes", blobs.len());
    eprintln!(
        "rotation: every node served its new certificate {:.1} s after the files changed; then a new CA; {} writes, none failed",
        taken.as_secs_f64(),
        blobs.len()
    );
    assert_converged(&nodes.iter().collect::<Vec<_>>(), &blobs, Duration::from_secs(30));
}

/// S3 on a cluster (docs/s3.md, "On a cluster"): every node of four serves it with the cluster's keys
/// (S3 secrets as `cairn keys` prints them); boto3's whole suite passes through a node that is
/// not the coordinator of most keys; writes through one node read through every other at once;
/// conditional writes racing through two nodes are decided once; a multipart upload spread over
/// the nodes completes; listings agree. Then kill -9 of one node: every acknowledged object
/// still reads through the others, and the same checks pass on the two left.
#[test]
fn s3_is_served_by_every_node_and_outlives_a_kill() {
    let etcd = EtcdServer::start();
    let root = tempfile::tempdir().unwrap();
    // Four nodes, three replicas: each node lacks a quarter of the partitions, so its reads of
    // those go to its peers (names at quorum, pieces from a peer replica).
    let logs = root.path().to_owned();
    let (mut nodes, s3_addrs) = started_s3_cluster(root.path(), &etcd, 4, 6, |node| {
        node.max_blob = "1MiB";
        node.log = Some(logs.join(format!("{}.log", node.id)));
        node.extra.extend(["--s3-piece-size", "256KiB", "--s3-max-object-size", "64MiB"].map(String::from));
    });
    let admin = create_key_made(&etcd, "s3-admin", "admin", &[]);
    let reader = create_key_made(&etcd, "s3-reader", "read", &[]);
    let s3_pair = |made: &Value| {
        (made["id"].as_str().unwrap().to_owned(), made["s3_secret_access_key"].as_str().unwrap().to_owned())
    };
    let (admin_id, admin_secret) = s3_pair(&admin);
    let (reader_id, reader_secret) = s3_pair(&reader);
    // The holder of a token computes the same S3 secret, with nothing sent anywhere.
    let mut derive = Command::new(binary("cairn"))
        .args(["keys", "s3-secret"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut derive.stdin.take().unwrap(), admin["token"].as_str().unwrap().as_bytes()).unwrap();
    let derived = String::from_utf8(derive.wait_with_output().unwrap().stdout).unwrap();
    assert!(derived.contains(&admin_secret) && derived.contains(&admin_id), "{derived}");
    // A key limited to partitions gets no S3 secret.
    let limited = create_key_made(&etcd, "limited", "read", &["--partition", "0"]);
    assert!(limited["s3_secret_access_key"].is_null());
    // A key limited to buckets: its own scopes in one, read only in another (cluster_checks.py).
    let granted = create_key_made(&etcd, "granted", "read,write", &["--bucket", "spread", "--bucket", "shared=read"]);
    assert_eq!(granted["buckets"], serde_json::json!({"shared": ["read"], "spread": ["read", "write"]}));
    let (granted_id, granted_secret) = s3_pair(&granted);
    // The blob API refuses it: its blobs are in no bucket.
    let blob = with_token(granted["token"].as_str().unwrap())
        .post(nodes[0].url("/v1/blobs"))
        .body("no bucket")
        .send()
        .unwrap()
        .json::<Value>()
        .unwrap();
    assert_eq!(blob["error"]["code"], "forbidden", "{blob}");
    assert!(blob["error"]["message"].as_str().unwrap().contains("limited to S3 buckets"), "{blob}");
    // Grants a key cannot have are refused before etcd is touched, saying why.
    for (scopes, grant, why) in [
        ("admin", "spread", "cannot be an admin"),
        ("read", "spread=write", "write is not among the key's scopes (read)"),
        ("read", "Bad_Bucket", "a bucket name has only lower-case letters"),
        ("read", "spread=owner", "unknown scope \"owner\""),
    ] {
        let out = Command::new(binary("cairn"))
            .args(["keys", "create", "--etcd", "http://127.0.0.1:9", "--cluster", "c1", "--name", "bad"])
            .args(["--scope", scopes, "--bucket", grant])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(why), "--scope {scopes} --bucket {grant}: {stderr}");
    }

    let python = support::repo(".tools/s3-venv/bin/python");
    assert!(Path::new(&python).exists(), "{python} missing: run scripts/install-deps.sh");
    let env = |endpoints: &[&String]| {
        let endpoints: Vec<String> = endpoints.iter().map(|a| format!("http://{a}")).collect();
        vec![
            ("S3_ENDPOINTS", endpoints.join(",")),
            ("S3_ENDPOINT", endpoints[0].clone()),
            ("S3_KEY_ID", admin_id.clone()),
            ("S3_SECRET", admin_secret.clone()),
            ("S3_READER_ID", reader_id.clone()),
            ("S3_READER_SECRET", reader_secret.clone()),
            ("S3_GRANTED_ID", granted_id.clone()),
            ("S3_GRANTED_SECRET", granted_secret.clone()),
            ("S3_PIECE_BYTES", (256 << 10).to_string()),
            ("S3_FIRST_NODES", s3_addrs.len().to_string()),
            ("S3_CLUSTER", "1".into()),
            // A cluster's listing asks every partition's replicas: fewer keys keep the suite short.
            ("S3_LIST_KEYS", "1000".into()),
        ]
    };
    let run = |script: &str, args: &[&str], endpoints: &[&String]| {
        let status = Command::new(&python)
            .arg(support::repo(&format!("e2e/s3/{script}")))
            .args(args)
            .envs(env(endpoints))
            .status()
            .unwrap();
        assert!(status.success(), "{script} {args:?} failed (its output above names the check)");
    };
    run("boto3_suite.py", &[], &[&s3_addrs[1]]);
    run("cluster_checks.py", &["first"], &s3_addrs.iter().collect::<Vec<_>>());
    nodes[0].kill9();
    run("cluster_checks.py", &["after-kill"], &s3_addrs[1..].iter().collect::<Vec<_>>());
}

/// A write that failed (its record stored on one replica only, which then went down) never
/// becomes current over an acknowledged delete of its key when its replica comes back and the
/// others take the record from it: the delete wrote a delete marker above the versions it saw —
/// also when the key was deleted already (the failed write newer than the first marker).
#[test]
fn a_deleted_object_stays_deleted_when_a_failed_older_write_comes_back() {
    use cairn_datanode::api::s3::model::{self, ObjectRecord};
    use cairn_datanode::engine::names::{self, NameRecord};
    let etcd = EtcdServer::start();
    let root = tempfile::tempdir().unwrap();
    let (mut nodes, s3_addrs) = started_s3_cluster(root.path(), &etcd, 3, 2, |node| {
        node.extra.extend(["--s3-piece-size", "1MiB"].map(String::from));
    });
    let admin = create_key_made(&etcd, "s3-admin", "admin", &[]);
    let run = |phase: &str, through: &[usize]| {
        let endpoints: Vec<&String> = through.iter().map(|i| &s3_addrs[*i]).collect();
        resurface_phase(phase, &endpoints, &admin);
    };
    run("setup", &[0]);

    // The failed writes: a version of `k` newer than "first", one of `gone` newer than its
    // delete, on n0's replica only — n1 and n2 are stopped, so they cannot take them from n0's
    // journal before n0 is killed.
    let partitions = [0, 1];
    let failed_write = |key: &str| {
        let object = ObjectRecord {
            size: 10,
            etag: cairn_cluster::replica::hex(&<md5::Md5 as md5::Digest>::digest(b"resurfaced")),
            content_type: "text/plain".into(),
            user_meta: vec![],
            headers: vec![],
            checksum: None,
            pieces: vec![],
            inline: b"resurfaced".to_vec(),
            parts: vec![],
        };
        let (summary, body) = (model::encode(&object.summary()), object.encode());
        let record = NameRecord::new("bkt".into(), key.into(), names::new_version(), summary, body).unwrap();
        let partition = model::partition_of(&partitions, key);
        (key.to_owned(), partition, record.version, record.id(partition), record.encode())
    };
    let planted = [failed_write("k"), failed_write("gone")];
    nodes[1].signal("-STOP");
    nodes[2].signal("-STOP");
    for (_, _, _, id, payload) in &planted {
        put_on_replica(&nodes[0], *id, payload);
    }
    nodes[0].kill9();
    nodes[1].signal("-CONT");
    nodes[2].signal("-CONT");

    // Overwritten and deleted through the others (acknowledged), while n0 is down.
    run("overwrite-delete", &[1]);
    // n0 back: n1 and n2 take the failed writes from its journal, as versions of their keys.
    nodes[0].start();
    let client = support::node_client(&etcd.endpoint(), "default", "c1");
    let holds = |node: &Node, (key, partition, version, _, _): &(String, u32, u128, cairn_common::BlobId, Vec<u8>)| {
        let query = serde_json::json!({"version": cairn_cluster::replica::WIRE_VERSION, "space": "bkt", "name": key, "ask": []});
        let url = node.url(&format!("/replica/v1/partitions/{partition}/names/versions"));
        let Ok(answer) = client.post(url).json(&query).send().and_then(|r| r.json::<Value>()) else { return false };
        answer["versions"].as_array().is_some_and(|v| v.iter().any(|v| v["version"] == version.to_string()))
    };
    wait_until("the failed writes replicated from n0, as versions", Duration::from_secs(60), || {
        nodes[1..].iter().all(|n| planted.iter().all(|p| holds(n, p)))
    });
    run("check", &[0, 1, 2]);
}

/// A full partition takes no new record, not even a delete marker, yet S3 deletes in it go
/// through (without one): deleting is how its space comes back.
#[test]
fn an_s3_delete_in_a_full_partition_goes_through() {
    let etcd = EtcdServer::start();
    let root = tempfile::tempdir().unwrap();
    let s3_addrs: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let mut nodes = cluster(root.path(), &etcd, 3);
    for (node, s3) in nodes.iter_mut().zip(&s3_addrs) {
        node.max_blob = "256KiB"; // must fit the 1 MiB segments
        node.extra = ["--s3-listen", s3, "--s3-piece-size", "256KiB"].map(String::from).to_vec();
    }
    let disks: Vec<(&Node, String)> = nodes.iter().map(|n| (n, format!("{}-d0", n.id))).collect();
    apply_topology_with(&etcd, root.path(), &disks, 1, "4MiB", "1MiB");
    for node in nodes.iter_mut() {
        node.start();
    }
    wait_replicating(&nodes.iter().collect::<Vec<_>>(), 1);
    let admin = create_key_made(&etcd, "s3-admin", "admin", &[]);
    resurface_phase("full", &s3_addrs.iter().collect::<Vec<_>>(), &admin);
}

/// Runs a phase of e2e/s3/resurface.py through these S3 addresses, signed by the key `made`.
fn resurface_phase(phase: &str, s3_addrs: &[&String], made: &Value) {
    let endpoints: Vec<String> = s3_addrs.iter().map(|a| format!("http://{a}")).collect();
    let status = Command::new(support::repo(".tools/s3-venv/bin/python"))
        .arg(support::repo("e2e/s3/resurface.py"))
        .arg(phase)
        .env("S3_ENDPOINTS", endpoints.join(","))
        .env("S3_KEY_ID", made["id"].as_str().unwrap())
        .env("S3_SECRET", made["s3_secret_access_key"].as_str().unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "resurface.py {phase} failed (its output above names the check)");
}
