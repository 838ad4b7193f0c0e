//! VMIDs as a cache (issue 14, part 2): on `cortex-a72` (8-bit VMIDs, 255 usable), 4,000
//! snapshots and 300 running forks at once. Snapshots never run, so they hold no VMID; the 301
//! running VMs share 255 numbers through generation rollovers, and every one of them must keep
//! making progress (a heartbeat printed after rollovers were seen, by each VM).
//!
//! Commands and numbers go over the control channel (`docs/API.md`): with 300
//! VMs printing, typed characters and guest lines interleave on the console,
//! so only the guests' heartbeats are read there.

use qemu_tests::api::{socket_path, ApiClient};
use qemu_tests::{Machine, MachineConfig};
use serde_json::json;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const SNAPSHOTS: u32 = 4000;
const FORKS: u32 = 300;
/// The idle guest's heartbeat period.
const BEAT_MS: u32 = 3000;

/// VM ids that printed an idle heartbeat in `text`.
fn beating(text: &str) -> BTreeSet<u32> {
    text.lines()
        .filter(|l| l.contains("GUEST: idle: heartbeat"))
        .filter_map(|l| l.strip_prefix("[vm")?.split(']').next()?.parse().ok())
        .collect()
}

/// A `stats` field.
fn stat(c: &mut ApiClient, key: &str) -> u64 {
    let s = c.stats(T).expect("stats over the api");
    s[key].as_u64().unwrap_or_else(|| panic!("no {key} in {s}"))
}

const T: Duration = Duration::from_secs(300);

#[test]
fn four_thousand_snapshots_and_three_hundred_running_forks_on_8bit_vmids() {
    let start = Instant::now();
    let sock = socket_path("vmid");
    let cfg = MachineConfig {
        smp: 4,
        cpu: "cortex-a72".into(),
        vcpus: Some(1),
        guest_args: Some(format!("idle beat_ms={BEAT_MS}")),
        api: Some(sock.clone()),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("vmid", &cfg);
    m.expect("255 VMIDs", T);
    // Alone, its console lines carry no "[vmN]" prefix yet.
    m.expect("GUEST: idle: heartbeat 1 ", T);
    let mut c = ApiClient::connect(&sock, T).expect("connect to the api socket");
    assert_eq!(stat(&mut c, "vmid_max"), 255, "8-bit VMIDs");
    for i in 1..=SNAPSHOTS / 1000 {
        let r = c
            .call("snapshot", json!({"vm": 1, "count": 1000}), T)
            .unwrap();
        assert_eq!(r["snapshots"].as_array().map(Vec::len), Some(1000), "{r}");
        assert_eq!(r["snapshots"][999], 1 + i * 1000);
        eprintln!("vmid: {} snapshots at {:?}", i * 1000, start.elapsed());
    }
    let snapped = start.elapsed();
    let r = c.call("fork", json!({"vm": 1, "count": FORKS}), T).unwrap();
    let last = 1 + SNAPSHOTS + FORKS;
    assert_eq!(r["children"][FORKS as usize - 1], last, "{}", r["children"]);
    let forked = start.elapsed();
    // Wait until the running VMs have rolled the VMIDs over, then until every one of them has
    // beaten since: none was starved or lost its stage 2 by being renumbered.
    let deadline = Instant::now() + T;
    let first = loop {
        let r = stat(&mut c, "vmid_rollovers");
        if r > 0 {
            break r;
        }
        assert!(Instant::now() < deadline, "no rollover\n{}", m.transcript());
        std::thread::sleep(Duration::from_secs(2));
    };
    let after = m.transcript().len();
    let running: BTreeSet<u32> = std::iter::once(1).chain(1 + SNAPSHOTS + 1..=last).collect();
    loop {
        let text = m.transcript();
        let missing: Vec<u32> = running
            .difference(&beating(&text[after..]))
            .copied()
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} running VMs never beat after the rollovers, e.g. {:?}\n{text}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let second = stat(&mut c, "vmid_rollovers");
    assert_eq!(stat(&mut c, "vms") as u32, last);
    // A snapshot never ran, so it never had a VMID: tearing it down invalidates nothing.
    let before = stat(&mut c, "vmid_flushes_skipped");
    c.call("destroy", json!({"vm": 2}), T).unwrap();
    m.expect("[hyp] vm 2 (snapshot) stopped", T);
    let stats = c.stats(T).unwrap();
    let skipped = stats["vmid_flushes_skipped"].as_u64().unwrap_or(0) - before;
    assert!(
        skipped > 0,
        "destroying a snapshot skipped no invalidation\n{stats}"
    );
    assert!(second > first, "rollovers stopped at {first}");
    assert_eq!(stats["vms"].as_u64(), Some(u64::from(last - 1)), "{stats}");
    eprintln!("vmid: {stats}");
    eprintln!(
        "vmid: {SNAPSHOTS} snapshots after {snapped:?}, {FORKS} forks after {forked:?}, \
         all {} running VMs beat after rollovers at {:?}; rollovers {first} then {second}; \
         destroying a snapshot skipped {skipped} invalidations",
        running.len(),
        start.elapsed()
    );
    let text = m.transcript();
    assert!(!text.contains("error:"), "{text}");
    m.send("quit\n");
    assert_eq!(m.wait_exit(T), 0, "{text}");
    m.assert_no_hyp_fault();
    let _ = std::fs::remove_file(&sock);
}
