//! Adding and removing a frame's reverse mapping (Linux's `folio_add_new_anon_rmap`,
//! `__page_set_anon_rmap`, `folio_remove_rmap_pte`, `folio_move_anon_rmap`), and the frame
//! lifetime around them.

use crate::backend::FrameAllocator;
use crate::folio::FOLIO_PAGES;
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

    /// Pins `pfn` for a reader outside the stage-2 lock it found the frame under (a save
    /// reading a frozen snapshot's pages): migration, reclaim and merging leave a frame pinned
    /// by others where it is (`Skip::Pinned`), and one that is unmapped meanwhile is not freed
    /// before the pin's [`Rmap::put_frame`]. False if `pfn` is not a frame of the table or is
    /// free; the caller holds a stage-2 lock under which `pfn` is mapped, so it is not.
    pub fn pin_frame(&self, pfn: Pfn) -> bool {
        self.frames.get(pfn).is_some_and(|f| f.try_pin())
    }

    /// Drops a pin or mapping reference; the last one returns the frame to `alloc`.
    pub fn put_frame(&self, pfn: Pfn, alloc: &impl FrameAllocator) {
        if self.frames.frame(pfn).put() {
            self.free_frame(pfn, alloc);
        }
    }

    /// The last reference of `pfn` went: a merged frame's stable node goes with it.
    pub(crate) fn free_frame(&self, pfn: Pfn, alloc: &impl FrameAllocator) {
        let frame = self.frames.frame(pfn);
        if frame.is_merged() {
            self.release_stable(frame);
        }
        frame.clear();
        alloc.free(pfn);
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

    /// Records `pages` ([`FOLIO_PAGES`]) new frames starting at `pfn` that one block entry maps
    /// at consecutive IPAs from `ipa` in `region` (a 2 MiB first touch, Linux's huge anonymous
    /// fault, `folio_add_new_anon_rmap` of a THP): each frame becomes an exclusive anonymous
    /// page with its own index, holding the folio's share, and the folio's entire mapcount
    /// counts the block entry (`crate::folio`), so later CoW, migration and reclaim work page
    /// by page after a split. The frames come zeroed from the caller's allocator and are not
    /// yet visible.
    pub fn add_new_anon_block(&self, pfn: Pfn, pages: u64, region: &Region, ipa: Ipa) {
        assert_eq!(pages, FOLIO_PAGES, "a block maps one folio");
        for i in 0..pages {
            let frame = self.frames.frame(pfn + i);
            frame.init_allocated();
            self.add_new_anon_rmap(pfn + i, region, ipa + i * crate::PAGE_SIZE, true);
            let last = frame.put();
            debug_assert!(!last, "a mapped frame keeps its reference");
        }
        self.frames.start_folio(pfn);
    }

    /// Undoes [`Rmap::add_new_anon_block`] when the block entry could not be installed.
    pub fn remove_new_anon_block(&self, pfn: Pfn, pages: u64, alloc: &impl FrameAllocator) {
        debug_assert_eq!(pages, FOLIO_PAGES);
        self.remove_block_rmap(pfn, alloc);
    }

    /// Drops one block entry mapping the folio at `head` whole (its leaf cleared and its TLB
    /// entry invalidated): one count; the last block entry drops the folio's per-frame
    /// shares, freeing the frames nothing else maps (Linux's `folio_remove_rmap_pmd`).
    pub fn remove_block_rmap(&self, head: Pfn, alloc: &impl FrameAllocator) {
        if self.frames.unmap_entire(head) {
            head.run(FOLIO_PAGES)
                .for_each(|p| self.drop_mapping(p, alloc));
        }
    }

    /// Records one more mapping of an already-anonymous frame (fork, migration restore,
    /// snapshot restore). For a merged frame this does not know the mapping's family: the
    /// node's counts become inexact (`dirty`) until the next recount.
    pub fn add_anon_rmap(&self, pfn: Pfn) {
        let frame = self.frames.frame(pfn);
        frame.inc_map();
        if frame.is_merged() {
            self.merged_blind(pfn);
        }
    }

    /// Records one more mapping, at `ipa` in `region`, of a frame another VM of the region's
    /// family maps (snapshot restore installing the snapshot's frame, with the frame lock
    /// held): a merged frame's family item counts it.
    pub fn add_rmap_at(&self, pfn: Pfn, region: &Region, ipa: Ipa) {
        let frame = self.frames.frame(pfn);
        frame.inc_map();
        if frame.is_merged() {
            self.merged_count(pfn, self.item_key(region, ipa), true);
        }
    }

    /// Takes back an [`Rmap::add_rmap_at`] whose mapping was not installed (the other VM
    /// still maps the frame, so this never frees it).
    pub fn unadd_rmap_at(&self, pfn: Pfn, region: &Region, ipa: Ipa) {
        let frame = self.frames.frame(pfn);
        if frame.is_merged() {
            self.merged_count(pfn, self.item_key(region, ipa), false);
        }
        let last = frame.dec_map();
        debug_assert!(!last, "another mapping keeps the frame");
    }

    /// Drops one mapping; the last reference frees the frame. For a merged frame this does
    /// not know the mapping's family: prefer [`Rmap::remove_rmap_at`], which keeps the
    /// item counts exact.
    pub fn remove_rmap(&self, pfn: Pfn, alloc: &impl FrameAllocator) {
        if self.frames.frame(pfn).is_merged() {
            self.merged_blind(pfn);
        }
        self.drop_map(pfn, alloc);
    }

    /// Drops the mapping that was at `ipa` in `region` (its leaf already cleared and its TLB
    /// entry invalidated): for a merged frame, also its family's share of the frame, under
    /// the frame lock (level 2; the caller holds at most the region list), so the family's
    /// item goes with its last mapping. Otherwise as [`Rmap::remove_rmap`].
    pub fn remove_rmap_at(&self, pfn: Pfn, region: &Region, ipa: Ipa, alloc: &impl FrameAllocator) {
        let frame = self.frames.frame(pfn);
        if !frame.is_merged() {
            return self.drop_map(pfn, alloc);
        }
        let pinned = frame.try_pin();
        debug_assert!(pinned, "the mapping being dropped holds a reference");
        {
            let _guard = self.frames.lock(pfn);
            self.merged_unmapped_locked(pfn, self.item_key(region, ipa));
            let last = frame.dec_map();
            debug_assert!(!last, "our pin keeps the frame");
        }
        self.put_frame(pfn, alloc);
    }

    /// Drops one mapping whose item, for a merged frame, the caller already updated.
    pub(crate) fn drop_mapping(&self, pfn: Pfn, alloc: &impl FrameAllocator) {
        if self.frames.frame(pfn).dec_map() {
            self.free_frame(pfn, alloc);
        }
    }

    /// Drops one mapping of a frame that was not merged when the caller looked. If a merge
    /// made it merged meanwhile, the merge may have counted this mapping in an item: the
    /// counts are marked inexact.
    fn drop_map(&self, pfn: Pfn, alloc: &impl FrameAllocator) {
        let frame = self.frames.frame(pfn);
        if frame.dec_map() {
            self.free_frame(pfn, alloc);
        } else if frame.is_merged() {
            self.merged_blind(pfn);
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
        debug_assert!(
            self.frames.mapcount(frame.pfn()) <= 1,
            "re-homing a shared frame"
        );
        meta.set_anon(own, meta.index());
    }
}
