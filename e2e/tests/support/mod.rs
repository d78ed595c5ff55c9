//! Shared by the end-to-end tests: workspace binaries, processes, disks with their disk agents.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_testkit::machine::Machine;

/// A binary of the workspace, built by `cargo build --workspace` (scripts/test.sh does).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(path.exists(), "{} missing: run `cargo build --workspace` first", path.display());
    path
}

/// `n` consecutive free ports (for `cairn local up`, whose datanodes take consecutive ports), and
/// the blocks 100 and 200 above them (their peer and S3 ports).
pub fn free_port_block(n: u16) -> u16 {
    cairn_testkit::ports::free_port_block(n, &[100, 200])
}

fn auth_headers() -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, cairn_testkit::keys::authorization().parse().unwrap());
    headers
}

/// An async client that authenticates with the test key and reaches a cluster's blob API over
/// HTTPS, trusting `ca_pem` for the name `server_name` whatever address it dials (as the operator
/// does: `cairn_cluster::blob_tls`).
pub fn async_tls_client(ca_pem: &str, server_name: &str) -> reqwest::Client {
    let tls = cairn_cluster::BlobTls { ca_pem: ca_pem.to_owned(), server_name: server_name.to_owned() };
    reqwest::Client::builder()
        .default_headers(auth_headers())
        .use_preconfigured_tls(cairn_cluster::blob_tls::client_config(&tls).unwrap())
        .build()
        .unwrap()
}

/// A blocking client that authenticates with the test key ([`install_test_key`]).
pub fn client() -> reqwest::blocking::Client {
    client_builder().build().unwrap()
}

pub fn client_builder() -> reqwest::blocking::ClientBuilder {
    reqwest::blocking::Client::builder().default_headers(auth_headers())
}

/// An async client that authenticates with the test key.
pub fn async_client() -> reqwest::Client {
    reqwest::Client::builder().default_headers(auth_headers()).build().unwrap()
}

/// Puts the test key (admin) into a cluster's etcd, as `cairn keys create` would a new one.
pub async fn install_test_key_async(etcd: &str, namespace: &str, cluster: &str) {
    install_test_key_tls(etcd, namespace, cluster, None).await
}

/// As [`install_test_key_async`], through TLS to etcd.
pub async fn install_test_key_tls(
    etcd: &str,
    namespace: &str,
    cluster: &str,
    tls: Option<&cairn_cluster::etcd::EtcdTls>,
) {
    use cairn_cluster::access::{AccessKey, Scope};
    use cairn_testkit::keys::{TEST_KEY_ID, TEST_KEY_SECRET};
    let store =
        cairn_cluster::etcd::ClusterStore::connect_tls(&[etcd.to_owned()], namespace, cluster, tls).await.unwrap();
    let key =
        AccessKey::from_parts(TEST_KEY_ID, TEST_KEY_SECRET, "test", [Scope::Admin].into_iter().collect()).unwrap();
    store.create_key(&key).await.unwrap();
}

pub fn install_test_key(etcd: &str, namespace: &str, cluster: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(install_test_key_async(etcd, namespace, cluster));
}

/// The cluster's node token, from etcd (the first datanode made it).
pub fn node_token(etcd: &str, namespace: &str, cluster: &str) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let store = cairn_cluster::etcd::ClusterStore::connect(&[etcd.to_owned()], namespace, cluster).await.unwrap();
        store.load().await.unwrap().node_token.expect("a datanode has made the node token").expose().to_owned()
    })
}

/// A blocking client that calls replica routes as a datanode does: with the cluster's node token
/// (from etcd; the first datanode made it).
pub fn node_client(etcd: &str, namespace: &str, cluster: &str) -> reqwest::blocking::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(cairn_cluster::access::NODE_TOKEN_HEADER, node_token(etcd, namespace, cluster).parse().unwrap());
    reqwest::blocking::Client::builder().default_headers(headers).build().unwrap()
}

pub fn free_port() -> u16 {
    cairn_testkit::ports::free_port()
}

pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A child process killed (and reaped) when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A "machine": an ext4 loop device of `size` bytes mounted under the test's scratch dir, with a
/// disk agent serving it. Returns the agent process and its sockets (datanodes', admin's).
pub fn disk_with_agent(
    machine: &mut Machine,
    name: &str,
    size: u64,
) -> (KillOnDrop, cairn_common::agent_client::AgentSockets) {
    let dev = machine.loop_fs(name, size, "mkfs.ext4", &["-q", "-m", "0"]);
    machine.mount(&dev, &format!("{name}-disk"), &[]);
    let sockets = cairn_common::agent_client::AgentSockets::in_dir(&machine.path(&format!("{name}-run")));
    let config = machine.path(&format!("{name}.yaml"));
    let text = format!(
        "selector:\n  mount_paths: ['{}/{name}-disk']\n  min_size: 1MiB\nheadroom: 0%\n",
        machine.base.display()
    );
    std::fs::write(&config, text).unwrap();
    let child = Command::new(binary("cairn-disk-agent"))
        .args(["serve", "--mountinfo", "/proc/self/mountinfo", "--kubernetes", "off", "--node-name", name])
        .env("RUST_LOG", "warn")
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(machine.path(&format!("{name}-state")))
        .args(sockets.args())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let agent = KillOnDrop(child);
    wait_until("disk agent", Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&sockets.admin).is_ok()
    });
    (agent, sockets)
}

