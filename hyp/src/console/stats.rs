//! `stats`: every counter the operator sees, in one place.

use crate::console::reply::Reply;
use crate::mm::frames;
use crate::mm::glue::{rmap, STORE};
use crate::mm::memctl;
use core::sync::atomic::Ordering;

/// `stats`: frames, rmap objects, heap, VMs, then the memory manager's
/// counters.
pub fn print(r: &mut Reply) {
    let frames = crate::mm::frames::get();
    let (heap_used, heap_total) = crate::mm::heap::usage();
    let rmap = crate::mm::glue::rmap();
    let (free, total) = (frames.free_count(), frames.total_count());
    let shared = crate::mm::glue::shared_frames();
    let (anon_vmas, chains) = (rmap.live_anon_vmas(), rmap.live_chains());
    let (slots, vms) = (crate::mm::glue::STORE.used_slots(), crate::vm::count());
    crate::say!(
        r,
        "frames: {free} free / {total} total ({} used, {shared} shared)\nanon_vmas: {anon_vmas}  chains: {chains}  swap slots: {slots}\nheap: {heap_used} / {heap_total} bytes\nvms: {vms}",
        total - free,
    );
    r.set("frames_free", free);
    r.set("frames_total", total);
    r.set("frames_used", total - free);
    r.set("frames_shared", shared);
    r.set("anon_vmas", anon_vmas);
    r.set("chains", chains);
    r.set("swap_slots", slots);
    r.set("heap_used", heap_used);
    r.set("heap_total", heap_total);
    r.set("vms", vms);
    // What the hypervisor keeps about memory and VMs: the frame table (in
    // frames of its own) and the heap (frame bitmaps, rmap pools, dirty logs,
    // VM objects).
    let ram_frames = rmap.frames().len().max(1);
    let table = ram_frames * core::mem::size_of::<rmap::Frame>();
    let grown = crate::mm::heap::grown();
    crate::say!(
        r,
        "metadata: {} bytes per 4 KiB frame of RAM (frame table {table} bytes, heap in use {heap_used} bytes, for {ram_frames} frames; the heap grew {grown} bytes from frames)",
        (table + heap_used) / ram_frames,
    );
    r.set("metadata_bytes_per_frame", (table + heap_used) / ram_frames);
    r.set("frame_table_bytes", table);
    r.set("heap_grown", grown);
    r.set("ram_frames", ram_frames);
    let (max, generation, rollovers) = crate::mm::memory::vmid_stats();
    let skipped = crate::mm::memory::NO_VMID_FLUSHES.load(Ordering::Relaxed);
    crate::say!(
        r,
        "vmids: 1..={max}, generation {generation}, rollovers {rollovers}; invalidations skipped for VMs that never ran: {skipped}",
    );
    r.set("vmid_max", max);
    r.set("vmid_generation", generation);
    r.set("vmid_rollovers", rollovers);
    r.set("vmid_flushes_skipped", skipped);
    memory(r);
    crate::console::merge::stats(r);
}

/// The memory lines of `stats`.
fn memory(r: &mut Reply) {
    let (offline, offline_free) = frames::get().offline_count();
    let (low, high) = memctl::watermarks();
    let migrated = memctl::MIGRATED.load(Ordering::Relaxed);
    let folios = memctl::FOLIOS_MIGRATED.load(Ordering::Relaxed);
    let reclaimed = memctl::RECLAIMED.load(Ordering::Relaxed);
    let stored = STORE.stored.load(Ordering::Relaxed);
    let zero_mapped = STORE.zero_mapped.load(Ordering::Relaxed);
    let swapped_in = STORE.swapped_in.load(Ordering::Relaxed);
    let (slots, bytes) = (STORE.used_slots(), STORE.bytes.load(Ordering::Relaxed));
    let swap_cache = rmap().swap_cache_entries().len();
    crate::say!(
        r,
        "memory: migrated {migrated}  reclaimed {reclaimed}  stored {stored}  zero-mapped {zero_mapped}  swapped-in {swapped_in}  migrated-as-blocks {folios}\n{}\nstore: {slots} slots, {bytes} bytes, {} zero entries, {swap_cache} in the swap cache; offline frames: {offline} ({offline_free} free); watermarks {low}/{high} (runs {}); split reserve {} frames; zero page {} frames; heap {} frames; guest frames from {:#x}",
        tlb_line(),
        STORE.zero_refs(),
        memctl::WATERMARK_RUNS.load(Ordering::Relaxed),
        crate::mm::memory::reserve_len(),
        u64::from(crate::mm::memory::zero_page().is_some()),
        crate::mm::heap::grown() / crate::mm::frames::PAGE_SIZE as usize,
        frames::get().first_free(),
    );
    for (key, value) in [
        ("migrated", migrated),
        ("migrated_blocks", folios),
        ("reclaimed", reclaimed),
        ("stored", stored),
        ("zero_mapped", zero_mapped),
        ("swapped_in", swapped_in),
        ("store_bytes", bytes),
        ("swap_cache", swap_cache as u64),
        ("offline", offline as u64),
        ("offline_free", offline_free as u64),
        ("zero_refs", STORE.zero_refs()),
        ("split_reserve", crate::mm::memory::reserve_len() as u64),
        (
            "heap_frames",
            (crate::mm::heap::grown() / crate::mm::frames::PAGE_SIZE as usize) as u64,
        ),
        ("guest_frames_from", frames::get().first_free()),
        ("dma_frames", crate::dev::hal::dma_frames()),
        // The shared zero page's frame, held from boot (never freed).
        (
            "zero_page_frames",
            u64::from(crate::mm::memory::zero_page().is_some()),
        ),
        (
            "local_flushes",
            crate::mm::memory::LOCAL_FLUSHES.load(Ordering::Relaxed),
        ),
        (
            "broadcast_flushes",
            crate::mm::memory::BROADCAST_FLUSHES.load(Ordering::Relaxed),
        ),
    ] {
        r.set(key, value);
    }
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
