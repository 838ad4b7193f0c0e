//! VMIDs as a cache (issue 14, part 2): on `cortex-a72` (8-bit VMIDs, 255 usable), 4,000
//! snapshots and 300 running forks at once. Snapshots never run, so they hold no VMID; the 301
//! running VMs share 255 numbers through generation rollovers, and every one of them must keep
//! making progress (a heartbeat printed after rollovers were seen, by each VM).

use qemu_tests::{Machine, MachineConfig};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const SNAPSHOTS: u32 = 4000;
const FORKS: u32 = 300;
/// The idle guest's heartbeat period.
const BEAT_MS: u32 = 3000;

/// The last `stats` line's rollover count.
fn rollovers(text: &str) -> u64 {
    let line = text
        .lines()
        .rfind(|l| l.starts_with("vmids: "))
        .unwrap_or_else(|| panic!("no vmids line in stats\n{text}"));
    line.split("rollovers ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no rollover count in {line:?}"))
}

/// VM ids that printed an idle heartbeat in `text`.
fn beating(text: &str) -> BTreeSet<u32> {
    text.lines()
        .filter(|l| l.contains("GUEST: idle: heartbeat"))
        .filter_map(|l| l.strip_prefix("[vm")?.split(']').next()?.parse().ok())
        .collect()
}

/// Asks for `stats` and returns its rollover count.
fn stats(m: &mut Machine) -> u64 {
    m.send("stats\n");
    let seen = m.expect("invalidations skipped for VMs that never ran", T);
    rollovers(&seen)
}

const T: Duration = Duration::from_secs(300);

#[test]
fn four_thousand_snapshots_and_three_hundred_running_forks_on_8bit_vmids() {
    let start = Instant::now();
    let cfg = MachineConfig {
        smp: 4,
        cpu: "cortex-a72".into(),
        vcpus: Some(1),
        guest_args: Some(format!("idle beat_ms={BEAT_MS}")),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("vmid", &cfg);
    m.expect("255 VMIDs", T);
    // Alone, its console lines carry no "[vmN]" prefix yet.
    m.expect("GUEST: idle: heartbeat 1 ", T);
    for i in 1..=SNAPSHOTS / 1000 {
        m.send("snapshot 1 1000\n");
        m.expect(&format!("snapshot of vm 1 is vm {}", 1 + i * 1000), T);
        eprintln!("vmid: {} snapshots at {:?}", i * 1000, start.elapsed());
    }
    let snapped = start.elapsed();
    m.send(&format!("fork 1 {FORKS}\n"));
    let last = 1 + SNAPSHOTS + FORKS;
    m.expect(&format!("child vm {last} in"), T);
    let forked = start.elapsed();
    // Wait until the running VMs have rolled the VMIDs over, then until every one of them has
    // beaten since: none was starved or lost its stage 2 by being renumbered.
    let deadline = Instant::now() + T;
    let first = loop {
        let r = stats(&mut m);
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
    let second = stats(&mut m);
    // A snapshot never ran, so it never had a VMID: tearing it down invalidates nothing.
    // (Not the echo of a command: with 300 VMs printing, typed characters
    // and guest lines interleave on the console.)
    m.send("destroy 2\n");
    m.expect("[hyp] vm 2 (snapshot) stopped", T);
    let seen = {
        m.send("stats\n");
        m.expect("invalidations skipped for VMs that never ran", T);
        m.expect("\n", T)
    };
    let skipped: u64 = seen
        .trim()
        .trim_start_matches(':')
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        skipped > 0,
        "destroying a snapshot skipped no invalidation ({seen:?})"
    );
    let text = m.transcript();
    assert!(second > first, "rollovers stopped at {first}\n{text}");
    assert!(text.contains(&format!("vms: {last}")), "{text}");
    assert!(text.contains(&format!("vms: {}", last - 1)), "{text}");
    assert!(!text.contains("error:"), "{text}");
    for what in ["heap: ", "frames: ", "vmids: "] {
        if let Some(line) = text.lines().rfind(|l| l.starts_with(what)) {
            eprintln!("vmid: {line}");
        }
    }
    eprintln!(
        "vmid: {SNAPSHOTS} snapshots after {snapped:?}, {FORKS} forks after {forked:?}, \
         all {} running VMs beat after rollovers at {:?}; rollovers {first} then {second}; \
         destroying a snapshot skipped {skipped} invalidations",
        running.len(),
        start.elapsed()
    );
    m.send("quit\n");
    assert_eq!(m.wait_exit(T), 0, "{}", m.transcript());
    m.assert_no_hyp_fault();
}
