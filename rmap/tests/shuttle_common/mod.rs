//! Shared by `tests/shuttle_*.rs`: the schedulers, the iteration count, small worlds.
// Each test file uses its own subset.
#![allow(dead_code)]

use rmap::host::{HostVm, HostWorld};
use rmap::Ipa;
use rmap::{PageState, Pfn};
use std::sync::Arc;

/// Guest RAM of every VM in the scenarios.
pub const RAM: Ipa = Ipa::new(0x4000_0000);
/// Bytes per page.
pub const PAGE: u64 = rmap::PAGE_SIZE;

/// Iterations per scheduler: `RMAP_SHUTTLE_ITERS` if set (to search longer), else the
/// scenario's CI-sized default.
pub fn iterations(default: usize) -> usize {
    std::env::var("RMAP_SHUTTLE_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// PCT depth: enough for the seed races, which need at most two preemptions at chosen points.
const PCT_DEPTH: usize = 3;

/// Runs `scenario` under shuttle's randomised scheduler, then under PCT, `iterations(default)`
/// times each (`RMAP_SHUTTLE_SCHED=random` or `=pct` runs only that one). A panic in any
/// thread (an assertion, a `check()` failure, lockdep), a deadlock or a spin that never ends
/// (shuttle's step limit) fails the run with a replayable schedule.
pub fn explore(default: usize, scenario: fn()) {
    let n = iterations(default);
    let only = std::env::var("RMAP_SHUTTLE_SCHED").unwrap_or_default();
    if only != "pct" {
        shuttle::check_random(scenario, n);
    }
    if only != "random" {
        shuttle::check_pct(scenario, n, PCT_DEPTH);
    }
}

/// The test of one scenario: without its mutation (`mutated` false) every schedule explored
/// must pass; with it, shuttle must find a failing schedule whose panic message contains one
/// of `expect` (so the check is known to be able to fail, and fails for the right reason).
pub fn holds_unless_mutated(default: usize, scenario: fn(), mutated: bool, expect: &[&str]) {
    if !mutated {
        explore(default, scenario);
        return;
    }
    let found = std::panic::catch_unwind(|| explore(default, scenario));
    let payload = found.expect_err("shuttle found no failing schedule for the mutation");
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(
        expect.iter().any(|e| message.contains(e)),
        "the mutation failed for another reason: {message}"
    );
}

/// A world small enough for the checker: `frames` frames of two words (value + checksum, so
/// a torn copy shows), and pools of `anon` anon_vmas and `chains` chains.
pub fn world(frames: usize, anon: usize, chains: usize) -> Arc<HostWorld> {
    Arc::new(HostWorld::new(frames, 2, anon, chains))
}

/// The frame mapped at `ipa` in `vm` (set-up code: it must be mapped).
pub fn frame_at(vm: &HostVm, ipa: Ipa) -> Pfn {
    match vm.s2.entries().into_iter().find(|&(at, _)| at == ipa) {
        Some((_, PageState::Mapped { pfn, .. })) => pfn,
        other => panic!("{:?} {ipa:#x}: {other:?}, not a page", vm.id),
    }
}

/// A guest store that must succeed.
pub fn write(w: &HostWorld, vm: &HostVm, ipa: Ipa, value: u64) {
    vm.write(&w.rmap, &w.machine, ipa, value)
        .unwrap_or_else(|e| panic!("{:?} store {ipa:#x}: {e:?}", vm.id));
}

/// A guest load that must succeed.
pub fn read(w: &HostWorld, vm: &HostVm, ipa: Ipa) -> u64 {
    vm.read(&w.rmap, &w.machine, ipa)
        .unwrap_or_else(|e| panic!("{:?} load {ipa:#x}: {e:?}", vm.id))
}

/// The whole-world invariants (`HostWorld::check`) at a quiescent point.
pub fn check(w: &HostWorld) {
    if let Err(e) = w.check() {
        panic!("invariant: {e}");
    }
}

/// Migrates `pfns` in one batch; how many moved.
pub fn migrate(w: &HostWorld, pfns: &[Pfn]) -> usize {
    let mut out = Vec::new();
    w.rmap.migrate_frames(&w.vms, &w.machine, pfns, &mut out);
    out.iter().filter(|r| r.is_ok()).count()
}

/// Reclaims `pfns` in one batch; how many went to swap.
pub fn reclaim(w: &HostWorld, pfns: &[Pfn]) -> usize {
    let mut out = Vec::new();
    w.rmap
        .reclaim_frames(&w.vms, &w.machine, &w.machine, pfns, &mut out);
    out.iter().filter(|r| r.is_ok()).count()
}
