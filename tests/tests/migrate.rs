//! QEMU scenarios for migration, evacuation and reclaim while SMP guests
//! run: the test guest's `memstress` mode keeps verifying checksummed,
//! VM-tagged memory on every vCPU while the hypervisor moves and takes back
//! its frames.

use qemu_tests::api::{socket_path, ApiClient};
use qemu_tests::{number_after, Machine, MachineConfig};
use serde_json::json;
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
    // And the shared zero page's frame, held from boot.
    let zero = number_after(last_stats, "; zero page ").expect("zero page in stats");
    assert_eq!(
        free + reserve + heap + zero,
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

/// Ten VMs' frames moved out of a range and back, driven and measured over
/// the control channel (`docs/API.md`).
#[test]
fn evacuate_a_range_used_by_ten_forked_vms() {
    const T: Duration = Duration::from_secs(60);
    let sock = socket_path("migrate-evacuate");
    let cfg = MachineConfig {
        smp: 2,
        vcpus: Some(1),
        guest_mem: Some("32M".into()),
        guest_args: Some("memstress mem=6 secs=40 fork=9 zero=10".into()),
        api: Some(sock.clone()),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("migrate-evacuate", &cfg);
    let mut c = ApiClient::connect(&sock, T).expect("connect to the api socket");
    let deadline = std::time::Instant::now() + T;
    while count(&m.transcript(), "GUEST: memstress vm") < 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "ten VMs run\n{}",
            m.transcript()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let base = c.stats(T).unwrap()["guest_frames_from"].as_u64().unwrap();
    let (start, end) = (base, base + (48 << 20));
    let rmap = c.call("rmap", json!({"pa": start}), T).unwrap();
    assert!(rmap["mapcount"].as_u64().is_some(), "{rmap}");
    let ev = c
        .call("evacuate", json!({"start": start, "end": end}), T)
        .unwrap();
    assert_eq!(
        (&ev["busy"], &ev["unmovable"]),
        (&json!(0), &json!(0)),
        "{ev}"
    );
    assert!(
        ev["moved"].as_u64().unwrap() > 1000,
        "the range held the VMs' frames: {ev}"
    );
    let pages = (end - start) / 4096;
    let stats = c.stats(T).unwrap();
    // The range holds 2 MiB blocks that every VM still maps whole (what the
    // guests never wrote since the forks): evacuation moves those as blocks
    // (23 of the 24 batches did when this was written).
    let blocks = stats["migrated_blocks"].as_u64().unwrap();
    println!("evacuate: {ev}; migrated as 2 MiB blocks: {blocks}");
    assert!(blocks > 0, "evacuation moved whole blocks: {stats}");
    assert_eq!(
        (stats["offline"].as_u64(), stats["offline_free"].as_u64()),
        (Some(pages), Some(pages)),
        "{stats}"
    );
    let online = c
        .call("online", json!({"start": start, "end": end}), T)
        .unwrap();
    assert_eq!(online["frames"].as_u64(), Some(pages), "{online}");
    // Every VM ends (the channel keeps the machine up), then nothing leaked.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while c.stats(T).unwrap()["vms"] != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "VMs still running\n{}",
            m.transcript()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let s = c.stats(T).unwrap();
    let n = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("no {k} in {s}"));
    assert_eq!(
        n("frames_free")
            + n("split_reserve")
            + n("heap_frames")
            + n("dma_frames")
            + n("zero_page_frames"),
        n("frames_total"),
        "every frame free again after all VMs are gone: {s}"
    );
    assert_eq!(
        (n("swap_slots"), n("swap_cache"), n("offline")),
        (0, 0, 0),
        "{s}"
    );
    c.send_line(r#"{"id":"q","cmd":"quit"}"#).unwrap();
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
    let _ = std::fs::remove_file(&sock);
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