/// A file of the repository (`crds/`, `examples/…`).
pub fn repo(path: &str) -> String {
    format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"))
}

/// A kubeconfig for `server` acting as `user` (impersonation, `as:` — the test API serves plain
/// HTTP, over which kubectl sends no token), or as an admin.
pub fn kubeconfig(path: &std::path::Path, server: &str, user: Option<&str>) {
    let user = match user {
        Some(user) => format!("{{as: \"{user}\"}}"),
        None => "{}".to_owned(),
    };
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters:\n- name: test\n  cluster: {{server: \"{server}\"}}\n\
             users:\n- name: u\n  user: {user}\n\
             contexts:\n- name: test\n  context: {{cluster: test, user: u}}\n"
        ),
    )
    .unwrap();
}

/// The real `kubectl`, as an admin, with a discovery cache of its own and `kubectl-cairn` (the
/// `cairn` binary) on its PATH.
pub struct Kubectl {
    pub kubeconfig: PathBuf,
    cache: PathBuf,
    /// Put first on PATH: where `kubectl-cairn` is.
    plugins: PathBuf,
}

impl Kubectl {
    pub fn new(dir: &Path, server: &str) -> Self {
        Self::as_user(dir, server, None)
    }

    /// As `user` (none: an admin); its files under `dir`.
    pub fn as_user(dir: &Path, server: &str, user: Option<&str>) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("kubeconfig");
        kubeconfig(&config, server, user);
        let plugins = dir.join("plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        std::os::unix::fs::symlink(binary("cairn"), plugins.join("kubectl-cairn")).unwrap();
        Self { kubeconfig: config, cache: dir.join("kube-cache"), plugins }
    }

    /// `kubectl ARGS`: exit code, stdout, stderr.
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        let path = format!("{}:{}", self.plugins.display(), std::env::var("PATH").unwrap_or_default());
        let out = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("KUBECACHEDIR", &self.cache)
            .env("PATH", path)
            .output()
            .expect("kubectl (Debian: kubernetes-client)");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
    }

    /// `kubectl ARGS`, which must succeed: its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run(args);
        assert_eq!(code, 0, "kubectl {args:?}: {out}{err}");
        out
    }
}

/// The checks schemathesis (PyPI; `scripts/install-deps.sh` installs it in `.tools/fuzz-venv`) runs against a node's
/// `/openapi.json`: all of them, with the statuses Cairn answers to schema-valid requests that
/// cannot succeed (a blob deleted meanwhile: 410; a range past the end: 416), and no
/// negative-data check on `GET /v1/blobs/{id}`, whose `Range` header is ignored when it is not
/// `bytes=…` (RFC 9110 §14.2) rather than refused.
const SCHEMATHESIS_CONFIG: &str = r#"
[checks]
enabled = true

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", 401, 403, 404, 409, 410, 416, 429, "5xx"]

[[operations]]
include-path = "/v1/blobs/{id}"
include-method = "GET"
checks.negative_data_rejection.enabled = false

# The replica routes' bodies are binary frames and JSON the document does not detail: whether a
# body is "schema-valid" cannot be judged from it.
[[operations]]
include-path-regex = "^/replica/"
checks.positive_data_acceptance.enabled = false
checks.negative_data_rejection.enabled = false
"#;

/// Runs schemathesis against `base` (its `/openapi.json`) with these headers and more `st run`
/// arguments (say, which paths): whether it found nothing, and its report.
pub fn schemathesis(base: &str, headers: &[String], args: &[&str], examples: u32) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("schemathesis.toml"), SCHEMATHESIS_CONFIG).unwrap();
    // scripts/install-deps.sh puts it in a venv under .tools/; else whatever `st` is on PATH.
    let venv = std::path::Path::new(&repo(".tools/fuzz-venv/bin/st")).to_owned();
    let mut command = Command::new(if venv.exists() { venv.as_os_str().to_owned() } else { "st".into() });
    command.current_dir(dir.path()).args(["run", &format!("{base}/openapi.json"), "--workers", "1"]);
    command.args(["--max-examples", &examples.to_string(), "--no-color"]).args(args);
    for header in headers {
        command.args(["-H", header]);
    }
    let out = command.output().expect("schemathesis (`st`) runs: scripts/install-deps.sh installs it");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A standalone datanode (the test key its root key) with these flags, listening at `addr`, once
/// it is ready.
pub fn standalone_datanode(addr: &str, args: &[&str]) -> KillOnDrop {
    standalone_datanode_as(None, addr, args)
}

/// As [`standalone_datanode`], run as this uid and gid (not root) when given.
pub fn standalone_datanode_as(uid: Option<u32>, addr: &str, args: &[&str]) -> KillOnDrop {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(binary("cairn-datanode"));
    if let Some(uid) = uid {
        command.uid(uid).gid(uid);
    }
    let child = command
        .args(["--listen", addr])
        .args(args)
        .envs(cairn_testkit::keys::root_key_env())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let url = format!("http://{addr}/readyz");
    wait_until("datanode", Duration::from_secs(30), || {
        reqwest::blocking::get(&url).is_ok_and(|r| r.status().is_success())
    });
    KillOnDrop(child)
}
