//! QEMU scenarios for migration, evacuation and reclaim while SMP guests
//! run: the test guest's `memstress` mode keeps verifying checksummed,
//! VM-tagged memory on every vCPU while the hypervisor moves and takes back
//! its frames.

use qemu_tests::{number_after, Machine, MachineConfig};
use std::time::Duration;

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// The last `frames: F free / T total` line of the transcript.
fn frames_line(t: &str) -> (u64, u64) {
    let line = t
        .lines()
        .rev()
        .find(|l| l.starts_with("frames: "))
        .expect("a stats line");
    let w: Vec<&str> = line.split_whitespace().collect();
    (w[1].parse().unwrap(), w[4].parse().unwrap())
}

fn assert_all_free(t: &str) {
    let (free, total) = frames_line(t);
    let last_stats = &t[t.rfind("\nframes: ").unwrap()..];
    // The hypervisor keeps a few table pages back for splitting blocks.
    let reserve = number_after(last_stats, "split reserve ").expect("split reserve in stats");
    // And the frames the heap grew by (the heap keeps what it takes).
    let heap = number_after(last_stats, "; heap ").expect("heap frames in stats");
    assert_eq!(
        free + reserve + heap,
        total,
        "every frame free again after all VMs are gone\n{t}"
    );
    assert!(last_stats.contains("swap slots: 0"), "store empty\n{t}");
    assert!(
        last_stats.contains(" 0 in the swap cache"),
        "swap cache empty\n{t}"
    );
    assert!(last_stats.contains("offline frames: 0 "), "all online\n{t}");
}

#[test]
fn chaos_under_smp_memstress_corrupts_nothing_and_leaks_nothing() {
    // Three VMs (two forked by the guest) of two vCPUs verify their memory
    // for 45 s while CPU 0 runs 25 s of random migrate / evacuate / reclaim /
    // fork / destroy; then every VM finishes and all frames must be free.
    let cfg = MachineConfig {
        smp: 2,
        vcpus: Some(2),
        guest_mem: Some("64M".into()),
        guest_args: Some("memstress mem=16 secs=45 fork=2".into()),
        script: Some("wait 4; chaos 25 12345 8; stats; wait 150; stats".into()),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("migrate-chaos", &cfg);
    m.expect("chaos: done:", Duration::from_secs(90));
    let status = m.wait_exit(Duration::from_secs(200));
    let t = m.transcript();
    m.assert_no_hyp_fault();
    assert!(!t.contains("FAIL"), "{t}");
    assert!(count(&t, "GUEST RESULT: PASS") >= 3, "{t}");
    let chaos = t.lines().find(|l| l.starts_with("chaos: done:")).unwrap();
    assert!(
        !chaos.contains(" 0 frames moved"),
        "chaos moved frames: {chaos}"
    );
    assert!(t.contains("wait: no runnable VMs left"), "{t}");
    assert_all_free(&t);
    assert_eq!(status, 0, "{t}");
}

#[test]
fn evacuate_a_range_used_by_ten_forked_vms() {
    let cfg = MachineConfig {
        smp: 2,
        vcpus: Some(1),
        guest_mem: Some("32M".into()),
        guest_args: Some("memstress mem=6 secs=40 fork=9 zero=10".into()),
        script: Some("wait 12; stats".into()),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("migrate-evacuate", &cfg);
    let seen = m.expect("guest frames from 0x", Duration::from_secs(60));
    let text = m.expect("\n", Duration::from_secs(5));
    assert_eq!(
        count(&seen, "GUEST: memstress vm"),
        10,
        "ten VMs run\n{seen}"
    );
    let base = u64::from_str_radix(text.trim(), 16).unwrap();
    let (start, end) = (base, base + (48 << 20));
    m.send(&format!(
        "rmap {start:#x}\nevacuate {start:#x} {end:#x}\nstats\n"
    ));
    let line = m.expect("offline until `online`", Duration::from_secs(60));
    assert!(line.contains("left in use: 0 "), "{line}");
    let moved: u64 = line
        .split("moved ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(moved > 1000, "the range held the VMs' frames: {line}");
    let pages = (end - start) / 4096;
    m.expect(
        &format!("offline frames: {pages} ({pages} free)"),
        Duration::from_secs(30),
    );
    m.send(&format!("online {start:#x} {end:#x}\n"));
    m.expect(
        &format!("{pages} frames back in the allocator"),
        Duration::from_secs(30),
    );
    let status = m.wait_exit(Duration::from_secs(120));
    let t = m.transcript();
    m.assert_no_hyp_fault();
    assert!(!t.contains("FAIL"), "{t}");
    assert_eq!(
        count(&t, "GUEST RESULT: PASS"),
        10,
        "every VM reads its own data\n{t}"
    );
    assert_eq!(status, 0, "{t}");
}

#[test]
fn overcommitted_forked_vms_keep_running_through_reclaim() {
    // 256 MiB of QEMU RAM leaves ~180 MiB of frames; four VMs each touch
    // 64 MiB (256 MiB in all).
    let cfg = MachineConfig {
        smp: 2,
        mem: "256M".into(),
        vcpus: Some(2),
        guest_mem: Some("80M".into()),
        guest_args: Some("memstress mem=64 secs=40 fork=3 zero=25".into()),
        script: Some("wait 150; stats".into()),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("migrate-overcommit", &cfg);
    let status = m.wait_exit(Duration::from_secs(200));
    let t = m.transcript();
    m.assert_no_hyp_fault();
    assert!(!t.contains("FAIL"), "{t}");
    assert!(!t.contains("out of memory"), "{t}");
    assert_eq!(count(&t, "GUEST RESULT: PASS"), 4, "{t}");
    let mem = t.lines().rev().find(|l| l.starts_with("memory: ")).unwrap();
    let reclaimed: u64 = mem.split_whitespace().nth(4).unwrap().parse().unwrap();
    let ram_frames = frames_line(&t).1;
    assert!(
        reclaimed > 0 && !mem.contains("swapped-in 0"),
        "reclaim and swap-in happened: {mem}"
    );
    println!("overcommit: {mem}; {ram_frames} frames of RAM");
    assert_all_free(&t);
    assert_eq!(status, 0, "{t}");
}
