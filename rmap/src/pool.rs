//! Type-stable object pools with generation-checked handles.
//!
//! Our analog of `SLAB_TYPESAFE_BY_RCU`: a slot is allocated once, up front, and is never
//! returned to a general heap. A lockless reader holding a stale [`Handle`] can therefore always
//! touch the slot (its lock, its atomics) and then detect reuse by comparing generations. The
//! generation is bumped when a slot is freed, so `slot.gen == handle.gen` means "still the object
//! the handle named". Handles pack into 64 bits (32 for the slot, 32 for the generation), so
//! a pool is capped by memory alone: a `Frame` holds one in 8 of its 24 bytes.

use crate::lock::{Level, OrderedMutex};
use crate::segdir::SegmentDirectory;
use crate::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;
use core::marker::PhantomData;

/// Bits of a packed handle used for the slot index: 2^32 slots per pool, more anon_vmas or
/// chains than any machine's memory could hold, so the number of VMs is bounded by memory
/// alone (issue 14), not by the handle format.
pub const SLOT_BITS: u32 = 32;
/// Bits of a packed handle used for the generation. A stale handle is misread only if its
/// slot is freed and reused `2^GEN_BITS` times while one reader is between two instructions;
/// the walker's second check (frame still mapped, same anon_vma) narrows that further.
pub const GEN_BITS: u32 = 64 - SLOT_BITS;
/// Largest pool capacity (slot indices are `u32`; `u32::MAX` itself is never built).
pub const MAX_SLOTS: usize = u32::MAX as usize;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;

/// A generation-checked reference to a pool slot. The raw value 0 is never a valid handle.
pub struct Handle<T> {
    raw: u64,
    _type: PhantomData<fn() -> T>,
}

impl<T> Handle<T> {
    fn new(index: u32, gen: u32) -> Self {
        Self::from_raw((index as u64) << GEN_BITS | gen as u64)
    }

    /// Rebuilds a handle from [`Handle::raw`] (e.g. read from a frame's metadata).
    pub const fn from_raw(raw: u64) -> Self {
        Handle {
            raw,
            _type: PhantomData,
        }
    }

    /// The packed value (never 0).
    pub const fn raw(self) -> u64 {
        self.raw
    }

    /// The slot index.
    pub const fn index(self) -> usize {
        (self.raw >> GEN_BITS) as usize
    }

    /// The generation this handle expects.
    pub const fn generation(self) -> u32 {
        (self.raw & GEN_MASK) as u32
    }
}

impl<T> Clone for Handle<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Handle<T> {}
impl<T> PartialEq for Handle<T> {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}
impl<T> Eq for Handle<T> {}
impl<T> fmt::Debug for Handle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}g{}", self.index(), self.generation())
    }
}

fn next_gen(gen: u32) -> u32 {
    // Generation 0 is skipped so that raw handle 0 (slot 0, gen 0) always means "none".
    gen.wrapping_add(1).max(1)
}

/// One pool slot: the object plus its generation and reference count.
pub struct Slot<T> {
    gen: AtomicU32,
    refs: AtomicU32,
    /// The object. It lives forever; `alloc` re-initialises it through its own interior
    /// mutability.
    pub value: T,
}

impl<T> Slot<T> {
    /// Whether the slot still holds the object `handle` names (a snapshot: only meaningful
    /// to a caller that holds a reference or a lock that keeps the object alive).
    pub fn is(&self, handle: Handle<T>) -> bool {
        self.gen.load(Ordering::Acquire) == handle.generation() && self.refs() > 0
    }

    /// Current reference count (0 when free).
    pub fn refs(&self) -> u32 {
        self.refs.load(Ordering::Acquire)
    }
}

/// Slots per segment: the pool grows a segment at a time.
pub const SEGMENT_SLOTS: usize = 256;

/// A type-stable pool that grows, a segment of [`SEGMENT_SLOTS`] slots at a time, up to a cap
/// (at most [`MAX_SLOTS`]). A segment, once added, stays for the pool's life: memory that was
/// a slot stays a slot of this type, which is what lets a lockless reader touch a slot through
/// a stale handle (like the kernel's `SLAB_TYPESAFE_BY_RCU` slabs, which also grow).
pub struct Pool<T> {
    /// Segment `i` holds slots `i * SEGMENT_SLOTS ..`: the address of a leaked
    /// `[Slot<T>; SEGMENT_SLOTS]`, or 0. Published with `Release` after the slots are built.
    segments: SegmentDirectory,
    /// Segments claimed (some may be 0 for a moment while being built, or for good if building
    /// one failed).
    claimed: AtomicUsize,
    /// Slots this pool may have (its cap); the last segment may be partly usable.
    max: usize,
    free: OrderedMutex<Vec<u32>>,
    /// Slots built (the capacity today).
    built: AtomicUsize,
    /// The pool owns its slots' `T`s (through the segment addresses).
    _owns: PhantomData<T>,
}

