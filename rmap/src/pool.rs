//! Type-stable object pools with generation-checked handles.
//!
//! Our analog of `SLAB_TYPESAFE_BY_RCU`: a slot is allocated once, up front, and is never
//! returned to a general heap. A lockless reader holding a stale [`Handle`] can therefore always
//! touch the slot (its lock, its atomics) and then detect reuse by comparing generations. The
//! generation is bumped when a slot is freed, so `slot.gen == handle.gen` means "still the object
//! the handle named". Handles pack into 32 bits so a `Frame` can hold one and stay 16 bytes.

use crate::lock::{Level, OrderedMutex};
use crate::sync::atomic::{AtomicU32, Ordering};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;
use core::marker::PhantomData;

/// Bits of a packed handle used for the slot index (so at most 2^18 slots per pool).
pub const SLOT_BITS: u32 = 18;
/// Bits of a packed handle used for the generation. A stale handle is misread only if its
/// slot is freed and reused `2^GEN_BITS` times while one reader is between two instructions;
/// the walker's second check (frame still mapped, same anon_vma) narrows that further.
pub const GEN_BITS: u32 = 32 - SLOT_BITS;
/// Largest pool capacity.
pub const MAX_SLOTS: usize = 1 << SLOT_BITS;
const GEN_MASK: u32 = (1 << GEN_BITS) - 1;

/// A generation-checked reference to a pool slot. The raw value 0 is never a valid handle.
pub struct Handle<T> {
    raw: u32,
    _type: PhantomData<fn() -> T>,
}

impl<T> Handle<T> {
    fn new(index: u32, gen: u32) -> Self {
        Self::from_raw(index << GEN_BITS | gen)
    }

    /// Rebuilds a handle from [`Handle::raw`] (e.g. read from a frame's metadata).
    pub const fn from_raw(raw: u32) -> Self {
        Handle {
            raw,
            _type: PhantomData,
        }
    }

    /// The packed value (never 0).
    pub const fn raw(self) -> u32 {
        self.raw
    }

    /// The slot index.
    pub const fn index(self) -> usize {
        (self.raw >> GEN_BITS) as usize
    }

    /// The generation this handle expects.
    pub const fn generation(self) -> u32 {
        self.raw & GEN_MASK
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
    let next = (gen + 1) & GEN_MASK;
    next.max(1)
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

/// A fixed-capacity, type-stable pool.
pub struct Pool<T> {
    slots: Box<[Slot<T>]>,
    free: OrderedMutex<Vec<u32>>,
}

/// The pool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolExhausted;

impl<T: Default> Pool<T> {
    /// A pool of `capacity` slots (at most [`MAX_SLOTS`]), all allocated now.
    pub fn new(capacity: usize, name: &'static str) -> Self {
        assert!(
            capacity <= MAX_SLOTS,
            "pool {name}: capacity above MAX_SLOTS"
        );
        let slots = (0..capacity)
            .map(|_| Slot {
                gen: AtomicU32::new(1),
                refs: AtomicU32::new(0),
                value: T::default(),
            })
            .collect();
        // Popped from the end: hand out low indices first (nicer to read in dumps).
        let free = (0..capacity as u32).rev().collect();
        Pool {
            slots,
            free: OrderedMutex::new(Level::ALLOCATOR, name, free),
        }
    }
}

impl<T> Pool<T> {
    /// Takes a free slot, lets `init` set the object up, then publishes it with one reference.
    /// `init` runs before the reference count becomes non-zero, so a stale reader's
    /// increment-if-not-zero cannot succeed on a half-initialised object.
    pub fn alloc(&self, init: impl FnOnce(Handle<T>, &T)) -> Result<Handle<T>, PoolExhausted> {
        let index = self.free.lock().pop().ok_or(PoolExhausted)?;
        let slot = &self.slots[index as usize];
        let handle = Handle::new(index, slot.gen.load(Ordering::Relaxed));
        init(handle, &slot.value);
        slot.refs.store(1, Ordering::Release);
        Ok(handle)
    }

    /// The slot a handle names, stale or not (type-stable: always safe to read).
    pub fn slot(&self, handle: Handle<T>) -> &Slot<T> {
        &self.slots[handle.index()]
    }

    /// The object if `handle` is live right now (see [`Slot::is`] for what that promises).
    pub fn get(&self, handle: Handle<T>) -> Option<&T> {
        let slot = self.slots.get(handle.index())?;
        slot.is(handle).then_some(&slot.value)
    }

    /// Increment-if-not-zero, then verify the generation: the lockless reader's way in.
    /// On success the caller owns one reference and must [`Pool::put`] it. If the slot was
    /// reused, the accidental reference on the new object is dropped again, and should that be
    /// the last one, `on_last` finalises the new object (with its current handle).
    pub fn try_get(&self, handle: Handle<T>, on_last: impl FnOnce(Handle<T>)) -> Option<&T> {
        let slot = self.slots.get(handle.index())?;
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
        self.slots.len() - self.free.lock().len()
    }

    /// Capacity.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
}
