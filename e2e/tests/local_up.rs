//! `cairn local up`: a whole cluster on this machine, started, used, stopped with Ctrl-C and
//! started again over the same data.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::{binary, free_port_block, wait_until};

struct LocalUp {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl LocalUp {
    /// The README's cluster (examples/local.yaml) with 32 MiB volumes on 256 MiB disks, so that
    /// the test preallocates 576 MiB instead of 4.5 GiB of a shared machine's disk.
    fn start(dir: &std::path::Path, port: u16, etcd_port: u16) -> Self {
        let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/local.yaml")).unwrap();
        let frugal =
            example.replace("volumeSize: 256Mi", "volumeSize: 32Mi").replace("segmentSize: 64Mi", "segmentSize: 8Mi");
        assert!(frugal.contains("volumeSize: 32Mi") && frugal.contains("segmentSize: 8Mi"), "{example}");
        let spec = dir.join("cluster.yaml");
        std::fs::write(&spec, frugal).unwrap();
        let child = Command::new(binary("cairn"))
            .args(["local", "up", "-f"])
            .arg(&spec)
            .args(["--disk-size", "256MiB", "--dir"])
            .arg(dir)
            .args(["--port", &port.to_string(), "--etcd-port", &etcd_port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Self::from_child(child)
    }

    /// Follows a started `cairn local up` whose stdout is piped.
    fn from_child(mut child: Child) -> Self {
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self { child, lines }
    }

    fn wait_for(&self, needle: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(90))
                .unwrap_or_else(|_| panic!("no {needle:?} in {seen:?}"));
            let done = line.contains(needle);
            seen.push(line);
            if done {
                return seen;
            }
        }
    }

