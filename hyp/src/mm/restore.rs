//! The memory half of restoring a VM to its snapshot: `hypmm::restore`
//! (host-tested) on this machine. Fast path [`restore_dirty`] (only the
//! pages the dirty log names, in break / flush / make chunks); slow path
//! [`reset_memory`] then `glue::fork_memory`.

use crate::mm::glue::{cx, rmap};
use crate::mm::VmMemory;

pub use hypmm::RestoreError;

/// Makes every logged page of `vm` its snapshot's again. The caller holds
/// `vm` quiesced; `snap` is frozen.
pub fn restore_dirty(vm: &VmMemory, snap: &VmMemory) -> Result<(), RestoreError> {
    // Never pending here (a loaded VM's log is relative to its own image
    // until a snapshot, whose fork completes it), but cheap to be sure.
    crate::mm::diskpages::complete(vm).map_err(|_| RestoreError::Memory)?;
    hypmm::restore_dirty(&cx(rmap()), vm, snap)
}

/// Slow-path first half: zaps and unlinks every region of `vm` but keeps
/// its stage-2 table and VMID for the fork that refills it.
pub fn reset_memory(vm: &VmMemory) {
    // Its image's pages are replaced too, pending ones included.
    crate::mm::diskpages::drop_pending(vm);
    hypmm::reset_memory(&cx(rmap()), vm)
}
