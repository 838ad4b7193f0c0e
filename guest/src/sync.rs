//! The few synchronisation shapes the guest needs.

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::cpu;

/// Shared mutable storage whose discipline is documented at each use (page
/// tables and MMU parameters written by the boot vCPU before others run, or
/// memory read only by hardware and assembly).
#[repr(transparent)]
pub struct RacyCell<T>(UnsafeCell<T>);

// SAFETY: every user documents why its accesses cannot race.
unsafe impl<T> Sync for RacyCell<T> {}

impl<T> RacyCell<T> {
    pub const fn new(value: T) -> Self {
        Self(UnsafeCell::new(value))
    }

    pub const fn get(&self) -> *mut T {
        self.0.get()
    }
}

/// A value published once by the boot vCPU and read by everyone afterwards.
///
/// `set` uses only plain loads and stores (no exclusives), so it works before
/// the MMU is on; it must be called by one vCPU only, before others read.
pub struct SetOnce<T> {
    ready: AtomicBool,
    value: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY: the value is written once before `ready` is released and never
// mutated after, so shared access is read-only.
unsafe impl<T: Sync> Sync for SetOnce<T> {}

impl<T> SetOnce<T> {
    pub const fn new() -> Self {
        Self {
            ready: AtomicBool::new(false),
            value: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// Publishes `value`. Panics if called twice.
    pub fn set(&self, value: T) -> &T {
        assert!(!self.ready.load(Ordering::Acquire), "SetOnce set twice");
        // SAFETY: not yet published, and only one vCPU ever calls `set`, so
        // nobody else reads or writes the slot now.
        unsafe { (*self.value.get()).write(value) };
        self.ready.store(true, Ordering::Release);
        self.get().expect("just set")
    }

    pub fn get(&self) -> Option<&T> {
        if !self.ready.load(Ordering::Acquire) {
            return None;
        }
        // SAFETY: `ready` was released after the value was written, and the
        // value is never written again.
        Some(unsafe { (*self.value.get()).assume_init_ref() })
    }
}

/// A spin lock over no data, owned by a vCPU, that its owner may re-enter:
/// an exception report or a panic in the middle of a console line must still
/// get its own line out instead of deadlocking.
pub struct OwnerLock {
    /// 0 = free, else the owner's vCPU index + 1.
    owner: AtomicUsize,
}

impl OwnerLock {
    pub const fn new() -> Self {
        Self {
            owner: AtomicUsize::new(0),
        }
    }

    /// Runs `f` holding the lock (or inside the holder's own section when the
    /// caller already holds it).
    pub fn with<R>(&self, f: impl FnOnce() -> R) -> R {
        let me = cpu::vcpu_index() + 1;
        if self.owner.load(Ordering::Relaxed) == me {
            return f();
        }
        while self
            .owner
            .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        let r = f();
        self.owner.store(0, Ordering::Release);
        r
    }
}
