//! The commit phase of the walk: every write an operation makes goes through here.

use super::driver::{load, After, Halt, Maintenance, OpVisitor, Pass, Visit};
use super::{cas, locked, Chunk, Reserve};
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::{level_size, Descriptor, Stage2Table, TableMemory};

/// Whether changing the valid `old` into `new` needs a TLB invalidation: anything but setting
/// the Access flag or changing software bits (a TLB may hold an entry whose AF was clear, or
/// whose software bits differ, without it mattering to any translation).
pub(crate) fn needs_invalidation(old: Descriptor, new: Descriptor) -> bool {
    const AF: u64 = 1 << 10;
    const SW: u64 = 0xF << 55;
    let af_set = if new.raw() & AF != 0 { AF } else { 0 };
    !new.is_valid() || (old.raw() ^ new.raw()) & !SW & !af_set != 0
}

/// The leaf that splitting `block` (at `level`) puts in the next-level slot translating `ipa`
/// (inside the block): the same attributes, the block's output plus `ipa`'s offset in it. The
/// prepare's view of a split table uses it too, so it sees what the commit will write.
pub(crate) fn split_child(block: Descriptor, level: u8, ipa: u64) -> Descriptor {
    let offset = ipa & (level_size(level) - 1);
    block.with_output(block.output_address(level) + offset, level + 1)
}

/// The commit phase: loads, writes, links new tables from the reserve, unlinks emptied ones.
pub(crate) struct Commit<'t, 'x, M: TableMemory, X: Maintenance> {
    t: &'t Stage2Table<M>,
    reserve: Reserve<'t, M>,
    flush: &'x mut X,
    /// Unlinked table pages waiting for the TLB invalidation that must precede their freeing,
    /// chained through their first word (an invalid descriptor: a stale walk reading it faults).
    unlinked: u64,
}

impl<'t, 'x, M: TableMemory, X: Maintenance> Commit<'t, 'x, M, X> {
    pub fn new(t: &'t Stage2Table<M>, reserve: Reserve<'t, M>, flush: &'x mut X) -> Self {
        Commit {
            t,
            reserve,
            flush,
            unlinked: 0,
        }
    }

    fn take<E>(&mut self) -> Result<u64, Halt<E>> {
        self.reserve.take().ok_or(Halt::NoMemory)
    }

    /// Stores `new` over `v.desc` in `slot`: one compare-and-swap, or break-before-make when a
    /// valid entry changes output address or attributes (the Arm ARM's break-before-make
    /// rule for live translation table entries): the slot goes `Locked`, is invalidated at
    /// once, then gets `new`. `false` if the slot no longer held `v.desc`.
    fn store<V: OpVisitor>(&mut self, slot: &AtomicU64, v: &Visit, new: Descriptor) -> bool {
        let (old, level, base) = (v.desc, v.level, v.chunk.base);
        let bbm = old.is_valid() && new.is_valid() && old.bbm_bits() != new.bbm_bits();
        let was_exec = old.is_valid() && old.perm().exec && !bbm;
        if V::ICACHE && new.is_valid() && new.perm().exec && !was_exec {
            self.flush
                .icache(new.output_address(level), level_size(level));
        }
        if bbm {
            #[cfg(not(feature = "mutate-bbm-blind-lock"))]
            if cas(slot, old, Descriptor::from_raw(locked())).is_err() {
                return false;
            }
            // Broken variant: the break takes the slot without comparing, so an Access-flag
            // update (or another remap) between the caller's read and here is overwritten.
            #[cfg(feature = "mutate-bbm-blind-lock")]
            slot.store(locked(), Ordering::Release);
            self.flush.break_now(base, level);
            slot.store(new.raw(), Ordering::Release);
        } else {
            if cas(slot, old, new).is_err() {
                return false;
            }
            if V::INVALIDATE && old.is_valid() && needs_invalidation(old, new) {
                self.flush.changed(base, level);
            }
        }
        self.t.counters.account(level, old, new);
        true
    }

    /// Unlinks the table `below` from `slot` (holding `d`) if all its entries are empty.
    fn unlink_if_empty(&mut self, slot: &AtomicU64, d: Descriptor, below: u64) {
        // SAFETY: `below` is the output address of a table descriptor of this table, read under
        // the stage-2 lock: allocated and linked until this commit unlinks and frees it.
        let page = unsafe { self.t.mem.table(below) };
        if page.iter().any(|e| e.load(Ordering::Acquire) != 0) {
            return;
        }
        if cas(slot, d, Descriptor::EMPTY).is_ok() {
            page[0].store(self.unlinked, Ordering::Relaxed);
            self.unlinked = below;
        }
    }

