//! Block migration: a 2 MiB folio that every mapper still maps with one block entry moves
//! whole to a free aligned run, as Linux migrates a THP mapped by PMDs (`migrate_pages` of a
//! large folio, `set_pmd_migration_entry`, `remove_migration_pmd`): one entry change to a
//! block-sized migration entry and one back per mapper for all 512 frames, one TLB flush per
//! VM, one 2 MiB copy, instead of a split and 512 page migrations per mapper.
//!
//! Steps (`Rmap::migrate_folio`): pin and try-lock the 512 frames (never waited for: `Busy`);
//! check each frame's own count is the block share alone (no page mappings, no pins) and the
//! frames are one folio of one anon_vma with consecutive offsets, as a first touch made them;
//! allocate the new run ([`FrameAllocator::alloc_folio`]); replace every mapper's block with
//! a block migration entry ([`Stage2Locked::compare_exchange_block`], invalidation deferred),
//! dropping the entire mapcount `E` with each (the last drops the shares); if any mapping was
//! out of reach (`E` left, or a mapper split its block meanwhile so a page maps a frame), put
//! the blocks back and fail `Busy`; else flush each VM once, copy, and install the new blocks,
//! each counted on the new folio before it is visible.
//!
//! A fault on any page of a block migration entry finds `Migrating(head + i)` (page `i` of
//! the entry, `PageState::page`) and waits for that frame's lock: every frame of the old
//! folio stays locked until the new blocks are in. A fork during the copy write-protects a
//! parent's block migration entry in place (the stage 2 keeps it one entry) and gives the
//! child the pages' migration entries: those are found and replaced page by page, counted on
//! the new frames one by one.

use crate::backend::{FrameAllocator, PageState, Stage2, Stage2Locked, VmSet};
use crate::batch::{BatchLocks, Skip};
use crate::folio::{ENTIRE_MAX, FOLIO_PAGES};
use crate::frame::{FrameGuard, FrameTable};
use crate::region::RegionFlags;
use crate::walk::AnonRef;
use crate::{AnonHandle, Error, Ipa, Pfn, Rmap, VmId, PAGE_SIZE};
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::ops::ControlFlow;

/// Bytes one folio's block entry maps.
const FOLIO_SIZE: u64 = FOLIO_PAGES * PAGE_SIZE;

/// A folio taken for migration: its frames pinned and locked, its anon_vma pinned.
struct Taken<'a> {
    head: Pfn,
    /// The page offset of the head frame (the others follow it).
    index: u64,
    // Field order is drop order: the anon_vma pin goes before the frame locks, as in a batch.
    pin: AnonRef<'a>,
    _guards: Vec<FrameGuard<'a>>,
}

impl FrameTable {
    /// Counts one more block entry of the folio at `head` that a migration puts back or
    /// installs; the first one (E = 0) gives every frame its share first, so a reader may
    /// over-count for a moment, never under-count. Only a migration raises `E` from 0 (fork
    /// adds to a counted block only), and it installs no more block entries than it took
    /// away, so `E` stays within [`ENTIRE_MAX`].
    pub(crate) fn add_entire(&self, head: Pfn) {
        let frame = self.frame(head + 1);
        loop {
            let e = frame.entire_bits();
            if e == 0 {
                head.run(FOLIO_PAGES).for_each(|p| self.frame(p).inc_map());
                let started = frame.cas_entire_bits(0, 1);
                assert!(started, "folio {head:#x}: block entry counted meanwhile");
                return;
            }
            assert!(e < ENTIRE_MAX, "folio {head:#x}: entire mapcount overflow");
            if frame.cas_entire_bits(e, e + 1) {
                return;
            }
        }
    }
}

impl Rmap {
    /// Moves the 2 MiB folio holding `pfn` whole to a free aligned run
    /// ([`FrameAllocator::alloc_folio`]) when every mapper still maps it with one block
    /// entry; returns the frame now holding `pfn`'s contents. Errors, with nothing changed
    /// (the caller may migrate the frames one by one instead): `NotMapped` (not a folio
    /// mapped by a block), `Busy` (a frame locked or pinned, a page mapping, a mapper out
    /// of reach or one that split its block meanwhile), `OutOfFrames` (no free run).
    pub fn migrate_folio<V: VmSet, A: FrameAllocator>(
        &self,
        vms: &V,
        alloc: &A,
        pfn: Pfn,
    ) -> Result<Pfn, Error> {
        let head = Pfn::new(pfn.raw() & !(FOLIO_PAGES - 1));
        if self.frames.get(head).is_none() || self.frames.get(head + (FOLIO_PAGES - 1)).is_none() {
            return Err(Error::NotMapped);
        }
        // One lockdep record for the 512 try-locks, as a batch records its frame locks.
        let marker = 0u8;
        let _locks = BatchLocks::record(&marker);
        let taken = self.take_folio(head, alloc)?;
        let result = self.move_folio(&taken, vms, alloc);
        self.release_folio(taken, alloc);
        result.map(|new| new + (pfn - head))
    }

