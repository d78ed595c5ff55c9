//! The operator's reconcile end to end on the Local platform: real etcd, disk agents on loop
//! devices, datanode processes — create, scale out, upgrade, delete with each policy, with data
//! written before and read back after each step.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cairn_operator::local::{LocalMachine, LocalPlatform};
use cairn_operator::platform::{converge, delete_cluster, Outcome, Platform};
use cairn_resources::store_cluster::StoreClusterSpec;
use cairn_testkit::etcd::EtcdServer;
use cairn_testkit::machine::Machine;
use cairn_testkit::payload;
use support::{binary, disk_with_agent, free_port, KillOnDrop};

fn spec(etcd: &str) -> StoreClusterSpec {
    serde_json::from_value(serde_json::json!({
        "image": "local", "volumeSize": "16Mi", "segmentSize": "4Mi", "replicationFactor": 3, "writeQuorum": 2,
        "partitionsPerDisk": 2, "etcd": {"endpoints": [etcd]}
    }))
    .unwrap()
}

/// Reconciles until the cluster is Ready (every datanode live, nothing under-replicated, and a
/// pass that changed nothing).
/// One machine per zone, each with a disk of its own and its disk agent.
fn machines_with_agents(disks: &mut Machine, zones: &[&str]) -> (Vec<KillOnDrop>, Vec<LocalMachine>) {
    let mut agents = Vec::new();
    let mut machines = Vec::new();
    for (i, zone) in zones.iter().enumerate() {
        let name = format!("m{i}");
        let (agent, sockets) = disk_with_agent(disks, &name, 160 << 20);
        agents.push(agent);
        machines.push(LocalMachine {
            name,
            selected: true,
            zone: zone.to_string(),
            agent_socket: sockets.node,
            agent_admin_socket: sockets.admin,
            port: free_port(),
            peer_port: None,
            s3_port: None,
            disk_path: None,
        });
    }
    (agents, machines)
}

/// The Local platform of cluster c1 on these machines.
fn platform_for(etcd: &EtcdServer, machines: Vec<LocalMachine>) -> LocalPlatform {
    let mut p = LocalPlatform::new("c1", "default", vec![etcd.endpoint()], binary("cairn-datanode"), machines);
    p.extra_args = vec!["--max-blob-size".into(), "1MiB".into()];
    p
}

