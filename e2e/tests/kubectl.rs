//! The real `kubectl` against the strict test API served over HTTP: server-side apply of the
//! CRDs and of a StoreCluster, the schema's strict field validation, `kubectl get` with the
//! CRD's printer columns, and `kubectl cairn` through kubectl's plugin mechanism.

mod support;

use support::{repo, Kubectl};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_crds_and_storeclusters_and_prints_their_columns() {
    let api = cairn_testkit::MemoryApi::new();
    let server = api.serve_http().await;
    let dir = tempfile::tempdir().unwrap();
    let kubectl = Kubectl::new(dir.path(), &server);

    // The CRDs, as docs/operations.md installs and upgrades them; established at once.
    let out = kubectl.ok(&["apply", "--server-side", "-f", &repo("crds/")]);
    assert!(
        out.contains("customresourcedefinition.apiextensions.k8s.io/storeclusters.cairn.dev serverside-applied"),
        "{out}"
    );
    kubectl.ok(&["wait", "--for", "condition=established", "--timeout", "10s", "crd/storeclusters.cairn.dev"]);

    // The example StoreCluster, applied twice (the second time, nothing changes).
    let out = kubectl.ok(&["apply", "--server-side", "-f", &repo("examples/storecluster.yaml")]);
    assert!(out.contains("storecluster.cairn.dev/blobs serverside-applied"), "{out}");
    kubectl.ok(&["apply", "--server-side", "-f", &repo("examples/storecluster.yaml")]);
    assert_eq!(api.writes("storeclusters", "storage", "blobs"), 1, "an unchanged apply writes nothing");

    // A typo is refused, as the API server's strict field validation refuses it.
    let example = std::fs::read_to_string(repo("examples/storecluster.yaml")).unwrap();
    let typo = dir.path().join("typo.yaml");
    std::fs::write(&typo, example.replace("replicationFactor: 3", "replicationFactr: 3")).unwrap();
    let (code, out, err) = kubectl.run(&["apply", "--server-side", "-f", typo.to_str().unwrap()]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains(".spec.replicationFactr: field not declared in schema"), "{err}");
    // An invalid value is refused by the CRD's own rules.
    let invalid = dir.path().join("invalid.yaml");
    std::fs::write(&invalid, example.replace("writeQuorum: 2", "writeQuorum: 4")).unwrap();
    let (code, _, err) = kubectl.run(&["apply", "--server-side", "-f", invalid.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("writeQuorum"), "{err}");

    // Printer columns, by plural, singular and -o wide.
    let out = kubectl.ok(&["get", "storeclusters", "-n", "storage"]);
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "PHASE", "READY", "NODES", "PARTITIONS", "AGE"], "{out}");
    assert!(out.lines().nth(1).unwrap().starts_with("blobs "), "{out}");
    let out =
        kubectl.ok(&["get", "storecluster", "blobs", "-n", "storage", "-o", "jsonpath={.spec.replicationFactor}"]);
    assert_eq!(out, "3");
    let out = kubectl.ok(&["get", "crds"]);
    assert!(out.contains("storenodes.cairn.dev"), "{out}");

    // The plugin, found by kubectl on PATH, reads the StoreCluster through the same kubeconfig.
    let (code, out, err) = kubectl.run(&["cairn", "status", "-n", "storage", "blobs"]);
    assert!(out.starts_with("StoreCluster storage/blobs"), "{code} {out}{err}");

    // Deleted and waited for (kubectl watches it go by name).
    kubectl.ok(&["delete", "-f", &repo("examples/storecluster.yaml"), "--timeout", "20s"]);
    let out = kubectl.ok(&["get", "storeclusters", "-A"]);
    assert!(!out.contains("blobs"), "{out}");
}
