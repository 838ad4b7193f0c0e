//! The implementations behind [`crate::Stage2Table`]'s operations: one walker, and each
//! operation a visitor of it (as pKVM's `kvm_pgtable_walk` and Hafnium's
//! `mm_ptable_prepare`/`commit`).
//!
//! # The walker ([`driver`])
//!
//! [`driver::Walk`] owns the descent over `[start, end)`: level by level, slot by slot
//! ([`chunks`]), it loads each slot (settled, [`load_settled`], unless the visitor wants to see
//! `Locked` slots) and asks the operation's [`driver::OpVisitor`] what to do with it, given
//! the level, the part of the range inside the slot and the descriptor. The visitor answers a
//! [`driver::Step`]: `Next` (nothing more here), `Again` (load and ask again), `Descend` into
//! the table the slot holds, `Create` a table in the empty slot and descend, `Split` the valid
//! block into a table of next-level leaves and descend, `Write` a new (empty, leaf or software)
//! value, or `Stop` with the operation's error. After a subtree, in the commit, it answers an
//! [`driver::After`]: keep the table, unlink it if empty (freed after a VMID-wide invalidation
//! when the walk ends), free it (destroy), or stop. The walker does every write itself
//! ([`commit`]): the compare-and-swap, break-before-make (`Locked`, immediate invalidation, new
//! value) when a valid entry changes output address or attributes, the invalidation owed
//! (through the operation's `OpFlush`, so per IPA, VMID-wide or deferred to a `Batch`), I-cache
//! maintenance before a frame becomes executable where the operation asks for it, and the
//! counters. A write that loses its compare-and-swap shows the slot to the visitor again.
//!
//! # Two phases, one visitor
//!
//! An operation that may create or split tables runs its visitor twice over the same range:
//!
//! - *prepare* writes nothing: `Write` is skipped; `Create` and `Split` each count one page
//!   and descend into the table they would make, seen as it would be (all empty, or the
//!   block's leaves). Its count is reserved ([`Reserve`]) or the operation fails with
//!   `NoMemory`, nothing changed (a `Stop` fails it before anything is allocated);
//! - *commit* makes the change, taking the pages from the reserve.
//!
//! The two cannot disagree by construction: the visitor is not told the phase ([`driver::Visit`]
//! has none), only its `written`/`table_post` callbacks are commit-only, and the prepare shows
//! it what the commit will find. The one residual assumption, that nothing links tables or
//! fills empty slots in between, is the stage-2 lock's (see [`driver::Walk::commit`]); were it
//! broken, running out is a typed `NoMemory` (asserted in debug builds), not a panic.
//! Operations that never create or split (compare-and-swap, `update_pages`, Access flag, the
//! read-only walk, destroy) run the commit alone with an empty reserve.

mod commit;
pub(crate) mod driver;
pub(crate) mod leaf;
pub(crate) mod map;
pub(crate) mod protect;
mod range;
pub(crate) mod split;
#[cfg(test)]
mod tests;
pub(crate) mod unmap;
mod update;
pub(crate) mod walk;

use crate::sync::atomic::{AtomicU64, Ordering};
use crate::{level_size, Descriptor, Error, TableMemory};

/// The part of a range `[start, end)` inside the slot that starts at `base`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chunk {
    pub base: u64,
    pub start: u64,
    pub end: u64,
}

impl Chunk {
    /// The slot at `level` translating the page at `page` (page aligned), for that page alone.
    #[inline]
    pub fn page(level: u8, page: u64) -> Chunk {
        Chunk {
            base: page & !(level_size(level) - 1),
            start: page,
            end: page + crate::PAGE_SIZE,
        }
    }

    /// The range covers the whole slot at `level`.
    pub fn full(&self, level: u8) -> bool {
        self.start == self.base && self.end - self.base == level_size(level)
    }
}

/// The slots of `level` that `[start, end)` overlaps, in order.
pub(crate) fn chunks(level: u8, start: u64, end: u64) -> impl Iterator<Item = Chunk> {
    let size = level_size(level);
    let mut at = start;
    core::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let base = at & !(size - 1);
        let chunk = Chunk {
            base,
            start: at,
            end: end.min(base + size),
        };
        at = chunk.end;
        Some(chunk)
    })
}

/// The raw value of [`Descriptor::LOCKED`].
pub(crate) fn locked() -> u64 {
    Descriptor::LOCKED.raw()
}

/// Loads a slot, waiting while another updater holds it `Locked` (a break-before-make in
/// progress, which ends without taking locks).
pub(crate) fn load_settled(slot: &AtomicU64) -> Descriptor {
    let locked = locked();
    loop {
        let v = slot.load(Ordering::Acquire);
        if v != locked {
            return Descriptor::from_raw(v);
        }
        crate::sync::spin_loop();
    }
}

/// Compare-and-swap of a descriptor; `Err` carries the value found.
pub(crate) fn cas(slot: &AtomicU64, old: Descriptor, new: Descriptor) -> Result<(), Descriptor> {
    slot.compare_exchange(old.raw(), new.raw(), Ordering::AcqRel, Ordering::Acquire)
        .map(|_| ())
        .map_err(Descriptor::from_raw)
}

/// Table pages obtained before a change is made, chained through their first word (pages not
/// yet visible to anyone). Pages left over are returned when the reserve is dropped.
pub(crate) struct Reserve<'m, M: TableMemory> {
    mem: &'m M,
    head: u64,
}

impl<'m, M: TableMemory> Reserve<'m, M> {
    /// Obtains `count` zeroed pages, or none and [`Error::NoMemory`].
    pub fn new(mem: &'m M, count: usize) -> Result<Self, Error> {
        let mut reserve = Reserve { mem, head: 0 };
        for _ in 0..count {
            let pa = mem.alloc_zeroed_table().ok_or(Error::NoMemory)?;
            // SAFETY: `pa` was just allocated and is owned by the reserve until taken.
            let page = unsafe { mem.table(pa) };
            page[0].store(reserve.head, Ordering::Relaxed);
            reserve.head = pa;
        }
        Ok(reserve)
    }

    /// No pages: for a commit whose visitor never creates or splits tables.
    pub fn empty(mem: &'m M) -> Self {
        Reserve { mem, head: 0 }
    }

    /// A zeroed page, or `None` once the reserve is used up (the walker makes that a typed
    /// error; see [`driver`] for why a prepared commit never gets there).
    pub fn take(&mut self) -> Option<u64> {
        let pa = self.head;
        if pa == 0 {
            return None;
        }
        // SAFETY: `pa` is the head of the reserve's list of allocated, unlinked pages.
        self.head = unsafe { self.mem.table(pa) }[0].swap(0, Ordering::Relaxed);
        Some(pa)
    }

    /// Gives back a page from [`Reserve::take`] that was not linked (its slot changed before
    /// the compare-and-swap), still zeroed.
    pub fn put_back(&mut self, pa: u64) {
        // SAFETY: `pa` came from this reserve and was never linked: the reserve owns it again.
        let page = unsafe { self.mem.table(pa) };
        page[0].store(self.head, Ordering::Relaxed);
        self.head = pa;
    }
}

impl<M: TableMemory> Drop for Reserve<'_, M> {
    fn drop(&mut self) {
        while let Some(pa) = self.take() {
            self.mem.free_table(pa);
        }
    }
}
