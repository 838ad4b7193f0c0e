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

use crate::backend::{FrameAllocator, PageState, Stage2, SwapStore, VmSet};
use crate::frame::{FrameGuard, BATCH_FRAME_LOCK};
use crate::lock::lockdep;
use crate::walk::{AnonRef, Mapper};
use crate::{Pfn, Rmap, VmId};
use alloc::vec::Vec;

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
pub(crate) struct BatchLocks(usize);

impl BatchLocks {
    pub(crate) fn record<T>(batch: &T) -> Self {
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

/// One frame taken by a batch: locked, anon_vma pinned, target allocated (migration only).
struct Taken<'a> {
    /// Position in the caller's list.
    at: usize,
    pfn: Pfn,
    guard: FrameGuard<'a>,
    pin: AnonRef<'a>,
    index: u64,
    new: Option<Pfn>,
}

impl Taken<'_> {
    fn target(&self) -> Pfn {
        self.new.expect("migration target")
    }
}

impl Rmap {
    /// Migrates each frame of `pfns` to a new frame; `out` gets, per frame in order, the new
    /// frame or why it was skipped. One TLB invalidation per VM for the whole batch, and each
    /// mapping VM is locked once per anon_vma of the batch, not once per frame.
    /// Merged frames in `pfns` are moved one by one after the batch (their walk goes item by
    /// item), try-locked like the batch's. A 2 MiB folio all of whose frames are in `pfns`
    /// and that every mapper maps with one block entry is moved whole first
    /// (`Rmap::migrate_folio`: one change per mapper, not a split and 512 page moves); if it
    /// cannot be, its frames go through the batch like any other.
    pub fn migrate_frames<V: VmSet, A: FrameAllocator>(
        &self,
        vms: &V,
        alloc: &A,
        pfns: &[Pfn],
        out: &mut Vec<Result<Pfn, Skip>>,
    ) {
        let start = out.len();
        let whole = self.migrate_whole_folios(vms, alloc, pfns);
        if whole.iter().all(Option::is_none) {
            self.migrate_batch(vms, alloc, pfns, out);
        } else {
            let rest: Vec<Pfn> = pfns
                .iter()
                .zip(&whole)
                .filter(|(_, w)| w.is_none())
                .map(|(&p, _)| p)
                .collect();
            let mut batch = Vec::with_capacity(rest.len());
            self.migrate_batch(vms, alloc, &rest, &mut batch);
            let mut batch = batch.into_iter();
            out.extend(
                whole
                    .into_iter()
                    .map(|w| w.unwrap_or_else(|| batch.next().expect("a result per frame"))),
            );
        }
        self.move_merged(pfns, &mut out[start..], |pfn| {
            self.migrate_merged_try(vms, alloc, pfn)
        });
    }

    fn migrate_batch<V: VmSet, A: FrameAllocator>(
        &self,
        vms: &V,
        alloc: &A,
        pfns: &[Pfn],
        out: &mut Vec<Result<Pfn, Skip>>,
    ) {
        let mut results: Vec<Result<Pfn, Skip>> = alloc::vec![Err(Skip::NotMapped); pfns.len()];
        let _batch = BatchLocks::record(&results);
        let taken = self.take_frames(vms, alloc, pfns, true, &mut results);
        let mut targets = Vec::with_capacity(taken.len());
        for t in &taken {
            let new = t.target();
            #[cfg(not(feature = "mutate-copy-before-flush"))]
            alloc.copy(new, t.pfn);
            let anon_vma = self
                .frame_anon_vma(t.guard.frame())
                .expect("locked anon frame keeps its anon_vma");
            let guard = self.frames.lock_fresh(new, true);
            self.frames.frame(new).set_anon(anon_vma, t.index);
            targets.push(guard);
            results[t.at] = Ok(new);
        }
        self.remap_taken(
            &taken,
            vms,
            |k, writable| PageState::Mapped {
                pfn: taken[k].target(),
                writable,
            },
            |k, _| self.add_anon_rmap(taken[k].target()),
        );
        drop(targets);
        for t in taken {
            self.put_frame(t.target(), alloc);
            self.release(t, alloc); // our pin was the old frame's last reference
        }
        out.extend(results);
    }

