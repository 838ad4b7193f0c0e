//! Restoring a VM to a snapshot of it, with rmap's API, in the sequence `hyp/src/mm/restore.rs`
//! uses: chunks of leaves that differ from the snapshot are cleared under the VM's stage-2
//! lock (a block whole, never split), one VMID-wide invalidation, then what the cleared
//! leaves held is let go and the snapshot's entries are installed read-only and shared.
//! A frame is freed only once no leaf and no TLB entry can reach it, and a new valid entry
//! is written only where the old one was invalidated (break-before-make).
//!
//! The host has no dirty log: every page where either VM has a leaf is compared instead.

use super::{HostVm, HostWorld};
use crate::backend::{CasError, PageState, Stage2, Stage2Locked, SwapStore};
use crate::region::Region;
use crate::{Error, Ipa, PAGE_SIZE};
use alloc::vec::Vec;
use core::ops::Range;

/// Leaves cleared between two TLB invalidations (as hyp's `restore::CHUNK`).
const CHUNK: usize = 64;

/// A cleared leaf: first IPA, page count, entry of its first page.
type Cleared = (Ipa, u64, PageState);

impl HostWorld {
    /// Makes every page of `vm` its snapshot `snap`'s again: `snap` must be a fork of `vm`
    /// that never ran (so its frames are in anon_vmas `vm`'s regions are linked to). The
    /// caller keeps `vm`'s vCPUs out (hyp quiesces the VM). `NoRegion` if the snapshot is
    /// gone; `OutOfFrames` if an entry could not be installed (no table page): the pages
    /// not yet done are left invalid, and a later restore finishes them.
    pub fn restore(&self, vm: &HostVm, snap: &HostVm) -> Result<(), Error> {
        let list = vm.regions.write();
        // Held for read, the snapshot's list keeps it from being torn down meanwhile.
        let snap_list = snap.regions.read_nested(1);
        if snap_list.is_empty() {
            return Err(Error::NoRegion);
        }
        for region in list.iter() {
            let range = region.start()..region.end();
            let mut from = Some(range.start);
            while let Some(start) = from {
                let mut cleared = Vec::with_capacity(CHUNK);
                let next = self.break_chunk(vm, snap, start, &range, &mut cleared);
                // What was cleared goes through the make step even if the break failed.
                if !cleared.is_empty() {
                    // No TLB may hold a cleared leaf before its frame can be freed, or
                    // before a new valid entry is written at its IPA.
                    vm.s2.flush_deferred();
                    self.make_chunk(vm, snap, region, &cleared)?;
                }
                from = next?;
            }
        }
        Ok(())
    }

    /// The snapshot's entry at `ipa` as the restored VM maps it (read-only), once no
    /// migration of it is in flight (waited for with no stage-2 lock held: the migrator
    /// needs the snapshot's to finish).
    fn snapshot_entry(&self, snap: &HostVm, ipa: Ipa) -> PageState {
        loop {
            match snapshot_entry_now(snap, ipa) {
                PageState::Migrating { pfn, .. } => self.rmap.wait_frame_unlocked(pfn),
                other => return other,
            }
        }
    }

    /// Clears up to [`CHUNK`] leaves of `vm` in `range` from `from` on that differ from the
    /// snapshot; returns where the next chunk starts (`None`: the range is done). What was
    /// cleared is in `cleared` even on an error.
    fn break_chunk(
        &self,
        vm: &HostVm,
        snap: &HostVm,
        mut from: Ipa,
        range: &Range<Ipa>,
        cleared: &mut Vec<Cleared>,
    ) -> Result<Option<Ipa>, Error> {
        while cleared.len() < CHUNK {
            let mine = vm.s2.lock().next_entry(from, range.end).map(|e| e.0);
            let theirs = snap.s2.lock().next_entry(from, range.end).map(|e| e.0);
            let Some(ipa) = mine.into_iter().chain(theirs).min() else {
                return Ok(None);
            };
            let target = self.snapshot_entry(snap, ipa);
            let mut s2 = vm.s2.lock();
            let have = s2.lookup(ipa);
            match have {
                _ if have == target => from = ipa + PAGE_SIZE,
                PageState::Migrating { pfn, .. } => {
                    drop(s2);
                    self.rmap.wait_frame_unlocked(pfn);
                }
                PageState::Invalid => {
                    cleared.push((ipa, 1, PageState::Invalid));
                    from = ipa + PAGE_SIZE;
                }
                _ => match s2.clear_leaf(ipa, have, range.clone()) {
                    Ok((start, pages, first)) => {
                        cleared.push((start, pages, first));
                        from = (start + pages * PAGE_SIZE).max(ipa + PAGE_SIZE);
                    }
                    // A block across the region's end that cannot be split.
                    Err(CasError::NoMemory) => return Err(Error::OutOfFrames),
                    // Changed since the lookup (migration, reclaim): look again.
                    Err(CasError::Changed(_)) => {}
                },
            }
        }
        Ok(Some(from))
    }