async fn converge_until_ready(platform: &LocalPlatform, spec: &StoreClusterSpec) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let outcome = converge("c1", "default", spec, platform).await;
        assert!(outcome.degraded.is_none(), "{:?}", outcome.degraded);
        if outcome.ready {
            return outcome;
        }
        assert!(Instant::now() < deadline, "not ready: {outcome:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Each machine holds the volumes of exactly the replicas the topology places on it: the replicas
/// that moved away gave theirs back.
async fn volumes_follow_the_topology(machines: &[LocalMachine], topology: &cairn_cluster::Topology) {
    for m in machines {
        let agent = cairn_common::agent_client::AgentClient::new(&m.agent_admin_socket);
        let mut held: Vec<u32> = agent.list_volumes().await.unwrap().iter().map(|v| v.partition).collect();
        held.sort();
        let placed: Vec<u32> = topology.partitions_of(&m.name).map(|p| p.id).collect();
        assert_eq!(held, placed, "volumes on {}", m.name);
    }
}

/// Reconciles until Ready after a new datanode binary, checking the data after every pass: how
/// many datanodes were replaced.
async fn upgrade_until_ready<F: std::future::Future<Output = ()>>(
    platform: &LocalPlatform,
    spec: &StoreClusterSpec,
    progress: &mut Vec<String>,
    check: impl Fn() -> F,
) -> usize {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut replaced = 0;
    loop {
        let outcome = converge("c1", "default", spec, platform).await;
        progress.extend(outcome.progress.clone());
        replaced += outcome.changes.iter().filter(|c| c.starts_with("replaced datanode ")).count();
        check().await;
        if outcome.ready {
            assert!(outcome.progress.is_empty(), "{:?}", outcome.progress);
            return replaced;
        }
        assert!(Instant::now() < deadline, "upgrade did not finish: {outcome:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn put(client: &reqwest::Client, port: u16, data: Vec<u8>) -> String {
    let r = client.post(format!("http://127.0.0.1:{port}/v1/blobs")).body(data).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
}

/// Every blob readable through some datanode (as through the Service while one restarts).
async fn check_through_any(client: &reqwest::Client, ports: &[u16], blobs: &BTreeMap<String, Vec<u8>>) {
    for (id, data) in blobs {
        let mut served = false;
        for port in ports {
            let Ok(r) = client.get(format!("http://127.0.0.1:{port}/v1/blobs/{id}")).send().await else { continue };
            if r.status() == 200 {
                assert_eq!(r.bytes().await.unwrap().as_ref(), data.as_slice());
                served = true;
                break;
            }
        }
        assert!(served, "{id} not readable through any datanode");
    }
}

async fn check_all(client: &reqwest::Client, port: u16, blobs: &BTreeMap<String, Vec<u8>>) {
    for (id, data) in blobs {
        let r = client.get(format!("http://127.0.0.1:{port}/v1/blobs/{id}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{id} via port {port}");
        assert_eq!(r.bytes().await.unwrap().as_ref(), data.as_slice());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_scale_out_upgrade_and_delete_with_each_policy() {
    let etcd = EtcdServer::start();
    support::install_test_key_async(&etcd.endpoint(), "default", "c1").await;
    let mut disks = Machine::new();
    let (_agents, machines) = machines_with_agents(&mut disks, &["a", "b", "c", "a"]);
    let spec = spec(&etcd.endpoint());
    let new_platform = |machines: Vec<LocalMachine>| platform_for(&etcd, machines);
    let client = support::async_client();

    // Create: three machines.
    let platform = new_platform(machines[..3].to_vec());
    let ready = converge_until_ready(&platform, &spec).await;
    assert_eq!((ready.status.nodes_total, ready.status.partitions.total), (3, 6));
    let mut blobs = BTreeMap::new();
    for seed in 0..30u64 {
        let data = payload(seed, 20_000);
        blobs.insert(put(&client, machines[(seed % 3) as usize].port, data.clone()).await, data);
    }
    // Converged: a pass changes nothing.
    assert_eq!(converge("c1", "default", &spec, &platform).await.changes, Vec::<String>::new());

    // Scale out: a fourth machine brings its disk; new partitions use it, old data stays put.
    platform.set_machines(machines.clone());
    let ready = converge_until_ready(&platform, &spec).await;
    assert_eq!((ready.status.nodes_total, ready.status.partitions.total), (4, 8));
    // For balance, m3 took over replicas of the first partitions from m0 (its zone's other machine),
    // each only after catching up.
    let store = cairn_cluster::etcd::ClusterStore::connect(&[etcd.endpoint()], "default", "c1").await.unwrap();
    let topology = store.load().await.unwrap().topology;
    let taken = (0..6).filter(|id| topology.partitions[id].replicas.iter().any(|r| r.node == "m3")).count();
    assert!(taken > 0, "{:?}", topology.partitions);
    assert!(topology.partitions.values().all(|p| p.replicas.len() == 3), "moves finished");
    volumes_follow_the_topology(&machines, &topology).await;
    check_all(&client, machines[3].port, &blobs).await;
    for seed in 100..130u64 {
        let data = payload(seed, 20_000);
        blobs.insert(put(&client, machines[3].port, data.clone()).await, data);
    }

    // Upgrade: a new binary, datanodes replaced one at a time; data readable throughout.
    let upgraded = disks.path("cairn-datanode-v2");
    std::fs::copy(binary("cairn-datanode"), &upgraded).unwrap();
    platform.set_binary(upgraded.clone());
    let mut progress = Vec::new();
    let ports: Vec<u16> = machines.iter().map(|m| m.port).collect();
    let replaced =
        upgrade_until_ready(&platform, &spec, &mut progress, || check_through_any(&client, &ports, &blobs)).await;
    assert_eq!(replaced, 4, "every datanode replaced once");
    assert!(platform.binaries().iter().all(|b| *b == upgraded));
    assert!(progress.iter().any(|p| p.starts_with("rolling update: ")), "upgrade progress reported: {progress:?}");
    // A rebuild in place (a new file at the same path, as `cargo build` makes) is an upgrade too.
    let rebuilt = disks.path("cairn-datanode-rebuilt");
    std::fs::copy(binary("cairn-datanode"), &rebuilt).unwrap();
    std::fs::rename(&rebuilt, &upgraded).unwrap();
    let replaced =
        upgrade_until_ready(&platform, &spec, &mut progress, || check_through_any(&client, &ports, &blobs)).await;
    assert_eq!(replaced, 4, "every datanode replaced once more");

    // Drain m3: its replicas move (each new one caught up before the old goes), writes keep
    // succeeding at quorum throughout, then its datanode stops.
    platform.drain("m3");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seed = 1000u64;
    loop {
        let outcome = converge("c1", "default", &spec, &platform).await;
        assert!(outcome.degraded.is_none(), "{:?}", outcome.degraded);
        progress.extend(outcome.progress.clone());
        let data = payload(seed, 10_000);
        blobs.insert(put(&client, machines[(seed % 3) as usize].port, data.clone()).await, data);
        seed += 1;
        if outcome.ready {
            break;
        }
        assert!(Instant::now() < deadline, "drain did not finish: {outcome:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(progress.iter().any(|p| p.starts_with("draining m3: ")), "drain progress reported: {progress:?}");
    let topology = store.load().await.unwrap().topology;
    assert!(!topology.nodes.contains_key("m3"), "m3 left the topology");
    assert!(topology.partitions.values().all(|p| p.replicas.len() == 3 && p.replicas.iter().all(|r| r.node != "m3")));
    assert_eq!(platform.binaries().len(), 3, "m3's datanode stopped");
    let left =
        cairn_common::agent_client::AgentClient::new(&machines[3].agent_admin_socket).list_volumes().await.unwrap();
    assert!(left.is_empty(), "drained machine purged: {left:?}");
    volumes_follow_the_topology(&machines[..3], &topology).await;
    for m in &machines[..3] {
        check_all(&client, m.port, &blobs).await;
    }

    // Delete with Retain: datanodes stop, etcd and the volumes keep everything; re-created, it serves the same data.
    assert!(delete_cluster("c1", "default", &spec, &platform).await.unwrap());
    drop(platform);
    assert_eq!(store.load().await.unwrap().topology.partitions.len(), 8);
    let platform = new_platform(machines[..3].to_vec());
    converge_until_ready(&platform, &spec).await;
    check_all(&client, machines[1].port, &blobs).await;

    // Delete with Delete (confirmed): topology and volumes removed.
    let mut delete = spec.clone();
    delete.deletion_policy = cairn_resources::DeletionPolicy::Delete;
    delete.confirm_delete = Some("c1".into());
    let volumes_before: usize = {
        let mut n = 0;
        for m in &machines[..3] {
            n +=
                cairn_common::agent_client::AgentClient::new(&m.agent_admin_socket).list_volumes().await.unwrap().len();
        }
        n
    };
    assert_eq!(volumes_before, 8 * 3, "every replica's volume");
    assert!(delete_cluster("c1", "default", &delete, &platform).await.unwrap());
    assert!(store.load().await.unwrap().topology.partitions.is_empty());
    for m in &machines[..3] {
        let left = cairn_common::agent_client::AgentClient::new(&m.agent_admin_socket).list_volumes().await.unwrap();
        assert!(left.is_empty(), "{}: {left:?}", m.name);
    }
    // The drained machine gave back the volumes of the replicas that moved away.
    let kept =
        cairn_common::agent_client::AgentClient::new(&machines[3].agent_admin_socket).list_volumes().await.unwrap();
    assert!(kept.is_empty(), "{kept:?}");
}

/// A pass that cannot plan (here: a replication factor the machines cannot meet) still serves
/// everything that exists: a new platform (as after a restart) starts every datanode of the
/// topology, and the blobs are read; the reason is a condition, not a stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_that_cannot_plan_still_serves_what_exists() {
    let etcd = EtcdServer::start();
    support::install_test_key_async(&etcd.endpoint(), "default", "c1").await;
    let mut disks = Machine::new();
    let (_agents, machines) = machines_with_agents(&mut disks, &["a", "b", "c"]);
    let spec = spec(&etcd.endpoint());
    let new_platform = |machines: Vec<LocalMachine>| platform_for(&etcd, machines);
    let client = support::async_client();
    let platform = new_platform(machines.clone());
    converge_until_ready(&platform, &spec).await;
    let mut blobs = BTreeMap::new();
    for seed in 0..20u64 {
        let data = payload(seed, 5_000);
        blobs.insert(put(&client, machines[(seed % 3) as usize].port, data.clone()).await, data);
    }
    drop(platform); // every datanode stops, as when `cairn local up` is stopped

    let mut impossible = spec.clone();
    impossible.replication_factor = 4;
    let platform = new_platform(machines.clone());
    let outcome = converge("c1", "default", &impossible, &platform).await;
    let (reason, message) = outcome.degraded.clone().expect("the reason is a condition");
    assert_eq!(reason, "NotEnoughMachines", "{message}");
    assert!(message.contains("replicationFactor 4 needs 4 machines"), "{message}");
    assert!(!outcome.ready);
    assert_eq!(
        outcome.changes.iter().filter(|c| c.starts_with("started datanode")).count(),
        3,
        "{:?}",
        outcome.changes
    );
    // The datanodes serve every blob.
    for _ in 0..100 {
        if client
            .get(format!("http://127.0.0.1:{}/readyz", machines[0].port))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    check_all(&client, machines[1].port, &blobs).await;
}

/// A replica the topology no longer places on a machine, without a move having retired it (the
/// topology rewritten by hand, or etcd restored from an old backup), keeps its volume: only
/// volumes a completed move recorded as retired are ever purged from a machine that stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_dropped_by_hand_keeps_its_volume() {
    let etcd = EtcdServer::start();
    support::install_test_key_async(&etcd.endpoint(), "default", "c1").await;
    let mut disks = Machine::new();
    let (_agents, machines) = machines_with_agents(&mut disks, &["a", "b", "c", "d"]);
    let spec = spec(&etcd.endpoint());
    let platform = platform_for(&etcd, machines.clone());
    converge_until_ready(&platform, &spec).await;
    let client = support::async_client();
    let mut blobs = BTreeMap::new();
    for seed in 0..20u64 {
        let data = payload(seed, 5_000);
        blobs.insert(put(&client, machines[(seed % 4) as usize].port, data.clone()).await, data);
    }

    // By hand: partition 0's replica on one machine goes to the machine without one.
    let store = cairn_cluster::etcd::ClusterStore::connect(&[etcd.endpoint()], "default", "c1").await.unwrap();
    let snapshot = store.load().await.unwrap();
    let mut p0 = snapshot.topology.partitions[&0].clone();
    let spare = machines.iter().find(|m| p0.replicas.iter().all(|r| r.node != m.name)).unwrap();
    let spare_disk = snapshot.topology.nodes[&spare.name].disks[0].id.clone();
    let dropped = p0.replicas[0].node.clone();
    p0.replicas[0] = cairn_cluster::ReplicaSpec { node: spare.name.clone(), disk: spare_disk };
    assert!(store.update_partition(&snapshot, &p0).await.unwrap());
    converge_until_ready(&platform, &spec).await;

    let topology = store.load().await.unwrap().topology;
    let machine = machines.iter().find(|m| m.name == dropped).unwrap();
    let held = cairn_common::agent_client::AgentClient::new(&machine.agent_admin_socket).list_volumes().await.unwrap();
    let volume = cairn_cluster::Topology::volume_name("c1", 0, &dropped);
    assert!(held.iter().any(|v| v.name == volume), "{volume} kept: {held:?}");
    if topology.partitions_of(&dropped).all(|p| p.id != 0) {
        // Reported as kept, with the command that removes it.
        let all = platform.machines().await.unwrap();
        let known: Vec<_> = all.iter().collect();
        let unplaced = cairn_operator::platform::unplaced_volumes("c1", &known, &topology);
        assert!(unplaced.iter().any(|(m, p)| m.name == dropped && p == &[0]), "{unplaced:?}");
    }
    for m in &machines {
        check_all(&client, m.port, &blobs).await;
    }
}
