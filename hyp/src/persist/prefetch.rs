//! The background prefetch of a loaded VM's pages: in the order the VM
//! touched them after its previous load (the image's touch order, REAP's
//! working set), then every other stored page in page order, while the VM
//! runs. Each page goes through the ordinary stage-2 fault path, as if the
//! VM had touched it, so a page the guest faulted first is simply skipped.
//!
//! It runs in bounded steps on whichever CPU has nothing else to do
//! (`vm::sched::Background`): between time slices, instead of an idle WFI,
//! and when a vCPU waits for an interrupt, one CPU at a time. No thread of
//! its own, and at most [`STEP_US`] (plus one page's read) per step. It
//! used to run only from CPU 0's console poll, which forced CPU 0's vCPUs
//! off at every exit and still left it to CPU 0's schedule.

use super::load::{all, Loaded, PREFETCHING};
use crate::mm::frames::PAGE_SIZE;
use crate::mm::glue::{Access, FaultKind};
use core::sync::atomic::{AtomicBool, Ordering};
use rmap::Ipa;

/// Faults one page may take (each is retried only when it changed nothing).
const RETRIES: usize = 8;
/// Some loaded image may still have pages to prefetch.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// A CPU is in [`step`] (the one-at-a-time lock: the disk serves one
/// request at a time anyway, and other CPUs keep running guests).
static BUSY: AtomicBool = AtomicBool::new(false);

static BACKGROUND: crate::vm::sched::Background = crate::vm::sched::Background {
    ready: || ACTIVE.load(Ordering::Relaxed) && !BUSY.load(Ordering::Relaxed),
    step,
};

/// A load with prefetch started: idle CPUs start stepping.
pub fn start() {
    ACTIVE.store(true, Ordering::Relaxed);
    crate::vm::sched::set_background(&BACKGROUND);
}

/// A CPU's time one step may take (it ends after the page that passes it).
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

/// One bounded step of every loaded image's prefetch (a no-op while another
/// CPU is in one).
fn step() {
    if !ACTIVE.load(Ordering::Relaxed) || BUSY.swap(true, Ordering::Acquire) {
        return;
    }
    let more = step_images();
    if !more {
        ACTIVE.store(false, Ordering::Relaxed);
    }
    BUSY.store(false, Ordering::Release);
}

/// Fetches pages of each image for at most the step's budget; whether any
/// image has pages left.
fn step_images() -> bool {
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
        l.steps.fetch_add(1, Ordering::Relaxed);
        // At least one page per image and step, however late the step got
        // here: `more` must say whether pages are left, never whether time
        // was (a step that found its budget gone before its first page
        // once ended the whole prefetch, with most of the image unread).
        loop {
            let i = l.cursor.fetch_add(1, Ordering::Relaxed) as usize;
            let Some(gpn) = nth(&l, i) else {
                break;
            };
            more = true;
            if !fetch(&vm, &l, gpn) || crate::arch::timer::now().wrapping_sub(t0) >= budget {
                break;
            }
        }
        PREFETCHING[cpu].store(false, Ordering::Relaxed);
    }
    more
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
