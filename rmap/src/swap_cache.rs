//! The swap cache (Linux's, for anonymous pages): a stored page that several entries refer to
//! is read back into one frame, which every VM that faults on one of those entries then maps
//! (read-only, shared, copy-on-write as before it was reclaimed), instead of each VM getting
//! its own copy. The cache holds a pin on the frame and a reference on the slot; both go when
//! no swap entry refers to the slot any more ([`Rmap::put_swap`]).
//!
//! The cache lock is at the allocator's level (innermost): it is held only to look up, insert
//! or remove an entry and to pin the frame found, never while calling out.

use crate::backend::{FrameAllocator, PageState, Stage2, Stage2Locked, SwapStore};
use crate::fault::Fault;
use crate::lock::{Level, OrderedMutex};
use crate::region::Region;
use crate::{Error, Ipa, Pfn, Rmap};
use alloc::collections::btree_map::{BTreeMap, Entry};
use alloc::vec::Vec;

/// Stored slot → the frame holding its contents.
pub(crate) struct SwapCache(OrderedMutex<BTreeMap<u64, Pfn>>);

impl Default for SwapCache {
    fn default() -> Self {
        SwapCache(OrderedMutex::new(
            Level::ALLOCATOR,
            "swap_cache",
            BTreeMap::new(),
        ))
    }
}

impl Rmap {
    /// Drops one swap entry's reference on `slot` (an entry replaced or zapped). When only the
    /// cache's own reference is left, the cache lets go of the slot and of its frame.
    pub fn put_swap<W: SwapStore, A: FrameAllocator>(&self, slot: u64, swap: &W, alloc: &A) {
        swap.put(slot);
        if swap.refs(slot) != Some(1) {
            return;
        }
        let cached = self.swap_cache.0.lock().remove(&slot);
        if let Some(pfn) = cached {
            swap.put(slot);
            self.put_frame(pfn, alloc);
        }
    }

    /// Every (slot, frame) in the swap cache (for `stats` and the host invariant checks).
    pub fn swap_cache_entries(&self) -> Vec<(u64, Pfn)> {
        self.swap_cache
            .0
            .lock()
            .iter()
            .map(|(&s, &p)| (s, p))
            .collect()
    }

    /// Swap-in of a slot other entries still refer to: find its frame in the cache (or read it
    /// into a new one and cache that), then map it read-only at `ipa` in place of the swap
    /// entry. A write then takes the copy-on-write path, as for any shared frame. The caller
    /// holds its own reference on the slot, so the slot cannot be freed and reused for another
    /// page (another VM's) while it is read and cached here.
    pub(crate) fn fault_swap_cached<S: Stage2, A: FrameAllocator, W: SwapStore>(
        &self,
        region: &Region,
        s2: &S,
        alloc: &A,
        swap: &W,
        ipa: Ipa,
        slot: u64,
    ) -> Result<Fault, Error> {
        let pfn = self.swap_cache_get_or_load(region, alloc, swap, ipa, slot)?;
        // One more mapping; our pin from the lookup is dropped below.
        self.add_anon_rmap(pfn);
        let old = PageState::Swapped { slot };
        let new = PageState::Mapped {
            pfn,
            writable: false,
        };
        let installed = s2.lock().compare_exchange(ipa, old, new);
        if installed.is_ok() {
            self.put_swap(slot, swap, alloc);
        } else {
            self.remove_rmap(pfn, alloc);
        }
        self.put_frame(pfn, alloc);
        crate::fault::cas_outcome(installed)
    }

    /// The cached frame of `slot`, pinned for the caller: found, or read in and inserted
    /// (a racing fault that inserted first wins, and our frame goes back).
    fn swap_cache_get_or_load<A: FrameAllocator, W: SwapStore>(
        &self,
        region: &Region,
        alloc: &A,
        swap: &W,
        ipa: Ipa,
        slot: u64,
    ) -> Result<Pfn, Error> {
        loop {
            if let Some(pfn) = self.swap_cache_get(slot) {
                return Ok(pfn);
            }
            let pfn = self.alloc_frame_to_overwrite(alloc)?;
            swap.load(slot, pfn);
            // Shared by every VM that still has an entry for the slot: the oldest anon_vma
            // of the family, which every region that can hold such an entry is linked to.
            let own = region.anon_vma().expect("anon_vma_prepare before mapping");
            let frame = self.frames.frame(pfn);
            frame.set_anon(self.anon(own).root(), region.index_of(ipa));
            swap.dup(slot); // the cache's reference, taken before the entry is visible
            let inserted = match self.swap_cache.0.lock().entry(slot) {
                Entry::Vacant(e) => {
                    e.insert(pfn);
                    true
                }
                Entry::Occupied(_) => false,
            };
            if inserted {
                // The allocation's reference is the cache's pin; take the caller's.
                let pinned = frame.try_pin();
                debug_assert!(pinned, "a cached frame is allocated");
                return Ok(pfn);
            }
            swap.put(slot); // the fault's own reference still holds the slot
            self.put_frame(pfn, alloc);
        }
    }

    /// The cached frame of `slot`, pinned, if any.
    fn swap_cache_get(&self, slot: u64) -> Option<Pfn> {
        let cache = self.swap_cache.0.lock();
        let pfn = *cache.get(&slot)?;
        // The cache's own pin keeps it allocated while we hold the lock.
        let pinned = self.frames.frame(pfn).try_pin();
        debug_assert!(pinned, "a cached frame is allocated");
        Some(pfn)
    }
}
