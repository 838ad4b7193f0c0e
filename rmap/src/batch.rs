//! Batched migration and reclaim: Linux's `migrate_pages_batch` and `shrink_folio_list` with
//! deferred TLB flushing (`try_to_unmap_flush`). Every frame of the batch is locked and
//! unmapped into migration entries first, with the invalidations left pending; then each VM
//! that lost a mapping is flushed once; only then are the frames copied (or stored) and the
//! migration entries replaced. So a batch of N frames mapped in M VMs costs M TLB
//! invalidations instead of N × (mappers).
//!
//! Frames that cannot be taken now are skipped with a reason ([`Skip`]), never waited for:
//! locked by someone else (a fault, another migrator), pinned beyond their mappings, mapped in
//! a temporary region, free or not anonymous. Lock order per frame: frame (try-lock, level 2)
//! → root anon_vma (read, 3) → stage-2 (4) → allocator (5), as `migrate_frame`; a batch holds
//! several frame locks at once, all taken with try-lock, so it never waits at level 2.

use crate::backend::{FrameAllocator, S2Entry, Stage2, Stage2Locked, SwapStore, VmSet};
use crate::frame::{FrameGuard, BATCH_FRAME_LOCK};
use crate::lock::lockdep;
use crate::walk::{AnonRef, Mapper};
use crate::{Pfn, Rmap, VmId};
use alloc::vec::Vec;
use core::ops::ControlFlow;

/// Why a frame of a batch was left where it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Free, or not (or no longer) a mapped anonymous frame: nothing to move.
    NotMapped,
    /// Its lock bit is held by someone else (a fault, a migration or reclaim in progress).
    Locked,
    /// Referenced beyond its mappings (someone is about to use it).
    Pinned,
    /// Mapped where the walk may not go (a temporary region) or by a VM being torn down.
    Unreachable,
    /// No free frame to move it to.
    NoMemory,
    /// The swap store refused it.
    StoreFull,
}

impl Skip {
    /// A short reason for consoles.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::NotMapped => "not a mapped guest frame",
            Skip::Locked => "locked",
            Skip::Pinned => "pinned",
            Skip::Unreachable => "unreachable mapping",
            Skip::NoMemory => "no free frame",
            Skip::StoreFull => "store full",
        }
    }
}

/// The one lockdep record standing for every frame lock a batch holds.
struct BatchLocks(usize);

impl BatchLocks {
    fn record<T>(batch: &T) -> Self {
        let id = batch as *const T as usize;
        // Recorded, not checked: every frame lock of a batch is a try-lock, which never waits.
        lockdep::record(BATCH_FRAME_LOCK, id);
        BatchLocks(id)
    }
}

impl Drop for BatchLocks {
    fn drop(&mut self) {
        lockdep::release(self.0);
    }
}

/// One frame taken by a batch: locked, anon_vma pinned, every mapping a migration entry.
struct Taken<'a> {
    pfn: Pfn,
    guard: FrameGuard<'a>,
    pin: AnonRef<'a>,
    index: u64,
    /// Migration target (migration only).
    new: Option<Pfn>,
}

impl Rmap {
    /// Migrates each frame of `pfns` to a new frame; `out` gets, per frame in order, the new
    /// frame or why it was skipped. One TLB invalidation per VM for the whole batch.
    pub fn migrate_frames<V: VmSet, A: FrameAllocator>(
        &self,
        vms: &V,
        alloc: &A,
        pfns: &[Pfn],
        out: &mut Vec<Result<Pfn, Skip>>,
    ) {
        let mut flush = Vec::new();
        let mut taken = Vec::with_capacity(pfns.len());
        let mut results: Vec<Result<Pfn, Skip>> = Vec::with_capacity(pfns.len());
        let _batch = BatchLocks::record(&taken);
        for &pfn in pfns {
            match self.take_frame(vms, alloc, pfn, true, &mut flush) {
                Ok(t) => {
                    results.push(Ok(t.new.expect("migration target")));
                    taken.push(t);
                }
                Err(skip) => results.push(Err(skip)),
            }
        }
        self.flush_vms(vms, &flush);
        for t in taken {
            let new = t.new.expect("migration target");
            alloc.copy(new, t.pfn);
            let anon_vma = t
                .guard
                .frame()
                .anon_vma()
                .expect("locked anon frame keeps its anon_vma");
            let new_guard = self
                .frames
                .try_lock_batched(new)
                .expect("a fresh frame is unlocked");
            self.frames.frame(new).set_anon(anon_vma, t.index);
            self.remove_migration_entries(&t.pin, t.index, t.pfn, vms, |writable| {
                self.add_anon_rmap(new);
                S2Entry::Page { pfn: new, writable }
            });
            drop(new_guard);
            self.put_frame(new, alloc);
            drop(t.pin);
            drop(t.guard);
            self.put_frame(t.pfn, alloc); // our pin was the last reference
        }
        out.extend(results);
    }

