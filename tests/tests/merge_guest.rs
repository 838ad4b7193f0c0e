//! Same-page merging under a guest that checks its memory (issue 16): three
//! test VMs, created on their own and put in one trust group, run the
//! `mergecheck` mode: 256 pages identical across VMs plus 64 zero pages,
//! verified word by word round after round, with windows rewritten (a CoW
//! write on a merged page) and written back (mergeable again). Meanwhile
//! the hypervisor merges them, migrates merged frames, evacuates a range
//! holding merged frames, reclaims them to the compressed store (they fault
//! back) and merges in the background; after every step each guest must
//! report new checked rounds and none may print FAIL. Destroying the VMs
//! gives back every frame they took.

use qemu_tests::api::{socket_path, ApiClient};
use qemu_tests::{Machine, MachineConfig};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const REPLY: Duration = Duration::from_secs(30);
const VMS: [u64; 3] = [1, 2, 3];
const PAGES: u64 = 256;
/// The first CHURN pattern pages are rewritten in turn (unmerged by CoW,
/// merged again), the others stay as filled.
const CHURN: u64 = 64;
/// Most of the 192 pages never rewritten are merged (a page the merger
/// found busy, or one it merged with a churning page, may be missing).
const MIN_MERGED: usize = 150;
const PAGE: u64 = 4096;
const BLOCK: u64 = 2 << 20;

struct Run {
    m: Machine,
    c: ApiClient,
    /// Each VM's pattern area (IPA), from its `filled` line.
    area: Vec<u64>,
}

impl Run {
    fn call(&mut self, cmd: &str, args: Value) -> Value {
        match self.c.call(cmd, args.clone(), REPLY) {
            Ok(v) => v,
            Err(e) => panic!("{cmd} {args}: {e}\n{}", self.m.transcript()),
        }
    }

    fn stat(&mut self, key: &str) -> u64 {
        let s = self.call("stats", json!({}));
        s[key].as_u64().unwrap_or_else(|| panic!("no {key} in {s}"))
    }

    fn rounds_seen(&self, vm: u64) -> usize {
        let needle = format!("GUEST: mergecheck vm {vm} csum ok");
        self.m.transcript().matches(&needle).count()
    }

