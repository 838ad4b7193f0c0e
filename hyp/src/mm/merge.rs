//! The same-page merger at EL2: `hypmm::Scanner` (ksmd's checksum filter,
//! stable and unstable trees) over every VM, merging through `rmap::merge`.
//! The console runs a whole pass (`merge`) or, with `merge auto <rate>`, a
//! budgeted step from its poll between guest time slices, so the
//! background merger needs no thread of its own and runs with no vCPU
//! loaded.
//!
//! Lock: `SCANNER` (the scanner's trees and checksums) is outermost: it is
//! held across a scan step, which takes the memory manager's own locks
//! (stage-2, frame, anon_vma, stable node) underneath, and nothing takes it
//! while holding any of those.

use crate::mm::glue::{cx, rmap, HypVms};
use core::sync::atomic::{AtomicU64, Ordering};
pub use hypmm::{PassStats, ScanVm};
use spin::Mutex;

static SCANNER: Mutex<Option<hypmm::Scanner>> = Mutex::new(None);
/// Background rate in pages per second; 0: off.
static RATE: AtomicU64 = AtomicU64::new(0);
/// Mappings the scanner has pointed at the shared zero page since boot
/// (each was an all-zero page; `stats`' `merged_zero`).
static ZERO_MERGED: AtomicU64 = AtomicU64::new(0);
/// Timer ticks of the last background step.
static LAST_STEP: AtomicU64 = AtomicU64::new(0);
/// Most pages one background step visits, so a step stays short next to a
/// guest's time slice whatever the rate.
const STEP_PAGES: u64 = 1024;

fn with_scanner<R>(f: impl FnOnce(&mut hypmm::Scanner) -> R) -> R {
    let mut guard = SCANNER.lock();
    f(guard.get_or_insert_with(hypmm::Scanner::new))
}

/// One whole pass over `vms`, and a second one if the first found pages it
/// had not seen before or that changed since their last visit (a page
/// merges only once seen unchanged twice).
pub fn pass(vms: &[ScanVm]) -> PassStats {
    let rmap = rmap();
    let cx = cx(rmap);
    with_scanner(|s| {
        let mut stats = s.pass(&cx, &HypVms, vms);
        if stats.changing > 0 {
            stats += s.pass(&cx, &HypVms, vms);
        }
        ZERO_MERGED.fetch_add(stats.zero, Ordering::Relaxed);
        stats
    })
}

/// Mappings the scanner has pointed at the shared zero page since boot.
pub fn zero_merged() -> u64 {
    ZERO_MERGED.load(Ordering::Relaxed)
}

/// Starts (rate > 0) or stops (0) the background merger.
pub fn set_rate(rate: u64) {
    LAST_STEP.store(crate::arch::timer::now(), Ordering::Relaxed);
    RATE.store(rate, Ordering::Release);
}

/// The background rate (0: off).
pub fn rate() -> u64 {
    RATE.load(Ordering::Acquire)
}

/// A background step if one is due: the pages the rate allows since the
/// last step (at most [`STEP_PAGES`]). `vms` is asked for only then.
pub fn background(vms: impl FnOnce() -> alloc::vec::Vec<ScanVm>) -> Option<PassStats> {
    let rate = rate();
    if rate == 0 {
        return None;
    }
    let now = crate::arch::timer::now();
    let elapsed = now.saturating_sub(LAST_STEP.load(Ordering::Relaxed));
    let per_sec = crate::arch::timer::ms_to_ticks(1000).max(1);
    let budget = (u128::from(rate) * u128::from(elapsed) / u128::from(per_sec)) as u64;
    if budget == 0 {
        return None;
    }
    LAST_STEP.store(now, Ordering::Relaxed);
    let vms = vms();
    let rmap = rmap();
    let cx = cx(rmap);
    let stats = with_scanner(|s| s.scan(&cx, &HypVms, &vms, budget.min(STEP_PAGES)));
    ZERO_MERGED.fetch_add(stats.zero, Ordering::Relaxed);
    Some(stats)
}

/// Rounds the scanner completed (whole passes and background rounds).
pub fn rounds() -> u64 {
    SCANNER.lock().as_ref().map_or(0, hypmm::Scanner::rounds)
}