    /// Reclaims each frame of `pfns` into `swap`; `out` gets, per frame in order, the slot or
    /// why it was skipped. One TLB invalidation per VM for the whole batch.
    pub fn reclaim_frames<V: VmSet, A: FrameAllocator, W: SwapStore>(
        &self,
        vms: &V,
        alloc: &A,
        swap: &W,
        pfns: &[Pfn],
        out: &mut Vec<Result<u64, Skip>>,
    ) {
        let mut flush = Vec::new();
        let mut taken = Vec::with_capacity(pfns.len());
        let mut results: Vec<Result<u64, Skip>> = Vec::with_capacity(pfns.len());
        let _batch = BatchLocks::record(&taken);
        for &pfn in pfns {
            match self.take_frame(vms, alloc, pfn, false, &mut flush) {
                Ok(t) => {
                    results.push(Ok(0));
                    taken.push((results.len() - 1, t));
                }
                Err(skip) => results.push(Err(skip)),
            }
        }
        self.flush_vms(vms, &flush);
        for (i, t) in taken {
            match swap.store(t.pfn) {
                Some(slot) => {
                    self.remove_migration_entries(&t.pin, t.index, t.pfn, vms, |_| {
                        swap.dup(slot);
                        S2Entry::Swap { slot }
                    });
                    swap.put(slot);
                    results[i] = Ok(slot);
                }
                None => {
                    self.restore_mappings(&t.pin, t.index, t.pfn, vms);
                    results[i] = Err(Skip::StoreFull);
                }
            }
            drop(t.pin);
            drop(t.guard);
            self.put_frame(t.pfn, alloc);
        }
        out.extend(results);
    }

    /// Pins, try-locks and unmaps one frame into migration entries (deferred invalidation),
    /// noting the VMs to flush. For migration also allocates the target.
    fn take_frame<'a, V: VmSet, A: FrameAllocator>(
        &'a self,
        vms: &V,
        alloc: &A,
        pfn: Pfn,
        migrate: bool,
        flush: &mut Vec<VmId>,
    ) -> Result<Taken<'a>, Skip> {
        let frame = self.frames.get(pfn).ok_or(Skip::NotMapped)?;
        if !frame.try_pin() {
            return Err(Skip::NotMapped);
        }
        let result = self.take_pinned(vms, alloc, pfn, migrate, flush);
        if result.is_err() {
            self.put_frame(pfn, alloc);
        }
        result
    }

    fn take_pinned<'a, V: VmSet, A: FrameAllocator>(
        &'a self,
        vms: &V,
        alloc: &A,
        pfn: Pfn,
        migrate: bool,
        flush: &mut Vec<VmId>,
    ) -> Result<Taken<'a>, Skip> {
        let guard = self.frames.try_lock_batched(pfn).ok_or(Skip::Locked)?;
        let frame = guard.frame();
        if !frame.is_mapped() || frame.anon_vma().is_none() {
            return Err(Skip::NotMapped);
        }
        if frame.refcount() != frame.mapcount() + 1 {
            return Err(Skip::Pinned);
        }
        let pin = self.get_anon_vma(pfn).ok_or(Skip::NotMapped)?;
        let index = frame.index();
        let new = if migrate {
            Some(self.alloc_frame(alloc).map_err(|_| Skip::NoMemory)?)
        } else {
            None
        };
        self.walk_pinned(
            &pin,
            index,
            pfn,
            vms,
            |m: &Mapper, s2: &mut dyn Stage2Locked| {
                if let S2Entry::Page { writable, .. } = m.entry {
                    let migration = S2Entry::Migration { pfn, writable };
                    // It can fail only if the table cannot change shape now (splitting a
                    // block needs a table page): the mapping stays, the frame is skipped.
                    if s2
                        .compare_exchange_deferred(m.ipa, m.entry, migration)
                        .is_err()
                    {
                        return ControlFlow::Continue(());
                    }
                    let last = frame.dec_map();
                    debug_assert!(!last, "the batch's pin keeps the frame");
                    if !flush.contains(&m.vm) {
                        flush.push(m.vm);
                    }
                }
                ControlFlow::Continue(())
            },
        );
        if frame.mapcount() != 0 {
            self.restore_mappings(&pin, index, pfn, vms);
            if let Some(new) = new {
                self.put_frame(new, alloc);
            }
            return Err(Skip::Unreachable);
        }
        Ok(Taken {
            pfn,
            guard,
            pin,
            index,
            new,
        })
    }

    /// Puts the frame's own mappings back in place of its migration entries.
    fn restore_mappings<V: VmSet>(&self, pin: &AnonRef<'_>, index: u64, pfn: Pfn, vms: &V) {
        self.remove_migration_entries(pin, index, pfn, vms, |writable| {
            self.add_anon_rmap(pfn);
            S2Entry::Page { pfn, writable }
        });
    }

    /// One invalidation per VM that lost a mapping in this batch.
    fn flush_vms<V: VmSet>(&self, vms: &V, flush: &[VmId]) {
        for &id in flush {
            // A VM being destroyed flushes its whole VMID when its tables go.
            let _ = vms.with_vm(id, |vm| vm.flush_deferred());
        }
    }
}