/// The pool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolExhausted;

impl<T: Default> Pool<T> {
    /// A pool that starts with `initial` slots and grows to at most `max` (rounded up to whole
    /// segments; at most [`MAX_SLOTS`]).
    pub fn new(initial: usize, max: usize, name: &'static str) -> Self {
        assert!(max <= MAX_SLOTS, "pool {name}: capacity above MAX_SLOTS");
        let pool = Pool {
            segments: SegmentDirectory::new(max.div_ceil(SEGMENT_SLOTS)),
            claimed: AtomicUsize::new(0),
            max,
            free: OrderedMutex::new(Level::ALLOCATOR, name, Vec::new()),
            built: AtomicUsize::new(0),
            _owns: PhantomData,
        };
        while pool.built.load(Ordering::Relaxed) < initial.min(max) {
            if !pool.grow() {
                break;
            }
        }
        pool
    }

    /// Adds one segment; false at the cap or when memory for it is short (never aborts).
    fn grow(&self) -> bool {
        let seg = self.claimed.fetch_add(1, Ordering::AcqRel);
        if seg >= self.max.div_ceil(SEGMENT_SLOTS) {
            self.claimed.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        let built = self.build_segment(seg);
        if !built {
            // Give the index back if no one claimed a later one meanwhile.
            let _ =
                self.claimed
                    .compare_exchange(seg + 1, seg, Ordering::AcqRel, Ordering::Relaxed);
        }
        built
    }

    /// Builds claimed segment `seg`, publishes it and frees its slots; false, with nothing
    /// published, if memory for it (its slots, the free list's room, its directory block) is
    /// short.
    fn build_segment(&self, seg: usize) -> bool {
        let mut slots: Vec<Slot<T>> = Vec::new();
        if slots.try_reserve_exact(SEGMENT_SLOTS).is_err() {
            return false;
        }
        slots.extend((0..SEGMENT_SLOTS).map(|_| Slot {
            gen: AtomicU32::new(1),
            refs: AtomicU32::new(0),
            value: T::default(),
        }));
        let first = seg * SEGMENT_SLOTS;
        let usable = (first + SEGMENT_SLOTS).min(self.max) - first;
        let mut free = self.free.lock();
        if free.try_reserve(SEGMENT_SLOTS).is_err() {
            return false;
        }
        let segment = Box::leak(slots.into_boxed_slice()).as_mut_ptr();
        if !self.segments.set(seg, segment as usize) {
            // SAFETY: leaked just above and never published.
            drop(unsafe { Self::unleak(segment as usize) });
            return false;
        }
        self.built.fetch_add(usable, Ordering::Relaxed);
        // Popped from the end: hand out low indices first (nicer to read in dumps).
        free.extend((first as u32..(first + usable) as u32).rev());
        true
    }

    /// Takes a free slot, growing the pool if it has none (see [`Pool::alloc`]).
    pub fn alloc(&self, init: impl FnOnce(Handle<T>, &T)) -> Result<Handle<T>, PoolExhausted> {
        loop {
            let index = self.free.lock().pop();
            match index {
                Some(index) => return Ok(self.publish(index, init)),
                None if self.grow() => {}
                None => return Err(PoolExhausted),
            }
        }
    }
}

impl<T> Pool<T> {
    /// # Safety
    /// `addr` came from `Box::leak` of a boxed slice of exactly [`SEGMENT_SLOTS`] slots, and no
    /// reference into it is left or will be made.
    unsafe fn unleak(addr: usize) -> Box<[Slot<T>]> {
        // SAFETY: by the contract.
        unsafe {
            Box::from_raw(core::ptr::slice_from_raw_parts_mut(
                addr as *mut Slot<T>,
                SEGMENT_SLOTS,
            ))
        }
    }
}

impl<T> Drop for Pool<T> {
    fn drop(&mut self) {
        let built: Vec<usize> = self.segments.built().collect();
        for addr in built {
            // SAFETY: every built segment is a leaked boxed slice of SEGMENT_SLOTS slots
            // (`build_segment`), and `&mut self` means no reference into it is left.
            drop(unsafe { Self::unleak(addr) });
        }
    }
}

impl<T> Pool<T> {
    /// Lets `init` set up the object of free slot `index`, then publishes it with one
    /// reference. `init` runs before the reference count becomes non-zero, so a stale reader's
    /// increment-if-not-zero cannot succeed on a half-initialised object.
    fn publish(&self, index: u32, init: impl FnOnce(Handle<T>, &T)) -> Handle<T> {
        let slot = self
            .slot_at(index as usize)
            .expect("a free index names a built slot");
        let handle = Handle::new(index, slot.gen.load(Ordering::Relaxed));
        init(handle, &slot.value);
        slot.refs.store(1, Ordering::Release);
        handle
    }

