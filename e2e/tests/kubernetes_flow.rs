//! The whole Kubernetes flow, with real processes behind the strict test API: `kubectl apply`
//! of the CRDs and of a StoreCluster → the operator (a process, with its ServiceAccount's RBAC,
//! in a network namespace of its own) → datanode Pods started by the simulated kubelet as real
//! datanode processes (one network namespace and Pod IP each, DNS as CoreDNS answers it) on
//! real etcd, with a real disk agent (its ServiceAccount's RBAC) on a real filesystem per
//! machine → Ready → writes through the Service's endpoints → a Pod evicted and replaced → a
//! machine drained by its label → the StoreCluster deleted with `deletionPolicy: Delete`: every
//! purge finishes, the finalizer goes, the volumes are gone. `kubectl cairn status` at each
//! stage.

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_testkit::kubelet::{Image, NodeSpec, Nodes, PodNetwork};
use cairn_testkit::machine::Machine;
use cairn_testkit::rbac::{disk_agent_user, operator_user, rendered_chart, Rbac};
use cairn_testkit::MemoryApi;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use support::{binary, kubeconfig, repo, KillOnDrop, Kubectl};

const IMAGE: &str = "ghcr.io/cairn-dev/cairn-datanode:test";

/// Polls `check` (async) every half second until it is `Ok`, at most `limit`; the last `Err`
/// (what was seen instead) is in the failure.
async fn eventually<T, F: std::future::Future<Output = Result<T, String>>>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(seen) => {
                assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}; last seen:\n{seen}")
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `Ok(value)` when `done`, else what was seen.
fn seen<T>(done: bool, value: T, seen: impl std::fmt::Debug) -> Result<T, String> {
    if done {
        Ok(value)
    } else {
        Err(format!("{seen:#?}"))
    }
}

