//! Stage-2 fault handling over the reverse map: demand-zero, copy-on-write (reuse a solely
//! owned frame by re-homing it, or copy), swap-in, and waiting out a migration entry.

use crate::backend::{CasError, FrameAllocator, PageState, Stage2, Stage2Locked, SwapStore};
use crate::lock::OrderedRwLock;
use crate::region::{Region, RegionList};
use crate::{Error, Ipa, Pfn, Rmap};

/// What the faulting vCPU does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The entry is now usable: re-enter the guest.
    Done,
    /// Someone else changed the entry, or it is a migration entry whose frame is locked:
    /// wait ([`Rmap::wait_frame_unlocked`]) and fault again.
    Retry(Option<Pfn>),
}

/// Broken variant (the swap-slot race of issue 12): a swap-in holds no slot reference of its
/// own, so MEM_RELEASE can free the slot, and its number be reused, under the fault.
const MUTATE_SWAP_IN_WITHOUT_REF: bool = cfg!(feature = "mutate-swap-in-without-ref");

/// Takes the swap-in's own reference on `slot` (false if the slot is free).
fn take_swap_ref<W: SwapStore>(swap: &W, slot: u64) -> bool {
    MUTATE_SWAP_IN_WITHOUT_REF || swap.try_dup(slot)
}

impl Rmap {
    /// Handles a stage-2 fault at `ipa` in the VM whose region list is `regions` (taken for
    /// read; briefly for write on the first fault of a region, to prepare its anon_vma).
    pub fn handle_fault<S: Stage2, A: FrameAllocator, W: SwapStore>(
        &self,
        regions: &OrderedRwLock<RegionList>,
        s2: &S,
        alloc: &A,
        swap: &W,
        ipa: Ipa,
        write: bool,
    ) -> Result<Fault, Error> {
        let ipa = ipa.page();
        {
            let list = regions.read();
            let region = list.find(ipa).ok_or(Error::NoRegion)?;
            if region.anon_vma().is_some() {
                return self.fault_locked(region, s2, alloc, swap, ipa, write);
            }
        }
        self.anon_vma_prepare(&mut regions.write(), ipa)?;
        Ok(Fault::Retry(None))
    }

    /// Handles a fault with the region list read-locked and the region's anon_vma prepared.
    pub fn fault_locked<S: Stage2, A: FrameAllocator, W: SwapStore>(
        &self,
        region: &Region,
        s2: &S,
        alloc: &A,
        swap: &W,
        ipa: Ipa,
        write: bool,
    ) -> Result<Fault, Error> {
        let entry = {
            let table = s2.lock();
            let entry = table.lookup(ipa);
            match entry {
                // Our own reference, taken while the lock shows the entry (so the slot is
                // live: the entry holds one): once we unlock, MEM_RELEASE may zap the entry
                // and drop its reference, and without ours the slot could be freed and
                // reused for another page while we load it (Linux's `do_swap_page` holds the
                // swap entry likewise, and re-checks `pte_same` before installing: our CAS).
                PageState::Swapped { slot } if !take_swap_ref(swap, slot) => {
                    return Ok(Fault::Retry(None))
                }
                _ => entry,
            }
        };
        match entry {
            PageState::Invalid => {
                self.fault_new_frame_from(region, s2, alloc, ipa, entry, None::<fn(Pfn)>)
            }
            PageState::Mapped {
                pfn,
                writable: false,
            } if write => self.fault_cow(region, s2, alloc, ipa, pfn),
            PageState::Mapped { .. } => Ok(Fault::Done),
            // A write to the zero page: a fresh zeroed frame of its own, as a first touch
            // (Linux's `wp_page_copy` of the zero pfn allocates a zeroed page, no copy); the
            // zero page holds no reference to drop. A read never faults on it.
            PageState::ZeroPage if write => {
                self.fault_new_frame_from(region, s2, alloc, ipa, entry, None::<fn(Pfn)>)
            }
            PageState::ZeroPage => Ok(Fault::Done),
            PageState::Migrating { pfn, .. } => Ok(Fault::Retry(Some(pfn))),
            PageState::Swapped { slot } => {
                let done = self.fault_swap(region, s2, alloc, swap, ipa, slot);
                // Our reference goes on every path, through `put_swap`: it may be the last
                // one besides the swap cache's, which must then let go too.
                if !MUTATE_SWAP_IN_WITHOUT_REF {
                    self.put_swap(slot, swap, alloc);
                }
                done
            }
        }
    }

    /// Swap-in of `slot` at `ipa` (Linux's `do_swap_page`); the caller holds a reference on
    /// the slot besides the entry's.
    fn fault_swap<S: Stage2, A: FrameAllocator, W: SwapStore>(
        &self,
        region: &Region,
        s2: &S,
        alloc: &A,
        swap: &W,
        ipa: Ipa,
        slot: u64,
    ) -> Result<Fault, Error> {
        // The entry's reference and ours: any more are other entries (or the cache, or other
        // faults): share one frame.
        let own = if MUTATE_SWAP_IN_WITHOUT_REF { 1 } else { 2 };
        if swap.refs(slot).is_some_and(|r| r > own) {
            return self.fault_swap_cached(region, s2, alloc, swap, ipa, slot);
        }
        let load = |pfn| swap.load(slot, pfn);
        let entry = PageState::Swapped { slot };
        let done = self.fault_new_frame_from(region, s2, alloc, ipa, entry, Some(load))?;
        if done == Fault::Done {
            // The replaced entry's reference.
            self.put_swap(slot, swap, alloc);
        }
        Ok(done)
    }

