//! `mm`: the memory manager. May use `arch` (and the `rmap`, `stage2`,
//! `platform` crates); never `vdev`, `vm`, `boot` or `console`.
//!
//! Owns physical memory and every guest's view of it: the frame allocator and
//! the hypervisor heap (`frames`, `heap`), the stage-2 adapter that implements
//! rmap's `Stage2`/`Stage2Locked` over a `stage2::Stage2Table` (`memory`, with
//! its debug break-before-make witness `bbm`), the rmap glue (`glue`: the
//! stage-2 fault on RAM, `FrameAllocator`, `VmSet`, statistics), the swap
//! store (`store`), the dirty log (`dirty`), migration and reclaim control
//! (`memctl`), and the memory half of snapshot restore (`restore`).
//!
//! A VM's memory is a [`VmMemory`]: its RAM range, region list (lock level 1),
//! stage-2 table (level 4) and dirty log. `vm::Vm` owns one; `mm` finds it by
//! VM id through its own registry, never through `vm`.

#[cfg(debug_assertions)]
pub mod bbm;
pub mod dirty;
pub mod frames;
pub mod glue;
pub mod heap;
pub mod locked;
pub mod memctl;
pub mod memory;
pub mod restore;
mod s2locked;
pub mod store;
pub mod vmmem;

pub use vmmem::{MemError, VmMemory};
