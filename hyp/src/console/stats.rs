//! `stats`: every counter the operator sees, in one place.

use crate::mm::frames;
use crate::mm::glue::{rmap, STORE};
use crate::mm::memctl;
use core::sync::atomic::Ordering;

/// `stats`: frames, rmap objects, heap, VMs, then the memory manager's
/// counters.
pub fn print() {
    let frames = crate::mm::frames::get();
    let (heap_used, heap_total) = crate::mm::heap::usage();
    let rmap = crate::mm::glue::rmap();
    let shared = crate::mm::glue::shared_frames();
    crate::println!(
        "frames: {} free / {} total ({} used, {} shared)\nanon_vmas: {}  chains: {}  swap slots: {}\nheap: {} / {} bytes\nvms: {}",
        frames.free_count(),
        frames.total_count(),
        frames.total_count() - frames.free_count(),
        shared,
        rmap.live_anon_vmas(),
        rmap.live_chains(),
        crate::mm::glue::STORE.used_slots(),
        heap_used,
        heap_total,
        crate::vm::count()
    );
    // What the hypervisor keeps about memory and VMs: the frame table (in
    // frames of its own) and the heap (frame bitmaps, rmap pools, dirty logs,
    // VM objects).
    let ram_frames = rmap.frames().len().max(1);
    let table = ram_frames * core::mem::size_of::<rmap::Frame>();
    crate::println!(
        "metadata: {} bytes per 4 KiB frame of RAM (frame table {} bytes, heap in use {} bytes, for {} frames; the heap grew {} bytes from frames)",
        (table + heap_used) / ram_frames,
        table,
        heap_used,
        ram_frames,
        crate::mm::heap::grown()
    );
    let (max, generation, rollovers) = crate::mm::memory::vmid_stats();
    crate::println!(
        "vmids: 1..={max}, generation {generation}, rollovers {rollovers}; invalidations skipped for VMs that never ran: {}",
        crate::mm::memory::NO_VMID_FLUSHES.load(Ordering::Relaxed)
    );
    memory();
}

/// The memory lines of `stats`.
fn memory() {
    let (offline, offline_free) = frames::get().offline_count();
    let (low, high) = memctl::watermarks();
    crate::println!(
        "memory: migrated {}  reclaimed {}  stored {}  zero-mapped {}  swapped-in {}\n{}\nstore: {} slots, {} bytes, {} zero entries, {} in the swap cache; offline frames: {} ({} free); watermarks {}/{} (runs {}); split reserve {} frames; heap {} frames; guest frames from {:#x}",
        memctl::MIGRATED.load(Ordering::Relaxed),
        memctl::RECLAIMED.load(Ordering::Relaxed),
        STORE.stored.load(Ordering::Relaxed),
        STORE.zero_mapped.load(Ordering::Relaxed),
        STORE.swapped_in.load(Ordering::Relaxed),
        tlb_line(),
        STORE.used_slots(),
        STORE.bytes.load(Ordering::Relaxed),
        STORE.zero_refs(),
        rmap().swap_cache_entries().len(),
        offline,
        offline_free,
        low,
        high,
        memctl::WATERMARK_RUNS.load(Ordering::Relaxed),
        crate::mm::memory::reserve_len(),
        crate::mm::heap::grown() / crate::mm::frames::PAGE_SIZE as usize,
        frames::get().first_free(),
    );
}

/// How many stage-2 TLB invalidations stayed on one CPU (the VM had never
/// been loaded elsewhere) and how many were broadcast.
pub fn tlb_line() -> alloc::string::String {
    alloc::format!(
        "stage-2 TLB invalidations: {} on one CPU, {} broadcast",
        crate::mm::memory::LOCAL_FLUSHES.load(Ordering::Relaxed),
        crate::mm::memory::BROADCAST_FLUSHES.load(Ordering::Relaxed)
    )
}
