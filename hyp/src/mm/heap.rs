//! The hypervisor heap: a fixed area reserved by the link map (qemu-virt.ld).

use buddy_system_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap<32> = LockedHeap::empty();

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
    unsafe { HEAP.lock().init(start, end - start) };
}

/// (bytes in use, bytes total)
pub fn usage() -> (usize, usize) {
    let heap = HEAP.lock();
    (heap.stats_alloc_actual(), heap.stats_total_bytes())
}

/// Whether a guest-driven operation that allocates about `bytes` of heap (a
/// fork's VM and vCPU objects, a restore's vCPU copies, a fault's
/// bookkeeping) may go ahead. The heap has a fixed size and Rust's
/// collections abort on exhaustion, so what guests can drive is admitted only
/// while a reserve stays free: 1/8 of the heap, at least 1 MiB, covering
/// operations already admitted on other CPUs and the hypervisor's own needs
/// (console, teardown). A refused operation fails with an error to the guest
/// (SMCCC_NO_MEMORY, or a paused VM for a fault), never with a panic.
pub fn guest_may_allocate(bytes: usize) -> bool {
    let (used, total) = usage();
    let reserve = (total / 8).max(1 << 20);
    used.saturating_add(bytes).saturating_add(reserve) <= total
}
