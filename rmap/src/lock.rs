//! Lock helpers that know their place in the memory manager's lock order.
//!
//! Every memory-manager lock is taken through [`OrderedMutex`], [`OrderedRwLock`] or, for locks
//! that are not Rust objects (the frame lock bit), [`lockdep::acquire`] / [`lockdep::release`].
//! Each lock carries a [`LockClass`]: a [`Level`] from [`LOCK_ORDER`] and a name. In debug builds
//! [`lockdep`] records what each CPU (or host thread) holds and panics, naming both locks, when a
//! blocking acquisition would invert the order. Release builds compile the checks away.
//!
//! The rule: a blocking acquisition must be at a strictly higher `(level, subclass)` than every
//! lock this CPU already holds. Two locks of one level (a parent's and a child's stage-2 lock
//! during fork) use [`Level::nested`] for the second one, as Linux uses `SINGLE_DEPTH_NESTING`.
//! A try-lock never waits, so it is exempt from the order check (that is the documented back-off
//! path: an rmap walker holding an anon_vma lock may *try* a VM's region-list lock); it is still
//! recorded, so what is taken after it is checked against it.

use crate::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use core::fmt;
use core::ops::{Deref, DerefMut};

/// A position in the lock order. Compared as `(rank, subclass)`; lower is outer.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Level {
    rank: u8,
    subclass: u8,
}

impl Level {
    /// 1. A VM's region-list lock (rwlock: read for faults; write for fork, region changes,
    ///    destroy). Like `mmap_lock`.
    pub const VM_REGIONS: Level = Level::rank(1);
    /// 2. A frame's lock bit (migration, reclaim, swap-in). Like `folio_lock`.
    pub const FRAME: Level = Level::rank(2);
    /// 3. The root `AnonVma` lock of a fork family (write: link/unlink chains; read: walk).
    pub const ANON_VMA: Level = Level::rank(3);
    /// 4. A VM's stage-2 lock. Like the page-table lock.
    pub const STAGE2: Level = Level::rank(4);
    /// 5. A merged frame's stable node (its rmap items and their counts). A leaf lock held
    ///    only to read or change that list, never while calling out: fork takes it under the
    ///    stage-2 locks to count a new mapping of a merged frame. Items are added and removed
    ///    only with the frame's lock held as well, so a walk may copy the list and let go.
    pub const STABLE_NODE: Level = Level::rank(5);
    /// 6. Frame allocator, pool free lists, per-frame atomics. Innermost: never call out while
    ///    holding one.
    pub const ALLOCATOR: Level = Level::rank(6);

    const fn rank(rank: u8) -> Level {
        Level { rank, subclass: 0 }
    }

    /// The same level, one nesting step deeper: for holding two locks of one level in a fixed
    /// order (parent before child).
    pub const fn nested(self, subclass: u8) -> Level {
        Level {
            rank: self.rank,
            subclass,
        }
    }

    /// The rank in [`LOCK_ORDER`] (1 = outermost).
    pub const fn rank_number(self) -> u8 {
        self.rank
    }

    /// The nesting subclass (0 unless made with [`Level::nested`]).
    pub const fn subclass(self) -> u8 {
        self.subclass
    }

    /// The name of this level as written in [`LOCK_ORDER`].
    pub fn name(self) -> &'static str {
        LOCK_ORDER
            .iter()
            .find(|(level, _)| level.rank == self.rank)
            .map_or("unknown level", |(_, name)| name)
    }
}

impl fmt::Debug for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.rank, self.name())?;
        if self.subclass != 0 {
            write!(f, "/{}", self.subclass)?;
        }
        Ok(())
    }
}

/// THE lock order, outermost first. This table is the single place it is written (DESIGN.md's
/// list mirrors it); every helper in the crate takes its level from here.
pub const LOCK_ORDER: [(Level, &str); 6] = [
    (Level::VM_REGIONS, "vm region list"),
    (Level::FRAME, "frame lock bit"),
    (Level::ANON_VMA, "root anon_vma"),
    (Level::STAGE2, "vm stage-2"),
    (Level::STABLE_NODE, "stable node"),
    (Level::ALLOCATOR, "allocator / pool"),
];

/// What lockdep knows about a lock: its level and a human name for panic messages.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct LockClass {
    /// Position in the order.
    pub level: Level,
    /// Name printed on an inversion, e.g. `"vm3.stage2"` or `"anon_vma.root"`.
    pub name: &'static str,
}

impl LockClass {
    /// A class at `level` called `name`.
    pub const fn new(level: Level, name: &'static str) -> Self {
        LockClass { level, name }
    }

