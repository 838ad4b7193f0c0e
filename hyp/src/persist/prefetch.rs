//! The background prefetch of a loaded VM's pages: in the order the VM
//! touched them after its previous load (the image's touch order, REAP's
//! working set), then every other stored page in page order, while the VM
//! runs. Each page goes through the ordinary stage-2 fault path, as if the
//! VM had touched it, so a page the guest faulted first is simply skipped.
//!
//! It runs in bounded steps from CPU 0's scheduler loop (the console's
//! `poll` hook, with no vCPU loaded), like the console's other work: no
//! thread of its own, and at most [`STEP_US`] of CPU 0's time per step.
//! While a prefetch has work ([`active`]), the console's `command_waiting`
//! hook says so, so a vCPU on CPU 0 gives the CPU back at its next exit, as
//! it does for a typed command; otherwise a guest that never leaves CPU 0
//! would starve its own prefetch.

use super::load::{all, Loaded, PREFETCHING};
use crate::mm::frames::PAGE_SIZE;
use crate::mm::glue::{Access, FaultKind};
use core::sync::atomic::{AtomicBool, Ordering};
use rmap::Ipa;

/// Faults one page may take (each is retried only when it changed nothing).
const RETRIES: usize = 8;
/// Some loaded image may still have pages to prefetch.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Whether a prefetch has work (CPU 0 should come back to `step`).
pub fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

/// A load with prefetch started.
pub fn start() {
    ACTIVE.store(true, Ordering::Relaxed);
}

/// CPU 0's time one step may take.
pub const STEP_US: u64 = 2000;

/// Passes over the image a prefetch makes at most: a page whose fault only
/// prepared or lost a race every time is picked up by the next pass.
const PASSES: usize = 4;

/// The `i`th page to prefetch: the touch order, then the image's pages,
/// [`PASSES`] times over (pages already in cost one stage-2 lookup).
fn nth(l: &Loaded, i: usize) -> Option<u32> {
    let touch = l.image.touch_order();
    let pass = touch.len() + l.image.pages().len();
    if pass == 0 || i >= pass * PASSES || (i >= pass && super::load::get(l.handle).is_none()) {
        return None;
    }
    let i = i % pass;
    match touch.get(i) {
        Some(g) => Some(g.0),
        None => l.image.pages().get(i - touch.len()).map(|p| p.gpn().0),
    }
}

/// One bounded step of every loaded image's prefetch.
pub fn step() {
    if !active() {
        return;
    }
    let mut more = false;
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
            more = true;
            if !fetch(&vm, &l, gpn) {
                break;
            }
        }
        PREFETCHING[cpu].store(false, Ordering::Relaxed);
    }
    if !more {
        ACTIVE.store(false, Ordering::Relaxed);
    }
}

/// Loads page `gpn` of `vm` if it still waits for this image; false to stop
/// prefetching into this VM (stopped: a page failed, or no memory).
fn fetch(vm: &crate::vm::Vm, l: &Loaded, gpn: u32) -> bool {
    let ipa = Ipa::new(vm.mem.ram.base) + u64::from(gpn) * PAGE_SIZE;
    // A fault may only prepare (the region's first: its anon_vma) or lose a
    // race, and ask to be retried, as a guest's access would be.
    for _ in 0..RETRIES {
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
    }
    true
}