    /// Slot `index`, if its segment is built.
    fn slot_at(&self, index: usize) -> Option<&Slot<T>> {
        let ptr = self.segments.get(index / SEGMENT_SLOTS) as *const Slot<T>;
        if ptr.is_null() {
            return None;
        }
        // SAFETY: a non-zero segment is a leaked boxed slice of SEGMENT_SLOTS initialised slots
        // (published with Release after they were built, read with Acquire), freed only when
        // the pool is dropped; `index % SEGMENT_SLOTS` is in bounds.
        Some(unsafe { &*ptr.add(index % SEGMENT_SLOTS) })
    }

    /// The slot a handle names, stale or not (type-stable: always safe to read).
    pub fn slot(&self, handle: Handle<T>) -> &Slot<T> {
        self.slot_at(handle.index())
            .unwrap_or_else(|| panic!("handle {handle:?} names no built slot"))
    }

    /// The handle of whatever slot `index` holds now, under its current generation (`None` if
    /// the slot was never built). Like [`Pool::slot`], only a snapshot: a caller pins it with
    /// [`Pool::try_get`] or checks it with [`Slot::is`] under a lock, then re-checks whatever
    /// told it the index (a frame's `anon_slot`).
    pub fn current(&self, index: u32) -> Option<Handle<T>> {
        let slot = self.slot_at(index as usize)?;
        Some(Handle::new(index, slot.gen.load(Ordering::Acquire)))
    }

    /// The object if `handle` is live right now (see [`Slot::is`] for what that promises).
    pub fn get(&self, handle: Handle<T>) -> Option<&T> {
        let slot = self.slot_at(handle.index())?;
        slot.is(handle).then_some(&slot.value)
    }

    /// Increment-if-not-zero, then verify the generation: the lockless reader's way in.
    /// On success the caller owns one reference and must [`Pool::put`] it. If the slot was
    /// reused, the accidental reference on the new object is dropped again, and should that be
    /// the last one, `on_last` finalises the new object (with its current handle).
    pub fn try_get(&self, handle: Handle<T>, on_last: impl FnOnce(Handle<T>)) -> Option<&T> {
        let slot = self.slot_at(handle.index())?;
        let mut refs = slot.refs.load(Ordering::Relaxed);
        loop {
            if refs == 0 {
                return None;
            }
            match slot.refs.compare_exchange_weak(
                refs,
                refs + 1,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(seen) => refs = seen,
            }
        }
        let gen = slot.gen.load(Ordering::Acquire);
        if gen == handle.generation() {
            return Some(&slot.value);
        }
        let current = Handle::new(handle.index() as u32, gen);
        if self.put(current) {
            on_last(current);
        }
        None
    }

    /// Takes one more reference on an object the caller knows is live.
    pub fn get_ref(&self, handle: Handle<T>) {
        let old = self.slot(handle).refs.fetch_add(1, Ordering::Relaxed);
        debug_assert!(old > 0, "get_ref on a free slot {handle:?}");
    }

    /// Drops one reference; returns true if it was the last (the caller must then
    /// [`Pool::recycle`] the slot after finalising the object).
    #[must_use]
    pub fn put(&self, handle: Handle<T>) -> bool {
        let old = self.slot(handle).refs.fetch_sub(1, Ordering::AcqRel);
        assert!(old > 0, "put on a free slot {handle:?}");
        old == 1
    }

