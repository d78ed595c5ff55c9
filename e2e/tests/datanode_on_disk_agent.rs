//! A datanode process that gets its volumes from a disk agent process on a real loop device.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use cairn_common::agent_client::AgentClient;
use cairn_testkit::machine::Machine;
use support::{binary, disk_with_agent, free_port, KillOnDrop};

fn start_datanode(socket: &Path, addr: &str) -> KillOnDrop {
    let flags = ["--disk-agent", socket.to_str().unwrap(), "--partitions", "2", "--volume-size", "64MiB"];
    support::standalone_datanode(addr, &[&flags[..], &["--segment-size", "16MiB", "--max-blob-size", "1MiB"]].concat())
}

#[test]
fn datanode_volumes_come_from_the_disk_agent() {
    let mut m = Machine::new();
    let (_agent, sockets) = disk_with_agent(&mut m, "n1", 256 << 20);
    let mount = m.path("n1-disk");

    let addr = format!("127.0.0.1:{}", free_port());
    let node = start_datanode(&sockets.node, &addr);
    let http = support::client();
    let put = http.post(format!("http://{addr}/v1/blobs")).body(vec![7u8; 300_000]).send().unwrap();
    assert_eq!(put.status(), 201);
    let id = put.json::<serde_json::Value>().unwrap()["id"].as_str().unwrap().to_owned();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let agent = AgentClient::new(&sockets.admin);
    let volumes = rt.block_on(agent.list_volumes()).unwrap();
    let names: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, vec!["datanode-p0", "datanode-p1"]);
    assert!(volumes.iter().all(|v| v.path.starts_with(mount.to_str().unwrap())));
    let report = rt.block_on(agent.report()).unwrap();
    assert_eq!(report.disks[0].allocated_bytes, 128 << 20);

    // A restart asks again and gets the same volumes: nothing allocated twice, the blob is there.
    drop(node);
    let _node = start_datanode(&sockets.node, &addr);
    assert_eq!(rt.block_on(agent.list_volumes()).unwrap(), volumes);
    let got = http.get(format!("http://{addr}/v1/blobs/{id}")).send().unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().unwrap().as_ref(), vec![7u8; 300_000].as_slice());
}

