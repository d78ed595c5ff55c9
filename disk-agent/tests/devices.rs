//! The disk agent on real loop devices with ext4, xfs and tmpfs (tests run as root).

mod support;

use std::path::Path;

use cairn_common::agent_api::{CreateVolumeRequest, DiskReport, NodeReport};
use cairn_common::agent_client::AgentClientError;
use support::{du, scan, statvfs, AgentProcess, Machine};

const MIB: u64 = 1 << 20;

fn disk_at<'a>(report: &'a NodeReport, mount: &Path) -> &'a DiskReport {
    let mount = mount.to_str().unwrap();
    report
        .disks
        .iter()
        .find(|d| d.canonical_mount == mount)
        .unwrap_or_else(|| panic!("no disk at {mount}: {report:#?}"))
}

fn request(disk: &str, capacity: u64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        disk: disk.into(),
        capacity_bytes: capacity,
        segment_size_bytes: 16 * MIB,
        partition: 3,
        node: None,
    }
}

fn refused_status(e: AgentClientError) -> (u16, String) {
    match e {
        AgentClientError::Refused { status, code, .. } => (status, code),
        other => panic!("expected a refusal, got {other}"),
    }
}

#[test]
fn every_filesystem_counted_once_with_aliases_and_reasons() {
    let mut m = Machine::new();
    let ext4 = m.loop_fs("ext4", 256 * MIB, "mkfs.ext4", &["-q", "-m", "5"]);
    let xfs = m.loop_fs("xfs", 320 * MIB, "mkfs.xfs", &["-q"]);
    let a = m.mount(&ext4, "a", &[]);
    let a_again = m.mount(&ext4, "a-again", &[]); // the same device mounted twice
    std::fs::create_dir_all(a.join("sub")).unwrap();
    let bind = m.bind(&a.join("sub"), "bind"); // a bind mount of a subdirectory
    let x = m.mount(&xfs, "x", &[]);
    let t = m.mount("tmpfs", "t", &["-t", "tmpfs", "-o", "size=64m"]);

    let report = scan(&m, &m.agent_config(""));
    assert_eq!(report.disks.len(), 2, "{report:#?}");
    let d = disk_at(&report, &a);
    let mut aliases: Vec<&str> = d.aliases.iter().map(|a| a.mount.as_str()).collect();
    aliases.sort();
    assert_eq!(aliases, vec![a_again.to_str().unwrap(), bind.to_str().unwrap()]);
    assert_eq!(d.aliases.iter().find(|al| al.mount == bind.to_str().unwrap()).unwrap().root, "/sub");
    assert_eq!(d.fs_type, "ext4");
    assert_eq!(d.device, ext4);
    assert!(d.fs_uuid.is_some(), "UUID read from the superblock");

    // Totals are the deduplicated truth from statvfs, per device.
    let truth_a = statvfs(&a);
    let truth_x = statvfs(&x);
    assert_eq!(d.total_bytes, truth_a.total);
    assert_eq!(d.available_bytes, truth_a.available);
    assert_eq!(d.fs_reserved_bytes, truth_a.free - truth_a.available);
    // mkfs.ext4 -m 5 reserved 5% of the blocks for root (ext4 also keeps a few for itself).
    let superblock = support::sh("tune2fs", &["-l", &ext4]);
    let field = |name: &str| -> u64 {
        let line = superblock.lines().find(|l| l.starts_with(name)).unwrap();
        line.split(':').nth(1).unwrap().trim().parse().unwrap()
    };
    let root_reserved = field("Reserved block count") * field("Block size");
    assert!(d.fs_reserved_bytes >= root_reserved, "{} < {root_reserved}", d.fs_reserved_bytes);
    assert!(root_reserved as f64 >= 0.049 * d.total_bytes as f64);
    let dx = disk_at(&report, &x);
    assert_eq!((dx.fs_type.as_str(), dx.total_bytes, dx.available_bytes), ("xfs", truth_x.total, truth_x.available));
    let sum: u64 = report.disks.iter().map(|d| d.total_bytes).sum();
    assert_eq!(sum, truth_a.total + truth_x.total, "no filesystem counted twice");
    // Headroom 5% by default; allocatable = available − headroom.
    assert_eq!(d.headroom_bytes, (d.total_bytes as f64 * 0.05).ceil() as u64);
    assert_eq!(d.allocatable_bytes, d.available_bytes - d.headroom_bytes);

    // tmpfs is reported with its reason, unless allowed.
    let reason = report.excluded.iter().find(|e| e.mount == t.to_str().unwrap()).expect("tmpfs reported");
    assert!(reason.reason.contains("allow_tmpfs"), "{}", reason.reason);
    let report = scan(&m, &m.agent_config("  allow_tmpfs: true\n"));
    assert_eq!(disk_at(&report, &t).fs_type, "tmpfs");
    assert!(report.excluded.iter().all(|e| e.mount != t.to_str().unwrap()));

    // A selector that leaves out xfs says so for the mount.
    let report = scan(&m, &m.agent_config_for(&["ext4"], ""));
    let excluded = report.excluded.iter().find(|e| e.mount == x.to_str().unwrap()).expect("xfs reported");
    assert!(excluded.reason.contains("fs_types"), "{}", excluded.reason);
    // The table says the same under the words `cairn status` uses; pseudo filesystems only with --all.
    let table = support::scan_table(&m, &m.agent_config(""), false);
    let header = table.lines().next().unwrap();
    let columns = ["DISK", "FS", "MOUNT", "TOTAL", "AVAILABLE", "FS-RESERVED", "ALLOCATED", "ALLOCATABLE", "VOLUMES"];
    assert_eq!(header.split_whitespace().take(9).collect::<Vec<_>>(), columns, "{table}");
    let row = table.lines().find(|l| l.starts_with(&d.id)).unwrap_or_else(|| panic!("{table}"));
    let size = cairn_common::text::bytes;
    let cells = [size(d.total_bytes), size(d.available_bytes), size(d.fs_reserved_bytes), size(d.allocatable_bytes)];
    for cell in &cells {
        assert!(row.contains(cell.as_str()), "{cell} in {row}");
    }
    assert!(!table.contains(" /proc "), "{table}");
    assert!(table.contains("pseudo filesystem(s) not listed; --all lists them"), "{table}");
    assert!(support::scan_table(&m, &m.agent_config(""), true).contains(" /proc "));
    // The host's /dev is read where --host-dev says (the chart: /host/dev), not the process's own.
    let elsewhere = m.path("no-dev");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn-disk-agent"))
        .args(["scan", "-o", "json", "--mountinfo", "/proc/self/mountinfo", "--config"])
        .arg(m.agent_config(""))
        .arg("--state-dir")
        .arg(m.path("state-2"))
        .arg("--host-dev")
        .arg(&elsewhere)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let blind: NodeReport = serde_json::from_slice(&out.stdout).unwrap();
    assert!(disk_at(&blind, &a).fs_uuid.is_none(), "no UUID without the host's /dev");
    // scan changed nothing on the disks.
    assert!(!a.join("cairn").exists());
}

