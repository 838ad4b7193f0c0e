//! `mm`: the memory manager. May use `arch` (and the `rmap`, `stage2`,
//! `platform`, `hypmm` crates); never `vdev`, `vm`, `boot` or `console`.
//!
//! Owns physical memory and every guest's view of it: the frame allocator (with its zero and copy in `frameops`) and
//! the hypervisor heap (`frames`, `heap`); the machine under the stage-2
//! adapter (`memory`: `HypMachine`, the stage-2 configuration, frame-backed
//! table pages with the split reserve, the EL2 TLB, the VMID allocator);
//! rmap's `Stage2` and `hypmm::GuestVm` for a VM (`vmmem`); the rmap glue
//! (`glue`: the stage-2 fault on RAM, `FrameAllocator`, `VmSet`, statistics);
//! the swap store (`store`) and its namespace of disk-image pages a VM
//! loaded from the disk faults in (`diskpages`), the dirty log (`dirty`),
//! migration and reclaim control (`memctl`), restore (`restore`), and the
//! same-page merger over `hypmm::Scanner` (`merge`).
//!
//! The adapter itself (rmap's `Stage2Locked` over a `stage2::Stage2Table`,
//! with its debug break-before-make witness) and the logic of the 2 MiB
//! first touch, MEM_RELEASE, fork, teardown and the memory half of snapshot
//! restore live in the workspace crate `hypmm`, generic over
//! `hypmm::Machine` and host-tested there; `glue` and `restore` here are
//! thin wrappers that instantiate it.
//!
//! A VM's memory is a [`VmMemory`]: its RAM range, region list (lock level 1),
//! stage-2 table (level 4) and dirty log. `vm::Vm` owns one; `mm` finds it by
//! VM id through its own registry, never through `vm`.

pub mod dirty;
pub mod diskpages;
mod frameops;
pub mod frames;
pub mod glue;
pub mod heap;
pub mod memctl;
pub mod memory;
pub mod merge;
pub mod restore;
pub mod store;
pub mod vmmem;

pub use vmmem::{MemError, VmMemory};
