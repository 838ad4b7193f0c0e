//! Folios: a 2 MiB run of frames allocated as one (a huge first touch) and mapped by stage-2
//! block entries, with a folio-level count of those entries (Linux's `_entire_mapcount` of a
//! THP), so a fork, teardown or migration of a block changes one count per mapper, not 512.
//!
//! The entire mapcount `E` (how many block entries map the folio whole) lives in the spare
//! bits of the first tail frame's `flags` (Linux keeps it in the first tail page too), so a
//! frame's record stays 16 bytes; it is 0 in every frame that is not a folio's first tail.
//! While `E > 0` every frame of the folio carries **one share** in its own mapcount and
//! refcount on behalf of all the block entries together, so no frame is freed while any
//! block maps it, and per-frame pins and page mappings work as before:
//!
//! - `mapcount(page) = own + E`, where the stored mapcount is `own + 1` while `E > 0`
//!   ([`FrameTable::mapcount`]); `refcount - mapcount` (pins) is unchanged by the share.
//! - first touch: each frame gets the share (one mapping, as before), then `E = 1`;
//! - fork of a block entry: `E += 1`; teardown of one: `E -= 1` ([`FrameTable::try_map_entire`],
//!   [`crate::Rmap::remove_block_rmap`]); the last one drops the 512 shares (the only per-frame
//!   work, once per folio lifetime, where frames reaching zero are freed);
//! - a split of one mapper's block entry ([`FrameTable::split_entire`], called by the stage 2
//!   that splits it) moves that mapper's part to the 512 per-page counts: `+1` on each, then
//!   `E -= 1`; the last block mapper's split instead takes over the share (`E: 1 -> 0`).
//!
//! Readers see a transient over-count only (counts are raised before `E` drops, and a share
//! is dropped after `E` reaches 0), so the copy-on-write reuse test (`mapcount == 1`) can
//! copy needlessly but never reuse a frame another VM still maps.

use crate::frame::{Frame, FrameTable, ENTIRE_SHIFT};
use crate::Pfn;

/// Frames in a folio (one 2 MiB block).
pub const FOLIO_PAGES: u64 = 512;

/// The most block entries one folio may have (the spare bits of a `flags` word); a fork past
/// it maps the child's copy page by page, with per-page counts.
pub const ENTIRE_MAX: u32 = (u16::MAX >> ENTIRE_SHIFT) as u32;

impl FrameTable {
    /// The frame holding the entire mapcount of the folio `pfn` would belong to.
    fn entire_frame(&self, pfn: Pfn) -> Option<&Frame> {
        self.get(Pfn::new(pfn.raw() & !(FOLIO_PAGES - 1)) + 1)
    }

    /// How many block entries map the folio holding `pfn` whole (0: none, or not a folio).
    pub fn entire_mapcount(&self, pfn: Pfn) -> u32 {
        self.entire_frame(pfn).map_or(0, Frame::entire_bits)
    }

    /// How many stage-2 entries map `pfn`: its own page mappings plus every block entry
    /// mapping its folio (see the module documentation).
    pub fn mapcount(&self, pfn: Pfn) -> u32 {
        let entire = self.entire_mapcount(pfn);
        self.frame(pfn).mapcount() + entire.saturating_sub(1)
    }

    /// Makes the 512 frames from `head`, each already holding one mapping (the share), a
    /// folio mapped by one block entry. Nobody else can see the frames yet.
    pub(crate) fn start_folio(&self, head: Pfn) {
        debug_assert!(head.is_aligned(FOLIO_PAGES), "a folio starts 2 MiB-aligned");
        let started = self.frame(head + 1).cas_entire_bits(0, 1);
        assert!(started, "a new folio has no block entry");
    }

