//! The hypervisor heap: a fixed area reserved by the link map (qemu-virt.ld)
//! to boot with, grown from the frame allocator as metadata grows with the
//! machine (the frame table of a 64 GiB host alone is 256 MiB) and with the
//! number of VMs. Memory the heap takes stays the heap's.
//!
//! Lock order: the heap lock is a leaf (nothing is taken while it is held).
//! Growing takes the frame allocator's lock with the heap lock released, so
//! nothing may allocate heap while holding the frame allocator's lock
//! (`frames.rs` never does).

use crate::mm::frames::{self, PAGE_SIZE};
use buddy_system_allocator::LockedHeap;
use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

/// The heap grows by at least this much at a time (2 MiB, one block).
const GROW_FRAMES: usize = 512;

/// The buddy allocator, and what it may grow by.
struct GrowingHeap {
    heap: LockedHeap<32>,
    /// Bytes taken from the frame allocator so far.
    grown: AtomicUsize,
}

#[global_allocator]
static HEAP: GrowingHeap = GrowingHeap {
    heap: LockedHeap::empty(),
    grown: AtomicUsize::new(0),
};

// SAFETY: allocation and deallocation go to the buddy allocator under its
// lock; memory added to it comes only from the link map's heap area and from
// frames the frame allocator handed over for good (`grow`).
unsafe impl GlobalAlloc for GrowingHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        loop {
            if let Ok(p) = self.heap.lock().alloc(layout) {
                return p.as_ptr();
            }
            if !grow(layout.size().max(layout.align())) {
                return core::ptr::null_mut();
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this layout (GlobalAlloc's
        // contract), so it is non-null and the buddy allocator's.
        unsafe {
            self.heap
                .lock()
                .dealloc(NonNull::new_unchecked(ptr), layout)
        }
    }
}

unsafe extern "C" {
    static __heap_start: u8;
    static __heap_end: u8;
}

/// Hands the link map's heap area to the allocator. Boot CPU, once.
pub fn init() {
    let start = &raw const __heap_start as usize;
    let end = &raw const __heap_end as usize;
    // SAFETY: [__heap_start, __heap_end) is reserved for the heap by the link
    // map, kept out of the frame allocator, and handed over exactly once.
    unsafe { HEAP.heap.lock().init(start, end - start) };
}

/// Adds at least `bytes` of frames to the heap: a 2 MiB-aligned run of 2 MiB
/// or more when one is free, else (RAM fragmented by guests, typically under
/// the memory pressure that has reclaim storing pages in the heap) the
/// smallest power-of-two run, aligned to its size, that holds `bytes`: a
/// single frame for a small allocation. False when the frame allocator is
/// not up yet or has no such run free.
fn grow(bytes: usize) -> bool {
    let Some(frames) = frames::try_get() else {
        return false;
    };
    let pages = bytes.div_ceil(PAGE_SIZE as usize).next_power_of_two();
    // Slack for the buddy allocator's alignment of a large block.
    let big = (pages * 2).next_multiple_of(GROW_FRAMES);
    let run = frames
        .alloc_run_zeroed_unmovable(big, GROW_FRAMES)
        .map(|pa| (pa, big))
        .or_else(|| {
            frames
                .alloc_run_zeroed_unmovable(pages, pages)
                .map(|pa| (pa, pages))
        });
    let Some((pa, n)) = run else {
        return false;
    };
    let len = n * PAGE_SIZE as usize;
    // SAFETY: the frames are allocated to the heap for good (never freed),
    // identity mapped at EL2 as normal memory, and in no other use.
    unsafe {
        HEAP.heap
            .lock()
            .add_to_heap(pa.raw() as usize, pa.raw() as usize + len);
    }
    HEAP.grown.fetch_add(len, Ordering::Relaxed);
    true
}

/// (bytes in use, bytes the heap has now)
pub fn usage() -> (usize, usize) {
    let heap = HEAP.heap.lock();
    (heap.stats_alloc_actual(), heap.stats_total_bytes())
}

/// Bytes the heap took from the frame allocator.
pub fn grown() -> usize {
    HEAP.grown.load(Ordering::Relaxed)
}

/// Whether a guest-driven operation that allocates about `bytes` of heap (a
/// fork's VM and vCPU objects, a restore's vCPU copies, a fault's
/// bookkeeping) may go ahead. Rust's collections abort on exhaustion, so what
/// guests can drive is admitted only while a reserve stays free in the heap
/// itself: 1/8 of it, at least 1 MiB, covering operations already admitted
/// on other CPUs and the hypervisor's own needs (console, teardown). The
/// heap is grown first when frames allow, but guests may grow it only up to
/// 1/8 of RAM (`GUEST_HEAP_SHARE`): what they drive (forks, snapshots) then
/// runs into a bound before it eats the frames every VM needs, while the
/// hypervisor's own allocations may still grow it. A refused operation fails
/// with an error to the guest (SMCCC_NO_MEMORY, or a paused VM for a fault),
/// never with a panic.
pub fn guest_may_allocate(bytes: usize) -> bool {
    loop {
        let (used, total) = usage();
        let reserve = (total / 8).max(1 << 20);
        let need = used.saturating_add(bytes).saturating_add(reserve);
        if need <= total {
            return true;
        }
        let ram = frames::try_get().map_or(0, |f| f.total_count() * PAGE_SIZE as usize);
        if need > ram / GUEST_HEAP_SHARE || !grow(need - total) {
            return false;
        }
    }
}

/// Guest-driven heap growth stops at 1/GUEST_HEAP_SHARE of RAM.
const GUEST_HEAP_SHARE: usize = 8;