    /// Ctrl-C; it must stop everything and exit cleanly.
    fn interrupt(mut self) {
        assert!(Command::new("kill").args(["-INT", &self.child.id().to_string()]).status().unwrap().success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "cairn local up exited with {status}");
    }
}

/// A test that fails still stops the cluster: Ctrl-C (it stops etcd, the agent and the
/// datanodes), and a kill after 15 s (its children die with it).
impl Drop for LocalUp {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        for _ in 0..150 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small StoreCluster file (`small`: 32 MiB volumes of 8 MiB segments, one partition per disk).
fn small_cluster(m: &cairn_testkit::machine::Machine) -> std::path::PathBuf {
    let spec = m.path("small.yaml");
    std::fs::write(
        &spec,
        "apiVersion: cairn.dev/v1alpha1\nkind: StoreCluster\nmetadata: {name: small}\n\
         spec: {image: local, volumeSize: 32Mi, segmentSize: 8Mi, partitionsPerDisk: 1, etcd: {endpoints: []}}\n",
    )
    .unwrap();
    spec
}

/// `cairn ARGS` (or `kubectl-cairn ARGS` through a symlink): exit code and stdout.
/// A client with the admin key `cairn local up` made (its token in DIR/admin-token).
fn admin_client(dir: &std::path::Path) -> reqwest::blocking::Client {
    let token = std::fs::read_to_string(dir.join("admin-token")).unwrap();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {}", token.trim()).parse().unwrap());
    reqwest::blocking::Client::builder().default_headers(headers).build().unwrap()
}

fn cairn(program: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(program).args(args).stderr(Stdio::inherit()).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap())
}

#[test]
fn local_up_serves_stops_on_ctrl_c_and_restarts_over_its_data() {
    let dir = tempfile::tempdir().unwrap();
    // Three datanodes on consecutive ports, then etcd's client and peer ports.
    let port = free_port_block(5);
    let etcd_port = port + 3;
    let up = LocalUp::start(dir.path(), port, etcd_port);
    let first = up.wait_for("cluster local:");
    assert!(first[0].contains("creating"), "{first:?}");
    // Progress of the creation, a line per change, until Ready.
    let local = dir.path().to_str().unwrap();
    let (code, progress) = cairn(&binary("cairn"), &["status", "--local", local, "--watch", "--timeout", "90"]);
    assert_eq!(code, 0, "{progress}");
    assert!(progress.lines().last().unwrap().contains(" Ready: 3 datanodes, 6 partitions"), "{progress}");
    up.wait_for(": ready");
    let announcement = up.wait_for("Authorization: Bearer $CAIRN_TOKEN");
    assert!(announcement.iter().any(|l| l.contains("export CAIRN_TOKEN=")), "{announcement:?}");
    // Every datanode serves S3 too (200 above its blob port), the announcement giving the admin
    // key's S3 credentials: the AWS CLI, unmodified, makes a bucket through one node and reads
    // the object back through another (after the restart below, so that the capacity checks
    // count the blob API's blobs alone).
    let s3 = up.wait_for("AWS_SECRET_ACCESS_KEY=");
    let exports = s3.last().unwrap().trim().strip_prefix("export ").expect("an export line").to_owned();
    let env: Vec<(String, String)> = exports
        .split_whitespace()
        .map(|pair| pair.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).expect("NAME=value"))
        .collect();
    let aws = |s3_port: u16, args: &[&str]| {
        let out = Command::new(support::repo(".tools/s3-venv/bin/aws"))
            .args(["--endpoint-url", &format!("http://127.0.0.1:{s3_port}")])
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .output()
            .unwrap();
        assert!(out.status.success(), "aws {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };

    // The admin key's token is the owner's alone; without it the blob API lets no one in.
    let token_file = dir.path().join("admin-token");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&token_file).unwrap().permissions()) & 0o777,
        0o600
    );
    let anonymous =
        reqwest::blocking::Client::new().post(format!("http://127.0.0.1:{port}/v1/blobs")).body("x").send().unwrap();
    assert_eq!(anonymous.status(), 401);

    // More keys for the local cluster by its directory alone.
    let out = Command::new(binary("cairn"))
        .args(["keys", "create", "--local", local, "--name", "reader", "--scope", "read", "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reader =
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["token"].as_str().unwrap().to_owned();
    let refused = reqwest::blocking::Client::new()
        .post(format!("http://127.0.0.1:{port}/v1/blobs"))
        .header("authorization", format!("Bearer {reader}"))
        .body("x")
        .send()
        .unwrap();
    assert_eq!(refused.status(), 403, "a read key cannot write");
    let (code, listed) = cairn(&binary("cairn"), &["keys", "list", "--local", local]);
    assert_eq!(code, 0, "{listed}");
    assert!(listed.contains("local admin") && listed.contains("reader"), "{listed}");

    let client = admin_client(dir.path());
    let r = client.post(format!("http://127.0.0.1:{port}/v1/blobs")).body("kept across restarts").send().unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<serde_json::Value>().unwrap()["id"].as_str().unwrap().to_owned();
    let read = |p: u16| client.get(format!("http://127.0.0.1:{p}/v1/blobs/{id}")).send().unwrap().text().unwrap();
    assert_eq!(read(port + 2), "kept across restarts", "every datanode serves every blob");
    // The datanodes speak mutual TLS on their peer ports (100 above), with certificates from the
    // cluster CA `local up` made: a caller without a certificate is refused in the handshake.
    let ca = dir.path().join("tls/ca.crt");
    assert!(ca.exists() && dir.path().join("tls/m0.crt").exists());
    let curl = |extra: &[&str]| {
        let url = format!("https://127.0.0.1:{}/replica/v1/partitions/0/digest", port + 100);
        let out = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "--cacert", ca.to_str().unwrap()])
            .args(extra)
            .arg(url)
            .output()
            .unwrap();
        out.status.code()
    };
    assert_ne!(curl(&[]), Some(0), "no client certificate: refused");
    let (cert, key) = (dir.path().join("tls/m1.crt"), dir.path().join("tls/m1.key"));
    assert_eq!(
        curl(&["--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()]),
        Some(0),
        "a peer's certificate is let in"
    );

    // The plugin reads the local cluster: status, disks, topology; installed as kubectl-cairn.
    let plugin = dir.path().join("kubectl-cairn");
    std::os::unix::fs::symlink(binary("cairn"), &plugin).unwrap();
    let (code, out) = cairn(&plugin, &["status", "--local", local]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("StoreCluster local/local (local)  phase Ready"), "{out}");
    assert!(out.contains("Replication: every replica live and caught up"), "{out}");
    for m in ["m0", "m1", "m2"] {
        assert!(out.lines().any(|l| l.starts_with(m) && l.contains(" ready ")), "{m}: {out}");
    }
    let (_, json) = cairn(&plugin, &["status", "--local", local, "-o", "json"]);
    let view: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!((view["phase"].as_str(), view["partitions"]["total"].as_u64()), (Some("Ready"), Some(6)));
    assert!(view["machines"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["replicas"] == 6 && m["allocatedBytes"].as_u64() > Some(0)));

    // Capacity tells what is stored, not what is preallocated: one small blob on three replicas,
    // and after its deletion, nothing stored but what compaction can reclaim. The summary adds up
    // the machine rows.
    let capacity_when = |what: &str, done: &dyn Fn(&serde_json::Value) -> bool| {
        let mut view = serde_json::Value::Null;
        wait_until(what, Duration::from_secs(30), || {
            let (_, json) = cairn(&plugin, &["status", "--local", local, "-o", "json"]);
            view = serde_json::from_str(&json).unwrap();
            done(&view["capacity"])
        });
        let rows = view["machines"].as_array().unwrap();
        for field in ["storedBytes", "reclaimableBytes", "allocatedBytes", "allocatableBytes", "totalBytes"] {
            let sum: u64 = rows.iter().map(|m| m[field].as_u64().unwrap()).sum();
            assert_eq!(view["capacity"][field].as_u64(), Some(sum), "{field}: {view:#}");
        }
        view["capacity"].clone()
    };
    let stored = capacity_when("the blob counted", &|c| c["blobs"] == 1 && c["storedBytes"].as_u64() > Some(0));
    let (bytes, allocated) = (stored["storedBytes"].as_u64().unwrap(), stored["allocatedBytes"].as_u64().unwrap());
    assert!(bytes > 3 * 20 && bytes < 3 * 4096, "three replicas of a 20-byte blob and its header: {stored}");
    assert!(allocated > 1000 * bytes, "{stored}");
    let (code, out) = cairn(&plugin, &["status", "--local", local]);
    assert_eq!(code, 0);
    assert!(out.contains("Capacity: 1 blob(s); "), "{out}");
    let gone = client.post(format!("http://127.0.0.1:{port}/v1/blobs")).body("deleted at once").send().unwrap();
    let gone = gone.json::<serde_json::Value>().unwrap()["id"].as_str().unwrap().to_owned();
    assert_eq!(client.delete(format!("http://127.0.0.1:{port}/v1/blobs/{gone}")).send().unwrap().status(), 204);
    let after = capacity_when("the deleted blob reclaimable", &|c| {
        c["blobs"] == 1 && c["reclaimableBytes"].as_u64() >= Some(3 * 20)
    });
    assert!(after["storedBytes"].as_u64() > Some(bytes), "the tombstones are stored: {after}");
    let (code, out) = cairn(&plugin, &["disks", "--local", local]);
    assert_eq!(code, 0);
    assert!(out.starts_with("Node local: 3 disk(s)"), "{out}");
    assert!(!out.contains("missing"), "the directory disks are there: {out}");
    let (code, out) = cairn(&plugin, &["topology", "--local", local, "-o", "json"]);
    assert_eq!(code, 0);
    let topology: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(topology["topology"]["partitions"].as_object().unwrap().len(), 6);
    assert_eq!(topology["live"].as_object().unwrap().len(), 3);
    up.interrupt();
    let stopped = Command::new(binary("cairn")).args(["status", "--local", local]).output().unwrap();
    assert_eq!(stopped.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&stopped.stderr).contains("is not running"), "{stopped:?}");
    for p in [port, port + 1, port + 2, port + 200, port + 201, port + 202, etcd_port] {
        assert!(std::net::TcpStream::connect(("127.0.0.1", p)).is_err(), "port {p} still open after Ctrl-C");
    }

    let up = LocalUp::start(dir.path(), port, etcd_port);
    up.wait_for(": ready");
    assert_eq!(read(port + 1), "kept across restarts");
    // S3 through the restarted cluster, with the credentials the first start printed.
    let object = dir.path().join("object.txt");
    std::fs::write(&object, "through S3").unwrap();
    aws(port + 200, &["s3", "mb", "s3://demo"]);
    aws(port + 201, &["s3", "cp", object.to_str().unwrap(), "s3://demo/object.txt"]);
    assert_eq!(aws(port + 202, &["s3", "cp", "s3://demo/object.txt", "-"]), "through S3");

    // A second `cairn local up` on the same directory is refused, and the first one serves on.
    let second = Command::new(binary("cairn"))
        .args(["local", "up", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/local.yaml")])
        .arg("--dir")
        .arg(dir.path())
        .args(["--port", &(port + 10).to_string(), "--etcd-port", &(etcd_port + 10).to_string()])
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already running") && err.contains(&format!("pid {}", up.child.id())), "{err}");
    assert_eq!(read(port), "kept across restarts");

    // etcd dies, then the disk agent: each is started again, and the cluster serves on.
    let etcd_data = dir.path().join("etcd");
    let killed =
        Command::new("pkill").args(["-KILL", "-f", "--", &format!("--data-dir {}", etcd_data.display())]).status();
    assert!(killed.unwrap().success());
    // (The progress line need not change: a restart can be quicker than the next pass.)
    // Ready again after the pass that saw the restart (its event is in the state), not the one before.
    let ready_again = |what: &str| {
        support::wait_until(&format!("the cluster Ready again after {what} restarted"), Duration::from_secs(60), || {
            let (code, out) = cairn(&binary("cairn"), &["status", "--local", local]);
            code == 0 && out.contains("phase Ready") && out.contains(&format!("{what} exited (signal: 9"))
        })
    };
    up.wait_for("etcd exited (signal: 9");
    ready_again("etcd");
    let killed = Command::new("pkill")
        .args(["-KILL", "-f", "--", &format!("--state-dir {}", dir.path().join("disk-agent-state").display())])
        .status();
    assert!(killed.unwrap().success());
    up.wait_for("disk agent exited (signal: 9");
    ready_again("disk agent");
    support::wait_until("a PUT after the restarts", Duration::from_secs(30), || {
        let r = client.post(format!("http://127.0.0.1:{port}/v1/blobs")).body("after the restarts").send();
        r.is_ok_and(|r| r.status() == 201)
    });
    assert_eq!(read(port + 1), "kept across restarts");
    let (code, out) = cairn(&binary("cairn"), &["status", "--local", local]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ProcessRestarted"), "the restarts are in the events: {out}");

    // `cairn local up` killed with -9: its children go with it, and a new start works.
    let mut up = up;
    up.child.kill().unwrap();
    up.child.wait().unwrap();
    support::wait_until("every child of the killed cairn local up gone", Duration::from_secs(30), || {
        [port, port + 1, port + 2, etcd_port].iter().all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_err())
    });
    let up = LocalUp::start(dir.path(), port, etcd_port);
    up.wait_for(": ready");
    assert_eq!(read(port + 2), "kept across restarts");
    up.interrupt();
}

#[test]
fn local_up_on_a_disk_per_machine_given_on_the_command_line() {
    // Three directories on a real filesystem of their own (a loop device), one per machine.
    let mut m = cairn_testkit::machine::Machine::new();
    let dev = m.loop_fs("local", 256 << 20, "mkfs.ext4", &["-q", "-m", "0"]);
    let mount = m.mount(&dev, "local-disk", &[]);
    let spec = small_cluster(&m);
    let disks: Vec<String> = ["a", "b", "c"].iter().map(|d| mount.join(d).display().to_string()).collect();
    let dir = m.path("state");
    let run_with = |disk_args: &[String], disk_size: &str| {
        let port = free_port_block(5);
        let etcd_port = port + 3;
        let mut command = Command::new(binary("cairn"));
        command.args(["local", "up", "-f", spec.to_str().unwrap(), "--disk-size", disk_size]).arg("--dir").arg(&dir);
        command.args(["--port", &port.to_string(), "--etcd-port", &etcd_port.to_string()]);
        for d in disk_args {
            command.args(["--disk", d]);
        }
        command
    };
    let run = |disk_args: &[String]| run_with(disk_args, "64MiB");

    // A spec no datanode could serve: the largest blob does not fit in a segment. Nothing starts.
    let bad_spec = m.path("bad.yaml");
    std::fs::write(
        &bad_spec,
        "apiVersion: cairn.dev/v1alpha1\nkind: StoreCluster\nmetadata: {name: bad}\n\
         spec: {image: local, volumeSize: 32Mi, segmentSize: 8Mi, maxBlobSize: 8Mi, etcd: {endpoints: []}}\n",
    )
    .unwrap();
    let out = Command::new(binary("cairn"))
        .args(["local", "up", "-f", bad_spec.to_str().unwrap(), "--dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not valid") && err.contains("maxBlobSize must fit in a segment"), "{err}");
    assert!(!dir.exists(), "nothing created for a spec that cannot work");

    // Bad input: not one per machine. Nothing starts.
    let out = run(&disks[..2]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--disk is given 2 time(s) for 3 machines"), "{err}");
    assert!(!dir.exists(), "nothing created for a bad command line");

    // Disks that promise more than their filesystem has (3 × 1 GiB on 256 MiB): refused before
    // anything starts, instead of planning replicas whose volumes could never be created.
    let mut too_big = run_with(&disks, "1GiB");
    let etcd_port = too_big
        .get_args()
        .skip_while(|a| *a != "--etcd-port")
        .nth(1)
        .unwrap()
        .to_str()
        .unwrap()
        .parse::<u16>()
        .unwrap();
    let out = too_big.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("the filesystem of {} has", disks[0]))
            && err.contains("the 3 machine disk(s) on it still promise 3.0 GiB")
            && err.contains("pass a smaller --disk-size"),
        "{err}"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", etcd_port)).is_err(), "etcd was started");
    let out = run_with(&disks, "16MiB").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--disk-size 16MiB cannot hold one volume of the StoreCluster's volumeSize (32.0 MiB)"),
        "{err}"
    );

    // etcd's port taken (another etcd, another local cluster): refused, nothing written there.
    let mut taken = run(&disks);
    let etcd_port =
        taken.get_args().skip_while(|a| *a != "--etcd-port").nth(1).unwrap().to_str().unwrap().parse::<u16>().unwrap();
    let squatter = std::net::TcpListener::bind(("127.0.0.1", etcd_port)).unwrap();
    let out = taken.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("etcd's client port 127.0.0.1:{etcd_port} is not free")), "{err}");
    drop(squatter);

    // Something else holds the second datanode's port: it keeps exiting, the cluster says why
    // (with the address), restarts it after growing pauses, and is Ready once the port is free.
    let mut command = run(&disks);
    let port =
        command.get_args().skip_while(|a| *a != "--port").nth(1).unwrap().to_str().unwrap().parse::<u16>().unwrap();
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port + 1)).unwrap();
    let child = command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
    let up = LocalUp::from_child(child);
    let seen = up.wait_for("keeps exiting");
    let line = seen.last().unwrap();
    assert!(line.contains("degraded") && line.contains(&format!("127.0.0.1:{}", port + 1)), "{line}");
    drop(squatter);
    up.wait_for("cluster small: ready");
    let (code, out) = cairn(&binary("cairn"), &["disks", "--local", dir.to_str().unwrap(), "-o", "json"]);
    assert_eq!(code, 0);
    let nodes: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mounts: Vec<&str> =
        nodes[0]["disks"].as_array().unwrap().iter().map(|d| d["canonical_mount"].as_str().unwrap()).collect();
    assert_eq!(mounts, disks.iter().map(String::as_str).collect::<Vec<_>>());
    for d in nodes[0]["disks"].as_array().unwrap() {
        // One partition per disk was asked for, but a 64 MiB disk holds two 32 MiB volumes: two
        // partitions, a replica of each on every machine's disk.
        assert_eq!(d["volumes"].as_array().unwrap().len(), 2, "{d}");
    }
    up.interrupt();
}

