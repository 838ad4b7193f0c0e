//! The debug-build lock-order checker (a small lockdep).
//!
//! State is per CPU at EL2 (a fixed array of [`MAX_CPUS`] slots indexed by
//! the hook the hypervisor installs with [`set_cpu_index_hook`];
//! CPU 0 until it does) and per thread on the host (feature `std`, or `cfg(test)`; per shuttle thread under the
//! `shuttle` feature, whose threads all run on one OS thread). It assumes
//! hypervisor code is not migrated between CPUs while it holds a lock, true at EL2 where the
//! hypervisor is not preempted.

use super::LockClass;
use arrayvec::ArrayVec;

/// Whether the checker runs (debug builds only).
pub const ENABLED: bool = cfg!(debug_assertions);
/// Per-CPU state slots at EL2 (`platform::board::MAX_CPUS`).
pub const MAX_CPUS: usize = 64;
/// Locks one CPU may hold at once.
pub const MAX_HELD: usize = 16;

#[derive(Clone, Copy)]
struct Held {
    class: LockClass,
    id: usize,
}

type HeldStack = ArrayVec<Held, MAX_HELD>;

/// The hook was already installed.
#[derive(Debug, PartialEq, Eq)]
pub struct HookAlreadySet;

// Real `spin` primitives even under the checker: the hook is set once at boot, and the per-CPU
// slots exist only at EL2 (host builds, shuttle's included, keep the stack per thread).
static CPU_HOOK: spin::Once<fn() -> usize> = spin::Once::new();

/// Installs the function that returns the current CPU's index (`< MAX_CPUS`). Once only.
pub fn set_cpu_index_hook(hook: fn() -> usize) -> Result<(), HookAlreadySet> {
    let mut installed = false;
    CPU_HOOK.call_once(|| {
        installed = true;
        hook
    });
    installed.then_some(()).ok_or(HookAlreadySet)
}

#[cfg(not(any(test, feature = "std")))]
fn with_held<R>(f: impl FnOnce(&mut HeldStack) -> R) -> R {
    static CPUS: [spin::Mutex<HeldStack>; MAX_CPUS] =
        [const { spin::Mutex::new(ArrayVec::new_const()) }; MAX_CPUS];
    let cpu = CPU_HOOK.get().map_or(0, |hook| hook());
    assert!(cpu < MAX_CPUS, "lockdep: cpu index {cpu} >= MAX_CPUS");
    // Only this CPU touches its slot; the mutex is uncontended and just satisfies `Sync`.
    f(&mut CPUS[cpu].lock())
}

#[cfg(all(any(test, feature = "std"), not(feature = "shuttle")))]
fn with_held<R>(f: impl FnOnce(&mut HeldStack) -> R) -> R {
    extern crate std;
    use core::cell::RefCell;
    std::thread_local! {
        static HELD: RefCell<HeldStack> = const { RefCell::new(ArrayVec::new_const()) };
    }
    HELD.with(|held| f(&mut held.borrow_mut()))
}

/// Under the checker every shuttle thread runs on the test's one OS thread: an OS thread-local
/// would be shared by all of them, so the held stack is a shuttle thread-local.
#[cfg(feature = "shuttle")]
fn with_held<R>(f: impl FnOnce(&mut HeldStack) -> R) -> R {
    extern crate std; // the macro names `std`
    use core::cell::RefCell;
    shuttle::thread_local! {
        static HELD: RefCell<HeldStack> = const { RefCell::new(ArrayVec::new_const()) };
    }
    HELD.with(|held| f(&mut held.borrow_mut()))
}

/// Checks that blocking on lock `id` of `class` respects the order. Panics naming both
/// locks on an inversion, and on recursive acquisition.
pub fn check(class: LockClass, id: usize) {
    if !ENABLED {
        return;
    }
    let conflict = with_held(|held| {
        held.iter()
            .find(|h| h.id == id || h.class.level >= class.level)
            .copied()
    });
    if let Some(h) = conflict {
        if h.id == id {
            panic!("lockdep: recursive locking of {:?}", class);
        }
        panic!(
            "lockdep: lock order inversion: acquiring {:?} while holding {:?}",
            class, h.class
        );
    }
}

/// Records that lock `id` of `class` is now held by this CPU.
pub fn record(class: LockClass, id: usize) {
    if !ENABLED {
        return;
    }
    with_held(|held| {
        if held.try_push(Held { class, id }).is_err() {
            panic!("lockdep: more than {MAX_HELD} locks held, acquiring {class:?}");
        }
    });
}

/// Check and record in one step, for locks that are not Rust objects (call after the lock
/// is taken only if it was a try-lock; otherwise call [`check`] before waiting).
pub fn acquire(class: LockClass, id: usize) {
    check(class, id);
    record(class, id);
}

/// Records that lock `id` was released (in any order).
pub fn release(id: usize) {
    if !ENABLED {
        return;
    }
    with_held(|held| {
        let pos = held.iter().rposition(|h| h.id == id);
        let pos = pos.unwrap_or_else(|| panic!("lockdep: releasing a lock not held"));
        held.remove(pos);
    });
}

/// How many locks this CPU holds (0 when the checker is disabled).
pub fn held_count() -> usize {
    if !ENABLED {
        return 0;
    }
    with_held(|held| held.len())
}

/// Panics if this CPU holds any memory-manager lock (e.g. before entering a guest).
pub fn assert_none_held() {
    if !ENABLED {
        return;
    }
    with_held(|held| {
        if let Some(h) = held.first() {
            panic!("lockdep: {:?} still held", h.class);
        }
    });
}
