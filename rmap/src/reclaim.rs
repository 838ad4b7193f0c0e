//! Reclaim (Linux's `shrink_folio_list` for one anonymous folio): unmap every mapping into a
//! migration entry (faults wait), write the contents to the swap store while no VM can write,
//! replace the migration entries with swap entries, free the frame. Swap-in is in `fault`.

use crate::backend::{FrameAllocator, PageState, SwapStore, VmSet};
use crate::{Error, Pfn, Rmap};

impl Rmap {
    /// Pushes `pfn` out to `swap`; returns the slot. Skips (`Busy`) a frame that is locked or
    /// mapped in a temporary region.
    pub fn reclaim_frame<V: VmSet, A: FrameAllocator, W: SwapStore>(
        &self,
        vms: &V,
        alloc: &A,
        swap: &W,
        pfn: Pfn,
    ) -> Result<u64, Error> {
        let frame = self.frames.get(pfn).ok_or(Error::NotMapped)?;
        if !frame.try_pin() {
            return Err(Error::NotMapped);
        }
        let result = self.reclaim_pinned(vms, alloc, swap, pfn);
        self.put_frame(pfn, alloc);
        result
    }

    fn reclaim_pinned<V: VmSet, A: FrameAllocator, W: SwapStore>(
        &self,
        vms: &V,
        alloc: &A,
        swap: &W,
        pfn: Pfn,
    ) -> Result<u64, Error> {
        // Reclaim never waits for a frame lock: someone busy with the frame wants it resident.
        let guard = self.frames.try_lock(pfn).ok_or(Error::Busy)?;
        if guard.frame().is_merged() {
            return self.reclaim_merged(&guard, vms, alloc, swap);
        }
        let pin = self.get_anon_vma(pfn).ok_or(Error::NotMapped)?;
        let frame = self.frames.frame(pfn);
        if frame.pinned_by_others() {
            return Err(Error::Busy);
        }
        let index = frame.index();
        self.unmap_to_migration(&pin, index, pfn, vms)?;
        let Some(slot) = swap.store(pfn) else {
            self.remove_migration_entries(&pin, index, pfn, vms, |writable| {
                self.add_anon_rmap(pfn);
                PageState::Mapped { pfn, writable }
            });
            return Err(Error::OutOfSwap);
        };
        self.remove_migration_entries(&pin, index, pfn, vms, |_| {
            swap.dup(slot);
            PageState::Swapped { slot }
        });
        // The store's own reference: the entries may have been faulted into the swap cache
        // already.
        self.put_swap(slot, swap, alloc);
        Ok(slot)
    }
}
