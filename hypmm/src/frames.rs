//! Guest frames as rmap allocates them, and making what the hypervisor wrote
//! into a frame visible to the guest.

use crate::machine::Machine;
use crate::PAGE_SIZE;
use rmap::{FrameAllocator, Pa, Pfn};

/// Makes `pa..pa + len`, just written through the hypervisor's cacheable
/// map, visible to a guest whatever its stage-1 attributes (MMU off, Device):
/// cleaned to the PoC unless FEAT_S2FWB. Once per frame written, before a
/// guest can map (or, if mapped, read) it.
pub fn publish<M: Machine>(machine: &M, pa: Pa, len: u64) {
    stage2::publish_frames(&machine.config(), machine.tlb(), pa.raw(), len);
}

/// Rewrites `dst` with `src`'s bytes and publishes it (a restore in place).
///
/// # Safety
///
/// `dst` is a guest frame only a stopped VM maps, writable and alone, and
/// the caller holds that VM's stage-2 lock, which every other writer or
/// reader of the frame's contents (migration, reclaim, merging) takes before
/// it reads them; `src` is a distinct frame the caller has locked.
pub(crate) unsafe fn refill<M: Machine>(machine: &M, dst: Pa, src: Pa) {
    // SAFETY: the caller's contract is `copy_frame`'s "the caller's alone to
    // write" case.
    unsafe { machine.copy_frame(dst, src) };
    publish(machine, dst, PAGE_SIZE);
}

/// rmap's frame allocator over a machine's guest frames: every frame rmap
/// has zeroed or copied is published (rmap's contract: clean to the PoC on
/// return) before rmap can map it.
pub struct Frames<'a, M: Machine>(pub &'a M);

impl<M: Machine> FrameAllocator for Frames<'_, M> {
    fn alloc(&self) -> Option<Pfn> {
        self.0.alloc_frame().map(Pa::pfn)
    }

    /// A 2 MiB run for block migration (`Rmap::migrate_folio`), which copies
    /// into every frame (and publishes it) before any guest can map it.
    fn alloc_folio(&self) -> Option<Pfn> {
        let pages = rmap::folio::FOLIO_PAGES as usize;
        self.0.alloc_contiguous(pages).map(Pa::pfn)
    }

    fn free(&self, pfn: Pfn) {
        self.0.free_frame(pfn.pa())
    }

    fn free_folio(&self, head: Pfn) {
        self.0
            .free_contiguous(head.pa(), rmap::folio::FOLIO_PAGES as usize)
    }

    fn zero(&self, pfn: Pfn) {
        // SAFETY: rmap zeroes only a frame it just allocated and has not
        // mapped yet.
        unsafe { self.0.zero_frame(pfn.pa()) };
        publish(self.0, pfn.pa(), PAGE_SIZE);
    }

    fn copy(&self, dst: Pfn, src: Pfn) {
        // SAFETY: rmap copies into a frame it just allocated and owns, from
        // one it pinned for the copy (locked, or its writers replaced by
        // migration entries); the two are distinct.
        unsafe { self.0.copy_frame(dst.pa(), src.pa()) };
        // Not executable until the guest fetches from it (`memory::Fetch`):
        // the I-cache is made coherent then, not here.
        publish(self.0, dst.pa(), PAGE_SIZE);
    }

    fn same_contents(&self, a: Pfn, b: Pfn) -> bool {
        // SAFETY: rmap compares two frames it pinned and write-protected in every stage 2
        // (with the TLB invalidations done), holding both frame locks.
        unsafe { self.0.frames_equal(a.pa(), b.pa()) }
    }

    fn is_zero(&self, pfn: Pfn) -> bool {
        // SAFETY: rmap checks a frame it pinned and write-protected in every stage 2 (the
        // TLB invalidations done), holding its frame lock; the zero page is never written.
        unsafe { self.0.frames_equal(pfn.pa(), self.0.zero_page()) }
    }
}
