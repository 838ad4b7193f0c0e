//! Migration and reclaim of a merged frame: the same protocol as for an anonymous frame
//! (`migrate.rs`, `reclaim.rs`), with the walk going item by item (`rmap_walk_ksm`), so
//! every mapper in every family is rewritten; no pinning shortcut.
//!
//! Locking: the frame lock (level 2) held throughout (so the item list stays as it is),
//! each item's family root read-locked (3) for its walk, each mapper's stage-2 lock (4),
//! the stable node (5) to count. Page states: `Mapped{p, ro} -> Migrating{p, ro}`
//! ([`Transition::Unmap`]), then `Migrating{p, ro} -> Mapped{q, ro, merged}`
//! ([`Transition::Remap`], the node moves to `q`), or `Migrating{p, ro} -> Swapped{s_k}`
//! ([`Transition::SwapOut`]) with one slot per item: a swap-in restores sharing within
//! each family (the swap cache) and gives each family its own copy.
//!
//! [`Transition::Unmap`]: mmtypes::Transition::Unmap
//! [`Transition::Remap`]: mmtypes::Transition::Remap
//! [`Transition::SwapOut`]: mmtypes::Transition::SwapOut

use crate::backend::{FrameAllocator, PageState, Stage2Locked, SwapStore, VmSet};
use crate::batch::Skip;
use crate::frame::FrameGuard;
use crate::ksm::{ItemHandle, ItemKey, StableNode};
use crate::walk::Mapper;
use crate::{Error, Pfn, Rmap};
use alloc::vec::Vec;
use core::ops::ControlFlow;

type Items = Vec<(ItemHandle, ItemKey)>;

impl Rmap {
    /// [`Rmap::migrate_frame`] of the locked merged frame.
    pub(crate) fn migrate_merged<V: VmSet, A: FrameAllocator>(
        &self,
        guard: &FrameGuard<'_>,
        vms: &V,
        alloc: &A,
    ) -> Result<Pfn, Error> {
        let (pfn, frame) = (guard.pfn(), guard.frame());
        let (node, items) = self.take_merged(guard)?;
        // Every byte is copied before any VM can see it: no need to zero it first.
        let new = self.alloc_frame_to_overwrite(alloc)?;
        let new_guard = self.frames.lock_fresh(new, false);
        if let Err(e) = self.unmap_merged(node, pfn, &items, vms) {
            drop(new_guard);
            self.put_frame(new, alloc);
            return Err(e);
        }
        alloc.copy(new, pfn);
        let slot = frame
            .stable_slot()
            .expect("locked merged frame keeps its node");
        frame.clear_stable();
        self.frames.frame(new).set_stable(slot);
        self.remap_merged(node, pfn, &items, vms, |_, writable| {
            self.frames.frame(new).inc_map();
            PageState::Mapped { pfn: new, writable }
        });
        self.prune_items(node);
        drop(new_guard);
        self.put_frame(new, alloc);
        Ok(new)
    }

    /// [`Rmap::reclaim_frame`] of the locked merged frame: one slot per item (family).
    /// Returns the first item's slot.
    pub(crate) fn reclaim_merged<V: VmSet, A: FrameAllocator, W: SwapStore>(
        &self,
        guard: &FrameGuard<'_>,
        vms: &V,
        alloc: &A,
        swap: &W,
    ) -> Result<u64, Error> {
        let pfn = guard.pfn();
        let (node, items) = self.take_merged(guard)?;
        let mut slots = Vec::new();
        slots.try_reserve(items.len()).map_err(|_| Error::Busy)?;
        self.unmap_merged(node, pfn, &items, vms)?;
        // Nothing maps the frame now, and the contents of a merged frame never change.
        for _ in &items {
            match swap.store(pfn) {
                Some(slot) => slots.push(slot),
                None => {
                    slots.into_iter().for_each(|s| swap.put(s));
                    self.remap_merged(node, pfn, &items, vms, |_, writable| {
                        self.frames.frame(pfn).inc_map();
                        PageState::Mapped { pfn, writable }
                    });
                    return Err(Error::OutOfSwap);
                }
            }
        }
        self.remap_merged(node, pfn, &items, vms, |k, _| {
            swap.dup(slots[k]);
            PageState::Swapped { slot: slots[k] }
        });
        // The store's own references: the entries are visible and may be faulted in.
        slots.iter().for_each(|&s| self.put_swap(s, swap, alloc));
        slots.first().copied().ok_or(Error::NotMapped)
    }

