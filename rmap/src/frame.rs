//! Per-frame metadata (our `struct page`) and the table that holds it for a PFN range.

use crate::anon_vma::AnonHandle;
use crate::lock::{lockdep, Level, LockClass};
use crate::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use crate::Pfn;
use alloc::boxed::Box;

/// The frame is locked (migration, reclaim, CoW reuse, re-homing).
pub const FRAME_LOCKED: u16 = 1 << 0;
/// The frame is allocated (owned by some VM mapping or a caller's pin).
pub const FRAME_ALLOCATED: u16 = 1 << 1;
/// The frame holds anonymous guest memory and `anon_slot` is meaningful.
pub const FRAME_ANON: u16 = 1 << 2;
/// The frame is merged (KSM): read-only for every mapper, which may belong to different fork
/// families; `anon_slot` is 0 and `index` names its stable node's pool slot (Linux's
/// `PAGE_MAPPING_KSM` in `page->mapping`). Set and read under the frame lock.
pub const FRAME_MERGED: u16 = 1 << 3;

const FRAME_LOCK: LockClass = LockClass::new(Level::FRAME, "frame.lock");
/// The frame locks a batch holds, recorded once (see `FrameTable::try_lock_batched`).
pub(crate) const BATCH_FRAME_LOCK: LockClass = LockClass::new(Level::FRAME, "frame.lock (batch)");

/// Metadata for one 4 KiB host frame: 16 bytes.
///
/// `mapcount` counts stage-2 leaf entries that map the frame; `refcount` counts those plus
/// temporary pins (a migration or reclaim in progress). `anon_slot` names the anon_vma's pool
/// slot (index + 1; 0: none) and, like `page->mapping`, may be stale when read without the
/// frame lock. It carries no generation, as `page->mapping` carries none: 32 bits name any of
/// the 2^32 slots a pool can have, so the number of anon_vmas (and VMs) is bounded by memory
/// alone while `Frame` stays 16 bytes. A lockless reader pins the slot's object under the
/// generation it reads there, then re-checks that the frame is still mapped and still names
/// the slot ([`crate::Rmap::get_anon_vma`]): a mapped frame's anon_vma cannot be freed, so
/// the pinned object is the frame's. `index`
/// is the frame's page offset in its regions' linear space (like `page->index`), so the IPA in
/// a region is `region.start + (index - region.pgoff) * 4 KiB`. Page offsets are 32-bit, which
/// covers a 44-bit IPA space.
#[repr(C)]
#[derive(Default)]
pub struct Frame {
    flags: AtomicU16,
    mapcount: AtomicU16,
    refcount: AtomicU32,
    anon_slot: AtomicU32,
    index: AtomicU32,
}

impl Frame {
    /// Flag bits (`FRAME_*`).
    pub fn flags(&self) -> u16 {
        self.flags.load(Ordering::Acquire)
    }

    /// How many stage-2 entries map this frame.
    pub fn mapcount(&self) -> u32 {
        u32::from(self.mapcount.load(Ordering::Acquire))
    }

    /// Whether any stage-2 entry maps this frame.
    pub fn is_mapped(&self) -> bool {
        self.mapcount() > 0
    }

    /// Mappings plus pins.
    pub fn refcount(&self) -> u32 {
        self.refcount.load(Ordering::Acquire)
    }

    /// The pool slot of the anon_vma this frame belongs to (possibly stale unless the frame
    /// is locked); [`crate::Rmap::frame_anon_vma`] turns it into a handle.
    pub fn anon_slot(&self) -> Option<u32> {
        self.anon_slot.load(Ordering::Acquire).checked_sub(1)
    }

    /// Page offset in the linear space of the regions that map it.
    pub fn index(&self) -> u64 {
        u64::from(self.index.load(Ordering::Acquire))
    }

    /// Whether the frame is merged ([`FRAME_MERGED`]): exact under the frame lock.
    pub fn is_merged(&self) -> bool {
        self.flags() & FRAME_MERGED != 0
    }

    /// The pool slot of a merged frame's stable node (exact under the frame lock).
    pub fn stable_slot(&self) -> Option<u32> {
        self.is_merged().then(|| self.index.load(Ordering::Acquire))
    }

    /// Makes a locked frame a merged one, naming stable node slot `slot`. Clearing
    /// `anon_slot` first makes a lockless reader that pinned the old anon_vma fail its
    /// re-check ([`crate::Rmap::get_anon_vma`]).
    pub(crate) fn set_stable(&self, slot: u32) {
        self.anon_slot.store(0, Ordering::Release);
        self.index.store(slot, Ordering::Release);
        self.flags.fetch_or(FRAME_MERGED, Ordering::Release);
    }