/// The datanode Pods: machine (the `cairn.dev/node` annotation) → (uid, ready, IP).
async fn datanodes(api: &MemoryApi) -> BTreeMap<String, (String, bool, String)> {
    let pods: Api<Pod> = Api::namespaced(api.client(), "store");
    let list = pods.list(&ListParams::default().labels("app.kubernetes.io/component=datanode")).await.unwrap();
    list.items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let machine = p.metadata.annotations.clone().unwrap_or_default()["cairn.dev/node"].clone();
            let status = p.status.clone().unwrap_or_default();
            let ready = status.conditions.unwrap_or_default().iter().any(|c| c.type_ == "Ready" && c.status == "True");
            (machine, (p.metadata.uid.clone().unwrap(), ready, status.pod_ip.unwrap_or_default()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubectl_to_serving_to_eviction_drain_and_deletion_with_real_processes() {
    let mut machine = Machine::new();
    // Datanode Pods run as their cluster's uid (the kubelet here honours runAsUser): the machines' directories
    // may be crossed by anyone, as a host's /run and disk mounts are.
    std::fs::set_permissions(&machine.base, std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
    let network = Arc::new(PodNetwork::create());
    let gateway = network.gateway();
    let etcd = cairn_testkit::etcd::EtcdServer::start_on(&gateway);
    let api = MemoryApi::new().with_rbac(Rbac::from_manifests(&rendered_chart()));
    let server = api.serve_http_on(&gateway).await;
    let dir = machine.path("k8s");
    std::fs::create_dir_all(&dir).unwrap();
    let kubectl = Kubectl::new(&dir, &server);
    kubectl.ok(&["apply", "--server-side", "-f", &repo("crds/")]);

    // Four machines: a kubelet each, and a disk agent (its ServiceAccount) on a filesystem of its own.
    let bin_dir = binary("cairn-datanode").parent().unwrap().to_owned();
    let images = BTreeMap::from([(IMAGE.to_owned(), Image { bin_dir, entrypoint: "cairn-datanode".into() })]);
    let nodes = Nodes::start(&api, network.clone(), images, &dir.join("logs"));
    kubeconfig(&dir.join("agent.kubeconfig"), &server, Some(&disk_agent_user()));
    let mut agents = Vec::new();
    for i in 0..4 {
        let name = format!("m{i}");
        let dev = machine.loop_fs(&name, 160 << 20, "mkfs.ext4", &["-q", "-m", "0"]);
        let mount = machine.mount(&dev, &format!("{name}-disk"), &[]);
        let run = machine.path(&format!("{name}-run"));
        let run_admin = machine.path(&format!("{name}-run-admin"));
        std::fs::create_dir_all(&run).unwrap();
        std::fs::create_dir_all(&run_admin).unwrap();
        nodes
            .add_node(NodeSpec {
                name: name.clone(),
                zone: format!("zone-{i}"),
                labels: BTreeMap::from([("cairn.dev/storage".into(), "true".into())]),
                host_paths: vec![("/run/cairn".into(), run.clone()), ("/run/cairn-admin".into(), run_admin.clone())],
            })
            .await;
        let config = machine.path(&format!("{name}-agent.yaml"));
        std::fs::write(
            &config,
            format!("selector:\n  mount_paths: ['{}']\n  min_size: 1MiB\nheadroom: 0%\n", mount.display()),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("logs").join(format!("agent-{name}.log"))).unwrap();
        let agent = Command::new(binary("cairn-disk-agent"))
            .args(["serve", "--mountinfo", "/proc/self/mountinfo", "--kubernetes", "on", "--node-name", &name])
            .args(["--interval-secs", "2", "--config"])
            .arg(&config)
            .arg("--state-dir")
            .arg(machine.path(&format!("{name}-state")))
            .arg("--socket")
            .arg(run.join("disk-agent.sock"))
            .arg("--admin-socket")
            .arg(run_admin.join("disk-agent.sock"))
            .env("KUBECONFIG", dir.join("agent.kubeconfig"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        agents.push(KillOnDrop(agent));
    }

    // The operator, with its ServiceAccount, resolving datanodes' names as a Pod does.
    kubeconfig(&dir.join("operator.kubeconfig"), &server, Some(&operator_user()));
    let _operator = nodes.host_process(
        "operator",
        Command::new(binary("cairn-operator"))
            .args(["run", "--metrics-addr", "0.0.0.0:8080"])
            .env("KUBECONFIG", dir.join("operator.kubeconfig"))
            .env("POD_NAMESPACE", "cairn-system")
            .env("POD_NAME", "cairn-operator-0")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null()),
    );

    // The StoreCluster, as a user writes it.
    let cluster = dir.join("cluster.yaml");
    std::fs::write(
        &cluster,
        format!(
            "apiVersion: cairn.dev/v1alpha1\nkind: StoreCluster\nmetadata: {{name: c1, namespace: store}}\n\
             spec:\n  image: {IMAGE}\n  nodeSelector: {{cairn.dev/storage: \"true\"}}\n  volumeSize: 32Mi\n  segmentSize: 8Mi\n\
             \x20 replicationFactor: 3\n  writeQuorum: 2\n  partitionsPerDisk: 1\n  deletionPolicy: Delete\n  confirmDelete: c1\n\
             \x20 etcd: {{endpoints: [\"{}\"]}}\n  tls: {{}}\n",
            etcd.endpoint()
        ),
    )
    .unwrap();
    let out = kubectl.ok(&["apply", "--server-side", "-f", cluster.to_str().unwrap()]);
    assert!(out.contains("storecluster.cairn.dev/c1 serverside-applied"), "{out}");

    let status = || kubectl.run(&["cairn", "status", "-n", "store", "c1"]);
    let ready = |what: &'static str| {
        let status = &status;
        async move {
            eventually(what, Duration::from_secs(180), || async {
                let (code, out, err) = status();
                seen(code == 0 && out.contains("phase Ready"), out.clone(), format!("{out}{err}"))
            })
            .await
        }
    };
    let out = ready("the StoreCluster Ready").await;
    // Run from outside the cluster (the datanodes' DNS names do not resolve here), the plugin
    // reads the datanodes through the API server's proxy to their Pods.
    assert!(!out.contains("did not answer") && out.contains("Capacity: 0 blob(s)"), "{out}");
    // The operator and the disk agents ran as their ServiceAccounts, with the chart's RBAC.
    for user in [operator_user(), disk_agent_user()] {
        assert!(api.accessed(&user).iter().any(|(verb, _, _)| verb == "patch"), "{user} made no authorized write");
    }
    assert!(out.contains("Replication: every replica live and caught up"), "{out}");
    let pods = datanodes(&api).await;
    assert_eq!(pods.keys().map(String::as_str).collect::<Vec<_>>(), ["m0", "m1", "m2", "m3"]);
    assert!(pods.values().all(|(_, ready, _)| *ready), "{pods:?}");
    let out = kubectl.ok(&["get", "pods", "-n", "store", "-o", "wide"]);
    assert_eq!(out.lines().filter(|l| l.contains(" 1/1 ") && l.contains(" Running ")).count(), 4, "{out}");
    let out = kubectl.ok(&["get", "storeclusters", "-n", "store"]);
    assert!(out.lines().nth(1).is_some_and(|l| l.split_whitespace().nth(1) == Some("Ready")), "{out}");

    // Writes through the Service (its ready endpoints), read back from every datanode.
    support::install_test_key_async(&etcd.endpoint(), "store", "c1").await;
    // The blob API speaks HTTPS with certificates from the cluster's CA, for the Service's name.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(api.client(), "store");
    let ca_secret = secrets.get("c1-peer-ca").await.unwrap();
    let ca_pem = String::from_utf8(ca_secret.data.unwrap()["ca.crt"].0.clone()).unwrap();
    let client = support::async_tls_client(&ca_pem, "c1.store.svc");
    let endpoints = nodes.endpoints("store", "c1").await;
    let plain = support::async_client().get(format!("http://{}/v1/blobs", endpoints[0])).send().await;
    assert!(plain.map_or(true, |r| r.status().is_client_error()), "the blob port answered plain HTTP");
    let stranger = cairn_cluster::peer_tls::PeerCa::generate("c1").unwrap();
    let untrusting = support::async_tls_client(stranger.cert_pem(), "c1.store.svc");
    assert!(untrusting.get(format!("https://{}/readyz", endpoints[0])).send().await.is_err(), "another CA accepted");
    let misnamed = support::async_tls_client(&ca_pem, "c2.store.svc");
    assert!(misnamed.get(format!("https://{}/readyz", endpoints[0])).send().await.is_err(), "another name accepted");
    assert_eq!(endpoints.len(), 4, "{endpoints:?}");
    let mut blobs = Vec::new();
    for (i, endpoint) in endpoints.iter().enumerate() {
        let body = cairn_testkit::payload(i as u64, 10_000 + i);
        let r = client.post(format!("https://{endpoint}/v1/blobs")).body(body.clone()).send().await.unwrap();
        assert_eq!(r.status(), 201, "{endpoint}");
        let id = r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
        blobs.push((id, body));
    }
    // Every datanode process runs as the Pod says: the cluster's own uid, not root; its volumes
    // are that uid's, closed to others.
    let ours = binary("cairn-datanode").display().to_string();
    let out = std::process::Command::new("ps").args(["-C", "cairn-datanode", "-o", "uid=,args="]).output().unwrap();
    let uids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&ours))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    let uid = cairn_operator::kubernetes::datanode_uid("store", "c1").to_string();
    assert!(uids.len() >= 4 && uids.iter().all(|u| *u == uid), "datanode uids: {uids:?}, not {uid}");
    for i in 0..4 {
        let volumes = machine.path(&format!("m{i}-disk")).join("cairn").join("volumes");
        for volume in std::fs::read_dir(&volumes).unwrap().flatten() {
            let meta = volume.metadata().unwrap();
            use std::os::unix::fs::MetadataExt;
            assert_eq!(
                (meta.uid().to_string(), meta.mode() & 0o777),
                (uid.clone(), 0o700),
                "{}",
                volume.path().display()
            );
        }
    }
    let read_all = |endpoints: Vec<String>| {
        let (client, blobs) = (client.clone(), blobs.clone());
        async move {
            for endpoint in &endpoints {
                for (id, body) in &blobs {
                    let r = client.get(format!("https://{endpoint}/v1/blobs/{id}")).send().await.unwrap();
                    assert_eq!(r.status(), 200, "{endpoint} {id}");
                    assert_eq!(&r.bytes().await.unwrap()[..], &body[..], "{endpoint} {id}");
                }
            }
        }
    };
    read_all(endpoints).await;
    let endpoints = nodes.endpoints("store", "c1").await;
    peer_certificates_renew_in_place(&api, &dir, &kubectl, &pods["m0"].2, &endpoints, &client).await;

    // A node-pressure eviction: the Pod fails (Evicted), the operator replaces it, it serves.
    let (evicted_uid, _, _) = pods["m1"].clone();
    let pod_name = {
        let list: Api<Pod> = Api::namespaced(api.client(), "store");
        let all = list.list(&ListParams::default()).await.unwrap();
        all.items.into_iter().find(|p| p.metadata.uid.as_deref() == Some(&evicted_uid)).unwrap().metadata.name.unwrap()
    };
    nodes.evict("store", &pod_name);
    eventually("the evicted datanode replaced and ready", Duration::from_secs(120), || async {
        let pods = datanodes(&api).await;
        seen(pods.get("m1").is_some_and(|(uid, ready, _)| *uid != evicted_uid && *ready), (), &pods)
    })
    .await;
    let out = ready("Ready after the eviction").await;
    assert!(out.contains("Replication: every replica live and caught up") || out.contains("phase Ready"), "{out}");
    read_all(nodes.endpoints("store", "c1").await).await;

    // `kubectl drain` for maintenance: the datanode is evicted through the Eviction API (the
    // PodDisruptionBudget allows one at a time), its replacement waits on the cordoned node (a
    // cordon is not a decommission: the machine keeps its data), and runs again after `kubectl
    // uncordon`.
    let drained_uid = datanodes(&api).await["m2"].0.clone();
    let (code, out, err) = kubectl.run(&["drain", "m2", "--ignore-daemonsets", "--timeout", "60s"]);
    assert!(code == 0 && out.contains("pod/c1-m2 evicted") && out.contains("drained"), "{out}{err}");
    eventually("m2's new datanode Pod waiting on the cordoned node", Duration::from_secs(60), || async {
        let pods: Api<Pod> = Api::namespaced(api.client(), "store");
        let replacement = pods.list(&ListParams::default()).await.unwrap().items.into_iter().find(|p| {
            p.metadata.annotations.as_ref().is_some_and(|a| a["cairn.dev/node"] == "m2")
                && p.metadata.uid.as_deref() != Some(&drained_uid)
        });
        let status = replacement.as_ref().and_then(|p| p.status.clone()).unwrap_or_default();
        let unschedulable =
            status.conditions.unwrap_or_default().iter().any(|c| c.reason.as_deref() == Some("Unschedulable"));
        seen(unschedulable && status.phase.as_deref() == Some("Pending"), (), &replacement)
    })
    .await;
    read_all(nodes.endpoints("store", "c1").await).await;
    kubectl.ok(&["uncordon", "m2"]);
    eventually("m2's datanode running again", Duration::from_secs(120), || async {
        let pods = datanodes(&api).await;
        seen(pods.get("m2").is_some_and(|(uid, ready, _)| *uid != drained_uid && *ready), (), &pods)
    })
    .await;
    ready("Ready after the maintenance drain").await;

    // A machine drained by its label: its replicas move, its datanode goes, every blob stays.
    kubectl.ok(&["label", "node", "m3", "cairn.dev/decommission=true"]);
    eventually("m3 drained", Duration::from_secs(180), || async {
        let pods = datanodes(&api).await;
        let (code, out, _) = status();
        let m3_empty = out.lines().any(|l| l.starts_with("m3 ") && l.contains(" unselected ") && l.ends_with(" 0"));
        let done = !pods.contains_key("m3") && code == 0 && out.contains("phase Ready") && m3_empty;
        seen(done, (), (&pods, &out))
    })
    .await;
    let endpoints = nodes.endpoints("store", "c1").await;
    assert_eq!(endpoints.len(), 3, "{endpoints:?}");
    read_all(endpoints).await;

    // Deleted with deletionPolicy Delete: kubectl waits until the finalizer is gone; every
    // machine's volumes are purged by the purge Pods the kubelets ran.
    let (code, out, err) = kubectl.run(&["delete", "storecluster", "c1", "-n", "store", "--timeout", "180s"]);
    assert_eq!(code, 0, "{out}{err}");
    let out = kubectl.ok(&["get", "storeclusters", "-n", "store"]);
    assert!(!out.contains("c1"), "{out}");
    eventually("every datanode and purge Pod gone", Duration::from_secs(60), || async {
        let pods: Api<Pod> = Api::namespaced(api.client(), "store");
        let left: Vec<String> = pods
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        seen(left.is_empty(), (), &left)
    })
    .await;
    for i in 0..4 {
        let volumes = machine.path(&format!("m{i}-disk")).join("cairn").join("volumes");
        let left: Vec<_> =
            std::fs::read_dir(&volumes).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "m{i} still holds {left:?}");
    }
    let (code, _, err) = status();
    assert_ne!(code, 0);
    assert!(err.contains("no StoreCluster \"c1\" in namespace \"store\""), "{err}");
}

/// Mutual TLS between the datanodes from certificates the operator issued (a Secret per datanode,
/// mounted into its Pod): the peer port refuses a caller without one; a certificate in the last
/// third of its life is issued anew by the operator, the kubelet updates the mounted Secret, and
/// the datanode serves the new certificate without a restart while writes flow, none failing.
async fn peer_certificates_renew_in_place(
    api: &MemoryApi,
    dir: &std::path::Path,
    kubectl: &Kubectl,
    ip: &str,
    endpoints: &[String],
    client: &reqwest::Client,
) {
    use base64::Engine;
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Patch, PatchParams};
    let secrets: Api<Secret> = Api::namespaced(api.client(), "store");
    let field = |s: &Secret, k: &str| String::from_utf8(s.data.as_ref().unwrap()[k].0.clone()).unwrap();
    let ca_secret = secrets.get("c1-peer-ca").await.unwrap();
    let ca =
        cairn_cluster::peer_tls::PeerCa::from_pem(&field(&ca_secret, "ca.crt"), &field(&ca_secret, "ca.key")).unwrap();
    let client_cert = ca.issue("test-client", &[], 1).unwrap();
    let tls = dir.join("client-tls");
    std::fs::create_dir_all(&tls).unwrap();
    std::fs::write(tls.join("client.crt"), &client_cert.cert_pem).unwrap();
    std::fs::write(tls.join("client.key"), &client_cert.key_pem).unwrap();
    let sh = |cmd: String| {
        let out = Command::new("sh").arg("-c").arg(cmd).stdin(Stdio::null()).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let pem_serial = |pem: &str| {
        let path = tls.join("serial.pem");
        std::fs::write(&path, pem).unwrap();
        sh(format!("openssl x509 -noout -serial -in {}", path.display()))
    };
    let served = || {
        sh(format!(
            "openssl s_client -connect {ip}:7481 -cert {0}/client.crt -key {0}/client.key </dev/null 2>/dev/null | openssl x509 -noout -serial",
            tls.display()
        ))
    };
    let digest = format!("https://{ip}:7481/replica/v1/partitions/0/digest");
    let refused = sh(format!("curl -sk -o /dev/null -w '%{{http_code}}' --max-time 5 {digest}"));
    assert_eq!(refused, "000", "the peer port answered a caller without a certificate");
    let secret = secrets.get("c1-m0-peer-tls").await.unwrap();
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_eq!(served(), pem_serial(&field(&secret, "tls.crt")), "m0 serves the certificate of its Secret");
    let pods: Api<Pod> = Api::namespaced(api.client(), "store");
    let m0_pod = pods.get("c1-m0").await.unwrap();

    // Writes through every datanode while the certificate changes twice under m0.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn({
        let (stop, endpoints, client) = (stop.clone(), endpoints.to_vec(), client.clone());
        async move {
            let (mut written, mut failed) = (Vec::new(), Vec::new());
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = cairn_testkit::payload(1_000 + i, 3000);
                let url = format!("https://{}/v1/blobs", endpoints[i as usize % endpoints.len()]);
                match client.post(url).body(body.clone()).send().await {
                    Ok(r) if r.status() == 201 => written
                        .push((r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned(), body)),
                    Ok(r) => failed.push(format!("{}: {}", r.status(), r.text().await.unwrap_or_default())),
                    Err(e) => failed.push(e.to_string()),
                }
                i += 1;
            }
            (written, failed)
        }
    });
    // A certificate with five days of its 25 left, as if the operator had issued it 20 days ago.
    let hosts = ["c1-m0.c1-nodes.store.svc".to_string(), "c1-m0.c1-nodes.store.svc.cluster.local".to_string()];
    let now = time::OffsetDateTime::now_utc();
    let old = ca.issue_between("m0", &hosts, now - time::Duration::days(20), now + time::Duration::days(5)).unwrap();
    let b64 = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
    let patch = serde_json::json!({"data": {"tls.crt": b64(&old.cert_pem), "tls.key": b64(&old.key_pem)}});
    secrets.patch("c1-m0-peer-tls", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    let (first, old_serial) = (served(), pem_serial(&old.cert_pem));
    let started = Instant::now();
    // The operator's next pass (it runs every minute; a change to the StoreCluster wakes it now)
    // issues a new one; the aging one may or may not have been served meanwhile.
    kubectl.ok(&["annotate", "storecluster", "c1", "-n", "store", "--overwrite", "test.cairn.dev/nudge=1"]);
    let renewed = eventually("the operator's new certificate served by m0", Duration::from_secs(90), || async {
        let secret = secrets.get("c1-m0-peer-tls").await.unwrap();
        let issued = pem_serial(&field(&secret, "tls.crt"));
        let now = served();
        seen(issued != old_serial && issued != first && now == issued, issued.clone(), (now, &issued))
    })
    .await;
    let took = started.elapsed();
    // The blob port serves the same certificate (the operator issued it for the Service too).
    eventually("the blob port serving the renewed certificate too", Duration::from_secs(10), || async {
        let now =
            sh(format!("openssl s_client -connect {ip}:7480 </dev/null 2>/dev/null | openssl x509 -noout -serial"));
        seen(now == renewed, (), now)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (written, failed) = writer.await.unwrap();
    println!(
        "peer certificate renewed in place ({renewed}) {took:?} after the aging one was planted; {} writes, {} failed",
        written.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "writes failed during the renewal: {failed:?}");
    let after = pods.get("c1-m0").await.unwrap();
    let restarts = |p: &Pod| p.status.as_ref().unwrap().container_statuses.as_ref().unwrap()[0].restart_count;
    assert_eq!(after.metadata.uid, m0_pod.metadata.uid, "m0's Pod was replaced");
    assert_eq!(restarts(&after), restarts(&m0_pod), "m0's datanode restarted");
    assert!(written.len() > 10, "too few writes to prove anything: {}", written.len());
    for (id, body) in &written {
        let r = client.get(format!("https://{}/v1/blobs/{id}", endpoints[0])).send().await.unwrap();
        assert_eq!(r.status(), 200, "{id}");
        assert_eq!(&r.bytes().await.unwrap()[..], &body[..], "{id}");
    }
}
