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
