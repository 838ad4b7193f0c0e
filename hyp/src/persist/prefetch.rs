//! The background prefetch of a loaded VM's pages: in the order the VM
//! touched them after its previous load (the image's touch order, REAP's
//! working set), then every other stored page in page order, while the VM
//! runs. Each page goes through the ordinary stage-2 fault path, as if the
//! VM had touched it, so a page the guest faulted first is simply skipped.
//!
//! It runs in bounded steps from CPU 0's scheduler loop (the console's
//! `poll` hook, between two time slices or when CPU 0 is idle), like the
//! console's other work: no thread of its own, and at most [`STEP_US`] of
//! CPU 0's time per step.

use super::load::{all, Loaded, PREFETCHING};
use crate::mm::frames::PAGE_SIZE;
use crate::mm::glue::{Access, FaultKind};
use core::sync::atomic::Ordering;
use rmap::Ipa;

/// CPU 0's time one step may take.
pub const STEP_US: u64 = 2000;

/// The `i`th page to prefetch: the touch order, then the image's pages.
fn nth(l: &Loaded, i: usize) -> Option<u32> {
    let touch = l.image.touch_order();
    match touch.get(i) {
        Some(g) => Some(g.0),
        None => l.image.pages().get(i - touch.len()).map(|p| p.gpn().0),
    }
}

/// One bounded step of every loaded image's prefetch.
pub fn step() {
    let t0 = crate::arch::timer::now();
    let budget = crate::arch::timer::ms_to_ticks(1) * STEP_US / 1000;
    for l in all() {
        if !l.prefetch {
            continue;
        }
        let Some(vm) = crate::vm::get(l.vm) else {
            continue;
        };
        if vm.state() == crate::vm::VmState::Stopping {
            continue;
        }
        let cpu = crate::arch::percpu::cpu_index();
        PREFETCHING[cpu].store(true, Ordering::Relaxed);
        while crate::arch::timer::now().wrapping_sub(t0) < budget {
            let i = l.cursor.fetch_add(1, Ordering::Relaxed) as usize;
            let Some(gpn) = nth(&l, i) else {
                break;
            };
            if !fetch(&vm, &l, gpn) {
                break;
            }
        }
        PREFETCHING[cpu].store(false, Ordering::Relaxed);
    }
}

/// Loads page `gpn` of `vm` if it still waits for this image; false to stop
/// prefetching into this VM (stopped: a page failed, or no memory).
fn fetch(vm: &crate::vm::Vm, l: &Loaded, gpn: u32) -> bool {
    let ipa = Ipa::new(vm.mem.ram.base) + u64::from(gpn) * PAGE_SIZE;
    match crate::mm::diskpages::pending(&vm.mem, ipa) {
        Some((handle, _)) if handle == l.handle => {}
        _ => return true,
    }
    if crate::mm::glue::fault(&vm.mem, ipa, Access::Read, FaultKind::Translation).is_err() {
        return false;
    }
    if let Some((_, page)) = crate::mm::diskpages::take_failure() {
        crate::println!(
            "[hyp] vm {} ({}): page {page} of its disk image failed its checksum; stopping it",
            vm.id,
            vm.name
        );
        vm.stop(crate::vm::STATUS_FAULT);
        return false;
    }
    true
}