    /// Reclaims each frame of `pfns` into `swap`; `out` gets, per frame in order, the slot or
    /// why it was skipped. One TLB invalidation per VM for the whole batch.
    /// Merged frames are reclaimed one by one after the batch, as in `migrate_frames`.
    pub fn reclaim_frames<V: VmSet, A: FrameAllocator, W: SwapStore>(
        &self,
        vms: &V,
        alloc: &A,
        swap: &W,
        pfns: &[Pfn],
        out: &mut Vec<Result<u64, Skip>>,
    ) {
        let start = out.len();
        self.reclaim_batch(vms, alloc, swap, pfns, out);
        self.move_merged(pfns, &mut out[start..], |pfn| {
            self.reclaim_merged_try(vms, alloc, swap, pfn)
        });
    }

    fn reclaim_batch<V: VmSet, A: FrameAllocator, W: SwapStore>(
        &self,
        vms: &V,
        alloc: &A,
        swap: &W,
        pfns: &[Pfn],
        out: &mut Vec<Result<u64, Skip>>,
    ) {
        let mut results: Vec<Result<u64, Skip>> = alloc::vec![Err(Skip::NotMapped); pfns.len()];
        let _batch = BatchLocks::record(&results);
        let taken = self.take_frames(vms, alloc, pfns, false, &mut results);
        let slots: Vec<Option<u64>> = taken.iter().map(|t| swap.store(t.pfn)).collect();
        self.remap_taken(
            &taken,
            vms,
            |k, writable| match slots[k] {
                Some(slot) => PageState::Swapped { slot },
                // The store refused it: the frame's own mappings go back.
                None => PageState::Mapped {
                    pfn: taken[k].pfn,
                    writable,
                },
            },
            |k, new| match new {
                PageState::Swapped { slot } => swap.dup(slot),
                _ => self.add_anon_rmap(taken[k].pfn),
            },
        );
        for (t, slot) in taken.into_iter().zip(slots) {
            results[t.at] = slot.ok_or(Skip::StoreFull);
            if let Some(slot) = slot {
                // The store's own reference: the entries are visible already and may have
                // been faulted into the swap cache meanwhile.
                self.put_swap(slot, swap, alloc);
            }
            self.release(t, alloc);
        }
        out.extend(results);
    }

