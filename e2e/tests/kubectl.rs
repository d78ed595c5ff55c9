//! The real `kubectl` against the strict test API served over HTTP: server-side apply of the
//! CRDs and of a StoreCluster, the schema's strict field validation, `kubectl get` with the
//! CRD's printer columns, and `kubectl cairn` through kubectl's plugin mechanism.

mod support;

use cairn_testkit::rbac::{rendered_chart, Rbac, BUILTIN_USER_ROLES};
use support::{repo, Kubectl};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_crds_and_storeclusters_and_prints_their_columns() {
    // RBAC: the chart's roles and Kubernetes' own user-facing ones; alice may view the
    // namespace `storage`, bob may edit it.
    let bindings = "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: alice, namespace: storage}\n\
        roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}\nsubjects: [{kind: User, name: alice}]\n\
        ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: bob, namespace: storage}\n\
        roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: edit}\nsubjects: [{kind: User, name: bob}]\n";
    let manifests = format!("{}\n---\n{}\n---\n{bindings}", rendered_chart(), BUILTIN_USER_ROLES);
    let api = cairn_testkit::MemoryApi::new().with_rbac(Rbac::from_manifests(&manifests));
    let server = api.serve_http().await;
    let dir = tempfile::tempdir().unwrap();
    let kubectl = Kubectl::new(&dir.path().join("admin"), &server);
    let alice = Kubectl::as_user(&dir.path().join("alice"), &server, Some("alice"));
    let bob = Kubectl::as_user(&dir.path().join("bob"), &server, Some("bob"));

    // The CRDs, as docs/operations.md installs and upgrades them; established at once.
    let out = kubectl.ok(&["apply", "--server-side", "-f", &repo("crds/")]);
    assert!(
        out.contains("customresourcedefinition.apiextensions.k8s.io/storeclusters.cairn.dev serverside-applied"),
        "{out}"
    );
    kubectl.ok(&["wait", "--for", "condition=established", "--timeout", "10s", "crd/storeclusters.cairn.dev"]);

    // Who may do what: alice (view) may not create a StoreCluster, bob (edit) may.
    let (code, _, err) = alice.run(&["apply", "--server-side", "-f", &repo("examples/storecluster.yaml")]);
    assert_ne!(code, 0);
    assert!(err.contains("User \"alice\" cannot patch resource \"storeclusters\""), "{err}");

    // The example StoreCluster, applied twice (the second time, nothing changes).
    let out = bob.ok(&["apply", "--server-side", "-f", &repo("examples/storecluster.yaml")]);
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

    // Printer columns, by plural and singular; alice may read them in her namespace only.
    let out = alice.ok(&["get", "storeclusters", "-n", "storage"]);
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "PHASE", "READY", "NODES", "PARTITIONS", "AGE"], "{out}");
    assert!(out.lines().nth(1).unwrap().starts_with("blobs "), "{out}");
    let out =
        kubectl.ok(&["get", "storecluster", "blobs", "-n", "storage", "-o", "jsonpath={.spec.replicationFactor}"]);
    assert_eq!(out, "3");
    let (code, _, err) = alice.run(&["get", "storeclusters", "-A"]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot list resource \"storeclusters\""), "{err}");
    let out = kubectl.ok(&["get", "crds"]);
    assert!(out.contains("storenodes.cairn.dev"), "{out}");

    // The example StoreAccessKey: its columns; a scope given twice is refused as a real API
    // server refuses a duplicate in a list of type set.
    let out = kubectl.ok(&["apply", "--server-side", "-f", &repo("examples/access-key.yaml")]);
    assert!(out.contains("storeaccesskey.cairn.dev/uploader serverside-applied"), "{out}");
    let out = kubectl.ok(&["get", "storeaccesskeys", "-n", "apps"]);
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "CLUSTER", "KEY", "SECRET", "READY", "AGE"], "{out}");
    let key = std::fs::read_to_string(repo("examples/access-key.yaml")).unwrap();
    let twice = dir.path().join("twice.yaml");
    std::fs::write(&twice, key.replace("[read, write]", "[read, read]")).unwrap();
    let (code, _, err) = kubectl.run(&["apply", "--server-side", "-f", twice.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("spec.scopes[1]: Duplicate value: \"read\""), "{err}");
    let (code, _, err) = bob.run(&["apply", "--server-side", "-f", &repo("examples/access-key.yaml")]);
    assert_ne!(code, 0, "bob may edit storage, not apps");
    assert!(err.contains("cannot patch resource \"storeaccesskeys\""), "{err}");

    // The plugin, found by kubectl on PATH, reads the StoreCluster through the same kubeconfig.
    let (code, out, err) = alice.run(&["cairn", "status", "-n", "storage", "blobs"]);
    assert!(out.starts_with("StoreCluster storage/blobs"), "{code} {out}{err}");

    // Deleted and waited for (kubectl watches it go by name).
    kubectl.ok(&["delete", "-f", &repo("examples/storecluster.yaml"), "--timeout", "20s"]);
    let out = kubectl.ok(&["get", "storeclusters", "-A"]);
    assert!(!out.contains("blobs"), "{out}");

    // Without the CRDs there is no such resource (and a StoreCluster cannot be written).
    kubectl.ok(&["apply", "--server-side", "-f", &repo("examples/storecluster.yaml")]);
    kubectl.ok(&["delete", "-f", &repo("crds/")]);
    let (code, _, err) = kubectl.run(&["get", "storeclusters", "-A"]);
    assert_ne!(code, 0);
    // (kubectl's discovery cache may still know the resource: then the server's 404 says it.)
    let gone = err.contains("the server doesn't have a resource type \"storeclusters\"")
        || err.contains("could not find the requested resource");
    assert!(gone, "{err}");
    // Applied again, the CRD is empty: the StoreCluster went with it.
    kubectl.ok(&["apply", "--server-side", "-f", &repo("crds/")]);
    let out = kubectl.ok(&["get", "storeclusters", "-A"]);
    assert!(!out.contains("blobs"), "{out}");
}