    /// Takes a locked merged frame's stable node away (migration moved it to another frame).
    pub(crate) fn clear_stable(&self) {
        self.flags.fetch_and(!FRAME_MERGED, Ordering::Release);
        self.index.store(0, Ordering::Release);
    }

    pub(crate) fn init_allocated(&self) {
        self.mapcount.store(0, Ordering::Relaxed);
        self.anon_slot.store(0, Ordering::Relaxed);
        self.index.store(0, Ordering::Relaxed);
        self.refcount.store(1, Ordering::Relaxed);
        self.flags.store(FRAME_ALLOCATED, Ordering::Release);
    }

    /// Sets the reverse-map identity of a frame nobody else can see yet (a new frame, or one
    /// whose lock the caller holds).
    pub(crate) fn set_anon(&self, anon_vma: AnonHandle, index: u64) {
        let index = u32::try_from(index).expect("page offset beyond 32 bits");
        self.index.store(index, Ordering::Relaxed);
        let slot = u32::try_from(anon_vma.index() + 1).expect("pool slots are below u32::MAX");
        self.anon_slot.store(slot, Ordering::Release);
        self.flags.fetch_or(FRAME_ANON, Ordering::Release);
    }

    /// Adds a mapping unless the frame already has `limit`; false then.
    pub(crate) fn try_inc_map(&self, limit: u32) -> bool {
        let mut old = self.mapcount.load(Ordering::Relaxed);
        loop {
            if u32::from(old) >= limit {
                return false;
            }
            match self.mapcount.compare_exchange_weak(
                old,
                old + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(seen) => old = seen,
            }
        }
        self.refcount.fetch_add(1, Ordering::AcqRel);
        true
    }

    pub(crate) fn inc_map(&self) {
        let old = self.mapcount.fetch_add(1, Ordering::AcqRel);
        assert!(old < u16::MAX, "mapcount overflow");
        self.refcount.fetch_add(1, Ordering::AcqRel);
    }

    /// Drops one mapping; returns true if that was the last reference.
    #[must_use]
    pub(crate) fn dec_map(&self) -> bool {
        let old = self.mapcount.fetch_sub(1, Ordering::AcqRel);
        assert!(old > 0, "mapcount underflow");
        self.put()
    }

    /// Whether something besides its mappings and the caller's one pin holds the frame (the
    /// swap cache, a fault in progress): migration and reclaim leave such a frame alone.
    pub(crate) fn pinned_by_others(&self) -> bool {
        self.refcount() != self.mapcount() + 1
    }

    /// Pins an allocated frame (increment-if-not-zero). False if it is free.
    pub(crate) fn try_pin(&self) -> bool {
        let mut refs = self.refcount.load(Ordering::Relaxed);
        while refs != 0 {
            match self.refcount.compare_exchange_weak(
                refs,
                refs + 1,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(seen) => refs = seen,
            }
        }
        false
    }

    /// Drops a reference; true if it was the last (the caller frees the frame).
    #[must_use]
    pub(crate) fn put(&self) -> bool {
        let old = self.refcount.fetch_sub(1, Ordering::AcqRel);
        assert!(old > 0, "refcount underflow");
        old == 1
    }

    pub(crate) fn clear(&self) {
        debug_assert_eq!(self.mapcount(), 0);
        self.anon_slot.store(0, Ordering::Release);
        self.flags.store(0, Ordering::Release);
    }

    fn try_lock_bit(&self) -> bool {
        self.flags.fetch_or(FRAME_LOCKED, Ordering::Acquire) & FRAME_LOCKED == 0
    }

    fn unlock_bit(&self) {
        self.flags.fetch_and(!FRAME_LOCKED, Ordering::Release);
    }

    /// Whether the lock bit is set.
    pub fn is_locked(&self) -> bool {
        self.flags() & FRAME_LOCKED != 0
    }

    /// The bits above the `FRAME_*` flags: in a folio's first tail frame, the folio's entire
    /// mapcount (`crate::folio`); 0 in every other frame.
    pub(crate) fn entire_bits(&self) -> u32 {
        u32::from(self.flags() >> ENTIRE_SHIFT)
    }