    /// The checks both moves make on a locked merged frame, and its node and items.
    fn take_merged<'a>(&'a self, guard: &FrameGuard<'a>) -> Result<(&'a StableNode, Items), Error> {
        let frame = guard.frame();
        if !frame.is_mapped() {
            return Err(Error::NotMapped);
        }
        if frame.pinned_by_others() {
            return Err(Error::Busy);
        }
        let node = self.stable_of(frame).ok_or(Error::NotMapped)?;
        let items = self.item_list(node).ok_or(Error::Busy)?;
        Ok((node, items))
    }

    /// Replaces every mapping of the locked merged frame with a migration entry, taking it
    /// off its item's count. If some mapping could not be reached, puts them back: `Busy`.
    /// When all went, no mapping is left for a fork to copy and count, so the counts are
    /// reset to exactly 0 (clearing any inexactness) for the walk that puts them back.
    fn unmap_merged<V: VmSet>(
        &self,
        node: &StableNode,
        pfn: Pfn,
        items: &Items,
        vms: &V,
    ) -> Result<(), Error> {
        let frame = self.frames.frame(pfn);
        self.walk_items(
            pfn,
            items,
            vms,
            |k, m: &Mapper, s2: &mut dyn Stage2Locked| {
                if let PageState::Mapped { writable, .. } = m.entry {
                    let migration = PageState::Migrating { pfn, writable };
                    if s2.compare_exchange(m.ipa, m.entry, migration).is_ok() {
                        let last = frame.dec_map();
                        debug_assert!(!last, "the migrator's pin keeps the frame");
                        self.uncount_item(node, items[k].0);
                    }
                }
                ControlFlow::Continue(())
            },
        );
        if frame.mapcount() == 0 {
            self.reset_counts(node);
            return Ok(());
        }
        self.remap_merged(node, pfn, items, vms, |_, writable| {
            frame.inc_map();
            PageState::Mapped { pfn, writable }
        });
        Err(Error::Busy)
    }

    /// Replaces every migration entry for `pfn` with `replacement(item, writable)`, counting
    /// the new mappings in their items. A fork child's copy of a migration entry is found
    /// too (it is in its parent's family).
    fn remap_merged<V: VmSet>(
        &self,
        node: &StableNode,
        pfn: Pfn,
        items: &Items,
        vms: &V,
        mut replacement: impl FnMut(usize, bool) -> PageState,
    ) {
        self.walk_items(
            pfn,
            items,
            vms,
            |k, m: &Mapper, s2: &mut dyn Stage2Locked| {
                if let PageState::Migrating { writable, .. } = m.entry {
                    let new = replacement(k, writable);
                    s2.compare_exchange(m.ipa, m.entry, new)
                        .expect("stage-2 locked");
                    if new.is_mapped() {
                        self.count_item(node, items[k].0, 1);
                    }
                }
                ControlFlow::Continue(())
            },
        );
    }

    /// Runs `one` on each frame of `pfns` the batch skipped as not anonymous that is merged.
    pub(crate) fn move_merged<T>(
        &self,
        pfns: &[Pfn],
        out: &mut [Result<T, Skip>],
        mut one: impl FnMut(Pfn) -> Result<T, Skip>,
    ) {
        for (k, &pfn) in pfns.iter().enumerate() {
            let merged = self.frames.get(pfn).is_some_and(|f| f.is_merged());
            if merged && matches!(out[k], Err(Skip::NotMapped)) {
                out[k] = one(pfn);
            }
        }
    }

    /// A batch's single merged frame: pinned and try-locked, never waited for.
    pub(crate) fn migrate_merged_try<V: VmSet, A: FrameAllocator>(
        &self,
        vms: &V,
        alloc: &A,
        pfn: Pfn,
    ) -> Result<Pfn, Skip> {
        self.with_merged_locked(pfn, alloc, |guard| self.migrate_merged(guard, vms, alloc))
    }

    /// As [`Rmap::migrate_merged_try`], reclaiming.
    pub(crate) fn reclaim_merged_try<V: VmSet, A: FrameAllocator, W: SwapStore>(
        &self,
        vms: &V,
        alloc: &A,
        swap: &W,
        pfn: Pfn,
    ) -> Result<u64, Skip> {
        self.with_merged_locked(pfn, alloc, |guard| {
            self.reclaim_merged(guard, vms, alloc, swap)
        })
    }

    fn with_merged_locked<T, A: FrameAllocator>(
        &self,
        pfn: Pfn,
        alloc: &A,
        f: impl FnOnce(&FrameGuard<'_>) -> Result<T, Error>,
    ) -> Result<T, Skip> {
        let frame = self.frames.frame(pfn);
        if !frame.try_pin() {
            return Err(Skip::NotMapped);
        }
        let result = match self.frames.try_lock(pfn) {
            None => Err(Skip::Locked),
            Some(guard) if !guard.frame().is_merged() => Err(Skip::NotMapped),
            Some(guard) => f(&guard).map_err(|e| match e {
                Error::OutOfFrames => Skip::NoMemory,
                Error::OutOfSwap => Skip::StoreFull,
                Error::Busy if frame.pinned_by_others() => Skip::Pinned,
                Error::Busy => Skip::Unreachable,
                _ => Skip::NotMapped,
            }),
        };
        self.put_frame(pfn, alloc);
        result
    }
}