    /// Takes every frame it can (pin, try-lock, checks, target), then replaces all their
    /// mappings with migration entries, VM by VM, and flushes each VM that lost one once.
    /// Skipped frames get their reason in `results`. The frames returned are sorted by
    /// (anon_vma, page offset), the order the batched walks need.
    fn take_frames<'a, V: VmSet, A: FrameAllocator, T>(
        &'a self,
        vms: &V,
        alloc: &A,
        pfns: &[Pfn],
        migrate: bool,
        results: &mut [Result<T, Skip>],
    ) -> Vec<Taken<'a>> {
        let mut taken = Vec::with_capacity(pfns.len());
        for (at, &pfn) in pfns.iter().enumerate() {
            match self.take_frame(alloc, at, pfn, migrate) {
                Ok(t) => taken.push(t),
                Err(skip) => results[at] = Err(skip),
            }
        }
        taken.sort_unstable_by_key(|t| (t.pin.handle().raw(), t.index));
        let mut flush = Vec::new();
        for (_, group) in groups(&taken) {
            self.walk_group(
                group,
                vms,
                |i, m| match m.entry {
                    PageState::Mapped { writable, .. } => Some(PageState::Migrating {
                        pfn: group[i].pfn,
                        writable,
                    }),
                    _ => None,
                },
                // A change can fail only if the table cannot change shape now (splitting a
                // block needs a table page): that mapping stays, and the frame is skipped
                // below.
                |i, m, _| {
                    let last = group[i].guard.frame().dec_map();
                    debug_assert!(!last, "the batch's pin keeps the frame");
                    if flush.last() != Some(&m.vm) && !flush.contains(&m.vm) {
                        flush.push(m.vm);
                    }
                },
            );
        }
        // Mapped somewhere the walk did not reach: put its mappings back and skip it.
        let (taken, unreachable): (Vec<_>, Vec<_>) = taken
            .into_iter()
            .partition(|t| t.guard.frame().mapcount() == 0);
        for t in unreachable {
            self.restore_mappings(&t.pin, t.index, t.pfn, vms);
            if let Some(new) = t.new {
                self.put_frame(new, alloc);
            }
            results[t.at] = Err(Skip::Unreachable);
            self.release(t, alloc);
        }
        // Broken variant: the frames are copied while a VM's TLB may still hold a writable
        // translation to them (a store after the copy is lost).
        #[cfg(feature = "mutate-copy-before-flush")]
        for t in taken.iter().filter(|t| migrate && t.new.is_some()) {
            alloc.copy(t.target(), t.pfn);
        }
        self.flush_vms(vms, &flush);
        taken
    }

    /// Pins and try-locks one frame and checks it can move; for migration also allocates
    /// the target.
    fn take_frame<A: FrameAllocator>(
        &self,
        alloc: &A,
        at: usize,
        pfn: Pfn,
        migrate: bool,
    ) -> Result<Taken<'_>, Skip> {
        let frame = self.frames.get(pfn).ok_or(Skip::NotMapped)?;
        if !frame.try_pin() {
            return Err(Skip::NotMapped);
        }
        let result = self.take_pinned(alloc, at, pfn, migrate);
        if result.is_err() {
            self.put_frame(pfn, alloc);
        }
        result
    }

    fn take_pinned<A: FrameAllocator>(
        &self,
        alloc: &A,
        at: usize,
        pfn: Pfn,
        migrate: bool,
    ) -> Result<Taken<'_>, Skip> {
        let guard = self.frames.try_lock_batched(pfn).ok_or(Skip::Locked)?;
        let frame = guard.frame();
        if !frame.is_mapped() || frame.anon_slot().is_none() {
            return Err(Skip::NotMapped);
        }
        if frame.pinned_by_others() {
            return Err(Skip::Pinned);
        }
        let pin = self.get_anon_vma(pfn).ok_or(Skip::NotMapped)?;
        let index = frame.index();
        let new = if migrate {
            // Every byte is copied before any VM can see it: no need to zero it first.
            let new = self.alloc_frame_to_overwrite(alloc);
            Some(new.map_err(|_| Skip::NoMemory)?)
        } else {
            None
        };
        Ok(Taken {
            at,
            pfn,
            guard,
            pin,
            index,
            new,
        })
    }

    /// Replaces every migration entry of the taken frames with `replacement(k, writable)`,
    /// `k` the frame's position in `taken` (Linux's `remove_migration_ptes`, batched);
    /// `installed(k, new)` accounts for each one put in place.
    fn remap_taken<V: VmSet>(
        &self,
        taken: &[Taken<'_>],
        vms: &V,
        replacement: impl Fn(usize, bool) -> PageState,
        mut installed: impl FnMut(usize, PageState),
    ) {
        for (base, group) in groups(taken) {
            let (mut wanted, mut done) = (0usize, 0usize);
            self.walk_group(
                group,
                vms,
                |i, m| match m.entry {
                    PageState::Migrating { writable, .. } => {
                        wanted += 1;
                        Some(replacement(base + i, writable))
                    }
                    _ => None,
                },
                |i, _, new| {
                    done += 1;
                    installed(base + i, new);
                },
            );
            // A migration entry is a page-level slot we own: replacing it cannot fail.
            assert_eq!(wanted, done, "a migration entry could not be replaced");
        }
    }

    /// [`Rmap::walk_batch`] over one group of taken frames (one anon_vma, sorted by offset).
    fn walk_group<V: VmSet>(
        &self,
        group: &[Taken<'_>],
        vms: &V,
        decide: impl FnMut(usize, &Mapper) -> Option<PageState>,
        applied: impl FnMut(usize, &Mapper, PageState),
    ) {
        let items: Vec<(u64, Pfn)> = group.iter().map(|t| (t.index, t.pfn)).collect();
        self.walk_batch(group[0].pin.handle(), &items, vms, decide, applied);
    }

    /// Unlocks a taken frame and drops the batch's pin on it (which may free it).
    fn release<A: FrameAllocator>(&self, t: Taken<'_>, alloc: &A) {
        let pfn = t.pfn;
        drop(t.pin);
        drop(t.guard);
        self.put_frame(pfn, alloc);
    }

    /// Puts the frame's own mappings back in place of its migration entries.
    fn restore_mappings<V: VmSet>(&self, pin: &AnonRef<'_>, index: u64, pfn: Pfn, vms: &V) {
        self.remove_migration_entries(pin, index, pfn, vms, |writable| {
            self.add_anon_rmap(pfn);
            PageState::Mapped { pfn, writable }
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

/// The runs of taken frames that share an anon_vma, each with its position in `taken`.
fn groups<'s, 'a>(taken: &'s [Taken<'a>]) -> impl Iterator<Item = (usize, &'s [Taken<'a>])> {
    let mut base = 0;
    taken
        .chunk_by(|a, b| a.pin.handle() == b.pin.handle())
        .map(move |group| {
            let at = base;
            base += group.len();
            (at, group)
        })
}