    /// Pins and try-locks the folio's frames and checks that only its block entries map
    /// it; on failure every pin taken is dropped again.
    fn take_folio<A: FrameAllocator>(&self, head: Pfn, alloc: &A) -> Result<Taken<'_>, Error> {
        let mut pinned = 0;
        let mut guards = Vec::with_capacity(FOLIO_PAGES as usize);
        let taken = (|| {
            for p in head.run(FOLIO_PAGES) {
                if !self.frames.frame(p).try_pin() {
                    return Err(Error::NotMapped);
                }
                pinned += 1;
                guards.push(self.frames.try_lock_batched(p).ok_or(Error::Busy)?);
            }
            self.check_folio(head)?;
            let pin = self.get_anon_vma(head).ok_or(Error::NotMapped)?;
            let index = self.frames.frame(head).index();
            Ok((pin, index))
        })();
        match taken {
            Ok((pin, index)) => Ok(Taken {
                head,
                index,
                pin,
                _guards: guards,
            }),
            Err(e) => {
                drop(guards);
                head.run(pinned).for_each(|p| self.put_frame(p, alloc));
                Err(e)
            }
        }
    }

    /// Under the frame locks: a folio mapped by blocks only (`E > 0`, each frame's own count
    /// just the share and our pin), one anonymous family, consecutive page offsets.
    fn check_folio(&self, head: Pfn) -> Result<(), Error> {
        if self.frames.entire_mapcount(head) == 0 {
            return Err(Error::NotMapped);
        }
        let first = self.frames.frame(head);
        let (slot, index) = (first.anon_slot(), first.index());
        for (i, p) in head.run(FOLIO_PAGES).enumerate() {
            let f = self.frames.frame(p);
            let share_only = f.mapcount() == 1 && !f.pinned_by_others();
            let same = f.anon_slot() == slot && f.index() == index + i as u64;
            if slot.is_none() || f.is_merged() || !share_only || !same {
                return Err(Error::Busy);
            }
        }
        Ok(())
    }

    /// Unlocks the old frames and drops the pins: the last reference of each frame that was
    /// moved, which frees it. When every frame went (the folio moved), the run goes back to
    /// the allocator in one call; after a back-off the mappings keep them.
    fn release_folio<A: FrameAllocator>(&self, taken: Taken<'_>, alloc: &A) {
        let head = taken.head;
        drop(taken);
        let mut last = [0u64; (FOLIO_PAGES / 64) as usize];
        for (i, p) in head.run(FOLIO_PAGES).enumerate() {
            if self.frames.frame(p).put() {
                last[i / 64] |= 1 << (i % 64);
            }
        }
        if last.iter().all(|&w| w == u64::MAX) {
            // Taken frames are never merged (`check_folio`): nothing but the record to clear.
            head.run(FOLIO_PAGES)
                .for_each(|p| self.frames.frame(p).clear());
            alloc.free_folio(head);
        } else {
            head.run(FOLIO_PAGES)
                .enumerate()
                .filter(|(i, _)| last[i / 64] & (1 << (i % 64)) != 0)
                .for_each(|(_, p)| self.free_frame(p, alloc));
        }
    }

    /// The migration proper, on a taken folio: new run, blocks to migration entries, flush,
    /// copy, new blocks. On failure the old blocks are back.
    fn move_folio<V: VmSet, A: FrameAllocator>(
        &self,
        taken: &Taken<'_>,
        vms: &V,
        alloc: &A,
    ) -> Result<Pfn, Error> {
        let (head, anon_vma) = (taken.head, taken.pin.handle());
        let new = alloc.alloc_folio().ok_or(Error::OutOfFrames)?;
        debug_assert!(new.is_aligned(FOLIO_PAGES), "a folio run is 2 MiB-aligned");
        // Locked before anyone can map them, as a batch locks its targets.
        let new_guards: Vec<_> = new
            .run(FOLIO_PAGES)
            .map(|p| {
                self.frames.frame(p).init_allocated();
                self.frames.lock_fresh(p, true)
            })
            .collect();
        let reached = self.unmap_folio(anon_vma, taken.index, head, vms);
        let target = if reached { new } else { head };
        if reached {
            let slot = self
                .frame_anon_vma(self.frames.frame(head))
                .expect("locked anon frame keeps its anon_vma");
            for (i, p) in new.run(FOLIO_PAGES).enumerate() {
                alloc.copy(p, head + i as u64);
                self.frames.frame(p).set_anon(slot, taken.index + i as u64);
            }
        }
        self.remap_folio(anon_vma, taken.index, head, target, vms);
        drop(new_guards);
        // The allocation's references: the new frames are now held by their mappings (or
        // freed if every mapper went meanwhile, or if the old blocks went back).
        new.run(FOLIO_PAGES).for_each(|p| self.put_frame(p, alloc));
        if reached {
            Ok(new)
        } else {
            Err(Error::Busy)
        }
    }

    /// Replaces every mapper's block with a block migration entry (Linux's
    /// `set_pmd_migration_entry`), each taking one count off the folio, then flushes every
    /// VM that lost one, once. True if that reached every mapping: no block entry left
    /// counted, and no frame mapped by a page (a block split under us).
    fn unmap_folio<V: VmSet>(&self, anon_vma: AnonHandle, index: u64, head: Pfn, vms: &V) -> bool {
        let mut flush: Vec<VmId> = Vec::new();
        self.walk_folio(anon_vma, index, vms, |vm, ipa, s2| {
            let Some(old @ PageState::Mapped { pfn, writable }) = s2.lookup_block(ipa) else {
                return;
            };
            if pfn != head {
                return;
            }
            let entry = PageState::Migrating { pfn, writable };
            if s2.compare_exchange_block(ipa, old, entry).is_err() {
                return; // left mapped: the count check below backs off
            }
            if !flush.contains(&vm) {
                flush.push(vm);
            }
            if self.frames.unmap_entire(head) {
                // The last block entry: the shares go (our pins keep every frame).
                for p in head.run(FOLIO_PAGES) {
                    let last = self.frames.frame(p).dec_map();
                    debug_assert!(!last, "the migrator's pin keeps the frame");
                }
            }
        });
        // Break-before-make (Arm ARM DDI 0487 D8.16.1): every TLB entry of the old blocks is
        // invalidated before the frames are copied (a write through a stale writable entry
        // would be lost) and before anything else is mapped there. One flush per VM.
        for &id in &flush {
            // A VM being destroyed flushes its whole VMID when its tables go.
            let _ = vms.with_vm(id, |vm| vm.flush_deferred());
        }
        self.frames.entire_mapcount(head) == 0
            && head
                .run(FOLIO_PAGES)
                .all(|p| self.frames.frame(p).mapcount() == 0)
    }

    /// Replaces every migration entry of the folio at `head` with a mapping of the folio at
    /// `target` (Linux's `remove_migration_pmd`): a block entry as one block, counted on the
    /// target folio before it is visible; a fork child's page entries page by page, each
    /// counted on its frame. `target == head` puts the old blocks back.
    fn remap_folio<V: VmSet>(
        &self,
        anon_vma: AnonHandle,
        index: u64,
        head: Pfn,
        target: Pfn,
        vms: &V,
    ) {
        self.walk_folio(anon_vma, index, vms, |_, ipa, s2| {
            if let Some(old @ PageState::Migrating { pfn, writable }) = s2.lookup_block(ipa) {
                if pfn == head {
                    self.frames.add_entire(target);
                    let new = PageState::Mapped {
                        pfn: target,
                        writable,
                    };
                    let put = s2.compare_exchange_block(ipa, old, new);
                    // Our entry, under the stage-2 lock: replacing it cannot fail.
                    assert!(put.is_ok(), "a block migration entry could not be replaced");
                    return;
                }
            }
            self.remap_pages(ipa, head, target, s2);
        });
    }

    /// A fork child's copies of a block migration entry, page by page (only if the chunk's
    /// first entry is one of them: a child gets them all, in order).
    fn remap_pages(&self, ipa: Ipa, head: Pfn, target: Pfn, s2: &mut dyn Stage2Locked) {
        let ours = |e: PageState| matches!(e, PageState::Migrating { pfn, .. } if pfn >= head && pfn - head < FOLIO_PAGES);
        if !s2
            .next_entry(ipa, ipa + FOLIO_SIZE)
            .is_some_and(|(_, e)| ours(e))
        {
            return;
        }
        let ipas: Vec<Ipa> = (0..FOLIO_PAGES).map(|i| ipa + i * PAGE_SIZE).collect();
        s2.update_pages(
            &ipas,
            &mut |k, entry| match entry {
                PageState::Migrating { pfn, writable } if pfn == head + k as u64 => {
                    Some(PageState::Mapped {
                        pfn: target + k as u64,
                        writable,
                    })
                }
                _ => None,
            },
            &mut |k, _, _| self.frames.frame(target + k as u64).inc_map(),
        );
    }

    /// Visits, under its VM's stage-2 lock, every region linked to `anon_vma` that holds the
    /// folio's whole offset range at a 2 MiB-aligned IPA: `f(vm, IPA of the first page,
    /// table)`. Temporary regions are skipped (lesson 3): a block there stays counted, and
    /// the migration backs off. A VM being destroyed is skipped: its teardown zaps its
    /// entries (a migration entry holds no count).
    fn walk_folio<V: VmSet>(
        &self,
        anon_vma: AnonHandle,
        index: u64,
        vms: &V,
        mut f: impl FnMut(VmId, Ipa, &mut dyn Stage2Locked),
    ) {
        let family = self.lock_family_read(anon_vma);
        let Some(node) = family.node(anon_vma) else {
            return;
        };
        let _ = node.chains.stab(index, &mut |chain| {
            let info = self.chain_info(chain);
            let whole = info.ipa_of(index + FOLIO_PAGES - 1).is_some();
            let reachable = whole && !info.flags.contains(RegionFlags::TEMPORARY);
            if let Some(ipa) = info
                .ipa_of(index)
                .filter(|i| reachable && i.is_aligned(FOLIO_SIZE))
            {
                let _ = vms.with_vm(info.vm, |vm| f(info.vm, ipa, &mut vm.lock()));
            }
            ControlFlow::<()>::Continue(())
        });
    }

    /// The batch's part (`Rmap::migrate_frames`): every folio all of whose 512 frames are in
    /// `pfns` and that a block maps is migrated whole if it can be. Returns, per position,
    /// the new frame for those moved (a repeat of a moved frame: `Skip::Locked`, as a batch
    /// reports a frame it already holds), `None` for the rest.
    pub(crate) fn migrate_whole_folios<V: VmSet, A: FrameAllocator>(
        &self,
        vms: &V,
        alloc: &A,
        pfns: &[Pfn],
    ) -> Vec<Option<Result<Pfn, Skip>>> {
        let mut out = alloc::vec![None; pfns.len()];
        // The same unlocked first look as below, done once per frame before any grouping:
        // a batch of pages (no frame in a folio a block maps) pays nothing more.
        if !pfns
            .iter()
            .any(|&p| self.frames.get(p).is_some() && self.frames.entire_mapcount(p) > 0)
        {
            return out;
        }
        let mut frames: BTreeMap<Pfn, Vec<Pfn>> = BTreeMap::new();
        for &p in pfns {
            if self.frames.get(p).is_some() {
                frames
                    .entry(Pfn::new(p.raw() & !(FOLIO_PAGES - 1)))
                    .or_default()
                    .push(p);
            }
        }
        let mut moved: BTreeMap<Pfn, Pfn> = BTreeMap::new();
        for (head, mut members) in frames {
            members.sort_unstable();
            members.dedup();
            // An unlocked first look; `migrate_folio` checks again under the frame locks.
            let whole = members.len() as u64 == FOLIO_PAGES;
            if whole && self.frames.entire_mapcount(head) > 0 {
                if let Ok(new) = self.migrate_folio(vms, alloc, head) {
                    moved.insert(head, new);
                }
            }
        }
        let mut seen = alloc::collections::BTreeSet::new();
        for (k, &p) in pfns.iter().enumerate() {
            let head = Pfn::new(p.raw() & !(FOLIO_PAGES - 1));
            if let Some(&new) = moved.get(&head) {
                out[k] = Some(if seen.insert(p) {
                    Ok(new + (p - head))
                } else {
                    Err(Skip::Locked)
                });
            }
        }
        out
    }
}
