//! Frame migration (Linux's `migrate_pages` for one anonymous folio): lock the frame, pin its
//! anon_vma, replace every mapping with a migration entry, copy, move the metadata, and replace
//! the migration entries with mappings of the new frame. Faults on a migration entry wait for
//! the frame lock. Reclaim reuses the first and last steps.

use crate::backend::{FrameAllocator, PageState, Stage2Locked, VmSet};
use crate::walk::{AnonRef, Mapper};
use crate::{Error, Pfn, Rmap};
use core::ops::ControlFlow;

impl Rmap {
    /// Moves the contents and mappings of `pfn` to a new frame; returns the new frame.
    /// `Busy` if the frame is mapped where the walk may not go (a temporary region).
    pub fn migrate_frame<V: VmSet, A: FrameAllocator>(
        &self,
        vms: &V,
        alloc: &A,
        pfn: Pfn,
    ) -> Result<Pfn, Error> {
        let frame = self.frames.get(pfn).ok_or(Error::NotMapped)?;
        if !frame.try_pin() {
            return Err(Error::NotMapped);
        }
        let result = self.migrate_pinned(vms, alloc, pfn);
        self.put_frame(pfn, alloc);
        result
    }

    fn migrate_pinned<V: VmSet, A: FrameAllocator>(
        &self,
        vms: &V,
        alloc: &A,
        pfn: Pfn,
    ) -> Result<Pfn, Error> {
        let guard = self.frames.lock(pfn);
        if guard.frame().is_merged() {
            return self.migrate_merged(&guard, vms, alloc);
        }
        let pin = self.get_anon_vma(pfn).ok_or(Error::NotMapped)?;
        let frame = self.frames.frame(pfn);
        if frame.pinned_by_others() {
            return Err(Error::Busy);
        }
        let index = frame.index();
        // Every byte is copied before any VM can see it: no need to zero it first.
        let new = self.alloc_frame_to_overwrite(alloc)?;
        let new_guard = self.frames.lock_fresh(new, false);
        if let Err(e) = self.unmap_to_migration(&pin, index, pfn, vms) {
            drop(new_guard);
            self.put_frame(new, alloc);
            return Err(e);
        }
        alloc.copy(new, pfn);
        let anon_vma = self
            .frame_anon_vma(frame)
            .expect("locked anon frame keeps its anon_vma");
        self.frames.frame(new).set_anon(anon_vma, index);
        self.remove_migration_entries(&pin, index, pfn, vms, |writable| {
            self.add_anon_rmap(new);
            PageState::Mapped { pfn: new, writable }
        });
        drop(new_guard);
        self.put_frame(new, alloc);
        Ok(new)
    }

    /// Replaces every mapping of the locked frame `pfn` with a migration entry (Linux's
    /// `try_to_migrate`). If some mapping could not be reached, puts them back and fails.
    pub(crate) fn unmap_to_migration<V: VmSet>(
        &self,
        pin: &AnonRef<'_>,
        index: u64,
        pfn: Pfn,
        vms: &V,
    ) -> Result<(), Error> {
        let frame = self.frames.frame(pfn);
        self.walk_pinned(
            pin,
            index,
            pfn,
            vms,
            |m: &Mapper, s2: &mut dyn Stage2Locked| {
                if let PageState::Mapped { writable, .. } = m.entry {
                    let migration = PageState::Migrating { pfn, writable };
                    // Refused only when a block holding the page cannot be split (no table
                    // page): that mapping stays, the mapcount says so, and we back off below.
                    if s2.compare_exchange(m.ipa, m.entry, migration).is_ok() {
                        let last = frame.dec_map();
                        debug_assert!(!last, "the migrator's pin keeps the frame");
                    }
                }
                ControlFlow::Continue(())
            },
        );
        if frame.mapcount() == 0 {
            return Ok(());
        }
        self.remove_migration_entries(pin, index, pfn, vms, |writable| {
            self.add_anon_rmap(pfn);
            PageState::Mapped { pfn, writable }
        });
        Err(Error::Busy)
    }

    /// Replaces every migration entry for `pfn` with `replacement(writable)` (Linux's
    /// `remove_migration_ptes`). The walk visits a fork child after its parent, so an entry
    /// a concurrent fork copies from a not-yet-visited parent is still found.
    pub(crate) fn remove_migration_entries<V: VmSet>(
        &self,
        pin: &AnonRef<'_>,
        index: u64,
        pfn: Pfn,
        vms: &V,
        mut replacement: impl FnMut(bool) -> PageState,
    ) {
        self.walk_pinned(
            pin,
            index,
            pfn,
            vms,
            |m: &Mapper, s2: &mut dyn Stage2Locked| {
                if let PageState::Migrating { writable, .. } = m.entry {
                    let new = replacement(writable);
                    s2.compare_exchange(m.ipa, m.entry, new)
                        .expect("stage-2 locked");
                }
                ControlFlow::Continue(())
            },
        );
    }
}