    /// Replaces the entire-mapcount bits if they still are `old` (the flag bits below them,
    /// the lock bit among them, may change meanwhile and are kept).
    pub(crate) fn cas_entire_bits(&self, old: u32, new: u32) -> bool {
        let (old, new) = (old as u16, new as u16);
        let mut seen = self.flags.load(Ordering::Relaxed);
        while seen >> ENTIRE_SHIFT == old {
            let want = (seen & ((1 << ENTIRE_SHIFT) - 1)) | (new << ENTIRE_SHIFT);
            match self
                .flags
                .compare_exchange_weak(seen, want, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => seen = now,
            }
        }
        false
    }
}

/// Where a folio's entire mapcount starts in its first tail's `flags` (above the four flags).
pub(crate) const ENTIRE_SHIFT: u16 = 4;

/// Proof that the caller holds a frame's lock bit; unlocks on drop.
pub struct FrameGuard<'a> {
    frame: &'a Frame,
    pfn: Pfn,
    /// Recorded in lockdep (false for a batch's frames, which lockdep sees as one lock).
    tracked: bool,
}

impl FrameGuard<'_> {
    /// The locked frame's number.
    pub fn pfn(&self) -> Pfn {
        self.pfn
    }

    /// The locked frame's metadata.
    pub fn frame(&self) -> &Frame {
        self.frame
    }
}

impl Drop for FrameGuard<'_> {
    fn drop(&mut self) {
        self.frame.unlock_bit();
        if self.tracked {
            lockdep::release(self.frame as *const Frame as usize);
        }
    }
}

/// Metadata for every frame of a contiguous PFN range.
pub struct FrameTable {
    base: Pfn,
    frames: Storage,
}

/// Where the table lives: the heap (hosts, tests), or memory the caller gave
/// it for good (the hypervisor: frames sized to the machine's RAM at boot, so
/// a large host's table does not come from, or fragment, the heap).
enum Storage {
    Heap(Box<[Frame]>),
    Given(&'static [Frame]),
}

impl core::ops::Deref for Storage {
    type Target = [Frame];

    fn deref(&self) -> &[Frame] {
        match self {
            Storage::Heap(b) => b,
            Storage::Given(s) => s,
        }
    }
}

impl FrameTable {
    /// Metadata for PFNs `base .. base + count`, on the heap.
    pub fn new(base: Pfn, count: usize) -> Self {
        let frames = (0..count).map(|_| Frame::default()).collect();
        FrameTable {
            base,
            frames: Storage::Heap(frames),
        }
    }

    /// Metadata for PFNs `base .. base + memory.len()`, in `memory`, which the
    /// table keeps for good (it is initialised here).
    pub fn in_memory(base: Pfn, memory: &'static mut [core::mem::MaybeUninit<Frame>]) -> Self {
        for slot in memory.iter_mut() {
            slot.write(Frame::default());
        }
        let len = memory.len();
        let ptr = memory.as_mut_ptr().cast::<Frame>();
        // SAFETY: every element was initialised just above, and
        // `MaybeUninit<Frame>` has `Frame`'s layout; the memory is 'static
        // and given to the table for good (no other reference remains).
        let frames = unsafe { core::slice::from_raw_parts(ptr, len) };
        FrameTable {
            base,
            frames: Storage::Given(frames),
        }
    }

    /// A table over `count` frames from `base` in heap memory leaked for good, so it can be
    /// [viewed](FrameTable::view) (host tests: their stage 2 reports splits through a view).
    pub fn leaked(base: Pfn, count: usize) -> Self {
        let memory = alloc::vec::Vec::leak(
            (0..count)
                .map(|_| core::mem::MaybeUninit::uninit())
                .collect(),
        );
        Self::in_memory(base, memory)
    }

    /// Another table over the same frames, for a table in memory given for good (the stage 2
    /// reports block splits to the folio counts, `crate::folio`, through it); `None` for one
    /// on the heap.
    pub fn view(&self) -> Option<FrameTable> {
        match self.frames {
            Storage::Given(frames) => Some(FrameTable {
                base: self.base,
                frames: Storage::Given(frames),
            }),
            Storage::Heap(_) => None,
        }
    }

    /// The metadata of `pfn`, if in range.
    pub fn get(&self, pfn: Pfn) -> Option<&Frame> {
        let offset = pfn.checked_offset_from(self.base)?;
        self.frames.get(usize::try_from(offset).ok()?)
    }

    /// The metadata of `pfn`; panics if out of range (a hypervisor bug).
    pub fn frame(&self, pfn: Pfn) -> &Frame {
        self.get(pfn)
            .unwrap_or_else(|| panic!("pfn {pfn:#x} outside the frame table"))
    }

