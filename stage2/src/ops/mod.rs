//! The implementations behind [`crate::Stage2Table`]'s operations.
//!
//! Every structural operation has two phases: *prepare* counts the table pages the change needs
//! and reserves them ([`Reserve`]), failing with nothing changed; *commit* makes the change and
//! cannot fail for lack of memory.

pub(crate) mod leaf;
pub(crate) mod map;
pub(crate) mod protect;
pub(crate) mod split;
pub(crate) mod unmap;
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

    /// A zeroed page. Running out is a bug in the prepare phase's count.
    pub fn take(&mut self) -> u64 {
        let pa = self.head;
        assert_ne!(
            pa, 0,
            "stage2: table reserve exhausted (prepare under-counted)"
        );
        // SAFETY: `pa` is the head of the reserve's list of allocated, unlinked pages.
        self.head = unsafe { self.mem.table(pa) }[0].swap(0, Ordering::Relaxed);
        pa
    }
}

impl<M: TableMemory> Drop for Reserve<'_, M> {
    fn drop(&mut self) {
        while self.head != 0 {
            let pa = self.take();
            self.mem.free_table(pa);
        }
    }
}
