//! The cluster store against a real etcd.

use std::time::Duration;

use cairn_cluster::etcd::{ClusterStore, Written};
use cairn_cluster::{ClusterConfig, DiskSpec, LiveNode, NodeSpec};
use cairn_testkit::etcd::EtcdServer;
use tokio_util::sync::CancellationToken;

fn config(partitions: u32) -> ClusterConfig {
    ClusterConfig {
        blob_tls: None,
        replication_factor: 3,
        write_quorum: 2,
        partitions,
        volume_size_bytes: 1 << 30,
        segment_size_bytes: 1 << 28,
        max_blob_size_bytes: None,
        auth: Default::default(),
    }
}

fn nodes(n: usize) -> Vec<NodeSpec> {
    (0..n)
        .map(|i| NodeSpec {
            id: format!("n{i}"),
            zone: format!("z{}", i % 3),
            address: format!("127.0.0.1:{}", 7000 + i),
            disks: vec![DiskSpec { id: "d0".into(), capacity_bytes: 100 << 30 }],
        })
        .collect()
}

async fn wait_for(
    rx: &mut tokio::sync::watch::Receiver<std::sync::Arc<cairn_cluster::etcd::Snapshot>>,
    what: &str,
    f: impl Fn(&cairn_cluster::etcd::Snapshot) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f(&rx.borrow()) {
        assert!(tokio::time::timeout_at(deadline, rx.changed()).await.is_ok(), "timed out waiting for {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_registration_and_watch_survive_an_etcd_restart() {
    let mut etcd = EtcdServer::start();
    let store = ClusterStore::connect(&[etcd.endpoint()], "default", "c1").await.unwrap();
    let (written, keys) = store.apply_topology(&config(6), &nodes(4)).await.unwrap();
    assert!(keys.len() >= 1 + 4 + 6, "config, nodes and partitions written: {keys:?}");
    let loaded = store.load().await.unwrap();
    assert_eq!(loaded.topology, written);
    // Applying the same again writes nothing and changes nothing.
    assert_eq!(store.apply_topology(&config(6), &nodes(4)).await.unwrap(), (written.clone(), Vec::new()), "unchanged");
    assert_eq!(store.load().await.unwrap().revision, loaded.revision);

    let cancel = CancellationToken::new();
    let mut rx = store.watch(loaded.clone(), cancel.clone());
    let live = LiveNode {
        tls: false,
        node: "n0".into(),
        address: "127.0.0.1:7000".into(),
        peer_address: None,
        peer_tls: false,
        zone: "z0".into(),
        started_ms: 1,
        free_bytes: Default::default(),
        unopened: Default::default(),
    };
    let (live_tx, live_rx) = tokio::sync::watch::channel(live);
    let registration = tokio::spawn({
        let (store, cancel) = (store.clone(), cancel.clone());
        async move { store.keep_registered(live_rx, 2, cancel).await }
    });
    wait_for(&mut rx, "registration", |s| s.live.contains_key("n0")).await;
    // A changed value (free space) is rewritten under the same lease.
    live_tx.send_modify(|l| {
        l.free_bytes.insert(3, 12345);
    });
    wait_for(&mut rx, "free space", |s| s.live.get("n0").and_then(|l| l.free_bytes.get(&3)) == Some(&12345)).await;

    // A guarded update from a stale snapshot loses.
    let mut p = loaded.topology.partitions[&0].clone();
    p.state = cairn_cluster::PartitionState::ReadOnly;
    assert!(store.update_partition(&loaded, &p).await.unwrap());
    assert!(!store.update_partition(&loaded, &p).await.unwrap(), "stale snapshot refused");
    wait_for(&mut rx, "partition state", |s| {
        s.topology.partitions[&0].state == cairn_cluster::PartitionState::ReadOnly
    })
    .await;

    // A write names the keys it changed (added, changed, removed), as etcd holds them.
    let before = store.load().await.unwrap();
    assert_eq!(store.write_topology(&before, &before.topology).await.unwrap(), Written::Keys(vec![]));
    let mut desired = before.topology.clone();
    desired.nodes.get_mut("n1").unwrap().disks[0].capacity_bytes = 200 << 30;
    desired.nodes.remove("n3");
    desired.partitions.get_mut(&1).unwrap().state = cairn_cluster::PartitionState::ReadOnly;
    let keys = || Written::Keys(vec!["nodes/n1".into(), "nodes/n3".into(), "partitions/00000001".into()]);
    assert_eq!(store.write_topology(&before, &desired).await.unwrap(), keys());
    assert_eq!(store.write_topology(&before, &desired).await.unwrap(), Written::Conflict, "stale snapshot");
    let changed = store.load().await.unwrap();
    assert_eq!(changed.topology, desired);
    assert_eq!(store.write_topology(&changed, &before.topology).await.unwrap(), keys(), "and back");

    // etcd goes away for longer than the lease; registration and watch come back by themselves.
    etcd.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    etcd.restart();
    let other = ClusterStore::connect(&[etcd.endpoint()], "default", "c1").await.unwrap();
    other.apply_topology(&config(8), &nodes(5)).await.unwrap();
    // Compact past what the watcher saw: resuming there fails, so it lists again.
    let mut raw = etcd_client::Client::connect([etcd.endpoint()], None).await.unwrap();
    let revision = raw.get("x", None).await.unwrap().header().unwrap().revision();
    raw.compact(revision, None).await.unwrap();
    wait_for(&mut rx, "topology after restart", |s| s.topology.partitions.len() == 8 && s.topology.nodes.len() == 5)
        .await;
    wait_for(&mut rx, "registration after restart", |s| s.live.contains_key("n0")).await;
    // Growing kept every earlier replica where it was.
    let now = store.load().await.unwrap();
    for (id, p) in &written.partitions {
        assert_eq!(now.topology.partitions[id].replicas, p.replicas);
    }

    cancel.cancel();
    registration.await.unwrap();
    let after = store.load().await.unwrap();
    assert!(!after.live.contains_key("n0"), "lease revoked on the way out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topology_larger_than_one_transaction_is_written_whole() {
    let etcd = EtcdServer::start();
    let store = ClusterStore::connect(&[etcd.endpoint()], "default", "big").await.unwrap();
    // 250 partitions: far beyond etcd's 128 operations per transaction, written in one apply.
    let (written, _) = store.apply_topology(&config(250), &nodes(9)).await.unwrap();
    let first_revision = store.load().await.unwrap().revision;
    let loaded = store.load().await.unwrap();
    assert_eq!(loaded.topology, written);
    assert_eq!(loaded.topology.partitions.len(), 250);
    let revision = loaded.revision;
    assert_eq!(revision, first_revision);
    let chunks = (250 + 9 + 1usize).div_ceil(cairn_cluster::etcd::TXN_CHUNK) as i64;
    assert!(revision <= chunks + 1, "one pass of {chunks} transactions, no retries (revision {revision})");
    store.apply_topology(&config(250), &nodes(9)).await.unwrap();
    assert_eq!(store.load().await.unwrap().revision, revision, "converged: nothing written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_etcd_needs_the_ca_and_a_client_certificate() {
    let etcd = EtcdServer::start_tls();
    let files = etcd.tls_files();
    let tls = cairn_cluster::etcd::EtcdTls::from_files(&files.ca, Some(&files.cert), Some(&files.key)).unwrap();
    let store = ClusterStore::connect_tls(&[etcd.endpoint()], "default", "tls", Some(&tls)).await.unwrap();
    store.apply_topology(&config(3), &nodes(3)).await.unwrap();
    assert_eq!(store.load().await.unwrap().topology.partitions.len(), 3);
    // Without a client certificate etcd refuses.
    let no_identity = cairn_cluster::etcd::EtcdTls { cert: None, key: None, ..tls.clone() };
    let refused = async {
        let store = ClusterStore::connect_tls(&[etcd.endpoint()], "default", "tls", Some(&no_identity)).await?;
        store.load().await
    };
    assert!(refused.await.is_err());
}