    /// Returns a slot whose last reference was dropped to the free list. Bumping the generation
    /// first is what makes every outstanding handle stale.
    pub fn recycle(&self, handle: Handle<T>) {
        let slot = self.slot(handle);
        debug_assert_eq!(slot.refs(), 0);
        // Broken variant (lesson 1): the slot is handed back for reuse before its old
        // identity is invalidated, so a new owner can be published under the stale handle.
        #[cfg(feature = "mutate-recycle-before-invalidate")]
        self.free.lock().push(handle.index() as u32);
        slot.gen
            .store(next_gen(handle.generation()), Ordering::Release);
        #[cfg(not(feature = "mutate-recycle-before-invalidate"))]
        self.free.lock().push(handle.index() as u32);
    }

    /// Live objects.
    pub fn live(&self) -> usize {
        let free = self.free.lock().len();
        self.capacity() - free
    }

    /// Slots built so far (grows up to the cap).
    pub fn capacity(&self) -> usize {
        self.built.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[derive(Default)]
    struct Obj(AtomicU32);

    #[test]
    fn grows_a_segment_at_a_time_up_to_an_exact_cap() {
        let pool: Pool<Obj> = Pool::new(1, SEGMENT_SLOTS + 3, "test.pool");
        assert_eq!(pool.capacity(), SEGMENT_SLOTS, "one segment to start");
        let handles: Vec<_> = (0..SEGMENT_SLOTS + 3)
            .map(|i| {
                pool.alloc(|_, o| o.0.store(i as u32, Ordering::Relaxed))
                    .expect("room up to the cap")
            })
            .collect();
        assert_eq!(
            pool.capacity(),
            SEGMENT_SLOTS + 3,
            "the last segment is capped"
        );
        assert_eq!(pool.alloc(|_, _| {}), Err(PoolExhausted));
        assert_eq!(pool.live(), SEGMENT_SLOTS + 3);
        // Every object keeps its identity across the growth.
        for (i, h) in handles.iter().enumerate() {
            assert_eq!(pool.get(*h).unwrap().0.load(Ordering::Relaxed), i as u32);
        }
    }

    #[test]
    fn a_stale_handle_into_a_grown_segment_is_detected() {
        let pool: Pool<Obj> = Pool::new(1, 4 * SEGMENT_SLOTS, "test.pool");
        let first: Vec<_> = (0..SEGMENT_SLOTS + 1)
            .map(|_| pool.alloc(|_, _| {}).unwrap())
            .collect();
        let late = *first.last().unwrap();
        assert!(late.index() >= SEGMENT_SLOTS, "from the second segment");
        assert!(pool.put(late));
        pool.recycle(late);
        assert!(pool.get(late).is_none(), "freed");
        let again = pool.alloc(|_, _| {}).unwrap();
        assert_eq!(again.index(), late.index(), "the slot is reused");
        assert!(pool.get(late).is_none(), "the old handle stays stale");
        assert!(pool
            .try_get(late, |_| panic!("not the last reference"))
            .is_none());
        assert!(pool.get(again).is_some());
    }

    #[test]
    fn grows_past_what_an_18_bit_slot_index_could_name() {
        // The old 32-bit handles (18-bit slot) capped a pool, and so the VMs, at 2^18.
        let pool: Pool<Obj> = Pool::new(1, MAX_SLOTS, "test.pool");
        let old_cap = 1 << 18;
        let mut last = None;
        for _ in 0..=old_cap {
            last = Some(
                pool.alloc(|_, _| {})
                    .expect("memory, not the handle, is the limit"),
            );
        }
        let last = last.unwrap();
        assert_eq!(last.index(), old_cap);
        assert_eq!(pool.current(old_cap as u32), Some(last));
        assert!(pool.put(last));
        pool.recycle(last);
        let again = pool.alloc(|_, _| {}).unwrap();
        assert_eq!(again.index(), old_cap);
        assert_ne!(again, last, "a new generation");
        assert_eq!(pool.current(old_cap as u32), Some(again));
        assert_eq!(pool.current(old_cap as u32 + SEGMENT_SLOTS as u32), None);
    }

    #[test]
    fn a_handle_into_a_segment_never_built_names_nothing() {
        let pool: Pool<Obj> = Pool::new(1, MAX_SLOTS, "test.pool");
        let far = Handle::<Obj>::new((3 * SEGMENT_SLOTS) as u32, 1);
        assert!(pool.get(far).is_none());
        assert!(pool.try_get(far, |_| {}).is_none());
    }
}