#[test]
fn create_volume_preallocates_and_is_idempotent_across_restarts() {
    let mut m = Machine::new();
    let ext4 = m.loop_fs("ext4", 512 * MIB, "mkfs.ext4", &["-q", "-m", "0"]);
    let a = m.mount(&ext4, "a", &[]);
    let mut agent = AgentProcess::start(&m, &m.agent_config("headroom: 0%\n"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = agent.client();
    let report = rt.block_on(client.report()).unwrap();
    let disk = disk_at(&report, &a).clone();
    assert!(a.join("cairn/identity.json").exists(), "serving claims the disk");
    let before = statvfs(&a);

    let created = rt.block_on(client.create_volume("v1", &request(&disk.id, 64 * MIB))).unwrap();
    assert!(created.created);
    let dir = Path::new(&created.volume.path);
    assert!(du(dir) >= 64 * MIB, "every segment preallocated: {} bytes", du(dir));
    assert!(du(dir) < 64 * MIB + 8 * MIB);
    let after = statvfs(&a);
    assert!(before.available - after.available >= 64 * MIB);
    let marker = cairn_common::volume_layout::VolumeMarker::read(dir).unwrap();
    assert!(marker.preallocated);
    assert_eq!((marker.partition, marker.segment_size, marker.capacity_bytes), (3, 16 * MIB, 64 * MIB));

    // A retry allocates nothing more; a different request under the same name is refused.
    let again = rt.block_on(client.create_volume("v1", &request(&disk.id, 64 * MIB))).unwrap();
    assert!(!again.created);
    assert_eq!(again.volume, created.volume);
    assert_eq!(statvfs(&a).available, after.available);
    let (status, code) =
        refused_status(rt.block_on(client.create_volume("v1", &request(&disk.id, 32 * MIB))).unwrap_err());
    assert_eq!((status, code.as_str()), (409, "volume_exists"));

    // Bad input: clear errors, nothing allocated.
    let bad = [
        ("Bad_Name", request(&disk.id, 64 * MIB), 400),
        ("v2", request(&disk.id, 20 * MIB), 400),
        ("v2", request("no-such-disk", 64 * MIB), 404),
        ("v2", request(&disk.id, 10 << 30), 507),
    ];
    for (name, req, expected) in bad {
        let (status, _) = refused_status(rt.block_on(client.create_volume(name, &req)).unwrap_err());
        assert_eq!(status, expected, "{name} {req:?}");
    }
    assert_eq!(statvfs(&a).available, after.available, "refused creates allocated nothing");
    assert!(!a.join("cairn/volumes/v2").exists());

    // The report accounts for the volume.
    let report = rt.block_on(client.report()).unwrap();
    let d = disk_at(&report, &a);
    assert_eq!(d.allocated_bytes, 64 * MIB);
    assert_eq!(d.volumes.len(), 1);
    assert_eq!(d.allocatable_bytes, d.available_bytes, "headroom 0, nothing pending");

    // kill -9 and restart: the volume is still there, a retry is still a no-op.
    agent.kill9();
    agent.restart();
    let client = agent.client();
    assert_eq!(rt.block_on(client.list_volumes()).unwrap(), vec![created.volume.clone()]);
    assert!(!rt.block_on(client.create_volume("v1", &request(&disk.id, 64 * MIB))).unwrap().created);
    assert_eq!(statvfs(&a).available, after.available);

    // Concurrent creates: each allocates once, the same name only once.
    let socket = agent.admin_socket.clone();
    let results = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..6 {
            let socket = socket.clone();
            let disk = disk.id.clone();
            tasks.push(tokio::spawn(async move {
                let client = cairn_common::agent_client::AgentClient::new(&socket);
                client.create_volume(&format!("c{}", i % 3), &request(&disk, 32 * MIB)).await
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap().unwrap());
        }
        out
    });
    assert_eq!(results.iter().filter(|r| r.created).count(), 3);
    let volumes = rt.block_on(client.list_volumes()).unwrap();
    assert_eq!(volumes.len(), 4);
    assert!(after.available - statvfs(&a).available >= 3 * 32 * MIB);

    // Metrics per disk, and JSON errors for unknown routes and methods.
    let metrics = raw_request(&agent.admin_socket, "GET /metrics");
    let line = format!("cairn_disk_allocated_bytes{{disk=\"{}\",mount=\"{}\"}} {}", disk.id, a.display(), 160 * MIB);
    assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    assert!(raw_request(&agent.admin_socket, "GET /v2/nothing").contains("route_not_found"));
    assert!(raw_request(&agent.admin_socket, "POST /v1/report").contains("method_not_allowed"));

    // Delete: space back, idempotent.
    let before_delete = statvfs(&a).available;
    assert!(rt.block_on(client.delete_volume("v1")).unwrap().deleted);
    assert!(!rt.block_on(client.delete_volume("v1")).unwrap().deleted);
    assert!(statvfs(&a).available - before_delete >= 64 * MIB);
    assert!(!dir.exists());

    // A create interrupted before its marker is cleared on the next scan, and can be retried.
    let leftover = a.join("cairn/volumes/v9");
    std::fs::create_dir_all(leftover.join("segments")).unwrap();
    std::fs::write(leftover.join("segments/00000001.seg"), vec![1u8; 1 << 20]).unwrap();
    let v9 = rt.block_on(client.create_volume("v9", &request(&disk.id, 16 * MIB))).unwrap();
    assert!(v9.created);
    cairn_common::volume_layout::VolumeMarker::read(&leftover).unwrap();
}

/// One HTTP/1.0 request on the socket: the whole answer, headers and body.
fn raw_request(socket: &Path, request_line: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    write!(stream, "{request_line} HTTP/1.0\r\nHost: agent\r\nContent-Length: 0\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn filesystem_without_fallocate_is_refused_or_zero_filled_when_configured() {
    let mut m = Machine::new();
    // The ext4 driver cannot fallocate on an ext2 filesystem (no extents).
    let ext2 = m.loop_fs("ext2", 64 * MIB, "mkfs.ext2", &["-q", "-m", "0"]);
    let a = m.mount(&ext2, "a", &[]);
    let config = |m: &Machine, extra: &str| m.agent_config_for(&["ext2"], &format!("headroom: 0%\n{extra}"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut agent = AgentProcess::start(&m, &config(&m, ""));
    let disk = disk_at(&rt.block_on(agent.client().report()).unwrap(), &a).id.clone();
    let before = statvfs(&a).available;
    let (status, code) =
        refused_status(rt.block_on(agent.client().create_volume("v", &request(&disk, 32 * MIB))).unwrap_err());
    assert_eq!((status, code.as_str()), (422, "fallocate_unsupported"));
    assert!(!a.join("cairn/volumes/v").exists());
    assert_eq!(statvfs(&a).available, before);

    agent.kill9();
    drop(agent);
    let agent = AgentProcess::start(&m, &config(&m, "zero_fill_fallback: true\n"));
    let created = rt.block_on(agent.client().create_volume("v", &request(&disk, 32 * MIB))).unwrap();
    assert!(created.created);
    assert!(du(Path::new(&created.volume.path)) >= 32 * MIB, "zeros written instead");
}

#[test]
fn full_disk_gives_insufficient_capacity_and_allocates_nothing() {
    let mut m = Machine::new();
    let ext4 = m.loop_fs("ext4", 128 * MIB, "mkfs.ext4", &["-q", "-m", "5"]);
    let a = m.mount(&ext4, "a", &[]);
    let agent = AgentProcess::start(&m, &m.agent_config("headroom: 4MiB\n"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = agent.client();
    let disk = disk_at(&rt.block_on(client.report()).unwrap(), &a).id.clone();

    // Someone else fills the disk.
    let filler = a.join("someone-elses-file");
    let file = std::fs::File::create(&filler).unwrap();
    let mut len = statvfs(&a).available;
    while rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, len).is_err() {
        len -= MIB;
    }
    drop(file);
    let before = statvfs(&a);
    let (status, code) = refused_status(rt.block_on(client.create_volume("v", &request(&disk, 16 * MIB))).unwrap_err());
    assert_eq!((status, code.as_str()), (507, "insufficient_capacity"));
    assert_eq!(statvfs(&a).available, before.available);
    assert!(!a.join("cairn/volumes/v").exists());

    let report = rt.block_on(client.report()).unwrap();
    let d = disk_at(&report, &a);
    assert_eq!(d.allocatable_bytes, 0);
    assert!(d.used_by_others_bytes >= len, "the filler is someone else's");
    assert!(d.fs_reserved_bytes > 0, "root's 5% is still there and not promised");
}

#[test]
fn a_different_disk_at_a_recorded_mount_or_a_cloned_identity_is_refused() {
    let mut m = Machine::new();
    let first = m.loop_fs("first", 64 * MIB, "mkfs.ext4", &["-q"]);
    let second = m.loop_fs("second", 64 * MIB, "mkfs.ext4", &["-q"]);
    let a = m.mount(&first, "a", &[]);
    let config = m.agent_config("headroom: 0%\n");
    let mut agent = AgentProcess::start(&m, &config);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let first_id = disk_at(&rt.block_on(agent.client().report()).unwrap(), &a).id.clone();
    agent.kill9();

    // Another disk mounted where the first one was.
    m.unmount(&a);
    let a = m.mount(&second, "a", &[]);
    let report = scan(&m, &config);
    let d = disk_at(&report, &a);
    assert!(!d.usable);
    assert!(d.conflict.as_deref().unwrap().contains("wrong disk"), "{:?}", d.conflict);
    assert_eq!(d.allocatable_bytes, 0);
    agent.restart();
    let (status, code) = refused_status(
        rt.block_on(agent.client().create_volume("v", &request(&disk_at(&report, &a).id, 16 * MIB))).unwrap_err(),
    );
    assert_eq!((status, code.as_str()), (409, "disk_conflict"));
    assert!(!a.join("cairn").exists(), "the wrong disk is not claimed");
    agent.kill9();
    m.unmount(&a);
    // Nothing at the recorded mount: the first disk is reported missing.
    let report = scan(&m, &config);
    assert_eq!(report.missing.len(), 1);
    assert_eq!(
        (report.missing[0].id.as_str(), report.missing[0].mount.as_str()),
        (first_id.as_str(), a.to_str().unwrap())
    );

    // A copy of the first disk with a new filesystem UUID: its identity file is a stranger's.
    let a = m.mount(&first, "a", &[]);
    m.unmount(&a);
    let image = m.path("first.img");
    let copy = m.path("copy.img");
    std::fs::copy(&image, &copy).unwrap();
    let copy_dev = m.loop_image(&copy);
    support::sh("e2fsck", &["-f", "-p", &copy_dev]); // tune2fs -U wants a freshly checked filesystem
    support::sh("tune2fs", &["-U", "random", &copy_dev]);
    let c = m.mount(&copy_dev, "c", &[]);
    let report = scan(&m, &config);
    let d = disk_at(&report, &c);
    assert!(d.conflict.as_deref().unwrap().contains("cloned"), "{:?}", d.conflict);

    // Forgetting the record lets an operator accept a replaced disk at a path.
    let a = m.mount(&second, "a", &[]);
    support::sh(
        env!("CARGO_BIN_EXE_cairn-disk-agent"),
        &["forget", "--state-dir", m.path("state").to_str().unwrap(), "--mount", a.to_str().unwrap()],
    );
    let report = scan(&m, &config);
    assert!(disk_at(&report, &a).usable);
}

#[test]
fn directories_with_a_quota_are_disks_of_their_own() {
    let m = Machine::new();
    let config = m.path("dirs.yaml");
    let (a, b) = (m.path("dir-a"), m.path("dir-b"));
    std::fs::write(
        &config,
        format!(
            "selector:\n  fs_types: []\nheadroom: 0%\ndirectories:\n  - {{path: {}, capacity: 64MiB}}\n  - {{path: {}, capacity: 64MiB}}\n",
            a.display(),
            b.display()
        ),
    )
    .unwrap();
    let mut agent = AgentProcess::start(&m, &config);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(agent.client().report()).unwrap();
    assert_eq!(report.disks.len(), 2, "only the directories: {report:#?}");
    let (da, db) = (disk_at(&report, &a).clone(), disk_at(&report, &b).clone());
    assert_ne!(da.id, db.id, "one filesystem, two disks with their own identity");
    assert_eq!((da.total_bytes, da.allocatable_bytes), (64 * MIB, 64 * MIB));

    let created = rt.block_on(agent.client().create_volume("v", &request(&da.id, 48 * MIB))).unwrap();
    assert!(du(std::path::Path::new(&created.volume.path)) >= 48 * MIB);
    let report = rt.block_on(agent.client().report()).unwrap();
    assert_eq!(disk_at(&report, &a).allocatable_bytes, 16 * MIB, "the quota, less what is promised");
    let (status, _) =
        refused_status(rt.block_on(agent.client().create_volume("w", &request(&da.id, 32 * MIB))).unwrap_err());
    assert_eq!(status, 507);

    agent.kill9();
    agent.restart();
    let again = rt.block_on(agent.client().report()).unwrap();
    assert_eq!(disk_at(&again, &a).id, da.id, "identity kept across restarts");
    assert!(again.missing.is_empty(), "recorded directories are present, not missing: {:?}", again.missing);
}

/// The node socket (mounted into datanode Pods) lets a datanode see and make only its own
/// cluster's volumes, bound to its cluster's token, and never delete; the admin socket (0600)
/// does everything. Owners and bindings survive a kill -9 of the agent.
#[test]
fn a_datanode_reaches_only_its_own_clusters_volumes_and_deletes_none() {
    use std::os::unix::fs::PermissionsExt;
    let mut m = Machine::new();
    let ext4 = m.loop_fs("ext4", 512 * MIB, "mkfs.ext4", &["-q", "-m", "0"]);
    let a = m.mount(&ext4, "a", &[]);
    let mut agent = AgentProcess::start(&m, &m.agent_config("headroom: 0%\n"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let admin = agent.client();
    let disk = disk_at(&rt.block_on(admin.report()).unwrap(), &a).id.clone();
    let replica = |partition: u32, node: Option<&str>| CreateVolumeRequest {
        partition,
        node: node.map(str::to_owned),
        ..request(&disk, 16 * MIB)
    };
    let refused = |r: Result<_, AgentClientError>| {
        refused_status(r.map(|_: cairn_common::agent_api::CreateVolumeResponse| ()).unwrap_err())
    };
    let (alpha, beta) = (agent.node_client("alpha", "token-a"), agent.node_client("beta", "token-b"));
    let forged = agent.node_client("alpha", "not-alphas-token");
    let anonymous = cairn_common::agent_client::AgentClient::new(&agent.socket);

    // No credential: nothing made, nothing listed (the disks' figures are still reported).
    let (status, code) = refused(rt.block_on(anonymous.create_volume("alpha-p0-n1", &replica(0, Some("n1")))));
    assert_eq!((status, code.as_str()), (401, "unauthenticated"));
    assert!(rt.block_on(alpha.create_volume("alpha-p0-n1", &replica(0, Some("n1")))).unwrap().created);
    assert!(rt.block_on(anonymous.list_volumes()).unwrap().is_empty());
    let seen = rt.block_on(anonymous.report()).unwrap();
    assert!(disk_at(&seen, &a).volumes.is_empty() && disk_at(&seen, &a).allocated_bytes == 16 * MIB);

    // Another cluster's volume, a name that is not the caller's, another token under its name.
    for (client, name, req, why) in [
        (&beta, "alpha-p0-n1", replica(0, Some("n1")), "beta asks for alpha's name"),
        (&beta, "beta-p0-n2", replica(0, Some("n1")), "a name of another node"),
        (&beta, "beta-p1", replica(0, None), "a name of another partition"),
        (&forged, "alpha-p0-n1", replica(0, Some("n1")), "alpha's volume, another token"),
        (&forged, "alpha-p1-n1", replica(1, Some("n1")), "a new alpha volume, another token"),
    ] {
        let (status, code) = refused(rt.block_on(client.create_volume(name, &req)));
        assert_eq!((status, code.as_str()), (403, "forbidden"), "{why}");
    }
    assert!(rt.block_on(beta.create_volume("beta-p0", &replica(0, None))).unwrap().created);
    let names = |client: &cairn_common::agent_client::AgentClient| -> Vec<String> {
        rt.block_on(client.list_volumes()).unwrap().into_iter().map(|v| v.name).collect()
    };
    assert_eq!(names(&alpha), ["alpha-p0-n1"]);
    assert_eq!(names(&beta), ["beta-p0"]);
    assert!(names(&forged).is_empty());
    assert_eq!(disk_at(&rt.block_on(beta.report()).unwrap(), &a).volumes.len(), 1);

    // Deleting is the admin socket's alone, even a cluster's own volume.
    for client in [&alpha, &anonymous] {
        let (status, code) = refused_status(rt.block_on(client.delete_volume("alpha-p0-n1")).unwrap_err());
        assert_eq!((status, code.as_str()), (403, "forbidden"));
    }
    assert_eq!(names(&admin).len(), 2, "nothing deleted");

    // The sockets' modes: anyone may connect to the node socket, only root to the admin socket.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode(&agent.socket), mode(&agent.admin_socket)), (0o666, 0o600));
    std::fs::set_permissions(&m.base, std::fs::Permissions::from_mode(0o711)).unwrap();
    let as_nobody = |socket: &Path| {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket"])
            .arg(socket)
            .arg("http://agent/v1/volumes")
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let node = as_nobody(&agent.socket);
    assert_eq!(String::from_utf8_lossy(&node.stdout), "200", "a datanode need not be root");
    let admin_try = as_nobody(&agent.admin_socket);
    assert!(!admin_try.status.success(), "nobody connected to the admin socket");

    // kill -9: owners and the binding are kept.
    agent.kill9();
    agent.restart();
    assert!(!rt.block_on(alpha.create_volume("alpha-p0-n1", &replica(0, Some("n1")))).unwrap().created);
    assert_eq!(refused(rt.block_on(forged.create_volume("alpha-p1-n1", &replica(1, Some("n1"))))).0, 403);

    // A volume made before owners were recorded (here: by the admin) is adopted by its first
    // opener, and is then bound to that opener's token.
    rt.block_on(admin.create_volume("gamma-p0", &replica(0, None))).unwrap();
    assert!(
        !rt.block_on(agent.node_client("gamma", "g1").create_volume("gamma-p0", &replica(0, None))).unwrap().created
    );
    assert_eq!(
        refused(rt.block_on(agent.node_client("gamma", "g2").create_volume("gamma-p0", &replica(0, None)))).0,
        403
    );

    // The admin deletes; once alpha owns nothing here, its name may be bound to a new token
    // (a cluster deleted and made again).
    assert!(rt.block_on(admin.delete_volume("alpha-p0-n1")).unwrap().deleted);
    assert!(rt.block_on(forged.create_volume("alpha-p1-n1", &replica(1, Some("n1")))).unwrap().created);
    assert!(names(&alpha).is_empty());
}