    /// Invalidates the VMID (walk caches may still point at unlinked tables), then frees them.
    pub fn finish(&mut self) {
        if self.unlinked == 0 {
            return;
        }
        self.flush.vmid_now();
        while self.unlinked != 0 {
            let pa = self.unlinked;
            // SAFETY: `pa` is on this commit's list of unlinked pages, not yet freed.
            self.unlinked = unsafe { self.t.mem.table(pa) }[0].load(Ordering::Relaxed);
            self.t.mem.free_table(pa);
            self.t.counters.table_pages.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl<M: TableMemory, X: Maintenance> Pass<M> for Commit<'_, '_, M, X> {
    type Table = u64;

    fn linked(pa: u64) -> u64 {
        pa
    }

    fn load(&self, table: u64, level: u8, chunk: &Chunk, settle: bool) -> Descriptor {
        load(self.t, table, level, chunk, settle)
    }

    /// Links a fresh table from the reserve into the empty slot.
    fn create<E>(&mut self, table: u64, v: &Visit) -> Result<Option<u64>, Halt<E>> {
        let slot = self.t.slot(table, v.level, v.chunk.start);
        let below = self.take()?;
        match cas(slot, Descriptor::EMPTY, Descriptor::table(below)) {
            Ok(()) => {
                self.t.counters.table_pages.fetch_add(1, Ordering::Relaxed);
                Ok(Some(below))
            }
            Err(_) => {
                self.reserve.put_back(below);
                Ok(None)
            }
        }
    }

    /// Replaces the valid block `v.desc` by a table of next-level leaves with the same
    /// translation and attributes, by break-before-make (the Arm ARM asks it for a change of
    /// block size of a live entry).
    fn split<E>(&mut self, table: u64, v: &Visit) -> Result<Option<u64>, Halt<E>> {
        let (old, level) = (v.desc, v.level);
        let slot = self.t.slot(table, level, v.chunk.start);
        let below = self.take()?;
        // Break first: once the slot is Locked neither hardware nor lockless updaters touch it,
        // so the children are built from its final value.
        if cas(slot, old, Descriptor::from_raw(locked())).is_err() {
            self.reserve.put_back(below);
            return Ok(None);
        }
        let sub = level_size(level + 1);
        // SAFETY: the reserve holds pages from `alloc_zeroed_table`; this one is ours until it is
        // linked below, and a linked table lives until `unmap`/`destroy`, which cannot run
        // concurrently with a split (the caller holds the stage-2 lock).
        for (i, e) in unsafe { self.t.mem.table(below) }.iter().enumerate() {
            let child = split_child(old, level, v.chunk.base + i as u64 * sub);
            e.store(child.raw(), Ordering::Relaxed);
        }
        self.flush.break_now(v.chunk.base, level);
        slot.store(Descriptor::table(below).raw(), Ordering::Release);
        let counters = &self.t.counters;
        counters.account(level, old, Descriptor::EMPTY);
        counters.leaves[level as usize + 1].fetch_add(512, Ordering::Relaxed);
        counters.table_pages.fetch_add(1, Ordering::Relaxed);
        Ok(Some(below))
    }

    fn write<V: OpVisitor>(&mut self, table: u64, v: &Visit, new: Descriptor, op: &mut V) -> bool {
        let slot = self.t.slot(table, v.level, v.chunk.start);
        // A slot that changed since it was loaded is visited again.
        !self.store::<V>(slot, v, new) || op.written(v, new)
    }

    fn post<V: OpVisitor>(
        &mut self,
        table: u64,
        v: &Visit,
        below: u64,
        op: &mut V,
    ) -> Result<(), Halt<V::Error>> {
        let desc = if v.desc.is_table(v.level) {
            v.desc
        } else {
            Descriptor::table(below) // created or split by this visit
        };
        let v = Visit { desc, ..*v };
        match op.table_post(&v) {
            After::Keep => {}
            After::Unlink => {
                let slot = self.t.slot(table, v.level, v.chunk.start);
                self.unlink_if_empty(slot, desc, below);
            }
            After::Free => self.t.mem.free_table(below),
            After::Stop(e) => return Err(Halt::Stopped(e)),
        }
        Ok(())
    }
}
