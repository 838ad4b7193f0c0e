//! The frozen snapshots saves are done with, destroyed on an idle CPU.
//!
//! A save reads a running VM through a frozen copy-on-write snapshot of it.
//! Once the walk has copied every page into the writer's buffers the
//! snapshot is no longer needed, but destroying it (unsharing every page
//! through the reverse map, freeing the table, invalidating its VMID) takes
//! 5-40 ms under QEMU's TCG for a 256 MiB Linux. The saving CPU used to do
//! it after the image was committed; it is now handed over here, before the
//! image's flush and TOC commit, so another CPU (idle, or a guest's WFI)
//! destroys it while the saving CPU waits for the disk, as Linux defers
//! freeing to a worker.
//!
//! A teardown is one step of background work: it is not cut short like the
//! prefetch's, because the snapshot's memory is not in a state to resume
//! from halfway. That is what the console CPU did inline before.

use crate::vm::sched::Background;
use crate::vm::Vm;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use spin::Mutex;

/// Snapshots waiting to be destroyed. Lock level: a leaf (the teardown runs
/// after it is released).
static PENDING: Mutex<Vec<Arc<Vm>>> = Mutex::new(Vec::new());
/// How many: `ready` is asked at guest exits, and must not take the lock.
static COUNT: AtomicUsize = AtomicUsize::new(0);
/// A CPU is in [`step`].
static BUSY: AtomicBool = AtomicBool::new(false);

static WORK: Background = Background {
    ready: || COUNT.load(Ordering::Relaxed) > 0 && !BUSY.load(Ordering::Relaxed),
    step,
};

/// Hands `snap`, a save's own frozen snapshot that nothing reads any more,
/// to the next idle CPU to destroy.
pub fn defer(snap: Arc<Vm>) {
    debug_assert!(snap.is_frozen());
    PENDING.lock().push(snap);
    COUNT.fetch_add(1, Ordering::Release);
    crate::vm::sched::set_background(&WORK);
}

/// Destroys the pending snapshots, one after another (a no-op while another
/// CPU is in a step).
fn step() {
    if BUSY.swap(true, Ordering::Acquire) {
        return;
    }
    loop {
        // Popped under the lock, destroyed after it.
        let next = PENDING.lock().pop();
        let Some(snap) = next else { break };
        snap.stop(0);
        drop(snap);
        COUNT.fetch_sub(1, Ordering::Release);
    }
    BUSY.store(false, Ordering::Release);
}
