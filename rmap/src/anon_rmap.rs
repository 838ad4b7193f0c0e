//! Adding and removing a frame's reverse mapping (Linux's `folio_add_new_anon_rmap`,
//! `__page_set_anon_rmap`, `folio_remove_rmap_pte`, `folio_move_anon_rmap`), and the frame
//! lifetime around them.

use crate::backend::FrameAllocator;
use crate::frame::FrameGuard;
use crate::region::Region;
use crate::{Error, Ipa, Pfn, Rmap};

impl Rmap {
    /// A zeroed frame from `alloc`, returned with one pin (refcount 1) held by the caller.
    pub fn alloc_frame(&self, alloc: &impl FrameAllocator) -> Result<Pfn, Error> {
        let pfn = self.alloc_frame_to_overwrite(alloc)?;
        alloc.zero(pfn);
        Ok(pfn)
    }

    /// Like [`Rmap::alloc_frame`] without zeroing, for a caller that overwrites every byte
    /// before any VM can see the frame (a CoW copy, a swap-in).
    pub fn alloc_frame_to_overwrite(&self, alloc: &impl FrameAllocator) -> Result<Pfn, Error> {
        let pfn = alloc.alloc().ok_or(Error::OutOfFrames)?;
        self.frames.frame(pfn).init_allocated();
        Ok(pfn)
    }

    /// Drops a pin or mapping reference; the last one returns the frame to `alloc`.
    pub fn put_frame(&self, pfn: Pfn, alloc: &impl FrameAllocator) {
        let frame = self.frames.frame(pfn);
        if frame.put() {
            frame.clear();
            alloc.free(pfn);
        }
    }

    /// Records the first mapping of a frame nobody else can see yet, at `ipa` in `region`.
    /// An exclusive frame goes to the region's own anon_vma (the narrowest family member, so
    /// walks stay short); a frame that may be shared goes to the oldest one, the root, which
    /// every region of the family is linked to (lesson 3).
    pub fn add_new_anon_rmap(&self, pfn: Pfn, region: &Region, ipa: Ipa, exclusive: bool) {
        let own = region.anon_vma().expect("anon_vma_prepare before mapping");
        let anon_vma = if exclusive {
            own
        } else {
            self.anon(own).root()
        };
        let frame = self.frames.frame(pfn);
        frame.set_anon(anon_vma, region.index_of(ipa));
        frame.inc_map();
    }

    /// Records `pages` new frames starting at `pfn` that one block entry maps at consecutive
    /// IPAs from `ipa` in `region` (a 2 MiB first touch, Linux's huge anonymous fault): each
    /// frame becomes an exclusive anonymous page with its own index, exactly as if faulted
    /// one by one, so later CoW, migration and reclaim work page by page after a split.
    /// The frames come zeroed from the caller's allocator and are not yet visible.
    pub fn add_new_anon_block(&self, pfn: Pfn, pages: u64, region: &Region, ipa: Ipa) {
        for i in 0..pages {
            let frame = self.frames.frame(pfn + i);
            frame.init_allocated();
            self.add_new_anon_rmap(pfn + i, region, ipa + i * crate::PAGE_SIZE, true);
            let last = frame.put();
            debug_assert!(!last, "a mapped frame keeps its reference");
        }
    }

    /// Undoes [`Rmap::add_new_anon_block`] when the block entry could not be installed.
    pub fn remove_new_anon_block(&self, pfn: Pfn, pages: u64, alloc: &impl FrameAllocator) {
        for i in 0..pages {
            self.remove_rmap(pfn + i, alloc);
        }
    }

    /// Records one more mapping of an already-anonymous frame (fork, migration restore).
    pub fn add_anon_rmap(&self, pfn: Pfn) {
        self.frames.frame(pfn).inc_map();
    }

    /// Drops one mapping; the last reference frees the frame.
    pub fn remove_rmap(&self, pfn: Pfn, alloc: &impl FrameAllocator) {
        let frame = self.frames.frame(pfn);
        if frame.dec_map() {
            frame.clear();
            alloc.free(pfn);
        }
    }

    /// Re-homes a frame that `region` now solely maps to the region's own anon_vma, instead of
    /// copying it on a write after fork (Linux's `folio_move_anon_rmap`). Needs the frame lock,
    /// so a walker that already read the old anon_vma still finds the region: the region stays
    /// linked to every ancestor anon_vma.
    pub fn move_anon_rmap(&self, frame: &FrameGuard<'_>, region: &Region) {
        let own = region
            .anon_vma()
            .expect("region mapping a frame has an anon_vma");
        let meta = frame.frame();
        debug_assert!(meta.mapcount() <= 1, "re-homing a shared frame");
        meta.set_anon(own, meta.index());
    }
}