/// Scale-in: started again with fewer `--machines`, the machine left out is drained (its replicas
/// move, each caught up before the old one goes), stopped and purged, and the next start leaves
/// it out. `--drain` that would leave too few machines, or names none, is refused.
#[test]
fn local_up_scales_in_by_draining_the_machine_left_out() {
    let m = cairn_testkit::machine::Machine::new();
    let spec = small_cluster(&m);
    let dir = m.path("state");
    let local = dir.to_str().unwrap();
    let port = free_port_block(6);
    let etcd_port = port + 4;
    let run = |machines: u32, extra: &[&str]| {
        let mut command = Command::new(binary("cairn"));
        command.args(["local", "up", "-f", spec.to_str().unwrap(), "--disk-size", "128MiB", "--dir", local]);
        command.args(["--port", &port.to_string(), "--etcd-port", &etcd_port.to_string()]);
        command.args(["--machines", &machines.to_string()]).args(extra);
        command
    };
    let up = LocalUp::from_child(run(4, &[]).stdout(Stdio::piped()).spawn().unwrap());
    up.wait_for("cluster small: ready");
    let client = admin_client(&dir);
    let mut blobs = Vec::new();
    for i in 0..12u8 {
        let r =
            client.post(format!("http://127.0.0.1:{}/v1/blobs", port + u16::from(i % 4))).body(vec![i; 5000]).send();
        let r = r.unwrap();
        assert_eq!(r.status(), 201);
        blobs.push((r.json::<serde_json::Value>().unwrap()["id"].as_str().unwrap().to_owned(), vec![i; 5000]));
    }
    up.interrupt();

    let up = LocalUp::from_child(run(3, &[]).stdout(Stdio::piped()).spawn().unwrap());
    up.wait_for("draining m3");
    let seen = up.wait_for("m3 is drained and stopped");
    assert!(seen.last().unwrap().contains("the next start leaves it out"), "{seen:?}");
    for p in [port, port + 1, port + 2] {
        for (id, data) in &blobs {
            let r = client.get(format!("http://127.0.0.1:{p}/v1/blobs/{id}?local=true")).send().unwrap();
            assert_eq!(r.status(), 200, "{id} on the replica behind port {p}?");
            assert_eq!(r.bytes().unwrap().as_ref(), data.as_slice());
        }
    }
    let (code, out) = cairn(&binary("cairn"), &["topology", "--local", local, "-o", "json"]);
    assert_eq!(code, 0);
    let topology: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(topology["topology"]["nodes"].get("m3").is_none(), "{out}");
    let socket = dir.join("disk-agent.sock");
    let (code, volumes) = cairn(&binary("cairn"), &["volumes", "list", "--disk-agent", socket.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(!volumes.contains("-m3 "), "m3's volumes purged: {volumes}");
    up.interrupt();

    // Bad --drain: nothing starts.
    for (extra, message) in [
        (["--drain", "m1"], "2 machine(s) would be left for replicationFactor 3"),
        (["--drain", "m9"], "--drain m9: no such machine (the machines are m0, m1, m2)"),
    ] {
        let out = run(3, &extra).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(message), "{err}");
    }
    // The drained machine is left out from now on.
    let up = LocalUp::from_child(run(3, &[]).stdout(Stdio::piped()).spawn().unwrap());
    let seen = up.wait_for("cluster small: ready");
    assert!(!seen.iter().any(|l| l.contains("m3")), "{seen:?}");
    up.interrupt();
}

/// A machine's disk wiped (local mode): the cluster serves from the other replicas, says which
/// disk it refuses and the command that accepts the replacement; run as printed, the machine's
/// replicas are copied back.
#[test]
fn a_wiped_disk_is_refused_served_around_and_accepted_with_the_printed_command() {
    let m = cairn_testkit::machine::Machine::new();
    let spec = small_cluster(&m);
    let dir = m.path("state");
    let local = dir.to_str().unwrap();
    let port = free_port_block(5);
    let run = || {
        let mut command = Command::new(binary("cairn"));
        command.args(["local", "up", "-f", spec.to_str().unwrap(), "--disk-size", "64MiB", "--dir", local]);
        command.args(["--port", &port.to_string(), "--etcd-port", &(port + 3).to_string()]);
        command.stdout(Stdio::piped());
        command
    };
    let up = LocalUp::from_child(run().spawn().unwrap());
    up.wait_for("cluster small: ready");
    let client = admin_client(&dir);
    let mut blobs = Vec::new();
    for i in 0..6u8 {
        let r = client.post(format!("http://127.0.0.1:{port}/v1/blobs")).body(vec![i; 3000]).send().unwrap();
        assert_eq!(r.status(), 201);
        blobs.push((r.json::<serde_json::Value>().unwrap()["id"].as_str().unwrap().to_owned(), vec![i; 3000]));
    }
    up.interrupt();

    std::fs::remove_dir_all(dir.join("disks/m1")).unwrap();
    let up = LocalUp::from_child(run().spawn().unwrap());
    let seen = up.wait_for("cluster small: degraded");
    let line = seen.last().unwrap();
    assert!(line.contains("disk refused on m1") && line.contains("no Cairn identity"), "{line}");
    for (id, data) in &blobs {
        // The datanodes were just started: wait until m0's answers.
        let url = format!("http://127.0.0.1:{port}/v1/blobs/{id}");
        support::wait_until("served from the other replicas", Duration::from_secs(30), || {
            client.get(&url).send().is_ok_and(|r| r.status() == 200)
        });
        assert_eq!(client.get(&url).send().unwrap().bytes().unwrap().as_ref(), data.as_slice());
    }
    // The command, as printed.
    let command = line.split('`').nth(1).unwrap();
    assert!(command.starts_with("cairn-disk-agent forget --mount ") && command.contains("--state-dir"), "{command}");
    let args: Vec<&str> = command.split(' ').skip(1).collect();
    let out = Command::new(binary("cairn-disk-agent")).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    up.wait_for("cluster small: ready");
    for (id, data) in &blobs {
        let url = format!("http://127.0.0.1:{}/v1/blobs/{id}?local=true", port + 1);
        support::wait_until("m1's replica back", Duration::from_secs(30), || {
            client.get(&url).send().is_ok_and(|r| r.status() == 200)
        });
        assert_eq!(client.get(&url).send().unwrap().bytes().unwrap().as_ref(), data.as_slice());
    }
    up.interrupt();
}
