//! The one place rmap's concurrency primitives come from.
//!
//! Normally these are `core`'s atomics and the `spin` crate's locks (the only locks there are at
//! EL2). With the `shuttle` feature they are [shuttle]'s, so that the crate's own code (not a
//! model of it) runs under shuttle's schedulers, which explore thread interleavings at every
//! atomic operation and lock acquisition and report deadlocks and panics with a replayable
//! schedule. Spin loops call [`spin_loop`], which under the checker is a `yield_now`: a thread
//! waiting for another must let it run (shuttle runs one thread at a time, and its PCT
//! scheduler would otherwise keep running the spinner forever).
//!
//! Everything here keeps one API whichever backend is selected, so the rest of the crate does
//! not know which it has. Under the checker the primitives may only be used inside a shuttle
//! execution (`shuttle::check_*`): `cargo test -p rmap --features shuttle` runs the
//! `tests/shuttle_*.rs` files; the other tests need the normal build.
//!
//! [shuttle]: https://docs.rs/shuttle

/// Atomic integers and orderings (`core::sync::atomic`, or shuttle's, which treat every
/// ordering as `SeqCst`).
pub mod atomic {
    #[cfg(not(feature = "shuttle"))]
    pub use core::sync::atomic::{
        AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering,
    };
    #[cfg(feature = "shuttle")]
    pub use shuttle::sync::atomic::{
        AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering,
    };
}

/// Called in every spin-wait iteration: a CPU hint normally, a yield to the scheduler under
/// the checker.
#[inline]
pub fn spin_loop() {
    #[cfg(not(feature = "shuttle"))]
    core::hint::spin_loop();
    #[cfg(feature = "shuttle")]
    shuttle::thread::yield_now();
}

#[cfg(not(feature = "shuttle"))]
mod imp {
    pub type Mutex<T> = spin::Mutex<T>;
    pub type MutexGuard<'a, T> = spin::MutexGuard<'a, T>;
    pub type RwLock<T> = spin::RwLock<T>;
    pub type ReadGuard<'a, T> = spin::RwLockReadGuard<'a, T>;
    pub type WriteGuard<'a, T> = spin::RwLockWriteGuard<'a, T>;

    /// `spin`'s locks cannot be poisoned: the results are the guards themselves.
    pub fn ok<G>(guard: G) -> G {
        guard
    }

    pub fn try_ok<G>(guard: Option<G>) -> Option<G> {
        guard
    }
}

#[cfg(feature = "shuttle")]
mod imp {
    extern crate std;
    use std::sync::{LockResult, PoisonError, TryLockError, TryLockResult};

    pub type Mutex<T> = shuttle::sync::Mutex<T>;
    pub type MutexGuard<'a, T> = shuttle::sync::MutexGuard<'a, T>;
    pub type RwLock<T> = shuttle::sync::RwLock<T>;
    pub type ReadGuard<'a, T> = shuttle::sync::RwLockReadGuard<'a, T>;
    pub type WriteGuard<'a, T> = shuttle::sync::RwLockWriteGuard<'a, T>;

    /// A thread that panicked while holding a lock already failed the run: shuttle reports
    /// that panic, so poisoning adds nothing and is ignored.
    pub fn ok<G>(result: LockResult<G>) -> G {
        result.unwrap_or_else(PoisonError::into_inner)
    }

    pub fn try_ok<G>(result: TryLockResult<G>) -> Option<G> {
        match result {
            Ok(guard) => Some(guard),
            Err(TryLockError::WouldBlock) => None,
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
        }
    }
}

/// Guard of a [`Mutex`].
pub type MutexGuard<'a, T> = imp::MutexGuard<'a, T>;
/// Shared guard of a [`RwLock`].
pub type RwLockReadGuard<'a, T> = imp::ReadGuard<'a, T>;
/// Exclusive guard of a [`RwLock`].
pub type RwLockWriteGuard<'a, T> = imp::WriteGuard<'a, T>;

/// A spinning mutex (shuttle's mutex under the checker). Knows nothing of the lock order:
/// use [`OrderedMutex`](crate::lock::OrderedMutex).
pub struct Mutex<T: ?Sized>(imp::Mutex<T>);

impl<T> Mutex<T> {
    /// A mutex holding `value` (usable in statics).
    pub const fn new(value: T) -> Self {
        Mutex(imp::Mutex::new(value))
    }

    /// Consumes the mutex, returning the value.
    pub fn into_inner(self) -> T {
        imp::ok(self.0.into_inner())
    }
}

impl<T: ?Sized> Mutex<T> {
    /// Blocking lock.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        imp::ok(self.0.lock())
    }

    /// Non-blocking lock.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        imp::try_ok(self.0.try_lock())
    }

    /// Mutable access without locking (the borrow proves exclusivity).
    pub fn get_mut(&mut self) -> &mut T {
        imp::ok(self.0.get_mut())
    }
}

/// A spinning reader-writer lock (shuttle's under the checker). Use
/// [`OrderedRwLock`](crate::lock::OrderedRwLock).
pub struct RwLock<T: ?Sized>(imp::RwLock<T>);

impl<T> RwLock<T> {
    /// An rwlock holding `value` (usable in statics).
    pub const fn new(value: T) -> Self {
        RwLock(imp::RwLock::new(value))
    }

    /// Consumes the lock, returning the value.
    pub fn into_inner(self) -> T {
        imp::ok(self.0.into_inner())
    }
}

impl<T: ?Sized> RwLock<T> {
    /// Blocking shared lock.
    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        imp::ok(self.0.read())
    }

    /// Blocking exclusive lock.
    pub fn write(&self) -> RwLockWriteGuard<'_, T> {
        imp::ok(self.0.write())
    }

    /// Non-blocking shared lock.
    pub fn try_read(&self) -> Option<RwLockReadGuard<'_, T>> {
        imp::try_ok(self.0.try_read())
    }

    /// Non-blocking exclusive lock.
    pub fn try_write(&self) -> Option<RwLockWriteGuard<'_, T>> {
        imp::try_ok(self.0.try_write())
    }

    /// Mutable access without locking (the borrow proves exclusivity).
    pub fn get_mut(&mut self) -> &mut T {
        imp::ok(self.0.get_mut())
    }
}