    /// Counts one more block entry of the folio at `head` (a fork child's copy of a parent's
    /// block). False, with nothing counted, at `limit` entries (or [`ENTIRE_MAX`]), or if no
    /// block entry maps it (the caller's block was split: it is not a folio mapping). With
    /// page mappings held to `limit` on each frame too, a page's mapcount stays within twice
    /// [`crate::MAP_LIMIT`], which 16 bits hold (a swap slot's references, which a swap-in
    /// maps, included).
    pub(crate) fn try_map_entire(&self, head: Pfn, limit: u32) -> bool {
        let frame = self.frame(head + 1);
        loop {
            let e = frame.entire_bits();
            if e == 0 || e >= limit.min(ENTIRE_MAX) {
                return false;
            }
            if frame.cas_entire_bits(e, e + 1) {
                return true;
            }
        }
    }

    /// Drops one block entry of the folio at `head`; true if it was the last, and the caller
    /// must drop the 512 shares.
    #[must_use]
    pub(crate) fn unmap_entire(&self, head: Pfn) -> bool {
        let frame = self.frame(head + 1);
        loop {
            let e = frame.entire_bits();
            assert!(e > 0, "folio {head:#x}: entire mapcount underflow");
            if frame.cas_entire_bits(e, e - 1) {
                return e == 1;
            }
        }
    }

    /// A stage 2 split a block entry mapping the folio at `head` into 512 page entries (under
    /// that VM's stage-2 lock, before any of the pages changes): that mapping now counts page
    /// by page. Never frees a frame (the mapping being split keeps each one).
    pub fn split_entire(&self, head: Pfn) {
        let frame = self.frame(head + 1);
        if frame.cas_entire_bits(1, 0) {
            return; // the last block entry: its pages keep the share as their own mapping
        }
        // Others map it as a block: count ours page by page first, so no reader (nor a
        // concurrent last unmap dropping the shares) sees a page under-counted.
        head.run(FOLIO_PAGES).for_each(|p| self.frame(p).inc_map());
        if self.unmap_entire(head) {
            // The others went meanwhile: the shares are ours to drop; our own counts stay.
            for p in head.run(FOLIO_PAGES) {
                let last = self.frame(p).dec_map();
                assert!(!last, "the split mapping keeps frame {p:#x}");
            }
        }
    }
}

#[cfg(test)]
mod storage_tests {
    //! Tables in given memory, and their views (a stage 2 reports block splits through one).
    use super::*;
    use crate::frame::Frame;
    use alloc::vec::Vec;
    use core::mem::MaybeUninit;

    #[test]
    fn a_table_in_given_memory_covers_exactly_that_memory() {
        let memory: &'static mut [MaybeUninit<Frame>] =
            Vec::leak((0..5).map(|_| MaybeUninit::uninit()).collect::<Vec<_>>());
        let table = FrameTable::in_memory(Pfn::new(100), memory);
        assert_eq!(table.len(), 5);
        assert!(table.get(Pfn::new(99)).is_none());
        assert!(table.get(Pfn::new(105)).is_none());
        assert_eq!(table.frame(Pfn::new(104)).mapcount(), 0);
        assert_eq!(
            table.iter().map(|(pfn, _)| pfn).collect::<Vec<_>>(),
            Pfn::new(100).run(5).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_view_sees_the_same_frames_and_a_heap_table_has_none() {
        let table = FrameTable::leaked(Pfn::new(FOLIO_PAGES), 2 * FOLIO_PAGES as usize);
        let view = table.view().expect("given memory");
        let head = Pfn::new(FOLIO_PAGES);
        head.run(FOLIO_PAGES).for_each(|p| {
            table.frame(p).init_allocated();
            table.frame(p).inc_map();
        });
        table.start_folio(head);
        assert_eq!(view.entire_mapcount(head + 511), 1);
        view.split_entire(head);
        assert_eq!(table.entire_mapcount(head), 0);
        assert_eq!(table.mapcount(head + 3), 1);
        assert!(FrameTable::new(head, 1).view().is_none());
    }
}