    fn nested(self, subclass: u8) -> Self {
        LockClass {
            level: self.level.nested(subclass),
            name: self.name,
        }
    }
}

impl fmt::Debug for LockClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` (level {:?})", self.name, self.level)
    }
}

fn addr_of<T: ?Sized>(value: &T) -> usize {
    value as *const T as *const () as usize
}

/// A mutex at a fixed place in the lock order.
pub struct OrderedMutex<T: ?Sized> {
    class: LockClass,
    inner: Mutex<T>,
}

/// Holds an [`OrderedMutex`]; unlocks and tells lockdep on drop.
pub struct OrderedMutexGuard<'a, T: ?Sized> {
    id: usize,
    guard: MutexGuard<'a, T>,
}

impl<T> OrderedMutex<T> {
    /// A mutex at `level` called `name` (usable in statics).
    pub const fn new(level: Level, name: &'static str, value: T) -> Self {
        OrderedMutex {
            class: LockClass::new(level, name),
            inner: Mutex::new(value),
        }
    }

    /// Consumes the mutex, returning the value.
    pub fn into_inner(self) -> T {
        self.inner.into_inner()
    }
}

impl<T: ?Sized> OrderedMutex<T> {
    /// Blocking lock; panics in debug builds on an order inversion.
    pub fn lock(&self) -> OrderedMutexGuard<'_, T> {
        self.lock_class(self.class)
    }

    /// Blocking lock of the second lock of one level (see [`Level::nested`]).
    pub fn lock_nested(&self, subclass: u8) -> OrderedMutexGuard<'_, T> {
        self.lock_class(self.class.nested(subclass))
    }

    fn lock_class(&self, class: LockClass) -> OrderedMutexGuard<'_, T> {
        let id = addr_of(self);
        lockdep::check(class, id);
        let guard = self.inner.lock();
        lockdep::record(class, id);
        OrderedMutexGuard { id, guard }
    }

    /// Non-blocking lock: exempt from the order check (it cannot deadlock), recorded if taken.
    pub fn try_lock(&self) -> Option<OrderedMutexGuard<'_, T>> {
        let id = addr_of(self);
        let guard = self.inner.try_lock()?;
        lockdep::record(self.class, id);
        Some(OrderedMutexGuard { id, guard })
    }

    /// Mutable access without locking (the borrow proves exclusivity).
    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut()
    }

    /// This lock's class.
    pub fn class(&self) -> LockClass {
        self.class
    }
}

impl<T: ?Sized> Drop for OrderedMutexGuard<'_, T> {
    fn drop(&mut self) {
        lockdep::release(self.id);
    }
}

impl<T: ?Sized> Deref for OrderedMutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T: ?Sized> DerefMut for OrderedMutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

/// A reader-writer lock at a fixed place in the lock order.
pub struct OrderedRwLock<T: ?Sized> {
    class: LockClass,
    inner: RwLock<T>,
}

/// Shared access to an [`OrderedRwLock`].
pub struct OrderedReadGuard<'a, T: ?Sized> {
    id: usize,
    guard: RwLockReadGuard<'a, T>,
}

/// Exclusive access to an [`OrderedRwLock`].
pub struct OrderedWriteGuard<'a, T: ?Sized> {
    id: usize,
    guard: RwLockWriteGuard<'a, T>,
}

impl<T> OrderedRwLock<T> {
    /// An rwlock at `level` called `name` (usable in statics).
    pub const fn new(level: Level, name: &'static str, value: T) -> Self {
        OrderedRwLock {
            class: LockClass::new(level, name),
            inner: RwLock::new(value),
        }
    }

    /// Consumes the lock, returning the value.
    pub fn into_inner(self) -> T {
        self.inner.into_inner()
    }
}

impl<T: ?Sized> OrderedRwLock<T> {
    /// Blocking shared lock.
    pub fn read(&self) -> OrderedReadGuard<'_, T> {
        self.read_class(self.class)
    }

    /// Blocking shared lock of a second lock of the same level.
    pub fn read_nested(&self, subclass: u8) -> OrderedReadGuard<'_, T> {
        self.read_class(self.class.nested(subclass))
    }

    /// Blocking exclusive lock.
    pub fn write(&self) -> OrderedWriteGuard<'_, T> {
        self.write_class(self.class)
    }

    /// Blocking exclusive lock of a second lock of the same level.
    pub fn write_nested(&self, subclass: u8) -> OrderedWriteGuard<'_, T> {
        self.write_class(self.class.nested(subclass))
    }

    fn read_class(&self, class: LockClass) -> OrderedReadGuard<'_, T> {
        let id = addr_of(self);
        lockdep::check(class, id);
        let guard = self.inner.read();
        lockdep::record(class, id);
        OrderedReadGuard { id, guard }
    }

    fn write_class(&self, class: LockClass) -> OrderedWriteGuard<'_, T> {
        let id = addr_of(self);
        lockdep::check(class, id);
        let guard = self.inner.write();
        lockdep::record(class, id);
        OrderedWriteGuard { id, guard }
    }

    /// Non-blocking shared lock (the back-off path; exempt from the order check).
    pub fn try_read(&self) -> Option<OrderedReadGuard<'_, T>> {
        let id = addr_of(self);
        let guard = self.inner.try_read()?;
        lockdep::record(self.class, id);
        Some(OrderedReadGuard { id, guard })
    }

    /// Non-blocking exclusive lock (exempt from the order check).
    pub fn try_write(&self) -> Option<OrderedWriteGuard<'_, T>> {
        let id = addr_of(self);
        let guard = self.inner.try_write()?;
        lockdep::record(self.class, id);
        Some(OrderedWriteGuard { id, guard })
    }

    /// Mutable access without locking (the borrow proves exclusivity).
    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut()
    }

    /// This lock's class.
    pub fn class(&self) -> LockClass {
        self.class
    }
}

impl<T: ?Sized> Drop for OrderedReadGuard<'_, T> {
    fn drop(&mut self) {
        lockdep::release(self.id);
    }
}

impl<T: ?Sized> Drop for OrderedWriteGuard<'_, T> {
    fn drop(&mut self) {
        lockdep::release(self.id);
    }
}

impl<T: ?Sized> Deref for OrderedReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T: ?Sized> Deref for OrderedWriteGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T: ?Sized> DerefMut for OrderedWriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

pub mod lockdep;

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn order_table_is_strictly_increasing() {
        for pair in LOCK_ORDER.windows(2) {
            assert!(pair[0].0 < pair[1].0);
        }
        assert_eq!(Level::STAGE2.name(), "vm stage-2");
    }

    #[test]
    fn in_order_nesting_is_fine() {
        let regions = OrderedRwLock::new(Level::VM_REGIONS, "vm.regions", ());
        let anon = OrderedRwLock::new(Level::ANON_VMA, "anon_vma.root", ());
        let s2 = OrderedMutex::new(Level::STAGE2, "vm.stage2", ());
        let r = regions.read();
        let a = anon.write();
        let s = s2.lock();
        assert_eq!(lockdep::held_count(), 3);
        drop(a); // out-of-order release is allowed
        drop(s);
        drop(r);
        lockdep::assert_none_held();
    }

    #[test]
    #[cfg_attr(
        debug_assertions,
        should_panic(
            expected = "acquiring `vm.regions` (level 1:vm region list) while holding `anon_vma.root`"
        )
    )]
    fn inversion_panics_with_both_names() {
        let regions = OrderedRwLock::new(Level::VM_REGIONS, "vm.regions", ());
        let anon = OrderedRwLock::new(Level::ANON_VMA, "anon_vma.root", ());
        let _a = anon.read();
        let _r = regions.read();
    }

    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "lock order inversion"))]
    fn same_level_without_nesting_panics() {
        let a = OrderedMutex::new(Level::STAGE2, "vm1.stage2", ());
        let b = OrderedMutex::new(Level::STAGE2, "vm2.stage2", ());
        let _a = a.lock();
        let _b = b.lock();
    }

    #[test]
    fn nested_same_level_is_fine() {
        let a = OrderedMutex::new(Level::STAGE2, "parent.stage2", ());
        let b = OrderedMutex::new(Level::STAGE2, "child.stage2", ());
        let _a = a.lock();
        let _b = b.lock_nested(1);
    }

    #[test]
    fn try_lock_is_the_back_off_path() {
        let regions = OrderedRwLock::new(Level::VM_REGIONS, "vm.regions", ());
        let anon = OrderedRwLock::new(Level::ANON_VMA, "anon_vma.root", ());
        let a = anon.read();
        let r = regions.try_read().expect("uncontended");
        assert_eq!(lockdep::held_count(), 2);
        drop(r);
        drop(a);
        let _w = regions.write();
        let _a = anon.read();
        assert!(
            regions.try_read().is_none(),
            "contended: back off instead of waiting"
        );
    }

    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "recursive locking"))]
    fn recursion_panics() {
        let anon = OrderedRwLock::new(Level::ANON_VMA, "anon_vma.root", ());
        let _a = anon.read();
        let _b = anon.read();
    }
}