    /// First PFN covered.
    pub fn base(&self) -> Pfn {
        self.base
    }

    /// Number of frames covered.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether the table covers no frame.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Iterates `(pfn, frame)`.
    pub fn iter(&self) -> impl Iterator<Item = (Pfn, &Frame)> {
        self.frames
            .iter()
            .enumerate()
            .map(|(i, f)| (self.base + i as u64, f))
    }

    /// Locks a frame (lock order level 2), spinning while another CPU holds it.
    pub fn lock(&self, pfn: Pfn) -> FrameGuard<'_> {
        let frame = self.frame(pfn);
        let id = frame as *const Frame as usize;
        lockdep::check(FRAME_LOCK, id);
        while !frame.try_lock_bit() {
            crate::sync::spin_loop();
        }
        lockdep::record(FRAME_LOCK, id);
        FrameGuard {
            frame,
            pfn,
            tracked: true,
        }
    }

    /// Locks a frame if it is free to lock (exempt from the order check: it never waits).
    pub fn try_lock(&self, pfn: Pfn) -> Option<FrameGuard<'_>> {
        let frame = self.frame(pfn);
        if !frame.try_lock_bit() {
            return None;
        }
        lockdep::record(FRAME_LOCK, frame as *const Frame as usize);
        Some(FrameGuard {
            frame,
            pfn,
            tracked: true,
        })
    }

    /// Locks a frame the caller has just allocated (a migration target). Its lock can only be
    /// held for a moment by someone who pinned it by number while scanning frames (a batch of
    /// a physical range, a clock sweep): they find it unmapped and let go, waiting on nothing
    /// meanwhile, so spinning here cannot deadlock. Exempt from the order check for the same
    /// reason. `batched`: one of a batch's many locks (see [`FrameTable::try_lock_batched`]).
    pub(crate) fn lock_fresh(&self, pfn: Pfn, batched: bool) -> FrameGuard<'_> {
        let frame = self.frame(pfn);
        while !frame.try_lock_bit() {
            crate::sync::spin_loop();
        }
        if !batched {
            lockdep::record(FRAME_LOCK, frame as *const Frame as usize);
        }
        FrameGuard {
            frame,
            pfn,
            tracked: !batched,
        }
    }

    /// Try-locks a frame of a batch (migration, reclaim), which may hold hundreds of frame
    /// locks: like Linux's folio locks they are not tracked one by one; the batch records one
    /// [`BATCH_FRAME_LOCK`] for all of them, so the order checks still apply.
    pub(crate) fn try_lock_batched(&self, pfn: Pfn) -> Option<FrameGuard<'_>> {
        let frame = self.frame(pfn);
        if !frame.try_lock_bit() {
            return None;
        }
        Some(FrameGuard {
            frame,
            pfn,
            tracked: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Shuttle's atomics carry a vector clock: the size holds for the real build only.
    #[cfg(not(feature = "shuttle"))]
    #[test]
    fn frame_is_16_bytes() {
        assert_eq!(core::mem::size_of::<Frame>(), 16);
    }

    #[test]
    fn names_any_slot_a_pool_can_have() {
        let table = FrameTable::new(Pfn::new(0), 1);
        let frame = table.frame(Pfn::new(0));
        frame.init_allocated();
        assert_eq!(frame.anon_slot(), None);
        let last = crate::pool::MAX_SLOTS as u64 - 1;
        frame.set_anon(AnonHandle::from_raw(last << crate::pool::GEN_BITS | 7), 0);
        assert_eq!(frame.anon_slot(), Some(last as u32));
    }

    #[test]
    fn lock_bit_excludes() {
        let table = FrameTable::new(Pfn::new(0x100), 4);
        let guard = table.lock(Pfn::new(0x101));
        assert!(table.frame(Pfn::new(0x101)).is_locked());
        assert!(table.try_lock(Pfn::new(0x101)).is_none());
        drop(guard);
        assert!(table.try_lock(Pfn::new(0x101)).is_some());
        assert!(table.get(Pfn::new(0x104)).is_none());
        assert!(table.get(Pfn::new(0xff)).is_none());
    }

    #[test]
    fn pin_only_allocated_frames() {
        let table = FrameTable::new(Pfn::new(0), 1);
        let frame = table.frame(Pfn::new(0));
        assert!(!frame.try_pin());
        frame.init_allocated();
        assert!(frame.try_pin());
        assert!(!frame.put());
        assert!(frame.put());
    }
}