#[test]
fn the_agent_never_deletes_a_volume_a_running_datanode_has_open() {
    let mut m = Machine::new();
    let (_agent, sockets) = disk_with_agent(&mut m, "n1", 256 << 20);
    let socket = &sockets.admin;
    let addr = format!("127.0.0.1:{}", free_port());
    let node = start_datanode(&sockets.node, &addr);
    let http = support::client();
    let put = http.post(format!("http://{addr}/v1/blobs")).body(vec![7u8; 1000]).send().unwrap();
    assert_eq!(put.status(), 201);
    let id = put.json::<serde_json::Value>().unwrap()["id"].as_str().unwrap().to_owned();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let agent = AgentClient::new(socket);
    // The datanodes' socket never deletes, not even a datanode's own volume...
    let own = AgentClient::new(&sockets.node);
    let err = rt.block_on(own.delete_volume("datanode-p0")).unwrap_err().to_string();
    assert!(err.contains("forbidden") && err.contains("admin socket"), "{err}");
    // ...and the admin socket refuses while a datanode has the volume open...
    let err = rt.block_on(agent.delete_volume("datanode-p0")).unwrap_err().to_string();
    assert!(err.contains("volume_in_use") || err.contains("in use"), "{err}");
    assert!(err.contains(&format!("pid {}", node.0.id())), "the message names the holder: {err}");
    // ...and so does `cairn volumes purge` (which is for a cluster whose datanodes are gone).
    let out = Command::new(binary("cairn"))
        .args(["volumes", "purge", "--cluster", "datanode", "--yes", "--disk-agent", socket.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "purge of open volumes succeeded");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not deleted"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(rt.block_on(agent.list_volumes()).unwrap().len(), 2, "nothing deleted");
    let got = http.get(format!("http://{addr}/v1/blobs/{id}")).send().unwrap();
    assert_eq!(got.status(), 200, "the datanode serves on, its volumes intact");

    // Listing, a dry run, and no deletion without confirmation off a terminal.
    let cairn_volumes = |args: &[&str]| {
        let out = Command::new(binary("cairn"))
            .arg("volumes")
            .args(args)
            .args(["--disk-agent", socket.to_str().unwrap()])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, list, _) = cairn_volumes(&["list"]);
    assert!(ok && list.lines().count() == 3 && list.contains("datanode-p0") && list.contains("datanode-p1"), "{list}");
    let (ok, dry, _) = cairn_volumes(&["purge", "--cluster", "datanode", "--dry-run"]);
    assert!(ok && dry.matches("would delete").count() == 2, "{dry}");
    let (ok, _, err) = cairn_volumes(&["purge", "--cluster", "datanode"]);
    assert!(!ok && err.contains("without confirmation: add --yes"), "{err}");
    let (ok, none, _) = cairn_volumes(&["purge", "--cluster", "datanode-p0", "--yes"]);
    assert!(ok && none.contains("no volume"), "exact names only: {none}");
    assert_eq!(rt.block_on(agent.list_volumes()).unwrap().len(), 2, "nothing deleted");

    // Once the datanode is gone (even by kill -9), the lock goes with it and the delete works.
    drop(node);
    let answer = rt.block_on(agent.delete_volume("datanode-p0")).unwrap();
    assert!(answer.deleted);
    assert_eq!(rt.block_on(agent.list_volumes()).unwrap().len(), 1);
}

/// The command the operator gives a purge Pod, run as it is (with this agent's socket): only the
/// named partitions' volumes of that cluster and node go.
#[test]
fn the_purge_pod_command_deletes_exactly_the_replicas_it_names() {
    let mut m = Machine::new();
    let (_agent, sockets) = disk_with_agent(&mut m, "n1", 256 << 20);
    let socket = &sockets.admin;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let agent = AgentClient::new(socket);
    let disk = rt.block_on(agent.report()).unwrap().disks[0].id.clone();
    let names = ["c9-p1-n1", "c9-p2-n1", "c9-p3-n1", "c9-p1-n2", "c9-p1-p1-n1"];
    for name in names {
        let partition = name.split("-p").nth(1).unwrap().split('-').next().unwrap().parse().unwrap();
        let request = cairn_common::agent_api::CreateVolumeRequest {
            disk: disk.clone(),
            capacity_bytes: 16 << 20,
            segment_size_bytes: 4 << 20,
            partition,
            node: None,
        };
        rt.block_on(agent.create_volume(name, &request)).unwrap();
    }
    let command = cairn_operator::kubernetes::purge_command("c9", "n1", Some(&[1, 3]), socket.to_str().unwrap());
    assert_eq!(command[0], "cairn");
    let out = Command::new(binary("cairn")).args(&command[1..]).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut left: Vec<String> = rt.block_on(agent.list_volumes()).unwrap().into_iter().map(|v| v.name).collect();
    left.sort();
    assert_eq!(left, ["c9-p1-n2", "c9-p1-p1-n1", "c9-p2-n1"], "{}", String::from_utf8_lossy(&out.stdout));
}

/// Flags whose segments cannot hold the largest blob are refused before any volume is asked of
/// the disk agent: nothing is left allocated.
#[test]
fn a_geometry_that_cannot_work_allocates_nothing() {
    let mut m = Machine::new();
    let (_agent, sockets) = disk_with_agent(&mut m, "n1", 256 << 20);
    let out = Command::new(binary("cairn-datanode"))
        .args(["--disk-agent", sockets.node.to_str().unwrap(), "--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--volume-size", "128MiB", "--segment-size", "64MiB"]) // the default largest blob: 64 MiB
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hold blobs of at most") && err.contains("--max-blob-size"), "{err}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert!(rt.block_on(AgentClient::new(&sockets.admin).list_volumes()).unwrap().is_empty(), "nothing allocated");
}

/// The agent binds a node's volumes to the token it presented (a standalone node's is derived
/// from its root key): a node with another root key cannot open them, nor can a node without any
/// token; the first node, restarted, can.
#[test]
fn a_node_with_another_token_cannot_open_the_volumes() {
    let mut m = Machine::new();
    let (_agent, sockets) = disk_with_agent(&mut m, "n1", 256 << 20);
    let addr = format!("127.0.0.1:{}", free_port());
    let node = start_datanode(&sockets.node, &addr);
    drop(node);
    let run = |env: &[(&str, &str)], extra: &[&str]| {
        let out = Command::new(binary("cairn-datanode"))
            .args(["--disk-agent", sockets.node.to_str().unwrap(), "--listen", &addr, "--partitions", "2"])
            .args(["--volume-size", "64MiB", "--segment-size", "16MiB", "--max-blob-size", "1MiB"])
            .args(extra)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "a node with another token started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let other_key = [
        ("CAIRN_ROOT_KEY_ID", "CKOTHERROOTKEY000001"),
        ("CAIRN_ROOT_KEY_SECRET", "0123456789abcdefghijABCDEFGHIJ0123456789"),
    ];
    let err = run(&other_key, &[]);
    assert!(err.contains("forbidden") && err.contains("another token"), "{err}");
    let err = run(&[], &["--disk-agent-token", "guessed"]);
    assert!(err.contains("another token"), "{err}");
    let err = run(&[], &["--auth", "none"]);
    assert!(err.contains("--disk-agent-token"), "no token at all: {err}");
    // The node with the key the volumes were made under opens them.
    let _node = start_datanode(&sockets.node, &addr);
}

/// A datanode need not be root: the agent hands a volume's files to the uid and gid of the
/// process that asks for it on the node socket (its peer credentials) — volumes it makes, and
/// volumes made before for a datanode that ran as root (an upgrade), which keep their blobs.
#[test]
fn a_datanode_that_is_not_root_gets_its_volumes_files() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    const NOBODY: u32 = 65532;
    let mut m = Machine::new();
    let (_agent, sockets) = disk_with_agent(&mut m, "n1", 256 << 20);
    // The test's directory may be crossed by anyone (as /run and the disks' mounts are).
    std::fs::set_permissions(&m.base, std::fs::Permissions::from_mode(0o711)).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let flags = ["--disk-agent", sockets.node.to_str().unwrap(), "--partitions", "2", "--volume-size", "64MiB"];
    let flags = [&flags[..], &["--segment-size", "16MiB", "--max-blob-size", "1MiB"]].concat();
    let http = support::client();
    let put = |data: &[u8]| -> String {
        let r = http.post(format!("http://{addr}/v1/blobs")).body(data.to_vec()).send().unwrap();
        assert_eq!(r.status(), 201);
        r.json::<serde_json::Value>().unwrap()["id"].as_str().unwrap().to_owned()
    };
    let get = |id: &str| http.get(format!("http://{addr}/v1/blobs/{id}")).send().unwrap().bytes().unwrap().to_vec();

    // First as root: the volumes are root's.
    let root = support::standalone_datanode(&addr, &flags);
    let before = put(b"written while the datanode was root");
    drop(root);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let volumes = rt.block_on(AgentClient::new(&sockets.admin).list_volumes()).unwrap();
    assert!(volumes.iter().all(|v| std::fs::metadata(&v.path).unwrap().uid() == 0));

    // Then as an unprivileged user: handed over, every file; old blobs read, new ones written.
    let node = support::standalone_datanode_as(Some(NOBODY), &addr, &flags);
    assert_eq!(get(&before), b"written while the datanode was root");
    let after = put(b"written as 65532");
    for v in &volumes {
        for path in walk(std::path::Path::new(&v.path)) {
            let meta = std::fs::symlink_metadata(&path).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY), "{}", path.display());
        }
    }
    // kill -9 and again: still its own.
    drop(node);
    let _node = support::standalone_datanode_as(Some(NOBODY), &addr, &flags);
    assert_eq!(get(&after), b"written as 65532");
    assert_eq!(get(&before), b"written while the datanode was root");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_owned()];
    if dir.is_dir() {
        for entry in std::fs::read_dir(dir).unwrap() {
            out.extend(walk(&entry.unwrap().path()));
        }
    }
    out
}