    /// Every guest reports two more checked rounds after `step` (a report
    /// that was already on its way would not prove the step is behind it),
    /// and nobody printed FAIL or faulted.
    fn guests_still_ok(&mut self, step: &str) {
        let before: Vec<usize> = VMS.iter().map(|&v| self.rounds_seen(v)).collect();
        let deadline = Instant::now() + REPLY;
        while VMS
            .iter()
            .zip(&before)
            .any(|(&v, &b)| self.rounds_seen(v) < b + 2)
        {
            let t = self.m.transcript();
            assert!(
                !t.contains("FAIL") && !t.contains("*** HYPERVISOR"),
                "after {step}\n{t}"
            );
            assert!(
                Instant::now() < deadline,
                "guests stalled after {step}\n{t}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("merge-guest: {step}: every guest checked two more rounds");
    }

    /// Merged frames in use by a pattern page of at least two VMs that the
    /// guests never rewrite: (pa, mapping VMs), from `merge list` and `rmap`.
    fn pattern_frames(&mut self) -> Vec<(u64, Vec<u64>)> {
        let list = self.call("merge list", json!({"count": 4096}));
        let mut found = Vec::new();
        for f in list["frames"].as_array().cloned().unwrap_or_default() {
            // Zero pages merge by the thousand (not ours to pick: their
            // rmap answer is long).
            let many = f["mapcount"].as_u64().unwrap() > 16;
            if many || f["vms"].as_array().map_or(0, Vec::len) < 2 {
                continue;
            }
            let pa = f["pa"].as_u64().unwrap();
            let rmap = self.call("rmap", json!({"pa": pa}));
            let mut vms = Vec::new();
            for m in rmap["mappers"].as_array().cloned().unwrap_or_default() {
                let (vm, ipa) = (m["vm"].as_u64().unwrap(), m["ipa"].as_u64().unwrap());
                let at = self.area[vm as usize - 1];
                if (at + CHURN * PAGE..at + PAGES * PAGE).contains(&ipa) && !vms.contains(&vm) {
                    vms.push(vm);
                }
            }
            if vms.len() >= 2 && rmap["merged_group"].as_u64().is_some() {
                found.push((pa, vms));
            }
        }
        found
    }

    fn is_merged(&mut self, pa: u64) -> bool {
        self.call("rmap", json!({"pa": pa}))["merged_group"].is_u64()
    }
}

/// The hex after `at 0x` in a guest's `filled` line.
fn area_of(t: &str, vm: u64) -> u64 {
    let needle = format!("GUEST: mergecheck vm {vm}: ");
    let line = t
        .lines()
        .find(|l| l.contains(&needle))
        .expect("filled line");
    let hex = line
        .split("at 0x")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap();
    u64::from_str_radix(hex, 16).unwrap()
}

#[test]
fn guests_keep_their_memory_through_merge_move_and_reclaim() {
    let started = Instant::now();
    let sock = socket_path("merge-guest");
    let cfg = MachineConfig {
        guest: "none".into(),
        api: Some(sock.clone()),
        ..MachineConfig::default()
    };
    let mut m = Machine::boot("merge-guest", &cfg);
    m.expect("[hyp] no default guest", REPLY);
    let c = ApiClient::connect(&sock, REPLY).expect("connect to the api socket");
    let mut r = Run {
        m,
        c,
        area: Vec::new(),
    };
    let base = r.call("stats", json!({}));
    for &vm in &VMS {
        let args = json!({"guest": "test", "vcpus": 1, "mem": 32,
            "cmdline": "mergecheck pages=256 zeros=64 churn=64"});
        assert_eq!(r.call("create", args)["vm"], vm);
        r.call("merge", json!({"op": "group", "vm": vm, "group": 7}));
    }
    // The VMs boot in any order: look for each one's line in the whole
    // transcript (`expect` reads on from the previous match).
    let deadline = Instant::now() + REPLY;
    let filled = |t: &str, vm: u64| t.contains(&format!("GUEST: mergecheck vm {vm}: 256 "));
    while !VMS.iter().all(|&v| filled(&r.m.transcript(), v)) {
        assert!(Instant::now() < deadline, "{}", r.m.transcript());
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = r.m.transcript();
    r.area = VMS.iter().map(|&v| area_of(&t, v)).collect();
    r.guests_still_ok("fill");

    // Merge: pattern pages end up in frames shared across VMs.
    let pass = r.call("merge", json!({}));
    println!("merge-guest: merge pass: {pass}");
    assert!(r.stat("merged_frames") > 0, "{pass}");
    let frames = r.pattern_frames();
    println!("merge-guest: {} merged pattern frames", frames.len());
    assert!(
        frames.len() >= MIN_MERGED,
        "pattern pages merged: {frames:?}"
    );
    let (pa, vms) = frames[0].clone();
    println!("merge-guest: frame {pa:#x} mapped by vms {vms:?}");
    r.guests_still_ok("merge");

    // Migrate vm 1's pattern area: its merged frames move, for every mapper.
    let at = r.area[0];
    let mv = r.call(
        "migrate",
        json!({"vm": 1, "start": at, "end": at + PAGES * PAGE}),
    );
    println!("merge-guest: migrate: {mv}");
    assert!(mv["moved"].as_u64().unwrap() >= MIN_MERGED as u64, "{mv}");
    assert!(!r.is_merged(pa), "frame {pa:#x} moved away");
    let after = r.pattern_frames();
    assert!(
        after.len() >= MIN_MERGED,
        "still merged after migration: {after:?}"
    );
    r.guests_still_ok("migrate");

    // Evacuate the 2 MiB holding a merged frame: it moves, still merged.
    let (pa, _) = after[after.len() / 2];
    let (start, end) = (pa & !(BLOCK - 1), (pa & !(BLOCK - 1)) + BLOCK);
    let inside = |f: &[(u64, Vec<u64>)]| f.iter().filter(|(p, _)| (start..end).contains(p)).count();
    let before_ev = inside(&after);
    let ev = r.call("evacuate", json!({"start": start, "end": end}));
    println!(
        "merge-guest: evacuate {start:#x}..{end:#x} ({before_ev} merged pattern frames): {ev}"
    );
    assert!(ev["moved"].as_u64().unwrap() >= before_ev as u64, "{ev}");
    let now = r.pattern_frames();
    assert_eq!(inside(&now), 0, "no merged frame left in the range");
    assert!(
        now.len() >= MIN_MERGED,
        "still merged after evacuation: {now:?}"
    );
    r.guests_still_ok("evacuate");
    let on = r.call("online", json!({"start": start, "end": end}));
    assert_eq!(on["frames"].as_u64(), Some(BLOCK / PAGE), "{on}");

    // Reclaim with the guests paused (so their pages are cold): merged
    // frames go to the store; resumed, the guests fault them back.
    let merged = r.stat("merged_frames");
    for &vm in &VMS {
        r.call("pause", json!({"vm": vm}));
    }
    let rec = r.call("reclaim", json!({"pages": 100000}));
    let (left, slots) = (r.stat("merged_frames"), r.stat("swap_slots"));
    println!("merge-guest: reclaim: {rec}; merged frames {merged} -> {left}, {slots} swap slots");
    assert!(left < merged / 2 && slots > 0, "{rec}");
    for &vm in &VMS {
        r.call("resume", json!({"vm": vm}));
    }
    r.guests_still_ok("reclaim and swap-in");
    let swapped_in = r.stat("swapped_in");
    assert!(swapped_in > PAGES, "the pattern came back from the store");

    // Merged again, then the background merger races the guests' rewrites.
    let again = r.call("merge", json!({}));
    assert!(
        r.pattern_frames().len() >= MIN_MERGED,
        "merged again: {again}"
    );
    let rounds = r.stat("merge_rounds");
    r.call("merge auto", json!({"rate": 50000}));
    r.guests_still_ok("background merging");
    r.guests_still_ok("background merging, longer");
    r.call("merge off", json!({}));
    assert!(r.stat("merge_rounds") > rounds, "the background merger ran");

    // Destroying the VMs gives back every frame, but for those the heap
    // grew by and the table pages kept back for splitting blocks (both
    // kept for later, as `tests/migrate.rs` counts them).
    for &vm in &VMS {
        r.call("destroy", json!({"vm": vm}));
    }
    let deadline = Instant::now() + REPLY;
    while r.stat("vms") != 0 || r.stat("merged_frames") != 0 {
        assert!(Instant::now() < deadline, "{}", r.m.transcript());
        std::thread::sleep(Duration::from_millis(200));
    }
    let end = r.call("stats", json!({}));
    let n = |s: &Value, k: &str| s[k].as_u64().unwrap_or_else(|| panic!("no {k} in {s}"));
    let kept = |k: &str| n(&end, k) - n(&base, k);
    let (heap, reserve) = (kept("heap_frames"), kept("split_reserve"));
    println!(
        "merge-guest: frames used {} before the VMs, {} after ({heap} grown by the heap, {reserve} more in the split reserve)",
        n(&base, "frames_used"),
        n(&end, "frames_used")
    );
    assert_eq!(
        n(&end, "frames_used") - heap - reserve,
        n(&base, "frames_used"),
        "every frame back: {base} -> {end}"
    );
    for k in ["merged_mappings", "swap_slots", "swap_cache", "offline"] {
        assert_eq!(n(&end, k), 0, "{k}: {end}");
    }
    let t = r.m.transcript();
    assert!(!t.contains("FAIL"), "{t}");
    r.m.assert_no_hyp_fault();
    r.c.call("quit", json!({}), REPLY).ok();
    let _ = std::fs::remove_file(&sock);
    println!("merge-guest: done in {:?}", started.elapsed());
}