    /// Spins until `pfn`'s lock bit clears (a migration or reclaim finished).
    pub fn wait_frame_unlocked(&self, pfn: Pfn) {
        while self.frames.frame(pfn).is_locked() {
            crate::sync::spin_loop();
        }
    }

    /// A fresh exclusive frame replaces `old` at `ipa`: filled by `fill`, which overwrites
    /// all of it (a copy, a swap-in), or zeroed when there is none.
    fn fault_new_frame_from<S: Stage2, A: FrameAllocator>(
        &self,
        region: &Region,
        s2: &S,
        alloc: &A,
        ipa: Ipa,
        old: PageState,
        fill: Option<impl FnOnce(Pfn)>,
    ) -> Result<Fault, Error> {
        let pfn = match fill {
            Some(fill) => {
                let pfn = self.alloc_frame_to_overwrite(alloc)?;
                fill(pfn);
                pfn
            }
            None => self.alloc_frame(alloc)?,
        };
        self.add_new_anon_rmap(pfn, region, ipa, true);
        let new = PageState::Mapped {
            pfn,
            writable: true,
        };
        let installed = s2.lock().compare_exchange(ipa, old, new);
        if installed.is_err() {
            self.remove_rmap(pfn, alloc);
        }
        self.put_frame(pfn, alloc);
        cas_outcome(installed)
    }

    /// A write to a read-only (CoW) page. Linux's `do_wp_page`: a frame this region solely maps
    /// is re-homed to the region's own anon_vma and made writable; a shared one is copied.
    fn fault_cow<S: Stage2, A: FrameAllocator>(
        &self,
        region: &Region,
        s2: &S,
        alloc: &A,
        ipa: Ipa,
        pfn: Pfn,
    ) -> Result<Fault, Error> {
        let frame = self.frames.frame(pfn);
        if !frame.try_pin() {
            return Ok(Fault::Retry(None));
        }
        // Broken variant (lesson 2): the stage-2 lock (level 4) held while waiting for the
        // frame lock (level 2), against the one written order.
        #[cfg(feature = "mutate-lock-order")]
        let early = s2.lock();
        let guard = self.frames.lock(pfn);
        #[cfg(feature = "mutate-lock-order")]
        drop(early);
        let old = PageState::Mapped {
            pfn,
            writable: false,
        };
        let result = {
            let mut table = s2.lock();
            if table.lookup(ipa) != old {
                Ok(Fault::Retry(None))
            } else if frame.is_merged() {
                // Unmerge: a merged frame is never reused in place, even by its last mapper
                // (Linux copies KSM pages too): `Mapped{p, ro, merged} -> Mapped{q, rw}`.
                drop(table);
                self.cow_copy(region, s2, alloc, ipa, pfn, true)
            } else if self.frames.mapcount(pfn) == 1 && frame.refcount() == 2 {
                // Sole owner (one mapping, a block's included, plus our pin): reuse.
                let new = PageState::Mapped {
                    pfn,
                    writable: true,
                };
                // Checked under the lock, so only a table that cannot grow
                // (a block to split) fails here: out of memory.
                let installed = table.compare_exchange(ipa, old, new);
                // Re-homed only once the write is allowed, still under the
                // frame lock (walkers take it first): a block that could not
                // be split keeps its frames in one anon_vma, which a whole
                // block migration checks.
                if installed.is_ok() {
                    self.move_anon_rmap(&guard, region);
                }
                cas_outcome(installed)
            } else {
                drop(table);
                self.cow_copy(region, s2, alloc, ipa, pfn, false)
            }
        };
        drop(guard);
        self.put_frame(pfn, alloc);
        result
    }

    fn cow_copy<S: Stage2, A: FrameAllocator>(
        &self,
        region: &Region,
        s2: &S,
        alloc: &A,
        ipa: Ipa,
        pfn: Pfn,
        merged: bool,
    ) -> Result<Fault, Error> {
        let old = PageState::Mapped {
            pfn,
            writable: false,
        };
        let done = self.fault_new_frame_from(
            region,
            s2,
            alloc,
            ipa,
            old,
            Some(|new| alloc.copy(new, pfn)),
        )?;
        if done == Fault::Done {
            if merged {
                // Under the frame lock the caller holds: the writer's family item loses
                // this mapping, and goes with its last.
                self.merged_unmapped_locked(pfn, self.item_key(region, ipa));
            }
            self.drop_mapping(pfn, alloc);
        }
        Ok(done)
    }
}

/// A fault's installing change as the fault's outcome: done, retried when the entry changed
/// under it, and out of memory, as an error, when the table could not grow for it.
pub(crate) fn cas_outcome(installed: Result<(), CasError>) -> Result<Fault, Error> {
    match installed {
        Ok(()) => Ok(Fault::Done),
        Err(CasError::Changed(_)) => Ok(Fault::Retry(None)),
        Err(CasError::NoMemory) => Err(Error::OutOfFrames),
    }
}
