//! The one place the crate's atomics and spin-wait hint come from: `core`'s, or with the
//! `shuttle` feature [shuttle]'s, so that the table code itself (break-before-make by CAS,
//! lockless Access-flag and software-entry updates) runs under shuttle's schedulers in
//! `tests/shuttle_table.rs`. Under the checker a spin-wait yields: shuttle runs one thread at a
//! time, and the slot's `Locked` owner must get to run. (The VMID allocator keeps its own
//! `cfg(loom)` switch, `vmid.rs`.)
//!
//! [shuttle]: https://docs.rs/shuttle

/// Atomic integers and orderings.
pub mod atomic {
    #[cfg(not(feature = "shuttle"))]
    pub use core::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
    #[cfg(feature = "shuttle")]
    pub use shuttle::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
}

/// Called in every spin-wait iteration: a CPU hint normally, a yield under the checker.
#[inline]
pub fn spin_loop() {
    #[cfg(not(feature = "shuttle"))]
    core::hint::spin_loop();
    #[cfg(feature = "shuttle")]
    shuttle::thread::yield_now();
}
