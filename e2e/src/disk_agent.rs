//! `cairn-bench disk-agent`: a full scan of a large mountinfo, and CreateVolume against a raw
//! fallocate on the same filesystem (a loop device made for the run; needs root).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use cairn_common::agent_api::CreateVolumeRequest;
use cairn_disk_agent::config::AgentConfig;
use cairn_disk_agent::{Agent, AgentOptions};
use cairn_testkit::machine::Machine;

use crate::reference;
use crate::Scenario;

#[derive(clap::Args)]
pub struct Options {
    /// One JSON object per scenario instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Lines of the generated mountinfo.
    #[arg(long, default_value_t = 10_000)]
    lines: usize,
    /// Scans timed (the median is reported).
    #[arg(long, default_value_t = 30)]
    rounds: usize,
}

pub fn run(options: Options) -> anyhow::Result<Vec<Scenario>> {
    let mut results = Vec::new();
    let machine = Machine::new();

    // A node with many pods: the root filesystem, thousands of kubelet bind mounts of it,
    // secrets on tmpfs, container root filesystems on overlay.
    let mountinfo = machine.path("mountinfo");
    std::fs::write(&mountinfo, node_mountinfo(options.lines)?)?;
    let agent = Agent::new(AgentOptions {
        node_name: "bench".into(),
        mountinfo: mountinfo.clone(),
        host_dev: "/dev".into(),
        config: AgentConfig::default(),
        state_dir: None,
    })?;
    let mut scans = Vec::new();
    let mut raw = Vec::new();
    let mut report = None;
    for _ in 0..options.rounds {
        let started = Instant::now();
        report = Some(agent.scan()?);
        scans.push(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        let text = std::fs::read_to_string(&mountinfo)?;
        std::hint::black_box(text.lines().map(|l| l.split(' ').count()).sum::<usize>());
        raw.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let report = report.expect("at least one round");
    let (scan_p50, _) = reference::percentiles(&mut scans);
    let (raw_p50, _) = reference::percentiles(&mut raw);
    let mut scan = Scenario::new("scan_10k", scan_p50, "ms").against(
        raw_p50,
        "ms",
        format!(
            "read + split of the same {}-line file (target < 20 ms); {} disk(s), {} excluded",
            options.lines,
            report.disks.len(),
            report.excluded.len()
        ),
    );
    scan.p99 = None;
    results.push(scan);

    results.push(create_volume(machine)?);
    Ok(results)
}

fn create_volume(mut machine: Machine) -> anyhow::Result<Scenario> {
    const GIB: u64 = 1 << 30;
    let dev = machine.loop_fs("bench", 8 * GIB, "mkfs.ext4", &["-q", "-m", "0"]);
    let mount = machine.mount(&dev, "disk", &[]);
    let agent = Agent::new(AgentOptions {
        node_name: "bench".into(),
        mountinfo: "/proc/self/mountinfo".into(),
        host_dev: "/dev".into(),
        config: AgentConfig::load(&machine.agent_config("headroom: 0%\n"))?,
        state_dir: Some(machine.path("state")),
    })?;
    let (report, _) = agent.refresh()?;
    let disk = report.disks.first().ok_or_else(|| anyhow::anyhow!("the bench disk was not found"))?.id.clone();

    // Raw: one 1 GiB file, fallocate + fsync, on the same filesystem.
    let raw_path = mount.join("raw");
    let started = Instant::now();
    let file = std::fs::File::create(&raw_path)?;
    rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, GIB)?;
    file.sync_all()?;
    let raw_ms = started.elapsed().as_secs_f64() * 1e3;
    drop(file);
    std::fs::remove_file(&raw_path)?;

    let request =
        CreateVolumeRequest { disk, capacity_bytes: GIB, segment_size_bytes: 64 << 20, partition: 0, node: None };
    let started = Instant::now();
    let created = agent.create_volume("bench", &request, None, None)?;
    let create_ms = started.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(created.created, "the volume existed already");
    let allocated = allocated_bytes(Path::new(&created.volume.path));
    Ok(Scenario::new("create_volume_1g", create_ms, "ms").against(
        raw_ms,
        "ms",
        format!(
            "raw fallocate+fsync of one 1 GiB file on the same ext4; the volume is 16 × 64 MiB segments, \
             {} MiB allocated, includes a rescan before and after",
            allocated >> 20
        ),
    ))
}

fn allocated_bytes(dir: &Path) -> u64 {
    cairn_disk_agent::volumes::allocated_bytes(dir)
}

/// A mountinfo like a busy Kubernetes node's: the real root filesystem first (so that the scan
/// really calls statvfs), then bind mounts of it, tmpfs and overlay mounts.
fn node_mountinfo(lines: usize) -> anyhow::Result<String> {
    let own = std::fs::read_to_string("/proc/self/mountinfo")?;
    let root = own
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .ok_or_else(|| anyhow::anyhow!("no root mount in /proc/self/mountinfo"))?;
    let dev = root.split(' ').nth(2).unwrap_or("8:1").to_owned();
    let mut text = String::with_capacity(lines * 160);
    writeln!(text, "{root}")?;
    writeln!(text, "2 1 0:5 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw")?;
    writeln!(text, "3 1 0:6 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw")?;
    for i in 4..lines as u64 {
        let pod = format!("{:08x}-{:04x}-4000-8000-{:012x}", i * 7919, i % 65_536, i * 104_729);
        let line = match i % 4 {
            0 | 1 => format!(
                "{i} 1 {dev} /var/lib/kubelet/pods/{pod}/volumes/kubernetes.io~empty-dir/cache \
                 /var/lib/kubelet/pods/{pod}/volumes/kubernetes.io~empty-dir/cache rw,relatime shared:1 - ext4 \
                 /dev/root rw"
            ),
            2 => format!(
                "{i} 1 0:{} / /var/lib/kubelet/pods/{pod}/volumes/kubernetes.io~projected/kube-api\\040access \
                 rw,relatime shared:{i} - tmpfs tmpfs rw,size=65536k",
                100 + i
            ),
            _ => format!(
                "{i} 1 0:{} / /run/containerd/io.containerd.runtime.v2.task/k8s.io/{pod}/rootfs rw,relatime - overlay \
                 overlay rw,lowerdir=/var/lib/containerd/snapshots/{i}/fs,upperdir=/var/lib/containerd/u/{i}",
                100 + i
            ),
        };
        writeln!(text, "{line}")?;
    }
    Ok(text)
}
