//! The implementations behind [`crate::Stage2Table`]'s operations.
//!
//! Every structural operation has two phases: *prepare* counts the table pages the change needs
//! and reserves them ([`Reserve`]), failing with nothing changed; *commit* makes the change and
//! cannot fail for lack of memory.

mod commit;
pub(crate) mod driver;
pub(crate) mod leaf;
pub(crate) mod map;
pub(crate) mod protect;
pub(crate) mod split;
pub(crate) mod unmap;
mod update;
pub(crate) mod walk;

use crate::sync::atomic::{AtomicU64, Ordering};
use crate::{level_size, Descriptor, Error, SwEntry, TableMemory};

/// The part of a range `[start, end)` inside the slot that starts at `base`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chunk {
    pub base: u64,
    pub start: u64,
    pub end: u64,
}

impl Chunk {
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

/// The raw value of [`SwEntry::Locked`].
pub(crate) fn locked() -> u64 {
    SwEntry::Locked.encode()
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
