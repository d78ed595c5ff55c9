//! Loopback ports for the processes a test starts, which no one else takes in the meantime.
//!
//! Asking the kernel for port 0 and handing the number to a child process races: the port comes
//! from the ephemeral range (`net.ipv4.ip_local_port_range`, 32768–60999 by default), which the
//! kernel also hands to every outgoing connection of every process, and to the next test asking
//! for port 0, until the child binds it. So ports here come from below that range (20000–32767),
//! which the kernel never hands out on its own, and each one is reserved for the life of this
//! process by an exclusive lock on a file in `/tmp/cairn-test-ports/`, which concurrent test
//! binaries (two checkouts running their suites, nextest) respect. The lock goes with the process,
//! even on kill -9, so nothing needs cleaning up.

use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

const FIRST: u32 = 20_000;
/// One past the last port handed out: the kernel's default ephemeral range starts here (and
/// [`free_port_block`] checks that this machine's does not start lower).
const END: u32 = 32_768;

/// Where this machine's ephemeral range starts (`net.ipv4.ip_local_port_range`).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(END)
}

/// Locks held by this process, one per reserved port.
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());
static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);

/// A free loopback port, reserved for this process.
pub fn free_port() -> u16 {
    free_port_block(1, &[])
}

/// `n` consecutive free ports, each also free at every offset in `also` (`cairn local up` puts
/// its datanodes' peer ports 100 and S3 ports 200 above their blob ports); returns the first.
pub fn free_port_block(n: u16, also: &[u16]) -> u16 {
    let n = u32::from(n);
    let span = n + u32::from(also.iter().copied().max().unwrap_or(0));
    assert!(span < END - FIRST, "a block of {span} ports does not fit");
    assert!(
        ephemeral_start() >= END,
        "net.ipv4.ip_local_port_range starts below {END}: the ports handed out here could be taken by any connection"
    );
    // Processes start at different places so that they rarely contend for the same locks.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % (END - FIRST - span),
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..(END - FIRST) {
        let offset = NEXT.fetch_add(n, Ordering::SeqCst) % (END - FIRST - span);
        let base = FIRST + offset;
        let ports: Vec<u16> = (base..base + n)
            .flat_map(|p| std::iter::once(p).chain(also.iter().map(move |d| p + u32::from(*d))))
            .map(|p| u16::try_from(p).expect("below 32768"))
            .collect();
        if let Some(locks) = reserve(&ports) {
            HELD.lock().unwrap_or_else(|e| e.into_inner()).extend(locks);
            return u16::try_from(base).expect("below 32768");
        }
    }
    panic!("no block of {n} free ports between {FIRST} and {END}");
}

/// Locks every port's file and checks nothing listens there; all or nothing.
fn reserve(ports: &[u16]) -> Option<Vec<File>> {
    let dir = PathBuf::from("/tmp/cairn-test-ports");
    std::fs::create_dir_all(&dir).expect("create /tmp/cairn-test-ports");
    let mut locks = Vec::with_capacity(ports.len());
    for port in ports {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
            .expect("open a port lock file");
        // Not ours: another process holds it, or this one already does (an earlier block).
        file.try_lock().ok()?;
        if TcpListener::bind(("127.0.0.1", *port)).is_err() {
            return None;
        }
        locks.push(file);
    }
    Some(locks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_never_handed_out_twice_and_lie_below_the_ephemeral_range() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let p = free_port();
            assert!((20_000..32_768).contains(&p));
            assert!(seen.insert(p), "{p} handed out twice");
        }
        let base = free_port_block(3, &[100]);
        for p in (base..base + 3).chain(base + 100..base + 103) {
            assert!(seen.insert(p), "{p} of a block handed out twice");
        }
    }

    #[test]
    fn a_port_locked_by_another_holder_is_skipped() {
        let p = free_port();
        // The lock file of `p` is held by this process; a second open file description of it
        // (as another process would have) cannot take it.
        let other = File::open(format!("/tmp/cairn-test-ports/{p}")).unwrap();
        assert!(other.try_lock().is_err());
    }

    #[test]
    fn a_port_someone_listens_on_is_skipped() {
        // A port reservable right now, whose lock is then let go: only the listener can stop it.
        let port = (FIRST..END).rev().map(|p| p as u16).find(|p| reserve(&[*p]).is_some()).unwrap();
        let _listening = TcpListener::bind(("127.0.0.1", port)).unwrap();
        assert!(reserve(&[port]).is_none());
    }
}
