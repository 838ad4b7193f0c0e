//! The hypervisor's stage-2 adapter: a VM's `stage2::Stage2Table` as rmap's
//! `Stage2Locked` sees it (page states decoded from and encoded into stage-2
//! descriptors, break-before-make, 2 MiB runs), with the VM's VMID and the
//! choice between a local and a broadcast TLB invalidation.
//!
//! It also holds what hyp does with guest memory on top of rmap, generic
//! over the VM ([`GuestVm`]): the huge first-touch fault and MEM_RELEASE
//! (`ops`), fork and teardown (`vm`), the memory half of snapshot restore
//! (`restore`), and rmap's frame allocator over the machine's frames
//! (`frames`).
//!
//! Everything the adapter needs from the machine (table pages, TLB and cache
//! maintenance, this CPU's index, barriers, the VMID allocator) comes through
//! [`Machine`], so the same code runs at EL2 (hyp's `HypMachine`, a
//! zero-sized type: monomorphised, no dynamic dispatch on the fault path)
//! and in host tests (`tests/`, over stage2's `HostMemory`/`RecordingTlb`
//! and rmap's real `Rmap`).

#![no_std]

extern crate alloc;

#[cfg(debug_assertions)]
pub mod bbm;
mod blockmig;
mod frames;
mod ksm;
mod locked;
mod machine;
mod memory;
mod ops;
mod restore;
mod s2locked;
mod vm;

pub use frames::{publish, Frames};
pub use ksm::{PassStats, ScanVm, Scanner};
pub use locked::{LockedStage2, BLOCK_SIZE};
pub use machine::Machine;
pub use memory::{
    ram_attrs, GuestMemory, VmTlb, BROADCAST_FLUSHES, LOCAL_FLUSHES, NO_VMID_FLUSHES,
};
pub use ops::{fault_block, release};
pub use restore::{reset_memory, restore_dirty, RestoreError};
pub use vm::{fork_memory, teardown, BatchGuard, GuestVm, MemCtx};

/// Bytes in a page (the 4 KiB granule).
pub const PAGE_SIZE: u64 = stage2::PAGE_SIZE;