    /// Lets go of what the cleared leaves held (their TLB entries are gone), then installs
    /// the snapshot's entries. Every reference is dropped before the first install, so a
    /// failed install leaks nothing.
    fn make_chunk(
        &self,
        vm: &HostVm,
        snap: &HostVm,
        region: &Region,
        cleared: &[Cleared],
    ) -> Result<(), Error> {
        let m = &self.machine;
        for &(start, pages, first) in cleared {
            for i in 0..pages {
                let ipa = start + i * PAGE_SIZE;
                match first.page(i) {
                    PageState::Mapped { pfn, .. } => self.rmap.remove_rmap_at(pfn, region, ipa, m),
                    PageState::Swapped { slot } => self.rmap.put_swap(slot, m, m),
                    PageState::Migrating { .. } | PageState::Invalid | PageState::ZeroPage => {}
                }
            }
        }
        for &(start, pages, _) in cleared {
            for i in 0..pages {
                self.install_from_snapshot(vm, snap, region, start + i * PAGE_SIZE)?;
            }
        }
        Ok(())
    }

    /// Maps the snapshot's entry at `ipa` into `vm`'s cleared slot. The snapshot's frame is
    /// locked meanwhile, so migration or reclaim cannot move it between the lookup and the
    /// new mapping's reference.
    fn install_from_snapshot(
        &self,
        vm: &HostVm,
        snap: &HostVm,
        region: &Region,
        ipa: Ipa,
    ) -> Result<(), Error> {
        loop {
            let target = self.snapshot_entry(snap, ipa);
            let _frame = target.pfn().map(|pfn| self.rmap.frames().lock(pfn));
            if snapshot_entry_now(snap, ipa) != target {
                continue; // moved before we locked it: no waiting with the frame locked
            }
            return self.install_shared(vm, region, ipa, target);
        }
    }

    /// One more reference on the snapshot's frame or slot, mapped at `ipa` in `vm`.
    fn install_shared(
        &self,
        vm: &HostVm,
        region: &Region,
        ipa: Ipa,
        entry: PageState,
    ) -> Result<(), Error> {
        let m = &self.machine;
        match entry {
            PageState::Mapped { pfn, .. } => self.rmap.add_rmap_at(pfn, region, ipa),
            PageState::Swapped { slot } => m.dup(slot),
            PageState::ZeroPage => {}
            _ => return Ok(()),
        }
        let installed = {
            let mut s2 = vm.s2.lock();
            s2.compare_exchange(ipa, PageState::Invalid, entry)
        };
        if installed.is_ok() {
            return Ok(());
        }
        match entry {
            PageState::Mapped { pfn, .. } => self.rmap.unadd_rmap_at(pfn, region, ipa),
            PageState::Swapped { slot } => self.rmap.put_swap(slot, m, m),
            _ => {}
        }
        Err(Error::OutOfFrames)
    }
}

fn snapshot_entry_now(snap: &HostVm, ipa: Ipa) -> PageState {
    match snap.s2.lock().lookup(ipa) {
        PageState::Mapped { pfn, .. } => PageState::Mapped {
            pfn,
            writable: false,
        },
        other => other,
    }
}
